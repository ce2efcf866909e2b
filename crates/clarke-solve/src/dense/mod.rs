//! Dense direct solves: LU (plain and transposed, reusable), Cholesky, least squares,
//! singular values, and a batched solve of many small systems in parallel.
//!
//! Two backends compute the factorizations:
//! - [`faer_backend`] (default): pure Rust, nothing to install. faer's parallelism is chosen
//!   per call by size (one thread below [`PARALLEL_DIM_THRESHOLD`], rayon above), since all
//!   cores are slower than one for small matrices.
//! - `lapack_backend` (cargo feature `lapack`): ndarray-linalg over the system OpenBLAS, for
//!   `f32` and `f64`. The unqualified functions of this module then go through it.
//!
//! Both backends are reachable by name (`dense::faer_backend::lu_solve`, ...) so that they
//! can be compared; the functions of this module use the active one ([`backend_name`]).
//!
//! Right-hand sides may be vectors (`[n]`) or matrices (`[n, k]`, one system per column):
//! the functions are generic over the dimension and return an array of the same shape.
//!
//! Input checks: shapes ([`Error::ShapeMismatch`]), NaN or infinity in the matrix or the
//! right-hand side ([`Error::InvalidArgument`], with the position), squareness. A (numerically)
//! singular matrix gives [`Error::Singular`] carrying the pivot estimate; a matrix that is not
//! symmetric positive definite given to [`cholesky_solve`] gives [`Error::InvalidArgument`].
//! Least squares never refuses rank deficiency: it returns the minimum-norm solution and the
//! numerical rank, because that is what was asked for.
//!
//! Finite input can still overflow: an LU elimination of entries near the largest number of
//! the type, or a solution beyond that range (`1e-300 x = 1e300`). Both are an
//! [`Error::InvalidArgument`] saying so (the same under both backends), never an `inf` or a
//! NaN in the answer, nor a false [`Error::Singular`].

pub mod faer_backend;
#[cfg(feature = "lapack")]
pub mod lapack_backend;

use std::fmt;

use clarke_core::{Error, Result, Scalar};
use ndarray::{
    Array, Array1, Array2, ArrayView, ArrayView2, ArrayView3, ArrayViewMut2, Axis, Dimension, Ix1, Ix2, ShapeBuilder,
};
use rayon::prelude::*;

/// Matrices with at least this many rows run faer on all cores (rayon); smaller ones run on
/// one thread. On a 2-core machine faer's LU on both cores was slower than on one up to
/// `n = 768` (1.7 vs 1.3 ms at 300, 21 vs 15 ms at 768; the threads' hand-offs cost more
/// than they share), even at 1024 and only 10-15% faster from 1536 on.
pub const PARALLEL_DIM_THRESHOLD: usize = 1024;

/// Batches whose total work (`batch * n^3`) is below this run sequentially; above, one rayon
/// task per sample.
pub const BATCH_PARALLEL_WORK: usize = 1 << 16;

#[cfg(not(feature = "lapack"))]
pub(crate) type Active = faer_backend::Faer;
#[cfg(feature = "lapack")]
pub(crate) type Active = lapack_backend::Lapack;

/// Name of the backend the unqualified functions use: `"faer"` or `"lapack"`.
pub fn backend_name() -> &'static str {
    <Active as Backend>::NAME
}

