//! Forward fixed-point and root solvers.

use crate::common;

use clarke_core::{Error, Result};
use clarke_solve::fixed_point::{
    FixedPointOptions, FixedPointReport, NewtonKrylovOptions, anderson, broyden, flattened, newton_krylov,
    newton_krylov_with_jvp, picard,
};
use clarke_solve::{SolveOptions, SolveStatus};
use common::*;
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Ix2, array};

type FpSolver = fn(
    &mut dyn FnMut(ArrayView1<'_, f64>) -> Result<Array1<f64>>,
    ArrayView1<'_, f64>,
    &FixedPointOptions,
) -> Result<(Array1<f64>, FixedPointReport)>;

fn run_picard(
    t: &mut dyn FnMut(ArrayView1<'_, f64>) -> Result<Array1<f64>>,
    z0: ArrayView1<'_, f64>,
    o: &FixedPointOptions,
) -> Result<(Array1<f64>, FixedPointReport)> {
    picard(t, z0, o)
}
fn run_anderson(
    t: &mut dyn FnMut(ArrayView1<'_, f64>) -> Result<Array1<f64>>,
    z0: ArrayView1<'_, f64>,
    o: &FixedPointOptions,
) -> Result<(Array1<f64>, FixedPointReport)> {
    anderson(t, z0, o)
}
fn run_broyden(
    t: &mut dyn FnMut(ArrayView1<'_, f64>) -> Result<Array1<f64>>,
    z0: ArrayView1<'_, f64>,
    o: &FixedPointOptions,
) -> Result<(Array1<f64>, FixedPointReport)> {
    broyden(t, z0, o)
}

const SOLVERS: [(&str, FpSolver); 3] = [
    ("picard", run_picard),
    ("anderson", run_anderson),
    ("broyden", run_broyden),
];

#[test]
fn linear_contraction_matches_the_dense_solution() {
    let n = 30;
    let a = with_norm(n, 0.6, 1);
    let c = random_vector(n, 2);
    let z_ref = reference_solve(&(Array2::<f64>::eye(n) - &a), &c);
    for (name, solve) in SOLVERS {
        let mut t = |z: ArrayView1<'_, f64>| -> Result<Array1<f64>> { Ok(a.dot(&z) + &c) };
        let opts = FixedPointOptions::default().with_tol(1e-12);
        let (z, report) = solve(&mut t, Array1::zeros(n).view(), &opts).unwrap();
        assert_eq!(report.status, SolveStatus::Converged, "{name}: {report}");
        assert_eq!(report.solver, name);
        assert!(
            max_abs_diff(&z, &z_ref) < 1e-8,
            "{name}: error {:e}",
            max_abs_diff(&z, &z_ref)
        );
        // the residual is the linear relative residual ||c - (I - A) z|| / ||c||
        let r = &c - &(&z - &a.dot(&z));
        let res = r.dot(&r).sqrt() / c.dot(&c).sqrt();
        assert!(
            (res - report.residual).abs() < 1e-14,
            "{name}: {res:e} vs {:e}",
            report.residual
        );
        assert_eq!(report.trace.len(), report.iterations + 1, "{name}");
        assert_eq!(report.evaluations, report.iterations + 1, "{name}");
    }
}

#[test]
fn anderson_beats_picard_on_a_slow_contraction() {
    let n = 40;
    // symmetric, eigenvalues in [0, 0.95]: Picard contracts by 0.95 per step
    let d: Vec<f64> = (0..n).map(|i| 0.95 * i as f64 / (n - 1) as f64).collect();
    let a = symmetric_with_eigenvalues(&d, 3);
    let c = random_vector(n, 4);
    let opts = FixedPointOptions::default().with_tol(1e-10).with_max_iter(2000);
    let (zp, rp) = picard(|z: ArrayView1<f64>| Ok(a.dot(&z) + &c), Array1::zeros(n).view(), &opts).unwrap();
    let (za, ra) = anderson(|z: ArrayView1<f64>| Ok(a.dot(&z) + &c), Array1::zeros(n).view(), &opts).unwrap();
    let (zb, rb) = broyden(|z: ArrayView1<f64>| Ok(a.dot(&z) + &c), Array1::zeros(n).view(), &opts).unwrap();
    assert!(
        rp.is_converged() && ra.is_converged() && rb.is_converged(),
        "{rp}\n{ra}\n{rb}"
    );
    assert!(
        ra.iterations * 4 < rp.iterations,
        "anderson {} vs picard {}",
        ra.iterations,
        rp.iterations
    );
    assert!(
        rb.iterations * 4 < rp.iterations,
        "broyden {} vs picard {}",
        rb.iterations,
        rp.iterations
    );
    let z_ref = reference_solve(&(Array2::<f64>::eye(n) - &a), &c);
    for z in [&zp, &za, &zb] {
        assert!(max_abs_diff(z, &z_ref) < 1e-7);
    }
}

#[test]
fn non_contractive_map_diverges_with_a_trace() {
    let n = 5;
    let (z, report) = picard(
        |z: ArrayView1<f64>| Ok(z.mapv(|v| 2.0 * v + 1.0)),
        Array1::zeros(n).view(),
        &FixedPointOptions::default(),
    )
    .unwrap();
    assert_eq!(report.status, SolveStatus::Diverged, "{report}");
    assert!(report.trace.len() > 10);
    assert!(report.trace.windows(2).all(|w| w[1] > w[0]), "{:?}", report.trace);
    assert!(report.residual > 1e6 * report.trace[0]);
    assert!(z.iter().all(|v| v.is_finite()));
    match report.into_result() {
        Err(Error::NotConverged { solver, residual, .. }) => {
            assert_eq!(solver, "picard");
            assert!(residual > 1e6);
        }
        other => panic!("{other:?}"),
    }
    // Anderson and Broyden find the repelling fixed point z = -1 of this affine map
    for (name, solve) in [("anderson", run_anderson as FpSolver), ("broyden", run_broyden)] {
        let mut t = |z: ArrayView1<'_, f64>| -> Result<Array1<f64>> { Ok(z.mapv(|v| 2.0 * v + 1.0)) };
        let (z, report) = solve(&mut t, Array1::zeros(n).view(), &FixedPointOptions::default()).unwrap();
        assert!(report.is_converged(), "{name}: {report}");
        assert!(z.iter().all(|v| (v + 1.0).abs() < 1e-9), "{name}: {z}");
    }
}

#[test]
fn map_without_fixed_point_never_claims_convergence() {
    // exp(z) > z: no real fixed point; iterates blow up
    for (name, solve) in SOLVERS {
        let mut t = |z: ArrayView1<'_, f64>| -> Result<Array1<f64>> { Ok(z.mapv(f64::exp)) };
        let opts = FixedPointOptions::default().with_max_iter(200);
        let (_, report) = solve(&mut t, Array1::zeros(3).view(), &opts).unwrap();
        assert!(
            matches!(
                report.status,
                SolveStatus::Diverged | SolveStatus::NonFinite | SolveStatus::MaxIterations
            ),
            "{name}: {report}"
        );
        assert!(!report.trace.is_empty());
    }
    // z + 1: constant residual, no fixed point
    for (name, solve) in SOLVERS {
        let mut t = |z: ArrayView1<'_, f64>| -> Result<Array1<f64>> { Ok(z.mapv(|v| v + 1.0)) };
        let opts = FixedPointOptions::default().with_max_iter(50);
        let (_, report) = solve(&mut t, Array1::zeros(3).view(), &opts).unwrap();
        assert_eq!(report.status, SolveStatus::MaxIterations, "{name}: {report}");
        assert_eq!(report.iterations, 50);
    }
}

#[test]
fn non_finite_values_give_non_finite_status() {
    for (name, solve) in SOLVERS {
        // NaN from the map
        let mut t = |z: ArrayView1<'_, f64>| -> Result<Array1<f64>> { Ok(z.mapv(|v| (v - 10.0).sqrt())) };
        let (_, report) = solve(&mut t, Array1::zeros(2).view(), &FixedPointOptions::default()).unwrap();
        assert_eq!(report.status, SolveStatus::NonFinite, "{name}: {report}");
        assert_eq!(report.trace.len(), 1);
        // NaN in the start
        let mut t = |z: ArrayView1<'_, f64>| -> Result<Array1<f64>> { Ok(z.to_owned()) };
        let (_, report) = solve(&mut t, array![0.0, f64::NAN].view(), &FixedPointOptions::default()).unwrap();
        assert_eq!(report.status, SolveStatus::NonFinite, "{name}: {report}");
        assert_eq!(report.evaluations, 0);
    }
}

#[test]
fn bad_maps_and_options_are_errors() {
    for (name, solve) in SOLVERS {
        let mut wrong_len = |_z: ArrayView1<'_, f64>| -> Result<Array1<f64>> { Ok(Array1::zeros(3)) };
        let e = solve(&mut wrong_len, Array1::zeros(2).view(), &FixedPointOptions::default()).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{name}: {e}");
        let mut failing = |_z: ArrayView1<'_, f64>| -> Result<Array1<f64>> { Err(Error::invalid("layer", "boom")) };
        let e = solve(&mut failing, Array1::zeros(2).view(), &FixedPointOptions::default()).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { op: "layer", .. }), "{name}: {e}");
        let mut id = |z: ArrayView1<'_, f64>| -> Result<Array1<f64>> { Ok(z.to_owned()) };
        for opts in [
            FixedPointOptions::default().with_damping(0.0),
            FixedPointOptions::default().with_damping(1.5),
            FixedPointOptions::default().with_tol(-1.0),
            FixedPointOptions::default().with_divergence_factor(0.5),
        ] {
            let e = solve(&mut id, Array1::zeros(2).view(), &opts).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { .. }), "{name}: {e}");
        }
    }
}

