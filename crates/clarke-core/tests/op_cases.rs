//! One table of op cases at seeded random points, off kinks, shared by the properties
//! every op must have: its gradient matches central differences (`op_gradients`) and its
//! forward and reverse rules are transposes of each other (`forward_mode`).

use clarke_core::{Result, Tape, Var};
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A program of the op under test: the tape (for ops recorded on it) and the inputs.
pub type F = for<'t> fn(&'t Tape<f64>, &[Var<'t, f64>]) -> Result<Var<'t, f64>>;

/// A named case: the program and its inputs.
pub type Case = (&'static str, F, Vec<ArrayD<f64>>);

/// Uniform values in `[lo, hi)`, seeded.
pub fn random(shape: &[usize], seed: u64, lo: f64, hi: f64) -> ArrayD<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.random_range(lo..hi))
}

/// Values in `[0.2, 1.5]` with a random sign: at least 0.2 away from 0, the kink of most ops.
pub fn away_from_zero(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        let m = rng.random_range(0.2..1.5);
        if rng.random_bool(0.5) { m } else { -m }
    })
}

/// Binary arithmetic with broadcasting, affine maps with scalars, an input used twice.
pub fn arithmetic() -> Vec<Case> {
    vec![
        (
            "add 3x1 + 4",
            |_, v| v[0].try_add(v[1]),
            vec![random(&[3, 1], 1, -1.0, 1.0), random(&[4], 2, -1.0, 1.0)],
        ),
        (
            "add same",
            |_, v| v[0].try_add(v[1]),
            vec![random(&[2, 2], 1, -1.0, 1.0), random(&[2, 2], 2, -1.0, 1.0)],
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
            "mul 0-d * 2x2",
            |_, v| v[0].try_mul(v[1]),
            vec![random(&[], 7, -1.0, 1.0), random(&[2, 2], 8, -1.0, 1.0)],
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
        (
            "same input twice",
            |_, v| v[0].try_mul(v[0]),
            vec![random(&[3], 16, -1.0, 1.0)],
        ),
    ]
}

/// Every smooth elementwise function, on its domain.
pub fn unary() -> Vec<Case> {
    vec![
        ("exp", |_, v| Ok(v[0].exp()), vec![random(&[2, 3], 21, -1.0, 1.0)]),
        ("log", |_, v| Ok(v[0].log()), vec![random(&[2, 3], 22, 0.5, 2.0)]),
        ("sqrt", |_, v| Ok(v[0].sqrt()), vec![random(&[2, 3], 23, 0.5, 2.0)]),
        ("recip", |_, v| Ok(v[0].recip()), vec![away_from_zero(&[2, 3], 24)]),
        ("powi 3", |_, v| Ok(v[0].powi(3)), vec![random(&[4], 25, -1.0, 1.0)]),
        ("powi -2", |_, v| Ok(v[0].powi(-2)), vec![away_from_zero(&[4], 26)]),
        ("powi zero", |_, v| Ok(v[0].powi(0)), vec![random(&[4], 27, -1.0, 1.0)]),
        ("powf 1.7", |_, v| Ok(v[0].powf(1.7)), vec![random(&[4], 28, 0.5, 2.0)]),
        ("powf zero", |_, v| Ok(v[0].powf(0.0)), vec![random(&[4], 29, 0.5, 2.0)]),
        ("tanh", |_, v| Ok(v[0].tanh()), vec![random(&[3, 2], 30, -2.0, 2.0)]),
        (
            "sigmoid",
            |_, v| Ok(v[0].sigmoid()),
            vec![random(&[3, 2], 31, -3.0, 3.0)],
        ),
        (
            "softplus",
            |_, v| Ok(v[0].softplus()),
            vec![random(&[3, 2], 32, -3.0, 3.0)],
        ),
    ]
}

/// Every nonsmooth op, at points away from its kinks (ties in maxima have probability 0).
pub fn kink_ops_off_kinks() -> Vec<Case> {
    vec![
        ("relu", |_, v| Ok(v[0].relu()), vec![away_from_zero(&[3, 4], 41)]),
        (
            "relu_with",
            |_, v| v[0].try_relu_with(1.0),
            vec![away_from_zero(&[3, 4], 42)],
        ),
        (
            "leaky_relu",
            |_, v| Ok(v[0].leaky_relu(0.1)),
            vec![away_from_zero(&[3, 4], 43)],
        ),
        ("abs", |_, v| Ok(v[0].abs()), vec![away_from_zero(&[5], 44)]),
        ("sign", |_, v| Ok(v[0].sign() + v[0]), vec![away_from_zero(&[5], 45)]),
        (
            "clamp",
            |_, v| v[0].try_clamp(-0.7, 0.6),
            vec![away_from_zero(&[3, 3], 46)],
        ),
        (
            "maximum same shape",
            |_, v| v[0].try_maximum(v[1]),
            vec![random(&[3, 2], 47, -1.0, 1.0), random(&[3, 2], 48, -1.0, 1.0)],
        ),
        (
            "maximum 2x3 vs 3",
            |_, v| v[0].try_maximum(v[1]),
            vec![random(&[2, 3], 49, -1.0, 1.0), random(&[3], 50, -1.0, 1.0)],
        ),
        (
            "minimum 2x1 vs 1x3",
            |_, v| v[0].try_minimum(v[1]),
            vec![random(&[2, 1], 51, -1.0, 1.0), random(&[1, 3], 52, -1.0, 1.0)],
        ),
        (
            "minimum 0-d vs 4",
            |_, v| v[0].try_minimum(v[1]),
            vec![random(&[], 53, -1.0, 1.0), random(&[4], 54, -1.0, 1.0)],
        ),
        (
            "max_axis 0",
            |_, v| v[0].try_max_axis(0, false),
            vec![random(&[3, 4], 55, -1.0, 1.0)],
        ),
        (
            "max_axis 1 keep",
            |_, v| v[0].try_max_axis(1, true),
            vec![random(&[3, 4], 56, -1.0, 1.0)],
        ),
        (
            "min_axis 1",
            |_, v| v[0].try_min_axis(1, false),
            vec![random(&[2, 3, 4], 57, -1.0, 1.0)],
        ),
        (
            "min_axis 0 keep",
            |_, v| v[0].try_min_axis(0, true),
            vec![random(&[3, 4], 58, -1.0, 1.0)],
        ),
        (
            "max_all",
            |_, v| v[0].try_max_all(),
            vec![random(&[3, 4], 59, -1.0, 1.0)],
        ),
        (
            "min_all",
            |_, v| v[0].try_min_all(),
            vec![random(&[2, 2, 2], 60, -1.0, 1.0)],
        ),
    ]
}

/// Matrix products of every rank pair, transposes and permutations.
pub fn products_and_permutations() -> Vec<Case> {
    vec![
        (
            "matmul 2x2",
            |_, v| v[0].try_matmul(v[1]),
            vec![random(&[3, 4], 61, -1.0, 1.0), random(&[4, 2], 62, -1.0, 1.0)],
        ),
        (
            "matmul mat-vec",
            |_, v| v[0].try_matmul(v[1]),
            vec![random(&[3, 4], 63, -1.0, 1.0), random(&[4], 64, -1.0, 1.0)],
        ),
        (
            "matmul vec-mat",
            |_, v| v[0].try_matmul(v[1]),
            vec![random(&[4], 65, -1.0, 1.0), random(&[4, 2], 66, -1.0, 1.0)],
        ),
        (
            "matmul dot",
            |_, v| v[0].try_matmul(v[1]),
            vec![random(&[5], 67, -1.0, 1.0), random(&[5], 68, -1.0, 1.0)],
        ),
        (
            "matmul batched",
            |_, v| v[0].try_matmul(v[1]),
            vec![random(&[2, 3, 4], 69, -1.0, 1.0), random(&[2, 4, 2], 70, -1.0, 1.0)],
        ),
        (
            "matmul batched shared",
            |_, v| v[0].try_matmul(v[1]),
            vec![random(&[2, 3, 4], 71, -1.0, 1.0), random(&[4, 2], 72, -1.0, 1.0)],
        ),
        (
            "matmul of a transpose",
            |_, v| v[0].t().try_matmul(v[1]),
            vec![random(&[4, 3], 73, -1.0, 1.0), random(&[4, 2], 74, -1.0, 1.0)],
        ),
        ("transpose", |_, v| Ok(v[0].t()), vec![random(&[3, 4], 75, -1.0, 1.0)]),
        (
            "permute then exp",
            |_, v| Ok(v[0].try_permute(&[2, 0, 1])?.exp()),
            vec![random(&[2, 3, 4], 76, -1.0, 1.0)],
        ),
        (
            "permute then reshape",
            |_, v| v[0].try_permute(&[1, 0])?.try_reshape(&[6]),
            vec![random(&[2, 3], 77, -1.0, 1.0)],
        ),
        (
            "transposed operands",
            |_, v| v[0].t().try_matmul(v[1].t()),
            vec![random(&[4, 3], 78, -1.0, 1.0), random(&[2, 4], 79, -1.0, 1.0)],
        ),
        (
            "permute",
            |_, v| v[0].try_permute(&[2, 0, 1]),
            vec![random(&[2, 3, 4], 80, -1.0, 1.0)],
        ),
    ]
}

/// Reshape, broadcast, concat, stack, slice, index-select.
pub fn shape_ops() -> Vec<Case> {
    vec![
        (
            "reshape",
            |_, v| v[0].try_reshape(&[4, 3]),
            vec![random(&[2, 6], 81, -1.0, 1.0)],
        ),
        (
            "broadcast_to",
            |_, v| v[0].try_broadcast_to(&[2, 3, 4]),
            vec![random(&[3, 1], 82, -1.0, 1.0)],
        ),
        (
            "concat axis 0",
            |t, v| t.try_concat(&[v[0], v[1]], 0),
            vec![random(&[2, 3], 83, -1.0, 1.0), random(&[1, 3], 84, -1.0, 1.0)],
        ),
        (
            "concat axis 1 of three",
            |t, v| t.try_concat(&[v[0], v[1], v[2]], 1),
            vec![
                random(&[2, 1], 85, -1.0, 1.0),
                random(&[2, 3], 86, -1.0, 1.0),
                random(&[2, 2], 87, -1.0, 1.0),
            ],
        ),
        (
            "stack axis 0",
            |t, v| t.try_stack(&[v[0], v[1]], 0),
            vec![random(&[2, 3], 88, -1.0, 1.0), random(&[2, 3], 89, -1.0, 1.0)],
        ),
        (
            "stack axis 2",
            |t, v| t.try_stack(&[v[0], v[1], v[2]], 2),
            vec![
                random(&[2, 3], 90, -1.0, 1.0),
                random(&[2, 3], 91, -1.0, 1.0),
                random(&[2, 3], 92, -1.0, 1.0),
            ],
        ),
        (
            "slice_axis",
            |_, v| v[0].try_slice_axis(1, 1..3),
            vec![random(&[2, 4], 93, -1.0, 1.0)],
        ),
        (
            "index_select with repeats",
            |_, v| v[0].try_index_select(0, &[2, 0, 2, 1]),
            vec![random(&[3, 2], 94, -1.0, 1.0)],
        ),
    ]
}

/// Sums and means over everything, one axis and several.
pub fn sums_and_means() -> Vec<Case> {
    vec![
        ("sum", |_, v| Ok(v[0].sum()), vec![random(&[3, 4], 101, -1.0, 1.0)]),
        (
            "sum_axis 0",
            |_, v| Ok(v[0].sum_axis(0, false)),
            vec![random(&[3, 4], 102, -1.0, 1.0)],
        ),
        (
            "sum_axis 1 keep",
            |_, v| Ok(v[0].sum_axis(1, true)),
            vec![random(&[3, 4], 103, -1.0, 1.0)],
        ),
        (
            "sum_axes 0 2",
            |_, v| v[0].try_sum_axes(&[2, 0], false),
            vec![random(&[2, 3, 4], 104, -1.0, 1.0)],
        ),
        ("mean", |_, v| Ok(v[0].mean()), vec![random(&[3, 4], 105, -1.0, 1.0)]),
        (
            "mean_axis 1",
            |_, v| Ok(v[0].mean_axis(1, false)),
            vec![random(&[3, 4], 106, -1.0, 1.0)],
        ),
        (
            "mean_axes 1 2 keep",
            |_, v| v[0].try_mean_axes(&[1, 2], true),
            vec![random(&[2, 3, 4], 107, -1.0, 1.0)],
        ),
    ]
}

/// log-softmax, softmax, cross-entropy, mean squared error.
pub fn losses() -> Vec<Case> {
    vec![
        (
            "log_softmax 1",
            |_, v| v[0].try_log_softmax(1),
            vec![random(&[3, 4], 111, -2.0, 2.0)],
        ),
        (
            "log_softmax 0",
            |_, v| v[0].try_log_softmax(0),
            vec![random(&[3, 4], 112, -2.0, 2.0)],
        ),
        (
            "softmax",
            |_, v| Ok(v[0].softmax(1)),
            vec![random(&[2, 5], 113, -2.0, 2.0)],
        ),
        (
            "softmax_cross_entropy",
            |_, v| v[0].try_softmax_cross_entropy(&[2, 0, 1]),
            vec![random(&[3, 4], 114, -2.0, 2.0)],
        ),
        (
            "mse",
            |_, v| v[0].try_mse(v[1]),
            vec![random(&[3, 2], 115, -1.0, 1.0), random(&[3, 2], 116, -1.0, 1.0)],
        ),
    ]
}

/// One `#[test]` per table of this module, each running `$check` on the table's cases
/// (`$check: fn(Vec<Case>)`, returning anything): the properties every op must have are
/// tested over the same tables under the same names.
macro_rules! test_every_table {
    ($check:path) => {
        #[test]
        fn arithmetic_with_broadcasting() {
            $check($crate::op_cases::arithmetic());
        }

        #[test]
        fn smooth_unary_functions() {
            $check($crate::op_cases::unary());
        }

        #[test]
        fn nonsmooth_ops_away_from_kinks() {
            $check($crate::op_cases::kink_ops_off_kinks());
        }

        #[test]
        fn matrix_products_of_every_rank_pair_and_permutations() {
            $check($crate::op_cases::products_and_permutations());
        }

        #[test]
        fn shape_ops() {
            $check($crate::op_cases::shape_ops());
        }

        #[test]
        fn sums_and_means() {
            $check($crate::op_cases::sums_and_means());
        }

        #[test]
        fn losses() {
            $check($crate::op_cases::losses());
        }
    };
}

pub(crate) use test_every_table;
