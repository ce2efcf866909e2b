//! Design matrices of the Lasso family: dense, or compressed sparse column.
//!
//! Coordinate descent and the hypergradients read a design one column at a time (`x_j^T v`
//! and `v += a x_j`), so one `Design` type with a column view serves both storages and
//! every solver runs on either without densifying. A sparse design costs memory in
//! proportion to its non-zeros, which is what text and finance data (rcv1, news20, finance)
//! need: news20 is 19,996 x 1,355,191 at 0.03% density.
//!
//! [`CscMatrix`] is faer's compressed sparse column matrix (`faer::sparse::SparseColMat`)
//! behind a constructor that checks what faer assumes, with errors that name the column, the
//! position and the value. faer is already the workspace's dense backend, and its sparse
//! module also brings the sparse Cholesky and LU factorisations with fill-reducing orderings,
//! so the sparse path adds no dependency.

use std::ops::Range;

use clarke_core::{Error, Result};
use faer::sparse::{SparseColMat, SparseColMatRef, SymbolicSparseColMat};
use ndarray::{Array1, Array2, ArrayView2};
use rayon::prelude::*;

/// A checked compressed sparse column matrix of `f64`: per column, strictly increasing row
/// indices below `nrows` and finite values.
///
/// Explicit zeros are allowed (they are stored entries with value 0).
#[derive(Debug, Clone)]
pub struct CscMatrix {
    mat: SparseColMat<usize, f64>,
}

