//! Bad input gives a typed error naming the op and the offending shape or value, never a
//! panic inside a `Result` function or a silently wrong value; the panicking forms point
//! at the caller's line.

use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

use clarke_core::{Error, Tape, Var};
use ndarray::arr1;

#[test]
fn reshape_to_an_overflowing_shape_is_an_error() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    let huge = (1usize << 63) + 1;
    match x.try_reshape(&[huge, 2]) {
        Err(Error::InvalidArgument { op: "reshape", detail }) => {
            assert!(detail.contains(&huge.to_string()), "{detail}")
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    // A zero-length axis does not make an unrepresentable shape representable.
    let empty = tape.param(ndarray::ArrayD::zeros(ndarray::IxDyn(&[0])));
    assert!(matches!(
        empty.try_reshape(&[0, huge, 2]),
        Err(Error::InvalidArgument { op: "reshape", .. })
    ));
    assert!(matches!(
        empty.try_broadcast_to(&[huge, 2, 0]),
        Err(Error::InvalidArgument { op: "broadcast_to", .. })
    ));
    // Concatenating or stacking empty arrays with long axes can overflow the result's shape.
    let long = empty.try_reshape(&[0, 1 << 62]).unwrap();
    assert!(matches!(
        tape.try_concat(&[long, long], 1),
        Err(Error::InvalidArgument { op: "concat", .. })
    ));
    assert!(matches!(
        tape.try_stack(&[long, long, long, long], 0),
        Err(Error::InvalidArgument { op: "stack", .. })
    ));
    // Fine shapes still work.
    assert_eq!(x.try_reshape(&[2, 1]).unwrap().shape(), vec![2, 1]);
    assert_eq!(empty.try_reshape(&[0, 5]).unwrap().shape(), vec![0, 5]);
}

#[test]
fn eval_scoped_refuses_a_var_of_another_tape() {
    let tape = Tape::<f64>::new();
    let theta = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    // The closure may return any Var that outlives it: one of a tape that lives forever.
    let other: &'static Tape<f64> = Box::leak(Box::new(Tape::new()));
    let foreign = other.param(arr1(&[7.0]).into_dyn());
    let r = tape.eval_scoped(&[theta.id()], |_, _| Ok(foreign));
    match r {
        Err(Error::ForeignVar { op, node }) => {
            assert_eq!((op, node), ("Tape::eval_scoped", foreign.id()));
        }
        other => panic!("expected ForeignVar, got {other:?}"),
    }
    // The scratch frame is still dropped, and the tape still works.
    assert_eq!(tape.len(), 1);
    let v = tape.eval_scoped(&[theta.id()], |_, th| Ok(th[0] * 2.0)).unwrap();
    assert_eq!(v, arr1(&[2.0, 4.0]).into_dyn());
}

#[test]
fn grads_know_their_tape() {
    let (t1, t2) = (Tape::<f64>::new(), Tape::<f64>::new());
    let g = t1.param(arr1(&[1.0]).into_dyn()).sum().backward().unwrap();
    assert!(g.is_from(&t1));
    assert!(!g.is_from(&t2));
}

#[test]
fn leaky_relu_with_a_nan_alpha_blames_alpha() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[0.0, 1.0]).into_dyn());
    match x.try_leaky_relu_with(f64::NAN, 0.5) {
        Err(Error::InvalidArgument { op, detail }) => {
            assert_eq!(op, "leaky_relu");
            assert!(detail.contains("alpha") && detail.contains("NaN"), "{detail}");
        }
        other => panic!("expected InvalidArgument on alpha, got {other:?}"),
    }
}

thread_local! {
    static CAPTURED: RefCell<Option<Option<(String, u32)>>> = const { RefCell::new(None) };
}

