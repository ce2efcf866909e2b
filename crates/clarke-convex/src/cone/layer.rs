//! The cone program as a node of the clarke tape: a differentiable optimisation layer.
//!
//! [`cone_program`] (and [`quadratic_cone_program`]) take the data as [`Var`]s, solve the
//! program (one per sample of a batch, in parallel), and return `x`, `y`, `s` as `Var`s.
//! Backward runs the checked derivative of [`super::derivative`] per sample under the
//! backward call's kink policy and reports what it did in a [`ConicLog`]. Forward mode
//! ([`clarke_core::Tape::jvp`]) runs the same checked derivative's forward map, with the
//! same check, refusal, kink records and report.
//!
//! The policy's `relu'(0)` is the selection `q` at the kinks of `Pi_{K*}(v)`, `v = y - s`
//! (see [`super::cones`]): on a non-negative row it is literally the derivative of
//! `max(v_i, 0)`, so `q = 1` treats a weakly active constraint (`y_i = s_i = 0`) as active:
//! its multiplier moves and the constraint stays tight. For sparsemax written as a QP this
//! keeps a coordinate sitting on its kink at zero, the opposite side from
//! [`crate::project::project_simplex`], whose `relu'(0)` applies to `x = max(u - tau, 0)`
//! itself. Both are elements of the conservative Jacobian.
//!
//! Shapes: `A` is `[m, n]` or `[B, m, n]`, `b` is `[m]` or `[B, m]`, `c` is `[n]` or
//! `[B, n]`, `P` is `[n, n]` or `[B, n, n]`. When any input has a batch axis the outputs have
//! one (`[B, n]`, `[B, m]`, `[B, m]`) and the inputs without it are shared by every sample
//! (their gradients are summed over the batch).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use clarke_core::{Error, KinkScan, Result, Scalar, Selection, Var, VjpContext};
use clarke_implicit::CheckOutcome;
use ndarray::{Array2, ArrayD, ArrayViewD, Axis, s};
use rayon::prelude::*;

use super::check::{ConeMargin, ConicCheck};
use super::cones::{BoundaryKind, Cones};
use super::derivative::{ConeDerivative, DataDirection, DerivativeOptions, SolutionDirection};
use super::problem::ConeProgram;
use super::solver::{ConeSolution, SolverOptions, solve};

/// Options of the conic layer.
#[derive(Debug, Clone, PartialEq)]
pub struct ConicLayerOptions {
    /// Name in errors and reports. Default `"cone_program"`.
    pub name: String,
    /// The solver.
    pub solver: SolverOptions,
    /// The derivative and its check.
    pub derivative: DerivativeOptions,
}

impl Default for ConicLayerOptions {
    fn default() -> Self {
        ConicLayerOptions {
            name: "cone_program".into(),
            solver: SolverOptions::default(),
            derivative: DerivativeOptions::default(),
        }
    }
}

impl ConicLayerOptions {
    /// Sets the derivative options.
    pub fn with_derivative(mut self, derivative: DerivativeOptions) -> Self {
        self.derivative = derivative;
        self
    }

    /// Sets the solver options.
    pub fn with_solver(mut self, solver: SolverOptions) -> Self {
        self.solver = solver;
        self
    }
}

/// What one backward pass (or one forward-mode product) through a conic layer did.
#[derive(Debug, Clone, PartialEq)]
pub struct ConicBackwardReport {
    /// The layer.
    pub node: String,
    /// Samples differentiated.
    pub samples: usize,
    /// How many samples' checks were certified, gave a warning, were violated, or did not
    /// run (a violated sample refuses the backward pass or the forward-mode product unless
    /// the check is told not to).
    pub certified: usize,
    /// See `certified`.
    pub warnings: usize,
    /// See `certified`.
    pub violated: usize,
    /// See `certified`.
    pub not_checked: usize,
    /// Kinks within tolerance over all samples (weak complementarity).
    pub kinks: usize,
    /// Smallest `sigma_min(M)` over the samples (dense check).
    pub min_sigma: Option<f64>,
    /// Every sample's check (margins per cone, boundaries, singular values, verdict),
    /// indexed by sample; `None` for a sample whose derivative failed before its check.
    pub checks: Vec<Option<ConicCheck>>,
}