impl CscMatrix {
    /// A matrix from its compressed sparse column arrays: column `j` holds the entries
    /// `col_ptr[j] .. col_ptr[j + 1]` of `row_idx` and `values`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `col_ptr` does not have `ncols + 1` entries or `row_idx`
    /// and `values` differ in length from `col_ptr[ncols]`; [`Error::InvalidArgument`] naming
    /// the column and position for a `col_ptr` that does not start at 0 or decreases, a row
    /// index out of range, unsorted or duplicate row indices in a column, and a value that
    /// is not finite.
    pub fn try_new(
        nrows: usize,
        ncols: usize,
        col_ptr: Vec<usize>,
        row_idx: Vec<usize>,
        values: Vec<f64>,
    ) -> Result<Self> {
        const OP: &str = "CscMatrix::try_new";
        if col_ptr.len() != ncols + 1 {
            return Err(Error::shapes(
                OP,
                &[col_ptr.len()],
                &[ncols + 1],
                format!("col_ptr needs ncols + 1 = {} entries", ncols + 1),
            ));
        }
        if col_ptr[0] != 0 {
            return Err(Error::invalid(OP, format!("col_ptr[0] must be 0, got {}", col_ptr[0])));
        }
        if let Some(j) = (0..ncols).find(|&j| col_ptr[j + 1] < col_ptr[j]) {
            return Err(Error::invalid(
                OP,
                format!(
                    "col_ptr decreases at column {j}: col_ptr[{j}] = {}, col_ptr[{}] = {}",
                    col_ptr[j],
                    j + 1,
                    col_ptr[j + 1]
                ),
            ));
        }
        let nnz = col_ptr[ncols];
        for (what, len) in [("row_idx", row_idx.len()), ("values", values.len())] {
            if len != nnz {
                return Err(Error::shapes(
                    OP,
                    &[len],
                    &[nnz],
                    format!("{what} needs col_ptr[ncols] = {nnz} entries"),
                ));
            }
        }
        for j in 0..ncols {
            let range = col_ptr[j]..col_ptr[j + 1];
            let rows = &row_idx[range.clone()];
            if let Some((k, &i)) = rows.iter().enumerate().find(|(_, i)| **i >= nrows) {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "column {j} has row index {i} (entry {}) but the matrix has {nrows} rows",
                        range.start + k
                    ),
                ));
            }
            if let Some(k) = (1..rows.len()).find(|&k| rows[k] <= rows[k - 1]) {
                let what = if rows[k] == rows[k - 1] {
                    "a duplicate"
                } else {
                    "an unsorted"
                };
                return Err(Error::invalid(
                    OP,
                    format!(
                        "column {j} has {what} row index: {} follows {} (entries {} and {}); row indices must be strictly increasing in each column",
                        rows[k],
                        rows[k - 1],
                        range.start + k - 1,
                        range.start + k
                    ),
                ));
            }
            if let Some((k, v)) = values[range.clone()].iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(Error::invalid(
                    OP,
                    format!("non-finite value {v} at row {}, column {j}", rows[k]),
                ));
            }
        }
        let symbolic = SymbolicSparseColMat::new_checked(nrows, ncols, col_ptr, None, row_idx);
        Ok(CscMatrix {
            mat: SparseColMat::new(symbolic, values),
        })
    }

    /// A matrix from `(row, column, value)` triplets in any order.
    ///
    /// # Errors
    /// As [`CscMatrix::try_new`]: an index out of range, two triplets at the same position
    /// (named; they are not summed, since a repeated entry in a data file is an error of the
    /// file), a value that is not finite.
    pub fn from_triplets(nrows: usize, ncols: usize, triplets: &[(usize, usize, f64)]) -> Result<Self> {
        const OP: &str = "CscMatrix::from_triplets";
        if let Some((k, &(i, j, _))) = triplets.iter().enumerate().find(|(_, t)| t.0 >= nrows || t.1 >= ncols) {
            return Err(Error::invalid(
                OP,
                format!("triplet {k} is at ({i}, {j}), outside the {nrows} x {ncols} matrix"),
            ));
        }
        let mut order: Vec<usize> = (0..triplets.len()).collect();
        order.sort_unstable_by_key(|&k| (triplets[k].1, triplets[k].0));
        let mut col_ptr = vec![0usize; ncols + 1];
        let mut row_idx = Vec::with_capacity(triplets.len());
        let mut values = Vec::with_capacity(triplets.len());
        for (pos, &k) in order.iter().enumerate() {
            let (i, j, v) = triplets[k];
            if pos > 0 {
                let prev = triplets[order[pos - 1]];
                if (prev.0, prev.1) == (i, j) {
                    return Err(Error::invalid(
                        OP,
                        format!(
                            "triplets {} and {k} are both at ({i}, {j}); give each entry once",
                            order[pos - 1]
                        ),
                    ));
                }
            }
            col_ptr[j + 1] += 1;
            row_idx.push(i);
            values.push(v);
        }
        for j in 0..ncols {
            col_ptr[j + 1] += col_ptr[j];
        }
        Self::try_new(nrows, ncols, col_ptr, row_idx, values).map_err(|e| match e {
            Error::InvalidArgument { detail, .. } => Error::invalid(OP, detail),
            other => other,
        })
    }

    /// The non-zero entries of a dense matrix (exact zeros are not stored).
    ///
    /// # Errors
    /// A value that is not finite, naming its row and column.
    pub fn from_dense(x: ArrayView2<'_, f64>) -> Result<Self> {
        let (n, p) = x.dim();
        if let Some(((i, j), v)) = x.indexed_iter().find(|(_, v)| !v.is_finite()) {
            return Err(Error::invalid(
                "CscMatrix::from_dense",
                format!("non-finite value {v} at row {i}, column {j}"),
            ));
        }
        let mut col_ptr = Vec::with_capacity(p + 1);
        col_ptr.push(0);
        let (mut row_idx, mut values) = (Vec::new(), Vec::new());
        for col in x.columns() {
            for (i, &v) in col.iter().enumerate() {
                if v != 0.0 {
                    row_idx.push(i);
                    values.push(v);
                }
            }
            col_ptr.push(row_idx.len());
        }
        Self::try_new(n, p, col_ptr, row_idx, values)
    }

    /// A checked copy of a faer matrix (faer also allows unsorted columns; these are
    /// refused here, as in [`CscMatrix::try_new`]).
    ///
    /// # Errors
    /// As [`CscMatrix::try_new`].
    pub fn from_faer(mat: SparseColMatRef<'_, usize, f64>) -> Result<Self> {
        let (nrows, ncols) = (mat.nrows(), mat.ncols());
        let mut col_ptr = Vec::with_capacity(ncols + 1);
        col_ptr.push(0);
        let (mut row_idx, mut values) = (Vec::new(), Vec::new());
        for j in 0..ncols {
            row_idx.extend_from_slice(mat.row_idx_of_col_raw(j));
            values.extend_from_slice(mat.val_of_col(j));
            col_ptr.push(row_idx.len());
        }
        Self::try_new(nrows, ncols, col_ptr, row_idx, values)
    }

    /// The faer matrix (for its sparse products and factorisations).
    pub fn as_faer(&self) -> SparseColMatRef<'_, usize, f64> {
        self.mat.as_ref()
    }

    /// Rows.
    pub fn nrows(&self) -> usize {
        self.mat.nrows()
    }

    /// Columns.
    pub fn ncols(&self) -> usize {
        self.mat.ncols()
    }

    /// Stored entries.
    pub fn nnz(&self) -> usize {
        self.mat.val().len()
    }

    /// Stored entries over `nrows * ncols`.
    pub fn density(&self) -> f64 {
        self.nnz() as f64 / (self.nrows() as f64 * self.ncols() as f64).max(1.0)
    }

    /// Bytes held by the three arrays (what the matrix costs in memory).
    pub fn heap_bytes(&self) -> usize {
        (self.ncols() + 1) * size_of::<usize>() + self.nnz() * (size_of::<usize>() + size_of::<f64>())
    }

    /// Column `j`: its row indices and values.
    ///
    /// # Panics
    /// When `j >= ncols`.
    pub fn column(&self, j: usize) -> (&[usize], &[f64]) {
        let range = self.mat.symbolic().col_range(j);
        (&self.mat.symbolic().row_idx()[range.clone()], &self.mat.val()[range])
    }

    /// The dense matrix.
    pub fn to_dense(&self) -> Array2<f64> {
        let mut out = Array2::zeros((self.nrows(), self.ncols()));
        for j in 0..self.ncols() {
            let (rows, vals) = self.column(j);
            for (&i, &v) in rows.iter().zip(vals) {
                out[[i, j]] = v;
            }
        }
        out
    }

    /// The transpose `A^T`, by one counting pass over the entries (the rows of `A` as
    /// compressed columns, each with increasing indices).
    pub fn transpose(&self) -> CscMatrix {
        let (m, n) = (self.nrows(), self.ncols());
        let mut col_ptr = vec![0usize; m + 1];
        for &i in self.mat.symbolic().row_idx() {
            col_ptr[i + 1] += 1;
        }
        for i in 0..m {
            col_ptr[i + 1] += col_ptr[i];
        }
        let mut next = col_ptr.clone();
        let mut row_idx = vec![0usize; self.nnz()];
        let mut values = vec![0.0; self.nnz()];
        for j in 0..n {
            let (rows, vals) = self.column(j);
            for (&i, &v) in rows.iter().zip(vals) {
                row_idx[next[i]] = j;
                values[next[i]] = v;
                next[i] += 1;
            }
        }
        let symbolic = SymbolicSparseColMat::new_checked(n, m, col_ptr, None, row_idx);
        CscMatrix {
            mat: SparseColMat::new(symbolic, values),
        }
    }

    /// The rows `range` (renumbered from 0), for a train/validation split.
    ///
    /// # Errors
    /// An empty range or one that reaches past the last row.
    pub fn rows(&self, range: Range<usize>) -> Result<CscMatrix> {
        if range.start >= range.end || range.end > self.nrows() {
            return Err(Error::invalid(
                "CscMatrix::rows",
                format!(
                    "the rows {range:?} are empty or outside the {} rows of the matrix",
                    self.nrows()
                ),
            ));
        }
        let mut col_ptr = Vec::with_capacity(self.ncols() + 1);
        col_ptr.push(0);
        let (mut row_idx, mut values) = (Vec::new(), Vec::new());
        for j in 0..self.ncols() {
            let (rows, vals) = self.column(j);
            let lo = rows.partition_point(|&i| i < range.start);
            let hi = rows.partition_point(|&i| i < range.end);
            row_idx.extend(rows[lo..hi].iter().map(|&i| i - range.start));
            values.extend_from_slice(&vals[lo..hi]);
            col_ptr.push(row_idx.len());
        }
        Self::try_new(range.len(), self.ncols(), col_ptr, row_idx, values)
    }
}

