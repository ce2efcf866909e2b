//! The hypothesis check of a wide DEQ cell, matrix-free: 4,096 units per sample, where a dense
//! check (an SVD of `W` and a dense `n x n` block per sample) cannot run.
//!
//! Model: `z* = relu(W z* + U x + b)` with an unconstrained `W` scaled to `||W||` a little
//! above one (so no certificate from the parametrisation applies and every sample is
//! walked), then `logits = V z* + c`; softmax cross-entropy on random inputs and labels of a
//! fixed seed, Adam. The training steps run without the check; then one backward with the
//! check on measures it, and two dot tests `<J v, w> = <v, J^T w>` check the per-sample
//! products the check used and the whole layer's forward mode (`Tape::jvp`, the tangent solve
//! `(I - J_z) v = D t`) against its backward (the adjoint solve).
//!
//! ```text
//! cargo run --release --example large_check -- [--units N] [--batch B] [--steps K]
//!     [--norm S] [--lr R] [--dense-limit L] [--seed S] [--quick]
//! ```
//!
//! Progress goes to stderr; the last line on stdout is one JSON object with the results.

use std::time::{Duration, Instant};

use clap::Parser;
use clarke::core::{BackwardOptions, ElementSelection, Tape};
use clarke::implicit::{CheckOptions, HypothesisCheck, KinkBand};
use clarke::nn::deq::{DeqConfig, DeqLayer, DeqWeights, ForwardMethod, Parametrization, cell_jacobian_product};
use clarke::nn::optim::{Adam, Optimizer, Schedule};
use clarke::nn::{Linear, ParamSet};
use clarke::solve::{SpectralOptions, spectral_norm};
use ndarray::{Array1, Array2, Ix2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

/// Classes of the random labels.
const CLASSES: usize = 10;

/// Random vector pairs of the dot test, per sample tested.
const DOT_PAIRS: usize = 3;

/// Samples whose products the dot test measures.
const DOT_SAMPLES: usize = 2;

#[derive(Parser, Debug)]
#[command(about = "Train a wide DEQ a few steps and run its hypothesis check matrix-free")]
struct Args {
    /// Units of z per sample.
    #[arg(long, default_value_t = 4096)]
    units: usize,
    /// Samples per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Training steps (Adam).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Input dimension.
    #[arg(long, default_value_t = 32)]
    input_dim: usize,
    /// Spectral norm of the initial W (above 1: no certificate).
    #[arg(long, default_value_t = 1.05)]
    norm: f64,
    /// Units above which the check is matrix-free (default: the check options' default).
    #[arg(long)]
    dense_limit: Option<usize>,
    /// Adam's learning rate (default `0.02 / units`). Adam's first steps move every entry
    /// of `W` by about the rate, and its gradient `delta^T z*` is of low rank, so one step
    /// can move `||W||` by up to `rate * units`: a fixed rate that suits 128 units (1e-3)
    /// grows the norm of a 4,096-unit `W` by up to 4 and the forward solve diverges.
    #[arg(long)]
    lr: Option<f64>,
    /// Seed of the weights, inputs and labels.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Smoke test: 128 units, batch 4, one step, dense limit 64.
    #[arg(long)]
    quick: bool,
}

/// The sizes a run uses after `--quick`.
struct Sizes {
    units: usize,
    batch: usize,
    steps: usize,
    dense_limit: usize,
}

impl Sizes {
    fn of(args: &Args) -> Self {
        if args.quick {
            Sizes {
                units: 128,
                batch: 4,
                steps: 1,
                dense_limit: args.dense_limit.unwrap_or(64),
            }
        } else {
            Sizes {
                units: args.units,
                batch: args.batch,
                steps: args.steps,
                dense_limit: args.dense_limit.unwrap_or(CheckOptions::default().dense_limit),
            }
        }
    }
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("large_check: {e}");
        std::process::exit(1);
    }
}

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