/// What a dense backend provides; the shared logic (checks, singularity test, pseudo-inverse,
/// batching) lives in this module.
pub(crate) trait Backend {
    const NAME: &'static str;
    /// An LU factorization with partial pivoting.
    type Lu<S: Scalar>: Send + Sync;
    /// Factors a square, finite matrix. May return [`Error::Singular`] for an exactly zero
    /// pivot; otherwise the shared code tests the pivots.
    fn lu_factor<S: Scalar>(a: ArrayView2<'_, S>) -> Result<Self::Lu<S>>;
    /// `|u_ii|`, the magnitudes of the pivots.
    fn lu_pivots<S: Scalar>(lu: &Self::Lu<S>) -> Vec<S>;
    /// Solves in place (`b` is column-major `[n, k]`), with `A` or `A^T`.
    fn lu_solve_in_place<S: Scalar>(lu: &Self::Lu<S>, b: ArrayViewMut2<'_, S>, transpose: bool) -> Result<()>;
    /// Cholesky solve of a symmetric matrix (lower triangle read); an
    /// [`Error::InvalidArgument`] naming the failing pivot when it is not positive definite.
    fn cholesky_solve_in_place<S: Scalar>(a: ArrayView2<'_, S>, b: ArrayViewMut2<'_, S>) -> Result<()>;
    /// Thin SVD `a = U diag(s) V^T`, singular values non-increasing.
    fn svd<S: Scalar>(a: ArrayView2<'_, S>) -> Result<(Array2<S>, Array1<S>, Array2<S>)>;
    /// Singular values only, non-increasing.
    fn singular_values<S: Scalar>(a: ArrayView2<'_, S>) -> Result<Array1<S>>;
}

// ---------------------------------------------------------------------------------------
// Checks and right-hand-side shapes

pub(crate) fn check_finite_matrix<S: Scalar>(op: &'static str, what: &str, a: ArrayView2<'_, S>) -> Result<()> {
    // A flat scan first (vectorised, no index bookkeeping); the index only on failure.
    if a.iter().all(|v| v.is_finite()) {
        return Ok(());
    }
    if let Some(((i, j), v)) = a.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(Error::invalid(
            op,
            format!("{what} has a non-finite entry {v} at ({i}, {j})"),
        ));
    }
    Ok(())
}

/// Refuses a non-finite entry of a computed solution. The inputs were checked to be
/// finite, so such an entry means the answer lies beyond the range of the scalar type (a
/// badly scaled system such as `1e-300 x = 1e300`); returning it would be a silent `inf`.
fn check_solution<S: Scalar>(op: &'static str, x: ArrayView2<'_, S>) -> Result<()> {
    if x.iter().all(|v| v.is_finite()) {
        return Ok(());
    }
    if let Some(((i, j), v)) = x.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(Error::invalid(
            op,
            format!(
                "the solution has a non-finite entry {v} at ({i}, {j}) although the input is finite: \
                 the system is too badly scaled for {}; rescale A or b",
                S::NAME
            ),
        ));
    }
    Ok(())
}

fn check_square<S: Scalar>(op: &'static str, a: ArrayView2<'_, S>) -> Result<usize> {
    let (m, n) = a.dim();
    if m != n {
        return Err(Error::shapes(op, &[m, n], &[n, n], "the matrix must be square"));
    }
    Ok(n)
}

/// Copies a vector or matrix right-hand side into a column-major `[n, k]` matrix.
fn rhs_matrix<S: Scalar, D: Dimension>(op: &'static str, n: usize, b: &ArrayView<'_, S, D>) -> Result<Array2<S>> {
    let b2: ArrayView2<'_, S> = match b.ndim() {
        1 => b
            .view()
            .into_dimensionality::<Ix1>()
            .map_err(|e| Error::invalid(op, e.to_string()))?
            .insert_axis(Axis(1)),
        2 => b
            .view()
            .into_dimensionality::<Ix2>()
            .map_err(|e| Error::invalid(op, e.to_string()))?,
        d => {
            return Err(Error::invalid(
                op,
                format!(
                    "the right-hand side must be a vector or a matrix, got {d} dimensions (shape {:?})",
                    b.shape()
                ),
            ));
        }
    };
    if b2.nrows() != n {
        return Err(Error::shapes(
            op,
            b.shape(),
            &[n],
            format!("the right-hand side must have {n} rows (the matrix dimension)"),
        ));
    }
    check_finite_matrix(op, "the right-hand side", b2)?;
    let mut out = Array2::zeros((n, b2.ncols()).f());
    out.assign(&b2);
    Ok(out)
}

/// Turns a `[n, k]` solution back into the shape of the right-hand side.
fn rhs_back<S: Scalar, D: Dimension>(op: &'static str, x: Array2<S>, ndim: usize) -> Result<Array<S, D>> {
    let x = x.as_standard_layout().into_owned();
    let out = if ndim == 1 {
        x.index_axis_move(Axis(1), 0).into_dimensionality::<D>()
    } else {
        x.into_dimensionality::<D>()
    };
    out.map_err(|e| Error::invalid(op, e.to_string()))
}

// ---------------------------------------------------------------------------------------
// LU

/// The relative pivot size below which a matrix is declared singular: `n * eps`.
fn singular_threshold<S: Scalar>(n: usize) -> f64 {
    (n.max(1) as f64) * S::epsilon().to_f64_exact()
}

/// `min |u_ii| / max |u_ii|` and the index of the smallest pivot.
fn pivot_ratio<S: Scalar>(pivots: &[S]) -> (f64, usize) {
    let mut min = f64::INFINITY;
    let mut imin = 0;
    let mut max = 0.0f64;
    for (i, p) in pivots.iter().enumerate() {
        let p = p.to_f64_exact().abs();
        if p.is_nan() {
            return (f64::NAN, i);
        }
        if p < min {
            min = p;
            imin = i;
        }
        max = max.max(p);
    }
    if pivots.is_empty() {
        return (1.0, 0);
    }
    if max == 0.0 {
        return (0.0, imin);
    }
    (min / max, imin)
}

/// A reusable LU factorization with partial pivoting: factor once, solve many systems with
/// `A` or with `A^T` (the implicit-differentiation adjoint needs both).
///
/// Construction fails with [`Error::Singular`] when the smallest pivot is at most
/// `n * eps` times the largest one (see [`DenseLu::pivot_ratio`]); the factorization of a
/// matrix that passes may still be ill-conditioned, see [`DenseLu::rcond_estimate`].
///
/// ```
/// use clarke_solve::DenseLu;
/// use ndarray::array;
///
/// let a = array![[4.0f64, 1.0], [2.0, 3.0]];
/// let lu = DenseLu::new(a.view()).unwrap();
/// let x = lu.solve(array![1.0, 2.0].view()).unwrap();
/// let y = lu.solve_transpose(array![1.0, 2.0].view()).unwrap();
/// assert!((a.dot(&x) - array![1.0, 2.0]).iter().all(|r: &f64| r.abs() < 1e-12));
/// assert!((a.t().dot(&y) - array![1.0, 2.0]).iter().all(|r: &f64| r.abs() < 1e-12));
/// ```
pub struct DenseLu<S: Scalar> {
    inner: LuWith<S, Active>,
}

/// An LU factorization through a given backend, with the data the checks need.
pub(crate) struct LuWith<S: Scalar, B: Backend> {
    lu: B::Lu<S>,
    n: usize,
    pivot_ratio: f64,
    norm1: f64,
}

impl<S: Scalar, B: Backend> LuWith<S, B> {
    pub(crate) fn new(op: &'static str, a: ArrayView2<'_, S>) -> Result<Self> {
        let n = check_square(op, a)?;
        check_finite_matrix(op, "the matrix", a)?;
        let norm1 = a
            .columns()
            .into_iter()
            .map(|c| c.iter().map(|v| v.to_f64_exact().abs()).sum::<f64>())
            .fold(0.0, f64::max);
        let lu = B::lu_factor(a).map_err(|e| retag(op, e))?;
        let pivots = B::lu_pivots(&lu);
        // The matrix is finite, so a non-finite pivot comes from the elimination itself: after
        // a (numerically) zero pivot, from dividing by it (the matrix is singular: faer goes
        // on where LAPACK stops), otherwise from an overflow (entries near the largest number
        // of the type, or subnormal pivots whose reciprocals overflow). The pivots before it
        // tell which.
        let finite = pivots.iter().position(|p| !p.is_finite()).unwrap_or(pivots.len());
        let (ratio, imin) = pivot_ratio(&pivots[..finite]);
        let threshold = singular_threshold::<S>(n);
        if n > 0 && norm1 == 0.0 {
            return Err(Error::Singular {
                op,
                detail: format!("{n}x{n} matrix: every entry is zero"),
            });
        }
        if ratio.is_nan() || ratio <= threshold {
            return Err(Error::Singular {
                op,
                detail: format!(
                    "{n}x{n} matrix: smallest LU pivot / largest = {ratio:e} (pivot {imin}) <= {threshold:e} (n * eps of {})",
                    S::NAME
                ),
            });
        }
        if let Some(p) = pivots.get(finite) {
            return Err(Error::invalid(
                op,
                format!(
                    "{n}x{n} matrix: the LU elimination overflowed (pivot {finite} is {p}) although the matrix \
                     is finite: it is too badly scaled for {} (entries near the largest number, or subnormal \
                     ones); rescale it",
                    S::NAME
                ),
            ));
        }
        Ok(LuWith {
            lu,
            n,
            pivot_ratio: ratio,
            norm1,
        })
    }

