//! Coordinate descent for Lasso-type models (squared or logistic loss), with working sets,
//! Anderson extrapolation and duality-gap stopping.
//!
//! The solver keeps the residual `r = y - X beta` up to date (one `axpy` per changed
//! coordinate), uses precomputed squared column norms, and never allocates inside an epoch.
//! Each outer iteration computes all correlations `w X^T r` once, the duality gap, and a
//! **working set**: the current support plus the features whose dual constraint is closest
//! to being tight, ranked by `(lambda_j - |w x_j^T r|) / ||sqrt(w) x_j||`, its size doubling
//! from one outer iteration to the next (as in celer and skglm). Coordinate descent then runs
//! on the working set until its own gap falls below a fraction of the full one, with Anderson
//! extrapolation of its iterates every few epochs (kept only when it lowers the objective:
//! it pays off on the ill-conditioned supports of small penalties). The fit stops
//! when the **full** duality gap is at most `tol * w ||y||^2` (scikit-learn's convention), and
//! says so in its [`FitStatus`]; an unconverged fit keeps its gap.

use std::time::Instant;

use clarke_core::{Error, Result};
use ndarray::{Array1, ArrayView1};

use crate::model::{LassoModel, Loss, Penalty, dot, sigmoid};

/// Options of [`solve`].
#[derive(Debug, Clone, PartialEq)]
pub struct CdOptions {
    /// Stop when the duality gap is at most `tol * w * ||y||^2` (`w` the data-fit weight;
    /// with `w = 1/n` this is scikit-learn's `tol`). Default `1e-8`.
    pub tol: f64,
    /// Largest number of epochs (passes over the working set), all outer iterations
    /// together. Default 20,000. With 0 the fit is the start (zero or the warm start) with
    /// its duality gap, `MaxEpochs` unless that start already meets the tolerance.
    pub max_epochs: usize,
    /// Epochs between two gap checks of the inner solver (`>= 1`). Default 10.
    pub gap_every: usize,
    /// Use working sets (default `true`); `false` runs cyclic coordinate descent on every
    /// feature, checking the gap every `gap_every` epochs.
    pub working_set: bool,
    /// Size of the first working set (grown to at least twice the support). Default 16; 0
    /// counts as 1 (a working set is never empty).
    pub ws_start: usize,
    /// Anderson extrapolation every this many epochs from the last iterates (0: off).
    /// Default 5. An extrapolated point is kept only when it lowers the objective, so it
    /// never slows convergence down; on ill-conditioned supports it cuts the epochs by a
    /// large factor (Bertrand and Massias, 2021).
    pub anderson: usize,
}

impl Default for CdOptions {
    fn default() -> Self {
        CdOptions {
            tol: 1e-8,
            max_epochs: 20_000,
            gap_every: 10,
            working_set: true,
            ws_start: 16,
            anderson: 5,
        }
    }
}

impl CdOptions {
    /// Sets the tolerance.
    pub fn with_tol(mut self, tol: f64) -> Self {
        self.tol = tol;
        self
    }
    /// Sets the epoch budget.
    pub fn with_max_epochs(mut self, epochs: usize) -> Self {
        self.max_epochs = epochs;
        self
    }
    /// Turns working sets on or off.
    pub fn with_working_set(mut self, on: bool) -> Self {
        self.working_set = on;
        self
    }
}

/// How a fit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FitStatus {
    /// The duality gap reached the tolerance.
    Converged,
    /// The epoch budget ran out first.
    MaxEpochs,
}

