//! Derivatives of a cone program's solution `(x, y, s)` with respect to its data
//! `(P, A, b, c)`: the forward (directional) map and the adjoint, through the residual map.
//!
//! At a solution `N(z) = 0` with `z = (x, v)`. Perturbing the data by `(dP, dA, db, dc)`
//! moves the residual by `dN = (dP x + dA^T y + dc, db - dA x)`, and the implicit function
//! theorem gives `dz = -M^{-1} dN` with `M = (Q - I) J + I` (see [`super::residual`]). Then
//!
//! ```text
//! dx = dz_u,   dy = J_y dz_v,   ds = dy - dz_v.
//! ```
//!
//! The adjoint of a loss gradient `(g_x, g_y, g_s)`: `g_z = (g_x, J_y (g_y + g_s) - g_s)`,
//! solve `M^T w = -g_z`, then
//!
//! ```text
//! dc = w_u,  db = w_v,  dA = y w_u^T - w_v x^T,  dP = (w_u x^T + x w_u^T) / 2.
//! ```
//!
//! `M` is solved directly (one factorisation, reused by every product: a dense LU, or a
//! sparse factorisation for a program with sparse data, which then never forms a dense `M`) or matrix-free by GMRES with `M d`
//! and `M^T d` products; the check ([`super::check`]) runs first and can refuse. For a
//! sparse program the adjoint returns `dA` and `dP` on the patterns of `A` and `P`
//! ([`DataGradient::sparse_a`], [`DataGradient::sparse_p`]).

use clarke_core::{Error, Result};
use clarke_implicit::{CheckOptions, CheckOutcome, OnAdjointFailure};
use clarke_solve::{FnOperator, SolveOptions, SolveReport, gmres, lstsq};
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, s};

use super::check::{ConicCheck, Linearisation, cone_margins, run};
use super::cones::ProjectionJacobian;
use super::problem::{ConeProgram, check_finite, csc_gemv, csc_gemv_t};
use super::residual::{ResidualLu, apply_jacobian, apply_jacobian_transpose, inf_norm, jacobian_matrix};
use super::solver::{ConeSolution, ConeStatus, Residuals};
use super::sparse::JacobianFactor;
use crate::design::CscMatrix;

/// How `M` (and `M^T`) is solved.
#[derive(Debug, Clone, PartialEq)]
pub enum DerivativeSolver {
    /// One direct factorisation: a dense LU of the `(n + m) x (n + m)` matrix for dense
    /// data; for a sparse program a sparse factorisation that never forms a dense `M` (the
    /// quasi-definite reduction of `M` factored `L D L^T` when every cone is zero or
    /// non-negative, a sparse LU of `M` otherwise, both with fill-reducing orderings).
    Dense,
    /// GMRES with matrix-free products (`M` is never formed).
    Gmres(SolveOptions),
}

/// Options of [`ConeDerivative::new`].
#[derive(Debug, Clone, PartialEq)]
pub struct DerivativeOptions {
    /// The linear solver. Default dense.
    pub solver: DerivativeSolver,
    /// The hypothesis check (shared with the implicit node). Default: on, refusing a
    /// violated hypothesis.
    pub check: CheckOptions,
    /// Entries of `v = y - s` within `boundary_tol * max(1, ||v||_inf)` (plus ten times the
    /// solution's KKT residual) of a kink count as on it. Default `1e-9`.
    pub boundary_tol: f64,
    /// What a GMRES solve that does not converge does. Default: refuse.
    pub on_failure: OnAdjointFailure,
}

impl Default for DerivativeOptions {
    fn default() -> Self {
        DerivativeOptions {
            solver: DerivativeSolver::Dense,
            check: CheckOptions::default(),
            boundary_tol: 1e-9,
            on_failure: OnAdjointFailure::Error,
        }
    }
}

impl DerivativeOptions {
    /// The check switched off (the derivative is computed whatever the hypothesis).
    pub fn unchecked() -> Self {
        DerivativeOptions {
            check: CheckOptions::off(),
            ..Default::default()
        }
    }

    /// Matrix-free GMRES solves with these options.
    pub fn with_gmres(mut self, opts: SolveOptions) -> Self {
        self.solver = DerivativeSolver::Gmres(opts);
        self
    }
}

