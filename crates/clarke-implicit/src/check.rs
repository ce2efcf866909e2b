//! The invertibility check of the nonsmooth implicit function theorem.
//!
//! Implicit differentiation of `z = T(z, theta)` is justified when **every** element of the
//! conservative Jacobian block `A = I - J_z` (for a root layer, `A = J_F`) is invertible, not
//! just the element backpropagation selected. At `z*` the elements differ only through the
//! selections at the kinks the inner map hit: each kink element `e` contributes a derivative
//! `d_e` from an interval (relu `[0, 1]`, abs `[-1, 1]`, ...), and the conservative Jacobian
//! is `{J_z(d) : d in the box}`.
//!
//! **Why vertices suffice.** Each `d_e` enters `J_z` through a rank-one term (it scales one
//! element of one node's local derivative, and every path of the graph crosses that element
//! once), so `det A(d)` is affine in each `d_e` separately and `||J_z(d)||_2` is convex in each
//! `d_e` separately. A function affine (or convex) in each coordinate attains its extremes
//! over a box at the vertices. Hence:
//! - if `det A` has the same sign at all `2^k` vertices, no element of the box is singular
//!   (a certificate);
//! - if it changes sign between two elements, an element in between is singular (a
//!   violation, by continuity);
//! - if `||J_z|| < 1` at all vertices, every element is a contraction (a certificate).
//!
//! With at most [`CheckOptions::exhaustive_limit`] kink elements (and never more than
//! [`MAX_EXHAUSTIVE`]) all vertices are walked; with more, random vertices are sampled and
//! the verdict is at best a warning.
//!
//! **One engine.** [`walk_vertices`] is the walk, its thresholds and its verdicts; the generic
//! layers, the fused DEQ cell and any other layer built on the theorem call it with a way to
//! build the Jacobian for a set of per-element selections. Kinks within the forward solver's
//! error bound (see [`clarke_core::ledger`]) are walked like exact ones.
//!
//! **Singular against what.** A block is singular when `sigma_min <= singular_tol * scale`
//! or `sigma_min <= singular_floor`, where `scale = max(sigma_max, unit)`: `unit` is 1 for a
//! fixed point (the identity in `I - J_z` sets the scale) and the largest row norm of
//! `J_theta` for a root (the derivative scale of the map itself), so that a 1 x 1 block is
//! not judged against itself. For `z`
//! larger than [`CheckOptions::dense_limit`] the check estimates the spectral radius of
//! `J_z` by power iteration (the selected element is invertible when it is below one) and
//! relies on a declared [`CheckOptions::contraction_bound`] for a certificate.
//!
//! The check also turns the forward residual into an error bound on `z*`:
//! `||z - z*|| <~ ||T(z) - z|| / sigma_min(A)`.

use clarke_core::{ElementSelection, Error, Result, Scalar};
use clarke_solve::dense::singular_values;
use clarke_solve::{FnOperator, SpectralOptions, spectral_radius};
use ndarray::{Array2, ArrayView2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::inner::Linearization;
use crate::options::CheckOptions;
use crate::report::{CheckOutcome, HypothesisCheck};

/// The largest number of kink elements whose `2^k` vertices are ever walked one by one;
/// above it the walk samples, whatever [`CheckOptions::exhaustive_limit`] says.
pub const MAX_EXHAUSTIVE: usize = 20;

/// How many singular elements a report lists by name.
pub const MAX_LISTED: usize = 4;

/// Which equation a layer solves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `z = T(z, theta)`: the inverted block is `I - J_z`.
    FixedPoint,
    /// `F(z, theta) = 0`: the inverted block is `J_F`.
    Root,
}

