//! Nonsmooth ops with selectable conservative derivatives: relu, leaky relu, abs, sign,
//! clamp, elementwise maximum/minimum, and max/min reductions.
//!
//! Each op records its kink *override* (if any) when it is recorded; the selection itself is
//! resolved at backward time from the override or the backward call's [`KinkPolicy`], so the
//! same recorded graph can be re-run under another policy. Off the kinks every rule is the
//! ordinary derivative; at a kink the rule returns the selection, and the ledger counts it.

use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn, Zip};

use crate::kernels::{
    broadcast_shape, broadcast_view, check_axis, map, parallel, reduce_to_shape, tangent_view, zip_map,
};
use crate::ledger::{KinkRecord, KinkScan, Selection};
use crate::nonsmooth;
use crate::op::{Ctx, InputGrads, InputTangents, InputValues, Op};
use crate::policy::{KinkPolicy, TieRule, check_selection, check_tie_rule};
use crate::tape::Inputs;
use crate::var::Var;
use crate::{Error, Result, Scalar};

/// Which nonsmooth function.
#[derive(Clone, Copy)]
pub(crate) enum KinkKind<S> {
    Relu,
    LeakyRelu {
        alpha: S,
    },
    Abs,
    Sign,
    Clamp {
        lo: S,
        hi: S,
    },
    Maximum,
    Minimum,
    /// Max (or min) over one axis, or over everything when `axis` is `None`.
    Reduce {
        axis: Option<usize>,
        keep_dims: bool,
        is_max: bool,
    },
}

/// A nonsmooth op: its function and its per-op override, if any.
pub(crate) struct KinkOp<S> {
    kind: KinkKind<S>,
    over: Option<Selection>,
}

