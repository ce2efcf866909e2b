//! Shape ops: reshape, broadcast, concat, stack, slicing and index-select along an axis.

use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn, Slice, concatenate};

use crate::kernels::{broadcast_view, check_axis, checked_len, reduce_to_shape};
use crate::op::{Ctx, InputGrads, InputTangents, Op};
use crate::tape::{Inputs, Tape};
use crate::var::{Var, fail};
use crate::{Error, Result, Scalar};

pub(crate) enum ShapeOp {
    Reshape,
    BroadcastTo,
    /// Concatenation along `axis`; the inputs' lengths along it.
    Concat {
        axis: usize,
        lengths: Vec<usize>,
    },
    /// Stacking along a new `axis`.
    Stack {
        axis: usize,
    },
    /// `start..end` along `axis`.
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
    /// Rows (or other sub-arrays) `indices` along `axis`; repeats allowed.
    IndexSelect {
        axis: usize,
        indices: Vec<usize>,
    },
}

impl ShapeOp {
    pub fn name(&self) -> &'static str {
        match self {
            ShapeOp::Reshape => "reshape",
            ShapeOp::BroadcastTo => "broadcast_to",
            ShapeOp::Concat { .. } => "concat",
            ShapeOp::Stack { .. } => "stack",
            ShapeOp::Slice { .. } => "slice_axis",
            ShapeOp::IndexSelect { .. } => "index_select",
        }
    }

    pub fn backward<S: Scalar>(&self, ctx: &Ctx<'_, S>, g: ArrayD<S>) -> InputGrads<S> {
        let mut out = InputGrads::new();
        let x = &ctx.inputs[0];
        match self {
            ShapeOp::Reshape => out.push(Some(reshape(g, x.shape()))),
            ShapeOp::BroadcastTo => out.push(Some(reduce_to_shape(g, x.shape()))),
            ShapeOp::Concat { axis, lengths } => {
                let mut start = 0;
                for (i, &len) in lengths.iter().enumerate() {
                    let part = ctx
                        .needs(i)
                        .then(|| g.slice_axis(Axis(*axis), Slice::from(start..start + len)).to_owned());
                    out.push(part);
                    start += len;
                }
            }
            ShapeOp::Stack { axis } => {
                for i in 0..ctx.inputs.len() {
                    out.push(ctx.needs(i).then(|| g.index_axis(Axis(*axis), i).to_owned()));
                }
            }
            ShapeOp::Slice { axis, start, end } => {
                let mut gx = ArrayD::zeros(x.raw_dim());
                gx.slice_axis_mut(Axis(*axis), Slice::from(*start..*end)).assign(&g);
                out.push(Some(gx));
            }
            ShapeOp::IndexSelect { axis, indices } => {
                let mut gx = ArrayD::<S>::zeros(x.raw_dim());
                for (k, &i) in indices.iter().enumerate() {
                    let mut dst = gx.index_axis_mut(Axis(*axis), i);
                    dst += &g.index_axis(Axis(*axis), k);
                }
                out.push(Some(gx));
            }
        }
        out
    }

    /// The tangent of [`backward`](Self::backward): these ops are linear, so it is backward
    /// applied to `g_dot`.
    pub fn backward_tangent<S: Scalar>(&self, ctx: &Ctx<'_, S>, g_dot: ArrayD<S>) -> InputGrads<S> {
        self.backward(ctx, g_dot)
    }

    /// The tangent of the output: the same rearrangement applied to the tangents (zeros
    /// for the parts of a concat or stack whose tangent is absent).
    pub fn jvp<S: Scalar>(&self, ctx: &Ctx<'_, S>, t: &InputTangents<'_, S>) -> ArrayD<S> {
        let tx = || t[0].expect("a tangent reaches the node");
        match self {
            ShapeOp::Reshape => reshape(tx().clone(), ctx.output.shape()),
            ShapeOp::BroadcastTo => broadcast_view(tx(), ctx.output.shape()).to_owned(),
            ShapeOp::Slice { axis, start, end } => tx().slice_axis(Axis(*axis), Slice::from(*start..*end)).to_owned(),
            ShapeOp::IndexSelect { axis, indices } => tx().select(Axis(*axis), indices),
            ShapeOp::Concat { axis, .. } | ShapeOp::Stack { axis } => {
                let zeros: Vec<ArrayD<S>> = t
                    .iter()
                    .zip(ctx.inputs.iter())
                    .filter(|(t, _)| t.is_none())
                    .map(|(_, x)| ArrayD::zeros(x.raw_dim()))
                    .collect();
                let mut fill = zeros.iter();
                let views: Vec<ArrayViewD<'_, S>> = t
                    .iter()
                    .map(|t| match t {
                        Some(t) => t.view(),
                        None => fill.next().expect("one zero per absent tangent").view(),
                    })
                    .collect();
                if matches!(self, ShapeOp::Concat { .. }) {
                    concatenate(Axis(*axis), &views).expect("shapes checked at record time")
                } else {
                    ndarray::stack(Axis(*axis), &views).expect("shapes checked at record time")
                }
            }
        }
    }
}

