//! Proximal operators on the tape: soft-thresholding and group soft-thresholding.
//!
//! Both are fused nodes with their own vector-Jacobian products. Off their kinks the VJP is
//! the ordinary derivative. At a kink (`|u_i| == lambda_i` for soft-thresholding,
//! `||u_g|| == lambda_g` for a group) the derivative is not defined and the conservative
//! Jacobian is the segment between the two one-sided derivatives; the VJP picks the point
//! `q` of that segment given by the **backward call's** [`KinkPolicy::soft_threshold`]
//! (`q = 0`: the inactive side, `q = 1`: the active side). So one recorded graph can be
//! differentiated under several policies, and an implicit layer built on these ops inherits
//! the policy of the outer backward. The kinks hit at recording time are returned in a
//! [`Prox`] (see [`crate::kinks`]).
//!
//! **Forward mode.** Both ops have a JVP ([`clarke_core::Tape::jvp`]) that takes its slopes
//! from the same per-element resolution as the VJP (the same policy, band and element
//! selections) and reports the same ledger record, so the JVP and the VJP of one set of
//! options are the two products of one element of the conservative Jacobian, at kinks too.
//!
//! Thresholds are tape values too, so gradients reach `lambda` (the hyperparameter of a
//! Lasso-type model): `d S_lambda(u)_i / d lambda_i = -sign(u_i)` on the active side.
//!
//! [`KinkPolicy::soft_threshold`]: clarke_core::KinkPolicy::soft_threshold

use std::ops::Range;
use std::rc::Rc;

use clarke_core::{Error, Result, Scalar, Var, VjpContext};
use ndarray::{ArrayD, ArrayViewD, IxDyn};

use crate::kinks::{KinkSite, Prox, SiteKind, declare, resolve};

/// The name of the soft-thresholding node (errors, ledger records, kink sites).
const SOFT_THRESHOLD: &str = "soft_threshold";
const GROUP_SOFT_THRESHOLD: &str = "group_soft_threshold";

/// `S_lambda(u) = sign(u) max(|u| - lambda, 0)` on one value, in f64 (for solvers' inner
/// loops, which validate their thresholds once).
///
/// A NaN `u` or `lambda` gives NaN (it is not thresholded to 0). `lambda` must be `>= 0`:
/// a negative one is passed on unchecked (this is a per-element kernel) and moves `u` away
/// from 0 instead of towards it, which is not a prox; [`soft_threshold`] checks it.
#[inline]
pub fn soft_threshold_scalar(u: f64, lambda: f64) -> f64 {
    if u > lambda {
        u - lambda
    } else if u < -lambda {
        u + lambda
    } else if u.is_nan() || lambda.is_nan() {
        f64::NAN
    } else {
        0.0
    }
}

/// Values of a threshold Var: one value (shape `[]` or `[1]`) or one per element of `u`.
pub(crate) fn thresholds<S: Scalar>(op: &'static str, u: &[usize], t: &ArrayD<S>, what: &str) -> Result<Vec<S>> {
    let scalar = t.len() == 1 && t.ndim() <= 1;
    if !scalar && t.shape() != u {
        return Err(Error::shapes(
            op,
            u,
            t.shape(),
            format!("{what} must be a scalar (shape [] or [1]) or have the input's shape"),
        ));
    }
    nonnegative_values(op, what, t)
}

/// The values of `t` (row-major), each checked finite and `>= 0`; the error names the first
/// offending value and its flat index.
fn nonnegative_values<S: Scalar>(op: &'static str, what: &str, t: &ArrayD<S>) -> Result<Vec<S>> {
    let vals: Vec<S> = t.iter().copied().collect();
    if let Some((i, v)) = vals
        .iter()
        .enumerate()
        .find(|(_, v)| !(v.is_finite() && **v >= S::zero()))
    {
        return Err(Error::invalid(
            op,
            format!("{what} must be finite and >= 0, got {v} at flat index {i}"),
        ));
    }
    Ok(vals)
}

pub(crate) fn check_finite<S: Scalar>(op: &'static str, what: &str, a: &ArrayD<S>) -> Result<()> {
    if let Some((i, v)) = a.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::invalid(
            op,
            format!("{what} has a non-finite value {v} at flat index {i}"),
        ));
    }
    Ok(())
}

