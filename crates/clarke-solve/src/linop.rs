//! Linear operators: what the matrix-free solvers need to know about a matrix.
//!
//! A [`LinearOperator`] only has to compute `y = A x` (and, for the solvers and estimates
//! that need it, `y = A^T x`). That is all an implicit layer can offer cheaply: its Jacobian
//! is never formed, only Jacobian-vector or vector-Jacobian products are available.
//!
//! Adapters:
//! - dense matrices: [`Array2`] and [`ArrayView2`] implement the trait directly, and
//!   [`DenseOperator`] wraps a view explicitly;
//! - closures: [`FnOperator`] (optionally with a transpose closure);
//! - [`IdentityMinus`] turns `A` into `I - A` (the operator of a fixed-point adjoint);
//! - [`Transposed`] swaps `A` and `A^T`;
//! - [`NormalOperator`] is `A^T A` (symmetric positive semidefinite, for CG-based estimates).

use clarke_core::{Error, Result, Scalar};
use ndarray::linalg::general_mat_vec_mul;
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut1};

/// A linear map `x -> A x` from `ncols()`-vectors to `nrows()`-vectors.
///
/// Implementations write into `y` (overwriting it) and may fail, for example when the
/// product is a replay of a recorded computation. Solvers check lengths before calling,
/// so `x.len() == ncols()` and `y.len() == nrows()` hold on entry.
pub trait LinearOperator<S: Scalar> {
    /// Length of the output `A x`.
    fn nrows(&self) -> usize;

    /// Length of the input `x`.
    fn ncols(&self) -> usize;

    /// `y = A x`.
    fn apply(&self, x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>) -> Result<()>;

    /// `y = A^T x` (`x` has `nrows()` entries, `y` has `ncols()`).
    ///
    /// The default refuses with [`Error::InvalidArgument`]; operators that can provide the
    /// transpose override both this and [`LinearOperator::has_transpose`].
    fn apply_transpose(&self, x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>) -> Result<()> {
        let _ = (x, y);
        Err(Error::invalid(
            "LinearOperator::apply_transpose",
            "this operator does not provide its transpose (use FnOperator::with_transpose or a dense matrix)",
        ))
    }

    /// Whether [`LinearOperator::apply_transpose`] is available.
    fn has_transpose(&self) -> bool {
        false
    }

    /// The dimension of a square operator, or a [`Error::ShapeMismatch`] naming `op`.
    fn square_dim(&self, op: &'static str) -> Result<usize> {
        if self.nrows() == self.ncols() {
            Ok(self.nrows())
        } else {
            Err(Error::shapes(
                op,
                &[self.nrows(), self.ncols()],
                &[self.ncols(), self.ncols()],
                "this solver needs a square operator",
            ))
        }
    }
}

impl<S: Scalar, T: LinearOperator<S> + ?Sized> LinearOperator<S> for &T {
    fn nrows(&self) -> usize {
        (**self).nrows()
    }
    fn ncols(&self) -> usize {
        (**self).ncols()
    }
    fn apply(&self, x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>) -> Result<()> {
        (**self).apply(x, y)
    }
    fn apply_transpose(&self, x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>) -> Result<()> {
        (**self).apply_transpose(x, y)
    }
    fn has_transpose(&self) -> bool {
        (**self).has_transpose()
    }
}

/// Applies `op` to `x` into a fresh vector, checking the input length.
pub fn apply_new<S: Scalar>(op: &impl LinearOperator<S>, x: ArrayView1<'_, S>) -> Result<Array1<S>> {
    if x.len() != op.ncols() {
        return Err(Error::shapes(
            "LinearOperator::apply",
            &[x.len()],
            &[op.ncols()],
            "input length must equal the operator's column count",
        ));
    }
    let mut y = Array1::zeros(op.nrows());
    op.apply(x, y.view_mut())?;
    Ok(y)
}

