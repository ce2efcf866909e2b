//! The least-squares shift of an infeasible QP: the smallest change of its right-hand sides
//! that makes it feasible (the closest feasible QP of Bambade et al. 2023).

use clarke_core::{Error, KinkRecord, KinkScan, Result, Selection};
use clarke_solve::lstsq;
use ndarray::{Array1, Array2, s};

use super::OP;
use super::mapping::SampleData;
use crate::cone::cones::{Cone, Cones};
use crate::cone::problem::ConeProgram;
use crate::cone::solver::{ConeStatus, SolverOptions, solve};

/// The least-squares shift of an infeasible sample (see the module docs), over the rows of
/// `C = [A; G]`.
#[derive(Debug, Clone)]
pub(super) struct Shift {
    /// `s*`, `m_eq + m_in` entries.
    pub(super) r: Array1<f64>,
    /// Per row of `C`: outside its box at `xbar` (every equality and pinned row counts).
    pub(super) outside: Vec<bool>,
    /// Per row of `C`: violated and left out of the shifted program (implied by the others).
    pub(super) left_out: Vec<bool>,
    pub(super) xbar: Array1<f64>,
    /// The kinks of the shift: the boxed rows `l_i < u_i` whose value `(G xbar)_i` lies
    /// within [`Shift::band`] of a bound (the kink of the clamp in
    /// `s_i = g_i xbar - clamp(g_i xbar, l_i, u_i)`), as (row of `C`, distance to the bound),
    /// in increasing row order.
    pub(super) boundary: Vec<(usize, f64)>,
    /// `1e-9` times the data's scale: the accuracy to which the polish decides whether a row
    /// is outside its box, hence the band inside which a row counts as at its bound.
    pub(super) band: f64,
}