impl<S: Scalar> KinkOp<S> {
    pub fn name(&self) -> &'static str {
        match self.kind {
            KinkKind::Relu => "relu",
            KinkKind::LeakyRelu { .. } => "leaky_relu",
            KinkKind::Abs => "abs",
            KinkKind::Sign => "sign",
            KinkKind::Clamp { .. } => "clamp",
            KinkKind::Maximum => "maximum",
            KinkKind::Minimum => "minimum",
            KinkKind::Reduce {
                axis: Some(_),
                is_max: true,
                ..
            } => "max_axis",
            KinkKind::Reduce {
                axis: Some(_),
                is_max: false,
                ..
            } => "min_axis",
            KinkKind::Reduce {
                axis: None,
                is_max: true,
                ..
            } => "max_all",
            KinkKind::Reduce {
                axis: None,
                is_max: false,
                ..
            } => "min_all",
        }
    }

    /// The selection in force under `policy`.
    fn selection(&self, policy: &KinkPolicy) -> Selection {
        if let Some(s) = self.over {
            return s;
        }
        match self.kind {
            KinkKind::Relu => Selection::Slope(policy.relu),
            KinkKind::LeakyRelu { alpha } => {
                let a = alpha.to_f64_exact();
                Selection::Slope(nonsmooth::leaky_relu_slope(a, policy.leaky_relu))
            }
            KinkKind::Abs => Selection::Slope(policy.abs),
            KinkKind::Sign => Selection::Slope(policy.sign),
            KinkKind::Clamp { .. } => Selection::Clamp {
                low: policy.clamp_low,
                high: policy.clamp_high,
            },
            KinkKind::Maximum | KinkKind::Minimum => Selection::TieWeight(policy.tie_weight),
            KinkKind::Reduce { .. } => Selection::Tie(policy.reduce_tie),
        }
    }

    pub fn backward(&self, ctx: &Ctx<'_, S>, g: ArrayD<S>) -> InputGrads<S> {
        let sel = self.selection(ctx.policy);
        let band = S::from_f64_lossy(ctx.band());
        let x = &ctx.inputs[0];
        let mut out = InputGrads::new();
        match (self.kind, sel) {
            (KinkKind::Maximum | KinkKind::Minimum, Selection::TieWeight(w)) => {
                let w = S::from_f64_lossy(w);
                let b = &ctx.inputs[1];
                let is_max = matches!(self.kind, KinkKind::Maximum);
                let pinned = pins(ctx, &g);
                let (ga, gb) = extremum_backward(x, b, g, w, band, is_max, &pinned);
                out.push(ctx.needs(0).then_some(ga));
                out.push(ctx.needs(1).then_some(gb));
            }
            (
                KinkKind::Reduce {
                    axis,
                    keep_dims,
                    is_max,
                },
                Selection::Tie(rule),
            ) => {
                out.push(Some(reduce_backward(
                    x, ctx.output, g, axis, keep_dims, is_max, rule, band,
                )));
            }
            _ => out.push(Some(self.scale_by_derivative(ctx, sel, band, g))),
        }
        out
    }

    /// The tangent of the output, with the selections of [`backward`](Self::backward) at
    /// the same elements: the selected diagonal for the elementwise ops, the tie shares of
    /// `maximum`/`minimum`, the tie rule of the reductions.
    pub fn jvp(&self, ctx: &Ctx<'_, S>, t: &InputTangents<'_, S>) -> ArrayD<S> {
        let sel = self.selection(ctx.policy);
        let band = S::from_f64_lossy(ctx.band());
        let x = &ctx.inputs[0];
        match (self.kind, sel) {
            (KinkKind::Maximum | KinkKind::Minimum, Selection::TieWeight(w)) => {
                let w = S::from_f64_lossy(w);
                let is_max = matches!(self.kind, KinkKind::Maximum);
                let shares: Vec<(usize, S)> = ctx
                    .element_selections
                    .iter()
                    .map(|e| (e.element, S::from_f64_lossy(e.value)))
                    .collect();
                extremum_jvp(
                    x,
                    &ctx.inputs[1],
                    ctx.output.shape(),
                    (t[0], t[1]),
                    w,
                    band,
                    is_max,
                    &shares,
                )
            }
            (KinkKind::Reduce { axis, keep_dims, .. }, Selection::Tie(rule)) => {
                let tx = t[0].expect("a tangent reaches the node");
                reduce_jvp(x, ctx.output, tx, axis, keep_dims, rule, band)
            }
            _ => {
                let tx = t[0].expect("a tangent reaches the node").clone();
                self.scale_by_derivative(ctx, sel, band, tx)
            }
        }
    }

    /// The tangent of [`backward`](Self::backward) (see `Op::backward_tangent`): every op
    /// here is piecewise linear, so its selected derivative is piecewise constant and the
    /// tangent is backward applied to `g_dot`, with the same selection at every element
    /// (policy, per-op override, band, element selections, tie rule). At a kink this is the
    /// derivative of the selected branch, whose curvature is zero.
    pub fn backward_tangent(&self, ctx: &Ctx<'_, S>, g_dot: ArrayD<S>) -> InputGrads<S> {
        self.backward(ctx, g_dot)
    }

    /// `g[i] * f'(x[i])` for the elementwise ops (relu, leaky relu, abs, sign, clamp), with
    /// the selection `sel` within `band` of a kink and the call's element selections where
    /// they apply. The Jacobian is diagonal, so this one map serves backward (on the
    /// gradient) and forward mode (on the tangent).
    fn scale_by_derivative(&self, ctx: &Ctx<'_, S>, sel: Selection, band: S, mut g: ArrayD<S>) -> ArrayD<S> {
        let x = &ctx.inputs[0];
        // Values at elements with their own selection, before the in-place update.
        let pinned = pins(ctx, &g);
        match (self.kind, sel) {
            (KinkKind::Relu, Selection::Slope(s)) => {
                let s = S::from_f64_lossy(s);
                slope_update(&mut g, x, move |x| nonsmooth::relu_derivative(x, s, band));
            }
            (KinkKind::LeakyRelu { alpha }, Selection::Slope(s)) => {
                let s = S::from_f64_lossy(s);
                slope_update(&mut g, x, move |x| nonsmooth::leaky_relu_derivative(x, alpha, s, band));
            }
            (KinkKind::Abs, Selection::Slope(s)) => {
                let s = S::from_f64_lossy(s);
                slope_update(&mut g, x, move |x| nonsmooth::abs_derivative(x, s, band));
            }
            (KinkKind::Sign, Selection::Slope(s)) => {
                let s = S::from_f64_lossy(s);
                slope_update(&mut g, x, move |x| nonsmooth::sign_derivative(x, s, band));
            }
            (KinkKind::Clamp { lo, hi }, Selection::Clamp { low, high }) => {
                let (dl, dh) = (S::from_f64_lossy(low), S::from_f64_lossy(high));
                slope_update(&mut g, x, move |x| nonsmooth::clamp_derivative(x, lo, hi, dl, dh, band));
            }
            _ => unreachable!("an elementwise op with its kind of selection"),
        }
        for &(e, upstream, value) in &pinned {
            let v = flat(x, e);
            let at_kink = match self.kind {
                KinkKind::Clamp { lo, hi } => nonsmooth::at_kink(v - lo, band) || nonsmooth::at_kink(v - hi, band),
                _ => nonsmooth::at_kink(v, band),
            };
            if at_kink {
                *flat_mut(&mut g, e) = upstream * value;
            }
        }
        g
    }

    /// The rule and the ledger record in one pass over the input, in place, where that
    /// applies: relu and abs under an empty band (the policy's tolerance and the call's
    /// solver band both 0), with no element selection for this node, on a contiguous input
    /// of `g`'s shape below the parallel threshold. The pass scales `g` by a mask that keeps
    /// the upstream value at the kink and notes whether any element sits exactly on it; only
    /// then does a second pass apply the selection there and list the kink elements. `g`
    /// becomes the input's gradient and the record is returned, the same to the bit as
    /// [`backward`](Self::backward) and [`ledger_record`](Self::ledger_record), NaN and
    /// infinite gradients included. Elsewhere `None`, with `g` untouched: the sweep then
    /// takes those two in turn.
    pub fn backward_recorded_in_place(&self, ctx: &Ctx<'_, S>, g: &mut ArrayD<S>) -> Option<KinkRecord> {
        let fusable = matches!(self.kind, KinkKind::Relu | KinkKind::Abs)
            && ctx.band() == 0.0
            && ctx.element_selections.is_empty()
            && !crate::kernels::parallel(g.len())
            && ctx.inputs[0].as_slice().is_some()
            && g.is_standard_layout()
            && g.shape() == ctx.inputs[0].shape();
        if !fusable {
            return None;
        }
        let x = &ctx.inputs[0];
        let xs = x.as_slice().expect("checked contiguous");
        let gs = g.as_slice_mut().expect("checked standard layout");
        // The mask keeps g where x = 0 (the selection follows below), zeroes it where x is
        // NaN, as the two-pass derivative does.
        let on_kink = match self.kind {
            KinkKind::Relu => masked_update(gs, xs, |x| nonsmooth::one_if::<S>(x >= S::zero())),
            _ => masked_update(gs, xs, |x| {
                nonsmooth::one_if::<S>(x >= S::zero()) - nonsmooth::one_if::<S>(x < S::zero())
            }),
        };
        let sel = self.selection(ctx.policy);
        let mut scan = KinkScan::new(ctx.policy.tolerance, ctx.solver_band);
        if on_kink {
            let Selection::Slope(at) = sel else {
                unreachable!("relu and abs select a slope")
            };
            let at = S::from_f64_lossy(at);
            for (i, (g, &x)) in gs.iter_mut().zip(xs).enumerate() {
                if x == S::zero() {
                    *g *= at;
                    scan.skip(i - scan.elements());
                    scan.visit(i, 0.0);
                }
            }
            scan.skip(xs.len() - scan.elements());
        } else {
            scan.skip(xs.len());
        }
        Some(self.finish_record(scan, ctx.node, x.shape(), ctx.policy))
    }

    /// The ledger record of this node at its recorded inputs under `policy`, with the
    /// solver error band `solver_band` (0 outside implicit layers).
    pub fn ledger_record(
        &self,
        node: usize,
        inputs: InputValues<'_, S>,
        output: &ArrayD<S>,
        policy: &KinkPolicy,
        solver_band: f64,
    ) -> KinkRecord {
        let mut scan = KinkScan::new(policy.tolerance, solver_band);
        let x = &inputs[0];
        let shape = match self.kind {
            KinkKind::Relu | KinkKind::LeakyRelu { .. } | KinkKind::Abs | KinkKind::Sign => {
                scan_distances(&mut scan, x.view(), |v| v);
                x.shape().to_vec()
            }
            KinkKind::Clamp { lo, hi } => {
                scan_distances(&mut scan, x.view(), move |v| nonsmooth::clamp_distance(v, lo, hi));
                x.shape().to_vec()
            }
            KinkKind::Maximum | KinkKind::Minimum if x.shape() == inputs[1].shape() => {
                let diff = Zip::from(x).and(&inputs[1]).map_collect(|&a, &b| a - b);
                scan_distances(&mut scan, diff.view(), |v| v);
                x.shape().to_vec()
            }
            KinkKind::Maximum | KinkKind::Minimum => {
                let shape = output.shape();
                let diff = Zip::from(&broadcast_view(x, shape))
                    .and(&broadcast_view(&inputs[1], shape))
                    .map_collect(|&a, &b| a - b);
                scan_distances(&mut scan, diff.view(), |v| v);
                shape.to_vec()
            }
            KinkKind::Reduce { axis, is_max, .. } => {
                reduce_ties(&mut scan, x, axis, is_max);
                output.shape().to_vec()
            }
        };
        self.finish_record(scan, node, &shape, policy)
    }

    /// The record of a finished scan: this op's name, selection, hull and override flag.
    fn finish_record(&self, scan: KinkScan, node: usize, shape: &[usize], policy: &KinkPolicy) -> KinkRecord {
        let mut record = scan.finish(node, self.name(), shape, self.selection(policy), self.element_hull());
        record.overridden = self.over.is_some();
        record
    }

    /// How many elements an [`ElementSelection`](crate::ElementSelection) for this node can
    /// address (the `elements` of its ledger record), or `None` for a reduction, whose ties
    /// follow a [`TieRule`] instead.
    pub fn selectable_elements(&self, output: &ArrayD<S>) -> Option<usize> {
        match self.kind {
            KinkKind::Reduce { .. } => None,
            // Elementwise ops: the output has the shape of the (broadcast) kink argument.
            _ => Some(output.len()),
        }
    }

    /// The convex hull of the one-sided derivatives at one kink element (see
    /// [`KinkRecord::hull`]).
    pub fn element_hull(&self) -> Option<(f64, f64)> {
        match self.kind {
            KinkKind::Relu | KinkKind::Clamp { .. } | KinkKind::Maximum | KinkKind::Minimum => Some((0.0, 1.0)),
            KinkKind::LeakyRelu { alpha } => {
                let a = alpha.to_f64_exact();
                Some((a.min(1.0), a.max(1.0)))
            }
            KinkKind::Abs => Some((-1.0, 1.0)),
            KinkKind::Sign => Some((0.0, 0.0)),
            KinkKind::Reduce { .. } => None,
        }
    }

    /// Which side of each kink every element sits on. Two points with equal codes lie in the
    /// same smooth piece of this op, so differencing between them is safe.
    pub fn region_codes(&self, inputs: InputValues<'_, S>) -> Vec<i64> {
        let sign = |v: S| -> i64 {
            if v > S::zero() {
                1
            } else if v < S::zero() {
                -1
            } else {
                0
            }
        };
        let x = &inputs[0];
        match self.kind {
            KinkKind::Relu | KinkKind::LeakyRelu { .. } | KinkKind::Abs | KinkKind::Sign => {
                x.iter().map(|&v| sign(v)).collect()
            }
            KinkKind::Clamp { lo, hi } => x.iter().map(|&v| 3 * sign(v - lo) + sign(v - hi)).collect(),
            KinkKind::Maximum | KinkKind::Minimum => {
                let shape = broadcast_shape("maximum", x.shape(), inputs[1].shape()).expect("checked at record time");
                Zip::from(&broadcast_view(x, &shape))
                    .and(&broadcast_view(&inputs[1], &shape))
                    .map_collect(|&a, &b| sign(a - b))
                    .into_iter()
                    .collect()
            }
            KinkKind::Reduce { axis, is_max, .. } => {
                let lanes = lanes_of(x, axis);
                lanes
                    .outer_iter()
                    .map(|lane| {
                        let m = extreme(lane.iter().copied(), is_max);
                        let tied: Vec<usize> = (0..lane.len()).filter(|&i| lane[i] == m).collect();
                        match tied.as_slice() {
                            [] => 0,
                            [arg] => *arg as i64,
                            // A tie: a negative code naming the tied set, so that a
                            // perturbation moving the tie to other elements changes it.
                            set => {
                                let h = set
                                    .iter()
                                    .fold(0i64, |h, &i| h.wrapping_mul(1_000_003).wrapping_add(i as i64 + 1));
                                -1 - h.rem_euclid(i64::MAX)
                            }
                        }
                    })
                    .collect()
            }
        }
    }
}

