//! The restricted Hessian `H_I = w X_I^T diag(s) X_I + l2 I` of the Lasso family on a set of
//! columns `I`: formed, applied matrix-free, and its extreme singular values with a
//! certificate that it is nonsingular (the hypothesis of Prop. 5 on the equicorrelation set).
//!
//! The spectrum is found in one of three ways by the size `m = |I|`:
//!
//! - up to [`SVD_LIMIT`] columns, an SVD of the formed matrix (exact);
//! - up to [`HypergradOptions::dense_support_limit`] columns, the formed matrix with a
//!   **Cholesky certificate**: Golub-Kahan-Lanczos gives `sigma_max`, and the factorisation
//!   of `H - t I` with `t = rank_tol sigma_max (1 + 1e-2)` succeeding proves `sigma_min > t`
//!   (`H` is symmetric, so its singular values are its eigenvalues); inverse iteration with
//!   that factor then estimates `sigma_min` (a Rayleigh quotient, never below it). This costs
//!   `m^3 / 3` instead of the SVD's `O(10 m^3)`. A failed factorisation falls back to the
//!   SVD, which then decides;
//! - above it, nothing `m x m` is formed: Lanczos on the products estimates both ends, and
//!   the verdict is a warning, not a certificate.

use std::sync::Arc;

use clarke_core::{Error, Result};
use clarke_solve::dense::singular_values;
use clarke_solve::spectral::{SpectralOptions, largest_singular_value, smallest_singular_value};
use clarke_solve::{FnOperator, LinearOperator, SolveReport};
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut1};

use super::HypergradOptions;
use crate::design::Column;
use crate::model::LassoModel;

/// Up to this many columns the spectrum comes from an SVD.
pub const SVD_LIMIT: usize = 128;

/// Budget of the inverse iteration that estimates `sigma_min` once the Cholesky
/// factorisation has proven its lower bound (the value is reported, the verdict does not
/// depend on it): about `4e8` flops, between 12 and 200 iterations; and its relative
/// tolerance.
fn inverse_iterations(m: usize) -> usize {
    ((4e8 / (m as f64 * m as f64)) as usize).clamp(12, 200)
}
const INVERSE_ITERATION_TOL: f64 = 1e-8;

/// `w X_I^T diag(s) X_I + l2 I` for the columns `idx`, `s` the loss curvature at the fit
/// (`None`: the squared loss, `s = 1`).
///
/// A dense design scatters column `a` (times the curvature) into a buffer and dots it with
/// every column `b >= a` (`O(m^2 n / 2)`). A sparse design is accumulated row by row, `H
/// += s_i x_i x_i^T` over the rows of `X_I`, which costs `sum_i k_i^2` for `k_i` entries of
/// row `i` in the columns `I`: far less than a dot product per pair of columns, since two
/// sparse columns rarely share a row.
pub(crate) fn gram(model: &LassoModel, idx: &[usize], s: Option<&[f64]>) -> Array2<f64> {
    let m = idx.len();
    let (w, n) = (model.weight(), model.n());
    let mut h = Array2::zeros((m, m));
    if model.is_sparse() {
        // The columns `idx` as compressed rows: (position in idx, value) per row.
        let mut row_ptr = vec![0usize; n + 1];
        for &j in idx {
            if let Column::Sparse { rows, .. } = model.col(j) {
                rows.iter().for_each(|&i| row_ptr[i + 1] += 1);
            }
        }
        for i in 0..n {
            row_ptr[i + 1] += row_ptr[i];
        }
        let mut next = row_ptr.clone();
        let mut entries = vec![(0usize, 0.0f64); row_ptr[n]];
        for (a, &j) in idx.iter().enumerate() {
            if let Column::Sparse { rows, values } = model.col(j) {
                for (&i, &v) in rows.iter().zip(values) {
                    entries[next[i]] = (a, v);
                    next[i] += 1;
                }
            }
        }
        for i in 0..n {
            let row = &entries[row_ptr[i]..row_ptr[i + 1]];
            let weight = w * s.map_or(1.0, |s| s[i]);
            for (k, &(a, va)) in row.iter().enumerate() {
                let wa = weight * va;
                // Positions increase along a row, so (a, b) with b >= a fills the upper
                // triangle.
                for &(b, vb) in &row[k..] {
                    h[[a, b]] += wa * vb;
                }
            }
        }
        for a in 0..m {
            h[[a, a]] += model.l2();
            for b in a + 1..m {
                h[[b, a]] = h[[a, b]];
            }
        }
        return h;
    }
    let mut left = vec![0.0; n];
    for a in 0..m {
        let column = model.col(idx[a]);
        column.axpy(1.0, &mut left);
        if let Some(s) = s {
            column.scale_rows(s, &mut left);
        }
        for b in a..m {
            let v = w * model.col(idx[b]).dot(&left);
            h[[a, b]] = v;
            h[[b, a]] = v;
        }
        h[[a, a]] += model.l2();
        column.clear_rows(&mut left);
    }
    h
}

