//! Forward mode: Jacobian-vector products over the recorded graph.
//!
//! [`Tape::jvp`] pushes tangents of parameters forward through the nodes between them and
//! an output, in node order, using the values stored on the tape. Each op's forward-mode
//! rule lives beside its backward rule and applies the same selection at every kink under
//! the same options (policy, per-op overrides, element selections, tie rules, band), so
//! the JVP and the VJP of a call are the two products of one element of the conservative
//! Jacobian: `<J v, w> = <v, J^T w>` holds to rounding, at kinks too. The call's ledger
//! holds the records backward would report for the nonsmooth nodes the tangents cross.

use std::cell::RefCell;

use ndarray::ArrayD;
use smallvec::SmallVec;

use crate::backward::BackwardOptions;
use crate::ledger::KinkLedger;
use crate::op::{CallOptions, Op};
use crate::tape::{Node, Tape};
use crate::var::Var;
use crate::{Error, Result, Scalar};

/// The result of one forward-mode call: the output's tangent and the kink ledger.
#[derive(Debug, Clone)]
pub struct Jvp<S: Scalar> {
    tangent: ArrayD<S>,
    ledger: KinkLedger,
}

impl<S: Scalar> Jvp<S> {
    /// The tangent of the output, `J v` (the output's shape).
    pub fn tangent(&self) -> &ArrayD<S> {
        &self.tangent
    }

    /// Moves the tangent out.
    pub fn into_tangent(self) -> ArrayD<S> {
        self.tangent
    }

    /// The kink ledger of this call: a record per core nonsmooth node between the listed
    /// parameters and the output, as backward gives them, and what custom nodes reported.
    pub fn ledger(&self) -> &KinkLedger {
        &self.ledger
    }
}

