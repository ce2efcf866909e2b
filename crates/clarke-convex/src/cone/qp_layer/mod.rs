//! A QP layer on the tape, built on the cone machinery:
//!
//! ```text
//! x*(theta) = argmin (1/2) x^T Q x + p^T x   subject to   A x = b,   l <= G x <= u
//! ```
//!
//! with every constraint block optional and infinite bounds allowed. Each sample is mapped to
//! the cone program `min (1/2) x^T P x + c^T x` s.t. `A_c x + s = b_c`, `s in K` ([`super::problem`])
//! with a zero cone for the equalities (`A x = b`, and the rows with `l_i = u_i`) and a
//! non-negative cone for the finite sides of the others (`G_i x <= u_i` and `-G_i x <= -l_i`;
//! a row with both sides infinite is dropped), solved by [`super::solve`] and differentiated
//! by [`super::ConeDerivative`] under the backward call's kink policy, with the conic layer's
//! check, refusal, ledger records and [`ConicBackwardReport`](super::ConicBackwardReport)s.
//! The gradient of `(P, A_c, b_c, c)` is mapped back: `grad_Q = grad_P` (symmetric),
//! `grad_p = grad_c`, and per cone row, `grad_A`, `grad_b` from the equality rows, `grad_G`
//! plus and `grad_u` from the upper rows, `grad_G` minus and `grad_l` minus from the lower
//! rows. An infinite bound takes part in no row, so its gradient is 0.
//!
//! **Infeasible samples.** By default an infeasible sample is an error naming the sample and
//! the solver's certificate. With [`InfeasibleMode::ClosestFeasible`] the layer solves the
//! closest feasible QP of Bambade, Schramm, Taylor and Carpentier (2023): the constraints
//! are shifted by the smallest shift `s*` that makes them feasible,
//!
//! ```text
//! s* = C xbar - Pi_B(C xbar),   xbar in argmin_x ||A x - b||^2 + ||(G x - u)_+||^2 + ||(l - G x)_+||^2,
//! ```
//!
//! (`C = [A; G]`, `B` the box `{b} x [l, u]`; `s*` is unique even when `xbar` is not), and
//! `x*` solves the QP with `A x = b + s*_A`, `l + s*_G <= G x <= u + s*_G`. The feasible set of
//! that QP is the set of least-squares points, on which each violated row is an equality
//! `C_i x = C_i xbar`; these rows are linearly dependent (`C_V^T s*_V = 0`), so the layer keeps a
//! maximal independent subset of them as zero-cone rows (the others are implied) and the
//! cone program stays regular. The derivative is the chain rule through `theta -> s*(theta)
//! -> x*(theta)`: the cone derivative of the shifted program, whose right-hand sides
//! `b_c = bound + s*` pass their gradient to the bounds and to `s*`, and the derivative of
//! `s*` from the stationarity of the least-squares problem, `E^T r = 0` with `E = D C`, `D`
//! the rows outside the box (every equality row):
//!
//! ```text
//! dr = e - E (E^T E)^+ (dC^T r + E^T e),   e = D (dC xbar - d beta)
//! adjoint of g_r:  w = E^+ g_r,  h = g_r - E w,  grad_C += h xbar^T - r w^T,  grad_beta = -h
//! ```
//!
//! (`beta` the bound each violated row is projected to: `b`, `u` or `l`). This is exact where
//! the violated set is locally constant and `E` has full column rank; where `E^T E` is
//! singular the pseudo-inverse (minimum-norm least-squares) element is used.

mod mapping;
mod shift;

use std::rc::Rc;
use std::sync::Arc;

use clarke_core::{Error, Result, Scalar, Var, VjpContext};
use ndarray::{Array1, Array2, ArrayD, Axis, Dimension, Ix1, Ix2, s};
use rayon::prelude::*;

use super::derivative::{DataDirection, DerivativeOptions, SolutionDirection};
use super::layer::{ConicLog, Differentiation, QuadraticTerm, gather, in_sample, reshape_error, to_f64};
use super::problem::ConeProgram;
use super::solver::{ConeSolution, ConeStatus, SolverOptions, solve};

use mapping::{QpArrays, Sample, SampleData, build_program, cone_direction, map_gradient, multipliers};
use shift::{Shift, least_squares_shift, shift_kink_records};
const OP: &str = "qp_layer";

/// What the QP layer does with a sample whose constraints have no common point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InfeasibleMode {
    /// Refuse: the error names the sample and the solver's infeasibility certificate.
    #[default]
    Error,
    /// Solve the closest feasible QP (the constraints shifted by the least-squares shift
    /// that makes them feasible) and differentiate it; the layer's report says so per sample,
    /// with the norm of the shift.
    ClosestFeasible,
}

