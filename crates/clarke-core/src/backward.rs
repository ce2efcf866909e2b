//! Reverse-mode sweep over the tape.

use std::cell::RefCell;

use ndarray::ArrayD;
use smallvec::SmallVec;

use crate::grads::Grads;
use crate::kernels::add_into;
use crate::ledger::KinkLedger;
use crate::op::{Ctx, InputValues, Op};
use crate::policy::{KinkPolicy, check_selection};
use crate::tape::{Tape, first_non_finite, non_finite};
use crate::var::Var;
use crate::{Error, Result, Scalar, Stage};

/// Options of one backward call.
#[derive(Debug, Clone, Default)]
pub struct BackwardOptions<S: Scalar> {
    /// Gradient of the output (its shape). Required for outputs with more than one element.
    pub seed: Option<ArrayD<S>>,
    /// Kink policy for this call instead of the tape's. Per-op overrides still win.
    pub policy: Option<KinkPolicy>,
    /// Selections for single kink elements, overriding everything else at those elements.
    pub element_selections: Vec<ElementSelection>,
    /// The error bound of the solver that produced the point (0 by default): every element
    /// whose argument lies within this distance of a kink is treated as at the kink (the
    /// selection applies, the ledger reports it as *within solver error*). Implicit layers set
    /// it when they differentiate their map at a solution that is only known to the solver's
    /// accuracy. Finite and non-negative.
    pub solver_band: f64,
}

/// The selection at one element of one nonsmooth node, for one backward call.
///
/// This is how a check explores the conservative Jacobian element by element: the implicit
/// layers' hypothesis check flips the selection at each kink the inner map hit. `element` is
/// the flat (row-major) index reported in the ledger's `kink_indices`. The value is the
/// derivative at that element (relu, leaky relu, abs, sign; for clamp the derivative at
/// whichever bound the element sits on) or the share sent to the first argument
/// (`maximum`/`minimum`; with broadcasting, `element` indexes the broadcast shape, as in the
/// ledger). It applies only where the element is treated as at the kink (exactly on it, or
/// within the call's band); elsewhere the ordinary derivative stands. Backward refuses a
/// selection it would not apply: for a node that is not nonsmooth, a max/min reduction
/// (whose ties follow a [`TieRule`](crate::TieRule)), a node recorded after the output or
/// an element past the node's elements; and a value outside the element's hull unless the
/// call's policy allows selections outside the hull. Custom nodes receive the selections
/// for their own id through [`VjpContext`](crate::VjpContext).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ElementSelection {
    /// Node id of the nonsmooth op.
    pub node: usize,
    /// Flat index of the element.
    pub element: usize,
    /// The selection there.
    pub value: f64,
}

impl<S: Scalar> BackwardOptions<S> {
    /// Options with a seed.
    pub fn seed(seed: ArrayD<S>) -> Self {
        BackwardOptions {
            seed: Some(seed),
            ..Default::default()
        }
    }
    /// Options with a kink policy.
    pub fn policy(policy: KinkPolicy) -> Self {
        BackwardOptions {
            policy: Some(policy),
            ..Default::default()
        }
    }
    /// Adds a seed.
    pub fn with_seed(mut self, seed: ArrayD<S>) -> Self {
        self.seed = Some(seed);
        self
    }
    /// Adds a kink policy.
    pub fn with_policy(mut self, policy: KinkPolicy) -> Self {
        self.policy = Some(policy);
        self
    }
    /// Sets the solver error band (see [`BackwardOptions::solver_band`]).
    pub fn with_solver_band(mut self, band: f64) -> Self {
        self.solver_band = band;
        self
    }
    /// Adds a selection for one kink element (see [`ElementSelection`]).
    pub fn with_element_selection(mut self, node: usize, element: usize, value: f64) -> Self {
        self.element_selections.push(ElementSelection { node, element, value });
        self
    }
}

