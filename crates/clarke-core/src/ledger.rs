//! The kink ledger: which nonsmooth nodes sat at a kink, and which selection was applied.
//!
//! Every backward call returns a [`KinkLedger`] beside the gradients. A record per nonsmooth
//! node on the gradient path (a core op, a fused op, or a kink inside a layer, attributed to
//! the layer) says how many of its elements were treated as *at* the kink, and why:
//!
//! - **exact**: the element sits exactly on the kink;
//! - **near**: within the policy's [`tolerance`](crate::KinkPolicy::tolerance) of it;
//! - **within solver error**: within the a-posteriori error bound of the solver that produced
//!   the point (a fixed point or a Lasso solution is only known to its tolerance, so an
//!   element whose distance to the kink is below that bound may be on it).
//!
//! All three get the selection of the backward call's policy, and the hypothesis check of
//! implicit layers walks all three. An empty ledger (no element treated at a kink) means the
//! gradient did not depend on any selection.

use std::fmt;

use std::borrow::Cow;

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
            Selection::Slope(s) => write!(f, "selection {s}"),
            Selection::Clamp { low, high } => write!(f, "bounds ({low}, {high})"),
            Selection::TieWeight(w) => write!(f, "tie weight {w}"),
            Selection::Tie(r) => write!(f, "ties {r}"),
        }
    }
}

/// What one nonsmooth node saw.
#[derive(Debug, Clone, PartialEq)]
pub struct KinkRecord {
    /// Node id on the tape of the backward call (for a kink inside a layer: the layer's node).
    pub node: usize,
    /// The nonsmooth function (`"relu"`, `"abs"`, `"maximum"`, `"soft_threshold"`, ...).
    pub op: &'static str,
    /// The layer holding this kink, when it sits inside a fused layer or an implicit node
    /// (`"deq"`, `"fixed_point"`, a conic layer's name); `None` for a node of its own.
    pub layer: Option<String>,
    /// Shape of the examined elements (flat indices below are row-major in it).
    pub shape: Vec<usize>,
    /// Elements examined (for reductions: output elements, one per reduced lane).
    pub elements: usize,
    /// Elements exactly at the kink.
    pub exact: usize,
    /// Elements off the kink but within the policy's tolerance of it (treated as at it).
    pub near: usize,
    /// Elements beyond the policy's tolerance but within the solver's error bound of the
    /// kink (treated as at it).
    pub within_solver_error: usize,
    /// The solver's error bound in force for this node (0 when none): the band, in the units
    /// of the kink's argument, inside which an element counts as *within solver error*.
    pub solver_band: f64,
    /// Largest distance to the kink among the elements treated as at it (0 when all are
    /// exact).
    pub max_distance: f64,
    /// The selection applied at the kink.
    pub selection: Selection,
    /// Whether the selection came from a per-op override rather than the policy.
    pub overridden: bool,
    /// Flat (row-major) indices of the elements treated as at the kink (exact, near and within
    /// solver error; for reductions: of the lanes), in increasing order.
    pub kink_indices: Vec<usize>,
    /// The interval an [`ElementSelection`](crate::ElementSelection) at one of these kinks
    /// ranges over: the convex hull of the one-sided derivatives (relu `[0, 1]`, abs
    /// `[-1, 1]`, leaky relu `[alpha, 1]`, sign `[0, 0]`, clamp `[0, 1]`, the tie weight of
    /// maximum/minimum `[0, 1]`). `None` for reductions, whose ties follow a rule instead.
    /// The hypothesis check of implicit layers walks the vertices of these intervals.
    pub hull: Option<(f64, f64)>,
}

impl KinkRecord {
    /// Elements treated as at the kink: exact, near and within solver error.
    pub fn at_kink(&self) -> usize {
        self.exact + self.near + self.within_solver_error
    }

    /// The record attributed to a layer: `node` becomes the layer's node on the outer tape.
    pub fn in_layer(mut self, layer: &str, node: usize) -> Self {
        self.layer = Some(layer.to_string());
        self.node = node;
        self
    }

    /// The multi-index of flat index `i` in [`shape`](Self::shape). `i` is meant to be one
    /// of [`kink_indices`](Self::kink_indices); an index past the shape's element count wraps
    /// around the first axis.
    pub fn position(&self, i: usize) -> Vec<usize> {
        let mut idx = vec![0; self.shape.len()];
        let mut rest = i;
        for (k, &d) in self.shape.iter().enumerate().rev() {
            idx[k] = rest % d.max(1);
            rest /= d.max(1);
        }
        idx
    }
}

