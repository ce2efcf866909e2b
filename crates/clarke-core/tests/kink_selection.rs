//! Exact derivatives at kinks under several policies, per-op overrides, per-backward
//! re-runs, the ledger, and the hull check.

use clarke_core::{BackwardOptions, Error, KinkPolicy, Tape, TieRule, Var};
use ndarray::{ArrayD, arr0, arr1};

/// d(sum(seed * f(x)))/dx for a single-input program, under `policy`.
fn grad1(x: ArrayD<f64>, seed: f64, policy: &KinkPolicy, f: impl for<'t> Fn(Var<'t, f64>) -> Var<'t, f64>) -> Vec<f64> {
    let tape = Tape::<f64>::new();
    let xv = tape.param(x);
    let y = f(xv);
    let s = ArrayD::from_elem(y.shape(), seed);
    let g = y
        .backward_with(&BackwardOptions::seed(s).with_policy(policy.clone()))
        .unwrap();
    g.wrt(xv).unwrap().iter().copied().collect()
}

fn policies() -> Vec<KinkPolicy> {
    vec![
        KinkPolicy::pytorch(),
        KinkPolicy::jax(),
        KinkPolicy::tensorflow(),
        KinkPolicy::midpoint(),
        KinkPolicy::one(),
    ]
}

#[test]
fn relu_leaky_abs_sign_at_zero_follow_the_policy() {
    let x = arr1(&[-1.0, 0.0, 2.0]).into_dyn();
    for p in policies() {
        assert_eq!(
            grad1(x.clone(), 3.0, &p, |v| v.relu()),
            vec![0.0, 3.0 * p.relu, 3.0],
            "{}",
            p.name
        );
        let slope = 0.1 + p.leaky_relu * 0.9;
        assert_eq!(
            grad1(x.clone(), 3.0, &p, |v| v.leaky_relu(0.1)),
            vec![3.0 * 0.1, 3.0 * slope, 3.0],
            "{}",
            p.name
        );
        assert_eq!(
            grad1(x.clone(), 3.0, &p, |v| v.abs()),
            vec![-3.0, 3.0 * p.abs, 3.0],
            "{}",
            p.name
        );
        assert_eq!(
            grad1(x.clone(), 3.0, &p, |v| v.sign()),
            vec![0.0, 0.0, 0.0],
            "{}",
            p.name
        );
    }
    // Named values: PyTorch relu'(0) = 0, JAX abs'(0) = 1, midpoint relu'(0) = 1/2.
    assert_eq!(
        grad1(arr0(0.0).into_dyn(), 1.0, &KinkPolicy::jax(), |v| v.abs()),
        vec![1.0]
    );
    assert_eq!(
        grad1(arr0(0.0).into_dyn(), 1.0, &KinkPolicy::midpoint(), |v| v.relu()),
        vec![0.5]
    );
}

#[test]
fn clamp_at_its_bounds() {
    let x = arr1(&[-2.0, -1.0, 0.0, 1.0, 2.0]).into_dyn();
    for p in policies() {
        let g = grad1(x.clone(), 2.0, &p, |v| v.clamp(-1.0, 1.0));
        assert_eq!(
            g,
            vec![0.0, 2.0 * p.clamp_low, 2.0, 2.0 * p.clamp_high, 0.0],
            "{}",
            p.name
        );
    }
    let custom = KinkPolicy::pytorch().with_clamp(0.25, 0.75);
    assert_eq!(
        grad1(x, 1.0, &custom, |v| v.clamp(-1.0, 1.0)),
        vec![0.0, 0.25, 1.0, 0.75, 0.0]
    );
}