/// Runs `f`, which must panic, and returns the file and line the panic reports.
fn panic_location(f: impl FnOnce()) -> (String, u32) {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let capturing = CAPTURED.with(|c| {
                let mut c = c.borrow_mut();
                match c.as_mut() {
                    Some(slot) => {
                        *slot = info.location().map(|l| (l.file().to_string(), l.line()));
                        true
                    }
                    None => false,
                }
            });
            if !capturing {
                previous(info);
            }
        }));
    });
    CAPTURED.with(|c| *c.borrow_mut() = Some(None));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    let location = CAPTURED.with(|c| c.borrow_mut().take()).flatten();
    assert!(result.is_err(), "expected a panic");
    location.expect("the panic hook saw a location")
}
#[test]
fn panicking_forms_report_the_callers_line() {
    let tape = &Tape::<f64>::new();
    let a = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    let b = tape.param(arr1(&[1.0, 2.0, 3.0]).into_dyn());
    let other = Tape::<f64>::new();
    let c = other.param(arr1(&[1.0, 2.0]).into_dyn());
    // Each case is the line it is written on and a closure that panics on that line.
    macro_rules! case {
        ($e:expr_2021) => {
            (
                line!(),
                Box::new(move || {
                    let _ = $e;
                }) as Box<dyn FnOnce() + '_>,
            )
        };
    }
    let cases = vec![
        case!(a + b),
        case!(a - b),
        case!(a * b),
        case!(a / b),
        case!(a + c),
        case!(a.scalar()),
        case!(a.reshape(&[3])),
        case!(a.broadcast_to(&[3])),
        case!(a.slice_axis(0, 1..5)),
        case!(a.index_select(0, &[2])),
        case!(tape.concat(&[a, b.reshape(&[3, 1])], 0)),
        case!(tape.stack(&[a, b], 0)),
        case!(a.matmul(b)),
        case!(a.permute(&[1, 0])),
        case!(a.relu_with(2.0)),
        case!(a.abs_with(-2.0)),
        case!(a.clamp(1.0, -1.0)),
        case!(a.maximum(b)),
        case!(a.minimum(b)),
        case!(a.max_axis(3, false)),
        case!(a.min_axis(3, false)),
        case!(a.sum_axis(3, false)),
        case!(a.mean_axis(3, false)),
        case!(a.log_softmax(3)),
        case!(a.softmax_cross_entropy(&[0])),
        case!(a.mse(b)),
    ];
    for (line, f) in cases {
        let (file, at) = panic_location(f);
        assert!(
            file.ends_with("bad_input.rs"),
            "line {line}: the panic points into {file}:{at}"
        );
        assert_eq!(at, line, "the panic points at line {at} of {file}");
    }
}

/// The `InvalidArgument` detail of `r` for `op`, or a panic naming what came instead.
fn invalid<T: std::fmt::Debug>(r: clarke_core::Result<T>, op: &str) -> String {
    match r {
        Err(Error::InvalidArgument { op: got, detail }) if got == op => detail,
        other => panic!("expected InvalidArgument from {op}, got {other:?}"),
    }
}

fn zeros(shape: &[usize]) -> ndarray::ArrayD<f64> {
    ndarray::ArrayD::zeros(ndarray::IxDyn(shape))
}

#[test]
fn broadcasting_to_an_overflowing_shape_names_both_shapes() {
    let tape = Tape::<f64>::new();
    let (a, b) = (tape.param(zeros(&[0, 1 << 40, 1])), tape.param(zeros(&[0, 1, 1 << 40])));
    for (op, r) in [
        ("add", a.try_add(b)),
        ("div", a.try_div(b)),
        ("maximum", a.try_maximum(b)),
    ] {
        match r {
            Err(Error::ShapeMismatch {
                op: got,
                lhs,
                rhs,
                detail,
            }) => {
                assert_eq!(got, op);
                assert_eq!((lhs, rhs), (vec![0, 1 << 40, 1], vec![0, 1, 1 << 40]));
                assert!(detail.contains("too many elements"), "{detail}");
            }
            other => panic!("{op}: expected ShapeMismatch, got {other:?}"),
        }
    }
}

