//! Bad input to parameters, optimisers, data and metrics gives a typed error naming the op
//! and the offending value, never a panic inside a `Result` function or a silently wrong
//! value.

use std::path::PathBuf;

use clarke_core::{Error, Tape};
use clarke_nn::data::{Dataset, Scaler};
use clarke_nn::deq::{DeqConfig, DeqLayer};
use clarke_nn::optim::{Adam, Optimizer, Schedule, Sgd};
use clarke_nn::train::accuracy;
use clarke_nn::{Linear, ParamSet};
use ndarray::{Array2, ArrayD, IxDyn, arr1, arr2};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn invalid(e: Error, op: &str, words: &[&str]) {
    match &e {
        Error::InvalidArgument { op: o, detail } if *o == op => {
            for w in words {
                assert!(detail.contains(w), "{w:?} not in: {e}");
            }
        }
        _ => panic!("expected InvalidArgument from {op}, got {e:?}"),
    }
}

fn zeros(shape: &[usize]) -> ArrayD<f64> {
    ArrayD::zeros(IxDyn(shape))
}

/// A file in the test's scratch directory.
fn scratch(name: &str, text: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("clarke-nn-bad-input-{name}"));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn param_ids_of_another_set_are_refused() {
    let mut a = ParamSet::<f64>::new();
    let a0 = a.add("w", zeros(&[2])).unwrap();
    let a1 = a.add("b", zeros(&[3])).unwrap();
    let mut b = ParamSet::<f64>::new();
    b.add("w", zeros(&[2])).unwrap();
    // Out of range in `b`, and in range but still another set's.
    invalid(b.try_get(a1).unwrap_err(), "ParamSet::get", &["parameter #1", "set"]);
    invalid(b.try_get(a0).unwrap_err(), "ParamSet::get", &["parameter #0", "set"]);
    invalid(b.try_get_mut(a0).unwrap_err(), "ParamSet::get_mut", &["set"]);
    let panic = std::panic::catch_unwind(|| b.get(a1).len()).unwrap_err();
    let message = panic.downcast_ref::<String>().expect("a formatted message");
    assert!(
        message.contains("ParamSet::get") && message.contains("belongs to"),
        "{message}"
    );
    // A clone is the same set.
    let c = a.clone();
    assert_eq!(c.get(a1).shape(), &[3]);
    assert_eq!(c.name(a0), "w");
    assert_eq!(c.ids().collect::<Vec<_>>(), vec![a0, a1]);
}

#[test]
fn layers_refuse_a_bound_of_another_set() {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut params = ParamSet::<f64>::new();
    let deq = DeqLayer::new(&mut params, "deq", 2, 3, DeqConfig::default(), &mut rng).unwrap();
    let head = Linear::new(&mut params, "head", 3, 2, &mut rng).unwrap();
    let mut smaller = ParamSet::<f64>::new();
    smaller.add("only", zeros(&[3, 3])).unwrap();
    for other in [ParamSet::<f64>::new(), smaller] {
        let tape = Tape::<f64>::new();
        let bound = other.bind(&tape);
        let x = tape.constant(Array2::from_elem((4, 2), 0.5).into_dyn());
        invalid(deq.forward(&bound, x).unwrap_err(), "Bound::var", &["belongs to"]);
        let z = tape.constant(Array2::from_elem((4, 3), 0.5).into_dyn());
        invalid(head.forward(&bound, z).unwrap_err(), "Bound::var", &["belongs to"]);
    }
    // The set's own binding works.
    let tape = Tape::<f64>::new();
    let bound = params.bind(&tape);
    let x = tape.constant(Array2::from_elem((4, 2), 0.5).into_dyn());
    head.forward(&bound, deq.forward(&bound, x).unwrap()).unwrap();
}

#[test]
fn gradients_refuse_another_tape_or_set() {
    let mut params = ParamSet::<f64>::new();
    let w = params.add("w", arr1(&[1.0, 2.0]).into_dyn()).unwrap();
    let tape = Tape::<f64>::new();
    let bound = params.bind(&tape);
    let grads = bound.var(w).sum().backward().unwrap();
    assert_eq!(
        bound.gradients(&grads, &params).unwrap()[0],
        arr1(&[1.0, 1.0]).into_dyn()
    );
    // Gradients of the same parameters bound on another tape.
    let other_tape = Tape::<f64>::new();
    let other_bound = params.bind(&other_tape);
    let other_grads = (other_bound.var(w) * 3.0).sum().backward().unwrap();
    invalid(
        bound.gradients(&other_grads, &params).unwrap_err(),
        "Bound::gradients",
        &["another tape"],
    );
    // Another set (even with the same shapes), or one smaller than the bound one.
    let mut twin = ParamSet::<f64>::new();
    twin.add("w", arr1(&[1.0, 2.0]).into_dyn()).unwrap();
    invalid(
        bound.gradients(&grads, &twin).unwrap_err(),
        "Bound::gradients",
        &["set"],
    );
    invalid(
        bound.gradients(&grads, &ParamSet::new()).unwrap_err(),
        "Bound::gradients",
        &["set"],
    );
}