fn run(args: &Args) -> BoxResult<()> {
    let sizes = Sizes::of(args);
    let (n, batch) = (sizes.units, sizes.batch);
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let x: Array2<f64> = clarke::nn::init::normal(batch, args.input_dim, 1.0, &mut rng);
    let labels: Vec<usize> = (0..batch).map(|_| rng.random_range(0..CLASSES)).collect();
    let weights = initial_weights(n, args.input_dim, args.norm, &mut rng)?;
    let config = DeqConfig::default()
        .with_parametrization(Parametrization::Unconstrained)
        .with_forward(ForwardMethod::Anderson { memory: 5 })
        .with_forward_tolerance(1e-10, 500)
        .with_adjoint_tolerance(1e-8, 500)
        .with_check_options(CheckOptions::default().with_dense_limit(sizes.dense_limit));
    eprintln!(
        "large_check: {n} units, batch {batch}, ||W|| = {:.3}, dense limit {}",
        args.norm, sizes.dense_limit
    );
    let mut params = ParamSet::<f64>::new();
    let deq = DeqLayer::with_weights(&mut params, "deq", config.clone().with_check(false), &weights)?;
    let head = Linear::new(&mut params, "head", n, CLASSES, &mut rng)?;
    let lr = args.lr.unwrap_or(0.02 / n as f64);
    let mut adam = Adam::new(Schedule::Constant(lr))?;
    let mut step_times = Vec::new();
    let mut loss = f64::NAN;
    for step in 0..sizes.steps {
        let start = Instant::now();
        let tape = Tape::<f64>::new();
        let bound = params.bind(&tape);
        let z = deq.forward(&bound, tape.constant(x.clone().into_dyn()))?;
        let l = head.forward(&bound, z)?.softmax_cross_entropy(&labels);
        let grads = l.backward()?;
        let g = bound.gradients(&grads, &params)?;
        adam.step(&mut params, &g)?;
        step_times.push(start.elapsed());
        loss = l.value().first().copied().unwrap_or(f64::NAN);
        eprintln!("step {}: loss {loss:.4}, {:.2?}", step + 1, step_times[step]);
    }
    let trained = trained_weights(&params, &deq)?;
    let checked = timed_check(&config, &trained, &x)?;
    let unchecked = timed_check(&config.clone().with_check(false), &trained, &x)?;
    let check_seconds = checked.backward.saturating_sub(unchecked.backward).as_secs_f64();
    eprintln!("check: {} ({check_seconds:.2} s)", checked.check);
    let products_dot = dot_test(&trained, &x, &checked.z, &mut rng)?;
    let layer_dot = layer_dot_test(&config, &trained, &x, &mut rng)?;
    let dot = products_dot.max(layer_dot);
    let step_seconds = step_times.iter().map(Duration::as_secs_f64).sum::<f64>() / step_times.len().max(1) as f64;
    let c = &checked.check;
    println!(
        "{}",
        json!({
            "example": "large_check",
            "units": n,
            "batch": batch,
            "steps": sizes.steps,
            "dense_limit": sizes.dense_limit,
            "initial_w_norm": args.norm,
            "learning_rate": lr,
            "final_loss": loss,
            "check": c.outcome.to_string(),
            "sigma_min": c.sigma_min,
            "sigma_max": c.sigma_max,
            "kink_elements": c.kink_elements,
            "vertices": c.vertices,
            "matrix_free": c.matrix_free,
            "products": c.products,
            "check_seconds": check_seconds,
            "step_seconds": step_seconds,
            "jvp_dot_test_max_rel": dot,
            "products_dot_test_rel": products_dot,
            "layer_dot_test_rel": layer_dot,
        })
    );
    Ok(())
}

/// Seeded weights: `W` Gaussian scaled to spectral norm `norm` (estimated by power
/// iteration to 1e-6), `U` Gaussian of variance `1 / input_dim`, `b = 0`.
fn initial_weights(n: usize, input_dim: usize, norm: f64, rng: &mut ChaCha8Rng) -> BoxResult<DeqWeights<f64>> {
    let w: Array2<f64> = clarke::nn::init::normal(n, n, 1.0, rng);
    let sigma = spectral_norm(&w, &SpectralOptions::default().with_tol(1e-6).with_max_iter(2000))?.value;
    Ok(DeqWeights {
        w: w * (norm / sigma),
        u: clarke::nn::init::normal(n, input_dim, (1.0 / input_dim as f64).sqrt(), rng),
        bias: Array1::zeros(n),
    })
}

/// The cell's weights after training.
fn trained_weights(params: &ParamSet<f64>, deq: &DeqLayer<f64>) -> BoxResult<DeqWeights<f64>> {
    let get = |name: &str| -> BoxResult<ndarray::ArrayD<f64>> {
        let id = params.id(name).ok_or_else(|| format!("no parameter {name}"))?;
        Ok(params.get(id).clone())
    };
    let tape = Tape::<f64>::new();
    let w = deq.weight(&params.bind(&tape))?.value().into_dimensionality::<Ix2>()?;
    Ok(DeqWeights {
        w,
        u: get("deq.u")?.into_dimensionality()?,
        bias: get("deq.bias")?.into_dimensionality()?,
    })
}

/// One backward of `sum(z*)` through a fresh layer with `config`: its check, `z*` and the
/// time of the backward pass.
struct Timed {
    check: HypothesisCheck,
    z: Array2<f64>,
    backward: Duration,
}