/// Soft-thresholding `S_lambda(u)_i = sign(u_i) max(|u_i| - lambda_i, 0)`, the prox of
/// `lambda ||.||_1`.
///
/// `lambda` is a scalar Var (shape `[]` or `[1]`) or has `u`'s shape (one threshold per
/// element, the weighted Lasso); every value must be finite and `>= 0`. Derivatives:
/// `d/du_i = 1`, `d/dlambda_i = -sign(u_i)` where `|u_i| > lambda_i`; zero where
/// `|u_i| < lambda_i`; `q` times those where `|u_i| == lambda_i`, with `q` the backward
/// policy's `soft_threshold`.
///
/// ```
/// use clarke_convex::prox::soft_threshold;
/// use clarke_core::{BackwardOptions, KinkPolicy, Tape};
/// use ndarray::{arr0, arr1};
///
/// let tape = Tape::<f64>::new();
/// let u = tape.param(arr1(&[3.0, -0.5, 1.0]).into_dyn());
/// let lambda = tape.param(arr0(1.0).into_dyn());
/// let s = soft_threshold(u, lambda).unwrap();
/// assert_eq!(s.out.value().as_slice().unwrap(), &[2.0, 0.0, 0.0]);
/// assert_eq!(s.site.kink_indices, vec![2]); // |u_2| == lambda
/// let g = s.out.sum().backward_with(&BackwardOptions::policy(KinkPolicy::midpoint())).unwrap();
/// assert_eq!(g.wrt(u).unwrap().as_slice().unwrap(), &[1.0, 0.0, 0.5]);
/// assert_eq!(g.wrt(lambda).unwrap()[[]], -1.5);
/// ```
pub fn soft_threshold<'t, S: Scalar>(u: Var<'t, S>, lambda: Var<'t, S>) -> Result<Prox<'t, S>> {
    const OP: &str = SOFT_THRESHOLD;
    if !u.same_tape(&lambda) {
        return Err(Error::ForeignVar {
            op: OP,
            node: lambda.id(),
        });
    }
    let uv = u.value();
    check_finite(OP, "input u", &uv)?;
    let shape = uv.shape().to_vec();
    let t = thresholds(OP, &shape, &lambda.value(), "threshold lambda")?;
    let tol = S::from_f64_lossy(u.tape().policy().tolerance);
    let th = |i: usize| if t.len() == 1 { t[0] } else { t[i] };
    let mut kinks = Vec::new();
    let mut near = 0;
    let value: Vec<S> = uv
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let l = th(i);
            let gap = x.abs() - l;
            if gap == S::zero() {
                kinks.push(i);
            } else if gap.abs() <= tol {
                near += 1;
            }
            S::from_f64_lossy(soft_threshold_scalar(x.to_f64_exact(), l.to_f64_exact()))
        })
        .collect();
    let value = ArrayD::from_shape_vec(IxDyn(&shape), value).map_err(|e| Error::invalid(OP, e.to_string()))?;
    let out = u
        .tape()
        .try_custom_fn_ctx(OP, &[u, lambda], value, move |ctx, inputs, _out, grad| {
            let (x, lam) = (&inputs[0], &inputs[1]);
            let lam_flat: Vec<S> = lam.iter().copied().collect();
            let d = soft_threshold_slopes(ctx, x, &lam_flat)?;
            let mut gu = Vec::with_capacity(x.len());
            let mut gl = vec![S::zero(); lam_flat.len()];
            for (i, ((&xi, &gi), &di)) in x.iter().zip(grad.iter()).zip(&d).enumerate() {
                gu.push(gi * di);
                gl[threshold_index(lam_flat.len(), i)] -= gi * di * sign(xi);
            }
            let gu = ArrayD::from_shape_vec(x.raw_dim(), gu).map_err(|e| Error::invalid(OP, e.to_string()))?;
            let gl = ArrayD::from_shape_vec(lam.raw_dim(), gl).map_err(|e| Error::invalid(OP, e.to_string()))?;
            Ok(vec![Some(gu), Some(gl)])
        })?;
    // The tangent `d_i (du_i - sign(u_i) dlambda_i)`, with the VJP's slopes `d`.
    u.tape().set_custom_jvp(out, move |ctx, inputs, _out, tangents| {
        let (x, lam) = (&inputs[0], &inputs[1]);
        let lam_flat: Vec<S> = lam.iter().copied().collect();
        let d = soft_threshold_slopes(ctx, x, &lam_flat)?;
        let tu = flat_tangent(&tangents[0], x.len());
        let tl = flat_tangent(&tangents[1], lam_flat.len());
        let t: Vec<S> = x
            .iter()
            .zip(&d)
            .enumerate()
            .map(|(i, (&xi, &di))| di * (tu[i] - sign(xi) * tl[threshold_index(lam_flat.len(), i)]))
            .collect();
        ArrayD::from_shape_vec(x.raw_dim(), t).map_err(|e| Error::invalid(OP, e.to_string()))
    })?;
    declare(
        out,
        OP,
        uv.iter().enumerate().map(|(i, &x)| (x.abs() - th(i)).to_f64_exact()),
    )?;
    Ok(Prox {
        out,
        site: KinkSite {
            node: out.id(),
            op: OP,
            elements: shape.iter().product(),
            kink_indices: kinks,
            near,
            kind: SiteKind::SoftThreshold,
        },
    })
}

