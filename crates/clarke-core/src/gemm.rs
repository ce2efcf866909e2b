//! General matrix multiply on ndarray views, through faer.
//!
//! faer's GEMM runs at roughly twice the speed of ndarray's default `dot` on this class of
//! machine, and it takes strided views, so transposed operands (`a.t()`) cost nothing. Its
//! multithreading only pays off for large products: below [`PARALLEL_FLOP_THRESHOLD`]
//! multiply-adds the product runs on one thread.

use faer::{Accum, Par};
use faer_ext::IntoFaer;
use ndarray::{Array2, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis};

use crate::Scalar;

/// Products with at least this many multiply-adds (m * n * k) use every core.
///
/// faer on all cores is about 2x slower than one core for n <= 256 cubes here, and
/// faster from about 384 on.
pub const PARALLEL_FLOP_THRESHOLD: usize = 384 * 384 * 384;

fn parallelism(m: usize, n: usize, k: usize) -> Par {
    if m.saturating_mul(n).saturating_mul(k) >= PARALLEL_FLOP_THRESHOLD {
        Par::rayon(0)
    } else {
        Par::Seq
    }
}

/// `c = alpha * a b + beta * c`, with `beta` either zero (overwrite) or one (accumulate).
///
/// # Panics
/// If the shapes do not fit (`a` is m x k, `b` is k x n, `c` is m x n). Callers in this crate
/// check shapes first and return an error instead.
#[track_caller]
pub fn gemm<S: Scalar>(
    alpha: S,
    a: ArrayView2<'_, S>,
    b: ArrayView2<'_, S>,
    accumulate: bool,
    c: ArrayViewMut2<'_, S>,
) {
    let (m, k) = a.dim();
    let (k2, n) = b.dim();
    assert_eq!(k, k2, "gemm: inner dimensions differ ({m}x{k} times {k2}x{n})");
    assert_eq!(c.dim(), (m, n), "gemm: output is {:?}, expected ({m}, {n})", c.dim());
    if m == 0 || n == 0 {
        return;
    }
    let accum = if accumulate { Accum::Add } else { Accum::Replace };
    if k == 0 {
        if !accumulate {
            let mut c = c;
            c.fill(S::zero());
        }
        return;
    }
    let par = parallelism(m, n, k);
    faer::linalg::matmul::matmul(c.into_faer(), accum, a.into_faer(), b.into_faer(), alpha, par);
    crate::avx::clear_upper_state();
}

/// Returns `a b` as a new matrix.
#[track_caller]
pub fn matmul2<S: Scalar>(a: ArrayView2<'_, S>, b: ArrayView2<'_, S>) -> Array2<S> {
    let mut c = Array2::zeros((a.nrows(), b.ncols()));
    gemm(S::one(), a, b, false, c.view_mut());
    c
}

/// `y = alpha * a x + beta * y`, through faer's matrix-vector kernels, on one thread.
///
/// ndarray's own `general_mat_vec_mul` (without BLAS) runs a dot product per row, and a
/// strided one for a transposed `a`; faer's kernels vectorise both layouts, which matters
/// in iterative solvers that spend most of their time in products with `A` and `A^T`.
///
/// # Panics
/// If the shapes do not fit (`a` is m x n, `x` has n entries, `y` has m). Callers check
/// shapes first and return an error instead.
#[track_caller]
pub fn gemv<S: Scalar>(alpha: S, a: ArrayView2<'_, S>, x: ArrayView1<'_, S>, beta: S, y: ArrayViewMut1<'_, S>) {
    let (m, n) = a.dim();
    assert_eq!(x.len(), n, "gemv: a is {m}x{n} but x has {} entries", x.len());
    assert_eq!(y.len(), m, "gemv: a is {m}x{n} but y has {} entries", y.len());
    let mut y = y;
    if beta == S::zero() {
        y.fill(S::zero());
    } else if beta != S::one() {
        y.mapv_inplace(|v| v * beta);
    }
    if m == 0 || n == 0 {
        return;
    }
    faer::linalg::matmul::matmul(
        y.insert_axis(Axis(1)).into_faer(),
        Accum::Add,
        a.into_faer(),
        x.insert_axis(Axis(1)).into_faer(),
        alpha,
        Par::Seq,
    );
    crate::avx::clear_upper_state();
}

