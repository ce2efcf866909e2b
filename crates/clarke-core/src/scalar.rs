//! The floating-point scalar types the engine works in.

use std::fmt::{Debug, Display};
use std::iter::Sum;

use ndarray::{LinalgScalar, ScalarOperand};
use num_traits::{Float, FloatConst, FromPrimitive, NumAssign};

/// A real floating-point scalar the tape can record: `f32` or `f64`.
///
/// Everything in clarke is generic over this trait. f32 matters for nonsmooth AD:
/// rounding makes exact kink hits (a pre-activation that is exactly `0.0`) common in f32 and
/// rare in f64, so the same program can take different conservative-Jacobian elements in
/// the two precisions.
pub trait Scalar:
    Float
    + FloatConst
    + FromPrimitive
    + NumAssign
    + LinalgScalar
    + ScalarOperand
    + Sum
    + Debug
    + Display
    + Default
    + Send
    + Sync
    + faer::traits::RealField
    + 'static
{
    /// Short name of the type, for reports (`"f32"` or `"f64"`).
    const NAME: &'static str;

    /// Converts from `f64`, rounding to the nearest representable value.
    fn from_f64_lossy(x: f64) -> Self;

    /// Widens to `f64` (exact for both supported types).
    fn to_f64_exact(self) -> f64;
}

impl Scalar for f32 {
    const NAME: &'static str = "f32";
    #[inline]
    fn from_f64_lossy(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn to_f64_exact(self) -> f64 {
        f64::from(self)
    }
}

impl Scalar for f64 {
    const NAME: &'static str = "f64";
    #[inline]
    fn from_f64_lossy(x: f64) -> Self {
        x
    }
    #[inline]
    fn to_f64_exact(self) -> f64 {
        self
    }
}

/// Shorthand for `S::from_f64_lossy(x)`.
#[inline]
pub fn lit<S: Scalar>(x: f64) -> S {
    S::from_f64_lossy(x)
}