#[test]
fn damping_and_warm_start() {
    // T(z) = -0.9 z + 1: Picard oscillates slowly; damping 0.5 makes it fast.
    let t = |z: ArrayView1<f64>| Ok(z.mapv(|v| -0.9 * v + 1.0));
    let plain = picard(t, Array1::zeros(4).view(), &FixedPointOptions::default())
        .unwrap()
        .1;
    let damped = picard(
        t,
        Array1::zeros(4).view(),
        &FixedPointOptions::default().with_damping(0.5),
    )
    .unwrap()
    .1;
    assert!(plain.is_converged() && damped.is_converged());
    assert!(damped.iterations * 5 < plain.iterations, "{damped} vs {plain}");
    // warm start near the answer
    let z_star = Array1::from_elem(4, 1.0 / 1.9);
    let near = &z_star + 1e-6;
    let warm = picard(t, near.view(), &FixedPointOptions::default()).unwrap().1;
    assert!(warm.iterations < plain.iterations / 2, "{warm} vs {plain}");
    let warm_a = anderson(t, near.view(), &FixedPointOptions::default()).unwrap().1;
    let cold_a = anderson(t, Array1::zeros(4).view(), &FixedPointOptions::default())
        .unwrap()
        .1;
    assert!(warm_a.is_converged() && warm_a.iterations <= cold_a.iterations);
}

