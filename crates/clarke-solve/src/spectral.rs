//! Spectral estimates: norm, spectral radius and smallest singular value of an operator.
//!
//! These back the invertibility diagnostics of implicit layers: a contraction certificate
//! needs `||J_z||_2 < 1` ([`spectral_norm`]) or `rho(J_z) < 1` ([`spectral_radius`]), and the
//! distance of `I - J_z` from singularity is its smallest singular value
//! ([`smallest_singular_value`], or [`smallest_singular_value_dense`] when the matrix is
//! formed). Start vectors are seeded ([`SpectralOptions::seed`]), so estimates are
//! reproducible.
//!
//! Which side each estimate errs on:
//! - [`spectral_norm`] returns `||A v||` for a unit `v`: never above the true norm.
//! - [`smallest_singular_value`] returns `||A x|| / ||x||` for a Ritz vector `x`: never below
//!   the true smallest singular value.
//! - [`largest_singular_value`] (Lanczos, far fewer products than [`spectral_norm`] when the
//!   top singular values crowd together) returns `||A x|| / ||x||` too: never above the norm.
//!
//! So a contraction certificate from [`spectral_norm`] should keep a margin, while a
//! "far from singular" certificate from [`smallest_singular_value`] is only as good as its
//! convergence status.

use clarke_core::{Error, Result, Scalar};
use ndarray::{Array1, Array2, ArrayView2};

use crate::dense;
use crate::linop::{LinearOperator, apply_new, apply_transpose_new};
use crate::report::SolveStatus;
use crate::util::{dot, f, norm2, seeded_unit_vector};

/// Options of the spectral estimates.
#[derive(Debug, Clone, PartialEq)]
pub struct SpectralOptions {
    /// Stop when the relative change of the estimate between two iterations is at most this.
    /// Default `1e-10`.
    pub tol: f64,
    /// Maximum number of (outer) iterations. Default 1000.
    pub max_iter: usize,
    /// Seed of the start vector. Default `0x5EED`.
    pub seed: u64,
    /// Largest Krylov basis of [`smallest_singular_value`] before a restart. Default 64.
    pub krylov_dim: usize,
}

impl Default for SpectralOptions {
    fn default() -> Self {
        SpectralOptions {
            tol: 1e-10,
            max_iter: 1000,
            seed: 0x5EED,
            krylov_dim: 64,
        }
    }
}

impl SpectralOptions {
    /// Sets the tolerance on the relative change.
    pub fn with_tol(mut self, tol: f64) -> Self {
        self.tol = tol;
        self
    }

    /// Sets the iteration budget.
    pub fn with_max_iter(mut self, max_iter: usize) -> Self {
        self.max_iter = max_iter;
        self
    }

    /// Sets the seed of the start vector.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the Krylov basis size of [`smallest_singular_value`].
    pub fn with_krylov_dim(mut self, k: usize) -> Self {
        self.krylov_dim = k;
        self
    }

    fn validate(&self, op: &'static str) -> Result<()> {
        if !(self.tol.is_finite() && self.tol >= 0.0) {
            return Err(Error::invalid(
                op,
                format!("tolerance must be finite and >= 0, got {}", self.tol),
            ));
        }
        if self.krylov_dim == 0 {
            return Err(Error::invalid(op, "krylov_dim must be at least 1"));
        }
        Ok(())
    }
}

/// A spectral estimate and how it was obtained.
#[derive(Debug, Clone, PartialEq)]
pub struct SpectralEstimate {
    /// Name of the estimate (`"spectral_norm"`, `"spectral_radius"`,
    /// `"smallest_singular_value"`).
    pub estimator: &'static str,
    /// The estimate.
    pub value: f64,
    /// Iterations run.
    pub iterations: usize,
    /// Applications of the operator or its transpose.
    pub matvecs: usize,
    /// The convergence measure of the last iteration: for the power iterations, the relative
    /// change of the estimate; for [`smallest_singular_value`], the Ritz residual bound
    /// divided by the norm estimate.
    pub change: f64,
    /// How the run ended ([`SolveStatus::Converged`] when `change` met the tolerance).
    pub status: SolveStatus,
    /// Estimate after every iteration (for [`smallest_singular_value`], at every check of the
    /// bidiagonal matrix).
    pub history: Vec<f64>,
    /// The tolerance that was asked for.
    pub tolerance: f64,
}

impl SpectralEstimate {
    /// `true` when the status is [`SolveStatus::Converged`].
    pub fn is_converged(&self) -> bool {
        self.status.is_converged()
    }