#[test]
fn matmul_refuses_an_overflowing_result_and_unsupported_ranks() {
    let tape = Tape::<f64>::new();
    let (a, b) = (tape.param(zeros(&[1 << 40, 0])), tape.param(zeros(&[0, 1 << 40])));
    let detail = invalid(a.try_matmul(b), "matmul");
    assert!(detail.contains(&format!("{:?}", [1usize << 40, 0])), "{detail}");
    let batch = tape.param(zeros(&[1 << 31, 1 << 31, 0]));
    invalid(batch.try_matmul(tape.param(zeros(&[0, 4]))), "matmul");
    // A 0-d operand and mismatched vectors are shape errors naming both shapes.
    let s = tape.param_scalar(1.0);
    let v = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    match s.try_matmul(v) {
        Err(Error::ShapeMismatch {
            op: "matmul", lhs, rhs, ..
        }) => assert_eq!((lhs, rhs), (vec![], vec![2])),
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    // Empty inner dimensions are fine: the product is zeros.
    let e = tape.param(zeros(&[2, 0])).matmul(tape.param(zeros(&[0, 3])));
    assert_eq!(e.value(), zeros(&[2, 3]));
}

#[test]
fn powi_of_i32_min_differentiates_without_overflow() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[1.0, -1.0]).into_dyn());
    let g = x.powi(i32::MIN).sum().backward().unwrap();
    // n x^(n-1) with n = -2^31: -2^31 at 1, and 2^31 at -1 (an odd power of -1).
    assert_eq!(g.wrt(x).unwrap(), &arr1(&[-2147483648.0, 2147483648.0]).into_dyn());
}

#[test]
fn tape_capacity_is_a_hint() {
    let tape = Tape::<f64>::with_capacity(usize::MAX);
    let x = tape.param_scalar(2.0);
    assert_eq!((x * 3.0).scalar(), 6.0);
}

#[test]
fn dividing_by_a_subnormal_scalar_gives_the_quotient() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[1e-300, 0.0]).into_dyn());
    let y = x / 1e-310;
    let v = y.value();
    // 1 / 1e-310 overflows, so `x * (1 / s)` would be inf (and NaN at 0).
    assert!((v[0] / (1e-300 / 1e-310) - 1.0).abs() < 1e-15, "{v}");
    assert_eq!(v[1], 0.0);
    // Ordinary divisors still record one affine node; division by zero is IEEE.
    let before = tape.len();
    let z = x / 4.0;
    assert_eq!(tape.len(), before + 1);
    assert_eq!(z.value()[1], 0.0);
    assert!((x / 0.0).value()[0].is_infinite());
}

#[test]
fn duplicate_axes_in_sums_and_means_are_refused() {
    let tape = Tape::<f64>::new();
    let x = tape.param(zeros(&[2, 3, 4]));
    let detail = invalid(x.try_sum_axes(&[1, 2, 1], false), "sum");
    assert!(detail.contains("axis 1"), "{detail}");
    invalid(x.try_mean_axes(&[0, 0], true), "mean");
    // Order does not matter; distinct axes are fine.
    assert_eq!(x.try_sum_axes(&[2, 0], false).unwrap().shape(), vec![3]);
}

#[test]
fn extremum_of_everything_names_max_all_and_min_all() {
    let tape = Tape::<f64>::new();
    let e = tape.param(zeros(&[0, 2]));
    assert!(invalid(e.try_max_all(), "max_all").contains("empty"));
    invalid(e.try_min_all(), "min_all");
    invalid(e.try_max_axis(0, false), "max_axis");
}

#[test]
fn grads_tell_tapes_apart_by_identity_not_address() {
    // A tape that moves is the same tape.
    let tape = Tape::<f64>::new();
    let g = tape.param_scalar(1.0).sum().backward().unwrap();
    let moved = Box::new(tape);
    assert!(g.is_from(&moved));
    // A new tape, even where a dropped one lived, is another: its Vars get no gradient of it.
    let t1 = Box::new(Tape::<f64>::new());
    let g1 = (t1.param_scalar(3.0) * 5.0).backward().unwrap();
    drop(t1);
    let t2 = Box::new(Tape::<f64>::new());
    let p = t2.param_scalar(3.0);
    assert!(!g1.is_from(&t2));
    assert!(g1.get(p).is_none());
    assert!(matches!(
        g1.wrt(p),
        Err(Error::ForeignVar {
            op: "Grads::wrt",
            node: 0
        })
    ));
}