impl ConicBackwardReport {
    /// The check of the first sample that was not certified, with its index.
    pub fn first_uncertified(&self) -> Option<(usize, &ConicCheck)> {
        self.sample_checks()
            .find(|(_, c)| c.outcome() != CheckOutcome::Certified)
    }

    /// The smallest strict-complementarity margin over every cone of every sample, with its
    /// sample: how close the solution came to a kink of the projection (the first sample on
    /// a tie).
    pub fn min_margin(&self) -> Option<(usize, &ConeMargin)> {
        self.sample_checks()
            .flat_map(|(i, c)| c.margins.iter().map(move |m| (i, m)))
            .fold(None, |low: Option<(usize, &ConeMargin)>, (i, m)| match low {
                Some((_, l)) if l.margin <= m.margin => low,
                _ => Some((i, m)),
            })
    }

    /// The samples that have a check, with their index.
    fn sample_checks(&self) -> impl Iterator<Item = (usize, &ConicCheck)> {
        self.checks
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
    }
}

/// Reports of every backward pass and forward-mode product through a layer, shared with the
/// tape node.
#[derive(Debug, Clone, Default)]
pub struct ConicLog(Rc<RefCell<Vec<ConicBackwardReport>>>);

impl ConicLog {
    /// The last report.
    pub fn last(&self) -> Option<ConicBackwardReport> {
        self.0.borrow().last().cloned()
    }

    /// Every report, oldest first.
    pub fn all(&self) -> Vec<ConicBackwardReport> {
        self.0.borrow().clone()
    }
}

/// The outputs of a conic layer.
pub struct ConicLayer<'t, S: Scalar> {
    /// Primal solutions, `[n]` or `[B, n]`.
    pub x: Var<'t, S>,
    /// Dual solutions, `[m]` or `[B, m]`.
    pub y: Var<'t, S>,
    /// Slacks, `[m]` or `[B, m]`.
    pub s: Var<'t, S>,
    /// The solver's result per sample (status, iterations, residuals, refinement).
    pub solutions: Arc<Vec<ConeSolution>>,
    /// Reports of the backward passes and forward-mode products.
    pub log: ConicLog,
}

/// The conic layer `min c^T x` s.t. `A x + s = b`, `s in K` (see the module docs).
pub fn cone_program<'t, S: Scalar>(
    a: Var<'t, S>,
    b: Var<'t, S>,
    c: Var<'t, S>,
    cones: &Cones,
    opts: &ConicLayerOptions,
) -> Result<ConicLayer<'t, S>> {
    layer(None, a, b, c, cones, opts)
}

/// The quadratic term `P` of [`quadratic_cone_program`]: a tape [`Var`] (it then gets a
/// symmetric gradient) or a constant array (no tape node, no gradient).
#[derive(Debug, Clone)]
pub enum QuadraticTerm<'t, S: Scalar> {
    /// `P` on the tape, differentiated.
    Var(Var<'t, S>),
    /// A constant `P`, `[n, n]` or `[B, n, n]`.
    Fixed(ArrayD<S>),
}

impl<'t, S: Scalar> From<Var<'t, S>> for QuadraticTerm<'t, S> {
    fn from(p: Var<'t, S>) -> Self {
        QuadraticTerm::Var(p)
    }
}

impl<S: Scalar> From<ArrayD<S>> for QuadraticTerm<'_, S> {
    fn from(p: ArrayD<S>) -> Self {
        QuadraticTerm::Fixed(p)
    }
}

