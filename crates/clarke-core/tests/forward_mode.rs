//! Forward mode (`Tape::jvp`): every op's JVP is the transpose of its VJP (dot tests at
//! seeded random points, off and at kinks, under several policies and element selections),
//! the ledger of a JVP equals the ledger of the backward call with the same options, JVPs
//! match central differences on a small network, and bad calls are refused by name.

use clarke_core::nonsmooth;
use clarke_core::{BackwardOptions, Error, KinkPolicy, KinkScan, Result, Selection, Tape, TieRule, Var};
use ndarray::{ArrayD, ArrayViewD, IxDyn, arr1, arr2};

use crate::op_cases::{Case, F, random};

/// Tolerance of the dot tests: `|<J v, w> - <v, J^T w>| <= TOL max(|<J v, w>|, |<v, J^T w>|)`.
const TOL: f64 = 1e-12;

fn dot(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// What one dot test saw.
struct DotTest {
    /// `J v` from forward mode.
    jv: ArrayD<f64>,
    /// The tangents `v`, one per input.
    v: Vec<ArrayD<f64>>,
    /// `|<J v, w> - <v, J^T w>| / max(|<J v, w>|, |<v, J^T w>|)`.
    rel: f64,
}

/// Records `f` on `inputs` (all parameters), draws tangents `v` for every input and a seed
/// `w` shaped like the output, and checks `<J v, w> = <v, J^T w>` with forward mode and
/// backward under the same `options`, and that both calls report the same ledger.
fn dot_test(name: &str, f: F, inputs: &[ArrayD<f64>], options: &BackwardOptions<f64>, seed: u64) -> DotTest {
    let tape = Tape::<f64>::new();
    let vars: Vec<Var<'_, f64>> = inputs.iter().map(|x| tape.param(x.clone())).collect();
    let y = f(&tape, &vars).unwrap_or_else(|e| panic!("{name}: {e}"));
    let v: Vec<ArrayD<f64>> = inputs
        .iter()
        .enumerate()
        .map(|(i, x)| random(x.shape(), seed * 31 + i as u64, -1.0, 1.0))
        .collect();
    let w = random(&y.shape(), seed * 31 + 17, -1.0, 1.0);
    let pairs: Vec<(Var<'_, f64>, ArrayD<f64>)> = vars.iter().copied().zip(v.iter().cloned()).collect();
    let jvp = y.jvp(&pairs, options).unwrap_or_else(|e| panic!("{name}: jvp: {e}"));
    let grads = y
        .backward_with(&options.clone().with_seed(w.clone()))
        .unwrap_or_else(|e| panic!("{name}: backward: {e}"));
    assert_eq!(jvp.tangent().shape(), y.shape().as_slice(), "{name}: tangent shape");
    let lhs = dot(jvp.tangent(), &w);
    let rhs: f64 = vars.iter().zip(&v).map(|(x, v)| dot(v, grads.wrt(*x).unwrap())).sum();
    let scale = lhs.abs().max(rhs.abs());
    let rel = if scale == 0.0 { 0.0 } else { (lhs - rhs).abs() / scale };
    assert!(
        rel <= TOL,
        "{name}: <Jv, w> = {lhs:e}, <v, J^T w> = {rhs:e}, relative error {rel:e}"
    );
    assert!(scale > 0.0 || name.contains("zero"), "{name}: both products are 0");
    assert_eq!(jvp.ledger(), grads.ledger(), "{name}: ledgers differ");
    DotTest {
        jv: jvp.into_tangent(),
        v,
        rel,
    }
}

/// Runs the dot test on every case under the default options and returns the worst
/// relative error.
fn dot_all(cases: Vec<Case>) -> f64 {
    let mut worst = 0.0f64;
    for (k, (name, f, inputs)) in cases.into_iter().enumerate() {
        let t = dot_test(name, f, &inputs, &BackwardOptions::default(), 100 + k as u64);
        worst = worst.max(t.rel);
    }
    println!("worst dot-test relative error: {worst:e}");
    worst
}

/// Dot tests of every op off its kinks, one test per table (`dot_all` over it).
mod every_op {
    use super::dot_all;
    use crate::op_cases;

    op_cases::test_every_table!(dot_all);
}

/// The three selection regimes of the kink tests: two presets and an element selection.
fn kink_policies() -> Vec<KinkPolicy> {
    vec![KinkPolicy::pytorch(), KinkPolicy::one(), KinkPolicy::midpoint()]
}

/// Checks `J v` elementwise against `expected(v)` exactly.
fn assert_exact(name: &str, t: &DotTest, expected: &[f64]) {
    let got: Vec<f64> = t.jv.iter().copied().collect();
    assert_eq!(got, expected, "{name}");
}

#[test]
fn relu_leaky_abs_sign_at_zero_select_as_backward() {
    let x = arr1(&[-1.0, 0.0, 2.0, 0.0]).into_dyn();
    for p in kink_policies() {
        let o = BackwardOptions::policy(p.clone());
        let d = |t: &DotTest, ds: [f64; 4]| -> Vec<f64> { t.v[0].iter().zip(ds).map(|(v, d)| d * v).collect() };

        let t = dot_test("relu at 0", |_, v| Ok(v[0].relu()), std::slice::from_ref(&x), &o, 1);
        assert_exact(p.name, &t, &d(&t, [0.0, p.relu, 1.0, p.relu]));

        let s = nonsmooth::leaky_relu_slope(0.1, p.leaky_relu);
        let t = dot_test(
            "leaky_relu at 0",
            |_, v| Ok(v[0].leaky_relu(0.1)),
            std::slice::from_ref(&x),
            &o,
            2,
        );
        assert_exact(p.name, &t, &d(&t, [0.1, s, 1.0, s]));

        let t = dot_test("abs at 0", |_, v| Ok(v[0].abs()), std::slice::from_ref(&x), &o, 3);
        assert_exact(p.name, &t, &d(&t, [-1.0, p.abs, 1.0, p.abs]));

        let t = dot_test(
            "sign at 0 zero",
            |_, v| Ok(v[0].sign()),
            std::slice::from_ref(&x),
            &o,
            4,
        );
        assert_exact(p.name, &t, &d(&t, [0.0, 0.0, 0.0, 0.0]));
    }
}

#[test]
fn clamp_at_its_bounds_selects_as_backward() {
    let x = arr1(&[-1.0, 0.0, 2.0, 3.0, -2.0]).into_dyn();
    for p in kink_policies() {
        let o = BackwardOptions::policy(p.clone());
        let t = dot_test(
            "clamp at bounds",
            |_, v| v[0].try_clamp(-1.0, 2.0),
            std::slice::from_ref(&x),
            &o,
            5,
        );
        let ds = [p.clamp_low, 1.0, p.clamp_high, 0.0, 0.0];
        let expected: Vec<f64> = t.v[0].iter().zip(ds).map(|(v, d)| d * v).collect();
        assert_exact(p.name, &t, &expected);
    }
}

#[test]
fn maximum_and_minimum_ties_select_as_backward() {
    let a = arr1(&[1.0, 2.0, 3.0]).into_dyn();
    let b = arr1(&[1.0, 0.0, 3.0]).into_dyn();
    for p in kink_policies() {
        let o = BackwardOptions::policy(p.clone());
        let w = p.tie_weight;
        let t = dot_test(
            "maximum ties",
            |_, v| v[0].try_maximum(v[1]),
            &[a.clone(), b.clone()],
            &o,
            6,
        );
        let (ta, tb) = (&t.v[0], &t.v[1]);
        let tie = |i: usize| w * ta[i] + (1.0 - w) * tb[i];
        assert_exact(p.name, &t, &[tie(0), ta[1], tie(2)]);

        let t = dot_test(
            "minimum ties",
            |_, v| v[0].try_minimum(v[1]),
            &[a.clone(), b.clone()],
            &o,
            7,
        );
        let (ta, tb) = (&t.v[0], &t.v[1]);
        let tie = |i: usize| w * ta[i] + (1.0 - w) * tb[i];
        assert_exact(p.name, &t, &[tie(0), tb[1], tie(2)]);

        // Broadcasting: b = 1 ties with the first row of a, whose second row wins everywhere.
        let a2 = arr2(&[[1.0, 1.0, 1.0], [2.0, 3.0, 4.0]]).into_dyn();
        let b0 = ArrayD::from_elem(IxDyn(&[]), 1.0);
        let t = dot_test(
            "maximum broadcast ties",
            |_, v| v[0].try_maximum(v[1]),
            &[a2.clone(), b0.clone()],
            &o,
            8,
        );
        let (ta, tb) = (&t.v[0], t.v[1][[]]);
        let expected: Vec<f64> = (0..6)
            .map(|i| {
                let tai = ta.iter().nth(i).copied().unwrap();
                if i < 3 { w * tai + (1.0 - w) * tb } else { tai }
            })
            .collect();
        assert_exact(p.name, &t, &expected);
    }
}

#[test]
fn max_min_reduction_ties_follow_the_tie_rule() {
    let x = arr2(&[[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]]).into_dyn();
    for rule in [TieRule::Split, TieRule::First, TieRule::Last] {
        let o = BackwardOptions::policy(KinkPolicy::pytorch().with_reduce_tie(rule));
        let pick = |a: f64, b: f64| match rule {
            TieRule::Split => (a + b) / 2.0,
            TieRule::First => a,
            _ => b,
        };
        let t = dot_test(
            "max_axis ties",
            |_, v| v[0].try_max_axis(1, false),
            std::slice::from_ref(&x),
            &o,
            9,
        );
        let v = &t.v[0];
        assert_exact(
            &format!("{rule}"),
            &t,
            &[pick(v[[0, 1]], v[[0, 2]]), pick(v[[1, 0]], v[[1, 1]])],
        );

        let t = dot_test(
            "min_axis ties keep",
            |_, v| v[0].try_min_axis(0, true),
            std::slice::from_ref(&x),
            &o,
            10,
        );
        let v = &t.v[0];
        assert_exact(&format!("{rule}"), &t, &[v[[0, 0]], v[[1, 1]], v[[1, 2]]]);

        let t = dot_test(
            "max_all ties",
            |_, v| v[0].try_max_all(),
            std::slice::from_ref(&x),
            &o,
            11,
        );
        let v = &t.v[0];
        assert_exact(&format!("{rule}"), &t, &[pick(v[[0, 1]], v[[0, 2]])]);
    }
    // A per-op rule overrides the policy, in both modes.
    let t = dot_test(
        "max_axis with rule",
        |_, v| v[0].try_max_axis_with(1, false, TieRule::Last),
        std::slice::from_ref(&x),
        &BackwardOptions::default(),
        12,
    );
    let v = &t.v[0];
    assert_exact("override", &t, &[v[[0, 2]], v[[1, 1]]]);
}

#[test]
fn element_selections_and_overrides_apply_in_forward_mode() {
    // relu (node 1) with element 1 pinned to 0.3, element 3 by the policy; maximum (node 2)
    // with element 0 pinned to 0.25, element 2 by the policy's tie weight.
    let x = arr1(&[-1.0, 0.0, 2.0, 0.0]).into_dyn();
    let a = arr1(&[1.0, 2.0, 3.0]).into_dyn();
    let b = arr1(&[1.0, 0.0, 3.0]).into_dyn();
    for p in kink_policies() {
        let o = BackwardOptions::policy(p.clone()).with_element_selection(1, 1, 0.3);
        let t = dot_test("relu pinned", |_, v| Ok(v[0].relu()), std::slice::from_ref(&x), &o, 13);
        let v = &t.v[0];
        assert_exact(p.name, &t, &[0.0, 0.3 * v[1], v[2], p.relu * v[3]]);
        let o = BackwardOptions::policy(p.clone()).with_element_selection(2, 0, 0.25);
        let t = dot_test(
            "maximum pinned",
            |_, v| v[0].try_maximum(v[1]),
            &[a.clone(), b.clone()],
            &o,
            14,
        );
        let (ta, tb) = (&t.v[0], &t.v[1]);
        let w = p.tie_weight;
        assert_exact(
            p.name,
            &t,
            &[0.25 * ta[0] + 0.75 * tb[0], ta[1], w * ta[2] + (1.0 - w) * tb[2]],
        );
    }
    // Per-op overrides win over the policy in both modes.
    let o = BackwardOptions::policy(KinkPolicy::pytorch());
    let t = dot_test(
        "relu_with",
        |_, v| v[0].try_relu_with(0.7),
        std::slice::from_ref(&x),
        &o,
        15,
    );
    let v = &t.v[0];
    assert_exact("relu_with", &t, &[0.0, 0.7 * v[1], v[2], 0.7 * v[3]]);
    let t = dot_test(
        "clamp_with",
        |_, v| v[0].try_clamp_with(-1.0, 2.0, 0.2, 0.9),
        &[arr1(&[-1.0, 2.0]).into_dyn()],
        &o,
        16,
    );
    let v = &t.v[0];
    assert_exact("clamp_with", &t, &[0.2 * v[0], 0.9 * v[1]]);
}

#[test]
fn the_band_widens_kinks_in_both_modes() {
    // relu at 1e-9 from its kink and abs at -1e-9: treated as at the kink within a band of 1e-6.
    let x = arr1(&[1e-9, -1e-9, 0.5]).into_dyn();
    let o = BackwardOptions::policy(KinkPolicy::one()).with_solver_band(1e-6);
    let t = dot_test("relu in band", |_, v| Ok(v[0].relu() + v[0].abs()), &[x], &o, 17);
    let v = &t.v[0];
    assert_exact("band", &t, &[v[0] + v[0], v[1] + v[1], v[2] + v[2]]);
}

#[test]
fn kinks_inside_a_composite_graph_give_equal_ledgers() {
    // A small network whose pre-activations and pooled maxima sit exactly on kinks.
    let x = arr2(&[[1.0, -1.0], [0.5, 0.5]]).into_dyn();
    let w = arr2(&[[1.0, 1.0, 0.0], [1.0, 0.0, -2.0]]).into_dyn();
    for p in kink_policies() {
        let o = BackwardOptions::policy(p.clone());
        let t = dot_test(
            "composite",
            |_, v| {
                let h = v[0].try_matmul(v[1])?.relu();
                let m = h.try_max_axis(1, false)?;
                Ok(m.try_maximum(h.abs().try_min_axis(1, false)?)?.sum())
            },
            &[x.clone(), w.clone()],
            &o,
            18,
        );
        assert!(t.rel <= TOL);
    }
}

#[test]
fn unlisted_parameters_have_zero_tangent_and_their_branches_are_skipped() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[0.0, 1.0]).into_dyn());
    let z = tape.param(arr1(&[0.0, -1.0]).into_dyn());
    let y = x.exp() + z.relu(); // relu of z: at a kink, but z does not move
    let v = arr1(&[0.5, -2.0]).into_dyn();
    let jvp = y.jvp(&[(x, v.clone())], &BackwardOptions::default()).unwrap();
    let expected: Vec<f64> = [0.0f64, 1.0].iter().zip(&v).map(|(x, v)| v * x.exp()).collect();
    assert_eq!(jvp.tangent().iter().copied().collect::<Vec<_>>(), expected);
    // The relu is not between x and y: forward mode neither visits nor records it.
    assert!(jvp.ledger().records().is_empty());
    // No tangents at all: J v = 0.
    let none = y.jvp(&[], &BackwardOptions::default()).unwrap();
    assert!(none.tangent().iter().all(|&t| t == 0.0));
    assert_eq!(none.tangent().shape(), &[2]);
}

