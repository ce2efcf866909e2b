//! Projections on the tape: box, non-negative orthant, simplex, l1 ball.
//!
//! The box and the non-negative orthant are the tape's own `clamp` and `relu`: their kinks
//! go straight into the backward ledger and follow the policy's `clamp_low`/`clamp_high` and
//! `relu` selections. The simplex and l1-ball projections are fused nodes: both are
//! `x_i = s_i max(|u_i| - tau, 0)` with a threshold `tau(u)` that makes the constraint
//! tight, so their Jacobian is `J = D - (d s)(d s)^T / sum(d)` with `d` the derivative of
//! the `max` (1 active, 0 inactive, the policy's selection at `|u_i| == tau`) and `s` the
//! signs. This is what backpropagation through `relu(u - tau(u))` computes when `tau` is
//! differentiated implicitly, hence an element of a conservative Jacobian for every
//! selection in `[0, 1]`.
//!
//! `J` is symmetric, so the fused nodes' JVP (forward mode, [`clarke_core::Tape::jvp`]) is
//! the same product as their VJP, with the same selections and the same ledger record.

use std::rc::Rc;

use clarke_core::{Error, Result, Scalar, Var, VjpContext};
use ndarray::{ArrayD, IxDyn};

use crate::kinks::{KinkSite, Prox, SiteKind, declare, resolve};
use crate::prox::check_finite;

/// Clamps every element to `[lo, hi]` (the projection onto a box). The derivative at a
/// bound is the policy's `clamp_low` / `clamp_high`; the kinks are in the backward ledger
/// under `"clamp"`.
///
/// Infinite bounds are allowed (`lo = -inf` or `hi = inf` leave that side open); `lo == hi`
/// is the single point `{lo}`, every element then sits on both bounds.
///
/// # Errors
/// A NaN bound, or `lo > hi` (the box is empty and has no projection), naming
/// `project_box` and both bounds; a non-finite element of `u`.
pub fn project_box<'t, S: Scalar>(u: Var<'t, S>, lo: S, hi: S) -> Result<Var<'t, S>> {
    const OP: &str = "project_box";
    if lo.is_nan() || hi.is_nan() || lo > hi {
        return Err(Error::invalid(
            OP,
            format!("the box [lo, hi] must be non-empty with lo <= hi and no NaN, got lo = {lo}, hi = {hi}"),
        ));
    }
    u.with_value(|v| check_finite(OP, "input u", v))?;
    u.try_clamp(lo, hi)
}

/// `max(u, 0)`, the projection onto the non-negative orthant: the tape's `relu`, with
/// relu'(0) from the policy and its kinks in the backward ledger.
pub fn project_nonneg<'t, S: Scalar>(u: Var<'t, S>) -> Result<Var<'t, S>> {
    u.with_value(|v| check_finite("project_nonneg", "input u", v))?;
    Ok(u.relu())
}

/// The threshold `tau` with `sum_i max(a_i - tau, 0) = radius`, by sorting: O(p log p).
/// When `sum_i max(a_i, 0) <= radius` no threshold `>= 0` reaches the radius and the result
/// is the `tau < 0` that does (for the simplex projection `max(a - tau, 0)`, which then
/// lifts every entry).
///
/// The search runs on `a_i - max(a)`, so the result is `max(a)` plus a threshold computed
/// to the rounding of the radius, not of the entries.
///
/// # Errors
/// A `radius` that is not finite and `> 0` (the simplex of radius 0 is the single point 0,
/// a negative radius gives an empty set: neither has a threshold), an empty `a`, or a
/// non-finite entry, naming `simplex_threshold` and the value.
pub fn simplex_threshold(a: &[f64], radius: f64) -> Result<f64> {
    const OP: &str = "simplex_threshold";
    check_radius(OP, radius)?;
    if a.is_empty() {
        return Err(Error::invalid(OP, "the input is empty: the simplex in R^0 is empty"));
    }
    if let Some((i, v)) = a.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::invalid(
            OP,
            format!("input has a non-finite value {v} at index {i}"),
        ));
    }
    let (top, shifted) = shift_by_max(a);
    Ok(top + shifted_threshold(&shifted, radius))
}

/// Checks a ball or simplex radius: finite and `> 0`.
fn check_radius(op: &'static str, radius: f64) -> Result<()> {
    if radius.is_finite() && radius > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            format!(
                "radius must be finite and > 0, got {radius} (radius 0 is the single point 0, a negative radius an empty set)"
            ),
        ))
    }
}

