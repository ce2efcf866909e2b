//! The walk over the elements of a conservative Jacobian and its verdict, whatever measures
//! each element: a dense SVD and LU ([`super::walk_vertices`]) or matrix-free estimates
//! ([`super::matrix_free`]). Both get the same vertices, thresholds and messages.

use std::ops::ControlFlow;

use clarke_core::{ElementSelection, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Form, MAX_EXHAUSTIVE, MAX_LISTED, WalkInput};
use crate::options::CheckOptions;
use crate::report::{CheckOutcome, HypothesisCheck};

/// One element of the conservative Jacobian block `A`, measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Measured {
    /// Number of rows (and columns) of `A`: 0 when `z` has no elements.
    pub dim: usize,
    /// Smallest singular value of `A` (a matrix-free estimate never lies below it).
    pub sigma_min: f64,
    /// Largest singular value of `A`.
    pub sigma_max: f64,
    /// Sign of `det A`, when it was computed (a dense LU); matrix-free estimates have none.
    pub det_sign: Option<i8>,
    /// `||J_z||_2` of a fixed point's map, when it was computed.
    pub jacobian_norm: Option<f64>,
    /// Whether the numbers are exact or estimates that met their tolerance.
    pub converged: bool,
    /// Products with `A`, `A^T`, `J_z` or `J_z^T` the estimates used (0 for a dense element).
    pub products: usize,
}

impl Measured {
    /// The element of an empty `z`: nothing to invert.
    pub const EMPTY: Measured = Measured {
        dim: 0,
        sigma_min: 0.0,
        sigma_max: 0.0,
        det_sign: None,
        jacobian_norm: None,
        converged: true,
        products: 0,
    };

    /// The singularity test: `sigma_min` against `max(sigma_max, unit)` and the absolute
    /// floor.
    fn is_singular(&self, unit: f64, opts: &CheckOptions) -> bool {
        self.sigma_min <= opts.singular_tol * self.sigma_max.max(unit) || self.sigma_min <= opts.singular_floor
    }

    /// `sigma_min / max(sigma_max, unit)`: how far from singular, on the scale that decides.
    fn relative(&self, unit: f64) -> f64 {
        let scale = self.sigma_max.max(unit);
        if scale > 0.0 { self.sigma_min / scale } else { 0.0 }
    }
}

/// The vertices of the selection box a walk visits: all `2^k` when `k` is at most the
/// exhaustive cap, else `samples` random ones drawn from the seed of the options.
pub(crate) struct Vertices<'a> {
    input: &'a WalkInput,
    /// Whether every vertex is visited.
    pub exhaustive: bool,
    /// How many vertices are visited (0 without flippable elements).
    pub count: usize,
    /// The exhaustive cap in force.
    pub cap: usize,
    seed: u64,
}

impl<'a> Vertices<'a> {
    pub fn new(input: &'a WalkInput, opts: &CheckOptions) -> Self {
        let k = input.flippable.len();
        let cap = opts.exhaustive_limit.min(MAX_EXHAUSTIVE);
        let exhaustive = k <= cap;
        let count = match (k, exhaustive) {
            (0, _) => 0,
            (_, true) => 1usize << k,
            (_, false) => opts.samples,
        };
        Vertices {
            input,
            exhaustive,
            count,
            cap,
            seed: opts.seed,
        }
    }

    /// The per-element selections of each vertex, in the order they are visited.
    pub fn selections(&self) -> impl Iterator<Item = Vec<ElementSelection>> + 'a {
        let (input, exhaustive) = (self.input, self.exhaustive);
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        (0..self.count).map(move |v| {
            input
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
                .collect()
        })
    }
}

/// `node[element]=value, ...` for messages.
pub(crate) fn describe(selections: &[ElementSelection]) -> String {
    let at: Vec<String> = selections
        .iter()
        .map(|s| format!("{}[{}]={}", s.node, s.element, s.value))
        .collect();
    at.join(", ")
}

