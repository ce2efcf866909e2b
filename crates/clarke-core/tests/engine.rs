//! The engine around the ops: bad input, replays, no-grad, anomalies, custom VJPs and the
//! kink-aware gradient checks.

use clarke_core::{
    BackwardOptions, CustomOp, Error, GradcheckOptions, Result, Stage, Tape, Var, gradcheck, gradcheck_direction,
};
use ndarray::{ArrayD, ArrayViewD, IxDyn, arr0, arr1, arr2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[test]
fn shape_mismatch_names_the_op_and_both_shapes() {
    let tape = Tape::<f64>::new();
    let a = tape.param(ArrayD::zeros(IxDyn(&[2, 3])));
    let b = tape.param(ArrayD::zeros(IxDyn(&[4])));
    match a.try_add(b) {
        Err(Error::ShapeMismatch { op, lhs, rhs, .. }) => assert_eq!((op, lhs, rhs), ("add", vec![2, 3], vec![4])),
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    match a.try_matmul(a) {
        Err(Error::ShapeMismatch {
            op: "matmul",
            lhs,
            rhs,
            detail,
        }) => {
            assert_eq!((lhs, rhs), (vec![2, 3], vec![2, 3]));
            assert!(detail.contains("inner dimensions"), "{detail}");
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    let c = tape.param(ArrayD::zeros(IxDyn(&[2, 2, 2, 2])));
    assert!(matches!(
        c.try_matmul(c),
        Err(Error::ShapeMismatch { op: "matmul", .. })
    ));
    assert!(matches!(
        a.try_reshape(&[5]),
        Err(Error::ShapeMismatch { op: "reshape", .. })
    ));
    assert!(matches!(
        a.try_sum_axes(&[2], false),
        Err(Error::InvalidArgument { op: "sum", .. })
    ));
    assert!(matches!(a.try_slice_axis(1, 2..4), Err(Error::InvalidArgument { .. })));
    assert!(matches!(
        a.try_index_select(0, &[2]),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        tape.try_concat(&[a, b], 0),
        Err(Error::ShapeMismatch { op: "concat", .. })
    ));
    assert!(matches!(tape.try_concat(&[], 0), Err(Error::InvalidArgument { .. })));
    assert!(matches!(
        a.try_softmax_cross_entropy(&[0, 3]),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        a.try_softmax_cross_entropy(&[0]),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(a.try_mse(b), Err(Error::ShapeMismatch { op: "mse", .. })));
    assert!(matches!(a.try_permute(&[0, 0]), Err(Error::InvalidArgument { .. })));
}

#[test]
#[should_panic(expected = "add: shape mismatch: [2, 3] vs [4]")]
fn operators_panic_with_the_same_message() {
    let tape = Tape::<f64>::new();
    let a = tape.param(ArrayD::zeros(IxDyn(&[2, 3])));
    let b = tape.param(ArrayD::zeros(IxDyn(&[4])));
    let _ = a + b;
}

#[test]
fn vars_from_another_tape_are_refused() {
    let (t1, t2) = (Tape::<f64>::new(), Tape::<f64>::new());
    let a = t1.param(arr1(&[1.0]).into_dyn());
    let b = t2.param(arr1(&[1.0]).into_dyn());
    assert!(matches!(a.try_add(b), Err(Error::ForeignVar { op: "add", .. })));
    assert!(matches!(a.try_matmul(b), Err(Error::ForeignVar { op: "matmul", .. })));
    assert!(matches!(
        t1.backward(b, &BackwardOptions::default()),
        Err(Error::ForeignVar { op: "backward", .. })
    ));
    let g = a.sum().backward().unwrap();
    assert!(matches!(g.wrt(b), Err(Error::ForeignVar { .. })));
    assert!(g.get(b).is_none());
}

#[test]
fn non_scalar_outputs_need_a_seed_of_their_shape() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[1.0, 2.0, 3.0]).into_dyn());
    let y = x * x;
    match y.backward() {
        Err(Error::NonScalarOutput { shape }) => assert_eq!(shape, vec![3]),
        other => panic!("expected NonScalarOutput, got {other:?}"),
    }
    assert!(matches!(
        y.backward_seeded(arr1(&[1.0, 1.0]).into_dyn()),
        Err(Error::ShapeMismatch { op: "backward", .. })
    ));
    // A seed gives J^T seed: d(x^2)/dx = 2x.
    let g = y.backward_seeded(arr1(&[1.0, 10.0, 100.0]).into_dyn()).unwrap();
    assert_eq!(g.wrt(x).unwrap().as_slice().unwrap(), &[2.0, 40.0, 600.0]);
}

#[test]
fn the_same_tape_replays_identically() {
    let tape = Tape::<f64>::new();
    let w = tape.param(arr2(&[[0.5, -1.0], [2.0, 0.25]]).into_dyn());
    let x = tape.constant(arr1(&[1.0, -2.0]).into_dyn());
    let y = w.matmul(x).tanh().sum();
    let first = y.backward().unwrap().wrt(w).unwrap().clone();
    for _ in 0..5 {
        assert_eq!(y.backward().unwrap().wrt(w).unwrap(), &first);
    }
}

#[test]
fn no_grad_detach_and_unused_parameters() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    let unused = tape.param(arr1(&[5.0]).into_dyn());
    let frozen = tape.no_grad(|| (x * 3.0).exp());
    assert!(!frozen.needs_grad());
    assert!(tape.grad_enabled());
    let d = x.detach();
    let y = (x * 2.0 + frozen + d).sum();
    let g = y.backward().unwrap();
    assert_eq!(g.wrt(x).unwrap().as_slice().unwrap(), &[2.0, 2.0]);
    assert_eq!(g.wrt(unused).unwrap().as_slice().unwrap(), &[0.0]);
    assert!(matches!(g.wrt(d), Err(Error::InvalidArgument { .. })));
}

#[test]
fn anomaly_mode_names_the_first_node_that_produced_a_nan() {
    let tape = Tape::<f64>::new();
    tape.set_anomaly_detection(true);
    let x = tape.param(arr1(&[-1.0, 4.0]).into_dyn());
    let l = x.log();
    let y = (l * 2.0).sum(); // later nodes are NaN too, but log produced it
    match y.backward() {
        Err(Error::NonFinite {
            stage: Stage::Forward,
            op: "log",
            node,
            count,
            index,
            ..
        }) => {
            assert_eq!((node, count, index), (l.id(), 1, 0));
        }
        other => panic!("expected NonFinite from log, got {other:?}"),
    }
    assert!(tape.anomaly().is_some());
}

#[test]
fn anomaly_mode_catches_non_finite_gradients() {
    let tape = Tape::<f64>::new();
    tape.set_anomaly_detection(true);
    let x = tape.param(arr1(&[0.0, 4.0]).into_dyn());
    let s = x.sqrt();
    let y = s.sum();
    assert!(tape.check_anomaly().is_ok(), "the values are finite");
    match y.backward() {
        Err(Error::NonFinite {
            stage: Stage::Backward,
            op: "sqrt",
            node,
            ..
        }) => assert_eq!(node, s.id()),
        other => panic!("expected a backward NonFinite from sqrt, got {other:?}"),
    }
    // Without anomaly mode the infinite gradient is returned as computed.
    let t2 = Tape::<f64>::new();
    let x2 = t2.param(arr1(&[0.0]).into_dyn());
    let g = x2.sqrt().sum().backward().unwrap();
    assert!(g.wrt(x2).unwrap()[[0]].is_infinite());
}

struct Cube;

impl CustomOp<f64> for Cube {
    fn name(&self) -> &str {
        "cube"
    }
    fn forward(&self, inputs: &[ArrayViewD<'_, f64>]) -> Result<ArrayD<f64>> {
        Ok(inputs[0].mapv(|v| v * v * v))
    }
    fn vjp(
        &self,
        inputs: &[ArrayViewD<'_, f64>],
        _output: ArrayViewD<'_, f64>,
        grad: ArrayViewD<'_, f64>,
    ) -> Result<Vec<Option<ArrayD<f64>>>> {
        Ok(vec![Some(&inputs[0].mapv(|v| 3.0 * v * v) * &grad)])
    }
}

fn custom_sin<'t>(t: &'t Tape<f64>, v: &[Var<'t, f64>]) -> Result<Var<'t, f64>> {
    let value = v[0].with_value(|a| a.mapv(f64::sin));
    t.try_custom_fn("sin", &[v[0]], value, |i, _o, g| {
        Ok(vec![Some(&i[0].mapv(f64::cos) * &g)])
    })
}

/// The VJP of x^2 should be 2 x g; this one forgets the 2.
fn square_with_wrong_vjp<'t>(t: &'t Tape<f64>, v: &[Var<'t, f64>]) -> Result<Var<'t, f64>> {
    let value = v[0].with_value(|a| a.mapv(|e| e * e));
    t.try_custom_fn("square_wrong", &[v[0]], value, |i, _o, g| Ok(vec![Some(&i[0] * &g)]))
}

#[test]
fn custom_ops_trait_and_closure_forms() {
    let x = arr1(&[0.5, -1.5, 2.0]).into_dyn();
    gradcheck(
        |t, v| Ok(t.try_custom(Cube, &[v[0]])?.sum()),
        std::slice::from_ref(&x),
        &GradcheckOptions::default(),
    )
    .unwrap();
    gradcheck(custom_sin, &[x], &GradcheckOptions::default()).unwrap();
}

/// A context-aware VJP learns which inputs need a gradient: a parameter and what depends on
/// it do, a constant does not, and nothing does past the last input. What it returns for an
/// input that needs none is dropped.
#[test]
fn custom_vjps_learn_which_inputs_need_a_gradient() {
    use std::cell::RefCell;
    use std::rc::Rc;
    let tape = Tape::<f64>::new();
    let p = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    let c = tape.constant(arr1(&[3.0, 4.0]).into_dyn());
    let q = p * 2.0;
    let seen = Rc::new(RefCell::new(Vec::new()));
    let record = Rc::clone(&seen);
    let value = arr1(&[4.0, 8.0]).into_dyn();
    let y = tape
        .try_custom_fn_ctx("sum3", &[c, q, p], value, move |ctx, _, _, g| {
            record.borrow_mut().extend((0..4).map(|i| ctx.needs_grad(i)));
            // A gradient for every input, the constant's too: backward drops that one.
            Ok(vec![Some(g.to_owned()), Some(g.to_owned()), Some(g.to_owned())])
        })
        .unwrap();
    let grads = y.sum().backward().unwrap();
    assert_eq!(*seen.borrow(), vec![false, true, true, false]);
    // d/dp of sum(c + 2p + p) = 3 per element.
    assert_eq!(grads.wrt(p).unwrap().as_slice().unwrap(), &[3.0, 3.0]);
}

#[test]
fn custom_vjps_with_wrong_shapes_or_counts_are_errors() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    let bad_shape = tape
        .try_custom_fn("bad_shape", &[x], arr1(&[1.0, 2.0]).into_dyn(), |_, _, _| {
            Ok(vec![Some(arr1(&[1.0]).into_dyn())])
        })
        .unwrap();
    match bad_shape.sum().backward() {
        Err(Error::CustomOp { op, detail }) => {
            assert_eq!(op, "bad_shape");
            assert!(detail.contains("[1]") && detail.contains("[2]"), "{detail}");
        }
        other => panic!("expected CustomOp, got {other:?}"),
    }
    let bad_count = tape
        .try_custom_fn("bad_count", &[x], arr1(&[1.0, 2.0]).into_dyn(), |_, _, _| Ok(vec![]))
        .unwrap();
    assert!(matches!(bad_count.sum().backward(), Err(Error::CustomOp { .. })));
    // A wrong VJP is caught by gradcheck.
    assert!(matches!(
        gradcheck(
            square_with_wrong_vjp,
            &[arr1(&[1.0, 2.0]).into_dyn()],
            &GradcheckOptions::default()
        ),
        Err(Error::GradientMismatch { .. })
    ));
}

#[test]
fn gradcheck_refuses_to_difference_across_a_kink() {
    fn f<'t>(_: &'t Tape<f64>, v: &[Var<'t, f64>]) -> Result<Var<'t, f64>> {
        Ok(v[0].relu().sum())
    }
    for x in [arr1(&[1.0, 0.0]), arr1(&[1.0, 1e-7])] {
        match gradcheck(f, &[x.clone().into_dyn()], &GradcheckOptions::default()) {
            Err(Error::KinkInFiniteDifference {
                op: "relu",
                input: 0,
                element: 1,
                ..
            }) => {}
            other => panic!("at {x}: expected a refusal, got {other:?}"),
        }
    }
    // Switching kink awareness off, the central difference averages the one-sided slopes
    // (1/2) and so matches no selection: the check fails instead of refusing.
    let off = GradcheckOptions {
        kink_aware: false,
        ..Default::default()
    };
    assert!(matches!(
        gradcheck(f, &[arr1(&[1.0, 0.0]).into_dyn()], &off),
        Err(Error::GradientMismatch { .. })
    ));
}

#[test]
fn direction_check_on_a_larger_input() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let w = ArrayD::from_shape_simple_fn(IxDyn(&[50, 40]), || rng.random_range(-0.2..0.2));
    let x = ArrayD::from_shape_simple_fn(IxDyn(&[40, 8]), || rng.random_range(-1.0..1.0));
    let report = gradcheck_direction(
        |_, v| Ok(v[0].try_matmul(v[1])?.tanh().sum()),
        &[w, x],
        &GradcheckOptions {
            rtol: 1e-6,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(report.compared, 1);
}

#[test]
fn zero_dimensional_values_work_throughout() {
    let tape = Tape::<f64>::new();
    let a = tape.param(arr0(2.0).into_dyn());
    let y = (a * a + a.exp()).relu();
    let g = y.backward().unwrap();
    assert!((g.wrt(a).unwrap()[[]] - (4.0 + 2f64.exp())).abs() < 1e-12);
}