/// Equal shapes, stored positions and values (an explicit zero differs from an entry that
/// is not stored).
impl PartialEq for CscMatrix {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.as_faer(), other.as_faer());
        a.nrows() == b.nrows()
            && a.ncols() == b.ncols()
            && a.col_ptr() == b.col_ptr()
            && a.row_idx() == b.row_idx()
            && a.val() == b.val()
    }
}

/// One column of a [`Design`]: a dense slice or the entries of a sparse column.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Column<'a> {
    /// Every row.
    Dense(&'a [f64]),
    /// Stored rows and their values.
    Sparse {
        /// Row indices, increasing.
        rows: &'a [usize],
        /// Values.
        values: &'a [f64],
    },
}

impl Column<'_> {
    /// `x_j^T v`.
    #[inline]
    pub(crate) fn dot(&self, v: &[f64]) -> f64 {
        match self {
            Column::Dense(x) => dot(x, v),
            Column::Sparse { rows, values } => rows.iter().zip(*values).map(|(&i, &x)| x * v[i]).sum(),
        }
    }

    /// `out += a x_j`.
    #[inline]
    pub(crate) fn axpy(&self, a: f64, out: &mut [f64]) {
        match self {
            Column::Dense(x) => axpy(a, x, out),
            Column::Sparse { rows, values } => {
                for (&i, &x) in rows.iter().zip(*values) {
                    out[i] += a * x;
                }
            }
        }
    }

    /// `sum_i x_ij s_i v_i`.
    #[inline]
    pub(crate) fn weighted_dot(&self, s: &[f64], v: &[f64]) -> f64 {
        match self {
            Column::Dense(x) => x.iter().zip(s).zip(v).map(|((x, c), v)| x * c * v).sum(),
            Column::Sparse { rows, values } => rows.iter().zip(*values).map(|(&i, &x)| x * s[i] * v[i]).sum(),
        }
    }

    /// `sum_i x_ij^2 s_i` (`s = None`: `||x_j||^2`).
    #[inline]
    pub(crate) fn weighted_square(&self, s: Option<&[f64]>) -> f64 {
        match (self, s) {
            (Column::Dense(x), None) => dot(x, x),
            (Column::Sparse { values, .. }, None) => dot(values, values),
            (Column::Dense(x), Some(s)) => x.iter().zip(s).map(|(x, c)| x * x * c).sum(),
            (Column::Sparse { rows, values }, Some(s)) => rows.iter().zip(*values).map(|(&i, &x)| x * x * s[i]).sum(),
        }
    }

    /// `out_i *= s_i` on the rows the column can be non-zero on (every row of a dense one).
    #[inline]
    pub(crate) fn scale_rows(&self, s: &[f64], out: &mut [f64]) {
        match self {
            Column::Dense(_) => out.iter_mut().zip(s).for_each(|(o, c)| *o *= c),
            Column::Sparse { rows, .. } => rows.iter().for_each(|&i| out[i] *= s[i]),
        }
    }

    /// `out_i = 0` on the rows the column can be non-zero on (a scattered column removed
    /// from a work buffer without touching the rest of it).
    #[inline]
    pub(crate) fn clear_rows(&self, out: &mut [f64]) {
        match self {
            Column::Dense(_) => out.iter_mut().for_each(|o| *o = 0.0),
            Column::Sparse { rows, .. } => rows.iter().for_each(|&i| out[i] = 0.0),
        }
    }

    /// `sum_i x_ij g(i)` over the stored rows (every row of a dense column): `g` is called
    /// only where the column can be non-zero, so a sparse column skips the rest.
    #[inline]
    pub(crate) fn dot_with(&self, mut g: impl FnMut(usize) -> f64) -> f64 {
        match self {
            Column::Dense(x) => x.iter().enumerate().map(|(i, &x)| x * g(i)).sum(),
            Column::Sparse { rows, values } => rows.iter().zip(*values).map(|(&i, &x)| x * g(i)).sum(),
        }
    }
}