/// The report before any element is measured: the counts, the reasons every walk gives, and
/// a declared contraction bound's certificate (which ends the check).
fn preamble(input: &WalkInput, opts: &CheckOptions) -> ControlFlow<HypothesisCheck, HypothesisCheck> {
    let mut check = HypothesisCheck {
        outcome: CheckOutcome::Warning,
        kink_elements: input.kink_elements,
        flippable: input.flippable.len(),
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
            return ControlFlow::Break(check);
        }
        check.reasons.push(format!(
            "the declared contraction bound {bound} certifies nothing (needs < 1 on a fixed point)"
        ));
    }
    ControlFlow::Continue(check)
}

/// Walks the selected element and the vertices of the selection box, measuring each with
/// `measure(selections)` (an empty slice: the policy's selection), and judges:
///
/// - **violated** when an element is singular (an estimate of `sigma_min` never lies below
///   the true value, so a singular estimate is a singular element even unconverged), or
///   when `det A` changes sign between two elements whose sign was computed;
/// - **certified** when the walk was exhaustive, no tie was frozen, every measurement
///   converged, and either `||J_z|| < 1` at every element (a contraction for every
///   selection; this needs every element's norm) or every element is far from singular and
///   the determinant kept one sign at every vertex (without kinks, the selected element is
///   the only one and its `sigma_min` suffices);
/// - a **warning** otherwise, saying why.
///
/// Without kinks no vertex is measured. The caller has validated `input` and `opts`.
pub(crate) fn walk(
    input: &WalkInput,
    opts: &CheckOptions,
    mut measure: impl FnMut(&[ElementSelection]) -> Result<Measured>,
) -> Result<HypothesisCheck> {
    let mut check = match preamble(input, opts) {
        ControlFlow::Break(check) => return Ok(check),
        ControlFlow::Continue(check) => check,
    };
    let sel = measure(&[])?;
    if sel.dim == 0 {
        check.outcome = CheckOutcome::Certified;
        check.error_bound = Some(0.0);
        check
            .reasons
            .push("the block is empty (z has no elements): nothing to invert".to_string());
        return Ok(check);
    }
    check.sigma_min = Some(sel.sigma_min);
    check.sigma_max = Some(sel.sigma_max);
    check.error_bound = Some(if sel.sigma_min > 0.0 {
        input.forward_residual / sel.sigma_min
    } else {
        f64::INFINITY
    });
    let mut tally = Tally::new(&sel, input.unit, opts);
    let vertices = Vertices::new(input, opts);
    for selections in vertices.selections() {
        let m = measure(&selections)?;
        tally.vertex(&selections, &m, opts);
    }
    tally.finish(&mut check, input, opts, &vertices);
    Ok(check)
}

/// What the walk has seen so far.
struct Tally {
    unit: f64,
    violated: Vec<String>,
    /// Determinant signs of the measured elements that have one.
    signs: Vec<i8>,
    /// Whether every measured element has a determinant sign.
    signs_known: bool,
    /// Largest `||J_z||` while every measured element has one.
    max_norm: Option<f64>,
    /// (smallest relative sigma, smallest sigma_min) over the vertices.
    min_vertex: Option<(f64, f64)>,
    min_relative: f64,
    singular_vertices: usize,
    unconverged: usize,
    products: usize,
    matrix_free: bool,
}

impl Tally {
    fn new(sel: &Measured, unit: f64, opts: &CheckOptions) -> Self {
        let mut tally = Tally {
            unit,
            violated: Vec::new(),
            signs: sel.det_sign.into_iter().collect(),
            signs_known: sel.det_sign.is_some(),
            max_norm: sel.jacobian_norm,
            min_vertex: None,
            min_relative: sel.relative(unit),
            singular_vertices: 0,
            unconverged: usize::from(!sel.converged),
            products: sel.products,
            matrix_free: sel.det_sign.is_none(),
        };
        if sel.is_singular(unit, opts) {
            tally.violated.push(format!(
                "the selected element is singular: sigma_min = {:.3e}, sigma_max = {:.3e}, scale {:.3e}",
                sel.sigma_min,
                sel.sigma_max,
                sel.sigma_max.max(unit)
            ));
        }
        tally
    }

