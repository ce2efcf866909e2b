//! Smooth elementwise functions: exp, log, sqrt, recip, powers, tanh, sigmoid, softplus.
//!
//! **Domains.** These functions take every input and return the IEEE result, as `f64::ln`
//! and friends do: `log` of a negative number and `sqrt` of one are NaN, `log(0)` is -inf,
//! `recip(0)` is inf, `powf` of a negative base with a non-integer exponent is NaN, and the
//! backward rules at such points are NaN or infinite likewise. Checking every element on
//! every op would cost a scan per node; instead, with
//! [`Tape::set_anomaly_detection`](crate::Tape::set_anomaly_detection) on, the first node
//! that turns finite inputs into a NaN or an infinity is reported as
//! [`Error::NonFinite`](crate::Error::NonFinite), and so is the first such gradient.

use ndarray::ArrayD;

use crate::Scalar;
use crate::kernels::{map, update_with, zip_map};
use crate::op::{Ctx, InputGrads, InputTangents, Op, add_term};
use crate::tape::Inputs;
use crate::var::Var;

/// Smooth unary ops.
pub(crate) enum UnaryOp<S> {
    Exp,
    Log,
    Sqrt,
    Recip,
    Powi(i32),
    Powf(S),
    Tanh,
    Sigmoid,
    Softplus,
}

/// Numerically stable logistic function.
#[inline]
pub(crate) fn sigmoid<S: Scalar>(x: S) -> S {
    if x >= S::zero() {
        S::one() / (S::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (S::one() + e)
    }
}

/// Numerically stable `log(1 + exp(x))`.
#[inline]
pub(crate) fn softplus<S: Scalar>(x: S) -> S {
    x.max(S::zero()) + (-x.abs()).exp().ln_1p()
}

impl<S: Scalar> UnaryOp<S> {
    pub fn name(&self) -> &'static str {
        match self {
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Recip => "recip",
            UnaryOp::Powi(_) => "powi",
            UnaryOp::Powf(_) => "powf",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Softplus => "softplus",
        }
    }

    fn forward(&self, x: &ArrayD<S>) -> ArrayD<S> {
        match *self {
            UnaryOp::Exp => map(x, S::exp),
            UnaryOp::Log => map(x, S::ln),
            UnaryOp::Sqrt => map(x, S::sqrt),
            UnaryOp::Recip => map(x, S::recip),
            UnaryOp::Powi(n) => map(x, move |v| v.powi(n)),
            UnaryOp::Powf(p) => map(x, move |v| v.powf(p)),
            UnaryOp::Tanh => map(x, S::tanh),
            UnaryOp::Sigmoid => map(x, sigmoid),
            UnaryOp::Softplus => map(x, softplus),
        }
    }

    pub fn backward(&self, ctx: &Ctx<'_, S>, g: ArrayD<S>) -> InputGrads<S> {
        let mut g = g;
        self.backward_in_place(ctx, &mut g);
        let mut out = InputGrads::new();
        out.push(Some(g));
        out
    }

    /// The rule in place: `g` becomes the one input's gradient, `g f'(x)`.
    #[inline]
    pub fn backward_in_place(&self, ctx: &Ctx<'_, S>, g: &mut ArrayD<S>) {
        self.scale_by_derivative(g, &ctx.inputs[0], ctx.output);
    }

    /// The tangent of the output: the input's tangent times the derivative.
    pub fn jvp(&self, ctx: &Ctx<'_, S>, t: &InputTangents<'_, S>) -> ArrayD<S> {
        let mut t = t[0].expect("a tangent reaches the node").clone();
        self.scale_by_derivative(&mut t, &ctx.inputs[0], ctx.output);
        t
    }

    /// The tangent of [`backward`](Self::backward) (see `Op::backward_tangent`): from
    /// `x_bar = g f'(x)`, `x_bar_dot = g_dot f'(x) + g f''(x) x_dot`.
    pub fn backward_tangent(
        &self,
        ctx: &Ctx<'_, S>,
        g: &ArrayD<S>,
        g_dot: ArrayD<S>,
        t: &InputTangents<'_, S>,
    ) -> InputGrads<S> {
        let mut out = self.backward(ctx, g_dot);
        if let Some(tx) = t[0] {
            let mut curvature = zip_map(g, tx, |g, t| g * t);
            self.scale_by_second_derivative(&mut curvature, &ctx.inputs[0], ctx.output);
            add_term(&mut out, 0, Some(curvature));
        }
        out
    }

    /// `g[i] *= f'(x[i])` in place, from the input `x` or the output `y`, whichever gives
    /// the derivative cheaply. The Jacobian is diagonal, so this one map serves backward
    /// (on the gradient) and forward mode (on the tangent).
    fn scale_by_derivative(&self, g: &mut ArrayD<S>, x: &ArrayD<S>, y: &ArrayD<S>) {
        let two = S::one() + S::one();
        match *self {
            UnaryOp::Exp => update_with(g, y, |g, y| g * y),
            UnaryOp::Log => update_with(g, x, |g, x| g / x),
            UnaryOp::Sqrt => update_with(g, y, move |g, y| g / (two * y)),
            UnaryOp::Recip => update_with(g, y, |g, y| -g * y * y),
            // `x^0` is the constant 1: its derivative is 0 everywhere, also where `x^-1`
            // overflows (the general rule would give `0 * inf = NaN` at 0).
            UnaryOp::Powi(0) => update_with(g, x, |_, _| S::zero()),
            UnaryOp::Powi(n) => {
                let nf = S::from_i32(n).expect("i32 fits");
                match n.checked_sub(1) {
                    Some(m) => update_with(g, x, move |g, x| g * nf * x.powi(m)),
                    // `n - 1` overflows i32 for `n = i32::MIN`: `x^(n-1) = x^n / x`.
                    None => update_with(g, x, move |g, x| g * nf * (x.powi(n) / x)),
                }
            }
            UnaryOp::Powf(p) if p == S::zero() => update_with(g, x, |_, _| S::zero()),
            UnaryOp::Powf(p) => update_with(g, x, move |g, x| g * p * x.powf(p - S::one())),
            UnaryOp::Tanh => update_with(g, y, |g, y| g * (S::one() - y * y)),
            UnaryOp::Sigmoid => update_with(g, y, |g, y| g * y * (S::one() - y)),
            UnaryOp::Softplus => update_with(g, x, |g, x| g * sigmoid(x)),
        }
    }

    /// `g[i] *= f''(x[i])` in place, from `x` or `y` as `scale_by_derivative` does. Constant and linear powers (`x^0`, `x^1`) have
    /// second derivative 0 everywhere, also where the general formula overflows.
    fn scale_by_second_derivative(&self, g: &mut ArrayD<S>, x: &ArrayD<S>, y: &ArrayD<S>) {
        let one = S::one();
        let two = one + one;
        match *self {
            UnaryOp::Exp => update_with(g, y, |g, y| g * y),
            UnaryOp::Log => update_with(g, x, |g, x| -g / (x * x)),
            UnaryOp::Sqrt => update_with(g, y, move |g, y| -g / (two * two * y * y * y)),
            UnaryOp::Recip => update_with(g, y, move |g, y| g * two * y * y * y),
            UnaryOp::Powi(0 | 1) => update_with(g, x, |_, _| S::zero()),
            UnaryOp::Powi(n) => {
                let nf = S::from_i32(n).expect("i32 fits");
                let k = nf * (nf - one);
                match n.checked_sub(2) {
                    Some(m) => update_with(g, x, move |g, x| g * k * x.powi(m)),
                    // `n - 2` overflows i32 near `i32::MIN`: `x^(n-2) = x^n / x^2`.
                    None => update_with(g, x, move |g, x| g * k * (x.powi(n) / (x * x))),
                }
            }
            UnaryOp::Powf(p) if p == S::zero() || p == one => update_with(g, x, |_, _| S::zero()),
            UnaryOp::Powf(p) => update_with(g, x, move |g, x| g * p * (p - one) * x.powf(p - two)),
            UnaryOp::Tanh => update_with(g, y, move |g, y| -g * two * y * (one - y * y)),
            UnaryOp::Sigmoid => update_with(g, y, move |g, y| g * y * (one - y) * (one - two * y)),
            UnaryOp::Softplus => update_with(g, x, move |g, x| {
                let s = sigmoid(x);
                g * s * (one - s)
            }),
        }
    }
}

