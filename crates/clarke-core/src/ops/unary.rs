//! Smooth elementwise functions: exp, log, sqrt, recip, powers, tanh, sigmoid, softplus.

use ndarray::ArrayD;

use crate::Scalar;
use crate::kernels::{map, update_with};
use crate::op::{Ctx, InputGrads, Op};
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
        let (x, y) = (&ctx.inputs[0], ctx.output);
        let two = S::one() + S::one();
        match *self {
            UnaryOp::Exp => update_with(&mut g, y, |g, y| g * y),
            UnaryOp::Log => update_with(&mut g, x, |g, x| g / x),
            UnaryOp::Sqrt => update_with(&mut g, y, move |g, y| g / (two * y)),
            UnaryOp::Recip => update_with(&mut g, y, |g, y| -g * y * y),
            // `x^0` is the constant 1: its derivative is 0 everywhere, also where `x^-1`
            // overflows (the general rule would give `0 * inf = NaN` at 0).
            UnaryOp::Powi(0) => update_with(&mut g, x, |_, _| S::zero()),
            UnaryOp::Powi(n) => {
                let nf = S::from_i32(n).expect("i32 fits");
                update_with(&mut g, x, move |g, x| g * nf * x.powi(n - 1))
            }
            UnaryOp::Powf(p) if p == S::zero() => update_with(&mut g, x, |_, _| S::zero()),
            UnaryOp::Powf(p) => update_with(&mut g, x, move |g, x| g * p * x.powf(p - S::one())),
            UnaryOp::Tanh => update_with(&mut g, y, |g, y| g * (S::one() - y * y)),
            UnaryOp::Sigmoid => update_with(&mut g, y, |g, y| g * y * (S::one() - y)),
            UnaryOp::Softplus => update_with(&mut g, x, |g, x| g * sigmoid(x)),
        }
        let mut out = InputGrads::new();
        out.push(Some(g));
        out
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
    /// Natural logarithm.
    pub fn log(self) -> Var<'t, S> {
        self.unary(UnaryOp::Log)
    }
    /// Square root.
    pub fn sqrt(self) -> Var<'t, S> {
        self.unary(UnaryOp::Sqrt)
    }
    /// `1 / x`.
    pub fn recip(self) -> Var<'t, S> {
        self.unary(UnaryOp::Recip)
    }
    /// `x^n` for an integer `n`.
    pub fn powi(self, n: i32) -> Var<'t, S> {
        self.unary(UnaryOp::Powi(n))
    }
    /// `x^p` for a real `p`.
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