/// The inverted block `A` from the Jacobian of the map: `I - J` for a fixed point, `J` for a
/// root. A Jacobian that is not square is refused: the map sends `z` to an array of `z`'s
/// size, so `J` has one row and one column per element of `z`.
pub fn block<S: Scalar>(form: Form, j: Array2<S>) -> Result<Array2<S>> {
    require_square("check::block", j.view())?;
    Ok(match form {
        Form::Root => j,
        Form::FixedPoint => {
            let mut a = j.mapv(|v| -v);
            a.diag_mut().mapv_inplace(|v| v + S::one());
            a
        }
    })
}

/// `Err(ShapeMismatch)` naming `op` unless `a` is square.
fn require_square<S: Scalar>(op: &'static str, a: ArrayView2<'_, S>) -> Result<()> {
    let (rows, cols) = a.dim();
    if rows != cols {
        return Err(Error::shapes(
            op,
            &[rows, cols],
            &[rows, rows],
            format!("a square matrix is needed, got {rows} x {cols}"),
        ));
    }
    Ok(())
}

/// The first non-finite entry of a matrix, as `(value, [row, column])`.
fn first_non_finite<S: Scalar>(a: ArrayView2<'_, S>) -> Option<(S, [usize; 2])> {
    a.indexed_iter()
        .find(|(_, v)| !v.is_finite())
        .map(|((i, j), v)| (*v, [i, j]))
}

/// A check's result, with the dense block of the selected element when it was built (the
/// dense adjoint solve reuses it).
#[derive(Debug, Clone)]
pub struct Checked<S: Scalar> {
    /// The report.
    pub check: HypothesisCheck,
    /// The block `A` of the selected element, when the walk built it.
    pub block: Option<Array2<S>>,
}

/// One kink element whose selection the walk can move: where it is and its hull.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Flippable {
    /// The node (on the tape the Jacobian is built from) or any id the caller's Jacobian
    /// understands.
    pub node: usize,
    /// Flat index of the element.
    pub element: usize,
    /// Lower end of the hull of its selection.
    pub low: f64,
    /// Upper end of the hull.
    pub high: f64,
}

/// What the walk needs besides the Jacobian.
#[derive(Debug, Clone)]
pub struct WalkInput {
    /// Fixed point or root.
    pub form: Form,
    /// The elements to flip.
    pub flippable: Vec<Flippable>,
    /// Every element treated as at a kink (flippable or not).
    pub kink_elements: usize,
    /// Of these, the ties of reductions, which follow a rule and cannot be flipped.
    pub frozen: usize,
    /// Of these, the ones within the forward solver's error bound (for the reasons).
    pub within_solver_error: usize,
    /// `||T(z) - z||` or `||F(z)||` at the solution, for the error bound.
    pub forward_residual: f64,
    /// The scale below which a singular value is singular, besides `sigma_max`: 1 for a fixed
    /// point, the map's derivative scale for a root.
    pub unit: f64,
}

impl WalkInput {
    /// Refuses a hull end, forward residual or unit that is negative (the residual and the
    /// unit) or not finite: the walk would compare against NaN and never find a singular
    /// element.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "walk_vertices";
        if let Some(e) = self
            .flippable
            .iter()
            .find(|e| !(e.low.is_finite() && e.high.is_finite()))
        {
            return Err(Error::invalid(
                OP,
                format!(
                    "flippable element {}[{}] has a non-finite hull [{}, {}]",
                    e.node, e.element, e.low, e.high
                ),
            ));
        }
        for (what, v) in [("forward_residual", self.forward_residual), ("unit", self.unit)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid(OP, format!("{what} must be finite and >= 0, got {v}")));
            }
        }
        Ok(())
    }

    /// Input from the records of a kink ledger (flippable: elementwise kinks with a hull).
    /// `forward_residual` is taken as given; [`walk_vertices`] refuses one that is negative
    /// or not finite.
    pub fn from_ledger(form: Form, ledger: &clarke_core::KinkLedger, forward_residual: f64) -> Self {
        let mut input = WalkInput {
            form,
            flippable: Vec::new(),
            kink_elements: 0,
            frozen: 0,
            within_solver_error: ledger.solver_error_hits(),
            forward_residual,
            unit: 1.0,
        };
        for r in ledger.records() {
            input.kink_elements += r.at_kink();
            match r.hull {
                Some((low, high)) if low < high => {
                    input.flippable.extend(r.kink_indices.iter().map(|&element| Flippable {
                        node: r.node,
                        element,
                        low,
                        high,
                    }))
                }
                Some(_) => {}
                None => input.frozen += r.at_kink(),
            }
        }
        input
    }
}

