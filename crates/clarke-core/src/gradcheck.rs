//! Finite-difference gradient checks that know about kinks.
//!
//! [`gradcheck`] compares the full Jacobian from backward (one backward per output element,
//! replaying the same tape) with central differences, for small inputs.
//! [`gradcheck_direction`] compares one random directional derivative, `<u, J v>`, for large
//! inputs, at the cost of two extra forward passes.
//!
//! Both are **kink aware**: every nonsmooth node (core ops, and custom nodes that declare their regions with [`Tape::declare_kink_regions`]) reports on which side of its kink each
//! element sits, and a check whose perturbed points change side at any node refuses with
//! [`Error::KinkInFiniteDifference`] naming the node, rather than comparing a one-sided
//! selection with a two-sided difference quotient (central differences average the
//! one-sided slopes, so they match no selection). Values *at* kinks are tested exactly
//! against the policy instead.

use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::op::{InputValues, Op};
use crate::tape::Tape;
use crate::var::Var;
use crate::{Error, Result, Scalar};

/// Tolerances and settings of a gradient check.
#[derive(Debug, Clone)]
pub struct GradcheckOptions {
    /// Central-difference step.
    pub step: f64,
    /// Relative tolerance.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
    /// Refuse to difference across a kink (on by default).
    pub kink_aware: bool,
    /// Seed of the random direction and cotangent ([`gradcheck_direction`]).
    pub seed: u64,
}

impl Default for GradcheckOptions {
    /// Step 1e-6, rtol 1e-6, atol 1e-8: for f64 functions of moderate scale.
    fn default() -> Self {
        GradcheckOptions {
            step: 1e-6,
            rtol: 1e-6,
            atol: 1e-8,
            kink_aware: true,
            seed: 0,
        }
    }
}

impl GradcheckOptions {
    /// Checks the settings: a finite step `> 0` (a zero step divides by zero, a NaN one
    /// compares NaN) and finite tolerances `>= 0` (a negative or NaN one fails every
    /// comparison, reported as a gradient mismatch).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the field and its value.
    pub fn validate(&self) -> Result<()> {
        if !(self.step.is_finite() && self.step > 0.0) {
            return Err(Error::invalid(
                "gradcheck",
                format!("step must be finite and > 0, got {}", self.step),
            ));
        }
        for (name, tol) in [("rtol", self.rtol), ("atol", self.atol)] {
            if !(tol.is_finite() && tol >= 0.0) {
                return Err(Error::invalid(
                    "gradcheck",
                    format!("{name} must be finite and >= 0, got {tol}"),
                ));
            }
        }
        Ok(())
    }
}

/// Refuses inputs a check cannot compare anything at: no input element at all, or a NaN or
/// an infinity (the function and its gradient are NaN there, and a NaN never matches).
fn check_inputs<S: Scalar>(inputs: &[ArrayD<S>]) -> Result<()> {
    if inputs.iter().all(|x| x.is_empty()) {
        return Err(Error::invalid(
            "gradcheck",
            format!("nothing to check: {} input(s), none with an element", inputs.len()),
        ));
    }
    for (i, x) in inputs.iter().enumerate() {
        if let Some((k, v)) = x.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::invalid(
                "gradcheck",
                format!("input {i} element {k} is {v}: check at a finite point"),
            ));
        }
    }
    Ok(())
}

/// Refuses an output at a perturbed point whose shape differs from the base point's (the
/// program depends on the data): the Jacobian rows would not line up.
fn same_shape<S: Scalar>(base: &[usize], other: &ArrayD<S>) -> Result<()> {
    if other.shape() != base {
        return Err(Error::shapes(
            "gradcheck",
            base,
            other.shape(),
            "the output at a perturbed point has another shape than at the checked point (data-dependent shape); check it at points where it does not change",
        ));
    }
    Ok(())
}

/// What a passing check measured.
#[derive(Debug, Clone, PartialEq)]
pub struct GradcheckReport {
    /// Entries compared (Jacobian entries, or 1 for a direction test).
    pub compared: usize,
    /// Largest absolute difference.
    pub max_abs_err: f64,
    /// Largest relative difference.
    pub max_rel_err: f64,
    /// Nonsmooth nodes whose branches were checked constant across every perturbation.
    pub kink_nodes_checked: usize,
}

