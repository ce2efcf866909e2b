//! A differentiable QP layer, the problem of the cvxpylayers QP example:
//!
//! ```text
//! x*(q) = argmin (1/2)||x||^2 + q^T x   subject to   G x <= h
//! ```
//!
//! with 20 variables and 15 constraints in f64. `G` has standard normal entries, `h = G x0 +
//! s0` with `x0` standard normal and `s0` uniform in `[0, 1)` (so the program is feasible),
//! and `q` is standard normal per sample. The layer is the tape node
//! `quadratic_cone_program(P, A, b, c)` with `P = I`, `A = G`, `b = h`, `c = q`, all four
//! as parameters. `forward` records the node (the ADMM solve and its refinement, per sample
//! in parallel); `forward+backward` also records `sum(x * w)` for a fixed random `w` and runs
//! the backward pass (the derivative of every sample in parallel), with the hypothesis
//! check on (the default: the extreme singular values of the `(n + m) x (n + m)` matrix `M`
//! per sample, estimated from its LU when no entry is near a kink, an SVD and a determinant
//! per selection otherwise) or off.
//!
//! Sizes: one problem (`c` of shape `[20]`) and a batch of 128 (`c` of shape `[128, 20]`,
//! shared `P`, `G`, `h`). The `raw` group runs the same single problem through `solve` and
//! `ConeDerivative` without a tape, to show what the tape adds.
//!
//! The peers (QPLayer, qpth, qpax, cvxpylayers) run the same QP in
//! `benches/peers/conic_qp.py`; `benches/peers/compare.py` times both sides in one run. The
//! KKT residuals are printed before the timings.
//!
//! With `CLARKE_PEER_DATA=DIR`, the data (`P`, `G`, `h`, the batch of `q`, `w`) and the
//! layer's batch solutions and gradients go to `DIR/conic_qp.json` before the timings, for
//! `benches/peers/conic_qp.py`.
//!
//! The dense factorisations are pure Rust by default; with the `lapack` feature set
//! `OPENBLAS_NUM_THREADS=1`, since rayon already runs one sample per core.

use std::collections::BTreeMap;
use std::hint::black_box;

use clarke::convex::cone::{
    Cone, ConeDerivative, ConeProgram, ConeSolution, Cones, ConicLayerOptions, DerivativeOptions, SolutionDirection,
    SolverOptions, qp, quadratic_cone_program, solve,
};
use clarke::core::Tape;
use criterion::{BenchmarkId, Criterion, criterion_group};
use ndarray::{Array1, Array2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::peer_data;

const N: usize = 20;
const M: usize = 15;
const BATCH: usize = 128;

/// A standard normal draw (Box-Muller; `qp_layer` draws its problems with it too, so its
/// small QP is this bench's).
pub(crate) fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The QP's data and the fixed loss weights.
struct Data {
    p: Array2<f64>,
    g: Array2<f64>,
    h: Array1<f64>,
    /// One cost per sample, `[BATCH, N]`.
    q: Array2<f64>,
    /// The loss is `sum(x * w)`.
    w: Array1<f64>,
}

impl Data {
    fn new() -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let g = Array2::from_shape_simple_fn((M, N), || normal(&mut rng));
        let x0 = Array1::from_shape_simple_fn(N, || normal(&mut rng));
        let s0 = Array1::from_shape_simple_fn(M, || rng.random_range(0.0..1.0));
        let h = g.dot(&x0) + s0;
        let q = Array2::from_shape_simple_fn((BATCH, N), || normal(&mut rng));
        let w = Array1::from_shape_simple_fn(N, || normal(&mut rng));
        Data {
            p: Array2::eye(N),
            g,
            h,
            q,
            w,
        }
    }

    fn cones() -> Cones {
        Cones::new(vec![Cone::NonNeg(M)]).expect("one orthant")
    }

    /// Sample `i` as a cone program.
    fn program(&self, i: usize) -> ConeProgram {
        qp(self.p.view(), self.q.row(i), Some((self.g.view(), self.h.view())), None).expect("valid QP")
    }

    /// The costs of a size: one sample (`[N]`) or the whole batch (`[BATCH, N]`).
    fn costs(&self, batched: bool) -> ndarray::ArrayD<f64> {
        if batched {
            self.q.clone().into_dyn()
        } else {
            self.q.row(0).to_owned().into_dyn()
        }
    }
}

