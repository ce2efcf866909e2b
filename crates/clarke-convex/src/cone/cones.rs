//! Cones, their projections, and the conservative Jacobians of the projections.
//!
//! A cone program constrains its slack `s` to a product `K` of the cones below, in the order
//! given, each taking a consecutive block of rows of `A`:
//!
//! | cone | rows | `K` | `K*` |
//! |---|---|---|---|
//! | [`Cone::Zero`]`(m)` | `m` | `{0}` (equalities) | all of `R^m` |
//! | [`Cone::NonNeg`]`(m)` | `m` | `R^m_+` (inequalities) | the same |
//! | [`Cone::Soc`]`(d)` | `d` | `{(t, x) : ||x||_2 <= t}` | the same |
//! | [`Cone::Psd`]`(k)` | `k(k+1)/2` | `k x k` PSD matrices, scaled vectorisation | the same |
//!
//! The PSD cone is stored as the lower triangle column by column, off-diagonal entries
//! multiplied by `sqrt(2)`, so that the Euclidean inner product of two such vectors is the
//! trace inner product of the matrices and the projection is orthogonal in both.
//!
//! # Kinks and selections
//!
//! The projections are piecewise smooth; where two pieces meet (a zero entry of a
//! non-negative block, the boundary `||x|| = |t|` of a second-order cone, a zero eigenvalue of
//! a PSD block) the Jacobian is a selection in the convex hull of the adjacent limits. One
//! number `q` in `[0, 1]` selects it, the same convention as `relu'(0)`: `q = 1` picks the
//! piece closer to the identity, `q = 0` the piece closer to zero.
//!
//! - non-negative entry at `0`: `q`;
//! - second-order cone, outer boundary `||x|| = t > 0`: `q I + (1 - q) J_out`;
//! - inner boundary `||x|| = -t > 0`: `q J_out`; apex `(0, 0)`: `q I`;
//! - PSD: `Gamma_ij = q` for pairs of zero eigenvalues (the divided differences elsewhere).
//!
//! Here `J_out = (1 / (2||x||)) [[||x||, x^T], [x, (||x|| + t) I - t x x^T / ||x||^2]]` is the
//! Jacobian outside both the cone and its polar.

use clarke_core::{Error, Result};
use faer::{Mat, Side};
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, s};

/// One cone of the product `K`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cone {
    /// `{0}^m`: `m` equality constraints. Its dual is the free cone.
    Zero(usize),
    /// The non-negative orthant `R^m_+`: `m` inequality constraints `(b - A x)_i >= 0`.
    NonNeg(usize),
    /// The second-order (Lorentz) cone of dimension `d >= 1`: `{(t, x) : ||x||_2 <= t}`.
    Soc(usize),
    /// The cone of `k x k` positive semidefinite matrices in the scaled vectorisation
    /// (`k(k+1)/2` rows).
    Psd(usize),
}

impl Cone {
    /// Rows of `A` (entries of `s`) this cone takes.
    pub fn dim(&self) -> usize {
        match *self {
            Cone::Zero(m) | Cone::NonNeg(m) | Cone::Soc(m) => m,
            Cone::Psd(k) => k * (k + 1) / 2,
        }
    }

    /// The cone's name in reports and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Cone::Zero(_) => "zero",
            Cone::NonNeg(_) => "nonneg",
            Cone::Soc(_) => "soc",
            Cone::Psd(_) => "psd",
        }
    }
}

/// A product of cones with the row range of each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cones {
    list: Vec<Cone>,
    offsets: Vec<usize>,
    dim: usize,
}

impl Cones {
    /// The product of `list`, in order. Errors on an empty cone (zero rows), which is almost
    /// always a bug in the caller's bookkeeping.
    pub fn new(list: Vec<Cone>) -> Result<Self> {
        let mut offsets = Vec::with_capacity(list.len());
        let mut dim = 0;
        for (i, cone) in list.iter().enumerate() {
            if cone.dim() == 0 {
                return Err(Error::invalid(
                    "Cones::new",
                    format!("cone {i} ({:?}) has no rows; leave it out instead", cone),
                ));
            }
            offsets.push(dim);
            dim += cone.dim();
        }
        Ok(Cones { list, offsets, dim })
    }

