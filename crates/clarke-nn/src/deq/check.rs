//! The hypothesis check of a DEQ cell: is `I - diag(d) W` invertible for every `d` the
//! conservative Jacobian allows at the solution?
//!
//! The parametrisations carry certificates (monotone: every `d` in `[0, 1]^n`; a spectral
//! bound below one: a contraction for every `d`). Without one, each sample's block goes
//! through the vertex walk of `clarke-implicit` (one engine for every layer), with the
//! selections at the sample's kink units flipped over their hull.
//!
//! Up to [`CheckOptions::dense_limit`] units the norm of `W` is proven and each sample's
//! block is dense: a power iteration on `W^T W`, warm-started from the previous check of the
//! layer, estimates `||W||` from below, and a Cholesky factorisation of `t^2 I - W^T W`
//! proves `||W|| < t` for `t` just above the estimate (see [`WeightNorm::proven`]); an SVD
//! decides when that fails. The certificate costs a fraction of an SVD (at width 128, a Gram
//! matrix and one or two factorisations, against an SVD some fifteen times dearer). Above it nothing `n x n` is built or factored: the norm of `W` is
//! a power-iteration estimate with a safety margin (see [`NORM_MARGIN_PER_TOL`]) and each
//! sample is walked matrix-free with the products `J_z v = d o (W v)` and
//! `J_z^T w = W^T (d o w)` ([`cell_jacobian_product`]).

use clarke_core::{ElementSelection, Error, Result, Scalar};
use clarke_implicit::check::{Flippable, Form, WalkInput, merge_samples, walk_vertices, walk_vertices_matrix_free};
use clarke_implicit::{CheckOptions, CheckOutcome, HypothesisCheck};
use std::cell::RefCell;

use clarke_solve::dense::singular_values;
use clarke_solve::{FnOperator, SpectralOptions, largest_singular_value};
use ndarray::linalg::general_mat_vec_mul;
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut1};
use rayon::prelude::*;

use super::Parametrization;

/// The relative tolerance of the power iteration that estimates `||W||` for a certificate
/// (or [`CheckOptions::norm_tol`] when that is tighter).
///
/// The estimate `||W v||` never exceeds `||W||`; it rises towards it at the rate
/// `r = (s_2 / s_1)^2` per iteration and stops when its relative change is at most the
/// tolerance, when its deficit is about `tol * r / (1 - r)`. With the loose `norm_tol` of
/// the other estimates (1e-3) the deficit of a random `W`, whose top singular values
/// crowd together, reaches several percent (5.6% at width 40: an estimate of 0.850 for a
/// norm of 0.900). At 1e-9 a deficit of 1% needs `s_2` within 1e-7 of `s_1`; an estimate
/// that does not settle within the options' budget is not used.
pub(crate) const NORM_TOL: f64 = 1e-9;

/// How far above its estimate `||W||` is taken to be, per unit of the tolerance used: a
/// margin of `50 tol` covers every `r` up to `50 / 51`.
pub(crate) const NORM_MARGIN_PER_TOL: f64 = 50.0;

/// How far above the dense estimate the Cholesky certificate tries `t` (relative), in order,
/// once the estimate has settled: the first factorisation that succeeds proves `||W|| < t`.
/// The smallest is within 1e-6 of the norm; the larger ones keep the certificate cheap when
/// the top singular values crowd each other, at a bound up to 1% high.
const CHOLESKY_MARGINS: [f64; 4] = [1e-7, 1e-5, 1e-3, 1e-2];

/// The margins tried when the full budget ran out before the estimate settled (in training,
/// where the top singular values of the normalised `W` crowd each other and the power
/// iteration converges slowly). On the digits run no such estimate was ever within 1e-7 of
/// the norm and one in sixteen within 1e-5, so those margins only cost factorisations; 5e-2
/// spares most of the SVDs that followed a failure at 1e-2.
const UNSETTLED_MARGINS: [f64; 3] = [1e-3, 1e-2, 5e-2];

