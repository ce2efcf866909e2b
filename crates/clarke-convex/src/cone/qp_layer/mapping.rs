//! A QP sample as a cone program and back: the rows of the cone program, the multipliers,
//! the gradient of the cone data mapped to `(Q, p, A, b, G, l, u)`, and directions of the
//! QP's data mapped to the cone data for forward mode.

use clarke_core::Result;
use clarke_solve::lstsq;
use ndarray::{Array1, Array2};

use super::QpRow;
use super::shift::Shift;
use crate::cone::cones::{Cone, Cones};
use crate::cone::derivative::DataGradient;
use crate::cone::problem::ConeProgram;

/// One sample's data as f64, absent blocks as zero-row arrays, missing bounds infinite.
#[derive(Debug, Clone)]
pub(super) struct SampleData {
    pub(super) q: Array2<f64>,
    pub(super) p: Array1<f64>,
    pub(super) a: Array2<f64>,
    pub(super) b: Array1<f64>,
    pub(super) g: Array2<f64>,
    pub(super) l: Array1<f64>,
    pub(super) u: Array1<f64>,
}

impl SampleData {
    pub(super) fn pinned(&self, i: usize) -> bool {
        self.l[i] == self.u[i]
    }

    /// A row with at least one finite side and `l < u`.
    pub(super) fn boxed(&self, i: usize) -> bool {
        !self.pinned(i) && (self.l[i].is_finite() || self.u[i].is_finite())
    }
}

/// The per-sample state the backward pass needs.
pub(super) struct Sample {
    pub(super) data: SampleData,
    pub(super) rows: Vec<QpRow>,
    pub(super) shift: Option<Shift>,
}

/// One sample's arrays in the shapes of the QP's data: a gradient, or a direction of the
/// forward map.
pub(super) struct QpArrays {
    pub(super) q: Array2<f64>,
    pub(super) p: Array1<f64>,
    pub(super) a: Array2<f64>,
    pub(super) b: Array1<f64>,
    pub(super) g: Array2<f64>,
    pub(super) l: Array1<f64>,
    pub(super) u: Array1<f64>,
}

/// The cone program of a sample, shifted by `shift` (the closest feasible QP) when given,
/// and the origin of each of its rows. Zero cone first: the equalities, the pinned rows,
/// and (shifted) the violated inequalities kept; then the non-negative cone: the finite
/// sides of the other inequalities, upper sides first.
pub(super) fn build_program(d: &SampleData, shift: Option<&Shift>) -> Result<(ConeProgram, Vec<QpRow>)> {
    let (me, mg, n) = (d.a.nrows(), d.g.nrows(), d.q.nrows());
    let r = |j: usize| shift.map_or(0.0, |s| s.r[j]);
    let left_out = |j: usize| shift.is_some_and(|s| s.left_out[j]);
    let violated = |i: usize| shift.is_some_and(|s| s.outside[me + i]) && d.boxed(i);
    let mut rows: Vec<(QpRow, f64)> = Vec::new();
    for k in 0..me {
        if !left_out(k) {
            rows.push((QpRow::Eq(k), d.b[k] + r(k)));
        }
    }
    for i in 0..mg {
        if d.pinned(i) && !left_out(me + i) {
            rows.push((QpRow::Pinned(i), d.u[i] + r(me + i)));
        }
    }
    for i in 0..mg {
        if violated(i) && !left_out(me + i) {
            let ri = r(me + i);
            if ri > 0.0 {
                rows.push((QpRow::Upper(i), d.u[i] + ri));
            } else {
                rows.push((QpRow::Lower(i), -(d.l[i] + ri)));
            }
        }
    }
    let zero = rows.len();
    for i in 0..mg {
        if d.boxed(i) && !violated(i) && d.u[i].is_finite() {
            rows.push((QpRow::Upper(i), d.u[i]));
        }
    }
    for i in 0..mg {
        if d.boxed(i) && !violated(i) && d.l[i].is_finite() {
            rows.push((QpRow::Lower(i), -d.l[i]));
        }
    }
    if rows.is_empty() {
        rows.push((QpRow::Padding, 1.0));
    }
    let m = rows.len();
    let mut a = Array2::<f64>::zeros((m, n));
    let mut b = Array1::<f64>::zeros(m);
    for (j, (row, rhs)) in rows.iter().enumerate() {
        b[j] = *rhs;
        match *row {
            QpRow::Eq(k) => a.row_mut(j).assign(&d.a.row(k)),
            QpRow::Pinned(i) | QpRow::Upper(i) => a.row_mut(j).assign(&d.g.row(i)),
            QpRow::Lower(i) => a.row_mut(j).assign(&(-&d.g.row(i))),
            QpRow::Padding => {}
        }
    }
    let mut cones = Vec::new();
    if zero > 0 {
        cones.push(Cone::Zero(zero));
    }
    if m > zero {
        cones.push(Cone::NonNeg(m - zero));
    }
    let prog = ConeProgram::new(a, b, d.p.clone(), Cones::new(cones)?)?;
    Ok((prog, rows.into_iter().map(|(r, _)| r).collect()))
}

