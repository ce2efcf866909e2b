//! Cone programs and constructors for the LPs, QPs and projection layers people use.
//!
//! A [`ConeProgram`] is
//!
//! ```text
//! minimise   (1/2) x^T P x + c^T x
//! subject to A x + s = b,  s in K
//! ```
//!
//! with `K` a product of [`Cones`] and `P` symmetric positive semidefinite (absent for a pure
//! cone program, the form of Agrawal et al. 2019). Its dual is
//! `maximise -(1/2) x^T P x - b^T y` subject to `P x + A^T y + c = 0`, `y in K*`.
//!
//! `A` and `P` are dense arrays ([`ConeProgram::new`], [`ConeProgram::with_quadratic`]) or
//! sparse [`CscMatrix`]es ([`ConeProgram::new_sparse`],
//! [`ConeProgram::with_sparse_quadratic`]); the solver, the derivative and the check read
//! them through the same products `A x`, `A^T y`, `P x`.

use clarke_core::gemm::gemv;
use clarke_core::{Error, Result};
use faer::{Mat, Side};
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis, concatenate, s};

use super::cones::{Cone, Cones};
use crate::design::CscMatrix;

/// A cone program (see the module docs), with dense data ([`ConeProgram::new`]) or sparse
/// `A` and `P` ([`ConeProgram::new_sparse`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ConeProgram {
    /// The quadratic term `P` (`n x n`, symmetric PSD), if any, when the data is dense
    /// (`None` for a sparse program: see [`ConeProgram::sparse_p`]).
    pub p: Option<Array2<f64>>,
    /// The constraint matrix `A` (`m x n`) when the data is dense; `0 x 0` for a sparse
    /// program (see [`ConeProgram::sparse_a`]).
    pub a: Array2<f64>,
    /// The right-hand side `b` (`m`).
    pub b: Array1<f64>,
    /// The cost `c` (`n`).
    pub c: Array1<f64>,
    /// The cone `K` (`m` rows in total).
    pub cones: Cones,
    /// Sparse `A` and `P` (compressed sparse columns), for a program built by
    /// [`ConeProgram::new_sparse`]; `None` for dense data. When set, the dense `a` is empty
    /// and `p` is `None`.
    pub sparse: Option<SparseData>,
}

/// The sparse data of a program: `A` and, if any, `P` (both triangles stored), each a
/// checked [`CscMatrix`]. Built by [`ConeProgram::new_sparse`] and
/// [`ConeProgram::with_sparse_quadratic`], which check shapes, symmetry and convexity.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseData {
    a: CscMatrix,
    p: Option<CscMatrix>,
}

impl SparseData {
    /// `A`.
    pub fn a(&self) -> &CscMatrix {
        &self.a
    }

    /// `P`, if the program has a quadratic term.
    pub fn p(&self) -> Option<&CscMatrix> {
        self.p.as_ref()
    }
}

/// `out = alpha M x + beta out` for a sparse `M` (column by column: a scatter).
pub(crate) fn csc_gemv(mat: &CscMatrix, alpha: f64, x: ArrayView1<'_, f64>, beta: f64, out: &mut Array1<f64>) {
    if beta == 0.0 {
        out.fill(0.0);
    } else if beta != 1.0 {
        out.mapv_inplace(|v| beta * v);
    }
    let faer = mat.as_faer();
    let (col_ptr, row_idx, vals) = (faer.col_ptr(), faer.row_idx(), faer.val());
    let out = out.as_slice_mut().expect("a contiguous vector");
    for (j, &xj) in x.iter().enumerate() {
        let f = alpha * xj;
        if f == 0.0 {
            continue;
        }
        for k in col_ptr[j]..col_ptr[j + 1] {
            out[row_idx[k]] += f * vals[k];
        }
    }
}