/// The products of the first, short round of the dense estimate. Warm-started from the
/// previous check while training moves `W` a little per step, a few products usually put the
/// estimate within 0.1% of the norm, which [`QUICK_MARGINS`] then prove without running the
/// full budget.
const QUICK_ESTIMATE_ITERATIONS: usize = 4;

/// The margins tried after the short round when the estimate has not settled: one
/// factorisation (about 50 µs at width 128, as much as the Gram matrix) proves a bound at most
/// 0.1% above the norm in about two thirds of the digits run's steps, a second one at 1%
/// most of the rest; only then does the estimate run its full budget. A tighter first margin
/// failed more often than not in training (the warm-started estimate lags `W` by more than
/// 1e-5).
const QUICK_MARGINS: [f64; 2] = [1e-3, 1e-2];

/// The relative change of the dense estimate `||W v||^2` at which its power iteration stops.
const DENSE_ESTIMATE_TOL: f64 = 1e-12;

/// The power iteration budget of the dense estimate: products with `W^T W`, each `n^2`
/// multiply-adds, so the budget costs about a Cholesky factorisation at width 128.
const DENSE_ESTIMATE_ITERATIONS: usize = 40;

/// The relative amount by which `t^2` is lowered before the factorisation, far above the
/// rounding error of forming and factoring `t^2 I - W^T W` in f64 (about `n u ||W||^2`),
/// so that a factorisation that succeeds proves `||W|| < t`.
const CHOLESKY_ROUNDING_SLACK: f64 = 1e-10;

/// The dense estimate's vector from the previous check of a layer: the warm start of the
/// next one (training moves `W` a little per step).
pub(crate) type NormWarmStart = RefCell<Option<Array1<f64>>>;

/// The kinks of a batch at the solution: per sample, the units treated as at a kink.
pub(crate) struct SampleKinks {
    /// Unit indices per sample (row).
    pub units: Vec<Vec<usize>>,
    /// The hull of the activation's derivative at its kink.
    pub hull: (f64, f64),
    /// How many of the kinks are within the forward solver's error (not exact or near).
    pub within_solver_error: usize,
}

impl SampleKinks {
    fn total(&self) -> usize {
        self.units.iter().map(Vec::len).sum()
    }
}

/// Runs the check. `d` is the selected derivative at the solution (rows are samples) and
/// `residuals` the forward residual `||sigma(p) - z||` of each sample; `warm` is the layer's
/// warm start of the dense norm estimate.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run<S: Scalar>(
    parametrization: Parametrization,
    lipschitz: f64,
    w: ArrayView2<'_, S>,
    d: ArrayView2<'_, S>,
    kinks: &SampleKinks,
    residuals: &[f64],
    options: &CheckOptions,
    warm: &NormWarmStart,
) -> Result<HypothesisCheck> {
    let total = kinks.total();
    let worst_residual = residuals.iter().copied().fold(0.0, f64::max);
    let mut check = HypothesisCheck::not_checked("");
    check.reasons.clear();
    check.kink_elements = total;
    if let Parametrization::Monotone { m } = parametrization {
        check.outcome = CheckOutcome::Certified;
        check.reasons.push(format!(
            "monotone parametrisation: the symmetric part of I - W is at least m I (m = {m}), so I - diag(d) W \
             is invertible for every d in [0, 1]^n, whatever the selections at the {total} kink element(s)"
        ));
        return Ok(check);
    }
    let matrix_free = w.nrows() > options.dense_limit;
    let norm = if matrix_free {
        WeightNorm::estimate(w, options)?
    } else {
        match WeightNorm::proven(w, lipschitz, warm)? {
            Some(norm) => norm,
            None => WeightNorm::exact(w)?,
        }
    };
    if let Some(bound) = norm.certified_bound(lipschitz) {
        check.outcome = CheckOutcome::Certified;
        check.contraction_bound = Some(bound);
        check.max_vertex_norm = Some(norm.value * lipschitz);
        check.sigma_min = Some(1.0 - bound);
        check.error_bound = Some(worst_residual / (1.0 - bound));
        check.matrix_free = matrix_free;
        check.products = norm.products;
        check.reasons.push(format!(
            "||diag(d) W|| <= {bound:.6} < 1 for every d in [0, 1]^n ({}): a contraction for every selection",
            norm.describe()
        ));
        return Ok(check);
    }
    // No certificate from the parametrisation: walk each sample's block.
    let samples: Vec<Result<HypothesisCheck>> = d
        .outer_iter()
        .into_par_iter()
        .zip(kinks.units.par_iter())
        .zip(residuals.par_iter())
        .map(|((di, units), &residual)| {
            let input = sample_input(units, kinks.hull, residual);
            if matrix_free {
                walk_vertices_matrix_free(&input, options, w.nrows(), |selections, transpose, x, y| {
                    cell_jacobian_product(w, di, selections, transpose, x, y)
                })
            } else {
                Ok(walk_vertices(&input, options, |selections| Ok(dense_jacobian(w, di, selections)))?.check)
            }
        })
        .collect();
    let mut merged = merge_samples(samples.into_iter().collect::<Result<Vec<_>>>()?);
    if kinks.within_solver_error > 0 {
        merged.reasons.push(format!(
            "{} unit(s) within the forward solver's error bound of the kink are treated as at it and walked",
            kinks.within_solver_error
        ));
    }
    if merged.outcome == CheckOutcome::Certified || merged.outcome == CheckOutcome::Warning {
        merged.reasons.push(format!(
            "{}: no certificate from the parametrisation; each sample's block was walked{}",
            norm.describe(),
            if matrix_free { " matrix-free" } else { "" }
        ));
    }
    Ok(merged)
}