/// Gradients in flight during one backward sweep.
///
/// Only the frontier of the sweep holds gradients at any time, so they live in a small slab
/// of reusable slots; each node has a 4-byte slot index (0: no gradient yet). A dense
/// `Vec<Option<ArrayD>>` over all nodes would cost over 100 bytes per node and page faults
/// on long tapes.
///
/// Short tapes (a few ops on large arrays) keep the buffer inline: a backward call then
/// allocates nothing for it.
pub(crate) struct GradBuffer<S: Scalar> {
    slot_of: SmallVec<[u32; 16]>,
    slots: SmallVec<[Option<ArrayD<S>>; 2]>,
    free: SmallVec<[u32; 4]>,
}

impl<S: Scalar> GradBuffer<S> {
    pub(crate) fn new(nodes: usize) -> Self {
        GradBuffer {
            slot_of: smallvec::smallvec![0; nodes],
            slots: SmallVec::new(),
            free: SmallVec::new(),
        }
    }

    /// Adds `g` to the gradient of `node`, moving it in when there is none yet.
    #[inline]
    pub(crate) fn add(&mut self, node: usize, g: ArrayD<S>) {
        match self.slot_of[node] {
            0 => {
                let slot = match self.free.pop() {
                    Some(s) => {
                        self.slots[s as usize] = Some(g);
                        s
                    }
                    None => {
                        self.slots.push(Some(g));
                        (self.slots.len() - 1) as u32
                    }
                };
                self.slot_of[node] = slot + 1;
            }
            s => add_into(self.slots[(s - 1) as usize].as_mut().expect("occupied slot"), &g),
        }
    }

    /// Moves the gradient of `node` out.
    #[inline]
    pub(crate) fn take(&mut self, node: usize) -> Option<ArrayD<S>> {
        match std::mem::replace(&mut self.slot_of[node], 0) {
            0 => None,
            s => {
                self.free.push(s - 1);
                self.slots[(s - 1) as usize].take()
            }
        }
    }
}

