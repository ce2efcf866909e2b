//! Hypergradients of a criterion `C(beta_hat(lambda))` with respect to `log lambda`.
//!
//! Four methods, one answer where the implicit function theorem applies:
//!
//! - [`Method::Implicit`] ([`implicit`]): the generic route. The forward-backward map
//!   `T(beta, theta) = S_{gamma e^theta}(beta - gamma grad f(beta))` is recorded on a tape
//!   and handed to a `clarke-implicit` fixed-point layer, which solves the adjoint
//!   `(I - J_beta)^T v = grad C` and checks the invertibility hypothesis on `I - J_beta`.
//! - [`Method::Support`] ([`support`]): the support-restricted solve of the paper's Prop. 5.
//!   It builds the equicorrelation set `E = {j : |w x_j^T r| = lambda_j}`, the support
//!   `S`, the selection `q` at the kinks `E \ S` from the kink policy, checks that
//!   `X_E^T X_E` has full rank, and solves one `|A| x |A|` system (`A` the coordinates with
//!   `q > 0`).
//! - [`Method::Forward`] ([`forward`]): the implicit forward method of Bertrand et al.
//!   (2020): forward-mode differentiation of coordinate descent on the active set at the
//!   solution, `K J_A = -Lambda_A s_A` by Gauss-Seidel sweeps over the columns of `X`, then
//!   `J^T grad C`. One tangent per hyperparameter.
//! - [`Method::Unrolled`] ([`unrolled`]): forward-mode differentiation of ISTA iterations
//!   (the piggyback recursion), for comparison.
//!
//! All four use the same conservative Jacobian element when they use the same step
//! `gamma` and kink policy; with `q` in `{0, 1}` at the kinks (or no kink) the element does
//! not depend on `gamma`. Every result carries the Prop. 5 hypothesis check
//! ([`SupportCheck`]), so a user learns when the derivative is not unique.

pub mod forward;
pub mod hessian;
pub mod implicit;
pub mod support;
pub mod unrolled;

use std::fmt;
use std::time::Instant;

use clarke_core::{Error, KinkLedger, KinkPolicy, Result};
use clarke_implicit::{CheckOutcome, HypothesisCheck};
use ndarray::{Array1, ArrayView1, ArrayView2};

use crate::cd::Fit;
use crate::design::{CscMatrix, Design};
use crate::model::{LassoModel, check_response, dot, sigmoid, softplus, validate_data};

