//! Sparse designs: the sparse and dense paths agree on the same data (coefficients and the
//! hypergradients of every method, for every model of the family), the matrix-free support
//! method agrees with the factored one, svmlight files read back exactly, and bad sparse
//! input gets errors that name what is wrong.

use clarke_convex::cd::{CdOptions, solve};
use clarke_convex::data::{
    SparseRegression, SparseShape, parse_svmlight, read_svmlight, sparse_synthetic, split_sparse, write_svmlight,
};
use clarke_convex::design::CscMatrix;
use clarke_convex::hypergrad::{Criterion, HypergradOptions, Method, ValidationLogLoss, ValidationMse, hypergradient};
use clarke_convex::model::{LassoModel, Penalty};
use clarke_core::Error;
use ndarray::{Array1, Array2, array};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn tight() -> CdOptions {
    CdOptions::default().with_tol(1e-15).with_max_epochs(1_000_000)
}

/// An `n x p` matrix with about `density` of its entries non-zero (standard normal).
fn sparse_dense(n: usize, p: usize, density: f64, rng: &mut ChaCha8Rng) -> Array2<f64> {
    Array2::from_shape_simple_fn((n, p), || {
        if rng.random::<f64>() < density {
            let u: f64 = rng.random::<f64>() - 0.5;
            u * 4.0
        } else {
            0.0
        }
    })
}

/// Training and validation designs with a planted sparse signal.
struct Problem {
    x: Array2<f64>,
    y: Array1<f64>,
    x_val: Array2<f64>,
    y_val: Array1<f64>,
}

fn problem(logistic: bool, seed: u64) -> Problem {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (n, p) = (60, 40);
    let x = sparse_dense(n, p, 0.3, &mut rng);
    let x_val = sparse_dense(30, p, 0.3, &mut rng);
    let beta: Array1<f64> = Array1::from_shape_fn(p, |j| if j < 5 { 1.0 + j as f64 / 4.0 } else { 0.0 });
    let label = |m: f64, rng: &mut ChaCha8Rng| {
        if logistic {
            f64::from(m + 0.3 * (rng.random::<f64>() - 0.5) > 0.0)
        } else {
            m + 0.2 * (rng.random::<f64>() - 0.5)
        }
    };
    let y = x.dot(&beta).mapv(|m| label(m, &mut rng));
    let y_val = x_val.dot(&beta).mapv(|m| label(m, &mut rng));
    Problem { x, y, x_val, y_val }
}

fn max_diff(a: &Array1<f64>, b: &Array1<f64>) -> f64 {
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
}

fn scale(a: &Array1<f64>) -> f64 {
    a.iter().fold(1e-300f64, |m, x| m.max(x.abs()))
}

/// The model, its criterion and a penalty, dense and sparse, for one member of the family.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Lasso,
    ElasticNet,
    Weighted,
    Logistic,
}

fn models(kind: Kind) -> [(LassoModel, Box<dyn Criterion>); 2] {
    let logistic = matches!(kind, Kind::Logistic);
    let pr = problem(logistic, 7);
    let sx = CscMatrix::from_dense(pr.x.view()).unwrap();
    let sv = CscMatrix::from_dense(pr.x_val.view()).unwrap();
    let (dense, sparse) = if logistic {
        (
            LassoModel::logistic(pr.x.view(), pr.y.view()).unwrap(),
            LassoModel::logistic_sparse(sx, pr.y.view()).unwrap(),
        )
    } else {
        (
            LassoModel::new(pr.x.view(), pr.y.view()).unwrap(),
            LassoModel::new_sparse(sx, pr.y.view()).unwrap(),
        )
    };
    let (dense, sparse) = match kind {
        Kind::ElasticNet => (dense.with_l2(0.05).unwrap(), sparse.with_l2(0.05).unwrap()),
        _ => (dense, sparse),
    };
    let (cd, cs): (Box<dyn Criterion>, Box<dyn Criterion>) = if logistic {
        (
            Box::new(ValidationLogLoss::new(pr.x_val.view(), pr.y_val.view()).unwrap()),
            Box::new(ValidationLogLoss::new_sparse(sv, pr.y_val.view()).unwrap()),
        )
    } else {
        (
            Box::new(ValidationMse::new(pr.x_val.view(), pr.y_val.view()).unwrap()),
            Box::new(ValidationMse::new_sparse(sv, pr.y_val.view()).unwrap()),
        )
    };
    [(dense, cd), (sparse, cs)]
}

