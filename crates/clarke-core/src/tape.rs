//! The tape: an append-only arena of recorded nodes.
//!
//! Every op appends one node holding its op, the ids of its inputs, its value and whether it
//! needs a gradient. Inputs always have smaller ids than their outputs, so walking the ids
//! backwards is a topological order: backward needs no sort. Backward never consumes the
//! tape, so one recorded graph can be replayed with many seeds and under many kink
//! policies.

use std::cell::{Cell, Ref, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};

use ndarray::{ArrayD, IxDyn};
use smallvec::SmallVec;

use crate::ledger::KinkLedger;
use crate::op::{InputValues, Op};
use crate::policy::KinkPolicy;
use crate::var::Var;
use crate::{Error, Result, Scalar, Stage};

/// Node ids of an op's inputs (most ops have one or two).
pub(crate) type Inputs = SmallVec<[usize; 2]>;

/// One recorded operation.
pub(crate) struct Node<S: Scalar> {
    pub(crate) op: Op<S>,
    pub(crate) inputs: Inputs,
    pub(crate) value: ArrayD<S>,
    pub(crate) needs_grad: bool,
}

/// A tape of recorded operations over scalars `S` (`f32` or `f64`).
///
/// Create leaves with [`param`](Self::param) (gradient wanted) and
/// [`constant`](Self::constant), combine them with the methods and operators of [`Var`], and
/// call [`Var::backward`]. The tape owns all values; `Var`s are `Copy` handles into it.
///
/// ```
/// use clarke_core::Tape;
/// use ndarray::array;
///
/// let tape = Tape::<f64>::new();
/// let x = tape.param(array![-1.0, 0.0, 2.0].into_dyn());
/// let y = (x.relu() * 3.0).sum();
/// let grads = y.backward().unwrap();
/// // relu'(0) = 0 under the default (PyTorch) policy; the ledger saw one kink.
/// assert_eq!(grads.wrt(x).unwrap().as_slice().unwrap(), &[0.0, 0.0, 3.0]);
/// assert_eq!(grads.ledger().exact_hits(), 1);
/// ```
pub struct Tape<S: Scalar> {
    /// Unique among the tapes of the process: [`Grads`](crate::Grads) remember it, as an
    /// address could be reused by a later tape or change when the tape moves.
    id: u64,
    pub(crate) nodes: RefCell<Vec<Node<S>>>,
    /// Ids of the parameter leaves, increasing: backward collects their gradients without a
    /// pass over every node.
    params: RefCell<Vec<usize>>,
    policy: RefCell<KinkPolicy>,
    grad_enabled: Cell<bool>,
    anomaly_mode: Cell<bool>,
    first_anomaly: RefCell<Option<Error>>,
}

impl<S: Scalar> Default for Tape<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Scalar> std::fmt::Debug for Tape<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tape")
            .field("scalar", &S::NAME)
            .field("nodes", &self.len())
            .field("policy", &self.policy.borrow().name)
            .finish()
    }
}