impl<S: Scalar> From<Array2<S>> for QuadraticTerm<'_, S> {
    fn from(p: Array2<S>) -> Self {
        QuadraticTerm::Fixed(p.into_dyn())
    }
}

/// The conic layer with a quadratic term: `min (1/2) x^T P x + c^T x` s.t. `A x + s = b`,
/// `s in K`. `P` is a [`Var`] (it gets a symmetric gradient) or a constant array (see
/// [`QuadraticTerm`]).
pub fn quadratic_cone_program<'t, S: Scalar>(
    p: impl Into<QuadraticTerm<'t, S>>,
    a: Var<'t, S>,
    b: Var<'t, S>,
    c: Var<'t, S>,
    cones: &Cones,
    opts: &ConicLayerOptions,
) -> Result<ConicLayer<'t, S>> {
    layer(Some(p.into()), a, b, c, cones, opts)
}

/// Which inputs carry a batch axis, and its length.
#[derive(Debug, Clone, Copy)]
struct Batch {
    size: Option<usize>,
    p: bool,
    a: bool,
    b: bool,
    c: bool,
}

pub(crate) fn to_f64<S: Scalar>(v: &ArrayViewD<'_, S>) -> ArrayD<f64> {
    v.mapv(|x| x.to_f64_exact())
}

fn batch_layout(name: &str, shapes: [Option<&[usize]>; 4]) -> Result<(Batch, usize, usize)> {
    let [p, a, b, c] = shapes;
    let a = a.expect("A is always given");
    let (m, n, a_batched) = match a {
        [m, n] => (*m, *n, false),
        [_, m, n] => (*m, *n, true),
        _ => return Err(shape_error(name, "A", a, "[m, n] or [B, m, n]")),
    };
    let mut size = if a_batched { Some(a[0]) } else { None };
    let mut agree = |which: &str, shape: &[usize], base: &[usize]| -> Result<bool> {
        if shape == base {
            return Ok(false);
        }
        if shape.len() == base.len() + 1 && &shape[1..] == base {
            match size {
                Some(bs) if bs != shape[0] => {
                    return Err(Error::invalid(
                        "cone_program",
                        format!("{name}: {which} has batch size {} but another input has {bs}", shape[0]),
                    ));
                }
                _ => size = Some(shape[0]),
            }
            return Ok(true);
        }
        let expect = format!(
            "{base:?} or [B, {}]",
            base.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
        );
        Err(shape_error(name, which, shape, &expect))
    };
    let b_batched = agree("b", b.expect("b is always given"), &[m])?;
    let c_batched = agree("c", c.expect("c is always given"), &[n])?;
    let p_batched = match p {
        Some(p) => agree("P", p, &[n, n])?,
        None => false,
    };
    if size == Some(0) {
        return Err(Error::invalid("cone_program", format!("{name}: the batch is empty")));
    }
    Ok((
        Batch {
            size,
            p: p_batched,
            a: a_batched,
            b: b_batched,
            c: c_batched,
        },
        m,
        n,
    ))
}

fn shape_error(name: &str, which: &str, shape: &[usize], expect: &str) -> Error {
    Error::CustomOp {
        op: name.to_string(),
        detail: format!("{which} has shape {shape:?}, expected {expect}"),
    }
}

/// Sample `i` of an input that may carry a batch axis.
fn sample(arr: &ArrayD<f64>, batched: bool, i: usize) -> ArrayD<f64> {
    if batched {
        arr.index_axis(Axis(0), i).to_owned()
    } else {
        arr.clone()
    }
}