/// Reshapes in row-major order, copying only when the layout requires it.
fn reshape<S: Scalar>(a: ArrayD<S>, shape: &[usize]) -> ArrayD<S> {
    match a.to_shape(IxDyn(shape)) {
        Ok(v) => v.into_owned(),
        Err(_) => unreachable!("element counts checked at record time"),
    }
}

impl<'t, S: Scalar> Var<'t, S> {
    /// Reshapes (row-major order). The element count must not change.
    pub fn try_reshape(self, shape: &[usize]) -> Result<Var<'t, S>> {
        let from = self.shape();
        if self.len() != checked_len("reshape", shape)? {
            return Err(Error::shapes("reshape", &from, shape, "element counts differ"));
        }
        let value = self.with_value(|x| reshape(x.clone(), shape));
        Ok(self.tape().push(
            Op::Shape(Box::new(ShapeOp::Reshape)),
            Inputs::from_slice(&[self.id()]),
            value,
        ))
    }
    /// Panicking form of [`try_reshape`](Self::try_reshape).
    #[track_caller]
    pub fn reshape(self, shape: &[usize]) -> Var<'t, S> {
        fail(self.try_reshape(shape))
    }

    /// Broadcasts to `shape` (NumPy rules); backward sums over the broadcast axes.
    pub fn try_broadcast_to(self, shape: &[usize]) -> Result<Var<'t, S>> {
        checked_len("broadcast_to", shape)?;
        let value = self.with_value(|x| {
            x.broadcast(IxDyn(shape))
                .map(|v| v.to_owned())
                .ok_or_else(|| Error::shapes("broadcast_to", x.shape(), shape, "not a broadcast of the input"))
        })?;
        Ok(self.tape().push(
            Op::Shape(Box::new(ShapeOp::BroadcastTo)),
            Inputs::from_slice(&[self.id()]),
            value,
        ))
    }
    /// Panicking form of [`try_broadcast_to`](Self::try_broadcast_to).
    #[track_caller]
    pub fn broadcast_to(self, shape: &[usize]) -> Var<'t, S> {
        fail(self.try_broadcast_to(shape))
    }

    /// Elements `start..end` along `axis`.
    pub fn try_slice_axis(self, axis: usize, range: std::ops::Range<usize>) -> Result<Var<'t, S>> {
        let shape = self.shape();
        check_axis("slice_axis", axis, shape.len())?;
        if range.start > range.end || range.end > shape[axis] {
            return Err(Error::invalid(
                "slice_axis",
                format!(
                    "range {range:?} out of bounds for axis {axis} of length {}",
                    shape[axis]
                ),
            ));
        }
        let value = self.with_value(|x| x.slice_axis(Axis(axis), Slice::from(range.clone())).to_owned());
        let op = ShapeOp::Slice {
            axis,
            start: range.start,
            end: range.end,
        };
        Ok(self
            .tape()
            .push(Op::Shape(Box::new(op)), Inputs::from_slice(&[self.id()]), value))
    }
    /// Panicking form of [`try_slice_axis`](Self::try_slice_axis).
    #[track_caller]
    pub fn slice_axis(self, axis: usize, range: std::ops::Range<usize>) -> Var<'t, S> {
        fail(self.try_slice_axis(axis, range))
    }

    /// The sub-arrays at `indices` along `axis` (repeats allowed; backward scatter-adds).
    pub fn try_index_select(self, axis: usize, indices: &[usize]) -> Result<Var<'t, S>> {
        let shape = self.shape();
        check_axis("index_select", axis, shape.len())?;
        if let Some(&bad) = indices.iter().find(|&&i| i >= shape[axis]) {
            return Err(Error::invalid(
                "index_select",
                format!("index {bad} out of bounds for axis {axis} of length {}", shape[axis]),
            ));
        }
        let value = self.with_value(|x| x.select(Axis(axis), indices));
        let op = ShapeOp::IndexSelect {
            axis,
            indices: indices.to_vec(),
        };
        Ok(self
            .tape()
            .push(Op::Shape(Box::new(op)), Inputs::from_slice(&[self.id()]), value))
    }
    /// Panicking form of [`try_index_select`](Self::try_index_select).
    #[track_caller]
    pub fn index_select(self, axis: usize, indices: &[usize]) -> Var<'t, S> {
        fail(self.try_index_select(axis, indices))
    }
}