fn penalty(kind: Kind, model: &LassoModel) -> Penalty {
    let l = model.lambda_max() / 6.0;
    match kind {
        Kind::Weighted => Penalty::PerFeature(Array1::from_shape_fn(model.p(), |j| l * (0.6 + 0.02 * j as f64))),
        _ => Penalty::Uniform(l),
    }
}

/// Sparse and dense agree to 1e-10 on the coefficients and on the hypergradient of every
/// method; the sparse model is really stored sparse.
fn sparse_matches_dense(kind: Kind) {
    let [(dense, crit_d), (sparse, crit_s)] = models(kind);
    assert!(sparse.is_sparse() && !dense.is_sparse());
    assert!(
        sparse.nnz() < dense.nnz() / 2,
        "{kind:?}: {} stored of {}",
        sparse.nnz(),
        dense.nnz()
    );
    assert!((dense.lambda_max() - sparse.lambda_max()).abs() <= 1e-14 * dense.lambda_max());
    let pen = penalty(kind, &dense);
    let fd = solve(&dense, &pen, None, &tight()).unwrap();
    let fs = solve(&sparse, &pen, None, &tight()).unwrap();
    assert!(fd.is_converged() && fs.is_converged());
    let support = fd.support();
    assert!(
        support.len() >= 3,
        "{kind:?}: support {support:?} too small to test anything"
    );
    assert_eq!(support, fs.support(), "{kind:?}");
    let d = max_diff(&fd.beta, &fs.beta);
    assert!(d <= 1e-10 * scale(&fd.beta), "{kind:?}: coefficients differ by {d:e}");
    let opts = HypergradOptions::default();
    for method in [Method::Support, Method::Forward, Method::Implicit, Method::Unrolled] {
        let hd = hypergradient(&dense, &fd, crit_d.as_ref(), method, &opts).unwrap();
        let hs = hypergradient(&sparse, &fs, crit_s.as_ref(), method, &opts).unwrap();
        let d = max_diff(&hd.gradient, &hs.gradient);
        assert!(
            d <= 1e-10 * scale(&hd.gradient),
            "{kind:?} {method}: hypergradients differ by {d:e} (dense {}, sparse {})",
            hd.gradient,
            hs.gradient
        );
        assert!((hd.value - hs.value).abs() <= 1e-12 * hd.value.abs().max(1.0));
        assert_eq!(hd.check.outcome, hs.check.outcome, "{kind:?} {method}");
    }
    // The matrix-free support method (conjugate gradients, Lanczos check) agrees too.
    let free = HypergradOptions {
        dense_support_limit: 0,
        ..HypergradOptions::default()
    };
    let hd = hypergradient(&dense, &fd, crit_d.as_ref(), Method::Support, &opts).unwrap();
    let hf = hypergradient(&sparse, &fs, crit_s.as_ref(), Method::Support, &free).unwrap();
    let d = max_diff(&hd.gradient, &hf.gradient);
    assert!(
        d <= 1e-9 * scale(&hd.gradient),
        "{kind:?}: matrix-free support differs by {d:e}"
    );
    let rel = |a: f64, b: f64| (a - b).abs() / b;
    assert!(
        rel(hf.check.sigma_min, hd.check.sigma_min) < 1e-8,
        "{kind:?}: sigma_min {} vs {}",
        hf.check.sigma_min,
        hd.check.sigma_min
    );
    assert!(
        rel(hf.check.sigma_max, hd.check.sigma_max) < 1e-8,
        "{kind:?}: sigma_max"
    );
}

#[test]
fn sparse_lasso_matches_dense() {
    sparse_matches_dense(Kind::Lasso);
}

#[test]
fn sparse_elastic_net_matches_dense() {
    sparse_matches_dense(Kind::ElasticNet);
}

#[test]
fn sparse_weighted_lasso_matches_dense() {
    sparse_matches_dense(Kind::Weighted);
}

#[test]
fn sparse_logistic_matches_dense() {
    sparse_matches_dense(Kind::Logistic);
}