/// A perturbation of the data, or a gradient with respect to it.
///
/// For a sparse program the gradients with respect to `A` and `P` are sparse, on the
/// patterns of `A` and `P` (`sparse_a`, `sparse_p`: the same column pointers and row
/// indices, stored zeros included); the dense `a` is then `0 x 0` and `p` is `None`. An entry
/// outside the pattern is structurally zero in the program, and its gradient is not returned.
#[derive(Debug, Clone, PartialEq)]
pub struct DataGradient {
    /// With respect to `P` (symmetric), when the program has a dense quadratic term.
    pub p: Option<Array2<f64>>,
    /// With respect to `A` (`0 x 0` for a sparse program).
    pub a: Array2<f64>,
    /// With respect to the stored entries of a sparse `A`: `dA_ij = y_i w_u[j] - w_v[i] x_j`
    /// at every `(i, j)` of `A`'s pattern.
    pub sparse_a: Option<CscMatrix>,
    /// With respect to the stored entries of a sparse `P`: `(w_u[i] x_j + x_i w_u[j]) / 2`
    /// at every `(i, j)` of `P`'s pattern.
    pub sparse_p: Option<CscMatrix>,
    /// With respect to `b`.
    pub b: Array1<f64>,
    /// With respect to `c`.
    pub c: Array1<f64>,
}

/// A direction in the data for the forward map.
#[derive(Debug, Clone, Copy)]
pub struct DataDirection<'a> {
    /// `dP` (ignored without a quadratic term).
    pub p: Option<ArrayView2<'a, f64>>,
    /// `dA`.
    pub a: ArrayView2<'a, f64>,
    /// `db`.
    pub b: ArrayView1<'a, f64>,
    /// `dc`.
    pub c: ArrayView1<'a, f64>,
}

/// A sparse direction in the data for the forward map of any program ([`ConeDerivative::forward_sparse`]);
/// `dA` and `dP` need not share the patterns of `A` and `P`.
#[derive(Debug, Clone, Copy)]
pub struct SparseDataDirection<'a> {
    /// `dP` (ignored without a quadratic term).
    pub p: Option<&'a CscMatrix>,
    /// `dA`.
    pub a: &'a CscMatrix,
    /// `db`.
    pub b: ArrayView1<'a, f64>,
    /// `dc`.
    pub c: ArrayView1<'a, f64>,
}

/// A direction of the solution, or a loss gradient with respect to it.
#[derive(Debug, Clone, PartialEq)]
pub struct SolutionDirection {
    /// `dx`.
    pub x: Array1<f64>,
    /// `dy`.
    pub y: Array1<f64>,
    /// `ds`.
    pub s: Array1<f64>,
}

/// The derivative of a solved cone program at its solution, checked.
pub struct ConeDerivative<'p> {
    prog: &'p ConeProgram,
    x: Array1<f64>,
    y: Array1<f64>,
    j: ProjectionJacobian,
    lu: Option<ResidualLu>,
    /// The sparse factorisation of `M` for a sparse program and the direct solver.
    sparse_lu: Option<JacobianFactor>,
    /// `M` when it is singular and the caller chose to go on: minimum-norm least squares.
    singular: Option<Array2<f64>>,
    solver: DerivativeSolver,
    on_failure: OnAdjointFailure,
    check: ConicCheck,
    last_solve: std::cell::RefCell<Option<SolveReport>>,
}