/// Options of [`qp_layer`].
#[derive(Debug, Clone, PartialEq)]
pub struct QpLayerOptions {
    /// Name in errors, reports and ledger records. Default `"qp_layer"`.
    pub name: String,
    /// The cone solver.
    pub solver: SolverOptions,
    /// The derivative and its check.
    pub derivative: DerivativeOptions,
    /// What an infeasible sample does. Default: an error.
    pub infeasible: InfeasibleMode,
}

impl Default for QpLayerOptions {
    fn default() -> Self {
        QpLayerOptions {
            name: OP.into(),
            solver: SolverOptions::default(),
            derivative: DerivativeOptions::default(),
            infeasible: InfeasibleMode::Error,
        }
    }
}

impl QpLayerOptions {
    /// Sets the solver options.
    pub fn with_solver(mut self, solver: SolverOptions) -> Self {
        self.solver = solver;
        self
    }

    /// Sets the derivative options.
    pub fn with_derivative(mut self, derivative: DerivativeOptions) -> Self {
        self.derivative = derivative;
        self
    }

    /// Sets what an infeasible sample does.
    pub fn with_infeasible(mut self, mode: InfeasibleMode) -> Self {
        self.infeasible = mode;
        self
    }
}

/// The data of a QP layer: `Q`, `p` and the optional constraint blocks, each a tape [`Var`]
/// (`Q` may also be a constant array, see [`QuadraticTerm`]).
///
/// Shapes, with an optional batch axis first on any of them (the others are shared by every
/// sample and their gradients summed): `Q [n, n]`, `p [n]`, `A [m_eq, n]`, `b [m_eq]`,
/// `G [m_in, n]`, `l [m_in]`, `u [m_in]`. `l` may hold `-inf` and `u` `+inf` (no bound on that
/// side); a missing `l` or `u` is all infinite.
#[derive(Debug, Clone)]
pub struct QpData<'t, S: Scalar> {
    /// The quadratic term `Q` (symmetric positive semidefinite).
    pub q: QuadraticTerm<'t, S>,
    /// The linear term `p`.
    pub p: Var<'t, S>,
    /// The equality matrix `A`.
    pub a: Option<Var<'t, S>>,
    /// The equality right-hand side `b`.
    pub b: Option<Var<'t, S>>,
    /// The inequality matrix `G`.
    pub g: Option<Var<'t, S>>,
    /// Lower bounds of `G x`.
    pub l: Option<Var<'t, S>>,
    /// Upper bounds of `G x`.
    pub u: Option<Var<'t, S>>,
}

impl<'t, S: Scalar> QpData<'t, S> {
    /// The unconstrained QP `min (1/2) x^T Q x + p^T x`; add constraints with
    /// [`with_eq`](Self::with_eq) and [`with_ineq`](Self::with_ineq).
    pub fn new(q: impl Into<QuadraticTerm<'t, S>>, p: Var<'t, S>) -> Self {
        QpData {
            q: q.into(),
            p,
            a: None,
            b: None,
            g: None,
            l: None,
            u: None,
        }
    }

    /// Adds the equalities `A x = b`.
    pub fn with_eq(mut self, a: Var<'t, S>, b: Var<'t, S>) -> Self {
        self.a = Some(a);
        self.b = Some(b);
        self
    }

    /// Adds the inequalities `l <= G x <= u` (a missing side is infinite).
    pub fn with_ineq(mut self, g: Var<'t, S>, l: Option<Var<'t, S>>, u: Option<Var<'t, S>>) -> Self {
        self.g = Some(g);
        self.l = l;
        self.u = u;
        self
    }
}

/// Where a row of the cone program comes from, in the QP's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QpRow {
    /// Equality `A_k x = b_k` (zero cone).
    Eq(usize),
    /// Inequality row `i` with `l_i = u_i`, an equality `G_i x = u_i` (zero cone).
    Pinned(usize),
    /// The upper side `G_i x <= u_i` (non-negative cone; a zero-cone row when the closest
    /// feasible QP pins it).
    Upper(usize),
    /// The lower side `-G_i x <= -l_i` (as `Upper`).
    Lower(usize),
    /// The slack row `0 <= 1` a QP without any finite constraint gets, so that the cone
    /// program has a row; never active.
    Padding,
}

impl std::fmt::Display for QpRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QpRow::Eq(k) => write!(f, "equality {k} (A x = b)"),
            QpRow::Pinned(i) => write!(f, "inequality {i} with l = u"),
            QpRow::Upper(i) => write!(f, "upper side of inequality {i} (G x <= u)"),
            QpRow::Lower(i) => write!(f, "lower side of inequality {i} (G x >= l)"),
            QpRow::Padding => write!(f, "padding row"),
        }
    }
}

