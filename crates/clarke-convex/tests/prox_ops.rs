//! Prox and projection ops: finite differences away from kinks, exact values at kinks per
//! policy, kink sites, bad input.

use clarke_convex::project::{project_box, project_l1_ball, project_nonneg, project_simplex};
use clarke_convex::prox::{group_soft_threshold, soft_threshold};
use clarke_core::{BackwardOptions, Error, GradcheckOptions, KinkPolicy, Tape, gradcheck};
use ndarray::{ArrayD, arr0, arr1};

fn a1(v: &[f64]) -> ArrayD<f64> {
    arr1(v).into_dyn()
}

/// A fixed non-trivial cotangent so that gradchecks see every output.
fn weighted_sum<'t>(tape: &'t Tape<f64>, y: clarke_core::Var<'t, f64>) -> clarke_core::Var<'t, f64> {
    let n = y.len();
    let w = tape.constant(ArrayD::from_shape_fn(ndarray::IxDyn(&[n]), |i| 0.3 + 0.7 * i[0] as f64));
    (y * w).sum()
}

#[test]
fn soft_threshold_matches_finite_differences_away_from_kinks() {
    // Scalar threshold.
    let r = gradcheck(
        |t, v| Ok(weighted_sum(t, soft_threshold(v[0], v[1])?.out)),
        &[a1(&[2.0, -0.3, -1.7, 0.9, 0.2]), arr0(0.5).into_dyn()],
        &GradcheckOptions::default(),
    )
    .unwrap();
    assert_eq!(r.compared, 6);
    // One threshold per element (the weighted Lasso).
    gradcheck(
        |t, v| Ok(weighted_sum(t, soft_threshold(v[0], v[1])?.out)),
        &[a1(&[2.0, -0.3, -1.7, 0.9]), a1(&[0.5, 0.1, 2.0, 0.4])],
        &GradcheckOptions::default(),
    )
    .unwrap();
}

#[test]
fn soft_threshold_values_and_kink_selection_per_policy() {
    for q in [0.0, 0.5, 1.0] {
        let tape = Tape::<f64>::new();
        let u = tape.param(a1(&[3.0, -1.0, 0.25, 1.0]));
        let lambda = tape.param(arr0(1.0).into_dyn());
        let s = soft_threshold(u, lambda).unwrap();
        assert_eq!(s.out.value(), a1(&[2.0, 0.0, 0.0, 0.0]));
        assert_eq!(s.site.kink_indices, vec![1, 3]);
        let policy = KinkPolicy::pytorch().with_soft_threshold(q);
        let g = s
            .out
            .sum()
            .backward_with(&BackwardOptions::policy(policy.clone()))
            .unwrap();
        assert_eq!(g.wrt(u).unwrap(), &a1(&[1.0, q, 0.0, q]));
        // d/dlambda = -sign(u) on the active side: -1 (element 0), +q (element 1), -q (element 3).
        assert_eq!(g.wrt(lambda).unwrap()[[]], -1.0 + q - q);
        // The fused op's kinks are in the ledger of the backward call.
        let rec = g.ledger().record(s.out.id()).unwrap();
        assert_eq!(
            (rec.op, rec.exact, rec.kink_indices.clone()),
            ("soft_threshold", 2, vec![1, 3])
        );
        assert_eq!(rec.selection, clarke_core::Selection::Slope(q));
        assert_eq!(g.ledger().exact_hits(), 2);
    }
}

