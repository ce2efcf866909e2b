//! The QP layer: against the conic layer written by hand, central finite differences in every
//! argument, KKT residuals, batches, infinite bounds, kinks in the ledger and the report,
//! infeasible samples (refused, or their closest feasible QP against closed forms), bad input.

use clarke_convex::cone::*;
use clarke_core::{BackwardOptions, KinkPolicy, Tape};
use ndarray::{Array1, Array2, ArrayD, Axis, Dimension, array, concatenate, s};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use rand_distr::StandardNormal;

use crate::cone::{normal, normal_vec};

/// Two variables, `x_0 + x_1 = 2` against `x_0 + x_1 <= 0`, and a feasible row `x_1 >= 0.2`:
/// infeasible in part only.
fn partly_infeasible() -> Qp {
    let inf = f64::INFINITY;
    Qp {
        q: array![[1.5, 0.2], [0.2, 1.0]].into_dyn(),
        p: array![0.1, -1.0].into_dyn(),
        a: Some(array![[1.0, 1.0]].into_dyn()),
        b: Some(array![2.0].into_dyn()),
        g: Some(array![[1.0, 1.0], [0.0, 1.0]].into_dyn()),
        l: Some(array![-inf, 0.2].into_dyn()),
        u: Some(array![0.0, inf].into_dyn()),
    }
}

fn max_abs(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b.iter()).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
}

fn tight() -> SolverOptions {
    SolverOptions::default().with_tolerance(1e-9)
}

/// A QP's data as plain arrays (any of them may carry a batch axis).
#[derive(Clone)]
struct Qp {
    q: ArrayD<f64>,
    p: ArrayD<f64>,
    a: Option<ArrayD<f64>>,
    b: Option<ArrayD<f64>>,
    g: Option<ArrayD<f64>>,
    l: Option<ArrayD<f64>>,
    u: Option<ArrayD<f64>>,
}

/// What one run of the layer gives: `x`, the gradients of `sum(w * x)` with respect to every
/// argument given (in the order Q, p, A, b, G, l, u), the solutions, the last backward
/// report and the kink records of the backward call.
struct Run {
    x: ArrayD<f64>,
    grads: Vec<Option<ArrayD<f64>>>,
    solutions: Vec<QpSolution>,
    report: ConicBackwardReport,
    forward: QpForwardReport,
    kinks: Vec<clarke_core::KinkRecord>,
}

fn run(qp: &Qp, w: &ArrayD<f64>, opts: &QpLayerOptions, policy: KinkPolicy) -> clarke_core::Result<Run> {
    let tape = Tape::<f64>::new();
    let q = tape.param(qp.q.clone());
    let p = tape.param(qp.p.clone());
    let opt = |v: &Option<ArrayD<f64>>| v.as_ref().map(|v| tape.param(v.clone()));
    let (a, b, g, l, u) = (opt(&qp.a), opt(&qp.b), opt(&qp.g), opt(&qp.l), opt(&qp.u));
    let data = QpData {
        q: q.into(),
        p,
        a,
        b,
        g,
        l,
        u,
    };
    let layer = qp_layer(data, opts)?;
    let x = layer.x.value();
    let loss = (layer.x * tape.constant(w.clone())).sum();
    let grads = loss.backward_with(&BackwardOptions::default().with_policy(policy))?;
    let pick = |v: Option<clarke_core::Var<'_, f64>>| v.map(|v| grads.wrt(v).unwrap().clone());
    Ok(Run {
        x,
        grads: vec![
            pick(Some(q)),
            pick(Some(p)),
            pick(a),
            pick(b),
            pick(g),
            pick(l),
            pick(u),
        ],
        solutions: layer.solutions.to_vec(),
        report: layer.log.last().unwrap(),
        forward: layer.report(),
        kinks: grads.ledger().records().to_vec(),
    })
}

/// `x` only (for finite differences).
fn forward(qp: &Qp, opts: &QpLayerOptions) -> ArrayD<f64> {
    let tape = Tape::<f64>::new();
    let c = |v: &Option<ArrayD<f64>>| v.as_ref().map(|v| tape.constant(v.clone()));
    let data = QpData {
        q: tape.constant(qp.q.clone()).into(),
        p: tape.constant(qp.p.clone()),
        a: c(&qp.a),
        b: c(&qp.b),
        g: c(&qp.g),
        l: c(&qp.l),
        u: c(&qp.u),
    };
    qp_layer(data, opts).unwrap().x.value()
}

/// A strictly convex QP with 5 variables, 2 equalities and 4 two-sided inequalities with a
/// planted solution: row 0 active on its upper side, row 1 on its lower side, rows 2 and 3
/// inactive; strictly complementary, so the solution map is smooth around it.
fn planted(seed: u64) -> Qp {
    let (n, me, mg) = (5, 2, 4);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let l0 = normal(&mut rng, (n, n));
    let q = l0.t().dot(&l0) / n as f64 + Array2::<f64>::eye(n) * 0.5;
    let a = normal(&mut rng, (me, n));
    let g = normal(&mut rng, (mg, n));
    let x = normal_vec(&mut rng, n);
    let y = normal_vec(&mut rng, me);
    let gx = g.dot(&x);
    let z = array![0.8, -0.6, 0.0, 0.0];
    let l = array![gx[0] - 1.5, gx[1], gx[2] - 0.7, gx[3] - 1.1];
    let u = array![gx[0], gx[1] + 1.3, gx[2] + 0.9, gx[3] + 0.4];
    let p = -(q.dot(&x) + a.t().dot(&y) + g.t().dot(&z));
    Qp {
        q: q.into_dyn(),
        p: p.into_dyn(),
        a: Some(a.clone().into_dyn()),
        b: Some(a.dot(&x).into_dyn()),
        g: Some(g.into_dyn()),
        l: Some(l.into_dyn()),
        u: Some(u.into_dyn()),
    }
}

fn opts() -> QpLayerOptions {
    QpLayerOptions::default().with_solver(tight())
}