impl<S: Scalar> Tape<S> {
    /// The Jacobian-vector product `J v` of `output` with respect to the parameters: `v` is
    /// given by `tangents`, one `(parameter, tangent)` pair per parameter that moves (every
    /// other parameter has tangent zero), each tangent of the parameter's shape.
    ///
    /// `options` are those of backward and mean the same: the kink policy (per-op overrides
    /// still win), the element selections and the solver band select the same element of the
    /// conservative Jacobian at every kink, so `<jvp(v), w>` equals `<v, backward(w)>` under
    /// the same options. Its `seed` is not used: the tangents take its place. Only the nodes
    /// that lie between a listed parameter and `output` are visited; a parameter recorded
    /// after `output` cannot move it and is accepted with no effect.
    ///
    /// ```
    /// use clarke_core::{BackwardOptions, KinkPolicy, Tape};
    /// use ndarray::arr1;
    ///
    /// let tape = Tape::<f64>::new();
    /// let x = tape.param(arr1(&[-1.0, 0.0, 2.0]).into_dyn());
    /// let y = x.relu() * 3.0;
    /// let v = arr1(&[1.0, 1.0, 1.0]).into_dyn();
    /// // relu'(0) = 1 under the `one` policy; the ledger saw the kink.
    /// let jvp = tape.jvp(y, &[(x, v)], &BackwardOptions::policy(KinkPolicy::one())).unwrap();
    /// assert_eq!(jvp.tangent().as_slice().unwrap(), &[0.0, 3.0, 3.0]);
    /// assert_eq!(jvp.ledger().exact_hits(), 1);
    /// ```
    ///
    /// # Errors
    /// - [`Error::ForeignVar`]: `output` or a listed Var lives on another tape.
    /// - [`Error::InvalidArgument`]: a listed node that is not a parameter (an op's result
    ///   or a constant), a parameter listed twice, a tangent with a NaN (naming the pair and
    ///   the element); and as backward: an invalid policy, element selection or band.
    /// - [`Error::ShapeMismatch`]: a tangent whose shape is not its parameter's.
    /// - [`Error::CustomOp`]: a custom node on the way without a forward-mode rule (see
    ///   [`Tape::set_custom_jvp`]), or whose rule returns a tangent of the wrong shape; and
    ///   whatever a custom rule returns.
    /// - In anomaly mode: the first anomaly of the forward pass.
    pub fn jvp(
        &self,
        output: Var<'_, S>,
        tangents: &[(Var<'_, S>, ArrayD<S>)],
        options: &BackwardOptions<S>,
    ) -> Result<Jvp<S>> {
        let own_policy = self.policy();
        let policy = options.policy.as_ref().unwrap_or(&own_policy);
        let solver_band = options.solver_band;
        let selections = self.check_call("jvp", output, policy, &options.element_selections, solver_band)?;
        let call = CallOptions {
            op: "jvp",
            policy,
            selections: &selections,
            solver_band,
        };
        let nodes = self.nodes();
        let out_id = output.id();
        let mut ledger = KinkLedger::new(policy.label_cow());
        let mut tangent = self.push_tangents(&nodes, out_id, tangents, &call, Some(&mut ledger))?;
        ledger.sort();
        let tangent = tangent[out_id]
            .take()
            .unwrap_or_else(|| ArrayD::zeros(nodes[out_id].value.raw_dim()));
        Ok(Jvp { tangent, ledger })
    }

    /// Pushes the tangents of the listed parameters forward to node `out_id`, in node order:
    /// returns the tangent of every node up to it (`None` where it is zero or the node does
    /// not lie between a listed parameter and the output). With a `ledger`, adds the records
    /// of the nonsmooth nodes crossed and what custom nodes report.
    pub(crate) fn push_tangents(
        &self,
        nodes: &[Node<S>],
        out_id: usize,
        tangents: &[(Var<'_, S>, ArrayD<S>)],
        call: &CallOptions<'_>,
        mut ledger: Option<&mut KinkLedger>,
    ) -> Result<Vec<Option<ArrayD<S>>>> {
        let mut tangent: Vec<Option<ArrayD<S>>> = vec![None; out_id + 1];
        let first = seed_tangents(call.op, nodes, tangents, &mut tangent, self)?;
        let needed = ancestors(nodes, out_id);
        let custom_kinks = RefCell::new(Vec::new());
        for id in first.unwrap_or(out_id + 1)..=out_id {
            let node = &nodes[id];
            if !needed[id] || matches!(node.op, Op::Leaf) {
                continue;
            }
            let ts: SmallVec<[Option<&ArrayD<S>>; 2]> = node.inputs.iter().map(|&i| tangent[i].as_ref()).collect();
            if ts.iter().all(Option::is_none) {
                continue;
            }
            let ctx = call.ctx(nodes, id, &custom_kinks);
            if let (Some(ledger), Op::Kink(k)) = (ledger.as_deref_mut(), &node.op) {
                ledger.push(k.ledger_record(id, ctx.inputs, &node.value, call.policy, call.solver_band));
            }
            let t = node.op.jvp(&ctx, &ts)?;
            drop(ts);
            tangent[id] = Some(t);
        }
        if let Some(ledger) = ledger {
            for record in custom_kinks.into_inner() {
                ledger.push(record);
            }
        }
        Ok(tangent)
    }
}

/// Checks the `(parameter, tangent)` pairs and moves their tangents into `slots` (indexed by
/// node, up to the output); returns the smallest listed node id up to the output, if any.
/// `op` names the call in errors.
fn seed_tangents<S: Scalar>(
    op: &'static str,
    nodes: &[Node<S>],
    tangents: &[(Var<'_, S>, ArrayD<S>)],
    slots: &mut [Option<ArrayD<S>>],
    tape: &Tape<S>,
) -> Result<Option<usize>> {
    let mut listed = vec![false; nodes.len()];
    let mut first: Option<usize> = None;
    for (k, (var, t)) in tangents.iter().enumerate() {
        let id = var.id();
        if !std::ptr::eq(var.tape(), tape) {
            return Err(Error::ForeignVar { op, node: id });
        }
        let node = &nodes[id];
        match (&node.op, node.needs_grad) {
            (Op::Leaf, true) => {}
            (Op::Leaf, false) => {
                return Err(Error::invalid(
                    op,
                    format!(
                        "tangent {k}: node {id} is a constant (or was recorded without gradient); forward mode differentiates with respect to parameters (Tape::param), as backward does"
                    ),
                ));
            }
            (recorded, _) => {
                return Err(Error::invalid(
                    op,
                    format!(
                        "tangent {k}: node {id} is not a leaf but the result of a {} op; tangents are given for parameters (Tape::param) and follow from them",
                        recorded.name()
                    ),
                ));
            }
        }
        if t.shape() != node.value.shape() {
            return Err(Error::shapes(
                op,
                t.shape(),
                node.value.shape(),
                format!("tangent {k}: the tangent of node {id} must have the shape of its value"),
            ));
        }
        if std::mem::replace(&mut listed[id], true) {
            return Err(Error::invalid(op, format!("tangent {k}: node {id} is listed twice")));
        }
        if let Some(i) = t.iter().position(|v| v.is_nan()) {
            return Err(Error::invalid(
                op,
                format!("tangent {k} (node {id}) has a NaN at flat index {i}"),
            ));
        }
        if let Some(slot) = slots.get_mut(id) {
            *slot = Some(t.clone());
            first = Some(first.map_or(id, |f| f.min(id)));
        }
    }
    Ok(first)
}

/// Which nodes up to `out` the output depends on (itself included).
pub(crate) fn ancestors<S: Scalar>(nodes: &[Node<S>], out: usize) -> Vec<bool> {
    let mut needed = vec![false; out + 1];
    needed[out] = true;
    for id in (0..=out).rev() {
        if needed[id] {
            for &i in &nodes[id].inputs {
                needed[i] = true;
            }
        }
    }
    needed
}