    pub(crate) fn solve<D: Dimension>(
        &self,
        op: &'static str,
        b: ArrayView<'_, S, D>,
        transpose: bool,
    ) -> Result<Array<S, D>> {
        let mut x = rhs_matrix(op, self.n, &b)?;
        B::lu_solve_in_place(&self.lu, x.view_mut(), transpose)?;
        check_solution(op, x.view())?;
        rhs_back(op, x, b.ndim())
    }

    fn solve_vec(&self, b: Array1<S>, transpose: bool) -> Result<Array1<S>> {
        let mut x = Array2::zeros((self.n, 1).f());
        x.column_mut(0).assign(&b);
        B::lu_solve_in_place(&self.lu, x.view_mut(), transpose)?;
        Ok(x.column(0).to_owned())
    }

    /// Hager's estimate of `||A^{-1}||_1`, then `1 / (||A||_1 ||A^{-1}||_1)`.
    fn rcond_estimate(&self) -> Result<f64> {
        let n = self.n;
        if n == 0 {
            return Ok(1.0);
        }
        if self.norm1 == 0.0 {
            return Ok(0.0);
        }
        let mut x = Array1::from_elem(n, S::from_f64_lossy(1.0 / n as f64));
        let mut est = 0.0f64;
        for _ in 0..5 {
            let y = self.solve_vec(x.clone(), false)?;
            let y_norm = y.iter().map(|v| v.to_f64_exact().abs()).sum::<f64>();
            if !y_norm.is_finite() {
                return Ok(0.0);
            }
            if y_norm <= est {
                break;
            }
            est = y_norm;
            let xi = y.mapv(|v| if v >= S::zero() { S::one() } else { -S::one() });
            let z = self.solve_vec(xi, true)?;
            let (jmax, zmax) = z
                .iter()
                .enumerate()
                .map(|(j, v)| (j, v.to_f64_exact().abs()))
                .fold((0, -1.0), |acc, t| if t.1 > acc.1 { t } else { acc });
            let zx = z.dot(&x).to_f64_exact();
            if zmax <= zx {
                break;
            }
            x.fill(S::zero());
            x[jmax] = S::one();
        }
        Ok(1.0 / (self.norm1 * est))
    }
}

/// Re-labels a backend error with the public function's name.
fn retag(op: &'static str, e: Error) -> Error {
    match e {
        Error::Singular { detail, .. } => Error::Singular { op, detail },
        Error::InvalidArgument { detail, .. } => Error::InvalidArgument { op, detail },
        other => other,
    }
}

impl<S: Scalar> DenseLu<S> {
    /// Factors a square matrix. Errors: not square, non-finite entries, singular, an
    /// elimination that overflows.
    pub fn new(a: ArrayView2<'_, S>) -> Result<Self> {
        Ok(DenseLu {
            inner: LuWith::new("DenseLu::new", a)?,
        })
    }