#[test]
fn fused_kinks_take_the_band_element_selections_and_stop_gradcheck() {
    let tape = Tape::<f64>::new();
    let u = tape.param(a1(&[1.0 + 1e-10, -1.0, 3.0]));
    let lambda = tape.param(arr0(1.0).into_dyn());
    let s = soft_threshold(u, lambda).unwrap();
    // A solver band of 1e-8 makes element 0 (1e-10 from the kink) a kink too.
    let options = BackwardOptions::policy(KinkPolicy::pytorch().with_soft_threshold(0.25)).with_solver_band(1e-8);
    let g = s.out.sum().backward_with(&options).unwrap();
    assert_eq!(g.wrt(u).unwrap(), &a1(&[0.25, 0.25, 1.0]));
    let rec = g.ledger().record(s.out.id()).unwrap();
    assert_eq!((rec.exact, rec.within_solver_error), (1, 1));
    // A per-element selection wins at its element; one outside [0, 1] is refused.
    let pinned = options.clone().with_element_selection(s.out.id(), 1, 1.0);
    let g = s.out.sum().backward_with(&pinned).unwrap();
    assert_eq!(g.wrt(u).unwrap(), &a1(&[0.25, 1.0, 1.0]));
    let outside = options.with_element_selection(s.out.id(), 1, 7.0);
    assert!(s.out.sum().backward_with(&outside).is_err());
    // Gradcheck refuses to difference across the fused kink at u_1 = -lambda.
    let at_kink = [a1(&[0.5, -1.0]), arr0(1.0).into_dyn()];
    let err = gradcheck(
        |_, v| Ok(soft_threshold(v[0], v[1])?.out.sum()),
        &at_kink,
        &GradcheckOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::KinkInFiniteDifference {
                op: "soft_threshold",
                ..
            }
        ),
        "{err}"
    );
    let away = [a1(&[0.5, -2.0]), arr0(1.0).into_dyn()];
    gradcheck(
        |_, v| Ok(soft_threshold(v[0], v[1])?.out.sum()),
        &away,
        &GradcheckOptions::default(),
    )
    .unwrap();
}

#[test]
fn soft_threshold_kink_derivative_wrt_lambda_per_element() {
    let tape = Tape::<f64>::new();
    let u = tape.param(a1(&[2.0, -0.5]));
    let lambda = tape.param(a1(&[2.0, 0.5]));
    let s = soft_threshold(u, lambda).unwrap();
    let g = s
        .out
        .sum()
        .backward_with(&BackwardOptions::policy(KinkPolicy::midpoint()))
        .unwrap();
    assert_eq!(g.wrt(u).unwrap(), &a1(&[0.5, 0.5]));
    assert_eq!(g.wrt(lambda).unwrap(), &a1(&[-0.5, 0.5]));
}

#[test]
fn group_soft_threshold_finite_differences_and_kinks() {
    let groups = [0..2, 2..5, 5..6];
    gradcheck(
        |t, v| Ok(weighted_sum(t, group_soft_threshold(v[0], v[1], &groups)?.out)),
        &[a1(&[3.0, -4.0, 0.1, 0.2, -0.1, 2.5]), arr0(1.0).into_dyn()],
        &GradcheckOptions::default(),
    )
    .unwrap();
    // Group 0 has norm 5 == lambda: the kink; derivative q u u^T / lambda^2.
    for q in [0.0, 0.5, 1.0] {
        let tape = Tape::<f64>::new();
        let u = tape.param(a1(&[3.0, 4.0, 0.1]));
        let lambda = tape.param(arr0(5.0).into_dyn());
        let s = group_soft_threshold(u, lambda, &[0..2, 2..3]).unwrap();
        assert_eq!(s.site.kink_indices, vec![0]);
        assert_eq!(s.out.value(), a1(&[0.0, 0.0, 0.0]));
        let seed = a1(&[1.0, 0.0, 0.0]);
        let g = s
            .out
            .backward_with(&BackwardOptions::seed(seed).with_policy(KinkPolicy::pytorch().with_soft_threshold(q)))
            .unwrap();
        let gu = g.wrt(u).unwrap();
        assert!((gu[0] - q * 9.0 / 25.0).abs() < 1e-15);
        assert!((gu[1] - q * 12.0 / 25.0).abs() < 1e-15);
        assert_eq!(gu[2], 0.0);
        assert!((g.wrt(lambda).unwrap()[[]] - (-q * 3.0 / 5.0)).abs() < 1e-15);
    }
}

#[test]
fn simplex_and_l1_ball_finite_differences() {
    gradcheck(
        |t, v| Ok(weighted_sum(t, project_simplex(v[0], 1.0)?.out)),
        &[a1(&[0.9, 0.4, -0.3, 0.35, 0.1])],
        &GradcheckOptions::default(),
    )
    .unwrap();
    gradcheck(
        |t, v| Ok(weighted_sum(t, project_l1_ball(v[0], 1.5)?.out)),
        &[a1(&[0.9, -0.8, -0.3, 0.55, 0.1])],
        &GradcheckOptions::default(),
    )
    .unwrap();
    // Inside the ball: the identity.
    let tape = Tape::<f64>::new();
    let u = tape.param(a1(&[0.2, -0.3]));
    let x = project_l1_ball(u, 1.0).unwrap();
    assert_eq!(x.out.value(), a1(&[0.2, -0.3]));
    let g = weighted_sum(&tape, x.out).backward().unwrap();
    assert_eq!(g.wrt(u).unwrap(), &a1(&[0.3, 1.0]));
}