/// Extreme singular values and the sign of the determinant of a square matrix: what a
/// check needs to call one element of a conservative Jacobian singular, and to see a
/// determinant change sign between two elements (then an element in between is singular).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spectrum {
    /// Smallest singular value.
    pub sigma_min: f64,
    /// Largest singular value.
    pub sigma_max: f64,
    /// Sign of the determinant (-1, 0 or 1).
    pub det_sign: i8,
}

impl Spectrum {
    /// The spectrum of a square matrix (an SVD and an LU). A matrix that is not square, or
    /// has a NaN or an infinite entry, is refused: neither has a determinant sign to compare.
    pub fn of<S: Scalar>(a: ArrayView2<'_, S>) -> Result<Self> {
        require_square("Spectrum::of", a)?;
        if let Some((v, at)) = first_non_finite(a) {
            return Err(Error::invalid(
                "Spectrum::of",
                format!("the matrix has a non-finite entry {v} at {at:?}"),
            ));
        }
        let s = singular_values(a)?;
        let sigma_max = s.iter().map(|v| v.to_f64_exact()).fold(0.0, f64::max);
        let sigma_min = s.iter().map(|v| v.to_f64_exact()).fold(f64::INFINITY, f64::min);
        let sigma_min = if s.is_empty() { 0.0 } else { sigma_min };
        Ok(Spectrum {
            sigma_min,
            sigma_max,
            det_sign: determinant_sign(a),
        })
    }

    /// `sigma_min / sigma_max` (0 for the zero matrix).
    pub fn relative(&self) -> f64 {
        if self.sigma_max > 0.0 {
            self.sigma_min / self.sigma_max
        } else {
            0.0
        }
    }
}

fn largest_singular_value<S: Scalar>(a: ArrayView2<'_, S>) -> Result<f64> {
    Ok(singular_values(a)?.iter().map(|v| v.to_f64_exact()).fold(0.0, f64::max))
}

/// The sign of `det a` (-1, 0 or 1) by LU with partial pivoting in f64. Only the sign is
/// needed, so under- or overflow of the determinant's magnitude does not matter.
fn determinant_sign<S: Scalar>(a: ArrayView2<'_, S>) -> i8 {
    let n = a.nrows();
    let mut m = a.mapv(|v| v.to_f64_exact());
    let mut sign = 1i8;
    for k in 0..n {
        let (p, pivot) = (k..n)
            .map(|i| (i, m[[i, k]].abs()))
            .fold((k, -1.0), |best, c| if c.1 > best.1 { c } else { best });
        if pivot == 0.0 {
            return 0;
        }
        if p != k {
            for j in 0..n {
                m.swap([k, j], [p, j]);
            }
            sign = -sign;
        }
        let d = m[[k, k]];
        if d < 0.0 {
            sign = -sign;
        }
        for i in k + 1..n {
            let f = m[[i, k]] / d;
            if f != 0.0 {
                for j in k + 1..n {
                    m[[i, j]] -= f * m[[k, j]];
                }
            }
        }
    }
    sign
}

/// The singularity test of one element: `sigma_min` against `max(sigma_max, unit)` and the
/// absolute floor.
fn is_singular(spec: &Spectrum, unit: f64, opts: &CheckOptions) -> bool {
    spec.sigma_min <= opts.singular_tol * spec.sigma_max.max(unit) || spec.sigma_min <= opts.singular_floor
}