fn layer<'t, S: Scalar>(
    p: Option<QuadraticTerm<'t, S>>,
    a: Var<'t, S>,
    b: Var<'t, S>,
    c: Var<'t, S>,
    cones: &Cones,
    opts: &ConicLayerOptions,
) -> Result<ConicLayer<'t, S>> {
    let name = opts.name.clone();
    let (p, pv) = match p {
        Some(QuadraticTerm::Var(p)) => (Some(p), Some(p.value())),
        Some(QuadraticTerm::Fixed(value)) => (None, Some(value)),
        None => (None, None),
    };
    let (av, bv, cv) = (a.value(), b.value(), c.value());
    let (batch, m, n) = batch_layout(
        &name,
        [
            pv.as_ref().map(|p| p.shape()),
            Some(av.shape()),
            Some(bv.shape()),
            Some(cv.shape()),
        ],
    )?;
    if cones.dim() != m {
        return Err(Error::CustomOp {
            op: name,
            detail: format!("the cones {:?} take {} rows but A has {m}", cones.list(), cones.dim()),
        });
    }
    let (pf, af, bf, cf) = (
        pv.as_ref().map(|p| to_f64(&p.view())),
        to_f64(&av.view()),
        to_f64(&bv.view()),
        to_f64(&cv.view()),
    );
    let samples = batch.size.unwrap_or(1);
    let mut programs: Vec<ConeProgram> = Vec::with_capacity(samples);
    for i in 0..samples {
        let fix2 = |arr: ArrayD<f64>| arr.into_dimensionality::<ndarray::Ix2>().expect("checked shape");
        let fix1 = |arr: ArrayD<f64>| arr.into_dimensionality::<ndarray::Ix1>().expect("checked shape");
        let mut prog = ConeProgram::new(
            fix2(sample(&af, batch.a, i)),
            fix1(sample(&bf, batch.b, i)),
            fix1(sample(&cf, batch.c, i)),
            cones.clone(),
        )
        .map_err(|e| in_sample(&name, i, samples, e))?;
        if let Some(pf) = &pf {
            match (batch.p, programs.first()) {
                // A shared P was validated (symmetric, PSD) with the first sample.
                (false, Some(first)) => prog.p = first.p.clone(),
                _ => {
                    prog = prog
                        .with_quadratic(fix2(sample(pf, batch.p, i)))
                        .map_err(|e| in_sample(&name, i, samples, e))?
                }
            }
        }
        programs.push(prog);
    }
    let solver = opts.solver.clone();
    let solutions: Vec<ConeSolution> = if samples == 1 {
        vec![solve(&programs[0], &solver, None)?]
    } else {
        programs
            .par_iter()
            .map(|prog| solve(prog, &solver, None))
            .collect::<Result<Vec<_>>>()?
    };
    for (i, sol) in solutions.iter().enumerate() {
        if sol.status != super::solver::ConeStatus::Solved {
            return Err(Error::CustomOp {
                op: name,
                detail: format!(
                    "sample {i}: the cone program is {} after {} iterations (primal residual {:.2e}, dual residual {:.2e}); nothing to differentiate",
                    sol.status, sol.iterations, sol.admm_residuals.primal, sol.admm_residuals.dual
                ),
            });
        }
    }
    let width = n + 2 * m;
    let mut out = Array2::<f64>::zeros((samples, width));
    for (i, sol) in solutions.iter().enumerate() {
        let mut row = out.row_mut(i);
        row.slice_mut(s![..n]).assign(&sol.x);
        row.slice_mut(s![n..n + m]).assign(&sol.y);
        row.slice_mut(s![n + m..]).assign(&sol.s);
    }
    let value: ArrayD<S> = if batch.size.is_some() {
        out.mapv(S::from_f64_lossy).into_dyn()
    } else {
        out.row(0).mapv(S::from_f64_lossy).into_dyn()
    };

    let solutions = Arc::new(solutions);
    let log = ConicLog::default();
    let shared = Rc::new(Differentiation {
        name: name.clone(),
        programs,
        solutions: solutions.clone(),
        derivative: opts.derivative.clone(),
        log: log.clone(),
        samples,
        rows: m,
        row_map: None,
    });
    let has_p = p.is_some();
    let mut inputs = Vec::with_capacity(4);
    inputs.extend(p);
    inputs.extend([a, b, c]);
    let tape = a.tape();
    let vjp = shared.clone();
    let jvp_name = name.clone();
    let node = tape.try_custom_fn_ctx(&name, &inputs, value, move |ctx, _inputs, _out, grad| {
        let g = grad.mapv(|v| v.to_f64_exact());
        let g = g
            .into_shape_with_order((samples, width))
            .map_err(|e| reshape_error(&vjp.name, e))?;
        let grads = vjp.run(ctx, |i, d| {
            let row = g.row(i);
            d.adjoint(&SolutionDirection {
                x: row.slice(s![..n]).to_owned(),
                y: row.slice(s![n..n + m]).to_owned(),
                s: row.slice(s![n + m..]).to_owned(),
            })
        })?;
        let mut out = Vec::with_capacity(4);
        if has_p {
            out.push(Some(gather::<S, _, _>(&grads, batch.p, |g| {
                g.p.clone().expect("quadratic program")
            })));
        }
        out.push(Some(gather::<S, _, _>(&grads, batch.a, |g| g.a.clone())));
        out.push(Some(gather::<S, _, _>(&grads, batch.b, |g| g.b.clone())));
        out.push(Some(gather::<S, _, _>(&grads, batch.c, |g| g.c.clone())));
        Ok(out)
    })?;
    // The tangent of `(x, y, s)` per sample by the derivative's forward map, with the
    // backward's check, refusal, kink records and report.
    tape.set_custom_jvp(node, move |ctx, inputs, _out, tangents| {
        // Tangents as f64, zeros for inputs without one: `[P], A, b, c`.
        let dirs: Vec<ArrayD<f64>> = inputs
            .iter()
            .zip(tangents)
            .map(|(x, t)| t.as_ref().map_or_else(|| ArrayD::zeros(x.raw_dim()), to_f64))
            .collect();
        let (dp, rest) = if has_p {
            (Some(&dirs[0]), &dirs[1..])
        } else {
            (None, &dirs[..])
        };
        let view2 = |arr: &ArrayD<f64>, batched: bool, i: usize| -> Result<ndarray::Array2<f64>> {
            sample(arr, batched, i)
                .into_dimensionality::<ndarray::Ix2>()
                .map_err(|e| reshape_error(&jvp_name, e))
        };
        let view1 = |arr: &ArrayD<f64>, batched: bool, i: usize| -> Result<ndarray::Array1<f64>> {
            sample(arr, batched, i)
                .into_dimensionality::<ndarray::Ix1>()
                .map_err(|e| reshape_error(&jvp_name, e))
        };
        let rows = shared.run(ctx, |i, d| {
            // `P` gets a symmetric gradient, the derivative of `P -> z(sym(P))`: its tangent
            // enters through its symmetric part, so that the two modes are transposes.
            let p = dp
                .map(|dp| view2(dp, batch.p, i).map(|dp| (&dp + &dp.t()) * 0.5))
                .transpose()?;
            let (a, b, c) = (
                view2(&rest[0], batch.a, i)?,
                view1(&rest[1], batch.b, i)?,
                view1(&rest[2], batch.c, i)?,
            );
            d.forward(&DataDirection {
                p: p.as_ref().map(|p| p.view()),
                a: a.view(),
                b: b.view(),
                c: c.view(),
            })
        })?;
        let mut out = Array2::<f64>::zeros((samples, width));
        for (mut row, dz) in out.rows_mut().into_iter().zip(&rows) {
            row.slice_mut(s![..n]).assign(&dz.x);
            row.slice_mut(s![n..n + m]).assign(&dz.y);
            row.slice_mut(s![n + m..]).assign(&dz.s);
        }
        let out = out.mapv(S::from_f64_lossy);
        Ok(if batch.size.is_some() {
            out.into_dyn()
        } else {
            out.row(0).to_owned().into_dyn()
        })
    })?;
    let axis = if batch.size.is_some() { 1 } else { 0 };
    let x = node.try_slice_axis(axis, 0..n)?;
    let y = node.try_slice_axis(axis, n..n + m)?;
    let s_var = node.try_slice_axis(axis, n + m..width)?;
    Ok(ConicLayer {
        x,
        y,
        s: s_var,
        solutions,
        log,
    })
}