#[test]
fn anomaly_mode_reports_a_non_finite_parameter() {
    let tape = Tape::<f64>::new();
    tape.set_anomaly_detection(true);
    // An infinite constant is data (a bound, a mask) and is not an anomaly.
    let bound = tape.constant(arr1(&[f64::NEG_INFINITY, 0.0]).into_dyn());
    let ok = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    assert!(ok.maximum(bound).sum().backward().is_ok());
    let x = tape.param(arr1(&[1.0, f64::NAN]).into_dyn());
    match (x * 2.0).sum().backward() {
        Err(Error::NonFinite {
            op: "param",
            node,
            index: 1,
            ..
        }) => assert_eq!(node, x.id()),
        other => panic!("expected NonFinite at the parameter, got {other:?}"),
    }
}

#[test]
fn a_non_finite_seed_is_refused_in_anomaly_mode() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    let y = x * 2.0;
    let seed = arr1(&[1.0, f64::NAN]).into_dyn();
    // Outside anomaly mode the seed propagates by IEEE rules.
    let g = y.backward_seeded(seed.clone()).unwrap();
    assert!(g.wrt(x).unwrap()[1].is_nan());
    tape.set_anomaly_detection(true);
    let detail = invalid(y.backward_seeded(seed), "backward");
    assert!(
        detail.contains("seed") && detail.contains("NaN") && detail.contains("index 1"),
        "{detail}"
    );
}

#[test]
fn anomaly_mode_names_the_custom_op_that_produced_a_nan() {
    let tape = Tape::<f64>::new();
    tape.set_anomaly_detection(true);
    let x = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    let y = tape
        .try_custom_fn("nan_vjp", &[x], x.value(), |_, _, g| {
            let mut d = g.to_owned();
            d[1] = f64::NAN;
            Ok(vec![Some(d)])
        })
        .unwrap();
    match y.sum().backward() {
        Err(Error::CustomOp { op, detail }) => {
            assert_eq!(op, "nan_vjp");
            assert!(
                detail.contains("backward") && detail.contains("input 0") && detail.contains("NaN"),
                "{detail}"
            );
        }
        other => panic!("expected CustomOp naming nan_vjp, got {other:?}"),
    }
    // A custom value with a NaN from finite inputs is the forward anomaly, by name.
    let tape = Tape::<f64>::new();
    tape.set_anomaly_detection(true);
    let x = tape.param(arr1(&[1.0]).into_dyn());
    let value = arr1(&[f64::NAN]).into_dyn();
    tape.try_custom_fn("nan_value", &[x], value, |_, _, g| Ok(vec![Some(g.to_owned())]))
        .unwrap();
    match tape.check_anomaly() {
        Err(Error::CustomOp { op, detail }) => {
            assert_eq!(op, "nan_value");
            assert!(detail.contains("forward") && detail.contains("node 1"), "{detail}");
        }
        other => panic!("expected CustomOp naming nan_value, got {other:?}"),
    }
}

#[test]
fn element_selections_backward_would_not_apply_are_refused() {
    use clarke_core::BackwardOptions;
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[0.0, 1.0, -1.0]).into_dyn());
    let r = x.relu();
    let e = x.exp();
    let m = x.max_all();
    let y = r.sum() + e.sum() + m;
    let after = y * 2.0;
    let cases = [
        (r.id(), 3, "3 elements"),
        (e.id(), 0, "exp"),
        (x.id(), 0, "leaf"),
        (m.id(), 0, "max_all"),
        (after.id(), 0, "after the output"),
    ];
    for (node, element, says) in cases {
        let options = BackwardOptions::default().with_element_selection(node, element, 1.0);
        let detail = invalid(y.backward_with(&options), "element selection");
        assert!(
            detail.contains(says) && detail.contains(&format!("node {node}")),
            "{detail}"
        );
    }
    // In range on a nonsmooth node, it applies.
    let options = BackwardOptions::default().with_element_selection(r.id(), 0, 1.0);
    let g = y.backward_with(&options).unwrap();
    assert_eq!(g.wrt(x).unwrap()[0], 1.0 + 1.0 + 0.0);
}