/// (flat index, value of `g` there, selection) of the call's element selections for this
/// node that index into `g`.
fn pins<S: Scalar>(ctx: &Ctx<'_, S>, g: &ArrayD<S>) -> Vec<(usize, S, S)> {
    ctx.element_selections
        .iter()
        .filter(|e| e.element < g.len())
        .map(|e| (e.element, flat(g, e.element), S::from_f64_lossy(e.value)))
        .collect()
}

/// The share of `maximum(a, b)` (or `minimum`) sent to `a`: 1 where `a` wins, 0 where `b`
/// does, `w` at a tie within `band`. Branch-free: the winner is data dependent and
/// unpredictable. `minimum(a, b)` is `maximum` with the comparison reversed; the tie weight
/// stays with `a`.
#[inline(always)]
fn extremum_share<S: Scalar>(a: S, b: S, w: S, band: S, is_max: bool) -> S {
    if is_max {
        nonsmooth::max_share(a, b, w, band)
    } else {
        nonsmooth::max_share(b, a, w, band)
    }
}

/// The tangent of `maximum(a, b)` or `minimum(a, b)` in the broadcast `shape`: `s ta + (1 -
/// s) tb` with the share `s` of [`extremum_share`], replaced by the element's own share in
/// `shares` (flat index, share) where that element ties within `band`, as backward does.
#[allow(clippy::too_many_arguments)]
fn extremum_jvp<S: Scalar>(
    a: &ArrayD<S>,
    b: &ArrayD<S>,
    shape: &[usize],
    (ta, tb): (Option<&ArrayD<S>>, Option<&ArrayD<S>>),
    w: S,
    band: S,
    is_max: bool,
    shares: &[(usize, S)],
) -> ArrayD<S> {
    let zero = ArrayD::zeros(IxDyn(&[]));
    let (av, bv) = (broadcast_view(a, shape), broadcast_view(b, shape));
    let (tav, tbv) = (tangent_view(ta, shape, &zero), tangent_view(tb, shape, &zero));
    let tangent = |s: S, ta: S, tb: S| s * ta + (S::one() - s) * tb;
    let mut out = Zip::from(&av)
        .and(&bv)
        .and(&tav)
        .and(&tbv)
        .map_collect(|&a, &b, &ta, &tb| tangent(extremum_share(a, b, w, band, is_max), ta, tb));
    let len = out.len();
    for &(e, share) in shares.iter().filter(|(e, _)| *e < len) {
        if nonsmooth::at_kink(flat(&av, e) - flat(&bv, e), band) {
            *flat_mut(&mut out, e) = tangent(share, flat(&tav, e), flat(&tbv, e));
        }
    }
    out
}