#[test]
fn matches_the_conic_layer_written_by_hand() {
    let qp = planted(3);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let w = normal_vec(&mut rng, 5).into_dyn();
    let ours = run(&qp, &w, &opts(), KinkPolicy::default()).unwrap();

    // The same program as a cone program: [A; G; -G] x + s = [b; u; -l].
    let g2 = |v: &Option<ArrayD<f64>>| -> Array2<f64> { v.clone().unwrap().into_dimensionality().unwrap() };
    let g1 = |v: &Option<ArrayD<f64>>| -> Array1<f64> { v.clone().unwrap().into_dimensionality().unwrap() };
    let (a, g) = (g2(&qp.a), g2(&qp.g));
    let (b, l, u) = (g1(&qp.b), g1(&qp.l), g1(&qp.u));
    let ac = concatenate(Axis(0), &[a.view(), g.view(), (-&g).view()]).unwrap();
    let bc = concatenate(Axis(0), &[b.view(), u.view(), (-&l).view()]).unwrap();
    let cones = Cones::new(vec![Cone::Zero(2), Cone::NonNeg(8)]).unwrap();
    let tape = Tape::<f64>::new();
    let pv = tape.param(qp.q.clone());
    let av = tape.param(ac.into_dyn());
    let bv = tape.param(bc.into_dyn());
    let cv = tape.param(qp.p.clone());
    let conic = quadratic_cone_program(
        pv,
        av,
        bv,
        cv,
        &cones,
        &ConicLayerOptions::default().with_solver(tight()),
    )
    .unwrap();
    let x = conic.x.value();
    let grads = (conic.x * tape.constant(w.clone())).sum().backward().unwrap();
    assert!(max_abs(&ours.x, &x) < 1e-9, "{} vs {}", ours.x, x);
    let gac = grads
        .wrt(av)
        .unwrap()
        .clone()
        .into_dimensionality::<ndarray::Ix2>()
        .unwrap();
    let gbc = grads
        .wrt(bv)
        .unwrap()
        .clone()
        .into_dimensionality::<ndarray::Ix1>()
        .unwrap();
    let expect = [
        grads.wrt(pv).unwrap().clone(),
        grads.wrt(cv).unwrap().clone(),
        gac.slice(s![..2, ..]).to_owned().into_dyn(),
        gbc.slice(s![..2]).to_owned().into_dyn(),
        (&gac.slice(s![2..6, ..]) - &gac.slice(s![6..10, ..])).into_dyn(),
        (-&gbc.slice(s![6..10])).into_dyn(),
        gbc.slice(s![2..6]).to_owned().into_dyn(),
    ];
    for (k, (got, want)) in ours.grads.iter().zip(&expect).enumerate() {
        let got = got.as_ref().unwrap();
        assert!(max_abs(got, want) < 1e-9, "argument {k}: {got} vs {want}");
    }
    // The gradient of Q is symmetric.
    let gq = ours.grads[0]
        .clone()
        .unwrap()
        .into_dimensionality::<ndarray::Ix2>()
        .unwrap();
    assert!((&gq - &gq.t()).iter().all(|v| v.abs() < 1e-14));
    assert_eq!((ours.report.samples, ours.report.certified), (1, 1));
    assert_eq!(ours.forward.closest_feasible(), vec![]);
}

#[test]
fn central_finite_differences_in_every_argument() {
    let qp = planted(5);
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let w = normal_vec(&mut rng, 5).into_dyn();
    check_differences(&qp, &w, &opts(), &[0, 1, 2, 3, 4, 5, 6], 1e-6);
}

#[test]
fn kkt_residuals_of_the_returned_solutions() {
    for seed in [3, 5, 7] {
        let qp = planted(seed);
        let w = ArrayD::from_elem(vec![5], 1.0);
        let r = run(&qp, &w, &opts(), KinkPolicy::default()).unwrap();
        let sol = &r.solutions[0];
        let d2 = |v: &ArrayD<f64>| v.clone().into_dimensionality::<ndarray::Ix2>().unwrap();
        let d1 = |v: &ArrayD<f64>| v.clone().into_dimensionality::<ndarray::Ix1>().unwrap();
        let (q, p) = (d2(&qp.q), d1(&qp.p));
        let (a, b) = (d2(qp.a.as_ref().unwrap()), d1(qp.b.as_ref().unwrap()));
        let (g, l, u) = (
            d2(qp.g.as_ref().unwrap()),
            d1(qp.l.as_ref().unwrap()),
            d1(qp.u.as_ref().unwrap()),
        );
        let (x, y, z) = (&sol.x, &sol.eq_multipliers, &sol.ineq_multipliers);
        let stationarity = q.dot(x) + &p + a.t().dot(y) + g.t().dot(z);
        let gx = g.dot(x);
        let mut worst = stationarity.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        worst = worst.max((a.dot(x) - &b).iter().fold(0.0f64, |m, v| m.max(v.abs())));
        for i in 0..4 {
            // Feasibility and complementarity on each side.
            worst = worst.max((gx[i] - u[i]).max(0.0)).max((l[i] - gx[i]).max(0.0));
            worst = worst.max(z[i].max(0.0).min(u[i] - gx[i]).abs());
            worst = worst.max((-z[i]).max(0.0).min(gx[i] - l[i]).abs());
        }
        assert!(worst < 1e-9, "seed {seed}: KKT residual {worst:e}");
        // The planted active sides.
        assert!(
            z[0] > 0.1 && z[1] < -0.1 && z[2].abs() < 1e-12 && z[3].abs() < 1e-12,
            "{z}"
        );
    }
}