/// A solution of a Lasso-type problem with its certificate.
#[derive(Debug, Clone)]
pub struct Fit {
    /// The coefficients.
    pub beta: Array1<f64>,
    /// `y - X beta`.
    pub residual: Array1<f64>,
    /// `w X^T rho` at `beta` (every feature), `rho` the generalised residual (`y - X beta`
    /// for the squared loss, `y - sigmoid(X beta)` for the logistic loss).
    pub correlations: Array1<f64>,
    /// The penalty the fit solved for.
    pub penalty: Penalty,
    /// The objective at `beta`.
    pub objective: f64,
    /// The duality gap at `beta` (an upper bound on the suboptimality).
    pub gap: f64,
    /// The absolute gap tolerance (`tol * w ||y||^2`).
    pub tolerance: f64,
    /// Epochs run.
    pub epochs: usize,
    /// Outer (working-set) iterations.
    pub outer: usize,
    /// How it ended.
    pub status: FitStatus,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl Fit {
    /// Indices of the non-zero coefficients.
    pub fn support(&self) -> Vec<usize> {
        self.beta
            .iter()
            .enumerate()
            .filter(|(_, b)| **b != 0.0)
            .map(|(j, _)| j)
            .collect()
    }

    /// Whether the gap reached the tolerance.
    pub fn is_converged(&self) -> bool {
        self.status == FitStatus::Converged
    }

    /// The fit if it converged, else [`Error::NotConverged`] with the epochs and the gap.
    pub fn into_result(self) -> Result<Self> {
        match self.status {
            FitStatus::Converged => Ok(self),
            FitStatus::MaxEpochs => Err(Error::NotConverged {
                solver: "coordinate descent (duality gap)",
                iterations: self.epochs,
                residual: self.gap,
                tolerance: self.tolerance,
            }),
        }
    }
}

/// Primal objective pieces and the duality gap at the residual, restricted to `set` (every
/// feature outside `set` must have `beta_j = 0`), given the generalised residual `rho` and
/// `corr_j = w x_j^T rho` on `set`.
struct Gap {
    primal: f64,
    gap: f64,
}

/// `p ln p + (1 - p) ln(1 - p)` on `[0, 1]` (0 at the ends).
fn neg_entropy(p: f64) -> f64 {
    let t = |v: f64| if v > 0.0 { v * v.ln() } else { 0.0 };
    t(p) + t(1.0 - p)
}

#[allow(clippy::too_many_arguments)]
fn duality_gap(
    model: &LassoModel,
    penalty: &Penalty,
    beta: &[f64],
    r: &[f64],
    rho: &[f64],
    set: &[usize],
    corr: &[f64],
    y_sq: f64,
) -> Gap {
    let w = model.weight();
    let l2 = model.l2();
    let mut l1 = 0.0;
    let mut b_sq = 0.0;
    for &j in set {
        l1 += penalty.at(j) * beta[j].abs();
        b_sq += beta[j] * beta[j];
    }
    let primal = model.datafit(r) + l1 + 0.5 * l2 * b_sq;
    // The dual point is rho / s, with s = 1 for the elastic net (its dual is unconstrained)
    // and the smallest s >= 1 making |w x_j^T rho| / s <= lambda_j otherwise.
    let (s, conj) = if l2 == 0.0 {
        let mut s = 1.0f64;
        for (k, &j) in set.iter().enumerate() {
            s = s.max(corr[k].abs() / penalty.at(j));
        }
        (s, 0.0)
    } else {
        let mut conj = 0.0;
        for (k, &j) in set.iter().enumerate() {
            let e = (corr[k].abs() - penalty.at(j)).max(0.0);
            conj += e * e;
        }
        (1.0, conj / (2.0 * l2))
    };
    let y = model.y();
    let y = y.as_slice().expect("contiguous");
    let dual = match model.loss() {
        Loss::Squared => {
            // (w/2)(||y||^2 - ||y - theta||^2) with theta = r / s.
            let (r_sq, y_dot_r) = (dot(r, r), dot(y, r));
            let y_minus_theta_sq = y_sq - 2.0 * y_dot_r / s + r_sq / (s * s);
            0.5 * w * (y_sq - y_minus_theta_sq)
        }
        // -w sum_i H(y_i - theta_i), H the negative binary entropy.
        Loss::Logistic => {
            -w * y
                .iter()
                .zip(rho)
                .map(|(&yi, &ri)| neg_entropy(yi - ri / s))
                .sum::<f64>()
        }
    } - conj;
    Gap {
        primal,
        gap: (primal - dual).max(0.0),
    }
}

/// Solves `min w sum_i l(y_i, x_i^T beta) + sum_j lambda_j |beta_j| + (l2/2)||beta||^2` by
/// coordinate descent (exact coordinate minimisation for the squared loss, a step on the
/// coordinate-wise quadratic bound `w ||x_j||^2 / 4` for the logistic loss), from `warm` (a previous solution, for paths and searches) or zero.
///
/// Errors on bad input (a `lambda` that is not finite and `> 0` or a per-feature penalty of
/// another length than the features, a `tol` that is not finite and `>= 0`, `gap_every ==
/// 0`, a warm start of the wrong length or with non-finite values). The model's data was
/// validated by [`LassoModel::new`] (no empty design, no constant column). An exhausted epoch budget is not an error: the fit says `MaxEpochs` with its gap
/// ([`Fit::into_result`] makes it one).
pub fn solve(
    model: &LassoModel,
    penalty: &Penalty,
    warm: Option<ArrayView1<'_, f64>>,
    options: &CdOptions,
) -> Result<Fit> {
    const OP: &str = "coordinate descent";
    let start = Instant::now();
    let (n, p) = (model.n(), model.p());
    penalty.validate(OP, p)?;
    if !(options.tol.is_finite() && options.tol >= 0.0) {
        return Err(Error::invalid(
            OP,
            format!("tol must be finite and >= 0, got {}", options.tol),
        ));
    }
    if options.gap_every == 0 {
        return Err(Error::invalid(
            OP,
            "gap_every must be >= 1 (the inner solver checks its gap every gap_every epochs)",
        ));
    }
    let mut beta = vec![0.0; p];
    if let Some(w0) = warm {
        if w0.len() != p {
            return Err(Error::shapes(
                OP,
                &[w0.len()],
                &[p],
                "the warm start needs one coefficient per feature",
            ));
        }
        if let Some((j, v)) = w0.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::invalid(
                OP,
                format!("warm start has a non-finite value {v} at index {j}"),
            ));
        }
        beta.copy_from_slice(w0.as_slice().map_or(&w0.to_vec()[..], |s| s));
    }
    let w = model.weight();
    let l2 = model.l2();
    let y = model.y();
    let y_sl = y.as_slice().expect("contiguous");
    let y_sq = dot(y_sl, y_sl);
    let tolerance = options.tol * w * y_sq;
    let mut r: Vec<f64> = y_sl.to_vec();
    for (j, &b) in beta.iter().enumerate() {
        if b != 0.0 {
            model.col(j).axpy(-b, &mut r);
        }
    }
    let kappa = model.curvature_bound();
    let logistic = model.loss() == Loss::Logistic;
    let lips: Vec<f64> = (0..p).map(|j| kappa * w * model.col_sq(j) + l2).collect();
    let all: Vec<usize> = (0..p).collect();
    let mut ws_size = options.ws_start.max(1).min(p);
    let mut epochs = 0;
    let mut outer = 0;
    let mut scores: Vec<(f64, usize)> = Vec::with_capacity(p);
    let mut ws: Vec<usize> = Vec::with_capacity(p);
    let mut corr_ws: Vec<f64> = Vec::with_capacity(p);
    let gap_every = options.gap_every;
    let mut previous_gap: Option<f64> = None;
    let mut anderson = Anderson::default();
    loop {
        let rho = model.generalized_residual(&r);
        let corr = model.correlations(&rho);
        let corr_sl = corr.as_slice().expect("contiguous");
        let g = duality_gap(model, penalty, &beta, &r, &rho, &all, corr_sl, y_sq);
        let status = if g.gap <= tolerance {
            Some(FitStatus::Converged)
        } else if epochs >= options.max_epochs {
            Some(FitStatus::MaxEpochs)
        } else {
            None
        };
        if let Some(status) = status {
            return Ok(Fit {
                beta: Array1::from(beta),
                residual: Array1::from(r),
                correlations: corr,
                penalty: penalty.clone(),
                objective: g.primal,
                gap: g.gap,
                tolerance,
                epochs,
                outer,
                status,
                seconds: start.elapsed().as_secs_f64(),
            });
        }
        outer += 1;
        let last_gap = previous_gap.replace(g.gap);
        // The working set: the support, then the features nearest to their constraint.
        ws.clear();
        if options.working_set && p > options.ws_start {
            // skglm's rule: twice the support (at least `ws_start`); doubled when the last
            // outer iteration did not halve the gap.
            let support = beta.iter().filter(|b| **b != 0.0).count();
            let stalled = last_gap.is_some_and(|lg| g.gap > 0.5 * lg);
            ws_size = if stalled {
                2 * ws_size
            } else {
                options.ws_start.max(2 * support)
            }
            .min(p);
            scores.clear();
            for j in 0..p {
                let s = if beta[j] != 0.0 {
                    f64::NEG_INFINITY
                } else {
                    (penalty.at(j) - corr_sl[j].abs()) / (w * model.col_sq(j)).sqrt()
                };
                scores.push((s, j));
            }
            if ws_size < p {
                scores.select_nth_unstable_by(ws_size - 1, |a, b| a.0.total_cmp(&b.0));
            }
            ws.extend(scores[..ws_size].iter().map(|s| s.1));
            ws.sort_unstable();
        } else {
            ws_size = p;
            ws.extend(0..p);
        }
        let inner_tol = if ws.len() == p {
            tolerance
        } else {
            (0.3 * g.gap).max(tolerance)
        };
        // Coordinate descent on the working set.
        anderson.reset(options.anderson, ws.len(), n);
        let mut e = 0;
        loop {
            for &j in &ws {
                let xj = model.col(j);
                let old = beta[j];
                let c = if logistic {
                    xj.dot_with(|i| y_sl[i] - sigmoid(y_sl[i] - r[i]))
                } else {
                    xj.dot(&r)
                };
                let z = w * c + (lips[j] - l2) * old;
                let lam = penalty.at(j);
                let new = if z > lam {
                    (z - lam) / lips[j]
                } else if z < -lam {
                    (z + lam) / lips[j]
                } else {
                    0.0
                };
                if new != old {
                    xj.axpy(old - new, &mut r);
                    beta[j] = new;
                }
            }
            epochs += 1;
            e += 1;
            if options.anderson > 0 {
                anderson.push(&ws, &mut beta, &mut r, model, penalty);
            }
            if epochs >= options.max_epochs {
                break;
            }
            if e % gap_every == 0 {
                if ws.len() == p {
                    break; // the outer loop checks the full gap
                }
                let rho = model.generalized_residual(&r);
                corr_ws.clear();
                corr_ws.extend(ws.iter().map(|&j| w * model.col(j).dot(&rho)));
                let gi = duality_gap(model, penalty, &beta, &r, &rho, &ws, &corr_ws, y_sq);
                if gi.gap <= inner_tol {
                    break;
                }
            }
        }
        debug_assert_eq!(r.len(), n);
    }
}