impl<S: Scalar> Tape<S> {
    /// An empty tape with the default kink policy ([`KinkPolicy::pytorch`]).
    pub fn new() -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Tape {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            nodes: RefCell::new(Vec::new()),
            params: RefCell::new(Vec::new()),
            policy: RefCell::new(KinkPolicy::default()),
            grad_enabled: Cell::new(true),
            anomaly_mode: Cell::new(false),
            first_anomaly: RefCell::new(None),
        }
    }

    /// An empty tape with the given kink policy (validated).
    pub fn with_policy(policy: KinkPolicy) -> Result<Self> {
        policy.validate()?;
        let tape = Self::new();
        *tape.policy.borrow_mut() = policy;
        Ok(tape)
    }

    /// An empty tape with room for `capacity` nodes. The capacity is a hint: one that cannot
    /// be reserved (more nodes than memory can hold) is ignored, and the tape grows on demand.
    pub fn with_capacity(capacity: usize) -> Self {
        let tape = Self::new();
        // Ignoring the failure is the point: a hint must not abort the program.
        let _ = tape.nodes.borrow_mut().try_reserve(capacity);
        tape
    }

    /// The process-unique id of this tape (what [`Grads`](crate::Grads) compare).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The tape's kink policy (the default for every backward call on it).
    pub fn policy(&self) -> KinkPolicy {
        self.policy.borrow().clone()
    }

    /// Replaces the tape's kink policy (validated). Affects later backward calls, also on
    /// nodes recorded earlier: selections are applied at backward time.
    pub fn set_policy(&self, policy: KinkPolicy) -> Result<()> {
        policy.validate()?;
        *self.policy.borrow_mut() = policy;
        Ok(())
    }

    /// Switches anomaly detection on or off. When on, every recorded node checks its value:
    /// the first node that turns finite inputs into NaN or inf is remembered
    /// ([`anomaly`](Self::anomaly)), and backward returns it as [`Error::NonFinite`]; backward
    /// also checks every gradient it computes.
    pub fn set_anomaly_detection(&self, on: bool) {
        self.anomaly_mode.set(on);
    }

    /// Whether anomaly detection is on.
    pub fn anomaly_detection(&self) -> bool {
        self.anomaly_mode.get()
    }

    /// The first non-finite value recorded in anomaly mode, if any.
    pub fn anomaly(&self) -> Option<Error> {
        self.first_anomaly.borrow().clone()
    }

    /// `Err` with the first anomaly, if anomaly mode saw one.
    pub fn check_anomaly(&self) -> Result<()> {
        match self.anomaly() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Number of recorded nodes.
    pub fn len(&self) -> usize {
        self.nodes.borrow().len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by the values on the tape (element storage only).
    pub fn value_bytes(&self) -> usize {
        self.nodes
            .borrow()
            .iter()
            .map(|n| n.value.len() * std::mem::size_of::<S>())
            .sum()
    }

    /// Runs `f` with gradient recording off: nodes recorded inside carry values but no
    /// backward rule and never need a gradient.
    pub fn no_grad<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore<'a>(&'a Cell<bool>, bool);
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                self.0.set(self.1);
            }
        }
        let _restore = Restore(&self.grad_enabled, self.grad_enabled.replace(false));
        f()
    }

    /// Whether gradient recording is on (off inside [`no_grad`](Self::no_grad)).
    pub fn grad_enabled(&self) -> bool {
        self.grad_enabled.get()
    }

    /// A leaf that needs a gradient (a parameter or an input to differentiate by).
    ///
    /// Any value is accepted, of any shape (empty too). A NaN or an infinity propagates
    /// through the ops by IEEE rules; scanning every leaf would cost a pass over its elements
    /// on the hot path, so only anomaly mode checks: there a parameter with a non-finite
    /// element is the anomaly ([`Error::NonFinite`] with op `"param"`, which backward
    /// returns), as differentiating at such a point means nothing.
    pub fn param(&self, value: ArrayD<S>) -> Var<'_, S> {
        self.leaf(value, true)
    }

    /// A leaf without gradient (data, labels, fixed weights).
    ///
    /// Any value is accepted, NaN and infinities included, also in anomaly mode: an infinite
    /// bound or a `-inf` mask is legitimate data. Anomaly mode reports the first op that
    /// turns finite inputs into a non-finite value, so non-finite values that enter through
    /// a constant are not reported where they propagate.
    pub fn constant(&self, value: ArrayD<S>) -> Var<'_, S> {
        self.leaf(value, false)
    }

    /// A 0-dimensional parameter.
    pub fn param_scalar(&self, value: S) -> Var<'_, S> {
        self.param(ArrayD::from_elem(IxDyn(&[]), value))
    }

    /// A 0-dimensional constant.
    pub fn constant_scalar(&self, value: S) -> Var<'_, S> {
        self.constant(ArrayD::from_elem(IxDyn(&[]), value))
    }

    fn leaf(&self, value: ArrayD<S>, needs_grad: bool) -> Var<'_, S> {
        let mut nodes = self.nodes.borrow_mut();
        let id = nodes.len();
        if needs_grad && self.anomaly_mode.get() && self.first_anomaly.borrow().is_none() {
            if let Some((count, value_at, index)) = first_non_finite(&value) {
                *self.first_anomaly.borrow_mut() = Some(Error::NonFinite {
                    stage: Stage::Forward,
                    op: "param",
                    node: id,
                    count,
                    value: value_at,
                    index,
                });
            }
        }
        nodes.push(Node {
            op: Op::Leaf,
            inputs: Inputs::new(),
            value,
            needs_grad,
        });
        if needs_grad {
            self.params.borrow_mut().push(id);
        }
        Var::new(id, self)
    }

    /// The kink ledger of every core nonsmooth node on the tape under `policy` (or the
    /// tape's own) and the solver error band `solver_band`, without running backward. Kinks
    /// that custom nodes resolve themselves reach the ledger of a backward call only.
    ///
    /// # Errors
    /// An invalid policy (see [`KinkPolicy::validate`]) or a band that is not finite and
    /// non-negative.
    pub fn kink_ledger(&self, policy: Option<&KinkPolicy>, solver_band: f64) -> Result<KinkLedger> {
        let own = self.policy.borrow();
        let policy = policy.unwrap_or(&own);
        policy.validate()?;
        if !(solver_band.is_finite() && solver_band >= 0.0) {
            return Err(Error::invalid(
                "Tape::kink_ledger",
                format!("the solver band must be finite and >= 0, got {solver_band}"),
            ));
        }
        let nodes = self.nodes.borrow();
        let mut ledger = KinkLedger::new(policy.label_cow());
        for (id, node) in nodes.iter().enumerate() {
            if let Op::Kink(k) = &node.op {
                ledger.push(k.ledger_record(
                    id,
                    InputValues::new(&nodes, &node.inputs),
                    &node.value,
                    policy,
                    solver_band,
                ));
            }
        }
        Ok(ledger)
    }

    /// Records `f` on a scratch frame of this tape and returns the value of its output. The
    /// nodes `f` records are dropped when it returns, so evaluating a map many times (the
    /// iterations of a forward solver) neither grows the tape nor copies the inputs again.
    ///
    /// `inputs` are ids of nodes recorded before the call (for example parameters recorded
    /// once); `f` receives them as Vars. The Vars `f` creates cannot outlive it: their
    /// lifetime is `f`'s own, so none can refer to a dropped node.
    ///
    /// # Errors
    /// An input id past the end of the tape, the error of `f`, or [`Error::ForeignVar`] when
    /// `f` returns a Var of another tape.
    ///
    /// ```
    /// use clarke_core::Tape;
    /// use ndarray::arr1;
    ///
    /// let tape = Tape::<f64>::new();
    /// let theta = tape.constant(arr1(&[1.0, 2.0]).into_dyn());
    /// let mut z = arr1(&[0.0, 0.0]).into_dyn();
    /// for _ in 0..50 {
    ///     z = tape
    ///         .eval_scoped(&[theta.id()], |t, th| Ok(t.constant(z.clone()) * 0.5 + th[0]))
    ///         .unwrap();
    /// }
    /// assert_eq!(tape.len(), 1); // only theta
    /// assert!((z[1] - 4.0).abs() < 1e-12);
    /// ```
    pub fn eval_scoped<F>(&self, inputs: &[usize], f: F) -> Result<ArrayD<S>>
    where
        F: for<'s> FnOnce(&'s Tape<S>, &[Var<'s, S>]) -> Result<Var<'s, S>>,
    {
        let mark = self.len();
        if let Some(&bad) = inputs.iter().find(|&&id| id >= mark) {
            return Err(Error::invalid(
                "Tape::eval_scoped",
                format!("input node {bad} does not exist (the tape has {mark} nodes)"),
            ));
        }
        let vars: Vec<Var<'_, S>> = inputs.iter().map(|&id| Var::new(id, self)).collect();
        let out = f(self, &vars).and_then(|v| {
            if std::ptr::eq(v.tape(), self) {
                Ok(v.id())
            } else {
                Err(Error::ForeignVar {
                    op: "Tape::eval_scoped",
                    node: v.id(),
                })
            }
        });
        let mut nodes = self.nodes.borrow_mut();
        let value = out.map(|id| {
            if id >= mark {
                std::mem::replace(&mut nodes[id].value, ArrayD::zeros(IxDyn(&[0])))
            } else {
                nodes[id].value.clone()
            }
        });
        nodes.truncate(mark);
        let mut params = self.params.borrow_mut();
        let kept = params.partition_point(|&id| id < mark);
        params.truncate(kept);
        value
    }

    /// Borrow of the node arena (crate-internal).
    pub(crate) fn nodes(&self) -> Ref<'_, Vec<Node<S>>> {
        self.nodes.borrow()
    }

    /// Ids of the parameter leaves recorded up to node `last` (included), increasing: those a
    /// backward call from `last` returns gradients for (crate-internal).
    pub(crate) fn param_ids_through(&self, last: usize) -> Ref<'_, [usize]> {
        Ref::map(self.params.borrow(), |ids| {
            &ids[..ids.partition_point(|&id| id <= last)]
        })
    }

    /// Appends a computed node. `inputs` must belong to this tape (checked by callers).
    pub(crate) fn push(&self, op: Op<S>, inputs: Inputs, value: ArrayD<S>) -> Var<'_, S> {
        let mut nodes = self.nodes.borrow_mut();
        let id = nodes.len();
        let needs_grad = self.grad_enabled.get() && inputs.iter().any(|&i| nodes[i].needs_grad);
        if self.anomaly_mode.get() && self.first_anomaly.borrow().is_none() {
            if let Some((count, value_at, index)) = first_non_finite(&value) {
                let inputs_finite = inputs.iter().all(|&i| nodes[i].value.iter().all(|v| v.is_finite()));
                if inputs_finite {
                    *self.first_anomaly.borrow_mut() =
                        Some(non_finite(Stage::Forward, &op, id, None, (count, value_at, index)));
                }
            }
        }
        // Nodes off the gradient path drop their op, except nonsmooth ones: the ledger
        // still reports their kinks.
        let keep = needs_grad || (self.grad_enabled.get() && matches!(op, Op::Kink(_)));
        let (op, inputs) = if keep { (op, inputs) } else { (Op::Leaf, Inputs::new()) };
        nodes.push(Node {
            op,
            inputs,
            value,
            needs_grad,
        });
        Var::new(id, self)
    }
}

