//! The sparse factorisations of a sparse cone program.
//!
//! - [`KktFactor`]: the ADMM linear system as the quasi-definite KKT matrix
//!   `K = [[P + sigma I, A^T], [A, -R^{-1}]]`, factored `L D L^T` by faer's sparse Cholesky
//!   module with an approximate-minimum-degree ordering. Eliminating the second block gives
//!   back the dense solver's reduced system `(P + sigma I + A^T R A) x~ = ...`, so both
//!   storages run the same iteration. The reduced matrix is not formed: `A^T R A` has
//!   `sum_i nnz(row i)^2` entries and, for a random sparse `A`, a Cholesky factor close to
//!   dense, where `K` keeps `A`'s non-zeros and fills far less. A quasi-definite matrix has
//!   an `L D L^T` factorisation for every symmetric permutation, with `n` positive and `m`
//!   negative pivots; those signs are handed to the factorisation, which corrects a pivot of
//!   the wrong sign or below `1e-14` of the scale (counted, never expected). The symbolic
//!   factorisation is computed once; a new `rho` refactors the values only.
//! - [`JacobianLu`]: the residual-map Jacobian `M = [[P, A^T J], [-A, I - J]]` (not
//!   symmetric) as a sparse matrix, factored by faer's sparse LU (column approximate minimum
//!   degree ordering, partial pivoting), for the Newton refinement and the derivative.

use clarke_core::{Error, Result};
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::ldlt::factor::LdltRegularization;
use faer::linalg::solvers::Solve;
use faer::sparse::linalg::LuError;
use faer::sparse::linalg::cholesky::{
    CholeskySymbolicParams, LdltRef, SymbolicCholesky, SymmetricOrdering, factorize_symbolic_cholesky,
};
use faer::sparse::{SparseColMat, SymbolicSparseColMat};
use faer::{Conj, Mat, Par, Side};
use ndarray::{Array1, ArrayView1};

use super::cones::{JacobianBlock, ProjectionJacobian};
use crate::design::CscMatrix;

/// The lower triangle of `P + delta I` (every diagonal entry stored) as compressed columns,
/// for an `n x n` symmetric `P` (or none).
pub(crate) fn lower_shifted(p: Option<&CscMatrix>, n: usize, delta: f64) -> (Vec<usize>, Vec<usize>, Vec<f64>) {
    let mut col_ptr = Vec::with_capacity(n + 1);
    col_ptr.push(0);
    let (mut rows, mut vals) = (Vec::new(), Vec::new());
    for j in 0..n {
        let (pr, pv) = p.map_or((&[][..], &[][..]), |p| p.column(j));
        let start = pr.partition_point(|&i| i < j);
        let diag = pr.get(start).filter(|&&i| i == j).map(|_| pv[start]).unwrap_or(0.0);
        rows.push(j);
        vals.push(diag + delta);
        let from = if pr.get(start) == Some(&j) { start + 1 } else { start };
        rows.extend_from_slice(&pr[from..]);
        vals.extend_from_slice(&pv[from..]);
        col_ptr.push(rows.len());
    }
    (col_ptr, rows, vals)
}

/// Whether a sparse Cholesky factorisation of the lower triangle of `P + delta I` succeeds.
pub(crate) fn cholesky_succeeds(p: &CscMatrix, delta: f64) -> bool {
    let n = p.ncols();
    let (col_ptr, rows, vals) = lower_shifted(Some(p), n, delta);
    let symbolic = SymbolicSparseColMat::new_checked(n, n, col_ptr, None, rows);
    let mat = SparseColMat::new(symbolic, vals);
    mat.as_ref().sp_cholesky(Side::Lower).is_ok()
}

/// The `L D L^T` factorisation of the ADMM system `[[P + sigma I, A^T], [A, -R^{-1}]]`
/// (see the module docs).
pub(crate) struct KktFactor {
    n: usize,
    /// The lower triangle of `K`.
    mat: SparseColMat<usize, f64>,
    /// Where the `m` entries `-1 / r_i` sit in `mat`'s values.
    diag_pos: Vec<usize>,
    symbolic: SymbolicCholesky<usize>,
    l_values: Vec<f64>,
    signs: Vec<i8>,
    scale: f64,
    factor_scratch: MemBuffer,
    solve_scratch: MemBuffer,
    rhs: Mat<f64>,
}