    /// `Ok(self)` if converged, otherwise [`Error::NotConverged`] (with the last relative
    /// change as the residual).
    pub fn into_result(self) -> Result<Self> {
        if self.is_converged() {
            Ok(self)
        } else {
            Err(Error::NotConverged {
                solver: self.estimator,
                iterations: self.iterations,
                residual: self.change,
                tolerance: self.tolerance,
            })
        }
    }
}

struct Est {
    estimator: &'static str,
    tolerance: f64,
    iterations: usize,
    matvecs: usize,
    change: f64,
    history: Vec<f64>,
}

impl Est {
    fn new(estimator: &'static str, tolerance: f64) -> Self {
        Est {
            estimator,
            tolerance,
            iterations: 0,
            matvecs: 0,
            change: f64::NAN,
            history: Vec::new(),
        }
    }

    fn done(self, value: f64, status: SolveStatus) -> SpectralEstimate {
        SpectralEstimate {
            estimator: self.estimator,
            value,
            iterations: self.iterations,
            matvecs: self.matvecs,
            change: self.change,
            status,
            history: self.history,
            tolerance: self.tolerance,
        }
    }
}

fn require_transpose<S: Scalar>(op_name: &'static str, op: &impl LinearOperator<S>) -> Result<()> {
    if op.has_transpose() {
        Ok(())
    } else {
        Err(Error::invalid(
            op_name,
            "this estimate needs A^T (the operator has no transpose; use FnOperator::with_transpose)",
        ))
    }
}

fn rel_change(new: f64, old: f64) -> f64 {
    if new == old {
        0.0
    } else {
        (new - old).abs() / new.abs().max(old.abs())
    }
}

/// Estimates the spectral norm `||A||_2` (largest singular value) by power iteration on
/// `A^T A`; `A` may be rectangular and must provide its transpose.
///
/// The estimate `||A v||` (`v` the current unit vector) never exceeds the true norm and
/// converges at the rate `(sigma_2 / sigma_1)^2` per iteration (two products per iteration).
/// Stops when the relative change is at most `opts.tol`; when the top singular values are
/// close the error can be larger than the last change by the factor
/// `1 / (1 - (sigma_2 / sigma_1)^2)`.
///
/// ```
/// use clarke_solve::spectral::{spectral_norm, SpectralOptions};
/// use ndarray::array;
///
/// let a = array![[3.0f64, 0.0], [0.0, -1.0], [0.0, 0.0]];
/// let est = spectral_norm(&a, &SpectralOptions::default()).unwrap();
/// assert!((est.value - 3.0).abs() < 1e-8);
/// ```
pub fn spectral_norm<S: Scalar>(op: &impl LinearOperator<S>, opts: &SpectralOptions) -> Result<SpectralEstimate> {
    const NAME: &str = "spectral_norm";
    opts.validate(NAME)?;
    require_transpose(NAME, op)?;
    let (m, n) = (op.nrows(), op.ncols());
    let mut est = Est::new(NAME, opts.tol);
    if m == 0 || n == 0 {
        return Ok(est.done(0.0, SolveStatus::Converged));
    }
    let mut v = seeded_unit_vector::<S>(n, opts.seed);
    let mut w = Array1::<S>::zeros(m);
    let mut u = Array1::<S>::zeros(n);
    let mut sigma = f64::NAN;
    loop {
        op.apply(v.view(), w.view_mut())?;
        est.matvecs += 1;
        let s_new = f(norm2(w.view()));
        est.history.push(s_new);
        if !s_new.is_finite() {
            return Ok(est.done(s_new, SolveStatus::NonFinite));
        }
        if s_new == 0.0 && est.iterations == 0 {
            // A v = 0 for a generic v: only the zero operator does that (in practice).
            est.change = 0.0;
            return Ok(est.done(0.0, SolveStatus::Converged));
        }
        if est.iterations > 0 {
            est.change = rel_change(s_new, sigma);
            if est.change <= opts.tol {
                return Ok(est.done(s_new.max(sigma), SolveStatus::Converged));
            }
        }
        sigma = s_new.max(if sigma.is_nan() { 0.0 } else { sigma });
        if est.iterations >= opts.max_iter {
            return Ok(est.done(sigma, SolveStatus::MaxIterations));
        }
        op.apply_transpose(w.view(), u.view_mut())?;
        est.matvecs += 1;
        let un = norm2(u.view());
        if !un.is_finite() || un == S::zero() {
            let status = if un.is_finite() {
                SolveStatus::Breakdown
            } else {
                SolveStatus::NonFinite
            };
            return Ok(est.done(sigma, status));
        }
        v.assign(&u.mapv(|x| x / un));
        est.iterations += 1;
    }
}