impl<S: Scalar> Tape<S> {
    /// Refuses an element selection that backward would not apply: one naming a node that
    /// does not exist, was recorded after the output `out` (backward never reaches it) or
    /// has no kinks to select at (a smooth op, a leaf, a max/min reduction, whose ties follow
    /// a tie rule), an element past the node's kink elements, or a value outside the hull
    /// of a core nonsmooth node (unless the policy opts in). Selections for custom nodes are
    /// theirs to interpret (see [`VjpContext`](crate::VjpContext)).
    fn check_element_selections(&self, selections: &[ElementSelection], out: usize, policy: &KinkPolicy) -> Result<()> {
        let nodes = self.nodes();
        let refuse = |e: &ElementSelection, why: String| {
            Err(Error::invalid(
                "element selection",
                format!("node {} element {}: {why}", e.node, e.element),
            ))
        };
        for e in selections {
            let Some(node) = nodes.get(e.node) else {
                return refuse(
                    e,
                    format!("the node does not exist (the tape has {} nodes)", nodes.len()),
                );
            };
            if e.node > out {
                return refuse(
                    e,
                    format!("the node was recorded after the output (node {out}), so backward never reaches it"),
                );
            }
            match &node.op {
                Op::Custom(_) => {}
                Op::Kink(k) => {
                    let Some(elements) = k.selectable_elements(&node.value) else {
                        return refuse(
                            e,
                            format!(
                                "the node is a {} reduction, whose ties follow a tie rule (KinkPolicy::reduce_tie or the op's _with form), not element selections",
                                k.name()
                            ),
                        );
                    };
                    if e.element >= elements {
                        return refuse(e, format!("the {} node has {elements} elements", k.name()));
                    }
                    if let Some((low, high)) = k.element_hull() {
                        check_selection(k.name(), e.value, low, high, policy.allow_outside_hull)?;
                    }
                }
                other => {
                    return refuse(
                        e,
                        format!(
                            "the node ({}) has no kinks to select at (nonsmooth nodes recorded under no_grad keep none either)",
                            other.name()
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    /// In anomaly mode, refuses a seed with a NaN or an infinity: the sweep checks each
    /// gradient only when the gradient it came from was finite, so such a seed would pass
    /// through every node unreported.
    fn check_seed(&self, seed: &ArrayD<S>) -> Result<()> {
        if !self.anomaly_detection() {
            return Ok(());
        }
        match first_non_finite(seed) {
            None => Ok(()),
            Some((count, value, index)) => Err(Error::invalid(
                "backward",
                format!("the seed has {count} non-finite value(s), first {value} at flat index {index} (anomaly mode)"),
            )),
        }
    }

    /// Checks the arguments every sweep shares (backward and [`jvp`](Self::jvp)) and
    /// returns the element selections sorted by node: `output` must live on this tape,
    /// `policy` must be valid, the selections finite and applicable (see
    /// [`ElementSelection`]), the solver band finite and non-negative, and in anomaly mode
    /// the forward pass must have seen no anomaly. `op` names the call in errors.
    pub(crate) fn check_call(
        &self,
        op: &'static str,
        output: Var<'_, S>,
        policy: &KinkPolicy,
        element_selections: &[ElementSelection],
        solver_band: f64,
    ) -> Result<Vec<ElementSelection>> {
        if !std::ptr::eq(output.tape(), self) {
            return Err(Error::ForeignVar { op, node: output.id() });
        }
        policy.validate()?;
        for e in element_selections {
            if !e.value.is_finite() {
                return Err(Error::InvalidSelection {
                    op: "element selection",
                    value: e.value,
                    low: f64::NEG_INFINITY,
                    high: f64::INFINITY,
                    hint: " (selections must be finite)",
                });
            }
        }
        if !(solver_band.is_finite() && solver_band >= 0.0) {
            return Err(Error::invalid(
                op,
                format!("the solver band must be finite and >= 0, got {solver_band}"),
            ));
        }
        let mut element_selections = element_selections.to_vec();
        element_selections.sort_by_key(|e| e.node);
        self.check_anomaly()?;
        self.check_element_selections(&element_selections, output.id(), policy)?;
        Ok(element_selections)
    }

    /// Backpropagates from `output`. See [`Var::backward`] and [`Var::backward_with`].
    ///
    /// Backward never consumes the tape: calling it again (with other options) replays the
    /// same recording.
    ///
    /// # Errors
    /// - [`Error::ForeignVar`]: `output` lives on another tape.
    /// - [`Error::InvalidSelection`] / [`Error::InvalidArgument`]: an invalid policy, a
    ///   non-finite element selection or one backward would not apply (see
    ///   [`ElementSelection`]), a solver band that is NaN, infinite or negative.
    /// - [`Error::ShapeMismatch`]: a seed whose shape is not the output's;
    ///   [`Error::NonScalarOutput`]: no seed for an output of more than one element.
    /// - In anomaly mode: the first anomaly of the forward pass, a seed with a non-finite
    ///   value ([`Error::InvalidArgument`]; outside anomaly mode such a seed propagates by
    ///   IEEE rules), and the first non-finite gradient computed from a finite one
    ///   ([`Error::NonFinite`], or [`Error::CustomOp`] for a custom node).
    /// - Whatever a custom node's VJP returns, and [`Error::CustomOp`] when it returns the
    ///   wrong number of gradients or one of the wrong shape.
    pub fn backward(&self, output: Var<'_, S>, options: &BackwardOptions<S>) -> Result<Grads<S>> {
        self.backward_impl(
            output,
            options.seed.clone(),
            options.policy.as_ref(),
            &options.element_selections,
            options.solver_band,
        )
    }

    /// The sweep. `seed` is moved in: backward rules update gradients in place, so an owned
    /// seed saves a copy of the output-sized array.
    pub(crate) fn backward_impl(
        &self,
        output: Var<'_, S>,
        seed: Option<ArrayD<S>>,
        policy: Option<&KinkPolicy>,
        element_selections: &[ElementSelection],
        solver_band: f64,
    ) -> Result<Grads<S>> {
        let own_policy = self.policy();
        let policy = policy.unwrap_or(&own_policy);
        let element_selections = self.check_call("backward", output, policy, element_selections, solver_band)?;
        let anomaly = self.anomaly_detection();
        let nodes = self.nodes();
        let out_id = output.id();
        let out_shape = nodes[out_id].value.shape();
        let seed = match seed {
            Some(s) if s.shape() == out_shape => s,
            Some(s) => {
                return Err(Error::shapes(
                    "backward",
                    s.shape(),
                    out_shape,
                    "the seed must have the output's shape",
                ));
            }
            None if nodes[out_id].value.len() == 1 => ArrayD::ones(nodes[out_id].value.raw_dim()),
            None => {
                return Err(Error::NonScalarOutput {
                    shape: out_shape.to_vec(),
                });
            }
        };
        self.check_seed(&seed)?;

        let mut grads = GradBuffer::new(out_id + 1);
        let mut ledger = KinkLedger::new(policy.label_cow());
        let custom_kinks = RefCell::new(Vec::new());
        if nodes[out_id].needs_grad {
            grads.add(out_id, seed);
        }

        for id in (0..=out_id).rev() {
            let node = &nodes[id];
            if matches!(node.op, Op::Leaf) {
                continue; // leaf gradients stay in the buffer
            }
            let Some(mut g) = grads.take(id) else { continue };
            let inputs = InputValues::new(&nodes, &node.inputs);
            let grad_was_finite = anomaly && g.iter().all(|v| v.is_finite());
            let lo = element_selections.partition_point(|e| e.node < id);
            let hi = element_selections.partition_point(|e| e.node <= id);
            let ctx = Ctx {
                inputs,
                output: &node.value,
                policy,
                element_selections: &element_selections[lo..hi],
                node: id,
                solver_band,
                kinks: &custom_kinks,
            };
            // Input `k`'s gradient `gi` goes to the buffer (checked in anomaly mode).
            let mut deliver = |k: usize, gi: ArrayD<S>| -> Result<()> {
                let target = node.inputs[k];
                if !nodes[target].needs_grad {
                    return Ok(());
                }
                if grad_was_finite {
                    if let Some(found) = first_non_finite(&gi) {
                        return Err(non_finite(Stage::Backward, &node.op, id, Some(k), found));
                    }
                }
                grads.add(target, gi);
                Ok(())
            };
            // The commonest nodes (one input, a rule in place) hand `g` on as their input's
            // gradient. A nonsmooth node's rule and its ledger record come together (one pass
            // over its input where the kink scan can be folded into the derivative's).
            let in_place = match &node.op {
                Op::Kink(k) => match k.backward_recorded_in_place(&ctx, &mut g) {
                    Some(record) => {
                        ledger.push(record);
                        true
                    }
                    None => false,
                },
                op => op.backward_in_place(&ctx, &mut g),
            };
            if in_place {
                deliver(0, g)?;
                continue;
            }
            let input_grads = match &node.op {
                Op::Kink(k) => {
                    ledger.push(k.ledger_record(id, ctx.inputs, ctx.output, policy, solver_band));
                    k.backward(&ctx, g)
                }
                op => op.backward(&ctx, g)?,
            };
            for (k, gi) in input_grads.into_iter().enumerate() {
                if let Some(gi) = gi {
                    deliver(k, gi)?;
                }
            }
        }

        // Parameter gradients; parameters the output does not depend on get zeros.
        let params = self
            .param_ids_through(out_id)
            .iter()
            .map(|&id| {
                let g = grads
                    .take(id)
                    .unwrap_or_else(|| ArrayD::zeros(nodes[id].value.raw_dim()));
                (id, g)
            })
            .collect();
        // The sweep recorded the core nodes from the output down, one record each: reversed,
        // they are in node order, and the sort only has to merge in the custom nodes' records.
        ledger.reverse();
        for record in custom_kinks.into_inner() {
            ledger.push(record);
        }
        ledger.sort();
        Ok(Grads {
            params,
            ledger,
            tape_id: self.id(),
        })
    }
}