/// The default of [`HypergradOptions::dense_support_limit`]: above this many features the
/// support method works matrix-free (see the module
/// documentation): forming and factoring an `m x m` matrix costs `O(m^3)`, a product with
/// it on the columns `O(nnz)`.
pub const DENSE_SUPPORT_LIMIT: usize = 5_000;

/// Relative residual of the matrix-free solves.
pub(crate) const MATRIX_FREE_TOL: f64 = 1e-12;

/// `out = (w X_I^T diag(s) X_I + l2 I) v` on the columns `idx` (`u` a work buffer of `n`
/// zeros, left zero).
fn gram_product(
    model: &LassoModel,
    idx: &[usize],
    s: Option<&[f64]>,
    v: ArrayView1<'_, f64>,
    mut out: ArrayViewMut1<'_, f64>,
    u: &mut [f64],
) {
    for (a, &j) in idx.iter().enumerate() {
        if v[a] != 0.0 {
            model.col(j).axpy(v[a], u);
        }
    }
    if let Some(s) = s {
        u.iter_mut().zip(s).for_each(|(x, c)| *x *= c);
    }
    let (w, l2) = (model.weight(), model.l2());
    for (a, &j) in idx.iter().enumerate() {
        out[a] = w * model.col(j).dot(u) + l2 * v[a];
    }
    u.iter_mut().for_each(|x| *x = 0.0);
}

/// The symmetric operator `w X_I^T diag(s) X_I + l2 I` on the columns `idx`, applied
/// without forming it (its own transpose).
pub(crate) fn gram_operator<'a>(
    model: &'a LassoModel,
    idx: &'a [usize],
    s: Option<&'a [f64]>,
) -> impl LinearOperator<f64> + 'a {
    let m = idx.len();
    let buffer = std::cell::RefCell::new(vec![0.0; model.n()]);
    let buffer_t = std::cell::RefCell::new(vec![0.0; model.n()]);
    FnOperator::new(m, m, move |v: ArrayView1<'_, f64>, out: ArrayViewMut1<'_, f64>| {
        gram_product(model, idx, s, v, out, &mut buffer.borrow_mut());
        Ok(())
    })
    .with_transpose(move |v: ArrayView1<'_, f64>, out: ArrayViewMut1<'_, f64>| {
        gram_product(model, idx, s, v, out, &mut buffer_t.borrow_mut());
        Ok(())
    })
}

/// How [`spectrum`] found the extreme singular values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum SpectrumMethod {
    /// An SVD of the formed matrix: exact.
    Svd,
    /// Lanczos for `sigma_max`, a Cholesky factorisation proving `sigma_min > lower`,
    /// inverse iteration for the value of `sigma_min`.
    Cholesky {
        /// The proven lower bound on `sigma_min`.
        lower: f64,
    },
    /// Matrix-free Lanczos estimates (`converged`: both met their tolerance).
    Lanczos {
        /// Whether both estimates converged.
        converged: bool,
    },
}

