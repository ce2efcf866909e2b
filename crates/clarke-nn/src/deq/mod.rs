//! Deep equilibrium layers: `z* = sigma(W z* + U x + b)`, one fixed point per sample.
//!
//! The layer is an implicit node on the tape (the theorem of `clarke-implicit`) with a fused
//! cell: the forward runs a batched solver on raw arrays (no tape), the outer tape gets one
//! node holding `z*`, and its backward solves the adjoint `(I - J_z)^T w = g` with
//! `J_z^T v = (v o sigma'(p*)) W` row by row, then returns `W_bar = (w o d)^T z*`,
//! `U_bar = (w o d)^T x`, `b_bar`, `x_bar`. The relu kink selection comes from the kink
//! policy of the backward call, the kinks hit at `z*` go to the report's ledger, and every
//! backward leaves a [`BackwardReport`] with the theorem's check
//! (see [`Parametrization`] for what each form certifies).
//!
//! Fusing the cell (rather than replaying a recorded map per adjoint product, as the
//! generic [`clarke_implicit::fixed_point`] does) removes the per-product tape overhead;
//! the tests check both give the same gradients.
//!
//! ```
//! use clarke_core::Tape;
//! use clarke_nn::deq::{DeqConfig, DeqLayer};
//! use clarke_nn::ParamSet;
//! use ndarray::Array2;
//! use rand::SeedableRng;
//!
//! let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
//! let mut params = ParamSet::<f64>::new();
//! let deq = DeqLayer::new(&mut params, "deq", 4, 8, DeqConfig::default(), &mut rng).unwrap();
//! let tape = Tape::new();
//! let bound = params.bind(&tape);
//! let x = tape.constant(Array2::from_elem((3, 4), 0.5).into_dyn());
//! let z = deq.forward(&bound, x).unwrap();
//! let grads = z.sum().backward().unwrap();
//! assert_eq!(bound.gradients(&grads, &params).unwrap().len(), params.len());
//! let report = deq.reports().last().unwrap();
//! assert_eq!(report.check.outcome, clarke_implicit::CheckOutcome::Certified);
//! ```

mod activation;
mod anderson;
mod check;
mod config;
mod kernel;
mod node;
pub mod weights;

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use clarke_core::gemm::gemv;
use clarke_core::{Error, KinkLedger, Result, Scalar, Var};
use clarke_implicit::{BackwardReport, GradientMode, HypothesisCheck, Pass, ReportLog};
use clarke_solve::{FixedPointReport, SolveStatus};
use ndarray::{Array1, Array2, ArrayD, ArrayView2, Axis, Ix1, Ix2, s};
use rand::Rng;

pub use activation::Activation;
pub use check::cell_jacobian_product;
pub use config::{DeqConfig, ForwardMethod, MAX_ANDERSON_MEMORY, Parametrization};
pub use weights::DeqWeights;

use crate::init::{glorot_uniform, normal};
use crate::params::{Bound, ParamId, ParamSet};
use kernel::{BlockRun, Budget, map_blocks, merge, picard_block, row_blocks, split_rows};
use node::ImplicitNode;

/// The parameters behind `W`.
#[derive(Debug, Clone, Copy)]
enum WeightParams {
    Spectral { v: ParamId },
    Monotone { a: ParamId, b: ParamId },
    Free { w: ParamId },
}

/// Figures of the most recent forward solve, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForwardStats {
    /// Iterations of the slowest row block.
    pub iterations: usize,
    /// `max_i ||T(z_i) - z_i|| / max(||T(z_i)||, 1)` at the returned solution.
    pub residual: f64,
}

/// A batched deep equilibrium layer. See the [module docs](self).
#[derive(Debug)]
pub struct DeqLayer<S: Scalar> {
    name: String,
    input_dim: usize,
    width: usize,
    config: DeqConfig,
    weight: WeightParams,
    u: ParamId,
    b: ParamId,
    /// Right singular vector estimate of `V` (spectral form), warm-started across steps.
    power_vector: RefCell<Array1<S>>,
    /// The hypothesis check's norm estimate, warm-started across backward passes.
    norm_warm_start: Rc<check::NormWarmStart>,
    reports: ReportLog,
    last_forward: Cell<Option<ForwardStats>>,
}