fn timed_check(config: &DeqConfig, weights: &DeqWeights<f64>, x: &Array2<f64>) -> BoxResult<Timed> {
    let mut params = ParamSet::new();
    let deq = DeqLayer::with_weights(
        &mut params,
        "deq",
        config.clone().with_kink_band(KinkBand::default()),
        weights,
    )?;
    let tape = Tape::new();
    let bound = params.bind(&tape);
    let z = deq.forward(&bound, tape.constant(x.clone().into_dyn()))?;
    let start = Instant::now();
    z.sum().backward()?;
    let backward = start.elapsed();
    let check = deq.reports().last().ok_or("no report")?.check;
    Ok(Timed {
        check,
        z: z.value().into_dimensionality()?,
        backward,
    })
}

/// The worst relative gap of `<J v, w> = <v, J^T w>` for the per-sample products the check
/// uses, `J = diag(d) W` at `z*` (with and without a flipped selection), over random `v, w`.
fn dot_test(weights: &DeqWeights<f64>, x: &Array2<f64>, z: &Array2<f64>, rng: &mut ChaCha8Rng) -> BoxResult<f64> {
    let n = weights.w.nrows();
    let pre = z.dot(&weights.w.t()) + x.dot(&weights.u.t()) + &weights.bias;
    let mut worst = 0.0f64;
    for (sample, p) in pre.outer_iter().take(DOT_SAMPLES).enumerate() {
        let d = p.mapv(|v| if v > 0.0 { 1.0 } else { 0.0 });
        let flipped = [ElementSelection {
            node: 0,
            element: rng.random_range(0..n),
            value: 0.5,
        }];
        for selections in [&[][..], &flipped[..]] {
            for _ in 0..DOT_PAIRS {
                let v: Array1<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                let w: Array1<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                let (mut jv, mut jtw) = (Array1::zeros(n), Array1::zeros(n));
                cell_jacobian_product(weights.w.view(), d.view(), selections, false, v.view(), jv.view_mut())?;
                cell_jacobian_product(weights.w.view(), d.view(), selections, true, w.view(), jtw.view_mut())?;
                let (a, b) = (jv.dot(&w), v.dot(&jtw));
                let rel = (a - b).abs() / a.abs().max(b.abs()).max(f64::MIN_POSITIVE);
                worst = worst.max(rel);
            }
        }
        eprintln!("dot test, sample {sample}: worst relative gap so far {worst:.2e}");
    }
    Ok(worst)
}

/// The relative gap of `<J v, w> = <v, J^T w>` for the whole layer `z*(x, W, U, b)`: one
/// forward-mode call (`Tape::jvp`) with random tangents on `x` and every parameter against one
/// backward seeded with a random `w`, both solved to 1e-12 so that the gap measures the
/// transposition and not the solver tolerance.
fn layer_dot_test(
    config: &DeqConfig,
    weights: &DeqWeights<f64>,
    x: &Array2<f64>,
    rng: &mut ChaCha8Rng,
) -> BoxResult<f64> {
    let config = config.clone().with_check(false).with_adjoint_tolerance(1e-12, 2000);
    let mut params = ParamSet::new();
    let deq = DeqLayer::with_weights(&mut params, "deq", config, weights)?;
    let tape = Tape::new();
    let bound = params.bind(&tape);
    let xv = tape.param(x.clone().into_dyn());
    let z = deq.forward(&bound, xv)?;
    let random = |shape: &[usize], rng: &mut ChaCha8Rng| {
        ndarray::ArrayD::from_shape_fn(shape.to_vec(), |_| rng.random_range(-1.0..1.0))
    };
    let mut pairs: Vec<_> = params
        .ids()
        .map(|id| (bound.var(id), random(params.get(id).shape(), rng)))
        .collect();
    pairs.push((xv, random(x.shape(), rng)));
    let start = Instant::now();
    let jvp = tape.jvp(z, &pairs, &BackwardOptions::default())?;
    let jvp_time = start.elapsed();
    let w = random(jvp.tangent().shape(), rng);
    let grads = z.backward_with(&BackwardOptions::seed(w.clone()))?;
    let dot = |a: &ndarray::ArrayD<f64>, b: &ndarray::ArrayD<f64>| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>();
    let forward = dot(jvp.tangent(), &w);
    let mut reverse = 0.0;
    for (v, t) in &pairs {
        reverse += dot(t, grads.wrt(*v)?);
    }
    let rel = (forward - reverse).abs() / forward.abs().max(reverse.abs()).max(f64::MIN_POSITIVE);
    eprintln!("dot test, whole layer (forward mode {jvp_time:.2?}): relative gap {rel:.2e}");
    Ok(rel)
}
