//! Bad input to parameters, optimisers, data and metrics gives a typed error naming the op
//! and the offending value, never a panic inside a `Result` function or a silently wrong
//! value.

use std::path::PathBuf;

use clarke_core::{Error, Tape};
use clarke_nn::data::{Dataset, Scaler, batches};
use clarke_nn::deq::{DeqConfig, DeqLayer};
use clarke_nn::init::{normal, try_normal};
use clarke_nn::optim::{Adam, Optimizer, Schedule, Sgd};
use clarke_nn::plot::{Panel, save_png};
use clarke_nn::train::{EpochRecord, History, accuracy};
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

/// The scratch path of a file a test writes.
fn scratch_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("clarke-nn-bad-input-{name}"))
}

fn shape_mismatch<T: std::fmt::Debug>(r: Result<T, Error>, op: &str, words: &[&str]) {
    match r {
        Err(Error::ShapeMismatch { op: o, detail, .. }) if o == op => {
            for w in words {
                assert!(detail.contains(w), "{w:?} not in: {detail}");
            }
        }
        other => panic!("expected ShapeMismatch from {op}, got {other:?}"),
    }
}

#[test]
fn linear_refuses_replaced_or_non_finite_parameters_and_inputs() {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut params = ParamSet::<f64>::new();
    let lin = Linear::new(&mut params, "lin", 2, 3, &mut rng).unwrap();
    let x = Array2::from_elem((4, 2), 0.5).into_dyn();
    let run = |params: &ParamSet<f64>, x: ArrayD<f64>| {
        let tape = Tape::<f64>::new();
        let bound = params.bind(&tape);
        lin.forward(&bound, tape.constant(x)).map(|y| y.shape())
    };
    assert_eq!(run(&params, x.clone()).unwrap(), vec![4, 3]);
    // A bias of shape [1] would broadcast to every output.
    let mut short_bias = params.clone();
    *short_bias.get_mut(lin.bias()) = zeros(&[1]);
    shape_mismatch(run(&short_bias, x.clone()), "linear", &["bias"]);
    let mut nan_weight = params.clone();
    nan_weight.get_mut(lin.weight())[[1, 0]] = f64::NAN;
    invalid(
        run(&nan_weight, x.clone()).unwrap_err(),
        "linear",
        &["the weight", "NaN", "flat index 2"],
    );
    let mut bad_x = x;
    bad_x[[3, 1]] = f64::INFINITY;
    invalid(
        run(&params, bad_x).unwrap_err(),
        "linear",
        &["x", "inf", "flat index 7"],
    );
}

#[test]
fn normal_init_refuses_a_bad_std() {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    for std in [f64::NAN, f64::INFINITY, -1.0] {
        invalid(
            try_normal::<f64>(2, 2, std, &mut rng).unwrap_err(),
            "init::normal",
            &[&format!("{std:?}")],
        );
    }
    invalid(
        try_normal::<f32>(2, 2, 1e39, &mut rng).unwrap_err(),
        "init::normal",
        &["1e39", "f32"],
    );
    assert!(try_normal::<f64>(2, 2, 1e39, &mut rng).is_ok());
    assert_eq!(try_normal::<f64>(3, 0, 0.0, &mut rng).unwrap().dim(), (3, 0));
    let panic =
        std::panic::catch_unwind(|| normal::<f64>(2, 2, f64::NAN, &mut ChaCha8Rng::seed_from_u64(0))).unwrap_err();
    let message = panic.downcast_ref::<String>().expect("a formatted message");
    assert!(message.contains("init::normal"), "{message}");
}

#[test]
fn saving_a_non_finite_value_is_refused() {
    let mut params = ParamSet::<f64>::new();
    let w = params.add("w", zeros(&[3])).unwrap();
    params.get_mut(w)[2] = f64::NAN;
    let p = scratch_path("nan-params.json");
    let _ = std::fs::remove_file(&p);
    invalid(
        params.save(&p).unwrap_err(),
        "ParamSet::save",
        &["\"w\"", "NaN", "flat index 2"],
    );
    assert!(!p.exists(), "nothing written");
}