    /// The dimension `n` of the `n x n` matrix.
    pub fn dim(&self) -> usize {
        self.inner.n
    }

    /// `min |u_ii| / max |u_ii|` over the pivots of `U`: a cheap singularity indicator (not a
    /// condition number; see [`DenseLu::rcond_estimate`]).
    pub fn pivot_ratio(&self) -> f64 {
        self.inner.pivot_ratio
    }

    /// An estimate of the reciprocal condition number in the 1-norm,
    /// `1 / (||A||_1 ||A^{-1}||_1)`, by Hager's method (a few solves with `A` and `A^T`).
    /// It is a lower bound of `||A^{-1}||_1` in practice tight within a small factor, so the
    /// returned value is at least the true reciprocal condition number up to that factor.
    /// `||A||_1` is summed in `f64`, so only an `f64` matrix whose column sums exceed
    /// `f64::MAX` (entries near the largest number) makes the estimate 0.
    pub fn rcond_estimate(&self) -> Result<f64> {
        self.inner.rcond_estimate()
    }

    /// Solves `A x = b` for a vector `[n]` or matrix `[n, k]` right-hand side. Errors: `b`
    /// of the wrong shape or with non-finite entries, a solution beyond the range of `S`.
    pub fn solve<D: Dimension>(&self, b: ArrayView<'_, S, D>) -> Result<Array<S, D>> {
        self.inner.solve("DenseLu::solve", b, false)
    }