fn check_parts<'t, S: Scalar>(op: &'static str, parts: &[Var<'t, S>]) -> Result<&'t Tape<S>> {
    let first = parts
        .first()
        .ok_or_else(|| Error::invalid(op, "needs at least one Var"))?;
    for p in parts {
        first.check_same(op, p)?;
    }
    Ok(first.tape())
}

impl<S: Scalar> Tape<S> {
    /// Concatenates along an existing `axis`; all other axes must agree.
    pub fn try_concat<'t>(&'t self, parts: &[Var<'t, S>], axis: usize) -> Result<Var<'t, S>> {
        let tape = check_parts("concat", parts)?;
        if !std::ptr::eq(tape, self) {
            return Err(Error::ForeignVar {
                op: "concat",
                node: parts[0].id(),
            });
        }
        let (value, lengths) = {
            let nodes = self.nodes();
            let views: Vec<ArrayViewD<'_, S>> = parts.iter().map(|p| nodes[p.id()].value.view()).collect();
            check_axis("concat", axis, views[0].ndim())?;
            for v in &views[1..] {
                let (a, b) = (views[0].shape(), v.shape());
                let same = a.len() == b.len() && a.iter().zip(b).enumerate().all(|(i, (x, y))| i == axis || x == y);
                if !same {
                    return Err(Error::shapes("concat", a, b, format!("all axes but {axis} must agree")));
                }
            }
            let lengths: Vec<usize> = views.iter().map(|v| v.shape()[axis]).collect();
            let mut shape = views[0].shape().to_vec();
            shape[axis] = lengths
                .iter()
                .try_fold(0usize, |n, &l| n.checked_add(l))
                .ok_or_else(|| {
                    Error::invalid(
                        "concat",
                        format!("the lengths {lengths:?} along axis {axis} overflow usize"),
                    )
                })?;
            checked_len("concat", &shape)?;
            (concatenate(Axis(axis), &views).expect("shapes checked"), lengths)
        };
        let inputs: Inputs = parts.iter().map(|p| p.id()).collect();
        Ok(self.push(Op::Shape(Box::new(ShapeOp::Concat { axis, lengths })), inputs, value))
    }

    /// Panicking form of [`try_concat`](Self::try_concat).
    #[track_caller]
    pub fn concat<'t>(&'t self, parts: &[Var<'t, S>], axis: usize) -> Var<'t, S> {
        fail(self.try_concat(parts, axis))
    }

    /// Stacks equal-shaped Vars along a new `axis`.
    pub fn try_stack<'t>(&'t self, parts: &[Var<'t, S>], axis: usize) -> Result<Var<'t, S>> {
        let tape = check_parts("stack", parts)?;
        if !std::ptr::eq(tape, self) {
            return Err(Error::ForeignVar {
                op: "stack",
                node: parts[0].id(),
            });
        }
        let value = {
            let nodes = self.nodes();
            let views: Vec<ArrayViewD<'_, S>> = parts.iter().map(|p| nodes[p.id()].value.view()).collect();
            if axis > views[0].ndim() {
                return Err(Error::invalid(
                    "stack",
                    format!("axis {axis} out of range for rank {} inputs", views[0].ndim()),
                ));
            }
            for v in &views[1..] {
                if v.shape() != views[0].shape() {
                    return Err(Error::shapes(
                        "stack",
                        views[0].shape(),
                        v.shape(),
                        "stacked Vars must have equal shapes",
                    ));
                }
            }
            let mut shape = views[0].shape().to_vec();
            shape.insert(axis, views.len());
            checked_len("stack", &shape)?;
            ndarray::stack(Axis(axis), &views).expect("shapes checked")
        };
        let inputs: Inputs = parts.iter().map(|p| p.id()).collect();
        Ok(self.push(Op::Shape(Box::new(ShapeOp::Stack { axis })), inputs, value))
    }

    /// Panicking form of [`try_stack`](Self::try_stack).
    #[track_caller]
    pub fn stack<'t>(&'t self, parts: &[Var<'t, S>], axis: usize) -> Var<'t, S> {
        fail(self.try_stack(parts, axis))
    }
}