    fn vertex(&mut self, selections: &[ElementSelection], m: &Measured, opts: &CheckOptions) {
        self.signs.extend(m.det_sign);
        self.signs_known &= m.det_sign.is_some();
        self.max_norm = self.max_norm.zip(m.jacobian_norm).map(|(a, b)| a.max(b));
        self.unconverged += usize::from(!m.converged);
        self.products += m.products;
        let rel = m.relative(self.unit);
        self.min_relative = self.min_relative.min(rel);
        self.min_vertex = Some(match self.min_vertex {
            None => (rel, m.sigma_min),
            Some((r, s)) => (r.min(rel), s.min(m.sigma_min)),
        });
        if m.is_singular(self.unit, opts) {
            self.singular_vertices += 1;
            if self.singular_vertices <= MAX_LISTED {
                self.violated.push(format!(
                    "the element with selections {} is singular: sigma_min = {:.3e}",
                    describe(selections),
                    m.sigma_min
                ));
            }
        }
    }

    fn finish(mut self, check: &mut HypothesisCheck, input: &WalkInput, opts: &CheckOptions, vertices: &Vertices<'_>) {
        let k = input.flippable.len();
        let count = vertices.count;
        if self.singular_vertices > MAX_LISTED {
            self.violated.push(format!(
                "{} more singular vertices not listed",
                self.singular_vertices - MAX_LISTED
            ));
        }
        check.vertices = count;
        check.exhaustive = vertices.exhaustive;
        check.min_vertex_sigma = self.min_vertex.map(|(_, s)| s);
        check.max_vertex_norm = self.max_norm;
        check.matrix_free = self.matrix_free;
        check.products = self.products;
        let nonzero: Vec<i8> = self.signs.iter().copied().filter(|&s| s != 0).collect();
        check.determinant_sign_change = nonzero.windows(2).any(|w| w[0] != w[1]);
        if check.determinant_sign_change {
            self.violated.push(
                "det(A) changes sign over the selection box, so an element of the conservative Jacobian in between is singular"
                    .to_string(),
            );
        }
        let min_relative = self.min_relative;
        if !self.violated.is_empty() {
            check.outcome = CheckOutcome::Violated;
            check.reasons.splice(0..0, self.violated);
        } else if self.unconverged > 0 {
            check.reasons.push(format!(
                "the spectral estimates of {} of {} element(s) not converged within {} iterations (tolerance {:.1e}): no conclusion",
                self.unconverged,
                count + 1,
                opts.spectral_iterations,
                opts.spectral_tol
            ));
        } else if vertices.exhaustive && input.frozen == 0 {
            if self.max_norm.is_some_and(|m| m < 1.0) {
                check.outcome = CheckOutcome::Certified;
                check.reasons.push(format!(
                    "||J_z|| < 1 at every vertex{}: a contraction for every selection",
                    if k == 0 { " (no kinks)" } else { "" }
                ));
            } else if min_relative > opts.warn_tol && (k == 0 || self.signs_known) {
                check.outcome = CheckOutcome::Certified;
                check.reasons.push(if k == 0 {
                    "no kinks at z*: the Jacobian is unique and invertible".to_string()
                } else {
                    format!("det(A) keeps one sign at all {count} vertices: every element is invertible")
                });
            } else if min_relative > opts.warn_tol {
                check.reasons.push(format!(
                    "every vertex is invertible (smallest sigma_min / scale {min_relative:.3e}), but the matrix-free walk has no determinant signs and no contraction ({}), so an element between vertices may be singular",
                    match self.max_norm {
                        Some(m) => format!("max ||J_z|| ~ {m:.3e}"),
                        None => "no ||J_z|| for a root layer".to_string(),
                    }
                ));
            } else {
                check.reasons.push(format!(
                    "every element is invertible but the worst is nearly singular (sigma_min / max(sigma_max, {:.3e}) = {min_relative:.3e})",
                    input.unit
                ));
            }
        } else if !vertices.exhaustive {
            check.reasons.push(format!(
                "{k} kink elements: {count} random vertices of 2^{k} checked (exhaustive up to {}), none singular",
                vertices.cap
            ));
        }
    }
}
