//! Limited-memory "good" Broyden for fixed points.

use clarke_core::{Result, Scalar};
use ndarray::{Array1, ArrayView1};

use super::{Evaluator, FixedPointOptions, FixedPointReport, Tracker, start};
use crate::util::{dot, norm2};

/// The inverse-Jacobian estimate `H = beta I + sum_i u_i v_i^T`.
struct InverseJacobian<S: Scalar> {
    beta: S,
    us: Vec<Array1<S>>,
    vs: Vec<Array1<S>>,
}

impl<S: Scalar> InverseJacobian<S> {
    fn apply(&self, x: ArrayView1<'_, S>) -> Array1<S> {
        let mut y = x.mapv(|v| v * self.beta);
        for (u, v) in self.us.iter().zip(&self.vs) {
            y.scaled_add(dot(v.view(), x), u);
        }
        y
    }

    fn apply_transpose(&self, x: ArrayView1<'_, S>) -> Array1<S> {
        let mut y = x.mapv(|v| v * self.beta);
        for (u, v) in self.us.iter().zip(&self.vs) {
            y.scaled_add(dot(u.view(), x), v);
        }
        y
    }
}

/// Solves `z = T(z)` by the limited-memory "good" Broyden method on `F(z) = z - T(z) = 0`.
///
/// The inverse Jacobian of `F` is estimated as `H = beta I + sum u_i v_i^T`
/// (`beta = opts.damping`, so the first step is a damped Picard step); after a step
/// `s = z_{k+1} - z_k` with `y = F(z_{k+1}) - F(z_k)`, the good Broyden update
/// `H <- H + (s - H y) s^T H / (s^T H y)` is stored as one more rank-one term (skipped when
/// `s^T H y` vanishes). After `opts.broyden_memory` terms the estimate restarts from
/// `beta I`. There is no line search: each step is the full quasi-Newton step
/// `z <- z - H F(z)`.
///
/// One iteration is one evaluation of `T`; the residual is `||T(z) - z|| / ||T(z0)||` and
/// the returned `z` is the last iterate whose residual was measured. Errors: invalid options,
/// a map that fails or returns the wrong length; divergence and non-finite values are
/// statuses, with the trace.
///
/// ```
/// use clarke_solve::fixed_point::{broyden, FixedPointOptions};
/// use ndarray::Array1;
///
/// let (z, report) = broyden(|z: ndarray::ArrayView1<f64>| Ok(z.mapv(f64::cos)), Array1::zeros(3).view(), &FixedPointOptions::default()).unwrap();
/// assert!(report.is_converged());
/// assert!((z[2] - 0.7390851332151607).abs() < 1e-9);
/// ```
pub fn broyden<S, F>(map: F, z0: ArrayView1<'_, S>, opts: &FixedPointOptions) -> Result<(Array1<S>, FixedPointReport)>
where
    S: Scalar,
    F: FnMut(ArrayView1<'_, S>) -> Result<Array1<S>>,
{
    const NAME: &str = "broyden";
    if let Some(done) = start(NAME, z0, opts)? {
        return Ok(done);
    }
    let n = z0.len();
    let mut eval = Evaluator::new(NAME, map, n);
    let mut track = Tracker::new(NAME, opts);
    let mut h = InverseJacobian {
        beta: S::from_f64_lossy(opts.damping),
        us: Vec::new(),
        vs: Vec::new(),
    };
    let eps = S::epsilon();

    let mut z = z0.to_owned();
    let tz = eval.eval(z.view())?;
    track.set_scale(tz.view());
    // g = T(z) - z = -F(z)
    let mut g = &tz - &z;
    let res = track.residual_at(g.view(), z.view());
    if let Some(status) = track.check(res, opts.max_iter) {
        return Ok((z, track.report(eval.count, res, status)));
    }
    loop {
        // Quasi-Newton step: s = -H F = H g.
        let step = h.apply(g.view());
        let z_new = &z + &step;
        track.iterations += 1;
        let tz_new = eval.eval(z_new.view())?;
        let g_new = &tz_new - &z_new;
        let res = track.residual_at(g_new.view(), z_new.view());
        if let Some(status) = track.check(res, opts.max_iter) {
            return Ok((z_new, track.report(eval.count, res, status)));
        }
        if h.us.len() >= opts.broyden_memory {
            h.us.clear();
            h.vs.clear();
        }
        if opts.broyden_memory > 0 {
            // y = F_new - F = g - g_new
            let y = &g - &g_new;
            let hy = h.apply(y.view());
            let denom = dot(step.view(), hy.view());
            let size = norm2(step.view()) * norm2(hy.view());
            if denom.is_finite() && denom.abs() > eps * size {
                let u = (&step - &hy).mapv(|v| v / denom);
                let v = h.apply_transpose(step.view());
                h.us.push(u);
                h.vs.push(v);
            }
        }
        z = z_new;
        g = g_new;
    }
}