/// `(f(theta + h v) - f(theta - h v)) / 2h` for a program of the parameters `theta`.
fn central_difference(
    f: impl Fn(&[ArrayD<f64>]) -> ArrayD<f64>,
    theta: &[ArrayD<f64>],
    v: &[ArrayD<f64>],
) -> ArrayD<f64> {
    let h = 1e-6;
    let at = |s: f64| -> Vec<ArrayD<f64>> { theta.iter().zip(v).map(|(t, v)| t + &(v * s)).collect() };
    (f(&at(h)) - f(&at(-h))) / (2.0 * h)
}

/// A two-layer network: log-softmax of `tanh(relu(x W1 + b1)) W2`, and its cross-entropy.
fn mlp<'t>(tape: &'t Tape<f64>, p: &[Var<'t, f64>]) -> (Var<'t, f64>, Var<'t, f64>) {
    let x = tape.constant(random(&[4, 3], 201, -1.0, 1.0));
    let h = x.matmul(p[0]).try_add(p[1]).unwrap().relu().tanh();
    let logits = h.matmul(p[2]);
    (logits.log_softmax(1), logits.softmax_cross_entropy(&[0, 2, 1, 2]))
}

#[test]
fn jvp_matches_central_differences_on_a_small_network() {
    let theta = vec![
        random(&[3, 5], 202, -1.0, 1.0),
        random(&[5], 203, -0.5, 0.5),
        random(&[5, 3], 204, -1.0, 1.0),
    ];
    let v: Vec<ArrayD<f64>> = theta
        .iter()
        .enumerate()
        .map(|(i, t)| random(t.shape(), 210 + i as u64, -1.0, 1.0))
        .collect();
    let eval = |which: usize| {
        move |th: &[ArrayD<f64>]| {
            let tape = Tape::<f64>::new();
            let p: Vec<Var<'_, f64>> = th.iter().map(|t| tape.param(t.clone())).collect();
            let (lsm, loss) = mlp(&tape, &p);
            if which == 0 { lsm.value() } else { loss.value() }
        }
    };
    let tape = Tape::<f64>::new();
    let p: Vec<Var<'_, f64>> = theta.iter().map(|t| tape.param(t.clone())).collect();
    let (lsm, loss) = mlp(&tape, &p);
    // The relu pre-activations are away from 0, so differences do not cross a kink.
    let pre = tape.kink_ledger(None, 0.0).unwrap();
    assert!(pre.is_clean());
    let pairs: Vec<(Var<'_, f64>, ArrayD<f64>)> = p.iter().copied().zip(v.iter().cloned()).collect();
    for (which, out) in [(0, lsm), (1, loss)] {
        let jv = out.jvp(&pairs, &BackwardOptions::default()).unwrap();
        let fd = central_difference(eval(which), &theta, &v);
        for (a, n) in jv.tangent().iter().zip(&fd) {
            assert!(
                (a - n).abs() <= 1e-7 * (1.0 + n.abs()),
                "output {which}: jvp {a} vs central difference {n}"
            );
        }
    }
}

#[test]
fn refuses_a_tangent_of_the_wrong_shape() {
    let tape = Tape::<f64>::new();
    let x = tape.param(ArrayD::zeros(IxDyn(&[2, 3])));
    let y = x.exp().sum();
    let err = y
        .jvp(&[(x, ArrayD::zeros(IxDyn(&[3, 2])))], &BackwardOptions::default())
        .unwrap_err();
    match &err {
        Error::ShapeMismatch { op, lhs, rhs, detail } => {
            assert_eq!((*op, lhs.as_slice(), rhs.as_slice()), ("jvp", &[3, 2][..], &[2, 3][..]));
            assert!(detail.contains(&format!("node {}", x.id())), "{err}");
        }
        other => panic!("expected a shape mismatch, got {other}"),
    }
}

#[test]
fn refuses_foreign_vars() {
    let (t1, t2) = (Tape::<f64>::new(), Tape::<f64>::new());
    let x = t1.param(arr1(&[1.0]).into_dyn());
    let _pad = t2.param(arr1(&[1.0]).into_dyn());
    let z = t2.param(arr1(&[1.0]).into_dyn());
    let y = x.exp();
    let v = arr1(&[1.0]).into_dyn();
    assert_eq!(
        y.jvp(&[(z, v.clone())], &BackwardOptions::default()).unwrap_err(),
        Error::ForeignVar { op: "jvp", node: 1 }
    );
    assert_eq!(
        t2.jvp(y, &[(z, v)], &BackwardOptions::default()).unwrap_err(),
        Error::ForeignVar {
            op: "jvp",
            node: y.id()
        }
    );
}

#[test]
fn refuses_non_leaves_constants_duplicates_and_nan() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[1.0, 2.0, 3.0]).into_dyn());
    let c = tape.constant(arr1(&[1.0, 2.0, 3.0]).into_dyn());
    let h = x.exp();
    let y = (h * c).sum();
    let v = arr1(&[1.0, 1.0, 1.0]).into_dyn();
    let o = BackwardOptions::default();
    let msg = |r: Result<clarke_core::Jvp<f64>>| match r {
        Err(e @ Error::InvalidArgument { op: "jvp", .. }) => e.to_string(),
        other => panic!("expected an invalid argument from jvp, got {other:?}"),
    };
    let m = msg(y.jvp(&[(h, v.clone())], &o));
    assert!(
        m.contains("not a leaf") && m.contains("exp") && m.contains(&format!("node {}", h.id())),
        "{m}"
    );
    let m = msg(y.jvp(&[(c, v.clone())], &o));
    assert!(m.contains("constant"), "{m}");
    let m = msg(y.jvp(&[(x, v.clone()), (x, v.clone())], &o));
    assert!(m.contains("listed twice"), "{m}");
    let nan = arr1(&[1.0, 1.0, f64::NAN]).into_dyn();
    let m = msg(y.jvp(&[(x, nan)], &o));
    assert!(m.contains("tangent 0") && m.contains("flat index 2"), "{m}");
    // Options are checked as in backward.
    assert!(
        y.jvp(&[(x, v)], &BackwardOptions::default().with_solver_band(-1.0))
            .is_err()
    );
}

