//! A two-hidden-layer ReLU MLP with softmax cross-entropy: every parameter gradient against
//! central finite differences (relative 1e-6, f64), and the f32/f64 kink behaviour of a
//! whole network.

use clarke_core::{GradcheckOptions, Result, Tape, Var, gradcheck};
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SIZES: [usize; 4] = [5, 8, 6, 3];
const LABELS: [usize; 7] = [0, 2, 1, 1, 0, 2, 2];

fn random(shape: &[usize], rng: &mut ChaCha8Rng, scale: f64) -> ArrayD<f64> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.random_range(-scale..scale))
}

/// inputs: [x, W1, b1, W2, b2, W3, b3]; x is a parameter too (the check differentiates all).
fn mlp<'t>(_: &'t Tape<f64>, v: &[Var<'t, f64>]) -> Result<Var<'t, f64>> {
    let mut h = v[0];
    for l in 0..3 {
        h = h.try_matmul(v[1 + 2 * l].t())?.try_add(v[2 + 2 * l])?;
        if l < 2 {
            h = h.relu();
        }
    }
    h.try_softmax_cross_entropy(&LABELS)
}

fn inputs(seed: u64) -> Vec<ArrayD<f64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut v = vec![random(&[LABELS.len(), SIZES[0]], &mut rng, 1.0)];
    for w in SIZES.windows(2) {
        v.push(random(&[w[1], w[0]], &mut rng, 0.8));
        v.push(random(&[w[1]], &mut rng, 0.3));
    }
    v
}

#[test]
fn all_parameter_gradients_match_finite_differences() {
    let options = GradcheckOptions {
        step: 1e-6,
        rtol: 1e-6,
        atol: 1e-9,
        ..Default::default()
    };
    for seed in 0..5 {
        let report = gradcheck(mlp, &inputs(seed), &options).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let n: usize = inputs(seed).iter().map(|a| a.len()).sum();
        assert_eq!(report.compared, n, "one loss, every input element compared");
        assert_eq!(report.kink_nodes_checked, 2);
        // Every entry passed |analytic - numeric| <= 1e-9 + 1e-6 max(|analytic|, |numeric|);
        // the absolute term only matters for entries below 1e-3 in magnitude.
        assert!(report.max_abs_err < 1e-8, "seed {seed}: {report:?}");
    }
}

#[test]
fn an_exact_zero_pre_activation_is_reported_and_follows_the_selection() {
    // Make the first hidden unit's pre-activation exactly 0 for every row: zero weights, zero bias.
    let mut v = inputs(1);
    v[1].index_axis_mut(ndarray::Axis(0), 0).fill(0.0);
    v[2][[0]] = 0.0;
    let grads_at = |s: f64| {
        let tape = Tape::<f64>::with_policy(clarke_core::KinkPolicy::pytorch().with_relu(s)).unwrap();
        let vars: Vec<_> = v.iter().map(|a| tape.param(a.clone())).collect();
        let loss = mlp(&tape, &vars).unwrap();
        let g = loss.backward().unwrap();
        (g.wrt(vars[2]).unwrap()[[0]], g.ledger().exact_hits())
    };
    let (g0, hits0) = grads_at(0.0);
    let (g1, hits1) = grads_at(1.0);
    assert_eq!(g0, 0.0, "relu'(0) = 0 blocks the gradient of the dead unit's bias");
    assert!(g1 != 0.0, "relu'(0) = 1 lets it through");
    assert_eq!((hits0, hits1), (LABELS.len(), LABELS.len()));
}