/// A differentiable criterion of the coefficients (the outer objective of the bilevel
/// problem).
///
/// The criteria of this module also have `value` and `gradient` as inherent methods, so
/// calling them needs no import of this trait.
pub trait Criterion {
    /// `C(beta)`.
    ///
    /// # Errors
    /// A `beta` the criterion cannot evaluate (for example of another length).
    fn value(&self, beta: ArrayView1<'_, f64>) -> Result<f64>;
    /// `grad C(beta)`.
    ///
    /// # Errors
    /// As [`Criterion::value`].
    fn gradient(&self, beta: ArrayView1<'_, f64>) -> Result<Array1<f64>>;
}

/// Mean squared error on held-out rows: `C(beta) = ||y_val - X_val beta||^2 / n_val`.
#[derive(Debug, Clone)]
pub struct ValidationMse {
    design: Design,
    y: Array1<f64>,
}

impl ValidationMse {
    /// Validation data `(X_val, y_val)`. Errors: no rows (an empty validation set),
    /// mismatched lengths, non-finite values.
    pub fn new(x: ArrayView2<'_, f64>, y: ArrayView1<'_, f64>) -> Result<Self> {
        const OP: &str = "ValidationMse::new";
        non_empty(OP, x.dim(), y)?;
        validate_data(OP, x, y)?;
        Ok(ValidationMse {
            design: Design::dense(x),
            y: y.to_owned(),
        })
    }

    /// Validation data with a sparse `X_val` (memory in proportion to its non-zeros).
    /// Errors: no rows, mismatched lengths, a non-finite `y_val` (the matrix was checked by
    /// its constructor).
    pub fn new_sparse(x: CscMatrix, y: ArrayView1<'_, f64>) -> Result<Self> {
        const OP: &str = "ValidationMse::new_sparse";
        let shape = (x.nrows(), x.ncols());
        non_empty(OP, shape, y)?;
        check_response(OP, shape, y)?;
        Ok(ValidationMse {
            design: Design::Sparse(x),
            y: y.to_owned(),
        })
    }

    /// Features.
    pub fn p(&self) -> usize {
        self.design.p()
    }

    /// Validation rows.
    fn n(&self) -> usize {
        self.design.n()
    }

    /// `C(beta)`.
    ///
    /// # Errors
    /// A `beta` whose length is not the number of validation features.
    pub fn value(&self, beta: ArrayView1<'_, f64>) -> Result<f64> {
        let r = self.residual(beta)?;
        Ok(dot(&r, &r) / self.n() as f64)
    }

    /// `grad C(beta)`.
    ///
    /// # Errors
    /// As [`ValidationMse::value`].
    pub fn gradient(&self, beta: ArrayView1<'_, f64>) -> Result<Array1<f64>> {
        let r = self.residual(beta)?;
        Ok(self.design.correlations(-2.0 / self.n() as f64, &r))
    }

    fn residual(&self, beta: ArrayView1<'_, f64>) -> Result<Vec<f64>> {
        if beta.len() != self.p() {
            return Err(Error::shapes(
                "validation criterion",
                &[beta.len()],
                &[self.p()],
                "beta must have one entry per validation feature (is the fit of a model with other features?)",
            ));
        }
        let mut r = self.y.to_vec();
        for (j, &b) in beta.iter().enumerate() {
            if b != 0.0 {
                self.design.col(j).axpy(-b, &mut r);
            }
        }
        Ok(r)
    }
}

/// Refuses an empty validation set, naming its shape.
fn non_empty(op: &'static str, (n, p): (usize, usize), y: ArrayView1<'_, f64>) -> Result<()> {
    if n == 0 || y.is_empty() {
        return Err(Error::invalid(
            op,
            format!(
                "the validation set is empty (X_val is {n} x {p}, y_val has {} entries); hold out at least one row",
                y.len()
            ),
        ));
    }
    Ok(())
}

impl Criterion for ValidationMse {
    fn value(&self, beta: ArrayView1<'_, f64>) -> Result<f64> {
        ValidationMse::value(self, beta)
    }

    fn gradient(&self, beta: ArrayView1<'_, f64>) -> Result<Array1<f64>> {
        ValidationMse::gradient(self, beta)
    }
}

/// Mean logistic loss on held-out rows with labels in `{0, 1}`:
/// `C(beta) = mean_i log(1 + e^{m_i}) - y_i m_i`, `m = X_val beta`.
#[derive(Debug, Clone)]
pub struct ValidationLogLoss {
    inner: ValidationMse,
}

impl ValidationLogLoss {
    /// Validation data `(X_val, y_val)`. Errors as [`ValidationMse::new`], and on labels
    /// other than 0 and 1.
    pub fn new(x: ArrayView2<'_, f64>, y: ArrayView1<'_, f64>) -> Result<Self> {
        let inner = ValidationMse::new(x, y).map_err(|e| match e {
            Error::InvalidArgument { detail, .. } => Error::invalid("ValidationLogLoss::new", detail),
            other => other,
        })?;
        if let Some((i, v)) = y.iter().enumerate().find(|(_, v)| **v != 0.0 && **v != 1.0) {
            return Err(Error::invalid(
                "ValidationLogLoss::new",
                format!("labels must be 0 or 1, got {v} at row {i}"),
            ));
        }
        Ok(ValidationLogLoss { inner })
    }
}

impl ValidationLogLoss {
    /// Validation data with a sparse `X_val`. Errors as [`ValidationMse::new_sparse`], and
    /// on labels other than 0 and 1.
    pub fn new_sparse(x: CscMatrix, y: ArrayView1<'_, f64>) -> Result<Self> {
        const OP: &str = "ValidationLogLoss::new_sparse";
        let inner = ValidationMse::new_sparse(x, y).map_err(|e| match e {
            Error::InvalidArgument { detail, .. } => Error::invalid(OP, detail),
            other => other,
        })?;
        if let Some((i, v)) = y.iter().enumerate().find(|(_, v)| **v != 0.0 && **v != 1.0) {
            return Err(Error::invalid(OP, format!("labels must be 0 or 1, got {v} at row {i}")));
        }
        Ok(ValidationLogLoss { inner })
    }

    /// `C(beta)`.
    ///
    /// # Errors
    /// A `beta` whose length is not the number of validation features.
    pub fn value(&self, beta: ArrayView1<'_, f64>) -> Result<f64> {
        // residual r = y - m, so m = y - r.
        let r = self.inner.residual(beta)?;
        let n = self.inner.n() as f64;
        let total: f64 = self
            .inner
            .y
            .iter()
            .zip(&r)
            .map(|(&y, &ri)| {
                let m = y - ri;
                softplus(m) - y * m
            })
            .sum();
        Ok(total / n)
    }

    /// `grad C(beta)`.
    ///
    /// # Errors
    /// As [`ValidationLogLoss::value`].
    pub fn gradient(&self, beta: ArrayView1<'_, f64>) -> Result<Array1<f64>> {
        let r = self.inner.residual(beta)?;
        let n = self.inner.n();
        let g: Vec<f64> = self
            .inner
            .y
            .iter()
            .zip(&r)
            .map(|(&y, &ri)| sigmoid(y - ri) - y)
            .collect();
        Ok(self.inner.design.correlations(1.0 / n as f64, &g))
    }
}

impl Criterion for ValidationLogLoss {
    fn value(&self, beta: ArrayView1<'_, f64>) -> Result<f64> {
        ValidationLogLoss::value(self, beta)
    }

    fn gradient(&self, beta: ArrayView1<'_, f64>) -> Result<Array1<f64>> {
        ValidationLogLoss::gradient(self, beta)
    }
}

/// Which hypergradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// The generic implicit layer on the forward-backward map.
    Implicit,
    /// The support-restricted solve of Prop. 5.
    Support,
    /// Forward-mode differentiation of unrolled ISTA.
    Unrolled,
    /// Implicit forward: forward-mode coordinate descent on the active set's tangents.
    Forward,
}

impl Method {
    /// All four, in the order above.
    pub const ALL: [Method; 4] = [Method::Implicit, Method::Support, Method::Unrolled, Method::Forward];