/// What the closest feasible QP of an infeasible sample was.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosestFeasible {
    /// The shift of the equalities: `A x = b + shift_eq`.
    pub shift_eq: Array1<f64>,
    /// The shift of the inequalities: `l + shift_ineq <= G x <= u + shift_ineq`.
    pub shift_ineq: Array1<f64>,
    /// `||s*||_2` over both.
    pub norm: f64,
    /// A least-squares point `xbar` (`s* = C xbar - Pi_B(C xbar)`).
    pub least_squares_x: Array1<f64>,
    /// The infeasibility certificate of the original QP (the solver's `y`, unit infinity
    /// norm), its non-zero entries by row.
    pub certificate: Vec<(QpRow, f64)>,
    /// Violated rows left out of the shifted program because the kept ones imply them.
    pub left_out: Vec<QpRow>,
}

/// The solution of one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct QpSolution {
    /// The primal solution `x*`.
    pub x: Array1<f64>,
    /// The multipliers of `A x = b` (`Q x + p + A^T y + G^T z = 0`).
    pub eq_multipliers: Array1<f64>,
    /// The multipliers `z` of `l <= G x <= u`: `z_i > 0` on the upper side, `< 0` on the lower.
    pub ineq_multipliers: Array1<f64>,
    /// Where each row of the solved cone program comes from.
    pub rows: Vec<QpRow>,
    /// The cone solver's result for the program that was differentiated.
    pub cone: ConeSolution,
    /// When the sample was infeasible and the closest feasible QP was solved instead.
    pub closest_feasible: Option<ClosestFeasible>,
}

/// One sample's line of a [`QpForwardReport`].
#[derive(Debug, Clone, PartialEq)]
pub struct QpSampleReport {
    /// `Some(||s*||)` when the sample was infeasible and the closest feasible QP was solved.
    pub closest_feasible: Option<f64>,
    /// Violated rows of the closest feasible QP left out because the kept ones imply them
    /// (see [`ClosestFeasible::left_out`]). Such linearly dependent violated rows are where
    /// the shift is discontinuous: a perturbation of `A` or `G` that separates them can
    /// make the QP feasible, and the shift jumps to 0. The derivative returned there is
    /// that of the dependent configuration (the minimum-norm element), so the report says
    /// so rather than passing it off as a plain derivative.
    pub dependent_rows: usize,
    /// ADMM iterations of the (last) solve.
    pub iterations: usize,
    /// The largest KKT residual of the returned point.
    pub kkt_residual: f64,
}

/// What the forward pass of a QP layer did, per sample.
#[derive(Debug, Clone, PartialEq)]
pub struct QpForwardReport {
    /// The layer.
    pub node: String,
    /// Per sample.
    pub samples: Vec<QpSampleReport>,
}

impl QpForwardReport {
    /// The samples whose closest feasible QP was solved, with the norm of their shift.
    pub fn closest_feasible(&self) -> Vec<(usize, f64)> {
        self.samples
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.closest_feasible.map(|n| (i, n)))
            .collect()
    }
}

impl std::fmt::Display for QpForwardReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}: {} sample(s)", self.node, self.samples.len())?;
        for (i, s) in self.samples.iter().enumerate() {
            match s.closest_feasible {
                Some(norm) => {
                    writeln!(
                        f,
                        "  sample {i}: infeasible; solved the closest feasible QP (shift norm {norm:.6e}), {} iterations, KKT residual {:.2e}",
                        s.iterations, s.kkt_residual
                    )?;
                    if s.dependent_rows > 0 {
                        writeln!(
                            f,
                            "    {} violated row(s) implied by the others: the shift is discontinuous in A and G here (a perturbation separating the rows can make the QP feasible); the derivative is that of the dependent rows",
                            s.dependent_rows
                        )?;
                    }
                }
                None => writeln!(
                    f,
                    "  sample {i}: solved, {} iterations, KKT residual {:.2e}",
                    s.iterations, s.kkt_residual
                )?,
            }
        }
        Ok(())
    }
}

/// The outputs of a QP layer.
pub struct QpLayer<'t, S: Scalar> {
    /// Primal solutions, `[n]` or `[B, n]`.
    pub x: Var<'t, S>,
    /// Per sample: the solution, its multipliers, the cone solve, the closest feasible QP.
    pub solutions: Arc<Vec<QpSolution>>,
    /// Reports of the backward passes (the conic layer's, with the kinks in the QP's rows).
    pub log: ConicLog,
    name: String,
}

