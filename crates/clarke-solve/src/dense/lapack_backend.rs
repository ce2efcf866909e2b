//! The LAPACK backend (cargo feature `lapack`): ndarray-linalg over the system OpenBLAS.
//!
//! `f32` calls the single-precision routines (`sgetrf`, `spotrf`, `sgesdd`, ...) and `f64` the
//! double-precision ones; the generic scalar is mapped to the concrete type exactly (both
//! conversions are lossless for the matching type). The public functions here are the same
//! as the unqualified ones of [`dense`](super), always through LAPACK.
//!
//! OpenBLAS runs its own threads; set `OPENBLAS_NUM_THREADS=1` when rayon also runs (for
//! example in [`batched_solve`]). Large LU factorizations run on a helper thread with a big
//! stack unless `OPENBLAS_NUM_THREADS=1`, because OpenBLAS's parallel `getrf` overflows the
//! default 2 MiB stack of Rust threads.

use std::any::TypeId;
use std::sync::OnceLock;

use clarke_core::{Error, Result, Scalar};
use ndarray::{Array, Array1, Array2, ArrayView, ArrayView2, ArrayView3, ArrayViewMut2, Dimension, ShapeBuilder};
use ndarray_linalg::{JobSvd, MatrixLayout, Pivot, SVDDC, Transpose, UPLO};

use super::{Backend, Lstsq};

/// Marker type of the LAPACK backend.
pub(crate) struct Lapack;

/// The concrete types LAPACK handles.
pub(crate) trait LapackReal: Scalar + ndarray_linalg::Lapack + ndarray_linalg::Scalar<Real = Self> {}
impl LapackReal for f32 {}
impl LapackReal for f64 {}

enum Prec {
    F32,
    F64,
}

fn prec<S: Scalar>(op: &'static str) -> Result<Prec> {
    if TypeId::of::<S>() == TypeId::of::<f64>() {
        Ok(Prec::F64)
    } else if TypeId::of::<S>() == TypeId::of::<f32>() {
        Ok(Prec::F32)
    } else {
        Err(Error::invalid(
            op,
            format!("the LAPACK backend handles f32 and f64 only, not {}", S::NAME),
        ))
    }
}

/// Column-major copy with an exact change of scalar type.
fn cast_f<S: Scalar, T: Scalar>(a: ArrayView2<'_, S>) -> Array2<T> {
    let mut out = Array2::<T>::zeros(a.dim().f());
    out.zip_mut_with(&a, |o, &x| *o = T::from_f64_lossy(x.to_f64_exact()));
    out
}

fn cast_back<T: Scalar, S: Scalar>(src: &Array2<T>, mut dst: ArrayViewMut2<'_, S>) {
    dst.zip_mut_with(src, |d, &x| *d = S::from_f64_lossy(x.to_f64_exact()));
}

fn layout(rows: usize, cols: usize) -> MatrixLayout {
    MatrixLayout::F {
        col: cols as i32,
        lda: rows.max(1) as i32,
    }
}

/// An LU factorization held by LAPACK (`getrf` output, column-major).
pub(crate) struct LuT<T> {
    lu: Array2<T>,
    piv: Pivot,
}

/// LU factors in the precision of the scalar type.
pub(crate) enum LapackLu {
    F32(LuT<f32>),
    F64(LuT<f64>),
}

/// Matrices with at least this many entries are factored by OpenBLAS's parallel `getrf`.
const PARALLEL_GETRF_ENTRIES: usize = 8192;

/// Stack of the helper thread that runs a parallel `getrf`.
const GETRF_STACK_BYTES: usize = 64 << 20;

/// `true` unless `OPENBLAS_NUM_THREADS=1` (then OpenBLAS never runs its parallel `getrf`).
fn openblas_may_thread() -> bool {
    static MAY: OnceLock<bool> = OnceLock::new();
    *MAY.get_or_init(|| {
        std::env::var("OPENBLAS_NUM_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            != Some(1)
    })
}

/// Runs `f` (a `getrf` call) on a helper thread with a large stack when OpenBLAS may run
/// its parallel LU: the distribution builds of OpenBLAS (compiled for up to 64 or more
/// threads) put per-thread job tables on the stack at every level of the recursive parallel
/// `getrf`, which overflows the 2 MiB stacks of Rust threads (test threads, rayon workers)
/// from about n = 100 on, with a segmentation fault.
fn on_big_stack<R: Send>(entries: usize, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
    if entries < PARALLEL_GETRF_ENTRIES || !openblas_may_thread() {
        return f();
    }
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("clarke-lapack".into())
            .stack_size(GETRF_STACK_BYTES)
            .spawn_scoped(scope, f)
            .map_err(|e| Error::invalid("lu", format!("could not start the LAPACK helper thread: {e}")))?;
        match handle.join() {
            Ok(r) => r,
            Err(payload) => std::panic::resume_unwind(payload),
        }
    })
}