    /// Short name.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Implicit => "implicit",
            Method::Support => "support",
            Method::Unrolled => "unrolled",
            Method::Forward => "forward",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Options shared by the four methods.
#[derive(Debug, Clone, PartialEq)]
pub struct HypergradOptions {
    /// The kink policy: its `soft_threshold` is the derivative `q` at `|w x_j^T r| ==
    /// lambda_j`, `beta_j = 0`. Default `KinkPolicy::pytorch()` (`q = 0`).
    pub policy: KinkPolicy,
    /// Step `gamma` of the forward-backward map. It changes the conservative Jacobian
    /// element only at kinks with `0 < q < 1`. Default `1 / L` (`L` the Lipschitz constant
    /// of the smooth part's gradient).
    pub step: Option<f64>,
    /// A feature with `beta_j = 0` belongs to the equicorrelation set when
    /// `|w x_j^T r| >= lambda_j (1 - kink_tol)`. Default `1e-9` (solve the inner problem to a
    /// small gap; exact kinks are caught at 0).
    pub kink_tol: f64,
    /// `sigma_min / sigma_max` of `X_E^T X_E` at or below this counts as rank deficient.
    /// Default `1e-10`.
    pub rank_tol: f64,
    /// Relative tolerance of the generic method's forward and adjoint solves. Default
    /// `1e-10`.
    pub implicit_tol: f64,
    /// Iteration budget of the unrolled method. Default 100,000.
    pub unrolled_max_iter: usize,
    /// The unrolled method stops when an iteration changes the Jacobian by at most this
    /// (relative, max norm) and the iterate by at most this relative to its size. Default
    /// `1e-12`.
    pub unrolled_tol: f64,
    /// Start the unrolled iterations from the fit's solution (default) instead of zero.
    pub unrolled_warm: bool,
    /// The forward method stops when the largest residual of the tangent system met in a
    /// sweep is at most this times `max |lambda_j|`. Default `1e-13`.
    pub forward_tol: f64,
    /// Sweep budget of the forward method (per tangent). Default 100,000.
    pub forward_max_sweeps: usize,
    /// Largest equicorrelation set (or solved block) for which the support method and the
    /// check form the `|E| x |E|` matrix, factor it and take its SVD; above it they work
    /// matrix-free on the columns (Lanczos for the singular values, conjugate gradients or
    /// GMRES for the solve). Default [`hessian::DENSE_SUPPORT_LIMIT`].
    pub dense_support_limit: usize,
}

impl Default for HypergradOptions {
    fn default() -> Self {
        HypergradOptions {
            policy: KinkPolicy::pytorch(),
            step: None,
            kink_tol: 1e-9,
            rank_tol: 1e-10,
            implicit_tol: 1e-10,
            unrolled_max_iter: 100_000,
            unrolled_tol: 1e-12,
            unrolled_warm: true,
            forward_tol: 1e-13,
            forward_max_sweeps: 100_000,
            dense_support_limit: hessian::DENSE_SUPPORT_LIMIT,
        }
    }
}

impl HypergradOptions {
    /// Sets the kink policy.
    pub fn with_policy(mut self, policy: KinkPolicy) -> Self {
        self.policy = policy;
        self
    }
    /// Sets the forward-backward step.
    pub fn with_step(mut self, step: f64) -> Self {
        self.step = Some(step);
        self
    }
    /// The step in use for `model`.
    pub fn step_for(&self, model: &LassoModel) -> Result<f64> {
        match self.step {
            Some(s) if s.is_finite() && s > 0.0 => Ok(s),
            Some(s) => Err(Error::invalid(
                "hypergradient",
                format!("the step must be finite and > 0, got {s}"),
            )),
            None => Ok(1.0 / model.lipschitz()),
        }
    }
}

/// The hypothesis of Prop. 5 at a solution: the sets and the rank of `X_E^T X_E`.
#[derive(Debug, Clone, PartialEq)]
pub struct SupportCheck {
    /// `S`: features with `beta_j != 0`.
    pub support: Vec<usize>,
    /// `E`: features with `|w x_j^T r| = lambda_j` (within `kink_tol`); contains `S`.
    pub equicorrelation: Vec<usize>,
    /// `E \ S`: features at the kink of soft-thresholding, where the derivative is the
    /// policy's selection.
    pub kinks: Vec<usize>,
    /// The selection `q` applied at the kinks.
    pub selection: f64,
    /// Smallest singular value of `w X_E^T X_E + l2 I`.
    pub sigma_min: f64,
    /// Largest singular value of `w X_E^T X_E + l2 I`.
    pub sigma_max: f64,
    /// Certified (full rank), or violated (rank deficient: the solution or its derivative
    /// is not unique).
    pub outcome: CheckOutcome,
    /// The verdict in words.
    pub detail: String,
}

impl fmt::Display for SupportCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: |S| = {}, |E| = {}, {} kink(s) (q = {}), sigma(X_E^T X_E) in [{:.3e}, {:.3e}]; {}",
            self.outcome,
            self.support.len(),
            self.equicorrelation.len(),
            self.kinks.len(),
            self.selection,
            self.sigma_min,
            self.sigma_max,
            self.detail
        )
    }
}