/// The QP's multipliers `(y, z)` from the cone program's `y`.
pub(super) fn multipliers(d: &SampleData, rows: &[QpRow], y: &Array1<f64>) -> (Array1<f64>, Array1<f64>) {
    let mut eq = Array1::zeros(d.a.nrows());
    let mut ineq = Array1::zeros(d.g.nrows());
    for (row, &yj) in rows.iter().zip(y.iter()) {
        match *row {
            QpRow::Eq(k) => eq[k] += yj,
            QpRow::Pinned(i) | QpRow::Upper(i) => ineq[i] += yj,
            QpRow::Lower(i) => ineq[i] -= yj,
            QpRow::Padding => {}
        }
    }
    (eq, ineq)
}

/// Maps one sample's gradient of `(P, A_c, b_c, c)` to `(Q, p, A, b, G, l, u)`, through the
/// shift `s*` when the sample solved its closest feasible QP (see the module docs).
///
/// A pinned row (`l_i = u_i`) is one equality of the common value: its gradient goes to
/// `u_i` when its multiplier is `>= 0` (the upper side holds the solution) and to `l_i`
/// otherwise.
pub(super) fn map_gradient(st: &Sample, y: &Array1<f64>, dg: &DataGradient) -> Result<QpArrays> {
    let d = &st.data;
    let (me, mg, n) = (d.a.nrows(), d.g.nrows(), d.q.nrows());
    let mut out = QpArrays {
        q: dg.p.clone().unwrap_or_else(|| Array2::zeros((n, n))),
        p: dg.c.clone(),
        a: Array2::zeros((me, n)),
        b: Array1::zeros(me),
        g: Array2::zeros((mg, n)),
        l: Array1::zeros(mg),
        u: Array1::zeros(mg),
    };
    // The gradient with respect to the shift s*, per row of C = [A; G].
    let mut gr = Array1::<f64>::zeros(me + mg);
    let mut pinned_upper = vec![true; mg];
    for (j, row) in st.rows.iter().enumerate() {
        let (ar, br) = (dg.a.row(j), dg.b[j]);
        match *row {
            QpRow::Eq(k) => {
                out.a.row_mut(k).scaled_add(1.0, &ar);
                out.b[k] += br;
                gr[k] += br;
            }
            QpRow::Pinned(i) => {
                out.g.row_mut(i).scaled_add(1.0, &ar);
                pinned_upper[i] = y[j] >= 0.0;
                if pinned_upper[i] {
                    out.u[i] += br;
                } else {
                    out.l[i] += br;
                }
                gr[me + i] += br;
            }
            QpRow::Upper(i) => {
                out.g.row_mut(i).scaled_add(1.0, &ar);
                out.u[i] += br;
                gr[me + i] += br;
            }
            QpRow::Lower(i) => {
                out.g.row_mut(i).scaled_add(-1.0, &ar);
                out.l[i] -= br;
                gr[me + i] -= br;
            }
            QpRow::Padding => {}
        }
    }
    let Some(shift) = &st.shift else {
        return Ok(out);
    };
    // s* = r(theta): w = E^+ g_r, h = g_r - E w on the rows outside their box;
    // grad_C += h xbar^T - r w^T, grad_beta = -h.
    let v: Vec<usize> = (0..me + mg).filter(|&j| shift.outside[j]).collect();
    if v.is_empty() {
        return Ok(out);
    }
    let row_of = |j: usize| if j < me { d.a.row(j) } else { d.g.row(j - me) };
    let mut e = Array2::<f64>::zeros((v.len(), n));
    let mut g_v = Array1::<f64>::zeros(v.len());
    for (t, &j) in v.iter().enumerate() {
        e.row_mut(t).assign(&row_of(j));
        g_v[t] = gr[j];
    }
    let w = lstsq(e.view(), g_v.view())?.solution;
    let h = &g_v - &e.dot(&w);
    for (t, &j) in v.iter().enumerate() {
        let rj = shift.r[j];
        let mut grad_row = &shift.xbar * h[t];
        grad_row.scaled_add(-rj, &w);
        if j < me {
            out.a.row_mut(j).scaled_add(1.0, &grad_row);
            out.b[j] -= h[t];
        } else {
            let i = j - me;
            out.g.row_mut(i).scaled_add(1.0, &grad_row);
            let upper = if d.pinned(i) { pinned_upper[i] } else { rj > 0.0 };
            if upper {
                out.u[i] -= h[t];
            } else {
                out.l[i] -= h[t];
            }
        }
    }
    Ok(out)
}