fn lu_t<T: LapackReal>(a: ArrayView2<'_, T>) -> Result<LuT<T>> {
    let n = a.nrows();
    let mut lu = Array2::<T>::zeros((n, n).f());
    if n == 0 {
        return Ok(LuT { lu, piv: Vec::new() });
    }
    lu.assign(&a);
    on_big_stack(n * n, move || {
        let slice = lu
            .as_slice_memory_order_mut()
            .ok_or_else(|| Error::invalid("lu", "internal: factor storage is not contiguous"))?;
        let piv = T::lu(layout(n, n), slice).map_err(|e| Error::Singular {
            op: "lu",
            detail: format!("{n}x{n} matrix: LAPACK getrf found an exactly zero pivot ({e})"),
        })?;
        Ok(LuT { lu, piv })
    })
}

fn lu_solve_t<T: LapackReal>(lu: &LuT<T>, b: &mut Array2<T>, transpose: bool) -> Result<()> {
    let n = lu.lu.nrows();
    if n == 0 {
        return Ok(());
    }
    let a = lu
        .lu
        .as_slice_memory_order()
        .ok_or_else(|| Error::invalid("lu", "internal: factor storage is not contiguous"))?;
    let t = if transpose { Transpose::Transpose } else { Transpose::No };
    for mut col in b.columns_mut() {
        let slice = col
            .as_slice_mut()
            .ok_or_else(|| Error::invalid("lu", "internal: right-hand side is not column-major"))?;
        T::solve(layout(n, n), t, a, &lu.piv, slice).map_err(|e| Error::invalid("lu", format!("LAPACK getrs: {e}")))?;
    }
    Ok(())
}

fn cholesky_t<T: LapackReal>(a: ArrayView2<'_, T>, b: &mut Array2<T>) -> Result<()> {
    let n = a.nrows();
    if n == 0 {
        return Ok(());
    }
    let mut l = Array2::<T>::zeros((n, n).f());
    l.assign(&a);
    let ls = l
        .as_slice_memory_order_mut()
        .ok_or_else(|| Error::invalid("cholesky", "internal: factor storage is not contiguous"))?;
    T::cholesky(layout(n, n), UPLO::Lower, ls).map_err(|e| {
        Error::invalid(
            "cholesky",
            format!(
                "the {n}x{n} matrix is not symmetric positive definite: LAPACK potrf failed ({e}; the return code is the 1-based order of the first non-positive leading minor); use lu_solve for indefinite matrices"
            ),
        )
    })?;
    let ls = l
        .as_slice_memory_order()
        .ok_or_else(|| Error::invalid("cholesky", "internal: factor storage is not contiguous"))?;
    for mut col in b.columns_mut() {
        let slice = col
            .as_slice_mut()
            .ok_or_else(|| Error::invalid("cholesky", "internal: right-hand side is not column-major"))?;
        T::solve_cholesky(layout(n, n), UPLO::Lower, ls, slice)
            .map_err(|e| Error::invalid("cholesky", format!("LAPACK potrs: {e}")))?;
    }
    Ok(())
}

/// `(U, s, V)` of a thin SVD, the vectors when asked for.
type SvdParts<T> = (Option<Array2<T>>, Array1<T>, Option<Array2<T>>);

fn svd_t<T: LapackReal>(a: ArrayView2<'_, T>, vectors: bool) -> Result<SvdParts<T>> {
    let (m, n) = a.dim();
    let job = if vectors { JobSvd::Some } else { JobSvd::None };
    let (u, s, vt) = a
        .svddc(job)
        .map_err(|e| Error::invalid("svd", format!("the {m}x{n} SVD (LAPACK gesdd) failed: {e}")))?;
    Ok((u, s, vt.map(|vt| vt.t().to_owned())))
}

fn map_back<T: Scalar, S: Scalar, D: Dimension>(a: Array<T, D>) -> Array<S, D> {
    a.mapv(|x| S::from_f64_lossy(x.to_f64_exact()))
}

impl Backend for Lapack {
    const NAME: &'static str = "lapack";
    type Lu<S: Scalar> = LapackLu;

    fn lu_factor<S: Scalar>(a: ArrayView2<'_, S>) -> Result<LapackLu> {
        Ok(match prec::<S>("lu")? {
            Prec::F64 => LapackLu::F64(lu_t(cast_f::<S, f64>(a).view())?),
            Prec::F32 => LapackLu::F32(lu_t(cast_f::<S, f32>(a).view())?),
        })
    }

    fn lu_pivots<S: Scalar>(lu: &LapackLu) -> Vec<S> {
        match lu {
            LapackLu::F64(l) => l.lu.diag().iter().map(|&v| S::from_f64_lossy(v.abs())).collect(),
            LapackLu::F32(l) => {
                l.lu.diag()
                    .iter()
                    .map(|&v| S::from_f64_lossy(f64::from(v.abs())))
                    .collect()
            }
        }
    }

