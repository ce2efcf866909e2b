//! The implicit node of a DEQ cell on the tape: its backward (the adjoint solve
//! `(I - J_z)^T y = g`) and its forward-mode rule (the tangent solve `(I - J_z) v = D t`),
//! which share one selection of `sigma'` at the solution, one kink record and one
//! hypothesis check, so that the two maps are transposes of one conservative-Jacobian
//! element.
//!
//! Rows are samples and `J_z` is block diagonal: `J_z v = (v W^T) o d` and
//! `J_z^T y = (y o d) W` row by row, with `d = sigma'(p*)` under the call's kink policy.

use std::rc::Rc;

use clarke_core::gemm::gemm;
use clarke_core::{Error, JvpContext, KinkLedger, Result, Scalar, VjpContext};
use clarke_implicit::{AdjointSolver, BackwardReport, CheckOutcome, GradientMode, HypothesisCheck, Pass, ReportLog};
use clarke_solve::{FixedPointReport, FnOperator, SolveOptions, SolveReport, SolveStatus};
use ndarray::{Array1, Array2, Array3, ArrayD, ArrayView2, ArrayViewD, ArrayViewMut2, Axis, Ix2, Zip, s};

use super::config::{DeqConfig, Parametrization};
use super::kernel::{
    self, BlockRun, Budget, map_blocks, merge, neumann_block, row_blocks, split_rows, tangent_neumann_block,
};
use super::{anderson, check, solve_failed};

/// Which linear system of `I - J_z` a solve is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// `(I - J_z)^T y = g`: the backward pass.
    Adjoint,
    /// `(I - J_z) v = r`: forward mode.
    Tangent,
}

impl Direction {
    /// The stage named in a solver failure.
    fn stage(self) -> &'static str {
        match self {
            Direction::Adjoint => "adjoint",
            Direction::Tangent => "tangent",
        }
    }
}

/// Everything the node's products need, captured when the forward solve is recorded.
pub(super) struct ImplicitNode<S: Scalar> {
    pub name: String,
    pub config: DeqConfig,
    /// The last forward iterate `z*`.
    pub z: Array2<S>,
    /// `p* = z* W^T + c`.
    pub pre: Array2<S>,
    pub forward: FixedPointReport,
    pub forward_residual: f64,
    pub reports: ReportLog,
    /// The layer's warm start of the check's norm estimate.
    pub norm_warm_start: Rc<check::NormWarmStart>,
}

/// The selected derivative at the solution, with what the check examines and the ledger
/// records of it.
struct Selection<S> {
    /// `sigma'(p*)` per element under the call's policy.
    d: Array2<S>,
    /// The kink elements per sample, as the check walks them.
    kinks: check::SampleKinks,
    /// The absolute forward residual per sample.
    residuals: Vec<f64>,
    ledger: KinkLedger,
}

/// A linear solve on one row block: `(solution, d, right-hand side) -> run`.
type BlockSolve<'a, S> = dyn Fn(ArrayViewMut2<'_, S>, ArrayView2<'_, S>, ArrayView2<'_, S>) -> BlockRun + Sync + 'a;