    /// Total rows `m`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The cones, in order.
    pub fn list(&self) -> &[Cone] {
        &self.list
    }

    /// Each cone with its row range.
    pub fn blocks(&self) -> impl Iterator<Item = (usize, Cone, std::ops::Range<usize>)> + '_ {
        self.list
            .iter()
            .zip(&self.offsets)
            .enumerate()
            .map(|(i, (c, &o))| (i, *c, o..o + c.dim()))
    }

    /// Rows in zero cones (equalities).
    pub fn zero_rows(&self) -> usize {
        self.list
            .iter()
            .filter_map(|c| if let Cone::Zero(m) = c { Some(*m) } else { None })
            .sum()
    }

    /// `Pi_K(v)` into `out`.
    ///
    /// # Panics
    /// When `v` (or `out`) has another length than [`Cones::dim`]. This is the solver's
    /// per-iteration kernel: its callers check the program's shapes once, up front.
    pub fn project(&self, v: ArrayView1<'_, f64>, mut out: ArrayViewMut1<'_, f64>) {
        for (_, cone, r) in self.blocks() {
            let (vb, ob) = (v.slice(s![r.clone()]), out.slice_mut(s![r]));
            match cone {
                Cone::Zero(_) => ob.into_iter().for_each(|o| *o = 0.0),
                _ => project_self_dual(cone, vb, ob),
            }
        }
    }

    /// `Pi_{K*}(v)` into `out`.
    ///
    /// # Panics
    /// When `v` (or `out`) has another length than [`Cones::dim`]. This is the solver's
    /// per-iteration kernel: its callers check the program's shapes once, up front.
    pub fn project_dual(&self, v: ArrayView1<'_, f64>, mut out: ArrayViewMut1<'_, f64>) {
        for (_, cone, r) in self.blocks() {
            let (vb, mut ob) = (v.slice(s![r.clone()]), out.slice_mut(s![r]));
            match cone {
                Cone::Zero(_) => ob.assign(&vb),
                _ => project_self_dual(cone, vb, ob),
            }
        }
    }

    /// `||v - Pi_K(v)||_2`.
    ///
    /// # Panics
    /// When `v` (or `out`) has another length than [`Cones::dim`]. This is the solver's
    /// per-iteration kernel: its callers check the program's shapes once, up front.
    pub fn distance(&self, v: ArrayView1<'_, f64>) -> f64 {
        let mut p = Array1::zeros(v.len());
        self.project(v, p.view_mut());
        (&v - &p).iter().map(|d| d * d).sum::<f64>().sqrt()
    }

    /// `||v - Pi_{K*}(v)||_2`.
    ///
    /// # Panics
    /// When `v` (or `out`) has another length than [`Cones::dim`]. This is the solver's
    /// per-iteration kernel: its callers check the program's shapes once, up front.
    pub fn distance_dual(&self, v: ArrayView1<'_, f64>) -> f64 {
        let mut p = Array1::zeros(v.len());
        self.project_dual(v, p.view_mut());
        (&v - &p).iter().map(|d| d * d).sum::<f64>().sqrt()
    }

    /// Where `v` sits within `tol` of a kink of `Pi_{K*}`: one [`Boundary`] per
    /// non-negative entry, second-order cone or PSD block. Exact kinks (a zero entry, a
    /// point exactly on a boundary, an exactly zero eigenvalue) are flagged as such.
    ///
    /// # Panics
    /// When `v` has another length than [`Cones::dim`] (checked by the derivative, which
    /// calls this with a solution of the program).
    pub fn boundaries(&self, v: ArrayView1<'_, f64>, tol: f64) -> Vec<Boundary> {
        let mut out = Vec::new();
        for (index, cone, r) in self.blocks() {
            let vb = v.slice(s![r.clone()]);
            match cone {
                Cone::Zero(_) => {}
                Cone::NonNeg(_) => {
                    for (i, &vi) in vb.iter().enumerate() {
                        if vi.abs() <= tol {
                            out.push(Boundary {
                                cone: index,
                                kind: BoundaryKind::Entry(r.start + i),
                                exact: vi == 0.0,
                                margin: vi.abs(),
                                tol,
                            });
                        }
                    }
                }
                Cone::Soc(_) => {
                    let (t, nx) = soc_parts(vb);
                    let margin = soc_margin(vb);
                    if margin <= tol || (nx <= tol && t.abs() <= tol) {
                        out.push(Boundary {
                            cone: index,
                            kind: BoundaryKind::Block(r.clone()),
                            exact: margin == 0.0,
                            margin,
                            tol,
                        });
                    }
                }
                Cone::Psd(k) => {
                    let (lambda, _) = psd_eigen(vb, k);
                    let near: Vec<f64> = lambda.iter().copied().filter(|l| l.abs() <= tol).collect();
                    if !near.is_empty() {
                        out.push(Boundary {
                            cone: index,
                            kind: BoundaryKind::Block(r.clone()),
                            exact: near.contains(&0.0),
                            margin: near.iter().fold(f64::INFINITY, |a, l| a.min(l.abs())),
                            tol,
                        });
                    }
                }
            }
        }
        out
    }

    /// The Jacobian of `Pi_{K*}` at `v`. Boundaries listed in `boundaries` take the
    /// selection of the same index in `selection`, or `default_q` where it is `None` or
    /// missing: a numerical solution within the tolerance of a kink cannot tell which side
    /// it is on, so the kink policy decides rather than rounding. Entries not listed take
    /// the side `v` is on.
    ///
    /// # Panics
    /// When `v` has another length than [`Cones::dim`], or a boundary names a row outside
    /// its cone (boundaries come from [`Cones::boundaries`] of the same product).
    pub fn dual_jacobian(
        &self,
        v: ArrayView1<'_, f64>,
        boundaries: &[Boundary],
        selection: &[Option<f64>],
        default_q: f64,
    ) -> ProjectionJacobian {
        let pick = |i: usize| selection.get(i).copied().flatten().unwrap_or(default_q);
        let mut blocks = Vec::with_capacity(self.list.len());
        for (index, cone, r) in self.blocks() {
            let vb = v.slice(s![r.clone()]);
            let block = match cone {
                Cone::Zero(_) => JacobianBlock::Identity,
                Cone::NonNeg(_) => {
                    let mut d: Vec<f64> = vb.iter().map(|&vi| if vi > 0.0 { 1.0 } else { 0.0 }).collect();
                    for (i, b) in boundaries.iter().enumerate() {
                        if let (true, BoundaryKind::Entry(row)) = (b.cone == index, &b.kind) {
                            d[row - r.start] = pick(i);
                        }
                    }
                    JacobianBlock::Diagonal(d)
                }
                Cone::Soc(_) | Cone::Psd(_) => {
                    let found = boundaries.iter().enumerate().find(|(_, b)| b.cone == index);
                    let q = found.map(|(i, _)| pick(i));
                    JacobianBlock::Dense(match cone {
                        Cone::Soc(_) => soc_jacobian(vb, q),
                        Cone::Psd(k) => psd_jacobian(vb, k, found.map(|(i, b)| (b.tol, pick(i)))),
                        _ => unreachable!("matched above"),
                    })
                }
            };
            blocks.push((r, block));
        }
        ProjectionJacobian { blocks, dim: self.dim }
    }
}