/// The walk's input for one sample: its kink units, flippable over the activation's hull.
fn sample_input(units: &[usize], (low, high): (f64, f64), residual: f64) -> WalkInput {
    WalkInput {
        form: Form::FixedPoint,
        flippable: units
            .iter()
            .map(|&element| Flippable {
                node: 0,
                element,
                low,
                high,
            })
            .collect(),
        kink_elements: units.len(),
        frozen: 0,
        within_solver_error: 0,
        forward_residual: residual,
        unit: 1.0,
    }
}

/// `d` with the selections' values at their units.
fn selected_derivative<S: Scalar>(d: ArrayView1<'_, S>, selections: &[ElementSelection]) -> Array1<S> {
    let mut selected = d.to_owned();
    for s in selections {
        selected[s.element] = S::from_f64_lossy(s.value);
    }
    selected
}

/// `J_z = diag(d) W` of one sample, dense, with the selections at the flipped units.
fn dense_jacobian<S: Scalar>(w: ArrayView2<'_, S>, d: ArrayView1<'_, S>, selections: &[ElementSelection]) -> Array2<S> {
    let d = selected_derivative(d, selections);
    let mut j = w.to_owned();
    for (mut row, &di) in j.outer_iter_mut().zip(&d) {
        row.mapv_inplace(|v| di * v);
    }
    j
}

/// One product with the Jacobian of the DEQ cell for one sample, `J_z = diag(d) W`, without
/// forming it: `y = d o (W x)`, or with `transpose`, `y = W^T (d o x)`. `d` is the selected
/// derivative `sigma'(p*)` of the sample; `selections` override it at their units (the
/// element of the conservative Jacobian the hypothesis check measures).
///
/// The cost is one matrix-vector product with `W` (`n x n`).
///
/// # Errors
/// A `W` that is not square, or `d`, `x`, `y` not of its size.
pub fn cell_jacobian_product<S: Scalar>(
    w: ArrayView2<'_, S>,
    d: ArrayView1<'_, S>,
    selections: &[ElementSelection],
    transpose: bool,
    x: ArrayView1<'_, S>,
    mut y: ArrayViewMut1<'_, S>,
) -> Result<()> {
    let n = w.nrows();
    if w.ncols() != n || [d.len(), x.len(), y.len()].iter().any(|&len| len != n) {
        return Err(Error::shapes(
            "cell_jacobian_product",
            &[w.nrows(), w.ncols(), d.len(), x.len(), y.len()],
            &[n, n, n, n, n],
            "W must be square and d, x, y of its size",
        ));
    }
    let d = selected_derivative(d, selections);
    if transpose {
        transposed_product(w, (&d * &x).view(), y);
    } else {
        general_mat_vec_mul(S::one(), &w, &x, S::zero(), &mut y);
        y *= &d;
    }
    Ok(())
}