/// `sigma_min / max(sigma_max, unit)`: how far from singular, on the scale that decides.
fn relative(spec: &Spectrum, unit: f64) -> f64 {
    let scale = spec.sigma_max.max(unit);
    if scale > 0.0 { spec.sigma_min / scale } else { 0.0 }
}

/// The vertex walk: the one place where the theorem's hypothesis is judged.
///
/// `jacobian(selections)` returns the Jacobian of the map in `z` (`J_z` of `T`, or `J_F`)
/// with the given selections at single kink elements (an empty slice: the policy's). The
/// walk builds the selected element, then every vertex of the selection box (or a sample),
/// and returns the verdict with the selected block `A`.
///
/// Refused, before any verdict: options that fail [`CheckOptions::validate`], a hull end of a
/// flippable element, a forward residual or a unit that is negative or not finite, and a
/// Jacobian that is not square, not finite, or (at a vertex) not of the selected element's
/// size. An empty Jacobian (`z` has no elements) is certified: there is nothing to invert.
pub fn walk_vertices<S: Scalar>(
    input: &WalkInput,
    opts: &CheckOptions,
    mut jacobian: impl FnMut(&[ElementSelection]) -> Result<Array2<S>>,
) -> Result<Checked<S>> {
    opts.validate()?;
    input.validate()?;
    let mut size = None;
    let mut jacobian = move |selections: &[ElementSelection]| -> Result<Array2<S>> {
        let j = jacobian(selections)?;
        checked_jacobian(&j, selections, size)?;
        size = Some(j.nrows());
        Ok(j)
    };
    let k = input.flippable.len();
    let mut check = HypothesisCheck {
        outcome: CheckOutcome::Warning,
        kink_elements: input.kink_elements,
        flippable: k,
        contraction_bound: opts.contraction_bound,
        reasons: Vec::new(),
        ..HypothesisCheck::not_checked("")
    };
    if input.within_solver_error > 0 {
        check.reasons.push(format!(
            "{} element(s) within the forward solver's error bound of a kink are treated as at it and walked",
            input.within_solver_error
        ));
    }
    if input.frozen > 0 {
        check.reasons.push(format!(
            "{} tie(s) of max/min reductions follow the tie rule and were not explored",
            input.frozen
        ));
    }
    if let Some(bound) = opts.contraction_bound {
        if input.form == Form::FixedPoint && bound < 1.0 {
            check.outcome = CheckOutcome::Certified;
            check.sigma_min = Some(1.0 - bound);
            check.error_bound = Some(input.forward_residual / (1.0 - bound));
            check.reasons.push(format!(
                "declared contraction bound ||J_z|| <= {bound} < 1 for every selection"
            ));
            return Ok(Checked { check, block: None });
        }
        check.reasons.push(format!(
            "the declared contraction bound {bound} certifies nothing (needs < 1 on a fixed point)"
        ));
    }

    let j_selected = jacobian(&[])?;
    if j_selected.is_empty() {
        check.outcome = CheckOutcome::Certified;
        check.error_bound = Some(0.0);
        check
            .reasons
            .push("the block is empty (z has no elements): nothing to invert".to_string());
        return Ok(Checked {
            check,
            block: Some(j_selected),
        });
    }
    let mut max_norm: Option<f64> = match input.form {
        Form::FixedPoint => Some(largest_singular_value(j_selected.view())?),
        Form::Root => None,
    };
    let selected = block(input.form, j_selected)?;
    let sel = Spectrum::of(selected.view())?;
    check.sigma_min = Some(sel.sigma_min);
    check.sigma_max = Some(sel.sigma_max);
    check.error_bound = Some(if sel.sigma_min > 0.0 {
        input.forward_residual / sel.sigma_min
    } else {
        f64::INFINITY
    });
    let mut violated = Vec::new();
    if is_singular(&sel, input.unit, opts) {
        violated.push(format!(
            "the selected element is singular: sigma_min = {:.3e}, sigma_max = {:.3e}, scale {:.3e}",
            sel.sigma_min,
            sel.sigma_max,
            sel.sigma_max.max(input.unit)
        ));
    }

    // Walk the vertices of the selection box: all of them when there are few enough.
    let cap = opts.exhaustive_limit.min(MAX_EXHAUSTIVE);
    let exhaustive = k <= cap;
    let count = if exhaustive { 1usize << k } else { opts.samples };
    let mut signs = vec![sel.det_sign];
    // (smallest relative sigma, smallest sigma_min) over the vertices.
    let mut min_vertex: Option<(f64, f64)> = None;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut singular_vertices = 0usize;
    if k > 0 {
        for v in 0..count {
            let selections: Vec<ElementSelection> = input
                .flippable
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let upper = if exhaustive {
                        (v >> i) & 1 == 1
                    } else {
                        rng.random::<bool>()
                    };
                    ElementSelection {
                        node: e.node,
                        element: e.element,
                        value: if upper { e.high } else { e.low },
                    }
                })
                .collect();
            let j = jacobian(&selections)?;
            if let Some(m) = max_norm.as_mut() {
                *m = m.max(largest_singular_value(j.view())?);
            }
            let spec = Spectrum::of(block(input.form, j)?.view())?;
            signs.push(spec.det_sign);
            let rel = relative(&spec, input.unit);
            min_vertex = Some(match min_vertex {
                None => (rel, spec.sigma_min),
                Some((r, s)) => (r.min(rel), s.min(spec.sigma_min)),
            });
            if is_singular(&spec, input.unit, opts) {
                singular_vertices += 1;
                if singular_vertices <= MAX_LISTED {
                    let at: Vec<String> = selections
                        .iter()
                        .map(|s| format!("{}[{}]={}", s.node, s.element, s.value))
                        .collect();
                    violated.push(format!(
                        "the element with selections {} is singular: sigma_min = {:.3e}",
                        at.join(", "),
                        spec.sigma_min
                    ));
                }
            }
        }
    }
    if singular_vertices > MAX_LISTED {
        violated.push(format!(
            "{} more singular vertices not listed",
            singular_vertices - MAX_LISTED
        ));
    }
    check.vertices = if k > 0 { count } else { 0 };
    check.exhaustive = exhaustive;
    check.min_vertex_sigma = min_vertex.map(|(_, s)| s);
    check.max_vertex_norm = max_norm;
    let nonzero: Vec<i8> = signs.iter().copied().filter(|&s| s != 0).collect();
    check.determinant_sign_change = nonzero.windows(2).any(|w| w[0] != w[1]);
    if check.determinant_sign_change {
        violated.push(
            "det(A) changes sign over the selection box, so an element of the conservative Jacobian in between is singular"
                .to_string(),
        );
    }

    let min_relative = min_vertex.map_or(relative(&sel, input.unit), |(r, _)| r.min(relative(&sel, input.unit)));
    if !violated.is_empty() {
        check.outcome = CheckOutcome::Violated;
        check.reasons.splice(0..0, violated);
    } else if exhaustive && input.frozen == 0 {
        if max_norm.is_some_and(|m| m < 1.0) {
            check.outcome = CheckOutcome::Certified;
            check.reasons.push(format!(
                "||J_z|| < 1 at every vertex{}: a contraction for every selection",
                if k == 0 { " (no kinks)" } else { "" }
            ));
        } else if min_relative > opts.warn_tol {
            check.outcome = CheckOutcome::Certified;
            check.reasons.push(if k == 0 {
                "no kinks at z*: the Jacobian is unique and invertible".to_string()
            } else {
                format!("det(A) keeps one sign at all {count} vertices: every element is invertible")
            });
        } else {
            check.reasons.push(format!(
                "every element is invertible but the worst is nearly singular (sigma_min / max(sigma_max, {:.3e}) = {min_relative:.3e})",
                input.unit
            ));
        }
    } else if !exhaustive {
        check.reasons.push(format!(
            "{k} kink elements: {count} random vertices of 2^{k} checked (exhaustive up to {cap}), none singular"
        ));
    }
    Ok(Checked {
        check,
        block: Some(selected),
    })
}

