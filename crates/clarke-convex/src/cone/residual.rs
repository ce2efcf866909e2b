//! The residual map of the embedding at `w = 1`, and its Jacobian `(Q - I) J + I`.
//!
//! With `z = (u, v)` in `R^{n+m}`, `Pi(z) = (u, Pi_{K*}(v))` and
//! `Q = [[P, A^T], [-A, 0]]` (skew-symmetric when `P = 0`), the map
//!
//! ```text
//! N(z) = (Q - I) Pi(z) + z + (c, b) = (P x + A^T y + c,  b - A x - s)
//! ```
//!
//! with `x = u`, `y = Pi_{K*}(v)`, `s = y - v = Pi_K(-v)` (Moreau) vanishes exactly at the
//! primal-dual solutions: the first block is dual feasibility, the second primal
//! feasibility, and complementarity `s perp y`, `s in K`, `y in K*` holds by construction.
//! This is the homogeneous self-dual embedding's residual map normalised to `w = 1`, the
//! form that is differentiated; its Jacobian in `z` for a selected element `J` of the
//! conservative Jacobian of `Pi` is
//!
//! ```text
//! M = (Q - I) J + I = [[P, A^T J_y], [-A, I - J_y]].
//! ```

use clarke_core::Result;
use clarke_solve::DenseLu;
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut1, Axis, s};

use super::cones::ProjectionJacobian;
use super::problem::ConeProgram;

/// A point `z = (x, v)` with the primal-dual triple it encodes and its residual.
#[derive(Debug, Clone)]
pub(crate) struct KktPoint {
    pub x: Array1<f64>,
    pub v: Array1<f64>,
    pub y: Array1<f64>,
    pub s: Array1<f64>,
    /// `N(z)`.
    pub residual: Array1<f64>,
}

impl KktPoint {
    /// Evaluates `N` at `z = (x, v)`.
    pub fn at(prog: &ConeProgram, x: Array1<f64>, v: Array1<f64>) -> Self {
        let mut y = Array1::zeros(v.len());
        prog.cones.project_dual(v.view(), y.view_mut());
        let s = &y - &v;
        let dual = prog.p_dot(x.view()) + prog.at_dot(y.view()) + &prog.c;
        let primal = &prog.b - &prog.a_dot(x.view()) - &s;
        let mut residual = Array1::zeros(x.len() + v.len());
        residual.slice_mut(s![..x.len()]).assign(&dual);
        residual.slice_mut(s![x.len()..]).assign(&primal);
        KktPoint { x, v, y, s, residual }
    }

    /// `||N(z)||_inf`.
    pub fn norm(&self) -> f64 {
        inf_norm(self.residual.view())
    }

    /// `z = (x, v)` as one vector.
    pub fn z(&self) -> Array1<f64> {
        let n = self.x.len();
        let mut z = Array1::zeros(n + self.v.len());
        z.slice_mut(s![..n]).assign(&self.x);
        z.slice_mut(s![n..]).assign(&self.v);
        z
    }
}

/// `max |v_i|` (0 for an empty vector).
pub(crate) fn inf_norm(v: ArrayView1<'_, f64>) -> f64 {
    v.iter().fold(0.0f64, |a, x| a.max(x.abs()))
}

/// `M = [[P, A^T J], [-A, I - J]]` as a dense matrix (for a sparse program: only for a
/// small one, the dense check below its dense limit).
pub(crate) fn jacobian_matrix(prog: &ConeProgram, j: &ProjectionJacobian) -> Array2<f64> {
    let (m, n) = (prog.m(), prog.n());
    let mut out = Array2::zeros((n + m, n + m));
    if let Some(p) = prog.p_dense() {
        out.slice_mut(s![..n, ..n]).assign(&*p);
    }
    let a = prog.a_dense();
    j.right_multiply(a.t(), out.slice_mut(s![..n, n..]));
    out.slice_mut(s![n.., ..n]).assign(&(-&*a));
    let mut lower = out.slice_mut(s![n.., n..]);
    j.write_negated(lower.view_mut());
    lower.diag_mut().iter_mut().for_each(|d| *d += 1.0);
    out
}

