//! A digits classifier whose output layer is sparsemax solved as a quadratic program inside
//! the network, trained end to end through the differentiable cone-program layer, against the
//! same network with the closed-form sparsemax.
//!
//! Model: scores `u = Linear(64 -> H) -> relu -> Linear(H -> 10)` (`--hidden 0`: one linear
//! layer), probabilities `p = sparsemax(u)`, the Euclidean projection of `u` onto the
//! probability simplex (Martins and Astudillo 2016), computed by the batched conic layer as
//!
//! ```text
//! minimise (1/2) ||p||^2 - u^T p   subject to   1^T p = 1,  -p <= 0
//! ```
//!
//! that is `P = I`, `A = [1^T; -I]`, `b = (1, 0)`, cones `Zero(1) x NonNeg(10)`, shared by the
//! batch, and `c = -u` of shape `[B, 10]`, one QP per sample. The backward pass is the
//! implicit derivative of the solution map, with the hypothesis check of the nonsmooth
//! implicit function theorem run on every sample.
//!
//! Loss (`--loss`): by default the sparsemax loss of Martins and Astudillo,
//! `L = <u, p> - ||p||^2 / 2 + 1/2 - u_y`, the loss sparsemax was designed with: its gradient
//! is `p - onehot(y)`, never zero on a wrong prediction. On the simplex
//! `<u, p> - ||p||^2 / 2 = ||p||^2 / 2 + tau`, where `tau` (`p = max(u - tau, 0)`) is the
//! multiplier `y_0` of the equality row, so the QP network computes
//! `L = ||p||^2 / 2 + y_0 + 1/2 - u_y` from the layer's primal and dual outputs: all of the
//! gradient but `-onehot(y)` flows through the layer's derivative. (Written with `<u, p>`,
//! the part through `p` would vanish, the envelope theorem, and training would not depend
//! on the layer's derivative.) The closed-form network uses the `<u, p>` form, which has the
//! same value and gradient. `--loss squared`, `(1/2) ||p - onehot(y)||^2`, goes through the
//! Jacobian of `p` only; it stalls: a prediction with a single, wrong non-zero class has a
//! zero gradient, because sparsemax is locally constant there.
//!
//! The comparison network has the same initialisation and the same batches, with the
//! closed-form sparsemax (`project_simplex`, row by row). Before training, the QP layer's
//! output and the gradients of both losses are compared with the closed form on the
//! untrained network's scores of 64 training rows and on 64 random score vectors (the run
//! stops with exit code 2 when they differ by more than `1e-8`), then, for information, on
//! two score vectors on kinks (`u_i == tau`), where each picks its element of the
//! conservative Jacobian under the kink policy.
//!
//! Data: `data/digits.csv`; test set: rows whose index is a multiple of 5 (360 rows); pixels
//! scaled to [0, 1]. Adam, batch 64. Per epoch: training loss, test accuracy (argmax of
//! `p`), sparsity (the fraction of test predictions with exactly one probability above
//! `1e-9`, `1e-5` in f32), the check's verdicts and the kinks within tolerance, the solver's
//! iterations and worst KKT residual.
//!
//! ```text
//! cargo run --release --example conic_layer -- [--loss sparsemax|squared] [--kink PRESET]
//!     [--hidden H] [--f32] [--epochs N] [--seed S] [--lr LR] [--plot PATH] [--quick]
//! ```
//!
//! Progress goes to stderr; the last line on stdout is one JSON object with the results.

use std::time::Instant;

use clap::{Parser, ValueEnum};
use clarke::convex::cone::{
    ConeSolution, Cones, ConicBackwardReport, ConicLayer, ConicLayerOptions, quadratic_cone_program, simplex_projection,
};
use clarke::convex::project::project_simplex;
use clarke::core::{KinkPolicy, Result, Scalar, Tape, Var};
use clarke::nn::data::{Dataset, Scaler, batches};
use clarke::nn::optim::{Adam, Optimizer, Schedule};
use clarke::nn::plot::{Mark, Panel, save_png};
use clarke::nn::train::{EpochRecord, History, Progress, accuracy};
use clarke::nn::{Bound, Linear, ParamSet};
use ndarray::{Array1, Array2, ArrayD, ArrayView2, Axis, Ix2, concatenate};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

/// Classes of the digits data.
const CLASSES: usize = 10;
/// Largest allowed difference between the QP layer and the closed form.
const VERIFY_TOL: f64 = 1e-8;

