//! Anderson acceleration of the DEQ's batched iterations, one sample (row) at a time.
//!
//! Every sample has its own fixed point, so every row gets its own mixing coefficients: the
//! block still costs one GEMM per iteration (the map `T` applied to all rows at once), and
//! the acceleration adds `O(m n)` per row, against the GEMM's `n^2`. One Anderson over the
//! flattened block would mix the samples' histories with shared coefficients, and its
//! least-squares problem would have `rows * n` equations.
//!
//! The form is type-II Anderson with damping 1 in its constrained form: over the last
//! `m + 1` iterates `z_j` of a row, with images `F_j = T(z_j)` and residuals
//! `G_j = F_j - z_j`, `alpha = argmin ||sum_j alpha_j G_j||^2` subject to `sum_j alpha_j = 1`,
//! and `z_{k+1} = sum_j alpha_j F_j`. In exact arithmetic these are the iterates of the
//! difference form of [`clarke_solve::anderson`]; this one keeps the images and residuals
//! themselves (the map writes straight into the history, nothing is copied), and the Gram
//! matrix `G G^T` gains one row per iteration. With `H = G G^T + lambda I` (`lambda`
//! relative to its largest diagonal entry), `alpha = H^-1 1 / (1^T H^-1 1)`; a row whose `H`
//! cannot be factored, or whose `1^T H^-1 1` is not a usable number, takes the plain step
//! `z_{k+1} = T(z_k)`.
//!
//! The stopping rule and the returned iterate are Picard's, per sample: a row's change is
//! `||T(z_k) - z_k||` over its own scale, a row whose change meets the tolerance is done and
//! leaves with `T(z_k)`, the image of its last iterate measured, and the next iterations skip
//! it (its history rows are swapped behind the active ones, as in the Picard and Neumann
//! blocks). The block stops when every row is done; under a fixed count every row runs it.

use clarke_core::Scalar;
use clarke_core::avx::{has_avx2_fma, with_avx2};
use clarke_core::gemm::dot;
use clarke_solve::FixedPointOptions;
use ndarray::{Array2, ArrayView2, ArrayViewMut2, s};

use super::kernel::{ActiveRows, BlockRun, Budget, LANES, lane_sum, swap_chunks, swap_rows, worst};

/// Runs Anderson with memory `memory` (mixing the last `memory + 1` iterates) on a row
/// block, each row stopping on its own.
///
/// `consts` are the map's per-row data (an input term, a right-hand side, a derivative
/// mask), one row per row of `z`: they are kept in the order of the active rows.
/// `map(z, consts, out)` writes `T(z)` for the rows given (the active ones, with their
/// rows of `consts`); `scale(i, t2)` is the denominator of block row `i`'s change given the
/// squared norm `t2` of its `T(z)` row. `z` holds the start and receives each row's last
/// image.
pub(crate) fn anderson_rows<S: Scalar, const K: usize>(
    z: ArrayViewMut2<'_, S>,
    mut consts: [Array2<S>; K],
    memory: usize,
    budget: Budget,
    mut map: impl FnMut(ArrayView2<'_, S>, [ArrayView2<'_, S>; K], ArrayViewMut2<'_, S>),
    scale: impl Fn(usize, f64) -> f64,
) -> BlockRun {
    let mut zc = z.as_standard_layout().into_owned();
    let (rows, n) = zc.dim();
    let mut history = History::new(memory + 1, rows, n);
    let mut active = ActiveRows::new(rows);
    let mut run = BlockRun::default();
    while run.iterations < budget.max_iter && active.active > 0 {
        let (m, slot) = (active.active, history.next);
        map(
            zc.slice(s![..m, ..]),
            consts.each_ref().map(|c| c.slice(s![..m, ..])),
            history.image_mut(slot, m),
        );
        let change = with_avx2(
            #[inline(always)]
            || {
                // Rows of the compact arrays (a width of 0 has no rows to iterate).
                let zs = zc.as_slice_mut().expect("compact").chunks_exact_mut(n.max(1));
                let mut change = 0.0f64;
                for (k, zr) in zs.take(m).enumerate() {
                    let (t, g) = history.row_pair_mut(slot, k);
                    let (d2, t2) = residual_row(g, zr, t);
                    let r = d2.sqrt() / scale(active.order[k], t2);
                    if active.note(k, r, budget) {
                        zr.copy_from_slice(t);
                    }
                    change = worst(change, r);
                }
                change
            },
        );
        let done = active.retire(|i, j| {
            swap_rows(&mut zc, i, j);
            for c in &mut consts {
                swap_rows(c, i, j);
            }
            history.swap_rows(i, j);
        });
        if run.record(worst(change, done), budget) || run.iterations >= budget.max_iter {
            // The rows still active leave with their last image too.
            let m = active.active;
            zc.as_slice_mut().expect("compact")[..m * n].copy_from_slice(&history.image(slot)[..m * n]);
            break;
        }
        history.commit(slot, active.active);
        let m = active.active;
        with_avx2(
            #[inline(always)]
            || history.mix(&mut zc.as_slice_mut().expect("compact")[..m * n], m),
        );
    }
    active.scatter(&zc, z);
    run
}