/// Where a point sits on a kink of a projection.
#[derive(Debug, Clone, PartialEq)]
pub struct Boundary {
    /// Index of the cone in the product.
    pub cone: usize,
    /// One entry of a non-negative block, or a whole second-order / PSD block.
    pub kind: BoundaryKind,
    /// Exactly on the kink (not only within the tolerance).
    pub exact: bool,
    /// Distance to the kink: `|v_i|`, `| ||x|| - |t| |`, or the smallest `|lambda|`.
    pub margin: f64,
    /// The tolerance it was detected with (eigenvalues of a PSD block within it count as
    /// zero when the selection is applied).
    pub tol: f64,
}

/// The part of a cone a [`Boundary`] refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundaryKind {
    /// One row of a non-negative block: its selection is one number, and the block
    /// `(Q - I) J + I` is affine in it.
    Entry(usize),
    /// A second-order or PSD block: one selection moves a whole sub-matrix.
    Block(std::ops::Range<usize>),
}

/// One diagonal block of a projection's Jacobian.
#[derive(Debug, Clone, PartialEq)]
pub enum JacobianBlock {
    /// The identity (the free cone, dual of the zero cone).
    Identity,
    /// A diagonal (non-negative orthant).
    Diagonal(Vec<f64>),
    /// A dense symmetric block (second-order and PSD cones).
    Dense(Array2<f64>),
}

