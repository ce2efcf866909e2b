//! The kinks of the fused prox and projection ops, through clarke-core's nonsmooth protocol.
//!
//! The prox and projection ops of this crate resolve their own kinks (the threshold of
//! soft-thresholding, the boundary of a group, the active-set boundary of a simplex
//! projection) inside one fused node. Every one of them is a `max(gap, 0)`-type kink: the
//! derivative is 1 where the gap is positive, 0 where it is negative, and the policy's
//! selection where it is zero. `resolve` (crate-internal) is that rule, shared by all of them
//! and by both modes (VJP and JVP): it applies the call's policy inside the call's band (so
//! kinks within a solver's error are selected), honours per-element selections, and reports
//! the record to the call's ledger. `declare` tells the tape which side of its kinks each
//! element sits on, so that gradcheck refuses to difference across them.
//!
//! Each op also returns a [`Prox`]: the output [`Var`] and a [`KinkSite`], what the op saw
//! when it was recorded (exact kinks and near ones under the recording tape's tolerance).

use clarke_core::policy::check_selection;
use clarke_core::{KinkPolicy, KinkScan, Result, Scalar, Selection, Var, VjpContext};

/// Which policy field governs the selection at a site's kinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteKind {
    /// Soft-thresholding and its relatives (group soft-thresholding, the l1-ball
    /// projection): the derivative `q` at `|u| == lambda` is [`KinkPolicy::soft_threshold`].
    SoftThreshold,
    /// The simplex projection `max(u - tau, 0)`: the derivative at `u_i == tau` is
    /// [`KinkPolicy::relu`].
    Relu,
}

impl SiteKind {
    /// The selection this kind of kink takes under `policy`.
    pub fn selection(self, policy: &KinkPolicy) -> f64 {
        match self {
            SiteKind::SoftThreshold => policy.soft_threshold,
            SiteKind::Relu => policy.relu,
        }
    }
}

/// The kinks one fused op hit when it was recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct KinkSite {
    /// Node id of the op's output on its tape.
    pub node: usize,
    /// The op (`"soft_threshold"`, `"group_soft_threshold"`, `"project_simplex"`, ...).
    pub op: &'static str,
    /// Elements examined (for group ops: groups).
    pub elements: usize,
    /// Flat indices of the elements (or groups) exactly at the kink.
    pub kink_indices: Vec<usize>,
    /// Elements off the kink but within the recording tape's tolerance of it.
    pub near: usize,
    /// Which policy field selects the derivative there.
    pub kind: SiteKind,
}

impl KinkSite {
    /// The selection this site applies under `policy`.
    pub fn selection(&self, policy: &KinkPolicy) -> f64 {
        self.kind.selection(policy)
    }
}

/// The output of a fused prox or projection op: the value on the tape and its kink site.
#[derive(Debug, Clone)]
pub struct Prox<'t, S: Scalar> {
    /// The op's output.
    pub out: Var<'t, S>,
    /// The kinks it hit when it was recorded. The ledger of every backward or forward-mode
    /// call through the op lists them too, under that call's policy and band.
    pub site: KinkSite,
}

impl<'t, S: Scalar> Prox<'t, S> {
    /// The output Var.
    pub fn var(&self) -> Var<'t, S> {
        self.out
    }

    /// Whether no element sat exactly at the kink.
    pub fn is_clean(&self) -> bool {
        self.site.kink_indices.is_empty()
    }
}

/// The derivative of each element's `max(gap, 0)`-type kink in one backward or forward-mode
/// call (the VJP and the JVP of an op both call it, so they select alike): 1 above
/// the call's band, 0 below it, and inside it the policy's selection (or the element's own
/// selection, when the call gives one). Reports the ledger record of the node.
pub(crate) fn resolve(
    ctx: &VjpContext<'_>,
    op: &'static str,
    kind: SiteKind,
    shape: &[usize],
    gaps: impl IntoIterator<Item = f64>,
) -> Result<Vec<f64>> {
    for e in ctx.element_selections {
        check_selection(op, e.value, 0.0, 1.0, ctx.policy.allow_outside_hull)?;
    }
    let selection = kind.selection(ctx.policy);
    let mut scan = KinkScan::new(ctx.policy.tolerance, ctx.solver_band);
    let band = scan.band();
    let d: Vec<f64> = gaps
        .into_iter()
        .enumerate()
        .map(|(i, gap)| {
            if scan.visit(i, gap) {
                ctx.element_selections
                    .iter()
                    .rev()
                    .find(|e| e.element == i)
                    .map_or(selection, |e| e.value)
            } else if gap > band {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    ctx.report_kinks([scan.finish(ctx.node, op, shape, Selection::Slope(selection), Some((0.0, 1.0)))]);
    Ok(d)
}

/// Declares on `out`'s tape which side of its kink each element sits on (the sign of its
/// gap), for gradcheck.
pub(crate) fn declare<S: Scalar>(out: Var<'_, S>, op: &'static str, gaps: impl IntoIterator<Item = f64>) -> Result<()> {
    let codes = gaps
        .into_iter()
        .map(|g| {
            if g > 0.0 {
                1
            } else if g < 0.0 {
                -1
            } else {
                0
            }
        })
        .collect();
    out.tape().declare_kink_regions(out, op, codes)
}