/// The dense LU of `M`, with the unit columns eliminated first.
///
/// Where `J` has a zero column `i` (an inactive inequality, or a kink selected at 0), column
/// `n + i` of `M` is the unit vector `e_{n+i}`. With `K` the other indices, `M` is, up to a
/// symmetric permutation, `[[M_KK, 0], [C, I]]`, so `det M = det M_KK` and
///
/// ```text
/// M z = r:    M_KK z_K = r_K,             z_Z = r_Z - C z_K,
/// M^T w = r:  w_Z = r_Z,                  M_KK^T w_K = r_K - C^T r_Z.
/// ```
///
/// A QP whose inequalities are mostly inactive factors a matrix of size `n + |active|`
/// instead of `n + m`: for 100 variables, 50 equalities and 200 one-sided rows of which 30
/// are active, 180 instead of 350 (a seventh of the work).
pub(crate) struct ResidualLu {
    lu: DenseLu<f64>,
    kept: Vec<usize>,
    eliminated: Vec<usize>,
    /// `C`: the eliminated rows of `M` in the kept columns.
    coupling: Array2<f64>,
}

impl ResidualLu {
    /// Factors `m = M` (formed by [`jacobian_matrix`] from `j`). Errors as [`DenseLu::new`]
    /// on `M_KK` (singular exactly when `M` is).
    pub fn new(prog: &ConeProgram, j: &ProjectionJacobian, m: ArrayView2<'_, f64>) -> Result<Self> {
        let n = prog.n();
        let eliminated: Vec<usize> = j.zero_columns().into_iter().map(|i| n + i).collect();
        let mut is_eliminated = vec![false; m.nrows()];
        eliminated.iter().for_each(|&k| is_eliminated[k] = true);
        let kept: Vec<usize> = (0..m.nrows()).filter(|&k| !is_eliminated[k]).collect();
        debug_assert!(
            eliminated.iter().all(|&k| m
                .column(k)
                .iter()
                .enumerate()
                .all(|(r, &v)| v == if r == k { 1.0 } else { 0.0 })),
            "an eliminated column of M is not a unit vector"
        );
        let gather = |rows: &[usize]| Array2::from_shape_fn((rows.len(), kept.len()), |(r, c)| m[[rows[r], kept[c]]]);
        let lu = DenseLu::new(gather(&kept).view())?;
        let coupling = gather(&eliminated);
        Ok(ResidualLu {
            lu,
            kept,
            eliminated,
            coupling,
        })
    }

    /// `M^{-1} r`.
    pub fn solve(&self, r: ArrayView1<'_, f64>) -> Result<Array1<f64>> {
        let zk = self.lu.solve(r.select(Axis(0), &self.kept).view())?;
        let mut z = Array1::zeros(r.len());
        for (&k, &v) in self.kept.iter().zip(&zk) {
            z[k] = v;
        }
        let cz = self.coupling.dot(&zk);
        for (&k, &c) in self.eliminated.iter().zip(&cz) {
            z[k] = r[k] - c;
        }
        Ok(z)
    }

    /// `M^{-T} r`.
    pub fn solve_transpose(&self, r: ArrayView1<'_, f64>) -> Result<Array1<f64>> {
        let rz = r.select(Axis(0), &self.eliminated);
        let rhs = r.select(Axis(0), &self.kept) - self.coupling.t().dot(&rz);
        let wk = self.lu.solve_transpose(rhs.view())?;
        let mut w = Array1::zeros(r.len());
        for (&k, &v) in self.kept.iter().zip(&wk) {
            w[k] = v;
        }
        for (&k, &v) in self.eliminated.iter().zip(&rz) {
            w[k] = v;
        }
        Ok(w)
    }
}

