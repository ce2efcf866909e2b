//! The recorded op of a node, and the dispatch of backward, forward-mode (JVP) and
//! second-order (tangent of backward) rules to the op families.

use ndarray::ArrayD;
use smallvec::SmallVec;

use std::cell::RefCell;

use crate::backward::ElementSelection;
use crate::custom::CustomNode;
use crate::kernels::add_into;
use crate::ledger::KinkRecord;
use crate::ops::arith::ArithOp;
use crate::ops::kink::KinkOp;
use crate::ops::linalg::LinalgOp;
use crate::ops::loss::LossOp;
use crate::ops::reduce::ReduceOp;
use crate::ops::shape::ShapeOp;
use crate::ops::unary::UnaryOp;
use crate::policy::KinkPolicy;
use crate::tape::Node;
use crate::{Result, Scalar};

/// Gradients with respect to an op's inputs (`None`: input needs none).
pub(crate) type InputGrads<S> = SmallVec<[Option<ArrayD<S>>; 2]>;

/// Tangents of an op's inputs in a forward-mode sweep (`None`: the tangent is zero).
pub(crate) type InputTangents<'a, S> = [Option<&'a ArrayD<S>>];

/// Adds `term` to the entry `i` of `grads` where that input gets a gradient: how a rule
/// adds its curvature term to the tangent of its backward rule.
pub(crate) fn add_term<S: Scalar>(grads: &mut InputGrads<S>, i: usize, term: Option<ArrayD<S>>) {
    if let (Some(Some(g)), Some(t)) = (grads.get_mut(i), term) {
        add_into(g, &t);
    }
}

/// The input values of a node, read in place from the arena (no per-node collection).
#[derive(Clone, Copy)]
pub(crate) struct InputValues<'a, S: Scalar> {
    nodes: &'a [Node<S>],
    ids: &'a [usize],
}

impl<'a, S: Scalar> InputValues<'a, S> {
    pub fn new(nodes: &'a [Node<S>], ids: &'a [usize]) -> Self {
        InputValues { nodes, ids }
    }
    /// Number of inputs.
    #[inline]
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    /// Whether input `i` needs a gradient.
    #[inline]
    pub fn needs_grad(&self, i: usize) -> bool {
        self.nodes[self.ids[i]].needs_grad
    }
    /// The values, in input order.
    pub fn iter(&self) -> impl Iterator<Item = &'a ArrayD<S>> + '_ {
        self.ids.iter().map(|&i| &self.nodes[i].value)
    }
}

impl<S: Scalar> std::ops::Index<usize> for InputValues<'_, S> {
    type Output = ArrayD<S>;
    #[inline]
    fn index(&self, i: usize) -> &ArrayD<S> {
        &self.nodes[self.ids[i]].value
    }
}

/// What a backward or forward-mode rule sees of its node.
pub(crate) struct Ctx<'a, S: Scalar> {
    /// Values of the inputs.
    pub inputs: InputValues<'a, S>,
    /// Value of the node.
    pub output: &'a ArrayD<S>,
    /// The kink policy of this backward call.
    pub policy: &'a KinkPolicy,
    /// Element-wise selections for this node (see [`ElementSelection`]).
    pub element_selections: &'a [ElementSelection],
    /// This node's id.
    pub node: usize,
    /// The solver error band of this backward call.
    pub solver_band: f64,
    /// Where custom nodes report their kinks.
    pub kinks: &'a RefCell<Vec<KinkRecord>>,
}

impl<S: Scalar> Ctx<'_, S> {
    /// The band around each kink inside which elements are treated as at it.
    #[inline]
    pub fn band(&self) -> f64 {
        self.policy.tolerance.max(self.solver_band)
    }

    /// Whether input `i` needs a gradient.
    #[inline]
    pub fn needs(&self, i: usize) -> bool {
        self.inputs.needs_grad(i)
    }
}

/// The options of one call (backward, forward mode, second order) as its sweeps apply them
/// at each node.
pub(crate) struct CallOptions<'a> {
    /// The call's name, for errors.
    pub op: &'static str,
    /// The kink policy in force.
    pub policy: &'a KinkPolicy,
    /// The checked element selections, sorted by node.
    pub selections: &'a [ElementSelection],
    /// The solver error band.
    pub solver_band: f64,
}

impl CallOptions<'_> {
    /// What the rules of node `id` see of it under these options.
    pub fn ctx<'b, S: Scalar>(
        &'b self,
        nodes: &'b [Node<S>],
        id: usize,
        kinks: &'b RefCell<Vec<KinkRecord>>,
    ) -> Ctx<'b, S> {
        let lo = self.selections.partition_point(|e| e.node < id);
        let hi = self.selections.partition_point(|e| e.node <= id);
        Ctx {
            inputs: InputValues::new(nodes, &nodes[id].inputs),
            output: &nodes[id].value,
            policy: self.policy,
            element_selections: &self.selections[lo..hi],
            node: id,
            solver_band: self.solver_band,
            kinks,
        }
    }
}