/// A design matrix: a column-major dense copy or a [`CscMatrix`].
#[derive(Debug, Clone)]
pub(crate) enum Design {
    /// Column `j` is `cols[j n .. (j + 1) n]`.
    Dense {
        /// Rows.
        n: usize,
        /// Columns.
        p: usize,
        /// Column-major values.
        cols: Vec<f64>,
    },
    /// Compressed sparse columns.
    Sparse(CscMatrix),
}

impl Design {
    /// A column-major copy of a dense matrix.
    pub(crate) fn dense(x: ArrayView2<'_, f64>) -> Self {
        let (n, p) = x.dim();
        let mut cols = Vec::with_capacity(n * p);
        for col in x.columns() {
            cols.extend(col.iter().copied());
        }
        Design::Dense { n, p, cols }
    }

    /// Rows.
    pub(crate) fn n(&self) -> usize {
        match self {
            Design::Dense { n, .. } => *n,
            Design::Sparse(m) => m.nrows(),
        }
    }

    /// Columns.
    pub(crate) fn p(&self) -> usize {
        match self {
            Design::Dense { p, .. } => *p,
            Design::Sparse(m) => m.ncols(),
        }
    }

    /// Stored entries (`n p` for a dense design).
    pub(crate) fn nnz(&self) -> usize {
        match self {
            Design::Dense { cols, .. } => cols.len(),
            Design::Sparse(m) => m.nnz(),
        }
    }

