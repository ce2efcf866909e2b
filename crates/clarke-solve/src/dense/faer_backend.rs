//! The faer backend (pure Rust, the default).
//!
//! Uses faer's low-level factorization routines so that the parallelism is chosen per call:
//! [`Par::Seq`] below [`PARALLEL_DIM_THRESHOLD`] rows, rayon
//! on all cores above. The public functions here are the same as the unqualified ones of
//! [`dense`](super), always through faer whatever the cargo features.

use clarke_core::{Error, Result, Scalar};
use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::svd::ComputeSvdVectors;
use faer::perm::PermRef;
use faer::{Conj, Mat, Par};
use faer_ext::{IntoFaer, IntoNdarray};
use ndarray::{Array, Array1, Array2, ArrayView, ArrayView2, ArrayView3, ArrayViewMut2, Dimension};

use super::{Backend, Lstsq, PARALLEL_DIM_THRESHOLD};

/// Marker type of the faer backend.
pub(crate) struct Faer;

/// faer's parallelism for a problem of dimension `n`.
pub(crate) fn par_for(n: usize) -> Par {
    if n >= PARALLEL_DIM_THRESHOLD {
        Par::rayon(0)
    } else {
        Par::Seq
    }
}

/// An LU factorization with partial pivoting held in faer's format (L and U share one
/// matrix; the unit diagonal of L is implicit).
pub(crate) struct FaerLu<S> {
    lu: Mat<S>,
    fwd: Vec<usize>,
    bwd: Vec<usize>,
}

fn to_ndarray<S: Scalar>(m: &Mat<S>) -> Array2<S> {
    m.as_ref().into_ndarray().to_owned()
}

impl Backend for Faer {
    const NAME: &'static str = "faer";
    type Lu<S: Scalar> = FaerLu<S>;

    fn lu_factor<S: Scalar>(a: ArrayView2<'_, S>) -> Result<FaerLu<S>> {
        let _avx = clarke_core::avx::UpperStateGuard;
        use faer::linalg::lu::partial_pivoting::factor::{lu_in_place, lu_in_place_scratch};
        let n = a.nrows();
        let par = par_for(n);
        let mut lu: Mat<S> = a.into_faer().to_owned();
        let mut fwd = vec![0usize; n];
        let mut bwd = vec![0usize; n];
        let mut buf = MemBuffer::new(lu_in_place_scratch::<usize, S>(n, n, par, Default::default()));
        lu_in_place(
            lu.as_mut(),
            &mut fwd,
            &mut bwd,
            par,
            MemStack::new(&mut buf),
            Default::default(),
        );
        Ok(FaerLu { lu, fwd, bwd })
    }

    fn lu_pivots<S: Scalar>(lu: &FaerLu<S>) -> Vec<S> {
        (0..lu.lu.nrows()).map(|i| lu.lu[(i, i)].abs()).collect()
    }

    fn lu_solve_in_place<S: Scalar>(lu: &FaerLu<S>, b: ArrayViewMut2<'_, S>, transpose: bool) -> Result<()> {
        let _avx = clarke_core::avx::UpperStateGuard;
        use faer::linalg::lu::partial_pivoting::solve as lusolve;
        let n = lu.lu.nrows();
        let k = b.ncols();
        let par = par_for(n);
        let perm = PermRef::new_checked(&lu.fwd, &lu.bwd, n);
        let rhs = b.into_faer();
        if transpose {
            let mut buf = MemBuffer::new(lusolve::solve_transpose_in_place_scratch::<usize, S>(n, k, par));
            lusolve::solve_transpose_in_place_with_conj(
                lu.lu.as_ref(),
                lu.lu.as_ref(),
                perm,
                Conj::No,
                rhs,
                par,
                MemStack::new(&mut buf),
            );
        } else {
            let mut buf = MemBuffer::new(lusolve::solve_in_place_scratch::<usize, S>(n, k, par));
            lusolve::solve_in_place_with_conj(
                lu.lu.as_ref(),
                lu.lu.as_ref(),
                perm,
                Conj::No,
                rhs,
                par,
                MemStack::new(&mut buf),
            );
        }
        Ok(())
    }

    fn cholesky_solve_in_place<S: Scalar>(a: ArrayView2<'_, S>, b: ArrayViewMut2<'_, S>) -> Result<()> {
        let _avx = clarke_core::avx::UpperStateGuard;
        use faer::linalg::cholesky::llt::factor::{LltError, cholesky_in_place, cholesky_in_place_scratch};
        use faer::linalg::cholesky::llt::solve::{solve_in_place_scratch, solve_in_place_with_conj};
        let n = a.nrows();
        let k = b.ncols();
        let par = par_for(n);
        let mut l = Mat::<S>::from_fn(n, n, |i, j| if i >= j { a[[i, j]] } else { S::zero() });
        let mut buf = MemBuffer::new(cholesky_in_place_scratch::<S>(n, par, Default::default()));
        match cholesky_in_place(
            l.as_mut(),
            Default::default(),
            par,
            MemStack::new(&mut buf),
            Default::default(),
        ) {
            Ok(_) => {}
            Err(LltError::NonPositivePivot { index }) => {
                return Err(Error::invalid(
                    "cholesky",
                    format!(
                        "the {n}x{n} matrix is not symmetric positive definite: non-positive pivot at index {index} of the Cholesky factorization; use lu_solve for indefinite matrices"
                    ),
                ));
            }
        }
        let mut buf = MemBuffer::new(solve_in_place_scratch::<S>(n, k, par));
        solve_in_place_with_conj(l.as_ref(), Conj::No, b.into_faer(), par, MemStack::new(&mut buf));
        Ok(())
    }