#[test]
fn maximum_and_minimum_ties_split_by_the_tie_weight() {
    for p in policies() {
        for is_max in [true, false] {
            let tape = Tape::<f64>::new();
            let a = tape.param(arr1(&[1.0, 2.0, 3.0]).into_dyn());
            let b = tape.param(arr1(&[1.0, 5.0, 0.0]).into_dyn());
            let y = if is_max { a.maximum(b) } else { a.minimum(b) };
            let g = y
                .backward_with(&BackwardOptions::seed(arr1(&[4.0, 4.0, 4.0]).into_dyn()).with_policy(p.clone()))
                .unwrap();
            let (ga, gb) = (g.wrt(a).unwrap(), g.wrt(b).unwrap());
            let w = p.tie_weight;
            let (win_a, win_b) = if is_max {
                ((0.0, 4.0), (4.0, 0.0))
            } else {
                ((4.0, 0.0), (0.0, 4.0))
            };
            assert_eq!(
                ga.as_slice().unwrap(),
                &[4.0 * w, win_a.0, win_a.1],
                "{} max={is_max}",
                p.name
            );
            assert_eq!(
                gb.as_slice().unwrap(),
                &[4.0 * (1.0 - w), win_b.0, win_b.1],
                "{} max={is_max}",
                p.name
            );
            assert_eq!(g.ledger().record(y.id()).unwrap().kink_indices, vec![0]);
        }
    }
}

#[test]
fn reduction_tie_rules() {
    let x = arr1(&[1.0, 3.0, 0.0, 3.0]).into_dyn();
    let run = |p: &KinkPolicy| grad1(x.clone(), 6.0, p, |v| v.max_all());
    assert_eq!(run(&KinkPolicy::pytorch()), vec![0.0, 3.0, 0.0, 3.0]);
    assert_eq!(
        run(&KinkPolicy::pytorch().with_reduce_tie(TieRule::First)),
        vec![0.0, 6.0, 0.0, 0.0]
    );
    assert_eq!(
        run(&KinkPolicy::pytorch().with_reduce_tie(TieRule::Last)),
        vec![0.0, 0.0, 0.0, 6.0]
    );
    assert_eq!(
        run(&KinkPolicy::pytorch().with_reduce_tie(TieRule::All).allow_outside_hull()),
        vec![0.0, 6.0, 0.0, 6.0]
    );
    // Along an axis, with and without keep_dims: only the tied row spreads.
    let m = ndarray::arr2(&[[1.0, 1.0], [2.0, 0.0]]).into_dyn();
    for keep in [false, true] {
        let g = grad1(m.clone(), 1.0, &KinkPolicy::pytorch(), |v| v.min_axis(1, keep));
        assert_eq!(g, vec![0.5, 0.5, 0.0, 1.0], "keep_dims={keep}");
    }
}

#[test]
fn outside_the_hull_needs_an_explicit_opt_in() {
    match Tape::<f64>::with_policy(KinkPolicy::pytorch().with_relu(-50.0)) {
        Err(Error::InvalidSelection { op, value, .. }) => {
            assert_eq!(op, "relu'(0)");
            assert_eq!(value, -50.0);
        }
        other => panic!("expected InvalidSelection, got {other:?}"),
    }
    assert!(matches!(
        Tape::<f64>::with_policy(KinkPolicy::pytorch().with_relu(f64::NAN)),
        Err(Error::InvalidSelection { .. })
    ));
    assert!(matches!(
        Tape::<f64>::with_policy(KinkPolicy::pytorch().with_reduce_tie(TieRule::All)),
        Err(Error::InvalidSelection { .. })
    ));
    let tape = Tape::<f64>::new();
    let x = tape.param(arr0(0.0).into_dyn());
    assert!(matches!(x.try_relu_with(-50.0), Err(Error::InvalidSelection { .. })));
    // A backward policy is validated too.
    let y = x.relu();
    assert!(
        y.backward_with(&BackwardOptions::policy(KinkPolicy::pytorch().with_abs(2.0)))
            .is_err()
    );
    // With the opt-in, relu'(0) = -50 multiplies the upstream gradient.
    let bertoin = KinkPolicy::pytorch().with_relu(-50.0).allow_outside_hull();
    assert_eq!(grad1(arr0(0.0).into_dyn(), 3.0, &bertoin, |v| v.relu()), vec![-150.0]);
}