/// Solves along a sequence of penalties, each warm-started from the previous solution (a
/// regularisation path; pass decreasing `lambda`s). An empty sequence gives an empty path.
///
/// # Errors
/// As [`solve`], for the first penalty it refuses.
pub fn path(model: &LassoModel, penalties: &[Penalty], options: &CdOptions) -> Result<Vec<Fit>> {
    let mut fits: Vec<Fit> = Vec::with_capacity(penalties.len());
    for pen in penalties {
        let warm = fits.last().map(|f| f.beta.view());
        let fit = solve(model, pen, warm, options)?;
        fits.push(fit);
    }
    Ok(fits)
}

/// Anderson extrapolation of the coordinate-descent iterates on a working set.
///
/// Keeps the last `k + 1` iterates; every `k` epochs it solves the small system
/// `(U^T U) z = 1` (`U` the successive differences), forms `sum_i c_i x_{i+1}` with
/// `c = z / sum(z)`, and keeps it when the objective decreases. Buffers are sized once per
/// working set.
#[derive(Debug, Default)]
struct Anderson {
    k: usize,
    m: usize,
    len: usize,
    hist: Vec<f64>,
    gram: Vec<f64>,
    z: Vec<f64>,
    acc: Vec<f64>,
    r_acc: Vec<f64>,
}

