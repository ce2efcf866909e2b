//! `+ - * /` between Vars (NumPy broadcasting) and affine maps with scalars.

use ndarray::{ArrayD, IxDyn, Zip};

use crate::kernels::{
    broadcast_shape, broadcast_view, map, map_inplace, reduce_to_shape, tangent_view, update_with, zip_map,
};
use crate::op::{Ctx, InputGrads, InputTangents, Op, add_term};
use crate::tape::Inputs;
use crate::var::Var;
use crate::{Result, Scalar};

/// Arithmetic ops.
pub(crate) enum ArithOp<S> {
    Add,
    Sub,
    Mul,
    Div,
    /// `scale * x + shift`.
    Affine {
        scale: S,
    },
}

impl<S: Scalar> ArithOp<S> {
    pub fn name(&self) -> &'static str {
        match self {
            ArithOp::Add => "add",
            ArithOp::Sub => "sub",
            ArithOp::Mul => "mul",
            ArithOp::Div => "div",
            ArithOp::Affine { .. } => "affine",
        }
    }

    /// The affine map's rule in place: its one input's gradient is `scale * g`. `false` (and
    /// `g` untouched) for the other ops, which have two inputs.
    #[inline]
    pub fn backward_in_place(&self, g: &mut ArrayD<S>) -> bool {
        let ArithOp::Affine { scale } = *self else {
            return false;
        };
        if scale != S::one() {
            map_inplace(g, |v| v * scale);
        }
        true
    }

    pub fn backward(&self, ctx: &Ctx<'_, S>, g: ArrayD<S>) -> InputGrads<S> {
        let mut out = InputGrads::new();
        match self {
            ArithOp::Affine { .. } => {
                let mut g = g;
                self.backward_in_place(&mut g);
                out.push(Some(g));
            }
            ArithOp::Add | ArithOp::Sub => {
                let (a, b) = (&ctx.inputs[0].shape(), &ctx.inputs[1].shape());
                let gb = ctx.needs(1).then(|| {
                    let gb = reduce_to_shape(g.clone(), b);
                    if matches!(self, ArithOp::Sub) { -gb } else { gb }
                });
                let ga = ctx.needs(0).then(|| reduce_to_shape(g, a));
                out.push(ga);
                out.push(gb);
            }
            ArithOp::Mul if ctx.inputs[0].shape() == ctx.inputs[1].shape() => {
                let (a, b) = (&ctx.inputs[0], &ctx.inputs[1]);
                let ga = ctx.needs(0).then(|| zip_map(&g, b, |g, b| g * b));
                let gb = ctx.needs(1).then(|| {
                    let mut gb = g;
                    update_with(&mut gb, a, |g, a| g * a);
                    gb
                });
                out.push(ga);
                out.push(gb);
            }
            ArithOp::Mul => {
                let (a, b) = (&ctx.inputs[0], &ctx.inputs[1]);
                let shape = g.shape().to_vec();
                let ga = ctx.needs(0).then(|| {
                    let mut ga = g.clone();
                    Zip::from(&mut ga)
                        .and(&broadcast_view(b, &shape))
                        .for_each(|g, &b| *g *= b);
                    reduce_to_shape(ga, a.shape())
                });
                let gb = ctx.needs(1).then(|| {
                    let mut gb = g;
                    Zip::from(&mut gb)
                        .and(&broadcast_view(a, &shape))
                        .for_each(|g, &a| *g *= a);
                    reduce_to_shape(gb, b.shape())
                });
                out.push(ga);
                out.push(gb);
            }
            ArithOp::Div => {
                // y = a / b: dy/da = 1/b, dy/db = -y/b.
                let (a, b, y) = (&ctx.inputs[0], &ctx.inputs[1], ctx.output);
                let shape = g.shape().to_vec();
                let bv = broadcast_view(b, &shape);
                let gb = ctx.needs(1).then(|| {
                    let mut gb = g.clone();
                    Zip::from(&mut gb)
                        .and(y)
                        .and(&bv)
                        .for_each(|g, &y, &b| *g = -*g * y / b);
                    reduce_to_shape(gb, b.shape())
                });
                let ga = ctx.needs(0).then(|| {
                    let mut ga = g;
                    Zip::from(&mut ga).and(&bv).for_each(|g, &b| *g /= b);
                    reduce_to_shape(ga, a.shape())
                });
                out.push(ga);
                out.push(gb);
            }
        }
        out
    }

    /// The tangent of [`backward`](Self::backward) (see `Op::backward_tangent`): backward
    /// applied to `g_dot`, plus the product rule's terms where the backward factors move:
    /// `g tb` to `a` and `g ta` to `b` for a product, `-g tb / b^2` to `a` and
    /// `-g (y_dot - y tb / b) / b` to `b` for a quotient `y = a / b` (each summed back to its
    /// operand's shape). Sums and affine maps are linear: no such terms.
    pub fn backward_tangent(
        &self,
        ctx: &Ctx<'_, S>,
        g: &ArrayD<S>,
        g_dot: ArrayD<S>,
        t: &InputTangents<'_, S>,
        y_dot: Option<&ArrayD<S>>,
    ) -> InputGrads<S> {
        let mut out = self.backward(ctx, g_dot);
        let shape = g.shape();
        let zero = ArrayD::zeros(IxDyn(&[]));
        match self {
            ArithOp::Mul => {
                let term = |tangent: Option<&ArrayD<S>>, operand: &ArrayD<S>| {
                    tangent.map(|tn| {
                        let gt = Zip::from(g).and(&broadcast_view(tn, shape)).map_collect(|&g, &t| g * t);
                        reduce_to_shape(gt, operand.shape())
                    })
                };
                add_term(&mut out, 0, term(t[1], &ctx.inputs[0]));
                add_term(&mut out, 1, term(t[0], &ctx.inputs[1]));
            }
            ArithOp::Div => {
                let (a, b, y) = (&ctx.inputs[0], &ctx.inputs[1], ctx.output);
                let bv = broadcast_view(b, shape);
                let tb = tangent_view(t[1], shape, &zero);
                let ga = t[1].map(|_| {
                    let d = Zip::from(g)
                        .and(&bv)
                        .and(&tb)
                        .map_collect(|&g, &b, &tb| -g * tb / (b * b));
                    reduce_to_shape(d, a.shape())
                });
                let gb = y_dot.map(|yd| {
                    let d = Zip::from(g)
                        .and(&bv)
                        .and(&tb)
                        .and(yd)
                        .and(y)
                        .map_collect(|&g, &b, &tb, &yd, &y| -g * (yd - y * tb / b) / b);
                    reduce_to_shape(d, b.shape())
                });
                add_term(&mut out, 0, ga);
                add_term(&mut out, 1, gb);
            }
            ArithOp::Add | ArithOp::Sub | ArithOp::Affine { .. } => {}
        }
        out
    }

    /// The tangent of the output: `scale t` for affine maps, `ta ± tb`, `ta b + a tb` and
    /// `ta / b - tb y / b` in the broadcast shape (an absent tangent counts as zero).
    pub fn jvp(&self, ctx: &Ctx<'_, S>, t: &InputTangents<'_, S>) -> ArrayD<S> {
        if let ArithOp::Affine { scale } = *self {
            let ta = t[0].expect("a tangent reaches the node");
            return map(ta, move |v| v * scale);
        }
        let shape = ctx.output.shape();
        let zero = ArrayD::zeros(IxDyn(&[]));
        let (a, b, y) = (
            broadcast_view(&ctx.inputs[0], shape),
            broadcast_view(&ctx.inputs[1], shape),
            ctx.output,
        );
        let (ta, tb) = (tangent_view(t[0], shape, &zero), tangent_view(t[1], shape, &zero));
        let z = Zip::from(&ta).and(&tb).and(&a).and(&b).and(y);
        match self {
            ArithOp::Add => z.map_collect(|&ta, &tb, _, _, _| ta + tb),
            ArithOp::Sub => z.map_collect(|&ta, &tb, _, _, _| ta - tb),
            ArithOp::Mul => z.map_collect(|&ta, &tb, &a, &b, _| ta * b + tb * a),
            // The same factors as backward: dy/da = 1/b, dy/db = -y/b.
            ArithOp::Div => z.map_collect(|&ta, &tb, _, &b, &y| ta / b + -tb * y / b),
            ArithOp::Affine { .. } => unreachable!("handled above"),
        }
    }
}