/// Refuses a Jacobian of the walk that is not square, not `want x want` (when the selected
/// element's size is known) or not finite, naming the selections it was built for.
fn checked_jacobian<S: Scalar>(j: &Array2<S>, selections: &[ElementSelection], want: Option<usize>) -> Result<()> {
    const OP: &str = "walk_vertices";
    let at = || {
        if selections.is_empty() {
            "the selected element".to_string()
        } else {
            let list: Vec<String> = selections
                .iter()
                .map(|s| format!("{}[{}]={}", s.node, s.element, s.value))
                .collect();
            format!("the vertex with selections {}", list.join(", "))
        }
    };
    let (rows, cols) = j.dim();
    if rows != cols {
        return Err(Error::shapes(
            OP,
            &[rows, cols],
            &[rows, rows],
            format!("the Jacobian of {} must be square, got {rows} x {cols}", at()),
        ));
    }
    if let Some(n) = want.filter(|&n| n != rows) {
        return Err(Error::shapes(
            OP,
            &[rows, cols],
            &[n, n],
            format!(
                "the Jacobian of {} must have the selected element's size {n} x {n}",
                at()
            ),
        ));
    }
    if let Some((v, index)) = first_non_finite(j.view()) {
        return Err(Error::invalid(
            OP,
            format!("the Jacobian of {} has a non-finite entry {v} at {index:?}", at()),
        ));
    }
    Ok(())
}