/// Records the layer on `tape`; with `backward`, also the loss and the backward pass.
/// Returns the gradient with respect to `q` (backward) or the solutions `x`.
fn run(data: &Data, batched: bool, opts: &ConicLayerOptions, backward: bool) -> ndarray::ArrayD<f64> {
    let tape = Tape::<f64>::new();
    let p = tape.param(data.p.clone().into_dyn());
    let a = tape.param(data.g.clone().into_dyn());
    let b = tape.param(data.h.clone().into_dyn());
    let c = tape.param(data.costs(batched));
    let layer = quadratic_cone_program(p, a, b, c, &Data::cones(), opts).expect("solved");
    if !backward {
        return layer.x.value();
    }
    let w = tape.constant(data.w.clone().into_dyn());
    let loss = layer.x.try_mul(w).expect("broadcast").sum();
    let grads = loss.backward().expect("backward");
    grads.wrt(c).expect("gradient of q").clone()
}

fn checked() -> ConicLayerOptions {
    ConicLayerOptions::default()
}

fn unchecked() -> ConicLayerOptions {
    ConicLayerOptions::default().with_derivative(DerivativeOptions::unchecked())
}

/// The loss gradient with respect to `(x, y, s)` for the raw API.
fn direction(data: &Data) -> SolutionDirection {
    SolutionDirection {
        x: data.w.clone(),
        y: Array1::zeros(M),
        s: Array1::zeros(M),
    }
}

fn stats(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let v: Vec<f64> = values.collect();
    (
        v.iter().sum::<f64>() / v.len() as f64,
        v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    )
}

/// Solver statistics, accuracy and the check's verdicts, printed once.
fn print_header(data: &Data) {
    let opts = SolverOptions::default();
    let solutions: Vec<ConeSolution> = (0..BATCH)
        .map(|i| solve(&data.program(i), &opts, None).expect("solve"))
        .collect();
    let solved = solutions
        .iter()
        .filter(|s| s.status == clarke::convex::cone::ConeStatus::Solved)
        .count();
    let (it_mean, it_max) = stats(solutions.iter().map(|s| s.iterations as f64));
    let worst = |f: &dyn Fn(&ConeSolution) -> f64| solutions.iter().map(f).fold(0.0f64, f64::max);
    let (steps_mean, steps_max) = stats(solutions.iter().map(|s| s.refinement.steps as f64));
    let mut stopped: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &solutions {
        *stopped.entry(s.refinement.stopped).or_default() += 1;
    }
    let active = stats(
        solutions
            .iter()
            .map(|s| s.y.iter().filter(|&&y| y > 1e-9).count() as f64),
    );
    eprintln!("conic_qp: min (1/2)||x||^2 + q^T x s.t. G x <= h, n = {N}, m = {M}, f64, batch {BATCH}");
    eprintln!(
        "  rayon threads {}, OPENBLAS_NUM_THREADS = {}",
        rayon::current_num_threads(),
        std::env::var("OPENBLAS_NUM_THREADS").unwrap_or_else(|_| "unset".into())
    );
    eprintln!(
        "  solved {solved} of {BATCH}; active constraints mean {:.1}, max {}",
        active.0, active.1
    );
    eprintln!("  ADMM iterations: mean {it_mean:.1}, max {it_max}");
    eprintln!(
        "  last ADMM iterate, KKT residuals (worst): primal {:.2e}, dual {:.2e}, gap {:.2e}, complementarity {:.2e}",
        worst(&|s| s.admm_residuals.primal),
        worst(&|s| s.admm_residuals.dual),
        worst(&|s| s.admm_residuals.gap),
        worst(&|s| s.admm_residuals.complementarity),
    );
    eprintln!(
        "  returned solutions, KKT residuals (worst): primal {:.2e}, dual {:.2e}, gap {:.2e}, complementarity {:.2e}",
        worst(&|s| s.residuals.primal),
        worst(&|s| s.residuals.dual),
        worst(&|s| s.residuals.gap),
        worst(&|s| s.residuals.complementarity),
    );
    eprintln!(
        "  refinement: steps mean {steps_mean:.2}, max {steps_max}; ||N(z)|| worst before {:.2e}, after {:.2e}; stopped: {stopped:?}",
        worst(&|s| s.refinement.before),
        worst(&|s| s.refinement.after),
    );

    for (label, batched) in [("one problem", false), ("batch", true)] {
        let tape = Tape::<f64>::new();
        let p = tape.param(data.p.clone().into_dyn());
        let a = tape.param(data.g.clone().into_dyn());
        let b = tape.param(data.h.clone().into_dyn());
        let c = tape.param(data.costs(batched));
        let layer = quadratic_cone_program(p, a, b, c, &Data::cones(), &checked()).expect("solved");
        let w = tape.constant(data.w.clone().into_dyn());
        layer
            .x
            .try_mul(w)
            .expect("broadcast")
            .sum()
            .backward()
            .expect("backward");
        let r = layer.log.last().expect("one backward report");
        eprintln!(
            "  check ({label}, {} sample(s)): certified {}, warnings {}, violated {}, not checked {}; kinks {}; min sigma_min(M) {}",
            r.samples,
            r.certified,
            r.warnings,
            r.violated,
            r.not_checked,
            r.kinks,
            r.min_sigma.map_or("-".into(), |s| format!("{s:.3e}")),
        );
    }

    // The tape's gradient of q against the raw adjoint, sample 0.
    let prog = data.program(0);
    let d = ConeDerivative::new(&prog, &solutions[0], 0.0, &DerivativeOptions::default()).expect("derivative");
    let raw = d.adjoint(&direction(data)).expect("adjoint").c;
    let tape = run(data, false, &checked(), true);
    let diff = (&tape.into_dimensionality::<ndarray::Ix1>().expect("[n]") - &raw)
        .iter()
        .fold(0.0f64, |a, v| a.max(v.abs()));
    eprintln!("  tape vs raw adjoint, max |d loss / d q| difference: {diff:.1e}");

    eprintln!(
        "  the peers (QPLayer, qpth, qpax, cvxpylayers) on the same QP: benches/peers/compare.py --only conic_qp"
    );
}

