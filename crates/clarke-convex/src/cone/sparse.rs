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
//! - [`JacobianFactor`]: the residual-map Jacobian `M = [[P, A^T J], [-A, I - J]]` (not
//!   symmetric), for the Newton refinement and the derivative. When `J` is diagonal (the
//!   orthant and the free cone: every LP and QP) `M` reduces to a symmetric quasi-definite
//!   system `[[P, A_S^T], [A_S, -D]]` over the rows with `j_i > 0`, factored `L D L^T` like the
//!   KKT matrix (with a `1e-10` regularisation, the solves refined against `M` itself); with
//!   second-order or PSD blocks `M` is factored by faer's sparse LU (column approximate
//!   minimum degree ordering, partial pivoting), which fills more.

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
use super::problem::{csc_gemv, csc_gemv_t};
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

/// The lower triangle of the quasi-definite matrix `[[P + delta I, A_S^T], [A_S, diag(bottom)]]`
/// as compressed columns, `A_S` the rows `i` of `A` with `pos[i] = Some(k)` (placed at row
/// `n + k`, in increasing `k`), and where each entry of the bottom diagonal sits in the
/// value array (for a refactorisation with new values).
fn quasi_definite_lower(
    a: &CscMatrix,
    p: Option<&CscMatrix>,
    delta: f64,
    pos: &[Option<usize>],
    bottom: &[f64],
) -> (SparseColMat<usize, f64>, Vec<usize>) {
    let n = a.ncols();
    let (pc, pr, pv) = lower_shifted(p, n, delta);
    let dim = n + bottom.len();
    let mut col_ptr = Vec::with_capacity(dim + 1);
    col_ptr.push(0);
    let mut rows = Vec::with_capacity(pr.len() + a.nnz() + bottom.len());
    let mut vals = Vec::with_capacity(rows.capacity());
    for col in 0..n {
        rows.extend_from_slice(&pr[pc[col]..pc[col + 1]]);
        vals.extend_from_slice(&pv[pc[col]..pc[col + 1]]);
        let (ar, av) = a.column(col);
        for (&i, &v) in ar.iter().zip(av) {
            if let Some(k) = pos[i] {
                rows.push(n + k);
                vals.push(v);
            }
        }
        col_ptr.push(rows.len());
    }
    let mut diag_pos = Vec::with_capacity(bottom.len());
    for (k, &d) in bottom.iter().enumerate() {
        diag_pos.push(rows.len());
        rows.push(n + k);
        vals.push(d);
        col_ptr.push(rows.len());
    }
    let symbolic = SymbolicSparseColMat::new_checked(dim, dim, col_ptr, None, rows);
    (SparseColMat::new(symbolic, vals), diag_pos)
}

/// The symbolic Cholesky (`L D L^T`) factorisation of a lower triangle with an
/// approximate-minimum-degree ordering; the error names the operation and the matrix.
fn symbolic_ldlt(mat: &SparseColMat<usize, f64>, op: &'static str, what: &str) -> Result<SymbolicCholesky<usize>> {
    factorize_symbolic_cholesky(
        mat.symbolic(),
        Side::Lower,
        SymmetricOrdering::Amd,
        CholeskySymbolicParams::default(),
    )
    .map_err(|e| Error::invalid(op, format!("symbolic factorisation of {what} failed: {e:?}")))
}

