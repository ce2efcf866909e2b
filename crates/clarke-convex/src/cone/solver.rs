//! A cone program solver: ADMM (Douglas-Rachford splitting) with infeasibility detection,
//! then Newton refinement on the residual map.
//!
//! **Iteration.** The operator-splitting method of OSQP and COSMO (Stellato et al. 2020,
//! Garstka et al. 2021) on the consensus form `A x~ + s~ = b` / `s in K`:
//!
//! ```text
//! (P + sigma I + A^T R A) x~ = sigma x - c + A^T (R (b - s) + w)     one cached factorisation
//! s~ = b - A x~
//! x  <- alpha x~ + (1 - alpha) x
//! s^ =  alpha s~ + (1 - alpha) s
//! s  <- Pi_K(s^ + R^{-1} w)                                         the nonsmooth step
//! w  <- w + R (s^ - s)
//! ```
//!
//! with `R = diag(rho)` (`rho` times `1e3` on equality rows) and dual `y = -w`. The
//! iteration is a fixed point of a nonsmooth averaged map built from `Pi_K`; `rho` adapts to
//! balance the primal and dual residuals (refactoring the small `n x n` matrix).
//!
//! **Sparse programs** ([`ConeProgram::new_sparse`]) run the same iteration, with `x~` from
//! the equivalent quasi-definite KKT system
//! `[[P + sigma I, A^T], [A, -R^{-1}]] (x~, nu) = (sigma x - c, b - s + R^{-1} w)` (eliminating
//! `nu` gives the reduced system above), factored `L D L^T` once with a fill-reducing
//! ordering; a new `rho` refactors its values only. The reduced matrix `A^T R A` is not
//! formed: for a random sparse `A` it is far denser than `A` and its factor nearly dense,
//! where the KKT matrix keeps `A`'s non-zeros and fills far less. Refinement factors the
//! sparse `M` (a quasi-definite `L D L^T` for LPs and QPs, a sparse LU with second-order or
//! PSD cones). No dense `n x n`, `m x n` or `(n + m)^2` matrix is formed.
//!
//! **Stop.** Primal `||A x + s - b||_inf`, dual `||P x + A^T y + c||_inf` and gap
//! `|x^T P x + c^T x + b^T y|` below `eps_abs + eps_rel * scale` (scales as in OSQP).
//!
//! **Infeasibility.** The successive differences of the iterates converge to certificates
//! (Banjac et al. 2019): `dy` with `A^T dy = 0`, `dy in K*`, `b^T dy < 0` proves the program
//! infeasible; `dx` with `P dx = 0`, `-A dx in K`, `c^T dx < 0` proves it unbounded. Both are
//! tested on the normalised differences within `eps_infeasible`.
//!
//! **Refinement.** From the ADMM point, semismooth Newton steps on the residual map `N(z)`
//! of [`super::residual`] with the same matrix `M = (Q - I) J + I` the derivative uses, with
//! backtracking. At a regular solution (strict complementarity and a nonsingular `M`) it
//! converges quadratically; for LPs and QPs it lands on the exact solution of the identified
//! active set in one step (the polishing of OSQP). Where `M` is singular (a degenerate
//! program) refinement stops and says so; the ADMM point is kept.

use clarke_core::{Error, Result};
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::{Conj, Mat, Par};
use ndarray::{Array1, ArrayView1, Zip};

use super::cones::Cone;
use super::problem::{ConeProgram, check_finite};
use super::residual::{KktPoint, ResidualLu, inf_norm, jacobian_matrix};
use super::sparse::{JacobianFactor, KktFactor};