/// `out = alpha M^T y + beta out` for a sparse `M` (one dot product per column: a gather).
pub(crate) fn csc_gemv_t(mat: &CscMatrix, alpha: f64, y: ArrayView1<'_, f64>, beta: f64, out: &mut Array1<f64>) {
    let faer = mat.as_faer();
    let (col_ptr, row_idx, vals) = (faer.col_ptr(), faer.row_idx(), faer.val());
    for (j, o) in out.iter_mut().enumerate() {
        let mut acc = 0.0;
        for k in col_ptr[j]..col_ptr[j + 1] {
            acc += vals[k] * y[row_idx[k]];
        }
        *o = if beta == 0.0 {
            alpha * acc
        } else {
            alpha * acc + beta * *o
        };
    }
}

impl ConeProgram {
    /// The cone program `min c^T x` s.t. `A x + s = b`, `s in K`. Errors name the op, the
    /// shapes and the first non-finite entry.
    pub fn new(a: Array2<f64>, b: Array1<f64>, c: Array1<f64>, cones: Cones) -> Result<Self> {
        let prog = ConeProgram {
            p: None,
            a,
            b,
            c,
            cones,
            sparse: None,
        };
        prog.check("ConeProgram::new")?;
        Ok(prog)
    }

    /// The cone program `min c^T x` s.t. `A x + s = b`, `s in K` with a sparse `A` (its
    /// values are finite by construction of [`CscMatrix`]). The solver then factors a sparse
    /// matrix and never forms a dense `m x n` or `n x n` one (see [`super::solver`]).
    ///
    /// # Errors
    /// As [`ConeProgram::new`]: `A` without columns, `b`, `c` or the cones of another size
    /// than `A`'s rows and columns (naming both), non-finite `b` or `c`.
    pub fn new_sparse(a: CscMatrix, b: Array1<f64>, c: Array1<f64>, cones: Cones) -> Result<Self> {
        let prog = ConeProgram {
            p: None,
            a: Array2::zeros((0, 0)),
            b,
            c,
            cones,
            sparse: Some(SparseData { a, p: None }),
        };
        prog.check("ConeProgram::new_sparse")?;
        Ok(prog)
    }

    /// Adds a sparse quadratic term `(1/2) x^T P x` to a sparse program (both triangles of
    /// `P` stored).
    ///
    /// # Errors
    /// A dense program (use [`ConeProgram::with_quadratic`]), a `P` that is not `n x n`, not
    /// symmetric (naming the first entry that differs from its mirror), or not positive
    /// semidefinite (a sparse Cholesky factorisation of `P + 1e-10 max(1, max|P|) I` fails).
    pub fn with_sparse_quadratic(mut self, p: CscMatrix) -> Result<Self> {
        const OP: &str = "ConeProgram::with_sparse_quadratic";
        let n = self.n();
        let Some(data) = self.sparse.as_mut() else {
            return Err(Error::invalid(
                OP,
                "the program has dense data: give P as a dense matrix (with_quadratic), or build the program with new_sparse",
            ));
        };
        check_sparse_quadratic(OP, &p, n)?;
        let scale = p.as_faer().val().iter().fold(0.0f64, |a, v| a.max(v.abs()));
        let delta = 1e-10 * scale.max(1.0);
        if !super::sparse::cholesky_succeeds(&p, delta) {
            return Err(Error::invalid(
                OP,
                format!(
                    "P is not positive semidefinite: a Cholesky factorisation of P + {delta:e} I met a non-positive pivot; the program is not convex"
                ),
            ));
        }
        data.p = Some(p);
        Ok(self)
    }

    /// Whether `A` and `P` are stored sparse.
    pub fn is_sparse(&self) -> bool {
        self.sparse.is_some()
    }

    /// The sparse `A` of a sparse program.
    pub fn sparse_a(&self) -> Option<&CscMatrix> {
        self.sparse.as_ref().map(|d| &d.a)
    }

    /// The sparse `P` of a sparse program with a quadratic term.
    pub fn sparse_p(&self) -> Option<&CscMatrix> {
        self.sparse.as_ref().and_then(|d| d.p.as_ref())
    }