impl<S: Scalar> DeqLayer<S> {
    /// Adds the layer's parameters to `params` (names prefixed with `name`), drawn at random
    /// from `rng`, and returns it. `x` will be `[batch, input_dim]`, `z` `[batch, width]`.
    /// To start from given weights instead, use [`DeqLayer::with_weights`] (no RNG needed);
    /// to replace them later, [`DeqLayer::set_weights`].
    ///
    /// The parameters, found with `params.id("NAME.…")`: `NAME.u` (`[width, input_dim]`) and
    /// `NAME.bias` (`[width]`) in every form, and for `W` (`[width, width]`) `NAME.w`
    /// (unconstrained), `NAME.v` (spectral norm: `W = gamma V / sigma_max(V)`) or `NAME.a`
    /// and `NAME.b_skew` (monotone: `W = (1 - m) I - A^T A + B - B^T`).
    ///
    /// # Errors
    /// Invalid options or dimensions, or a duplicate parameter name.
    pub fn new(
        params: &mut ParamSet<S>,
        name: &str,
        input_dim: usize,
        width: usize,
        config: DeqConfig,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        config.validate()?;
        if input_dim == 0 || width == 0 {
            return Err(Error::invalid(
                "DeqLayer::new",
                format!("input_dim ({input_dim}) and width ({width}) must be positive"),
            ));
        }
        let n = width;
        let weight: Vec<(&'static str, ArrayD<S>)> = match config.parametrization {
            Parametrization::SpectralNorm { .. } => vec![("v", glorot_uniform(n, n, rng).into_dyn())],
            Parametrization::Monotone { .. } => {
                let scale = 1.0 / (n as f64).sqrt();
                vec![
                    ("a", normal(n, n, scale, rng).into_dyn()),
                    ("b_skew", normal(n, n, scale, rng).into_dyn()),
                ]
            }
            Parametrization::Unconstrained => {
                let mut w = glorot_uniform::<S>(n, n, rng);
                w.mapv_inplace(|v| v * S::from_f64_lossy(0.5));
                vec![("w", w.into_dyn())]
            }
        };
        let u = glorot_uniform::<S>(n, input_dim, rng);
        let bias = Array1::zeros(n);
        let power_vector = Array1::from_shape_fn(n, |_| S::from_f64_lossy(rng.random_range(-1.0..1.0)));
        Self::build(params, name, input_dim, config, weight, u, bias, power_vector)
    }

    /// Adds the layer's parameters to `params` so that its cell is `z = sigma(W z + U x + b)`
    /// with the given weights, and returns it. `input_dim` and `width` come from the shapes.
    ///
    /// The constrained forms find the parameters that give this `W` (see
    /// [`DeqWeights`] and [`weights::SPECTRAL_NORM_SLACK`]): the spectral-norm form takes a
    /// `W` whose norm is `gamma`, the monotone form one with `sym(I - W) >= m I`.
    ///
    /// # Errors
    /// Invalid options, inconsistent shapes or non-finite entries, a `W` the parametrisation
    /// cannot represent (with the measured norm or eigenvalue), or a duplicate name.
    ///
    /// ```
    /// use clarke_nn::deq::{DeqConfig, DeqLayer, DeqWeights, Parametrization};
    /// use clarke_nn::ParamSet;
    /// use ndarray::{array, Array1};
    ///
    /// let weights = DeqWeights {
    ///     w: array![[0.5, 0.2], [-0.2, 0.5]],
    ///     u: array![[1.0], [-1.0]],
    ///     bias: Array1::zeros(2),
    /// };
    /// let config = DeqConfig::default().with_parametrization(Parametrization::Monotone { m: 0.5 });
    /// let mut params = ParamSet::<f64>::new();
    /// let deq = DeqLayer::with_weights(&mut params, "deq", config, &weights).unwrap();
    /// assert!(params.id("deq.a").is_some() && params.id("deq.b_skew").is_some());
    /// ```
    pub fn with_weights(
        params: &mut ParamSet<S>,
        name: &str,
        config: DeqConfig,
        weights: &DeqWeights<S>,
    ) -> Result<Self> {
        config.validate()?;
        let (input_dim, width) = weights.dims()?;
        let weight = weights::weight_params(config.parametrization, weights.w.view())?;
        let power_vector = Array1::from_elem(width, S::one());
        Self::build(
            params,
            name,
            input_dim,
            config,
            weight,
            weights.u.clone(),
            weights.bias.clone(),
            power_vector,
        )
    }