/// Applies the transpose of `op` to `x` into a fresh vector, checking the input length.
pub fn apply_transpose_new<S: Scalar>(op: &impl LinearOperator<S>, x: ArrayView1<'_, S>) -> Result<Array1<S>> {
    if x.len() != op.nrows() {
        return Err(Error::shapes(
            "LinearOperator::apply_transpose",
            &[x.len()],
            &[op.nrows()],
            "input length must equal the operator's row count",
        ));
    }
    let mut y = Array1::zeros(op.ncols());
    op.apply_transpose(x, y.view_mut())?;
    Ok(y)
}

/// Checks the lengths of a product `y = op x`.
fn check_product(op: &'static str, rows: usize, cols: usize, x: usize, y: usize) -> Result<()> {
    if x != cols || y != rows {
        return Err(Error::shapes(
            op,
            &[x, y],
            &[cols, rows],
            format!("input and output lengths must be ({cols}, {rows}) for a {rows}x{cols} operator"),
        ));
    }
    Ok(())
}

fn dense_apply<S: Scalar>(a: ArrayView2<'_, S>, x: ArrayView1<'_, S>, mut y: ArrayViewMut1<'_, S>) -> Result<()> {
    check_product("LinearOperator::apply (dense)", a.nrows(), a.ncols(), x.len(), y.len())?;
    general_mat_vec_mul(S::one(), &a, &x, S::zero(), &mut y);
    Ok(())
}

/// A dense matrix seen as an operator (borrowing the matrix).
#[derive(Debug, Clone, Copy)]
pub struct DenseOperator<'a, S> {
    a: ArrayView2<'a, S>,
}

impl<'a, S: Scalar> DenseOperator<'a, S> {
    /// Wraps a matrix view.
    pub fn new(a: ArrayView2<'a, S>) -> Self {
        DenseOperator { a }
    }

    /// The wrapped matrix.
    pub fn matrix(&self) -> ArrayView2<'a, S> {
        self.a
    }
}

impl<S: Scalar> LinearOperator<S> for DenseOperator<'_, S> {
    fn nrows(&self) -> usize {
        self.a.nrows()
    }
    fn ncols(&self) -> usize {
        self.a.ncols()
    }
    fn apply(&self, x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>) -> Result<()> {
        dense_apply(self.a, x, y)
    }
    fn apply_transpose(&self, x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>) -> Result<()> {
        dense_apply(self.a.t(), x, y)
    }
    fn has_transpose(&self) -> bool {
        true
    }
}

impl<S: Scalar> LinearOperator<S> for ArrayView2<'_, S> {
    fn nrows(&self) -> usize {
        self.dim().0
    }
    fn ncols(&self) -> usize {
        self.dim().1
    }
    fn apply(&self, x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>) -> Result<()> {
        dense_apply(self.view(), x, y)
    }
    fn apply_transpose(&self, x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>) -> Result<()> {
        dense_apply(self.t(), x, y)
    }
    fn has_transpose(&self) -> bool {
        true
    }
}

impl<S: Scalar> LinearOperator<S> for Array2<S> {
    fn nrows(&self) -> usize {
        self.dim().0
    }
    fn ncols(&self) -> usize {
        self.dim().1
    }
    fn apply(&self, x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>) -> Result<()> {
        dense_apply(self.view(), x, y)
    }
    fn apply_transpose(&self, x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>) -> Result<()> {
        dense_apply(self.t(), x, y)
    }
    fn has_transpose(&self) -> bool {
        true
    }
}

/// The signature of a product closure: read `x`, write the product into `y`.
pub type ProductFn<S> = fn(ArrayView1<'_, S>, ArrayViewMut1<'_, S>) -> Result<()>;