/// Options of [`solve`].
#[derive(Debug, Clone, PartialEq)]
pub struct SolverOptions {
    /// ADMM iteration budget. Default 10000.
    pub max_iter: usize,
    /// Absolute tolerance. Default `1e-7`.
    pub eps_abs: f64,
    /// Relative tolerance. Default `1e-7`.
    pub eps_rel: f64,
    /// Tolerance of the infeasibility and unboundedness certificates. Default `1e-7`.
    pub eps_infeasible: f64,
    /// Initial penalty `rho`. Default `0.1`.
    pub rho: f64,
    /// Proximal term `sigma` (keeps the linear system positive definite). Default `1e-6`.
    pub sigma: f64,
    /// Over-relaxation `alpha` in `(0, 2)`. Default `1.6`.
    pub alpha: f64,
    /// Adapt `rho` to the ratio of the residuals. Default `true`.
    pub adaptive_rho: bool,
    /// Check the stopping criteria (and the certificates) every this many iterations.
    /// Default 5.
    pub check_every: usize,
    /// Adapt `rho` at most every this many iterations. Default 25.
    pub adapt_every: usize,
    /// Newton refinement steps after ADMM (0 switches refinement off). Default 10.
    pub refine_steps: usize,
    /// Try refinement once the relative ADMM residuals are below this (a refined point
    /// still has to meet `eps_abs` / `eps_rel`). Default `1e-3`.
    pub refine_from: f64,
}

impl Default for SolverOptions {
    fn default() -> Self {
        SolverOptions {
            max_iter: 10_000,
            eps_abs: 1e-7,
            eps_rel: 1e-7,
            eps_infeasible: 1e-7,
            rho: 0.1,
            sigma: 1e-6,
            alpha: 1.6,
            adaptive_rho: true,
            check_every: 5,
            adapt_every: 25,
            refine_steps: 10,
            refine_from: 1e-3,
        }
    }
}

impl SolverOptions {
    /// Sets both tolerances.
    pub fn with_tolerance(mut self, eps: f64) -> Self {
        self.eps_abs = eps;
        self.eps_rel = eps;
        self
    }

    /// Sets the iteration budget.
    pub fn with_max_iter(mut self, max_iter: usize) -> Self {
        self.max_iter = max_iter;
        self
    }

    /// Sets the number of refinement steps (0: none).
    pub fn with_refine_steps(mut self, steps: usize) -> Self {
        self.refine_steps = steps;
        self
    }

    fn validate(&self) -> Result<()> {
        let positive = |name: &str, v: f64| -> Result<()> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::invalid(
                    "cone::solve",
                    format!("{name} must be finite and > 0, got {v}"),
                ))
            }
        };
        for (name, v) in [("eps_abs", self.eps_abs), ("eps_rel", self.eps_rel)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid(
                    "cone::solve",
                    format!("{name} must be finite and >= 0, got {v}"),
                ));
            }
        }
        if self.eps_abs == 0.0 && self.eps_rel == 0.0 {
            return Err(Error::invalid(
                "cone::solve",
                "eps_abs and eps_rel are both 0: no iterate can meet the stopping criteria",
            ));
        }
        positive("eps_infeasible", self.eps_infeasible)?;
        positive("refine_from", self.refine_from)?;
        positive("rho", self.rho)?;
        positive("sigma", self.sigma)?;
        if !(self.alpha > 0.0 && self.alpha < 2.0) {
            return Err(Error::invalid(
                "cone::solve",
                format!("alpha must be in (0, 2), got {}", self.alpha),
            ));
        }
        if self.max_iter == 0 || self.check_every == 0 || self.adapt_every == 0 {
            return Err(Error::invalid(
                "cone::solve",
                "max_iter, check_every and adapt_every must be >= 1",
            ));
        }
        Ok(())
    }
}

/// How a solve ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConeStatus {
    /// Primal and dual residuals and the gap reached the tolerances.
    Solved,
    /// A certificate `y` of primal infeasibility was found (in [`ConeSolution::certificate`]).
    Infeasible,
    /// A certificate `x` of dual infeasibility (an unbounded direction) was found.
    Unbounded,
    /// The iteration budget ran out.
    MaxIterations,
}

impl ConeStatus {
    /// The status in words.
    pub fn as_str(self) -> &'static str {
        match self {
            ConeStatus::Solved => "solved",
            ConeStatus::Infeasible => "infeasible",
            ConeStatus::Unbounded => "unbounded",
            ConeStatus::MaxIterations => "maximum iterations reached",
        }
    }
}

