//! The QP layer `qp_layer` (`min (1/2) x^T Q x + p^T x` s.t. `A x = b`, `l <= G x <= u`) on
//! two problems, in f64:
//!
//! - `small`: the QP of `conic_qp` (20 variables, `G x <= h` with 15 rows, `Q = I`, the same
//!   seeded data), written as a QP layer with `u = h` and no `l`;
//! - `large`: 100 variables, 50 equalities and 100 two-sided inequalities, feasible by
//!   construction (`b = A x0`, `l = G x0 - d_l`, `u = G x0 + d_u` with `d_l`, `d_u` uniform in
//!   `[1, 10)`, about a tenth of the norm of a row of `G`), `Q = L L^T / n + I`, standard
//!   normal `A`, `G`, `L` and `p`, seeded: about 30 of the 200 sides are active at the
//!   solution (with tighter bounds, more than `n - m_eq = 50` are, and the solution is a
//!   degenerate vertex whose derivative the check refuses).
//!
//! Sizes: one problem (`p` of shape `[n]`) and a batch of 128 (`p` of shape `[128, n]`, the
//! rest shared). `forward` records the layer (the solve of every sample, in parallel);
//! `forward+backward` also records `sum(x * w)` for a fixed random `w` and runs the backward
//! pass with the hypothesis check on. Every argument is a parameter. The worst KKT residual
//! of the returned solutions and the check's verdicts are printed before the timings.
//!
//! The peers (QPLayer, qpth, qpax, cvxpylayers) run the same QPs in
//! `benches/peers/qp_layer.py`; `benches/peers/compare.py --only qp_layer` times both sides in
//! one run. With `CLARKE_PEER_DATA=DIR`, both problems (`Q`, `p` for the batch, `A`, `b`, `G`,
//! `l`, `u`, `w`) and the layer's batch solutions `x`, multipliers `y`, `z` and the gradients
//! of the loss with respect to every argument go to `DIR/qp_layer.json` before the timings.
//! JSON has no infinity: an infinite bound is written as `null` (`-inf` in `l`, `+inf` in
//! `u`); the small QP's `l` is all `null`, and as the bench passes no `l` for it, it has no
//! `grad_l`.

use std::hint::black_box;

use clarke::convex::cone::{QpData, QpLayer, QpLayerOptions, qp_layer};
use clarke::core::{Grads, Tape, Var};
use criterion::{BenchmarkId, Criterion, criterion_group};
use ndarray::{Array1, Array2, ArrayD};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::conic_qp::normal;
use crate::peer_data;

const BATCH: usize = 128;

/// A QP's data, the batch of linear terms and the loss weights.
struct Problem {
    name: &'static str,
    q: Array2<f64>,
    a: Option<(Array2<f64>, Array1<f64>)>,
    g: Array2<f64>,
    l: Option<Array1<f64>>,
    u: Array1<f64>,
    /// One linear term per sample, `[BATCH, n]`.
    p: Array2<f64>,
    /// The loss is `sum(x * w)`.
    w: Array1<f64>,
}

impl Problem {
    /// The QP of `conic_qp`: the same draws in the same order.
    fn small() -> Self {
        let (n, m) = (20, 15);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let g = Array2::from_shape_simple_fn((m, n), || normal(&mut rng));
        let x0 = Array1::from_shape_simple_fn(n, || normal(&mut rng));
        let s0 = Array1::from_shape_simple_fn(m, || rng.random_range(0.0..1.0));
        let u = g.dot(&x0) + s0;
        let p = Array2::from_shape_simple_fn((BATCH, n), || normal(&mut rng));
        let w = Array1::from_shape_simple_fn(n, || normal(&mut rng));
        Problem {
            name: "small",
            q: Array2::eye(n),
            a: None,
            g,
            l: None,
            u,
            p,
            w,
        }
    }

