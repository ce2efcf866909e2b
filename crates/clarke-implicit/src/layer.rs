//! Implicit layers on the tape: the public entry points.

use std::cell::RefCell;
use std::rc::Rc;

use clarke_core::{Error, JvpContext, KinkLedger, Result, Scalar, Tape, Var, VjpContext};
use clarke_solve::{FixedPointReport, SolveStatus};
use ndarray::{Array1, Array2, ArrayD, ArrayViewD, IxDyn};

use crate::adjoint::{System, solve_adjoint};
use crate::check::{Form, Spectrum, block, run_check};
use crate::forward::{default_solver, solve_forward};
use crate::inner::{InnerMap, Linearization, MapFn, flat, into_flat};
use crate::options::{AdjointSolver, ForwardSolver, GradientMode, ImplicitOptions, KinkBand};
use crate::report::{BackwardReport, CheckOutcome, HypothesisCheck, Pass, ReportLog};

/// A reusable implicit layer: a map, its options, the adjoint warm start shared by every
/// call, and the reports of every backward pass.
///
/// Build one per layer of a model and call [`ImplicitLayer::apply`] on each forward pass;
/// the adjoint of one training step starts from the previous step's.
pub struct ImplicitLayer<S: Scalar> {
    inner: Rc<InnerMap<S>>,
    form: Form,
    options: Rc<ImplicitOptions>,
    warm_adjoint: Rc<RefCell<Option<Array1<S>>>>,
    reports: ReportLog,
}