    /// Whether the program has a quadratic term (dense or sparse).
    pub fn has_quadratic(&self) -> bool {
        self.p.is_some() || self.sparse_p().is_some()
    }

    /// `A x` for an `x` of length `n` (checked by the callers).
    pub(crate) fn a_dot(&self, x: ArrayView1<'_, f64>) -> Array1<f64> {
        let mut out = Array1::zeros(self.m());
        self.a_gemv(1.0, x, 0.0, &mut out);
        out
    }

    /// `A^T y` for a `y` of length `m` (checked by the callers).
    pub(crate) fn at_dot(&self, y: ArrayView1<'_, f64>) -> Array1<f64> {
        let mut out = Array1::zeros(self.n());
        self.at_gemv(1.0, y, 0.0, &mut out);
        out
    }

    /// `out = alpha A x + beta out`.
    pub(crate) fn a_gemv(&self, alpha: f64, x: ArrayView1<'_, f64>, beta: f64, out: &mut Array1<f64>) {
        match &self.sparse {
            Some(d) => csc_gemv(&d.a, alpha, x, beta, out),
            None => gemv(alpha, self.a.view(), x, beta, out.view_mut()),
        }
    }

    /// `out = alpha A^T y + beta out`.
    pub(crate) fn at_gemv(&self, alpha: f64, y: ArrayView1<'_, f64>, beta: f64, out: &mut Array1<f64>) {
        match &self.sparse {
            Some(d) => csc_gemv_t(&d.a, alpha, y, beta, out),
            None => gemv(alpha, self.a.t(), y, beta, out.view_mut()),
        }
    }

    /// `max |A_ij|` over the stored entries (0 for an empty `A`).
    pub(crate) fn a_max_abs(&self) -> f64 {
        match &self.sparse {
            Some(d) => d.a.as_faer().val().iter().fold(0.0f64, |m, v| m.max(v.abs())),
            None => self.a.iter().fold(0.0f64, |m, v| m.max(v.abs())),
        }
    }

