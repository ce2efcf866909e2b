//! A DEQ on digits whose fixed point sits exactly at relu kinks: the gradient under several
//! selections of relu'(0), the hypothesis check for each, and what training does with each.
//!
//! The layer `z* = relu(W z* + U x + b)` (width 64) is initialised with a block `K` of 16 units
//! that see neither the input nor the other units (`U_K = 0`, `b_K = 0`, `W_{K, not K} = 0`).
//! Then `z*_K = 0` and the pre-activation `p*_K = W_KK z*_K = 0` exactly, for every sample: 16
//! kinks per sample. Which element of the conservative Jacobian backpropagation uses there is
//! relu'(0) = s:
//! - with `||W|| = 0.5`, `I - diag(d) W` is invertible for every `d`: the check certifies
//!   every selection (while training keeps `||W||` below one); `s = 0` leaves the block
//!   without gradient (it stays dead for ever), `s > 0` lets gradient in and training revives
//!   it;
//! - with `W_KK = I` (unconstrained), `z_K` is not unique (every `z_K >= 0` with zero input is a
//!   fixed point); the selected element `I - s W_KK = (1 - s) I` is invertible for `s < 1`,
//!   but the element with `d_K = 1` is singular, so the check (which walks every selection at
//!   the kinks) reports the hypothesis violated and refuses the backward for every `s`.
//!
//! ```text
//! cargo run --release --example selection_sweep -- [--epochs E] [--plot PATH] [--quick]
//! ```
//!
//! Progress on stderr; the last line on stdout is one JSON object.

use clap::Parser;
use clarke::core::{Error, KinkPolicy, Result, Tape};
use clarke::implicit::{AdjointSolver, GradientMode};
use clarke::nn::data::{Dataset, Scaler, batches};
use clarke::nn::deq::{DeqConfig, DeqLayer, Parametrization};
use clarke::nn::optim::{Adam, Optimizer, Schedule};
use clarke::nn::plot::{Panel, save_png};
use clarke::nn::train::accuracy;
use clarke::nn::{Linear, ParamSet};
use ndarray::{Array2, Axis, Ix2, s};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "A DEQ whose fixed point sits at relu kinks, under several relu'(0)")]
struct Args {
    /// Training epochs per selection.
    #[arg(long, default_value_t = 8)]
    epochs: usize,
    /// Save gradient size, accuracy and live units against the selection as a PNG.
    #[arg(long)]
    plot: Option<String>,
    /// A short run for CI (1 epoch on 256 training rows, 2 probe rows, 3 selections).
    #[arg(long)]
    quick: bool,
    /// Path of the data file.
    #[arg(long, default_value = "data/digits.csv")]
    data: String,
}

const WIDTH: usize = 64;
const DEAD: usize = 16;

/// Training rows the quick mode uses (the first ones of the training split).
const QUICK_TRAIN_ROWS: usize = 256;

struct Model {
    params: ParamSet<f64>,
    deq: DeqLayer<f64>,
    head: Linear,
}

/// The DEQ with its block `K` (the first 16 units) cut off; `identity_block` makes it the
/// unconstrained form with `W_KK = I`.
fn model(identity_block: bool) -> Result<Model> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let config = DeqConfig::default()
        .with_parametrization(Parametrization::Unconstrained)
        .with_gradient(GradientMode::Implicit(AdjointSolver::Dense))
        .with_forward_tolerance(1e-10, 2000);
    let mut params = ParamSet::new();
    let deq = DeqLayer::new(&mut params, "deq", 64, WIDTH, config, &mut rng)?;
    let head = Linear::new(&mut params, "head", WIDTH, 10, &mut rng)?;
    let w_id = params.id("deq.w").expect("the layer's weight");
    {
        let w = params.get_mut(w_id);
        let mut w = w.view_mut().into_dimensionality::<Ix2>().expect("square");
        w.slice_mut(s![..DEAD, DEAD..]).fill(0.0);
        let norm = clarke::solve::dense::singular_values(w.view())?[0];
        w.mapv_inplace(|v| v * 0.5 / norm);
        if identity_block {
            w.slice_mut(s![..DEAD, ..DEAD]).assign(&Array2::eye(DEAD));
        }
    }
    let u_id = params.id("deq.u").expect("input weights");
    params.get_mut(u_id).slice_mut(s![..DEAD, ..]).fill(0.0);
    let b_id = params.id("deq.bias").expect("bias");
    params.get_mut(b_id).slice_mut(s![..DEAD]).fill(0.0);
    let rest = params.get_mut(b_id);
    rest.slice_mut(s![DEAD..]).fill(0.1);
    Ok(Model { params, deq, head })
}