/// A hypergradient with everything needed to trust it.
#[derive(Debug, Clone)]
pub struct Hypergradient {
    /// The method.
    pub method: Method,
    /// `C(beta_hat)`.
    pub value: f64,
    /// `dC / d log lambda` (one entry, or one per feature for a per-feature penalty).
    pub gradient: Array1<f64>,
    /// The Prop. 5 hypothesis at the solution.
    pub check: SupportCheck,
    /// The generic method's own check of `I - J_beta` (from the implicit layer).
    pub layer_check: Option<HypothesisCheck>,
    /// Kinks of soft-thresholding at the solution: one record with the equicorrelation
    /// coordinates `E \ S` and the selection applied.
    pub kinks: KinkLedger,
    /// Iterations (forward-backward or ISTA steps, adjoint iterations; 0 for the direct
    /// solve).
    pub iterations: usize,
    /// Wall time of this hypergradient (not counting the inner solve), seconds.
    pub seconds: f64,
}

/// Dispatches to one of the three methods. `fit` must solve `model` (its penalty is the
/// point where the hypergradient is taken).
///
/// # Errors
/// Invalid options ([`HypergradOptions::validate`]); a fit that did not converge (its gap
/// above its tolerance: the implicit function theorem is about the solution, not an
/// iterate); a fit that is not one of `model` (coefficients, residual or correlations of
/// another length, or a residual `y - X beta` or correlations that `model` does not
/// reproduce: another data set, loss or loss scale); a criterion whose gradient has
/// another length or is not finite; the method's own errors.
pub fn hypergradient(
    model: &LassoModel,
    fit: &Fit,
    criterion: &dyn Criterion,
    method: Method,
    options: &HypergradOptions,
) -> Result<Hypergradient> {
    match method {
        Method::Implicit => implicit::hypergradient(model, fit, criterion, options),
        Method::Support => support::hypergradient(model, fit, criterion, options),
        Method::Unrolled => unrolled::hypergradient(model, fit, criterion, options),
        Method::Forward => forward::hypergradient(model, fit, criterion, options),
    }
}