impl KktFactor {
    /// The symbolic and numeric factorisations for penalties `r` and proximal term `sigma`.
    pub(crate) fn new(a: &CscMatrix, p: Option<&CscMatrix>, r: &Array1<f64>, sigma: f64) -> Result<Self> {
        let (m, n) = (a.nrows(), a.ncols());
        let (pc, pr, pv) = lower_shifted(p, n, sigma);
        let dim = n + m;
        let mut col_ptr = Vec::with_capacity(dim + 1);
        col_ptr.push(0);
        let mut rows = Vec::with_capacity(pr.len() + a.nnz() + m);
        let mut vals = Vec::with_capacity(rows.capacity());
        for j in 0..n {
            rows.extend_from_slice(&pr[pc[j]..pc[j + 1]]);
            vals.extend_from_slice(&pv[pc[j]..pc[j + 1]]);
            let (ar, av) = a.column(j);
            rows.extend(ar.iter().map(|&i| n + i));
            vals.extend_from_slice(av);
            col_ptr.push(rows.len());
        }
        let mut diag_pos = Vec::with_capacity(m);
        for i in 0..m {
            diag_pos.push(rows.len());
            rows.push(n + i);
            vals.push(-1.0 / r[i]);
            col_ptr.push(rows.len());
        }
        let scale = vals.iter().fold(1.0f64, |s, v| s.max(v.abs()));
        let symbolic_mat = SymbolicSparseColMat::new_checked(dim, dim, col_ptr, None, rows);
        let mat = SparseColMat::new(symbolic_mat, vals);
        let symbolic = factorize_symbolic_cholesky(
            mat.symbolic(),
            Side::Lower,
            SymmetricOrdering::Amd,
            CholeskySymbolicParams::default(),
        )
        .map_err(|e| {
            Error::invalid(
                "cone::solve",
                format!("symbolic factorisation of the KKT matrix failed: {e:?}"),
            )
        })?;
        let par = faer::get_global_parallelism();
        let factor_scratch = MemBuffer::new(symbolic.factorize_numeric_ldlt_scratch::<f64>(par, Default::default()));
        let solve_scratch = MemBuffer::new(symbolic.solve_in_place_scratch::<f64>(1, Par::Seq));
        let mut signs = vec![1i8; n];
        signs.extend(std::iter::repeat_n(-1i8, m));
        let mut factor = KktFactor {
            n,
            l_values: vec![0.0; symbolic.len_val()],
            mat,
            diag_pos,
            symbolic,
            signs,
            scale,
            factor_scratch,
            solve_scratch,
            rhs: Mat::zeros(dim, 1),
        };
        factor.numeric()?;
        Ok(factor)
    }

    fn numeric(&mut self) -> Result<()> {
        let par = faer::get_global_parallelism();
        let regularization = LdltRegularization {
            dynamic_regularization_signs: Some(&self.signs),
            dynamic_regularization_delta: 1e-10 * self.scale,
            dynamic_regularization_epsilon: 1e-14 * self.scale,
        };
        let info = self.symbolic.factorize_numeric_ldlt(
            &mut self.l_values,
            self.mat.as_ref(),
            Side::Lower,
            regularization,
            par,
            MemStack::new(&mut self.factor_scratch),
            Default::default(),
        );
        match info {
            Ok(_) => Ok(()),
            Err(e) => Err(Error::invalid(
                "cone::solve",
                format!("the LDL^T factorisation of the KKT matrix failed ({e:?}); is P positive semidefinite?"),
            )),
        }
    }