/// Loss and gradients of one batch under relu'(0) = `s`.
fn step(m: &Model, x: &Array2<f64>, y: &[usize], s: f64) -> Result<(f64, Vec<ndarray::ArrayD<f64>>)> {
    let tape = Tape::<f64>::with_policy(KinkPolicy::pytorch().with_relu(s))?;
    let bound = m.params.bind(&tape);
    let z = m.deq.forward(&bound, tape.constant(x.clone().into_dyn()))?;
    let loss = m.head.forward(&bound, z)?.try_softmax_cross_entropy(y)?;
    let grads = loss.backward()?;
    Ok((loss.scalar(), bound.gradients(&grads, &m.params)?))
}

/// Norm of the gradient that reaches block `K` (its input weights and biases).
fn block_gradient(m: &Model, grads: &[ndarray::ArrayD<f64>]) -> f64 {
    let u = &grads[m.params.id("deq.u").expect("u").index()];
    let b = &grads[m.params.id("deq.bias").expect("b").index()];
    let su: f64 = u.slice(s![..DEAD, ..]).iter().map(|v| v * v).sum();
    let sb: f64 = b.slice(s![..DEAD]).iter().map(|v| v * v).sum();
    (su + sb).sqrt()
}

/// Units of block `K` whose pre-activation is still exactly 0 for every test sample.
fn dead_units(m: &Model, x: &Array2<f64>) -> Result<usize> {
    let tape = Tape::<f64>::new();
    let bound = m.params.bind_constant(&tape);
    let z = m.deq.forward(&bound, tape.constant(x.clone().into_dyn()))?;
    let w = m.deq.weight(&bound)?;
    let u = bound.var(m.params.id("deq.u").expect("u"));
    let b = bound.var(m.params.id("deq.bias").expect("b"));
    let pre = z
        .try_matmul(w.t())?
        .try_add(tape.constant(x.clone().into_dyn()).try_matmul(u.t())?)?
        .try_add(b)?;
    let pre = pre.value().into_dimensionality::<Ix2>().expect("2-D");
    Ok((0..DEAD).filter(|&j| pre.column(j).iter().all(|v| *v == 0.0)).count())
}

fn test_accuracy(m: &Model, x: &Array2<f64>, y: &[usize]) -> Result<f64> {
    let tape = Tape::<f64>::new();
    let bound = m.params.bind_constant(&tape);
    let z = m.deq.forward(&bound, tape.constant(x.clone().into_dyn()))?;
    let logits = m
        .head
        .forward(&bound, z)?
        .value()
        .into_dimensionality::<Ix2>()
        .expect("2-D");
    accuracy(logits.view(), y)
}