/// The least-squares shift `s*` of a sample (see the module docs): `xbar` minimises
/// `||A x - b||^2 + ||G_pin x - u_pin||^2 + ||G x - w||^2` over `x` and `l <= w <= u` (the
/// rows with `l < u`), a convex QP solved by the cone solver; the rows outside their box at
/// `xbar` are then polished by one least-squares solve on them, and a maximal linearly
/// independent subset of them is kept for the shifted program.
pub(super) fn least_squares_shift(d: &SampleData, solver: &SolverOptions) -> Result<Shift> {
    let (me, mg, n) = (d.a.nrows(), d.g.nrows(), d.q.nrows());
    let pinned: Vec<usize> = (0..mg).filter(|&i| d.pinned(i)).collect();
    let boxed: Vec<usize> = (0..mg).filter(|&i| d.boxed(i)).collect();
    // The rows whose box is a point: equalities and pinned inequalities.
    let mut e0 = Array2::<f64>::zeros((me + pinned.len(), n));
    let mut beta0 = Array1::<f64>::zeros(me + pinned.len());
    e0.slice_mut(s![..me, ..]).assign(&d.a);
    beta0.slice_mut(s![..me]).assign(&d.b);
    for (j, &i) in pinned.iter().enumerate() {
        e0.row_mut(me + j).assign(&d.g.row(i));
        beta0[me + j] = d.u[i];
    }
    let mut xbar = if boxed.is_empty() {
        lstsq(e0.view(), beta0.view())?.solution
    } else {
        let k = boxed.len();
        let mut gb = Array2::<f64>::zeros((k, n));
        for (j, &i) in boxed.iter().enumerate() {
            gb.row_mut(j).assign(&d.g.row(i));
        }
        let mut p = Array2::<f64>::zeros((n + k, n + k));
        p.slice_mut(s![..n, ..n]).assign(&(e0.t().dot(&e0) + gb.t().dot(&gb)));
        p.slice_mut(s![..n, n..]).assign(&(-&gb.t()));
        p.slice_mut(s![n.., ..n]).assign(&(-&gb));
        p.slice_mut(s![n.., n..]).assign(&Array2::eye(k));
        let mut c = Array1::<f64>::zeros(n + k);
        c.slice_mut(s![..n]).assign(&(-e0.t().dot(&beta0)));
        let mut rows: Vec<(usize, f64, f64)> = Vec::new();
        for (j, &i) in boxed.iter().enumerate() {
            if d.u[i].is_finite() {
                rows.push((n + j, 1.0, d.u[i]));
            }
        }
        for (j, &i) in boxed.iter().enumerate() {
            if d.l[i].is_finite() {
                rows.push((n + j, -1.0, -d.l[i]));
            }
        }
        let mut a = Array2::<f64>::zeros((rows.len(), n + k));
        let mut b = Array1::<f64>::zeros(rows.len());
        for (r, &(col, sign, rhs)) in rows.iter().enumerate() {
            a[[r, col]] = sign;
            b[r] = rhs;
        }
        let prog = ConeProgram::new(a, b, c, Cones::new(vec![Cone::NonNeg(rows.len())])?)?.with_quadratic(p)?;
        let sol = solve(&prog, solver, None)?;
        if sol.status != ConeStatus::Solved {
            return Err(Error::CustomOp {
                op: OP.to_string(),
                detail: format!(
                    "the least-squares problem of the closest feasible QP is {} after {} iterations",
                    sol.status, sol.iterations
                ),
            });
        }
        sol.x.slice(s![..n]).to_owned()
    };
    let residual = |x: &Array1<f64>| -> Array1<f64> {
        let mut r = Array1::<f64>::zeros(me + mg);
        r.slice_mut(s![..me]).assign(&(d.a.dot(x) - &d.b));
        let gx = d.g.dot(x);
        for i in 0..mg {
            r[me + i] = gx[i] - gx[i].clamp(d.l[i], d.u[i]);
        }
        r
    };
    let scale =
        d.b.iter()
            .chain(d.l.iter().chain(d.u.iter()).filter(|v| v.is_finite()))
            .chain(d.a.iter())
            .chain(d.g.iter())
            .fold(1.0f64, |m, v| m.max(v.abs()));
    // Polish by an active-set loop on the rows outside their boxes (each at the bound it is
    // projected to): the least-squares point of those rows is a minimiser of the whole
    // objective when they stay strictly outside on their side and every other row stays in
    // its box (the gradient is then `E_V^T (E_V x - beta_V) = 0`). Rows that come back inside
    // leave the set, rows that go out join it; when this does not settle, the solver's point
    // is kept with the rows beyond `1e-8` of the data's scale as the outside ones.
    let row_of = |j: usize| if j < me { d.a.row(j) } else { d.g.row(j - me) };
    let always = |j: usize| j < me || d.pinned(j - me);
    let r0 = residual(&xbar);
    // Per row: 0 inside, +1 above its upper bound, -1 below its lower one (the rows whose
    // box is a point count as outside, +1).
    let mut side: Vec<i8> = (0..me + mg)
        .map(|j| {
            if always(j) || r0[j] > 1e-8 * scale {
                1
            } else if r0[j] < -1e-8 * scale {
                -1
            } else {
                0
            }
        })
        .collect();
    let mut settled = None;
    for _ in 0..2 * (me + mg) + 2 {
        let v: Vec<usize> = (0..me + mg).filter(|&j| side[j] != 0).collect();
        let mut ev = Array2::<f64>::zeros((v.len(), n));
        let mut bv = Array1::<f64>::zeros(v.len());
        for (t, &j) in v.iter().enumerate() {
            ev.row_mut(t).assign(&row_of(j));
            bv[t] = if j < me {
                d.b[j]
            } else if side[j] > 0 {
                d.u[j - me]
            } else {
                d.l[j - me]
            };
        }
        let xp = lstsq(ev.view(), bv.view())?.solution;
        let rp = residual(&xp);
        let mut changed = false;
        for j in (0..me + mg).filter(|&j| !always(j)) {
            let now = if side[j] != 0 && rp[j] * f64::from(side[j]) <= 1e-12 * scale {
                0
            } else if side[j] == 0 && rp[j].abs() > 1e-9 * scale {
                if rp[j] > 0.0 { 1 } else { -1 }
            } else {
                side[j]
            };
            changed |= now != side[j];
            side[j] = now;
        }
        if !changed {
            settled = Some((xp, rp));
            break;
        }
    }
    let (r, outside) = match settled {
        Some((xp, rp)) => {
            xbar = xp;
            (rp, side.iter().map(|&v| v != 0).collect::<Vec<_>>())
        }
        None => {
            let outside = (0..me + mg).map(|j| always(j) || r0[j].abs() > 1e-8 * scale).collect();
            (r0, outside)
        }
    };
    // A maximal independent subset of the violated rows, in the order the program takes them
    // (equalities, pinned, then the other inequalities): Gram-Schmidt with a relative cutoff.
    let mut left_out = vec![false; me + mg];
    let mut basis: Vec<Array1<f64>> = Vec::new();
    let order: Vec<usize> = (0..me)
        .chain((0..mg).filter(|&i| d.pinned(i)).map(|i| me + i))
        .chain((0..mg).filter(|&i| d.boxed(i) && outside[me + i]).map(|i| me + i))
        .collect();
    for j in order {
        let row = row_of(j).to_owned();
        let norm = row.dot(&row).sqrt();
        let mut rest = row.clone();
        for _ in 0..2 {
            for e in &basis {
                let c = e.dot(&rest);
                rest.scaled_add(-c, e);
            }
        }
        let rn = rest.dot(&rest).sqrt();
        if norm == 0.0 || rn <= 1e-9 * norm {
            left_out[j] = true;
        } else {
            basis.push(rest / rn);
        }
    }
    let band = 1e-9 * scale;
    let gx = d.g.dot(&xbar);
    let boundary = (0..mg)
        .filter(|&i| d.boxed(i))
        .filter_map(|i| {
            // Outside: the distance to the kink is the residual; inside: to the nearer bound.
            let distance = if outside[me + i] {
                r[me + i].abs()
            } else {
                (gx[i] - d.l[i]).abs().min((d.u[i] - gx[i]).abs())
            };
            (distance <= band).then_some((me + i, distance))
        })
        .collect();
    Ok(Shift {
        r,
        outside,
        left_out,
        xbar,
        boundary,
        band,
    })
}