impl<'p> ConeDerivative<'p> {
    /// Linearises `prog` at `sol` with selection `q` at the kinks within tolerance (the kink policy's
    /// `relu'(0)`), runs the check, and factors `M` for the dense solver. Errors: an
    /// unsolved `sol`, a solution of another program, a violated hypothesis (unless the
    /// check is told not to refuse), a singular `M`; a program whose fields do not fit
    /// together (see [`super::solve`]), a `q` that is not finite, a `boundary_tol` that is
    /// not finite and `>= 0`.
    pub fn new(prog: &'p ConeProgram, sol: &ConeSolution, q: f64, opts: &DerivativeOptions) -> Result<Self> {
        const OP: &str = "cone_program derivative";
        prog.check(OP)?;
        if !q.is_finite() {
            return Err(Error::invalid(
                OP,
                format!("the selection q at the kinks must be finite, got {q}"),
            ));
        }
        if sol.status != ConeStatus::Solved {
            sol.clone().ensure_solved(OP)?;
        }
        if sol.x.len() != prog.n() || sol.v.len() != prog.m() {
            return Err(Error::shapes(
                OP,
                &[sol.x.len(), sol.v.len()],
                &[prog.n(), prog.m()],
                "the solution is not one of this program",
            ));
        }
        check_solves(OP, prog, sol)?;
        if !(opts.boundary_tol.is_finite() && opts.boundary_tol >= 0.0) {
            return Err(Error::invalid(
                OP,
                format!("boundary_tol must be finite and >= 0, got {}", opts.boundary_tol),
            ));
        }
        let v = sol.v.view();
        let tol = opts.boundary_tol * inf_norm(v).max(1.0) + 10.0 * sol.residuals.max();
        let boundaries = prog.cones.boundaries(v, tol);
        let j = prog.cones.dual_jacobian(v, &boundaries, &[], q);
        let direct = opts.solver == DerivativeSolver::Dense;
        // A small sparse program forms M too: for the dense check and, when M is singular
        // and the caller goes on, the least-squares solve the dense path does.
        let small = prog.n() + prog.m() <= opts.check.dense_limit;
        let dense_needed = (direct && !prog.is_sparse()) || (small && (opts.check.enabled || prog.is_sparse()));
        let m = dense_needed.then(|| jacobian_matrix(prog, &j));
        // Factor first: a strictly complementary check reuses the LU for its estimates.
        let factored = match (&opts.solver, &m) {
            (DerivativeSolver::Dense, Some(m)) if !prog.is_sparse() => Some(ResidualLu::new(prog, &j, m.view())),
            _ => None,
        };
        let sparse_factored = match (&prog.sparse, direct) {
            (Some(d), true) => Some(JacobianFactor::new(d.a(), d.p(), &j)),
            _ => None,
        };
        let lu_ref = factored.as_ref().and_then(|f| f.as_ref().ok());
        let lin = Linearisation {
            prog,
            v,
            boundaries: &boundaries,
            default_q: q,
            selected: m.as_ref(),
            lu: lu_ref,
            sparse_lu: sparse_factored.as_ref().and_then(|f| f.as_ref().ok()),
            residual: sol.residuals.max(),
        };
        let hypothesis = run(&lin, &opts.check)?;
        let check = ConicCheck {
            check: hypothesis,
            boundary_tol: tol,
            margins: cone_margins(&prog.cones, v, tol),
            boundaries,
        };
        if check.outcome() == CheckOutcome::Violated && opts.check.refuse_violated {
            return Err(Error::HypothesisViolated {
                node: "cone_program".into(),
                detail: check.to_string(),
            });
        }
        let (mut lu, mut singular, mut sparse_lu) = (None, None, None);
        match (factored, sparse_factored, m) {
            (Some(Ok(f)), _, _) => lu = Some(f),
            (_, Some(Ok(f)), m) => {
                // A sparse factorisation of a numerically singular M shows it in its solves:
                // probe once, and go the least-squares way below the dense limit.
                let probe = Array1::from_shape_fn(prog.n() + prog.m(), |i| 1.0 + ((i as f64) * 0.618_034).fract());
                match (f.solve(probe.view(), false), m) {
                    (Err(Error::Singular { .. }), Some(m)) => singular = Some(m),
                    (Err(e), _) => return Err(e),
                    (Ok(_), _) => sparse_lu = Some(f),
                }
            }
            // The caller switched the check off (or told it not to refuse): do what
            // least-squares implicit differentiation does (diffcp's LSQR), and say so.
            (Some(Err(Error::Singular { .. })), _, Some(m)) | (_, Some(Err(Error::Singular { .. })), Some(m)) => {
                singular = Some(m)
            }
            (Some(Err(e)), _, _) | (_, Some(Err(e)), _) => return Err(e),
            (None, None, _) => {}
        }
        let mut check = check;
        if singular.is_some() {
            check.check.reasons.push(
                "M is singular: the derivative is the minimum-norm least-squares solution, not justified by the theorem".into(),
            );
        }
        Ok(ConeDerivative {
            prog,
            x: sol.x.clone(),
            y: sol.y.clone(),
            j,
            lu,
            sparse_lu,
            singular,
            solver: opts.solver.clone(),
            on_failure: opts.on_failure,
            check,
            last_solve: std::cell::RefCell::new(None),
        })
    }

