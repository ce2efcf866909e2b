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
//! Thresholds are tape values too, so gradients reach `lambda` (the hyperparameter of a
//! Lasso-type model): `d S_lambda(u)_i / d lambda_i = -sign(u_i)` on the active side.
//!
//! [`KinkPolicy::soft_threshold`]: clarke_core::KinkPolicy::soft_threshold

use std::ops::Range;

use clarke_core::{Error, Result, Scalar, Var};
use ndarray::{ArrayD, IxDyn};

use crate::kinks::{KinkSite, Prox, SiteKind, declare, resolve};

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
    const OP: &str = "soft_threshold";
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
            let at = |i: usize| {
                if lam_flat.len() == 1 {
                    (lam_flat[0], 0)
                } else {
                    (lam_flat[i], i)
                }
            };
            let gaps = x.iter().enumerate().map(|(i, &xi)| (xi.abs() - at(i).0).to_f64_exact());
            let d = resolve(ctx, OP, SiteKind::SoftThreshold, x.shape(), gaps)?;
            let mut gu = Vec::with_capacity(x.len());
            let mut gl = vec![S::zero(); lam_flat.len()];
            for (i, ((&xi, &gi), &di)) in x.iter().zip(grad.iter()).zip(&d).enumerate() {
                let d = S::from_f64_lossy(di);
                gu.push(gi * d);
                gl[at(i).1] -= gi * d * sign(xi);
            }
            let gu = ArrayD::from_shape_vec(x.raw_dim(), gu).map_err(|e| Error::invalid(OP, e.to_string()))?;
            let gl = ArrayD::from_shape_vec(lam.raw_dim(), gl).map_err(|e| Error::invalid(OP, e.to_string()))?;
            Ok(vec![Some(gu), Some(gl)])
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
    const OP: &str = "group_soft_threshold";
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
    let groups_owned: Vec<Range<usize>> = groups.to_vec();
    let value = ArrayD::from_shape_vec(IxDyn(&[p]), out).map_err(|e| Error::invalid(OP, e.to_string()))?;
    let out = u
        .tape()
        .try_custom_fn_ctx(OP, &[u, lambda], value, move |ctx, inputs, _o, grad| {
            let x: Vec<S> = inputs[0].iter().copied().collect();
            let lam: Vec<S> = inputs[1].iter().copied().collect();
            let g: Vec<S> = grad.iter().copied().collect();
            let lam_of = |k: usize| if lam.len() == 1 { lam[0] } else { lam[k] };
            // A group with a zero threshold has no kink (the prox is the identity there).
            let gaps = groups_owned.iter().enumerate().map(|(k, r)| {
                let l = lam_of(k);
                if l == S::zero() {
                    f64::INFINITY
                } else {
                    (norm(&x[r.clone()]) - l).to_f64_exact()
                }
            });
            let d = resolve(ctx, OP, SiteKind::SoftThreshold, &[groups_owned.len()], gaps)?;
            let mut gu = vec![S::zero(); x.len()];
            let mut gl = vec![S::zero(); lam.len()];
            for (k, r) in groups_owned.iter().enumerate() {
                let l = lam_of(k);
                let xs = &x[r.clone()];
                let gs = &g[r.clone()];
                let n = norm(xs);
                let ug: S = xs.iter().zip(gs).map(|(&a, &b)| a * b).sum();
                // The outer branch `x (1 - l / n)`, weighted by the group's derivative: 1 off
                // the kink on the outside, the selection at (or within the band of) it, 0
                // inside. At the kink its limit is `q l ug x / l^3`, the selected element.
                let (gx, glam): (Vec<S>, S) = if l == S::zero() {
                    (gs.to_vec(), if n > S::zero() { -ug / n } else { S::zero() })
                } else if d[k] == 0.0 || n == S::zero() {
                    (vec![S::zero(); xs.len()], S::zero())
                } else {
                    let q = S::from_f64_lossy(d[k]);
                    let a = (S::one() - l / n).max(S::zero());
                    let b = l * ug / (n * n * n);
                    (
                        xs.iter().zip(gs).map(|(&xi, &gi)| q * (a * gi + b * xi)).collect(),
                        -q * ug / n,
                    )
                };
                for (i, v) in r.clone().zip(gx) {
                    gu[i] = v;
                }
                if lam.len() == 1 {
                    gl[0] += glam;
                } else {
                    gl[k] += glam;
                }
            }
            let gu = ArrayD::from_shape_vec(inputs[0].raw_dim(), gu).map_err(|e| Error::invalid(OP, e.to_string()))?;
            let gl = ArrayD::from_shape_vec(inputs[1].raw_dim(), gl).map_err(|e| Error::invalid(OP, e.to_string()))?;
            Ok(vec![Some(gu), Some(gl)])
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

fn norm<S: Scalar>(x: &[S]) -> S {
    x.iter().map(|&v| v * v).sum::<S>().sqrt()
}