    /// Solves `A^T x = b` with the same factorization.
    pub fn solve_transpose<D: Dimension>(&self, b: ArrayView<'_, S, D>) -> Result<Array<S, D>> {
        self.inner.solve("DenseLu::solve_transpose", b, true)
    }
}

impl<S: Scalar> fmt::Debug for DenseLu<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DenseLu")
            .field("backend", &backend_name())
            .field("dim", &self.inner.n)
            .field("pivot_ratio", &self.inner.pivot_ratio)
            .finish()
    }
}

pub(crate) fn lu_solve_with<B: Backend, S: Scalar, D: Dimension>(
    op: &'static str,
    a: ArrayView2<'_, S>,
    b: ArrayView<'_, S, D>,
    transpose: bool,
) -> Result<Array<S, D>> {
    let n = check_square(op, a)?;
    // Check the right-hand side before paying for the factorization.
    rhs_matrix(op, n, &b.view())?;
    LuWith::<S, B>::new(op, a)?.solve(op, b, transpose)
}

/// Solves `A x = b` by LU with partial pivoting (vector or matrix `b`).
///
/// Errors: `a` not square, `b` of the wrong length, non-finite entries,
/// [`Error::Singular`] when the smallest pivot is at most `n * eps` times the largest, an
/// elimination or a solution that overflows the scalar type.
///
/// ```
/// use clarke_solve::dense::lu_solve;
/// use ndarray::array;
///
/// let a = array![[2.0f64, 1.0], [1.0, 3.0]];
/// let x = lu_solve(a.view(), array![3.0, 5.0].view()).unwrap();
/// assert!((x[0] - 0.8).abs() < 1e-12 && (x[1] - 1.4).abs() < 1e-12);
/// ```
pub fn lu_solve<S: Scalar, D: Dimension>(a: ArrayView2<'_, S>, b: ArrayView<'_, S, D>) -> Result<Array<S, D>> {
    lu_solve_with::<Active, S, D>("lu_solve", a, b, false)
}

/// Solves `A^T x = b` by LU of `A` (vector or matrix `b`); same errors as [`lu_solve`].
pub fn lu_solve_transpose<S: Scalar, D: Dimension>(
    a: ArrayView2<'_, S>,
    b: ArrayView<'_, S, D>,
) -> Result<Array<S, D>> {
    lu_solve_with::<Active, S, D>("lu_solve_transpose", a, b, true)
}

// ---------------------------------------------------------------------------------------
// Cholesky

pub(crate) fn cholesky_solve_with<B: Backend, S: Scalar, D: Dimension>(
    op: &'static str,
    a: ArrayView2<'_, S>,
    b: ArrayView<'_, S, D>,
) -> Result<Array<S, D>> {
    let n = check_square(op, a)?;
    check_finite_matrix(op, "the matrix", a)?;
    let mut x = rhs_matrix(op, n, &b)?;
    // Symmetry check: the factorization reads one triangle only, so an unsymmetric matrix
    // would silently be solved as another matrix.
    let amax = a.iter().fold(0.0f64, |m, v| m.max(v.to_f64_exact().abs()));
    let tol = 100.0 * (n.max(1) as f64) * S::epsilon().to_f64_exact() * amax;
    for i in 0..n {
        for j in 0..i {
            let d = (a[[i, j]] - a[[j, i]]).to_f64_exact().abs();
            if d > tol {
                return Err(Error::invalid(
                    op,
                    format!(
                        "the matrix is not symmetric: |a[{i},{j}] - a[{j},{i}]| = {d:e} > {tol:e}; use lu_solve for general matrices"
                    ),
                ));
            }
        }
    }
    B::cholesky_solve_in_place(a, x.view_mut()).map_err(|e| retag(op, e))?;
    check_solution(op, x.view())?;
    rhs_back(op, x, b.ndim())
}

/// Solves `A x = b` for a symmetric positive definite `A` by Cholesky (vector or matrix `b`).
///
/// Errors: not square, wrong `b` length, non-finite entries, an unsymmetric matrix (beyond
/// rounding), a matrix that is not positive definite ([`Error::InvalidArgument`] naming the
/// failing pivot), or a solution beyond the range of the scalar type.
pub fn cholesky_solve<S: Scalar, D: Dimension>(a: ArrayView2<'_, S>, b: ArrayView<'_, S, D>) -> Result<Array<S, D>> {
    cholesky_solve_with::<Active, S, D>("cholesky_solve", a, b)
}

