//! The fused batched kernels of the DEQ cell `z = sigma(z W^T + c)`, `c = x U^T + b`.
//!
//! Rows are samples. Each sample has its own fixed point and `J_z` is block diagonal
//! (`diag(sigma'(p_i)) W` for sample `i`), so the batch is cut into one row block per thread
//! and every block runs its whole solve (forward or adjoint) on its own core with sequential
//! GEMMs: no synchronisation per iteration, and each GEMM is large enough to run near peak.

use clarke_core::avx::{has_avx2_fma, with_avx2};
use clarke_core::{Error, Result, Scalar};
use faer::{Accum, Par};
use faer_ext::IntoFaer;
use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis, Zip, s};

use super::Activation;

/// `W^T` in standard (row-major) layout, copied once for a solve's many products `z W^T`:
/// faer multiplies by a row-major right operand 12 to 20% faster than by the column-major
/// view `W.t()` at the DEQ's block shapes (32 x 128 by 128 x 128, measured), as it then
/// needs no repacking of it at every product.
pub(crate) fn transposed<S: Scalar>(w: ArrayView2<'_, S>) -> Array2<S> {
    w.t().as_standard_layout().into_owned()
}

/// Sequential `c = a b` (or `c += a b`) on one core.
pub(crate) fn gemm_seq<S: Scalar>(
    a: ArrayView2<'_, S>,
    b: ArrayView2<'_, S>,
    accumulate: bool,
    c: ArrayViewMut2<'_, S>,
) {
    if c.is_empty() {
        return;
    }
    let accum = if accumulate { Accum::Add } else { Accum::Replace };
    faer::linalg::matmul::matmul(c.into_faer(), accum, a.into_faer(), b.into_faer(), S::one(), Par::Seq);
    clarke_core::avx::clear_upper_state();
}

/// Row blocks for the threads: one per thread when the batch is worth splitting.
pub(crate) fn row_blocks(rows: usize, n: usize) -> Vec<(usize, usize)> {
    let threads = rayon::current_num_threads().max(1);
    // Below ~2^17 multiply-adds per product a second thread costs more than it saves.
    let parts = if rows * n * n < (1 << 17) || rows < 2 * threads {
        1
    } else {
        threads
    };
    let per = rows.div_ceil(parts);
    (0..parts)
        .map(|p| (p * per, ((p + 1) * per).min(rows)))
        .filter(|(a, b)| a < b)
        .collect()
}

/// Multiply-adds from which one GEMM of a step is split over the threads.
///
/// Waking the pool's other threads for a parallel region costs tens of microseconds here;
/// a single product below this size (about a hundred microseconds on one core) loses more
/// to the hand-off than it gains. A solve is one region for all of its iterations, so
/// [`row_blocks`] splits at far smaller products.
const SINGLE_GEMM_PARALLEL_MACS: usize = 1 << 22;

/// Row blocks for one GEMM of `rows x inner` by `inner x cols`: one per thread only when
/// the product pays for the hand-off (see [`SINGLE_GEMM_PARALLEL_MACS`]).
pub(crate) fn gemm_row_blocks(rows: usize, inner: usize, cols: usize) -> Vec<(usize, usize)> {
    if rows == 0 {
        Vec::new()
    } else if rows.saturating_mul(inner).saturating_mul(cols) < SINGLE_GEMM_PARALLEL_MACS {
        vec![(0, rows)]
    } else {
        row_blocks(rows, cols.max(inner))
    }
}

/// How many iterations to run and when to stop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    /// Relative residual at which a block stops (ignored when `fixed`).
    pub tol: f64,
    /// Iteration cap (or the exact count when `fixed`).
    pub max_iter: usize,
    /// Run exactly `max_iter` iterations, whatever the residual.
    pub fixed: bool,
}

/// What one block's iteration did.
#[derive(Debug, Clone, Default)]
pub(crate) struct BlockRun {
    pub iterations: usize,
    /// Largest per-sample relative residual of the last iteration.
    pub residual: f64,
    /// Residual after each iteration.
    pub trace: Vec<f64>,
    /// The residual stopped being finite.
    pub non_finite: bool,
}

impl BlockRun {
    /// Records one iteration's change; `true` when the iteration should stop (a non-finite
    /// change, or the tolerance reached without a fixed count).
    pub(crate) fn record(&mut self, change: f64, budget: Budget) -> bool {
        self.iterations += 1;
        self.residual = change;
        self.trace.push(change);
        if !change.is_finite() {
            self.non_finite = true;
            return true;
        }
        !budget.fixed && change <= budget.tol
    }
}

/// Merges block runs: the batch took as long as its slowest block and is as far from
/// converged as its worst sample.
pub(crate) fn merge(runs: Vec<BlockRun>) -> BlockRun {
    let mut out = BlockRun::default();
    for r in runs {
        out.iterations = out.iterations.max(r.iterations);
        out.residual = if r.residual.is_nan() {
            f64::NAN
        } else {
            out.residual.max(r.residual)
        };
        out.non_finite |= r.non_finite;
        if r.trace.len() > out.trace.len() {
            out.trace.resize(r.trace.len(), 0.0);
        }
        for (t, v) in out.trace.iter_mut().zip(r.trace) {
            *t = t.max(v);
        }
    }
    out
}