/// `x^3` elementwise, with its VJP.
fn record_cube<'t>(tape: &'t Tape<f64>, x: Var<'t, f64>) -> Var<'t, f64> {
    tape.try_custom_fn("cube", &[x], x.value().mapv(|v| v * v * v), |i, _, g| {
        Ok(vec![Some(&g * &i[0].mapv(|v| 3.0 * v * v))])
    })
    .unwrap()
}

#[test]
fn refuses_a_custom_op_without_a_forward_rule_by_name() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    let z = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    let y = record_cube(&tape, x) + z.exp();
    let v = arr1(&[1.0, 1.0]).into_dyn();
    match y.jvp(&[(x, v.clone())], &BackwardOptions::default()) {
        Err(Error::CustomOp { op, detail }) => {
            assert_eq!(op, "cube");
            assert!(detail.contains("no forward-mode rule"), "{detail}");
        }
        other => panic!("expected a custom-op error, got {other:?}"),
    }
    // Off the path of the tangents, the custom node is not visited.
    let jvp = y.jvp(&[(z, v)], &BackwardOptions::default()).unwrap();
    assert_eq!(jvp.tangent()[0], 1.0f64.exp());
}

#[test]
fn custom_ops_with_a_forward_rule_pass_the_dot_test() {
    // z = a * sin(b) with two inputs, one tangent possibly absent.
    fn product_sin<'t>(t: &'t Tape<f64>, v: &[Var<'t, f64>]) -> Result<Var<'t, f64>> {
        let value = &v[0].value() * &v[1].value().mapv(f64::sin);
        t.try_custom_fn_with_jvp(
            "a_sin_b",
            &[v[0], v[1]],
            value,
            |i, _, g| {
                Ok(vec![
                    Some(&g * &i[1].mapv(f64::sin)),
                    Some(&g * &(&i[0] * &i[1].mapv(f64::cos))),
                ])
            },
            |_, i, _, t| {
                let mut out = ArrayD::zeros(i[0].raw_dim());
                if let Some(ta) = &t[0] {
                    out = out + ta * &i[1].mapv(f64::sin);
                }
                if let Some(tb) = &t[1] {
                    out = out + &(tb * &i[0]) * &i[1].mapv(f64::cos);
                }
                Ok(out)
            },
        )
    }
    let inputs = [random(&[2, 3], 301, -1.0, 1.0), random(&[2, 3], 302, -2.0, 2.0)];
    dot_test("custom a sin b", product_sin, &inputs, &BackwardOptions::default(), 303);
    dot_test(
        "custom in a graph",
        |t, v| Ok(product_sin(t, &[v[0].tanh(), v[1]])?.sum()),
        &inputs,
        &BackwardOptions::default(),
        304,
    );
}

/// A fused relu with the nonsmooth protocol in both modes: the selection of the call's
/// policy within its band, and a ledger record.
fn fused_relu<'t>(tape: &'t Tape<f64>, x: Var<'t, f64>) -> Var<'t, f64> {
    fn derivative(ctx: &clarke_core::VjpContext<'_>, x: &ArrayViewD<'_, f64>) -> ArrayD<f64> {
        let (s, band) = (ctx.policy.relu, ctx.band());
        let mut scan = KinkScan::new(ctx.policy.tolerance, ctx.solver_band);
        for (i, &v) in x.iter().enumerate() {
            scan.visit(i, v);
        }
        ctx.report_kinks([scan.finish(ctx.node, "fused_relu", x.shape(), Selection::Slope(s), Some((0.0, 1.0)))]);
        x.mapv(|v| nonsmooth::relu_derivative(v, s, band))
    }
    let y = tape
        .try_custom_fn_ctx("fused_relu", &[x], x.value().mapv(nonsmooth::relu), |ctx, i, _, g| {
            Ok(vec![Some(&g * &derivative(ctx, &i[0]))])
        })
        .unwrap();
    tape.set_custom_jvp(y, |ctx, i, _, t| {
        Ok(t[0].as_ref().expect("one input") * &derivative(ctx, &i[0]))
    })
    .unwrap();
    y
}

#[test]
fn a_fused_nonsmooth_custom_op_selects_and_reports_as_in_backward() {
    let x = arr1(&[-1.0, 0.0, 2.0]).into_dyn();
    for p in kink_policies() {
        let o = BackwardOptions::policy(p.clone());
        let t = dot_test(
            "fused relu",
            |t, v| Ok(fused_relu(t, v[0]) * 2.0),
            std::slice::from_ref(&x),
            &o,
            401,
        );
        let v = &t.v[0];
        assert_exact(p.name, &t, &[0.0, 2.0 * (p.relu * v[1]), 2.0 * v[2]]);
    }
    // Attaching a forward rule to anything but a custom node is refused.
    let tape = Tape::<f64>::new();
    let x = tape.param(x);
    let e = x.exp();
    let rule = |_: &clarke_core::JvpContext<'_>,
                i: &[ArrayViewD<'_, f64>],
                _: ArrayViewD<'_, f64>,
                _: &[Option<ArrayViewD<'_, f64>>]| Ok(ArrayD::zeros(i[0].raw_dim()));
    assert!(matches!(
        tape.set_custom_jvp(e, rule),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        tape.set_custom_jvp(x, rule),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn a_custom_forward_rule_of_the_wrong_shape_is_refused() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    let y = record_cube(&tape, x);
    tape.set_custom_jvp(y, |_, _, _, _| Ok(ArrayD::zeros(IxDyn(&[3]))))
        .unwrap();
    match y.jvp(&[(x, arr1(&[1.0, 1.0]).into_dyn())], &BackwardOptions::default()) {
        Err(Error::CustomOp { op, detail }) => assert!(op == "cube" && detail.contains("shape"), "{detail}"),
        other => panic!("expected a custom-op error, got {other:?}"),
    }
}