#[test]
fn per_op_overrides_win_and_are_marked_in_the_ledger() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[0.0, 0.0]).into_dyn());
    let a = x.relu_with(1.0);
    let b = x.try_abs_with(-0.5).unwrap();
    let y = (a + b).sum();
    for p in policies() {
        let g = y.backward_with(&BackwardOptions::policy(p.clone())).unwrap();
        assert_eq!(g.wrt(x).unwrap().as_slice().unwrap(), &[0.5, 0.5], "{}", p.name);
        let rec = g.ledger().record(a.id()).unwrap();
        assert!(rec.overridden);
        assert_eq!(rec.exact, 2);
    }
    let tape = Tape::<f64>::new();
    let p = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    let q = tape.param(arr1(&[1.0, 1.0]).into_dyn());
    let m = p.try_maximum_with(q, 0.0).unwrap().sum();
    let g = m.backward().unwrap();
    assert_eq!(g.wrt(p).unwrap().as_slice().unwrap(), &[0.0, 1.0]);
    assert_eq!(g.wrt(q).unwrap().as_slice().unwrap(), &[1.0, 0.0]);
    let c = p.try_clamp_with(1.0, 2.0, 0.0, 0.0).unwrap().sum();
    assert_eq!(c.backward().unwrap().wrt(p).unwrap().as_slice().unwrap(), &[0.0, 0.0]);
    let r = p.try_max_axis_with(0, false, TieRule::Last).unwrap();
    assert_eq!(r.backward().unwrap().wrt(p).unwrap().as_slice().unwrap(), &[0.0, 1.0]);
}

#[test]
fn one_recording_many_policies() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[0.0, -1.0, 0.0]).into_dyn());
    let y = (x.relu() + x.abs()).sum();
    let mut seen = Vec::new();
    for s in [0.0, 0.25, 1.0] {
        let p = KinkPolicy::pytorch().with_relu(s).with_abs(-s);
        let g = y.backward_with(&BackwardOptions::policy(p)).unwrap();
        seen.push(g.wrt(x).unwrap()[[0]]);
        assert_eq!(g.ledger().exact_hits(), 4);
    }
    assert_eq!(seen, vec![0.0, 0.0, 0.0]); // relu'(0) + abs'(0) = s - s
    // The tape's own policy is used when the call names none.
    tape.set_policy(KinkPolicy::one()).unwrap();
    assert_eq!(
        y.backward().unwrap().wrt(x).unwrap().as_slice().unwrap(),
        &[2.0, -1.0, 2.0]
    );
}