#[test]
fn a_batch_of_three_equals_three_single_calls() {
    let qp = planted(7);
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let w = normal_vec(&mut rng, 5);
    // Batched p and u (the first sample the planted QP), shared Q, A, b, G, l.
    let p0: Array1<f64> = qp.p.clone().into_dimensionality().unwrap();
    let u0: Array1<f64> = qp.u.clone().unwrap().into_dimensionality().unwrap();
    let ps = ndarray::stack![Axis(0), p0, &p0 * 0.5 + 0.1, &p0 * -1.0];
    let us = ndarray::stack![Axis(0), u0, &u0 + 0.3, &u0 + 1.0];
    let mut batched = qp.clone();
    batched.p = ps.clone().into_dyn();
    batched.u = Some(us.clone().into_dyn());
    let wb = ndarray::stack![Axis(0), w, w, w].into_dyn();
    let all = run(&batched, &wb, &opts(), KinkPolicy::default()).unwrap();
    assert_eq!(all.x.shape(), &[3, 5]);
    assert_eq!(all.report.samples, 3);
    let mut shared: Vec<Option<ArrayD<f64>>> = vec![None; 7];
    for i in 0..3 {
        let mut one = qp.clone();
        one.p = ps.row(i).to_owned().into_dyn();
        one.u = Some(us.row(i).to_owned().into_dyn());
        let r = run(&one, &w.clone().into_dyn(), &opts(), KinkPolicy::default()).unwrap();
        assert!(max_abs(&all.x.index_axis(Axis(0), i).to_owned(), &r.x) < 1e-10);
        for k in [1, 6] {
            let got = all.grads[k].as_ref().unwrap().index_axis(Axis(0), i).to_owned();
            assert!(
                max_abs(&got, r.grads[k].as_ref().unwrap()) < 1e-10,
                "argument {k} sample {i}"
            );
        }
        for k in [0, 2, 3, 4, 5] {
            let g = r.grads[k].clone().unwrap();
            shared[k] = Some(match shared[k].take() {
                Some(acc) => acc + g,
                None => g,
            });
        }
    }
    for k in [0, 2, 3, 4, 5] {
        let (got, want) = (all.grads[k].as_ref().unwrap(), shared[k].as_ref().unwrap());
        assert!(max_abs(got, want) < 1e-10, "shared argument {k}: {got} vs {want}");
    }
}

#[test]
fn infinite_bounds_drop_their_side_and_get_no_gradient() {
    // min 1/2 ||x||^2 + p^T x with x_0 <= 1 (l = -inf), x_1 >= 0.5 (u = +inf), a row with
    // both sides infinite, and x_2 in [-1, 1] (inactive).
    let q = Array2::<f64>::eye(3).into_dyn();
    let p = array![-2.0, 1.0, -0.2].into_dyn();
    let g = array![[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 1.0]].into_dyn();
    let inf = f64::INFINITY;
    let l = array![-inf, 0.5, -inf, -1.0].into_dyn();
    let u = array![1.0, inf, inf, 1.0].into_dyn();
    let qp = Qp {
        q,
        p,
        a: None,
        b: None,
        g: Some(g),
        l: Some(l),
        u: Some(u),
    };
    let w = array![1.0, 2.0, 3.0].into_dyn();
    let r = run(&qp, &w, &opts(), KinkPolicy::default()).unwrap();
    assert!(max_abs(&r.x, &array![1.0, 0.5, 0.2].into_dyn()) < 1e-10, "{}", r.x);
    // One upper row for x_0, one lower row for x_1, two for x_2; nothing for the free row.
    assert_eq!(
        r.solutions[0].rows,
        vec![QpRow::Upper(0), QpRow::Upper(3), QpRow::Lower(1), QpRow::Lower(3)]
    );
    let (gl, gu) = (r.grads[5].as_ref().unwrap(), r.grads[6].as_ref().unwrap());
    // dx_0/du_0 = 1, dx_1/dl_1 = 1; infinite bounds and inactive ones get 0.
    assert!(max_abs(gu, &array![1.0, 0.0, 0.0, 0.0].into_dyn()) < 1e-10, "{gu}");
    assert!(max_abs(gl, &array![0.0, 2.0, 0.0, 0.0].into_dyn()) < 1e-10, "{gl}");
    assert_eq!((gl[[0]], gl[[2]], gu[[1]], gu[[2]]), (0.0, 0.0, 0.0, 0.0));
    // The same QP without the free row and with one-sided rows written by hand.
    let hand = Qp {
        g: Some(array![[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]].into_dyn()),
        l: Some(array![-inf, -inf, -1.0].into_dyn()),
        u: Some(array![1.0, -0.5, 1.0].into_dyn()),
        ..qp.clone()
    };
    let rh = run(&hand, &w, &opts(), KinkPolicy::default()).unwrap();
    assert!(max_abs(&r.x, &rh.x) < 1e-12);
    assert!(max_abs(r.grads[1].as_ref().unwrap(), rh.grads[1].as_ref().unwrap()) < 1e-10);
    // A QP whose only row is free: the unconstrained minimiser.
    let free = Qp {
        g: Some(array![[1.0, 1.0, 1.0]].into_dyn()),
        l: Some(array![-inf].into_dyn()),
        u: Some(array![inf].into_dyn()),
        ..qp.clone()
    };
    let rf = run(&free, &w, &opts(), KinkPolicy::default()).unwrap();
    assert!(max_abs(&rf.x, &array![2.0, -1.0, 0.2].into_dyn()) < 1e-10, "{}", rf.x);
    assert!(max_abs(rf.grads[1].as_ref().unwrap(), &(-&w)) < 1e-10);
    assert_eq!(rf.grads[6].as_ref().unwrap()[[0]], 0.0);
}

#[test]
fn a_pinned_row_is_an_equality() {
    // l_1 = u_1 = 0.3 on x_1: an equality row; dx_1 / du_1 = 1 (multiplier >= 0 side).
    let inf = f64::INFINITY;
    let qp = Qp {
        q: Array2::<f64>::eye(2).into_dyn(),
        p: array![-1.0, -1.0].into_dyn(),
        a: None,
        b: None,
        g: Some(array![[1.0, 0.0], [0.0, 1.0]].into_dyn()),
        l: Some(array![-inf, 0.3].into_dyn()),
        u: Some(array![2.0, 0.3].into_dyn()),
    };
    let r = run(&qp, &array![0.0, 1.0].into_dyn(), &opts(), KinkPolicy::default()).unwrap();
    assert!(max_abs(&r.x, &array![1.0, 0.3].into_dyn()) < 1e-10);
    assert_eq!(r.solutions[0].rows, vec![QpRow::Pinned(1), QpRow::Upper(0)]);
    assert!((r.grads[6].as_ref().unwrap()[[1]] - 1.0).abs() < 1e-10);
    assert_eq!(r.grads[5].as_ref().unwrap()[[1]], 0.0);
    assert_eq!(r.report.certified, 1);
}