impl std::fmt::Display for ConeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The KKT residuals of a primal-dual point (absolute, infinity norms).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Residuals {
    /// `||A x + s - b||_inf`.
    pub primal: f64,
    /// `||P x + A^T y + c||_inf`.
    pub dual: f64,
    /// `|x^T P x + c^T x + b^T y|` (primal minus dual objective).
    pub gap: f64,
    /// `|s^T y|`.
    pub complementarity: f64,
}

impl Residuals {
    /// The residuals of `(x, y, s)` for `prog`.
    ///
    /// # Errors
    /// An `(x, y, s)` whose lengths are not the program's `(n, m, m)`.
    pub fn of(
        prog: &ConeProgram,
        x: ArrayView1<'_, f64>,
        y: ArrayView1<'_, f64>,
        s: ArrayView1<'_, f64>,
    ) -> Result<Self> {
        check_point_shape("Residuals::of", prog, x.len(), y.len(), s.len())?;
        Ok(Self::compute(prog, x, y, s))
    }

    /// [`Residuals::of`] for a point of the program's shape (checked by the callers).
    pub(crate) fn compute(
        prog: &ConeProgram,
        x: ArrayView1<'_, f64>,
        y: ArrayView1<'_, f64>,
        s: ArrayView1<'_, f64>,
    ) -> Self {
        let px = prog.p_dot(x);
        let primal = inf_norm((prog.a_dot(x) + s - &prog.b).view());
        let dual = inf_norm((&px + &prog.at_dot(y) + &prog.c).view());
        let gap = (x.dot(&px) + prog.c.dot(&x) + prog.b.dot(&y)).abs();
        Residuals {
            primal,
            dual,
            gap,
            complementarity: s.dot(&y).abs(),
        }
    }

    /// The largest of the four.
    pub fn max(&self) -> f64 {
        self.primal.max(self.dual).max(self.gap).max(self.complementarity)
    }
}

/// What the Newton refinement did.
#[derive(Debug, Clone, PartialEq)]
pub struct Refinement {
    /// Accepted Newton steps.
    pub steps: usize,
    /// `||N(z)||_inf` at the ADMM point.
    pub before: f64,
    /// `||N(z)||_inf` at the returned point.
    pub after: f64,
    /// Why it stopped.
    pub stopped: &'static str,
}

/// The result of [`solve`].
#[derive(Debug, Clone, PartialEq)]
pub struct ConeSolution {
    /// Primal solution `x`.
    pub x: Array1<f64>,
    /// Dual solution `y` (in `K*`).
    pub y: Array1<f64>,
    /// Slack `s = b - A x` (in `K`).
    pub s: Array1<f64>,
    /// How the solve ended. Only [`ConeStatus::Solved`] points can be differentiated.
    pub status: ConeStatus,
    /// ADMM iterations.
    pub iterations: usize,
    /// KKT residuals of the returned point.
    pub residuals: Residuals,
    /// KKT residuals of the last ADMM iterate (before refinement).
    pub admm_residuals: Residuals,
    /// The refinement.
    pub refinement: Refinement,
    /// The infeasibility (`y`) or unboundedness (`x`) certificate, normalised to unit
    /// infinity norm.
    pub certificate: Option<Array1<f64>>,
    /// The final `rho`.
    pub rho: f64,
    /// `v = y - s`, the second block of the embedding point `z = (x, v)`.
    pub v: Array1<f64>,
}

impl ConeSolution {
    /// `Ok(self)` when solved; otherwise an error with the status, iterations and residuals.
    pub fn ensure_solved(self, op: &'static str) -> Result<Self> {
        match self.status {
            ConeStatus::Solved => Ok(self),
            ConeStatus::MaxIterations => Err(Error::NotConverged {
                solver: "cone admm",
                iterations: self.iterations,
                residual: self.admm_residuals.primal.max(self.admm_residuals.dual),
                tolerance: f64::NAN,
            }),
            status => Err(Error::invalid(
                op,
                format!(
                    "the cone program is {status} (certificate found after {} iterations); it has no solution to differentiate",
                    self.iterations
                ),
            )),
        }
    }