fn main() {
    if let Err(e) = run(&Args::parse()) {
        eprintln!("selection_sweep: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let epochs = if args.quick { 1 } else { args.epochs };
    let data = Dataset::from_csv(&args.data)?;
    let (train, test) = data.split_by_index(|i| i % 5 == 0)?;
    // The quick mode is a smoke test of the whole program: a slice of the training rows.
    let train = if args.quick {
        train.select(&(0..QUICK_TRAIN_ROWS).collect::<Vec<_>>())?
    } else {
        train
    };
    let scaler = Scaler::constant(train.features(), 16.0)?;
    let (x_train, x_test) = (scaler.apply(&train.x)?, scaler.apply(&test.x)?);
    let probe: Vec<usize> = (0..if args.quick { 2 } else { 128 }).collect();
    let (x_probe, y_probe) = (
        x_train.select(Axis(0), &probe),
        probe.iter().map(|&i| train.y[i]).collect::<Vec<_>>(),
    );

    // 1. The gradient at initialisation under each selection, both forms.
    let selections: &[f64] = if args.quick {
        &[0.0, 0.5, 1.0]
    } else {
        &[0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0]
    };
    let mut sweep = Vec::new();
    eprintln!(
        "{:>6} | {:>22} {:>10} | {:>22} {:>10}",
        "s", "||grad_K|| (||W||=0.5)", "check", "||grad_K|| (W_KK = I)", "check"
    );
    for &s in selections {
        let spectral = model(false)?;
        let (_, g) = step(&spectral, &x_probe, &y_probe, s)?;
        let report = spectral.deq.reports().last().expect("one backward");
        let spectral_norm = block_gradient(&spectral, &g);
        let spectral_check = report.check.outcome.to_string();
        let kinks = report.kinks.exact_hits();

        let identity = model(true)?;
        let (identity_norm, identity_check) = match step(&identity, &x_probe, &y_probe, s) {
            Ok((_, g)) => (
                Some(block_gradient(&identity, &g)),
                identity
                    .deq
                    .reports()
                    .last()
                    .expect("one backward")
                    .check
                    .outcome
                    .to_string(),
            ),
            Err(Error::HypothesisViolated { .. }) => (None, "violated (refused)".to_string()),
            Err(e) => return Err(e.into()),
        };
        eprintln!(
            "{s:>6} | {spectral_norm:>22.4e} {spectral_check:>10} | {:>22} {identity_check:>10}",
            identity_norm.map_or("refused".to_string(), |v| format!("{v:.4e}"))
        );
        sweep.push(json!({
            "relu_prime_0": s,
            "kinks_per_batch": kinks,
            "contraction": { "block_gradient_norm": spectral_norm, "check": spectral_check },
            "identity_block": { "block_gradient_norm": identity_norm, "check": identity_check },
        }));
    }

    // 2. Training under each selection, from the contraction (certified while ||W|| < 1).
    let mut training = Vec::new();
    let mut curves = Vec::new();
    for &s in &[0.0, 0.5, 1.0] {
        let mut m = model(false)?;
        let mut adam = Adam::new(Schedule::Constant(3e-3))?;
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut curve = Vec::new();
        for epoch in 1..=epochs {
            for idx in batches(x_train.nrows(), 64, &mut rng)? {
                let labels: Vec<usize> = idx.iter().map(|&i| train.y[i]).collect();
                let (_, g) = step(&m, &x_train.select(Axis(0), &idx), &labels, s)?;
                adam.step(&mut m.params, &g)?;
            }
            let acc = test_accuracy(&m, &x_test, &test.y)?;
            let dead = dead_units(&m, &x_test)?;
            eprintln!(
                "relu'(0) = {s}: epoch {epoch}, test accuracy {acc:.4}, block units still at the kink {dead}/{DEAD}"
            );
            curve.push((epoch as f64, acc, dead as f64));
        }
        let last = *curve.last().expect("at least one epoch");
        let certified = m
            .deq
            .reports()
            .all()
            .iter()
            .filter(|r| r.check.outcome.to_string() == "certified")
            .count();
        training.push(json!({
            "relu_prime_0": s,
            "final_test_accuracy": last.1,
            "block_units_at_kink": last.2,
            "backward_passes": m.deq.reports().len(),
            "certified": certified,
        }));
        curves.push((s, curve));
    }

    if let Some(path) = &args.plot {
        let grad = |key: &str| -> Vec<(f64, f64)> {
            sweep
                .iter()
                .filter_map(|r| Some((r["relu_prime_0"].as_f64()?, r[key]["block_gradient_norm"].as_f64()?)))
                .collect()
        };
        let mut acc = Panel::new("test accuracy while training").labels("epoch", "accuracy");
        let mut dead = Panel::new("block units still at the kink").labels("epoch", "units (of 16)");
        for (s, c) in &curves {
            acc = acc.line_points(format!("relu'(0) = {s}"), c.iter().map(|p| (p.0, p.1)).collect());
            dead = dead.line_points(format!("relu'(0) = {s}"), c.iter().map(|p| (p.0, p.2)).collect());
        }
        let panels = [
            Panel::new("gradient reaching the block at init")
                .labels("relu'(0)", "||grad_K||")
                .log_y()
                .line_points("||W|| = 0.5 (certified)", grad("contraction"))
                .line_points("W_KK = I (1/(1-s); refused at 1)", grad("identity_block")),
            acc,
            dead,
        ];
        save_png(path, &panels)?;
        eprintln!("plot written to {path}");
    }
    let summary = json!({
        "example": "selection_sweep",
        "width": WIDTH,
        "block_at_kink": DEAD,
        "sweep": sweep,
        "training": training,
        "epochs": epochs,
    });
    println!("{summary}");
    Ok(())
}
