//! Gradients returned by backward, with the kink ledger.

use ndarray::ArrayD;

use crate::ledger::KinkLedger;
use crate::tape::Tape;
use crate::var::Var;
use crate::{Error, Result, Scalar};

/// The gradients of one backward call: one array per parameter leaf, and the kink ledger.
#[derive(Debug, Clone)]
pub struct Grads<S: Scalar> {
    /// (node id, gradient) of every parameter recorded before the output, by id.
    pub(crate) params: Vec<(usize, ArrayD<S>)>,
    pub(crate) ledger: KinkLedger,
    /// [`Tape::id`] of the tape of the backward call.
    pub(crate) tape_id: u64,
}

impl<S: Scalar> Grads<S> {
    /// Whether these gradients come from a backward pass on `tape`. Tapes are told apart by
    /// a process-unique id, not by address: a tape that moved is still the same tape, and a
    /// new tape at a dropped tape's address is another.
    pub fn is_from(&self, tape: &Tape<S>) -> bool {
        tape.id() == self.tape_id
    }

    /// The gradient of a parameter, or `None` if `v` is not a parameter of this tape (or was
    /// recorded after the output).
    pub fn get(&self, v: Var<'_, S>) -> Option<&ArrayD<S>> {
        if v.tape().id() != self.tape_id {
            return None;
        }
        self.params
            .binary_search_by_key(&v.id(), |(id, _)| *id)
            .ok()
            .map(|i| &self.params[i].1)
    }

    /// The gradient of a parameter (zeros if the output does not depend on it).
    pub fn wrt(&self, v: Var<'_, S>) -> Result<&ArrayD<S>> {
        if v.tape().id() != self.tape_id {
            return Err(Error::ForeignVar {
                op: "Grads::wrt",
                node: v.id(),
            });
        }
        self.get(v).ok_or_else(|| {
            Error::invalid(
                "Grads::wrt",
                format!(
                    "node {} is not a parameter leaf (create it with Tape::param) or was recorded after the output",
                    v.id()
                ),
            )
        })
    }

    /// Moves a parameter's gradient out.
    pub fn take(&mut self, v: Var<'_, S>) -> Option<ArrayD<S>> {
        if v.tape().id() != self.tape_id {
            return None;
        }
        let i = self.params.binary_search_by_key(&v.id(), |(id, _)| *id).ok()?;
        Some(self.params.remove(i).1)
    }

    /// The kink ledger of this backward call.
    pub fn ledger(&self) -> &KinkLedger {
        &self.ledger
    }
}