    /// The objective `(1/2) x^T P x + c^T x` of `prog` at this solution's `x`.
    ///
    /// # Errors
    /// A solution of a program with another number of variables or rows.
    pub fn objective(&self, prog: &ConeProgram) -> Result<f64> {
        check_point_shape(
            "ConeSolution::objective",
            prog,
            self.x.len(),
            self.y.len(),
            self.s.len(),
        )?;
        Ok(0.5 * self.x.dot(&prog.p_dot(self.x.view())) + prog.c.dot(&self.x))
    }
}

/// Checks that a primal-dual point `(x, y, s)` has the program's `(n, m, m)` entries.
fn check_point_shape(op: &'static str, prog: &ConeProgram, x: usize, y: usize, s: usize) -> Result<()> {
    let (n, m) = (prog.n(), prog.m());
    if (x, y, s) != (n, m, m) {
        return Err(Error::shapes(
            op,
            &[x, y, s],
            &[n, m, m],
            "(x, y, s) must match the program's (n, m, m)",
        ));
    }
    Ok(())
}

/// A starting point for [`solve`] (a previous solution of a nearby program).
#[derive(Debug, Clone, Copy)]
pub struct WarmStart<'a> {
    /// Primal `x`.
    pub x: ArrayView1<'a, f64>,
    /// Dual `y`.
    pub y: ArrayView1<'a, f64>,
    /// Slack `s`.
    pub s: ArrayView1<'a, f64>,
}

impl<'a> From<&'a ConeSolution> for WarmStart<'a> {
    fn from(sol: &'a ConeSolution) -> Self {
        WarmStart {
            x: sol.x.view(),
            y: sol.y.view(),
            s: sol.s.view(),
        }
    }
}

/// Per-row penalties: `rho` on cone rows, `1e3 rho` on equality rows.
fn penalties(prog: &ConeProgram, rho: f64) -> Array1<f64> {
    let mut r = Array1::from_elem(prog.m(), rho);
    for (_, cone, range) in prog.cones.blocks() {
        if let Cone::Zero(_) = cone {
            r.slice_mut(ndarray::s![range]).fill(rho * 1e3);
        }
    }
    r
}

/// The Cholesky factor of `P + sigma I + A^T R A`, solved in place with a scratch buffer
/// allocated once: the ADMM iteration solves with it at every step, at sizes (tens of
/// variables) where allocation and copies would cost as much as the arithmetic.
struct SpdFactor {
    l: Mat<f64>,
    scratch: MemBuffer,
}

impl SpdFactor {
    fn new(prog: &ConeProgram, r: &Array1<f64>, sigma: f64) -> Result<Self> {
        let _avx = clarke_core::avx::UpperStateGuard;
        use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
        debug_assert!(!prog.is_sparse(), "the dense factor of a sparse program");
        use faer::linalg::cholesky::llt::solve::solve_in_place_scratch;
        let ra = &prog.a * &r.view().insert_axis(ndarray::Axis(1));
        let mut k = clarke_core::gemm::matmul2(prog.a.t(), ra.view());
        if let Some(p) = &prog.p {
            k += p;
        }
        k.diag_mut().iter_mut().for_each(|d| *d += sigma);
        let n = k.nrows();
        let mut l = Mat::<f64>::from_fn(n, n, |i, j| if i >= j { k[[i, j]] } else { 0.0 });
        let mut buf = MemBuffer::new(cholesky_in_place_scratch::<f64>(n, Par::Seq, Default::default()));
        cholesky_in_place(
            l.as_mut(),
            Default::default(),
            Par::Seq,
            MemStack::new(&mut buf),
            Default::default(),
        )
        .map_err(|_| {
            Error::invalid(
                "cone::solve",
                format!(
                    "P + sigma I + A^T R A is not positive definite (sigma = {sigma:e}); is P positive semidefinite?"
                ),
            )
        })?;
        Ok(SpdFactor {
            l,
            scratch: MemBuffer::new(solve_in_place_scratch::<f64>(n, 1, Par::Seq)),
        })
    }