/// The extreme singular values of `H_I` and how they were found.
#[derive(Debug, Clone)]
pub(crate) struct Spectrum {
    /// Smallest singular value (an estimate from above unless [`SpectrumMethod::Svd`]).
    pub sigma_min: f64,
    /// Largest singular value.
    pub sigma_max: f64,
    /// How.
    pub method: SpectrumMethod,
    /// The Cholesky factor of the certificate, kept for the solve with `H_I`.
    pub factor: Option<Arc<ShiftedFactor>>,
}

/// The Cholesky factor `L L^T = H - t I` of a certificate: with iterative refinement it
/// solves `H v = g`, so the support method need not form and factor `H` a second time.
#[derive(Debug)]
pub(crate) struct ShiftedFactor {
    l: faer::Mat<f64>,
}

impl ShiftedFactor {
    /// `(H - t I)^{-1} v` in place.
    fn apply_inverse(&self, v: &mut faer::Mat<f64>) {
        let _avx = clarke_core::avx::UpperStateGuard;
        use faer::dyn_stack::{MemBuffer, MemStack};
        use faer::linalg::cholesky::llt::solve::{solve_in_place_scratch, solve_in_place_with_conj};
        let par = faer::Par::Seq;
        let mut buf = MemBuffer::new(solve_in_place_scratch::<f64>(self.l.nrows(), 1, par));
        solve_in_place_with_conj(
            self.l.as_ref(),
            faer::Conj::No,
            v.as_mut(),
            par,
            MemStack::new(&mut buf),
        );
    }

    /// `H v = g` by iterative refinement on the shifted factor (`v <- v + (H - t I)^{-1} (g -
    /// H v)`, which contracts by `t / sigma_min < 1`), `H` applied on the columns `idx`;
    /// `None` when the relative residual has not fallen to `tol` after a few steps.
    pub(crate) fn solve(
        &self,
        model: &LassoModel,
        idx: &[usize],
        s: Option<&[f64]>,
        g: ArrayView1<'_, f64>,
        tol: f64,
    ) -> Option<Array1<f64>> {
        let m = g.len();
        let scale = g.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        let mut v = Array1::zeros(m);
        if scale == 0.0 {
            return Some(v);
        }
        let mut residual = g.to_owned();
        let mut hv = Array1::zeros(m);
        let mut buffer = vec![0.0; model.n()];
        for _ in 0..8 {
            let mut step = faer::Mat::<f64>::from_fn(m, 1, |i, _| residual[i]);
            self.apply_inverse(&mut step);
            for i in 0..m {
                v[i] += step[(i, 0)];
            }
            gram_product(model, idx, s, v.view(), hv.view_mut(), &mut buffer);
            residual = &g - &hv;
            if residual.iter().fold(0.0f64, |a, r| a.max(r.abs())) <= tol * scale {
                return Some(v);
            }
        }
        None
    }
}

/// The extreme singular values of `H_I` on the columns `idx` (non-empty), by the size (see
/// the module documentation).
///
/// # Errors
/// A failed SVD or Lanczos run (not a run that only missed its tolerance: that is a
/// warning in the result).
pub(crate) fn spectrum(
    model: &LassoModel,
    idx: &[usize],
    s: Option<&[f64]>,
    options: &HypergradOptions,
) -> Result<Spectrum> {
    let m = idx.len();
    if m > options.dense_support_limit {
        let op = gram_operator(model, idx, s);
        let hi = largest_singular_value(&op, &SpectralOptions::default().with_tol(1e-10))?;
        let lo = smallest_singular_value(&op, &SpectralOptions::default().with_tol(1e-8).with_max_iter(500))?;
        return Ok(Spectrum {
            sigma_min: lo.value,
            sigma_max: hi.value,
            method: SpectrumMethod::Lanczos {
                converged: lo.status.is_converged() && hi.status.is_converged(),
            },
            factor: None,
        });
    }
    let h = gram(model, idx, s);
    if m > SVD_LIMIT {
        // sigma_max from the products on the columns (O(nnz) each, not O(m^2)).
        let op = gram_operator(model, idx, s);
        let hi = largest_singular_value(&op, &SpectralOptions::default().with_tol(1e-10))?;
        if let Some(spectrum) = cholesky_certificate(h.view(), hi.value, options.rank_tol)? {
            return Ok(spectrum);
        }
    }
    let sv = singular_values(h.view())?;
    Ok(Spectrum {
        sigma_min: sv[m - 1],
        sigma_max: sv[0],
        method: SpectrumMethod::Svd,
        factor: None,
    })
}

