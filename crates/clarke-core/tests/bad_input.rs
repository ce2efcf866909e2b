//! Bad input gives a typed error naming the op and the offending shape or value, never a
//! panic inside a `Result` function or a silently wrong value.

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