/// Training rows the quick mode uses (the first ones of the training split).
const QUICK_TRAIN_ROWS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Loss {
    /// The sparsemax loss of Martins and Astudillo: `<u, p> - ||p||^2 / 2 + 1/2 - u_y`.
    Sparsemax,
    /// `(1/2) ||p - onehot(y)||^2`.
    Squared,
}

impl Loss {
    fn name(self) -> &'static str {
        match self {
            Loss::Sparsemax => "sparsemax",
            Loss::Squared => "half_squared_error",
        }
    }

    /// The loss of scores `u` with probabilities `p = sparsemax(u)`, averaged over the rows;
    /// the sparsemax loss uses the threshold of the projection when the head provides it.
    fn apply<'t, S: Scalar>(
        self,
        tape: &'t Tape<S>,
        u: Var<'t, S>,
        sm: &Sparsemax<'t, S>,
        labels: &[usize],
    ) -> Result<Var<'t, S>> {
        let mut onehot = Array2::<S>::zeros((labels.len(), CLASSES));
        for (i, &y) in labels.iter().enumerate() {
            onehot[[i, y]] = S::one();
        }
        let onehot = tape.constant(onehot.into_dyn());
        let rows = S::from_f64_lossy(labels.len() as f64);
        let half = S::from_f64_lossy(0.5);
        let p = sm.p;
        match self {
            Loss::Squared => {
                let d = p.try_sub(onehot)?;
                Ok(d.try_mul(d)?.sum() * (half / rows))
            }
            Loss::Sparsemax => {
                // <u, p> - ||p||^2 / 2 = ||p||^2 / 2 + tau on the simplex.
                let conjugate = match sm.tau {
                    Some(tau) => p.try_mul(p)?.sum() * half + tau.sum(),
                    None => u.try_mul(p)?.sum().try_sub(p.try_mul(p)?.sum() * half)?,
                };
                let target = u.try_mul(onehot)?.sum();
                Ok(conjugate.try_sub(target)? / rows + half)
            }
        }
    }
}

#[derive(Parser, Debug)]
#[command(about = "Train a digits classifier with sparsemax solved as a QP layer, against the closed form")]
struct Args {
    /// Kink policy preset (relu'(0) and the selection at the projections' kinks): pytorch,
    /// jax, tensorflow, min_norm, midpoint, one.
    #[arg(long, default_value = "pytorch")]
    kink: String,
    /// Train in f32 (the layer solves in f64 either way; the verification runs in f64).
    #[arg(long)]
    f32: bool,
    /// Epochs.
    #[arg(long, default_value_t = 25)]
    epochs: usize,
    /// Seed of the initialisation, the shuffling and the verification's random scores.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Training loss.
    #[arg(long, value_enum, default_value = "sparsemax")]
    loss: Loss,
    /// Width of the hidden layer (0: a single linear layer).
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    /// Mini-batch size.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Adam step size.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Save loss, accuracy, sparsity and solver curves of both networks as a PNG.
    #[arg(long)]
    plot: Option<String>,
    /// A short run for CI (2 epochs on 256 training rows).
    #[arg(long)]
    quick: bool,
    /// Path of the data file.
    #[arg(long, default_value = "data/digits.csv")]
    data: String,
}

fn main() {
    let args = Args::parse();
    let result = if args.f32 { run::<f32>(&args) } else { run::<f64>(&args) };
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(2),
        Err(e) => {
            eprintln!("conic_layer: {e}");
            std::process::exit(1);
        }
    }
}

/// Which sparsemax the network ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    /// The batched QP layer.
    Conic,
    /// `project_simplex` per row.
    Closed,
}

impl Head {
    fn label(self) -> &'static str {
        match self {
            Head::Conic => "QP layer",
            Head::Closed => "closed form",
        }
    }
}

/// The constant data of the sparsemax QP, shared by every sample.
struct SimplexQp {
    p: Array2<f64>,
    a: Array2<f64>,
    b: Array1<f64>,
    cones: Cones,
    opts: ConicLayerOptions,
}

impl SimplexQp {
    /// The rows `simplex_projection` builds: `1^T p = 1` (zero cone), then `-p <= 0`.
    fn new(k: usize) -> Result<Self> {
        let proto = simplex_projection(Array1::<f64>::zeros(k).view(), 1.0)?;
        Ok(SimplexQp {
            p: proto.p.clone().unwrap_or_else(|| Array2::eye(k)),
            a: proto.a,
            b: proto.b,
            cones: proto.cones,
            opts: ConicLayerOptions {
                name: "sparsemax_qp".into(),
                ..ConicLayerOptions::default()
            },
        })
    }