impl<S: Scalar> ImplicitLayer<S> {
    /// A fixed-point layer `z* = map(z*, theta)`.
    ///
    /// The map records onto whatever tape its arguments live on: it is called on short-lived
    /// tapes during the forward solve and the backward pass, and (unrolled and one-step
    /// modes) on the outer tape. It must return an array of `z`'s shape.
    ///
    /// Refused: a mode that needs at least one term or iteration given none, check options
    /// that fail [`CheckOptions::validate`](crate::CheckOptions::validate), a kink band factor
    /// that is negative or not finite.
    pub fn fixed_point<F>(map: F, options: ImplicitOptions) -> Result<Self>
    where
        F: for<'s> Fn(Var<'s, S>, &[Var<'s, S>]) -> Result<Var<'s, S>> + 'static,
    {
        Self::new(Form::FixedPoint, Rc::new(map), options)
    }

    /// A root layer `F(z*, theta) = 0`. Gradient modes: implicit (dense, GMRES, BiCGSTAB)
    /// and least squares; the others need a fixed-point map (refused here, with the options
    /// refused by [`ImplicitLayer::fixed_point`]).
    pub fn root<F>(map: F, options: ImplicitOptions) -> Result<Self>
    where
        F: for<'s> Fn(Var<'s, S>, &[Var<'s, S>]) -> Result<Var<'s, S>> + 'static,
    {
        Self::new(Form::Root, Rc::new(map), options)
    }

    fn new(form: Form, map: Rc<MapFn<S>>, options: ImplicitOptions) -> Result<Self> {
        let name = options.name.clone().unwrap_or_else(|| match form {
            Form::FixedPoint => "fixed_point".to_string(),
            Form::Root => "root".to_string(),
        });
        validate(&name, form, &options)?;
        Ok(ImplicitLayer {
            inner: Rc::new(InnerMap {
                name,
                map,
                shape: Vec::new(),
            }),
            form,
            options: Rc::new(options),
            warm_adjoint: Rc::new(RefCell::new(None)),
            reports: ReportLog::default(),
        })
    }

    /// The layer's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The reports of every backward pass through this layer.
    pub fn reports(&self) -> &ReportLog {
        &self.reports
    }

    /// Solves from `z0` with parameters `theta` (at least one, all on one tape) and records
    /// the result on their tape: one node holding `z*` in the implicit, truncated and least
    /// squares modes; the iterations themselves in the unrolled mode; one application of the
    /// map in the one-step mode.
    ///
    /// Refused: no `theta`, a `theta` from another tape, a non-finite `z0`, a map whose output
    /// does not have `z0`'s shape. `z0` may be empty (the solution is empty too). The values of
    /// `theta` are passed to the map as they are, since a map may use an infinity (a bound, for
    /// example); when the map's output is not finite the error names the inner op that made it,
    /// or the first non-finite `theta`.
    pub fn apply<'t>(&self, z0: &ArrayD<S>, theta: &[Var<'t, S>]) -> Result<Solution<'t, S>> {
        let name = &self.inner.name;
        let tape = match theta.first() {
            Some(t) => t.tape(),
            None => {
                return Err(Error::invalid(
                    "implicit layer",
                    format!("{name}: needs at least one parameter Var theta (the layer records onto its tape)"),
                ));
            }
        };
        if let Some(bad) = theta.iter().find(|t| !std::ptr::eq(t.tape(), tape)) {
            return Err(Error::ForeignVar {
                op: "implicit layer",
                node: bad.id(),
            });
        }
        if let Some((i, v)) = z0.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::invalid(
                "implicit layer",
                format!("{name}: z0 has a non-finite value {v} at flat index {i}"),
            ));
        }
        let inner = Rc::new(InnerMap {
            name: name.clone(),
            map: self.inner.map.clone(),
            shape: z0.shape().to_vec(),
        });
        match self.options.mode {
            GradientMode::Unrolled { iterations } => self.unrolled(tape, &inner, z0, theta, iterations),
            GradientMode::OneStep => self.one_step(tape, &inner, z0, theta),
            _ => self.implicit(tape, &inner, z0, theta),
        }
    }

    fn forward_solve<'t>(
        &self,
        inner: &InnerMap<S>,
        z0: &ArrayD<S>,
        theta: &[Var<'t, S>],
    ) -> Result<(ArrayD<S>, FixedPointReport)> {
        let values: Vec<ArrayD<S>> = theta.iter().map(|t| t.value()).collect();
        let views: Vec<ArrayViewD<'_, S>> = values.iter().map(|v| v.view()).collect();
        let z0_flat = flat(z0);
        let (z, report) = solve_forward(inner, self.form, z0_flat.view(), &views, &self.options)?;
        let z = z
            .into_shape_with_order(IxDyn(z0.shape()))
            .map_err(|e| Error::invalid("implicit layer", e.to_string()))?;
        Ok((z, report))
    }

    fn implicit<'t>(
        &self,
        tape: &'t Tape<S>,
        inner: &Rc<InnerMap<S>>,
        z0: &ArrayD<S>,
        theta: &[Var<'t, S>],
    ) -> Result<Solution<'t, S>> {
        let (z_star, forward) = self.forward_solve(inner, z0, theta)?;
        let node = Rc::new(AdjointNode {
            inner: inner.clone(),
            form: self.form,
            options: self.options.clone(),
            forward: forward.clone(),
            warm: self.warm_adjoint.clone(),
            reports: self.reports.clone(),
        });
        let backward = node.clone();
        let z = tape.try_custom_fn_ctx(&inner.name, theta, z_star, move |ctx, inputs, output, grad| {
            backward.backward(ctx, inputs, output, grad)
        })?;
        tape.set_custom_jvp(z, move |ctx, inputs, output, tangents| {
            node.jvp(ctx, inputs, output, tangents)
        })?;
        Ok(Solution { z, forward })
    }

    fn unrolled<'t>(
        &self,
        tape: &'t Tape<S>,
        inner: &Rc<InnerMap<S>>,
        z0: &ArrayD<S>,
        theta: &[Var<'t, S>],
        iterations: usize,
    ) -> Result<Solution<'t, S>> {
        let mut z = tape.constant(z0.clone());
        // The budget may be far larger than the iterations the map allows (it may fail
        // first): the trace grows as the iterations run.
        let mut trace = Vec::new();
        for _ in 0..iterations {
            let next = inner.record(z, theta)?;
            trace.push(next.with_value(|a| z.with_value(|b| distance(a, b))));
            z = next;
        }
        let values: Vec<ArrayD<S>> = theta.iter().map(|t| t.value()).collect();
        let views: Vec<ArrayViewD<'_, S>> = values.iter().map(|v| v.view()).collect();
        let z_last = z.with_value(flat);
        let t_last = inner.eval(z_last.view(), &views)?;
        let residual = distance(&t_last, &z_last);
        trace.push(residual);
        let forward = FixedPointReport {
            solver: "unrolled",
            iterations,
            evaluations: iterations.saturating_add(1),
            inner_iterations: 0,
            residual,
            tolerance: 0.0,
            status: SolveStatus::MaxIterations,
            trace,
        };
        let reason = "the unrolled mode backpropagates through the iterations; no inverse is taken";
        let z = self.logged(tape, inner, z, &forward, residual, reason)?;
        Ok(Solution { z, forward })
    }

    fn one_step<'t>(
        &self,
        tape: &'t Tape<S>,
        inner: &Rc<InnerMap<S>>,
        z0: &ArrayD<S>,
        theta: &[Var<'t, S>],
    ) -> Result<Solution<'t, S>> {
        let (z_star, forward) = self.forward_solve(inner, z0, theta)?;
        let detached = tape.constant(z_star.clone());
        let out = inner.record(detached, theta)?;
        let residual = out.with_value(|a| distance(a, &z_star));
        let reason = "the one-step mode differentiates one application of the map; no inverse is taken";
        let z = self.logged(tape, inner, out, &forward, residual, reason)?;
        Ok(Solution { z, forward })
    }

    /// Passes `z` through an identity node whose backward logs a report.
    fn logged<'t>(
        &self,
        tape: &'t Tape<S>,
        inner: &InnerMap<S>,
        z: Var<'t, S>,
        forward: &FixedPointReport,
        forward_residual: f64,
        reason: &str,
    ) -> Result<Var<'t, S>> {
        let report = BackwardReport {
            node: inner.name.clone(),
            mode: self.options.mode,
            forward: forward.clone(),
            forward_residual,
            adjoint: None,
            fallback: None,
            approximate: self.options.mode == GradientMode::OneStep || !forward.is_converged(),
            check: HypothesisCheck::not_checked(reason),
            kinks: KinkLedger::default(),
        };
        let (reports, forward_report) = (self.reports.clone(), report.clone());
        let logged = tape.try_custom_fn_ctx(&inner.name, &[z], z.value(), move |_, _, _, grad| {
            reports.push(report.clone());
            Ok(vec![Some(grad.to_owned())])
        })?;
        let reports = self.reports.clone();
        tape.set_custom_jvp(logged, move |_, _, output, tangents| {
            reports.push_pass(Pass::ForwardMode, forward_report.clone());
            Ok(match tangents.first() {
                Some(Some(t)) => t.to_owned(),
                _ => ArrayD::zeros(output.raw_dim()),
            })
        })?;
        Ok(logged)
    }
}