    /// `A` as a dense matrix (a copy for a sparse program: only for small ones).
    pub(crate) fn a_dense(&self) -> std::borrow::Cow<'_, Array2<f64>> {
        match &self.sparse {
            Some(d) => std::borrow::Cow::Owned(d.a.to_dense()),
            None => std::borrow::Cow::Borrowed(&self.a),
        }
    }

    /// `P` as a dense matrix, if any (a copy for a sparse program: only for small ones).
    pub(crate) fn p_dense(&self) -> Option<std::borrow::Cow<'_, Array2<f64>>> {
        match &self.sparse {
            Some(d) => d.p.as_ref().map(|p| std::borrow::Cow::Owned(p.to_dense())),
            None => self.p.as_ref().map(std::borrow::Cow::Borrowed),
        }
    }

    /// Checks what the fields of a program built as a struct literal (or changed through
    /// them) could get wrong, in the words of `op`: `A` without columns, `b`, `c`, the cones
    /// or `P` of the wrong size, non-finite entries, a `P` that is not symmetric. (That `P` is
    /// positive semidefinite is checked by [`ConeProgram::with_quadratic`]; the solver's
    /// factorisation refuses a `P` that is not.)
    pub(crate) fn check(&self, op: &'static str) -> Result<()> {
        let (m, n) = (self.m(), self.n());
        if let Some(d) = &self.sparse {
            if !self.a.is_empty() || self.p.is_some() {
                return Err(Error::invalid(
                    op,
                    "the program has both dense and sparse data: a sparse program keeps A and P in `sparse` only (a 0 x 0 `a`, no `p`)",
                ));
            }
            if let Some(p) = &d.p {
                check_sparse_quadratic(op, p, n)?;
            }
        }
        if n == 0 {
            return Err(Error::invalid(op, "A has no columns: the program has no variables"));
        }
        if self.b.len() != m {
            return Err(Error::shapes(
                op,
                &[self.b.len()],
                &[m],
                "b must have one entry per row of A",
            ));
        }
        if self.c.len() != n {
            return Err(Error::shapes(
                op,
                &[self.c.len()],
                &[n],
                "c must have one entry per column of A",
            ));
        }
        if self.cones.dim() != m {
            return Err(Error::shapes(
                op,
                &[self.cones.dim()],
                &[m],
                format!(
                    "the cones {:?} take {} rows but A and b have {m}",
                    self.cones.list(),
                    self.cones.dim()
                ),
            ));
        }
        check_finite(op, "A", self.a.iter())?;
        check_finite(op, "b", self.b.iter())?;
        check_finite(op, "c", self.c.iter())?;
        if let Some(p) = &self.p {
            check_quadratic_shape(op, p, n)?;
        }
        Ok(())
    }

    /// Adds the quadratic term `(1/2) x^T P x`. Errors: wrong shape, non-finite, not
    /// symmetric, or an eigenvalue below `-1e-10 max|P|` (the program would not be convex).
    pub fn with_quadratic(mut self, p: Array2<f64>) -> Result<Self> {
        let _avx = clarke_core::avx::UpperStateGuard;
        const OP: &str = "ConeProgram::with_quadratic";
        if self.is_sparse() {
            return Err(Error::invalid(
                OP,
                "the program has sparse data: give P as a CscMatrix (with_sparse_quadratic)",
            ));
        }
        let n = self.n();
        check_quadratic_shape(OP, &p, n)?;
        let scale = p.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        // A Cholesky factorisation of P + delta I succeeds for every PSD P (cheap); only when
        // it fails are the eigenvalues computed, to report the smallest.
        let delta = 1e-10 * scale.max(1.0);
        let shifted = Mat::<f64>::from_fn(n, n, |i, j| p[[i, j]] + if i == j { delta } else { 0.0 });
        if shifted.llt(Side::Lower).is_ok() {
            self.p = Some(p);
            return Ok(self);
        }
        let eig = Mat::<f64>::from_fn(n, n, |i, j| p[[i, j]])
            .self_adjoint_eigenvalues(Side::Lower)
            .map_err(|e| Error::invalid(OP, format!("eigenvalues of P failed: {e:?}")))?;
        let lowest = eig.iter().copied().fold(f64::INFINITY, f64::min);
        if lowest < -delta {
            return Err(Error::invalid(
                OP,
                format!("P is not positive semidefinite: smallest eigenvalue {lowest:e}; the program is not convex"),
            ));
        }
        self.p = Some(p);
        Ok(self)
    }

    /// Variables `n`.
    pub fn n(&self) -> usize {
        match &self.sparse {
            Some(d) => d.a.ncols(),
            None => self.a.ncols(),
        }
    }

    /// Constraint rows `m`.
    pub fn m(&self) -> usize {
        match &self.sparse {
            Some(d) => d.a.nrows(),
            None => self.a.nrows(),
        }
    }

    /// `P x` (zero without a quadratic term).
    ///
    /// # Errors
    /// An `x` of another length than the variables.
    pub fn p_times(&self, x: ArrayView1<'_, f64>) -> Result<Array1<f64>> {
        if x.len() != self.n() {
            return Err(Error::shapes(
                "ConeProgram::p_times",
                &[x.len()],
                &[self.n()],
                "x must have one entry per variable",
            ));
        }
        Ok(self.p_dot(x))
    }

    /// `P x` for an `x` of length `n` (checked by the callers).
    pub(crate) fn p_dot(&self, x: ArrayView1<'_, f64>) -> Array1<f64> {
        let mut out = Array1::zeros(self.n());
        match (&self.p, self.sparse_p()) {
            (Some(p), _) => gemv(1.0, p.view(), x, 0.0, out.view_mut()),
            (None, Some(p)) => csc_gemv(p, 1.0, x, 0.0, &mut out),
            (None, None) => {}
        }
        out
    }

    /// The same program with another cost (the data of a batch that shares `P`, `A`, `b`).
    pub fn with_cost(&self, c: ArrayView1<'_, f64>) -> Result<Self> {
        if c.len() != self.n() {
            return Err(Error::shapes(
                "ConeProgram::with_cost",
                &[c.len()],
                &[self.n()],
                "c must have n entries",
            ));
        }
        check_finite("ConeProgram::with_cost", "c", c.iter())?;
        Ok(ConeProgram {
            c: c.to_owned(),
            ..self.clone()
        })
    }
}