/// A fractional selection at kinks, matrix-free (GMRES) against the factored LU: a wide
/// kink band puts the near-equicorrelated features on their kinks next to the support.
#[test]
fn matrix_free_fractional_selection_matches_dense() {
    let [(dense, crit), _] = models(Kind::Lasso);
    let pen = penalty(Kind::Lasso, &dense);
    let fit = solve(&dense, &pen, None, &tight()).unwrap();
    let policy = clarke_core::KinkPolicy::pytorch().with_soft_threshold(0.5);
    let mut opts = HypergradOptions::default().with_policy(policy);
    opts.kink_tol = 0.5;
    let factored = hypergradient(&dense, &fit, crit.as_ref(), Method::Support, &opts).unwrap();
    assert!(
        !factored.check.kinks.is_empty() && !factored.check.support.is_empty(),
        "{}",
        factored.check
    );
    let free = HypergradOptions {
        dense_support_limit: 0,
        ..opts
    };
    let mf = hypergradient(&dense, &fit, crit.as_ref(), Method::Support, &free).unwrap();
    let d = max_diff(&factored.gradient, &mf.gradient);
    assert!(d <= 1e-9 * scale(&factored.gradient), "GMRES differs by {d:e}");
    // The selection matters: q = 0.5 at the kinks gives another element than q = 0.
    let zero = hypergradient(
        &dense,
        &fit,
        crit.as_ref(),
        Method::Support,
        &HypergradOptions {
            kink_tol: 0.5,
            ..HypergradOptions::default()
        },
    )
    .unwrap();
    assert!(max_diff(&zero.gradient, &mf.gradient) > 1e-6 * scale(&zero.gradient));
}

#[test]
fn csc_constructors_agree() {
    let dense = array![[1.0, 0.0, 2.0], [0.0, 0.0, 3.0], [4.0, 5.0, 0.0]];
    let a = CscMatrix::from_dense(dense.view()).unwrap();
    let b = CscMatrix::try_new(
        3,
        3,
        vec![0, 2, 3, 5],
        vec![0, 2, 2, 0, 1],
        vec![1.0, 4.0, 5.0, 2.0, 3.0],
    )
    .unwrap();
    let c = CscMatrix::from_triplets(3, 3, &[(1, 2, 3.0), (2, 1, 5.0), (0, 0, 1.0), (0, 2, 2.0), (2, 0, 4.0)]).unwrap();
    for m in [&a, &b, &c] {
        assert_eq!(m.to_dense(), dense);
        assert_eq!(m.nnz(), 5);
    }
    assert_eq!(a.column(2), (&[0usize, 1][..], &[2.0, 3.0][..]));
    assert_eq!(a.rows(1..3).unwrap().to_dense(), dense.slice(ndarray::s![1..3, ..]));
    assert_eq!(a.transpose().to_dense(), dense.t());
    assert_eq!(a.transpose().transpose().to_dense(), dense);
    let back = CscMatrix::from_faer(a.as_faer()).unwrap();
    assert_eq!(back.to_dense(), dense);
}