    fn svd<S: Scalar>(a: ArrayView2<'_, S>) -> Result<(Array2<S>, Array1<S>, Array2<S>)> {
        let _avx = clarke_core::avx::UpperStateGuard;
        use faer::linalg::svd::{svd, svd_scratch};
        let (m, n) = a.dim();
        let k = m.min(n);
        let par = par_for(k);
        let mut s = Diag::<S>::zeros(k);
        let mut u = Mat::<S>::zeros(m, k);
        let mut v = Mat::<S>::zeros(n, k);
        let mut buf = MemBuffer::new(svd_scratch::<S>(
            m,
            n,
            ComputeSvdVectors::Thin,
            ComputeSvdVectors::Thin,
            par,
            Default::default(),
        ));
        svd(
            a.into_faer(),
            s.as_mut(),
            Some(u.as_mut()),
            Some(v.as_mut()),
            par,
            MemStack::new(&mut buf),
            Default::default(),
        )
        .map_err(|e| Error::invalid("svd", format!("the {m}x{n} SVD did not converge ({e:?})")))?;
        let sv = Array1::from_shape_fn(k, |i| s.column_vector()[i]);
        Ok((to_ndarray(&u), sv, to_ndarray(&v)))
    }

    fn singular_values<S: Scalar>(a: ArrayView2<'_, S>) -> Result<Array1<S>> {
        let _avx = clarke_core::avx::UpperStateGuard;
        use faer::linalg::svd::{svd, svd_scratch};
        let (m, n) = a.dim();
        let k = m.min(n);
        let par = par_for(k);
        let mut s = Diag::<S>::zeros(k);
        let mut buf = MemBuffer::new(svd_scratch::<S>(
            m,
            n,
            ComputeSvdVectors::No,
            ComputeSvdVectors::No,
            par,
            Default::default(),
        ));
        svd(
            a.into_faer(),
            s.as_mut(),
            None,
            None,
            par,
            MemStack::new(&mut buf),
            Default::default(),
        )
        .map_err(|e| Error::invalid("singular_values", format!("the {m}x{n} SVD did not converge ({e:?})")))?;
        Ok(Array1::from_shape_fn(k, |i| s.column_vector()[i]))
    }
}

/// [`dense::lu_solve`](super::lu_solve) through faer.
pub fn lu_solve<S: Scalar, D: Dimension>(a: ArrayView2<'_, S>, b: ArrayView<'_, S, D>) -> Result<Array<S, D>> {
    super::lu_solve_with::<Faer, S, D>("faer_backend::lu_solve", a, b, false)
}

/// [`dense::lu_solve_transpose`](super::lu_solve_transpose) through faer.
pub fn lu_solve_transpose<S: Scalar, D: Dimension>(
    a: ArrayView2<'_, S>,
    b: ArrayView<'_, S, D>,
) -> Result<Array<S, D>> {
    super::lu_solve_with::<Faer, S, D>("faer_backend::lu_solve_transpose", a, b, true)
}

/// [`dense::cholesky_solve`](super::cholesky_solve) through faer.
pub fn cholesky_solve<S: Scalar, D: Dimension>(a: ArrayView2<'_, S>, b: ArrayView<'_, S, D>) -> Result<Array<S, D>> {
    super::cholesky_solve_with::<Faer, S, D>("faer_backend::cholesky_solve", a, b)
}

/// [`dense::lstsq`](super::lstsq) through faer.
pub fn lstsq<S: Scalar, D: Dimension>(a: ArrayView2<'_, S>, b: ArrayView<'_, S, D>) -> Result<Lstsq<S, D>> {
    super::lstsq_with::<Faer, S, D>("faer_backend::lstsq", a, b, None)
}

/// [`dense::singular_values`](super::singular_values) through faer.
pub fn singular_values<S: Scalar>(a: ArrayView2<'_, S>) -> Result<Array1<S>> {
    super::singular_values_with::<Faer, S>("faer_backend::singular_values", a)
}

/// [`dense::batched_solve`](super::batched_solve) through faer.
pub fn batched_solve<S: Scalar>(a: ArrayView3<'_, S>, b: ArrayView2<'_, S>, transpose: bool) -> Result<Array2<S>> {
    super::batched_solve_with::<Faer, S>("faer_backend::batched_solve", a, b, transpose)
}
