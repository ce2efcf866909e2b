//! One DEQ training step, the same step as the PyTorch and JAX scripts of `benches/peers/`
//! (`deq_step.py`): `Z = relu(Z W^T + X U^T + b)` (B x n, X is B x d), `W` with spectral norm 0.9,
//! `logits = Z V^T + c` (10 classes), loss = mean cross-entropy; 30 Picard forward
//! iterations without a tape, then 30 adjoint Neumann iterations `g <- dL/dZ + J_z^T g`, then
//! the gradients of W, U, b, V, c. f64, both cores. Also the unrolled variant (30 iterations
//! on the tape, backpropagated).
//!
//! `gemm x60` times the 60 products alone (clarke-core's GEMM, faer, one row half per
//! thread), the arithmetic floor of the step on this machine.
//!
//! Criterion's throughput is set to the step's nominal floating-point work, 60 products of
//! B x n by n x n (`60 * 2 B n^2` flops: 30 forward, 30 adjoint), so its "elem/s" figure
//! reads as flop/s. The hypothesis check is off here (the reference step has none); the
//! `check` variant at the smallest size measures what it costs.
//!
//! With `CLARKE_PEER_DATA=DIR`, each size's problem (W, U, b, V, c, X, the labels) and the
//! loss and gradient norms of one implicit step go to `DIR/deq_step_B_d_n.json` before the
//! timings, for `benches/peers/deq_step.py`.

use std::hint::black_box;

use clarke::core::Tape;
use clarke::core::gemm::gemm;
use clarke::implicit::GradientMode;
use clarke::nn::deq::{DeqConfig, DeqLayer, Parametrization};
use clarke::nn::{Linear, ParamSet};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use ndarray::{Array1, Array2, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::peer_data;

const SIZES: [(usize, usize, usize); 3] = [(64, 64, 64), (128, 64, 256), (256, 256, 512)];
const ITERATIONS: usize = 30;

/// `a` scaled to spectral norm `target` (power iteration on a^T a).
fn with_spectral_norm(a: Array2<f64>, target: f64) -> Array2<f64> {
    let mut v = Array1::from_elem(a.ncols(), 1.0);
    for _ in 0..300 {
        let w = a.t().dot(&a.dot(&v));
        v = &w / w.dot(&w).sqrt();
    }
    let norm = a.dot(&v).dot(&a.dot(&v)).sqrt();
    a * (target / norm)
}

struct Step {
    params: ParamSet<f64>,
    deq: DeqLayer<f64>,
    head: Linear,
    x: Array2<f64>,
    labels: Vec<usize>,
}

impl Step {
    fn new((batch, d, n): (usize, usize, usize), gradient: GradientMode, check: bool) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut params = ParamSet::new();
        let config = DeqConfig::default()
            .with_parametrization(Parametrization::Unconstrained)
            .with_fixed_forward_iterations(ITERATIONS)
            .with_gradient(gradient)
            .with_check(check);
        let deq = DeqLayer::new(&mut params, "deq", d, n, config, &mut rng).expect("valid layer");
        let head = Linear::new(&mut params, "head", n, 10, &mut rng).expect("valid layer");
        let w = Array2::from_shape_simple_fn((n, n), || rng.random_range(-1.0..1.0));
        *params.get_mut(params.id("deq.w").expect("unconstrained W")) = with_spectral_norm(w, 0.9).into_dyn();
        let x = Array2::from_shape_simple_fn((batch, d), || rng.random_range(0.0..1.0));
        let labels = (0..batch).map(|_| rng.random_range(0..10)).collect();
        Step {
            params,
            deq,
            head,
            x,
            labels,
        }
    }

    /// Forward, loss, backward; returns the gradients of every parameter.
    fn run(&self) -> Vec<ndarray::ArrayD<f64>> {
        self.loss_and_gradients().1
    }

    /// The loss and the gradients of every parameter, of one step.
    fn loss_and_gradients(&self) -> (f64, Vec<ndarray::ArrayD<f64>>) {
        let tape = Tape::<f64>::new();
        let bound = self.params.bind(&tape);
        let x = tape.constant(self.x.clone().into_dyn());
        let z = self.deq.forward(&bound, x).expect("forward");
        let loss = self
            .head
            .forward(&bound, z)
            .expect("head")
            .softmax_cross_entropy(&self.labels);
        let grads = loss.backward().expect("backward");
        let gradients = bound.gradients(&grads, &self.params).expect("finite gradients");
        (loss.scalar(), gradients)
    }

    /// The problem and the figures of one step, for the peer scripts.
    fn peer_data(&self, (batch, d, n): (usize, usize, usize)) -> serde_json::Value {
        let value = |name: &str| self.params.get(self.params.id(name).expect("a parameter of the step"));
        let (loss, grads) = self.loss_and_gradients();
        let grad_norms: serde_json::Map<String, serde_json::Value> = self
            .params
            .ids()
            .map(|id| {
                (
                    self.params.name(id).to_string(),
                    peer_data::norm(&grads[id.index()]).into(),
                )
            })
            .collect();
        serde_json::json!({
            "batch": batch, "d": d, "n": n, "iterations": ITERATIONS,
            "W": peer_data::array(value("deq.w")),
            "U": peer_data::array(value("deq.u")),
            "b": peer_data::array(value("deq.bias")),
            "V": peer_data::array(value("head.weight")),
            "c": peer_data::array(value("head.bias")),
            "X": peer_data::matrix(self.x.view()),
            "y": self.labels,
            "clarke_implicit": { "loss": loss, "grad_norms": grad_norms },
        })
    }
}

