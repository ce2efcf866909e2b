//! Kink sites of the fused prox and projection ops, and their ledger records.
//!
//! The prox and projection ops of this crate resolve their own kinks (the threshold of
//! soft-thresholding, the boundary of a group, the active-set boundary of a simplex
//! projection) inside one fused node. Each op returns a [`Prox`]: the output [`Var`] and a
//! [`KinkSite`] that says which elements sat exactly at the kink when the op was recorded.
//! [`Prox::record`] turns the site into a [`KinkRecord`] under any [`KinkPolicy`] (the one
//! the backward call used), in the same format the tape's own nonsmooth ops report, and
//! [`merge_ledger`] adds such records to a backward ledger.

use clarke_core::{KinkLedger, KinkPolicy, KinkRecord, Scalar, Selection, Var};

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
        match self.kind {
            SiteKind::SoftThreshold => policy.soft_threshold,
            SiteKind::Relu => policy.relu,
        }
    }

    /// The ledger record of this site under `policy`.
    pub fn record(&self, policy: &KinkPolicy) -> KinkRecord {
        KinkRecord {
            node: self.node,
            op: self.op,
            elements: self.elements,
            exact: self.kink_indices.len(),
            near: self.near,
            selection: Selection::Slope(self.selection(policy)),
            overridden: false,
            kink_indices: self.kink_indices.clone(),
            hull: Some((0.0, 1.0)),
        }
    }
}

/// The output of a fused prox or projection op: the value on the tape and its kink site.
#[derive(Debug, Clone)]
pub struct Prox<'t, S: Scalar> {
    /// The op's output.
    pub out: Var<'t, S>,
    /// The kinks it hit.
    pub site: KinkSite,
}

impl<'t, S: Scalar> Prox<'t, S> {
    /// The output Var.
    pub fn var(&self) -> Var<'t, S> {
        self.out
    }

    /// The ledger record under `policy` (pass the policy of the backward call).
    pub fn record(&self, policy: &KinkPolicy) -> KinkRecord {
        self.site.record(policy)
    }

    /// Whether no element sat exactly at the kink.
    pub fn is_clean(&self) -> bool {
        self.site.kink_indices.is_empty()
    }
}

/// A ledger holding the records of `ledger` (from a backward call) and `extra` (from fused
/// ops), in node order.
pub fn merge_ledger(ledger: &KinkLedger, extra: impl IntoIterator<Item = KinkRecord>) -> KinkLedger {
    let mut records: Vec<KinkRecord> = ledger.records().to_vec();
    records.extend(extra);
    KinkLedger::from_records(ledger.policy, records)
}