    /// `x <- (P + sigma I + A^T R A)^{-1} x`.
    fn solve_in_place(&mut self, x: &mut Array1<f64>) {
        let _avx = clarke_core::avx::UpperStateGuard;
        use faer::linalg::cholesky::llt::solve::solve_in_place_with_conj;
        use faer_ext::IntoFaer;
        let n = x.len();
        let col = x.view_mut().into_shape_with_order((n, 1)).expect("a contiguous vector");
        solve_in_place_with_conj(
            self.l.as_ref(),
            Conj::No,
            col.into_faer(),
            Par::Seq,
            MemStack::new(&mut self.scratch),
        );
    }
}

/// The ADMM linear system, factored once per `rho`: the dense reduced system, or the sparse
/// quasi-definite KKT matrix for a sparse program (see [`super::sparse`]).
enum System {
    Dense(SpdFactor),
    Sparse(Box<KktFactor>),
}

impl System {
    fn new(prog: &ConeProgram, r: &Array1<f64>, sigma: f64) -> Result<Self> {
        Ok(match &prog.sparse {
            Some(d) => System::Sparse(Box::new(KktFactor::new(d.a(), d.p(), r, sigma)?)),
            None => System::Dense(SpdFactor::new(prog, r, sigma)?),
        })
    }

    /// Refactors for new penalties: a new dense factor, or the sparse values only.
    fn refactor(&mut self, prog: &ConeProgram, r: &Array1<f64>, sigma: f64) -> Result<()> {
        match self {
            System::Dense(f) => *f = SpdFactor::new(prog, r, sigma)?,
            System::Sparse(k) => k.refactor(r)?,
        }
        Ok(())
    }
}

/// Whether `(x, y, s)` meets the stopping criteria (OSQP's scaling), with its residuals.
fn converged(
    prog: &ConeProgram,
    x: ArrayView1<'_, f64>,
    y: ArrayView1<'_, f64>,
    s: ArrayView1<'_, f64>,
    eps_abs: f64,
    eps_rel: f64,
) -> (bool, f64, f64) {
    let px = prog.p_dot(x);
    let ax = prog.a_dot(x);
    let aty = prog.at_dot(y);
    let r_p = inf_norm((&ax + &s - &prog.b).view());
    let r_d = inf_norm((&px + &aty + &prog.c).view());
    let (xpx, cx, by) = (x.dot(&px), prog.c.dot(&x), prog.b.dot(&y));
    let gap = (xpx + cx + by).abs();
    let scale_p = inf_norm(ax.view()).max(inf_norm(s)).max(inf_norm(prog.b.view()));
    let scale_d = inf_norm(px.view())
        .max(inf_norm(aty.view()))
        .max(inf_norm(prog.c.view()));
    let scale_g = xpx.abs().max(cx.abs()).max(by.abs());
    let ok =
        r_p <= eps_abs + eps_rel * scale_p && r_d <= eps_abs + eps_rel * scale_d && gap <= eps_abs + eps_rel * scale_g;
    (ok, r_p / scale_p.max(1e-30), r_d / scale_d.max(1e-30))
}