/// Runs the check at the linearization `lin` (its kinks come from its ledger, with its
/// solver band).
pub(crate) fn run_check<S: Scalar>(
    lin: &Linearization<'_, S>,
    form: Form,
    forward_residual: f64,
    opts: &CheckOptions,
    selected: Option<Array2<S>>,
) -> Result<Checked<S>> {
    opts.validate()?;
    if !opts.enabled {
        return Ok(Checked {
            check: HypothesisCheck::not_checked("the check is switched off"),
            block: None,
        });
    }
    let ledger = lin.ledger()?;
    let mut input = WalkInput::from_ledger(form, &ledger, forward_residual);
    let n = lin.len();
    if n > opts.dense_limit && !(opts.contraction_bound.is_some_and(|b| b < 1.0) && form == Form::FixedPoint) {
        let mut check = HypothesisCheck {
            kink_elements: input.kink_elements,
            flippable: input.flippable.len(),
            reasons: Vec::new(),
            ..HypothesisCheck::not_checked("")
        };
        check.outcome = CheckOutcome::Warning;
        matrix_free(lin, form, opts, &mut check)?;
        return Ok(Checked { check, block: None });
    }
    if form == Form::Root && n > 0 {
        input.unit = lin.theta_scale()?;
    }
    // The selected element's Jacobian may have been built already (for the solver band).
    let mut selected = selected;
    walk_vertices(&input, opts, |selections| match selected.take() {
        Some(j) if selections.is_empty() => Ok(j),
        _ => lin.jacobian(selections),
    })
}