/// A block-diagonal element of the conservative Jacobian of `Pi_{K*}`. Symmetric.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionJacobian {
    blocks: Vec<(std::ops::Range<usize>, JacobianBlock)>,
    dim: usize,
}

impl ProjectionJacobian {
    /// `out = J x`.
    ///
    /// # Panics
    /// When `x` or `out` has another length than the Jacobian's dimension.
    pub fn apply(&self, x: ArrayView1<'_, f64>, mut out: ArrayViewMut1<'_, f64>) {
        for (r, block) in &self.blocks {
            let xb = x.slice(s![r.clone()]);
            let mut ob = out.slice_mut(s![r.clone()]);
            match block {
                JacobianBlock::Identity => ob.assign(&xb),
                JacobianBlock::Diagonal(d) => {
                    for ((o, &xi), &di) in ob.iter_mut().zip(xb.iter()).zip(d) {
                        *o = di * xi;
                    }
                }
                JacobianBlock::Dense(m) => ob.assign(&m.dot(&xb)),
            }
        }
    }

    /// `J x` as a new array.
    ///
    /// # Panics
    /// As [`ProjectionJacobian::apply`].
    pub fn apply_new(&self, x: ArrayView1<'_, f64>) -> Array1<f64> {
        let mut out = Array1::zeros(self.dim);
        self.apply(x, out.view_mut());
        out
    }

    /// `J` as a dense matrix.
    pub fn to_dense(&self) -> Array2<f64> {
        let mut j = Array2::zeros((self.dim, self.dim));
        for (r, block) in &self.blocks {
            let mut jb = j.slice_mut(s![r.clone(), r.clone()]);
            match block {
                JacobianBlock::Identity => jb.diag_mut().fill(1.0),
                JacobianBlock::Diagonal(d) => jb.diag_mut().iter_mut().zip(d).for_each(|(o, &v)| *o = v),
                JacobianBlock::Dense(m) => jb.assign(m),
            }
        }
        j
    }

    /// The columns of `J` that are zero: the entries of its diagonal blocks that are exactly
    /// 0 (inactive inequalities, and kinks selected at 0). In `M = [[P, A^T J], [-A, I - J]]`
    /// such a column of the lower block is a unit vector, which lets a factorisation
    /// eliminate it without arithmetic.
    pub(crate) fn zero_columns(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for (r, block) in &self.blocks {
            if let JacobianBlock::Diagonal(d) = block {
                out.extend(
                    d.iter()
                        .enumerate()
                        .filter(|(_, v)| **v == 0.0)
                        .map(|(i, _)| r.start + i),
                );
            }
        }
        out
    }