    /// Refactors the values for new penalties (the pattern, and so the symbolic
    /// factorisation, stays).
    pub(crate) fn refactor(&mut self, r: &Array1<f64>) -> Result<()> {
        let vals = self.mat.val_mut();
        for (&pos, &ri) in self.diag_pos.iter().zip(r.iter()) {
            vals[pos] = -1.0 / ri;
        }
        self.scale = vals.iter().fold(1.0f64, |s, v| s.max(v.abs()));
        self.numeric()
    }

    /// `x~` from `[[P + sigma I, A^T], [A, -R^{-1}]] (x~, nu) = (top, bottom)`.
    pub(crate) fn solve(&mut self, top: &Array1<f64>, bottom: &Array1<f64>, out: &mut Array1<f64>) {
        let n = self.n;
        {
            let mut col = self.rhs.col_mut(0);
            for (i, &v) in top.iter().enumerate() {
                col[i] = v;
            }
            for (i, &v) in bottom.iter().enumerate() {
                col[n + i] = v;
            }
        }
        LdltRef::new(&self.symbolic, &self.l_values).solve_in_place_with_conj(
            Conj::No,
            self.rhs.as_mut(),
            Par::Seq,
            MemStack::new(&mut self.solve_scratch),
        );
        let col = self.rhs.col(0);
        for (i, o) in out.iter_mut().enumerate() {
            *o = col[i];
        }
    }
}

/// `A^T` in compressed columns (the rows of `A`): column pointers, row indices, values.
fn transpose(a: &CscMatrix) -> (Vec<usize>, Vec<usize>, Vec<f64>) {
    let (m, n) = (a.nrows(), a.ncols());
    let mut ptr = vec![0usize; m + 1];
    let f = a.as_faer();
    for &i in f.row_idx() {
        ptr[i + 1] += 1;
    }
    for i in 0..m {
        ptr[i + 1] += ptr[i];
    }
    let mut next = ptr.clone();
    let mut rows = vec![0usize; a.nnz()];
    let mut vals = vec![0.0; a.nnz()];
    for j in 0..n {
        let (ar, av) = a.column(j);
        for (&i, &v) in ar.iter().zip(av) {
            rows[next[i]] = j;
            vals[next[i]] = v;
            next[i] += 1;
        }
    }
    (ptr, rows, vals)
}

/// `M = [[P, A^T J], [-A, I - J]]` as a sparse matrix (exact zeros of `J` not stored).
pub(crate) fn jacobian_sparse(
    a: &CscMatrix,
    p: Option<&CscMatrix>,
    j: &ProjectionJacobian,
) -> SparseColMat<usize, f64> {
    let (m, n) = (a.nrows(), a.ncols());
    let dim = n + m;
    let (tp, tr, tv) = transpose(a);
    let mut col_ptr = Vec::with_capacity(dim + 1);
    col_ptr.push(0);
    let mut rows: Vec<usize> = Vec::with_capacity(2 * a.nnz() + p.map_or(0, |p| p.nnz()) + m);
    let mut vals: Vec<f64> = Vec::with_capacity(rows.capacity());
    for col in 0..n {
        if let Some(p) = p {
            let (pr, pv) = p.column(col);
            rows.extend_from_slice(pr);
            vals.extend_from_slice(pv);
        }
        let (ar, av) = a.column(col);
        rows.extend(ar.iter().map(|&i| n + i));
        vals.extend(av.iter().map(|v| -v));
        col_ptr.push(rows.len());
    }
    // Dense accumulator for the columns of A^T J inside a dense block.
    let mut acc = vec![0.0; n];
    let mut touched: Vec<usize> = Vec::new();
    let mut mark = vec![false; n];
    for (range, block) in j.blocks() {
        match block {
            JacobianBlock::Identity | JacobianBlock::Diagonal(_) => {
                for i in range.clone() {
                    let d = match block {
                        JacobianBlock::Diagonal(d) => d[i - range.start],
                        _ => 1.0,
                    };
                    if d != 0.0 {
                        rows.extend_from_slice(&tr[tp[i]..tp[i + 1]]);
                        vals.extend(tv[tp[i]..tp[i + 1]].iter().map(|v| d * v));
                    }
                    if d != 1.0 {
                        rows.push(n + i);
                        vals.push(1.0 - d);
                    }
                    col_ptr.push(rows.len());
                }
            }
            JacobianBlock::Dense(jb) => {
                for (c, i) in range.clone().enumerate() {
                    for (k_local, k) in range.clone().enumerate() {
                        let w = jb[[k_local, c]];
                        if w == 0.0 {
                            continue;
                        }
                        for t in tp[k]..tp[k + 1] {
                            let row = tr[t];
                            if !mark[row] {
                                mark[row] = true;
                                touched.push(row);
                            }
                            acc[row] += w * tv[t];
                        }
                    }
                    touched.sort_unstable();
                    for &row in &touched {
                        rows.push(row);
                        vals.push(acc[row]);
                        acc[row] = 0.0;
                        mark[row] = false;
                    }
                    touched.clear();
                    for (k_local, k) in range.clone().enumerate() {
                        let v = if k == i { 1.0 } else { 0.0 } - jb[[k_local, c]];
                        if v != 0.0 {
                            rows.push(n + k);
                            vals.push(v);
                        }
                    }
                    col_ptr.push(rows.len());
                }
            }
        }
    }
    let symbolic = SymbolicSparseColMat::new_checked(dim, dim, col_ptr, None, rows);
    SparseColMat::new(symbolic, vals)
}