/// An operator given by closures: `apply` computes `y = A x`, the optional transpose closure
/// computes `y = A^T x`. The closures only ever see vectors of the declared lengths: a call
/// with other lengths is an [`Error::ShapeMismatch`] before they run.
///
/// ```
/// use clarke_solve::{FnOperator, LinearOperator};
/// use ndarray::{array, Array1};
///
/// // A = diag(1, 2, 3), matrix-free.
/// let d = array![1.0, 2.0, 3.0];
/// let op = FnOperator::new(3, 3, |x, mut y| {
///     y.assign(&(&x * &d));
///     Ok(())
/// });
/// let mut y = Array1::zeros(3);
/// op.apply(array![1.0, 1.0, 1.0].view(), y.view_mut()).unwrap();
/// assert_eq!(y, array![1.0, 2.0, 3.0]);
/// ```
pub struct FnOperator<S, F, G = ProductFn<S>> {
    nrows: usize,
    ncols: usize,
    f: F,
    ft: Option<G>,
    _scalar: std::marker::PhantomData<fn() -> S>,
}

impl<S, F> FnOperator<S, F>
where
    S: Scalar,
    F: Fn(ArrayView1<'_, S>, ArrayViewMut1<'_, S>) -> Result<()>,
{
    /// An operator from `ncols`-vectors to `nrows`-vectors computed by `f(x, y)` (`y = A x`).
    pub fn new(nrows: usize, ncols: usize, f: F) -> Self {
        FnOperator {
            nrows,
            ncols,
            f,
            ft: None,
            _scalar: std::marker::PhantomData,
        }
    }
}

impl<S, F, G> FnOperator<S, F, G>
where
    S: Scalar,
    F: Fn(ArrayView1<'_, S>, ArrayViewMut1<'_, S>) -> Result<()>,
{
    /// Adds the transpose product `g(x, y)`: `y = A^T x`.
    pub fn with_transpose<G2>(self, g: G2) -> FnOperator<S, F, G2>
    where
        G2: Fn(ArrayView1<'_, S>, ArrayViewMut1<'_, S>) -> Result<()>,
    {
        FnOperator {
            nrows: self.nrows,
            ncols: self.ncols,
            f: self.f,
            ft: Some(g),
            _scalar: std::marker::PhantomData,
        }
    }
}

impl<S, F, G> LinearOperator<S> for FnOperator<S, F, G>
where
    S: Scalar,
    F: Fn(ArrayView1<'_, S>, ArrayViewMut1<'_, S>) -> Result<()>,
    G: Fn(ArrayView1<'_, S>, ArrayViewMut1<'_, S>) -> Result<()>,
{
    fn nrows(&self) -> usize {
        self.nrows
    }
    fn ncols(&self) -> usize {
        self.ncols
    }
    /// Checks the lengths (a closure would otherwise see, and might broadcast, vectors of
    /// the wrong length), then calls the closure.
    fn apply(&self, x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>) -> Result<()> {
        check_product("FnOperator::apply", self.nrows, self.ncols, x.len(), y.len())?;
        (self.f)(x, y)
    }
    fn apply_transpose(&self, x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>) -> Result<()> {
        match &self.ft {
            Some(g) => {
                check_product("FnOperator::apply_transpose", self.ncols, self.nrows, x.len(), y.len())?;
                g(x, y)
            }
            None => Err(Error::invalid(
                "FnOperator::apply_transpose",
                "no transpose closure was given (use FnOperator::with_transpose)",
            )),
        }
    }
    fn has_transpose(&self) -> bool {
        self.ft.is_some()
    }
}

/// `I - A` for a square operator `A`: the operator of the fixed-point equation
/// `x = A x + b`, and (transposed) of the implicit adjoint `(I - J_z)^T w = g`.
#[derive(Debug, Clone, Copy)]
pub struct IdentityMinus<O> {
    inner: O,
}

impl<O> IdentityMinus<O> {
    /// Wraps `A` (which must be square; the solvers check).
    pub fn new(inner: O) -> Self {
        IdentityMinus { inner }
    }

    /// The wrapped `A`.
    pub fn inner(&self) -> &O {
        &self.inner
    }
}