#[test]
fn optimisers_refuse_another_set_or_changed_shapes() {
    let mut first = ParamSet::<f64>::new();
    first.add("w", zeros(&[2])).unwrap();
    let mut second = ParamSet::<f64>::new();
    second.add("w", zeros(&[3])).unwrap();
    let mut sgd = Sgd::new(Schedule::Constant(0.1), 0.9).unwrap();
    sgd.step(&mut first, &[arr1(&[1.0, 1.0]).into_dyn()]).unwrap();
    let g3 = [arr1(&[1.0, 1.0, 1.0]).into_dyn()];
    invalid(sgd.step(&mut second, &g3).unwrap_err(), "Sgd::step", &["set"]);
    assert_eq!(second.values()[0], zeros(&[3]), "nothing moved");

    // Adam on a larger set: refused rather than never updating the extra parameter.
    let mut larger = ParamSet::<f64>::new();
    larger.add("w", zeros(&[2])).unwrap();
    larger.add("extra", zeros(&[1])).unwrap();
    let mut adam = Adam::new(Schedule::Constant(0.1)).unwrap();
    adam.step(&mut first, &[arr1(&[1.0, 1.0]).into_dyn()]).unwrap();
    let g = [arr1(&[1.0, 1.0]).into_dyn(), arr1(&[1.0]).into_dyn()];
    invalid(adam.step(&mut larger, &g).unwrap_err(), "Adam::step", &["set"]);
    // The same set grown after the first step, or with a parameter of another shape.
    let mut grown = first.clone();
    grown.add("extra", zeros(&[1])).unwrap();
    invalid(
        adam.step(&mut grown, &g).unwrap_err(),
        "Adam::step",
        &["1 parameters", "has 2"],
    );
    let mut reshaped = first.clone();
    let w = reshaped.id("w").unwrap();
    *reshaped.get_mut(w) = zeros(&[3]);
    match sgd.step(&mut reshaped, &g3) {
        Err(Error::ShapeMismatch {
            op: "Sgd::step",
            lhs,
            rhs,
            ..
        }) => assert_eq!((lhs, rhs), (vec![3], vec![2])),
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    // Its own set (or a clone of it) still steps.
    let mut clone = first.clone();
    adam.step(&mut clone, &[arr1(&[1.0, 1.0]).into_dyn()]).unwrap();
    sgd.step(&mut first, &[arr1(&[1.0, 1.0]).into_dyn()]).unwrap();
}

#[test]
fn optimiser_settings_are_validated() {
    let sgd = || Sgd::<f64>::new(Schedule::Constant(0.1), 0.9).unwrap();
    for wd in [f64::NAN, f64::INFINITY, -1.0] {
        invalid(
            sgd().with_weight_decay(wd).unwrap_err(),
            "Sgd::with_weight_decay",
            &[&wd.to_string()],
        );
    }
    assert!(sgd().with_weight_decay(1e-4).is_ok());
    let f32_sgd = Sgd::<f32>::new(Schedule::Constant(0.1), 0.9).unwrap();
    invalid(
        f32_sgd.with_weight_decay(1e39).unwrap_err(),
        "Sgd::with_weight_decay",
        &["f32"],
    );
    for factor in [f64::INFINITY, f64::NAN] {
        let step = Schedule::Step {
            lr: 0.1,
            factor,
            every: 10,
        };
        invalid(Sgd::<f64>::new(step, 0.0).unwrap_err(), "Schedule", &["factor"]);
        invalid(Adam::<f64>::new(step).unwrap_err(), "Schedule", &["factor"]);
    }
    let inverse = Schedule::InverseTime {
        lr: 0.1,
        offset: 10.0,
        power: f64::INFINITY,
    };
    assert!(Adam::<f64>::new(inverse).is_err());
    // A rate that overflows f32.
    invalid(
        Sgd::<f32>::new(Schedule::Constant(1e39), 0.0).unwrap_err(),
        "Sgd::new",
        &["1e39", "f32"],
    );
    invalid(
        Adam::<f32>::new(Schedule::Constant(1e39)).unwrap_err(),
        "Adam::new",
        &["f32"],
    );
    assert!(Sgd::<f64>::new(Schedule::Constant(1e39), 0.0).is_ok());
    // A growing schedule that overflows f32 at step 2: refused there, nothing moves.
    let growing = Schedule::Step {
        lr: 1.0,
        factor: 1e30,
        every: 1,
    };
    let mut params = ParamSet::<f32>::new();
    params.add("w", ArrayD::zeros(IxDyn(&[1]))).unwrap();
    let g = [ArrayD::from_elem(IxDyn(&[1]), 1e-30f32)];
    let mut opt = Sgd::<f32>::new(growing, 0.0).unwrap();
    opt.step(&mut params, &g).unwrap();
    opt.step(&mut params, &g).unwrap();
    let before = params.values()[0].clone();
    invalid(opt.step(&mut params, &g).unwrap_err(), "Sgd::step", &["step 2", "f32"]);
    assert_eq!(params.values()[0], before);
    let mut params = ParamSet::<f32>::new();
    params.add("w", ArrayD::zeros(IxDyn(&[1]))).unwrap();
    let mut opt = Adam::<f32>::new(growing).unwrap();
    opt.step(&mut params, &g).unwrap();
    opt.step(&mut params, &g).unwrap();
    invalid(opt.step(&mut params, &g).unwrap_err(), "Adam::step", &["step 2", "f32"]);
}

#[test]
fn dataset_select_refuses_a_row_out_of_range() {
    let d = Dataset {
        x: arr2(&[[0.0], [1.0]]),
        y: vec![0, 1],
        classes: 2,
    };
    invalid(
        d.select(&[1, 2]).unwrap_err(),
        "Dataset::select",
        &["row index 2", "2 rows"],
    );
    assert_eq!(d.select(&[1, 1]).unwrap().y, vec![1, 1]);
}

#[test]
fn accuracy_refuses_nan_logits_and_labels_out_of_range() {
    let nan = Array2::from_elem((3, 2), f64::NAN);
    invalid(
        accuracy(nan.view(), &[0, 1, 0]).unwrap_err(),
        "accuracy",
        &["row 0", "NaN"],
    );
    let logits = arr2(&[[0.1, 0.9], [0.8, 0.2]]);
    invalid(
        accuracy(logits.view(), &[1, 2]).unwrap_err(),
        "accuracy",
        &["row 1", "label 2"],
    );
    assert!(matches!(
        accuracy(logits.view(), &[1]),
        Err(Error::ShapeMismatch { op: "accuracy", .. })
    ));
    assert_eq!(accuracy(logits.view(), &[1, 1]).unwrap(), 0.5);
}

#[test]
fn scalers_need_rows_to_fit() {
    let empty = Array2::<f64>::zeros((0, 3));
    assert!(matches!(
        Scaler::min_max(&empty),
        Err(Error::ShapeMismatch {
            op: "Scaler::min_max",
            ..
        })
    ));
    assert!(matches!(
        Scaler::standardize(&empty),
        Err(Error::ShapeMismatch {
            op: "Scaler::standardize",
            ..
        })
    ));
}

#[test]
fn csv_labels_must_fit() {
    for label in ["1e30", "18446744073709551615", "1.8446744073709552e19"] {
        let p = scratch("huge-label.csv", &format!("a,label\n0,1\n1,{label}\n"));
        invalid(
            Dataset::from_csv(&p).unwrap_err(),
            "Dataset::from_csv",
            &["line 3", label],
        );
    }
    let p = scratch("float-label.csv", "a,label\n0,1\n1,3.0\n");
    assert_eq!(Dataset::from_csv(&p).unwrap().classes, 4);
}

#[test]
fn loading_a_value_that_overflows_the_scalar_is_refused() {
    let mut saved = ParamSet::<f64>::new();
    saved.add("w", arr1(&[1.0, 1e300]).into_dyn()).unwrap();
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("clarke-nn-bad-input-big.json");
    saved.save(&p).unwrap();
    let mut narrow = ParamSet::<f32>::new();
    narrow.add("w", ArrayD::zeros(IxDyn(&[2]))).unwrap();
    invalid(
        narrow.load(&p).unwrap_err(),
        "ParamSet::load",
        &["\"w\"", "1e300", "f32"],
    );
    assert_eq!(narrow.values()[0], ArrayD::<f32>::zeros(IxDyn(&[2])), "nothing loaded");
    let mut wide = ParamSet::<f64>::new();
    wide.add("w", zeros(&[2])).unwrap();
    wide.load(&p).unwrap();
    assert_eq!(wide.values()[0][1], 1e300);
}