#[test]
fn anderson_memory_zero_is_picard_and_f32_works() {
    let n = 10;
    let a = with_norm(n, 0.5, 20);
    let c = random_vector(n, 21);
    let opts = FixedPointOptions::default().with_anderson_memory(0).with_damping(0.7);
    let (za, ra) = anderson(|z: ArrayView1<f64>| Ok(a.dot(&z) + &c), Array1::zeros(n).view(), &opts).unwrap();
    let (zp, rp) = picard(|z: ArrayView1<f64>| Ok(a.dot(&z) + &c), Array1::zeros(n).view(), &opts).unwrap();
    assert_eq!(ra.iterations, rp.iterations);
    assert!(max_abs_diff(&za, &zp) < 1e-14);
    // f32
    let a32 = to_f32_mat(&a);
    let c32 = to_f32_vec(&c);
    let opts = FixedPointOptions::for_precision::<f32>();
    assert_eq!(opts.tol, 1e-5);
    let z_ref = reference_solve(&(Array2::<f64>::eye(n) - &a), &c);
    for (name, z, rep) in [
        (
            "picard",
            picard(
                |z: ArrayView1<f32>| Ok(a32.dot(&z) + &c32),
                Array1::zeros(n).view(),
                &opts,
            )
            .unwrap(),
        ),
        (
            "anderson",
            anderson(
                |z: ArrayView1<f32>| Ok(a32.dot(&z) + &c32),
                Array1::zeros(n).view(),
                &opts,
            )
            .unwrap(),
        ),
        (
            "broyden",
            broyden(
                |z: ArrayView1<f32>| Ok(a32.dot(&z) + &c32),
                Array1::zeros(n).view(),
                &opts,
            )
            .unwrap(),
        ),
    ]
    .map(|(name, (z, r))| (name, z, r))
    {
        assert!(rep.is_converged(), "{name}: {rep}");
        assert!(max_abs_diff(&z.mapv(f64::from), &z_ref) < 1e-4, "{name}");
    }
}

