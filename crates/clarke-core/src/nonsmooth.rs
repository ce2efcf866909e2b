//! One definition of each nonsmooth function: its value, its derivative off the kink, and
//! the selection at the kink.
//!
//! The core ops of the tape, the fused kernels of layers (the DEQ cell's activation, the
//! prox operators) and their ledgers all call these, so that a function behaves the same in
//! every mode: the same value (NaN propagates), the same derivative, and the same selection
//! inside the same band around the kink.
//!
//! **The band.** An element whose argument lies within `band` of the kink is treated as *at*
//! the kink: its derivative is the selection. `band` is `max(policy tolerance, solver error
//! bound)` (see [`crate::ledger`]); with `band = 0` only exact kinks select.

use crate::Scalar;

/// 1 if `c`, else 0, without a branch (kink masks are data dependent and unpredictable).
#[inline(always)]
pub fn one_if<S: Scalar>(c: bool) -> S {
    if c { S::one() } else { S::zero() }
}

/// Whether `x` is within `band` of the kink at 0 (false for NaN).
#[inline(always)]
pub fn at_kink<S: Scalar>(x: S, band: S) -> bool {
    x.abs() <= band
}

/// `max(x, 0)`, propagating NaN.
#[inline(always)]
pub fn relu<S: Scalar>(x: S) -> S {
    if x < S::zero() { S::zero() } else { x }
}

/// relu'(x): 1 above the band, 0 below it, `at` inside it (and 0 for NaN).
#[inline(always)]
pub fn relu_derivative<S: Scalar>(x: S, at: S, band: S) -> S {
    one_if::<S>(x > band) + at * one_if::<S>(at_kink(x, band))
}

/// `max(x, alpha x)` for `0 <= alpha < 1`, propagating NaN.
#[inline(always)]
pub fn leaky_relu<S: Scalar>(x: S, alpha: S) -> S {
    if x < S::zero() { alpha * x } else { x }
}

/// The derivative the leaky relu's selection `t` in `[0, 1]` means at the kink:
/// `alpha + t (1 - alpha)`. The ledger records this slope, the one actually applied.
#[inline]
pub fn leaky_relu_slope(alpha: f64, t: f64) -> f64 {
    alpha + t * (1.0 - alpha)
}

/// leaky_relu'(x): 1 above the band, `alpha` below it, `at` inside it (`alpha` for NaN).
#[inline(always)]
pub fn leaky_relu_derivative<S: Scalar>(x: S, alpha: S, at: S, band: S) -> S {
    // Exactly one of the three masks is 1, so the sum is exact.
    let (pos, zero) = (one_if::<S>(x > band), one_if::<S>(at_kink(x, band)));
    pos + alpha * (S::one() - pos - zero) + at * zero
}

/// abs'(x): the sign of `x` outside the band, `at` inside it.
#[inline(always)]
pub fn abs_derivative<S: Scalar>(x: S, at: S, band: S) -> S {
    one_if::<S>(x > band) - one_if::<S>(x < -band) + at * one_if::<S>(at_kink(x, band))
}

/// sign'(x): 0 outside the band, `at` inside it.
#[inline(always)]
pub fn sign_derivative<S: Scalar>(x: S, at: S, band: S) -> S {
    at * one_if::<S>(at_kink(x, band))
}

/// clamp'(x) on `[lo, hi]`: 1 inside, 0 outside, `at_low` / `at_high` within the band of
/// the bounds (the lower bound wins when both are).
#[inline(always)]
pub fn clamp_derivative<S: Scalar>(x: S, lo: S, hi: S, at_low: S, at_high: S, band: S) -> S {
    let low = at_kink(x - lo, band);
    let high = !low && at_kink(x - hi, band);
    one_if::<S>(!low && !high && x > lo && x < hi) + at_low * one_if::<S>(low) + at_high * one_if::<S>(high)
}

/// The signed distance of `x` to the nearer bound of `[lo, hi]`.
#[inline]
pub fn clamp_distance<S: Scalar>(x: S, lo: S, hi: S) -> S {
    if (x - lo).abs() <= (x - hi).abs() {
        x - lo
    } else {
        x - hi
    }
}

/// The share of `maximum(a, b)`'s gradient sent to `a`: 1 when `a` wins, 0 when `b` does,
/// `weight` when they tie within the band. For `minimum`, pass `(b, a)`.
#[inline(always)]
pub fn max_share<S: Scalar>(a: S, b: S, weight: S, band: S) -> S {
    let tie = at_kink(a - b, band);
    one_if::<S>(!tie && a > b) + weight * one_if::<S>(tie)
}

/// Soft-thresholding `sign(u) max(|u| - lambda, 0)`.
#[inline]
pub fn soft_threshold<S: Scalar>(u: S, lambda: S) -> S {
    let m = u.abs() - lambda;
    if m > S::zero() {
        if u > S::zero() { m } else { -m }
    } else if m.is_nan() {
        m
    } else {
        S::zero()
    }
}

/// The derivative of `max(gap, 0)`-type kinks (soft-thresholding's `|u| - lambda`, the
/// simplex projection's `u - tau`): 1 above the band, 0 below, `at` inside.
#[inline(always)]
pub fn gap_derivative<S: Scalar>(gap: S, at: S, band: S) -> S {
    relu_derivative(gap, at, band)
}