/// `out = M d` without forming `M`.
pub(crate) fn apply_jacobian(
    prog: &ConeProgram,
    j: &ProjectionJacobian,
    d: ArrayView1<'_, f64>,
    mut out: ArrayViewMut1<'_, f64>,
) {
    let n = prog.n();
    let (du, dv) = (d.slice(s![..n]), d.slice(s![n..]));
    let jdv = j.apply_new(dv);
    let top = prog.p_dot(du) + prog.at_dot(jdv.view());
    let bottom = &dv - &jdv - prog.a_dot(du);
    out.slice_mut(s![..n]).assign(&top);
    out.slice_mut(s![n..]).assign(&bottom);
}

/// `out = M^T d` without forming `M` (`P` and `J` are symmetric).
pub(crate) fn apply_jacobian_transpose(
    prog: &ConeProgram,
    j: &ProjectionJacobian,
    d: ArrayView1<'_, f64>,
    mut out: ArrayViewMut1<'_, f64>,
) {
    let n = prog.n();
    let (da, db) = (d.slice(s![..n]), d.slice(s![n..]));
    let top = prog.p_dot(da) - prog.at_dot(db);
    let bottom = j.apply_new((prog.a_dot(da) - db).view()) + db;
    out.slice_mut(s![..n]).assign(&top);
    out.slice_mut(s![n..]).assign(&bottom);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cone::cones::{Cone, Cones};
    use ndarray::array;

    /// A QP in 5 variables with 2 equalities and 4 inequalities; `v` makes rows 2 and 5 active, row 3
    /// inactive and row 4 a kink.
    fn program() -> (ConeProgram, Array1<f64>) {
        let a = Array2::from_shape_fn((6, 5), |(i, j)| {
            ((2 * i + 3 * j) % 5) as f64 - 1.5 + 0.1 * (i * j) as f64
        });
        let p = Array2::from_shape_fn((5, 5), |(i, j)| if i == j { 2.0 } else { 0.1 });
        let cones = Cones::new(vec![Cone::Zero(2), Cone::NonNeg(4)]).unwrap();
        let prog = ConeProgram::new(a, Array1::ones(6), array![1.0, -1.0, 0.5, 0.0, 2.0], cones)
            .unwrap()
            .with_quadratic(p)
            .unwrap();
        (prog, array![0.3, -0.7, 1.2, -0.4, 0.0, 2.0])
    }

    #[test]
    fn the_eliminated_factor_solves_as_the_full_lu() {
        let (prog, v) = program();
        let boundaries = prog.cones.boundaries(v.view(), 1e-12);
        assert_eq!(boundaries.len(), 1);
        let r = Array1::from_shape_fn(11, |i| (i as f64 * 0.37).sin() + 0.5);
        for q in [0.0, 0.4, 1.0] {
            let j = prog.cones.dual_jacobian(v.view(), &boundaries, &[], q);
            // Row 3 (inactive) always, row 4 (the kink) when selected at 0.
            let expect: Vec<usize> = if q == 0.0 { vec![3, 4] } else { vec![3] };
            assert_eq!(j.zero_columns(), expect);
            let m = jacobian_matrix(&prog, &j);
            let full = DenseLu::new(m.view()).unwrap();
            let reduced = ResidualLu::new(&prog, &j, m.view()).unwrap();
            let d = &reduced.solve(r.view()).unwrap() - &full.solve(r.view()).unwrap();
            let dt = &reduced.solve_transpose(r.view()).unwrap() - &full.solve_transpose(r.view()).unwrap();
            assert!(inf_norm(d.view()) < 1e-12 && inf_norm(dt.view()) < 1e-12, "q = {q}");
        }
    }

    #[test]
    fn a_singular_kept_block_is_refused_as_the_full_matrix_would_be() {
        // Two identical equality rows make M singular; the eliminated rows do not hide it.
        let (mut prog, v) = program();
        let row = prog.a.row(0).to_owned();
        prog.a.row_mut(1).assign(&row);
        let j = prog.cones.dual_jacobian(v.view(), &[], &[], 0.5);
        let m = jacobian_matrix(&prog, &j);
        assert!(DenseLu::new(m.view()).is_err());
        let err = ResidualLu::new(&prog, &j, m.view()).err().expect("singular");
        assert!(matches!(err, clarke_core::Error::Singular { .. }), "{err}");
    }
}