impl<'t, S: Scalar> Var<'t, S> {
    fn unary(self, op: UnaryOp<S>) -> Var<'t, S> {
        let value = self.with_value(|x| op.forward(x));
        self.tape().push(Op::Unary(op), Inputs::from_slice(&[self.id()]), value)
    }

    /// `exp(x)`.
    pub fn exp(self) -> Var<'t, S> {
        self.unary(UnaryOp::Exp)
    }
    /// Natural logarithm (NaN below 0, -inf at 0: see the [domains](self)).
    pub fn log(self) -> Var<'t, S> {
        self.unary(UnaryOp::Log)
    }
    /// Square root (NaN below 0; its derivative is inf at 0: see the [domains](self)).
    pub fn sqrt(self) -> Var<'t, S> {
        self.unary(UnaryOp::Sqrt)
    }
    /// `1 / x` (inf at 0: see the [domains](self)).
    pub fn recip(self) -> Var<'t, S> {
        self.unary(UnaryOp::Recip)
    }
    /// `x^n` for any integer `n` (a negative `n` at 0 gives inf: see the [domains](self)).
    /// `x^0` is the constant 1, with derivative 0 everywhere.
    pub fn powi(self, n: i32) -> Var<'t, S> {
        self.unary(UnaryOp::Powi(n))
    }
    /// `x^p` for a real `p`: NaN for a negative base and a non-integer `p`, and for a NaN
    /// `p` (see the [domains](self)). `x^0` is the constant 1, with derivative 0 everywhere.
    pub fn powf(self, p: S) -> Var<'t, S> {
        self.unary(UnaryOp::Powf(p))
    }
    /// Hyperbolic tangent.
    pub fn tanh(self) -> Var<'t, S> {
        self.unary(UnaryOp::Tanh)
    }
    /// Logistic sigmoid `1 / (1 + exp(-x))`, computed stably.
    pub fn sigmoid(self) -> Var<'t, S> {
        self.unary(UnaryOp::Sigmoid)
    }
    /// `log(1 + exp(x))`, computed stably (smooth: no kink, unlike a max-based version).
    pub fn softplus(self) -> Var<'t, S> {
        self.unary(UnaryOp::Softplus)
    }
}