impl HypergradOptions {
    /// Checks the options: the policy, the step (when given), `kink_tol` in `[0, 1)`,
    /// `rank_tol` in `[0, 1)`, `implicit_tol` finite and `> 0`, `unrolled_tol` finite and
    /// `>= 0`.
    ///
    /// # Errors
    /// The first invalid option, naming `hypergradient` and the value.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "hypergradient";
        self.policy.validate()?;
        if let Some(step) = self.step {
            if !(step.is_finite() && step > 0.0) {
                return Err(Error::invalid(
                    OP,
                    format!("the step must be finite and > 0, got {step}"),
                ));
            }
        }
        for (name, v) in [("kink_tol", self.kink_tol), ("rank_tol", self.rank_tol)] {
            if !((0.0..1.0).contains(&v)) {
                return Err(Error::invalid(OP, format!("{name} must be in [0, 1), got {v}")));
            }
        }
        if !(self.implicit_tol.is_finite() && self.implicit_tol > 0.0) {
            return Err(Error::invalid(
                OP,
                format!("implicit_tol must be finite and > 0, got {}", self.implicit_tol),
            ));
        }
        if !(self.forward_tol.is_finite() && self.forward_tol > 0.0) {
            return Err(Error::invalid(
                OP,
                format!("forward_tol must be finite and > 0, got {}", self.forward_tol),
            ));
        }
        if self.forward_max_sweeps == 0 {
            return Err(Error::invalid(OP, "forward_max_sweeps must be at least 1, got 0"));
        }
        if !(self.unrolled_tol.is_finite() && self.unrolled_tol >= 0.0) {
            return Err(Error::invalid(
                OP,
                format!("unrolled_tol must be finite and >= 0, got {}", self.unrolled_tol),
            ));
        }
        Ok(())
    }
}

/// Where the methods that differentiate at the fit's solution start: the checked
/// arguments, the Prop. 5 sets and kink ledger at the fit, and `grad C(beta_hat)`.
pub(crate) struct Start {
    /// When the method started (its reported time excludes the inner solve).
    pub clock: Instant,
    /// The Prop. 5 sets and rank check.
    pub check: SupportCheck,
    /// The soft-thresholding kinks at the solution.
    pub kinks: KinkLedger,
    /// `grad C` at the fit's coefficients, checked.
    pub grad: Array1<f64>,
    /// The Cholesky factor of the certificate on `E`, when there is one.
    pub factor: Option<std::sync::Arc<hessian::ShiftedFactor>>,
}