/// An op on the tape. Each family keeps its forward and backward rules in one module.
///
/// Variants with large payloads are boxed so that a node stays small: the tape stores one
/// node per op, and their size shows up directly in the per-node overhead.
pub(crate) enum Op<S: Scalar> {
    /// A parameter, a constant, or a node recorded without gradient.
    Leaf,
    /// `+ - * /` and affine maps with scalars.
    Arith(ArithOp<S>),
    /// Smooth elementwise functions.
    Unary(UnaryOp<S>),
    /// Nonsmooth elementwise ops and reductions with selectable derivatives at kinks.
    Kink(KinkOp<S>),
    /// Matrix products and axis permutations.
    Linalg(Box<LinalgOp>),
    /// Reshape, broadcast, concat, stack, slice, index-select.
    Shape(Box<ShapeOp>),
    /// Sums and means.
    Reduce(Box<ReduceOp>),
    /// log-softmax, cross-entropy, mean squared error.
    Loss(Box<LossOp<S>>),
    /// A user op with its own vector-Jacobian product.
    Custom(Box<CustomNode<S>>),
}

impl<S: Scalar> Op<S> {
    /// Short name for messages and the ledger.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Leaf => "leaf",
            Op::Arith(o) => o.name(),
            Op::Unary(o) => o.name(),
            Op::Kink(o) => o.name(),
            Op::Linalg(o) => o.name(),
            Op::Shape(o) => o.name(),
            Op::Reduce(o) => o.name(),
            Op::Loss(o) => o.name(),
            Op::Custom(_) => "custom",
        }
    }

    /// For a smooth op with one input whose gradient has the output's shape (affine maps and
    /// the smooth elementwise functions): turns `grad` into that input's gradient in place
    /// and returns `true`. `false`, with `grad` untouched, for every other op, which goes
    /// through [`backward`](Self::backward). The sweep's fast path: no list of input
    /// gradients is built or moved for the commonest nodes.
    #[inline]
    pub fn backward_in_place(&self, ctx: &Ctx<'_, S>, grad: &mut ArrayD<S>) -> bool {
        match self {
            Op::Arith(o) => o.backward_in_place(grad),
            Op::Unary(o) => {
                o.backward_in_place(ctx, grad);
                true
            }
            _ => false,
        }
    }

    /// Gradients with respect to the inputs, given the gradient of the output.
    #[inline]
    pub fn backward(&self, ctx: &Ctx<'_, S>, grad: ArrayD<S>) -> Result<InputGrads<S>> {
        match self {
            Op::Leaf => Ok(InputGrads::new()),
            Op::Arith(o) => Ok(o.backward(ctx, grad)),
            Op::Unary(o) => Ok(o.backward(ctx, grad)),
            Op::Kink(o) => Ok(o.backward(ctx, grad)),
            Op::Linalg(o) => Ok(o.backward(ctx, grad)),
            Op::Shape(o) => Ok(o.backward(ctx, grad)),
            Op::Reduce(o) => Ok(o.backward(ctx, grad)),
            Op::Loss(o) => Ok(o.backward(ctx, grad)),
            Op::Custom(o) => o.backward(ctx, grad),
        }
    }

    /// The tangent of the output, given the tangents of the inputs (at least one is
    /// `Some`): the Jacobian-vector product whose transpose [`backward`](Self::backward) is,
    /// with the same selections at kinks.
    pub fn jvp(&self, ctx: &Ctx<'_, S>, tangents: &InputTangents<'_, S>) -> Result<ArrayD<S>> {
        match self {
            // A leaf has no inputs: its tangent is given, never derived.
            Op::Leaf => Ok(ArrayD::zeros(ctx.output.raw_dim())),
            Op::Arith(o) => Ok(o.jvp(ctx, tangents)),
            Op::Unary(o) => Ok(o.jvp(ctx, tangents)),
            Op::Kink(o) => Ok(o.jvp(ctx, tangents)),
            Op::Linalg(o) => Ok(o.jvp(ctx, tangents)),
            Op::Shape(o) => Ok(o.jvp(ctx, tangents)),
            Op::Reduce(o) => Ok(o.jvp(ctx, tangents)),
            Op::Loss(o) => Ok(o.jvp(ctx, tangents)),
            Op::Custom(o) => o.jvp(ctx, tangents),
        }
    }

    /// The tangent of [`backward`](Self::backward) along a direction: given the incoming
    /// gradient `g`, its tangent `g_dot`, the tangents `t` of the inputs and `y_dot` of the
    /// output (`None`: zero), the tangents of the input gradients,
    /// `d/de VJP(x + e x_dot, g + e g_dot)`. Backward is linear in `g`, so this is
    /// `backward(g_dot)` plus each family's curvature term in `g` and the tangents (none for
    /// linear and piecewise-linear ops, whose selections at kinks are those of backward).
    /// Custom ops have no such rule and are refused.
    pub fn backward_tangent(
        &self,
        ctx: &Ctx<'_, S>,
        g: &ArrayD<S>,
        g_dot: ArrayD<S>,
        t: &InputTangents<'_, S>,
        y_dot: Option<&ArrayD<S>>,
    ) -> Result<InputGrads<S>> {
        match self {
            Op::Leaf => Ok(InputGrads::new()),
            Op::Arith(o) => Ok(o.backward_tangent(ctx, g, g_dot, t, y_dot)),
            Op::Unary(o) => Ok(o.backward_tangent(ctx, g, g_dot, t)),
            Op::Kink(o) => Ok(o.backward_tangent(ctx, g_dot)),
            Op::Linalg(o) => Ok(o.backward_tangent(ctx, g, g_dot, t)),
            Op::Shape(o) => Ok(o.backward_tangent(ctx, g_dot)),
            Op::Reduce(o) => Ok(o.backward_tangent(ctx, g_dot)),
            Op::Loss(o) => Ok(o.backward_tangent(ctx, g, g_dot, t, y_dot)),
            Op::Custom(o) => Err(o.no_second_order_rule(ctx.node)),
        }
    }
}