    /// Adds the parameters and assembles the layer.
    #[allow(clippy::too_many_arguments)]
    fn build(
        params: &mut ParamSet<S>,
        name: &str,
        input_dim: usize,
        config: DeqConfig,
        weight: Vec<(&'static str, ArrayD<S>)>,
        u: Array2<S>,
        bias: Array1<S>,
        power_vector: Array1<S>,
    ) -> Result<Self> {
        let width = bias.len();
        let mut ids = Vec::with_capacity(weight.len());
        for (suffix, value) in weight {
            ids.push(params.add(format!("{name}.{suffix}"), value)?);
        }
        let weight = match (config.parametrization, ids.as_slice()) {
            (Parametrization::SpectralNorm { .. }, &[v]) => WeightParams::Spectral { v },
            (Parametrization::Monotone { .. }, &[a, b]) => WeightParams::Monotone { a, b },
            (Parametrization::Unconstrained, &[w]) => WeightParams::Free { w },
            _ => unreachable!("the weight parameters follow the parametrisation"),
        };
        let u = params.add(format!("{name}.u"), u.into_dyn())?;
        let b = params.add(format!("{name}.bias"), bias.into_dyn())?;
        Ok(DeqLayer {
            name: name.to_string(),
            input_dim,
            width,
            config,
            weight,
            u,
            b,
            power_vector: RefCell::new(power_vector),
            norm_warm_start: Rc::default(),
            reports: ReportLog::default(),
            last_forward: Cell::new(None),
        })
    }

    /// Replaces the layer's weights in `params` by the given ones (in the layer's form, as
    /// [`DeqLayer::with_weights`] does).
    ///
    /// # Errors
    /// Shapes other than the layer's, non-finite entries, a `W` the parametrisation cannot
    /// represent, or a `params` that is not the set the layer was added to. Nothing is
    /// changed on error.
    pub fn set_weights(&self, params: &mut ParamSet<S>, weights: &DeqWeights<S>) -> Result<()> {
        let dims = weights.dims()?;
        if dims != (self.input_dim, self.width) {
            return Err(Error::shapes(
                "DeqLayer::set_weights",
                weights.u.shape(),
                &[self.width, self.input_dim],
                format!("{}: the layer's U is [width, input_dim]", self.name),
            ));
        }
        let weight = weights::weight_params(self.config.parametrization, weights.w.view())?;
        let ids = self.weight_ids();
        for (_, id) in ids.iter().copied().chain([("u", self.u), ("bias", self.b)]) {
            params.try_get(id)?;
        }
        for ((_, id), (_, value)) in ids.into_iter().zip(weight) {
            *params.try_get_mut(id)? = value;
        }
        *params.try_get_mut(self.u)? = weights.u.clone().into_dyn();
        *params.try_get_mut(self.b)? = weights.bias.clone().into_dyn();
        Ok(())
    }

    /// The ids of the parameters behind `W`.
    fn weight_ids(&self) -> Vec<(&'static str, ParamId)> {
        match self.weight {
            WeightParams::Spectral { v } => vec![("v", v)],
            WeightParams::Monotone { a, b } => vec![("a", a), ("b_skew", b)],
            WeightParams::Free { w } => vec![("w", w)],
        }
    }

    /// Checks that every parameter of the layer still has its shape (`ParamSet::get_mut`
    /// lets a caller replace an array by one of another shape).
    fn check_parameter_shapes(&self, bound: &Bound<'_, S>) -> Result<()> {
        let n = self.width;
        let expected = self
            .weight_ids()
            .into_iter()
            .map(|(suffix, id)| (suffix, id, vec![n, n]))
            .chain([("u", self.u, vec![n, self.input_dim]), ("bias", self.b, vec![n])]);
        for (suffix, id, shape) in expected {
            let found = bound.try_var(id)?.shape();
            if found != shape {
                return Err(Error::shapes(
                    "deq",
                    &found,
                    &shape,
                    format!(
                        "{0}: parameter {0}.{suffix} was replaced by an array of another shape",
                        self.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The layer's options.
    pub fn config(&self) -> &DeqConfig {
        &self.config
    }

    /// Width `n` of `z`.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The backward reports of this layer, oldest first (a shared handle).
    pub fn reports(&self) -> ReportLog {
        self.reports.clone()
    }

    /// The warm start of the spectral normalisation's power iteration: the right singular
    /// vector estimate the next forward pass starts from (random at construction, all ones
    /// for [`with_weights`](Self::with_weights)). Another implementation that starts from
    /// it, and from the same weights, computes the same `W`.
    pub fn power_vector(&self) -> Array1<S> {
        self.power_vector.borrow().clone()
    }

    /// Figures of the most recent forward solve (not recorded for the unrolled mode).
    pub fn last_forward(&self) -> Option<ForwardStats> {
        self.last_forward.get()
    }

    /// `W` as a tape expression of the bound parameters.
    ///
    /// # Errors
    /// A `bound` of another parameter set, or a spectral-norm estimate that is zero or not
    /// finite.
    pub fn weight<'t>(&self, bound: &Bound<'t, S>) -> Result<Var<'t, S>> {
        let n = self.width;
        match (self.weight, self.config.parametrization) {
            (WeightParams::Spectral { v }, Parametrization::SpectralNorm { gamma }) => {
                let v = bound.try_var(v)?;
                let (left, right) = self.power_iteration(&v.value())?;
                let tape = v.tape();
                // sigma = u^T V v with u, v fixed: its gradient is u v^T, as in spectral
                // normalisation.
                let u_row = tape.constant(left.insert_axis(Axis(0)).into_dyn());
                let v_col = tape.constant(right.insert_axis(Axis(1)).into_dyn());
                let sigma = u_row.try_matmul(v)?.try_matmul(v_col)?.reshape(&[]);
                let scale = sigma.recip() * tape.constant_scalar(S::from_f64_lossy(gamma));
                v.try_mul(scale)
            }
            (WeightParams::Monotone { a, b }, Parametrization::Monotone { m }) => {
                let (a, b) = (bound.try_var(a)?, bound.try_var(b)?);
                let tape = a.tape();
                let eye = Array2::<S>::eye(n).mapv(|v| v * S::from_f64_lossy(1.0 - m));
                let ata = a.t().try_matmul(a)?;
                tape.constant(eye.into_dyn()).try_sub(ata)?.try_add(b)?.try_sub(b.t())
            }
            (WeightParams::Free { w }, _) => bound.try_var(w),
            _ => unreachable!("the weight parameters follow the parametrisation"),
        }
    }

    /// Warm-started power iteration on `V`: returns unit `(u, v)` with `u^T V v ~ sigma_max`.
    fn power_iteration(&self, v_mat: &ArrayD<S>) -> Result<(Array1<S>, Array1<S>)> {
        let v_mat = v_mat.view().into_dimensionality::<Ix2>().expect("V is square");
        let mut right = self.power_vector.borrow_mut();
        let normalise = |a: &mut Array1<S>| -> Result<()> {
            let norm = a.dot(a).sqrt();
            if norm <= S::zero() || !norm.is_finite() {
                return Err(Error::invalid(
                    "deq spectral norm",
                    format!("power iteration hit a zero or non-finite vector (norm {norm}); is V zero or non-finite?"),
                ));
            }
            a.mapv_inplace(|x| x / norm);
            Ok(())
        };
        // The products go through faer's matrix-vector kernels: ndarray's row-dot loop made
        // this serial step a visible part of a training step at width 128.
        let (rows, cols) = v_mat.dim();
        let mut left = Array1::<S>::zeros(rows);
        let mut next = Array1::<S>::zeros(cols);
        normalise(&mut right)?;
        gemv(S::one(), v_mat, right.view(), S::zero(), left.view_mut());
        normalise(&mut left)?;
        for _ in 1..self.config.power_iterations.max(1) {
            gemv(S::one(), v_mat.t(), left.view(), S::zero(), next.view_mut());
            normalise(&mut next)?;
            let change = next
                .iter()
                .zip(right.iter())
                .map(|(a, b)| (*a - *b).abs().to_f64_exact())
                .sum::<f64>();
            std::mem::swap(&mut *right, &mut next);
            gemv(S::one(), v_mat, right.view(), S::zero(), left.view_mut());
            normalise(&mut left)?;
            if change < self.config.power_tol {
                break;
            }
        }
        Ok((left, right.clone()))
    }

    /// `z*` for the inputs `x` (`[batch, input_dim]`), recorded on `x`'s tape according to
    /// the gradient mode. The solver starts from `z = 0`.
    ///
    /// # Errors
    /// A shape mismatch (of `x`, or of a parameter replaced through `ParamSet::get_mut`), a
    /// `bound` of another parameter set, a non-finite input or parameter, or a forward solve
    /// that did not converge (with its residual trace).
    pub fn forward<'t>(&self, bound: &Bound<'t, S>, x: Var<'t, S>) -> Result<Var<'t, S>> {
        self.forward_inner(bound, x, None)
    }

    /// As [`DeqLayer::forward`], with the solver (or the unrolled iteration) started from
    /// `start` (`[batch, width]`), for example the previous step's solution of the same
    /// batch. The gradient does not depend on the start (it is not a tape input): in the
    /// implicit and one-step modes only the solution matters, and the unrolled mode
    /// differentiates its iterations from this constant.
    ///
    /// # Errors
    /// As [`DeqLayer::forward`], and a `start` of another shape or with a non-finite entry.
    pub fn forward_from<'t>(
        &self,
        bound: &Bound<'t, S>,
        x: Var<'t, S>,
        start: ArrayView2<'_, S>,
    ) -> Result<Var<'t, S>> {
        self.forward_inner(bound, x, Some(start))
    }

    fn forward_inner<'t>(
        &self,
        bound: &Bound<'t, S>,
        x: Var<'t, S>,
        start: Option<ArrayView2<'_, S>>,
    ) -> Result<Var<'t, S>> {
        let xs = x.shape();
        if xs.len() != 2 || xs[1] != self.input_dim {
            return Err(Error::ShapeMismatch {
                op: "deq",
                lhs: xs,
                rhs: vec![0, self.input_dim],
                detail: format!("{}: x must be [batch, {}]", self.name, self.input_dim),
            });
        }
        let start = match start {
            Some(z0) => {
                if z0.dim() != (xs[0], self.width) {
                    return Err(Error::shapes(
                        "deq",
                        z0.shape(),
                        &[xs[0], self.width],
                        format!("{}: the start must be [batch, width]", self.name),
                    ));
                }
                kernel::ensure_finite("the start", z0)?;
                z0.to_owned()
            }
            None => Array2::zeros((xs[0], self.width)),
        };
        self.check_parameter_shapes(bound)?;
        let w = self.weight(bound)?;
        let (u, b) = (bound.try_var(self.u)?, bound.try_var(self.b)?);
        match self.config.gradient {
            GradientMode::Unrolled { iterations } => self.unrolled(x, w, u, b, start, iterations),
            mode => {
                let solved = self.solve(x, w, u, b, start)?;
                if mode == GradientMode::OneStep {
                    let tape = x.tape();
                    let z = tape.constant(solved.z.into_dyn());
                    let pre = z.try_matmul(w.t())?.try_add(x.try_matmul(u.t())?)?.try_add(b)?;
                    let out = self.config.activation.record(pre);
                    let reason = "the one-step mode differentiates one application of the cell at the detached solution; no inverse is taken (its kinks are in the ledger of the backward call)";
                    return self.logged(out, solved.report, solved.residual, true, reason);
                }
                self.record_implicit(x, w, u, b, solved)
            }
        }
    }

    /// `K` iterations from `start` recorded on the tape (memory grows with `K`).
    fn unrolled<'t>(
        &self,
        x: Var<'t, S>,
        w: Var<'t, S>,
        u: Var<'t, S>,
        b: Var<'t, S>,
        start: Array2<S>,
        k: usize,
    ) -> Result<Var<'t, S>> {
        let tape = x.tape();
        let input = x.try_matmul(u.t())?.try_add(b)?;
        let mut z = tape.constant(start.into_dyn());
        let mut previous = z;
        for _ in 0..k {
            previous = z;
            z = self.config.activation.record(z.try_matmul(w.t())?.try_add(input)?);
        }
        // The last step's change `z_K - z_{K-1} = T(z_{K-1}) - z_{K-1}`: the residual of the
        // last iteration, from values already on the tape (no extra product).
        let residual = z.with_value(|zk| {
            previous.with_value(|zp| {
                plain_residual(
                    zk.view().into_dimensionality::<Ix2>().expect("2-D by construction"),
                    zp.view().into_dimensionality::<Ix2>().expect("2-D by construction"),
                )
            })
        });
        let forward = FixedPointReport {
            solver: "unrolled",
            iterations: k,
            evaluations: k,
            inner_iterations: 0,
            residual,
            tolerance: 0.0,
            status: SolveStatus::MaxIterations,
            trace: Vec::new(),
        };
        let reason = "the unrolled mode backpropagates through the iterations; no inverse is taken (their kinks are in the ledger of the backward call)";
        self.logged(z, forward, residual, false, reason)
    }

    /// Passes `z` through an identity node whose backward logs a report, for the modes
    /// whose gradient is plain backpropagation (every backward leaves a report).
    fn logged<'t>(
        &self,
        z: Var<'t, S>,
        forward: FixedPointReport,
        residual: f64,
        approximate: bool,
        reason: &str,
    ) -> Result<Var<'t, S>> {
        let report = BackwardReport {
            node: self.name.clone(),
            mode: self.config.gradient,
            forward,
            forward_residual: residual,
            adjoint: None,
            fallback: None,
            approximate,
            check: HypothesisCheck::not_checked(reason),
            kinks: KinkLedger::default(),
        };
        let tape = z.tape();
        let (reports, forward_reports) = (self.reports.clone(), self.reports.clone());
        let forward_report = report.clone();
        let out = tape.try_custom_fn_ctx(&self.name, &[z], z.value(), move |_, _, _, grad| {
            reports.push(report.clone());
            Ok(vec![Some(grad.to_owned())])
        })?;
        tape.set_custom_jvp(out, move |_, _, _, tangents| {
            forward_reports.push_pass(Pass::ForwardMode, forward_report.clone());
            let tangent = tangents.first().and_then(Option::as_ref);
            tangent
                .map(|t| t.to_owned())
                .ok_or_else(|| Error::invalid("deq", "the logging node received no tangent"))
        })?;
        Ok(out)
    }

    /// The forward solve on raw arrays.
    fn solve(&self, x: Var<'_, S>, w: Var<'_, S>, u: Var<'_, S>, b: Var<'_, S>, start: Array2<S>) -> Result<Solved<S>> {
        let two = |v: Var<'_, S>| v.value().into_dimensionality::<Ix2>().expect("2-D by construction");
        let (xv, wv, uv) = (two(x), two(w), two(u));
        let bv = b.value().into_dimensionality::<Ix1>().expect("1-D by construction");
        for (name, a) in [("x", xv.view()), ("W", wv.view()), ("U", uv.view())] {
            kernel::ensure_finite(name, a)?;
        }
        if let Some(v) = bv.iter().find(|v| !v.is_finite()) {
            return Err(Error::invalid(
                "deq",
                format!("{}: the bias has a non-finite entry {v}", self.name),
            ));
        }
        let c = kernel::input_term(xv.view(), uv.view(), bv.view());
        let mut z = start;
        let (run, solver, tol) = self.forward_iterate(wv.view(), c.view(), &mut z)?;
        let pre = kernel::pre_activation(wv.view(), c.view(), z.view());
        let mut out = pre.clone();
        self.config.activation.apply_in_place(out.view_mut());
        let residual = plain_residual(out.view(), z.view());
        let fixed = self.config.fixed_forward_iterations.is_some();
        let status = if run.non_finite || !residual.is_finite() {
            SolveStatus::NonFinite
        } else if fixed || run.residual <= tol {
            SolveStatus::Converged
        } else {
            SolveStatus::MaxIterations
        };
        let report = FixedPointReport {
            solver,
            iterations: run.iterations,
            evaluations: run.iterations + 1,
            inner_iterations: 0,
            residual: run.residual,
            tolerance: tol,
            status,
            trace: run.trace,
        };
        if status != SolveStatus::Converged {
            return Err(solve_failed(
                &self.name,
                "forward",
                solver,
                status,
                report.iterations,
                report.residual,
                tol,
                &report.trace,
            ));
        }
        self.last_forward.set(Some(ForwardStats {
            iterations: report.iterations,
            residual,
        }));
        Ok(Solved {
            z,
            pre,
            out,
            report,
            residual,
        })
    }

    /// Runs the forward method over row blocks in parallel; `z` holds the start.
    fn forward_iterate(
        &self,
        w: ArrayView2<'_, S>,
        c: ArrayView2<'_, S>,
        z: &mut Array2<S>,
    ) -> Result<(BlockRun, &'static str, f64)> {
        let budget = match self.config.fixed_forward_iterations {
            Some(k) => Budget {
                tol: 0.0,
                max_iter: k,
                fixed: true,
            },
            None => Budget {
                tol: self.config.forward_tol,
                max_iter: self.config.forward_max_iter,
                fixed: false,
            },
        };
        let blocks = row_blocks(z.nrows(), self.width);
        let act = self.config.activation;
        let forward = self.config.resolved_forward();
        if let ForwardMethod::PeacemanRachford { alpha } = forward {
            let alpha = match alpha {
                Some(a) => a,
                None => 1.0 / self.norm_of_identity_minus(w)?.max(f64::MIN_POSITIVE),
            };
            let resolvent_t = kernel::resolvent_transposed(w, alpha)?;
            let runs = map_blocks(split_rows(z.view_mut(), &blocks), &blocks, |zb, (r0, r1)| {
                kernel::peaceman_rachford_block(resolvent_t.view(), c.slice(s![r0..r1, ..]), zb, alpha, budget)
            });
            return Ok((merge(runs), "peaceman_rachford", budget.tol));
        }
        let (relax, solver) = match forward {
            ForwardMethod::ForwardBackward { alpha } => {
                let alpha = match alpha {
                    Some(a) => a,
                    None => self.forward_backward_step(w)?,
                };
                (Some(alpha), "forward_backward")
            }
            ForwardMethod::Anderson { .. } => (None, "anderson"),
            _ => (None, "picard"),
        };
        let w_t = kernel::transposed(w);
        let w_t = w_t.view();
        let runs = map_blocks(split_rows(z.view_mut(), &blocks), &blocks, |zb, (r0, r1)| {
            let cb = c.slice(s![r0..r1, ..]);
            match forward {
                ForwardMethod::Anderson { memory } => anderson_block(w_t, cb, zb, act, memory, budget),
                _ => picard_block(w_t, cb, zb, act, relax, budget),
            }
        });
        Ok((merge(runs), solver, budget.tol))
    }

    /// `alpha = m / ||I - W||^2` for a monotone `W`.
    fn forward_backward_step(&self, w: ArrayView2<'_, S>) -> Result<f64> {
        let m = match self.config.parametrization {
            Parametrization::Monotone { m } => m,
            _ => {
                return Err(Error::invalid(
                    "deq",
                    "forward-backward splitting needs an explicit step unless the parametrisation is monotone",
                ));
            }
        };
        let l = self.norm_of_identity_minus(w)?;
        Ok((m / (l * l)).min(1.0))
    }

    /// `||I - W||`, the Lipschitz constant of the monotone operator `z -> (I - W) z - c`.
    fn norm_of_identity_minus(&self, w: ArrayView2<'_, S>) -> Result<f64> {
        let mut iw = Array2::<S>::eye(w.nrows());
        iw -= &w;
        Ok(clarke_solve::dense::singular_values(iw.view())?
            .first()
            .map_or(1.0, |v| v.to_f64_exact()))
    }

    /// Records the solution as one node whose backward is the adjoint solve.
    fn record_implicit<'t>(
        &self,
        x: Var<'t, S>,
        w: Var<'t, S>,
        u: Var<'t, S>,
        b: Var<'t, S>,
        solved: Solved<S>,
    ) -> Result<Var<'t, S>> {
        let node = Rc::new(ImplicitNode {
            name: self.name.clone(),
            config: self.config.clone(),
            z: solved.z,
            pre: solved.pre,
            forward: solved.report,
            forward_residual: solved.residual,
            reports: self.reports.clone(),
            norm_warm_start: Rc::clone(&self.norm_warm_start),
        });
        let tape = x.tape();
        let backward = Rc::clone(&node);
        let out = tape.try_custom_fn_ctx(
            &self.name,
            &[x, w, u, b],
            solved.out.into_dyn(),
            move |ctx, inputs, _output, grad| backward.vjp(ctx, inputs, grad),
        )?;
        tape.set_custom_jvp(out, move |ctx, inputs, _output, tangents| {
            node.jvp(ctx, inputs, tangents)
        })?;
        Ok(out)
    }
}