    /// `sparsemax(u)` for every row of `u` (`[B, k]`), as one batched layer with `c = -u`.
    fn apply<'t, S: Scalar>(&self, tape: &'t Tape<S>, u: Var<'t, S>) -> Result<ConicLayer<'t, S>> {
        let cast = |a: ArrayD<f64>| tape.constant(a.mapv(S::from_f64_lossy));
        let (p, a, b) = (
            cast(self.p.clone().into_dyn()),
            cast(self.a.clone().into_dyn()),
            cast(self.b.clone().into_dyn()),
        );
        quadratic_cone_program(p, a, b, -u, &self.cones, &self.opts)
    }
}

/// The closed-form sparsemax of every row of `u` (`[B, k]`).
fn sparsemax_closed<'t, S: Scalar>(tape: &'t Tape<S>, u: Var<'t, S>) -> Result<Var<'t, S>> {
    let (rows, k) = (u.shape()[0], u.shape()[1]);
    let mut out = Vec::with_capacity(rows);
    for i in 0..rows {
        let row = u.try_slice_axis(0, i..i + 1)?.try_reshape(&[k])?;
        out.push(project_simplex(row, 1.0)?.out);
    }
    tape.try_stack(&out, 0)
}

/// The output of a sparsemax head: the probabilities, the threshold `tau` when the head
/// provides it, and the layer when it is the QP.
struct Sparsemax<'t, S: Scalar> {
    p: Var<'t, S>,
    tau: Option<Var<'t, S>>,
    layer: Option<ConicLayer<'t, S>>,
}

impl<'t, S: Scalar> Sparsemax<'t, S> {
    fn new(head: Head, qp: &SimplexQp, tape: &'t Tape<S>, u: Var<'t, S>) -> Result<Self> {
        match head {
            Head::Conic => {
                let layer = qp.apply(tape, u)?;
                // The multiplier of the equality 1^T p = 1 is the threshold: p = max(u - y_0, 0).
                let tau = layer.y.try_slice_axis(1, 0..1)?;
                Ok(Sparsemax {
                    p: layer.x,
                    tau: Some(tau),
                    layer: Some(layer),
                })
            }
            Head::Closed => Ok(Sparsemax {
                p: sparsemax_closed(tape, u)?,
                tau: None,
                layer: None,
            }),
        }
    }
}

/// Scores `u`: linear layers with relu in between.
struct Net {
    layers: Vec<Linear>,
}

impl Net {
    fn new<S: Scalar>(params: &mut ParamSet<S>, inputs: usize, hidden: usize, rng: &mut ChaCha8Rng) -> Result<Self> {
        let layers = if hidden == 0 {
            vec![Linear::new(params, "out", inputs, CLASSES, rng)?]
        } else {
            vec![
                Linear::new(params, "hidden", inputs, hidden, rng)?,
                Linear::new(params, "out", hidden, CLASSES, rng)?,
            ]
        };
        Ok(Net { layers })
    }

    fn scores<'t, S: Scalar>(&self, bound: &Bound<'t, S>, x: Var<'t, S>) -> Result<Var<'t, S>> {
        let mut h = self.layers[0].forward(bound, x)?;
        for layer in &self.layers[1..] {
            h = layer.forward(bound, h.relu())?;
        }
        Ok(h)
    }
}

/// The check's verdicts over several backward passes.
#[derive(Debug, Clone, Copy, Default)]
struct CheckCounts {
    certified: usize,
    warnings: usize,
    violated: usize,
    not_checked: usize,
    kinks: usize,
    min_sigma: Option<f64>,
}

impl CheckCounts {
    fn add(&mut self, r: &ConicBackwardReport) {
        self.merge(&CheckCounts {
            certified: r.certified,
            warnings: r.warnings,
            violated: r.violated,
            not_checked: r.not_checked,
            kinks: r.kinks,
            min_sigma: r.min_sigma,
        });
    }

