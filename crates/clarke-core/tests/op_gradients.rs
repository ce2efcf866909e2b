//! Every op against finite differences, in f64, at seeded random points away from kinks.
//!
//! `gradcheck` compares the full Jacobian from backward with central differences and refuses
//! (rather than passing by accident) if a perturbation crosses a kink, so a pass here means
//! every entry matched.

use clarke_core::{GradcheckOptions, Result, Tape, Var, gradcheck};
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type F = for<'t> fn(&'t Tape<f64>, &[Var<'t, f64>]) -> Result<Var<'t, f64>>;

fn random(shape: &[usize], seed: u64, lo: f64, hi: f64) -> ArrayD<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.random_range(lo..hi))
}

/// Values in `[0.2, 1.5]` with a random sign: at least 0.2 away from 0, the kink of most ops.
fn away_from_zero(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        let m = rng.random_range(0.2..1.5);
        if rng.random_bool(0.5) { m } else { -m }
    })
}

fn check(name: &str, f: F, inputs: &[ArrayD<f64>]) {
    let report = gradcheck(f, inputs, &GradcheckOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(report.compared > 0, "{name}: nothing compared");
}

#[test]
fn arithmetic_with_broadcasting() {
    let cases: Vec<(&str, F, Vec<ArrayD<f64>>)> = vec![
        (
            "add 3x1 + 4",
            |_, v| v[0].try_add(v[1]),
            vec![random(&[3, 1], 1, -1.0, 1.0), random(&[4], 2, -1.0, 1.0)],
        ),
        (
            "sub 2x3 - 3",
            |_, v| v[0].try_sub(v[1]),
            vec![random(&[2, 3], 3, -1.0, 1.0), random(&[3], 4, -1.0, 1.0)],
        ),
        (
            "mul 2x3 * 2x1",
            |_, v| v[0].try_mul(v[1]),
            vec![random(&[2, 3], 5, -1.0, 1.0), random(&[2, 1], 6, -1.0, 1.0)],
        ),
        (
            "mul same",
            |_, v| v[0].try_mul(v[1]),
            vec![random(&[4, 2], 7, -1.0, 1.0), random(&[4, 2], 8, -1.0, 1.0)],
        ),
        (
            "div 3 / 0-d",
            |_, v| v[0].try_div(v[1]),
            vec![random(&[3], 9, -1.0, 1.0), random(&[], 10, 0.5, 2.0)],
        ),
        (
            "div same",
            |_, v| v[0].try_div(v[1]),
            vec![random(&[5], 11, -1.0, 1.0), random(&[5], 12, 0.5, 2.0)],
        ),
        (
            "affine",
            |_, v| Ok((v[0] * 2.5 + 1.0) - 0.5),
            vec![random(&[3], 13, -1.0, 1.0)],
        ),
        (
            "neg and rsub",
            |_, v| Ok(1.0 - (-v[0])),
            vec![random(&[3], 14, -1.0, 1.0)],
        ),
        ("scalar div", |_, v| Ok(2.0 / v[0]), vec![random(&[3], 15, 0.5, 2.0)]),
    ];
    for (name, f, inputs) in cases {
        check(name, f, &inputs);
    }
}

#[test]
fn smooth_unary_functions() {
    let cases: Vec<(&str, F, ArrayD<f64>)> = vec![
        ("exp", |_, v| Ok(v[0].exp()), random(&[4], 1, -2.0, 2.0)),
        ("log", |_, v| Ok(v[0].log()), random(&[4], 2, 0.3, 3.0)),
        ("sqrt", |_, v| Ok(v[0].sqrt()), random(&[4], 3, 0.3, 3.0)),
        ("recip", |_, v| Ok(v[0].recip()), random(&[4], 4, 0.3, 3.0)),
        ("powi 3", |_, v| Ok(v[0].powi(3)), random(&[4], 5, -2.0, 2.0)),
        ("powf 1.7", |_, v| Ok(v[0].powf(1.7)), random(&[4], 6, 0.3, 3.0)),
        ("tanh", |_, v| Ok(v[0].tanh()), random(&[4], 7, -2.0, 2.0)),
        ("sigmoid", |_, v| Ok(v[0].sigmoid()), random(&[4], 8, -4.0, 4.0)),
        ("softplus", |_, v| Ok(v[0].softplus()), random(&[4], 9, -4.0, 4.0)),
    ];
    for (name, f, input) in cases {
        check(name, f, &[input]);
    }
}

#[test]
fn sigmoid_and_softplus_are_stable_far_out() {
    fn run<S: clarke_core::Scalar>() {
        let tape = Tape::<S>::new();
        let x = tape.param(
            ArrayD::from_shape_vec(IxDyn(&[2]), vec![S::from_f64_lossy(-800.0), S::from_f64_lossy(800.0)]).unwrap(),
        );
        let y = (x.sigmoid() + x.softplus()).sum();
        assert!(y.scalar().is_finite());
        let g = y.backward().unwrap();
        let g = g.wrt(x).unwrap();
        assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
        // d/dx (sigmoid + softplus) = s(1 - s) + s: ~0 at -800, ~1 at 800.
        assert!(g[[0]].to_f64_exact().abs() < 1e-12);
        assert!((g[[1]].to_f64_exact() - 1.0).abs() < 1e-6);
    }
    run::<f32>();
    run::<f64>();
}

#[test]
fn nonsmooth_ops_away_from_kinks() {
    let cases: Vec<(&str, F, Vec<ArrayD<f64>>)> = vec![
        ("relu", |_, v| Ok(v[0].relu()), vec![away_from_zero(&[6], 1)]),
        (
            "leaky_relu",
            |_, v| Ok(v[0].leaky_relu(0.1)),
            vec![away_from_zero(&[6], 2)],
        ),
        ("abs", |_, v| Ok(v[0].abs()), vec![away_from_zero(&[6], 3)]),
        ("sign", |_, v| Ok(v[0].sign() * v[0]), vec![away_from_zero(&[6], 4)]),
        ("clamp", |_, v| v[0].try_clamp(-0.9, 0.7), vec![away_from_zero(&[8], 5)]),
        (
            "maximum",
            |_, v| v[0].try_maximum(v[1]),
            vec![away_from_zero(&[5], 6), away_from_zero(&[5], 7)],
        ),
        (
            "minimum bcast",
            |_, v| v[0].try_minimum(v[1]),
            vec![away_from_zero(&[2, 3], 8), away_from_zero(&[3], 9)],
        ),
        (
            "max_axis 0",
            |_, v| v[0].try_max_axis(0, false),
            vec![random(&[4, 3], 10, -1.0, 1.0)],
        ),
        (
            "min_axis 1 keep",
            |_, v| v[0].try_min_axis(1, true),
            vec![random(&[4, 3], 11, -1.0, 1.0)],
        ),
        (
            "max_all",
            |_, v| v[0].try_max_all(),
            vec![random(&[3, 3], 12, -1.0, 1.0)],
        ),
        ("min_all", |_, v| v[0].try_min_all(), vec![random(&[7], 13, -1.0, 1.0)]),
    ];
    for (name, f, inputs) in cases {
        check(name, f, &inputs);
    }
}

#[test]
fn matrix_products_of_every_rank_pair() {
    let cases: Vec<(&str, F, Vec<ArrayD<f64>>)> = vec![
        (
            "2x2",
            |_, v| v[0].try_matmul(v[1]),
            vec![random(&[3, 4], 1, -1.0, 1.0), random(&[4, 2], 2, -1.0, 1.0)],
        ),
        (
            "2x1",
            |_, v| v[0].try_matmul(v[1]),
            vec![random(&[3, 4], 3, -1.0, 1.0), random(&[4], 4, -1.0, 1.0)],
        ),
        (
            "1x2",
            |_, v| v[0].try_matmul(v[1]),
            vec![random(&[4], 5, -1.0, 1.0), random(&[4, 2], 6, -1.0, 1.0)],
        ),
        (
            "1x1",
            |_, v| v[0].try_matmul(v[1]),
            vec![random(&[4], 7, -1.0, 1.0), random(&[4], 8, -1.0, 1.0)],
        ),
        (
            "3x3",
            |_, v| v[0].try_matmul(v[1]),
            vec![random(&[2, 3, 4], 9, -1.0, 1.0), random(&[2, 4, 2], 10, -1.0, 1.0)],
        ),
        (
            "3x2",
            |_, v| v[0].try_matmul(v[1]),
            vec![random(&[2, 3, 4], 11, -1.0, 1.0), random(&[4, 2], 12, -1.0, 1.0)],
        ),
        (
            "transposed operands",
            |_, v| v[0].t().try_matmul(v[1].t()),
            vec![random(&[4, 3], 13, -1.0, 1.0), random(&[2, 4], 14, -1.0, 1.0)],
        ),
        (
            "permute",
            |_, v| v[0].try_permute(&[2, 0, 1]),
            vec![random(&[2, 3, 4], 15, -1.0, 1.0)],
        ),
    ];
    for (name, f, inputs) in cases {
        check(name, f, &inputs);
    }
}

#[test]
fn matmul_values_match_a_triple_loop() {
    let (a, b) = (random(&[3, 5], 1, -1.0, 1.0), random(&[5, 4], 2, -1.0, 1.0));
    let tape = Tape::<f64>::new();
    let c = tape.constant(a.clone()).matmul(tape.constant(b.clone())).value();
    for i in 0..3 {
        for j in 0..4 {
            let want: f64 = (0..5).map(|k| a[[i, k]] * b[[k, j]]).sum();
            assert!((c[[i, j]] - want).abs() < 1e-14);
        }
    }
}

#[test]
fn shape_ops_and_reductions() {
    let cases: Vec<(&str, F, Vec<ArrayD<f64>>)> = vec![
        (
            "reshape",
            |_, v| v[0].try_reshape(&[3, 2]),
            vec![random(&[2, 3], 1, -1.0, 1.0)],
        ),
        (
            "broadcast_to",
            |_, v| v[0].try_broadcast_to(&[2, 3, 4]),
            vec![random(&[3, 1], 2, -1.0, 1.0)],
        ),
        (
            "sum_axes keep",
            |_, v| v[0].try_sum_axes(&[0, 2], true),
            vec![random(&[2, 3, 2], 3, -1.0, 1.0)],
        ),
        ("sum", |_, v| Ok(v[0].sum()), vec![random(&[2, 3], 4, -1.0, 1.0)]),
        (
            "mean_axes",
            |_, v| v[0].try_mean_axes(&[1], false),
            vec![random(&[2, 3], 5, -1.0, 1.0)],
        ),
        ("mean", |_, v| Ok(v[0].mean()), vec![random(&[2, 3], 6, -1.0, 1.0)]),
        (
            "concat",
            |t, v| t.try_concat(&[v[0], v[1]], 1),
            vec![random(&[2, 3], 7, -1.0, 1.0), random(&[2, 2], 8, -1.0, 1.0)],
        ),
        (
            "stack",
            |t, v| t.try_stack(&[v[0], v[1]], 1),
            vec![random(&[2, 3], 9, -1.0, 1.0), random(&[2, 3], 10, -1.0, 1.0)],
        ),
        (
            "slice_axis",
            |_, v| v[0].try_slice_axis(1, 1..3),
            vec![random(&[2, 4], 11, -1.0, 1.0)],
        ),
        (
            "index_select repeats",
            |_, v| v[0].try_index_select(0, &[2, 0, 2, 2]),
            vec![random(&[3, 2], 12, -1.0, 1.0)],
        ),
    ];
    for (name, f, inputs) in cases {
        check(name, f, &inputs);
    }
}

#[test]
fn index_select_scatter_adds_multiplicities() {
    let tape = Tape::<f64>::new();
    let x = tape.param(random(&[3, 2], 1, -1.0, 1.0));
    let y = x.index_select(0, &[2, 0, 2, 2]).sum();
    let g = y.backward().unwrap();
    let g = g.wrt(x).unwrap();
    assert_eq!(g.as_slice().unwrap(), &[1.0, 1.0, 0.0, 0.0, 3.0, 3.0]);
}

#[test]
fn losses() {
    let cases: Vec<(&str, F, Vec<ArrayD<f64>>)> = vec![
        (
            "log_softmax",
            |_, v| v[0].try_log_softmax(1),
            vec![random(&[3, 4], 1, -2.0, 2.0)],
        ),
        (
            "softmax axis 0",
            |_, v| Ok(v[0].softmax(0)),
            vec![random(&[3, 4], 2, -2.0, 2.0)],
        ),
        (
            "cross-entropy",
            |_, v| v[0].try_softmax_cross_entropy(&[1, 3, 0]),
            vec![random(&[3, 4], 3, -2.0, 2.0)],
        ),
        (
            "mse",
            |_, v| v[0].try_mse(v[1]),
            vec![random(&[2, 3], 4, -1.0, 1.0), random(&[2, 3], 5, -1.0, 1.0)],
        ),
    ];
    for (name, f, inputs) in cases {
        check(name, f, &inputs);
    }
}

#[test]
fn loss_values_match_their_formulas() {
    let logits = random(&[3, 4], 1, -2.0, 2.0);
    let labels = [1usize, 3, 0];
    let tape = Tape::<f64>::new();
    let x = tape.constant(logits.clone());
    let lsm = x.log_softmax(1).value();
    for r in 0..3 {
        let s: f64 = (0..4).map(|c| lsm[[r, c]].exp()).sum();
        assert!((s - 1.0).abs() < 1e-12);
    }
    let ce = x.softmax_cross_entropy(&labels).scalar();
    let want: f64 = labels
        .iter()
        .enumerate()
        .map(|(r, &l)| {
            let z: f64 = (0..4).map(|c| logits[[r, c]].exp()).sum();
            z.ln() - logits[[r, l]]
        })
        .sum::<f64>()
        / 3.0;
    assert!((ce - want).abs() < 1e-12);
    let (a, b) = (random(&[5], 2, -1.0, 1.0), random(&[5], 3, -1.0, 1.0));
    let mse = tape.constant(a.clone()).mse(tape.constant(b.clone())).scalar();
    let want = a.iter().zip(b.iter()).map(|(p, q)| (p - q) * (p - q)).sum::<f64>() / 5.0;
    assert!((mse - want).abs() < 1e-14);
}