// ---------------------------------------------------------------------------------------
// Least squares and singular values

/// The answer of [`lstsq`].
#[derive(Debug, Clone, PartialEq)]
pub struct Lstsq<S, D: Dimension> {
    /// The minimum-norm least-squares solution `x = A^+ b` (`[n]` or `[n, k]`).
    pub solution: Array<S, D>,
    /// Numerical rank: singular values above `rcond * s_max`.
    pub rank: usize,
    /// Singular values of `A`, non-increasing.
    pub singular_values: Array1<S>,
    /// The cutoff `rcond` that was used (relative to the largest singular value).
    pub rcond: f64,
}

pub(crate) fn lstsq_with<B: Backend, S: Scalar, D: Dimension>(
    op: &'static str,
    a: ArrayView2<'_, S>,
    b: ArrayView<'_, S, D>,
    rcond: Option<f64>,
) -> Result<Lstsq<S, D>> {
    let (m, n) = a.dim();
    check_finite_matrix(op, "the matrix", a)?;
    let bm = rhs_matrix(op, m, &b)?;
    let rcond = match rcond {
        None => (m.max(n).max(1) as f64) * S::epsilon().to_f64_exact(),
        Some(r) if r.is_finite() && r >= 0.0 => r,
        Some(r) => return Err(Error::invalid(op, format!("rcond must be finite and >= 0, got {r}"))),
    };
    let k = bm.ncols();
    if m.min(n) == 0 {
        let x = Array2::zeros((n, k));
        return Ok(Lstsq {
            solution: rhs_back(op, x, b.ndim())?,
            rank: 0,
            singular_values: Array1::zeros(0),
            rcond,
        });
    }
    let (u, s, v) = B::svd(a).map_err(|e| retag(op, e))?;
    let smax = s[0].to_f64_exact();
    let cutoff = rcond * smax;
    let rank = s
        .iter()
        .take_while(|&&si| si.to_f64_exact() > cutoff && si > S::zero())
        .count();
    // x = V[:, :r] diag(1/s[:r]) U[:, :r]^T b
    let ur = u.slice(ndarray::s![.., ..rank]);
    let vr = v.slice(ndarray::s![.., ..rank]);
    let mut c = ur.t().dot(&bm);
    for (i, mut row) in c.rows_mut().into_iter().enumerate() {
        // Divide rather than multiply by 1 / s_i, which overflows for a subnormal s_i.
        let si = s[i];
        row.mapv_inplace(|x| x / si);
    }
    let x = vr.dot(&c);
    check_solution(op, x.view())?;
    Ok(Lstsq {
        solution: rhs_back(op, x, b.ndim())?,
        rank,
        singular_values: s,
        rcond,
    })
}

/// Least squares `min ||A x - b||_2` with the minimum-norm solution for rank-deficient or
/// underdetermined `A` (`m x n`, any shape), through the SVD; `b` is `[m]` or `[m, k]`.
///
/// Singular values at most `rcond * s_max` count as zero, with the default
/// `rcond = max(m, n) * eps` (see [`lstsq_rcond`] to choose it). The rank is reported, not
/// refused: least squares is an explicit request, unlike [`lu_solve`], which refuses singular
/// systems. Errors: `b` without `m` rows, non-finite entries, an SVD that does not converge,
/// or a solution beyond the range of the scalar type (a tiny singular value kept by the
/// cutoff).
///
/// ```
/// use clarke_solve::dense::lstsq;
/// use ndarray::array;
///
/// // Fit y = c0 + c1 t through (0, 1), (1, 3), (2, 5).
/// let a = array![[1.0f64, 0.0], [1.0, 1.0], [1.0, 2.0]];
/// let fit = lstsq(a.view(), array![1.0, 3.0, 5.0].view()).unwrap();
/// assert_eq!(fit.rank, 2);
/// assert!((fit.solution[0] - 1.0).abs() < 1e-12 && (fit.solution[1] - 2.0).abs() < 1e-12);
/// ```
pub fn lstsq<S: Scalar, D: Dimension>(a: ArrayView2<'_, S>, b: ArrayView<'_, S, D>) -> Result<Lstsq<S, D>> {
    lstsq_with::<Active, S, D>("lstsq", a, b, None)
}