/// The error of a solve that did not converge, with its residual trace.
#[allow(clippy::too_many_arguments)]
fn solve_failed(
    node: &str,
    stage: &'static str,
    solver: &'static str,
    status: SolveStatus,
    iterations: usize,
    residual: f64,
    tolerance: f64,
    trace: &[f64],
) -> Error {
    Error::SolveFailed {
        node: node.to_string(),
        stage,
        solver,
        status: status.as_str(),
        iterations,
        residual,
        tolerance,
        trace: trace.into(),
    }
}

/// The forward solution of a batch.
struct Solved<S> {
    /// The last iterate `z*`.
    z: Array2<S>,
    /// `p* = z* W^T + c`.
    pre: Array2<S>,
    /// `sigma(p*)`, the layer's output.
    out: Array2<S>,
    report: FixedPointReport,
    /// The plain map's residual at `z*`.
    residual: f64,
}

fn plain_residual<S: Scalar>(out: ArrayView2<'_, S>, z: ArrayView2<'_, S>) -> f64 {
    let mut worst = 0.0f64;
    for (a, b) in out.outer_iter().zip(z.outer_iter()) {
        let d = a
            .iter()
            .zip(b.iter())
            .map(|(x, y)| (*x - *y).to_f64_exact().powi(2))
            .sum::<f64>();
        let n = a.iter().map(|x| x.to_f64_exact().powi(2)).sum::<f64>();
        worst = worst.max(d.sqrt() / n.sqrt().max(1.0));
    }
    worst
}

/// Anderson on one row block, each sample with its own mixing (see [`anderson::anderson_rows`]).
/// `w_t` is `W^T`, best in standard layout.
fn anderson_block<S: Scalar>(
    w_t: ArrayView2<'_, S>,
    c: ArrayView2<'_, S>,
    z: ndarray::ArrayViewMut2<'_, S>,
    act: Activation,
    memory: usize,
    budget: Budget,
) -> BlockRun {
    let map = |zb: ArrayView2<'_, S>, [cb]: [ArrayView2<'_, S>; 1], mut out: ndarray::ArrayViewMut2<'_, S>| {
        out.assign(&cb);
        kernel::gemm_seq(zb, w_t, true, out.view_mut());
        act.apply_in_place(out);
    };
    let scale = |_: usize, t2: f64| t2.sqrt().max(1.0);
    let c = c.as_standard_layout().into_owned();
    anderson::anderson_rows(z, [c], memory, budget, map, scale)
}