impl<S: Scalar> QpLayer<'_, S> {
    /// What the forward pass did per sample (solved, or the closest feasible QP and its
    /// shift's norm).
    pub fn report(&self) -> QpForwardReport {
        QpForwardReport {
            node: self.name.clone(),
            samples: self
                .solutions
                .iter()
                .map(|s| QpSampleReport {
                    closest_feasible: s.closest_feasible.as_ref().map(|c| c.norm),
                    dependent_rows: s.closest_feasible.as_ref().map_or(0, |c| c.left_out.len()),
                    iterations: s.cone.iterations,
                    kkt_residual: s.cone.residuals.max(),
                })
                .collect(),
        }
    }
}

/// The QP layer (see the module docs): solves every sample, records one node whose backward
/// runs the checked cone derivative per sample and maps its gradient back to
/// `(Q, p, A, b, G, l, u)`.
///
/// # Errors
/// Shapes that do not fit (naming the argument and both shapes), `b` without `A` (and the
/// like), NaN or a wrong-signed infinity anywhere (naming the argument and the entry),
/// `l > u` (naming the row), a `Q` that is not symmetric (naming the entry) or not positive
/// semidefinite, an infeasible sample (naming it and the certificate) unless
/// [`InfeasibleMode::ClosestFeasible`], an unbounded or unfinished solve.
///
/// Forward mode ([`clarke_core::Tape::jvp`]) runs the same checked derivative's forward map,
/// with the same check, refusal, kink records and report.
pub fn qp_layer<'t, S: Scalar>(data: QpData<'t, S>, opts: &QpLayerOptions) -> Result<QpLayer<'t, S>> {
    let name = opts.name.clone();
    let QpData { q, p, a, b, g, l, u } = data;
    match (&a, &b) {
        (Some(_), None) => return Err(Error::invalid(OP, "A is given without b: equalities A x = b need both")),
        (None, Some(_)) => return Err(Error::invalid(OP, "b is given without A: equalities A x = b need both")),
        _ => {}
    }
    if g.is_none() && (l.is_some() || u.is_some()) {
        let which = if l.is_some() { "l" } else { "u" };
        return Err(Error::invalid(
            OP,
            format!("{which} is given without G: bounds l <= G x <= u need G"),
        ));
    }
    if g.is_some() && l.is_none() && u.is_none() {
        return Err(Error::invalid(
            OP,
            "G is given without l or u: give at least one side of l <= G x <= u",
        ));
    }
    let (q_var, qv) = match q {
        QuadraticTerm::Var(q) => (Some(q), q.value()),
        QuadraticTerm::Fixed(v) => (None, v),
    };
    let pv = p.value();
    let (n, mut batch) = match pv.shape() {
        [n] => (*n, None),
        [bs, n] => (*n, Some(*bs)),
        other => {
            return Err(Error::shapes(OP, other, &[0], "p must be [n] or [B, n]"));
        }
    };
    if n == 0 {
        return Err(Error::invalid(OP, "p is empty: the QP has no variables"));
    }
    let mut agree = |which: &str, shape: &[usize], base: &[usize], how: &str| -> Result<bool> {
        if shape == base {
            return Ok(false);
        }
        if shape.len() == base.len() + 1 && &shape[1..] == base {
            match batch {
                Some(bs) if bs != shape[0] => {
                    return Err(Error::invalid(
                        OP,
                        format!(
                            "{which} has batch size {} (shape {shape:?}) but another argument has {bs}",
                            shape[0]
                        ),
                    ));
                }
                _ => batch = Some(shape[0]),
            }
            return Ok(true);
        }
        Err(Error::shapes(
            OP,
            shape,
            base,
            format!("{which} must be {how} or with a batch axis first, with n = {n} from p"),
        ))
    };
    let p_batched = pv.ndim() == 2;
    let q_batched = agree("Q", qv.shape(), &[n, n], "[n, n]")?;
    let av = a.map(|a| a.value());
    let bv = b.map(|b| b.value());
    let gv = g.map(|g| g.value());
    let lv = l.map(|l| l.value());
    let uv = u.map(|u| u.value());
    let rows_of = |which: &str, v: &ArrayD<S>| -> Result<usize> {
        match v.shape() {
            [m, _] => Ok(*m),
            [_, m, _] => Ok(*m),
            other => Err(Error::shapes(
                OP,
                other,
                &[0, n],
                format!("{which} must be [m, n] or [B, m, n], with n = {n} from p"),
            )),
        }
    };
    let me = av.as_ref().map(|v| rows_of("A", v)).transpose()?.unwrap_or(0);
    let mg = gv.as_ref().map(|v| rows_of("G", v)).transpose()?.unwrap_or(0);
    let a_batched = match &av {
        Some(v) => agree("A", v.shape(), &[me, n], "[m_eq, n]")?,
        None => false,
    };
    let b_batched = match &bv {
        Some(v) => agree("b", v.shape(), &[me], "[m_eq] (one entry per row of A)")?,
        None => false,
    };
    let g_batched = match &gv {
        Some(v) => agree("G", v.shape(), &[mg, n], "[m_in, n]")?,
        None => false,
    };
    let l_batched = match &lv {
        Some(v) => agree("l", v.shape(), &[mg], "[m_in] (one entry per row of G)")?,
        None => false,
    };
    let u_batched = match &uv {
        Some(v) => agree("u", v.shape(), &[mg], "[m_in] (one entry per row of G)")?,
        None => false,
    };
    if batch == Some(0) {
        return Err(Error::invalid(OP, format!("{name}: the batch is empty")));
    }
    let samples = batch.unwrap_or(1);

    // Values: finite data, bounds finite or infinite on their own side only.
    let qf = to_f64(&qv.view());
    let pf = to_f64(&pv.view());
    let af = av.as_ref().map(|v| to_f64(&v.view()));
    let bf = bv.as_ref().map(|v| to_f64(&v.view()));
    let gf = gv.as_ref().map(|v| to_f64(&v.view()));
    let lf = lv.as_ref().map(|v| to_f64(&v.view()));
    let uf = uv.as_ref().map(|v| to_f64(&v.view()));
    for (which, arr) in [
        ("Q", Some(&qf)),
        ("p", Some(&pf)),
        ("A", af.as_ref()),
        ("b", bf.as_ref()),
        ("G", gf.as_ref()),
    ] {
        if let Some(arr) = arr {
            finite(which, arr, |v| v.is_finite(), "a non-finite entry")?;
        }
    }
    if let Some(l) = &lf {
        finite(
            "l",
            l,
            |v| v < f64::INFINITY,
            "an entry that is not a number or +inf (use -inf for no lower bound)",
        )?;
    }
    if let Some(u) = &uf {
        finite(
            "u",
            u,
            |v| v > f64::NEG_INFINITY,
            "an entry that is not a number or -inf (use +inf for no upper bound)",
        )?;
    }

    // Per-sample data.
    let pick2 = |arr: &ArrayD<f64>, batched: bool, i: usize| -> Array2<f64> {
        pick(arr, batched, i)
            .into_dimensionality::<Ix2>()
            .expect("checked shape")
    };
    let pick1 = |arr: &ArrayD<f64>, batched: bool, i: usize| -> Array1<f64> {
        pick(arr, batched, i)
            .into_dimensionality::<Ix1>()
            .expect("checked shape")
    };
    let mut datas = Vec::with_capacity(samples);
    for i in 0..samples {
        let d = SampleData {
            q: pick2(&qf, q_batched, i),
            p: pick1(&pf, p_batched, i),
            a: af
                .as_ref()
                .map_or_else(|| Array2::zeros((0, n)), |a| pick2(a, a_batched, i)),
            b: bf.as_ref().map_or_else(|| Array1::zeros(0), |b| pick1(b, b_batched, i)),
            g: gf
                .as_ref()
                .map_or_else(|| Array2::zeros((0, n)), |g| pick2(g, g_batched, i)),
            l: lf
                .as_ref()
                .map_or_else(|| Array1::from_elem(mg, f64::NEG_INFINITY), |l| pick1(l, l_batched, i)),
            u: uf
                .as_ref()
                .map_or_else(|| Array1::from_elem(mg, f64::INFINITY), |u| pick1(u, u_batched, i)),
        };
        for r in 0..mg {
            if d.l[r] > d.u[r] {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "{}l > u at row {r}: l[{r}] = {} > u[{r}] = {}; the bounds l <= G x <= u are empty",
                        sample_prefix(i, samples),
                        d.l[r],
                        d.u[r]
                    ),
                ));
            }
        }
        if i == 0 || q_batched {
            check_symmetric(&d.q, i, samples)?;
        }
        datas.push(d);
    }

    // Solve every sample.
    let solver = opts.solver.clone();
    let mode = opts.infeasible;
    let run_sample = |i: usize| solve_sample(&name, i, samples, &datas[i], &solver, mode);
    let solved: Vec<(ConeProgram, Sample, QpSolution)> = if samples == 1 {
        vec![run_sample(0)?]
    } else {
        (0..samples)
            .into_par_iter()
            .map(run_sample)
            .collect::<Result<Vec<_>>>()?
    };
    drop(datas);
    let mut programs = Vec::with_capacity(samples);
    let mut states = Vec::with_capacity(samples);
    let mut solutions = Vec::with_capacity(samples);
    for (prog, state, sol) in solved {
        programs.push(prog);
        states.push(state);
        solutions.push(sol);
    }
    let mut out = Array2::<f64>::zeros((samples, n));
    for (mut row, sol) in out.rows_mut().into_iter().zip(&solutions) {
        row.assign(&sol.x);
    }
    let value: ArrayD<S> = if batch.is_some() {
        out.mapv(S::from_f64_lossy).into_dyn()
    } else {
        out.row(0).mapv(S::from_f64_lossy).into_dyn()
    };

    // The kink records are laid out as [samples, m_eq + 2 m_in]: equality k at k, the upper
    // side (or the pinned row) of inequality i at m_eq + i, its lower side at m_eq + m_in + i.
    let ledger_rows = (me + 2 * mg).max(1);
    let row_map: Vec<Vec<usize>> = states
        .iter()
        .map(|st| {
            st.rows
                .iter()
                .map(|r| match *r {
                    QpRow::Eq(k) => k,
                    QpRow::Pinned(i) | QpRow::Upper(i) => me + i,
                    QpRow::Lower(i) => me + mg + i,
                    QpRow::Padding => 0,
                })
                .collect()
        })
        .collect();
    let cone_solutions = Arc::new(solutions.iter().map(|s| s.cone.clone()).collect::<Vec<_>>());
    let solutions = Arc::new(solutions);
    let log = ConicLog::default();
    let diff = Rc::new(Differentiation {
        name: name.clone(),
        programs,
        solutions: cone_solutions,
        derivative: opts.derivative.clone(),
        log: log.clone(),
        samples,
        rows: ledger_rows,
        row_map: Some(row_map),
    });
    let states = Rc::new(states);

    let present = [
        q_var.is_some(),
        true,
        a.is_some(),
        b.is_some(),
        g.is_some(),
        l.is_some(),
        u.is_some(),
    ];
    let batched = [
        q_batched, p_batched, a_batched, b_batched, g_batched, l_batched, u_batched,
    ];
    let inputs: Vec<Var<'t, S>> = [q_var, Some(p), a, b, g, l, u].into_iter().flatten().collect();
    let tape = p.tape();
    let vjp_states = states.clone();
    let (jvp_diff, jvp_states) = (diff.clone(), states.clone());
    let node = tape.try_custom_fn_ctx(&name, &inputs, value, move |ctx, _inputs, _out, grad| {
        let gx = grad
            .mapv(|v| v.to_f64_exact())
            .into_shape_with_order((samples, n))
            .map_err(|e| reshape_error(&diff.name, e))?;
        let states = &*vjp_states;
        let cone_solutions = &*diff.solutions;
        let grads: Vec<QpArrays> = diff.run(ctx, |i, d| {
            let m = states[i].rows.len();
            let dg = d.adjoint(&SolutionDirection {
                x: gx.row(i).to_owned(),
                y: Array1::zeros(m),
                s: Array1::zeros(m),
            })?;
            map_gradient(&states[i], &cone_solutions[i].y, &dg)
        })?;
        report_shift_kinks(ctx, states, me + mg, &diff.name);
        let mut out = Vec::with_capacity(7);
        for (k, (&has, &bat)) in present.iter().zip(&batched).enumerate() {
            if !has {
                continue;
            }
            out.push(Some(match k {
                0 => gather::<S, _, _>(&grads, bat, |g| g.q.clone()),
                1 => gather::<S, _, _>(&grads, bat, |g| g.p.clone()),
                2 => gather::<S, _, _>(&grads, bat, |g| g.a.clone()),
                3 => gather::<S, _, _>(&grads, bat, |g| g.b.clone()),
                4 => gather::<S, _, _>(&grads, bat, |g| g.g.clone()),
                5 => gather::<S, _, _>(&grads, bat, |g| g.l.clone()),
                _ => gather::<S, _, _>(&grads, bat, |g| g.u.clone()),
            }));
        }
        Ok(out)
    })?;
    // The tangent of `x` per sample by the cone derivative's forward map (the shift's tangent
    // first, for a closest feasible QP), with the backward's check, refusal, kink records and
    // report.
    tape.set_custom_jvp(node, move |ctx, inputs, _out, tangents| {
        let name = &jvp_diff.name;
        // Tangents as f64 (zeros for inputs without one), by argument: Q, p, A, b, G, l, u.
        let mut dirs: Vec<Option<ArrayD<f64>>> = vec![None; 7];
        let mut given = inputs.iter().zip(tangents);
        for (k, &has) in present.iter().enumerate() {
            if has {
                let (x, t) = given.next().ok_or_else(|| Error::CustomOp {
                    op: name.clone(),
                    detail: format!("{} inputs reached the forward-mode rule", inputs.len()),
                })?;
                dirs[k] = Some(t.as_ref().map_or_else(|| ArrayD::zeros(x.raw_dim()), to_f64));
            }
        }
        let states = &*jvp_states;
        let cone_solutions = &*jvp_diff.solutions;
        let rows = jvp_diff.run(ctx, |i, d| {
            let st = &states[i];
            let dir = sample_direction(name, &dirs, &batched, &st.data, i)?;
            let (dp, da, db) = cone_direction(st, &cone_solutions[i].y, &dir)?;
            let dz = d.forward(&DataDirection {
                p: Some(dp.view()),
                a: da.view(),
                b: db.view(),
                c: dir.p.view(),
            })?;
            Ok(dz.x)
        })?;
        report_shift_kinks(ctx, states, me + mg, name);
        let mut out = Array2::<f64>::zeros((samples, n));
        for (mut row, dx) in out.rows_mut().into_iter().zip(&rows) {
            row.assign(dx);
        }
        let out = out.mapv(S::from_f64_lossy);
        Ok(if batch.is_some() {
            out.into_dyn()
        } else {
            out.row(0).to_owned().into_dyn()
        })
    })?;
    Ok(QpLayer {
        x: node,
        solutions,
        log,
        name,
    })
}

