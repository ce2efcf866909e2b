//! User-defined ops with their own vector-Jacobian product.
//!
//! Two forms: implement [`CustomOp`] (a forward and a VJP) and record it with
//! [`Tape::try_custom`], or compute the value yourself and pass a VJP closure to
//! [`Tape::try_custom_fn`]. Either way backward checks what the VJP returns: one entry per
//! input, each `None` or an array of exactly that input's shape. A mismatch is an
//! [`Error::CustomOp`] naming the op, never a silently broadcast gradient. Values are not
//! scanned (that would cost a pass per node): a NaN or an infinity in a value or a VJP
//! gradient propagates like any IEEE result, and in anomaly mode
//! ([`Tape::set_anomaly_detection`]) the first one that a custom node produces from finite
//! inputs is an [`Error::CustomOp`] naming the op, the node and the element.
//!
//! **Forward mode.** A custom node takes part in [`Tape::jvp`] only with a JVP of its own,
//! recorded with [`Tape::try_custom_fn_with_jvp`] or attached to any custom node with
//! [`Tape::set_custom_jvp`]; forward mode refuses a node without one with an
//! [`Error::CustomOp`] naming the op. The JVP must be the transpose of the VJP, with the
//! same selections at kinks, so that forward and reverse mode give one conservative
//! Jacobian.

use std::cell::RefCell;
use std::rc::Rc;

use ndarray::{ArrayD, ArrayViewD};
use smallvec::SmallVec;

use crate::backward::ElementSelection;
use crate::ledger::KinkRecord;
use crate::op::{Ctx, InputGrads, InputTangents, Op};
use crate::policy::KinkPolicy;
use crate::tape::{Inputs, Tape};
use crate::var::Var;
use crate::{Error, Result, Scalar};

/// A user op: a forward map and its vector-Jacobian product.
pub trait CustomOp<S: Scalar> {
    /// Name used in errors and reports.
    fn name(&self) -> &str;