/// `g = t - z` for one row; returns `||g||^2` and `||t||^2` in f64. With AVX2 and FMA in a
/// frame of its own, over fixed-size chunks (as the Picard and Neumann row passes in
/// `kernel.rs`, and for the same reasons).
#[inline(always)]
fn residual_row<S: Scalar>(g: &mut [S], z: &[S], t: &[S]) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (tested above).
        return unsafe { residual_row_avx2(g, z, t) };
    }
    residual_row_body(g, z, t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
unsafe fn residual_row_avx2<S: Scalar>(g: &mut [S], z: &[S], t: &[S]) -> (f64, f64) {
    residual_row_body(g, z, t)
}

#[inline(always)]
fn residual_row_body<S: Scalar>(g: &mut [S], z: &[S], t: &[S]) -> (f64, f64) {
    let n = g.len();
    let (z, t) = (&z[..n], &t[..n]);
    let mut d2 = [S::zero(); LANES];
    let mut t2 = [S::zero(); LANES];
    let mut gc = g.chunks_exact_mut(LANES);
    let mut zc = z.chunks_exact(LANES);
    let mut tc = t.chunks_exact(LANES);
    for ((g8, z8), t8) in (&mut gc).zip(&mut zc).zip(&mut tc) {
        let g8: &mut [S; LANES] = g8.try_into().expect("a chunk of LANES");
        let z8: &[S; LANES] = z8.try_into().expect("a chunk of LANES");
        let t8: &[S; LANES] = t8.try_into().expect("a chunk of LANES");
        for k in 0..LANES {
            let d = t8[k] - z8[k];
            g8[k] = d;
            d2[k] += d * d;
            t2[k] += t8[k] * t8[k];
        }
    }
    let (mut d2_tail, mut t2_tail) = (S::zero(), S::zero());
    for ((gv, &zv), &tv) in gc.into_remainder().iter_mut().zip(zc.remainder()).zip(tc.remainder()) {
        let d = tv - zv;
        *gv = d;
        d2_tail += d * d;
        t2_tail += tv * tv;
    }
    (
        (lane_sum(d2) + d2_tail).to_f64_exact(),
        (lane_sum(t2) + t2_tail).to_f64_exact(),
    )
}

/// The last `slots` images and residuals of each row, and their Gram matrices.
///
/// The Gram matrices and the mixing's small solves are laid out row-innermost
/// (`[a][b][row]`): one Cholesky factorisation per row would be a chain of dependent square
/// roots and divisions, while the same steps over all rows at once are elementwise loops
/// that vectorise.
struct History<S> {
    slots: usize,
    rows: usize,
    n: usize,
    /// `F_j` per slot, slot-major: row `i` of slot `j` at `(j * rows + i) * n`.
    images: Vec<S>,
    /// `G_j` per slot, laid out as `images`.
    residuals: Vec<S>,
    /// `G_a . G_b` of row `i` at `(a * slots + b) * rows + i`, in f64.
    gram: Vec<f64>,
    /// Slots holding an iterate, and the slot the next one goes to.
    stored: usize,
    next: usize,
    /// The regularisation of the Gram matrix, relative to its largest diagonal entry: the
    /// default of [`FixedPointOptions::regularization`], as for every Anderson of the project.
    regularization: f64,
    /// Scratch of the batched solves: the factors (`[a][b][row]`, `k x k` used), the
    /// coefficients (`[a][row]`), per-row scalars, and whether a row's coefficients are usable.
    factor: Vec<f64>,
    alpha: Vec<f64>,
    per_row: Vec<f64>,
    usable: Vec<bool>,
}

impl<S: Scalar> History<S> {
    fn new(slots: usize, rows: usize, n: usize) -> Self {
        History {
            slots,
            rows,
            n,
            images: vec![S::zero(); slots * rows * n],
            residuals: vec![S::zero(); slots * rows * n],
            gram: vec![0.0; slots * slots * rows],
            stored: 0,
            next: 0,
            regularization: FixedPointOptions::default().regularization,
            factor: vec![0.0; slots * slots * rows],
            alpha: vec![0.0; slots * rows],
            per_row: vec![0.0; rows],
            usable: vec![false; rows],
        }
    }

    /// Row `i` of slot `slot` in a slot-major store.
    #[inline(always)]
    fn at(&self, slot: usize, i: usize) -> std::ops::Range<usize> {
        let start = (slot * self.rows + i) * self.n;
        start..start + self.n
    }

    /// The first `m` rows of slot `slot`'s images, as a block the map writes into.
    fn image_mut(&mut self, slot: usize, m: usize) -> ArrayViewMut2<'_, S> {
        let start = slot * self.rows * self.n;
        ArrayViewMut2::from_shape((m, self.n), &mut self.images[start..start + m * self.n])
            .expect("a slot holds rows x n values")
    }

    /// The images of slot `slot`, flat.
    fn image(&self, slot: usize) -> &[S] {
        let len = self.rows * self.n;
        &self.images[slot * len..(slot + 1) * len]
    }

    /// Row `i`'s image (read) and residual (written) in slot `slot`.
    #[inline(always)]
    fn row_pair_mut(&mut self, slot: usize, i: usize) -> (&[S], &mut [S]) {
        let r = self.at(slot, i);
        (&self.images[r.clone()], &mut self.residuals[r])
    }

    /// Swaps rows `i` and `j` in every slot: images, residuals and Gram entries.
    fn swap_rows(&mut self, i: usize, j: usize) {
        for slot in 0..self.slots {
            let base = slot * self.rows;
            swap_chunks(&mut self.images, self.n, base + i, base + j);
            swap_chunks(&mut self.residuals, self.n, base + i, base + j);
        }
        for ab in 0..self.slots * self.slots {
            self.gram.swap(ab * self.rows + i, ab * self.rows + j);
        }
    }

    /// Takes the iterate in `slot` into the history for the first `active` rows: their Gram
    /// entries with every stored residual, then the next slot.
    fn commit(&mut self, slot: usize, active: usize) {
        self.stored = (self.stored + 1).min(self.slots);
        let (m, rows) = (self.slots, self.rows);
        for i in 0..active {
            let new = &self.residuals[self.at(slot, i)];
            for j in 0..self.stored {
                let h = dot(new, &self.residuals[self.at(j, i)]);
                self.gram[(slot * m + j) * rows + i] = h;
                self.gram[(j * m + slot) * rows + i] = h;
            }
        }
        self.next = (slot + 1) % self.slots;
    }

    /// Writes the next iterate of each of the first `active` rows into `z` (theirs, in
    /// order), `sum_j alpha_j F_j` (or the last image).
    #[inline(always)]
    fn mix(&mut self, z: &mut [S], active: usize) {
        let (k, n, rows) = (self.stored, self.n, self.rows);
        let last = (self.next + self.slots - 1) % self.slots;
        if k >= 2 {
            self.coefficients(k, active);
        } else {
            self.usable.fill(false);
        }
        for i in 0..active {
            let zr = &mut z[i * n..(i + 1) * n];
            if !self.usable[i] {
                zr.copy_from_slice(&self.images[self.at(last, i)]);
                continue;
            }
            zr.fill(S::zero());
            for j in 0..k {
                let a = S::from_f64_lossy(self.alpha[j * rows + i]);
                for (zv, &f) in zr.iter_mut().zip(&self.images[self.at(j, i)]) {
                    *zv += a * f;
                }
            }
        }
    }

    /// The mixing coefficients of each of the first `active` rows over the first `k` slots,
    /// `alpha = y / sum(y)` with `(G G^T + lambda I) y = 1`, into `self.alpha` (`[a][row]`),
    /// and whether they are usable into `self.usable`: not when the row's residuals are all
    /// zero (the plain step is the fixed point), its matrix does not factor, or `sum(y)` is
    /// zero or not finite.
    #[inline(always)]
    fn coefficients(&mut self, k: usize, active: usize) {
        let (m, rows, regularization) = (self.slots, self.rows, self.regularization);
        let (gram, f, y, lambda, ok) = (
            &self.gram,
            &mut self.factor,
            &mut self.alpha,
            &mut self.per_row,
            &mut self.usable,
        );
        let idx = |a: usize, b: usize| (a * m + b) * rows;
        // lambda = regularization * the largest diagonal entry.
        lambda.fill(0.0);
        for j in 0..k {
            let d = &gram[idx(j, j)..idx(j, j) + active];
            for (l, &v) in lambda.iter_mut().zip(d) {
                *l = l.max(v);
            }
        }
        for (o, l) in ok.iter_mut().zip(lambda.iter_mut()) {
            *o = *l > 0.0 && l.is_finite();
            *l *= regularization;
        }
        // Cholesky, lower triangle, all rows at once.
        // Column j: the entries below the diagonal start as the Gram entries and are
        // finished here; those left of the diagonal in row j were finished at their columns.
        for j in 0..k {
            let dj = idx(j, j);
            for r in 0..active {
                f[dj + r] = gram[dj + r] + lambda[r];
            }
            for p in 0..j {
                let jp = idx(j, p);
                for r in 0..active {
                    f[dj + r] -= f[jp + r] * f[jp + r];
                }
            }
            for r in 0..active {
                let d = f[dj + r];
                ok[r] &= d > 0.0 && d.is_finite();
                // A row that failed keeps going on a harmless pivot; its result is discarded.
                f[dj + r] = if d > 0.0 && d.is_finite() { d.sqrt() } else { 1.0 };
            }
            for i in j + 1..k {
                let ij = idx(i, j);
                f[ij..ij + active].copy_from_slice(&gram[ij..ij + active]);
                for p in 0..j {
                    let (ip, jp) = (idx(i, p), idx(j, p));
                    for r in 0..active {
                        f[ij + r] -= f[ip + r] * f[jp + r];
                    }
                }
                for r in 0..active {
                    f[ij + r] /= f[dj + r];
                }
            }
        }
        // L L^T y = 1.
        for i in 0..k {
            let yi = i * rows;
            y[yi..yi + active].fill(1.0);
            for p in 0..i {
                let (ip, yp) = (idx(i, p), p * rows);
                for r in 0..active {
                    y[yi + r] -= f[ip + r] * y[yp + r];
                }
            }
            let ii = idx(i, i);
            for r in 0..active {
                y[yi + r] /= f[ii + r];
            }
        }
        for i in (0..k).rev() {
            let yi = i * rows;
            for p in i + 1..k {
                let (pi, yp) = (idx(p, i), p * rows);
                for r in 0..active {
                    y[yi + r] -= f[pi + r] * y[yp + r];
                }
            }
            let ii = idx(i, i);
            for r in 0..active {
                y[yi + r] /= f[ii + r];
            }
        }
        // alpha = y / sum(y).
        lambda.fill(0.0);
        for j in 0..k {
            for (t, &v) in lambda.iter_mut().zip(&y[j * rows..j * rows + active]) {
                *t += v;
            }
        }
        for j in 0..k {
            for ((v, &t), o) in y[j * rows..j * rows + active]
                .iter_mut()
                .zip(lambda.iter())
                .zip(ok.iter_mut())
            {
                *v /= t;
                *o &= v.is_finite();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `T_i(z) = A z + c_i`, row by row.
    fn affine_map(
        a: &Array2<f64>,
    ) -> impl Fn(ArrayView2<'_, f64>, [ArrayView2<'_, f64>; 1], ArrayViewMut2<'_, f64>) + '_ {
        move |z, [c], mut out| out.assign(&(z.dot(&a.t()) + c))
    }

    fn budget(tol: f64, max_iter: usize) -> Budget {
        Budget {
            tol,
            max_iter,
            fixed: false,
        }
    }

    fn scale(_: usize, t2: f64) -> f64 {
        t2.sqrt().max(1.0)
    }

    /// On an affine contraction per row, Anderson reaches the fixed point in far fewer
    /// iterations than Picard, row by row, and both stop at the same point.
    #[test]
    fn rows_reach_their_own_fixed_points_faster_than_picard() {
        let n = 12;
        // T_i(z) = A z + c_i, A symmetric tridiagonal with eigenvalues 0.95 cos(pi k / (n + 1)).
        let a = Array2::from_shape_fn((n, n), |(i, j)| if i.abs_diff(j) == 1 { 0.475 } else { 0.0 });
        let c = Array2::from_shape_fn((3, n), |(i, j)| (i as f64 + 1.0) * ((j as f64) * 0.7).sin());
        let map = affine_map(&a);
        let mut za = Array2::<f64>::zeros((3, n));
        let ra = anderson_rows(za.view_mut(), [c.clone()], 5, budget(1e-12, 2000), &map, scale);
        let mut zp = Array2::<f64>::zeros((3, n));
        let rp = anderson_rows(zp.view_mut(), [c.clone()], 0, budget(1e-12, 2000), &map, scale);
        assert!(
            ra.residual <= 1e-12 && rp.residual <= 1e-12,
            "{} {}",
            ra.residual,
            rp.residual
        );
        assert!(
            3 * ra.iterations < rp.iterations,
            "anderson {} vs picard {}",
            ra.iterations,
            rp.iterations
        );
        // The exact solution: (I - A) z_i = c_i.
        let mut fixed = za.clone();
        map(za.view(), [c.view()], fixed.view_mut());
        assert!((&fixed - &za).iter().all(|d| d.abs() < 1e-10));
        assert!((&za - &zp).iter().all(|d| d.abs() < 1e-10));
    }

    /// A row already at its fixed point has zero residuals: it is done after the first
    /// iteration and stays put (no NaN from a mixing of zero residuals), while the other rows
    /// converge.
    #[test]
    fn a_row_at_its_fixed_point_is_done_at_once() {
        let n = 8;
        let a = Array2::from_shape_fn((n, n), |(i, j)| if i.abs_diff(j) == 1 { 0.45 } else { 0.0 });
        let mut c = Array2::from_shape_fn((2, n), |(_, j)| (j as f64 * 0.3).cos());
        c.row_mut(0).fill(0.0); // T_0(z) = A z: 0 is its fixed point
        let map = affine_map(&a);
        let mut z = Array2::<f64>::zeros((2, n));
        let run = anderson_rows(z.view_mut(), [c.clone()], 4, budget(1e-12, 500), &map, scale);
        assert!(run.residual <= 1e-12 && !run.non_finite, "{run:?}");
        assert!(z.row(0).iter().all(|&v| v == 0.0), "{:?}", z.row(0));
        let mut image = z.clone();
        map(z.view(), [c.view()], image.view_mut());
        assert!((&image - &z).iter().all(|d| d.abs() < 1e-11));
    }

    /// Every row stops at its own tolerance: each row of the block equals that sample run
    /// alone (its history, coefficients and stopping are its own), the samples take
    /// different counts, and the block's count is the largest. The rows converge out of
    /// order, so the compact arrays are permuted before they are scattered back.
    #[test]
    fn samples_stop_on_their_own() {
        let n = 10;
        let a = Array2::from_shape_fn((n, n), |(i, j)| if i.abs_diff(j) == 1 { 0.47 } else { 0.0 });
        // Row scales from 1e-9 to 10: the small rows meet the tolerance much earlier.
        let scales = [10.0, 1e-9, 1.0, 1e-6, 3.0];
        let c = Array2::from_shape_fn((scales.len(), n), |(i, j)| {
            scales[i] * ((j as f64 + i as f64) * 0.9).sin()
        });
        let map = affine_map(&a);
        let tol = 1e-9;
        let mut block = Array2::<f64>::zeros(c.raw_dim());
        let run = anderson_rows(block.view_mut(), [c.clone()], 3, budget(tol, 500), &map, scale);
        assert!(run.residual <= tol, "{run:?}");
        let mut counts = Vec::new();
        for (i, &row_scale) in scales.iter().enumerate() {
            let ci = c.slice(s![i..i + 1, ..]).to_owned();
            let mut alone = Array2::<f64>::zeros((1, n));
            let r = anderson_rows(alone.view_mut(), [ci], 3, budget(tol, 500), &map, scale);
            counts.push(r.iterations);
            let diff = (&alone.row(0) - &block.row(i))
                .iter()
                .fold(0.0f64, |m, d| m.max(d.abs()));
            assert!(diff <= 1e-13 * row_scale.max(1.0), "row {i}: {diff}");
        }
        assert_eq!(run.iterations, *counts.iter().max().unwrap(), "{counts:?}");
        assert!(counts.iter().min() < counts.iter().max(), "{counts:?}");
        // Under a fixed count every row runs the whole count.
        let fixed = Budget {
            tol,
            max_iter: 7,
            fixed: true,
        };
        let mut all = Array2::<f64>::zeros(c.raw_dim());
        let run = anderson_rows(all.view_mut(), [c.clone()], 3, fixed, &map, scale);
        assert_eq!(run.iterations, 7);
        let mut alone = Array2::<f64>::zeros((1, n));
        anderson_rows(
            alone.view_mut(),
            [c.slice(s![1..2, ..]).to_owned()],
            3,
            fixed,
            &map,
            scale,
        );
        let diff = (&alone.row(0) - &all.row(1)).iter().fold(0.0f64, |m, d| m.max(d.abs()));
        assert!(diff <= 1e-22, "{diff}");
    }
}