/// What the conic node's VJP and JVP share: the solved programs, the derivative options,
/// the report log, and the per-sample differentiation with its check, its refusal and its
/// kink records ([`run`](Self::run)), so that both modes select, check and report alike.
/// Layers built on cone programs (the QP layer) share it, so their kinks are selected,
/// checked and reported by the same code.
pub(crate) struct Differentiation {
    /// The layer's name (errors, reports, ledger records).
    pub(crate) name: String,
    /// One program per sample (they may differ in their rows).
    pub(crate) programs: Vec<ConeProgram>,
    /// Their solutions.
    pub(crate) solutions: Arc<Vec<ConeSolution>>,
    /// The derivative and its check.
    pub(crate) derivative: DerivativeOptions,
    /// Where the backward reports go.
    pub(crate) log: ConicLog,
    /// Samples of the batch.
    pub(crate) samples: usize,
    /// Rows per sample of the kink record in the ledger: `[samples, rows]`.
    pub(crate) rows: usize,
    /// Per sample, the row of the kink record of each cone-program row (identity when
    /// `None`): a layer whose programs drop or reorder rows reports its kinks in its own,
    /// fixed row layout.
    pub(crate) row_map: Option<Vec<Vec<usize>>>,
}

impl Differentiation {
    /// Applies `product` (the adjoint or the forward map) to every sample's checked
    /// derivative under the call's `relu'(0)` selection, in parallel over a batch. Reports
    /// the kinks of `Pi_{K*}` of every sample to the ledger of the call and a
    /// [`ConicBackwardReport`] to the log; a violated check refuses the call (unless the check
    /// is told not to), naming the sample.
    pub(crate) fn run<T: Send>(
        &self,
        ctx: &VjpContext<'_>,
        product: impl Fn(usize, &ConeDerivative<'_>) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        let (name, samples, m) = (&self.name, self.samples, self.rows);
        let (programs, solutions) = (&self.programs, &self.solutions);
        let q = ctx.policy.relu;
        // The check never refuses inside: a refused sample keeps its check for the report.
        let mut inspect = self.derivative.clone();
        inspect.check.refuse_violated = false;
        let refuse = self.derivative.check.refuse_violated;
        let per_sample = |i: usize| -> Result<(Option<T>, ConicCheck)> {
            let d = ConeDerivative::new(&programs[i], &solutions[i], q, &inspect)?;
            let check = d.check().clone();
            if refuse && check.outcome() == CheckOutcome::Violated {
                return Ok((None, check));
            }
            Ok((Some(product(i, &d)?), check))
        };
        let results: Vec<Result<(Option<T>, ConicCheck)>> = if samples == 1 {
            vec![per_sample(0)]
        } else {
            (0..samples).into_par_iter().map(per_sample).collect()
        };
        let mut report = ConicBackwardReport {
            node: name.clone(),
            samples,
            certified: 0,
            warnings: 0,
            violated: 0,
            not_checked: 0,
            kinks: 0,
            min_sigma: None,
            checks: vec![None; samples],
        };
        let mut products = Vec::with_capacity(samples);
        let mut first_error = None;
        // The kinks of Pi_{K*} at every sample, for the ledger of the call: an entry (or the
        // first row of a second-order / PSD block) per boundary, at its margin; the
        // detection tolerance is the solver's accuracy, so non-exact ones are within solver
        // error.
        let mut scan = KinkScan::new(ctx.policy.tolerance, 0.0);
        for (i, r) in results.iter().enumerate() {
            let Ok((_, check)) = r else { continue };
            let mut rows: Vec<(usize, f64, f64)> = check
                .boundaries
                .iter()
                .map(|b| {
                    let row = match &b.kind {
                        BoundaryKind::Entry(row) => *row,
                        BoundaryKind::Block(range) => range.start,
                    };
                    let row = self.row_map.as_ref().map_or(row, |map| map[i][row]);
                    (row, if b.exact { 0.0 } else { b.margin }, b.tol)
                })
                .collect();
            rows.sort_by_key(|r| r.0);
            let mut next = 0;
            for (row, margin, tol) in rows {
                scan.skip(row.saturating_sub(next));
                scan.set_solver_band(tol);
                scan.visit(i * m + row, margin);
                next = row + 1;
            }
            scan.skip(m.saturating_sub(next));
        }
        ctx.report_kinks([scan
            .finish(
                ctx.node,
                "cone_projection",
                &[samples, m],
                Selection::Slope(q),
                Some((0.0, 1.0)),
            )
            .in_layer(name, ctx.node)]);
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok((product, check)) => {
                    if product.is_none() && first_error.is_none() {
                        first_error = Some(in_sample(
                            name,
                            i,
                            samples,
                            Error::HypothesisViolated {
                                node: name.clone(),
                                detail: check.to_string(),
                            },
                        ));
                    }
                    match check.outcome() {
                        CheckOutcome::Certified => report.certified += 1,
                        CheckOutcome::Warning => report.warnings += 1,
                        CheckOutcome::Violated => report.violated += 1,
                        CheckOutcome::NotChecked => report.not_checked += 1,
                    }
                    report.kinks += check.boundaries.len();
                    if let Some(sm) = check.check.sigma_min {
                        report.min_sigma = Some(report.min_sigma.map_or(sm, |a: f64| a.min(sm)));
                    }
                    report.checks[i] = Some(check);
                    products.extend(product);
                }
                Err(e) => {
                    if first_error.is_none() {
                        first_error = Some(in_sample(name, i, samples, e));
                    }
                }
            }
        }
        self.log.0.borrow_mut().push(report);
        match first_error {
            Some(e) => Err(e),
            None => Ok(products),
        }
    }
}

