//! Hessian-vector products by forward over reverse.
//!
//! [`Tape::hvp`] differentiates the reverse sweep along a direction without recording a
//! second tape. It pushes the tangents of the parameters forward with the forward-mode
//! rules, keeping every node's tangent, then runs the reverse sweep on pairs `(g, g_dot)`:
//! each op applies its backward rule to `g` and the tangent of that rule to `(g, g_dot)`,
//! which needs the node's input and output tangents. At the parameters, `g` is the gradient
//! and `g_dot` the Hessian-vector product `H v`.
//!
//! Nonsmooth ops resolve the same selection as backward at every element, and their
//! selected derivative is piecewise constant: the product is the Hessian of the selected
//! branch, whose nonsmooth ops contribute no curvature (exactly the Hessian away from kinks).

use std::cell::RefCell;

use ndarray::ArrayD;
use smallvec::SmallVec;

use crate::backward::{BackwardOptions, GradBuffer};
use crate::forward::ancestors;
use crate::grads::Grads;
use crate::ledger::KinkLedger;
use crate::op::{CallOptions, Op};
use crate::tape::Tape;
use crate::var::Var;
use crate::{Error, Result, Scalar};

/// The result of one Hessian-vector product call: the gradient of the output and its
/// directional derivative `H v` for every parameter, and the kink ledger.
#[derive(Debug, Clone)]
pub struct Hvp<S: Scalar> {
    grads: Grads<S>,
    products: Grads<S>,
}

impl<S: Scalar> Hvp<S> {
    /// The gradients, as backward returns them under the same options (with the ledger).
    pub fn grads(&self) -> &Grads<S> {
        &self.grads
    }

    /// `H v` for every parameter recorded before the output, read like gradients
    /// ([`Grads::get`], [`Grads::wrt`], [`Grads::take`]; the same ledger).
    pub fn products(&self) -> &Grads<S> {
        &self.products
    }

    /// The component of `H v` for parameter `v` (zeros if the output does not depend on it).
    ///
    /// # Errors
    /// As [`Grads::wrt`]: `v` lives on another tape, or is not a parameter recorded before
    /// the output.
    pub fn product(&self, v: Var<'_, S>) -> Result<&ArrayD<S>> {
        self.products.wrt(v)
    }

    /// The kink ledger of this call: the records backward gives under the same options.
    pub fn ledger(&self) -> &KinkLedger {
        self.grads.ledger()
    }
}