/// `y = W^T x`, reading `W` row by row (`y += x_i W_i`): the rows are contiguous, where a
/// product with the transposed view walks the columns of `W` with a stride of its width (at
/// 4,096 units, one cache miss per element and most of the check's time).
fn transposed_product<S: Scalar>(w: ArrayView2<'_, S>, x: ArrayView1<'_, S>, mut y: ArrayViewMut1<'_, S>) {
    y.fill(S::zero());
    for (row, &xi) in w.outer_iter().zip(x.iter()) {
        if xi != S::zero() {
            y.scaled_add(xi, &row);
        }
    }
}

/// `||W||_2` as a certificate `||W|| L < 1` may use it.
#[derive(Debug, Clone, Copy)]
struct WeightNorm {
    /// The exact norm (SVD) or the power-iteration estimate, which never lies above it.
    value: f64,
    /// A bound certainly at least `||W||`: the value itself when exact, else
    /// [`entry_bound`].
    upper: f64,
    /// The relative margin added to the value (0 when exact), or `None` for an estimate that
    /// did not converge, which certifies nothing.
    margin: Option<f64>,
    /// Products with `W` or `W^T` the estimate used (0 when exact).
    products: usize,
    /// `value` is a bound `t > ||W||` proven by a Cholesky factorisation of `t^2 I - W^T W`
    /// (`products` is then the power iteration's count).
    proven: bool,
}

impl WeightNorm {
    /// The norm by a full SVD.
    fn exact<S: Scalar>(w: ArrayView2<'_, S>) -> Result<Self> {
        let value = singular_values(w)?.first().map_or(0.0, |s| s.to_f64_exact());
        Ok(WeightNorm {
            value,
            upper: value,
            margin: Some(0.0),
            products: 0,
            proven: false,
        })
    }

    /// A proven bound `t >= ||W||`, without an SVD.
    ///
    /// With the Gram matrix `G = W^T W`, a power iteration on `G` warm-started from the
    /// previous check's vector gives `e^2 = v^T G v <= ||W||^2`; then for `t = e (1 + margin)`
    /// over [`CHOLESKY_MARGINS`], `||W|| < t` exactly when `t^2 I - G` is positive definite,
    /// which one Cholesky factorisation decides (with `t^2` lowered by
    /// [`CHOLESKY_ROUNDING_SLACK`] so that rounding cannot pass a matrix that is not). The
    /// first success is the bound. `None` (the SVD decides) when no margin certifies anything
    /// (`t L >= 1`) or no factorisation succeeds.
    fn proven<S: Scalar>(w: ArrayView2<'_, S>, lipschitz: f64, warm: &NormWarmStart) -> Result<Option<Self>> {
        let n = w.nrows();
        if n == 0 || w.ncols() != n {
            return Ok(None);
        }
        let w64 = w.mapv(|v| v.to_f64_exact());
        let mut test = NormTest::of(w64.view());
        let start = warm.borrow().as_ref().filter(|v| v.len() == n).cloned();
        let mut estimate = PowerEstimate {
            v: start.unwrap_or_else(|| Array1::from_shape_fn(n, |i| 1.0 + (i % 7) as f64 / 7.0)),
            image: Array1::zeros(n),
            scratch: Array1::zeros(n),
            squared: 0.0,
            products: 0,
            settled: false,
        };
        // A short round first: in training the warm start makes it enough. Then the full
        // budget, when the short round proved nothing; a settled estimate tries the margins
        // from the tightest.
        let rounds: [(usize, &[f64]); 2] = [
            (QUICK_ESTIMATE_ITERATIONS, &QUICK_MARGINS),
            (DENSE_ESTIMATE_ITERATIONS, &UNSETTLED_MARGINS),
        ];
        for (budget, margins) in rounds {
            if !estimate.run(w64.view(), budget) {
                return Ok(None);
            }
            estimate.save(warm);
            let margins = if estimate.settled {
                &CHOLESKY_MARGINS[..]
            } else {
                margins
            };
            let e = estimate.squared.max(0.0).sqrt();
            for margin in margins {
                let t = e * (1.0 + margin);
                if t * lipschitz >= 1.0 || t.is_nan() {
                    break;
                }
                if test.below(t) {
                    return Ok(Some(WeightNorm {
                        value: t,
                        upper: t,
                        margin: Some(0.0),
                        products: estimate.products,
                        proven: true,
                    }));
                }
            }
            if estimate.settled {
                break;
            }
        }
        Ok(None)
    }