/// Classifies elements by their distance to a kink and builds a [`KinkRecord`].
///
/// Every nonsmooth op, core or fused, scans its kink arguments with one of these so that the
/// three classes (exact, near, within solver error) mean the same thing everywhere. The band
/// inside which an element is treated as at the kink is `max(tolerance, solver_band)`.
#[derive(Debug, Clone)]
pub struct KinkScan {
    tolerance: f64,
    solver_band: f64,
    widest_band: f64,
    elements: usize,
    exact: usize,
    near: usize,
    solver: usize,
    max_distance: f64,
    indices: Vec<usize>,
}

impl KinkScan {
    /// A scan with the policy's `tolerance` and the solver's error band. Both are meant to
    /// be finite and `>= 0`, as a validated policy and a backward call's
    /// [`VjpContext`](crate::VjpContext) give them; a NaN or negative band is not refused
    /// here (this constructor returns no `Result`) and widens nothing: only exact hits count.
    pub fn new(tolerance: f64, solver_band: f64) -> Self {
        KinkScan {
            tolerance,
            solver_band,
            widest_band: solver_band,
            elements: 0,
            exact: 0,
            near: 0,
            solver: 0,
            max_distance: 0.0,
            indices: Vec::new(),
        }
    }

    /// Changes the solver band for the elements visited next (a batched layer whose samples
    /// were solved to different accuracies); the record reports the widest band used.
    pub fn set_solver_band(&mut self, band: f64) {
        self.solver_band = band;
        self.widest_band = self.widest_band.max(band);
    }

    /// The band inside which an element is treated as at the kink.
    pub fn band(&self) -> f64 {
        self.tolerance.max(self.solver_band)
    }

    /// Visits element `index` at `distance` from its kink (any sign); returns whether it is
    /// treated as at the kink. Indices must be visited in increasing order. A NaN distance
    /// is never at a kink.
    #[inline]
    pub fn visit(&mut self, index: usize, distance: f64) -> bool {
        self.elements += 1;
        let d = distance.abs();
        if d == 0.0 {
            self.exact += 1;
        } else if d <= self.tolerance {
            self.near += 1;
        } else if d <= self.solver_band {
            self.solver += 1;
        } else {
            return false;
        }
        self.max_distance = self.max_distance.max(d);
        self.indices.push(index);
        true
    }

    /// Counts `n` elements that are off every kink, without visiting them.
    pub fn skip(&mut self, n: usize) {
        self.elements += n;
    }

    /// Elements counted so far, visited or skipped.
    pub fn elements(&self) -> usize {
        self.elements
    }

    /// Elements treated as at the kink so far.
    pub fn hits(&self) -> usize {
        self.indices.len()
    }

    /// The record of node `node`.
    pub fn finish(
        self,
        node: usize,
        op: &'static str,
        shape: &[usize],
        selection: Selection,
        hull: Option<(f64, f64)>,
    ) -> KinkRecord {
        KinkRecord {
            node,
            op,
            layer: None,
            shape: shape.to_vec(),
            elements: self.elements,
            exact: self.exact,
            near: self.near,
            within_solver_error: self.solver,
            solver_band: self.widest_band,
            max_distance: self.max_distance,
            selection,
            overridden: false,
            kink_indices: self.indices,
            hull,
        }
    }
}

/// The kink records of one backward call (or of [`Tape::kink_ledger`](crate::Tape::kink_ledger)).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KinkLedger {
    /// The policy the selections came from: a preset's name, or `"custom"` with the values
    /// that differ from the preset it started from (see [`KinkPolicy::label`](crate::KinkPolicy::label)).
    pub policy: Cow<'static, str>,
    records: Vec<KinkRecord>,
}

impl KinkLedger {
    pub(crate) fn new(policy: Cow<'static, str>) -> Self {
        KinkLedger {
            policy,
            records: Vec::new(),
        }
    }

    /// A ledger from records produced outside a backward call (a standalone analysis, such as
    /// the support of a Lasso solution). Records are kept in node order.
    pub fn from_records(policy: impl Into<Cow<'static, str>>, mut records: Vec<KinkRecord>) -> Self {
        records.sort_by_key(|r| r.node);
        KinkLedger {
            policy: policy.into(),
            records,
        }
    }