    fn merge(&mut self, o: &CheckCounts) {
        self.certified += o.certified;
        self.warnings += o.warnings;
        self.violated += o.violated;
        self.not_checked += o.not_checked;
        self.kinks += o.kinks;
        if let Some(s) = o.min_sigma {
            self.min_sigma = Some(self.min_sigma.map_or(s, |m| m.min(s)));
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "certified": self.certified,
            "warning": self.warnings,
            "violated": self.violated,
            "not_checked": self.not_checked,
            "kinks_within_tolerance": self.kinks,
            "min_sigma": self.min_sigma,
        })
    }
}

/// What the solver did over several solves.
#[derive(Debug, Clone, Copy, Default)]
struct SolverCounts {
    solves: usize,
    iterations: usize,
    refine_steps: usize,
    worst_kkt: f64,
}

impl SolverCounts {
    fn add(&mut self, sols: &[ConeSolution]) {
        for s in sols {
            self.solves += 1;
            self.iterations += s.iterations;
            self.refine_steps += s.refinement.steps;
            self.worst_kkt = self.worst_kkt.max(s.residuals.max());
        }
    }

    fn merge(&mut self, o: &SolverCounts) {
        self.solves += o.solves;
        self.iterations += o.iterations;
        self.refine_steps += o.refine_steps;
        self.worst_kkt = self.worst_kkt.max(o.worst_kkt);
    }

    fn mean_iterations(&self) -> f64 {
        self.iterations as f64 / self.solves.max(1) as f64
    }

    fn mean_refine_steps(&self) -> f64 {
        self.refine_steps as f64 / self.solves.max(1) as f64
    }
}

/// One epoch of one network.
#[derive(Debug, Clone, Copy)]
struct EpochRow {
    record: EpochRecord,
    sparsity: f64,
    checks: CheckCounts,
    solver: SolverCounts,
    forward_seconds: f64,
    backward_seconds: f64,
}

/// A training run.
struct RunResult {
    head: Head,
    rows: Vec<EpochRow>,
    history: History,
    first_uncertified: Option<String>,
}

impl RunResult {
    fn last(&self) -> &EpochRow {
        self.rows.last().expect("at least one epoch")
    }

    fn checks(&self) -> CheckCounts {
        let mut c = CheckCounts::default();
        self.rows.iter().for_each(|r| c.merge(&r.checks));
        c
    }

    fn solver(&self) -> SolverCounts {
        let mut s = SolverCounts::default();
        self.rows.iter().for_each(|r| s.merge(&r.solver));
        s
    }

    fn seconds(&self, f: fn(&EpochRow) -> f64) -> f64 {
        self.rows.iter().map(f).sum()
    }

    fn curve(&self, f: fn(&EpochRow) -> f64) -> Vec<(f64, f64)> {
        self.rows.iter().map(|r| (r.record.epoch as f64, f(r))).collect()
    }
}

/// The data in the training precision.
struct Data<S> {
    x_train: Array2<S>,
    y_train: Vec<usize>,
    x_test: Array2<S>,
    y_test: Vec<usize>,
}

/// Fraction of rows of `p` with exactly one entry above `tol`.
fn sparsity<S: Scalar>(p: ArrayView2<'_, S>, tol: f64) -> f64 {
    let one = p
        .outer_iter()
        .filter(|row| row.iter().filter(|v| v.to_f64_exact() > tol).count() == 1)
        .count();
    one as f64 / p.nrows().max(1) as f64
}

/// Entries of `p` at or below this count as zero.
fn zero_tol<S: Scalar>() -> f64 {
    if S::epsilon().to_f64_exact() > 1e-10 {
        1e-5
    } else {
        1e-9
    }
}