/// `x . y` over the common length, accumulated in f64.
///
/// For `f64` on a CPU with AVX2 and FMA, four 4-wide accumulators (the default x86-64 build
/// would reduce two elements at a time); elsewhere four scalar accumulators. The summation
/// order differs from a sequential loop's, so the last bits may too.
#[inline]
pub fn dot<S: Scalar>(x: &[S], y: &[S]) -> f64 {
    let len = x.len().min(y.len());
    let (x, y) = (&x[..len], &y[..len]);
    #[cfg(target_arch = "x86_64")]
    {
        if std::any::TypeId::of::<S>() == std::any::TypeId::of::<f64>()
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: `S` is `f64` (same layout, tested above), and the CPU has AVX2 and FMA.
            unsafe {
                let x = std::slice::from_raw_parts(x.as_ptr().cast::<f64>(), len);
                let y = std::slice::from_raw_parts(y.as_ptr().cast::<f64>(), len);
                return dot_f64_avx2(x, y);
            }
        }
    }
    let mut acc = [0.0f64; 4];
    let mut xc = x.chunks_exact(4);
    let mut yc = y.chunks_exact(4);
    for (a, b) in (&mut xc).zip(&mut yc) {
        for k in 0..4 {
            acc[k] += a[k].to_f64_exact() * b[k].to_f64_exact();
        }
    }
    for (a, b) in xc.remainder().iter().zip(yc.remainder()) {
        acc[0] += a.to_f64_exact() * b.to_f64_exact();
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f64_avx2(x: &[f64], y: &[f64]) -> f64 {
    use std::arch::x86_64::*;
    let len = x.len().min(y.len());
    let body = len / 16 * 16;
    let (px, py) = (x.as_ptr(), y.as_ptr());
    let mut acc = [_mm256_setzero_pd(); 4];
    let mut i = 0;
    while i < body {
        for (k, a) in acc.iter_mut().enumerate() {
            // SAFETY: i + 4 k + 4 <= body <= len for both slices.
            let (u, v) = unsafe { (_mm256_loadu_pd(px.add(i + 4 * k)), _mm256_loadu_pd(py.add(i + 4 * k))) };
            *a = _mm256_fmadd_pd(u, v, *a);
        }
        i += 16;
    }
    let sum = _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3]));
    let mut lanes = [0.0f64; 4];
    // SAFETY: `lanes` holds four f64.
    unsafe { _mm256_storeu_pd(lanes.as_mut_ptr(), sum) };
    let mut total = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    for j in body..len {
        total += x[j] * y[j];
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array1, Array2};

    fn naive(alpha: f64, a: ArrayView2<'_, f64>, x: ArrayView1<'_, f64>, beta: f64, y: &Array1<f64>) -> Array1<f64> {
        Array1::from_shape_fn(a.nrows(), |i| {
            alpha * (0..a.ncols()).map(|j| a[[i, j]] * x[j]).sum::<f64>() + beta * y[i]
        })
    }

    #[test]
    fn dot_matches_the_definition_at_every_length_in_both_precisions() {
        for len in [0usize, 1, 3, 4, 15, 16, 17, 33, 128, 131] {
            let x: Vec<f64> = (0..len).map(|i| ((i * 7) % 13) as f64 * 0.25 - 1.5).collect();
            let y: Vec<f64> = (0..len).map(|i| ((i * 5) % 11) as f64 * 0.5 - 2.0).collect();
            // Quarter and half integers: every partial sum is exact, in any order.
            let want: f64 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
            assert_eq!(dot(&x, &y), want, "f64, length {len}");
            let (x32, y32): (Vec<f32>, Vec<f32>) = (
                x.iter().map(|&v| v as f32).collect(),
                y.iter().map(|&v| v as f32).collect(),
            );
            assert_eq!(dot(&x32, &y32), want, "f32, length {len}");
        }
        // Unequal lengths: the common prefix.
        assert_eq!(dot(&[1.0f64, 2.0, 3.0], &[4.0, 5.0]), 14.0);
    }

    #[test]
    fn gemv_matches_the_definition_in_both_layouts_and_for_every_beta() {
        let a = Array2::from_shape_fn((7, 5), |(i, j)| ((3 * i + 5 * j) % 11) as f64 - 4.5);
        let x5 = Array1::from_shape_fn(5, |i| 0.3 * i as f64 - 1.0);
        let x7 = Array1::from_shape_fn(7, |i| 1.0 - 0.2 * i as f64);
        for beta in [0.0, 1.0, -0.5] {
            let y0 = Array1::from_shape_fn(7, |i| i as f64 + 0.25);
            let mut y = y0.clone();
            gemv(2.0, a.view(), x5.view(), beta, y.view_mut());
            let want = naive(2.0, a.view(), x5.view(), beta, &y0);
            assert!((&y - &want).iter().all(|d| d.abs() < 1e-12), "A x, beta {beta}");
            let y0 = Array1::from_shape_fn(5, |i| 2.0 - i as f64);
            let mut y = y0.clone();
            gemv(-1.5, a.t(), x7.view(), beta, y.view_mut());
            let want = naive(-1.5, a.t(), x7.view(), beta, &y0);
            assert!((&y - &want).iter().all(|d| d.abs() < 1e-12), "A^T x, beta {beta}");
        }
        // beta = 0 overwrites, even a NaN already in y.
        let mut y = Array1::from_elem(7, f64::NAN);
        gemv(1.0, a.view(), x5.view(), 0.0, y.view_mut());
        assert!(y.iter().all(|v| v.is_finite()));
    }
}