/// Solves the cone program (see the module docs). Errors only on invalid options, a
/// program whose fields do not fit together (shapes, non-finite data, a non-symmetric `P`:
/// possible for a struct literal), a mismatched or non-finite warm start or a failed
/// factorisation; infeasible, unbounded and unfinished solves are statuses of the returned
/// [`ConeSolution`].
///
/// Refinement is tried early: once the ADMM residuals are below `refine_from` (relative),
/// a refined point that meets the full tolerances ends the solve. Otherwise ADMM goes on and
/// tries again after its residuals dropped another hundredfold.
pub fn solve(prog: &ConeProgram, opts: &SolverOptions, warm: Option<WarmStart<'_>>) -> Result<ConeSolution> {
    const OP: &str = "cone::solve";
    opts.validate()?;
    prog.check(OP)?;
    let (m, n) = (prog.m(), prog.n());
    let (mut x, mut s, mut w) = match warm {
        Some(ws) => {
            if ws.x.len() != n || ws.y.len() != m || ws.s.len() != m {
                return Err(Error::shapes(
                    OP,
                    &[ws.x.len(), ws.y.len(), ws.s.len()],
                    &[n, m, m],
                    "the warm start (x, y, s) must match the program's (n, m, m)",
                ));
            }
            check_finite(OP, "warm start x", ws.x.iter())?;
            check_finite(OP, "warm start y", ws.y.iter())?;
            check_finite(OP, "warm start s", ws.s.iter())?;
            (ws.x.to_owned(), ws.s.to_owned(), -&ws.y)
        }
        None => (Array1::zeros(n), Array1::zeros(m), Array1::zeros(m)),
    };
    let a_scale = matrix_scale(prog);
    let mut rho = opts.rho;
    let mut r = penalties(prog, rho);
    let mut system = System::new(prog, &r, opts.sigma)?;
    let alpha = opts.alpha;

    let mut status = ConeStatus::MaxIterations;
    let mut certificate = None;
    let mut refined: Option<(KktPoint, Refinement)> = None;
    let mut next_refine = opts.refine_from;
    let mut iterations = 0;
    let mut last_adapt = 0;
    let (mut x_prev, mut w_prev) = (Array1::<f64>::zeros(n), Array1::<f64>::zeros(m));
    let mut rhs = Array1::<f64>::zeros(n);
    let mut x_tilde = Array1::<f64>::zeros(n);
    let mut s_tilde = Array1::<f64>::zeros(m);
    let mut s_hat = Array1::<f64>::zeros(m);
    let mut shift = Array1::<f64>::zeros(m);
    let mut tmp = Array1::<f64>::zeros(m);
    for k in 1..=opts.max_iter {
        iterations = k;
        let checking = k % opts.check_every == 0 || k == opts.max_iter;
        if checking {
            x_prev.assign(&x);
            w_prev.assign(&w);
        }
        match &mut system {
            System::Dense(factor) => {
                // rhs = sigma x - c + A^T (R (b - s) + w)
                Zip::from(&mut tmp)
                    .and(&r)
                    .and(&prog.b)
                    .and(&s)
                    .and(&w)
                    .for_each(|t, &ri, &bi, &si, &wi| *t = ri * (bi - si) + wi);
                prog.at_gemv(1.0, tmp.view(), 0.0, &mut rhs);
                Zip::from(&mut rhs)
                    .and(&x)
                    .and(&prog.c)
                    .for_each(|o, &xi, &ci| *o += opts.sigma * xi - ci);
                x_tilde.assign(&rhs);
                factor.solve_in_place(&mut x_tilde);
            }
            System::Sparse(kkt) => {
                // The same x~ from [[P + sigma I, A^T], [A, -R^{-1}]] (x~, nu)
                // = (sigma x - c, b - s + R^{-1} w).
                Zip::from(&mut rhs)
                    .and(&x)
                    .and(&prog.c)
                    .for_each(|o, &xi, &ci| *o = opts.sigma * xi - ci);
                Zip::from(&mut tmp)
                    .and(&r)
                    .and(&prog.b)
                    .and(&s)
                    .and(&w)
                    .for_each(|t, &ri, &bi, &si, &wi| *t = bi - si + wi / ri);
                kkt.solve(&rhs, &tmp, &mut x_tilde);
            }
        }
        // s~ = b - A x~
        s_tilde.assign(&prog.b);
        prog.a_gemv(-1.0, x_tilde.view(), 1.0, &mut s_tilde);
        Zip::from(&mut x)
            .and(&x_tilde)
            .for_each(|xi, &xt| *xi = alpha * xt + (1.0 - alpha) * *xi);
        Zip::from(&mut s_hat)
            .and(&s_tilde)
            .and(&s)
            .for_each(|h, &st, &so| *h = alpha * st + (1.0 - alpha) * so);
        Zip::from(&mut shift)
            .and(&s_hat)
            .and(&w)
            .and(&r)
            .for_each(|o, &h, &wi, &ri| *o = h + wi / ri);
        prog.cones.project(shift.view(), s.view_mut());
        Zip::from(&mut w)
            .and(&s_hat)
            .and(&s)
            .and(&r)
            .for_each(|wi, &h, &si, &ri| *wi += ri * (h - si));

        if !checking {
            continue;
        }
        let y = -&w;
        if !(x.iter().all(|v| v.is_finite()) && y.iter().all(|v| v.is_finite())) {
            return Err(Error::invalid(
                "cone::solve",
                format!("a non-finite iterate appeared at iteration {k} (rho = {rho:e}); check the data's scaling"),
            ));
        }
        let (done, rel_p, rel_d) = converged(prog, x.view(), y.view(), s.view(), opts.eps_abs, opts.eps_rel);
        if done {
            status = ConeStatus::Solved;
            break;
        }
        if opts.refine_steps > 0 && rel_p.max(rel_d) <= next_refine {
            let (point, refinement) = refine(prog, x.clone(), &y - &s, opts.refine_steps);
            let (ok, _, _) = converged(
                prog,
                point.x.view(),
                point.y.view(),
                point.s.view(),
                opts.eps_abs,
                opts.eps_rel,
            );
            if ok {
                status = ConeStatus::Solved;
                refined = Some((point, refinement));
                break;
            }
            next_refine = rel_p.max(rel_d) * 1e-2;
        }
        if let Some(cert) = primal_infeasibility(prog, &(&w_prev - &w), opts.eps_infeasible, a_scale) {
            status = ConeStatus::Infeasible;
            certificate = Some(cert);
            break;
        }
        if let Some(cert) = dual_infeasibility(prog, &(&x - &x_prev), opts.eps_infeasible, a_scale) {
            status = ConeStatus::Unbounded;
            certificate = Some(cert);
            break;
        }
        if opts.adaptive_rho && k - last_adapt >= opts.adapt_every {
            // A residual that is exactly zero (common on LPs) must not drive rho to a bound:
            // floor both relative residuals, and move rho by at most 100x per adaptation.
            let ratio = (rel_p.max(1e-14) / rel_d.max(1e-14)).sqrt().clamp(1e-2, 1e2);
            if !(0.2..=5.0).contains(&ratio) {
                rho = (rho * ratio).clamp(1e-6, 1e6);
                r = penalties(prog, rho);
                system.refactor(prog, &r, opts.sigma)?;
                last_adapt = k;
            }
        }
    }

    let y = -&w;
    let admm_residuals = Residuals::compute(prog, x.view(), y.view(), s.view());
    let v = &y - &s;
    let (x, y, s, v, refinement) = match (status, refined) {
        (ConeStatus::Solved, Some((pt, refinement))) => (pt.x, pt.y, pt.s, pt.v, refinement),
        (ConeStatus::Solved, None) => {
            let (pt, refinement) = refine(prog, x, v, opts.refine_steps);
            (pt.x, pt.y, pt.s, pt.v, refinement)
        }
        // Keep the raw iterates of an unfinished or infeasible run.
        _ => {
            let norm = KktPoint::at(prog, x.clone(), v.clone()).norm();
            let refinement = Refinement {
                steps: 0,
                before: norm,
                after: norm,
                stopped: "not solved",
            };
            (x, y, s, v, refinement)
        }
    };
    let residuals = Residuals::compute(prog, x.view(), y.view(), s.view());
    Ok(ConeSolution {
        x,
        y,
        s,
        status,
        iterations,
        residuals,
        admm_residuals,
        refinement,
        certificate,
        rho,
        v,
    })
}