/// `P` is `n x n`, finite and symmetric (to `1e-12` of its largest entry).
fn check_quadratic_shape(op: &'static str, p: &Array2<f64>, n: usize) -> Result<()> {
    if p.dim() != (n, n) {
        return Err(Error::shapes(
            op,
            p.shape(),
            &[n, n],
            "P must be n x n with n = columns of A",
        ));
    }
    check_finite(op, "P", p.iter())?;
    let scale = p.iter().fold(0.0f64, |a, v| a.max(v.abs()));
    let asym = (p - &p.t()).iter().fold(0.0f64, |a, v| a.max(v.abs()));
    if asym > 1e-12 * scale.max(1.0) {
        return Err(Error::invalid(
            op,
            format!("P is not symmetric: max |P - P^T| = {asym:e}"),
        ));
    }
    Ok(())
}

/// A sparse `P` is `n x n` and symmetric (to `1e-12` of its largest entry; an entry
/// without a stored mirror counts as mirrored by 0). Its values are finite by construction.
fn check_sparse_quadratic(op: &'static str, p: &CscMatrix, n: usize) -> Result<()> {
    if (p.nrows(), p.ncols()) != (n, n) {
        return Err(Error::shapes(
            op,
            &[p.nrows(), p.ncols()],
            &[n, n],
            "P must be n x n with n = columns of A",
        ));
    }
    let scale = p.as_faer().val().iter().fold(0.0f64, |a, v| a.max(v.abs()));
    let tol = 1e-12 * scale.max(1.0);
    for j in 0..n {
        let (rows, vals) = p.column(j);
        for (&i, &v) in rows.iter().zip(vals) {
            let (mrows, mvals) = p.column(i);
            let mirror = mrows.binary_search(&j).map_or(0.0, |k| mvals[k]);
            if (v - mirror).abs() > tol {
                return Err(Error::invalid(
                    op,
                    format!("P is not symmetric: P[{i}, {j}] = {v:e} but P[{j}, {i}] = {mirror:e}"),
                ));
            }
        }
    }
    Ok(())
}

/// The first non-finite entry of `values`, as an error naming `op`, `what` and the index.
pub(crate) fn check_finite<'a>(op: &'static str, what: &str, values: impl Iterator<Item = &'a f64>) -> Result<()> {
    for (i, v) in values.enumerate() {
        if !v.is_finite() {
            return Err(Error::invalid(
                op,
                format!("{what} has a non-finite entry {v} at flat index {i}"),
            ));
        }
    }
    Ok(())
}

/// The point `u` of a projection: non-empty and finite.
fn check_point(op: &'static str, u: ArrayView1<'_, f64>) -> Result<()> {
    if u.is_empty() {
        return Err(Error::invalid(op, "the point u is empty"));
    }
    check_finite(op, "u", u.iter())
}