    /// The check's verdict and numbers.
    pub fn check(&self) -> &ConicCheck {
        &self.check
    }

    /// The report of the last GMRES solve (none for the dense solver).
    pub fn last_solve(&self) -> Option<SolveReport> {
        self.last_solve.borrow().clone()
    }

    /// Solves `M d = rhs` (or `M^T d = rhs`).
    fn solve(&self, rhs: Array1<f64>, transpose: bool) -> Result<Array1<f64>> {
        if let Some(lu) = &self.lu {
            return if transpose {
                lu.solve_transpose(rhs.view())
            } else {
                lu.solve(rhs.view())
            };
        }
        if let Some(lu) = &self.sparse_lu {
            return lu.solve(rhs.view(), transpose);
        }
        if let Some(m) = &self.singular {
            let a = if transpose { m.t() } else { m.view() };
            return Ok(lstsq(a, rhs.view())?.solution);
        }
        let opts = match &self.solver {
            DerivativeSolver::Gmres(o) => o.clone(),
            DerivativeSolver::Dense => SolveOptions::default(),
        };
        let dim = rhs.len();
        let (prog, j) = (self.prog, &self.j);
        let forward = move |d: ArrayView1<'_, f64>, out: ndarray::ArrayViewMut1<'_, f64>| {
            apply_jacobian(prog, j, d, out);
            Ok(())
        };
        let backward = move |d: ArrayView1<'_, f64>, out: ndarray::ArrayViewMut1<'_, f64>| {
            apply_jacobian_transpose(prog, j, d, out);
            Ok(())
        };
        let (d, report) = if transpose {
            gmres(&FnOperator::new(dim, dim, backward), rhs.view(), None, &opts)?
        } else {
            gmres(&FnOperator::new(dim, dim, forward), rhs.view(), None, &opts)?
        };
        *self.last_solve.borrow_mut() = Some(report.clone());
        if report.is_converged() {
            return Ok(d);
        }
        match self.on_failure {
            OnAdjointFailure::AcceptApproximate if report.status == clarke_solve::SolveStatus::MaxIterations => Ok(d),
            OnAdjointFailure::Dense => {
                if let Some(d) = &self.prog.sparse {
                    // The direct fallback of a sparse program is its sparse factorisation.
                    return JacobianFactor::new(d.a(), d.p(), &self.j)?.solve(rhs.view(), transpose);
                }
                let m = jacobian_matrix(self.prog, &self.j);
                let lu = ResidualLu::new(self.prog, &self.j, m.view())?;
                if transpose {
                    lu.solve_transpose(rhs.view())
                } else {
                    lu.solve(rhs.view())
                }
            }
            _ => Err(report.failure("cone_program", "adjoint")),
        }
    }

    /// The forward map: the first-order change of `(x, y, s)` for a data direction.
    ///
    /// # Errors
    /// A direction whose parts do not match `(P, A, b, c)` or are not finite; a failed
    /// solve with `M`.
    pub fn forward(&self, d: &DataDirection<'_>) -> Result<SolutionDirection> {
        const OP: &str = "cone_program forward";
        let (n, m) = (self.prog.n(), self.prog.m());
        if d.a.dim() != (m, n) || d.b.len() != m || d.c.len() != n {
            return Err(Error::shapes(
                "cone_program forward",
                &[d.a.nrows(), d.a.ncols(), d.b.len(), d.c.len()],
                &[m, n, m, n],
                "the direction (dA, db, dc) must match (A, b, c)",
            ));
        }
        check_finite(OP, "dA", d.a.iter())?;
        check_finite(OP, "db", d.b.iter())?;
        check_finite(OP, "dc", d.c.iter())?;
        let mut top = d.a.t().dot(&self.y) + d.c;
        if let (Some(dp), true) = (d.p, self.prog.has_quadratic()) {
            if dp.dim() != (n, n) {
                return Err(Error::shapes(
                    "cone_program forward",
                    dp.shape(),
                    &[n, n],
                    "dP must be n x n",
                ));
            }
            check_finite(OP, "dP", dp.iter())?;
            top += &dp.dot(&self.x);
        }
        let bottom = &d.b - &d.a.dot(&self.x);
        self.forward_residual(top, bottom)
    }