/// Lanes of the row passes: eight accumulators per reduction, two AVX2 vectors of `f64`
/// (one of `f32`), so that the adds of consecutive chunks do not wait on each other.
pub(crate) const LANES: usize = 8;

/// Sums the lanes of an accumulator in a fixed order.
///
/// The accumulator passes through [`black_box`](std::hint::black_box) first: LLVM otherwise
/// shapes the loop's accumulators after this sum's pairing and splits each vector add into
/// shuffles and half-width adds. Behind the barrier they stay whole vectors; the barrier
/// costs one store of the lanes per row.
#[inline(always)]
pub(crate) fn lane_sum<S: Scalar>(a: [S; LANES]) -> S {
    let a = std::hint::black_box(a);
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// One row of the fused forward pass: `z_j <- f(p_j + c_j, z_j)`, returning the sums of
/// `(z_new - z_old)^2` and `z_new^2`.
///
/// The body runs over fixed-size chunks (`&[S; LANES]`): every index is then in bounds by
/// type, and the compiler turns each chunk's lanes into vector instructions. With slices
/// indexed in a loop it kept bounds checks and left the pass scalar.
///
/// With AVX2 and FMA it runs in a frame of its own compiled for them (see
/// [`with_avx2`](clarke_core::avx::with_avx2) for why a frame of its own).
#[inline(always)]
fn forward_row<S: Scalar>(z: &mut [S], p: &[S], c: &[S], f: impl Fn(S, S) -> S) -> (S, S) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (tested above).
        return unsafe { forward_row_avx2(z, p, c, f) };
    }
    forward_row_body(z, p, c, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
unsafe fn forward_row_avx2<S: Scalar>(z: &mut [S], p: &[S], c: &[S], f: impl Fn(S, S) -> S) -> (S, S) {
    forward_row_body(z, p, c, f)
}

#[inline(always)]
fn forward_row_body<S: Scalar>(z: &mut [S], p: &[S], c: &[S], f: impl Fn(S, S) -> S) -> (S, S) {
    let n = z.len();
    let (p, c) = (&p[..n], &c[..n]);
    let mut d2 = [S::zero(); LANES];
    let mut n2 = [S::zero(); LANES];
    let mut zc = z.chunks_exact_mut(LANES);
    let mut pc = p.chunks_exact(LANES);
    let mut cc = c.chunks_exact(LANES);
    for ((z8, p8), c8) in (&mut zc).zip(&mut pc).zip(&mut cc) {
        let z8: &mut [S; LANES] = z8.try_into().expect("a chunk of LANES");
        let p8: &[S; LANES] = p8.try_into().expect("a chunk of LANES");
        let c8: &[S; LANES] = c8.try_into().expect("a chunk of LANES");
        for k in 0..LANES {
            let v = f(p8[k] + c8[k], z8[k]);
            let d = v - z8[k];
            d2[k] += d * d;
            n2[k] += v * v;
            z8[k] = v;
        }
    }
    // The tail has sums of its own: folded into the lanes, it would tie them together.
    let (mut d2_tail, mut n2_tail) = (S::zero(), S::zero());
    for ((zz, &pp), &cv) in zc.into_remainder().iter_mut().zip(pc.remainder()).zip(cc.remainder()) {
        let v = f(pp + cv, *zz);
        let d = v - *zz;
        d2_tail += d * d;
        n2_tail += v * v;
        *zz = v;
    }
    (lane_sum(d2) + d2_tail, lane_sum(n2) + n2_tail)
}

/// One row of the fused adjoint pass: `w_new = q + g` (with `q = (w o d) W` from the GEMM),
/// returns the sum of `(w_new - w)^2`, writes `w <- w_new` and `t <- w_new o d`. Fixed-size
/// chunks, as in [`forward_row`].
#[inline(always)]
fn adjoint_row<S: Scalar>(w: &mut [S], t: &mut [S], q: &[S], g: &[S], d: &[S]) -> S {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (tested above).
        return unsafe { adjoint_row_avx2(w, t, q, g, d) };
    }
    adjoint_row_body(w, t, q, g, d)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
unsafe fn adjoint_row_avx2<S: Scalar>(w: &mut [S], t: &mut [S], q: &[S], g: &[S], d: &[S]) -> S {
    adjoint_row_body(w, t, q, g, d)
}

#[inline(always)]
fn adjoint_row_body<S: Scalar>(w: &mut [S], t: &mut [S], q: &[S], g: &[S], d: &[S]) -> S {
    let n = w.len();
    let (t, q, g, d) = (&mut t[..n], &q[..n], &g[..n], &d[..n]);
    let mut d2 = [S::zero(); LANES];
    let mut wc = w.chunks_exact_mut(LANES);
    let mut tc = t.chunks_exact_mut(LANES);
    let mut qc = q.chunks_exact(LANES);
    let mut gc = g.chunks_exact(LANES);
    let mut dc = d.chunks_exact(LANES);
    for ((((w8, t8), q8), g8), d8) in (&mut wc).zip(&mut tc).zip(&mut qc).zip(&mut gc).zip(&mut dc) {
        let w8: &mut [S; LANES] = w8.try_into().expect("a chunk of LANES");
        let t8: &mut [S; LANES] = t8.try_into().expect("a chunk of LANES");
        let q8: &[S; LANES] = q8.try_into().expect("a chunk of LANES");
        let g8: &[S; LANES] = g8.try_into().expect("a chunk of LANES");
        let d8: &[S; LANES] = d8.try_into().expect("a chunk of LANES");
        for k in 0..LANES {
            let v = q8[k] + g8[k];
            let diff = v - w8[k];
            d2[k] += diff * diff;
            w8[k] = v;
            t8[k] = v * d8[k];
        }
    }
    let rest = wc.into_remainder().iter_mut().zip(tc.into_remainder());
    let mut d2_tail = S::zero();
    for ((((wv, tv), &qv), &gv), &dv) in rest.zip(qc.remainder()).zip(gc.remainder()).zip(dc.remainder()) {
        let v = qv + gv;
        let diff = v - *wv;
        d2_tail += diff * diff;
        *wv = v;
        *tv = v * dv;
    }
    lane_sum(d2) + d2_tail
}

/// Folds a row's relative change into the block's worst, keeping NaN visible.
#[inline(always)]
pub(crate) fn worst(change: f64, r: f64) -> f64 {
    if r.is_nan() || change.is_nan() {
        f64::NAN
    } else {
        change.max(r)
    }
}

/// The samples of a row block that still iterate. Each sample has its own fixed point, so a
/// sample whose change meets the tolerance is done: it is swapped behind the active rows of
/// the block's compact arrays and the next products skip it, while the others go on. The
/// block's products then cost what its active samples need, not what its slowest sample
/// needs (on the digits run a quarter of the row updates were of samples already done).
pub(crate) struct ActiveRows {
    /// `order[k]`: the block row held at compact position `k`.
    pub(crate) order: Vec<usize>,
    /// How many compact rows, from the first, still iterate.
    pub(crate) active: usize,
    /// The largest final change of the samples done (their residual in the block's report).
    done_worst: f64,
    /// Compact positions that met the tolerance this iteration, increasing.
    converged: Vec<usize>,
}

impl ActiveRows {
    pub(crate) fn new(rows: usize) -> Self {
        ActiveRows {
            order: (0..rows).collect(),
            active: rows,
            done_worst: 0.0,
            converged: Vec::new(),
        }
    }

    /// Notes the change `r` of the active compact row `k`: when it meets the budget's
    /// tolerance (never under a fixed count) the sample is done, and its change is its final
    /// one. Returns whether it is done.
    #[inline(always)]
    pub(crate) fn note(&mut self, k: usize, r: f64, budget: Budget) -> bool {
        let done = !budget.fixed && r <= budget.tol;
        if done {
            self.converged.push(k);
            self.done_worst = worst(self.done_worst, r);
        }
        done
    }

    /// Retires the rows marked this iteration: each is swapped (by `swap(a, b)` on every
    /// compact array) with the last active row. Returns the worst change of every sample
    /// done so far, for the block's residual.
    pub(crate) fn retire(&mut self, mut swap: impl FnMut(usize, usize)) -> f64 {
        // From the highest position down: the last active row is then never one still to
        // be retired.
        while let Some(k) = self.converged.pop() {
            let last = self.active - 1;
            if k != last {
                swap(k, last);
                self.order.swap(k, last);
            }
            self.active = last;
        }
        self.done_worst
    }

    /// Writes the compact rows back to their places in `out`.
    pub(crate) fn scatter<S: Scalar>(&self, compact: &Array2<S>, mut out: ArrayViewMut2<'_, S>) {
        for (k, &row) in self.order.iter().enumerate() {
            out.row_mut(row).assign(&compact.row(k));
        }
    }
}

/// Swaps rows `i` and `j` of a standard-layout matrix.
pub(crate) fn swap_rows<S: Scalar>(a: &mut Array2<S>, i: usize, j: usize) {
    let n = a.ncols();
    swap_chunks(a.as_slice_mut().expect("a compact array is standard layout"), n, i, j);
}

/// Swaps the `n`-element chunks `i` and `j` of `data`.
pub(crate) fn swap_chunks<S>(data: &mut [S], n: usize, i: usize, j: usize) {
    if i == j {
        return;
    }
    let (lo, hi) = (i.min(j), i.max(j));
    let (head, tail) = data.split_at_mut(hi * n);
    head[lo * n..(lo + 1) * n].swap_with_slice(&mut tail[..n]);
}

/// The forward iteration of one row block: plain Picard `z <- sigma(z W^T + c)`, or the
/// forward-backward splitting of a monotone relu cell `z <- relu((1 - a) z + a (z W^T + c))`
/// when `relax = Some(a)`. `z` holds the start and receives the last iterate.
///
/// Per iteration: one GEMM and one fused pass that adds `c`, applies the activation, measures
/// each row's change and writes the new iterate.
///
/// `w_t` is `W^T`, best in standard layout (see [`transposed`]).
pub(crate) fn picard_block<S: Scalar>(
    w_t: ArrayView2<'_, S>,
    c: ArrayView2<'_, S>,
    z: ArrayViewMut2<'_, S>,
    act: Activation,
    relax: Option<f64>,
    budget: Budget,
) -> BlockRun {
    let mut zc = z.as_standard_layout().into_owned();
    let mut cc = c.as_standard_layout().into_owned();
    let mut pre = Array2::<S>::zeros(c.raw_dim());
    let mut rows = ActiveRows::new(zc.nrows());
    let mut run = BlockRun::default();
    let (a, keep) = relax.map_or((S::one(), S::zero()), |a| {
        (S::from_f64_lossy(a), S::from_f64_lossy(1.0 - a))
    });
    let zero = S::zero();
    while run.iterations < budget.max_iter && rows.active > 0 {
        let m = rows.active;
        gemm_seq(zc.slice(s![..m, ..]), w_t, false, pre.slice_mut(s![..m, ..]));
        let change = with_avx2(
            #[inline(always)]
            || {
                let mut change = 0.0f64;
                // Rows of the compact arrays (a width of 0 has no rows to iterate).
                let n = zc.ncols().max(1);
                let zs = zc.as_slice_mut().expect("compact").chunks_exact_mut(n);
                let ps = pre.as_slice().expect("compact").chunks_exact(n);
                let cs = cc.as_slice().expect("compact").chunks_exact(n);
                for (k, ((zs, ps), cs)) in zs.zip(ps).zip(cs).take(m).enumerate() {
                    // `move`: the maps own their constants. Captured by reference, the
                    // compiler could not rule out that the row's stores change them, reloaded
                    // them per element and left the pass scalar.
                    let (d2, n2) = match (act, relax.is_some()) {
                        (Activation::Relu, false) => {
                            forward_row(zs, ps, cs, move |p, _| if p > zero { p } else { zero })
                        }
                        (Activation::Relu, true) => forward_row(zs, ps, cs, move |p, old| {
                            let r = keep * old + a * p;
                            if r > zero { r } else { zero }
                        }),
                        _ => forward_row(zs, ps, cs, move |p, _| act.value(p)),
                    };
                    let r = d2.to_f64_exact().sqrt() / n2.to_f64_exact().sqrt().max(1.0);
                    rows.note(k, r, budget);
                    change = worst(change, r);
                }
                change
            },
        );
        let done = rows.retire(|i, j| {
            swap_rows(&mut zc, i, j);
            swap_rows(&mut cc, i, j);
        });
        if run.record(worst(change, done), budget) {
            break;
        }
    }
    rows.scatter(&zc, z);
    run
}

/// `R^T` for the resolvent `R = (I + alpha (I - W))^-1` of the monotone operator
/// `z -> (I - W) z - c`, row-major, so that the rows of `y R^T` are `R` applied to the rows of
/// `y`. `I + alpha (I - W)` is invertible when `W` is monotone (its symmetric part is at
/// least `(1 + alpha m) I`); a singular one is an error.
pub(crate) fn resolvent_transposed<S: Scalar>(w: ArrayView2<'_, S>, alpha: f64) -> Result<Array2<S>> {
    let n = w.nrows();
    let a = S::from_f64_lossy(alpha);
    let mut v = Array2::<S>::eye(n) * (S::one() + a);
    v.scaled_add(-a, &w);
    clarke_solve::dense::lu_solve_transpose(v.view(), Array2::<S>::eye(n).view()).map_err(|e| {
        Error::invalid(
            "deq",
            format!("I + alpha (I - W) could not be inverted for Peaceman-Rachford: {e}"),
        )
    })
}

/// Peaceman-Rachford splitting of one row block for the monotone relu cell: `z = relu(u)`,
/// and per iteration `u <- 2 z - u`, `x = (u + alpha c) R^T` (the resolvent of
/// `(I - W) z - c`), `u <- 2 x - u`, `z <- relu(u)`. Its fixed points are the cell's: `z = relu(z W^T
/// + c)`. `z` holds the start (the auxiliary `u` starts at it) and receives the last iterate;
/// a sample's change is `||z_new - z||` over `max(||z_new||, 1)`, and each sample stops on its
/// own, as in [`picard_block`].
pub(crate) fn peaceman_rachford_block<S: Scalar>(
    resolvent_t: ArrayView2<'_, S>,
    c: ArrayView2<'_, S>,
    z: ArrayViewMut2<'_, S>,
    alpha: f64,
    budget: Budget,
) -> BlockRun {
    let mut zc = z.as_standard_layout().into_owned();
    let mut uc = zc.clone();
    let mut cc = c.as_standard_layout().into_owned();
    let mut y = Array2::<S>::zeros(zc.raw_dim());
    let mut x = Array2::<S>::zeros(zc.raw_dim());
    let mut rows = ActiveRows::new(zc.nrows());
    let mut run = BlockRun::default();
    let (a, two, zero) = (S::from_f64_lossy(alpha), S::one() + S::one(), S::zero());
    let n = zc.ncols().max(1);
    while run.iterations < budget.max_iter && rows.active > 0 {
        let m = rows.active;
        // u <- 2 z - u, the reflected point, and y = u + alpha c.
        let (zs, cs) = (zc.as_slice().expect("compact"), cc.as_slice().expect("compact"));
        let us = uc.as_slice_mut().expect("compact").iter_mut();
        for (((yv, uv), &zv), &cv) in y
            .as_slice_mut()
            .expect("compact")
            .iter_mut()
            .zip(us)
            .zip(zs)
            .zip(cs)
            .take(m * n)
        {
            *uv = two * zv - *uv;
            *yv = *uv + a * cv;
        }
        gemm_seq(y.slice(s![..m, ..]), resolvent_t, false, x.slice_mut(s![..m, ..]));
        let mut change = 0.0f64;
        let rows_of = zc.as_slice_mut().expect("compact").chunks_exact_mut(n);
        let us = uc.as_slice_mut().expect("compact").chunks_exact_mut(n);
        let xs = x.as_slice().expect("compact").chunks_exact(n);
        for (k, ((zr, ur), xr)) in rows_of.zip(us).zip(xs).take(m).enumerate() {
            let (mut d2, mut n2) = (0.0f64, 0.0f64);
            for ((zv, uv), &xv) in zr.iter_mut().zip(ur.iter_mut()).zip(xr) {
                // The reflection of the resolvent step about the reflected point.
                *uv = two * xv - *uv;
                let new = if *uv > zero { *uv } else { zero };
                d2 += (new - *zv).to_f64_exact().powi(2);
                n2 += new.to_f64_exact().powi(2);
                *zv = new;
            }
            let r = d2.sqrt() / n2.sqrt().max(1.0);
            rows.note(k, r, budget);
            change = worst(change, r);
        }
        let done = rows.retire(|i, j| {
            for arr in [&mut zc, &mut uc, &mut cc] {
                swap_rows(arr, i, j);
            }
        });
        if run.record(worst(change, done), budget) {
            break;
        }
    }
    rows.scatter(&zc, z);
    run
}

/// The adjoint Neumann iteration of one row block, `w <- g + (w o d) W`, started from `w`.
/// The change of an update is the residual `g - (w - (w o d) W)` of the previous iterate;
/// each row stops relative to its `||g_i||`.
///
/// Per iteration: one GEMM and one fused pass that adds `g`, measures the change, writes the
/// new iterate and its product with `d` for the next GEMM.
pub(crate) fn neumann_block<S: Scalar>(
    w_mat: ArrayView2<'_, S>,
    d: ArrayView2<'_, S>,
    g: ArrayView2<'_, S>,
    w: ArrayViewMut2<'_, S>,
    budget: Budget,
) -> BlockRun {
    let mut dc = d.as_standard_layout().into_owned();
    let mut gc = g.as_standard_layout().into_owned();
    let mut wc = w.as_standard_layout().into_owned();
    let mut g_norms = row_norms(g.view());
    let mut t = &wc * &dc;
    let mut q = Array2::<S>::zeros(g.raw_dim());
    let mut rows = ActiveRows::new(wc.nrows());
    let mut run = BlockRun::default();
    while run.iterations < budget.max_iter && rows.active > 0 {
        let m = rows.active;
        gemm_seq(t.slice(s![..m, ..]), w_mat, false, q.slice_mut(s![..m, ..]));
        let change = with_avx2(
            #[inline(always)]
            || {
                let mut change = 0.0f64;
                // Rows of the compact arrays (a width of 0 has no rows to iterate).
                let n = wc.ncols().max(1);
                let ws = wc.as_slice_mut().expect("compact").chunks_exact_mut(n);
                let ts = t.as_slice_mut().expect("compact").chunks_exact_mut(n);
                let qs = q.as_slice().expect("compact").chunks_exact(n);
                let gs = gc.as_slice().expect("compact").chunks_exact(n);
                let ds = dc.as_slice().expect("compact").chunks_exact(n);
                let rows_of = ws.zip(ts).zip(qs).zip(gs).zip(ds);
                for (k, (((((wr, tr), qr), gr), dr), g_norm)) in rows_of.zip(&g_norms).take(m).enumerate() {
                    let d2 = adjoint_row(wr, tr, qr, gr, dr);
                    let r = d2.to_f64_exact().sqrt() / g_norm;
                    rows.note(k, r, budget);
                    change = worst(change, r);
                }
                change
            },
        );
        let done = rows.retire(|i, j| {
            for a in [&mut wc, &mut t, &mut gc, &mut dc] {
                swap_rows(a, i, j);
            }
            g_norms.swap(i, j);
        });
        if run.record(worst(change, done), budget) {
            break;
        }
    }
    rows.scatter(&wc, w);
    run
}

/// The tangent Neumann iteration of one row block, the transpose of [`neumann_block`]:
/// `v <- r + (v W^T) o d`, which sums `sum_k J_z^k r` for the forward-mode system
/// `(I - J_z) v = r`. `v` holds the start. The change per iteration is measured relative to
/// each sample's `||r||`, as in the adjoint.
pub(crate) fn tangent_neumann_block<S: Scalar>(
    w_mat: ArrayView2<'_, S>,
    d: ArrayView2<'_, S>,
    r: ArrayView2<'_, S>,
    mut v: ArrayViewMut2<'_, S>,
    budget: Budget,
) -> BlockRun {
    let r_norms = row_norms(r);
    let mut q = Array2::<S>::zeros(r.raw_dim());
    let mut run = BlockRun::default();
    while run.iterations < budget.max_iter {
        gemm_seq(v.view(), w_mat.t(), false, q.view_mut());
        let mut change = 0.0f64;
        for (i, (((mut vr, qr), rr), dr)) in v
            .outer_iter_mut()
            .zip(q.outer_iter())
            .zip(r.outer_iter())
            .zip(d.outer_iter())
            .enumerate()
        {
            let mut d2 = 0.0f64;
            Zip::from(&mut vr).and(qr).and(rr).and(dr).for_each(|v, &q, &r, &d| {
                let new = r + q * d;
                d2 += (new - *v).to_f64_exact().powi(2);
                *v = new;
            });
            change = worst(change, d2.sqrt() / r_norms[i]);
        }
        if run.record(change, budget) {
            break;
        }
    }
    run
}

/// The Euclidean norm of each row (floored at the smallest positive `f64`): the scale of a
/// Neumann iteration's change per sample.
pub(crate) fn row_norms<S: Scalar>(a: ArrayView2<'_, S>) -> Vec<f64> {
    a.outer_iter()
        .map(|r| {
            r.iter()
                .map(|v| v.to_f64_exact().powi(2))
                .sum::<f64>()
                .sqrt()
                .max(f64::MIN_POSITIVE)
        })
        .collect()
}

/// `c = x U^T + b`, computed by row blocks in parallel.
pub(crate) fn input_term<S: Scalar>(
    x: ArrayView2<'_, S>,
    u: ArrayView2<'_, S>,
    b: ndarray::ArrayView1<'_, S>,
) -> Array2<S> {
    let mut c = Array2::<S>::zeros((x.nrows(), u.nrows()));
    c.axis_iter_mut(Axis(0)).for_each(|mut row| row.assign(&b));
    let blocks = gemm_row_blocks(x.nrows(), x.ncols(), u.nrows());
    map_blocks(split_rows(c.view_mut(), &blocks), &blocks, |cb, (r0, r1)| {
        gemm_seq(x.slice(s![r0..r1, ..]), u.t(), true, cb);
    });
    c
}

/// `f(part, block)` for every row block (`parts` from [`split_rows`] over `blocks`), in
/// block order.
///
/// The calling thread runs the first block itself and hands the others to the pool
/// (`rayon::in_place_scope`). A parallel iterator started outside the pool would hand every
/// block over and put the caller to sleep until they are done: two thread wake-ups per
/// parallel region, which at the smallest DEQ step cost about a tenth of it. With one
/// block nothing leaves the calling thread.
pub(crate) fn map_blocks<'a, S: Scalar, R: Send>(
    parts: Vec<ArrayViewMut2<'a, S>>,
    blocks: &[(usize, usize)],
    f: impl Fn(ArrayViewMut2<'a, S>, (usize, usize)) -> R + Sync + Send,
) -> Vec<R> {
    let mut results: Vec<Option<R>> = (0..parts.len()).map(|_| None).collect();
    let f = &f;
    rayon::in_place_scope(|scope| {
        let mut work = parts.into_iter().zip(blocks).zip(results.iter_mut());
        let first = work.next();
        for ((part, &block), slot) in work {
            scope.spawn(move |_| *slot = Some(f(part, block)));
        }
        if let Some(((part, &block), slot)) = first {
            *slot = Some(f(part, block));
        }
    });
    results
        .into_iter()
        .map(|r| r.expect("every block ran: the scope waits for its tasks"))
        .collect()
}

/// Mutable row blocks of `a` (disjoint).
pub(crate) fn split_rows<'a, S>(mut a: ArrayViewMut2<'a, S>, blocks: &[(usize, usize)]) -> Vec<ArrayViewMut2<'a, S>> {
    let mut out = Vec::with_capacity(blocks.len());
    let mut start = 0;
    for &(r0, r1) in blocks {
        debug_assert_eq!(r0, start);
        let (head, tail) = a.split_at(Axis(0), r1 - r0);
        out.push(head);
        a = tail;
        start = r1;
    }
    out
}