/// The ledger records of the shifts' kinks over a batch (`shifts[i]`: sample `i`'s shift,
/// `None` when it was feasible), laid out as `[samples, rows]` with `rows = m_eq + m_in`
/// (the rows of `C = [A; G]`). The derivative of a closest feasible QP treats a row at its
/// bound by the side the polish put it on, not by the policy, so there are two records,
/// each marked as overridden: the rows kept inside (the clamp's slope 1 at both bounds:
/// the shift does not move with the row) and the rows kept outside (slope 0: it moves with
/// it). The second is left out when no row at a bound was kept outside.
pub(super) fn shift_kink_records(
    shifts: &[Option<&Shift>],
    rows: usize,
    tolerance: f64,
    node: usize,
    layer: &str,
) -> Vec<KinkRecord> {
    let scan = |kept_outside: bool| {
        let mut scan = KinkScan::new(tolerance, 0.0);
        for (i, shift) in shifts.iter().enumerate() {
            let mut next = 0;
            if let Some(shift) = shift {
                scan.set_solver_band(shift.band);
                for &(row, distance) in shift
                    .boundary
                    .iter()
                    .filter(|(row, _)| shift.outside[*row] == kept_outside)
                {
                    scan.skip(row - next);
                    scan.visit(i * rows + row, distance);
                    next = row + 1;
                }
            }
            scan.skip(rows - next);
        }
        let slope = if kept_outside { 0.0 } else { 1.0 };
        let mut record = scan
            .finish(
                node,
                "closest_feasible_clamp",
                &[shifts.len(), rows],
                Selection::Clamp {
                    low: slope,
                    high: slope,
                },
                Some((0.0, 1.0)),
            )
            .in_layer(layer, node);
        record.overridden = true;
        record
    };
    let outside = scan(true);
    let mut records = vec![scan(false)];
    if outside.at_kink() > 0 {
        records.push(outside);
    }
    records
}