/// `max(1, max |A_ij|)`: the scale of the certificates' tests.
fn matrix_scale(prog: &ConeProgram) -> f64 {
    prog.a_max_abs().max(1.0)
}

/// `dy` normalised, if it certifies primal infeasibility (`a_scale`: [`matrix_scale`]).
fn primal_infeasibility(prog: &ConeProgram, dy: &Array1<f64>, eps: f64, a_scale: f64) -> Option<Array1<f64>> {
    let norm = inf_norm(dy.view());
    if norm <= 1e-14 * (1.0 + inf_norm(prog.b.view())) {
        return None;
    }
    let d = dy / norm;
    let ok = inf_norm(prog.at_dot(d.view()).view()) <= eps * a_scale
        && prog.b.dot(&d) < -eps
        && prog.cones.distance_dual(d.view()) <= eps;
    ok.then_some(d)
}

/// `dx` normalised, if it certifies dual infeasibility (an unbounded direction; `a_scale`:
/// [`matrix_scale`]).
fn dual_infeasibility(prog: &ConeProgram, dx: &Array1<f64>, eps: f64, a_scale: f64) -> Option<Array1<f64>> {
    let norm = inf_norm(dx.view());
    if norm <= 1e-14 * (1.0 + inf_norm(prog.c.view())) {
        return None;
    }
    let d = dx / norm;
    let ok = inf_norm(prog.p_dot(d.view()).view()) <= eps * a_scale
        && prog.c.dot(&d) < -eps
        && prog.cones.distance((-prog.a_dot(d.view())).view()) <= eps * a_scale;
    ok.then_some(d)
}