    fn large() -> Self {
        let (n, me, mg) = (100, 50, 100);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let l0 = Array2::from_shape_simple_fn((n, n), || normal(&mut rng));
        let q = l0.dot(&l0.t()) / n as f64 + Array2::<f64>::eye(n);
        let a = Array2::from_shape_simple_fn((me, n), || normal(&mut rng));
        let g = Array2::from_shape_simple_fn((mg, n), || normal(&mut rng));
        let x0 = Array1::from_shape_simple_fn(n, || normal(&mut rng));
        let b = a.dot(&x0);
        let gx = g.dot(&x0);
        let dl = Array1::from_shape_simple_fn(mg, || rng.random_range(1.0..10.0));
        let du = Array1::from_shape_simple_fn(mg, || rng.random_range(1.0..10.0));
        let p = Array2::from_shape_simple_fn((BATCH, n), || normal(&mut rng));
        let w = Array1::from_shape_simple_fn(n, || normal(&mut rng));
        Problem {
            name: "large",
            q,
            a: Some((a, b)),
            l: Some(&gx - &dl),
            u: &gx + &du,
            g,
            p,
            w,
        }
    }

    fn linear(&self, batched: bool) -> ArrayD<f64> {
        if batched {
            self.p.clone().into_dyn()
        } else {
            self.p.row(0).to_owned().into_dyn()
        }
    }
}

/// What one run returns: `x`, or the gradient of `p` with the worst KKT residual, the
/// check's verdicts (certified, warnings, violated) of the backward pass and the mean number
/// of active sides.
struct Outcome {
    value: ArrayD<f64>,
    kkt: f64,
    verdicts: (usize, usize, usize),
    active: f64,
}

/// The parameters of one recording (every argument of the layer).
struct Params<'t> {
    q: Var<'t, f64>,
    p: Var<'t, f64>,
    eq: Option<(Var<'t, f64>, Var<'t, f64>)>,
    g: Var<'t, f64>,
    l: Option<Var<'t, f64>>,
    u: Var<'t, f64>,
}

impl<'t> Params<'t> {
    fn new(tape: &'t Tape<f64>, pb: &Problem, batched: bool) -> Self {
        Params {
            q: tape.param(pb.q.clone().into_dyn()),
            p: tape.param(pb.linear(batched)),
            eq: pb
                .a
                .as_ref()
                .map(|(a, b)| (tape.param(a.clone().into_dyn()), tape.param(b.clone().into_dyn()))),
            g: tape.param(pb.g.clone().into_dyn()),
            l: pb.l.as_ref().map(|l| tape.param(l.clone().into_dyn())),
            u: tape.param(pb.u.clone().into_dyn()),
        }
    }

    fn data(&self) -> QpData<'t, f64> {
        let data = QpData::new(self.q, self.p).with_ineq(self.g, self.l, Some(self.u));
        match self.eq {
            Some((a, b)) => data.with_eq(a, b),
            None => data,
        }
    }
}

/// The largest KKT residual over the layer's samples.
fn worst_kkt(layer: &QpLayer<'_, f64>) -> f64 {
    layer
        .solutions
        .iter()
        .map(|s| s.cone.residuals.max())
        .fold(0.0f64, f64::max)
}

/// Records the loss `sum(x * w)` and runs the backward pass (the hypothesis check on).
fn loss_gradients<'t>(tape: &'t Tape<f64>, layer: &QpLayer<'t, f64>, pb: &Problem) -> Grads<f64> {
    let w = tape.constant(pb.w.clone().into_dyn());
    layer
        .x
        .try_mul(w)
        .expect("broadcast")
        .sum()
        .backward()
        .expect("backward")
}

/// Records the layer on a fresh tape; with `backward`, also the loss and the backward pass.
fn run(pb: &Problem, batched: bool, opts: &QpLayerOptions, backward: bool) -> Outcome {
    let tape = Tape::<f64>::new();
    let params = Params::new(&tape, pb, batched);
    let p = params.p;
    let layer = qp_layer(params.data(), opts).expect("solved");
    let kkt = worst_kkt(&layer);
    let active = layer
        .solutions
        .iter()
        .map(|s| s.ineq_multipliers.iter().filter(|z| z.abs() > 1e-9).count() as f64)
        .sum::<f64>()
        / layer.solutions.len() as f64;
    if !backward {
        return Outcome {
            value: layer.x.value(),
            kkt,
            verdicts: (0, 0, 0),
            active,
        };
    }
    let grads = loss_gradients(&tape, &layer, pb);
    let r = layer.log.last().expect("one backward report");
    Outcome {
        value: grads.wrt(p).expect("gradient of p").clone(),
        kkt,
        verdicts: (r.certified, r.warnings, r.violated),
        active,
    }
}