fn run<S: Scalar>(args: &Args) -> std::result::Result<bool, Box<dyn std::error::Error>> {
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
    if data.classes != CLASSES {
        return Err(format!("expected {CLASSES} classes, found {}", data.classes).into());
    }
    let scaler = Scaler::constant(train.features(), 16.0)?;
    let data_s = Data {
        x_train: scaler.apply(&train.x)?.mapv(S::from_f64_lossy),
        y_train: train.y.clone(),
        x_test: scaler.apply(&test.x)?.mapv(S::from_f64_lossy),
        y_test: test.y.clone(),
    };
    let qp = SimplexQp::new(CLASSES)?;
    let mut params = ParamSet::<S>::new();
    let net = Net::new(
        &mut params,
        train.features(),
        args.hidden,
        &mut ChaCha8Rng::seed_from_u64(args.seed),
    )?;
    eprintln!(
        "conic_layer: {} train / {} test rows, 64 -> {} -> 10, {} parameters, QP with n = {}, m = {} per sample, kink policy {}, {}",
        train.len(),
        test.len(),
        if args.hidden == 0 {
            "(none)".to_string()
        } else {
            args.hidden.to_string()
        },
        params.num_scalars(),
        CLASSES,
        qp.cones.dim(),
        policy.label(),
        S::NAME
    );

    // The QP layer against the closed form, in f64, before any training.
    let (verification, at_kinks) = verify(&qp, &policy, &net, &params, &data_s, args.seed)?;
    eprintln!(
        "verification on {} rows ({} kinks within tolerance): max |p_qp - p_closed| = {:.2e}, max |grad_qp - grad_closed| = {:.2e} (squared loss), {:.2e} (sparsemax loss)",
        verification.rows,
        verification.kinks,
        verification.value,
        verification.grad_squared,
        verification.grad_sparsemax
    );
    eprintln!(
        "on {} score vectors on kinks ({} kinks within tolerance): max |p_qp - p_closed| = {:.2e}, max |grad_qp - grad_closed| = {:.2e} (squared loss), {:.2e} (sparsemax loss)",
        at_kinks.rows, at_kinks.kinks, at_kinks.value, at_kinks.grad_squared, at_kinks.grad_sparsemax
    );
    if at_kinks.max() > VERIFY_TOL {
        eprintln!(
            "  (at the kinks the two select different elements of the conservative Jacobian under policy {})",
            policy.label()
        );
    }
    if verification.max() > VERIFY_TOL || verification.max().is_nan() {
        eprintln!(
            "conic_layer: the QP layer differs from the closed-form sparsemax by {:.3e} > {VERIFY_TOL:.0e}",
            verification.max()
        );
        return Ok(false);
    }

    let setup = Setup {
        args,
        qp: &qp,
        net: &net,
        data: &data_s,
        policy: &policy,
        epochs,
    };
    let mut runs = Vec::new();
    for head in [Head::Conic, Head::Closed] {
        eprintln!("training with the {} sparsemax", head.label());
        // Both from the same initial parameters.
        runs.push(train_run(&setup, head, params.clone())?);
    }
    let (conic, closed) = (&runs[0], &runs[1]);
    for r in &runs {
        print_table(r);
    }
    if let Some(detail) = &conic.first_uncertified {
        eprintln!("first sample whose check was not certified: {detail}");
    }

    let (checks, solver) = (conic.checks(), conic.solver());
    let conic_time = conic.history.train_seconds();
    let closed_time = closed.history.train_seconds();
    let ratio = conic_time / closed_time.max(1e-12);
    let (conic_fwd, conic_bwd) = (
        conic.seconds(|r| r.forward_seconds),
        conic.seconds(|r| r.backward_seconds),
    );
    eprintln!(
        "test accuracy: QP layer {:.4}, closed form {:.4}; training time: QP layer {:.2}s (forward {:.2}s, backward {:.2}s), closed form {:.2}s, ratio {:.1}",
        conic.last().record.test_accuracy,
        closed.last().record.test_accuracy,
        conic_time,
        conic_fwd,
        conic_bwd,
        closed_time,
        ratio
    );
    eprintln!(
        "QP layer: {} solves, {:.1} ADMM iterations and {:.2} Newton refinement steps per solve, worst KKT residual {:.2e}; check: {} certified, {} warning, {} violated, {} kinks within tolerance",
        solver.solves,
        solver.mean_iterations(),
        solver.mean_refine_steps(),
        solver.worst_kkt,
        checks.certified,
        checks.warnings,
        checks.violated,
        checks.kinks
    );

    if let Some(path) = &args.plot {
        plot(path, &runs, args.loss)?;
        eprintln!("plot written to {path}");
    }

    let per_epoch = |r: &RunResult, f: fn(&EpochRow) -> f64| r.rows.iter().map(f).collect::<Vec<_>>();
    let summary = json!({
        "example": "conic_layer",
        "scalar": S::NAME,
        "kink_policy": policy.label(),
        "epochs": epochs,
        "hidden": args.hidden,
        "batch": args.batch,
        "train_rows": train.len(),
        "test_rows": test.len(),
        "loss": args.loss.name(),
        "verification": verification.json(),
        "verification_at_kinks": at_kinks.json(),
        "qp_layer": {
            "test_accuracy": conic.last().record.test_accuracy,
            "final_train_loss": conic.last().record.train_loss,
            "sparsity": conic.last().sparsity,
            "train_seconds": conic_time,
            "forward_seconds": conic_fwd,
            "backward_seconds": conic_bwd,
            "check": checks.json(),
            "solver": {
                "solves": solver.solves,
                "mean_iterations": solver.mean_iterations(),
                "mean_refinement_steps": solver.mean_refine_steps(),
                "worst_kkt_residual": solver.worst_kkt,
            },
            "test_accuracy_per_epoch": per_epoch(conic, |r| r.record.test_accuracy),
        },
        "closed_form": {
            "test_accuracy": closed.last().record.test_accuracy,
            "final_train_loss": closed.last().record.train_loss,
            "sparsity": closed.last().sparsity,
            "train_seconds": closed_time,
            "forward_seconds": closed.seconds(|r| r.forward_seconds),
            "backward_seconds": closed.seconds(|r| r.backward_seconds),
            "test_accuracy_per_epoch": per_epoch(closed, |r| r.record.test_accuracy),
        },
        "accuracy_difference": (conic.last().record.test_accuracy - closed.last().record.test_accuracy).abs(),
        "time_ratio": ratio,
    });
    println!("{summary}");
    Ok(true)
}