#[inline]
fn sign<S: Scalar>(x: S) -> S {
    if x > S::zero() {
        S::one()
    } else if x < S::zero() {
        -S::one()
    } else {
        S::zero()
    }
}

/// The threshold that element `i` uses: the shared one, or its own.
#[inline]
fn threshold_index(thresholds: usize, i: usize) -> usize {
    if thresholds == 1 { 0 } else { i }
}

/// The slope of `max(|u_i| - lambda_i, 0)` at every element in one backward or forward-mode
/// call: the kink rule of [`resolve`] on the gaps `|u_i| - lambda_i`, which also reports the
/// node's ledger record. The VJP and the JVP both take their slopes from here, so the two
/// modes select the same element of the conservative Jacobian and report the same kinks.
fn soft_threshold_slopes<S: Scalar>(ctx: &VjpContext<'_>, x: &ArrayViewD<'_, S>, lam: &[S]) -> Result<Vec<S>> {
    let gaps = x
        .iter()
        .enumerate()
        .map(|(i, &xi)| (xi.abs() - lam[threshold_index(lam.len(), i)]).to_f64_exact());
    let d = resolve(ctx, SOFT_THRESHOLD, SiteKind::SoftThreshold, x.shape(), gaps)?;
    Ok(d.into_iter().map(S::from_f64_lossy).collect())
}

/// An input's tangent in row-major order, zeros when the input has none (`None`).
fn flat_tangent<S: Scalar>(tangent: &Option<ArrayViewD<'_, S>>, len: usize) -> Vec<S> {
    tangent
        .as_ref()
        .map_or_else(|| vec![S::zero(); len], |t| t.iter().copied().collect())
}

/// Checks that `groups` partition `0..p` into contiguous, non-empty, ordered ranges.
fn check_groups(op: &'static str, p: usize, groups: &[Range<usize>]) -> Result<()> {
    let mut next = 0;
    for (k, g) in groups.iter().enumerate() {
        if g.start != next || g.end <= g.start {
            return Err(Error::invalid(
                op,
                format!(
                    "groups must be non-empty contiguous ranges partitioning 0..{p} in order; group {k} is {g:?}, expected to start at {next}"
                ),
            ));
        }
        next = g.end;
    }
    if next != p {
        return Err(Error::invalid(
            op,
            format!("groups cover 0..{next} but the input has {p} elements"),
        ));
    }
    Ok(())
}