#[test]
fn a_weakly_active_constraint_is_a_kink_in_the_ledger_and_the_report_as_for_the_conic_layer() {
    // x = argmin 1/2 x^2 - x s.t. x <= 1: weakly active (y = s = 0).
    for (policy, q) in [(KinkPolicy::pytorch(), 0.0), (KinkPolicy::one(), 1.0)] {
        let qp = Qp {
            q: array![[1.0]].into_dyn(),
            p: array![-1.0].into_dyn(),
            a: None,
            b: None,
            g: Some(array![[1.0]].into_dyn()),
            l: None,
            u: Some(array![1.0].into_dyn()),
        };
        let w = array![1.0].into_dyn();
        let r = run(&qp, &w, &QpLayerOptions::default(), policy.clone()).unwrap();
        // The conic layer on the same program.
        let tape = Tape::<f64>::new();
        let c = tape.param(array![-1.0].into_dyn());
        let conic = quadratic_cone_program(
            tape.constant(array![[1.0]].into_dyn()),
            tape.constant(array![[1.0]].into_dyn()),
            tape.constant(array![1.0].into_dyn()),
            c,
            &Cones::new(vec![Cone::NonNeg(1)]).unwrap(),
            &ConicLayerOptions::default(),
        )
        .unwrap();
        let cg = conic
            .x
            .backward_with(&BackwardOptions::seed(w.clone()).with_policy(policy))
            .unwrap();
        let conic_report = conic.log.last().unwrap();
        // x = min(-p, 1): dx/dp = -(1 - q) at the kink.
        assert_eq!(r.grads[1].as_ref().unwrap()[[0]], -(1.0 - q));
        assert_eq!(cg.wrt(c).unwrap()[[0]], -(1.0 - q));
        assert_eq!(r.grads[6].as_ref().unwrap()[[0]], q);
        let ours: Vec<_> = r.kinks.iter().filter(|k| k.at_kink() > 0).collect();
        let theirs: Vec<_> = cg.ledger().hits().collect();
        assert_eq!((ours.len(), theirs.len()), (1, 1));
        let (a, b) = (ours[0], theirs[0]);
        assert_eq!((a.op, a.at_kink(), a.exact), (b.op, b.at_kink(), b.exact));
        assert_eq!(a.selection, b.selection);
        assert_eq!(a.selection, clarke_core::Selection::Slope(q));
        assert_eq!(a.layer.as_deref(), Some("qp_layer"));
        // The kink of the upper side of inequality 0: [sample 0, m_eq + 0] of [1, 2].
        assert_eq!((a.shape.clone(), a.kink_indices.clone()), (vec![1, 2], vec![0]));
        assert_eq!(
            (r.report.kinks, r.report.certified),
            (conic_report.kinks, conic_report.certified)
        );
        assert_eq!(r.report.kinks, 1);
        let (sample, margin) = r.report.min_margin().unwrap();
        assert_eq!(sample, 0);
        assert!(!margin.strict);
    }
}

fn one_d(a: f64, b: f64, g: f64, l: Option<f64>, u: Option<f64>) -> Qp {
    Qp {
        q: array![[1.0]].into_dyn(),
        p: array![0.0].into_dyn(),
        a: Some(array![[a]].into_dyn()),
        b: Some(array![b].into_dyn()),
        g: Some(array![[g]].into_dyn()),
        l: l.map(|v| array![v].into_dyn()),
        u: u.map(|v| array![v].into_dyn()),
    }
}

#[test]
fn an_infeasible_sample_is_an_error_naming_it_and_the_certificate() {
    let qp = one_d(1.0, 2.0, 1.0, None, Some(0.5));
    let e = run(
        &qp,
        &array![1.0].into_dyn(),
        &QpLayerOptions::default(),
        KinkPolicy::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("sample 0: the QP is infeasible"), "{e}");
    assert!(
        e.contains("certificate") && e.contains("equality 0") && e.contains("upper side of inequality 0"),
        "{e}"
    );
    // In a batch, the infeasible sample is named.
    let mut batch = qp.clone();
    batch.b = Some(array![[0.0], [2.0]].into_dyn());
    let e = run(
        &batch,
        &array![[1.0], [1.0]].into_dyn(),
        &QpLayerOptions::default(),
        KinkPolicy::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("sample 1: the QP is infeasible"), "{e}");
}

fn closest() -> QpLayerOptions {
    opts().with_infeasible(InfeasibleMode::ClosestFeasible)
}

