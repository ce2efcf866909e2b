//! Bad input to the solvers gives a typed error naming the op and the offending value or
//! shape, or a report whose status says what happened; never a panic inside a `Result`
//! function or a silently wrong value. Run under both dense backends (`--features lapack`).

use clarke_core::{Error, Result};
use clarke_solve::dense::{self, DenseLu};
use clarke_solve::fixed_point::{anderson, broyden, flattened, newton_krylov, newton_krylov_with_jvp, picard};
use clarke_solve::linop::{apply_new, apply_transpose_new};
use clarke_solve::spectral::{
    smallest_singular_value, smallest_singular_value_dense, spectral_norm, spectral_norm_dense, spectral_radius,
};
use clarke_solve::{
    FixedPointOptions, FnOperator, IdentityMinus, LinearOperator, NewtonKrylovOptions, NormalOperator, SolveOptions,
    SolveReport, SolveStatus, SpectralOptions, Transposed, bicgstab, cg, gmres, neumann,
};
use ndarray::{Array1, Array2, Array3, ArrayView1, ArrayViewMut1, Ix2, IxDyn, arr1, arr2};

/// Asserts an [`Error::InvalidArgument`] from `op` whose detail contains every word.
#[track_caller]
fn invalid(e: Error, op: &str, words: &[&str]) {
    match &e {
        Error::InvalidArgument { op: o, detail } if *o == op => {
            for w in words {
                assert!(detail.contains(w), "{w:?} not in: {e}");
            }
        }
        _ => panic!("expected InvalidArgument from {op}, got {e:?}"),
    }
}

/// Asserts an [`Error::ShapeMismatch`] from `op` with the shapes found and required.
#[track_caller]
fn shapes(e: Error, op: &str, found: &[usize], required: &[usize]) {
    match &e {
        Error::ShapeMismatch { op: o, lhs, rhs, .. } if *o == op => {
            assert_eq!((lhs.as_slice(), rhs.as_slice()), (found, required), "{e}");
        }
        _ => panic!("expected ShapeMismatch from {op}, got {e:?}"),
    }
}

/// A diagonal operator whose products broadcast, as a careless user closure would: it
/// relies on the callers to pass vectors of the right lengths.
struct Diagonal(Array1<f64>);

impl LinearOperator<f64> for Diagonal {
    fn nrows(&self) -> usize {
        self.0.len()
    }
    fn ncols(&self) -> usize {
        self.0.len()
    }
    fn apply(&self, x: ArrayView1<'_, f64>, mut y: ArrayViewMut1<'_, f64>) -> Result<()> {
        y.assign(&(&x * &self.0));
        Ok(())
    }
    fn apply_transpose(&self, x: ArrayView1<'_, f64>, y: ArrayViewMut1<'_, f64>) -> Result<()> {
        self.apply(x, y)
    }
    fn has_transpose(&self) -> bool {
        true
    }
}

