//! The numerical influence of relu'(0) on backpropagation (Bertoin, Bolte, Gerchinovitz and
//! Pauwels, NeurIPS 2021), on the digits data.
//!
//! In exact arithmetic a relu pre-activation is almost never exactly 0, so the choice of
//! relu'(0) should not matter. In floating point, rounding (absorption, cancellation) makes
//! exact zeros happen, and then backpropagation with relu'(0) = 0 and with relu'(0) = 1
//! return different gradients.
//!
//! 1. For many seeded initialisations of an MLP 64-256-256-256-10 (PyTorch's default
//!    initialisation), backpropagate every mini-batch (128 rows) of one epoch at those
//!    parameters with relu'(0) = 0 and relu'(0) = 1 (two backward passes over one recorded
//!    graph) and count the initialisations for which some first-layer gradient differs, in f32
//!    and in f64.
//! 2. Train two copies of one f32 network with SGD (momentum 0.9), one with each selection, on
//!    the same batches, and follow how far their weights drift apart.
//!
//! ```text
//! cargo run --release --example relu_prime -- [--inits N] [--epochs E] [--plot PATH] [--quick]
//! ```
//!
//! Progress on stderr; the last line on stdout is one JSON object.

use std::time::Instant;

use clap::Parser;
use clarke::core::{BackwardOptions, KinkPolicy, Result, Scalar, Tape};
use clarke::nn::data::{Dataset, Scaler, batches};
use clarke::nn::optim::{Optimizer, Schedule, Sgd};
use clarke::nn::plot::{Panel, save_png};
use clarke::nn::train::accuracy;
use clarke::nn::{Linear, ParamSet};
use ndarray::{Array2, ArrayD, Axis, Ix2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "How often relu'(0) changes backpropagation, in f32 and f64")]
struct Args {
    /// Seeded initialisations to test.
    #[arg(long, default_value_t = 200)]
    inits: usize,
    /// Epochs of the two training runs (kink hits are rare on digits in f32: the first one
    /// typically comes after tens of epochs).
    #[arg(long, default_value_t = 100)]
    epochs: usize,
    /// Mini-batch size.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// SGD step size of the training runs.
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// Save the drift between the two training runs and their test accuracy as a PNG.
    #[arg(long)]
    plot: Option<String>,
    /// A short run for CI (8 initialisations, 1 epoch).
    #[arg(long)]
    quick: bool,
    /// Path of the data file.
    #[arg(long, default_value = "data/digits.csv")]
    data: String,
}

const SIZES: [usize; 5] = [64, 256, 256, 256, 10];

/// An MLP with relu between its linear layers.
struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    /// PyTorch's default initialisation: weights and biases uniform in
    /// `(-1/sqrt(fan_in), 1/sqrt(fan_in))`, drawn in f64 and rounded to `S`.
    fn new<S: Scalar>(params: &mut ParamSet<S>, seed: u64) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut layers = Vec::new();
        for (i, w) in SIZES.windows(2).enumerate() {
            let layer = Linear::new(params, &format!("layer{i}"), w[0], w[1], &mut rng)?;
            let bound = 1.0 / (w[0] as f64).sqrt();
            let mut draw = |shape: &[usize]| {
                ArrayD::from_shape_simple_fn(shape.to_vec(), || S::from_f64_lossy(rng.random_range(-bound..bound)))
            };
            *params.get_mut(layer.weight()) = draw(&[w[1], w[0]]);
            *params.get_mut(layer.bias()) = draw(&[w[1]]);
            layers.push(layer);
        }
        Ok(Mlp { layers })
    }

    fn logits<'t, S: Scalar>(
        &self,
        bound: &clarke::nn::Bound<'t, S>,
        x: clarke::core::Var<'t, S>,
    ) -> Result<clarke::core::Var<'t, S>> {
        let mut h = x;
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(bound, h)?;
            if i + 1 < self.layers.len() {
                h = h.relu();
            }
        }
        Ok(h)
    }
}