    pub(crate) fn push(&mut self, record: KinkRecord) {
        self.records.push(record);
    }

    /// Reverses the order of the records (a sweep that pushed them from the last node down
    /// puts them in node order so).
    pub(crate) fn reverse(&mut self) {
        self.records.reverse();
    }

    pub(crate) fn sort(&mut self) {
        // Stable: the records of one layer keep the order the layer gave them.
        self.records.sort_by_key(|r| r.node);
    }

    /// All records, in node order.
    pub fn records(&self) -> &[KinkRecord] {
        &self.records
    }

    /// The first record of one node, if it is nonsmooth and was on the gradient path.
    pub fn record(&self, node: usize) -> Option<&KinkRecord> {
        self.records.iter().find(|r| r.node == node)
    }

    /// The records of the kinks inside layer `name`.
    pub fn in_layer<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a KinkRecord> {
        self.records.iter().filter(move |r| r.layer.as_deref() == Some(name))
    }

    /// Records with at least one element treated as at the kink.
    pub fn hits(&self) -> impl Iterator<Item = &KinkRecord> {
        self.records.iter().filter(|r| r.at_kink() > 0)
    }

    /// Total number of elements exactly at a kink.
    pub fn exact_hits(&self) -> usize {
        self.records.iter().map(|r| r.exact).sum()
    }

    /// Total number of elements within the policy's tolerance but not exactly at a kink.
    pub fn near_hits(&self) -> usize {
        self.records.iter().map(|r| r.near).sum()
    }

    /// Total number of elements within a solver's error bound of a kink (and beyond the
    /// policy's tolerance).
    pub fn solver_error_hits(&self) -> usize {
        self.records.iter().map(|r| r.within_solver_error).sum()
    }

    /// Total number of elements treated as at a kink (all three classes).
    pub fn kink_elements(&self) -> usize {
        self.records.iter().map(|r| r.at_kink()).sum()
    }

    /// Whether no element was treated as at a kink: the gradient did not depend on any
    /// selection.
    pub fn is_clean(&self) -> bool {
        self.kink_elements() == 0
    }

    /// One line: `kinks (pytorch): 3 exact, 0 near, 1 within solver error in 2 of 5 nonsmooth
    /// nodes [relu#4: 2/640 selection 0; deq#7 relu: 1/40 selection 0 (1 within solver error
    /// <= 2.1e-7, at [0, 1])]`.
    pub fn summary(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for KinkRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.layer {
            Some(layer) => write!(f, "{layer}#{} {}", self.node, self.op)?,
            None => write!(f, "{}#{}", self.op, self.node)?,
        }
        write!(f, ": {}/{} {}", self.at_kink(), self.elements, self.selection)?;
        let mut notes = Vec::new();
        if self.near > 0 {
            notes.push(format!("{} near", self.near));
        }
        if self.within_solver_error > 0 {
            notes.push(format!(
                "{} within solver error, distance <= {:.2e}, bound {:.2e}",
                self.within_solver_error, self.max_distance, self.solver_band
            ));
        }
        if self.overridden {
            notes.push("override".to_string());
        }
        if !self.kink_indices.is_empty() && self.kink_indices.len() <= 4 && self.shape.len() > 1 {
            let at: Vec<String> = self
                .kink_indices
                .iter()
                .map(|&i| format!("{:?}", self.position(i)))
                .collect();
            notes.push(format!("at {}", at.join(", ")));
        }
        if !notes.is_empty() {
            write!(f, " ({})", notes.join("; "))?;
        }
        Ok(())
    }
}

impl fmt::Display for KinkLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hit: Vec<&KinkRecord> = self.hits().collect();
        write!(
            f,
            "kinks ({}): {} exact, {} near, {} within solver error in {} of {} nonsmooth nodes",
            self.policy,
            self.exact_hits(),
            self.near_hits(),
            self.solver_error_hits(),
            hit.len(),
            self.records.len()
        )?;
        if !hit.is_empty() {
            f.write_str(" [")?;
            for (i, r) in hit.iter().enumerate() {
                if i > 0 {
                    f.write_str("; ")?;
                }
                write!(f, "{r}")?;
            }
            f.write_str("]")?;
        }
        Ok(())
    }
}
