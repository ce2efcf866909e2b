//! A ReLU MLP trained on the digits data set, with the kink ledger of every epoch.
//!
//! Data: `data/digits.csv` (1797 8x8 images, pixels 0..16, label last). Test set: rows whose
//! index is a multiple of 5 (360 rows); training set: the others. Pixels are scaled to [0, 1].
//!
//! ```text
//! cargo run --release --example mlp_digits -- [--f32] [--kink pytorch|jax|tensorflow|min_norm|midpoint|one]
//!                                             [--epochs N] [--seed S] [--hidden H] [--quick]
//! ```
//!
//! Progress goes to stderr; the last line on stdout is one JSON object with the results.

use std::time::Instant;

use clap::Parser;
use clarke::core::{KinkLedger, KinkPolicy, Scalar, Tape};
use ndarray::{Array1, Array2, Axis};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Parser, Debug)]
#[command(about = "Train a ReLU MLP on digits and report the kinks backprop hit")]
struct Args {
    /// Train in f32 (kink hits from rounding are common in f32, rare in f64).
    #[arg(long)]
    f32: bool,
    /// Kink policy preset.
    #[arg(long, default_value = "pytorch")]
    kink: String,
    /// Epochs.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Seed of the initialisation and the shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Width of the two hidden layers.
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    /// Mini-batch size.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Learning rate of SGD with momentum 0.9.
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// A short run for CI (3 epochs).
    #[arg(long)]
    quick: bool,
    /// Path of the data file.
    #[arg(long, default_value = "data/digits.csv")]
    data: String,
}

struct Split {
    x_train: Array2<f64>,
    y_train: Vec<usize>,
    x_test: Array2<f64>,
    y_test: Vec<usize>,
}

fn load_digits(path: &str) -> Result<Split, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let mut rows: Vec<(Vec<f64>, usize)> = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let fields: Vec<&str> = line.trim().split(',').collect();
        if fields.len() != 65 {
            return Err(format!("{path}:{}: expected 65 fields, found {}", i + 1, fields.len()));
        }
        let parse = |s: &str| s.parse::<f64>().map_err(|e| format!("{path}:{}: {e}", i + 1));
        let pixels = fields[..64]
            .iter()
            .map(|s| parse(s).map(|v| v / 16.0))
            .collect::<Result<Vec<_>, _>>()?;
        let label = parse(fields[64])? as usize;
        rows.push((pixels, label));
    }
    let (mut xtr, mut ytr, mut xte, mut yte) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, (x, y)) in rows.into_iter().enumerate() {
        if i % 5 == 0 {
            xte.extend(x);
            yte.push(y);
        } else {
            xtr.extend(x);
            ytr.push(y);
        }
    }
    let to2 = |v: Vec<f64>, n: usize| Array2::from_shape_vec((n, 64), v).expect("64 pixels per row");
    Ok(Split {
        x_train: to2(xtr, ytr.len()),
        y_train: ytr,
        x_test: to2(xte, yte.len()),
        y_test: yte,
    })
}

/// Weights and biases of the three layers (W is out x in).
struct Mlp<S> {
    params: Vec<Array2<S>>,
    velocity: Vec<Array2<S>>,
}

impl<S: Scalar> Mlp<S> {
    fn new(sizes: &[usize], rng: &mut ChaCha8Rng) -> Self {
        let mut params = Vec::new();
        for w in sizes.windows(2) {
            let bound = (6.0 / w[0] as f64).sqrt(); // He-uniform for relu
            params.push(Array2::from_shape_fn((w[1], w[0]), |_| {
                S::from_f64_lossy(rng.random_range(-bound..bound))
            }));
            params.push(Array2::zeros((1, w[1])));
        }
        let velocity = params.iter().map(|p| Array2::zeros(p.raw_dim())).collect();
        Mlp { params, velocity }
    }