    /// `out = B J` for a `B` with `dim` columns, block by block: the columns of an identity
    /// block are copied, those of a diagonal block scaled, and only a dense block costs a
    /// product. Forming `J` densely and multiplying would cost `rows x dim^2`.
    ///
    /// # Panics
    /// When `B` or `out` does not have `dim` columns, or their rows differ.
    pub fn right_multiply(&self, b: ArrayView2<'_, f64>, mut out: ArrayViewMut2<'_, f64>) {
        assert_eq!(
            b.ncols(),
            self.dim,
            "right_multiply: B has {} columns, J is {}",
            b.ncols(),
            self.dim
        );
        assert_eq!(b.dim(), out.dim(), "right_multiply: B and out differ in shape");
        out.fill(0.0);
        for (r, block) in &self.blocks {
            let bb = b.slice(s![.., r.clone()]);
            let mut ob = out.slice_mut(s![.., r.clone()]);
            match block {
                JacobianBlock::Identity => ob.assign(&bb),
                JacobianBlock::Diagonal(d) => {
                    for ((mut oc, bc), &di) in ob.columns_mut().into_iter().zip(bb.columns()).zip(d) {
                        if di != 0.0 {
                            oc.zip_mut_with(&bc, |o, &v| *o = di * v);
                        }
                    }
                }
                JacobianBlock::Dense(m) => clarke_core::gemm::gemm(1.0, bb, m.view(), false, ob),
            }
        }
    }

    /// `out = -J`, written into a `dim x dim` view (entries off the blocks set to zero).
    ///
    /// # Panics
    /// When `out` is not `dim x dim`.
    pub fn write_negated(&self, mut out: ArrayViewMut2<'_, f64>) {
        assert_eq!(out.dim(), (self.dim, self.dim), "write_negated: out is not dim x dim");
        out.fill(0.0);
        for (r, block) in &self.blocks {
            let mut jb = out.slice_mut(s![r.clone(), r.clone()]);
            match block {
                JacobianBlock::Identity => jb.diag_mut().fill(-1.0),
                JacobianBlock::Diagonal(d) => jb.diag_mut().iter_mut().zip(d).for_each(|(o, &v)| *o = -v),
                JacobianBlock::Dense(m) => jb.zip_mut_with(m, |o, &v| *o = -v),
            }
        }
    }

    /// The blocks with their row ranges.
    pub fn blocks(&self) -> &[(std::ops::Range<usize>, JacobianBlock)] {
        &self.blocks
    }
}

/// Projection onto a self-dual cone (non-negative, second-order, PSD).
fn project_self_dual(cone: Cone, v: ArrayView1<'_, f64>, mut out: ArrayViewMut1<'_, f64>) {
    match cone {
        Cone::Zero(_) => unreachable!("the zero cone is not self-dual"),
        Cone::NonNeg(_) => out.iter_mut().zip(v.iter()).for_each(|(o, &vi)| *o = vi.max(0.0)),
        Cone::Soc(_) => {
            let (t, nx) = soc_parts(v);
            if nx <= t {
                out.assign(&v);
            } else if nx <= -t {
                out.fill(0.0);
            } else {
                let a = 0.5 * (t + nx);
                out[0] = a;
                for i in 1..v.len() {
                    out[i] = a * v[i] / nx;
                }
            }
        }
        Cone::Psd(k) => {
            let (lambda, u) = psd_eigen(v, k);
            let mut x = Array2::<f64>::zeros((k, k));
            for (i, &l) in lambda.iter().enumerate() {
                if l > 0.0 {
                    let ui = u.column(i);
                    for a in 0..k {
                        for b in 0..k {
                            x[[a, b]] += l * ui[a] * ui[b];
                        }
                    }
                }
            }
            out.assign(&svec(&x));
        }
    }
}

/// Distance of a second-order-cone block `(t, x)` from the kinks of its projection:
/// `| ||x|| - |t| |` (the cone's boundary, or its polar's).
pub(crate) fn soc_margin(v: ArrayView1<'_, f64>) -> f64 {
    let (t, nx) = soc_parts(v);
    (nx - t.abs()).abs()
}

/// `(t, ||x||)` of a second-order-cone block `(t, x)`.
fn soc_parts(v: ArrayView1<'_, f64>) -> (f64, f64) {
    let t = v[0];
    let nx = v.iter().skip(1).map(|x| x * x).sum::<f64>().sqrt();
    (t, nx)
}