    /// The norm by Lanczos bidiagonalisation of `W` (tolerance [`NORM_TOL`] or a tighter
    /// `norm_tol`, budget `spectral_iterations`, the options' seed), with the margin of
    /// [`NORM_MARGIN_PER_TOL`] and the bound from the entries.
    fn estimate<S: Scalar>(w: ArrayView2<'_, S>, options: &CheckOptions) -> Result<Self> {
        let op = FnOperator::new(w.nrows(), w.ncols(), |x, mut y| {
            general_mat_vec_mul(S::one(), &w, &x, S::zero(), &mut y);
            Ok(())
        })
        .with_transpose(|x, y| {
            transposed_product(w, x, y);
            Ok(())
        });
        let tol = options.norm_tol.min(NORM_TOL);
        let spectral = SpectralOptions::default()
            .with_tol(tol)
            .with_max_iter(options.spectral_iterations)
            .with_seed(options.seed);
        let est = largest_singular_value(&op, &spectral)?;
        let usable = est.is_converged() && est.value.is_finite();
        Ok(WeightNorm {
            value: est.value,
            upper: entry_bound(w),
            margin: usable.then_some(NORM_MARGIN_PER_TOL * tol),
            products: est.matvecs,
            proven: false,
        })
    }

    /// The bound on `||diag(d) W||` over every `d` in `[0, lipschitz]^n` when it is below
    /// one: the smaller of the bound from the entries and the value with its margin.
    fn certified_bound(&self, lipschitz: f64) -> Option<f64> {
        let with_margin = self.margin.map(|m| self.value * (1.0 + m));
        let bound = with_margin.map_or(self.upper, |v| v.min(self.upper)) * lipschitz;
        (bound < 1.0).then_some(bound)
    }

    /// `||W|| = ...` and how it was obtained, for the reasons.
    fn describe(&self) -> String {
        match self.margin {
            Some(_) if self.proven => format!(
                "||W|| < {:.8} (a power-iteration estimate, {} products with W^T W, raised and proven by a Cholesky factorisation of t^2 I - W^T W)",
                self.value, self.products
            ),
            Some(_) if self.products == 0 => format!("||W|| = {:.6}", self.value),
            Some(m) => format!(
                "||W|| ~ {:.6} by Lanczos ({} products), taken as {:.6} with a {:.2}% margin; bound from the entries {:.6}",
                self.value,
                self.products,
                self.value * (1.0 + m),
                100.0 * m,
                self.upper
            ),
            None => format!(
                "||W|| ~ {:.6} by Lanczos, not converged after {} products; bound from the entries {:.6}",
                self.value, self.products, self.upper
            ),
        }
    }
}

/// The power iteration on the Gram matrix behind [`WeightNorm::proven`]: `squared` is the
/// Rayleigh quotient `v^T G v` of the unit vector before the last product, which never
/// exceeds `||W||^2`.
struct PowerEstimate {
    v: Array1<f64>,
    /// `W v`, on the way to `W^T W v`.
    image: Array1<f64>,
    scratch: Array1<f64>,
    squared: f64,
    products: usize,
    settled: bool,
}

