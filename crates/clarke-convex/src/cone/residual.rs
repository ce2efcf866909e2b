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

use ndarray::{Array1, Array2, ArrayView1, ArrayViewMut1, s};

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
    let jd = j.to_dense();
    let mut out = Array2::zeros((n + m, n + m));
    if let Some(p) = prog.p_dense() {
        out.slice_mut(s![..n, ..n]).assign(&*p);
    }
    let a = prog.a_dense();
    out.slice_mut(s![..n, n..]).assign(&a.t().dot(&jd));
    out.slice_mut(s![n.., ..n]).assign(&(-&*a));
    let mut lower = -jd;
    lower.diag_mut().iter_mut().for_each(|d| *d += 1.0);
    out.slice_mut(s![n.., n..]).assign(&lower);
    out
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