/// The problem, and what the layer returns for the batch (the solutions, the loss gradient
/// with respect to every argument), for the peer scripts. Infinite bounds become `null`.
fn peer_data(pb: &Problem, opts: &QpLayerOptions) -> serde_json::Value {
    let tape = Tape::<f64>::new();
    let params = Params::new(&tape, pb, true);
    let layer = qp_layer(params.data(), opts).expect("solved");
    let grads = loss_gradients(&tape, &layer, pb);
    let grad = |v: Var<'_, f64>| peer_data::array(grads.wrt(v).expect("gradient"));
    let kkt = worst_kkt(&layer);
    let (n, m_in) = (pb.q.nrows(), pb.g.nrows());
    let l =
        pb.l.clone()
            .unwrap_or_else(|| Array1::from_elem(m_in, f64::NEG_INFINITY));
    // serde_json writes a non-finite f64 as null.
    let mut out = serde_json::json!({
        "name": pb.name, "n": n, "m_eq": pb.a.as_ref().map_or(0, |(a, _)| a.nrows()), "m_in": m_in,
        "batch": BATCH,
        "Q": peer_data::matrix(pb.q.view()),
        "p": peer_data::matrix(pb.p.view()),
        "G": peer_data::matrix(pb.g.view()),
        "l": peer_data::vector(l.view()),
        "u": peer_data::vector(pb.u.view()),
        "w": peer_data::vector(pb.w.view()),
        "clarke": {
            "x": peer_data::array(&layer.x.value()),
            "y": layer.solutions.iter().map(|s| s.eq_multipliers.to_vec()).collect::<Vec<_>>(),
            "z": layer.solutions.iter().map(|s| s.ineq_multipliers.to_vec()).collect::<Vec<_>>(),
            "grad_Q": grad(params.q),
            "grad_p": grad(params.p),
            "grad_G": grad(params.g),
            "grad_u": grad(params.u),
            "kkt_worst": kkt,
        },
    });
    if let Some((a, b)) = &pb.a {
        out["A"] = peer_data::matrix(a.view());
        out["b"] = peer_data::vector(b.view());
    }
    if let Some((a, b)) = params.eq {
        out["clarke"]["grad_A"] = grad(a);
        out["clarke"]["grad_b"] = grad(b);
    }
    if let Some(l) = params.l {
        out["clarke"]["grad_l"] = grad(l);
    }
    out
}

fn layer(c: &mut Criterion) {
    let opts = QpLayerOptions::default();
    let problems = [Problem::small(), Problem::large()];
    if let Some(dir) = peer_data::dir() {
        let all: serde_json::Map<String, serde_json::Value> = problems
            .iter()
            .map(|pb| (pb.name.to_string(), peer_data(pb, &opts)))
            .collect();
        peer_data::write(&dir, "qp_layer.json", &all.into());
    }
    for pb in &problems {
        let out = run(pb, true, &opts, true);
        let (certified, warnings, violated) = out.verdicts;
        eprintln!(
            "qp_layer {}: n = {}, m_eq = {}, m_in = {}, batch {BATCH}: active inequalities mean {:.1}; worst KKT residual {:.2e}; check: certified {certified}, warnings {warnings}, violated {violated}",
            pb.name,
            pb.q.nrows(),
            pb.a.as_ref().map_or(0, |(a, _)| a.nrows()),
            pb.g.nrows(),
            out.active,
            out.kkt
        );
    }
    let mut group = c.benchmark_group("qp_layer");
    group.sample_size(10);
    for pb in &problems {
        for (size, batched) in [(1, false), (BATCH, true)] {
            let label = format!("{} {size}", pb.name);
            group.bench_with_input(BenchmarkId::new("forward", &label), &batched, |bch, &batched| {
                bch.iter(|| black_box(run(pb, batched, &opts, false).value))
            });
            group.bench_with_input(
                BenchmarkId::new("forward+backward", &label),
                &batched,
                |bch, &batched| bch.iter(|| black_box(run(pb, batched, &opts, true).value)),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, layer);