impl PowerEstimate {
    /// Runs until `budget` products in all or until the quotient settles; `false` when the
    /// vector vanished or stopped being finite.
    fn run(&mut self, w: ArrayView2<'_, f64>, budget: usize) -> bool {
        while !self.settled && self.products < budget {
            let norm = self.v.dot(&self.v).sqrt();
            if !(norm > 0.0 && norm.is_finite()) {
                return false;
            }
            self.v /= norm;
            // `W^T (W v)`: the Gram matrix holds only its lower triangle.
            clarke_core::gemm::gemv(1.0, w, self.v.view(), 0.0, self.image.view_mut());
            clarke_core::gemm::gemv(1.0, w.t(), self.image.view(), 0.0, self.scratch.view_mut());
            self.products += 1;
            let next = self.image.dot(&self.image);
            self.settled = (next - self.squared).abs() <= DENSE_ESTIMATE_TOL * next;
            self.squared = next;
            std::mem::swap(&mut self.v, &mut self.scratch);
        }
        true
    }

    /// Keeps the current direction as the next check's warm start.
    fn save(&self, warm: &NormWarmStart) {
        let norm = self.v.dot(&self.v).sqrt();
        if norm > 0.0 && norm.is_finite() {
            *warm.borrow_mut() = Some(&self.v / norm);
        }
    }
}

/// The factorisations that decide `||W|| < t` for one `W`: whether `t^2 I - W^T W` (with
/// `t^2` lowered by [`CHOLESKY_ROUNDING_SLACK`]) is positive definite, which its Cholesky
/// factorisation (faer, in place) decides by meeting no non-positive pivot. The Gram matrix,
/// the factor and the workspace are formed once for all the margins a check tries.
struct NormTest {
    /// The lower triangle of `W^T W`, all the factorisation reads (the upper one is not
    /// formed: half the multiply-adds of a GEMM).
    gram: faer::Mat<f64>,
    l: faer::Mat<f64>,
    buf: faer::dyn_stack::MemBuffer,
}

impl NormTest {
    fn of(w: ArrayView2<'_, f64>) -> Self {
        use faer::linalg::cholesky::llt::factor::cholesky_in_place_scratch;
        use faer::linalg::matmul::triangular::{BlockStructure, matmul};
        use faer_ext::IntoFaer;
        let n = w.ncols();
        let mut gram = faer::Mat::<f64>::zeros(n, n);
        let w = w.into_faer();
        matmul(
            gram.as_mut(),
            BlockStructure::TriangularLower,
            faer::Accum::Replace,
            w.transpose(),
            BlockStructure::Rectangular,
            w,
            BlockStructure::Rectangular,
            1.0,
            faer::Par::Seq,
        );
        clarke_core::avx::clear_upper_state();
        let scratch = cholesky_in_place_scratch::<f64>(n, faer::Par::Seq, Default::default());
        NormTest {
            gram,
            l: faer::Mat::zeros(n, n),
            buf: faer::dyn_stack::MemBuffer::new(scratch),
        }
    }

    /// Whether `||W|| < t`: whether `t^2 I - W^T W` (with `t^2` lowered by
    /// [`CHOLESKY_ROUNDING_SLACK`]) is positive definite. The Gram matrix is column-major, so
    /// the part of each column from the diagonal down is one contiguous copy.
    fn below(&mut self, t: f64) -> bool {
        let _avx = clarke_core::avx::UpperStateGuard;
        use faer::dyn_stack::MemStack;
        use faer::linalg::cholesky::llt::factor::cholesky_in_place;
        let n = self.gram.nrows();
        let shift = t * t * (1.0 - CHOLESKY_ROUNDING_SLACK);
        for j in 0..n {
            let source = self.gram.col_as_slice(j);
            let column = self.l.col_as_slice_mut(j);
            for (l, &g) in column[j..].iter_mut().zip(&source[j..]) {
                *l = -g;
            }
            column[j] += shift;
        }
        cholesky_in_place(
            self.l.as_mut(),
            Default::default(),
            faer::Par::Seq,
            MemStack::new(&mut self.buf),
            Default::default(),
        )
        .is_ok()
    }
}