#[test]
fn flattened_maps_over_matrices() {
    // Z = 0.5 * tanh(W Z) + X on 3x4 matrices
    let w = with_norm(3, 0.9, 30);
    let x = random_matrix(3, 4, 31);
    let map = flattened(Ix2(3, 4), |z: ArrayView2<f64>| {
        Ok(w.dot(&z).mapv(|v| 0.5 * v.tanh()) + &x)
    });
    let (z, report) = anderson(map, Array1::zeros(12).view(), &FixedPointOptions::default()).unwrap();
    assert!(report.is_converged(), "{report}");
    let z = z.into_shape_with_order((3, 4)).unwrap();
    let fz = w.dot(&z).mapv(|v| 0.5 * v.tanh()) + &x;
    assert!((fz - &z).iter().all(|d| d.abs() < 1e-9));
    // wrong state length is an error
    let mut map = flattened(Ix2(3, 4), |z: ArrayView2<f64>| Ok(z.to_owned()));
    assert!(matches!(map(Array1::zeros(5).view()), Err(Error::ShapeMismatch { .. })));
    // a map returning the wrong shape is an error
    let mut bad = flattened(Ix2(2, 2), |_z: ArrayView2<f64>| Ok(Array2::zeros((4, 1))));
    assert!(matches!(bad(Array1::zeros(4).view()), Err(Error::ShapeMismatch { .. })));
}

#[test]
fn newton_krylov_square_roots() {
    let n = 12;
    let theta = Array1::from_shape_fn(n, |i| 1.0 + 0.25 * i as f64);
    let expected = theta.mapv(f64::sqrt);
    let f = |z: ArrayView1<f64>| Ok(&z * &z - &theta);
    let z0 = Array1::<f64>::ones(n);
    let (z, report) = newton_krylov(f, z0.view(), &NewtonKrylovOptions::default()).unwrap();
    assert!(report.is_converged(), "{report}");
    assert!(max_abs_diff(&z, &expected) < 1e-10, "{}", max_abs_diff(&z, &expected));
    assert!(report.iterations < 15, "{report}");
    assert!(report.inner_iterations >= report.iterations);
    assert!(report.evaluations > report.iterations);
    // fast local convergence: the trace drops superlinearly at the end
    let t = &report.trace;
    assert!(t[t.len() - 1] < 1e-10 && t[0] > 1.0);
    // with an exact Jacobian-vector product
    let (z, report) = newton_krylov_with_jvp(
        f,
        |z: ArrayView1<f64>, v: ArrayView1<f64>| Ok(2.0 * &z * v),
        z0.view(),
        &NewtonKrylovOptions::default().with_tol(1e-13),
    )
    .unwrap();
    assert!(report.is_converged(), "{report}");
    assert!(max_abs_diff(&z, &expected) < 1e-12);
    // f32
    let theta32 = to_f32_vec(&theta);
    let (z, report) = newton_krylov(
        |z: ArrayView1<f32>| Ok(&z * &z - &theta32),
        Array1::<f32>::ones(n).view(),
        &NewtonKrylovOptions::default().with_tol(1e-5),
    )
    .unwrap();
    assert!(report.is_converged(), "{report}");
    assert!(max_abs_diff(&z.mapv(f64::from), &expected) < 1e-5);
}