/// A sparse LU factorisation of `M` (see the module docs) with its solves.
pub(crate) struct JacobianLu {
    mat: SparseColMat<usize, f64>,
    lu: faer::sparse::linalg::solvers::Lu<usize, f64>,
}

impl JacobianLu {
    /// Factors `M` for the element `j`. `Err(Error::Singular)` when the factorisation meets a
    /// structurally singular matrix.
    pub(crate) fn new(a: &CscMatrix, p: Option<&CscMatrix>, j: &ProjectionJacobian) -> Result<Self> {
        let mat = jacobian_sparse(a, p, j);
        let lu = mat.as_ref().sp_lu().map_err(|e| match e {
            LuError::SymbolicSingular { index } => Error::Singular {
                op: "cone_program sparse LU",
                detail: format!("M is structurally singular (column {index})"),
            },
            LuError::Generic(e) => Error::invalid("cone_program sparse LU", format!("{e:?}")),
        })?;
        Ok(JacobianLu { mat, lu })
    }

    /// `M^{-1} rhs` (`M^{-T} rhs` when `transpose`). `Err(Error::Singular)` when the answer is
    /// not finite or its residual is above `1e-6` of the right-hand side's scale: the LU met a
    /// numerically singular `M`.
    pub(crate) fn solve(&self, rhs: ArrayView1<'_, f64>, transpose: bool) -> Result<Array1<f64>> {
        let dim = rhs.len();
        let mut x = Mat::<f64>::from_fn(dim, 1, |i, _| rhs[i]);
        if transpose {
            self.lu.solve_transpose_in_place(x.as_mut());
        } else {
            self.lu.solve_in_place(x.as_mut());
        }
        let out = Array1::from_shape_fn(dim, |i| x[(i, 0)]);
        // The residual of the answer: a singular M gives a huge or non-finite one.
        let mut r = rhs.to_owned();
        let f = self.mat.as_ref();
        let (cp, ri, vals) = (f.col_ptr(), f.row_idx(), f.val());
        for col in 0..dim {
            for k in cp[col]..cp[col + 1] {
                if transpose {
                    r[col] -= vals[k] * out[ri[k]];
                } else {
                    r[ri[k]] -= vals[k] * out[col];
                }
            }
        }
        let scale = rhs.iter().fold(0.0f64, |s, v| s.max(v.abs())).max(f64::MIN_POSITIVE);
        let res = r.iter().fold(0.0f64, |s, v| s.max(v.abs()));
        if !(out.iter().all(|v| v.is_finite()) && res <= 1e-6 * scale) {
            return Err(Error::Singular {
                op: "cone_program sparse LU",
                detail: format!(
                    "M is numerically singular: the solve's relative residual is {:e}",
                    res / scale
                ),
            });
        }
        Ok(out)
    }
}