#[test]
fn simplex_projection_is_feasible_and_exact_at_kinks() {
    let tape = Tape::<f64>::new();
    let u = tape.param(a1(&[0.7, -2.0, 1.1, 0.3]));
    let x = project_simplex(u, 2.0).unwrap().out.value();
    assert!((x.sum() - 2.0).abs() < 1e-12 && x.iter().all(|v| *v >= 0.0));
    // u = (1, 0, -1): tau = 0, element 1 on the kink; J = D - d d^T / sum(d), d = (1, q, 0).
    for q in [0.0, 0.5, 1.0] {
        let tape = Tape::<f64>::new();
        let u = tape.param(a1(&[1.0, 0.0, -1.0]));
        let x = project_simplex(u, 1.0).unwrap();
        assert_eq!(x.site.kink_indices, vec![1]);
        let g = x
            .out
            .backward_with(&BackwardOptions::seed(a1(&[1.0, 0.0, 0.0])).with_policy(KinkPolicy::pytorch().with_relu(q)))
            .unwrap();
        let gu = g.wrt(u).unwrap();
        let expect = [1.0 - 1.0 / (1.0 + q), -q / (1.0 + q), 0.0];
        for k in 0..3 {
            assert!((gu[k] - expect[k]).abs() < 1e-15, "q {q}: {gu} vs {expect:?}");
        }
    }
}

#[test]
fn l1_ball_kink_uses_soft_threshold_selection() {
    // u = (2, -1, 0.5), radius 1: tau = 1 exactly; element 1 (|u| = tau) is at the kink.
    for q in [0.0, 0.5, 1.0] {
        let tape = Tape::<f64>::new();
        let u = tape.param(a1(&[2.0, -1.0, 0.5]));
        let x = project_l1_ball(u, 1.0).unwrap();
        assert_eq!(x.out.value(), a1(&[1.0, 0.0, 0.0]));
        assert_eq!(x.site.kink_indices, vec![1]);
        let g = x
            .out
            .backward_with(
                &BackwardOptions::seed(a1(&[0.0, 1.0, 0.0])).with_policy(KinkPolicy::pytorch().with_soft_threshold(q)),
            )
            .unwrap();
        // J = D - (d s)(d s)^T / sum d with d = (1, q, 0), s = (1, -1, 1): row 1 = (q/(1+q), q - q^2/(1+q), 0).
        let gu = g.wrt(u).unwrap();
        let expect = [q / (1.0 + q), q - q * q / (1.0 + q), 0.0];
        for k in 0..3 {
            assert!((gu[k] - expect[k]).abs() < 1e-15, "q {q}: {gu} vs {expect:?}");
        }
    }
}

#[test]
fn box_and_nonneg_record_into_the_backward_ledger() {
    let tape = Tape::<f64>::new();
    let u = tape.param(a1(&[-1.0, 0.0, 0.5, 1.0, 2.0]));
    let b = project_box(u, 0.0, 1.0).unwrap();
    assert_eq!(b.value(), a1(&[0.0, 0.0, 0.5, 1.0, 1.0]));
    let g = b
        .sum()
        .backward_with(&BackwardOptions::policy(KinkPolicy::pytorch().with_clamp(0.25, 0.75)))
        .unwrap();
    assert_eq!(g.wrt(u).unwrap(), &a1(&[0.0, 0.25, 1.0, 0.75, 0.0]));
    assert_eq!(g.ledger().exact_hits(), 2);
    let n = project_nonneg(u).unwrap();
    let g = n
        .sum()
        .backward_with(&BackwardOptions::policy(KinkPolicy::midpoint()))
        .unwrap();
    assert_eq!(g.wrt(u).unwrap(), &a1(&[0.0, 0.5, 1.0, 1.0, 1.0]));
    assert_eq!(g.ledger().exact_hits(), 1);
}

fn message(e: Error) -> String {
    e.to_string()
}