/// The direction `(dP, dA_c, db_c)` of one sample's cone program for a direction `dir` of the
/// QP's data (`dc = dp`): the transpose of [`map_gradient`], with the tangent of the shift
/// `s*` for a closest feasible QP,
/// `dr = e - E (E^T E)^+ (dC^T r + E^T e)`, `e = D (dC xbar - d beta)` (see the module docs).
pub(super) fn cone_direction(
    st: &Sample,
    y: &Array1<f64>,
    dir: &QpArrays,
) -> Result<(Array2<f64>, Array2<f64>, Array1<f64>)> {
    let d = &st.data;
    let (me, mg, n) = (d.a.nrows(), d.g.nrows(), d.q.nrows());
    // `P` gets a symmetric gradient: its tangent enters through its symmetric part.
    let dp = (&dir.q + &dir.q.t()) * 0.5;
    let mut pinned_upper = vec![true; mg];
    for (j, row) in st.rows.iter().enumerate() {
        if let QpRow::Pinned(i) = *row {
            pinned_upper[i] = y[j] >= 0.0;
        }
    }
    let mut dr = Array1::<f64>::zeros(me + mg);
    if let Some(shift) = &st.shift {
        let v: Vec<usize> = (0..me + mg).filter(|&j| shift.outside[j]).collect();
        if !v.is_empty() {
            let mut e = Array2::<f64>::zeros((v.len(), n));
            let mut ev = Array1::<f64>::zeros(v.len());
            let mut dct_r = Array1::<f64>::zeros(n);
            for (t, &j) in v.iter().enumerate() {
                let (row, drow, dbeta) = if j < me {
                    (d.a.row(j), dir.a.row(j), dir.b[j])
                } else {
                    let i = j - me;
                    let upper = if d.pinned(i) { pinned_upper[i] } else { shift.r[j] > 0.0 };
                    (d.g.row(i), dir.g.row(i), if upper { dir.u[i] } else { dir.l[i] })
                };
                e.row_mut(t).assign(&row);
                ev[t] = drow.dot(&shift.xbar) - dbeta;
                dct_r.scaled_add(shift.r[j], &drow);
            }
            // (E^T E)^+ v = E^+ (E^+)^T v, and (E^+)^T = (E^T)^+.
            let rhs = dct_r + e.t().dot(&ev);
            let half = lstsq(e.t(), rhs.view())?.solution;
            let z = lstsq(e.view(), half.view())?.solution;
            let drv = &ev - &e.dot(&z);
            for (t, &j) in v.iter().enumerate() {
                dr[j] = drv[t];
            }
        }
    }
    let m = st.rows.len();
    let mut da = Array2::<f64>::zeros((m, n));
    let mut db = Array1::<f64>::zeros(m);
    for (j, row) in st.rows.iter().enumerate() {
        match *row {
            QpRow::Eq(k) => {
                da.row_mut(j).assign(&dir.a.row(k));
                db[j] = dir.b[k] + dr[k];
            }
            QpRow::Pinned(i) => {
                da.row_mut(j).assign(&dir.g.row(i));
                db[j] = if pinned_upper[i] { dir.u[i] } else { dir.l[i] } + dr[me + i];
            }
            QpRow::Upper(i) => {
                da.row_mut(j).assign(&dir.g.row(i));
                db[j] = dir.u[i] + dr[me + i];
            }
            QpRow::Lower(i) => {
                da.row_mut(j).assign(&(-&dir.g.row(i)));
                db[j] = -(dir.l[i] + dr[me + i]);
            }
            QpRow::Padding => {}
        }
    }
    Ok((dp, da, db))
}