/// Adds the kinks of the least-squares shifts to the ledger of the call, when a sample was
/// replaced by its closest feasible QP (see [`shift::shift_kink_records`]).
fn report_shift_kinks(ctx: &VjpContext<'_>, states: &[Sample], rows: usize, name: &str) {
    if states.iter().all(|s| s.shift.is_none()) {
        return;
    }
    let shifts: Vec<Option<&Shift>> = states.iter().map(|s| s.shift.as_ref()).collect();
    ctx.report_kinks(shift_kink_records(&shifts, rows, ctx.policy.tolerance, ctx.node, name));
}

/// Sample `i` of an input that may carry a batch axis.
fn pick(arr: &ArrayD<f64>, batched: bool, i: usize) -> ArrayD<f64> {
    if batched {
        arr.index_axis(Axis(0), i).to_owned()
    } else {
        arr.clone()
    }
}

fn sample_prefix(i: usize, samples: usize) -> String {
    if samples == 1 {
        String::new()
    } else {
        format!("sample {i} of {samples}: ")
    }
}

/// The first entry of `arr` that fails `ok`, as an error naming the argument and its index.
fn finite(which: &str, arr: &ArrayD<f64>, ok: impl Fn(f64) -> bool, what: &str) -> Result<()> {
    if arr.iter().all(|&v| ok(v)) {
        return Ok(());
    }
    for (idx, &v) in arr.indexed_iter() {
        if !ok(v) {
            return Err(Error::invalid(
                OP,
                format!("{which} has {what}: {which}{:?} = {v}", idx.slice()),
            ));
        }
    }
    Ok(())
}