impl<'t, S: Scalar> Var<'t, S> {
    fn binary(self, other: Var<'t, S>, op: ArithOp<S>) -> Result<Var<'t, S>> {
        let name = op.name();
        self.check_same(name, &other)?;
        let value = {
            let nodes = self.tape().nodes();
            let (a, b) = (&nodes[self.id()].value, &nodes[other.id()].value);
            if a.shape() == b.shape() {
                match op {
                    ArithOp::Add => zip_map(a, b, |a, b| a + b),
                    ArithOp::Sub => zip_map(a, b, |a, b| a - b),
                    ArithOp::Mul => zip_map(a, b, |a, b| a * b),
                    _ => zip_map(a, b, |a, b| a / b),
                }
            } else {
                let shape = broadcast_shape(name, a.shape(), b.shape())?;
                let (av, bv) = (broadcast_view(a, &shape), broadcast_view(b, &shape));
                let z = Zip::from(&av).and(&bv);
                match op {
                    ArithOp::Add => z.map_collect(|&a, &b| a + b),
                    ArithOp::Sub => z.map_collect(|&a, &b| a - b),
                    ArithOp::Mul => z.map_collect(|&a, &b| a * b),
                    _ => z.map_collect(|&a, &b| a / b),
                }
            }
        };
        Ok(self
            .tape()
            .push(Op::Arith(op), Inputs::from_slice(&[self.id(), other.id()]), value))
    }

    /// `self + other` with NumPy broadcasting.
    ///
    /// # Errors
    /// [`Error::ForeignVar`](crate::Error::ForeignVar) when `other` lives on another tape,
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) naming both shapes when they do
    /// not broadcast (or their broadcast shape has more elements than an array can hold).
    /// The other binary operators refuse the same inputs.
    pub fn try_add(self, other: Var<'t, S>) -> Result<Var<'t, S>> {
        self.binary(other, ArithOp::Add)
    }
    /// `self - other` with NumPy broadcasting.
    pub fn try_sub(self, other: Var<'t, S>) -> Result<Var<'t, S>> {
        self.binary(other, ArithOp::Sub)
    }
    /// `self * other` (elementwise) with NumPy broadcasting.
    pub fn try_mul(self, other: Var<'t, S>) -> Result<Var<'t, S>> {
        self.binary(other, ArithOp::Mul)
    }
    /// `self / other` (elementwise) with NumPy broadcasting.
    ///
    /// Division by zero is not an error: it gives the IEEE result (`±inf`, NaN for `0 / 0`),
    /// and so does the gradient. Refusing it would cost a scan of the divisor on every
    /// division; anomaly mode ([`Tape::set_anomaly_detection`](crate::Tape::set_anomaly_detection))
    /// reports the first node that turns finite inputs into a non-finite value instead.
    pub fn try_div(self, other: Var<'t, S>) -> Result<Var<'t, S>> {
        self.binary(other, ArithOp::Div)
    }

    /// `scale * self + shift`, elementwise (what `x * 2.0`, `x + 1.0`, `-x`, `1.0 - x` record).
    /// A non-finite `scale` or `shift` gives the IEEE results (anomaly mode reports them).
    pub fn affine(self, scale: S, shift: S) -> Var<'t, S> {
        let value = self.with_value(|x| map(x, |v| scale * v + shift));
        self.tape().push(
            Op::Arith(ArithOp::Affine { scale }),
            Inputs::from_slice(&[self.id()]),
            value,
        )
    }
}