/// One epoch of mini-batch gradients at fixed parameters, backpropagated with relu'(0) = 0
/// and = 1: whether some first-layer weight gradient differs, and the exact kink hits.
fn bifurcates<S: Scalar>(x: &Array2<f64>, y: &[usize], batch: usize, seed: u64) -> Result<(bool, usize)> {
    let mut params = ParamSet::<S>::new();
    let mlp = Mlp::new(&mut params, seed)?;
    let xs: Array2<S> = x.mapv(S::from_f64_lossy);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let (mut differs, mut hits) = (false, 0);
    for idx in batches(xs.nrows(), batch, &mut rng)? {
        let tape = Tape::<S>::new();
        let bound = params.bind(&tape);
        let xb = tape.constant(xs.select(Axis(0), &idx).into_dyn());
        let labels: Vec<usize> = idx.iter().map(|&i| y[i]).collect();
        let loss = mlp.logits(&bound, xb)?.try_softmax_cross_entropy(&labels)?;
        let first = bound.var(mlp.layers[0].weight());
        let g0 = loss.backward_with(&BackwardOptions::policy(KinkPolicy::pytorch().with_relu(0.0)))?;
        let g1 = loss.backward_with(&BackwardOptions::policy(KinkPolicy::pytorch().with_relu(1.0)))?;
        hits += g0.ledger().exact_hits();
        if g0.wrt(first)? != g1.wrt(first)? {
            differs = true;
        }
    }
    Ok((differs, hits))
}

/// The fraction of initialisations in the bifurcation zone, and the kink hits, in precision `S`.
fn volume<S: Scalar>(x: &Array2<f64>, y: &[usize], batch: usize, inits: usize) -> Result<(f64, usize, usize)> {
    let results: Vec<Result<(bool, usize)>> = (0..inits as u64)
        .into_par_iter()
        .map(|seed| bifurcates::<S>(x, y, batch, seed))
        .collect();
    let (mut count, mut hits, mut with_hits) = (0, 0, 0);
    for r in results {
        let (d, h) = r?;
        count += d as usize;
        hits += h;
        with_hits += (h > 0) as usize;
    }
    Ok((count as f64 / inits as f64, hits, with_hits))
}

/// Test accuracy of the MLP.
fn evaluate(mlp: &Mlp, params: &ParamSet<f32>, x: &Array2<f32>, y: &[usize]) -> Result<f64> {
    let tape = Tape::<f32>::new();
    let bound = params.bind_constant(&tape);
    let logits = mlp.logits(&bound, tape.constant(x.clone().into_dyn()))?.value();
    let logits = logits.into_dimensionality::<Ix2>().expect("2-D logits");
    accuracy(logits.view(), y)
}

/// Relative distance between two parameter sets.
fn distance(a: &ParamSet<f32>, b: &ParamSet<f32>) -> f64 {
    let (mut d2, mut n2) = (0.0f64, 0.0f64);
    for (p, q) in a.values().iter().zip(b.values()) {
        for (u, v) in p.iter().zip(q.iter()) {
            d2 += f64::from(u - v).powi(2);
            n2 += f64::from(*u).powi(2);
        }
    }
    (d2 / n2).sqrt()
}