impl Anderson {
    fn reset(&mut self, k: usize, m: usize, n: usize) {
        self.k = k;
        self.m = m;
        self.len = 0;
        if k == 0 {
            return;
        }
        self.hist.resize((k + 1) * m, 0.0);
        self.gram.resize(k * k, 0.0);
        self.z.resize(k, 0.0);
        self.acc.resize(m, 0.0);
        self.r_acc.resize(n, 0.0);
    }

    fn push(&mut self, ws: &[usize], beta: &mut [f64], r: &mut [f64], model: &LassoModel, penalty: &Penalty) {
        let (k, m) = (self.k, self.m);
        for (slot, &j) in self.hist[self.len * m..(self.len + 1) * m].iter_mut().zip(ws) {
            *slot = beta[j];
        }
        self.len += 1;
        if self.len < k + 1 {
            return;
        }
        self.len = 0;
        // Gram matrix of the differences u_a = x_{a+1} - x_a.
        let h = &self.hist;
        for a in 0..k {
            for b in a..k {
                let mut v = 0.0;
                for t in 0..m {
                    let ua = h[(a + 1) * m + t] - h[a * m + t];
                    let ub = h[(b + 1) * m + t] - h[b * m + t];
                    v += ua * ub;
                }
                self.gram[a * k + b] = v;
                self.gram[b * k + a] = v;
            }
        }
        let trace: f64 = (0..k).map(|a| self.gram[a * k + a]).sum();
        if !(trace > 0.0 && trace.is_finite()) {
            return;
        }
        for a in 0..k {
            self.gram[a * k + a] += 1e-10 * trace;
            self.z[a] = 1.0;
        }
        if !solve_small(&mut self.gram, &mut self.z, k) {
            return;
        }
        let total: f64 = self.z.iter().sum();
        if !(total.is_finite() && total.abs() > 0.0) {
            return;
        }
        self.acc.iter_mut().for_each(|v| *v = 0.0);
        for a in 0..k {
            let c = self.z[a] / total;
            for (t, v) in self.acc.iter_mut().enumerate() {
                *v += c * h[(a + 1) * m + t];
            }
        }
        // Residual and objective at the extrapolated point (only the working set moves).
        self.r_acc.copy_from_slice(r);
        let l2 = model.l2();
        let (mut pen_old, mut pen_new) = (0.0, 0.0);
        for (t, &j) in ws.iter().enumerate() {
            let (old, new) = (beta[j], self.acc[t]);
            if old != new {
                model.col(j).axpy(old - new, &mut self.r_acc);
            }
            let l = penalty.at(j);
            pen_old += l * old.abs() + 0.5 * l2 * old * old;
            pen_new += l * new.abs() + 0.5 * l2 * new * new;
        }
        let p_old = model.datafit(r) + pen_old;
        let p_new = model.datafit(&self.r_acc) + pen_new;
        if p_new < p_old {
            for (t, &j) in ws.iter().enumerate() {
                beta[j] = self.acc[t];
            }
            r.copy_from_slice(&self.r_acc);
        }
    }
}

/// Solves the `k x k` system `a x = b` in place (Gaussian elimination with partial
/// pivoting); `false` when it is singular.
fn solve_small(a: &mut [f64], b: &mut [f64], k: usize) -> bool {
    for col in 0..k {
        let piv = (col..k)
            .max_by(|&x, &y| a[x * k + col].abs().total_cmp(&a[y * k + col].abs()))
            .unwrap_or(col);
        if a[piv * k + col] == 0.0 || !a[piv * k + col].is_finite() {
            return false;
        }
        if piv != col {
            for c in 0..k {
                a.swap(piv * k + c, col * k + c);
            }
            b.swap(piv, col);
        }
        for row in col + 1..k {
            let f = a[row * k + col] / a[col * k + col];
            for c in col..k {
                a[row * k + c] -= f * a[col * k + c];
            }
            b[row] -= f * b[col];
        }
    }
    for col in (0..k).rev() {
        let mut v = b[col];
        for c in col + 1..k {
            v -= a[col * k + c] * b[c];
        }
        b[col] = v / a[col * k + col];
    }
    b.iter().all(|v| v.is_finite())
}
