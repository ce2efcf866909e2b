//! Properties over random shapes and values (proptest).

use clarke_core::{BackwardOptions, KinkPolicy, Tape};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;

/// Values on a coarse grid so that exact zeros and ties actually occur.
fn grid_values(n: usize) -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec((-4i32..=4).prop_map(|k| f64::from(k) * 0.5), n)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// relu(x) - relu(-x) is x; its AD gradient is 1 off 0 and exactly 2 relu'(0) at 0.
    #[test]
    fn relu_difference_is_identity_with_kinks_at_zero(values in grid_values(12), s in 0.0f64..=1.0) {
        let tape = Tape::<f64>::new();
        let x = tape.param(ArrayD::from_shape_vec(IxDyn(&[12]), values.clone()).unwrap());
        let y = x.relu() - (-x).relu();
        prop_assert_eq!(y.value(), x.value());
        let g = y.sum().backward_with(&BackwardOptions::policy(KinkPolicy::pytorch().with_relu(s))).unwrap();
        for (gi, vi) in g.wrt(x).unwrap().iter().zip(&values) {
            let want = if *vi == 0.0 { 2.0 * s } else { 1.0 };
            prop_assert_eq!(*gi, want);
        }
        let zeros = values.iter().filter(|v| **v == 0.0).count();
        prop_assert_eq!(g.ledger().exact_hits(), 2 * zeros);
    }

    /// maximum(a, b) + minimum(a, b) = a + b, yet at a tie both ops send the share w to `a`:
    /// AD returns (2w, 2 - 2w) there (a spurious program, like relu2), (1, 1) elsewhere.
    #[test]
    fn max_plus_min_is_spurious_at_ties(a in grid_values(9), b in grid_values(9), w in 0.0f64..=1.0) {
        let tape = Tape::<f64>::new();
        let av = tape.param(ArrayD::from_shape_vec(IxDyn(&[3, 3]), a).unwrap());
        let bv = tape.param(ArrayD::from_shape_vec(IxDyn(&[3, 3]), b).unwrap());
        let y = (av.maximum(bv) + av.minimum(bv)).sum();
        let g = y.backward_with(&BackwardOptions::policy(KinkPolicy::pytorch().with_tie_weight(w))).unwrap();
        let (ga, gb) = (g.wrt(av).unwrap(), g.wrt(bv).unwrap());
        for ((x, y), (p, q)) in av.value().iter().zip(bv.value().iter()).zip(ga.iter().zip(gb.iter())) {
            let (want_a, want_b) = if x == y { (2.0 * w, 2.0 - 2.0 * w) } else { (1.0, 1.0) };
            prop_assert!((p - want_a).abs() < 1e-15 && (q - want_b).abs() < 1e-15);
        }
    }

    /// Broadcasting add: each operand's gradient has its own shape and sums the seed over
    /// the broadcast axes.
    #[test]
    fn broadcast_gradients_reduce_to_operand_shapes(rows in 1usize..5, cols in 1usize..5) {
        let tape = Tape::<f64>::new();
        let a = tape.param(ArrayD::ones(IxDyn(&[rows, 1])));
        let b = tape.param(ArrayD::ones(IxDyn(&[cols])));
        let g = (a + b).sum().backward().unwrap();
        prop_assert_eq!(g.wrt(a).unwrap().shape(), &[rows, 1]);
        prop_assert!(g.wrt(a).unwrap().iter().all(|&v| v == cols as f64));
        prop_assert!(g.wrt(b).unwrap().iter().all(|&v| v == rows as f64));
    }
}