/// What both training runs share.
struct Setup<'a, S: Scalar> {
    args: &'a Args,
    qp: &'a SimplexQp,
    net: &'a Net,
    data: &'a Data<S>,
    policy: &'a KinkPolicy,
    epochs: usize,
}

/// Trains one network from its initial `params`.
fn train_run<S: Scalar>(
    setup: &Setup<'_, S>,
    head: Head,
    mut params: ParamSet<S>,
) -> std::result::Result<RunResult, Box<dyn std::error::Error>> {
    let Setup {
        args,
        qp,
        net,
        data,
        policy,
        epochs,
    } = *setup;
    // The same batches for both networks.
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed.wrapping_add(1));
    let mut adam = Adam::new(Schedule::Constant(args.lr))?;
    let progress = Progress::new(epochs);
    let mut history = History::default();
    let mut rows = Vec::with_capacity(epochs);
    let mut first_uncertified = None;
    for epoch in 1..=epochs {
        let start = Instant::now();
        let (mut loss_sum, mut n_batches) = (0.0, 0usize);
        let (mut checks, mut solver) = (CheckCounts::default(), SolverCounts::default());
        let (mut forward_seconds, mut backward_seconds) = (0.0, 0.0);
        for idx in batches(data.y_train.len(), args.batch, &mut rng)? {
            let tape = Tape::<S>::with_policy(policy.clone())?;
            let bound = params.bind(&tape);
            let x = tape.constant(data.x_train.select(Axis(0), &idx).into_dyn());
            let labels: Vec<usize> = idx.iter().map(|&i| data.y_train[i]).collect();
            let t0 = Instant::now();
            let u = net.scores(&bound, x)?;
            let sm = Sparsemax::new(head, qp, &tape, u)?;
            let loss = args.loss.apply(&tape, u, &sm, &labels)?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            backward_seconds += t1.elapsed().as_secs_f64();
            forward_seconds += (t1 - t0).as_secs_f64();
            let gradients = bound.gradients(&grads, &params)?;
            adam.step(&mut params, &gradients)?;
            loss_sum += loss.scalar().to_f64_exact();
            n_batches += 1;
            if let Some(layer) = &sm.layer {
                solver.add(&layer.solutions);
                if let Some(report) = layer.log.last() {
                    checks.add(&report);
                    if first_uncertified.is_none() {
                        if let Some((i, check)) = report.first_uncertified() {
                            first_uncertified = Some(format!("epoch {epoch}, batch {n_batches}, sample {i}: {check}"));
                        }
                    }
                }
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        let (test_accuracy, sparsity) = evaluate(head, qp, net, &params, &data.x_test, &data.y_test, &mut solver)?;
        let record = EpochRecord {
            epoch,
            train_loss: loss_sum / n_batches as f64,
            test_accuracy,
            forward_iterations: solver.mean_iterations(),
            adjoint_iterations: 0.0,
            seconds,
        };
        progress.epoch(&record);
        history.push(record);
        rows.push(EpochRow {
            record,
            sparsity,
            checks,
            solver,
            forward_seconds,
            backward_seconds,
        });
    }
    progress.finish();
    Ok(RunResult {
        head,
        rows,
        history,
        first_uncertified,
    })
}

/// Test accuracy (argmax of `p`) and sparsity, the whole test set in one batch, no gradients.
fn evaluate<S: Scalar>(
    head: Head,
    qp: &SimplexQp,
    net: &Net,
    params: &ParamSet<S>,
    x: &Array2<S>,
    y: &[usize],
    solver: &mut SolverCounts,
) -> std::result::Result<(f64, f64), Box<dyn std::error::Error>> {
    let tape = Tape::<S>::new();
    let bound = params.bind_constant(&tape);
    let u = net.scores(&bound, tape.constant(x.clone().into_dyn()))?;
    let sm = Sparsemax::new(head, qp, &tape, u)?;
    if let Some(layer) = &sm.layer {
        solver.add(&layer.solutions);
    }
    let p = sm.p.value().into_dimensionality::<Ix2>()?;
    Ok((accuracy(p.view(), y)?, sparsity(p.view(), zero_tol::<S>())))
}

/// The largest differences between the QP layer and the closed form on some score vectors.
#[derive(Debug, Clone, Copy)]
struct Comparison {
    rows: usize,
    /// Kinks within tolerance the QP layer's backward found.
    kinks: usize,
    /// `max |p_qp - p_closed|`.
    value: f64,
    /// `max |grad_u L_qp - grad_u L_closed|` of the squared loss (summed over the rows).
    grad_squared: f64,
    /// The same for the sparsemax loss.
    grad_sparsemax: f64,
}

impl Comparison {
    /// Sparsemax by both heads on `u` (f64, `policy`), the gradients of both losses.
    fn of(qp: &SimplexQp, policy: &KinkPolicy, u: Array2<f64>, labels: &[usize]) -> Result<Self> {
        let tape = Tape::<f64>::with_policy(policy.clone())?;
        let uv = tape.param(u.into_dyn());
        let conic = Sparsemax::new(Head::Conic, qp, &tape, uv)?;
        let closed = Sparsemax::new(Head::Closed, qp, &tape, uv)?;
        let diff = |a: &ArrayD<f64>, b: &ArrayD<f64>| (a - b).iter().fold(0.0, |m, d| nan_max(m, d.abs()));
        let rows = labels.len() as f64;
        let mut grad = [0.0; 2];
        for (g, loss) in grad.iter_mut().zip([Loss::Squared, Loss::Sparsemax]) {
            let grad_qp = (loss.apply(&tape, uv, &conic, labels)? * rows).backward()?;
            let grad_closed = (loss.apply(&tape, uv, &closed, labels)? * rows).backward()?;
            *g = diff(grad_qp.wrt(uv)?, grad_closed.wrt(uv)?);
        }
        let layer = conic.layer.as_ref().expect("the QP head has a layer");
        Ok(Comparison {
            rows: labels.len(),
            kinks: layer.log.last().map_or(0, |r| r.kinks),
            value: diff(&conic.p.value(), &closed.p.value()),
            grad_squared: grad[0],
            grad_sparsemax: grad[1],
        })
    }

    fn max(&self) -> f64 {
        nan_max(nan_max(self.value, self.grad_squared), self.grad_sparsemax)
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "rows": self.rows,
            "kinks_within_tolerance": self.kinks,
            "max_abs_diff_value": self.value,
            "max_abs_diff_grad_squared_loss": self.grad_squared,
            "max_abs_diff_grad_sparsemax_loss": self.grad_sparsemax,
            "max_abs_diff": self.max(),
        })
    }
}