    fn lu_solve_in_place<S: Scalar>(lu: &LapackLu, b: ArrayViewMut2<'_, S>, transpose: bool) -> Result<()> {
        match lu {
            LapackLu::F64(l) => {
                let mut bt = cast_f::<S, f64>(b.view());
                lu_solve_t(l, &mut bt, transpose)?;
                cast_back(&bt, b);
            }
            LapackLu::F32(l) => {
                let mut bt = cast_f::<S, f32>(b.view());
                lu_solve_t(l, &mut bt, transpose)?;
                cast_back(&bt, b);
            }
        }
        Ok(())
    }

    fn cholesky_solve_in_place<S: Scalar>(a: ArrayView2<'_, S>, b: ArrayViewMut2<'_, S>) -> Result<()> {
        match prec::<S>("cholesky")? {
            Prec::F64 => {
                let mut bt = cast_f::<S, f64>(b.view());
                cholesky_t(cast_f::<S, f64>(a).view(), &mut bt)?;
                cast_back(&bt, b);
            }
            Prec::F32 => {
                let mut bt = cast_f::<S, f32>(b.view());
                cholesky_t(cast_f::<S, f32>(a).view(), &mut bt)?;
                cast_back(&bt, b);
            }
        }
        Ok(())
    }

    fn svd<S: Scalar>(a: ArrayView2<'_, S>) -> Result<(Array2<S>, Array1<S>, Array2<S>)> {
        let missing = || Error::invalid("svd", "LAPACK gesdd returned no singular vectors");
        Ok(match prec::<S>("svd")? {
            Prec::F64 => {
                let (u, s, v) = svd_t(cast_f::<S, f64>(a).view(), true)?;
                (
                    map_back(u.ok_or_else(missing)?),
                    map_back(s),
                    map_back(v.ok_or_else(missing)?),
                )
            }
            Prec::F32 => {
                let (u, s, v) = svd_t(cast_f::<S, f32>(a).view(), true)?;
                (
                    map_back(u.ok_or_else(missing)?),
                    map_back(s),
                    map_back(v.ok_or_else(missing)?),
                )
            }
        })
    }

    fn singular_values<S: Scalar>(a: ArrayView2<'_, S>) -> Result<Array1<S>> {
        Ok(match prec::<S>("singular_values")? {
            Prec::F64 => map_back(svd_t(cast_f::<S, f64>(a).view(), false)?.1),
            Prec::F32 => map_back(svd_t(cast_f::<S, f32>(a).view(), false)?.1),
        })
    }
}

/// [`dense::lu_solve`](super::lu_solve) through LAPACK.
pub fn lu_solve<S: Scalar, D: Dimension>(a: ArrayView2<'_, S>, b: ArrayView<'_, S, D>) -> Result<Array<S, D>> {
    super::lu_solve_with::<Lapack, S, D>("lapack_backend::lu_solve", a, b, false)
}

/// [`dense::lu_solve_transpose`](super::lu_solve_transpose) through LAPACK.
pub fn lu_solve_transpose<S: Scalar, D: Dimension>(
    a: ArrayView2<'_, S>,
    b: ArrayView<'_, S, D>,
) -> Result<Array<S, D>> {
    super::lu_solve_with::<Lapack, S, D>("lapack_backend::lu_solve_transpose", a, b, true)
}

/// [`dense::cholesky_solve`](super::cholesky_solve) through LAPACK.
pub fn cholesky_solve<S: Scalar, D: Dimension>(a: ArrayView2<'_, S>, b: ArrayView<'_, S, D>) -> Result<Array<S, D>> {
    super::cholesky_solve_with::<Lapack, S, D>("lapack_backend::cholesky_solve", a, b)
}

/// [`dense::lstsq`](super::lstsq) through LAPACK.
pub fn lstsq<S: Scalar, D: Dimension>(a: ArrayView2<'_, S>, b: ArrayView<'_, S, D>) -> Result<Lstsq<S, D>> {
    super::lstsq_with::<Lapack, S, D>("lapack_backend::lstsq", a, b, None)
}

/// [`dense::singular_values`](super::singular_values) through LAPACK.
pub fn singular_values<S: Scalar>(a: ArrayView2<'_, S>) -> Result<Array1<S>> {
    super::singular_values_with::<Lapack, S>("lapack_backend::singular_values", a)
}

/// [`dense::batched_solve`](super::batched_solve) through LAPACK.
pub fn batched_solve<S: Scalar>(a: ArrayView3<'_, S>, b: ArrayView2<'_, S>, transpose: bool) -> Result<Array2<S>> {
    super::batched_solve_with::<Lapack, S>("lapack_backend::batched_solve", a, b, transpose)
}