/// The gradient of one input from the per-sample gradients: stacked along a new batch axis
/// when the input has one, summed over the samples when they share it.
pub(crate) fn gather<S: Scalar, T, D: ndarray::Dimension>(
    grads: &[T],
    batched: bool,
    pick: impl Fn(&T) -> ndarray::Array<f64, D>,
) -> ArrayD<S> {
    let parts: Vec<ndarray::Array<f64, D>> = grads.iter().map(pick).collect();
    if batched {
        let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
        ndarray::stack(Axis(0), &views)
            .expect("per-sample gradients share one shape")
            .mapv(S::from_f64_lossy)
            .into_dyn()
    } else {
        let mut parts = parts.into_iter();
        let mut acc = parts.next().expect("at least one sample");
        for p in parts {
            acc += &p;
        }
        acc.mapv(S::from_f64_lossy).into_dyn()
    }
}

/// A reshaping of the layer's own arrays that failed (not expected: their shapes are checked
/// when the layer is recorded), as an error naming the layer.
pub(crate) fn reshape_error(name: &str, e: ndarray::ShapeError) -> Error {
    Error::CustomOp {
        op: name.to_string(),
        detail: e.to_string(),
    }
}

/// Tags an error with the sample it came from (for batches).
pub(crate) fn in_sample(name: &str, i: usize, samples: usize, e: Error) -> Error {
    if samples == 1 {
        return e;
    }
    match e {
        Error::HypothesisViolated { node, detail } => Error::HypothesisViolated {
            node: format!("{node} (sample {i} of {samples})"),
            detail,
        },
        other => Error::CustomOp {
            op: name.to_string(),
            detail: format!("sample {i} of {samples}: {other}"),
        },
    }
}