#[test]
fn newton_krylov_small_nonlinear_system() {
    // x^2 + y^2 = 4, exp(x) + y = 1: a root near (-1.8, 0.84)
    let f = |z: ArrayView1<f64>| Ok(array![z[0] * z[0] + z[1] * z[1] - 4.0, z[0].exp() + z[1] - 1.0]);
    let (z, report) = newton_krylov(f, array![-1.0, 1.0].view(), &NewtonKrylovOptions::default()).unwrap();
    assert!(report.is_converged(), "{report}");
    let fz = f(z.view()).unwrap();
    assert!(fz.iter().all(|v| v.abs() < 1e-10), "{fz}");
    assert!((z[0] + 1.8163).abs() < 1e-3 && (z[1] - 0.8374).abs() < 1e-3, "{z}");
    // a fixed point through F(z) = z - T(z): z = cos(z) + 0.1 * sin(2 z)
    let t = |z: ArrayView1<f64>| z.mapv(|v| v.cos() + 0.1 * (2.0 * v).sin());
    let (z, report) = newton_krylov(
        |z: ArrayView1<f64>| Ok(&z - &t(z)),
        Array1::zeros(3).view(),
        &NewtonKrylovOptions::default(),
    )
    .unwrap();
    assert!(report.is_converged(), "{report}");
    assert!((&t(z.view()) - &z).iter().all(|v| v.abs() < 1e-10));
}

#[test]
fn newton_krylov_without_a_root_reports_failure() {
    // z^2 + 1 = 0 has no real root
    let (_, report) = newton_krylov(
        |z: ArrayView1<f64>| Ok(z.mapv(|v| v * v + 1.0)),
        array![1.0, 2.0].view(),
        &NewtonKrylovOptions::default().with_max_iter(40),
    )
    .unwrap();
    assert!(!report.is_converged(), "{report}");
    assert!(report.residual >= 1.0);
    assert!(report.clone().into_result().is_err());
    // errors and bad options
    let e = newton_krylov(
        |_z: ArrayView1<f64>| Ok(Array1::zeros(5)),
        array![1.0, 2.0].view(),
        &NewtonKrylovOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }));
    let e = newton_krylov(
        |z: ArrayView1<f64>| Ok(z.to_owned()),
        array![1.0].view(),
        &NewtonKrylovOptions::default().with_inner(SolveOptions::default().with_restart(0)),
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }));
    let (_, report) = newton_krylov(
        |z: ArrayView1<f64>| Ok(z.to_owned()),
        array![f64::NAN].view(),
        &NewtonKrylovOptions::default(),
    )
    .unwrap();
    assert_eq!(report.status, SolveStatus::NonFinite);
}

#[test]
fn a_map_without_fixed_point_is_not_declared_converged_where_rounding_absorbs_the_step() {
    // T(z) = z + e has no fixed point; a secant step can jump to a z so large that z + e
    // rounds to z. That residual of zero must not count as convergence.
    for (name, solver) in [
        ("anderson", run_anderson as FpSolver),
        ("broyden", run_broyden as FpSolver),
    ] {
        let mut map = |z: ArrayView1<'_, f64>| Ok(z.mapv(|v| v + std::f64::consts::E));
        let (_, report) = solver(
            &mut map,
            array![0.0].view(),
            &FixedPointOptions::default().with_max_iter(200),
        )
        .unwrap();
        assert_ne!(report.status, SolveStatus::Converged, "{name}: {report:?}");
    }
}