    /// Loss and kink ledger of a batch; applies one SGD-with-momentum step when `lr` is set.
    fn step(&mut self, x: &Array2<S>, y: &[usize], lr: Option<S>, policy: &KinkPolicy) -> (S, KinkLedger) {
        let tape = Tape::<S>::with_policy(policy.clone()).expect("validated preset");
        let vars: Vec<_> = self.params.iter().map(|p| tape.param(p.clone().into_dyn())).collect();
        let mut h = tape.constant(x.clone().into_dyn());
        let layers = vars.len() / 2;
        for l in 0..layers {
            h = h.matmul(vars[2 * l].t()) + vars[2 * l + 1];
            if l + 1 < layers {
                h = h.relu();
            }
        }
        let loss = h.softmax_cross_entropy(y);
        let grads = loss.backward().expect("backward of a scalar loss");
        if let Some(lr) = lr {
            let momentum = S::from_f64_lossy(0.9);
            for ((p, v), var) in self.params.iter_mut().zip(&mut self.velocity).zip(&vars) {
                let g = grads
                    .wrt(*var)
                    .expect("parameter")
                    .view()
                    .into_dimensionality::<ndarray::Ix2>()
                    .expect("2-D");
                v.zip_mut_with(&g, |v, &g| *v = momentum * *v + g);
                p.scaled_add(-lr, v);
            }
        }
        (loss.scalar(), grads.ledger().clone())
    }

    fn accuracy(&self, x: &Array2<S>, y: &[usize]) -> f64 {
        let mut h = x.clone();
        let layers = self.params.len() / 2;
        for l in 0..layers {
            h = h.dot(&self.params[2 * l].t()) + &self.params[2 * l + 1];
            if l + 1 < layers {
                h.mapv_inplace(|v| v.max(S::zero()));
            }
        }
        let correct = h
            .axis_iter(Axis(0))
            .zip(y)
            .filter(|&(ref row, &label)| {
                let best = row
                    .iter()
                    .enumerate()
                    .fold(0, |b, (i, &v)| if v > row[b] { i } else { b });
                best == label
            })
            .count();
        correct as f64 / y.len() as f64
    }
}

fn run<S: Scalar>(args: &Args, data: &Split, policy: &KinkPolicy) -> serde_json::Value {
    let cast = |a: &Array2<f64>| a.mapv(S::from_f64_lossy);
    let (xtr, xte) = (cast(&data.x_train), cast(&data.x_test));
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut model = Mlp::<S>::new(&[64, args.hidden, args.hidden, 10], &mut rng);
    let epochs = if args.quick { 3 } else { args.epochs };
    let lr = S::from_f64_lossy(args.lr);
    let mut order: Vec<usize> = (0..data.y_train.len()).collect();
    let (mut total_hits, mut steps_with_hits, mut steps) = (0usize, 0usize, 0usize);
    let start = Instant::now();
    let mut last_ledger = String::new();
    for epoch in 0..epochs {
        order.shuffle(&mut rng);
        let (mut loss_sum, mut epoch_hits) = (0.0, 0usize);
        for chunk in order.chunks(args.batch) {
            let xb = xtr.select(Axis(0), chunk);
            let yb: Vec<usize> = chunk.iter().map(|&i| data.y_train[i]).collect();
            let (loss, ledger) = model.step(&xb, &yb, Some(lr), policy);
            loss_sum += loss.to_f64_exact() * chunk.len() as f64;
            epoch_hits += ledger.exact_hits();
            steps += 1;
            if !ledger.is_clean() {
                steps_with_hits += 1;
            }
            last_ledger = ledger.summary();
        }
        total_hits += epoch_hits;
        let acc = model.accuracy(&xte, &data.y_test);
        eprintln!(
            "epoch {:>3}  loss {:.4}  test accuracy {:.4}  kink hits {}",
            epoch + 1,
            loss_sum / data.y_train.len() as f64,
            acc,
            epoch_hits
        );
    }
    let train_seconds = start.elapsed().as_secs_f64();
    let test_accuracy = model.accuracy(&xte, &data.y_test);
    eprintln!("last step: {last_ledger}");
    let ys = Array1::from(data.y_test.clone());
    serde_json::json!({
        "example": "mlp_digits",
        "precision": S::NAME,
        "kink_policy": policy.label(),
        "epochs": epochs,
        "test_rows": ys.len(),
        "test_accuracy": test_accuracy,
        "train_seconds": train_seconds,
        "steps": steps,
        "kink_hits": total_hits,
        "steps_with_kink_hits": steps_with_hits,
    })
}

fn main() {
    let args = Args::parse();
    let policy = match KinkPolicy::preset(&args.kink) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let data = match load_digits(&args.data) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    eprintln!(
        "digits: {} train / {} test rows, policy {policy}, {}",
        data.y_train.len(),
        data.y_test.len(),
        if args.f32 { "f32" } else { "f64" }
    );
    let result = if args.f32 {
        run::<f32>(&args, &data, &policy)
    } else {
        run::<f64>(&args, &data, &policy)
    };
    println!("{result}");
}