/// Estimates the spectral radius `rho(A) = max |lambda_i|` of a square operator by power
/// iteration (`v <- A v / ||A v||`, estimate `||A v||`).
///
/// Converges when one eigenvalue dominates in modulus, at the rate `|lambda_2 / lambda_1|`.
/// A dominant complex pair (or `lambda` and `-lambda`) makes `||A v||` oscillate; the run
/// then ends with [`SolveStatus::MaxIterations`] and the value is the geometric mean of
/// `||A v||` over the second half of the iterations, which still tends to `rho(A)`
/// (`||A^k v||^(1/k)`). Convergence is declared when the relative change stays below
/// `opts.tol` for two consecutive iterations.
///
/// ```
/// use clarke_solve::spectral::{spectral_radius, SpectralOptions};
/// use ndarray::array;
///
/// // eigenvalues 0.5 and -0.9 (not symmetric)
/// let a = array![[0.5f64, 1.0], [0.0, -0.9]];
/// let est = spectral_radius(&a, &SpectralOptions::default()).unwrap();
/// assert!(est.is_converged());
/// assert!((est.value - 0.9).abs() < 1e-7);
/// ```
pub fn spectral_radius<S: Scalar>(op: &impl LinearOperator<S>, opts: &SpectralOptions) -> Result<SpectralEstimate> {
    const NAME: &str = "spectral_radius";
    opts.validate(NAME)?;
    let n = op.square_dim(NAME)?;
    let mut est = Est::new(NAME, opts.tol);
    if n == 0 {
        return Ok(est.done(0.0, SolveStatus::Converged));
    }
    let mut v = seeded_unit_vector::<S>(n, opts.seed);
    let mut w = Array1::<S>::zeros(n);
    let mut prev = f64::NAN;
    let mut small_changes = 0;
    loop {
        op.apply(v.view(), w.view_mut())?;
        est.matvecs += 1;
        let r = f(norm2(w.view()));
        est.history.push(r);
        if !r.is_finite() {
            return Ok(est.done(r, SolveStatus::NonFinite));
        }
        if r == 0.0 {
            // A^k v = 0 for a seeded generic start: the operator is nilpotent on the
            // Krylov space of v (the zero operator, for example), so rho = 0 there.
            est.change = 0.0;
            return Ok(est.done(0.0, SolveStatus::Converged));
        }
        if est.iterations > 0 {
            est.change = rel_change(r, prev);
            small_changes = if est.change <= opts.tol { small_changes + 1 } else { 0 };
            if small_changes >= 2 {
                return Ok(est.done(r, SolveStatus::Converged));
            }
        }
        prev = r;
        if est.iterations >= opts.max_iter {
            let h = &est.history;
            let tail = &h[h.len() / 2..];
            let gm = (tail.iter().map(|x| x.ln()).sum::<f64>() / tail.len() as f64).exp();
            return Ok(est.done(gm, SolveStatus::MaxIterations));
        }
        let rs = S::from_f64_lossy(r);
        v.assign(&w.mapv(|x| x / rs));
        est.iterations += 1;
    }
}

/// Reorthogonalises `w` against an orthonormal set (modified Gram-Schmidt, two passes).
fn reorthogonalize<S: Scalar>(w: &mut Array1<S>, basis: &[Array1<S>]) {
    for _ in 0..2 {
        for q in basis {
            let c = dot(w.view(), q.view());
            w.scaled_add(-c, q);
        }
    }
}

/// Estimates the smallest singular value of an operator with at least as many rows as
/// columns (for a square `A`, its distance to the singular matrices), by Golub-Kahan-Lanczos
/// bidiagonalisation with full reorthogonalisation; `A` must provide its transpose.
///
/// After `k` steps, `A V_k = U_k B_k` with orthonormal `V_k`, `U_k` and a `k x k` bidiagonal
/// `B_k`; the smallest singular value of `B_k` is `min ||A x|| / ||x||` over the span of
/// `V_k`, so it never lies below the true smallest singular value and decreases towards it.
/// The returned value is that quotient recomputed with `A` for the final Ritz vector. The
/// Ritz residual `||A^T A x - sigma^2 x||`-type bound `beta_k |p_k|` is known at every step;
/// the run stops when it is at most `opts.tol` times the norm estimate `sigma_max(B_k)`
/// (then the value is within `tol * ||A||` of a singular value of `A`). The basis is
/// restarted from the current Ritz vector after [`SpectralOptions::krylov_dim`] steps.
/// One iteration is one product with `A` and one with `A^T`.
///
/// When a step produces a zero vector with a zero on the diagonal of `B_k`, a direction with
/// `A x = 0` has been found and the estimate is 0.
///
/// ```
/// use clarke_solve::spectral::{smallest_singular_value, SpectralOptions};
/// use ndarray::array;
///
/// let a = array![[2.0f64, 0.0], [0.0, 0.25]];
/// let est = smallest_singular_value(&a, &SpectralOptions::default()).unwrap();
/// assert!((est.value - 0.25).abs() < 1e-8);
/// ```
pub fn smallest_singular_value<S: Scalar>(
    op: &impl LinearOperator<S>,
    opts: &SpectralOptions,
) -> Result<SpectralEstimate> {
    golub_kahan(op, opts, Extreme::Smallest)
}