/// The QP, and what the layer returns for the batch, for the peer scripts.
fn peer_data(data: &Data) -> serde_json::Value {
    let opts = SolverOptions::default();
    let worst = |f: &dyn Fn(&ConeSolution) -> f64| {
        (0..BATCH)
            .map(|i| f(&solve(&data.program(i), &opts, None).expect("solve")))
            .fold(0.0f64, f64::max)
    };
    serde_json::json!({
        "n": N, "m": M, "batch": BATCH,
        "P": peer_data::matrix(data.p.view()),
        "G": peer_data::matrix(data.g.view()),
        "h": peer_data::vector(data.h.view()),
        "q": peer_data::matrix(data.q.view()),
        "w": peer_data::vector(data.w.view()),
        "clarke": {
            "x": peer_data::array(&run(data, true, &checked(), false)),
            "grad_q": peer_data::array(&run(data, true, &checked(), true)),
            "kkt_worst": {
                "primal": worst(&|s| s.residuals.primal),
                "dual": worst(&|s| s.residuals.dual),
                "gap": worst(&|s| s.residuals.gap),
                "complementarity": worst(&|s| s.residuals.complementarity),
            },
        },
    })
}

fn layer(c: &mut Criterion) {
    let data = Data::new();
    print_header(&data);
    if let Some(dir) = peer_data::dir() {
        peer_data::write(&dir, "conic_qp.json", &peer_data(&data));
    }
    let checked = checked();
    let unchecked = unchecked();
    let mut group = c.benchmark_group("conic_qp");
    group.sample_size(20);
    for (label, batched) in [("1".to_string(), false), (BATCH.to_string(), true)] {
        group.bench_with_input(BenchmarkId::new("forward", &label), &batched, |bch, &batched| {
            bch.iter(|| black_box(run(&data, batched, &checked, false)))
        });
        group.bench_with_input(
            BenchmarkId::new("forward+backward", &label),
            &batched,
            |bch, &batched| bch.iter(|| black_box(run(&data, batched, &checked, true))),
        );
        group.bench_with_input(
            BenchmarkId::new("forward+backward unchecked", &label),
            &batched,
            |bch, &batched| bch.iter(|| black_box(run(&data, batched, &unchecked, true))),
        );
    }
    group.finish();
}

fn raw(c: &mut Criterion) {
    let data = Data::new();
    let prog = data.program(0);
    let opts = SolverOptions::default();
    let g = direction(&data);
    let mut group = c.benchmark_group("conic_qp_raw");
    group.sample_size(20);
    group.bench_function("solve", |bch| {
        bch.iter(|| black_box(solve(&prog, &opts, None).expect("solve")))
    });
    for (name, dopts) in [
        ("solve+adjoint", DerivativeOptions::default()),
        ("solve+adjoint unchecked", DerivativeOptions::unchecked()),
    ] {
        group.bench_function(name, |bch| {
            bch.iter(|| {
                let sol = solve(&prog, &opts, None).expect("solve");
                let d = ConeDerivative::new(&prog, &sol, 0.0, &dopts).expect("derivative");
                black_box(d.adjoint(&g).expect("adjoint"))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, layer, raw);