/// The anomaly-mode error for node `node` (op `op`), whose value (at `Stage::Forward`) or
/// gradient for input `input` (at `Stage::Backward`) has `count` non-finite entries, the
/// first `value` at flat `index`, although its inputs (or upstream gradient) were finite.
/// A custom node is named by its own name ([`Error::CustomOp`]), a core op by
/// [`Error::NonFinite`].
pub(crate) fn non_finite<S: Scalar>(
    stage: Stage,
    op: &Op<S>,
    node: usize,
    input: Option<usize>,
    (count, value, index): (usize, f64, usize),
) -> Error {
    match op {
        Op::Custom(c) => Error::CustomOp {
            op: c.name().to_string(),
            detail: match input {
                Some(k) => format!(
                    "{stage}: the vjp of node {node} returned {count} non-finite value(s) for input {k}, first {value} at flat index {index}, from a finite upstream gradient (anomaly mode)"
                ),
                None => format!(
                    "{stage}: node {node} has {count} non-finite value(s), first {value} at flat index {index}; its inputs were finite (anomaly mode)"
                ),
            },
        },
        _ => Error::NonFinite {
            stage,
            op: op.name(),
            node,
            count,
            value,
            index,
        },
    }
}

/// (count, first value, first flat index) of non-finite entries, if any.
pub(crate) fn first_non_finite<S: Scalar>(a: &ArrayD<S>) -> Option<(usize, f64, usize)> {
    let mut first = None;
    let mut count = 0;
    for (i, v) in a.iter().enumerate() {
        if !v.is_finite() {
            count += 1;
            if first.is_none() {
                first = Some((v.to_f64_exact(), i));
            }
        }
    }
    first.map(|(v, i)| (count, v, i))
}
