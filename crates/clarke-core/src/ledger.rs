//! The kink ledger: which nonsmooth nodes sat at a kink, and which selection was applied.
//!
//! Every backward call returns a [`KinkLedger`] beside the gradients. A record per nonsmooth
//! node on the gradient path says how many of its elements sat *exactly* at the kink (where
//! the policy's selection decided the derivative), how many sat within the policy's
//! tolerance band, and which selection was used. An empty ledger (no exact hits) means the
//! gradient did not depend on any selection: it is the gradient of every program computing
//! the same function, at that point.

use std::fmt;

use crate::policy::TieRule;

/// The selection a nonsmooth node applied at its kink.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Selection {
    /// A derivative value at the kink (relu'(0), abs'(0), sign'(0), leaky relu's slope).
    Slope(f64),
    /// Clamp derivatives at the lower and upper bound.
    Clamp {
        /// Derivative at `x == lo`.
        low: f64,
        /// Derivative at `x == hi`.
        high: f64,
    },
    /// The share of a tie sent to the first argument of `maximum`/`minimum`.
    TieWeight(f64),
    /// The tie rule of a reduction.
    Tie(TieRule),
}

impl fmt::Display for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selection::Slope(s) => write!(f, "slope {s}"),
            Selection::Clamp { low, high } => write!(f, "bounds ({low}, {high})"),
            Selection::TieWeight(w) => write!(f, "tie weight {w}"),
            Selection::Tie(r) => write!(f, "ties {r}"),
        }
    }
}

/// What one nonsmooth node saw.
#[derive(Debug, Clone, PartialEq)]
pub struct KinkRecord {
    /// Node id on the tape.
    pub node: usize,
    /// The op (`"relu"`, `"abs"`, `"maximum"`, `"max_axis"`, ...).
    pub op: &'static str,
    /// Elements examined (for reductions: output elements, one per reduced lane).
    pub elements: usize,
    /// Elements exactly at the kink: their derivative is the selection.
    pub exact: usize,
    /// Elements off the kink but within the policy's tolerance of it.
    pub near: usize,
    /// The selection applied at the kink.
    pub selection: Selection,
    /// Whether the selection came from a per-op override rather than the policy.
    pub overridden: bool,
    /// Flat (row-major) indices of the exact kink elements (for reductions: of the lanes).
    pub kink_indices: Vec<usize>,
    /// The interval an [`ElementSelection`](crate::ElementSelection) at one of these kinks
    /// ranges over: the convex hull of the one-sided derivatives (relu `[0, 1]`, abs
    /// `[-1, 1]`, leaky relu `[alpha, 1]`, sign `[0, 0]`, clamp `[0, 1]`, the tie weight of
    /// maximum/minimum `[0, 1]`). `None` for reductions, whose ties follow a rule instead.
    /// The hypothesis check of implicit layers walks the vertices of these intervals.
    pub hull: Option<(f64, f64)>,
}

/// The kink records of one backward call (or of [`Tape::kink_ledger`](crate::Tape::kink_ledger)).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KinkLedger {
    /// Name of the policy the selections came from.
    pub policy: &'static str,
    records: Vec<KinkRecord>,
}

impl KinkLedger {
    pub(crate) fn new(policy: &'static str) -> Self {
        KinkLedger {
            policy,
            records: Vec::new(),
        }
    }

    /// A ledger from records produced outside the tape: a fused layer (a DEQ cell, a
    /// prox operator) that resolves its own kinks reports them here, so users read one
    /// format whatever produced the gradient. Records are kept in node order.
    pub fn from_records(policy: &'static str, mut records: Vec<KinkRecord>) -> Self {
        records.sort_by_key(|r| r.node);
        KinkLedger { policy, records }
    }

    pub(crate) fn push(&mut self, record: KinkRecord) {
        self.records.push(record);
    }

    pub(crate) fn sort(&mut self) {
        self.records.sort_by_key(|r| r.node);
    }

    /// All records, in node order.
    pub fn records(&self) -> &[KinkRecord] {
        &self.records
    }

    /// The record of one node, if it is nonsmooth and was on the gradient path.
    pub fn record(&self, node: usize) -> Option<&KinkRecord> {
        self.records.iter().find(|r| r.node == node)
    }

    /// Records with at least one exact kink hit.
    pub fn hits(&self) -> impl Iterator<Item = &KinkRecord> {
        self.records.iter().filter(|r| r.exact > 0)
    }

    /// Total number of elements exactly at a kink.
    pub fn exact_hits(&self) -> usize {
        self.records.iter().map(|r| r.exact).sum()
    }

    /// Total number of elements within the tolerance band but not exactly at a kink.
    pub fn near_hits(&self) -> usize {
        self.records.iter().map(|r| r.near).sum()
    }

    /// Whether no element sat exactly at a kink: the gradient did not depend on any selection.
    pub fn is_clean(&self) -> bool {
        self.exact_hits() == 0
    }

    /// One line: `kinks (pytorch): 3 exact, 0 near in 2 of 5 nonsmooth nodes [relu#4: 2/640 slope 0; ...]`.
    pub fn summary(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for KinkLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hit: Vec<&KinkRecord> = self.records.iter().filter(|r| r.exact > 0 || r.near > 0).collect();
        write!(
            f,
            "kinks ({}): {} exact, {} near in {} of {} nonsmooth nodes",
            self.policy,
            self.exact_hits(),
            self.near_hits(),
            hit.len(),
            self.records.len()
        )?;
        if !hit.is_empty() {
            f.write_str(" [")?;
            for (i, r) in hit.iter().enumerate() {
                if i > 0 {
                    f.write_str("; ")?;
                }
                write!(f, "{}#{}: {}/{} {}", r.op, r.node, r.exact, r.elements, r.selection)?;
                if r.near > 0 {
                    write!(f, " (+{} near)", r.near)?;
                }
                if r.overridden {
                    f.write_str(" (override)")?;
                }
            }
            f.write_str("]")?;
        }
        Ok(())
    }
}