/// The Jacobian of the second-order-cone projection at `v`; `q` selects on a boundary (see
/// the module docs), `None` takes the piece `v` is in.
fn soc_jacobian(v: ArrayView1<'_, f64>, q: Option<f64>) -> Array2<f64> {
    let d = v.len();
    let (t, nx) = soc_parts(v);
    let identity = Array2::<f64>::eye(d);
    let outer = || {
        let mut j = Array2::<f64>::zeros((d, d));
        if nx == 0.0 {
            return j;
        }
        j[[0, 0]] = 0.5;
        for i in 1..d {
            let xi = v[i] / nx;
            j[[0, i]] = 0.5 * xi;
            j[[i, 0]] = 0.5 * xi;
            for k in 1..d {
                let xk = v[k] / nx;
                let delta = if i == k { 1.0 } else { 0.0 };
                j[[i, k]] = ((nx + t) * delta - t * xi * xk) / (2.0 * nx);
            }
        }
        j
    };
    match q {
        None => {
            if nx <= t {
                identity
            } else if nx <= -t {
                Array2::zeros((d, d))
            } else {
                outer()
            }
        }
        Some(q) => {
            if nx == 0.0 {
                // The apex: every piece meets there.
                identity * q
            } else if t >= 0.0 {
                // Outer boundary ||x|| = t: between the identity and the outside piece.
                identity * q + outer() * (1.0 - q)
            } else {
                // Inner boundary ||x|| = -t: between the outside piece and zero.
                outer() * q
            }
        }
    }
}

/// Eigenvalues (ascending) and eigenvectors (columns) of the PSD block `v` (scaled
/// vectorisation of a `k x k` symmetric matrix).
pub(crate) fn psd_eigen(v: ArrayView1<'_, f64>, k: usize) -> (Vec<f64>, Array2<f64>) {
    let _avx = clarke_core::avx::UpperStateGuard;
    let x = smat(v, k);
    let m = Mat::<f64>::from_fn(k, k, |i, j| x[[i, j]]);
    match m.self_adjoint_eigen(Side::Lower) {
        Ok(e) => {
            let s = e.S();
            let lambda: Vec<f64> = (0..k).map(|i| s[i]).collect();
            let u = e.U();
            let vecs = Array2::from_shape_fn((k, k), |(i, j)| u[(i, j)]);
            (lambda, vecs)
        }
        // Non-finite input: propagate NaN so the caller's finiteness checks see it.
        Err(_) => (vec![f64::NAN; k], Array2::from_elem((k, k), f64::NAN)),
    }
}