/// Gradients of `maximum(a, b)` or `minimum(a, b)`: the winner of each element gets the
/// gradient, a tie within `band` sends the share `w` to `a`. `pins` are (flat index in the
/// broadcast shape, upstream gradient there, share sent to `a`) of the elements with their
/// own selection: they replace `w` where those elements tie.
fn extremum_backward<S: Scalar>(
    a: &ArrayD<S>,
    b: &ArrayD<S>,
    mut g: ArrayD<S>,
    w: S,
    band: S,
    is_max: bool,
    pins: &[(usize, S, S)],
) -> (ArrayD<S>, ArrayD<S>) {
    let share = move |a: S, b: S| extremum_share(a, b, w, band, is_max);
    let split = |g: &mut S, gb: &mut S, a: S, b: S| {
        let s = share(a, b);
        *gb = *g * (S::one() - s);
        *g *= s;
    };
    if a.shape() == b.shape() {
        let mut gb = ArrayD::<S>::zeros(g.raw_dim());
        if parallel(g.len()) {
            Zip::from(&mut g)
                .and(&mut gb)
                .and(a)
                .and(b)
                .par_for_each(|g, gb, &a, &b| split(g, gb, a, b));
        } else if let (Some(xs), Some(bs), true) = (a.as_slice(), b.as_slice(), g.is_standard_layout()) {
            let gs = g.as_slice_mut().expect("standard layout");
            let gbs = gb.as_slice_mut().expect("fresh array");
            for (((g, gb), &a), &b) in gs.iter_mut().zip(gbs).zip(xs).zip(bs) {
                split(g, gb, a, b);
            }
        } else {
            Zip::from(&mut g)
                .and(&mut gb)
                .and(a)
                .and(b)
                .for_each(|g, gb, &a, &b| split(g, gb, a, b));
        }
        pin_ties(&mut g, &mut gb, a.view(), b.view(), pins, band);
        return (g, gb);
    }
    let shape = g.shape().to_vec();
    let (av, bv) = (broadcast_view(a, &shape), broadcast_view(b, &shape));
    let mut gb = ArrayD::<S>::zeros(g.raw_dim());
    Zip::from(&mut g)
        .and(&mut gb)
        .and(&av)
        .and(&bv)
        .for_each(|g, gb, &a, &b| split(g, gb, a, b));
    pin_ties(&mut g, &mut gb, av, bv, pins, band);
    (reduce_to_shape(g, a.shape()), reduce_to_shape(gb, b.shape()))
}

/// Applies per-element tie shares to the gradients of `maximum`/`minimum` in the broadcast
/// shape (`a` and `b` are the operands broadcast to it), where the element ties within `band`.
fn pin_ties<S: Scalar>(
    ga: &mut ArrayD<S>,
    gb: &mut ArrayD<S>,
    a: ArrayViewD<'_, S>,
    b: ArrayViewD<'_, S>,
    pins: &[(usize, S, S)],
    band: S,
) {
    for &(e, upstream, share) in pins {
        if nonsmooth::at_kink(flat(&a, e) - flat(&b, e), band) {
            *flat_mut(ga, e) = upstream * share;
            *flat_mut(gb, e) = upstream * (S::one() - share);
        }
    }
}

/// `g[i] *= d(x[i])`, in parallel for large arrays.
fn slope_update<S: Scalar>(g: &mut ArrayD<S>, x: &ArrayD<S>, d: impl Fn(S) -> S + Sync + Send) {
    if parallel(g.len()) {
        Zip::from(g).and(x).par_for_each(|g, &x| *g *= d(x));
    } else if let (Some(gs), Some(xs)) = (g.as_slice_mut(), x.as_slice()) {
        for (g, &x) in gs.iter_mut().zip(xs) {
            *g *= d(x);
        }
    } else {
        Zip::from(g).and(x).for_each(|g, &x| *g *= d(x));
    }
}

