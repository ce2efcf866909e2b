//! General matrix multiply on ndarray views, through faer.
//!
//! faer's GEMM runs at roughly twice the speed of ndarray's default `dot` on this class of
//! machine, and it takes strided views, so transposed operands (`a.t()`) cost nothing. Its
//! multithreading only pays off for large products: below [`PARALLEL_FLOP_THRESHOLD`]
//! multiply-adds the product runs on one thread.

use faer::{Accum, Par};
use faer_ext::IntoFaer;
use ndarray::{Array2, ArrayView2, ArrayViewMut2};

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
}

/// Returns `a b` as a new matrix.
#[track_caller]
pub fn matmul2<S: Scalar>(a: ArrayView2<'_, S>, b: ArrayView2<'_, S>) -> Array2<S> {
    let mut c = Array2::zeros((a.nrows(), b.ncols()));
    gemm(S::one(), a, b, false, c.view_mut());
    c
}