impl<S: Scalar> std::fmt::Debug for ImplicitLayer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImplicitLayer")
            .field("name", &self.inner.name)
            .field("form", &self.form)
            .field("mode", &self.options.mode)
            .field("backward_passes", &self.reports.len())
            .finish()
    }
}

/// The result of [`ImplicitLayer::apply`]: the solution on the tape and the forward report.
#[derive(Debug, Clone)]
pub struct Solution<'t, S: Scalar> {
    /// `z*` (for the unrolled mode `z_K`; for the one-step mode `T(z*, theta)`) on the outer
    /// tape.
    pub z: Var<'t, S>,
    /// How the forward solve went (for the unrolled mode: its iterations).
    pub forward: FixedPointReport,
}

/// A one-shot fixed-point layer: `z* = map(z*, theta)` solved from `z0`, recorded on the
/// tape of `theta`. Returns the solution and, through the layer, the backward reports.
/// The options are validated as by [`ImplicitLayer::fixed_point`], the inputs as by
/// [`ImplicitLayer::apply`].
///
/// ```
/// use clarke_core::Tape;
/// use clarke_implicit::{fixed_point, ImplicitOptions};
/// use ndarray::arr1;
///
/// // z = 0.5 z + theta, so z* = 2 theta and dz*/dtheta = 2.
/// let tape = Tape::<f64>::new();
/// let theta = tape.param(arr1(&[1.0, -3.0]).into_dyn());
/// let (solution, layer) = fixed_point(
///     |z, th| Ok(z * 0.5 + th[0]),
///     &arr1(&[0.0, 0.0]).into_dyn(),
///     &[theta],
///     ImplicitOptions::default(),
/// )
/// .unwrap();
/// let grads = solution.z.sum().backward().unwrap();
/// assert!((grads.wrt(theta).unwrap()[0] - 2.0).abs() < 1e-9);
/// println!("{}", layer.reports().last().unwrap());
/// ```
pub fn fixed_point<'t, S, F>(
    map: F,
    z0: &ArrayD<S>,
    theta: &[Var<'t, S>],
    options: ImplicitOptions,
) -> Result<(Solution<'t, S>, ImplicitLayer<S>)>
where
    S: Scalar,
    F: for<'s> Fn(Var<'s, S>, &[Var<'s, S>]) -> Result<Var<'s, S>> + 'static,
{
    one_shot(ImplicitLayer::fixed_point(map, options)?, z0, theta)
}

/// A one-shot root layer: `F(z*, theta) = 0` solved from `z0` (see [`fixed_point`]; the
/// options are validated as by [`ImplicitLayer::root`]).
pub fn root<'t, S, F>(
    map: F,
    z0: &ArrayD<S>,
    theta: &[Var<'t, S>],
    options: ImplicitOptions,
) -> Result<(Solution<'t, S>, ImplicitLayer<S>)>
where
    S: Scalar,
    F: for<'s> Fn(Var<'s, S>, &[Var<'s, S>]) -> Result<Var<'s, S>> + 'static,
{
    one_shot(ImplicitLayer::root(map, options)?, z0, theta)
}

fn one_shot<'t, S: Scalar>(
    layer: ImplicitLayer<S>,
    z0: &ArrayD<S>,
    theta: &[Var<'t, S>],
) -> Result<(Solution<'t, S>, ImplicitLayer<S>)> {
    let solution = layer.apply(z0, theta)?;
    Ok((solution, layer))
}

/// Refuses options that do not fit the layer.
fn validate(name: &str, form: Form, options: &ImplicitOptions) -> Result<()> {
    let refuse = |detail: String| Err(Error::invalid("implicit layer", format!("{name}: {detail}")));
    let mode = options.mode;
    if form == Form::Root
        && matches!(
            mode,
            GradientMode::Implicit(AdjointSolver::Neumann | AdjointSolver::Anderson { .. })
                | GradientMode::TruncatedNeumann { .. }
                | GradientMode::Unrolled { .. }
                | GradientMode::OneStep
        )
    {
        return refuse(format!(
            "the {} mode needs a fixed-point map z = T(z, theta); a root layer supports implicit (dense, GMRES, BiCGSTAB) and least squares",
            mode.name()
        ));
    }
    match mode {
        GradientMode::TruncatedNeumann { terms: 0 } => refuse("truncated Neumann needs at least one term".into()),
        GradientMode::Unrolled { iterations: 0 } => refuse("the unrolled mode needs at least one iteration".into()),
        _ => Ok(()),
    }?;
    options.check.validate()?;
    options.forward.validate("implicit layer (forward options)")?;
    let solver = options.forward_solver.unwrap_or_else(|| default_solver(form));
    if solver == ForwardSolver::NewtonKrylov {
        options.newton.validate("implicit layer (Newton-Krylov options)")?;
    }
    if matches!(mode, GradientMode::Implicit(_) | GradientMode::TruncatedNeumann { .. }) {
        options.adjoint.validate("implicit layer (adjoint options)")?;
    }
    if let KinkBand::SolverError { factor } = options.kink_band {
        if !(factor.is_finite() && factor >= 0.0) {
            return refuse(format!("the kink band factor must be finite and >= 0, got {factor}"));
        }
    }
    Ok(())
}

/// The backward pass of an implicit node: linearize, check, solve the adjoint, pull back.
struct AdjointNode<S: Scalar> {
    inner: Rc<InnerMap<S>>,
    form: Form,
    options: Rc<ImplicitOptions>,
    forward: FixedPointReport,
    warm: Rc<RefCell<Option<Array1<S>>>>,
    reports: ReportLog,
}

/// The linearization at `z*` with its kinks reported and its check passed: what both
/// products of an implicit node start from, and the report they complete.
struct Prepared<'s, S: Scalar> {
    lin: Linearization<'s, S>,
    /// The block `A` of the selected element, when the check built it.
    block: Option<Array2<S>>,
    report: BackwardReport,
}

impl<S: Scalar> AdjointNode<S> {
    /// Wraps an error of `context` in [`Error::InImplicit`] naming the layer, except the
    /// errors that already say which layer and stage they come from.
    fn within(&self, context: &'static str) -> impl Fn(Error) -> Error + '_ {
        move |e: Error| match e {
            e @ (Error::InImplicit { .. } | Error::SolveFailed { .. } | Error::HypothesisViolated { .. }) => e,
            e => Error::InImplicit {
                node: self.inner.name.clone(),
                context,
                source: Box::new(e),
            },
        }
    }

    /// Linearizes at `(z*, theta)` under the call's policy, widens the kinks to the solver
    /// band, runs the check, reports the kinks of the map to the call's ledger, and refuses
    /// a violated check (logging the report of `pass`) unless the options say otherwise.
    fn prepare<'s>(
        &'s self,
        tape: &'s Tape<S>,
        ctx: &VjpContext<'_>,
        theta: &[ArrayViewD<'_, S>],
        z_star: ArrayViewD<'_, S>,
        pass: Pass,
    ) -> Result<Prepared<'s, S>> {
        let name = &self.inner.name;
        let options = &*self.options;
        let mut lin = self
            .inner
            .linearize(tape, z_star.view(), theta, ctx.policy.clone())
            .map_err(self.within("recording the map at z*"))?;
        let t_value = lin.value();
        let z = lin.z();
        let forward_residual = match self.form {
            Form::FixedPoint => distance(&t_value, &z),
            Form::Root => t_value.iter().map(|v| v.to_f64_exact().powi(2)).sum::<f64>().sqrt(),
        };
        let selected = self
            .apply_solver_band(&mut lin, forward_residual)
            .map_err(self.within("kinks within the solver's error"))?;
        let checked = run_check(&lin, self.form, forward_residual, &options.check, selected)
            .map_err(self.within("hypothesis check"))?;
        let kinks = lin.ledger().map_err(self.within("kink ledger"))?;
        ctx.report_kinks(kinks.records().iter().map(|r| r.clone().in_layer(name, ctx.node)));
        let report = BackwardReport {
            node: name.clone(),
            mode: options.mode,
            forward: self.forward.clone(),
            forward_residual,
            adjoint: None,
            fallback: None,
            approximate: !self.forward.is_converged(),
            check: checked.check,
            kinks,
        };
        let least_squares = options.mode == GradientMode::LeastSquaresNoHypothesis;
        if report.check.outcome == CheckOutcome::Violated && options.check.refuse_violated && !least_squares {
            let detail = report.check.to_string();
            self.reports.push_pass(pass, report);
            return Err(Error::HypothesisViolated {
                node: name.clone(),
                detail,
            });
        }
        Ok(Prepared {
            lin,
            block: checked.block,
            report,
        })
    }

    fn backward(
        &self,
        ctx: &VjpContext<'_>,
        theta: &[ArrayViewD<'_, S>],
        z_star: ArrayViewD<'_, S>,
        grad: ArrayViewD<'_, S>,
    ) -> Result<Vec<Option<ArrayD<S>>>> {
        let options = &*self.options;
        let tape = Tape::new();
        let Prepared { lin, block, mut report } = self.prepare(&tape, ctx, theta, z_star, Pass::Backward)?;
        let g = into_flat(grad.to_owned()).map_err(self.within("adjoint solve"))?;
        let warm = if options.warm_start {
            self.warm.borrow().as_ref().filter(|w| w.len() == g.len()).cloned()
        } else {
            None
        };
        let adjoint = solve_adjoint(
            &self.inner.name,
            &lin,
            self.form,
            System::Adjoint,
            g.view(),
            warm.as_ref().map(|w| w.view()),
            block,
            options,
        )
        .map_err(self.within("adjoint solve"))?;
        if options.warm_start {
            *self.warm.borrow_mut() = Some(adjoint.w.clone());
        }
        // theta_bar = J_theta^T w for a fixed point; -J_theta^T w for a root.
        let w = match self.form {
            Form::FixedPoint => adjoint.w,
            Form::Root => adjoint.w.mapv(|v| -v),
        };
        let grads = lin
            .theta_vjp(w.view())
            .map_err(self.within("parameter vector-Jacobian product"))?;
        report.adjoint = Some(adjoint.report);
        report.fallback = adjoint.fallback;
        report.approximate |= adjoint.approximate;
        self.reports.push(report);
        Ok(grads.into_iter().map(Some).collect())
    }

    /// The forward-mode rule: `dz = A^{-1} J_theta dtheta` for a fixed point (`A = I - J_z`),
    /// `dz = -J_F^{-1} J_theta dtheta` for a root, solved as the mode says (the adjoint's
    /// solver, options and failure policy, without a warm start), after the same check and
    /// refusal as backward. The report goes to the log as [`Pass::ForwardMode`].
    fn jvp(
        &self,
        ctx: &JvpContext<'_>,
        theta: &[ArrayViewD<'_, S>],
        z_star: ArrayViewD<'_, S>,
        tangents: &[Option<ArrayViewD<'_, S>>],
    ) -> Result<ArrayD<S>> {
        let shape = z_star.shape().to_vec();
        let tape = Tape::new();
        let Prepared { lin, block, mut report } = self.prepare(&tape, ctx, theta, z_star, Pass::ForwardMode)?;
        let rhs = lin
            .theta_jvp(tangents)
            .map_err(self.within("parameter Jacobian-vector product"))?;
        let rhs = match self.form {
            Form::FixedPoint => rhs,
            Form::Root => rhs.mapv(|v| -v),
        };
        let tangent = solve_adjoint(
            &self.inner.name,
            &lin,
            self.form,
            System::Tangent,
            rhs.view(),
            None,
            block,
            &self.options,
        )
        .map_err(self.within("tangent solve"))?;
        report.adjoint = Some(tangent.report);
        report.fallback = tangent.fallback;
        report.approximate |= tangent.approximate;
        self.reports.push_pass(Pass::ForwardMode, report);
        tangent
            .w
            .into_shape_with_order(IxDyn(&shape))
            .map_err(|e| self.within("tangent solve")(Error::invalid("implicit layer", e.to_string())))
    }

    /// Widens the kinks of the linearization to the forward solver's error band (see
    /// [`KinkBand`]) and returns the Jacobian of the selected element when computing the band
    /// built it and the band changed no selection (the check then reuses it).
    ///
    /// The bound on `||z - z*||` divides the residual by a lower bound on `sigma_min` of the
    /// inverted block: `1 - L` for a declared contraction bound `L`, else the block of the
    /// exact-kink selection when `z` is small enough for the dense check, else 1 (the
    /// residual itself; the report's check gives the actual `sigma_min` where it runs).
    fn apply_solver_band(&self, lin: &mut Linearization<'_, S>, forward_residual: f64) -> Result<Option<Array2<S>>> {
        let options = &*self.options;
        if options.kink_band == KinkBand::Exact || forward_residual == 0.0 {
            return Ok(None);
        }
        let n = lin.len();
        let dense = options.check.enabled && n > 0 && n <= options.check.dense_limit;
        let (sigma, exact_jacobian) = match (self.form, options.check.contraction_bound) {
            (Form::FixedPoint, Some(bound)) if bound < 1.0 => (1.0 - bound, None),
            _ if dense => {
                let j = lin.jacobian(&[])?;
                let spectrum = Spectrum::of(block(self.form, j.clone())?.view())?;
                (spectrum.sigma_min, Some(j))
            }
            _ => (1.0, None),
        };
        let exact_kinks = lin.ledger()?.kink_elements();
        lin.set_band(options.kink_band.width(forward_residual, sigma));
        let unchanged = lin.ledger()?.kink_elements() == exact_kinks;
        Ok(exact_jacobian.filter(|_| unchanged))
    }
}

/// Euclidean distance between two arrays of the same shape and any rank, in f64.
fn distance<'a, S: Scalar>(a: impl IntoIterator<Item = &'a S>, b: impl IntoIterator<Item = &'a S>) -> f64 {
    a.into_iter()
        .zip(b)
        .map(|(x, y)| (x.to_f64_exact() - y.to_f64_exact()).powi(2))
        .sum::<f64>()
        .sqrt()
}