#[test]
fn ledger_counts_tolerance_summary_and_tape_scan() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[0.0, 1e-4, -5e-4, 0.5, 0.0]).into_dyn());
    let y = x.relu().sum();
    let tol = KinkPolicy::pytorch().with_tolerance(1e-3).with_relu(0.5);
    let g_tol = y.backward_with(&BackwardOptions::policy(tol.clone())).unwrap();
    let g = y.backward().unwrap();
    // Inside the band the selection applies: 0.5 at the two exact and the two near kinks.
    assert_eq!(g_tol.wrt(x).unwrap().as_slice().unwrap(), &[0.5, 0.5, 0.5, 1.0, 0.5]);
    assert_eq!(g.wrt(x).unwrap().as_slice().unwrap(), &[0.0, 1.0, 0.0, 1.0, 0.0]);
    let rec = g_tol.ledger().records()[0].clone();
    assert_eq!((rec.op, rec.elements, rec.exact, rec.near), ("relu", 5, 2, 2));
    assert_eq!(rec.kink_indices, vec![0, 1, 2, 4]);
    assert_eq!(rec.max_distance, 5e-4);
    assert_eq!(g.ledger().near_hits(), 0);
    // A modified preset is not reported under the preset's name.
    assert_eq!(g_tol.ledger().policy, "custom (pytorch with relu'(0)=0.5, tol=0.001)");
    assert_eq!(g.ledger().policy, "pytorch");
    let summary = g_tol.ledger().summary();
    assert!(
        summary.contains("2 exact") && summary.contains("2 near") && summary.contains("relu#"),
        "{summary}"
    );
    assert!(!g.ledger().is_clean());
    // Without backward.
    let scan = tape.kink_ledger(None, 0.0).unwrap();
    assert_eq!(scan.exact_hits(), 2);
    // A solver band beyond the tolerance: the elements in it are "within solver error".
    let banded = y
        .backward_with(&BackwardOptions::policy(KinkPolicy::one()).with_solver_band(2e-4))
        .unwrap();
    let rec = &banded.ledger().records()[0];
    assert_eq!((rec.exact, rec.near, rec.within_solver_error), (2, 0, 1));
    assert_eq!(rec.kink_indices, vec![0, 1, 4]);
    assert_eq!(rec.solver_band, 2e-4);
    assert_eq!(banded.wrt(x).unwrap().as_slice().unwrap(), &[1.0, 1.0, 0.0, 1.0, 1.0]);
    assert!(banded.ledger().summary().contains("1 within solver error"));
    // An invalid policy or band is refused by the scan.
    assert!(
        tape.kink_ledger(Some(&KinkPolicy::pytorch().with_relu(5.0)), 0.0)
            .is_err()
    );
    assert!(tape.kink_ledger(None, f64::NAN).is_err());
    // A clean point.
    let t2 = Tape::<f64>::new();
    let z = t2.param(arr1(&[1.0, -1.0]).into_dyn());
    assert!(z.relu().sum().backward().unwrap().ledger().is_clean());
}

#[test]
fn band_selects_for_every_core_nonsmooth_op() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[1e-9, -1e-9, 0.3]).into_dyn());
    let b = tape.param(arr1(&[0.0, 0.0, 0.3 + 1e-9]).into_dyn());
    let opts = |p: KinkPolicy| BackwardOptions::policy(p).with_solver_band(1e-8);
    let g = x
        .abs()
        .sum()
        .backward_with(&opts(KinkPolicy::pytorch().with_abs(0.25)))
        .unwrap();
    assert_eq!(g.wrt(x).unwrap().as_slice().unwrap(), &[0.25, 0.25, 1.0]);
    let g = x.leaky_relu(0.1).sum().backward_with(&opts(KinkPolicy::one())).unwrap();
    assert_eq!(g.wrt(x).unwrap().as_slice().unwrap(), &[1.0, 1.0, 1.0]);
    let g = x
        .clamp(0.0, 0.3)
        .sum()
        .backward_with(&opts(KinkPolicy::min_norm()))
        .unwrap();
    assert_eq!(g.wrt(x).unwrap().as_slice().unwrap(), &[0.0, 0.0, 0.0]);
    // Ties within the band split by the tie weight.
    let g = x
        .maximum(b)
        .sum()
        .backward_with(&opts(KinkPolicy::pytorch().with_tie_weight(0.25)))
        .unwrap();
    assert_eq!(g.wrt(x).unwrap().as_slice().unwrap(), &[0.25, 0.25, 0.25]);
    assert_eq!(g.wrt(b).unwrap().as_slice().unwrap(), &[0.75, 0.75, 0.75]);
    let g = x
        .minimum(b)
        .sum()
        .backward_with(&opts(KinkPolicy::pytorch().with_tie_weight(0.25)))
        .unwrap();
    assert_eq!(g.wrt(x).unwrap().as_slice().unwrap(), &[0.25, 0.25, 0.25]);
    // A reduction whose runner-up is within the band splits the gradient.
    let m = tape.param(arr1(&[2.0, 2.0 - 1e-9, 1.0]).into_dyn());
    let g = m.max_all().backward_with(&opts(KinkPolicy::pytorch())).unwrap();
    assert_eq!(g.wrt(m).unwrap().as_slice().unwrap(), &[0.5, 0.5, 0.0]);
    assert_eq!(g.ledger().solver_error_hits(), 1);
    // NaN is never at a kink, in the value or the derivative.
    let n = tape.param(arr1(&[f64::NAN]).into_dyn());
    let r = n.relu();
    assert!(r.value()[0].is_nan());
    let g = r.sum().backward_with(&opts(KinkPolicy::one())).unwrap();
    assert_eq!(g.wrt(n).unwrap()[0], 0.0);
    assert!(g.ledger().is_clean());
}