#[test]
fn closest_feasible_qp_against_closed_forms_in_one_variable() {
    // x = b and x <= u with u < b: min (x - b)^2 + (x - u)_+^2 splits the conflict,
    // x* = (b + u)/2, dx/db = dx/du = 1/2; in the coefficients a x = b, g x <= u at a = g = 1:
    // xbar = (a b + g u)/(a^2 + g^2), dx/da = -u/2, dx/dg = -b/2.
    let (b, u) = (2.0, 0.5);
    let r = run(
        &one_d(1.0, b, 1.0, None, Some(u)),
        &array![1.0].into_dyn(),
        &closest(),
        KinkPolicy::default(),
    )
    .unwrap();
    let g = |k: usize| *r.grads[k].as_ref().unwrap().iter().next().unwrap();
    assert!((r.x[[0]] - (b + u) / 2.0).abs() < 1e-8, "{}", r.x);
    assert!(
        (g(3) - 0.5).abs() < 1e-8 && (g(6) - 0.5).abs() < 1e-8,
        "{} {}",
        g(3),
        g(6)
    );
    assert!(
        (g(2) + u / 2.0).abs() < 1e-8 && (g(4) + b / 2.0).abs() < 1e-8,
        "{} {}",
        g(2),
        g(4)
    );
    assert!(g(1).abs() < 1e-8 && g(0).abs() < 1e-8);
    let cf = r.solutions[0].closest_feasible.as_ref().unwrap();
    let half = (b - u) / 2.0;
    assert!((cf.shift_eq[0] + half).abs() < 1e-8 && (cf.shift_ineq[0] - half).abs() < 1e-8);
    assert!((cf.norm - half * 2f64.sqrt()).abs() < 1e-8);
    let report = r.forward.closest_feasible();
    assert_eq!(report.len(), 1);
    assert!((report[0].1 - cf.norm).abs() < 1e-15);
    assert!(r.forward.to_string().contains("closest feasible QP"), "{}", r.forward);

    // 2x = b and x >= l with l > b/2: min (2x - b)^2 + (l - x)_+^2 gives x* = (2b + l)/5,
    // dx/db = 2/5, dx/dl = 1/5 (the lower side's sign).
    let (b, l) = (1.0, 1.0);
    let r = run(
        &one_d(2.0, b, 1.0, Some(l), None),
        &array![1.0].into_dyn(),
        &closest(),
        KinkPolicy::default(),
    )
    .unwrap();
    let g = |k: usize| *r.grads[k].as_ref().unwrap().iter().next().unwrap();
    assert!((r.x[[0]] - (2.0 * b + l) / 5.0).abs() < 1e-8, "{}", r.x);
    assert!(
        (g(3) - 0.4).abs() < 1e-8 && (g(5) - 0.2).abs() < 1e-8,
        "{} {}",
        g(3),
        g(5)
    );

    // The one-variable cases against central finite differences in every argument.
    for qp in [
        one_d(1.0, 2.0, 1.0, None, Some(0.5)),
        one_d(2.0, 1.0, 1.0, Some(1.0), None),
    ] {
        let r = run(&qp, &array![1.0].into_dyn(), &closest(), KinkPolicy::default()).unwrap();
        let h = 1e-6;
        for k in 0..7 {
            let Some(grad) = r.grads[k].as_ref() else { continue };
            let at = |t: f64| {
                let mut o = qp.clone();
                let bump = |v: &mut ArrayD<f64>| v.iter_mut().for_each(|e| *e += t);
                match k {
                    0 => bump(&mut o.q),
                    1 => bump(&mut o.p),
                    2 => bump(o.a.as_mut().unwrap()),
                    3 => bump(o.b.as_mut().unwrap()),
                    4 => bump(o.g.as_mut().unwrap()),
                    5 => bump(o.l.as_mut().unwrap()),
                    _ => bump(o.u.as_mut().unwrap()),
                }
                forward(&o, &closest())[[0]]
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            let an = *grad.iter().next().unwrap();
            assert!((fd - an).abs() < 1e-6, "argument {k}: finite difference {fd} vs {an}");
        }
    }
}

#[test]
fn closest_feasible_qp_in_two_variables_where_only_part_is_infeasible() {
    // x_0 + x_1 = b conflicts with x_0 + x_1 <= u_0 (u_0 < b): the shifted QP has
    // x_0 + x_1 = (b + u_0)/2 =: t. The row x_1 >= l_1 is feasible and unshifted.
    let inf = f64::INFINITY;
    let make = |p: Array1<f64>| Qp {
        q: Array2::<f64>::eye(2).into_dyn(),
        p: p.into_dyn(),
        a: Some(array![[1.0, 1.0]].into_dyn()),
        b: Some(array![2.0].into_dyn()),
        g: Some(array![[1.0, 1.0], [0.0, 1.0]].into_dyn()),
        l: Some(array![-inf, 0.5].into_dyn()),
        u: Some(array![0.0, inf].into_dyn()),
    };
    let w = array![1.0, 3.0].into_dyn();
    let t = 1.0;
    // p = (0, -1): x_1 >= 0.5 inactive; x = -p + lambda (1, 1) on the line:
    // x_0 = (t - p_0 + p_1)/2, x_1 = (t + p_0 - p_1)/2, with dt/db = dt/du_0 = 1/2.
    let r = run(&make(array![0.0, -1.0]), &w, &closest(), KinkPolicy::default()).unwrap();
    assert!(
        max_abs(&r.x, &array![(t - 1.0) / 2.0, (t + 1.0) / 2.0].into_dyn()) < 1e-8,
        "{}",
        r.x
    );
    // d(x_0 + 3 x_1)/dt = 2, /dp_0 = -1/2 + 3/2 = 1, /dp_1 = 1/2 - 3/2 = -1.
    let gp = r.grads[1].as_ref().unwrap();
    assert!(max_abs(gp, &array![1.0, -1.0].into_dyn()) < 1e-8, "{gp}");
    assert!((r.grads[3].as_ref().unwrap()[[0]] - 1.0).abs() < 1e-8);
    let gu = r.grads[6].as_ref().unwrap();
    let gl = r.grads[5].as_ref().unwrap();
    assert!(max_abs(gu, &array![1.0, 0.0].into_dyn()) < 1e-8, "{gu}");
    assert!(max_abs(gl, &array![0.0, 0.0].into_dyn()) < 1e-8, "{gl}");
    let cf = r.solutions[0].closest_feasible.as_ref().unwrap();
    assert!(max_abs(&cf.shift_ineq.clone().into_dyn(), &array![1.0, 0.0].into_dyn()) < 1e-8);
    assert_eq!(cf.left_out, vec![QpRow::Upper(0)]);
    // The violated row is parallel to the equality: the report flags the discontinuity.
    assert_eq!(r.forward.samples[0].dependent_rows, 1);
    assert!(r.forward.to_string().contains("discontinuous"), "{}", r.forward);

    // p = (0, 1): x_1 >= 0.5 active, x = (t - l_1, l_1): d(x_0 + 3 x_1)/dl_1 = 2, /db = 1/2,
    // /du_0 = 1/2, /dp = 0.
    let r = run(&make(array![0.0, 1.0]), &w, &closest(), KinkPolicy::default()).unwrap();
    assert!(max_abs(&r.x, &array![0.5, 0.5].into_dyn()) < 1e-8, "{}", r.x);
    assert!(max_abs(r.grads[1].as_ref().unwrap(), &array![0.0, 0.0].into_dyn()) < 1e-8);
    assert!((r.grads[3].as_ref().unwrap()[[0]] - 0.5).abs() < 1e-8);
    assert!(max_abs(r.grads[6].as_ref().unwrap(), &array![0.5, 0.0].into_dyn()) < 1e-8);
    assert!(max_abs(r.grads[5].as_ref().unwrap(), &array![0.0, 2.0].into_dyn()) < 1e-8);
    assert_eq!(r.report.certified, 1);
}

#[test]
fn bad_input_gets_clear_errors() {
    let base = planted(3);
    let w = ArrayD::from_elem(vec![5], 1.0);
    let err = |qp: &Qp| {
        run(qp, &w, &opts(), KinkPolicy::default())
            .err()
            .expect("an error")
            .to_string()
    };
    let mut qp = base.clone();
    qp.a = Some(Array2::<f64>::zeros((2, 4)).into_dyn());
    let e = err(&qp);
    assert!(e.contains("[2, 4] vs [2, 5]") && e.contains("A must be"), "{e}");
    let mut qp = base.clone();
    qp.b = Some(Array1::<f64>::zeros(3).into_dyn());
    let e = err(&qp);
    assert!(e.contains("[3] vs [2]") && e.contains("b must be"), "{e}");
    let mut qp = base.clone();
    qp.l = Some(Array1::<f64>::zeros(3).into_dyn());
    assert!(err(&qp).contains("l must be"), "{}", err(&qp));
    let mut qp = base.clone();
    qp.q = Array2::<f64>::eye(4).into_dyn();
    assert!(err(&qp).contains("Q must be"), "{}", err(&qp));
    let mut qp = base.clone();
    qp.p = ArrayD::zeros(vec![2, 5]);
    qp.u = Some(ArrayD::zeros(vec![3, 4]));
    assert!(err(&qp).contains("batch size"), "{}", err(&qp));
    // l > u at a row.
    let mut qp = base.clone();
    let mut l = qp.l.clone().unwrap();
    l[[2]] = qp.u.as_ref().unwrap()[[2]] + 1.0;
    qp.l = Some(l);
    assert!(err(&qp).contains("l > u at row 2"), "{}", err(&qp));
    // NaN anywhere, wrong-signed infinities.
    let mut qp = base.clone();
    qp.g.as_mut().unwrap()[[1, 3]] = f64::NAN;
    assert!(err(&qp).contains("G[1, 3] = NaN"), "{}", err(&qp));
    let mut qp = base.clone();
    qp.p[[4]] = f64::NAN;
    assert!(err(&qp).contains("p[4] = NaN"), "{}", err(&qp));
    let mut qp = base.clone();
    qp.l.as_mut().unwrap()[[0]] = f64::INFINITY;
    assert!(err(&qp).contains("l[0] = inf"), "{}", err(&qp));
    let mut qp = base.clone();
    qp.u.as_mut().unwrap()[[1]] = f64::NAN;
    assert!(err(&qp).contains("u[1] = NaN"), "{}", err(&qp));
    // Q not symmetric, not PSD.
    let mut qp = base.clone();
    qp.q[[0, 3]] += 1.0;
    assert!(err(&qp).contains("Q is not symmetric: Q[0, 3]"), "{}", err(&qp));
    let mut qp = base.clone();
    qp.q = (-Array2::<f64>::eye(5)).into_dyn();
    assert!(err(&qp).contains("not positive semidefinite"), "{}", err(&qp));
    // Blocks given by halves.
    let mut qp = base.clone();
    qp.a = None;
    assert!(err(&qp).contains("b is given without A"), "{}", err(&qp));
    let mut qp = base.clone();
    qp.b = None;
    assert!(err(&qp).contains("A is given without b"), "{}", err(&qp));
    let mut qp = base.clone();
    qp.g = None;
    assert!(err(&qp).contains("l is given without G"), "{}", err(&qp));
    let mut qp = base.clone();
    qp.l = None;
    qp.u = None;
    assert!(err(&qp).contains("G is given without l or u"), "{}", err(&qp));
}

#[test]
fn closest_feasible_samples_in_a_batch_are_named_in_the_report() {
    // x = b, x <= 1/2 with b = 0.2 (feasible), 2 and 3 (infeasible): x = 0.2, 1.25, 1.75.
    let mut qp = one_d(1.0, 0.0, 1.0, None, Some(0.5));
    qp.b = Some(array![[0.2], [2.0], [3.0]].into_dyn());
    let w = ArrayD::from_elem(vec![3, 1], 1.0);
    let r = run(&qp, &w, &closest(), KinkPolicy::default()).unwrap();
    assert!(
        max_abs(&r.x, &array![[0.2], [1.25], [1.75]].into_dyn()) < 1e-8,
        "{}",
        r.x
    );
    let report = r.forward.closest_feasible();
    assert_eq!(report.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![1, 2]);
    assert!((report[0].1 - 0.75 * 2f64.sqrt()).abs() < 1e-8 && (report[1].1 - 1.25 * 2f64.sqrt()).abs() < 1e-8);
    assert!(r.solutions[0].closest_feasible.is_none());
    // dx/db per sample; u is shared, its gradient the sum 0 + 1/2 + 1/2.
    assert!(max_abs(r.grads[3].as_ref().unwrap(), &array![[1.0], [0.5], [0.5]].into_dyn()) < 1e-8);
    assert!((r.grads[6].as_ref().unwrap()[[0]] - 1.0).abs() < 1e-8);
    assert_eq!((r.report.samples, r.report.certified), (3, 3));
}

#[test]
fn a_row_at_its_bound_in_the_least_squares_problem_is_a_kink_in_the_ledger() {
    // x_0 = b against x_0 <= 0, and x_1 <= 0. Sample 0 (b = -1) is feasible. Sample 1
    // (b = 2) is not: its least-squares point has x_0 = 1 and x_1 = 0 (the minimum-norm
    // point of a residual that is flat in x_1 <= 0), so the row x_1 <= 0 sits exactly at its
    // bound there: a kink of the shift, kept inside. The shifted QP itself (x_0 = 1,
    // x_1 = -1 with p = (0, 1)) is strictly complementary.
    let inf = f64::INFINITY;
    let qp = Qp {
        q: Array2::<f64>::eye(2).into_dyn(),
        p: array![0.0, 1.0].into_dyn(),
        a: Some(array![[1.0, 0.0]].into_dyn()),
        b: Some(array![[-1.0], [2.0]].into_dyn()),
        g: Some(array![[1.0, 0.0], [0.0, 1.0]].into_dyn()),
        l: Some(array![-inf, -inf].into_dyn()),
        u: Some(array![0.0, 0.0].into_dyn()),
    };
    let w = array![[1.0, 2.0], [1.0, 2.0]].into_dyn();
    let r = run(&qp, &w, &closest(), KinkPolicy::default()).unwrap();
    assert!(
        max_abs(&r.x, &array![[-1.0, -1.0], [1.0, -1.0]].into_dyn()) < 1e-8,
        "{}",
        r.x
    );
    let shift: Vec<_> = r.kinks.iter().filter(|k| k.op == "closest_feasible_clamp").collect();
    assert_eq!(
        shift.len(),
        1,
        "one record (no row at a bound was kept outside): {shift:?}"
    );
    let k = shift[0];
    // Rows of C = [A; G] per sample: the equality, then the two inequalities.
    assert_eq!(k.shape, vec![2, 3]);
    assert_eq!(k.elements, 6);
    assert_eq!(k.kink_indices, vec![3 + 2]);
    assert_eq!(k.at_kink(), 1);
    assert!(k.overridden);
    assert_eq!(k.selection, clarke_core::Selection::Clamp { low: 1.0, high: 1.0 });
    assert_eq!(k.layer.as_deref(), Some("qp_layer"));
    // A feasible batch has no shift, and no such record.
    let mut feasible = qp.clone();
    feasible.b = Some(array![[-1.0], [-0.5]].into_dyn());
    let r = run(&feasible, &w, &closest(), KinkPolicy::default()).unwrap();
    assert!(r.kinks.iter().all(|k| k.op != "closest_feasible_clamp"));
    // Forward mode reports the same record (the dot test compares the two ledgers).
    dot_test(&qp, &closest(), KinkPolicy::default(), 7);
}

/// Central differences of `sum(w * x)` in the entries of the arguments `which` (Q moved
/// symmetrically), against the layer's gradients.
fn check_differences(qp: &Qp, w: &ArrayD<f64>, opts: &QpLayerOptions, which: &[usize], tol: f64) {
    let ours = run(qp, w, opts, KinkPolicy::default()).unwrap();
    let loss = |qp: &Qp| (forward(qp, opts) * w).sum();
    let h = 1e-6;
    for &k in which {
        let base = match k {
            0 => Some(qp.q.clone()),
            1 => Some(qp.p.clone()),
            2 => qp.a.clone(),
            3 => qp.b.clone(),
            4 => qp.g.clone(),
            5 => qp.l.clone(),
            _ => qp.u.clone(),
        }
        .unwrap();
        let grad = ours.grads[k].as_ref().unwrap();
        for (idx, &v) in base.indexed_iter() {
            if !v.is_finite() {
                assert_eq!(grad[idx.slice()], 0.0, "argument {k} entry {idx:?}: infinite bound");
                continue;
            }
            let idx: Vec<usize> = idx.slice().to_vec();
            let mirror = (k == 0 && idx[0] != idx[1]).then(|| vec![idx[1], idx[0]]);
            if mirror.as_ref().is_some_and(|m| m[0] > m[1]) {
                continue;
            }
            let at = |t: f64| {
                let mut arr = base.clone();
                arr[idx.as_slice()] += t;
                if let Some(m) = &mirror {
                    arr[m.as_slice()] += t;
                }
                let mut other = qp.clone();
                match k {
                    0 => other.q = arr,
                    1 => other.p = arr,
                    2 => other.a = Some(arr),
                    3 => other.b = Some(arr),
                    4 => other.g = Some(arr),
                    5 => other.l = Some(arr),
                    _ => other.u = Some(arr),
                }
                loss(&other)
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            let an = grad[idx.as_slice()] + mirror.as_ref().map_or(0.0, |m| grad[m.as_slice()]);
            assert!(
                (fd - an).abs() < tol * (1.0 + an.abs()),
                "argument {k} entry {idx:?}: finite difference {fd} vs {an}"
            );
        }
    }
}

#[test]
fn closest_feasible_qp_against_finite_differences() {
    // Two equalities fix x in R^2; an inequality conflicts with them (stably: three rows in
    // R^2), another is inactive. Every argument, the matrices included.
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let a = normal(&mut rng, (2, 2)) + Array2::<f64>::eye(2) * 2.0;
    let b = normal_vec(&mut rng, 2);
    let x0 = clarke_solve::lstsq(a.view(), b.view()).unwrap().solution;
    let g = normal(&mut rng, (2, 2));
    let gx = g.dot(&x0);
    let l0 = normal(&mut rng, (2, 2));
    let qp = Qp {
        q: (l0.t().dot(&l0) + Array2::<f64>::eye(2)).into_dyn(),
        p: normal_vec(&mut rng, 2).into_dyn(),
        a: Some(a.into_dyn()),
        b: Some(b.into_dyn()),
        g: Some(g.into_dyn()),
        l: Some(array![gx[0] - 3.0, gx[1] - 2.0].into_dyn()),
        u: Some(array![gx[0] - 1.0, gx[1] + 2.0].into_dyn()),
    };
    let w = normal_vec(&mut rng, 2).into_dyn();
    let r = run(&qp, &w, &closest(), KinkPolicy::default()).unwrap();
    let cf = r.solutions[0].closest_feasible.as_ref().unwrap();
    assert!(cf.shift_ineq[0] > 0.1 && cf.shift_ineq[1] == 0.0, "{:?}", cf.shift_ineq);
    check_differences(&qp, &w, &closest(), &[0, 1, 2, 3, 4, 5, 6], 1e-6);

    // The two-variable QP where only part is infeasible: every argument but the matrices,
    // whose zero entries keep the conflict (moving them can make the QP feasible).
    let qp = partly_infeasible();
    check_differences(&qp, &array![1.0, 3.0].into_dyn(), &closest(), &[0, 1, 3, 5, 6], 1e-6);
}

/// `<J v, w>` by forward mode against `<v, J^T w>` by backward, with random `v` in every
/// argument given and random `w`; the two calls' ledgers must agree.
fn dot_test(qp: &Qp, opts: &QpLayerOptions, policy: KinkPolicy, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let tape = Tape::<f64>::new();
    let args: Vec<Option<ArrayD<f64>>> = vec![
        Some(qp.q.clone()),
        Some(qp.p.clone()),
        qp.a.clone(),
        qp.b.clone(),
        qp.g.clone(),
        qp.l.clone(),
        qp.u.clone(),
    ];
    let vars: Vec<Option<clarke_core::Var<'_, f64>>> =
        args.iter().map(|a| a.as_ref().map(|a| tape.param(a.clone()))).collect();
    let data = QpData {
        q: vars[0].unwrap().into(),
        p: vars[1].unwrap(),
        a: vars[2],
        b: vars[3],
        g: vars[4],
        l: vars[5],
        u: vars[6],
    };
    let layer = qp_layer(data, opts).unwrap();
    let dirs: Vec<(clarke_core::Var<'_, f64>, ArrayD<f64>)> = vars
        .iter()
        .zip(&args)
        .filter_map(|(v, a)| {
            let a = a.as_ref()?;
            Some((v.unwrap(), a.mapv(|_| rng.sample::<f64, _>(StandardNormal))))
        })
        .collect();
    let w = layer.x.value().mapv(|_| rng.sample::<f64, _>(StandardNormal));
    let options = BackwardOptions::default().with_policy(policy.clone());
    let jvp = layer.x.jvp(&dirs, &options).unwrap();
    let lhs = (jvp.tangent() * &w).sum();
    let grads = layer
        .x
        .backward_with(&BackwardOptions::seed(w.clone()).with_policy(policy))
        .unwrap();
    let rhs: f64 = dirs.iter().map(|(v, d)| (grads.wrt(*v).unwrap() * d).sum()).sum();
    assert!(
        (lhs - rhs).abs() < 1e-9 * (1.0 + lhs.abs()),
        "<J v, w> = {lhs} but <v, J^T w> = {rhs}"
    );
    assert_eq!(jvp.ledger(), grads.ledger());
    let reports = layer.log.all();
    assert_eq!(reports.len(), 2);
    assert_eq!(reports[0], reports[1]);
}

#[test]
fn forward_mode_is_the_transpose_of_backward() {
    dot_test(&planted(3), &opts(), KinkPolicy::default(), 1);
    // A batch with batched p and l, and infinite bounds.
    let mut qp = planted(5);
    let p0 = qp.p.clone();
    qp.p = ndarray::stack![Axis(0), p0.view(), (&p0 * 0.3).view()].into_dyn();
    let mut l = qp.l.clone().unwrap();
    l[[3]] = f64::NEG_INFINITY;
    qp.l = Some(ndarray::stack![Axis(0), l.view(), (&l - 0.2).view()].into_dyn());
    dot_test(&qp, &opts(), KinkPolicy::default(), 2);
    // A weakly active constraint under both selections.
    let weak = Qp {
        q: array![[1.0]].into_dyn(),
        p: array![-1.0].into_dyn(),
        a: None,
        b: None,
        g: Some(array![[1.0]].into_dyn()),
        l: None,
        u: Some(array![1.0].into_dyn()),
    };
    dot_test(&weak, &opts(), KinkPolicy::pytorch(), 3);
    dot_test(&weak, &opts(), KinkPolicy::one(), 4);
    // Closest feasible QPs: the shift's tangent against its adjoint, with `E` of full column
    // rank and not.
    dot_test(
        &one_d(2.0, 1.0, 1.0, Some(1.0), None),
        &closest(),
        KinkPolicy::default(),
        5,
    );
    let part = partly_infeasible();
    dot_test(&part, &closest(), KinkPolicy::default(), 6);
}

#[test]
fn a_pinned_row_below_and_an_f32_tape() {
    // l_1 = u_1 = 0.3 with the unconstrained x_1 = -1 below it: the multiplier is negative and
    // the gradient of the pinned value goes to l_1.
    let inf = f64::INFINITY;
    let qp = Qp {
        q: Array2::<f64>::eye(2).into_dyn(),
        p: array![-1.0, 1.0].into_dyn(),
        a: None,
        b: None,
        g: Some(array![[1.0, 0.0], [0.0, 1.0]].into_dyn()),
        l: Some(array![-inf, 0.3].into_dyn()),
        u: Some(array![2.0, 0.3].into_dyn()),
    };
    let r = run(&qp, &array![0.0, 1.0].into_dyn(), &opts(), KinkPolicy::default()).unwrap();
    assert!(max_abs(&r.x, &array![1.0, 0.3].into_dyn()) < 1e-10);
    assert!(r.solutions[0].ineq_multipliers[1] < -1.0 + 1e-9);
    assert!((r.grads[5].as_ref().unwrap()[[1]] - 1.0).abs() < 1e-10);
    assert_eq!(r.grads[6].as_ref().unwrap()[[1]], 0.0);

    // The same QP on an f32 tape: f64 solve, f32 values and gradients.
    let tape = Tape::<f32>::new();
    let f = |v: &ArrayD<f64>| tape.param(v.mapv(|x| x as f32));
    let (q, p, g, l, u) = (
        f(&qp.q),
        f(&qp.p),
        f(qp.g.as_ref().unwrap()),
        f(qp.l.as_ref().unwrap()),
        f(qp.u.as_ref().unwrap()),
    );
    let layer = qp_layer(QpData::new(q, p).with_ineq(g, Some(l), Some(u)), &opts()).unwrap();
    let x = layer.x.value();
    assert!((x[[0]] - 1.0).abs() < 1e-6 && (x[[1]] - 0.3).abs() < 1e-6, "{x}");
    let grads = (layer.x * tape.constant(array![0.0f32, 1.0].into_dyn()))
        .sum()
        .backward()
        .unwrap();
    assert!((grads.wrt(l).unwrap()[[1]] - 1.0).abs() < 1e-6);
    assert!((grads.wrt(p).unwrap()[[0]]).abs() < 1e-6);
}