/// Proves `sigma_min(H) > rank_tol sigma_max(H)` for a symmetric positive semidefinite `H`
/// by a Cholesky factorisation of `H - t I`, and estimates `sigma_min` by inverse iteration
/// with that factor; `None` when the factorisation meets a non-positive pivot (then
/// `sigma_min` may be at most `t`, and the caller decides by an SVD).
fn cholesky_certificate(h: ArrayView2<'_, f64>, sigma_max: f64, rank_tol: f64) -> Result<Option<Spectrum>> {
    let _avx = clarke_core::avx::UpperStateGuard;
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
    use faer::linalg::cholesky::llt::solve::{solve_in_place_scratch, solve_in_place_with_conj};
    let m = h.nrows();
    // A Lanczos value lies below sigma_max; a percent above it is safely above.
    let t = rank_tol * sigma_max * 1.01;
    let mut l = faer::Mat::<f64>::from_fn(m, m, |i, j| match i.cmp(&j) {
        std::cmp::Ordering::Less => 0.0,
        std::cmp::Ordering::Equal => h[[i, i]] - t,
        std::cmp::Ordering::Greater => h[[i, j]],
    });
    let par = if m >= 256 { faer::Par::rayon(0) } else { faer::Par::Seq };
    let mut buf = MemBuffer::new(cholesky_in_place_scratch::<f64>(m, par, Default::default()));
    if cholesky_in_place(
        l.as_mut(),
        Default::default(),
        par,
        MemStack::new(&mut buf),
        Default::default(),
    )
    .is_err()
    {
        return Ok(None);
    }
    // Inverse iteration: x <- (H - t I)^{-1} x converges to the eigenvector of the smallest
    // eigenvalue; its Rayleigh quotient with H is the estimate.
    let mut x = faer::Mat::<f64>::from_fn(m, 1, |i, _| 1.0 + (i % 7) as f64 / 7.0);
    let mut solve_buf = MemBuffer::new(solve_in_place_scratch::<f64>(m, 1, par));
    let mut estimate = f64::INFINITY;
    for _ in 0..inverse_iterations(m) {
        let norm = x.norm_l2();
        x /= faer::Scale(norm);
        let xv = Array1::from_iter((0..m).map(|i| x[(i, 0)]));
        let rayleigh = xv.dot(&h.dot(&xv));
        let settled = (estimate - rayleigh).abs() <= INVERSE_ITERATION_TOL * rayleigh.abs();
        estimate = rayleigh.min(estimate);
        if settled {
            break;
        }
        solve_in_place_with_conj(
            l.as_ref(),
            faer::Conj::No,
            x.as_mut(),
            par,
            MemStack::new(&mut solve_buf),
        );
    }
    Ok(Some(Spectrum {
        sigma_min: estimate.max(t),
        sigma_max,
        method: SpectrumMethod::Cholesky { lower: t },
        factor: Some(Arc::new(ShiftedFactor { l })),
    }))
}