/// `g *= mask(x)` elementwise, returning whether some `x` is exactly 0: the one pass of
/// [`KinkOp::backward_recorded_in_place`].
#[inline]
fn masked_update<S: Scalar>(g: &mut [S], x: &[S], mask: impl Fn(S) -> S) -> bool {
    let mut zero = false;
    for (g, &x) in g.iter_mut().zip(x) {
        zero |= x == S::zero();
        *g *= mask(x);
    }
    zero
}

/// Whether `dist` is exactly zero at some element of `s`. Eight elements at a time without
/// an early exit inside a block, so that the comparisons vectorise (a plain `any` stops at
/// every element to test its exit and runs one comparison per cycle).
#[inline]
fn has_zero<S: Scalar>(s: &[S], dist: &impl Fn(S) -> S) -> bool {
    let mut blocks = s.chunks_exact(8);
    for block in &mut blocks {
        let hit = block.iter().fold(false, |hit, &v| hit | (dist(v) == S::zero()));
        if hit {
            return true;
        }
    }
    blocks.remainder().iter().any(|&v| dist(v) == S::zero())
}

/// Feeds the distance of every element of `x` to its kink into `scan`. With an empty band
/// only exact zeros count, and a first pass over the slice skips the scan when there are none
/// (the common case on a hot path).
fn scan_distances<S: Scalar>(scan: &mut KinkScan, x: ArrayViewD<'_, S>, dist: impl Fn(S) -> S) {
    if scan.band() == 0.0 {
        let none = match x.as_slice() {
            Some(s) => !has_zero(s, &dist),
            None => !x.iter().any(|&v| dist(v) == S::zero()),
        };
        if none {
            scan.skip(x.len());
            return;
        }
    }
    for (i, &v) in x.iter().enumerate() {
        scan.visit(i, dist(v).to_f64_exact());
    }
}

/// The input as a 2-D view (lanes x lane length), the reduced axis last.
fn lanes_of<S: Scalar>(x: &ArrayD<S>, axis: Option<usize>) -> ndarray::Array2<S> {
    match axis {
        None => x.iter().copied().collect::<ndarray::Array1<S>>().insert_axis(Axis(0)),
        Some(ax) => {
            let n = x.shape()[ax];
            // Move the reduced axis to the end, keeping the others in order, so that lane `i`
            // is output element `i` in row-major order.
            let order: Vec<usize> = (0..x.ndim()).filter(|&a| a != ax).chain([ax]).collect();
            let v = x.view().permuted_axes(order);
            let flat: Vec<S> = v.iter().copied().collect();
            ndarray::Array2::from_shape_vec((flat.len() / n.max(1), n), flat).expect("lanes reshape")
        }
    }
}

fn extreme<S: Scalar>(it: impl Iterator<Item = S>, is_max: bool) -> S {
    it.fold(if is_max { S::neg_infinity() } else { S::infinity() }, |m, v| {
        if (is_max && v > m) || (!is_max && v < m) || v.is_nan() {
            v
        } else {
            m
        }
    })
}

/// Feeds each lane into `scan`: its distance is the gap between the extremum and the
/// runner-up (0 for an exact tie), so a lane is tied within the band when that gap is.
fn reduce_ties<S: Scalar>(scan: &mut KinkScan, x: &ArrayD<S>, axis: Option<usize>, is_max: bool) {
    let lanes = lanes_of(x, axis);
    for (i, lane) in lanes.outer_iter().enumerate() {
        let m = extreme(lane.iter().copied(), is_max);
        let mut seen_extremum = false;
        let mut gap = f64::INFINITY;
        for &v in lane {
            if v == m && !seen_extremum {
                seen_extremum = true;
            } else {
                gap = gap.min((v - m).abs().to_f64_exact());
            }
        }
        scan.visit(i, gap);
    }
}

/// Spreads the gradient of a max/min reduction over the extremal elements of each lane.
#[allow(clippy::too_many_arguments)]
fn reduce_backward<S: Scalar>(
    x: &ArrayD<S>,
    y: &ArrayD<S>,
    g: ArrayD<S>,
    axis: Option<usize>,
    keep_dims: bool,
    _is_max: bool,
    rule: TieRule,
    band: S,
) -> ArrayD<S> {
    let mut gx = ArrayD::<S>::zeros(x.raw_dim());
    // Elements within the band of the extremum count as tied with it.
    let tied = move |v: S, m: S| nonsmooth::at_kink(v - m, band);
    let spread = |lane: ndarray::ArrayView1<'_, S>, mut glane: ndarray::ArrayViewMut1<'_, S>, m: S, gv: S| {
        let ties = lane.iter().filter(|&&v| tied(v, m)).count();
        if ties == 0 {
            return; // NaN lane: nothing is extremal
        }
        match rule {
            TieRule::Split | TieRule::All => {
                let share = if rule == TieRule::Split {
                    gv / S::from_usize(ties).expect("count fits")
                } else {
                    gv
                };
                Zip::from(&mut glane).and(&lane).for_each(|gi, &v| {
                    if tied(v, m) {
                        *gi = share
                    }
                });
            }
            TieRule::First => {
                let i = lane.iter().position(|&v| tied(v, m)).expect("tie exists");
                glane[i] = gv;
            }
            TieRule::Last => {
                let i = lane.iter().rposition(|&v| tied(v, m)).expect("tie exists");
                glane[i] = gv;
            }
        }
    };
    match axis {
        None => {
            let m = *y.iter().next().expect("one element");
            let gv = *g.iter().next().expect("one element");
            let flat_x: ndarray::Array1<S> = x.iter().copied().collect();
            let mut flat_g = ndarray::Array1::<S>::zeros(x.len());
            spread(flat_x.view(), flat_g.view_mut(), m, gv);
            gx = flat_g.into_shape_with_order(x.raw_dim()).expect("same size");
        }
        Some(ax) => {
            let (yv, gv) = if keep_dims {
                (y.index_axis(Axis(ax), 0), g.index_axis(Axis(ax), 0))
            } else {
                (y.view(), g.view())
            };
            Zip::from(x.lanes(Axis(ax)))
                .and(gx.lanes_mut(Axis(ax)))
                .and(&yv)
                .and(&gv)
                .for_each(|lane, glane, &m, &gval| spread(lane, glane, m, gval));
        }
    }
    gx
}