/// Group soft-thresholding, the prox of `sum_g lambda_g ||u_g||_2`:
/// `u_g (1 - lambda_g / ||u_g||)` when `||u_g|| > lambda_g`, else `0`.
///
/// `u` is a vector; `groups` partition its indices into contiguous ranges; `lambda` is a
/// scalar Var or has one value per group (`>= 0`). Derivatives on the active side:
/// `d/du_g = (1 - lambda/n) I + lambda u u^T / n^3` and `d/dlambda_g = -u_g / n`
/// (`n = ||u_g||`); zero on the inactive side; at `||u_g|| == lambda_g > 0` the policy's `q`
/// times the active-side limit `u u^T / lambda^2` (and `-q u / lambda`). The site reports
/// groups (not elements) at the kink.
pub fn group_soft_threshold<'t, S: Scalar>(
    u: Var<'t, S>,
    lambda: Var<'t, S>,
    groups: &[Range<usize>],
) -> Result<Prox<'t, S>> {
    const OP: &str = GROUP_SOFT_THRESHOLD;
    if !u.same_tape(&lambda) {
        return Err(Error::ForeignVar {
            op: OP,
            node: lambda.id(),
        });
    }
    let uv = u.value();
    if uv.ndim() != 1 {
        return Err(Error::shapes(OP, uv.shape(), &[uv.len()], "the input must be a vector"));
    }
    check_finite(OP, "input u", &uv)?;
    let p = uv.len();
    check_groups(OP, p, groups)?;
    let lv = lambda.value();
    let ng = groups.len();
    if !(lv.len() == 1 && lv.ndim() <= 1) && lv.shape() != [ng] {
        return Err(Error::shapes(
            OP,
            &[ng],
            lv.shape(),
            "lambda must be a scalar or have one value per group",
        ));
    }
    let lam = nonnegative_values(OP, "lambda", &lv)?;
    let tol = S::from_f64_lossy(u.tape().policy().tolerance);
    let x: Vec<S> = uv.iter().copied().collect();
    let mut out = vec![S::zero(); p];
    let mut kinks = Vec::new();
    let mut near = 0;
    for (k, g) in groups.iter().enumerate() {
        let l = if lam.len() == 1 { lam[0] } else { lam[k] };
        let n = norm(&x[g.clone()]);
        if n == l && l > S::zero() {
            kinks.push(k);
        } else if (n - l).abs() <= tol {
            near += 1;
        }
        if n > l {
            let scale = S::one() - l / n;
            for i in g.clone() {
                out[i] = x[i] * scale;
            }
        }
    }
    let groups_owned: Rc<[Range<usize>]> = groups.into();
    let jvp_groups = groups_owned.clone();
    let value = ArrayD::from_shape_vec(IxDyn(&[p]), out).map_err(|e| Error::invalid(OP, e.to_string()))?;
    let out = u
        .tape()
        .try_custom_fn_ctx(OP, &[u, lambda], value, move |ctx, inputs, _o, grad| {
            let x: Vec<S> = inputs[0].iter().copied().collect();
            let lam: Vec<S> = inputs[1].iter().copied().collect();
            let g: Vec<S> = grad.iter().copied().collect();
            let jacobians = group_jacobians(ctx, &x, &lam, &groups_owned)?;
            let mut gu = vec![S::zero(); x.len()];
            let mut gl = vec![S::zero(); lam.len()];
            for (k, (r, jac)) in groups_owned.iter().zip(&jacobians).enumerate() {
                let xs = &x[r.clone()];
                let gs = &g[r.clone()];
                let ug = dot(xs, gs);
                for ((gi, &xi), &g) in gu[r.clone()].iter_mut().zip(xs).zip(gs) {
                    *gi = jac.identity * g + jac.outer * ug * xi;
                }
                gl[threshold_index(lam.len(), k)] += jac.lambda * ug;
            }
            let gu = ArrayD::from_shape_vec(inputs[0].raw_dim(), gu).map_err(|e| Error::invalid(OP, e.to_string()))?;
            let gl = ArrayD::from_shape_vec(inputs[1].raw_dim(), gl).map_err(|e| Error::invalid(OP, e.to_string()))?;
            Ok(vec![Some(gu), Some(gl)])
        })?;
    // The tangent `J_u du + J_lambda dlambda` per group, from the VJP's group Jacobians.
    u.tape().set_custom_jvp(out, move |ctx, inputs, _o, tangents| {
        let x: Vec<S> = inputs[0].iter().copied().collect();
        let lam: Vec<S> = inputs[1].iter().copied().collect();
        let jacobians = group_jacobians(ctx, &x, &lam, &jvp_groups)?;
        let tu = flat_tangent(&tangents[0], x.len());
        let tl = flat_tangent(&tangents[1], lam.len());
        let mut t = vec![S::zero(); x.len()];
        for (k, (r, jac)) in jvp_groups.iter().zip(&jacobians).enumerate() {
            let xs = &x[r.clone()];
            let ts = &tu[r.clone()];
            let along = jac.outer * dot(xs, ts) + jac.lambda * tl[threshold_index(lam.len(), k)];
            for ((ti, &xi), &dui) in t[r.clone()].iter_mut().zip(xs).zip(ts) {
                *ti = jac.identity * dui + along * xi;
            }
        }
        ArrayD::from_shape_vec(inputs[0].raw_dim(), t).map_err(|e| Error::invalid(OP, e.to_string()))
    })?;
    let xs: Vec<S> = uv.iter().copied().collect();
    declare(
        out,
        OP,
        groups.iter().enumerate().map(|(k, g)| {
            let l = if lam.len() == 1 { lam[0] } else { lam[k] };
            if l == S::zero() {
                1.0
            } else {
                (norm(&xs[g.clone()]) - l).to_f64_exact()
            }
        }),
    )?;
    Ok(Prox {
        out,
        site: KinkSite {
            node: out.id(),
            op: OP,
            elements: ng,
            kink_indices: kinks,
            near,
            kind: SiteKind::SoftThreshold,
        },
    })
}