#[test]
fn operator_adapters_check_lengths_before_calling_the_product() {
    let d = arr1(&[1.0, 2.0, 3.0]);
    let op = FnOperator::new(3, 3, |x: ArrayView1<'_, f64>, mut y: ArrayViewMut1<'_, f64>| {
        y.assign(&(&x * &d));
        Ok(())
    })
    .with_transpose(|x: ArrayView1<'_, f64>, mut y: ArrayViewMut1<'_, f64>| {
        y.assign(&(&x * &d));
        Ok(())
    });
    let one = arr1(&[1.0]);
    let mut y3 = Array1::zeros(3);
    // A length-1 input would broadcast through the closure into a wrong "product".
    shapes(
        op.apply(one.view(), y3.view_mut()).unwrap_err(),
        "FnOperator::apply",
        &[1, 3],
        &[3, 3],
    );
    shapes(
        op.apply_transpose(one.view(), y3.view_mut()).unwrap_err(),
        "FnOperator::apply_transpose",
        &[1, 3],
        &[3, 3],
    );
    let mut y1 = Array1::zeros(1);
    shapes(
        op.apply(d.view(), y1.view_mut()).unwrap_err(),
        "FnOperator::apply",
        &[3, 1],
        &[3, 3],
    );

    let diag = Diagonal(d.clone());
    let t = Transposed::new(&diag);
    shapes(
        t.apply(one.view(), y3.view_mut()).unwrap_err(),
        "Transposed::apply",
        &[1, 3],
        &[3, 3],
    );
    shapes(
        t.apply_transpose(one.view(), y3.view_mut()).unwrap_err(),
        "Transposed::apply_transpose",
        &[1, 3],
        &[3, 3],
    );
    let normal = NormalOperator::new(&diag);
    shapes(
        normal.apply(one.view(), y3.view_mut()).unwrap_err(),
        "NormalOperator::apply",
        &[1, 3],
        &[3, 3],
    );
    shapes(
        normal.apply_transpose(one.view(), y3.view_mut()).unwrap_err(),
        "NormalOperator::apply_transpose",
        &[1, 3],
        &[3, 3],
    );
    // A rectangular A: A^T A is 2x2, A^T maps 3-vectors to 2-vectors.
    let a = arr2(&[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]);
    let mut y2 = Array1::zeros(2);
    shapes(
        NormalOperator::new(&a).apply(d.view(), y2.view_mut()).unwrap_err(),
        "NormalOperator::apply",
        &[3, 2],
        &[2, 2],
    );
    shapes(
        apply_new(&Transposed::new(&a), arr1(&[1.0, 1.0]).view()).unwrap_err(),
        "LinearOperator::apply",
        &[2],
        &[3],
    );
    shapes(
        apply_transpose_new(&NormalOperator::new(&a), d.view()).unwrap_err(),
        "LinearOperator::apply_transpose",
        &[3],
        &[2],
    );
    // I - A of a rectangular A.
    shapes(
        IdentityMinus::new(&a).apply(d.view(), y3.view_mut()).unwrap_err(),
        "IdentityMinus::apply",
        &[3, 2],
        &[2, 2],
    );
    // Right lengths still work.
    assert_eq!(apply_new(&op, d.view()).unwrap(), arr1(&[1.0, 4.0, 9.0]));
    assert_eq!(
        apply_new(&Transposed::new(&diag), d.view()).unwrap(),
        arr1(&[1.0, 4.0, 9.0])
    );
    assert_eq!(
        apply_new(&NormalOperator::new(&diag), d.view()).unwrap(),
        arr1(&[1.0, 8.0, 27.0])
    );
}

#[test]
fn krylov_solvers_refuse_bad_shapes_and_options() {
    let a = arr2(&[[4.0, 1.0], [1.0, 3.0]]);
    let wide = arr2(&[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]);
    let b = arr1(&[1.0, 2.0]);
    let ok = SolveOptions::default();
    type Solver = fn(
        &Array2<f64>,
        ArrayView1<'_, f64>,
        Option<ArrayView1<'_, f64>>,
        &SolveOptions,
    ) -> Result<(Array1<f64>, SolveReport)>;
    let solvers: [(&str, Solver); 4] = [
        ("cg", |a, b, x0, o| cg(a, b, x0, o)),
        ("gmres", |a, b, x0, o| gmres(a, b, x0, o)),
        ("bicgstab", |a, b, x0, o| bicgstab(a, b, x0, o)),
        ("neumann", |a, b, x0, o| neumann(a, b, x0, o)),
    ];
    for (name, solve) in solvers {
        shapes(solve(&wide, b.view(), None, &ok).unwrap_err(), name, &[2, 3], &[3, 3]);
        shapes(solve(&a, arr1(&[1.0]).view(), None, &ok).unwrap_err(), name, &[1], &[2]);
        let x0 = arr1(&[0.0, 0.0, 0.0]);
        shapes(solve(&a, b.view(), Some(x0.view()), &ok).unwrap_err(), name, &[3], &[2]);
        for tol in [-1e-3, f64::NAN, f64::INFINITY] {
            let e = solve(&a, b.view(), None, &ok.clone().with_tol(tol)).unwrap_err();
            invalid(e, name, &["tolerance", &tol.to_string()]);
        }
        let e = solve(&a, b.view(), None, &ok.clone().with_restart(0)).unwrap_err();
        invalid(e, name, &["restart", "0"]);
        for factor in [0.5, f64::NAN] {
            let e = solve(&a, b.view(), None, &ok.clone().with_divergence_factor(factor)).unwrap_err();
            invalid(e, name, &["divergence factor", &factor.to_string()]);
        }
        // Non-finite data is a status, not an error: the report says so.
        let (_, report) = solve(&a, arr1(&[f64::NAN, 1.0]).view(), None, &ok).unwrap();
        assert_eq!(report.status, SolveStatus::NonFinite, "{name}");
        let (_, report) = solve(&a, b.view(), Some(arr1(&[f64::INFINITY, 0.0]).view()), &ok).unwrap();
        assert_eq!(report.status, SolveStatus::NonFinite, "{name}");
        // So is an exhausted budget, and the residual is that of the returned x.
        let (x, report) = solve(&a, b.view(), None, &ok.clone().with_max_iter(0)).unwrap();
        assert_eq!(report.status, SolveStatus::MaxIterations, "{name}");
        assert!(report.into_result().is_err());
        assert_eq!(x, arr1(&[0.0, 0.0]));
        // Empty systems are solved.
        let (x, report) = solve(&Array2::zeros((0, 0)), Array1::zeros(0).view(), None, &ok).unwrap();
        assert!(report.is_converged() && x.is_empty(), "{name}");
    }
}

