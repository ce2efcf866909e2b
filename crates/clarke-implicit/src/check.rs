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
//! With at most [`CheckOptions::exhaustive_limit`] kink elements all vertices are walked;
//! with more, random vertices are sampled and the verdict is at best a warning. For `z`
//! larger than [`CheckOptions::dense_limit`] the check estimates the spectral radius of
//! `J_z` by power iteration (the selected element is invertible when it is below one) and
//! relies on a declared [`CheckOptions::contraction_bound`] for a certificate.
//!
//! The check also turns the forward residual into an error bound on `z*`:
//! `||z - z*|| <~ ||T(z) - z|| / sigma_min(A)`.

use clarke_core::{ElementSelection, Result, Scalar};
use clarke_solve::dense::singular_values;
use clarke_solve::{spectral_radius, FnOperator, SpectralOptions};
use ndarray::{Array2, ArrayView2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::inner::Linearization;
use crate::options::CheckOptions;
use crate::report::{CheckOutcome, HypothesisCheck};

/// Which equation a layer solves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    /// `z = T(z, theta)`: the inverted block is `I - J_z`.
    FixedPoint,
    /// `F(z, theta) = 0`: the inverted block is `J_F`.
    Root,
}

/// The inverted block `A` from the Jacobian of the map.
pub(crate) fn block<S: Scalar>(form: Form, j: Array2<S>) -> Array2<S> {
    match form {
        Form::Root => j,
        Form::FixedPoint => {
            let mut a = j.mapv(|v| -v);
            for i in 0..a.nrows() {
                a[[i, i]] += S::one();
            }
            a
        }
    }
}

/// A check's result, with the dense block of the selected element when it was built (the
/// dense adjoint solve reuses it).
pub(crate) struct Checked<S: Scalar> {
    pub check: HypothesisCheck,
    pub block: Option<Array2<S>>,
}

