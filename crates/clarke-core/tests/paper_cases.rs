//! Exact values from the paper digest: table T1 (spurious AD outputs at 0 for several
//! relu'(0)) and T2 (the precision-dependent kink hit).

use clarke_core::{BackwardOptions, KinkPolicy, Tape, Var};
use ndarray::{ArrayD, arr0};

type Program = for<'t> fn(Var<'t, f64>) -> Var<'t, f64>;

/// (name, program, AD output at 0 as a function of s = relu'(0), true derivative off 0).
type Row = (&'static str, Program, fn(f64) -> f64, fn(f64) -> f64);

fn relu2(t: Var<'_, f64>) -> Var<'_, f64> {
    (-t).relu() + t
}
fn relu3(t: Var<'_, f64>) -> Var<'_, f64> {
    (t.relu() + relu2(t)) * 0.5
}
fn zero(t: Var<'_, f64>) -> Var<'_, f64> {
    relu2(t) - t.relu()
}
fn id_minus_zero(t: Var<'_, f64>) -> Var<'_, f64> {
    t - zero(t)
}
fn relu_minus_relu(t: Var<'_, f64>) -> Var<'_, f64> {
    t.relu() - (-t).relu()
}

fn table() -> Vec<Row> {
    vec![
        ("relu2", relu2, |s| 1.0 - s, |t| if t > 0.0 { 1.0 } else { 0.0 }),
        ("relu3", relu3, |_| 0.5, |t| if t > 0.0 { 1.0 } else { 0.0 }),
        ("zero", zero, |s| 1.0 - 2.0 * s, |_| 0.0),
        ("t - zero(t)", id_minus_zero, |s| 2.0 * s, |_| 1.0),
        ("relu(t) - relu(-t)", relu_minus_relu, |s| 2.0 * s, |_| 1.0),
    ]
}

fn derivative_at(program: Program, t: f64, policy: &KinkPolicy) -> (f64, usize) {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr0(t).into_dyn());
    let y = program(x);
    let grads = y.backward_with(&BackwardOptions::policy(policy.clone())).unwrap();
    (grads.wrt(x).unwrap()[[]], grads.ledger().exact_hits())
}

#[test]
fn t1_spurious_outputs_at_zero_are_exact_for_each_selection() {
    for s in [0.0, 0.5, 1.0] {
        let policy = KinkPolicy::pytorch().with_relu(s);
        for (name, program, expected, _) in table() {
            let (d, hits) = derivative_at(program, 0.0, &policy);
            assert_eq!(d, expected(s), "{name} at 0 with relu'(0) = {s}");
            assert!(hits >= 1, "{name}: the ledger must report the kink");
        }
    }
}

#[test]
fn t1_digest_columns_s0_and_s1() {
    let expect = [(1.0, 0.0), (0.5, 0.5), (1.0, -1.0), (0.0, 2.0), (0.0, 2.0)];
    for ((name, program, _, _), (at0, at1)) in table().into_iter().zip(expect) {
        assert_eq!(
            derivative_at(program, 0.0, &KinkPolicy::pytorch()).0,
            at0,
            "{name}, s = 0"
        );
        assert_eq!(derivative_at(program, 0.0, &KinkPolicy::one()).0, at1, "{name}, s = 1");
    }
}

#[test]
fn t1_away_from_zero_every_program_has_its_true_derivative_and_no_kink() {
    for t in [-1.5, -1e-3, 2e-3, 0.7] {
        for s in [0.0, 0.5, 1.0] {
            for (name, program, _, truth) in table() {
                let (d, hits) = derivative_at(program, t, &KinkPolicy::pytorch().with_relu(s));
                assert_eq!(d, truth(t), "{name} at {t}");
                assert_eq!(hits, 0, "{name} at {t}: no kink");
            }
        }
    }
}

#[test]
fn t1_one_recording_replayed_under_three_policies() {
    let tape = Tape::<f64>::new();
    let t = tape.param(arr0(0.0).into_dyn());
    let y = id_minus_zero(t);
    for s in [0.0, 0.5, 1.0] {
        let g = y
            .backward_with(&BackwardOptions::policy(KinkPolicy::pytorch().with_relu(s)))
            .unwrap();
        assert_eq!(g.wrt(t).unwrap()[[]], 2.0 * s);
    }
}

fn t2<S: clarke_core::Scalar>(s: f64) -> (f64, usize) {
    let tape = Tape::<S>::with_policy(KinkPolicy::pytorch().with_relu(s)).unwrap();
    let a = tape.constant(ArrayD::from_elem(ndarray::IxDyn(&[]), S::from_f64_lossy(1e8)));
    let c = tape.param(ArrayD::from_elem(ndarray::IxDyn(&[]), S::one()));
    let y = ((a + c) - a).relu();
    let g = y.backward().unwrap();
    (g.wrt(c).unwrap()[[]].to_f64_exact(), g.ledger().exact_hits())
}

#[test]
fn t2_precision_dependent_kink_hit() {
    for s in [0.0, 0.5, 1.0] {
        assert_eq!(
            t2::<f32>(s),
            (s, 1),
            "f32: (1e8 + 1) - 1e8 == 0, derivative is the selection"
        );
        assert_eq!(t2::<f64>(s), (1.0, 0), "f64: the difference is 1, no kink");
    }
}

#[test]
fn element_selections_pick_the_derivative_of_single_kink_elements() {
    use ndarray::arr1;
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[0.0, 0.0, 2.0, -1.0]).into_dyn());
    let y = x.relu();
    let seed = arr1(&[3.0, 3.0, 3.0, 3.0]).into_dyn();
    // Default policy: relu'(0) = 0 at both kinks.
    let g = y.backward_with(&BackwardOptions::seed(seed.clone())).unwrap();
    assert_eq!(g.wrt(x).unwrap().as_slice().unwrap(), &[0.0, 0.0, 3.0, 0.0]);
    assert_eq!(g.ledger().record(y.id()).unwrap().kink_indices, vec![0, 1]);
    // Flip only element 1; an override on a non-kink element (3) changes nothing.
    let opts = BackwardOptions::seed(seed)
        .with_element_selection(y.id(), 1, 1.0)
        .with_element_selection(y.id(), 3, 0.7);
    let g = y.backward_with(&opts).unwrap();
    assert_eq!(g.wrt(x).unwrap().as_slice().unwrap(), &[0.0, 3.0, 3.0, 0.0]);
}