/// The larger of two numbers, NaN when either is.
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() { f64::NAN } else { a.max(b) }
}

/// The QP layer against the closed form: on the untrained network's scores of the first 64
/// training rows and on 64 Gaussian score vectors (standard deviation 2) with arbitrary
/// labels; then on two score vectors with exact kinks (`u_i == tau` for some `i`).
fn verify<S: Scalar>(
    qp: &SimplexQp,
    policy: &KinkPolicy,
    net: &Net,
    params: &ParamSet<S>,
    data: &Data<S>,
    seed: u64,
) -> std::result::Result<(Comparison, Comparison), Box<dyn std::error::Error>> {
    let rows = 64.min(data.y_train.len());
    let scores = {
        let tape = Tape::<S>::new();
        let bound = params.bind_constant(&tape);
        let x = data.x_train.slice(ndarray::s![..rows, ..]).to_owned();
        net.scores(&bound, tape.constant(x.into_dyn()))?
            .value()
            .mapv(|v| v.to_f64_exact())
            .into_dimensionality::<Ix2>()?
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(2));
    let mut gauss = || {
        // Box-Muller.
        let (a, b): (f64, f64) = (rng.random(), rng.random());
        (-2.0 * (1.0 - a).ln()).sqrt() * (std::f64::consts::TAU * b).cos()
    };
    let random = Array2::from_shape_fn((64, CLASSES), |_| 2.0 * gauss());
    let u = concatenate(Axis(0), &[scores.view(), random.view()])?;
    let mut labels: Vec<usize> = data.y_train[..rows].to_vec();
    labels.extend((0..64).map(|i| (i * 7 + 3) % CLASSES));
    let generic = Comparison::of(qp, policy, u, &labels)?;

    // u = e_0: tau = 0, nine coordinates on their kink; u = (0.7, 0.3, 0, -0.5, ...): one.
    let mut kinked = Array2::<f64>::zeros((2, CLASSES));
    kinked[[0, 0]] = 1.0;
    for j in 0..CLASSES {
        kinked[[1, j]] = match j {
            0 => 0.7,
            1 => 0.3,
            2 => 0.0,
            _ => -0.5 * (j - 2) as f64,
        };
    }
    let at_kinks = Comparison::of(qp, policy, kinked, &[1, 2])?;
    Ok((generic, at_kinks))
}