/// Semismooth Newton on `N(z) = 0` from `z = (x, v)`, with backtracking.
fn refine(prog: &ConeProgram, x: Array1<f64>, v: Array1<f64>, max_steps: usize) -> (KktPoint, Refinement) {
    let mut point = KktPoint::at(prog, x, v);
    let before = point.norm();
    let scale = 1.0 + inf_norm(prog.b.view()).max(inf_norm(prog.c.view()));
    let target = 1e-14 * scale;
    let mut steps = 0;
    let mut stopped = "step budget used";
    if max_steps == 0 {
        stopped = "refinement switched off";
    }
    for _ in 0..max_steps {
        let norm = point.norm();
        if norm <= target {
            stopped = "converged";
            break;
        }
        let j = prog.cones.dual_jacobian(point.v.view(), &[], &[], 1.0);
        let rhs = -&point.residual;
        let solved = match &prog.sparse {
            // A sparse M, factored sparse (see `super::sparse`): no dense (n + m) x (n + m) matrix.
            Some(d) => JacobianFactor::new(d.a(), d.p(), &j).and_then(|lu| lu.solve(rhs.view(), false)),
            None => ResidualLu::new(prog, &j, jacobian_matrix(prog, &j).view()).and_then(|lu| lu.solve(rhs.view())),
        };
        let dz = match solved {
            Ok(dz) => dz,
            Err(_) => {
                stopped = "the Jacobian of the residual map is singular (degenerate program)";
                break;
            }
        };
        let z = point.z();
        let n = prog.n();
        let mut t = 1.0;
        let mut accepted = None;
        for _ in 0..8 {
            let cand = &z + &(t * &dz);
            let pt = KktPoint::at(
                prog,
                cand.slice(ndarray::s![..n]).to_owned(),
                cand.slice(ndarray::s![n..]).to_owned(),
            );
            if pt.norm() < (1.0 - 1e-4 * t) * norm {
                accepted = Some(pt);
                break;
            }
            t *= 0.5;
        }
        match accepted {
            Some(pt) => {
                point = pt;
                steps += 1;
            }
            None => {
                stopped = if norm <= 1e3 * target {
                    "converged (at rounding level)"
                } else {
                    "no decrease along the Newton direction"
                };
                break;
            }
        }
    }
    let after = point.norm();
    (
        point,
        Refinement {
            steps,
            before,
            after,
            stopped,
        },
    )
}