#[test]
fn dense_solves_refuse_bad_shapes_and_overflow() {
    let a = arr2(&[[4.0, 1.0], [2.0, 3.0]]);
    let b = arr1(&[1.0, 2.0]);
    // Shapes: non-square (tall and wide), wrong right-hand side, 3-d right-hand side.
    let tall = arr2(&[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]);
    shapes(
        dense::lu_solve(tall.view(), b.view()).unwrap_err(),
        "lu_solve",
        &[3, 2],
        &[2, 2],
    );
    shapes(
        dense::lu_solve_transpose(tall.t(), b.view()).unwrap_err(),
        "lu_solve_transpose",
        &[2, 3],
        &[3, 3],
    );
    shapes(
        dense::cholesky_solve(tall.view(), b.view()).unwrap_err(),
        "cholesky_solve",
        &[3, 2],
        &[2, 2],
    );
    shapes(DenseLu::new(tall.view()).unwrap_err(), "DenseLu::new", &[3, 2], &[2, 2]);
    shapes(
        dense::lu_solve(a.view(), arr1(&[1.0, 2.0, 3.0]).view()).unwrap_err(),
        "lu_solve",
        &[3],
        &[2],
    );
    let lu = DenseLu::new(a.view()).unwrap();
    shapes(
        lu.solve_transpose(Array2::<f64>::zeros((3, 2)).view()).unwrap_err(),
        "DenseLu::solve_transpose",
        &[3, 2],
        &[2],
    );
    invalid(
        lu.solve(ndarray::ArrayD::<f64>::zeros(IxDyn(&[2, 1, 1])).view())
            .unwrap_err(),
        "DenseLu::solve",
        &["3 dimensions", "[2, 1, 1]"],
    );
    invalid(
        lu.solve(ndarray::ArrayD::<f64>::zeros(IxDyn(&[])).view()).unwrap_err(),
        "DenseLu::solve",
        &["0 dimensions"],
    );
    shapes(dense::lstsq(tall.view(), b.view()).unwrap_err(), "lstsq", &[2], &[3]);
    // Non-finite entries, with the position.
    invalid(
        dense::lu_solve(a.view(), arr1(&[1.0, f64::NAN]).view()).unwrap_err(),
        "lu_solve",
        &["right-hand side", "NaN", "(1, 0)"],
    );
    let inf_a = arr2(&[[4.0, f64::INFINITY], [2.0, 3.0]]);
    invalid(
        dense::cholesky_solve(inf_a.view(), b.view()).unwrap_err(),
        "cholesky_solve",
        &["inf", "(0, 1)"],
    );
    // Options: the cutoff of least squares, named by the function that took it.
    for rcond in [-1.0, f64::NAN] {
        invalid(
            dense::lstsq_rcond(a.view(), b.view(), rcond).unwrap_err(),
            "lstsq_rcond",
            &["rcond", &rcond.to_string()],
        );
    }
    // Singular and indefinite matrices.
    let singular = arr2(&[[1.0, 2.0], [2.0, 4.0]]);
    assert!(matches!(
        dense::lu_solve(singular.view(), b.view()).unwrap_err(),
        Error::Singular { op: "lu_solve", .. }
    ));
    // An exactly zero pivot before the last one (faer's elimination then divides by it) is
    // still singular, not an overflow.
    let zero_pivot = arr2(&[[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]);
    for z in [Array2::zeros((3, 3)), zero_pivot] {
        let e = DenseLu::new(z.view()).unwrap_err();
        assert!(matches!(e, Error::Singular { op: "DenseLu::new", .. }), "{e}");
    }
    invalid(
        dense::cholesky_solve(arr2(&[[1.0, 2.0], [2.0, 1.0]]).view(), b.view()).unwrap_err(),
        "cholesky_solve",
        &["positive definite"],
    );

    // A well-conditioned matrix whose LU overflows is not singular: the error says overflow.
    let huge = arr2(&[[1e308, 1e308], [1e308, -1e308]]);
    for e in [
        dense::lu_solve(huge.view(), b.view()).unwrap_err(),
        DenseLu::new(huge.view()).unwrap_err(),
    ] {
        match &e {
            Error::InvalidArgument { op, detail } => {
                assert!(["lu_solve", "DenseLu::new"].contains(op), "{e}");
                assert!(detail.contains("overflowed") && detail.contains("pivot 1"), "{e}");
            }
            _ => panic!("expected InvalidArgument (overflow), got {e:?}"),
        }
    }
    // A solution beyond the range of the type is refused, not returned as inf.
    let tiny = arr2(&[[1e-300, 0.0], [0.0, 1e-300]]);
    let big_b = arr1(&[1e300, 1.0]);
    invalid(
        dense::lu_solve(tiny.view(), big_b.view()).unwrap_err(),
        "lu_solve",
        &["solution", "non-finite", "(0, 0)"],
    );
    invalid(
        DenseLu::new(tiny.view())
            .unwrap()
            .solve_transpose(big_b.view())
            .unwrap_err(),
        "DenseLu::solve_transpose",
        &["solution", "non-finite"],
    );
    invalid(
        dense::cholesky_solve(tiny.view(), big_b.view()).unwrap_err(),
        "cholesky_solve",
        &["solution", "non-finite"],
    );
    invalid(
        dense::lstsq(tiny.view(), big_b.view()).unwrap_err(),
        "lstsq",
        &["solution", "non-finite"],
    );
    let mut batch = Array3::<f64>::zeros((2, 2, 2));
    batch.index_axis_mut(ndarray::Axis(0), 0).assign(&a);
    batch.index_axis_mut(ndarray::Axis(0), 1).assign(&tiny);
    let rhs = arr2(&[[1.0, 2.0], [1e300, 1.0]]);
    invalid(
        dense::batched_solve(batch.view(), rhs.view(), false).unwrap_err(),
        "batched_solve",
        &["batch sample 1", "solution", "non-finite"],
    );
    // A subnormal matrix: its LU is refused as badly scaled (not called singular), and least
    // squares gives the exact 0 for b = 0 (faer counts the subnormal singular value as 0,
    // LAPACK keeps it, and 0 / s is 0 where 0 * (1 / s) was 0 * inf = NaN).
    let sub = arr2(&[[1e-310f64, 0.0], [0.0, 1e-310]]);
    invalid(
        dense::lu_solve(sub.view(), b.view()).unwrap_err(),
        "lu_solve",
        &["badly scaled"],
    );
    let fit = dense::lstsq(sub.view(), arr1(&[0.0, 0.0]).view()).unwrap();
    assert_eq!(fit.solution, arr1(&[0.0, 0.0]));

    // Batched shapes.
    shapes(
        dense::batched_solve(Array3::<f64>::zeros((2, 2, 3)).view(), rhs.view(), false).unwrap_err(),
        "batched_solve",
        &[2, 2, 3],
        &[2, 2, 2],
    );
    shapes(
        dense::batched_solve(batch.view(), Array2::zeros((3, 2)).view(), true).unwrap_err(),
        "batched_solve",
        &[3, 2],
        &[2, 2],
    );
    // Empty inputs are fine.
    let empty = Array2::<f64>::zeros((0, 0));
    assert!(
        dense::lu_solve(empty.view(), Array1::zeros(0).view())
            .unwrap()
            .is_empty()
    );
    assert!(
        dense::cholesky_solve(empty.view(), Array1::zeros(0).view())
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        dense::batched_solve(
            Array3::<f64>::zeros((2, 0, 0)).view(),
            Array2::zeros((2, 0)).view(),
            false
        )
        .unwrap()
        .dim(),
        (2, 0)
    );
    assert_eq!(
        dense::lstsq(Array2::<f64>::zeros((3, 0)).view(), Array1::zeros(3).view())
            .unwrap()
            .rank,
        0
    );
    assert!(
        dense::singular_values(Array2::<f64>::zeros((0, 4)).view())
            .unwrap()
            .is_empty()
    );
}

#[test]
fn spectral_estimates_refuse_bad_shapes_and_options() {
    let a = arr2(&[[2.0, 0.0], [0.0, 0.5]]);
    let wide = arr2(&[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]);
    let ok = SpectralOptions::default();
    for tol in [-1.0, f64::NAN] {
        let o = ok.clone().with_tol(tol);
        invalid(
            spectral_norm(&a, &o).unwrap_err(),
            "spectral_norm",
            &["tolerance", &tol.to_string()],
        );
        invalid(spectral_radius(&a, &o).unwrap_err(), "spectral_radius", &["tolerance"]);
        invalid(
            smallest_singular_value(&a, &o).unwrap_err(),
            "smallest_singular_value",
            &["tolerance"],
        );
    }
    invalid(
        smallest_singular_value(&a, &ok.clone().with_krylov_dim(0)).unwrap_err(),
        "smallest_singular_value",
        &["krylov_dim"],
    );
    shapes(
        spectral_radius(&wide, &ok).unwrap_err(),
        "spectral_radius",
        &[2, 3],
        &[3, 3],
    );
    shapes(
        smallest_singular_value(&wide, &ok).unwrap_err(),
        "smallest_singular_value",
        &[2, 3],
        &[3, 3],
    );
    let no_transpose = FnOperator::new(2, 2, |x: ArrayView1<'_, f64>, mut y: ArrayViewMut1<'_, f64>| {
        y.assign(&x);
        Ok(())
    });
    invalid(
        spectral_norm(&no_transpose, &ok).unwrap_err(),
        "spectral_norm",
        &["A^T"],
    );
    invalid(
        smallest_singular_value(&no_transpose, &ok).unwrap_err(),
        "smallest_singular_value",
        &["A^T"],
    );
    // A NaN in the operator is a status.
    let nan = arr2(&[[f64::NAN, 0.0], [0.0, 1.0]]);
    assert_eq!(spectral_norm(&nan, &ok).unwrap().status, SolveStatus::NonFinite);
    assert_eq!(spectral_radius(&nan, &ok).unwrap().status, SolveStatus::NonFinite);
    assert_eq!(
        smallest_singular_value(&nan, &ok).unwrap().status,
        SolveStatus::NonFinite
    );
    // The dense forms name themselves in their errors.
    invalid(
        spectral_norm_dense(nan.view()).unwrap_err(),
        "spectral_norm_dense",
        &["NaN", "(0, 0)"],
    );
    invalid(
        smallest_singular_value_dense(nan.view()).unwrap_err(),
        "smallest_singular_value_dense",
        &["NaN", "(0, 0)"],
    );
    shapes(
        smallest_singular_value_dense(wide.view()).unwrap_err(),
        "smallest_singular_value_dense",
        &[2, 3],
        &[3, 3],
    );
    // Budgets of zero iterations give an honest status.
    let est = spectral_radius(&arr2(&[[0.5, 1.0], [0.0, -0.9]]), &ok.clone().with_max_iter(0)).unwrap();
    assert_eq!(est.status, SolveStatus::MaxIterations);
    assert!(est.into_result().is_err());
}

#[test]
fn fixed_point_solvers_refuse_bad_options_and_maps() {
    let map = |z: ArrayView1<'_, f64>| Ok(z.mapv(f64::cos));
    let z0 = Array1::<f64>::zeros(3);
    let ok = FixedPointOptions::default();
    type Solver = fn(
        &dyn Fn(ArrayView1<'_, f64>) -> Result<Array1<f64>>,
        ArrayView1<'_, f64>,
        &FixedPointOptions,
    ) -> Result<(Array1<f64>, clarke_solve::FixedPointReport)>;
    let solvers: [(&str, Solver); 3] = [
        ("picard", |m, z, o| picard(m, z, o)),
        ("anderson", |m, z, o| anderson(m, z, o)),
        ("broyden", |m, z, o| broyden(m, z, o)),
    ];
    for (name, solve) in solvers {
        for tol in [-1.0, f64::NAN] {
            let e = solve(&map, z0.view(), &ok.clone().with_tol(tol)).unwrap_err();
            invalid(e, name, &["tolerance", &tol.to_string()]);
        }
        for beta in [0.0, 1.5, f64::NAN] {
            let e = solve(&map, z0.view(), &ok.clone().with_damping(beta)).unwrap_err();
            invalid(e, name, &["damping", &beta.to_string()]);
        }
        let e = solve(&map, z0.view(), &ok.clone().with_regularization(-1.0)).unwrap_err();
        invalid(e, name, &["regularization", "-1"]);
        let e = solve(&map, z0.view(), &ok.clone().with_divergence_factor(1.0)).unwrap_err();
        invalid(e, name, &["divergence factor", "1"]);
        let short = |z: ArrayView1<'_, f64>| Ok(z.slice(ndarray::s![..2]).to_owned());
        shapes(solve(&short, z0.view(), &ok).unwrap_err(), name, &[2], &[3]);
        let (_, report) = solve(&map, arr1(&[0.0, f64::NAN, 0.0]).view(), &ok).unwrap();
        assert_eq!(report.status, SolveStatus::NonFinite, "{name}");
        // Memory sizes of any value are accepted (a memory beyond the dimension only keeps
        // more, linearly dependent, differences).
        let big = ok
            .clone()
            .with_anderson_memory(usize::MAX)
            .with_broyden_memory(usize::MAX);
        let (z, report) = solve(&map, z0.view(), &big).unwrap();
        assert!(report.is_converged(), "{name}: {report}");
        assert!((z[0] - 0.7390851332151607).abs() < 1e-9, "{name}");
    }

    // Newton-Krylov options and maps.
    let root = |z: ArrayView1<'_, f64>| Ok(&z * &z - 2.0);
    let nk = NewtonKrylovOptions::default();
    invalid(
        newton_krylov(root, z0.view(), &nk.clone().with_tol(f64::NAN)).unwrap_err(),
        "newton_krylov",
        &["tolerance", "NaN"],
    );
    let mut bad = nk.clone();
    bad.forcing_max = 1.0;
    invalid(
        newton_krylov(root, z0.view(), &bad).unwrap_err(),
        "newton_krylov",
        &["forcing_max", "1"],
    );
    invalid(
        newton_krylov(root, z0.view(), &nk.clone().with_fd_step(0.0)).unwrap_err(),
        "newton_krylov",
        &["fd_step", "0"],
    );
    invalid(
        newton_krylov(
            root,
            z0.view(),
            &nk.clone().with_inner(SolveOptions::default().with_restart(0)),
        )
        .unwrap_err(),
        "newton_krylov",
        &["restart"],
    );
    let short = |z: ArrayView1<'_, f64>| Ok(z.slice(ndarray::s![..1]).to_owned());
    shapes(
        newton_krylov(short, z0.view(), &nk).unwrap_err(),
        "newton_krylov",
        &[1],
        &[3],
    );
    let bad_jvp = |_: ArrayView1<'_, f64>, _: ArrayView1<'_, f64>| Ok(Array1::zeros(2));
    shapes(
        newton_krylov_with_jvp(root, bad_jvp, arr1(&[1.0, 1.0, 1.0]).view(), &nk).unwrap_err(),
        "newton_krylov",
        &[2],
        &[3],
    );
    let (_, report) = newton_krylov(root, arr1(&[f64::INFINITY, 1.0, 1.0]).view(), &nk).unwrap();
    assert_eq!(report.status, SolveStatus::NonFinite);

    // flattened: the flat state must fit the shape, and the shape must be representable.
    let mut wrap = flattened(Ix2(2, 2), |z: ndarray::ArrayView2<'_, f64>| Ok(z.to_owned()));
    shapes(wrap(Array1::zeros(3).view()).unwrap_err(), "flattened", &[3], &[2, 2]);
    let mut wrong = flattened(Ix2(2, 2), |_: ndarray::ArrayView2<'_, f64>| Ok(Array2::zeros((1, 4))));
    shapes(
        wrong(Array1::zeros(4).view()).unwrap_err(),
        "flattened",
        &[1, 4],
        &[2, 2],
    );
    let mut absurd = flattened(Ix2(usize::MAX, 2), |z: ndarray::ArrayView2<'_, f64>| Ok(z.to_owned()));
    invalid(
        absurd(Array1::zeros(4).view()).unwrap_err(),
        "flattened",
        &["[18446744073709551615, 2]", "usize"],
    );
}