fn deq_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("deq_step");
    group.sample_size(20);
    for size in SIZES {
        let (batch, _, n) = size;
        group.throughput(Throughput::Elements((60 * 2 * batch * n * n) as u64));
        let label = format!("{size:?}");
        // 30 Neumann iterations g <- dL/dZ + J^T g are 31 terms of the series.
        let implicit = Step::new(size, GradientMode::TruncatedNeumann { terms: ITERATIONS + 1 }, false);
        if let Some(dir) = peer_data::dir() {
            let (b, d, n) = size;
            peer_data::write(&dir, &format!("deq_step_{b}_{d}_{n}.json"), &implicit.peer_data(size));
        }
        group.bench_with_input(BenchmarkId::new("implicit", &label), &implicit, |bch, s| {
            bch.iter(|| black_box(s.run()))
        });
        let unrolled = Step::new(size, GradientMode::Unrolled { iterations: ITERATIONS }, false);
        group.bench_with_input(BenchmarkId::new("unrolled", &label), &unrolled, |bch, s| {
            bch.iter(|| black_box(s.run()))
        });
        // The arithmetic floor: the same 60 products as plain sequential GEMMs, the batch
        // split in two row halves on two threads (as the layer does), nothing else.
        let z = Array2::from_shape_simple_fn((batch, n), || 0.5);
        let w = Array2::from_shape_simple_fn((n, n), || 0.25);
        group.bench_with_input(BenchmarkId::new("gemm x60", &label), &(z, w), |bch, (z, w)| {
            let mut out = Array2::zeros((batch, n));
            bch.iter(|| {
                let half = batch / 2;
                let (mut top, mut bottom) = out.view_mut().split_at(Axis(0), half);
                let (zt, zb) = z.view().split_at(Axis(0), half);
                rayon::join(
                    || (0..60).for_each(|_| gemm(1.0, zt, w.t(), false, top.view_mut())),
                    || (0..60).for_each(|_| gemm(1.0, zb, w.t(), false, bottom.view_mut())),
                );
                black_box(&out);
            })
        });
        if size == SIZES[0] {
            let checked = Step::new(size, GradientMode::TruncatedNeumann { terms: ITERATIONS + 1 }, true);
            group.bench_with_input(BenchmarkId::new("implicit+check", &label), &checked, |bch, s| {
                bch.iter(|| black_box(s.run()))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, deq_step);