#[test]
fn bad_input_is_refused_with_the_op_and_value() {
    let tape = Tape::<f64>::new();
    let u = tape.param(a1(&[1.0, 2.0]));
    let neg = tape.param(arr0(-0.5).into_dyn());
    let m = message(soft_threshold(u, neg).unwrap_err());
    assert!(m.contains("soft_threshold") && m.contains("-0.5"), "{m}");
    let nan = tape.param(a1(&[1.0, f64::NAN]));
    let l = tape.param(arr0(0.5).into_dyn());
    let m = message(soft_threshold(nan, l).unwrap_err());
    assert!(m.contains("soft_threshold") && m.contains("NaN"), "{m}");
    let three = tape.param(a1(&[1.0, 2.0, 3.0]));
    let m = message(soft_threshold(u, three).unwrap_err());
    assert!(
        m.contains("shape mismatch") && m.contains("[2]") && m.contains("[3]"),
        "{m}"
    );
    let m = message(group_soft_threshold(three, l, &[0..1, 2..3]).unwrap_err());
    assert!(m.contains("group_soft_threshold") && m.contains("group 1"), "{m}");
    let m = message(project_simplex(u, 0.0).unwrap_err());
    assert!(m.contains("project_simplex") && m.contains("radius"), "{m}");
    let m = message(project_l1_ball(nan, 1.0).unwrap_err());
    assert!(m.contains("project_l1_ball") && m.contains("NaN"), "{m}");
    let m = message(project_box(u, 1.0, 0.0).unwrap_err());
    assert!(m.contains("project_box") && m.contains("lo = 1"), "{m}");
}

#[test]
fn soft_threshold_in_f32_hits_the_kink_exactly() {
    // (1e8 + 1) - 1e8 rounds to 0 in f32: u = lambda exactly, the selection decides.
    let tape = Tape::<f32>::new();
    let big = tape.constant(arr1(&[1e8f32]).into_dyn());
    let c = tape.param(arr1(&[1.0f32]).into_dyn());
    let u = (big + c) - big + 1.0f32;
    let lambda = tape.constant(arr0(1.0f32).into_dyn());
    let s = soft_threshold(u, lambda).unwrap();
    assert_eq!(s.site.kink_indices, vec![0]);
    for (policy, expected) in [
        (KinkPolicy::one(), 1.0),
        (KinkPolicy::midpoint(), 0.5),
        (KinkPolicy::pytorch(), 0.0),
    ] {
        let g = s.out.sum().backward_with(&BackwardOptions::policy(policy)).unwrap();
        assert_eq!(g.wrt(c).unwrap()[0], expected);
    }
}

#[test]
fn simplex_and_l1_ball_projections_of_large_inputs_are_feasible() {
    // The threshold is within the radius of the largest entry: searching it from 0 lost the
    // radius to rounding and returned the input.
    let feasible = |u: &[f64], radius: f64, l1: bool| {
        let tape = Tape::<f64>::new();
        let v = tape.param(a1(u));
        let x = if l1 {
            project_l1_ball(v, radius)
        } else {
            project_simplex(v, radius)
        }
        .unwrap()
        .out
        .value();
        let magnitude = u.iter().fold(radius, |m, v| m.max(v.abs()));
        let total: f64 = x.iter().map(|v| v.abs()).sum();
        assert!(
            (total - radius).abs() <= 1e-15 * magnitude,
            "u {u:?}: the projection {x} sums to {total}, not {radius}"
        );
        if !l1 {
            assert!(x.iter().all(|v| *v >= 0.0), "u {u:?}: {x}");
        }
        for (xi, ui) in x.iter().zip(u) {
            assert!(xi * ui >= 0.0, "u {u:?}: {x} changes a sign");
        }
        x
    };
    assert_eq!(feasible(&[1e17], 1.0, false), a1(&[1.0]));
    assert_eq!(feasible(&[1e16, 1e16], 1.0, false), a1(&[0.5, 0.5]));
    assert_eq!(feasible(&[1e17, 0.0], 1.0, true), a1(&[1.0, 0.0]));
    assert_eq!(feasible(&[0.0, -1e17], 2.0, true), a1(&[0.0, -2.0]));
    feasible(&[-3e17, 1e17, 5.0, 1e17 - 16.0], 2.5, false);
    feasible(&[3e300, -1e300, 2e300], 1e-3, false);
    feasible(&[-3e300, 1e300, 2e300], 7.0, true);
    feasible(&[1e-300, 2e-300], 1.0, false);
    // The Jacobian at [1e16, 1e16] (both active): I - 1 1^T / 2.
    let tape = Tape::<f64>::new();
    let u = tape.param(a1(&[1e16, 1e16]));
    let x = project_simplex(u, 1.0).unwrap();
    let g = x.out.backward_seeded(a1(&[1.0, 0.0])).unwrap();
    assert_eq!(g.wrt(u).unwrap(), &a1(&[0.5, -0.5]));
}