/// Inequalities `G x <= h` and equalities `A x = b` stacked into cone-program rows (zero
/// cone first).
fn stack_constraints(
    op: &'static str,
    n: usize,
    ineq: Option<(ArrayView2<'_, f64>, ArrayView1<'_, f64>)>,
    eq: Option<(ArrayView2<'_, f64>, ArrayView1<'_, f64>)>,
) -> Result<(Array2<f64>, Array1<f64>, Cones)> {
    let mut rows: Vec<ArrayView2<'_, f64>> = Vec::new();
    let mut rhs: Vec<ArrayView1<'_, f64>> = Vec::new();
    let mut cones = Vec::new();
    for (what, part, cone) in [
        ("equality", eq, Cone::Zero as fn(usize) -> Cone),
        ("inequality", ineq, Cone::NonNeg),
    ] {
        if let Some((g, h)) = part {
            if g.ncols() != n {
                return Err(Error::shapes(
                    op,
                    g.shape(),
                    &[g.nrows(), n],
                    format!("the {what} matrix needs n = {n} columns"),
                ));
            }
            if h.len() != g.nrows() {
                return Err(Error::shapes(
                    op,
                    &[h.len()],
                    &[g.nrows()],
                    format!("the {what} right-hand side needs one entry per row"),
                ));
            }
            if g.nrows() > 0 {
                rows.push(g);
                rhs.push(h);
                cones.push(cone(g.nrows()));
            }
        }
    }
    if rows.is_empty() {
        return Err(Error::invalid(
            op,
            "no constraints: give inequalities, equalities or both",
        ));
    }
    let a = concatenate(Axis(0), &rows).map_err(|e| Error::invalid(op, e.to_string()))?;
    let b = concatenate(Axis(0), &rhs).map_err(|e| Error::invalid(op, e.to_string()))?;
    Ok((a, b, Cones::new(cones)?))
}

/// The LP `min c^T x` s.t. `G x <= h`, `A x = b` (either part may be absent).
///
/// # Errors
/// No constraint rows at all, a `G` or `A` without `len(c)` columns, an `h` or `b` of
/// another length than its matrix's rows, non-finite data (as [`ConeProgram::new`]).
pub fn lp(
    c: ArrayView1<'_, f64>,
    ineq: Option<(ArrayView2<'_, f64>, ArrayView1<'_, f64>)>,
    eq: Option<(ArrayView2<'_, f64>, ArrayView1<'_, f64>)>,
) -> Result<ConeProgram> {
    let (a, b, cones) = stack_constraints("lp", c.len(), ineq, eq)?;
    ConeProgram::new(a, b, c.to_owned(), cones)
}

/// The QP `min (1/2) x^T P x + c^T x` s.t. `G x <= h`, `A x = b`.
///
/// # Errors
/// As [`lp`], and a `P` [`ConeProgram::with_quadratic`] refuses.
pub fn qp(
    p: ArrayView2<'_, f64>,
    c: ArrayView1<'_, f64>,
    ineq: Option<(ArrayView2<'_, f64>, ArrayView1<'_, f64>)>,
    eq: Option<(ArrayView2<'_, f64>, ArrayView1<'_, f64>)>,
) -> Result<ConeProgram> {
    let (a, b, cones) = stack_constraints("qp", c.len(), ineq, eq)?;
    ConeProgram::new(a, b, c.to_owned(), cones)?.with_quadratic(p.to_owned())
}

/// Euclidean projection onto the polytope `{x : G x <= h}` as the QP
/// `min (1/2)||x||^2 - u^T x` s.t. `G x <= h` (so the cost is `c = -u`).
///
/// An empty polytope is not detected here: [`super::solve`] reports the program as
/// [`super::ConeStatus::Infeasible`] with a certificate.
///
/// # Errors
/// An empty or non-finite `u`, a `G` or `h` that does not fit `u` (as [`qp`]).
pub fn polytope_projection(
    u: ArrayView1<'_, f64>,
    g: ArrayView2<'_, f64>,
    h: ArrayView1<'_, f64>,
) -> Result<ConeProgram> {
    check_point("polytope_projection", u)?;
    let n = u.len();
    qp(Array2::eye(n).view(), (-&u).view(), Some((g, h)), None)
}

/// Projection onto the box `[lo, hi]^n` as a QP with `2n` inequalities (`x <= hi`, `-x <= -lo`).
///
/// # Errors
/// `lo > hi` (an empty box: the QP would be infeasible), a NaN or infinite bound (the rows
/// of a cone program are finite: leave an open side out with [`polytope_projection`]), an
/// empty or non-finite `u`.
pub fn box_projection(u: ArrayView1<'_, f64>, lo: f64, hi: f64) -> Result<ConeProgram> {
    const OP: &str = "box_projection";
    if !(lo.is_finite() && hi.is_finite()) || lo > hi {
        return Err(Error::invalid(
            OP,
            format!("needs finite bounds with lo <= hi, got lo = {lo}, hi = {hi}"),
        ));
    }
    check_point(OP, u)?;
    let n = u.len();
    let eye = Array2::<f64>::eye(n);
    let g = concatenate(Axis(0), &[eye.view(), (-&eye).view()])
        .map_err(|e| Error::invalid("box_projection", e.to_string()))?;
    let mut h = Array1::from_elem(2 * n, hi);
    h.slice_mut(s![n..]).fill(-lo);
    polytope_projection(u, g.view(), h.view())
}