/// Estimates the largest singular value `||A||_2` of an operator with at least as many rows
/// as columns by the same Golub-Kahan-Lanczos bidiagonalisation as
/// [`smallest_singular_value`]: the largest singular value of `B_k` is `max ||A x|| / ||x||`
/// over the span of `V_k`, so it never lies above the true norm and rises towards it, and the
/// returned value is the quotient recomputed with `A` for the final Ritz vector (never above
/// the norm either). It stops when the Ritz residual bound is at most `opts.tol` times the
/// estimate.
///
/// Where the top singular values crowd together (a random square matrix), Lanczos needs far
/// fewer products than the power iteration of [`spectral_norm`], whose error shrinks by only
/// `(sigma_2 / sigma_1)^2` per iteration: a 48 x 48 matrix with `sigma_2 / sigma_1 = 0.99`
/// takes about a thousand power iterations to 1e-10 and some forty Lanczos steps.
///
/// ```
/// use clarke_solve::spectral::{largest_singular_value, SpectralOptions};
/// use ndarray::array;
///
/// let a = array![[3.0f64, 0.0], [0.0, -1.0], [0.0, 0.0]];
/// let est = largest_singular_value(&a, &SpectralOptions::default()).unwrap();
/// assert!((est.value - 3.0).abs() < 1e-8);
/// ```
pub fn largest_singular_value<S: Scalar>(
    op: &impl LinearOperator<S>,
    opts: &SpectralOptions,
) -> Result<SpectralEstimate> {
    golub_kahan(op, opts, Extreme::Largest)
}

/// Which end of the spectrum a Golub-Kahan-Lanczos run estimates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extreme {
    Smallest,
    Largest,
}