impl Start {
    /// [`prepare`], the sets of [`support::sets`], and the criterion's gradient.
    pub(crate) fn at(
        model: &LassoModel,
        fit: &Fit,
        criterion: &dyn Criterion,
        options: &HypergradOptions,
    ) -> Result<Self> {
        let clock = Instant::now();
        prepare(model, fit, options)?;
        let (check, kinks, factor) = support::sets_with_factor(model, fit, options)?;
        let grad = criterion.gradient(fit.beta.view())?;
        check_criterion(model, &grad)?;
        Ok(Start {
            clock,
            check,
            kinks,
            grad,
            factor,
        })
    }
}

/// What every method checks first: the options, a fit of `model`, and its convergence.
pub(crate) fn prepare(model: &LassoModel, fit: &Fit, options: &HypergradOptions) -> Result<()> {
    options.validate()?;
    check_fit(model, fit)?;
    if !fit.is_converged() {
        return Err(Error::invalid(
            "hypergradient",
            format!(
                "the fit did not converge (duality gap {:e} > tolerance {:e} after {} epochs): the derivative of the solution map is taken at a solution; raise max_epochs or use Fit::into_result",
                fit.gap, fit.tolerance, fit.epochs
            ),
        ));
    }
    Ok(())
}

/// Checks that `fit` is a fit of `model`: lengths, finite coefficients and penalty, and the
/// residual and correlations `model` computes from its coefficients (within `1e-6` of
/// their scale, far above the rounding a solver accumulates and far below what another data
/// set, loss or loss scale gives).
pub(crate) fn check_fit(model: &LassoModel, fit: &Fit) -> Result<()> {
    const OP: &str = "hypergradient";
    let (n, p) = (model.n(), model.p());
    for (what, found, expected) in [
        ("coefficients", fit.beta.len(), p),
        ("correlations", fit.correlations.len(), p),
        ("residual", fit.residual.len(), n),
    ] {
        if found != expected {
            return Err(Error::shapes(
                OP,
                &[found],
                &[expected],
                format!("the fit's {what} do not match the model (n = {n}, p = {p}): is it the fit of another model?"),
            ));
        }
    }
    if let Some((j, v)) = fit.beta.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::invalid(OP, format!("the fit's beta[{j}] = {v} is not finite")));
    }
    fit.penalty.validate(OP, p)?;
    let residual = &model.y() - &model.predict(fit.beta.view())?;
    let rho = model.generalized_residual(residual.as_slice().expect("contiguous"));
    let correlations = model.correlations(&rho);
    for (what, stored, computed) in [
        ("residual y - X beta", &fit.residual, &residual),
        ("correlations w X^T rho", &fit.correlations, &correlations),
    ] {
        let scale = computed.iter().chain(stored.iter()).fold(0.0f64, |m, v| m.max(v.abs()));
        let diff = stored
            .iter()
            .zip(computed.iter())
            .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        if diff.is_nan() || diff > 1e-6 * scale {
            return Err(Error::invalid(
                OP,
                format!(
                    "the fit's {what} differs from the model's by {diff:e} (scale {scale:e}): the fit is not one of this model (another data set, loss or loss scale?)"
                ),
            ));
        }
    }
    Ok(())
}

pub(crate) fn check_criterion(model: &LassoModel, g: &Array1<f64>) -> Result<()> {
    if g.len() != model.p() {
        return Err(Error::shapes(
            "hypergradient",
            &[g.len()],
            &[model.p()],
            "the criterion's gradient must have one entry per feature",
        ));
    }
    if let Some((j, v)) = g.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::invalid(
            "hypergradient",
            format!("the criterion's gradient is not finite ({v} at index {j})"),
        ));
    }
    Ok(())
}