fn invalid_detail(e: Error) -> String {
    match e {
        Error::InvalidArgument { detail, .. } => detail,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn bad_sparse_input_is_named() {
    // Unsorted, duplicate and out-of-range row indices; NaN; a short col_ptr; a bad col_ptr.
    let unsorted = CscMatrix::try_new(3, 2, vec![0, 2, 3], vec![2, 0, 1], vec![1.0, 1.0, 1.0]).unwrap_err();
    let d = invalid_detail(unsorted);
    assert!(d.contains("column 0") && d.contains("unsorted"), "{d}");
    let dup = CscMatrix::try_new(3, 2, vec![0, 1, 3], vec![0, 1, 1], vec![1.0, 1.0, 1.0]).unwrap_err();
    let d = invalid_detail(dup);
    assert!(d.contains("column 1") && d.contains("duplicate"), "{d}");
    let out = CscMatrix::try_new(3, 2, vec![0, 1, 2], vec![0, 3], vec![1.0, 1.0]).unwrap_err();
    let d = invalid_detail(out);
    assert!(d.contains("row index 3") && d.contains("3 rows"), "{d}");
    let nan = CscMatrix::try_new(3, 2, vec![0, 1, 2], vec![0, 2], vec![1.0, f64::NAN]).unwrap_err();
    let d = invalid_detail(nan);
    assert!(d.contains("NaN") && d.contains("row 2, column 1"), "{d}");
    let short = CscMatrix::try_new(3, 2, vec![0, 1], vec![0], vec![1.0]).unwrap_err();
    assert!(matches!(short, Error::ShapeMismatch { .. }), "{short:?}");
    let lengths = CscMatrix::try_new(3, 2, vec![0, 1, 2], vec![0, 1], vec![1.0]).unwrap_err();
    assert!(matches!(lengths, Error::ShapeMismatch { .. }), "{lengths:?}");
    let decreasing = CscMatrix::try_new(3, 2, vec![0, 2, 1], vec![0, 1], vec![1.0, 1.0]).unwrap_err();
    assert!(invalid_detail(decreasing).contains("decreases at column 1"));
    let twice = CscMatrix::from_triplets(3, 2, &[(0, 1, 1.0), (2, 0, 1.0), (0, 1, 2.0)]).unwrap_err();
    let d = invalid_detail(twice);
    assert!(d.contains("(0, 1)") && d.contains("triplets 0 and 2"), "{d}");
    let outside = CscMatrix::from_triplets(3, 2, &[(0, 2, 1.0)]).unwrap_err();
    assert!(invalid_detail(outside).contains("outside the 3 x 2 matrix"));
    let inf = CscMatrix::from_dense(array![[1.0, f64::INFINITY]].view()).unwrap_err();
    assert!(invalid_detail(inf).contains("row 0, column 1"));
    // Shapes against y, and a constant column.
    let x = CscMatrix::from_dense(array![[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]].view()).unwrap();
    let e = LassoModel::new_sparse(x.clone(), array![1.0, 2.0].view()).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    let e = LassoModel::new_sparse(x.clone(), array![1.0, f64::NAN, 2.0].view()).unwrap_err();
    assert!(invalid_detail(e).contains("row 1"));
    let constant = CscMatrix::from_dense(array![[2.0, 0.0], [2.0, 1.0], [2.0, 0.0]].view()).unwrap();
    let e = LassoModel::new_sparse(constant, array![1.0, 2.0, 3.0].view()).unwrap_err();
    assert!(invalid_detail(e).contains("column 0 of X is constant"));
    let e = ValidationMse::new_sparse(x.clone(), array![1.0].view()).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    let e = LassoModel::logistic_sparse(x, array![0.0, 2.0, 1.0].view()).unwrap_err();
    assert!(invalid_detail(e).contains("labels must be 0 or 1"));
}

/// An empty column is allowed in a sparse design: its coefficient stays at zero and the
/// hypergradients are those of the model without it.
#[test]
fn empty_columns_stay_at_zero() {
    let pr = problem(false, 3);
    let mut with_empty = Array2::zeros((pr.x.nrows(), pr.x.ncols() + 1));
    with_empty.slice_mut(ndarray::s![.., ..pr.x.ncols()]).assign(&pr.x);
    let model = LassoModel::new_sparse(CscMatrix::from_dense(with_empty.view()).unwrap(), pr.y.view()).unwrap();
    let reference = LassoModel::new(pr.x.view(), pr.y.view()).unwrap();
    let pen = Penalty::Uniform(reference.lambda_max() / 6.0);
    let fit = solve(&model, &pen, None, &tight()).unwrap();
    let fit_ref = solve(&reference, &pen, None, &tight()).unwrap();
    assert_eq!(fit.beta[pr.x.ncols()], 0.0);
    let d = max_diff(&fit.beta.slice(ndarray::s![..pr.x.ncols()]).to_owned(), &fit_ref.beta);
    assert!(d <= 1e-10 * scale(&fit_ref.beta), "{d:e}");
}

#[test]
fn svmlight_round_trip_is_exact() {
    let data = sparse_synthetic(
        SparseShape {
            n: 50,
            p: 80,
            density: 0.05,
        },
        5,
        0.1,
        11,
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("clarke-svmlight-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("round_trip.svm");
    write_svmlight(&path, &data.x, data.y.view()).unwrap();
    let back = read_svmlight(&path, Some(80)).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(back.y, data.y);
    assert_eq!(back.x.to_dense(), data.x.to_dense());
    assert_eq!(back.x.nnz(), data.x.nnz());
}

#[test]
fn svmlight_parses_the_format_and_names_bad_lines() {
    let text = "# a comment line\n1.5 1:2 3:-1.25 # trailing comment\n-2 qid:7 2:4e-1\n0\n";
    let SparseRegression { x, y } = parse_svmlight(text, None).unwrap();
    assert_eq!(y, array![1.5, -2.0, 0.0]);
    assert_eq!(
        x.to_dense(),
        array![[2.0, 0.0, -1.25], [0.0, 0.4, 0.0], [0.0, 0.0, 0.0]]
    );
    // Zero-based files (smallest index 0) are read as such.
    let zero = parse_svmlight("1 0:1 2:3\n2 1:5\n", None).unwrap();
    assert_eq!(zero.x.to_dense(), array![[1.0, 0.0, 3.0], [0.0, 5.0, 0.0]]);
    // Trailing empty columns when the width is given.
    assert_eq!(parse_svmlight("1 1:1\n", Some(4)).unwrap().x.ncols(), 4);
    let cases = [
        (
            "1 3:1 2:1\n",
            "line 1: index 2 follows index 3: indices are not increasing",
        ),
        (
            "1 2:1\n1 2:1 2:3\n",
            "line 2: index 2 follows index 2: indices are repeated",
        ),
        ("1 2:nan\n", "line 1: the value of index 2 is NaN"),
        ("x 2:1\n", "line 1: the target \"x\" is not a number"),
        ("1 2\n", "line 1: the field \"2\" is not index:value"),
        ("1 -2:1\n", "line 1: the index \"-2\" is not a non-negative integer"),
        ("# nothing\n\n", "no data line"),
    ];
    for (text, expected) in cases {
        match parse_svmlight(text, None) {
            Err(Error::Data(msg)) => assert!(msg.contains(expected), "{text:?}: {msg}"),
            other => panic!("{text:?}: expected a data error, got {other:?}"),
        }
    }
    match parse_svmlight("1 5:1\n", Some(3)) {
        Err(Error::Data(msg)) => assert!(msg.contains("index 5 is beyond the 3 features"), "{msg}"),
        other => panic!("expected a data error, got {other:?}"),
    }
}

#[test]
fn sparse_split_keeps_rows_and_centres_y() {
    let data = sparse_synthetic(
        SparseShape {
            n: 10,
            p: 30,
            density: 0.2,
        },
        3,
        0.1,
        5,
    )
    .unwrap();
    let split = split_sparse(&data, 0.3).unwrap();
    assert_eq!((split.x_train.nrows(), split.x_val.nrows()), (7, 3));
    let dense = data.x.to_dense();
    assert_eq!(split.x_train.to_dense(), dense.slice(ndarray::s![..7, ..]));
    assert_eq!(split.x_val.to_dense(), dense.slice(ndarray::s![7.., ..]));
    let mean = data.y.slice(ndarray::s![..7]).mean().unwrap();
    assert!(split.y_train.sum().abs() < 1e-12);
    assert!((split.y_val[0] - (data.y[7] - mean)).abs() < 1e-15);
    assert!(split_sparse(&data, 0.0).is_err());
    assert!(split_sparse(&data, 0.05).is_err(), "no validation row");
}

#[test]
fn sparse_synthetic_has_the_shape_and_is_seeded() {
    let shape = SparseShape {
        n: 400,
        p: 600,
        density: 0.01,
    };
    let a = sparse_synthetic(shape, 10, 0.1, 1).unwrap();
    let b = sparse_synthetic(shape, 10, 0.1, 1).unwrap();
    let c = sparse_synthetic(shape, 10, 0.1, 2).unwrap();
    assert_eq!((a.x.nrows(), a.x.ncols()), (400, 600));
    assert!((a.x.density() / 0.01 - 1.0).abs() < 0.3, "density {}", a.x.density());
    assert_eq!(a.y, b.y);
    assert_ne!(a.y, c.y);
    // Rows of unit norm (where a row has entries).
    let dense = a.x.to_dense();
    for row in dense.rows() {
        let norm = row.dot(&row).sqrt();
        assert!(norm == 0.0 || (norm - 1.0).abs() < 1e-12, "row norm {norm}");
    }
    // The planted signal is found: the Lasso at lambda_max / 10 has a non-empty support.
    let model = LassoModel::new_sparse(a.x, a.y.view()).unwrap();
    let fit = solve(
        &model,
        &Penalty::Uniform(model.lambda_max() / 10.0),
        None,
        &CdOptions::default(),
    )
    .unwrap();
    assert!(fit.is_converged() && !fit.support().is_empty());
    assert!(SparseShape::named("rcv2", true).is_err());
}
