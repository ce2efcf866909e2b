//! Damped Picard (fixed-point) iteration.

use clarke_core::{Result, Scalar};
use ndarray::{Array1, ArrayView1};

use super::{Evaluator, FixedPointOptions, FixedPointReport, Tracker, start};

/// Solves `z = T(z)` by the damped iteration `z <- z + beta (T(z) - z)`,
/// `beta = opts.damping`.
///
/// Converges (linearly, at the contraction rate) when `T` is a contraction; `beta < 1` can
/// help when the Jacobian of `T` has eigenvalues near -1. One iteration is one evaluation of
/// `T`. The residual is `||T(z) - z|| / ||T(z0)||` (see the [module docs](super)); the
/// returned `z` is the last iterate whose residual was measured.
///
/// Errors: invalid options, a map that fails or returns the wrong length. A non-contractive
/// map ends with [`SolveStatus::Diverged`](crate::SolveStatus::Diverged) or
/// [`SolveStatus::NonFinite`](crate::SolveStatus::NonFinite), with the trace.
///
/// ```
/// use clarke_solve::fixed_point::{picard, FixedPointOptions};
/// use ndarray::{array, Array1};
///
/// // z = cos(z), componentwise
/// let (z, report) = picard(|z: ndarray::ArrayView1<f64>| Ok(z.mapv(f64::cos)), Array1::zeros(2).view(), &FixedPointOptions::default()).unwrap();
/// assert!(report.is_converged());
/// assert!((z[0] - 0.7390851332151607).abs() < 1e-9);
/// ```
pub fn picard<S, F>(map: F, z0: ArrayView1<'_, S>, opts: &FixedPointOptions) -> Result<(Array1<S>, FixedPointReport)>
where
    S: Scalar,
    F: FnMut(ArrayView1<'_, S>) -> Result<Array1<S>>,
{
    const NAME: &str = "picard";
    if let Some(done) = start(NAME, z0, opts)? {
        return Ok(done);
    }
    let mut eval = Evaluator::new(NAME, map, z0.len());
    let mut track = Tracker::new(NAME, opts);
    let beta = S::from_f64_lossy(opts.damping);
    let mut z = z0.to_owned();
    loop {
        let tz = eval.eval(z.view())?;
        track.set_scale(tz.view());
        let g = &tz - &z;
        let res = track.residual_at(g.view(), z.view());
        if let Some(status) = track.check(res, opts.max_iter) {
            return Ok((z, track.report(eval.count, res, status)));
        }
        z.scaled_add(beta, &g);
        track.iterations += 1;
    }
}
