//! Anderson acceleration (type II) of a fixed-point iteration.

use std::collections::VecDeque;

use clarke_core::{Result, Scalar};
use ndarray::{Array1, Array2, ArrayView1, s};

use super::{Evaluator, FixedPointOptions, FixedPointReport, Tracker, start};
use crate::dense::faer_backend;
use crate::util::{all_finite, dot};

/// Solves `z = T(z)` by Anderson acceleration with memory `m = opts.anderson_memory`,
/// damping `beta = opts.damping` and relative regularisation `opts.regularization`.
///
/// With `g(z) = T(z) - z` and the last `m` differences `dG_i = g_{i+1} - g_i`,
/// `dX_i = z_{i+1} - z_i`, each step solves the small regularised least-squares problem
/// `gamma = argmin ||g_k - dG gamma||^2 + lambda ||gamma||^2` (with
/// `lambda = regularization * max_i ||dG_i||^2`, through an SVD of the stacked system so
/// that nearly dependent differences do no harm) and takes
/// `z_{k+1} = z_k + beta g_k - (dX + beta dG) gamma`. With `m = 0` it is [`picard`](super::picard);
/// any `m` is accepted, and one beyond the dimension `n` only keeps dependent differences.
///
/// On an affine map this is equivalent to GMRES on `(I - A) z = c`, so it needs far fewer
/// evaluations than Picard for slow contractions. One iteration is one evaluation of `T`;
/// the residual is `||T(z) - z|| / ||T(z0)||` and the returned `z` is the last iterate whose
/// residual was measured.
///
/// Errors: invalid options, a map that fails or returns the wrong length. Divergence and
/// non-finite values are statuses, with the trace.
///
/// ```
/// use clarke_solve::fixed_point::{anderson, FixedPointOptions};
/// use ndarray::Array1;
///
/// let (z, report) = anderson(|z: ndarray::ArrayView1<f64>| Ok(z.mapv(f64::cos)), Array1::zeros(3).view(), &FixedPointOptions::default()).unwrap();
/// assert!(report.is_converged());
/// assert!((z[1] - 0.7390851332151607).abs() < 1e-9);
/// ```
pub fn anderson<S, F>(map: F, z0: ArrayView1<'_, S>, opts: &FixedPointOptions) -> Result<(Array1<S>, FixedPointReport)>
where
    S: Scalar,
    F: FnMut(ArrayView1<'_, S>) -> Result<Array1<S>>,
{
    const NAME: &str = "anderson";
    if let Some(done) = start(NAME, z0, opts)? {
        return Ok(done);
    }
    let n = z0.len();
    let m = opts.anderson_memory;
    let mut eval = Evaluator::new(NAME, map, n);
    let mut track = Tracker::new(NAME, opts);
    let beta = S::from_f64_lossy(opts.damping);

    let mut z = z0.to_owned();
    let tz = eval.eval(z.view())?;
    track.set_scale(tz.view());
    let mut g = &tz - &z;
    let res = track.residual_at(g.view(), z.view());
    if let Some(status) = track.check(res, opts.max_iter) {
        return Ok((z, track.report(eval.count, res, status)));
    }
    // Any memory is accepted: one beyond the dimension keeps linearly dependent differences,
    // which the SVD handles. Reserve room for at most `n + 1` of them (the deques grow if
    // more are kept), so that a huge memory does not ask for a huge allocation.
    let cap = m.min(n) + 1;
    let mut dx: VecDeque<Array1<S>> = VecDeque::with_capacity(cap);
    let mut dg: VecDeque<Array1<S>> = VecDeque::with_capacity(cap);
    loop {
        let mut z_new = z.clone();
        z_new.scaled_add(beta, &g);
        if !dg.is_empty() {
            match mixing_coefficients(&dg, g.view(), opts.regularization) {
                Some(gamma) => {
                    for (j, &gj) in gamma.iter().enumerate() {
                        z_new.scaled_add(-gj, &dx[j]);
                        z_new.scaled_add(-gj * beta, &dg[j]);
                    }
                }
                None => {
                    // The least-squares problem gave no usable answer: forget the history.
                    dx.clear();
                    dg.clear();
                }
            }
        }
        track.iterations += 1;
        let tz_new = eval.eval(z_new.view())?;
        let g_new = &tz_new - &z_new;
        let res = track.residual_at(g_new.view(), z_new.view());
        if m > 0 {
            dx.push_back(&z_new - &z);
            dg.push_back(&g_new - &g);
            if dg.len() > m {
                dx.pop_front();
                dg.pop_front();
            }
        }
        z = z_new;
        g = g_new;
        if let Some(status) = track.check(res, opts.max_iter) {
            return Ok((z, track.report(eval.count, res, status)));
        }
    }
}

/// `argmin ||g - dG gamma||^2 + lambda ||gamma||^2` through the SVD of the stacked matrix
/// `[dG; sqrt(lambda) I]`; `None` if the data or the answer are not finite.
pub(crate) fn mixing_coefficients<S: Scalar>(
    dg: &VecDeque<Array1<S>>,
    g: ArrayView1<'_, S>,
    reg: f64,
) -> Option<Array1<S>> {
    let k = dg.len();
    let n = g.len();
    if dg.iter().any(|d| !all_finite(d.view())) {
        return None;
    }
    let colmax = dg
        .iter()
        .map(|d| dot(d.view(), d.view()))
        .fold(S::zero(), |a, b| a.max(b));
    let lam = S::from_f64_lossy(reg) * colmax;
    let mut a = Array2::<S>::zeros((n + k, k));
    for (j, d) in dg.iter().enumerate() {
        a.slice_mut(s![..n, j]).assign(d);
        a[[n + j, j]] = lam.sqrt();
    }
    let mut rhs = Array1::<S>::zeros(n + k);
    rhs.slice_mut(s![..n]).assign(&g);
    // An SVD that fails to converge is treated like unusable data: the caller drops the
    // history and takes a plain damped step.
    match faer_backend::lstsq(a.view(), rhs.view()) {
        Ok(fit) if all_finite(fit.solution.view()) => Some(fit.solution),
        _ => None,
    }
}