#[test]
fn element_selection_outside_the_hull_is_refused() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[0.0]).into_dyn());
    let y = x.relu();
    let out = y.sum();
    let bad = BackwardOptions::default().with_element_selection(y.id(), 0, -50.0);
    assert!(matches!(
        out.backward_with(&bad),
        Err(Error::InvalidSelection { op: "relu", .. })
    ));
    let opted = bad.with_policy(KinkPolicy::pytorch().allow_outside_hull());
    assert_eq!(out.backward_with(&opted).unwrap().wrt(x).unwrap()[0], -50.0);
    let missing = BackwardOptions::default().with_element_selection(99, 0, 0.5);
    assert!(out.backward_with(&missing).is_err());
}

#[test]
fn presets_by_name() {
    for name in KinkPolicy::PRESETS {
        let p = KinkPolicy::preset(name).unwrap();
        p.validate().unwrap();
        assert_eq!(&p.name, name);
    }
    assert!(matches!(
        KinkPolicy::preset("caffe"),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn clamp_with_reversed_bounds_is_an_error() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[0.0]).into_dyn());
    assert!(matches!(
        x.try_clamp(1.0, -1.0),
        Err(Error::InvalidArgument { op: "clamp", .. })
    ));
    assert!(x.try_clamp(f64::NAN, 1.0).is_err());
}

/// relu and abs fold their kink scan into the gradient pass when the band is empty; with a
/// band too narrow to reach any nonzero input, the two-pass rule runs instead. Both must
/// give the same gradients to the bit (zeros of both signs, NaN inputs, infinite and NaN
/// upstream values) and the same kink elements.
#[test]
fn the_one_pass_relu_and_abs_match_the_two_pass_rule_to_the_bit() {
    let inf = f64::INFINITY;
    let x = arr1(&[1.5, -2.0, 0.0, -0.0, f64::NAN, 3.0, -1e-300, 0.0, 7.0, -4.0]).into_dyn();
    let seed = arr1(&[2.0, inf, 3.0, -1.0, 5.0, f64::NAN, 1.0, inf, -inf, 0.5]).into_dyn();
    type Pick = for<'t> fn(Var<'t, f64>) -> Var<'t, f64>;
    let ops: [(&str, Pick); 2] = [("relu", |v| v.relu()), ("abs", |v| v.abs())];
    for (name, f) in ops {
        for policy in policies() {
            let run = |band: f64| {
                let tape = Tape::<f64>::new();
                let xv = tape.param(x.clone());
                let options = BackwardOptions::seed(seed.clone())
                    .with_policy(policy.clone())
                    .with_solver_band(band);
                let grads = f(xv).backward_with(&options).unwrap();
                let g: Vec<u64> = grads.wrt(xv).unwrap().iter().map(|g| g.to_bits()).collect();
                let record = grads.ledger().records().iter().find(|r| r.op == name).unwrap().clone();
                (g, record.kink_indices, record.exact, record.elements)
            };
            let fused = run(0.0);
            let two_pass = run(1e-320);
            assert_eq!(fused, two_pass, "{name} under {}", policy.name);
            assert_eq!(fused.1, vec![2, 3, 7], "{name}");
            assert_eq!((fused.2, fused.3), (3, 10), "{name}");
        }
    }
}
