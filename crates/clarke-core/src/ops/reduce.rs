//! Sums and means over axes or over everything.

use ndarray::{ArrayD, Axis};

use crate::kernels::check_axis;
use crate::op::{Ctx, InputGrads, InputTangents, Op};
use crate::tape::Inputs;
use crate::var::Var;
use crate::{Error, Result, Scalar};

pub(crate) enum ReduceOp {
    /// Sum (or mean) over `axes` (sorted, distinct).
    Sum {
        axes: Vec<usize>,
        keep_dims: bool,
        mean: bool,
    },
}

impl ReduceOp {
    pub fn name(&self) -> &'static str {
        match self {
            ReduceOp::Sum { mean: false, .. } => "sum",
            ReduceOp::Sum { mean: true, .. } => "mean",
        }
    }

    pub fn backward<S: Scalar>(&self, ctx: &Ctx<'_, S>, g: ArrayD<S>) -> InputGrads<S> {
        let ReduceOp::Sum { axes, keep_dims, mean } = self;
        let x = &ctx.inputs[0];
        let mut g = g;
        if !keep_dims {
            for &a in axes {
                g = g.insert_axis(Axis(a));
            }
        }
        let mut gx = g.broadcast(x.raw_dim()).expect("kept dims broadcast back").to_owned();
        if *mean {
            let count: usize = axes.iter().map(|&a| x.shape()[a]).product();
            let inv = S::one() / S::from_usize(count.max(1)).expect("count fits");
            gx.mapv_inplace(|v| v * inv);
        }
        let mut out = InputGrads::new();
        out.push(Some(gx));
        out
    }

    /// The tangent of [`backward`](Self::backward): sums are linear, so it is backward
    /// applied to `g_dot`.
    pub fn backward_tangent<S: Scalar>(&self, ctx: &Ctx<'_, S>, g_dot: ArrayD<S>) -> InputGrads<S> {
        self.backward(ctx, g_dot)
    }

    /// The tangent of the output: the same sum (or mean) of the tangent.
    pub fn jvp<S: Scalar>(&self, _ctx: &Ctx<'_, S>, t: &InputTangents<'_, S>) -> ArrayD<S> {
        let ReduceOp::Sum { axes, keep_dims, mean } = self;
        sum_over(t[0].expect("a tangent reaches the node"), axes, *keep_dims, *mean)
    }
}

/// The sum (or mean) of `x` over `axes` (sorted, distinct; none of length 0 for a mean),
/// removed unless `keep_dims`.
fn sum_over<S: Scalar>(x: &ArrayD<S>, axes: &[usize], keep_dims: bool, mean: bool) -> ArrayD<S> {
    let mut v = x.clone();
    for &a in axes.iter().rev() {
        v = v.sum_axis(Axis(a));
    }
    if mean {
        let count: usize = axes.iter().map(|&a| x.shape()[a]).product();
        let inv = S::one() / S::from_usize(count).expect("count fits");
        v.mapv_inplace(|e| e * inv);
    }
    if keep_dims {
        for &a in axes {
            v = v.insert_axis(Axis(a));
        }
    }
    v
}

impl<'t, S: Scalar> Var<'t, S> {
    fn reduce(self, axes: &[usize], keep_dims: bool, mean: bool) -> Result<Var<'t, S>> {
        let op_name = if mean { "mean" } else { "sum" };
        let nd = self.ndim();
        let mut axes = axes.to_vec();
        axes.sort_unstable();
        for &a in &axes {
            check_axis(op_name, a, nd)?;
        }
        if let Some(w) = axes.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::invalid(
                op_name,
                format!(
                    "axis {} is listed more than once (NumPy refuses duplicate axes too)",
                    w[0]
                ),
            ));
        }
        let value = self.with_value(|x| {
            if mean && axes.iter().any(|&a| x.shape()[a] == 0) {
                return Err(Error::invalid(op_name, "mean over an empty axis"));
            }
            Ok(sum_over(x, &axes, keep_dims, mean))
        })?;
        Ok(self.tape().push(
            Op::Reduce(Box::new(ReduceOp::Sum { axes, keep_dims, mean })),
            Inputs::from_slice(&[self.id()]),
            value,
        ))
    }

    /// Sum over the given axes (removed unless `keep_dims`), in any order. An empty axis
    /// sums to 0.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the axis when one is past the rank or listed twice.
    pub fn try_sum_axes(self, axes: &[usize], keep_dims: bool) -> Result<Var<'t, S>> {
        self.reduce(axes, keep_dims, false)
    }
    /// Sum over one axis.
    #[track_caller]
    pub fn sum_axis(self, axis: usize, keep_dims: bool) -> Var<'t, S> {
        crate::var::fail(self.try_sum_axes(&[axis], keep_dims))
    }
    /// Sum of all elements (a 0-d Var).
    pub fn sum(self) -> Var<'t, S> {
        let all: Vec<usize> = (0..self.ndim()).collect();
        self.reduce(&all, false, false).expect("all axes are valid")
    }
    /// Mean over the given axes.
    ///
    /// # Errors
    /// As [`try_sum_axes`](Self::try_sum_axes), and [`Error::InvalidArgument`] for a mean
    /// over no elements (an axis of length 0).
    pub fn try_mean_axes(self, axes: &[usize], keep_dims: bool) -> Result<Var<'t, S>> {
        self.reduce(axes, keep_dims, true)
    }
    /// Mean over one axis.
    #[track_caller]
    pub fn mean_axis(self, axis: usize, keep_dims: bool) -> Var<'t, S> {
        crate::var::fail(self.try_mean_axes(&[axis], keep_dims))
    }
    /// Mean of all elements (a 0-d Var). Panics on an empty Var.
    #[track_caller]
    pub fn mean(self) -> Var<'t, S> {
        let all: Vec<usize> = (0..self.ndim()).collect();
        crate::var::fail(self.reduce(&all, false, true))
    }
}