/// `Q` symmetric to `1e-12` of its largest entry; the error names the worst pair.
fn check_symmetric(q: &Array2<f64>, i: usize, samples: usize) -> Result<()> {
    let scale = q.iter().fold(1.0f64, |a, v| a.max(v.abs()));
    let mut worst = (0.0, 0, 0);
    for ((r, c), &v) in q.indexed_iter() {
        let d = (v - q[[c, r]]).abs();
        if d > worst.0 {
            worst = (d, r, c);
        }
    }
    if worst.0 > 1e-12 * scale {
        let (_, r, c) = worst;
        return Err(Error::invalid(
            OP,
            format!(
                "{}Q is not symmetric: Q[{r}, {c}] = {} but Q[{c}, {r}] = {}",
                sample_prefix(i, samples),
                q[[r, c]],
                q[[c, r]]
            ),
        ));
    }
    Ok(())
}

/// Solves one sample: the QP, or (infeasible, in the closest-feasible mode) the shifted QP.
fn solve_sample(
    name: &str,
    i: usize,
    samples: usize,
    d: &SampleData,
    solver: &SolverOptions,
    mode: InfeasibleMode,
) -> Result<(ConeProgram, Sample, QpSolution)> {
    let tag = |e: Error| in_sample(name, i, samples, e);
    let (prog, rows) = build_program(d, None).map_err(tag)?;
    let prog = prog.with_quadratic(d.q.clone()).map_err(tag)?;
    let sol = solve(&prog, solver, None).map_err(tag)?;
    let unsolved = |sol: &ConeSolution, what: &str| Error::CustomOp {
        op: name.to_string(),
        detail: format!(
            "sample {i}: the {what} is {} after {} iterations (primal residual {:.2e}, dual residual {:.2e}); nothing to differentiate",
            sol.status, sol.iterations, sol.admm_residuals.primal, sol.admm_residuals.dual
        ),
    };
    match sol.status {
        ConeStatus::Solved => {
            let (eq, ineq) = multipliers(d, &rows, &sol.y);
            let out = QpSolution {
                x: sol.x.clone(),
                eq_multipliers: eq,
                ineq_multipliers: ineq,
                rows: rows.clone(),
                cone: sol,
                closest_feasible: None,
            };
            Ok((
                prog,
                Sample {
                    data: d.clone(),
                    rows,
                    shift: None,
                },
                out,
            ))
        }
        ConeStatus::Infeasible => {
            let certificate: Vec<(QpRow, f64)> = sol
                .certificate
                .as_ref()
                .map(|y| {
                    rows.iter()
                        .zip(y.iter())
                        .filter(|(_, v)| v.abs() > 1e-12)
                        .map(|(r, v)| (*r, *v))
                        .collect()
                })
                .unwrap_or_default();
            if mode == InfeasibleMode::Error {
                let cert = certificate
                    .iter()
                    .map(|(r, v)| format!("{r}: {v:.6}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(Error::CustomOp {
                    op: name.to_string(),
                    detail: format!(
                        "sample {i}: the QP is infeasible; the solver's certificate after {} iterations (y with A_c^T y = 0, b_c^T y < 0, unit infinity norm): [{cert}]; InfeasibleMode::ClosestFeasible solves the closest feasible QP instead",
                        sol.iterations
                    ),
                });
            }
            let shift = least_squares_shift(d, solver).map_err(tag)?;
            let (prog, rows) = build_program(d, Some(&shift)).map_err(tag)?;
            let prog = prog.with_quadratic(d.q.clone()).map_err(tag)?;
            let sol = solve(&prog, solver, None).map_err(tag)?;
            if sol.status != ConeStatus::Solved {
                return Err(unsolved(&sol, "closest feasible QP"));
            }
            let (eq, ineq) = multipliers(d, &rows, &sol.y);
            let me = d.a.nrows();
            let left_out = (0..shift.r.len())
                .filter(|&j| shift.left_out[j])
                .map(|j| {
                    if j < me {
                        QpRow::Eq(j)
                    } else if d.pinned(j - me) {
                        QpRow::Pinned(j - me)
                    } else if shift.r[j] > 0.0 {
                        QpRow::Upper(j - me)
                    } else {
                        QpRow::Lower(j - me)
                    }
                })
                .collect();
            let info = ClosestFeasible {
                shift_eq: shift.r.slice(s![..me]).to_owned(),
                shift_ineq: shift.r.slice(s![me..]).to_owned(),
                norm: shift.r.dot(&shift.r).sqrt(),
                least_squares_x: shift.xbar.clone(),
                certificate,
                left_out,
            };
            let out = QpSolution {
                x: sol.x.clone(),
                eq_multipliers: eq,
                ineq_multipliers: ineq,
                rows: rows.clone(),
                cone: sol,
                closest_feasible: Some(info),
            };
            Ok((
                prog,
                Sample {
                    data: d.clone(),
                    rows,
                    shift: Some(shift),
                },
                out,
            ))
        }
        _ => Err(unsolved(&sol, "QP")),
    }
}