/// Sparsemax (Martins and Astudillo 2016): projection onto the simplex
/// `{x >= 0, sum x = radius}` as the QP `min (1/2)||x||^2 - u^T x` s.t. `1^T x = radius`,
/// `-x <= 0`.
///
/// # Errors
/// A `radius` that is not finite and `> 0` (0 makes the simplex the single point 0, a
/// negative radius an empty set), an empty or non-finite `u`.
pub fn simplex_projection(u: ArrayView1<'_, f64>, radius: f64) -> Result<ConeProgram> {
    const OP: &str = "simplex_projection";
    if !(radius.is_finite() && radius > 0.0) {
        return Err(Error::invalid(
            OP,
            format!("radius must be finite and > 0, got {radius}"),
        ));
    }
    check_point(OP, u)?;
    let n = u.len();
    let g = -Array2::<f64>::eye(n);
    let h = Array1::zeros(n);
    let a = Array2::ones((1, n));
    let b = Array1::from_elem(1, radius);
    qp(
        Array2::eye(n).view(),
        (-&u).view(),
        Some((g.view(), h.view())),
        Some((a.view(), b.view())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn shapes_and_values_are_checked() {
        let cones = Cones::new(vec![Cone::NonNeg(2)]).unwrap();
        let a = Array2::<f64>::eye(2);
        let e = ConeProgram::new(a.clone(), array![1.0, 2.0, 3.0], array![1.0, 1.0], cones.clone()).unwrap_err();
        assert!(e.to_string().contains("[3] vs [2]"), "{e}");
        let e = ConeProgram::new(a.clone(), array![1.0, f64::NAN], array![1.0, 1.0], cones.clone()).unwrap_err();
        assert!(
            e.to_string().contains("b has a non-finite entry NaN at flat index 1"),
            "{e}"
        );
        let three = Cones::new(vec![Cone::NonNeg(1), Cone::Soc(2)]).unwrap();
        let e = ConeProgram::new(a.clone(), array![1.0, 2.0], array![1.0, 1.0], three).unwrap_err();
        assert!(e.to_string().contains("take 3 rows but A and b have 2"), "{e}");
        let prog = ConeProgram::new(a, array![1.0, 2.0], array![1.0, 1.0], cones).unwrap();
        let e = prog.clone().with_quadratic(array![[1.0, 2.0], [0.0, 1.0]]).unwrap_err();
        assert!(e.to_string().contains("not symmetric"), "{e}");
        let e = prog.with_quadratic(array![[1.0, 0.0], [0.0, -1.0]]).unwrap_err();
        assert!(e.to_string().contains("not positive semidefinite"), "{e}");
    }

    #[test]
    fn constructors_stack_equalities_first() {
        let u = array![0.2, 0.5, -0.1];
        let prog = simplex_projection(u.view(), 1.0).unwrap();
        assert_eq!(prog.cones.list(), &[Cone::Zero(1), Cone::NonNeg(3)]);
        assert_eq!(prog.a.row(0).to_vec(), vec![1.0, 1.0, 1.0]);
        assert_eq!(prog.c, -&u);
        let e = box_projection(u.view(), 1.0, 0.0).unwrap_err();
        assert!(e.to_string().contains("lo <= hi"), "{e}");
        let e = lp(array![1.0, 2.0].view(), None, None).unwrap_err();
        assert!(e.to_string().contains("no constraints"), "{e}");
    }
}