/// The check for a `z` too large to densify: a power-iteration estimate of the spectral
/// radius of `J_z` (fixed-point layers).
fn matrix_free<S: Scalar>(
    lin: &Linearization<'_, S>,
    form: Form,
    opts: &CheckOptions,
    check: &mut HypothesisCheck,
) -> Result<()> {
    let n = lin.len();
    check.reasons.push(format!(
        "z has {n} elements > dense limit {}: other selections not explored",
        opts.dense_limit
    ));
    if form == Form::Root {
        check
            .reasons
            .push("no matrix-free estimate for root layers".to_string());
        return Ok(());
    }
    let op = FnOperator::new(
        n,
        n,
        |x: ndarray::ArrayView1<'_, S>, y: ndarray::ArrayViewMut1<'_, S>| lin.vjp_into(x, y),
    );
    let spectral = SpectralOptions::default()
        .with_max_iter(opts.radius_iterations)
        .with_tol(1e-3)
        .with_seed(opts.seed);
    let est = spectral_radius(&op, &spectral)?;
    if !est.value.is_finite() {
        return Err(Error::invalid(
            "hypothesis check",
            format!(
                "the power iteration on J_z met a non-finite value {} after {} products",
                est.value, est.matvecs
            ),
        ));
    }
    check.spectral_radius = Some(est.value);
    if !est.is_converged() {
        // An estimate that has not settled may lie on either side of the radius.
        check.reasons.push(format!(
            "spectral radius of J_z ~ {:.3e}, not converged after {} power iterations (relative change {:.3e}): no conclusion",
            est.value, est.iterations, est.change
        ));
    } else if est.value < 1.0 {
        check.reasons.push(format!(
            "spectral radius of J_z ~ {:.3e} < 1: the selected element is invertible (estimate)",
            est.value
        ));
    } else {
        check.reasons.push(format!(
            "spectral radius of J_z ~ {:.3e} >= 1: the selected element may be singular",
            est.value
        ));
    }
    Ok(())
}

/// The check of a batch from the checks of its samples (a fused layer checks one block per
/// sample): the worst verdict, the smallest singular values, the largest error bound, and
/// the reasons of the worst sample, named.
///
/// The checks are merged as given (each was validated by the walk that made it). An empty
/// batch is certified: there is no block to invert, as for an empty `z` in
/// [`walk_vertices`].
pub fn merge_samples(checks: Vec<HypothesisCheck>) -> HypothesisCheck {
    let rank = |o: CheckOutcome| match o {
        CheckOutcome::Violated => 3,
        CheckOutcome::Warning => 2,
        CheckOutcome::NotChecked => 1,
        CheckOutcome::Certified => 0,
    };
    let Some((worst_index, worst)) = checks
        .iter()
        .enumerate()
        .max_by_key(|(i, c)| (rank(c.outcome), std::cmp::Reverse(*i)))
        .map(|(i, c)| (i, c.clone()))
    else {
        let mut empty = HypothesisCheck::not_checked("");
        empty.outcome = CheckOutcome::Certified;
        empty.reasons = vec!["an empty batch: nothing to invert".to_string()];
        return empty;
    };
    let min = |f: fn(&HypothesisCheck) -> Option<f64>| checks.iter().filter_map(f).reduce(f64::min);
    let max = |f: fn(&HypothesisCheck) -> Option<f64>| checks.iter().filter_map(f).reduce(f64::max);
    let same = checks.iter().filter(|c| c.outcome == worst.outcome).count();
    let mut merged = HypothesisCheck {
        outcome: worst.outcome,
        sigma_min: min(|c| c.sigma_min),
        sigma_max: max(|c| c.sigma_max),
        error_bound: max(|c| c.error_bound),
        spectral_radius: max(|c| c.spectral_radius),
        max_vertex_norm: max(|c| c.max_vertex_norm),
        contraction_bound: worst.contraction_bound,
        kink_elements: checks.iter().map(|c| c.kink_elements).sum(),
        flippable: checks.iter().map(|c| c.flippable).sum(),
        vertices: checks.iter().map(|c| c.vertices).sum(),
        exhaustive: checks.iter().all(|c| c.exhaustive || c.flippable == 0),
        min_vertex_sigma: min(|c| c.min_vertex_sigma),
        determinant_sign_change: checks.iter().any(|c| c.determinant_sign_change),
        reasons: Vec::new(),
    };
    merged.reasons.push(format!(
        "{} of {} samples {}; sample {worst_index}: {}",
        same,
        checks.len(),
        worst.outcome,
        worst.reasons.join("; ")
    ));
    merged
}