/// [`lstsq`] with an explicit relative cutoff `rcond` on the singular values; `rcond` must be
/// finite and non-negative.
pub fn lstsq_rcond<S: Scalar, D: Dimension>(
    a: ArrayView2<'_, S>,
    b: ArrayView<'_, S, D>,
    rcond: f64,
) -> Result<Lstsq<S, D>> {
    lstsq_with::<Active, S, D>("lstsq_rcond", a, b, Some(rcond))
}

/// Thin SVD through faer (small internal problems: Anderson, Lanczos).
pub(crate) fn faer_svd<S: Scalar>(a: ArrayView2<'_, S>) -> Result<(Array2<S>, Array1<S>, Array2<S>)> {
    <faer_backend::Faer as Backend>::svd(a)
}

pub(crate) fn singular_values_with<B: Backend, S: Scalar>(op: &'static str, a: ArrayView2<'_, S>) -> Result<Array1<S>> {
    check_finite_matrix(op, "the matrix", a)?;
    if a.nrows().min(a.ncols()) == 0 {
        return Ok(Array1::zeros(0));
    }
    B::singular_values(a).map_err(|e| retag(op, e))
}

/// Singular values of a matrix, non-increasing. Errors: non-finite entries, or the SVD
/// iteration failing to converge.
pub fn singular_values<S: Scalar>(a: ArrayView2<'_, S>) -> Result<Array1<S>> {
    singular_values_with::<Active, S>("singular_values", a)
}

// ---------------------------------------------------------------------------------------
// Batched solves

pub(crate) fn batched_solve_with<B: Backend, S: Scalar>(
    op: &'static str,
    a: ArrayView3<'_, S>,
    b: ArrayView2<'_, S>,
    transpose: bool,
) -> Result<Array2<S>> {
    let (batch, n, n2) = a.dim();
    if n != n2 {
        return Err(Error::shapes(
            op,
            &[batch, n, n2],
            &[batch, n, n],
            "matrices must be [batch, n, n] (square per sample)",
        ));
    }
    if b.dim() != (batch, n) {
        return Err(Error::shapes(
            op,
            &[b.nrows(), b.ncols()],
            &[batch, n],
            "right-hand sides must be [batch, n], one row per sample",
        ));
    }
    let solve_one = |i: usize| -> Result<Array1<S>> {
        let lu = LuWith::<S, B>::new(op, a.index_axis(Axis(0), i)).map_err(|e| tag_sample(e, i))?;
        lu.solve(op, b.row(i), transpose).map_err(|e| tag_sample(e, i))
    };
    let work = batch.saturating_mul(n.saturating_pow(3));
    let rows: Vec<Array1<S>> = if work >= BATCH_PARALLEL_WORK && batch > 1 {
        (0..batch).into_par_iter().map(solve_one).collect::<Result<_>>()?
    } else {
        (0..batch).map(solve_one).collect::<Result<_>>()?
    };
    let mut out = Array2::zeros((batch, n));
    for (mut dst, src) in out.rows_mut().into_iter().zip(rows) {
        dst.assign(&src);
    }
    Ok(out)
}

fn tag_sample(e: Error, i: usize) -> Error {
    match e {
        Error::Singular { op, detail } => Error::Singular {
            op,
            detail: format!("batch sample {i}: {detail}"),
        },
        Error::InvalidArgument { op, detail } => Error::InvalidArgument {
            op,
            detail: format!("batch sample {i}: {detail}"),
        },
        other => other,
    }
}

/// Solves one small system per batch sample, `A[i] x[i] = b[i]` (or `A[i]^T x[i] = b[i]`
/// when `transpose`), in parallel with rayon: the block-diagonal solve of a batched implicit
/// layer. `a` is `[batch, n, n]`, `b` is `[batch, n]`, the result is `[batch, n]`.
///
/// Each sample is factored on one thread (faer sequential for small `n`). The first failing
/// sample (singular, non-finite, overflowing) makes the whole call fail, with the sample
/// index in the message.
pub fn batched_solve<S: Scalar>(a: ArrayView3<'_, S>, b: ArrayView2<'_, S>, transpose: bool) -> Result<Array2<S>> {
    batched_solve_with::<Active, S>("batched_solve", a, b, transpose)
}