/// The Jacobian of one group of the group soft-threshold in one backward or forward-mode
/// call: `d/du_g = identity I + outer u_g u_g^T` and `d/dlambda_g = lambda u_g`.
#[derive(Debug, Clone, Copy)]
struct GroupJacobian<S> {
    identity: S,
    outer: S,
    lambda: S,
}

/// Every group's Jacobian under the call's selections: the kink rule of [`resolve`] on the
/// gaps `||u_g|| - lambda_g` (which also reports the node's ledger record), then the outer
/// branch `u_g (1 - lambda_g / ||u_g||)` weighted by the group's slope: 1 outside, the
/// selection `q` at (or within the band of) the kink, 0 inside. At the kink this is `q`
/// times the active-side limit. The VJP and the JVP both take their Jacobians from here, so
/// the two modes select the same element and report the same kinks.
fn group_jacobians<S: Scalar>(
    ctx: &VjpContext<'_>,
    x: &[S],
    lam: &[S],
    groups: &[Range<usize>],
) -> Result<Vec<GroupJacobian<S>>> {
    let lam_of = |k: usize| lam[threshold_index(lam.len(), k)];
    // A group with a zero threshold has no kink (the prox is the identity there).
    let gaps = groups.iter().enumerate().map(|(k, r)| {
        let l = lam_of(k);
        if l == S::zero() {
            f64::INFINITY
        } else {
            (norm(&x[r.clone()]) - l).to_f64_exact()
        }
    });
    let d = resolve(
        ctx,
        GROUP_SOFT_THRESHOLD,
        SiteKind::SoftThreshold,
        &[groups.len()],
        gaps,
    )?;
    Ok(groups
        .iter()
        .zip(d)
        .enumerate()
        .map(|(k, (r, dk))| {
            let l = lam_of(k);
            let n = norm(&x[r.clone()]);
            if l == S::zero() {
                GroupJacobian {
                    identity: S::one(),
                    outer: S::zero(),
                    lambda: if n > S::zero() { -S::one() / n } else { S::zero() },
                }
            } else if dk == 0.0 || n == S::zero() {
                GroupJacobian {
                    identity: S::zero(),
                    outer: S::zero(),
                    lambda: S::zero(),
                }
            } else {
                let q = S::from_f64_lossy(dk);
                GroupJacobian {
                    identity: q * (S::one() - l / n).max(S::zero()),
                    outer: q * l / (n * n * n),
                    lambda: -q / n,
                }
            }
        })
        .collect())
}

fn dot<S: Scalar>(a: &[S], b: &[S]) -> S {
    a.iter().zip(b).map(|(&x, &y)| x * y).sum()
}

fn norm<S: Scalar>(x: &[S]) -> S {
    x.iter().map(|&v| v * v).sum::<S>().sqrt()
}
