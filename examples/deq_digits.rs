//! A deep equilibrium network trained on the digits data set with implicit gradients through
//! relu kinks, the hypothesis of the nonsmooth implicit function theorem checked on every
//! backward pass.
//!
//! Model: `z* = relu(W z* + U x + b)` (width 128, `||W|| = 0.9` by spectral normalisation, or
//! the monotone form), then `logits = V z* + c`; softmax cross-entropy, Adam, batch 64.
//! Data: `data/digits.csv`; test set: rows whose index is a multiple of 5 (360 rows); pixels
//! scaled to [0, 1].
//!
//! ```text
//! cargo run --release --example deq_digits -- [--mode implicit|unrolled|onestep] [--kink PRESET]
//!     [--param spectral|monotone] [--f32] [--epochs N] [--seed S] [--plot PATH] [--quick]
//!     [--no-check] [--forward picard|anderson] [--adjoint neumann|gmres|anderson]
//!     [--save-start DIR]
//! ```
//!
//! `--no-check` trains without the hypothesis check (the same step otherwise), for timing
//! against frameworks that have none (`benches/peers/deq_digits.py`).
//!
//! `--save-start DIR` writes the run's starting point to `DIR/deq_digits_start.json`: the
//! initial parameters (by name), the power iteration's initial vector and the batches of
//! every epoch, so that another implementation can train the same network from the same
//! start on the same batches (`benches/peers/deq_digits.py` reads it).
//!
//! Progress goes to stderr; the last line on stdout is one JSON object with the results.

use std::time::Instant;

use clap::{Parser, ValueEnum};
use clarke::core::{KinkPolicy, Scalar, Tape};
use clarke::implicit::{AdjointSolver, CheckOutcome, GradientMode};
use clarke::nn::data::{Dataset, Scaler, batches};
use clarke::nn::deq::{DeqConfig, DeqLayer, ForwardMethod, Parametrization};
use clarke::nn::optim::{Adam, Optimizer, Schedule};
use clarke::nn::train::{EpochRecord, History, Progress, accuracy};
use clarke::nn::{Linear, ParamSet};
use ndarray::{Array2, Ix2};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

/// Training rows the quick mode uses (the first ones of the training split).
const QUICK_TRAIN_ROWS: usize = 320;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Implicit gradient: adjoint solve at the fixed point.
    Implicit,
    /// Backpropagation through 30 Picard iterations on the tape.
    Unrolled,
    /// Jacobian-free: one application of the cell at the detached fixed point.
    Onestep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Param {
    /// W = 0.9 V / sigma_max(V).
    Spectral,
    /// W = (1 - m) I - A^T A + B - B^T with m = 0.5.
    Monotone,
}