/// The tangent of a max/min reduction: per lane, the tangents of the extremal elements
/// (within `band` of the extremum) combined by the tie rule as [`reduce_backward`] spreads
/// the gradient: their mean (`Split`), their sum (`All`), the first or the last.
fn reduce_jvp<S: Scalar>(
    x: &ArrayD<S>,
    y: &ArrayD<S>,
    t: &ArrayD<S>,
    axis: Option<usize>,
    keep_dims: bool,
    rule: TieRule,
    band: S,
) -> ArrayD<S> {
    let tied = move |v: S, m: S| nonsmooth::at_kink(v - m, band);
    let gather = |lane: ndarray::ArrayView1<'_, S>, tlane: ndarray::ArrayView1<'_, S>, m: S| -> S {
        let mut ties = lane
            .iter()
            .zip(tlane.iter())
            .filter(|&(&v, _)| tied(v, m))
            .map(|(_, &t)| t);
        match rule {
            TieRule::Split => {
                let (count, sum) = ties.fold((0usize, S::zero()), |(n, s), t| (n + 1, s + t));
                if count == 0 {
                    S::zero() // NaN lane: nothing is extremal
                } else {
                    sum / S::from_usize(count).expect("count fits")
                }
            }
            TieRule::All => ties.fold(S::zero(), |s, t| s + t),
            TieRule::First => ties.next().unwrap_or_else(S::zero),
            TieRule::Last => ties.last().unwrap_or_else(S::zero),
        }
    };
    let mut out = ArrayD::<S>::zeros(y.raw_dim());
    match axis {
        None => {
            let m = *y.iter().next().expect("one element");
            let flat_x: ndarray::Array1<S> = x.iter().copied().collect();
            let flat_t: ndarray::Array1<S> = t.iter().copied().collect();
            *out.iter_mut().next().expect("one element") = gather(flat_x.view(), flat_t.view(), m);
        }
        Some(ax) => {
            let (yv, mut ov) = if keep_dims {
                (y.index_axis(Axis(ax), 0), out.index_axis_mut(Axis(ax), 0))
            } else {
                (y.view(), out.view_mut())
            };
            Zip::from(x.lanes(Axis(ax)))
                .and(t.lanes(Axis(ax)))
                .and(&yv)
                .and(&mut ov)
                .for_each(|lane, tlane, &m, o| *o = gather(lane, tlane, m));
        }
    }
    out
}

