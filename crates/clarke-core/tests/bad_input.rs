//! Bad input gives a typed error naming the op and the offending shape or value, never a
//! panic inside a `Result` function or a silently wrong value; the panicking forms point
//! at the caller's line.

use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

use clarke_core::{Error, Tape};
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