impl<S: Scalar, O: LinearOperator<S>> LinearOperator<S> for IdentityMinus<O> {
    fn nrows(&self) -> usize {
        self.inner.nrows()
    }
    fn ncols(&self) -> usize {
        self.inner.ncols()
    }
    fn apply(&self, x: ArrayView1<'_, S>, mut y: ArrayViewMut1<'_, S>) -> Result<()> {
        let n = self.inner.square_dim("IdentityMinus::apply")?;
        check_product("IdentityMinus::apply", n, n, x.len(), y.len())?;
        self.inner.apply(x, y.view_mut())?;
        y.zip_mut_with(&x, |yi, &xi| *yi = xi - *yi);
        Ok(())
    }
    fn apply_transpose(&self, x: ArrayView1<'_, S>, mut y: ArrayViewMut1<'_, S>) -> Result<()> {
        let n = self.inner.square_dim("IdentityMinus::apply_transpose")?;
        check_product("IdentityMinus::apply_transpose", n, n, x.len(), y.len())?;
        self.inner.apply_transpose(x, y.view_mut())?;
        y.zip_mut_with(&x, |yi, &xi| *yi = xi - *yi);
        Ok(())
    }
    fn has_transpose(&self) -> bool {
        self.inner.has_transpose()
    }
}

/// `A^T` for an operator `A` that provides its transpose.
#[derive(Debug, Clone, Copy)]
pub struct Transposed<O> {
    inner: O,
}

impl<O> Transposed<O> {
    /// Wraps `A`.
    pub fn new(inner: O) -> Self {
        Transposed { inner }
    }

    /// The wrapped `A`.
    pub fn inner(&self) -> &O {
        &self.inner
    }
}

impl<S: Scalar, O: LinearOperator<S>> LinearOperator<S> for Transposed<O> {
    fn nrows(&self) -> usize {
        self.inner.ncols()
    }
    fn ncols(&self) -> usize {
        self.inner.nrows()
    }
    /// Checks the lengths before calling the inner operator, which may rely on them.
    fn apply(&self, x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>) -> Result<()> {
        check_product("Transposed::apply", self.nrows(), self.ncols(), x.len(), y.len())?;
        self.inner.apply_transpose(x, y)
    }
    fn apply_transpose(&self, x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>) -> Result<()> {
        check_product(
            "Transposed::apply_transpose",
            self.ncols(),
            self.nrows(),
            x.len(),
            y.len(),
        )?;
        self.inner.apply(x, y)
    }
    fn has_transpose(&self) -> bool {
        self.inner.has_transpose()
    }
}

/// `A^T A` for an operator `A` that provides its transpose: symmetric positive semidefinite,
/// so CG applies to it (normal equations, smallest-singular-value estimates).
#[derive(Debug, Clone, Copy)]
pub struct NormalOperator<O> {
    inner: O,
}

impl<O> NormalOperator<O> {
    /// Wraps `A`.
    pub fn new(inner: O) -> Self {
        NormalOperator { inner }
    }

    /// The wrapped `A`.
    pub fn inner(&self) -> &O {
        &self.inner
    }

    /// `y = A^T (A x)` with the lengths checked, naming `op`.
    fn normal_product<S: Scalar>(&self, op: &'static str, x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>) -> Result<()>
    where
        O: LinearOperator<S>,
    {
        let n = self.inner.ncols();
        check_product(op, n, n, x.len(), y.len())?;
        let mut t = Array1::zeros(self.inner.nrows());
        self.inner.apply(x, t.view_mut())?;
        self.inner.apply_transpose(t.view(), y)
    }
}

impl<S: Scalar, O: LinearOperator<S>> LinearOperator<S> for NormalOperator<O> {
    fn nrows(&self) -> usize {
        self.inner.ncols()
    }
    fn ncols(&self) -> usize {
        self.inner.ncols()
    }
    /// Checks the lengths before calling the inner operator, which may rely on them.
    fn apply(&self, x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>) -> Result<()> {
        self.normal_product("NormalOperator::apply", x, y)
    }
    fn apply_transpose(&self, x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>) -> Result<()> {
        self.normal_product("NormalOperator::apply_transpose", x, y)
    }
    fn has_transpose(&self) -> bool {
        self.inner.has_transpose()
    }
}