#[test]
fn loading_refuses_unknown_and_repeated_names() {
    let mut saved = ParamSet::<f64>::new();
    saved.add("w", arr1(&[1.0, 2.0]).into_dyn()).unwrap();
    saved.add("extra", arr1(&[3.0]).into_dyn()).unwrap();
    let p = scratch_path("bigger-model.json");
    saved.save(&p).unwrap();
    let mut model = ParamSet::<f64>::new();
    model.add("w", zeros(&[2])).unwrap();
    invalid(
        model.load(&p).unwrap_err(),
        "ParamSet::load",
        &["\"extra\"", "not a parameter of this set"],
    );
    let twice = scratch(
        "twice.json",
        r#"{"scalar": "f64", "params": [{"name": "w", "shape": [2], "data": [1, 2]}, {"name": "w", "shape": [2], "data": [5, 6]}]}"#,
    );
    invalid(
        model.load(&twice).unwrap_err(),
        "ParamSet::load",
        &["\"w\"", "more than once"],
    );
    let unnamed = scratch(
        "unnamed.json",
        r#"{"params": [{"name": "w", "shape": [2], "data": [1, 2]}, {"shape": [1], "data": [5]}]}"#,
    );
    invalid(
        model.load(&unnamed).unwrap_err(),
        "ParamSet::load",
        &["entry 1", "no name"],
    );
    assert_eq!(model.values()[0], zeros(&[2]), "nothing loaded");
}

#[test]
fn optimiser_steps_that_overflow_are_refused() {
    let mut params = ParamSet::<f32>::new();
    params.add("w", ArrayD::from_elem(IxDyn(&[2]), -3e38f32)).unwrap();
    let before = params.values()[0].clone();
    let g = [ArrayD::from_elem(IxDyn(&[2]), 1e38f32)];
    let mut sgd = Sgd::<f32>::new(Schedule::Constant(1.0), 0.0).unwrap();
    invalid(
        sgd.step(&mut params, &g).unwrap_err(),
        "Sgd::step",
        &["\"w\"", "element 0", "not finite in f32"],
    );
    assert_eq!(params.values()[0], before, "nothing moved");
    // A squared gradient beyond f32: the second moment would be inf and the step 0.
    let mut params = ParamSet::<f32>::new();
    params.add("w", ArrayD::zeros(IxDyn(&[2]))).unwrap();
    let g = [ArrayD::from_elem(IxDyn(&[2]), 1e30f32)];
    let mut adam = Adam::<f32>::new(Schedule::Constant(0.1)).unwrap();
    invalid(
        adam.step(&mut params, &g).unwrap_err(),
        "Adam::step",
        &["\"w\"", "element 0", "f32"],
    );
    assert_eq!(params.values()[0], ArrayD::<f32>::zeros(IxDyn(&[2])), "nothing moved");
    assert_eq!(adam.current_rate(), 0.1);
    // The same optimiser steps once the gradient is in range.
    adam.step(&mut params, &[ArrayD::from_elem(IxDyn(&[2]), 1.0f32)])
        .unwrap();
    assert!(params.values()[0].iter().all(|&v| (v + 0.1).abs() < 1e-6));
}

#[test]
fn schedules_are_not_misreported_or_wrapped() {
    let invalid_lr = Schedule::InverseTime {
        lr: -1.0,
        offset: 10.0,
        power: 0.75,
    };
    assert!(!invalid_lr.is_square_summable_not_summable());
    let valid = Schedule::InverseTime {
        lr: 0.1,
        offset: 10.0,
        power: 0.75,
    };
    assert!(valid.is_square_summable_not_summable());
    // 2^31 halvings: `as i32` would wrap to -2^31 and give inf.
    let halving = Schedule::Step {
        lr: 1.0,
        factor: 0.5,
        every: 1,
    };
    assert_eq!(halving.rate(1 << 31), 0.0);
    assert_eq!(halving.rate(3), 0.125);
}

#[test]
fn datasets_with_fields_that_do_not_fit_are_refused() {
    let fewer_rows = Dataset {
        x: arr2(&[[0.0]]),
        y: vec![0, 1],
        classes: 2,
    };
    shape_mismatch(fewer_rows.select(&[1]), "Dataset::select", &["1 rows for 2 labels"]);
    shape_mismatch(
        fewer_rows.split_by_index(|i| i == 0),
        "Dataset::split_by_index",
        &["1 rows for 2 labels"],
    );
    let label_too_big = Dataset {
        x: arr2(&[[0.0], [1.0]]),
        y: vec![0, 2],
        classes: 2,
    };
    invalid(
        label_too_big.split_by_index(|i| i == 0).unwrap_err(),
        "Dataset::split_by_index",
        &["row 1", "label 2", "2 classes"],
    );
    let no_classes = Dataset {
        x: arr2(&[[0.0]]),
        y: vec![0],
        classes: 0,
    };
    invalid(
        no_classes.select(&[0]).unwrap_err(),
        "Dataset::select",
        &["label 0", "0 classes"],
    );
}