impl<'t, S: Scalar> Var<'t, S> {
    fn kink_unary(self, kind: KinkKind<S>, over: Option<Selection>, f: impl Fn(S) -> S + Sync + Send) -> Var<'t, S> {
        let value = self.with_value(|x| map(x, f));
        self.tape()
            .push(Op::Kink(KinkOp { kind, over }), Inputs::from_slice(&[self.id()]), value)
    }

    fn outside_ok(&self) -> bool {
        self.tape().policy().allow_outside_hull
    }

    /// `max(x, 0)`; relu'(0) from the policy.
    pub fn relu(self) -> Var<'t, S> {
        self.kink_unary(KinkKind::Relu, None, nonsmooth::relu)
    }

    /// relu with relu'(0) = `slope` for this node only (in [0, 1] unless the tape's policy
    /// allows selections outside the hull).
    pub fn try_relu_with(self, slope: f64) -> Result<Var<'t, S>> {
        check_selection("relu'(0)", slope, 0.0, 1.0, self.outside_ok())?;
        Ok(self.kink_unary(KinkKind::Relu, Some(Selection::Slope(slope)), nonsmooth::relu))
    }

    /// Panicking form of [`try_relu_with`](Self::try_relu_with).
    #[track_caller]
    pub fn relu_with(self, slope: f64) -> Var<'t, S> {
        crate::var::fail(self.try_relu_with(slope))
    }

    /// Leaky relu: `x` for `x > 0`, `alpha x` otherwise; the slope at 0 from the policy's
    /// `leaky_relu` position between `alpha` and 1. This form returns no `Result` and does
    /// not check `alpha`: a NaN or infinite `alpha` gives NaN values below 0 and NaN slopes,
    /// which anomaly mode reports ([`try_leaky_relu_with`](Self::try_leaky_relu_with)
    /// refuses such an `alpha`).
    pub fn leaky_relu(self, alpha: S) -> Var<'t, S> {
        self.kink_unary(KinkKind::LeakyRelu { alpha }, None, move |v| {
            nonsmooth::leaky_relu(v, alpha)
        })
    }

    /// Leaky relu with the slope at 0 set to `slope` for this node (in [min(alpha,1), max(alpha,1)]).
    pub fn try_leaky_relu_with(self, alpha: S, slope: f64) -> Result<Var<'t, S>> {
        let a = alpha.to_f64_exact();
        if !a.is_finite() {
            return Err(Error::invalid("leaky_relu", format!("alpha must be finite, got {a}")));
        }
        check_selection("leaky_relu'(0)", slope, a.min(1.0), a.max(1.0), self.outside_ok())?;
        Ok(
            self.kink_unary(KinkKind::LeakyRelu { alpha }, Some(Selection::Slope(slope)), move |v| {
                nonsmooth::leaky_relu(v, alpha)
            }),
        )
    }

    /// `|x|`; abs'(0) from the policy.
    pub fn abs(self) -> Var<'t, S> {
        self.kink_unary(KinkKind::Abs, None, S::abs)
    }

    /// `|x|` with abs'(0) = `slope` for this node (in [-1, 1]).
    pub fn try_abs_with(self, slope: f64) -> Result<Var<'t, S>> {
        check_selection("abs'(0)", slope, -1.0, 1.0, self.outside_ok())?;
        Ok(self.kink_unary(KinkKind::Abs, Some(Selection::Slope(slope)), S::abs))
    }

    /// Panicking form of [`try_abs_with`](Self::try_abs_with).
    #[track_caller]
    pub fn abs_with(self, slope: f64) -> Var<'t, S> {
        crate::var::fail(self.try_abs_with(slope))
    }

    /// `sign(x)` (-1, 0 or 1). Its derivative is 0 off 0; at 0 sign is discontinuous and the
    /// policy's `sign` value (0 by default) is used. The ledger counts exact zeros.
    pub fn sign(self) -> Var<'t, S> {
        self.kink_unary(KinkKind::Sign, None, sign_of)
    }

    /// Clamps to `[lo, hi]`; the derivative at the bounds from the policy.
    pub fn try_clamp(self, lo: S, hi: S) -> Result<Var<'t, S>> {
        self.clamp_impl(lo, hi, None)
    }

    /// Panicking form of [`try_clamp`](Self::try_clamp).
    #[track_caller]
    pub fn clamp(self, lo: S, hi: S) -> Var<'t, S> {
        crate::var::fail(self.try_clamp(lo, hi))
    }

    /// Clamp with the derivatives at `lo` and at `hi` set for this node (each in [0, 1]).
    pub fn try_clamp_with(self, lo: S, hi: S, at_low: f64, at_high: f64) -> Result<Var<'t, S>> {
        let o = self.outside_ok();
        check_selection("clamp'(low)", at_low, 0.0, 1.0, o)?;
        check_selection("clamp'(high)", at_high, 0.0, 1.0, o)?;
        self.clamp_impl(
            lo,
            hi,
            Some(Selection::Clamp {
                low: at_low,
                high: at_high,
            }),
        )
    }

    fn clamp_impl(self, lo: S, hi: S, over: Option<Selection>) -> Result<Var<'t, S>> {
        if lo.is_nan() || hi.is_nan() || lo > hi {
            return Err(Error::invalid(
                "clamp",
                format!("bounds must satisfy lo <= hi, got lo = {lo}, hi = {hi}"),
            ));
        }
        Ok(self.kink_unary(KinkKind::Clamp { lo, hi }, over, move |v| {
            if v < lo {
                lo
            } else if v > hi {
                hi
            } else {
                v
            }
        }))
    }

    fn extremum2(self, other: Var<'t, S>, is_max: bool, over: Option<Selection>) -> Result<Var<'t, S>> {
        let name = if is_max { "maximum" } else { "minimum" };
        self.check_same(name, &other)?;
        let value = {
            let nodes = self.tape().nodes();
            let (a, b) = (&nodes[self.id()].value, &nodes[other.id()].value);
            // Propagates NaN (a comparison with NaN is false both ways).
            let pick = move |a: S, b: S| {
                let (keep_a, keep_b) = if is_max { (a >= b, a < b) } else { (a <= b, a > b) };
                if keep_a {
                    a
                } else if keep_b {
                    b
                } else {
                    a + b
                }
            };
            if a.shape() == b.shape() {
                zip_map(a, b, pick)
            } else {
                let shape = broadcast_shape(name, a.shape(), b.shape())?;
                Zip::from(&broadcast_view(a, &shape))
                    .and(&broadcast_view(b, &shape))
                    .map_collect(|&a, &b| pick(a, b))
            }
        };
        let kind = if is_max { KinkKind::Maximum } else { KinkKind::Minimum };
        Ok(self.tape().push(
            Op::Kink(KinkOp { kind, over }),
            Inputs::from_slice(&[self.id(), other.id()]),
            value,
        ))
    }

    /// Elementwise maximum (broadcasting); a tie is split by the policy's `tie_weight`.
    pub fn try_maximum(self, other: Var<'t, S>) -> Result<Var<'t, S>> {
        self.extremum2(other, true, None)
    }
    /// Panicking form of [`try_maximum`](Self::try_maximum).
    #[track_caller]
    pub fn maximum(self, other: Var<'t, S>) -> Var<'t, S> {
        crate::var::fail(self.try_maximum(other))
    }
    /// Elementwise maximum sending the share `weight` of a tie to `self` (in [0, 1]).
    pub fn try_maximum_with(self, other: Var<'t, S>, weight: f64) -> Result<Var<'t, S>> {
        check_selection("maximum tie weight", weight, 0.0, 1.0, self.outside_ok())?;
        self.extremum2(other, true, Some(Selection::TieWeight(weight)))
    }
    /// Elementwise minimum (broadcasting); a tie is split by the policy's `tie_weight`.
    pub fn try_minimum(self, other: Var<'t, S>) -> Result<Var<'t, S>> {
        self.extremum2(other, false, None)
    }
    /// Panicking form of [`try_minimum`](Self::try_minimum).
    #[track_caller]
    pub fn minimum(self, other: Var<'t, S>) -> Var<'t, S> {
        crate::var::fail(self.try_minimum(other))
    }
    /// Elementwise minimum sending the share `weight` of a tie to `self` (in [0, 1]).
    pub fn try_minimum_with(self, other: Var<'t, S>, weight: f64) -> Result<Var<'t, S>> {
        check_selection("minimum tie weight", weight, 0.0, 1.0, self.outside_ok())?;
        self.extremum2(other, false, Some(Selection::TieWeight(weight)))
    }

    fn reduce_ext(
        self,
        axis: Option<usize>,
        keep_dims: bool,
        is_max: bool,
        rule: Option<TieRule>,
    ) -> Result<Var<'t, S>> {
        let name = match (axis, is_max) {
            (Some(_), true) => "max_axis",
            (Some(_), false) => "min_axis",
            (None, true) => "max_all",
            (None, false) => "min_all",
        };
        if let Some(r) = rule {
            check_tie_rule(r, self.outside_ok())?;
        }
        let value = self.with_value(|x| -> Result<ArrayD<S>> {
            if x.is_empty() {
                return Err(Error::invalid(name, "cannot take the extremum of an empty array"));
            }
            match axis {
                None => Ok(ArrayD::from_elem(IxDyn(&[]), extreme(x.iter().copied(), is_max))),
                Some(ax) => {
                    check_axis(name, ax, x.ndim())?;
                    if x.shape()[ax] == 0 {
                        return Err(Error::invalid(name, format!("axis {ax} has length 0")));
                    }
                    let r = x.map_axis(Axis(ax), |lane| extreme(lane.iter().copied(), is_max));
                    Ok(if keep_dims { r.insert_axis(Axis(ax)) } else { r })
                }
            }
        })?;
        let over = rule.map(Selection::Tie);
        let kind = KinkKind::Reduce {
            axis,
            keep_dims,
            is_max,
        };
        Ok(self
            .tape()
            .push(Op::Kink(KinkOp { kind, over }), Inputs::from_slice(&[self.id()]), value))
    }

    /// Maximum along `axis` (removed unless `keep_dims`); ties follow the policy's `reduce_tie`.
    pub fn try_max_axis(self, axis: usize, keep_dims: bool) -> Result<Var<'t, S>> {
        self.reduce_ext(Some(axis), keep_dims, true, None)
    }
    /// Panicking form of [`try_max_axis`](Self::try_max_axis).
    #[track_caller]
    pub fn max_axis(self, axis: usize, keep_dims: bool) -> Var<'t, S> {
        crate::var::fail(self.try_max_axis(axis, keep_dims))
    }
    /// Maximum along `axis` with the tie rule set for this node.
    pub fn try_max_axis_with(self, axis: usize, keep_dims: bool, rule: TieRule) -> Result<Var<'t, S>> {
        self.reduce_ext(Some(axis), keep_dims, true, Some(rule))
    }
    /// Minimum along `axis`; ties follow the policy's `reduce_tie`.
    pub fn try_min_axis(self, axis: usize, keep_dims: bool) -> Result<Var<'t, S>> {
        self.reduce_ext(Some(axis), keep_dims, false, None)
    }
    /// Panicking form of [`try_min_axis`](Self::try_min_axis).
    #[track_caller]
    pub fn min_axis(self, axis: usize, keep_dims: bool) -> Var<'t, S> {
        crate::var::fail(self.try_min_axis(axis, keep_dims))
    }
    /// Minimum along `axis` with the tie rule set for this node.
    pub fn try_min_axis_with(self, axis: usize, keep_dims: bool, rule: TieRule) -> Result<Var<'t, S>> {
        self.reduce_ext(Some(axis), keep_dims, false, Some(rule))
    }
    /// Maximum of all elements (a 0-d Var).
    pub fn try_max_all(self) -> Result<Var<'t, S>> {
        self.reduce_ext(None, false, true, None)
    }
    /// Panicking form of [`try_max_all`](Self::try_max_all).
    #[track_caller]
    pub fn max_all(self) -> Var<'t, S> {
        crate::var::fail(self.try_max_all())
    }
    /// Minimum of all elements (a 0-d Var).
    pub fn try_min_all(self) -> Result<Var<'t, S>> {
        self.reduce_ext(None, false, false, None)
    }
    /// Panicking form of [`try_min_all`](Self::try_min_all).
    #[track_caller]
    pub fn min_all(self) -> Var<'t, S> {
        crate::var::fail(self.try_min_all())
    }
}