impl<S: Scalar> Tape<S> {
    /// The Hessian-vector product `H v` of a scalar `output` with respect to the
    /// parameters, with the gradient: `v` is given by `tangents` as in [`Tape::jvp`] (one
    /// `(parameter, tangent)` pair per parameter that moves, every other parameter has
    /// tangent zero).
    ///
    /// `options` are those of backward and mean the same (the kink policy, per-op overrides,
    /// element selections and solver band select the same derivative at every kink); its
    /// `seed` is not used: the output is a scalar with gradient 1. `H v` is the derivative of
    /// the gradient along `v`, `d/de grad(x + e v)`: for programs with nonsmooth ops it is
    /// the derivative of the gradient of the branch backward selects (their piecewise
    /// constant derivatives contribute no curvature), so at a kink it is the Hessian of the
    /// selected branch. The result is symmetric in the sense `<H v, w> = <v, H w>` for
    /// smooth programs.
    ///
    /// ```
    /// use clarke_core::{BackwardOptions, Tape};
    /// use ndarray::arr1;
    ///
    /// let tape = Tape::<f64>::new();
    /// let x = tape.param(arr1(&[1.0, 2.0]).into_dyn());
    /// let y = x.powi(3).sum(); // gradient 3 x^2, Hessian diag(6 x)
    /// let v = arr1(&[1.0, -1.0]).into_dyn();
    /// let hvp = tape.hvp(y, &[(x, v)], &BackwardOptions::default()).unwrap();
    /// assert_eq!(hvp.grads().wrt(x).unwrap().as_slice().unwrap(), &[3.0, 12.0]);
    /// assert_eq!(hvp.product(x).unwrap().as_slice().unwrap(), &[6.0, -12.0]);
    /// ```
    ///
    /// # Errors
    /// - [`Error::NonScalarOutput`]: an output of more than one element.
    /// - [`Error::CustomOp`]: a custom node the gradient passes through (custom ops have no
    ///   second-order rule), naming it.
    /// - As [`Tape::jvp`] for the tangents (another tape, not a parameter, listed twice, a
    ///   NaN, [`Error::ShapeMismatch`] for a tangent of the wrong shape) and as backward for
    ///   the options; in anomaly mode, the first anomaly of the forward pass.
    pub fn hvp(
        &self,
        output: Var<'_, S>,
        tangents: &[(Var<'_, S>, ArrayD<S>)],
        options: &BackwardOptions<S>,
    ) -> Result<Hvp<S>> {
        let own_policy = self.policy();
        let policy = options.policy.as_ref().unwrap_or(&own_policy);
        let solver_band = options.solver_band;
        let selections = self.check_call("hvp", output, policy, &options.element_selections, solver_band)?;
        let call = CallOptions {
            op: "hvp",
            policy,
            selections: &selections,
            solver_band,
        };
        let nodes = self.nodes();
        let out_id = output.id();
        let out = &nodes[out_id];
        if out.value.len() != 1 {
            return Err(Error::NonScalarOutput {
                shape: out.value.shape().to_vec(),
            });
        }
        let needed = ancestors(&nodes, out_id);
        for (id, node) in nodes[..=out_id].iter().enumerate() {
            if let (true, true, Op::Custom(c)) = (needed[id], node.needs_grad, &node.op) {
                return Err(c.no_second_order_rule(id));
            }
        }
        let tangent = self.push_tangents(&nodes, out_id, tangents, &call, None)?;

        let mut grads = GradBuffer::new(out_id + 1);
        let mut dots = GradBuffer::new(out_id + 1);
        let mut ledger = KinkLedger::new(policy.label_cow());
        let kinks = RefCell::new(Vec::new());
        if out.needs_grad {
            grads.add(out_id, ArrayD::ones(out.value.raw_dim()));
            dots.add(out_id, ArrayD::zeros(out.value.raw_dim()));
        }
        for id in (0..=out_id).rev() {
            let node = &nodes[id];
            if matches!(node.op, Op::Leaf) {
                continue; // leaf gradients stay in the buffers
            }
            let Some(g) = grads.take(id) else { continue };
            let g_dot = dots.take(id).expect("a tangent beside every gradient");
            let ctx = call.ctx(&nodes, id, &kinks);
            if let Op::Kink(k) = &node.op {
                ledger.push(k.ledger_record(id, ctx.inputs, &node.value, policy, solver_band));
            }
            let ts: SmallVec<[Option<&ArrayD<S>>; 2]> = node.inputs.iter().map(|&i| tangent[i].as_ref()).collect();
            let input_dots = node.op.backward_tangent(&ctx, &g, g_dot, &ts, tangent[id].as_ref())?;
            let input_grads = node.op.backward(&ctx, g)?;
            for (k, pair) in input_grads.into_iter().zip(input_dots).enumerate() {
                let target = node.inputs[k];
                if let ((Some(gi), Some(di)), true) = (pair, nodes[target].needs_grad) {
                    grads.add(target, gi);
                    dots.add(target, di);
                }
            }
        }

        // Parameters the output does not depend on get zeros.
        let (mut params, mut products) = (Vec::new(), Vec::new());
        for &id in self.param_ids_through(out_id).iter() {
            let zeros = || ArrayD::zeros(nodes[id].value.raw_dim());
            params.push((id, grads.take(id).unwrap_or_else(zeros)));
            products.push((id, dots.take(id).unwrap_or_else(zeros)));
        }
        ledger.sort();
        let grads = Grads {
            params,
            ledger: ledger.clone(),
            tape_id: self.id(),
        };
        let products = Grads {
            params: products,
            ledger,
            tape_id: self.id(),
        };
        Ok(Hvp { grads, products })
    }
}