impl<S: Scalar> ImplicitNode<S> {
    /// The VJP: `y = (I - J_z)^{-T} g`, then `delta = y o d` gives
    /// `W_bar = delta^T z*`, `U_bar = delta^T x`, `b_bar = sum(delta)`, `x_bar = delta U`.
    pub fn vjp(
        &self,
        ctx: &VjpContext<'_>,
        inputs: &[ArrayViewD<'_, S>],
        grad: ArrayViewD<'_, S>,
    ) -> Result<Vec<Option<ArrayD<S>>>> {
        let (x, w, u) = (as_matrix(&inputs[0]), as_matrix(&inputs[1]), as_matrix(&inputs[2]));
        let g = grad.into_dimensionality::<Ix2>().expect("the output is 2-D");
        self.ensure_finite("the incoming gradient", g.iter())?;
        let selected = self.select(ctx, w);
        let (Selection { d, ledger, .. }, check, (adj, adjoint)) =
            self.checked_solve(w, selected, Pass::Backward, |sel| {
                self.linear_solve(Direction::Adjoint, w, sel.d.view(), g)
            })?;
        let mut delta = adj;
        delta *= &d;
        // Only the products of the inputs that need a gradient (the data `x` usually does
        // not).
        let product = |needed: bool, a: ArrayView2<'_, S>, b: ArrayView2<'_, S>| {
            needed.then(|| {
                let mut out = Array2::<S>::zeros((a.nrows(), b.ncols()));
                gemm(S::one(), a, b, false, out.view_mut());
                out.into_dyn()
            })
        };
        let x_bar = product(ctx.needs_grad(0), delta.view(), u);
        let w_bar = product(ctx.needs_grad(1), delta.t(), self.z.view());
        let u_bar = product(ctx.needs_grad(2), delta.t(), x);
        let b_bar = ctx.needs_grad(3).then(|| delta.sum_axis(Axis(0)).into_dyn());
        self.push_report(Pass::Backward, Some(adjoint), check, ledger);
        Ok(vec![x_bar, w_bar, u_bar, b_bar])
    }

    /// The JVP: with `t = dx U^T + x dU^T + z* dW^T + db` (the tangent of the pre-activation
    /// at fixed `z`), the output tangent solves `(I - J_z) v = t o d` row by row. The same
    /// selection, check, refusal and solver as [`vjp`](Self::vjp); the report goes to the log
    /// as [`Pass::ForwardMode`].
    pub fn jvp(
        &self,
        ctx: &JvpContext<'_>,
        inputs: &[ArrayViewD<'_, S>],
        tangents: &[Option<ArrayViewD<'_, S>>],
    ) -> Result<ArrayD<S>> {
        let (x, w, u) = (as_matrix(&inputs[0]), as_matrix(&inputs[1]), as_matrix(&inputs[2]));
        for (name, t) in ["x", "W", "U", "b"].iter().zip(tangents) {
            if let Some(t) = t {
                self.ensure_finite(&format!("the tangent of {name}"), t.iter())?;
            }
        }
        let selected = self.select(ctx, w);
        let mut t = Array2::<S>::zeros(self.z.raw_dim());
        if let Some(dx) = &tangents[0] {
            gemm(S::one(), as_matrix(dx), u.t(), true, t.view_mut());
        }
        if let Some(dw) = &tangents[1] {
            gemm(S::one(), self.z.view(), as_matrix(dw).t(), true, t.view_mut());
        }
        if let Some(du) = &tangents[2] {
            gemm(S::one(), x, as_matrix(du).t(), true, t.view_mut());
        }
        if let Some(db) = &tangents[3] {
            t += db;
        }
        t *= &selected.d;
        let (Selection { ledger, .. }, check, (v, solve)) =
            self.checked_solve(w, selected, Pass::ForwardMode, |sel| {
                self.linear_solve(Direction::Tangent, w, sel.d.view(), t.view())
            })?;
        self.push_report(Pass::ForwardMode, Some(solve), check, ledger);
        Ok(v.into_dyn())
    }

    /// Refuses a non-finite entry of what a product receives.
    fn ensure_finite<'a>(&self, what: &str, mut values: impl Iterator<Item = &'a S>) -> Result<()>
    where
        S: 'a,
    {
        match values.find(|v| !v.is_finite()) {
            None => Ok(()),
            Some(v) => Err(Error::invalid(
                "deq",
                format!("{}: {what} has a non-finite entry {v}", self.name),
            )),
        }
    }

    /// Selects `sigma'(p*)` under the call's policy (inside the solver's error band) and
    /// records the kinks in the call's ledger.
    fn select(&self, ctx: &VjpContext<'_>, w: ArrayView2<'_, S>) -> Selection<S> {
        let policy = ctx.policy;
        let residuals = self.sample_residuals();
        let bands = self.solver_bands(w, &residuals);
        let derivative = self.config.activation.derivative(self.pre.view(), policy, &bands);
        let record = derivative.record.map(|r| r.in_layer(&self.name, ctx.node));
        ctx.report_kinks(record.iter().cloned());
        let kinks = check::SampleKinks {
            units: derivative.units,
            hull: record.as_ref().and_then(|r| r.hull).unwrap_or((1.0, 1.0)),
            within_solver_error: record.as_ref().map_or(0, |r| r.within_solver_error),
        };
        Selection {
            d: derivative.d,
            kinks,
            residuals,
            ledger: KinkLedger::from_records(policy.label(), record.into_iter().collect()),
        }
    }

    /// Runs the hypothesis check of `selected` beside `solve` (the adjoint or tangent solve,
    /// which does not depend on it) and returns the selection, the check and the solution.
    /// The check is a task of the thread pool that the solve's row blocks share, so a thread
    /// that is done with its block takes it up: the check costs wall time only where the
    /// blocks leave no thread idle. Without the check (off for this layer) the solve runs
    /// alone.
    ///
    /// The errors come in the order of a check run first: the check's own, then a violated
    /// check that the options refuse (its report, of `pass`, goes to the log), then the
    /// solve's.
    fn checked_solve<T>(
        &self,
        w: ArrayView2<'_, S>,
        selected: Selection<S>,
        pass: Pass,
        solve: impl FnOnce(&Selection<S>) -> Result<T>,
    ) -> Result<(Selection<S>, HypothesisCheck, T)> {
        let (check, solved) = if self.config.check {
            // The warm start moves into the task (a `RefCell` is not shared across threads)
            // and back once both are done.
            let warm = check::NormWarmStart::new(self.norm_warm_start.take());
            let (parametrization, lipschitz) = (self.config.parametrization, self.config.activation.lipschitz());
            let options = &self.config.check_options;
            let (d, kinks, residuals) = (selected.d.view(), &selected.kinks, selected.residuals.as_slice());
            let mut checked = None;
            let slot = &mut checked;
            let solved = rayon::in_place_scope(|scope| {
                scope.spawn(move |_| {
                    let check = check::run(parametrization, lipschitz, w, d, kinks, residuals, options, &warm);
                    *slot = Some((check, warm));
                });
                solve(&selected)
            });
            let (check, warm) = checked.expect("the scope waits for the check");
            self.norm_warm_start.replace(warm.into_inner());
            (check?, solved)
        } else {
            let solved = solve(&selected);
            (HypothesisCheck::not_checked("the check is off for this layer"), solved)
        };
        if check.outcome == CheckOutcome::Violated && self.config.check_options.refuse_violated {
            let detail = check.to_string();
            self.push_report(pass, None, check, selected.ledger);
            return Err(Error::HypothesisViolated {
                node: self.name.clone(),
                detail,
            });
        }
        Ok((selected, check, solved?))
    }

    fn push_report(&self, pass: Pass, solve: Option<SolveReport>, check: HypothesisCheck, kinks: KinkLedger) {
        let approximate = solve.is_some() && matches!(self.config.gradient, GradientMode::TruncatedNeumann { .. });
        self.reports.push_pass(
            pass,
            BackwardReport {
                node: self.name.clone(),
                mode: self.config.gradient,
                forward: self.forward.clone(),
                forward_residual: self.forward_residual,
                adjoint: solve,
                fallback: None,
                approximate,
                check,
                kinks,
            },
        );
    }

    /// `||sigma(p_b) - z_b||` for every sample `b`: the absolute forward residual.
    fn sample_residuals(&self) -> Vec<f64> {
        let act = self.config.activation;
        self.pre
            .outer_iter()
            .zip(self.z.outer_iter())
            .map(|(p, z)| {
                p.iter()
                    .zip(z.iter())
                    .map(|(&p, &z)| (act.value(p) - z).to_f64_exact().powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .collect()
    }

    /// The band around the kink, per sample, inside which a pre-activation is within the
    /// forward solver's error: `factor * ||z_b - z_b*|| * max_i ||W_i||`, with
    /// `||z_b - z_b*|| <= r_b / (1 - gamma)` under a spectral bound `gamma < 1` and `r_b`
    /// otherwise (see [`clarke_implicit::KinkBand`]).
    fn solver_bands(&self, w: ArrayView2<'_, S>, residuals: &[f64]) -> Vec<f64> {
        let sigma = match self.config.parametrization {
            Parametrization::SpectralNorm { gamma } if gamma < 1.0 => 1.0 - gamma,
            _ => 1.0,
        };
        let row_norm = w
            .outer_iter()
            .map(|r| r.iter().map(|v| v.to_f64_exact().powi(2)).sum::<f64>().sqrt())
            .fold(0.0, f64::max);
        residuals
            .iter()
            .map(|&r| self.config.kink_band.width(r, sigma) * row_norm)
            .collect()
    }

    /// Solves the adjoint or tangent system of `I - J_z` row by row with the layer's
    /// gradient mode (dense LU per sample, Neumann, truncated Neumann, GMRES, BiCGSTAB).
    fn linear_solve(
        &self,
        direction: Direction,
        w: ArrayView2<'_, S>,
        d: ArrayView2<'_, S>,
        rhs: ArrayView2<'_, S>,
    ) -> Result<(Array2<S>, SolveReport)> {
        let (batch, n) = rhs.dim();
        let blocks = row_blocks(batch, n);
        let tol = self.config.adjoint_tol;
        let max_iter = self.config.adjoint_max_iter;
        let mut sol = rhs.to_owned();
        // Runs `solve(solution, d, rhs)` on every row block in parallel.
        let by_blocks = |sol: &mut Array2<S>, solve: &BlockSolve<'_, S>| {
            merge(map_blocks(
                split_rows(sol.view_mut(), &blocks),
                &blocks,
                |sb, (r0, r1)| solve(sb, d.slice(s![r0..r1, ..]), rhs.slice(s![r0..r1, ..])),
            ))
        };
        let neumann = |sol: &mut Array2<S>, budget: Budget| {
            by_blocks(sol, &|sb, db, rb| match direction {
                Direction::Adjoint => neumann_block(w, db, rb, sb, budget),
                Direction::Tangent => tangent_neumann_block(w, db, rb, sb, budget),
            })
        };
        let (mut run, solver, fixed): (BlockRun, &'static str, bool) = match self.config.gradient {
            GradientMode::TruncatedNeumann { terms } => {
                let budget = Budget {
                    tol: 0.0,
                    max_iter: terms - 1,
                    fixed: true,
                };
                (neumann(&mut sol, budget), "truncated_neumann", true)
            }
            GradientMode::Implicit(AdjointSolver::Neumann) => {
                let budget = Budget {
                    tol,
                    max_iter,
                    fixed: false,
                };
                (neumann(&mut sol, budget), "neumann", false)
            }
            GradientMode::Implicit(AdjointSolver::Anderson { memory }) => {
                let budget = Budget {
                    tol,
                    max_iter,
                    fixed: false,
                };
                let run = by_blocks(&mut sol, &|sb, db, rb| {
                    anderson_linear_block(direction, w, db, rb, sb, memory, budget)
                });
                (run, "anderson", false)
            }
            GradientMode::Implicit(AdjointSolver::Dense) => {
                let mut a = Array3::<S>::zeros((batch, n, n));
                Zip::from(a.outer_iter_mut())
                    .and(d.outer_iter())
                    .par_for_each(|ai, di| kernel::identity_minus_scaled(di, w, ai));
                sol = clarke_solve::batched_solve(a.view(), rhs, direction == Direction::Adjoint).map_err(|e| {
                    Error::InImplicit {
                        node: self.name.clone(),
                        context: match direction {
                            Direction::Adjoint => "the dense per-sample adjoint solve failed",
                            Direction::Tangent => "the dense per-sample tangent solve failed",
                        },
                        source: Box::new(e),
                    }
                })?;
                // The true residual, computed once after the match, is this run's residual.
                let run = BlockRun {
                    iterations: 1,
                    ..BlockRun::default()
                };
                (run, "dense_lu", false)
            }
            GradientMode::Implicit(method) => {
                let runs = map_blocks(split_rows(sol.view_mut(), &blocks), &blocks, |sb, (r0, r1)| {
                    krylov_block(
                        method,
                        direction,
                        w,
                        d.slice(s![r0..r1, ..]),
                        rhs.slice(s![r0..r1, ..]),
                        sb,
                        tol,
                        max_iter,
                    )
                });
                let name = if method == AdjointSolver::Gmres {
                    "gmres"
                } else {
                    "bicgstab"
                };
                (merge(runs.into_iter().collect::<Result<Vec<_>>>()?), name, false)
            }
            GradientMode::Unrolled { .. } | GradientMode::OneStep | GradientMode::LeastSquaresNoHypothesis => {
                unreachable!("these modes record no implicit node")
            }
        };
        let residual = system_residual(direction, w, d, rhs, sol.view());
        if matches!(self.config.gradient, GradientMode::Implicit(AdjointSolver::Dense)) {
            run.residual = residual;
            run.trace = vec![residual];
        }
        let status = if run.non_finite || !residual.is_finite() {
            SolveStatus::NonFinite
        } else if fixed || residual <= tol {
            SolveStatus::Converged
        } else {
            SolveStatus::MaxIterations
        };
        if status != SolveStatus::Converged {
            return Err(solve_failed(
                &self.name,
                direction.stage(),
                solver,
                status,
                run.iterations,
                residual,
                tol,
                &run.trace,
            ));
        }
        let report = SolveReport {
            solver,
            iterations: run.iterations,
            matvecs: run.iterations,
            residual,
            tolerance: tol,
            status,
            residual_history: run.trace,
        };
        Ok((sol, report))
    }
}

/// A 2-D view of an input the layer recorded as a matrix.
fn as_matrix<'a, S: Scalar>(a: &ArrayViewD<'a, S>) -> ArrayView2<'a, S> {
    a.clone()
        .into_dimensionality::<Ix2>()
        .expect("the layer records 2-D inputs")
}

/// Writes `J_z v` (tangent: `(v W^T) o d`) or `J_z^T v` (adjoint: `(v o d) W`) of a row
/// block into `y`; `scratch` (the block's shape) holds `v o d` for the adjoint.
fn apply_jacobian<S: Scalar>(
    direction: Direction,
    w: ArrayView2<'_, S>,
    d: ArrayView2<'_, S>,
    v: ArrayView2<'_, S>,
    mut y: ArrayViewMut2<'_, S>,
    mut scratch: ArrayViewMut2<'_, S>,
) {
    match direction {
        Direction::Adjoint => {
            Zip::from(&mut scratch).and(v).and(d).for_each(|t, &a, &b| *t = a * b);
            kernel::gemm_seq(scratch.view(), w, false, y);
        }
        Direction::Tangent => {
            kernel::gemm_seq(v, w.t(), false, y.view_mut());
            y *= &d;
        }
    }
}

/// Writes `(I - J_z) v` (tangent) or `(I - J_z)^T v` (adjoint) of a row block into `y`.
fn apply_system<S: Scalar>(
    direction: Direction,
    w: ArrayView2<'_, S>,
    d: ArrayView2<'_, S>,
    v: ArrayView2<'_, S>,
    mut y: ArrayViewMut2<'_, S>,
) {
    let mut scratch = Array2::zeros(v.raw_dim());
    apply_jacobian(direction, w, d, v, y.view_mut(), scratch.view_mut());
    Zip::from(&mut y).and(v).for_each(|y, &v| *y = v - *y);
}

/// Relative residual `||r - A v|| / ||r||` of a solution of the adjoint or tangent system.
fn system_residual<S: Scalar>(
    direction: Direction,
    w: ArrayView2<'_, S>,
    d: ArrayView2<'_, S>,
    r: ArrayView2<'_, S>,
    sol: ArrayView2<'_, S>,
) -> f64 {
    let mut av = Array2::<S>::zeros(r.raw_dim());
    apply_system(direction, w, d, sol, av.view_mut());
    let num = Zip::from(&av)
        .and(r)
        .fold(0.0f64, |acc, &a, &b| acc + (b - a).to_f64_exact().powi(2))
        .sqrt();
    let den = r.iter().map(|v| v.to_f64_exact().powi(2)).sum::<f64>().sqrt();
    if den > 0.0 { num / den } else { num }
}

/// The adjoint (or tangent) system of one row block by Anderson mixing of its Neumann
/// iteration, each sample with its own coefficients: `T(w) = g + (w o d) W` (adjoint) or
/// `T(v) = r + (v W^T) o d` (tangent), each row's change relative to its right-hand side.
fn anderson_linear_block<S: Scalar>(
    direction: Direction,
    w: ArrayView2<'_, S>,
    d: ArrayView2<'_, S>,
    rhs: ArrayView2<'_, S>,
    sol: ArrayViewMut2<'_, S>,
    memory: usize,
    budget: Budget,
) -> BlockRun {
    let rhs_norms = kernel::row_norms(rhs);
    let mut scratch = Array2::<S>::zeros(rhs.raw_dim());
    let map = |v: ArrayView2<'_, S>, [db, rb]: [ArrayView2<'_, S>; 2], mut out: ArrayViewMut2<'_, S>| {
        let m = v.nrows();
        apply_jacobian(direction, w, db, v, out.view_mut(), scratch.slice_mut(s![..m, ..]));
        out += &rb;
    };
    let consts = [d, rhs].map(|a| a.as_standard_layout().into_owned());
    anderson::anderson_rows(sol, consts, memory, budget, map, |i, _| rhs_norms[i])
}