    /// The forward map for a sparse data direction (any program, dense or sparse): as
    /// [`ConeDerivative::forward`], with `dA x`, `dA^T y` and `dP x` computed sparse.
    ///
    /// # Errors
    /// A direction whose parts do not match `(P, A, b, c)` or are not finite; a failed
    /// solve with `M`.
    pub fn forward_sparse(&self, d: &SparseDataDirection<'_>) -> Result<SolutionDirection> {
        const OP: &str = "cone_program forward";
        let (n, m) = (self.prog.n(), self.prog.m());
        if (d.a.nrows(), d.a.ncols()) != (m, n) || d.b.len() != m || d.c.len() != n {
            return Err(Error::shapes(
                OP,
                &[d.a.nrows(), d.a.ncols(), d.b.len(), d.c.len()],
                &[m, n, m, n],
                "the direction (dA, db, dc) must match (A, b, c)",
            ));
        }
        check_finite(OP, "db", d.b.iter())?;
        check_finite(OP, "dc", d.c.iter())?;
        let mut top = Array1::zeros(n);
        csc_gemv_t(d.a, 1.0, self.y.view(), 0.0, &mut top);
        top += &d.c;
        if let (Some(dp), true) = (d.p, self.prog.has_quadratic()) {
            if (dp.nrows(), dp.ncols()) != (n, n) {
                return Err(Error::shapes(
                    OP,
                    &[dp.nrows(), dp.ncols()],
                    &[n, n],
                    "dP must be n x n",
                ));
            }
            csc_gemv(dp, 1.0, self.x.view(), 1.0, &mut top);
        }
        let mut bottom = d.b.to_owned();
        csc_gemv(d.a, -1.0, self.x.view(), 1.0, &mut bottom);
        self.forward_residual(top, bottom)
    }

    /// `dz = -M^{-1} dN` for `dN = (top, bottom)`, mapped to `(dx, dy, ds)`.
    fn forward_residual(&self, top: Array1<f64>, bottom: Array1<f64>) -> Result<SolutionDirection> {
        let (n, m) = (self.prog.n(), self.prog.m());
        let mut dn = Array1::zeros(n + m);
        dn.slice_mut(s![..n]).assign(&top);
        dn.slice_mut(s![n..]).assign(&bottom);
        let dz = self.solve(-dn, false)?;
        let dv = dz.slice(s![n..]);
        let dy = self.j.apply_new(dv);
        let ds = &dy - &dv;
        Ok(SolutionDirection {
            x: dz.slice(s![..n]).to_owned(),
            y: dy,
            s: ds,
        })
    }

