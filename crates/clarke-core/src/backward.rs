//! Reverse-mode sweep over the tape.

use ndarray::ArrayD;
use smallvec::SmallVec;

use crate::grads::Grads;
use crate::ledger::KinkLedger;
use crate::op::{Ctx, Op};
use crate::policy::KinkPolicy;
use crate::tape::{first_non_finite, Tape};
use crate::var::Var;
use crate::{Error, Result, Scalar, Stage};

/// Options of one backward call.
#[derive(Debug, Clone, Default)]
pub struct BackwardOptions<S: Scalar> {
    /// Gradient of the output (its shape). Required for outputs with more than one element.
    pub seed: Option<ArrayD<S>>,
    /// Kink policy for this call instead of the tape's. Per-op overrides still win.
    pub policy: Option<KinkPolicy>,
}

impl<S: Scalar> BackwardOptions<S> {
    /// Options with a seed.
    pub fn seed(seed: ArrayD<S>) -> Self {
        BackwardOptions {
            seed: Some(seed),
            policy: None,
        }
    }
    /// Options with a kink policy.
    pub fn policy(policy: KinkPolicy) -> Self {
        BackwardOptions {
            seed: None,
            policy: Some(policy),
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
}

/// Adds `g` into `slot`, moving it in when the slot is empty.
#[inline]
fn accumulate<S: Scalar>(slot: &mut Option<ArrayD<S>>, g: ArrayD<S>) {
    match slot {
        None => *slot = Some(g),
        Some(acc) => *acc += &g,
    }
}

impl<S: Scalar> Tape<S> {
    /// Backpropagates from `output`. See [`Var::backward`] and [`Var::backward_with`].
    pub fn backward(&self, output: Var<'_, S>, options: &BackwardOptions<S>) -> Result<Grads<S>> {
        if !std::ptr::eq(output.tape(), self) {
            return Err(Error::ForeignVar {
                op: "backward",
                node: output.id(),
            });
        }
        if let Some(p) = &options.policy {
            p.validate()?;
        }
        self.check_anomaly()?;
        let own_policy = self.policy();
        let policy = options.policy.as_ref().unwrap_or(&own_policy);
        let anomaly = self.anomaly_detection();
        let nodes = self.nodes();
        let out_id = output.id();
        let out_shape = nodes[out_id].value.shape();
        let seed = match &options.seed {
            Some(s) if s.shape() == out_shape => s.clone(),
            Some(s) => {
                return Err(Error::shapes(
                    "backward",
                    s.shape(),
                    out_shape,
                    "the seed must have the output's shape",
                ))
            }
            None if nodes[out_id].value.len() == 1 => ArrayD::ones(nodes[out_id].value.raw_dim()),
            None => {
                return Err(Error::NonScalarOutput {
                    shape: out_shape.to_vec(),
                })
            }
        };

        let mut grads: Vec<Option<ArrayD<S>>> = Vec::new();
        grads.resize_with(out_id + 1, || None);
        let mut ledger = KinkLedger::new(policy.name);
        if nodes[out_id].needs_grad {
            grads[out_id] = Some(seed);
        }

        for id in (0..=out_id).rev() {
            let node = &nodes[id];
            if matches!(node.op, Op::Leaf) {
                continue; // leaf gradients stay in `grads`
            }
            let Some(g) = grads[id].take() else { continue };
            let inputs: SmallVec<[&ArrayD<S>; 2]> = node.inputs.iter().map(|&i| &nodes[i].value).collect();
            let needs: SmallVec<[bool; 2]> = node.inputs.iter().map(|&i| nodes[i].needs_grad).collect();
            if let Op::Kink(k) = &node.op {
                ledger.push(k.ledger_record(id, &inputs, &node.value, policy));
            }
            let grad_was_finite = anomaly && g.iter().all(|v| v.is_finite());
            let ctx = Ctx {
                inputs,
                output: &node.value,
                needs,
                policy,
            };
            let input_grads = node.op.backward(&ctx, g)?;
            for (k, gi) in input_grads.into_iter().enumerate() {
                let Some(gi) = gi else { continue };
                let target = node.inputs[k];
                if !nodes[target].needs_grad {
                    continue;
                }
                if grad_was_finite {
                    if let Some((count, value, index)) = first_non_finite(&gi) {
                        return Err(Error::NonFinite {
                            stage: Stage::Backward,
                            op: node.op.name(),
                            node: id,
                            count,
                            value,
                            index,
                        });
                    }
                }
                accumulate(&mut grads[target], gi);
            }
        }

        // Parameters the output does not depend on get zeros.
        for (id, slot) in grads.iter_mut().enumerate() {
            let node = &nodes[id];
            if matches!(node.op, Op::Leaf) && node.needs_grad && node.inputs.is_empty() {
                if slot.is_none() {
                    *slot = Some(ArrayD::zeros(node.value.raw_dim()));
                }
            } else {
                *slot = None;
            }
        }
        ledger.sort();
        Ok(Grads {
            by_node: grads,
            ledger,
            tape_addr: self as *const _ as usize,
        })
    }
}