/// The memory of the Anderson solvers the flags select.
const ANDERSON_MEMORY: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Forward {
    /// z <- relu(z W^T + x U^T + b).
    Picard,
    /// Picard with per-sample Anderson mixing (memory 5).
    Anderson,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Adjoint {
    /// The Neumann series.
    Neumann,
    /// Restarted GMRES.
    Gmres,
    /// The Neumann iteration with per-sample Anderson mixing (memory 5).
    Anderson,
}

#[derive(Parser, Debug)]
#[command(about = "Train a DEQ on digits with implicit gradients and the hypothesis check")]
struct Args {
    /// How the gradient through the fixed point is computed.
    #[arg(long, value_enum, default_value = "implicit")]
    mode: Mode,
    /// Kink policy preset (relu'(0) and friends): pytorch, jax, tensorflow, min_norm, midpoint, one.
    #[arg(long, default_value = "pytorch")]
    kink: String,
    /// Parametrisation of W.
    #[arg(long, value_enum, default_value = "spectral")]
    param: Param,
    /// Train in f32.
    #[arg(long)]
    f32: bool,
    /// Epochs.
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// Seed of the initialisation and the shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Width of z.
    #[arg(long, default_value_t = 128)]
    width: usize,
    /// Mini-batch size.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Adam step size.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Forward and adjoint tolerance (per-sample relative residual).
    #[arg(long, default_value_t = 1e-5)]
    tol: f64,
    /// Save loss, test accuracy and iteration counts per epoch as a PNG.
    #[arg(long)]
    plot: Option<String>,
    /// A short run for CI (2 epochs on 320 training rows).
    #[arg(long)]
    quick: bool,
    /// Path of the data file.
    #[arg(long, default_value = "data/digits.csv")]
    data: String,
    /// Skip the hypothesis check on the backward passes (it is on by default).
    #[arg(long)]
    no_check: bool,
    /// Forward solver. Default: the parametrisation's own (Picard for spectral,
    /// Peaceman-Rachford splitting for monotone).
    #[arg(long, value_enum)]
    forward: Option<Forward>,
    /// Adjoint solver of the implicit mode. Default: Neumann for spectral, GMRES for monotone.
    #[arg(long, value_enum)]
    adjoint: Option<Adjoint>,
    /// Write the initial parameters, the power iteration's initial vector and every epoch's
    /// batches to DIR/deq_digits_start.json (after training).
    #[arg(long, value_name = "DIR")]
    save_start: Option<String>,
}

fn main() {
    let args = Args::parse();
    let result = if args.f32 { run::<f32>(&args) } else { run::<f64>(&args) };
    if let Err(e) = result {
        eprintln!("deq_digits: {e}");
        std::process::exit(1);
    }
}

fn run<S: Scalar>(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let policy = KinkPolicy::preset(&args.kink)?;
    let epochs = if args.quick { 2 } else { args.epochs };
    let data = Dataset::from_csv(&args.data)?;
    let (train, test) = data.split_by_index(|i| i % 5 == 0)?;
    // The quick mode is a smoke test of the whole program: a slice of the training rows.
    let train = if args.quick {
        train.select(&(0..QUICK_TRAIN_ROWS).collect::<Vec<_>>())?
    } else {
        train
    };
    let scaler = Scaler::constant(train.features(), 16.0)?;
    let x_train: Array2<S> = scaler.apply(&train.x)?.mapv(S::from_f64_lossy);
    let x_test: Array2<S> = scaler.apply(&test.x)?.mapv(S::from_f64_lossy);

    let gradient = match args.mode {
        Mode::Implicit => GradientMode::Implicit(match (args.adjoint, args.param) {
            (Some(Adjoint::Neumann), _) | (None, Param::Spectral) => AdjointSolver::Neumann,
            (Some(Adjoint::Gmres), _) | (None, Param::Monotone) => AdjointSolver::Gmres,
            (Some(Adjoint::Anderson), _) => AdjointSolver::Anderson {
                memory: ANDERSON_MEMORY,
            },
        }),
        Mode::Unrolled => GradientMode::Unrolled { iterations: 30 },
        Mode::Onestep => GradientMode::OneStep,
    };
    let parametrization = match args.param {
        Param::Spectral => Parametrization::SpectralNorm { gamma: 0.9 },
        Param::Monotone => Parametrization::Monotone { m: 0.5 },
    };
    let config = DeqConfig::default()
        .with_parametrization(parametrization)
        .with_gradient(gradient)
        .with_forward_tolerance(args.tol, 1000)
        .with_adjoint_tolerance(args.tol, 1000)
        .with_check(!args.no_check);
    let config = match args.forward {
        None => config,
        Some(Forward::Picard) => config.with_forward(ForwardMethod::Picard),
        Some(Forward::Anderson) => config.with_forward(ForwardMethod::Anderson {
            memory: ANDERSON_MEMORY,
        }),
    };

    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut params = ParamSet::<S>::new();
    let deq = DeqLayer::new(&mut params, "deq", train.features(), args.width, config, &mut rng)?;
    let head = Linear::new(&mut params, "head", args.width, data.classes, &mut rng)?;
    let mut adam = Adam::new(Schedule::Constant(args.lr))?;
    let mut starting_point = args.save_start.as_ref().map(|_| StartingPoint::new(&params, &deq));
    eprintln!(
        "deq_digits: {} train / {} test rows, width {}, {} parameters, mode {}, W {:?}, kink policy {}, {}",
        train.len(),
        test.len(),
        args.width,
        params.num_scalars(),
        gradient.name(),
        parametrization,
        policy.label(),
        S::NAME
    );

    let mut history = History::default();
    let progress = Progress::new(epochs);
    let (mut fwd_total, mut adj_total, mut steps) = (0usize, 0usize, 0usize);
    let mut kink_hits = 0usize;
    for epoch in 1..=epochs {
        let start = Instant::now();
        let (mut loss_sum, mut fwd, mut adj, mut n_batches) = (0.0, 0usize, 0usize, 0usize);
        let epoch_batches = batches(train.len(), args.batch, &mut rng)?;
        if let Some(starting_point) = &mut starting_point {
            starting_point.batches.push(epoch_batches.clone());
        }
        for idx in epoch_batches {
            let tape = Tape::<S>::with_policy(policy.clone())?;
            let bound = params.bind(&tape);
            let x = tape.constant(x_train.select(ndarray::Axis(0), &idx).into_dyn());
            let labels: Vec<usize> = idx.iter().map(|&i| train.y[i]).collect();
            let reports_before = deq.reports().len();
            let z = deq.forward(&bound, x)?;
            let loss = head.forward(&bound, z)?.try_softmax_cross_entropy(&labels)?;
            let grads = loss.backward()?;
            let gradients = bound.gradients(&grads, &params)?;
            adam.step(&mut params, &gradients)?;
            loss_sum += loss.scalar().to_f64_exact();
            n_batches += 1;
            match args.mode {
                Mode::Unrolled => fwd += 30,
                _ => fwd += deq.last_forward().map_or(0, |s| s.iterations),
            }
            if deq.reports().len() > reports_before {
                let report = deq.reports().last().expect("a report was pushed");
                adj += report.adjoint.map_or(0, |a| a.iterations);
                kink_hits += report.kinks.exact_hits();
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        let test_accuracy = evaluate(&deq, &head, &params, &x_test, &test.y)?;
        fwd_total += fwd;
        adj_total += adj;
        steps += n_batches;
        let record = EpochRecord {
            epoch,
            train_loss: loss_sum / n_batches as f64,
            test_accuracy,
            forward_iterations: fwd as f64 / n_batches as f64,
            adjoint_iterations: adj as f64 / n_batches as f64,
            seconds,
        };
        progress.epoch(&record);
        history.push(record);
    }
    progress.finish();

    let reports = deq.reports().all();
    let count = |o: CheckOutcome| reports.iter().filter(|r| r.check.outcome == o).count();
    if let Some(last) = reports.last() {
        eprintln!("last backward report:\n{last}");
    }
    if let (Some(dir), Some(starting_point)) = (&args.save_start, &starting_point) {
        let path = std::path::Path::new(dir).join("deq_digits_start.json");
        starting_point.write(&path)?;
        eprintln!("starting point written to {}", path.display());
    }
    if let Some(path) = &args.plot {
        history.plot(path, "DEQ on digits")?;
        eprintln!("plot written to {path}");
    }
    let last = history.last().expect("at least one epoch");
    let summary = json!({
        "example": "deq_digits",
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "parametrization": format!("{:?}", args.param).to_lowercase(),
        "scalar": S::NAME,
        "kink_policy": policy.label(),
        "epochs": epochs,
        "width": args.width,
        "batch": args.batch,
        "hypothesis_check": !args.no_check,
        "test_accuracy": last.test_accuracy,
        "final_train_loss": last.train_loss,
        "train_seconds": history.train_seconds(),
        "mean_forward_iters": fwd_total as f64 / steps.max(1) as f64,
        "mean_adjoint_iters": adj_total as f64 / steps.max(1) as f64,
        "kink_hits_at_fixed_points": kink_hits,
        "check": {
            "certified": count(CheckOutcome::Certified),
            "warning": count(CheckOutcome::Warning),
            "violated": count(CheckOutcome::Violated),
            "not_checked": count(CheckOutcome::NotChecked),
        },
        "test_accuracy_per_epoch": history.epochs.iter().map(|e| e.test_accuracy).collect::<Vec<_>>(),
    });
    println!("{summary}");
    Ok(())
}

/// Test accuracy, the whole test set in one batch, without gradients.
fn evaluate<S: Scalar>(
    deq: &DeqLayer<S>,
    head: &Linear,
    params: &ParamSet<S>,
    x: &Array2<S>,
    y: &[usize],
) -> Result<f64, Box<dyn std::error::Error>> {
    let tape = Tape::<S>::new();
    let bound = params.bind_constant(&tape);
    let z = deq.forward(&bound, tape.constant(x.clone().into_dyn()))?;
    let logits = head.forward(&bound, z)?.value().into_dimensionality::<Ix2>()?;
    Ok(accuracy(logits.view(), y)?)
}

/// Where a training run starts: what another implementation needs to train the same network
/// on the same batches (`--save-start`).
struct StartingPoint {
    /// Every parameter's initial value, by name, in f64.
    params: serde_json::Map<String, serde_json::Value>,
    /// The power iteration's initial vector.
    power_vector: Vec<f64>,
    /// The batches of each epoch (rows of the training split).
    batches: Vec<Vec<Vec<usize>>>,
}

impl StartingPoint {
    fn new<S: Scalar>(params: &ParamSet<S>, deq: &DeqLayer<S>) -> Self {
        let params = params
            .ids()
            .map(|id| {
                let value = params.get(id);
                let data: Vec<f64> = value.iter().map(|v| v.to_f64_exact()).collect();
                (
                    params.name(id).to_string(),
                    json!({ "shape": value.shape(), "data": data }),
                )
            })
            .collect();
        let power_vector = deq.power_vector().iter().map(|v| v.to_f64_exact()).collect();
        StartingPoint {
            params,
            power_vector,
            batches: Vec::new(),
        }
    }

    fn write(&self, path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
        let text = json!({
            "params": self.params,
            "power_vector": self.power_vector,
            "batches": self.batches,
        });
        std::fs::write(path, text.to_string())
            .map_err(|e| format!("--save-start: cannot write {}: {e}", path.display()))?;
        Ok(())
    }
}
