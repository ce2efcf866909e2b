//! Optimisers, schedules, parameter files and the linear layer.

use clarke_core::{GradcheckOptions, Tape, gradcheck};
use clarke_nn::optim::{Adam, Optimizer, Schedule, Sgd};
use clarke_nn::{Linear, ParamSet};
use ndarray::{Array2, ArrayD, arr1};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// f(p) = 0.5 * sum_i a_i (p_i - c_i)^2, its gradient a o (p - c).
fn quadratic_grad(p: &ArrayD<f64>) -> ArrayD<f64> {
    let a = arr1(&[1.0, 10.0, 0.1]).into_dyn();
    let c = arr1(&[1.0, -2.0, 3.0]).into_dyn();
    &a * &(p - &c)
}

fn minimise(opt: &mut dyn Optimizer<f64>, steps: usize) -> ArrayD<f64> {
    let mut params = ParamSet::new();
    let id = params.add("p", ArrayD::zeros(vec![3])).unwrap();
    for _ in 0..steps {
        let g = quadratic_grad(params.get(id));
        opt.step(&mut params, &[g]).unwrap();
    }
    params.get(id).clone()
}

#[test]
fn adam_and_sgd_reach_the_minimiser_of_a_quadratic() {
    let target = arr1(&[1.0, -2.0, 3.0]).into_dyn();
    let p = minimise(
        &mut Adam::new(Schedule::Step {
            lr: 0.1,
            factor: 0.5,
            every: 500,
        })
        .unwrap(),
        4000,
    );
    assert!((&p - &target).iter().all(|e| e.abs() < 1e-3), "adam: {p}");
    let p = minimise(&mut Sgd::new(Schedule::Constant(0.05), 0.9).unwrap(), 3000);
    assert!((&p - &target).iter().all(|e| e.abs() < 1e-6), "sgd: {p}");
    // Vanishing steps (sum a_k = inf, sum a_k^2 < inf) still get there, more slowly.
    let vanishing = Schedule::InverseTime {
        lr: 0.15,
        offset: 100.0,
        power: 0.6,
    };
    assert!(vanishing.is_square_summable_not_summable());
    assert!(!Schedule::Constant(0.1).is_square_summable_not_summable());
    let p = minimise(&mut Sgd::new(vanishing, 0.0).unwrap(), 20000);
    assert!(
        (&p - &target).iter().all(|e| e.abs() < 1e-3),
        "sgd, vanishing steps: {p}"
    );
}

#[test]
fn schedules_give_the_documented_rates() {
    assert_eq!(Schedule::Constant(0.1).rate(1000), 0.1);
    let step = Schedule::Step {
        lr: 1.0,
        factor: 0.1,
        every: 10,
    };
    assert_eq!((step.rate(9), step.rate(10)), (1.0, 0.1));
    let inv = Schedule::InverseTime {
        lr: 1.0,
        offset: 10.0,
        power: 1.0,
    };
    assert!((inv.rate(10) - 0.5).abs() < 1e-15);
    let mut sgd = Sgd::<f64>::new(inv, 0.0).unwrap();
    assert_eq!(sgd.current_rate(), 1.0);
    let mut params = ParamSet::new();
    params.add("p", ArrayD::zeros(vec![1])).unwrap();
    sgd.step(&mut params, &[ArrayD::from_elem(vec![1], 1.0)]).unwrap();
    assert!((sgd.current_rate() - 1.0 / 1.1).abs() < 1e-15);
}