    /// The sparse matrix, if the design is sparse.
    pub(crate) fn as_sparse(&self) -> Option<&CscMatrix> {
        match self {
            Design::Dense { .. } => None,
            Design::Sparse(m) => Some(m),
        }
    }

    /// Column `j`.
    #[inline]
    pub(crate) fn col(&self, j: usize) -> Column<'_> {
        match self {
            Design::Dense { n, cols, .. } => Column::Dense(&cols[j * n..(j + 1) * n]),
            Design::Sparse(m) => {
                let (rows, values) = m.column(j);
                Column::Sparse { rows, values }
            }
        }
    }

    /// `X beta` for a `beta` of length `p`.
    pub(crate) fn predict(&self, beta: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; self.n()];
        for (j, &b) in beta.iter().enumerate() {
            if b != 0.0 {
                self.col(j).axpy(b, &mut out);
            }
        }
        out
    }

    /// `w X^T v`, in parallel over columns when the design holds a million entries or more.
    pub(crate) fn correlations(&self, w: f64, v: &[f64]) -> Array1<f64> {
        const CHUNK: usize = 256;
        let p = self.p();
        let mut out = vec![0.0; p];
        if self.nnz() >= 1 << 20 {
            out.par_chunks_mut(CHUNK).enumerate().for_each(|(k, chunk)| {
                for (m, o) in chunk.iter_mut().enumerate() {
                    *o = w * self.col(k * CHUNK + m).dot(v);
                }
            });
        } else {
            for (j, o) in out.iter_mut().enumerate() {
                *o = w * self.col(j).dot(v);
            }
        }
        Array1::from(out)
    }

    /// The dense `n x p` matrix.
    pub(crate) fn to_dense(&self) -> Array2<f64> {
        match self {
            Design::Dense { n, p, cols } => Array2::from_shape_fn((*n, *p), |(i, j)| cols[j * n + i]),
            Design::Sparse(m) => m.to_dense(),
        }
    }

    /// The columns `idx` as a dense `n x idx.len()` matrix.
    pub(crate) fn columns_dense(&self, idx: &[usize]) -> Array2<f64> {
        let mut out = Array2::zeros((self.n(), idx.len()));
        for (a, &j) in idx.iter().enumerate() {
            match self.col(j) {
                Column::Dense(x) => out.column_mut(a).iter_mut().zip(x).for_each(|(o, v)| *o = *v),
                Column::Sparse { rows, values } => {
                    for (&i, &v) in rows.iter().zip(values) {
                        out[[i, a]] = v;
                    }
                }
            }
        }
        out
    }
}

/// `sum a_i b_i` with eight accumulators (vectorises; the rounding differs from a serial
/// sum only in the last bits).
#[inline]
pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y += a x`.
#[inline]
pub(crate) fn axpy(a: f64, x: &[f64], y: &mut [f64]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}