/// The Jacobian of the PSD projection at `v` in the scaled vectorisation:
/// `H -> U (Gamma o (U^T H U)) U^T`. With a selection `(tol, q)`, eigenvalues within `tol`
/// of zero count as zero and `Gamma_ij = q` for pairs of them; otherwise `1[lambda > 0]` on
/// ties.
fn psd_jacobian(v: ArrayView1<'_, f64>, k: usize, selection: Option<(f64, f64)>) -> Array2<f64> {
    let (lambda, u) = psd_eigen(v, k);
    let scale = lambda.iter().fold(0.0f64, |a, l| a.max(l.abs())).max(1.0);
    let zero_tol = selection.map_or(1e-12 * scale, |(tol, _)| tol.max(1e-12 * scale));
    let q = selection.map(|(_, q)| q);
    let gamma = Array2::from_shape_fn((k, k), |(i, j)| {
        let (li, lj) = (lambda[i], lambda[j]);
        let both_zero = li.abs() <= zero_tol && lj.abs() <= zero_tol;
        match (q, both_zero) {
            (Some(q), true) => q,
            _ if (li - lj).abs() > zero_tol => (li.max(0.0) - lj.max(0.0)) / (li - lj),
            _ => {
                if li > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
        }
    });
    let d = k * (k + 1) / 2;
    let mut jac = Array2::zeros((d, d));
    let mut e = Array1::<f64>::zeros(d);
    for col in 0..d {
        e.fill(0.0);
        e[col] = 1.0;
        let h = smat(e.view(), k);
        let inner = u.t().dot(&h).dot(&u) * &gamma;
        let out = u.dot(&inner).dot(&u.t());
        jac.column_mut(col).assign(&svec(&out));
    }
    jac
}

/// Scaled vectorisation of a symmetric matrix: lower triangle by columns, off-diagonal
/// entries times `sqrt(2)`. Only the lower triangle is read: the upper one of a matrix
/// that is not symmetric is ignored.
///
/// # Panics
/// When `x` is not square.
pub fn svec(x: &Array2<f64>) -> Array1<f64> {
    assert!(x.is_square(), "svec: the matrix must be square, got {:?}", x.shape());
    let k = x.nrows();
    let mut out = Vec::with_capacity(k * (k + 1) / 2);
    for j in 0..k {
        for i in j..k {
            out.push(if i == j {
                x[[i, j]]
            } else {
                x[[i, j]] * std::f64::consts::SQRT_2
            });
        }
    }
    Array1::from(out)
}

/// The symmetric `k x k` matrix of a scaled vectorisation (inverse of [`svec`]).
///
/// # Panics
/// When `v` does not have `k (k + 1) / 2` entries.
pub fn smat(v: ArrayView1<'_, f64>, k: usize) -> Array2<f64> {
    assert_eq!(
        v.len(),
        k * (k + 1) / 2,
        "smat: a {k} x {k} symmetric matrix has k (k + 1) / 2 = {} entries, got {}",
        k * (k + 1) / 2,
        v.len()
    );
    let mut x = Array2::zeros((k, k));
    let mut idx = 0;
    for j in 0..k {
        for i in j..k {
            let val = if i == j {
                v[idx]
            } else {
                v[idx] / std::f64::consts::SQRT_2
            };
            x[[i, j]] = val;
            x[[j, i]] = val;
            idx += 1;
        }
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn fd_jacobian(cones: &Cones, v: &Array1<f64>) -> Array2<f64> {
        let m = v.len();
        let h = 1e-7;
        let mut j = Array2::zeros((m, m));
        for c in 0..m {
            let (mut vp, mut vm) = (v.clone(), v.clone());
            vp[c] += h;
            vm[c] -= h;
            let (mut pp, mut pm) = (Array1::zeros(m), Array1::zeros(m));
            cones.project_dual(vp.view(), pp.view_mut());
            cones.project_dual(vm.view(), pm.view_mut());
            j.column_mut(c).assign(&((pp - pm) / (2.0 * h)));
        }
        j
    }

    #[test]
    fn jacobians_match_finite_differences_away_from_kinks() {
        let cones = Cones::new(vec![
            Cone::Zero(2),
            Cone::NonNeg(3),
            Cone::Soc(3),
            Cone::Soc(3),
            Cone::Psd(3),
        ])
        .unwrap();
        let v = array![
            0.3, -1.2, 0.7, -0.4, 1.1, 0.5, 1.0, -2.0, 2.0, 0.1, 0.2, 1.0, 0.4, -0.3, -0.8, 0.2, 0.6
        ];
        assert_eq!(v.len(), cones.dim());
        let jac = cones.dual_jacobian(v.view(), &[], &[], 0.5).to_dense();
        let fd = fd_jacobian(&cones, &v);
        let err = (&jac - &fd).iter().fold(0.0f64, |a, d| a.max(d.abs()));
        assert!(err < 1e-6, "max error {err}\n{jac:.4}\n{fd:.4}");
        // Symmetric, and a projection's Jacobian has eigenvalues in [0, 1].
        assert!((&jac - &jac.t()).iter().all(|d| d.abs() < 1e-12));
    }

    #[test]
    fn projections_land_in_the_cones_and_satisfy_moreau() {
        let cones = Cones::new(vec![Cone::Zero(1), Cone::NonNeg(2), Cone::Soc(3), Cone::Psd(2)]).unwrap();
        let v = array![0.5, -1.0, 2.0, -1.0, 0.5, 3.0, 1.0, 0.3, -2.0];
        let mut y = Array1::zeros(v.len());
        cones.project_dual(v.view(), y.view_mut());
        let s = &y - &v; // Pi_K(-v) by Moreau
        let mut s_direct = Array1::zeros(v.len());
        cones.project((-&v).view(), s_direct.view_mut());
        assert!((&s - &s_direct).iter().all(|d| d.abs() < 1e-12), "{s} vs {s_direct}");
        assert!(y.dot(&s).abs() < 1e-12);
        assert!(cones.distance_dual(y.view()) < 1e-12 && cones.distance(s.view()) < 1e-12);
        // The zero cone's dual is free: y keeps v there, s is 0 there.
        assert_eq!(y[0], 0.5);
        assert_eq!(s[0], 0.0);
    }

    #[test]
    fn selections_at_kinks_follow_the_convention() {
        let cones = Cones::new(vec![Cone::NonNeg(2), Cone::Soc(2)]).unwrap();
        // Entry 0 exactly at its kink; the SOC block on its outer boundary ||x|| = t.
        let v = array![0.0, 1.0, 1.0, 1.0];
        let b = cones.boundaries(v.view(), 1e-12);
        assert_eq!(b.len(), 2);
        assert!(b.iter().all(|b| b.exact));
        for q in [0.0, 0.3, 1.0] {
            let j = cones.dual_jacobian(v.view(), &b, &[], q).to_dense();
            assert_eq!(j[[0, 0]], q);
            assert_eq!(j[[1, 1]], 1.0);
            // q I + (1 - q) J_out with J_out = [[.5, .5], [.5, .5]] at (1, 1).
            let expect = array![[0.5 + 0.5 * q, 0.5 - 0.5 * q], [0.5 - 0.5 * q, 0.5 + 0.5 * q]];
            assert!((&j.slice(s![2.., 2..]) - &expect).iter().all(|d| d.abs() < 1e-15));
        }
    }

    #[test]
    fn blockwise_products_match_the_dense_jacobian() {
        // A zero cone (identity), a non-negative block with a kink, an SOC block (dense).
        let cones = Cones::new(vec![Cone::Zero(1), Cone::NonNeg(3), Cone::Soc(3)]).unwrap();
        let v = array![0.7, 0.0, -1.0, 2.0, 1.0, 2.0, 0.5];
        let b = cones.boundaries(v.view(), 1e-12);
        let j = cones.dual_jacobian(v.view(), &b, &[], 0.3);
        let dense = j.to_dense();
        let bm = Array2::from_shape_fn((4, 7), |(i, k)| ((5 * i + 3 * k) % 7) as f64 - 2.5);
        let mut out = Array2::from_elem((4, 7), f64::NAN);
        j.right_multiply(bm.view(), out.view_mut());
        assert!((&out - &bm.dot(&dense)).iter().all(|d| d.abs() < 1e-14));
        let mut neg = Array2::from_elem((7, 7), f64::NAN);
        j.write_negated(neg.view_mut());
        assert_eq!(neg, -&dense);
    }

    #[test]
    fn svec_is_an_isometry() {
        let x = array![[2.0, -1.0, 0.5], [-1.0, 3.0, 0.25], [0.5, 0.25, 1.0]];
        let v = svec(&x);
        assert_eq!(v.len(), 6);
        assert!((v.dot(&v) - x.iter().map(|a| a * a).sum::<f64>()).abs() < 1e-12);
        assert_eq!(smat(v.view(), 3), x);
    }

    #[test]
    fn empty_cones_are_refused() {
        let e = Cones::new(vec![Cone::NonNeg(2), Cone::Soc(0)]).unwrap_err();
        assert!(e.to_string().contains("cone 1"), "{e}");
    }
}