#[test]
fn optimisers_refuse_bad_gradients() {
    let mut params = ParamSet::<f64>::new();
    params.add("w", ArrayD::zeros(vec![2, 2])).unwrap();
    let mut adam = Adam::new(Schedule::Constant(0.1)).unwrap();
    let e = adam
        .step(&mut params, &[ArrayD::zeros(vec![2])])
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"w\""), "{e}");
    let e = adam.step(&mut params, &[]).unwrap_err().to_string();
    assert!(e.contains("0 gradients for 1 parameters"), "{e}");
    let mut nan = ArrayD::zeros(vec![2, 2]);
    nan[[0, 1]] = f64::NAN;
    let e = adam.step(&mut params, &[nan]).unwrap_err().to_string();
    assert!(e.contains("non-finite") && e.contains("\"w\""), "{e}");
    assert!(Sgd::<f64>::new(Schedule::Constant(-1.0), 0.9).is_err());
    assert!(Sgd::<f64>::new(Schedule::Constant(0.1), 1.0).is_err());
    assert!(
        Adam::<f64>::new(Schedule::Constant(0.1))
            .unwrap()
            .with_betas(1.0, 0.9)
            .is_err()
    );
}

#[test]
fn parameters_round_trip_through_a_file() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut params = ParamSet::<f64>::new();
    let lin = Linear::new(&mut params, "lin", 3, 2, &mut rng).unwrap();
    *params.get_mut(lin.bias()) = arr1(&[0.1, 1.0 / 3.0]).into_dyn();
    let dir = std::env::temp_dir().join(format!("clarke-params-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("p.json");
    params.save(&path).unwrap();
    let mut fresh = ParamSet::<f64>::new();
    Linear::new(&mut fresh, "lin", 3, 2, &mut ChaCha8Rng::seed_from_u64(2)).unwrap();
    assert_ne!(fresh.values(), params.values());
    fresh.load(&path).unwrap();
    assert_eq!(fresh.values(), params.values(), "values must round-trip bit for bit");

    let mut other = ParamSet::<f64>::new();
    Linear::new(&mut other, "lin", 4, 2, &mut rng).unwrap();
    let e = other.load(&path).unwrap_err().to_string();
    assert!(e.contains("lin.weight"), "{e}");
    let mut missing = ParamSet::<f64>::new();
    missing.add("extra", ArrayD::zeros(vec![1])).unwrap();
    assert!(
        missing
            .load(&path)
            .unwrap_err()
            .to_string()
            .contains("\"extra\" is missing")
    );
    assert!(params.add("lin.bias", ArrayD::zeros(vec![1])).is_err());
    assert!(params.add("nan", ArrayD::from_elem(vec![1], f64::NAN)).is_err());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn linear_layer_gradients_match_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut params = ParamSet::<f64>::new();
    let lin = Linear::new(&mut params, "lin", 4, 3, &mut rng).unwrap();
    let x: Array2<f64> = clarke_nn::init::normal(5, 4, 1.0, &mut rng);
    let inputs = vec![
        x.into_dyn(),
        params.get(lin.weight()).clone(),
        params.get(lin.bias()).clone(),
    ];
    let report = gradcheck(
        |_: &Tape<f64>, v| {
            let y = v[0].try_matmul(v[1].t())?.try_add(v[2])?;
            Ok(y.tanh().sum())
        },
        &inputs,
        &GradcheckOptions::default(),
    )
    .unwrap();
    assert_eq!(report.compared, 5 * 4 + 3 * 4 + 3, "every input entry was differenced");
    // And the layer itself computes that function.
    let tape = Tape::<f64>::new();
    let bound = params.bind(&tape);
    let y = lin.forward(&bound, tape.constant(inputs[0].clone())).unwrap();
    let direct = inputs[0].clone().into_dimensionality::<ndarray::Ix2>().unwrap().dot(
        &params
            .get(lin.weight())
            .clone()
            .into_dimensionality::<ndarray::Ix2>()
            .unwrap()
            .t(),
    ) + params
        .get(lin.bias())
        .clone()
        .into_dimensionality::<ndarray::Ix1>()
        .unwrap();
    assert_eq!(y.value(), direct.into_dyn());
    let e = lin
        .forward(&bound, tape.constant(ArrayD::zeros(vec![5, 3])))
        .unwrap_err();
    assert!(e.to_string().contains("linear"), "{e}");
}