    /// The adjoint map: the gradient with respect to the data of a loss whose gradient with
    /// respect to `(x, y, s)` is `g`.
    ///
    /// A non-finite entry of `g` is passed on (the map is linear, so it shows in the result):
    /// the conic layer's backward hands this map the tape's gradient, and NaN propagates
    /// through a backward sweep as it does through every other node.
    ///
    /// # Errors
    /// A `g` whose parts do not match `(x, y, s)`; a failed solve with `M^T`.
    pub fn adjoint(&self, g: &SolutionDirection) -> Result<DataGradient> {
        let (n, m) = (self.prog.n(), self.prog.m());
        if g.x.len() != n || g.y.len() != m || g.s.len() != m {
            return Err(Error::shapes(
                "cone_program adjoint",
                &[g.x.len(), g.y.len(), g.s.len()],
                &[n, m, m],
                "the gradient (g_x, g_y, g_s) must match (x, y, s)",
            ));
        }
        let mut gz = Array1::zeros(n + m);
        gz.slice_mut(s![..n]).assign(&g.x);
        gz.slice_mut(s![n..])
            .assign(&(self.j.apply_new((&g.y + &g.s).view()) - &g.s));
        let w = self.solve(-gz, true)?;
        let (wu, wv) = (w.slice(s![..n]), w.slice(s![n..]));
        let outer = |a: ArrayView1<'_, f64>, b: ArrayView1<'_, f64>| {
            a.to_owned()
                .insert_axis(ndarray::Axis(1))
                .dot(&b.insert_axis(ndarray::Axis(0)))
        };
        if let Some(data) = &self.prog.sparse {
            // On the patterns: dA_ij = y_i w_u[j] - w_v[i] x_j, dP_ij = (w_u[i] x_j + x_i w_u[j]) / 2.
            let (x, y) = (&self.x, &self.y);
            let sparse_a = on_pattern(data.a(), |i, j| y[i] * wu[j] - wv[i] * x[j])?;
            let sparse_p = data
                .p()
                .map(|p| on_pattern(p, |i, j| 0.5 * (wu[i] * x[j] + x[i] * wu[j])))
                .transpose()?;
            return Ok(DataGradient {
                p: None,
                a: Array2::zeros((0, 0)),
                sparse_a: Some(sparse_a),
                sparse_p,
                b: wv.to_owned(),
                c: wu.to_owned(),
            });
        }
        let da = outer(self.y.view(), wu) - outer(wv, self.x.view());
        let dp = self.prog.p.as_ref().map(|_| {
            let wx = outer(wu, self.x.view());
            (&wx + &wx.t()) * 0.5
        });
        Ok(DataGradient {
            p: dp,
            a: da,
            sparse_a: None,
            sparse_p: None,
            b: wv.to_owned(),
            c: wu.to_owned(),
        })
    }
}

/// A matrix on the pattern of `pattern` with the values `value(i, j)`.
fn on_pattern(pattern: &CscMatrix, value: impl Fn(usize, usize) -> f64) -> Result<CscMatrix> {
    let f = pattern.as_faer();
    let (cp, ri) = (f.col_ptr(), f.row_idx());
    let mut vals = Vec::with_capacity(ri.len());
    for j in 0..pattern.ncols() {
        vals.extend(ri[cp[j]..cp[j + 1]].iter().map(|&i| value(i, j)));
    }
    CscMatrix::try_new(pattern.nrows(), pattern.ncols(), cp.to_vec(), ri.to_vec(), vals)
}

/// Refuses a solution that is not one of `prog`: its KKT residuals recomputed on `prog`
/// must be those its solve reported (to rounding: `10x` plus `1e-12` of the data's scale),
/// and `v` must be `y - s`. A solution of another program of the same size passes the
/// shape checks, and differentiating `prog` at it gives a derivative of nothing (with a
/// check that may well certify it).
fn check_solves(op: &'static str, prog: &ConeProgram, sol: &ConeSolution) -> Result<()> {
    let here = Residuals::compute(prog, sol.x.view(), sol.y.view(), sol.s.view());
    let scale = [
        inf_norm(prog.b.view()),
        inf_norm(prog.c.view()),
        inf_norm(sol.x.view()),
        inf_norm(sol.y.view()),
    ]
    .into_iter()
    .fold(1.0f64, f64::max);
    let allowed = 10.0 * sol.residuals.max() + 1e-12 * scale;
    if here.max().is_nan() || here.max() > allowed {
        return Err(Error::invalid(
            op,
            format!(
                "the solution does not solve this program: its KKT residual here is {:e} (primal {:e}, dual {:e}, gap {:e}) where its solve reported {:e}; is it the solution of another program?",
                here.max(),
                here.primal,
                here.dual,
                here.gap,
                sol.residuals.max()
            ),
        ));
    }
    let v_gap = sol
        .v
        .iter()
        .zip(sol.y.iter().zip(sol.s.iter()))
        .fold(0.0f64, |m, (v, (y, s))| m.max((v - (y - s)).abs()));
    if v_gap.is_nan() || v_gap > 1e-12 * scale {
        return Err(Error::invalid(
            op,
            format!("the solution's v is not y - s (off by {v_gap:e}): it was changed after its solve"),
        ));
    }
    Ok(())
}