fn main() {
    if let Err(e) = run(&Args::parse()) {
        eprintln!("relu_prime: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let (inits, epochs) = if args.quick { (8, 1) } else { (args.inits, args.epochs) };
    let data = Dataset::from_csv(&args.data)?;
    let (train, test) = data.split_by_index(|i| i % 5 == 0)?;
    let scaler = Scaler::constant(train.features(), 16.0)?;
    let (x_train, x_test) = (scaler.apply(&train.x)?, scaler.apply(&test.x)?);

    // 1. The bifurcation zone's volume.
    let start = Instant::now();
    let (frac32, hits32, inits_hit32) = volume::<f32>(&x_train, &train.y, args.batch, inits)?;
    let (frac64, hits64, inits_hit64) = volume::<f64>(&x_train, &train.y, args.batch, inits)?;
    eprintln!(
        "{inits} initialisations, one epoch of batches of {}: first-layer gradients differ between relu'(0) = 0 and 1 \
         for {:.1}% in f32 ({hits32} exact kink hits, in {inits_hit32} initialisations) and {:.1}% in f64 \
         ({hits64} hits, {inits_hit64} initialisations) [{:.1} s]",
        args.batch,
        100.0 * frac32,
        100.0 * frac64,
        start.elapsed().as_secs_f64()
    );

    // 2. Two f32 trainings from one initialisation, differing only in relu'(0).
    let xtr: Array2<f32> = x_train.mapv(|v| v as f32);
    let xte: Array2<f32> = x_test.mapv(|v| v as f32);
    let mut nets = Vec::new();
    for _ in 0..2 {
        let mut params = ParamSet::<f32>::new();
        let mlp = Mlp::new(&mut params, 0)?;
        let opt = Sgd::<f32>::new(Schedule::Constant(args.lr), 0.9)?;
        nets.push((params, mlp, opt));
    }
    let policies = [
        KinkPolicy::pytorch().with_relu(0.0),
        KinkPolicy::pytorch().with_relu(1.0),
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut curve = Vec::new();
    let mut train_hits = [0usize; 2];
    for epoch in 1..=epochs {
        for idx in batches(xtr.nrows(), args.batch, &mut rng)? {
            let labels: Vec<usize> = idx.iter().map(|&i| train.y[i]).collect();
            let xb = xtr.select(Axis(0), &idx);
            for (k, (params, mlp, opt)) in nets.iter_mut().enumerate() {
                let tape = Tape::<f32>::with_policy(policies[k].clone())?;
                let bound = params.bind(&tape);
                let loss = mlp
                    .logits(&bound, tape.constant(xb.clone().into_dyn()))?
                    .try_softmax_cross_entropy(&labels)?;
                let grads = loss.backward()?;
                train_hits[k] += grads.ledger().exact_hits();
                let g = bound.gradients(&grads, params)?;
                opt.step(params, &g)?;
            }
        }
        let acc = [
            evaluate(&nets[0].1, &nets[0].0, &xte, &test.y)?,
            evaluate(&nets[1].1, &nets[1].0, &xte, &test.y)?,
        ];
        let drift = distance(&nets[0].0, &nets[1].0);
        eprintln!(
            "epoch {epoch:>3}: test accuracy {:.4} (relu'(0) = 0) / {:.4} (relu'(0) = 1), relative weight distance {drift:.3e}, \
             kink hits so far {} / {}",
            acc[0], acc[1], train_hits[0], train_hits[1]
        );
        curve.push((epoch, acc, drift));
    }

    if let Some(path) = &args.plot {
        let panels = [
            Panel::new("f32 weights: relu'(0) = 0 vs 1")
                .labels("epoch", "||theta_0 - theta_1|| / ||theta_0||")
                .log_y()
                .line_points("relative distance", curve.iter().map(|c| (c.0 as f64, c.2)).collect()),
            Panel::new("test accuracy")
                .labels("epoch", "accuracy")
                .line_points("relu'(0) = 0", curve.iter().map(|c| (c.0 as f64, c.1[0])).collect())
                .line_points("relu'(0) = 1", curve.iter().map(|c| (c.0 as f64, c.1[1])).collect()),
        ];
        save_png(path, &panels)?;
        eprintln!("plot written to {path}");
    }
    let last = curve.last().expect("at least one epoch");
    let summary = json!({
        "example": "relu_prime",
        "architecture": SIZES,
        "batch": args.batch,
        "initialisations": inits,
        "fraction_differing_f32": frac32,
        "fraction_differing_f64": frac64,
        "kink_hits_f32": hits32,
        "kink_hits_f64": hits64,
        "initialisations_with_hits_f32": inits_hit32,
        "initialisations_with_hits_f64": inits_hit64,
        "training": {
            "epochs": epochs,
            "final_accuracy_relu0_0": last.1[0],
            "final_accuracy_relu0_1": last.1[1],
            "final_relative_weight_distance": last.2,
            "kink_hits_relu0_0": train_hits[0],
            "kink_hits_relu0_1": train_hits[1],
            "distance_per_epoch": curve.iter().map(|c| c.2).collect::<Vec<_>>(),
        },
    });
    println!("{summary}");
    Ok(())
}