/// Golub-Kahan-Lanczos bidiagonalisation with full reorthogonalisation and restarts from the
/// Ritz vector, for the smallest or the largest singular value.
fn golub_kahan<S: Scalar>(
    op: &impl LinearOperator<S>,
    opts: &SpectralOptions,
    which: Extreme,
) -> Result<SpectralEstimate> {
    let name = match which {
        Extreme::Smallest => "smallest_singular_value",
        Extreme::Largest => "largest_singular_value",
    };
    opts.validate(name)?;
    require_transpose(name, op)?;
    let (m, n) = (op.nrows(), op.ncols());
    if m < n {
        return Err(Error::shapes(
            name,
            &[m, n],
            &[n, n],
            "needs at least as many rows as columns (a wide matrix has a null space: its n-th singular value is 0)",
        ));
    }
    let mut est = Est::new(name, opts.tol);
    if n == 0 {
        return Ok(est.done(0.0, SolveStatus::Converged));
    }
    let kmax = opts.krylov_dim.min(n);
    let eps = S::epsilon();
    let mut start = seeded_unit_vector::<S>(n, opts.seed);
    let mut best = match which {
        Extreme::Smallest => f64::INFINITY,
        Extreme::Largest => 0.0,
    };
    loop {
        let mut vs: Vec<Array1<S>> = vec![start.clone()];
        let mut us: Vec<Array1<S>> = Vec::with_capacity(kmax);
        let mut alphas: Vec<S> = Vec::with_capacity(kmax);
        let mut betas: Vec<S> = Vec::with_capacity(kmax);
        for k in 0..kmax {
            // u_k: A v_k - beta_{k-1} u_{k-1}, orthogonalised against the previous u.
            let mut p = apply_new(op, vs[k].view())?;
            est.matvecs += 1;
            let pnorm0 = norm2(p.view());
            reorthogonalize(&mut p, &us);
            let alpha = norm2(p.view());
            if !alpha.is_finite() || !pnorm0.is_finite() {
                return Ok(est.done(best, SolveStatus::NonFinite));
            }
            est.iterations += 1;
            let null_found = alpha <= eps * pnorm0 || alpha == S::zero();
            let beta;
            if null_found {
                // A v_k lies in the span of the previous u: A x = 0 for some x in span(V).
                alphas.push(S::zero());
                betas.push(S::zero());
                beta = S::zero();
            } else {
                us.push(p.mapv(|x| x / alpha));
                // v_{k+1}: A^T u_k - alpha v_k, orthogonalised against all v.
                let mut q = apply_transpose_new(op, us[k].view())?;
                est.matvecs += 1;
                reorthogonalize(&mut q, &vs);
                beta = norm2(q.view());
                if !beta.is_finite() {
                    return Ok(est.done(best, SolveStatus::NonFinite));
                }
                alphas.push(alpha);
                betas.push(beta);
                if k + 1 < kmax {
                    vs.push(if beta > S::zero() { q.mapv(|x| x / beta) } else { q });
                }
            }
            let invariant = beta <= eps * alpha;
            let end_of_cycle = k + 1 == kmax || est.iterations >= opts.max_iter;
            let check = null_found || invariant || end_of_cycle || k < 8 || (k + 1) % 4 == 0;
            if !check {
                continue;
            }
            // SVD of the (k+1) x (k+1) upper bidiagonal B.
            let kk = k + 1;
            let mut b = Array2::<S>::zeros((kk, kk));
            for i in 0..kk {
                b[[i, i]] = alphas[i];
                if i + 1 < kk {
                    b[[i, i + 1]] = betas[i];
                }
            }
            let (pu, sv, qv) = dense::faer_svd(b.view())?;
            // The Ritz pair sought: the last column (smallest) or the first (largest).
            let col = match which {
                Extreme::Smallest => kk - 1,
                Extreme::Largest => 0,
            };
            let ritz = f(sv[col]);
            let smax = f(sv[0]);
            let bound = f(beta) * f(pu[[kk - 1, col]].abs());
            est.history.push(ritz);
            est.change = if smax > 0.0 { bound / smax } else { 0.0 };
            let converged = null_found || invariant || est.change <= opts.tol;
            if !(converged || end_of_cycle) {
                continue;
            }
            // Ritz vector x = V q_min and its quotient ||A x|| / ||x||, computed with A.
            let mut x = Array1::<S>::zeros(n);
            for (i, v) in vs.iter().enumerate().take(kk) {
                x.scaled_add(qv[[i, col]], v);
            }
            let xn = norm2(x.view());
            let ax = apply_new(op, x.view())?;
            est.matvecs += 1;
            let sigma = if xn > S::zero() {
                f(norm2(ax.view())) / f(xn)
            } else {
                ritz
            };
            best = match which {
                Extreme::Smallest => best.min(sigma),
                Extreme::Largest => best.max(sigma),
            };
            if converged {
                let value = match which {
                    Extreme::Smallest if null_found => best.min(ritz),
                    _ => best,
                };
                return Ok(est.done(value, SolveStatus::Converged));
            }
            if est.iterations >= opts.max_iter {
                return Ok(est.done(best, SolveStatus::MaxIterations));
            }
            start = x.mapv(|v| v / xn);
            break;
        }
    }
}

/// The smallest singular value `min ||A x|| / ||x||` of a dense `m x n` matrix with
/// `m >= n` (its `n`-th singular value), exactly (to rounding) through the SVD of the active
/// dense backend; the same quantity as [`smallest_singular_value`].
///
/// # Errors
/// A wide matrix (`m < n`) is a [`Error::ShapeMismatch`]: it has a null space, so the
/// quantity is 0 whatever its `m`-th singular value. Also non-finite entries, or an SVD that
/// does not converge.
pub fn smallest_singular_value_dense<S: Scalar>(a: ArrayView2<'_, S>) -> Result<f64> {
    let (m, n) = a.dim();
    if m < n {
        return Err(Error::shapes(
            "smallest_singular_value_dense",
            &[m, n],
            &[n, n],
            "needs at least as many rows as columns (a wide matrix has a null space: its n-th singular value is 0)",
        ));
    }
    let s = dense::singular_values_with::<dense::Active, S>("smallest_singular_value_dense", a)?;
    Ok(s.iter().last().map(|v| v.to_f64_exact()).unwrap_or(0.0))
}

/// The spectral norm `||A||_2` of a dense matrix of any shape through the SVD of the active
/// backend (0 for an empty matrix).
///
/// # Errors
/// Non-finite entries ([`Error::InvalidArgument`] with the position), or an SVD that does not
/// converge.
pub fn spectral_norm_dense<S: Scalar>(a: ArrayView2<'_, S>) -> Result<f64> {
    let s = dense::singular_values_with::<dense::Active, S>("spectral_norm_dense", a)?;
    Ok(s.iter().next().map(|v| v.to_f64_exact()).unwrap_or(0.0))
}