/// A matrix-free solve that did not reach its tolerance, as an error.
pub(crate) fn unconverged(what: &'static str, report: &SolveReport) -> Error {
    Error::NotConverged {
        solver: what,
        iterations: report.iterations,
        residual: report.residual,
        tolerance: report.tolerance,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// `B^T B` for a seeded `rows x cols` matrix `B` (rank `min(rows, cols)`).
    fn gram_of(rows: usize, cols: usize) -> Array2<f64> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let b = Array2::from_shape_simple_fn((rows, cols), || rng.random::<f64>() - 0.5);
        b.t().dot(&b)
    }

    #[test]
    fn cholesky_certificate_proves_full_rank_and_finds_sigma_min() {
        let h = gram_of(40, 25);
        let sv = singular_values(h.view()).unwrap();
        let hi = largest_singular_value(&h, &SpectralOptions::default()).unwrap().value;
        let found = cholesky_certificate(h.view(), hi, 1e-10)
            .unwrap()
            .expect("full rank is certified");
        let SpectrumMethod::Cholesky { lower } = found.method else {
            panic!("{found:?}")
        };
        assert!(
            lower < sv[24] && lower > 0.0,
            "the bound {lower} is not below sigma_min {}",
            sv[24]
        );
        assert!(
            (found.sigma_max - sv[0]).abs() <= 1e-9 * sv[0],
            "{} vs {}",
            found.sigma_max,
            sv[0]
        );
        // The Rayleigh quotient approaches sigma_min from above.
        assert!(
            found.sigma_min >= sv[24] * (1.0 - 1e-12),
            "{} < {}",
            found.sigma_min,
            sv[24]
        );
        assert!(
            found.sigma_min - sv[24] <= 1e-8 * sv[0],
            "{} vs {}",
            found.sigma_min,
            sv[24]
        );
    }

    #[test]
    fn cholesky_certificate_refuses_a_rank_deficient_matrix() {
        // 25 columns of rank 10: the factorisation of H - t I meets a negative pivot.
        let h = gram_of(10, 25);
        let hi = largest_singular_value(&h, &SpectralOptions::default()).unwrap().value;
        assert!(cholesky_certificate(h.view(), hi, 1e-10).unwrap().is_none());
    }

    /// The certificate's factor solves `H v = g` by refinement, for a sparse design with a
    /// logistic curvature, as the dense Cholesky solve of the formed `H` does; and the
    /// row-by-row Gram matrix of the sparse design equals the dense design's.
    #[test]
    fn certificate_factor_solves_like_the_formed_matrix() {
        use crate::design::CscMatrix;
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let x = Array2::from_shape_simple_fn((60, 30), || {
            if rng.random::<f64>() < 0.3 {
                rng.random::<f64>() - 0.5
            } else {
                0.0
            }
        });
        let y = Array1::from_shape_simple_fn(60, || rng.random::<f64>() - 0.5);
        let sparse = LassoModel::new_sparse(CscMatrix::from_dense(x.view()).unwrap(), y.view())
            .unwrap()
            .with_l2(1e-3)
            .unwrap();
        let dense = LassoModel::new(x.view(), y.view()).unwrap().with_l2(1e-3).unwrap();
        let idx: Vec<usize> = (0..30).rev().step_by(2).collect();
        let curvature: Vec<f64> = (0..60).map(|i| 0.1 + (i % 5) as f64 * 0.03).collect();
        let h = gram(&sparse, &idx, Some(&curvature));
        let h_dense = gram(&dense, &idx, Some(&curvature));
        let scale = h.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        assert!((&h - &h_dense).iter().all(|d| d.abs() <= 1e-14 * scale));
        let hi = largest_singular_value(&h, &SpectralOptions::default()).unwrap().value;
        let found = cholesky_certificate(h.view(), hi, 1e-10).unwrap().expect("certified");
        let g = Array1::from_shape_fn(idx.len(), |a| (a as f64 * 0.7).sin());
        let v = found
            .factor
            .expect("the certificate keeps its factor")
            .solve(&sparse, &idx, Some(&curvature), g.view(), 1e-13)
            .expect("refinement converges");
        let reference = clarke_solve::cholesky_solve(h.view(), g.view()).unwrap();
        let size = reference.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        let d = (&v - &reference).iter().fold(0.0f64, |a, v| a.max(v.abs()));
        assert!(d <= 1e-10 * size, "refined solve differs by {d:e} (size {size:e})");
    }
}