/// The element at row-major flat index `i`.
fn flat<S: Scalar, D: ndarray::Data<Elem = S>>(a: &ndarray::ArrayBase<D, IxDyn>, i: usize) -> S {
    match a.as_slice() {
        Some(s) => s[i],
        None => a[unravel(a.shape(), i).as_slice()],
    }
}

/// Mutable element at row-major flat index `i`.
fn flat_mut<S: Scalar>(a: &mut ArrayD<S>, i: usize) -> &mut S {
    let idx = unravel(a.shape(), i);
    if a.is_standard_layout() {
        &mut a.as_slice_mut().expect("standard layout")[i]
    } else {
        &mut a[idx.as_slice()]
    }
}

/// Multi-index of row-major flat index `i` in `shape`.
fn unravel(shape: &[usize], mut i: usize) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (k, &d) in shape.iter().enumerate().rev() {
        idx[k] = i % d.max(1);
        i /= d.max(1);
    }
    idx
}

#[inline]
fn sign_of<S: Scalar>(v: S) -> S {
    if v > S::zero() {
        S::one()
    } else if v < S::zero() {
        -S::one()
    } else {
        v // keeps 0 (and NaN)
    }
}

#[cfg(test)]
mod scan_tests {
    use super::has_zero;

    #[test]
    fn has_zero_finds_a_zero_at_every_position_of_blocks_and_remainder() {
        for len in [0usize, 1, 7, 8, 9, 19] {
            let ones = vec![1.0f64; len];
            assert!(!has_zero(&ones, &|v| v), "len {len}");
            for at in 0..len {
                let mut s = ones.clone();
                s[at] = -0.0;
                assert!(has_zero(&s, &|v| v), "len {len}, zero at {at}");
                // The distance function is applied: a clamp-like shift.
                assert!(has_zero(&ones, &|v| v - 1.0), "len {len}");
            }
        }
    }
}