/// `min(||W||_F, sqrt(||W||_1 ||W||_inf))`: a bound on `||W||_2` from the entries, in
/// `O(n^2)` and without iteration (loose for a dense random `W`, exact for a diagonal one).
fn entry_bound<S: Scalar>(w: ArrayView2<'_, S>) -> f64 {
    let abs = |v: &S| v.to_f64_exact().abs();
    let frobenius = w.iter().map(|v| abs(v) * abs(v)).sum::<f64>().sqrt();
    let max_row = w
        .rows()
        .into_iter()
        .map(|r| r.iter().map(abs).sum::<f64>())
        .fold(0.0, f64::max);
    let max_col = w
        .columns()
        .into_iter()
        .map(|c| c.iter().map(abs).sum::<f64>())
        .fold(0.0, f64::max);
    frobenius.min((max_row * max_col).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr1;

    fn diagonal(values: &[f64]) -> Array2<f64> {
        Array2::from_diag(&arr1(values))
    }

    #[test]
    fn the_cholesky_certificate_is_just_above_the_norm() {
        let w = diagonal(&[0.9, -0.5, 0.3]);
        let warm = NormWarmStart::default();
        // From a cold start the short round proves a bound at most 0.1% high.
        let norm = WeightNorm::proven(w.view(), 1.0, &warm).unwrap().expect("certified");
        assert!(
            norm.proven && norm.value > 0.9 && norm.value <= 0.9 * (1.0 + 1e-3),
            "{}",
            norm.value
        );
        // The warm start is kept: the next call settles within the short round, and a
        // settled estimate is proven from the tightest margin.
        let mut again = WeightNorm::proven(w.view(), 1.0, &warm).unwrap().unwrap();
        for _ in 0..3 {
            again = WeightNorm::proven(w.view(), 1.0, &warm).unwrap().unwrap();
        }
        assert!(again.products <= 2, "{} products", again.products);
        assert!(
            again.value > 0.9 && again.value <= 0.9 * (1.0 + 2e-7),
            "{}",
            again.value
        );
        // Nothing to certify when the Lipschitz constant makes t L >= 1.
        assert!(WeightNorm::proven(w.view(), 1.2, &warm).unwrap().is_none());
    }

    #[test]
    fn a_short_estimate_is_not_certified_by_the_factorisation() {
        // Started exactly on the second singular vector, the power iteration settles at 0.5,
        // far below the norm 0.95: no margin makes t^2 I - W^T W definite, the SVD decides.
        let w = diagonal(&[0.95, 0.5, 0.2]);
        let warm = NormWarmStart::new(Some(arr1(&[0.0, 1.0, 0.0])));
        assert!(WeightNorm::proven(w.view(), 1.0, &warm).unwrap().is_none());
        // Just below the norm, indefinite by 1e-9: the factorisation fails; just above, not.
        for (t, definite) in [(0.95 * (1.0 - 1e-9), false), (0.95 * (1.0 + 1e-9), true)] {
            assert_eq!(NormTest::of(w.view()).below(t), definite, "t = {t}");
        }
    }

    #[test]
    fn where_the_top_singular_values_crowd_the_bound_is_proven_a_little_high() {
        // sigma_2 / sigma_1 = 0.99: the budget leaves the estimate short, a larger margin
        // proves the bound, and warm starts tighten it call by call.
        let n = 48;
        let raw = Array2::from_shape_fn((n, n), |(i, j)| (((7 * i + 3 * j) % 11) as f64 - 5.0) / n as f64);
        let exact = WeightNorm::exact(raw.view()).unwrap().value;
        let w = &raw * (0.8 / exact);
        let warm = NormWarmStart::default();
        let first = WeightNorm::proven(w.view(), 1.0, &warm).unwrap().expect("certified");
        assert!((0.8..=0.8 * 1.01).contains(&first.value), "{}", first.value);
        let mut last = first.value;
        for _ in 0..40 {
            last = WeightNorm::proven(w.view(), 1.0, &warm).unwrap().unwrap().value;
        }
        // The short rounds stop at the first margin that proves a bound, 0.1% above the
        // estimate, until the estimate settles and the tightest margin takes over.
        assert!((0.8..=0.8 * (1.0 + 1e-3)).contains(&last), "after warm starts: {last}");
    }
}