    /// The output value from the input values.
    fn forward(&self, inputs: &[ArrayViewD<'_, S>]) -> Result<ArrayD<S>>;

    /// `J_i^T grad` for every input `i` (`None` when an input gets no gradient).
    fn vjp(
        &self,
        inputs: &[ArrayViewD<'_, S>],
        output: ArrayViewD<'_, S>,
        grad: ArrayViewD<'_, S>,
    ) -> Result<Vec<Option<ArrayD<S>>>>;
}

/// The VJP of a custom node: `(inputs, output, grad) -> per-input gradients`.
pub type VjpFn<S> =
    dyn Fn(&[ArrayViewD<'_, S>], ArrayViewD<'_, S>, ArrayViewD<'_, S>) -> Result<Vec<Option<ArrayD<S>>>>;

/// What a context-aware VJP learns about the backward call it runs in, and where it
/// declares the kinks it met.
///
/// This is the nonsmooth protocol for ops outside the core: a fused op or a layer that
/// resolves kinks itself applies [`policy`](Self::policy)'s selection inside
/// [`band`](Self::band) (and [`element_selections`](Self::element_selections) where given),
/// and reports what it did with [`report_kinks`](Self::report_kinks), so the ledger of the
/// backward call lists its kinks beside those of the core ops. A custom node's JVP gets the
/// same context in a forward-mode call ([`JvpContext`]).
#[derive(Debug, Clone, Copy)]
pub struct VjpContext<'a> {
    /// The kink policy of this backward call. A node that differentiates an inner program
    /// (an implicit layer) applies it there too, so one policy governs the whole gradient.
    pub policy: &'a KinkPolicy,
    /// This node's id on the tape (ledger records of its kinks carry it).
    pub node: usize,
    /// The solver error band of this backward call (see [`BackwardOptions::solver_band`](crate::BackwardOptions::solver_band)).
    pub solver_band: f64,
    /// Selections for single kink elements of this node (flat indices as in its records).
    pub element_selections: &'a [ElementSelection],
    kinks: &'a RefCell<Vec<KinkRecord>>,
    needs_grad: &'a [bool],
}

impl VjpContext<'_> {
    /// The band around each kink inside which elements are treated as at it:
    /// `max(policy tolerance, solver band)`.
    pub fn band(&self) -> f64 {
        self.policy.tolerance.max(self.solver_band)
    }

    /// Whether input `i` needs a gradient: it depends on a parameter of the tape (and was
    /// recorded with gradients on). A VJP may return `None` for the other inputs and skip
    /// their work; backward drops whatever it returns for them. `false` past the last input.
    pub fn needs_grad(&self, i: usize) -> bool {
        self.needs_grad.get(i).copied().unwrap_or(false)
    }

    /// Adds records to the ledger of this call (backward or forward mode). A record whose
    /// `layer` is `None` is this node's own kink and gets this node's id; a record with a
    /// `layer` (a kink inside the layer) gets this node's id too, so every record points to
    /// a node of the tape the user holds.
    pub fn report_kinks(&self, records: impl IntoIterator<Item = KinkRecord>) {
        let mut sink = self.kinks.borrow_mut();
        sink.extend(records.into_iter().map(|mut r| {
            r.node = self.node;
            r
        }));
    }
}

/// The context of a custom node's JVP in a forward-mode call ([`Tape::jvp`]): the same
/// policy, node id, band and element selections as in backward, and
/// [`report_kinks`](VjpContext::report_kinks) adds to the ledger of the forward-mode call.
/// A nonsmooth custom op resolves the same selections in its JVP as in its VJP.
pub type JvpContext<'a> = VjpContext<'a>;

/// The JVP of a custom node: `(context, inputs, output, input tangents) -> output tangent`.
/// An input tangent is `None` when it is zero (no listed parameter reaches that input); at
/// least one is `Some`. The result must have the output's shape.
pub type JvpFn<S> =
    dyn Fn(&JvpContext<'_>, &[ArrayViewD<'_, S>], ArrayViewD<'_, S>, &[Option<ArrayViewD<'_, S>>]) -> Result<ArrayD<S>>;

/// A context-aware VJP: `(context, inputs, output, grad) -> per-input gradients`.
pub type VjpCtxFn<S> = dyn Fn(
    &VjpContext<'_>,
    &[ArrayViewD<'_, S>],
    ArrayViewD<'_, S>,
    ArrayViewD<'_, S>,
) -> Result<Vec<Option<ArrayD<S>>>>;

/// A custom node on the tape.
pub(crate) struct CustomNode<S: Scalar> {
    name: String,
    vjp: Box<VjpCtxFn<S>>,
    /// The forward-mode rule, if the op has one.
    jvp: Option<Box<JvpFn<S>>>,
    /// Which side of its kinks each element sat on when the node was recorded (see
    /// [`Tape::declare_kink_regions`]): the finite-difference check refuses to difference
    /// across them.
    pub(crate) regions: Option<(&'static str, Vec<i64>)>,
}

impl<S: Scalar> CustomNode<S> {
    /// Which of the node's inputs need a gradient (what [`VjpContext::needs_grad`] answers).
    fn needs_grad(ctx: &Ctx<'_, S>) -> SmallVec<[bool; 8]> {
        (0..ctx.inputs.len()).map(|i| ctx.needs(i)).collect()
    }

    /// The op's name, for errors.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn backward(&self, ctx: &Ctx<'_, S>, grad: ArrayD<S>) -> Result<InputGrads<S>> {
        let views: Vec<ArrayViewD<'_, S>> = ctx.inputs.iter().map(|a| a.view()).collect();
        let needs_grad = Self::needs_grad(ctx);
        let vctx = VjpContext {
            policy: ctx.policy,
            node: ctx.node,
            solver_band: ctx.solver_band,
            element_selections: ctx.element_selections,
            kinks: ctx.kinks,
            needs_grad: &needs_grad,
        };
        let grads = (self.vjp)(&vctx, &views, ctx.output.view(), grad.view())?;
        if grads.len() != views.len() {
            return Err(Error::CustomOp {
                op: self.name.clone(),
                detail: format!("vjp returned {} gradients for {} inputs", grads.len(), views.len()),
            });
        }
        for (i, (g, x)) in grads.iter().zip(&views).enumerate() {
            if let Some(g) = g {
                if g.shape() != x.shape() {
                    return Err(Error::CustomOp {
                        op: self.name.clone(),
                        detail: format!(
                            "vjp gradient {i} has shape {:?}, input {i} has shape {:?}",
                            g.shape(),
                            x.shape()
                        ),
                    });
                }
            }
        }
        Ok(grads.into_iter().collect())
    }

    /// The refusal of a second-order call ([`Tape::hvp`]) that meets this node: a custom op
    /// supplies a VJP (and maybe a JVP), but not the tangent of its VJP.
    pub fn no_second_order_rule(&self, node: usize) -> Error {
        Error::CustomOp {
            op: self.name.clone(),
            detail: format!(
                "node {node} has no second-order rule (Hessian-vector products need the tangent of its VJP, which custom ops do not supply)"
            ),
        }
    }

    /// The tangent of the output from the JVP closure, checked for shape; refused when the
    /// op has no forward-mode rule.
    pub fn jvp(&self, ctx: &Ctx<'_, S>, tangents: &InputTangents<'_, S>) -> Result<ArrayD<S>> {
        let Some(jvp) = &self.jvp else {
            return Err(Error::CustomOp {
                op: self.name.clone(),
                detail: format!(
                    "node {} has no forward-mode rule (record it with Tape::try_custom_fn_with_jvp or attach one with Tape::set_custom_jvp)",
                    ctx.node
                ),
            });
        };
        let views: Vec<ArrayViewD<'_, S>> = ctx.inputs.iter().map(|a| a.view()).collect();
        let tangent_views: Vec<Option<ArrayViewD<'_, S>>> = tangents.iter().map(|t| t.map(|t| t.view())).collect();
        let needs_grad = Self::needs_grad(ctx);
        let jctx = JvpContext {
            policy: ctx.policy,
            node: ctx.node,
            solver_band: ctx.solver_band,
            element_selections: ctx.element_selections,
            kinks: ctx.kinks,
            needs_grad: &needs_grad,
        };
        let tangent = jvp(&jctx, &views, ctx.output.view(), &tangent_views)?;
        if tangent.shape() != ctx.output.shape() {
            return Err(Error::CustomOp {
                op: self.name.clone(),
                detail: format!(
                    "jvp of node {} returned a tangent of shape {:?}, the output has shape {:?}",
                    ctx.node,
                    tangent.shape(),
                    ctx.output.shape()
                ),
            });
        }
        Ok(tangent)
    }
}

impl<S: Scalar> Tape<S> {
    fn check_inputs<'t>(&'t self, op: &str, inputs: &[Var<'t, S>]) -> Result<()> {
        for v in inputs {
            if !std::ptr::eq(v.tape(), self) {
                return Err(Error::CustomOp {
                    op: op.to_string(),
                    detail: format!("input node {} is from another tape", v.id()),
                });
            }
        }
        Ok(())
    }

    /// Records a [`CustomOp`] applied to `inputs`.
    pub fn try_custom<'t, O: CustomOp<S> + 'static>(&'t self, op: O, inputs: &[Var<'t, S>]) -> Result<Var<'t, S>> {
        self.check_inputs(op.name(), inputs)?;
        let value = {
            let nodes = self.nodes();
            let views: Vec<ArrayViewD<'_, S>> = inputs.iter().map(|v| nodes[v.id()].value.view()).collect();
            op.forward(&views)?
        };
        let op = Rc::new(op);
        let name = op.name().to_string();
        let vjp = move |_: &VjpContext<'_>, i: &[ArrayViewD<'_, S>], o: ArrayViewD<'_, S>, g: ArrayViewD<'_, S>| {
            op.vjp(i, o, g)
        };
        Ok(self.record_custom(name, inputs, value, Box::new(vjp)))
    }

    /// Records a node whose value the caller computed, with a VJP closure
    /// `(inputs, output, grad) -> per-input gradients`.
    pub fn try_custom_fn<'t, F>(
        &'t self,
        name: &str,
        inputs: &[Var<'t, S>],
        value: ArrayD<S>,
        vjp: F,
    ) -> Result<Var<'t, S>>
    where
        F: Fn(&[ArrayViewD<'_, S>], ArrayViewD<'_, S>, ArrayViewD<'_, S>) -> Result<Vec<Option<ArrayD<S>>>> + 'static,
    {
        self.check_inputs(name, inputs)?;
        let vjp =
            move |_: &VjpContext<'_>, i: &[ArrayViewD<'_, S>], o: ArrayViewD<'_, S>, g: ArrayViewD<'_, S>| vjp(i, o, g);
        Ok(self.record_custom(name.to_string(), inputs, value, Box::new(vjp)))
    }

    /// Like [`try_custom_fn`](Self::try_custom_fn), with a VJP that also receives the
    /// backward call's [`VjpContext`] (its kink policy).
    pub fn try_custom_fn_ctx<'t, F>(
        &'t self,
        name: &str,
        inputs: &[Var<'t, S>],
        value: ArrayD<S>,
        vjp: F,
    ) -> Result<Var<'t, S>>
    where
        F: Fn(
                &VjpContext<'_>,
                &[ArrayViewD<'_, S>],
                ArrayViewD<'_, S>,
                ArrayViewD<'_, S>,
            ) -> Result<Vec<Option<ArrayD<S>>>>
            + 'static,
    {
        self.check_inputs(name, inputs)?;
        Ok(self.record_custom(name.to_string(), inputs, value, Box::new(vjp)))
    }

    /// Like [`try_custom_fn`](Self::try_custom_fn), with a forward-mode rule: `jvp` maps
    /// `(context, inputs, output, input tangents)` to the output's tangent (see [`JvpFn`]),
    /// so the node takes part in [`jvp`](Self::jvp).
    ///
    /// ```
    /// use clarke_core::{BackwardOptions, Tape};
    /// use ndarray::arr1;
    ///
    /// let tape = Tape::<f64>::new();
    /// let x = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    /// // y = x^3, elementwise; with one input, its tangent is the one that reaches the node.
    /// let y = tape
    ///     .try_custom_fn_with_jvp(
    ///         "cube",
    ///         &[x],
    ///         x.value().mapv(|v| v * v * v),
    ///         |i, _, g| Ok(vec![Some(&g * &i[0].mapv(|v| 3.0 * v * v))]),
    ///         |_, i, _, t| Ok(t[0].as_ref().unwrap() * &i[0].mapv(|v| 3.0 * v * v)),
    ///     )
    ///     .unwrap();
    /// let jvp = y.jvp(&[(x, arr1(&[1.0, 1.0]).into_dyn())], &BackwardOptions::default()).unwrap();
    /// assert_eq!(jvp.tangent().as_slice().unwrap(), &[3.0, 12.0]);
    /// ```
    pub fn try_custom_fn_with_jvp<'t, F, J>(
        &'t self,
        name: &str,
        inputs: &[Var<'t, S>],
        value: ArrayD<S>,
        vjp: F,
        jvp: J,
    ) -> Result<Var<'t, S>>
    where
        F: Fn(&[ArrayViewD<'_, S>], ArrayViewD<'_, S>, ArrayViewD<'_, S>) -> Result<Vec<Option<ArrayD<S>>>> + 'static,
        J: Fn(
                &JvpContext<'_>,
                &[ArrayViewD<'_, S>],
                ArrayViewD<'_, S>,
                &[Option<ArrayViewD<'_, S>>],
            ) -> Result<ArrayD<S>>
            + 'static,
    {
        let node = self.try_custom_fn(name, inputs, value, vjp)?;
        self.set_custom_jvp(node, jvp)?;
        Ok(node)
    }

    /// Attaches a forward-mode rule to a custom node recorded by any of the constructors
    /// ([`try_custom`](Self::try_custom), [`try_custom_fn`](Self::try_custom_fn),
    /// [`try_custom_fn_ctx`](Self::try_custom_fn_ctx)), replacing the one it had. A
    /// nonsmooth op applies the selections of its [`JvpContext`] as its VJP does.
    ///
    /// A node off the gradient path keeps no op, and the call does nothing for it.
    ///
    /// # Errors
    /// [`Error::ForeignVar`] for a node of another tape, [`Error::InvalidArgument`] for a
    /// leaf or a core op (whose forward-mode rules are built in).
    pub fn set_custom_jvp<J>(&self, node: Var<'_, S>, jvp: J) -> Result<()>
    where
        J: Fn(
                &JvpContext<'_>,
                &[ArrayViewD<'_, S>],
                ArrayViewD<'_, S>,
                &[Option<ArrayViewD<'_, S>>],
            ) -> Result<ArrayD<S>>
            + 'static,
    {
        self.edit_custom_node(
            "Tape::set_custom_jvp",
            node,
            (
                "a parameter",
                "whose forward-mode rule is built in",
                "take a forward-mode rule",
            ),
            |c| c.jvp = Some(Box::new(jvp)),
        )
    }

    /// Applies `edit` to the custom node of `node`. `words` say, in the errors, what a
    /// parameter is, why a core op needs no such edit, and what only custom nodes do. A
    /// constant (or a node recorded without gradient) keeps no op: the call does nothing.
    fn edit_custom_node(
        &self,
        name: &'static str,
        node: Var<'_, S>,
        (parameter, core_reason, custom_only): (&str, &str, &str),
        edit: impl FnOnce(&mut CustomNode<S>),
    ) -> Result<()> {
        if !std::ptr::eq(node.tape(), self) {
            return Err(Error::ForeignVar {
                op: name,
                node: node.id(),
            });
        }
        let mut nodes = self.nodes.borrow_mut();
        let target = &mut nodes[node.id()];
        match &mut target.op {
            Op::Custom(c) => {
                edit(c);
                Ok(())
            }
            Op::Leaf if target.needs_grad => Err(Error::invalid(
                name,
                format!("node {} is {parameter}; only custom nodes {custom_only}", node.id()),
            )),
            Op::Leaf => Ok(()),
            other => Err(Error::invalid(
                name,
                format!(
                    "node {} is a core {} op, {core_reason}; only custom nodes {custom_only}",
                    node.id(),
                    other.name()
                ),
            )),
        }
    }

    fn record_custom<'t>(
        &'t self,
        name: String,
        inputs: &[Var<'t, S>],
        value: ArrayD<S>,
        vjp: Box<VjpCtxFn<S>>,
    ) -> Var<'t, S> {
        let ids: Inputs = inputs.iter().map(|v| v.id()).collect();
        self.push(
            Op::Custom(Box::new(CustomNode {
                name,
                vjp,
                jvp: None,
                regions: None,
            })),
            ids,
            value,
        )
    }

    /// Declares, for a custom node that resolves kinks itself (a fused prox op, a layer),
    /// which side of its kinks each element sat on when it was recorded: `op` names the
    /// nonsmooth function and `codes` holds one integer per kink site, usually per element
    /// (-1, 0, 1 for below, at and above a kink, or any coding in which equal codes mean the
    /// same smooth piece).
    /// [`gradcheck`](crate::gradcheck()) compares these codes at the perturbed points and
    /// refuses to difference across a kink, as it does for the core nonsmooth ops.
    ///
    /// A node off the gradient path keeps no op, and the call does nothing for it.
    ///
    /// # Errors
    /// [`Error::ForeignVar`] for a node of another tape, [`Error::InvalidArgument`] for a
    /// parameter or a core op. The number of codes is not checked against the value: an op
    /// may code its kink sites rather than its elements (one code per group of a group
    /// soft-threshold); the check only needs the same coding at every point, and refuses
    /// when the number of codes changes between them.
    pub fn declare_kink_regions(&self, node: Var<'_, S>, op: &'static str, codes: Vec<i64>) -> Result<()> {
        self.edit_custom_node(
            "Tape::declare_kink_regions",
            node,
            (
                "a parameter, which has no kinks",
                "whose kinks the tape knows already",
                "declare theirs",
            ),
            |c| c.regions = Some((op, codes)),
        )
    }
}