/// `p = z W^T + c` for the whole batch (the pre-activation at the solution).
pub(crate) fn pre_activation<S: Scalar>(w: ArrayView2<'_, S>, c: ArrayView2<'_, S>, z: ArrayView2<'_, S>) -> Array2<S> {
    let mut p = c.to_owned();
    let blocks = gemm_row_blocks(z.nrows(), z.ncols(), w.nrows());
    map_blocks(split_rows(p.view_mut(), &blocks), &blocks, |pb, (r0, r1)| {
        gemm_seq(z.slice(s![r0..r1, ..]), w.t(), true, pb);
    });
    p
}

/// Writes one sample's block `I - diag(d) W` of `I - J_z` into `out` (`n x n`).
pub(crate) fn identity_minus_scaled<S: Scalar>(
    d: ndarray::ArrayView1<'_, S>,
    w: ArrayView2<'_, S>,
    mut out: ArrayViewMut2<'_, S>,
) {
    for (i, (mut row, wr)) in out.outer_iter_mut().zip(w.outer_iter()).enumerate() {
        row.zip_mut_with(&wr, |o, &wv| *o = -d[i] * wv);
        row[i] += S::one();
    }
}

/// Checks a matrix for non-finite entries, naming it.
pub(crate) fn ensure_finite<S: Scalar>(name: &str, a: ArrayView2<'_, S>) -> Result<()> {
    match a.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::invalid(
            "deq",
            format!(
                "{name} has a non-finite entry {} at row {}, column {}",
                a.iter().nth(i).map_or(f64::NAN, |v| v.to_f64_exact()),
                i / a.ncols().max(1),
                i % a.ncols().max(1)
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 6 x 6 map with norm below one, and rows of very different scales and signs, so that
    /// the samples of one block need different numbers of iterations.
    fn problem() -> (Array2<f64>, Array2<f64>) {
        let n = 6;
        let w = Array2::from_shape_fn((n, n), |(i, j)| 0.3 * (((3 * i + 5 * j) % 7) as f64 / 7.0 - 0.4));
        let c = Array2::from_shape_fn((5, n), |(i, j)| {
            let scale = [1e-3, 1.0, 30.0, 0.2, 5.0][i];
            scale * (((i + 2 * j) % 5) as f64 - 1.5)
        });
        (w, c)
    }

    /// The vectorised row passes against the plain formulas, at every length from 0 to 27
    /// (whole chunks, tails, both), in f64 and f32: the same new rows bit for bit, and the
    /// same sums up to the order of the additions.
    #[test]
    fn row_passes_match_the_formulas_at_every_length() {
        fn check<S: Scalar>(tol: f64) {
            for n in 0..28 {
                let v = |k: usize, i: usize| S::from_f64_lossy(((k * 31 + i * 17) % 23) as f64 / 7.0 - 1.5);
                let (p, c, q, g, d) = (
                    (0..n).map(|i| v(1, i)).collect::<Vec<S>>(),
                    (0..n).map(|i| v(2, i)).collect::<Vec<S>>(),
                    (0..n).map(|i| v(3, i)).collect::<Vec<S>>(),
                    (0..n).map(|i| v(4, i)).collect::<Vec<S>>(),
                    (0..n).map(|i| v(5, i)).collect::<Vec<S>>(),
                );
                let old: Vec<S> = (0..n).map(|i| v(6, i)).collect();
                let relu = |x: S, _: S| x.max(S::zero());
                let mut z = old.clone();
                let (d2, n2) = forward_row(&mut z, &p, &c, relu);
                let (mut d2_ref, mut n2_ref) = (0.0f64, 0.0f64);
                for i in 0..n {
                    let new = relu(p[i] + c[i], old[i]);
                    assert_eq!(z[i], new, "forward, n = {n}, element {i}");
                    d2_ref += (new - old[i]).to_f64_exact().powi(2);
                    n2_ref += new.to_f64_exact().powi(2);
                }
                assert!((d2.to_f64_exact() - d2_ref).abs() <= tol * d2_ref.max(1.0), "n = {n}");
                assert!((n2.to_f64_exact() - n2_ref).abs() <= tol * n2_ref.max(1.0), "n = {n}");
                let mut w = old.clone();
                let mut t = vec![S::zero(); n];
                let d2 = adjoint_row(&mut w, &mut t, &q, &g, &d);
                let mut d2_ref = 0.0f64;
                for i in 0..n {
                    let new = q[i] + g[i];
                    assert_eq!((w[i], t[i]), (new, new * d[i]), "adjoint, n = {n}, element {i}");
                    d2_ref += (new - old[i]).to_f64_exact().powi(2);
                }
                assert!((d2.to_f64_exact() - d2_ref).abs() <= tol * d2_ref.max(1.0), "n = {n}");
            }
        }
        check::<f64>(1e-14);
        check::<f32>(1e-6);
    }

    fn budget(fixed: bool) -> Budget {
        Budget {
            tol: 1e-9,
            max_iter: if fixed { 7 } else { 500 },
            fixed,
        }
    }

    fn close(a: ArrayView2<'_, f64>, b: ArrayView2<'_, f64>) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-13 * y.abs().max(1.0))
    }

    /// Runs `solve(i, row)` on each sample `i` alone (a block of one, started from row `i` of
    /// `start`), checks that it ends at row `i` of the block's result `block`, and returns
    /// each sample's iteration count. `label` names the case in a failure.
    fn each_sample_alone(
        block: ArrayView2<'_, f64>,
        start: ArrayView2<'_, f64>,
        label: &str,
        solve: impl Fn(usize, ArrayViewMut2<'_, f64>) -> BlockRun,
    ) -> Vec<usize> {
        (0..block.nrows())
            .map(|i| {
                let rows = s![i..i + 1, ..];
                let mut alone = start.slice(rows).to_owned();
                let run = solve(i, alone.view_mut());
                assert!(close(block.slice(rows), alone.view()), "row {i}, {label}");
                run.iterations
            })
            .collect()
    }

    /// Peaceman-Rachford reaches Picard's fixed point (`W` here is a contraction, so
    /// `I - W` is monotone), each sample on its own: every row is that sample run alone, and
    /// the samples take different counts.
    #[test]
    fn peaceman_rachford_reaches_the_fixed_point_sample_by_sample() {
        let (w, c) = problem();
        let mut picard = Array2::<f64>::zeros(c.raw_dim());
        picard_block(
            w.t(),
            c.view(),
            picard.view_mut(),
            Activation::Relu,
            None,
            budget(false),
        );
        for alpha in [0.5, 1.0, 2.0] {
            let r_t = resolvent_transposed(w.view(), alpha).unwrap();
            let mut z = Array2::<f64>::zeros(c.raw_dim());
            let block = peaceman_rachford_block(r_t.view(), c.view(), z.view_mut(), alpha, budget(false));
            assert!(block.residual <= 1e-9, "alpha {alpha}: {block:?}");
            // The fixed point of the cell: relu(z W^T + c) = z.
            let image = (z.dot(&w.t()) + &c).mapv(|v| v.max(0.0));
            let scale = c.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            assert!((&image - &z).iter().all(|d| d.abs() <= 1e-7 * scale), "alpha {alpha}");
            assert!((&picard - &z).iter().all(|d| d.abs() <= 1e-7 * scale), "alpha {alpha}");
            let start = Array2::<f64>::zeros(c.raw_dim());
            let counts = each_sample_alone(z.view(), start.view(), &format!("alpha {alpha}"), |i, zi| {
                peaceman_rachford_block(r_t.view(), c.slice(s![i..i + 1, ..]), zi, alpha, budget(false))
            });
            assert_eq!(block.iterations, *counts.iter().max().unwrap());
            assert!(counts.iter().min() < counts.iter().max(), "{counts:?}");
        }
    }

    /// Every sample of a block stops at its own tolerance: the block's rows are those of each
    /// sample iterated alone (a block of one), while the block runs as long as its slowest
    /// sample. Under a fixed count every sample runs the whole count.
    #[test]
    fn picard_samples_stop_on_their_own() {
        let (w, c) = problem();
        for fixed in [false, true] {
            let mut z = Array2::<f64>::zeros(c.raw_dim());
            let block = picard_block(w.t(), c.view(), z.view_mut(), Activation::Relu, None, budget(fixed));
            let start = Array2::<f64>::zeros(c.raw_dim());
            let counts = each_sample_alone(z.view(), start.view(), &format!("fixed {fixed}"), |i, zi| {
                let ci = c.slice(s![i..i + 1, ..]);
                picard_block(w.t(), ci, zi, Activation::Relu, None, budget(fixed))
            });
            assert_eq!(block.iterations, *counts.iter().max().unwrap());
            let spread = counts.iter().max().unwrap() - counts.iter().min().unwrap();
            assert_eq!(spread == 0, fixed, "iterations per sample {counts:?}");
            assert!(fixed || block.residual <= 1e-9);
        }
    }

    /// The same for the adjoint Neumann iteration, each sample relative to its own `||g_i||`.
    #[test]
    fn neumann_samples_stop_on_their_own() {
        let (w, g) = problem();
        let d = Array2::from_shape_fn(g.raw_dim(), |(i, j)| if (i + j) % 3 == 0 { 0.0 } else { 1.0 });
        for fixed in [false, true] {
            let mut y = g.clone();
            let block = neumann_block(w.view(), d.view(), g.view(), y.view_mut(), budget(fixed));
            let counts = each_sample_alone(y.view(), g.view(), &format!("fixed {fixed}"), |i, yi| {
                let rows = s![i..i + 1, ..];
                neumann_block(w.view(), d.slice(rows), g.slice(rows), yi, budget(fixed))
            });
            assert_eq!(block.iterations, *counts.iter().max().unwrap());
            let spread = counts.iter().max().unwrap() - counts.iter().min().unwrap();
            assert_eq!(spread == 0, fixed, "iterations per sample {counts:?}");
        }
    }
}
