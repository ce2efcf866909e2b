//! User-defined ops with their own vector-Jacobian product.
//!
//! Two forms: implement [`CustomOp`] (a forward and a VJP) and record it with
//! [`Tape::try_custom`], or compute the value yourself and pass a VJP closure to
//! [`Tape::try_custom_fn`]. Either way backward checks what the VJP returns: one entry per
//! input, each `None` or an array of exactly that input's shape. A mismatch is an
//! [`Error::CustomOp`] naming the op, never a silently broadcast gradient.

use std::rc::Rc;

use ndarray::{ArrayD, ArrayViewD};

use crate::op::{Ctx, InputGrads, Op};
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

/// What a context-aware VJP learns about the backward call it runs in.
#[derive(Debug, Clone, Copy)]
pub struct VjpContext<'a> {
    /// The kink policy of this backward call. A node that differentiates an inner program
    /// (an implicit layer) applies it there too, so one policy governs the whole gradient.
    pub policy: &'a KinkPolicy,
}

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
}

impl<S: Scalar> CustomNode<S> {
    pub fn backward(&self, ctx: &Ctx<'_, S>, grad: ArrayD<S>) -> Result<InputGrads<S>> {
        let views: Vec<ArrayViewD<'_, S>> = ctx.inputs.iter().map(|a| a.view()).collect();
        let vctx = VjpContext { policy: ctx.policy };
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

    fn record_custom<'t>(
        &'t self,
        name: String,
        inputs: &[Var<'t, S>],
        value: ArrayD<S>,
        vjp: Box<VjpCtxFn<S>>,
    ) -> Var<'t, S> {
        let ids: Inputs = inputs.iter().map(|v| v.id()).collect();
        self.push(Op::Custom(Box::new(CustomNode { name, vjp })), ids, value)
    }
}