#[test]
fn features_must_be_finite_in_the_training_precision() {
    let d = Dataset {
        x: arr2(&[[0.0, 1.0], [1e300, 2.0]]),
        y: vec![0, 1],
        classes: 2,
    };
    invalid(
        d.x_as::<f32>().unwrap_err(),
        "Dataset::x_as",
        &["row 1, column 0", "1e300", "f32"],
    );
    assert_eq!(d.x_as::<f64>().unwrap()[[1, 0]], 1e300);
    let nan = Dataset {
        x: arr2(&[[f64::NAN]]),
        y: vec![0],
        classes: 1,
    };
    invalid(nan.x_as::<f64>().unwrap_err(), "Dataset::x_as", &["NaN"]);
}

#[test]
fn scalers_refuse_non_finite_features_and_overflow() {
    let train = arr2(&[[0.0, 1.0], [2.0, 3.0]]);
    let mut with_nan = train.clone();
    with_nan[[1, 0]] = f64::NAN;
    for fit in [Scaler::min_max, Scaler::standardize] {
        let e = fit(&with_nan).unwrap_err();
        assert!(e.to_string().contains("row 1, column 0"), "{e}");
        assert!(e.to_string().contains("NaN"), "{e}");
    }
    invalid(
        Scaler::min_max(&arr2(&[[-1e308], [1e308]])).unwrap_err(),
        "Scaler::min_max",
        &["column 0", "range overflows"],
    );
    invalid(
        Scaler::standardize(&arr2(&[[1e200], [-1e200]])).unwrap_err(),
        "Scaler::standardize",
        &["column 0", "overflows"],
    );
    let scaler = Scaler::min_max(&train).unwrap();
    invalid(
        scaler.apply(&with_nan).unwrap_err(),
        "Scaler::apply",
        &["row 1, column 0", "NaN"],
    );
    shape_mismatch(scaler.apply(&arr2(&[[0.0, 1.0, 2.0]])), "Scaler::apply", &["features"]);
    // A test value far outside a tiny training range.
    let tiny = Scaler::min_max(&arr2(&[[0.0], [1e-300]])).unwrap();
    invalid(
        tiny.apply(&arr2(&[[0.5], [1e10]])).unwrap_err(),
        "Scaler::apply",
        &["row 1, column 0", "inf"],
    );
}

#[test]
fn batches_refuse_a_batch_size_of_zero() {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    invalid(
        batches(10, 0, &mut rng).unwrap_err(),
        "batches",
        &["batch size", "got 0"],
    );
    assert!(batches(0, 4, &mut rng).unwrap().is_empty());
}

#[test]
fn plots_refuse_data_the_axes_cannot_show_and_other_formats() {
    let kind = |r: std::io::Result<()>| r.unwrap_err().kind();
    let message = |r: std::io::Result<()>| r.unwrap_err().to_string();
    let path = scratch_path("plot.png");
    // These used to hang the backend's tick search.
    let huge = Panel::new("huge").line("a", vec![(0.0, -1e308), (1.0, 1e308)]);
    let e = message(save_png(&path, &[huge]));
    assert!(
        e.contains("\"huge\"") && e.contains("y data") && e.contains("linear"),
        "{e}"
    );
    let subnormal = Panel::new("tiny").log_y().line("a", vec![(1.0, 5e-324)]);
    let e = message(save_png(&path, &[subnormal]));
    assert!(e.contains("\"tiny\"") && e.contains("log"), "{e}");
    let decades = Panel::new("decades")
        .log_x()
        .line("a", vec![(1e-150, 1.0), (1e300, 2.0)]);
    assert_eq!(kind(save_png(&path, &[decades])), std::io::ErrorKind::InvalidInput);
    // `.jpg` would be written as a JPEG.
    let fine = Panel::new("fine").line("a", vec![(0.0, 1.0), (1.0, 2.0)]);
    let e = message(save_png(scratch_path("plot.jpg"), std::slice::from_ref(&fine)));
    assert!(e.contains("plot.jpg") && e.contains(".png"), "{e}");
    // An unwritable path is an error, not a panic.
    assert!(save_png(scratch_path("no-such-dir/plot.png"), std::slice::from_ref(&fine)).is_err());
    // Empty and all-NaN series draw empty axes; the extension's case does not matter.
    let empty = Panel::new("nan")
        .line("a", vec![(f64::NAN, f64::NAN)])
        .points("b", vec![]);
    save_png(scratch_path("plot.PNG"), &[fine, empty]).unwrap();
    // A diverged history.
    let mut history = History::default();
    history.push(EpochRecord {
        epoch: 1,
        train_loss: f64::MAX,
        test_accuracy: 0.5,
        forward_iterations: 0.0,
        adjoint_iterations: 0.0,
        seconds: 1.0,
    });
    assert_eq!(kind(history.plot(&path, "diverged")), std::io::ErrorKind::InvalidInput);
}