/// Per nonsmooth node: (node id, op, which side of its kink each element sits on).
type Regions = Vec<(usize, &'static str, Vec<i64>)>;

/// Region codes of every nonsmooth node of a tape, by node id.
fn regions<S: Scalar>(tape: &Tape<S>) -> Regions {
    let nodes = tape.nodes();
    nodes
        .iter()
        .enumerate()
        .filter_map(|(id, n)| match &n.op {
            Op::Kink(k) => Some((id, k.name(), k.region_codes(InputValues::new(&nodes, &n.inputs)))),
            Op::Custom(c) => c.regions.as_ref().map(|(op, codes)| (id, *op, codes.clone())),
            _ => None,
        })
        .collect()
}

/// Records `f` at `inputs`; returns the output value and the kink regions.
fn evaluate<S, F>(f: &F, inputs: &[ArrayD<S>]) -> Result<(ArrayD<S>, Regions)>
where
    S: Scalar,
    F: for<'t> Fn(&'t Tape<S>, &[Var<'t, S>]) -> Result<Var<'t, S>>,
{
    let tape = Tape::<S>::new();
    let vars: Vec<Var<'_, S>> = inputs.iter().map(|x| tape.param(x.clone())).collect();
    let y = f(&tape, &vars)?;
    Ok((y.value(), regions(&tape)))
}

fn same_regions(base: &Regions, other: &Regions, input: usize, element: usize, step: f64) -> Result<()> {
    let same_program = base.len() == other.len()
        && base
            .iter()
            .zip(other)
            .all(|((id, op, a), (id2, op2, b))| id == id2 && op == op2 && a.len() == b.len());
    if !same_program {
        return Err(Error::invalid(
            "gradcheck",
            "the function recorded a different program at a perturbed point (data-dependent control flow); check it at points where it does not",
        ));
    }
    for ((id, op, a), (_, _, b)) in base.iter().zip(other) {
        if a != b {
            return Err(Error::KinkInFiniteDifference {
                node: *id,
                op,
                input,
                element,
                step,
            });
        }
    }
    Ok(())
}

fn compare(
    analytic: f64,
    numeric: f64,
    input: usize,
    element: usize,
    o: &GradcheckOptions,
    report: &mut GradcheckReport,
) -> Result<()> {
    let abs_err = (analytic - numeric).abs();
    let scale = analytic.abs().max(numeric.abs());
    let rel_err = if scale > 0.0 { abs_err / scale } else { 0.0 };
    report.compared += 1;
    report.max_abs_err = report.max_abs_err.max(abs_err);
    report.max_rel_err = report.max_rel_err.max(rel_err);
    let within = abs_err <= o.atol + o.rtol * scale;
    if !within {
        return Err(Error::GradientMismatch {
            input,
            element,
            analytic,
            numeric,
            abs_err,
            rel_err,
        });
    }
    Ok(())
}

/// Full-Jacobian check of `f` at `inputs` (every input is differentiated).
///
/// Cost: one backward per output element and two forwards per input element; meant for
/// inputs with up to a few hundred elements.
///
/// # Errors
/// Besides [`Error::GradientMismatch`] and [`Error::KinkInFiniteDifference`]:
/// [`Error::InvalidArgument`] for options that fail [`GradcheckOptions::validate`], inputs
/// with no element at all or with a non-finite one, an output with no element, or a
/// function that records another program at a perturbed point; [`Error::ShapeMismatch`]
/// when its output shape changes there.
pub fn gradcheck<S, F>(f: F, inputs: &[ArrayD<S>], options: &GradcheckOptions) -> Result<GradcheckReport>
where
    S: Scalar,
    F: for<'t> Fn(&'t Tape<S>, &[Var<'t, S>]) -> Result<Var<'t, S>>,
{
    options.validate()?;
    check_inputs(inputs)?;
    let tape = Tape::<S>::new();
    let vars: Vec<Var<'_, S>> = inputs.iter().map(|x| tape.param(x.clone())).collect();
    let y = f(&tape, &vars)?;
    let base_regions = regions(&tape);
    let y_shape = y.shape();
    let m = y.len();
    if m == 0 {
        return Err(Error::invalid(
            "gradcheck",
            format!("nothing to check: the output has shape {y_shape:?}, no element"),
        ));
    }
    // Analytic Jacobian rows: backward with each unit seed, replaying the same tape.
    let mut rows: Vec<Vec<ArrayD<S>>> = Vec::with_capacity(m);
    for j in 0..m {
        let mut seed = ArrayD::<S>::zeros(IxDyn(&y_shape));
        seed.as_slice_mut().expect("fresh array")[j] = S::one();
        let grads = y.backward_seeded(seed)?;
        rows.push(
            vars.iter()
                .map(|v| grads.wrt(*v).cloned())
                .collect::<Result<Vec<_>>>()?,
        );
    }
    let h = options.step;
    let mut report = GradcheckReport {
        compared: 0,
        max_abs_err: 0.0,
        max_rel_err: 0.0,
        kink_nodes_checked: base_regions.len(),
    };
    for (i, x) in inputs.iter().enumerate() {
        let x = x.as_standard_layout().into_owned();
        for k in 0..x.len() {
            let mut shifted: Vec<ArrayD<S>> = inputs.to_vec();
            let mut plus = x.clone();
            plus.as_slice_mut().expect("standard")[k] += S::from_f64_lossy(h);
            shifted[i] = plus;
            let (yp, rp) = evaluate(&f, &shifted)?;
            let mut minus = x.clone();
            minus.as_slice_mut().expect("standard")[k] -= S::from_f64_lossy(h);
            shifted[i] = minus;
            let (ym, rm) = evaluate(&f, &shifted)?;
            same_shape(&y_shape, &yp)?;
            same_shape(&y_shape, &ym)?;
            if options.kink_aware {
                same_regions(&base_regions, &rp, i, k, h)?;
                same_regions(&base_regions, &rm, i, k, h)?;
            }
            for (j, (p, q)) in yp.iter().zip(ym.iter()).enumerate() {
                let numeric = (p.to_f64_exact() - q.to_f64_exact()) / (2.0 * h);
                let analytic = rows[j][i].as_standard_layout().as_slice().expect("standard")[k].to_f64_exact();
                compare(analytic, numeric, i, k + j * x.len(), options, &mut report)?;
            }
        }
    }
    Ok(report)
}

/// One-direction check: `<u, J v>` from backward against central differences of
/// `<u, f(x + h v)>`, with a seeded random direction `v` (over all inputs) and cotangent `u`.
///
/// # Errors
/// As [`gradcheck`].
pub fn gradcheck_direction<S, F>(f: F, inputs: &[ArrayD<S>], options: &GradcheckOptions) -> Result<GradcheckReport>
where
    S: Scalar,
    F: for<'t> Fn(&'t Tape<S>, &[Var<'t, S>]) -> Result<Var<'t, S>>,
{
    options.validate()?;
    check_inputs(inputs)?;
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let tape = Tape::<S>::new();
    let vars: Vec<Var<'_, S>> = inputs.iter().map(|x| tape.param(x.clone())).collect();
    let y = f(&tape, &vars)?;
    let base_regions = regions(&tape);
    let y_shape = y.shape();
    if y.is_empty() {
        return Err(Error::invalid(
            "gradcheck_direction",
            format!("nothing to check: the output has shape {y_shape:?}, no element"),
        ));
    }
    let u = ArrayD::<S>::from_shape_simple_fn(IxDyn(&y.shape()), || S::from_f64_lossy(rng.random_range(-1.0..1.0)));
    let v: Vec<ArrayD<S>> = inputs
        .iter()
        .map(|x| ArrayD::<S>::from_shape_simple_fn(x.raw_dim(), || S::from_f64_lossy(rng.random_range(-1.0..1.0))))
        .collect();
    let grads = y.backward_seeded(u.clone())?;
    let mut analytic = 0.0;
    for (var, dir) in vars.iter().zip(&v) {
        let g = grads.wrt(*var)?;
        analytic += g
            .iter()
            .zip(dir.iter())
            .map(|(a, b)| a.to_f64_exact() * b.to_f64_exact())
            .sum::<f64>();
    }
    let h = options.step;
    let hs = S::from_f64_lossy(h);
    let shifted = |sign: S| -> Vec<ArrayD<S>> {
        inputs
            .iter()
            .zip(&v)
            .map(|(x, d)| x + &d.mapv(|e| e * hs * sign))
            .collect()
    };
    let (yp, rp) = evaluate(&f, &shifted(S::one()))?;
    let (ym, rm) = evaluate(&f, &shifted(-S::one()))?;
    same_shape(&y_shape, &yp)?;
    same_shape(&y_shape, &ym)?;
    if options.kink_aware {
        same_regions(&base_regions, &rp, usize::MAX, usize::MAX, h)?;
        same_regions(&base_regions, &rm, usize::MAX, usize::MAX, h)?;
    }
    let dot = |a: &ArrayD<S>| {
        a.iter()
            .zip(u.iter())
            .map(|(p, q)| p.to_f64_exact() * q.to_f64_exact())
            .sum::<f64>()
    };
    let numeric = (dot(&yp) - dot(&ym)) / (2.0 * h);
    let mut report = GradcheckReport {
        compared: 0,
        max_abs_err: 0.0,
        max_rel_err: 0.0,
        kink_nodes_checked: base_regions.len(),
    };
    compare(analytic, numeric, usize::MAX, usize::MAX, options, &mut report)?;
    Ok(report)
}