/// Whether a sparse Cholesky factorisation of the lower triangle of `P + delta I` succeeds.
pub(crate) fn cholesky_succeeds(p: &CscMatrix, delta: f64) -> bool {
    let _avx = clarke_core::avx::UpperStateGuard;
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
        let every_row: Vec<Option<usize>> = (0..m).map(Some).collect();
        let bottom: Vec<f64> = r.iter().map(|ri| -1.0 / ri).collect();
        let (mat, diag_pos) = quasi_definite_lower(a, p, sigma, &every_row, &bottom);
        let dim = n + m;
        let scale = mat.val().iter().fold(1.0f64, |s, v| s.max(v.abs()));
        let symbolic = symbolic_ldlt(&mat, "cone::solve", "the KKT matrix")?;
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
        let _avx = clarke_core::avx::UpperStateGuard;
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
        let _avx = clarke_core::avx::UpperStateGuard;
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

/// `M = [[P, A^T J], [-A, I - J]]` as a sparse matrix (exact zeros of `J` not stored).
pub(crate) fn jacobian_sparse(
    a: &CscMatrix,
    p: Option<&CscMatrix>,
    j: &ProjectionJacobian,
) -> SparseColMat<usize, f64> {
    let (m, n) = (a.nrows(), a.ncols());
    let dim = n + m;
    let at = a.transpose();
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
                        let (tr, tv) = at.column(i);
                        rows.extend_from_slice(tr);
                        vals.extend(tv.iter().map(|v| d * v));
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
                        let (tr, tv) = at.column(k);
                        for (&row, &v) in tr.iter().zip(tv) {
                            if !mark[row] {
                                mark[row] = true;
                                touched.push(row);
                            }
                            acc[row] += w * v;
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

/// A factorisation of `M` (see the module docs) with its solves: the reduced quasi-definite
/// system when `J` is diagonal, a sparse LU otherwise.
pub(crate) struct JacobianFactor {
    kind: FactorKind,
    /// `M` itself, for the residuals of the solves.
    mat: SparseColMat<usize, f64>,
}

enum FactorKind {
    Lu(Box<faer::sparse::linalg::solvers::Lu<usize, f64>>),
    Reduced(Box<ReducedKkt>),
}

impl JacobianFactor {
    /// Factors `M` for the element `j`. `Err(Error::Singular)` when the factorisation meets a
    /// structurally singular matrix.
    pub(crate) fn new(a: &CscMatrix, p: Option<&CscMatrix>, j: &ProjectionJacobian) -> Result<Self> {
        let _avx = clarke_core::avx::UpperStateGuard;
        let mat = jacobian_sparse(a, p, j);
        let kind = match ReducedKkt::new(a, p, j)? {
            Some(reduced) => FactorKind::Reduced(Box::new(reduced)),
            None => FactorKind::Lu(Box::new(mat.as_ref().sp_lu().map_err(|e| match e {
                LuError::SymbolicSingular { index } => Error::Singular {
                    op: "cone_program sparse LU",
                    detail: format!("M is structurally singular (column {index})"),
                },
                LuError::Generic(e) => Error::invalid("cone_program sparse LU", format!("{e:?}")),
            })?)),
        };
        Ok(JacobianFactor { kind, mat })
    }

    /// `r = rhs - M x` (or `rhs - M^T x`).
    fn residual(&self, rhs: ArrayView1<'_, f64>, x: &Array1<f64>, transpose: bool) -> Array1<f64> {
        let mut r = rhs.to_owned();
        let f = self.mat.as_ref();
        let (cp, ri, vals) = (f.col_ptr(), f.row_idx(), f.val());
        for col in 0..rhs.len() {
            for k in cp[col]..cp[col + 1] {
                if transpose {
                    r[col] -= vals[k] * x[ri[k]];
                } else {
                    r[ri[k]] -= vals[k] * x[col];
                }
            }
        }
        r
    }

    /// One solve with the factorisation (regularised for the reduced system).
    fn raw_solve(&self, rhs: ArrayView1<'_, f64>, transpose: bool) -> Array1<f64> {
        let _avx = clarke_core::avx::UpperStateGuard;
        match &self.kind {
            FactorKind::Lu(lu) => {
                let dim = rhs.len();
                let mut x = Mat::<f64>::from_fn(dim, 1, |i, _| rhs[i]);
                if transpose {
                    lu.solve_transpose_in_place(x.as_mut());
                } else {
                    lu.solve_in_place(x.as_mut());
                }
                Array1::from_shape_fn(dim, |i| x[(i, 0)])
            }
            FactorKind::Reduced(k) => k.solve(rhs, transpose),
        }
    }

    /// `M^{-1} rhs` (`M^{-T} rhs` when `transpose`), with iterative refinement on the residual
    /// of `M` (the reduced system is factored with a small regularisation).
    /// `Err(Error::Singular)` when the answer is not finite or its residual stays above
    /// `1e-6` of the right-hand side's scale: the factorisation met a numerically singular `M`.
    pub(crate) fn solve(&self, rhs: ArrayView1<'_, f64>, transpose: bool) -> Result<Array1<f64>> {
        let scale = rhs.iter().fold(0.0f64, |s, v| s.max(v.abs())).max(f64::MIN_POSITIVE);
        let mut x = self.raw_solve(rhs, transpose);
        let mut r = self.residual(rhs, &x, transpose);
        let mut res = r.iter().fold(0.0f64, |s, v| s.max(v.abs()));
        for _ in 0..10 {
            if res.is_nan() || res <= 1e-15 * scale {
                break;
            }
            let cand = &x + &self.raw_solve(r.view(), transpose);
            let rc = self.residual(rhs, &cand, transpose);
            let rn = rc.iter().fold(0.0f64, |s, v| s.max(v.abs()));
            if rn.is_nan() || rn > res {
                break;
            }
            let settled = rn >= 0.5 * res;
            (x, res) = (cand, rn);
            if settled {
                break;
            }
            r = rc;
        }
        if !(x.iter().all(|v| v.is_finite()) && res <= 1e-6 * scale) {
            return Err(Error::Singular {
                op: "cone_program sparse factorisation",
                detail: format!(
                    "M is numerically singular: the solve's relative residual is {:e}",
                    res / scale
                ),
            });
        }
        Ok(x)
    }
}

/// `M` reduced to a symmetric quasi-definite system when `J` is diagonal (the orthant and
/// the free cone: every LP and QP). With `S` the rows where `j_i > 0` and `mu_i = j_i dv_i`,
/// `M (du, dv) = (r_u, r_v)` is
///
/// ```text
/// [[P, A_S^T], [A_S, -D]] (du, mu) = (r_u, -r_v[S]),   D = diag((1 - j_i) / j_i),
/// dv_i = mu_i / j_i on S,   dv_i = r_v[i] + A_i du off S,
/// ```
///
/// and `M^T (a, b) = (g_u, g_v)` is the same matrix with `(a, beta)`, `b = -beta` on `S`,
/// `b = g_v` off `S`, right-hand side `(g_u + A_Z^T g_v[Z], g_v[S] / j_S)` (`Z` the rows off
/// `S`). The matrix is factored `L D L^T` with `+delta` on the first block and `-delta` on the
/// second (so it is quasi-definite even with `P` singular or `j_i = 1`), and the solves are
/// refined against `M` itself.
struct ReducedKkt {
    a: CscMatrix,
    n: usize,
    /// `j_i` per row.
    jd: Vec<f64>,
    /// Position of row `i` in `S`, if it is there.
    pos: Vec<Option<usize>>,
    symbolic: SymbolicCholesky<usize>,
    l_values: Vec<f64>,
}

impl ReducedKkt {
    /// `None` when `J` has a dense block (second-order or PSD cones).
    fn new(a: &CscMatrix, p: Option<&CscMatrix>, j: &ProjectionJacobian) -> Result<Option<Self>> {
        let _avx = clarke_core::avx::UpperStateGuard;
        let (m, n) = (a.nrows(), a.ncols());
        let mut jd = vec![0.0; m];
        for (range, block) in j.blocks() {
            match block {
                JacobianBlock::Identity => jd[range.clone()].fill(1.0),
                JacobianBlock::Diagonal(d) => jd[range.clone()].copy_from_slice(d),
                JacobianBlock::Dense(_) => return Ok(None),
            }
        }
        let mut pos = vec![None; m];
        let mut count = 0;
        for (i, &ji) in jd.iter().enumerate() {
            if ji != 0.0 {
                pos[i] = Some(count);
                count += 1;
            }
        }
        let p_scale = p.map_or(0.0, |p| p.as_faer().val().iter().fold(0.0f64, |s, v| s.max(v.abs())));
        let a_scale = a.as_faer().val().iter().fold(0.0f64, |s, v| s.max(v.abs()));
        let delta = 1e-10 * p_scale.max(a_scale).max(1.0);
        let bottom: Vec<f64> = jd
            .iter()
            .filter(|&&ji| ji != 0.0)
            .map(|&ji| -((1.0 - ji) / ji) - delta)
            .collect();
        let (mat, _) = quasi_definite_lower(a, p, delta, &pos, &bottom);
        let symbolic = symbolic_ldlt(&mat, "cone_program derivative", "the reduced system")?;
        let par = faer::get_global_parallelism();
        let mut scratch = MemBuffer::new(symbolic.factorize_numeric_ldlt_scratch::<f64>(par, Default::default()));
        let mut signs = vec![1i8; n];
        signs.extend(std::iter::repeat_n(-1i8, count));
        let mut l_values = vec![0.0; symbolic.len_val()];
        symbolic
            .factorize_numeric_ldlt(
                &mut l_values,
                mat.as_ref(),
                Side::Lower,
                LdltRegularization {
                    dynamic_regularization_signs: Some(&signs),
                    dynamic_regularization_delta: delta,
                    dynamic_regularization_epsilon: 1e-4 * delta,
                },
                par,
                MemStack::new(&mut scratch),
                Default::default(),
            )
            .map_err(|e| Error::Singular {
                op: "cone_program derivative",
                detail: format!("the LDL^T factorisation of the reduced system failed: {e:?}"),
            })?;
        Ok(Some(ReducedKkt {
            a: a.clone(),
            n,
            jd,
            pos,
            symbolic,
            l_values,
        }))
    }

    /// The regularised solve of `M d = rhs` or `M^T d = rhs` through the reduced system.
    fn solve(&self, rhs: ArrayView1<'_, f64>, transpose: bool) -> Array1<f64> {
        let _avx = clarke_core::avx::UpperStateGuard;
        let n = self.n;
        let m = self.jd.len();
        let count = self.pos.iter().filter(|p| p.is_some()).count();
        let (ru, rv) = (rhs.slice(ndarray::s![..n]), rhs.slice(ndarray::s![n..]));
        let mut k = Mat::<f64>::zeros(n + count, 1);
        let mut top = ru.to_owned();
        if transpose {
            // top = g_u + A_Z^T g_v[Z]
            let gz = Array1::from_shape_fn(m, |i| if self.pos[i].is_none() { rv[i] } else { 0.0 });
            csc_gemv_t(&self.a, 1.0, gz.view(), 1.0, &mut top);
        }
        for (i, &v) in top.iter().enumerate() {
            k[(i, 0)] = v;
        }
        for i in 0..m {
            if let Some(p) = self.pos[i] {
                k[(n + p, 0)] = if transpose { rv[i] / self.jd[i] } else { -rv[i] };
            }
        }
        let mut scratch = MemBuffer::new(self.symbolic.solve_in_place_scratch::<f64>(1, Par::Seq));
        LdltRef::new(&self.symbolic, &self.l_values).solve_in_place_with_conj(
            Conj::No,
            k.as_mut(),
            Par::Seq,
            MemStack::new(&mut scratch),
        );
        let mut out = Array1::zeros(n + m);
        for i in 0..n {
            out[i] = k[(i, 0)];
        }
        let du = out.slice(ndarray::s![..n]).to_owned();
        let mut adu = Array1::zeros(m);
        if !transpose {
            csc_gemv(&self.a, 1.0, du.view(), 0.0, &mut adu);
        }
        for i in 0..m {
            out[n + i] = match (self.pos[i], transpose) {
                (Some(p), false) => k[(n + p, 0)] / self.jd[i],
                (Some(p), true) => -k[(n + p, 0)],
                (None, false) => rv[i] + adu[i],
                (None, true) => rv[i],
            };
        }
        out
    }
}