/// Sample `i` of the tangents of the QP's arguments (`dirs` by argument, `None` for an
/// absent one, which gets zeros of its sample's shape).
fn sample_direction(
    name: &str,
    dirs: &[Option<ArrayD<f64>>],
    batched: &[bool; 7],
    d: &SampleData,
    i: usize,
) -> Result<QpArrays> {
    let two = |k: usize, shape: (usize, usize)| -> Result<Array2<f64>> {
        match &dirs[k] {
            Some(t) => pick(t, batched[k], i)
                .into_dimensionality::<Ix2>()
                .map_err(|e| reshape_error(name, e)),
            None => Ok(Array2::zeros(shape)),
        }
    };
    let one = |k: usize, len: usize| -> Result<Array1<f64>> {
        match &dirs[k] {
            Some(t) => pick(t, batched[k], i)
                .into_dimensionality::<Ix1>()
                .map_err(|e| reshape_error(name, e)),
            None => Ok(Array1::zeros(len)),
        }
    };
    let (me, mg, n) = (d.a.nrows(), d.g.nrows(), d.q.nrows());
    Ok(QpArrays {
        q: two(0, (n, n))?,
        p: one(1, n)?,
        a: two(2, (me, n))?,
        b: one(3, me)?,
        g: two(4, (mg, n))?,
        l: one(5, mg)?,
        u: one(6, mg)?,
    })
}