fn print_table(r: &RunResult) {
    eprintln!("{}:", r.head.label());
    eprintln!(
        "  epoch  loss     test acc  sparse   {}",
        if r.head == Head::Conic {
            "certified  warning  violated  kinks  admm it  worst kkt  fwd s  bwd s"
        } else {
            "fwd s  bwd s"
        }
    );
    for row in &r.rows {
        let e = &row.record;
        if r.head == Head::Conic {
            eprintln!(
                "  {:>5}  {:.5}  {:.4}    {:.4}   {:>9}  {:>7}  {:>8}  {:>5}  {:>7.1}  {:>9.2e}  {:>5.2}  {:>5.2}",
                e.epoch,
                e.train_loss,
                e.test_accuracy,
                row.sparsity,
                row.checks.certified,
                row.checks.warnings,
                row.checks.violated,
                row.checks.kinks,
                row.solver.mean_iterations(),
                row.solver.worst_kkt,
                row.forward_seconds,
                row.backward_seconds
            );
        } else {
            eprintln!(
                "  {:>5}  {:.5}  {:.4}    {:.4}   {:>5.2}  {:>5.2}",
                e.epoch, e.train_loss, e.test_accuracy, row.sparsity, row.forward_seconds, row.backward_seconds
            );
        }
    }
}

/// Loss, accuracy, sparsity and time per epoch of both networks (the QP network as a line,
/// the closed form as points on top: they coincide); the QP solver's iterations and worst
/// KKT residual.
fn plot(path: &str, runs: &[RunResult], loss: Loss) -> std::io::Result<()> {
    let mark = |head: Head| {
        if head == Head::Conic {
            Mark::LinePoints
        } else {
            Mark::Points
        }
    };
    let panel = |title: &str, y: &str, f: fn(&EpochRow) -> f64| {
        runs.iter().fold(Panel::new(title).labels("epoch", y), |p, r| {
            p.series(r.head.label(), r.curve(f), mark(r.head))
        })
    };
    let conic: Vec<&RunResult> = runs.iter().filter(|r| r.head == Head::Conic).collect();
    let solver_panel = |title: &str, y: &str, f: fn(&EpochRow) -> f64| {
        conic.iter().fold(Panel::new(title).labels("epoch", y), |p, r| {
            p.line_points(r.head.label(), r.curve(f))
        })
    };
    let loss_label = match loss {
        Loss::Sparsemax => "sparsemax loss",
        Loss::Squared => "(1/2) ||p - onehot(y)||^2",
    };
    let panels = [
        panel("sparsemax on digits: training loss", loss_label, |r| {
            r.record.train_loss
        })
        .log_y(),
        panel("test accuracy", "accuracy", |r| r.record.test_accuracy),
        panel("one non-zero probability", "fraction of test rows", |r| r.sparsity),
        panel("training time per epoch", "seconds", |r| r.record.seconds),
        solver_panel("ADMM iterations per solve", "iterations", |r| {
            r.solver.mean_iterations()
        }),
        solver_panel("worst KKT residual", "residual", |r| r.solver.worst_kkt).log_y(),
    ];
    save_png(path, &panels)
}