/// `max(a)` and `a_i - max(a)`: the largest entry becomes 0, and the entries within the
/// radius of it are exact (Sterbenz) whenever the radius is at most half its magnitude.
fn shift_by_max(a: &[f64]) -> (f64, Vec<f64>) {
    let top = a.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (top, a.iter().map(|v| v - top).collect())
}

/// The threshold `tau` with `sum_i max(b_i - tau, 0) = radius` for `b` with maximum 0: it
/// lies in `[-radius, 0)`, so neither its search nor the gaps `b_i - tau` lose the radius to
/// rounding against large entries (starting from the unshifted entries, the first step
/// `a_max - (a_max - radius)` rounds to 0 once `a_max` is above `radius / eps`).
fn shifted_threshold(b: &[f64], radius: f64) -> f64 {
    let mut sorted: Vec<f64> = b.to_vec();
    sorted.sort_by(|x, y| y.total_cmp(x));
    let mut cumsum = 0.0;
    let mut tau = -radius;
    for (k, &v) in sorted.iter().enumerate() {
        cumsum += v;
        let t = (cumsum - radius) / (k + 1) as f64;
        if v - t > 0.0 {
            tau = t;
        } else {
            break;
        }
    }
    tau
}

/// Projection onto the simplex `{x >= 0, sum x = radius}` (`radius > 0`):
/// `x = max(u - tau, 0)`.
///
/// # Errors
/// A `radius` that is not finite and `> 0` (0 would make the set the single point 0, a
/// negative radius an empty set), a `u` that is not a non-empty vector of finite values.
///
/// The derivative at `u_i == tau` (a coordinate on the boundary of the active face) is the
/// policy's `relu` selection `d_i`; the Jacobian is `D - d d^T / sum(d)`. The site reports
/// those coordinates (`"project_simplex"`).
///
/// ```
/// use clarke_convex::project::project_simplex;
/// use clarke_core::{BackwardOptions, KinkPolicy, Tape};
/// use ndarray::{arr1, Array1};
///
/// let tape = Tape::<f64>::new();
/// let u = tape.param(arr1(&[1.0, 0.0, -1.0]).into_dyn());
/// let x = project_simplex(u, 1.0).unwrap();
/// assert_eq!(x.out.value().as_slice().unwrap(), &[1.0, 0.0, 0.0]);
/// assert_eq!(x.site.kink_indices, vec![1]); // u_1 == tau == 0
/// // With relu'(0) = 1 the kink coordinate counts as active: J = [[.5, -.5, 0], [-.5, .5, 0], [0, 0, 0]].
/// let seed = arr1(&[1.0, 0.0, 0.0]).into_dyn();
/// let g = x.out.backward_with(&BackwardOptions::seed(seed).with_policy(KinkPolicy::one())).unwrap();
/// assert_eq!(g.wrt(u).unwrap().as_slice().unwrap(), &[0.5, -0.5, 0.0]);
/// ```
pub fn project_simplex<S: Scalar>(u: Var<'_, S>, radius: f64) -> Result<Prox<'_, S>> {
    threshold_projection(u, radius, false)
}

/// Projection onto the l1 ball `{||x||_1 <= radius}` (`radius > 0`): `u` itself inside the
/// ball, else soft-thresholding `S_tau(u)` with `tau` such that `||S_tau(u)||_1 = radius`.
///
/// At `|u_i| == tau` the derivative is the policy's `soft_threshold` selection; the
/// Jacobian is `D - (d s)(d s)^T / sum(d)` with `s = sign(u)`. A point exactly on the
/// sphere `||u||_1 == radius` is treated as inside (the identity Jacobian).
///
/// # Errors
/// As [`project_simplex`] (a radius of 0 would make the ball the single point 0, a negative
/// one an empty set).
pub fn project_l1_ball<S: Scalar>(u: Var<'_, S>, radius: f64) -> Result<Prox<'_, S>> {
    threshold_projection(u, radius, true)
}

fn threshold_projection<S: Scalar>(u: Var<'_, S>, radius: f64, l1: bool) -> Result<Prox<'_, S>> {
    let op: &'static str = if l1 { "project_l1_ball" } else { "project_simplex" };
    check_radius(op, radius)?;
    let uv = u.value();
    if uv.ndim() != 1 {
        return Err(Error::shapes(op, uv.shape(), &[uv.len()], "the input must be a vector"));
    }
    if uv.is_empty() {
        return Err(Error::invalid(op, "the input is empty"));
    }
    check_finite(op, "input u", &uv)?;
    let x: Vec<f64> = uv.iter().map(|v| v.to_f64_exact()).collect();
    let a: Vec<f64> = if l1 {
        x.iter().map(|v| v.abs()).collect()
    } else {
        x.clone()
    };
    let inside = l1 && a.iter().sum::<f64>() <= radius;
    // Thresholds and gaps on `a - max(a)`, where the threshold is within the radius of 0:
    // `x_i = max(a_i - tau, 0)` keeps the radius even for entries far above it.
    let (a, tau) = if inside {
        (a, 0.0)
    } else {
        let (_, b) = shift_by_max(&a);
        let tau = shifted_threshold(&b, radius);
        (b, tau)
    };
    let tol = u.tape().policy().tolerance;
    let mut kinks = Vec::new();
    let mut near = 0;
    let mut out = Vec::with_capacity(x.len());
    for (i, (&xi, &ai)) in x.iter().zip(&a).enumerate() {
        if inside {
            out.push(S::from_f64_lossy(xi));
            continue;
        }
        let gap = ai - tau;
        if gap == 0.0 {
            kinks.push(i);
        } else if gap.abs() <= tol {
            near += 1;
        }
        let v = gap.max(0.0);
        out.push(S::from_f64_lossy(if l1 { v * xi.signum() } else { v }));
    }
    let p = x.len();
    let gaps: Vec<f64> = a.iter().map(|&ai| ai - tau).collect();
    let value = ArrayD::from_shape_vec(IxDyn(&[p]), out).map_err(|e| Error::invalid(op, e.to_string()))?;
    let kind = if l1 { SiteKind::SoftThreshold } else { SiteKind::Relu };
    let jacobian = Rc::new(ThresholdJacobian {
        op,
        kind,
        inside,
        gaps: gaps.clone(),
        sign: x.iter().map(|v| if l1 { sign_f64(*v) } else { 1.0 }).collect(),
    });
    let vjp_jacobian = jacobian.clone();
    let out = u
        .tape()
        .try_custom_fn_ctx(op, &[u], value, move |ctx, _inputs, _o, grad| {
            let gu = vjp_jacobian.apply(ctx, grad.iter().map(|v| v.to_f64_exact()))?;
            Ok(vec![Some(gu)])
        })?;
    // `J` is symmetric: the tangent is the same product as the VJP's.
    u.tape()
        .set_custom_jvp(out, move |ctx, _inputs, _o, tangents| match &tangents[0] {
            Some(t) => jacobian.apply(ctx, t.iter().map(|v| v.to_f64_exact())),
            None => jacobian.apply(ctx, std::iter::repeat_n(0.0, jacobian.gaps.len())),
        })?;
    if !inside {
        declare(out, op, gaps)?;
    }
    Ok(Prox {
        out,
        site: KinkSite {
            node: out.id(),
            op,
            elements: p,
            kink_indices: kinks,
            near,
            kind,
        },
    })
}

/// The Jacobian `J = D - (d s)(d s)^T / sum(d)` of a threshold projection at its recorded
/// point (the identity inside the l1 ball), with `d` resolved per call.
struct ThresholdJacobian {
    op: &'static str,
    kind: SiteKind,
    /// The point was inside the l1 ball: `J = I`, no kinks.
    inside: bool,
    /// `a_i - tau` per coordinate (`a = |u|` for the l1 ball, `u` for the simplex).
    gaps: Vec<f64>,
    /// `sign(u_i)` for the l1 ball, 1 for the simplex.
    sign: Vec<f64>,
}

impl ThresholdJacobian {
    /// `J v` (`J` is symmetric, so this is also `J^T v`) under the call's selections: the
    /// slopes `d` come from the kink rule of [`resolve`], which reports the node's ledger
    /// record. The VJP and the JVP both go through here, so the two modes select the same
    /// element of the conservative Jacobian and report the same kinks.
    fn apply<S: Scalar>(&self, ctx: &VjpContext<'_>, v: impl Iterator<Item = f64>) -> Result<ArrayD<S>> {
        let v: Vec<f64> = v.collect();
        let out: Vec<f64> = if self.inside {
            v
        } else {
            let d = resolve(ctx, self.op, self.kind, &[self.gaps.len()], self.gaps.iter().copied())?;
            let total: f64 = d.iter().sum();
            let dsv: f64 = d.iter().zip(&self.sign).zip(&v).map(|((d, s), v)| d * s * v).sum();
            let coef = if total > 0.0 { dsv / total } else { 0.0 };
            d.iter()
                .zip(&self.sign)
                .zip(&v)
                .map(|((&di, &si), &vi)| di * vi - di * si * coef)
                .collect()
        };
        let out: Vec<S> = out.into_iter().map(S::from_f64_lossy).collect();
        ArrayD::from_shape_vec(IxDyn(&[out.len()]), out).map_err(|e| Error::invalid(self.op, e.to_string()))
    }
}

fn sign_f64(v: f64) -> f64 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}
