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
//! not judged against itself.
//!
//! **Above the dense limit.** For `z` larger than [`CheckOptions::dense_limit`] the layers'
//! check is matrix-free when the map has forward-mode products (every core op does; a
//! custom op needs a forward-mode rule): the block is an operator (products by JVP,
//! transposed products by VJP, with each element's selections), and the same walk measures
//! every element it visits by estimates, `sigma_min` by Golub-Kahan-Lanczos and `sigma_max`
//! by power iteration ([`CheckOptions::spectral_tol`], [`CheckOptions::norm_tol`],
//! [`CheckOptions::spectral_iterations`]), with the same thresholds. An estimate has no
//! determinant sign, so with kinks a certificate needs `||J_z|| < 1` (estimated) at every
//! vertex of an exhaustive walk; an unconverged estimate draws no conclusion (a warning),
//! except that a `sigma_min` estimate never lies below the true value, so a singular
//! estimate is a violation. Without forward-mode products the check estimates the spectral
//! radius of `J_z` by power iteration (the selected element is invertible when it is below
//! one) and relies on a declared [`CheckOptions::contraction_bound`] for a certificate.
//!
//! A layer with its own products (a fused cell whose Jacobian has a closed form) walks its
//! elements matrix-free with [`walk_vertices_matrix_free`], the same walk and estimates.
//!
//! The check also turns the forward residual into an error bound on `z*`:
//! `||z - z*|| <~ ||T(z) - z|| / sigma_min(A)`.

use clarke_core::{ElementSelection, Error, Result, Scalar};
use clarke_solve::dense::singular_values;
use ndarray::{Array2, ArrayView2};

use crate::inner::Linearization;
use crate::options::CheckOptions;
use crate::report::{CheckOutcome, HypothesisCheck};

mod matrix_free;
mod walk;

pub use matrix_free::walk_vertices_matrix_free;

use walk::Measured;

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
    // Row-major rows of one flat buffer: the elimination works on row slices.
    let mut m: Vec<f64> = a.iter().map(|v| v.to_f64_exact()).collect();
    let mut sign = 1i8;
    for k in 0..n {
        let (p, pivot) = (k..n)
            .map(|i| (i, m[i * n + k].abs()))
            .fold((k, -1.0), |best, c| if c.1 > best.1 { c } else { best });
        if pivot == 0.0 {
            return 0;
        }
        if p != k {
            let (upper, lower) = m.split_at_mut(p * n);
            upper[k * n..(k + 1) * n].swap_with_slice(&mut lower[..n]);
            sign = -sign;
        }
        let (upper, lower) = m.split_at_mut((k + 1) * n);
        let row_k = &upper[k * n..];
        let d = row_k[k];
        if d < 0.0 {
            sign = -sign;
        }
        for row_i in lower.chunks_exact_mut(n) {
            let f = row_i[k] / d;
            if f != 0.0 {
                for (x, y) in row_i[k + 1..].iter_mut().zip(&row_k[k + 1..]) {
                    *x -= f * y;
                }
            }
        }
    }
    sign
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
    let mut selected = None;
    let check = walk::walk(input, opts, |selections| {
        let j = jacobian(selections)?;
        checked_jacobian(&j, selections, size)?;
        size = Some(j.nrows());
        dense_measure(input.form, j, selections.is_empty().then_some(&mut selected))
    })?;
    Ok(Checked { check, block: selected })
}

/// One element measured densely: the SVD and the determinant sign of its block, and for a
/// fixed point `||J_z||`. The block of the selected element goes to `keep` when given (an
/// empty Jacobian is kept as it is).
fn dense_measure<S: Scalar>(form: Form, j: Array2<S>, keep: Option<&mut Option<Array2<S>>>) -> Result<Measured> {
    if j.is_empty() {
        if let Some(keep) = keep {
            *keep = Some(j);
        }
        return Ok(Measured::EMPTY);
    }
    let jacobian_norm = match form {
        Form::FixedPoint => Some(largest_singular_value(j.view())?),
        Form::Root => None,
    };
    let a = block(form, j)?;
    let spec = Spectrum::of(a.view())?;
    let dim = a.nrows();
    if let Some(keep) = keep {
        *keep = Some(a);
    }
    Ok(Measured {
        dim,
        sigma_min: spec.sigma_min,
        sigma_max: spec.sigma_max,
        det_sign: Some(spec.det_sign),
        jacobian_norm,
        converged: true,
        products: 0,
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
    if form == Form::Root && n > 0 {
        input.unit = lin.theta_scale()?;
    }
    if n > opts.dense_limit && !(opts.contraction_bound.is_some_and(|b| b < 1.0) && form == Form::FixedPoint) {
        input.validate()?;
        let check = matrix_free::check(lin, &input, opts)?;
        return Ok(Checked { check, block: None });
    }
    // The selected element's Jacobian may have been built already (for the solver band).
    let mut selected = selected;
    walk_vertices(&input, opts, |selections| match selected.take() {
        Some(j) if selections.is_empty() => Ok(j),
        _ => lin.jacobian(selections),
    })
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
        matrix_free: checks.iter().any(|c| c.matrix_free),
        products: checks.iter().map(|c| c.products).sum(),
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