#[test]
fn element_selections_apply_to_a_broadcast_maximum() {
    use clarke_core::BackwardOptions;
    let tape = Tape::<f64>::new();
    let a = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    let b = tape.param_scalar(1.0);
    let y = a.maximum(b).sum();
    // Element 0 ties: the policy splits it 1/2-1/2; the pin sends all of it to `a`.
    let plain = y.backward().unwrap();
    assert_eq!(plain.wrt(a).unwrap(), &arr1(&[0.5, 1.0]).into_dyn());
    let node = y.id() - 1;
    let pinned = y
        .backward_with(&BackwardOptions::default().with_element_selection(node, 0, 1.0))
        .unwrap();
    assert_eq!(pinned.wrt(a).unwrap(), &arr1(&[1.0, 1.0]).into_dyn());
    assert_eq!(pinned.wrt(b).unwrap()[[]], 0.0);
}

#[test]
fn declare_kink_regions_refuses_a_parameter() {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    let detail = invalid(
        tape.declare_kink_regions(x, "relu", vec![1, 1]),
        "Tape::declare_kink_regions",
    );
    assert!(detail.contains("node 0") && detail.contains("parameter"), "{detail}");
}

#[test]
fn gradcheck_validates_its_options_and_inputs() {
    use clarke_core::{GradcheckOptions, gradcheck, gradcheck_direction};
    fn square<'t>(_: &'t Tape<f64>, v: &[Var<'t, f64>]) -> clarke_core::Result<Var<'t, f64>> {
        Ok((v[0] * v[0]).sum())
    }
    fn empty<'t>(_: &'t Tape<f64>, v: &[Var<'t, f64>]) -> clarke_core::Result<Var<'t, f64>> {
        v[0].try_slice_axis(0, 0..0)
    }
    let x = [arr1(&[1.0, 2.0]).into_dyn()];
    let d = GradcheckOptions::default();
    let bad = [
        (GradcheckOptions { step: 0.0, ..d.clone() }, "step"),
        (
            GradcheckOptions {
                step: f64::NAN,
                ..d.clone()
            },
            "step",
        ),
        (
            GradcheckOptions {
                rtol: -1.0,
                ..d.clone()
            },
            "rtol",
        ),
        (
            GradcheckOptions {
                atol: f64::NAN,
                ..d.clone()
            },
            "atol",
        ),
    ];
    for (o, field) in &bad {
        let detail = invalid(gradcheck(square, &x, o), "gradcheck");
        assert!(detail.contains(field), "{detail}");
        invalid(gradcheck_direction(square, &x, o), "gradcheck");
    }
    // Nothing to compare: no input element, no output element.
    assert!(invalid(gradcheck(square, &[], &d), "gradcheck").contains("nothing to check"));
    assert!(invalid(gradcheck(empty, &x, &d), "gradcheck").contains("nothing to check"));
    // A non-finite point.
    let nan = [arr1(&[1.0, f64::NAN]).into_dyn()];
    let detail = invalid(gradcheck(square, &nan, &d), "gradcheck");
    assert!(
        detail.contains("input 0 element 1") && detail.contains("NaN"),
        "{detail}"
    );
    assert!(gradcheck(square, &x, &d).is_ok());
}

#[test]
fn gradcheck_refuses_an_output_whose_shape_depends_on_the_data() {
    use clarke_core::{GradcheckOptions, gradcheck};
    // One element at x <= 1, two above: the perturbed points straddle the switch.
    fn f<'t>(t: &'t Tape<f64>, v: &[Var<'t, f64>]) -> clarke_core::Result<Var<'t, f64>> {
        if v[0].value()[0] > 1.0 {
            t.try_concat(&[v[0], v[0]], 0)
        } else {
            Ok(v[0] * 1.0)
        }
    }
    match gradcheck(f, &[arr1(&[1.0]).into_dyn()], &GradcheckOptions::default()) {
        Err(Error::ShapeMismatch {
            op: "gradcheck",
            lhs,
            rhs,
            ..
        }) => assert_eq!((lhs, rhs), (vec![1], vec![2])),
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}