/// One flippable kink element: where it is and the interval of its selection.
#[derive(Debug, Clone, Copy)]
struct KinkElement {
    node: usize,
    element: usize,
    low: f64,
    high: f64,
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
    /// The spectrum of a square matrix (an SVD and an LU).
    pub fn of<S: Scalar>(a: ArrayView2<'_, S>) -> Result<Self> {
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

/// Runs the check at the linearization `lin`.
pub(crate) fn run_check<S: Scalar>(
    lin: &Linearization<'_, S>,
    form: Form,
    forward_residual: f64,
    opts: &CheckOptions,
) -> Result<Checked<S>> {
    if !opts.enabled {
        return Ok(Checked {
            check: HypothesisCheck::not_checked("the check is switched off"),
            block: None,
        });
    }
    let ledger = lin.ledger();
    let mut kinks = Vec::new();
    let mut kink_elements = 0;
    let mut frozen_ties = 0;
    let mut near = 0;
    for r in ledger.records() {
        kink_elements += r.exact;
        near += r.near;
        match r.hull {
            Some((low, high)) if low < high => kinks.extend(r.kink_indices.iter().map(|&element| KinkElement {
                node: r.node,
                element,
                low,
                high,
            })),
            Some(_) => {}
            None => frozen_ties += r.exact,
        }
    }
    let mut check = HypothesisCheck {
        outcome: CheckOutcome::Warning,
        kink_elements,
        flippable: kinks.len(),
        contraction_bound: opts.contraction_bound,
        reasons: Vec::new(),
        ..HypothesisCheck::not_checked("")
    };
    if near > 0 {
        check.reasons.push(format!(
            "{near} element(s) within the policy's tolerance of a kink were not explored"
        ));
    }
    if frozen_ties > 0 {
        check.reasons.push(format!(
            "{frozen_ties} tie(s) of max/min reductions follow the tie rule and were not explored"
        ));
    }

    if let Some(bound) = opts.contraction_bound {
        if form == Form::FixedPoint && bound < 1.0 {
            check.outcome = CheckOutcome::Certified;
            check.sigma_min = Some(1.0 - bound);
            check.error_bound = Some(forward_residual / (1.0 - bound));
            check.reasons.push(format!(
                "declared contraction bound ||J_z|| <= {bound} < 1 for every selection"
            ));
            return Ok(Checked { check, block: None });
        }
        check.reasons.push(format!(
            "the declared contraction bound {bound} certifies nothing (needs < 1 on a fixed point)"
        ));
    }

    let n = lin.len();
    if n > opts.dense_limit {
        matrix_free(lin, form, opts, &mut check)?;
        return Ok(Checked { check, block: None });
    }

    let j_selected = lin.jacobian(&[])?;
    let mut max_norm: Option<f64> = match form {
        Form::FixedPoint => Some(largest_singular_value(j_selected.view())?),
        Form::Root => None,
    };
    let selected = block(form, j_selected);
    let sel = Spectrum::of(selected.view())?;
    check.sigma_min = Some(sel.sigma_min);
    check.sigma_max = Some(sel.sigma_max);
    check.error_bound = Some(if sel.sigma_min > 0.0 {
        forward_residual / sel.sigma_min
    } else {
        f64::INFINITY
    });
    let mut violated = Vec::new();
    if sel.relative() <= opts.singular_tol {
        violated.push(format!(
            "the selected element is singular: sigma_min = {:.3e}, sigma_max = {:.3e}",
            sel.sigma_min, sel.sigma_max
        ));
    }

    // Walk the vertices of the selection box.
    let k = kinks.len();
    let exhaustive = k <= opts.exhaustive_limit;
    let vertices: Vec<u64> = if exhaustive {
        (0..1u64 << k).collect()
    } else {
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        (0..opts.samples).map(|_| rng.random::<u64>()).collect()
    };
    let mut signs = vec![sel.det_sign];
    // (smallest sigma_min / sigma_max, smallest sigma_min) over the vertices.
    let mut min_vertex: Option<(f64, f64)> = None;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ 0x9e37_79b9);
    if k > 0 {
        for &v in &vertices {
            let selections: Vec<ElementSelection> = kinks
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
            let j = lin.jacobian(&selections)?;
            if let Some(m) = max_norm.as_mut() {
                *m = m.max(largest_singular_value(j.view())?);
            }
            let spec = Spectrum::of(block(form, j).view())?;
            signs.push(spec.det_sign);
            min_vertex = Some(match min_vertex {
                None => (spec.relative(), spec.sigma_min),
                Some((r, s)) => (r.min(spec.relative()), s.min(spec.sigma_min)),
            });
            if spec.relative() <= opts.singular_tol && violated.len() < 3 {
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
    check.vertices = if k > 0 { vertices.len() } else { 0 };
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

    let min_relative = min_vertex.map_or(sel.relative(), |(r, _)| r.min(sel.relative()));
    if !violated.is_empty() {
        check.outcome = CheckOutcome::Violated;
        check.reasons.splice(0..0, violated);
    } else if exhaustive && frozen_ties == 0 {
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
                format!(
                    "det(A) keeps one sign at all {} vertices: every element is invertible",
                    vertices.len()
                )
            });
        } else {
            check.reasons.push(format!(
                "every element is invertible but the worst is nearly singular (sigma_min/sigma_max = {min_relative:.3e})"
            ));
        }
    } else if !exhaustive {
        check.reasons.push(format!(
            "{k} kink elements: {} random vertices of 2^{k} checked, none singular",
            vertices.len()
        ));
    }
    Ok(Checked {
        check,
        block: Some(selected),
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
        |x: ndarray::ArrayView1<'_, S>, mut y: ndarray::ArrayViewMut1<'_, S>| {
            y.assign(&lin.vjp(x, &[])?);
            Ok(())
        },
    );
    let spectral = SpectralOptions::default()
        .with_max_iter(opts.radius_iterations)
        .with_tol(1e-3)
        .with_seed(opts.seed);
    let est = spectral_radius(&op, &spectral)?;
    check.spectral_radius = Some(est.value);
    if est.value < 1.0 {
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