/// GMRES or BiCGSTAB on one row block (flattened), through `clarke-solve`.
#[allow(clippy::too_many_arguments)]
fn krylov_block<S: Scalar>(
    method: AdjointSolver,
    direction: Direction,
    w: ArrayView2<'_, S>,
    d: ArrayView2<'_, S>,
    rhs: ArrayView2<'_, S>,
    mut sol: ArrayViewMut2<'_, S>,
    tol: f64,
    max_iter: usize,
) -> Result<BlockRun> {
    let (rows, n) = rhs.dim();
    let op = FnOperator::new(
        rows * n,
        rows * n,
        |v: ndarray::ArrayView1<'_, S>, y: ndarray::ArrayViewMut1<'_, S>| {
            let v2 = v
                .into_shape_with_order((rows, n))
                .map_err(|e| Error::invalid("deq", e.to_string()))?;
            let y2 = y
                .into_shape_with_order((rows, n))
                .map_err(|e| Error::invalid("deq", e.to_string()))?;
            apply_system(direction, w, d, v2, y2);
            Ok(())
        },
    );
    let b: Array1<S> = rhs.iter().copied().collect();
    let opts = SolveOptions {
        tol,
        max_iter,
        ..SolveOptions::for_precision::<S>()
    };
    let (x, report) = match method {
        AdjointSolver::Gmres => clarke_solve::gmres(&op, b.view(), None, &opts)?,
        _ => clarke_solve::bicgstab(&op, b.view(), None, &opts)?,
    };
    sol.assign(&x.into_shape_with_order((rows, n)).expect("same length"));
    Ok(BlockRun {
        iterations: report.iterations,
        residual: report.residual,
        non_finite: report.status == SolveStatus::NonFinite,
        trace: report.residual_history,
    })
}
