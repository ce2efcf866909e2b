//! `Var`: a `Copy` handle to a node on a tape, and its operators.

use std::ops::{Add, Div, Mul, Neg, Sub};

use ndarray::ArrayD;

use crate::backward::BackwardOptions;
use crate::forward::Jvp;
use crate::grads::Grads;
use crate::tape::Tape;
use crate::{Error, Result, Scalar};

/// A handle to a recorded value: the node id and the tape it lives on.
///
/// `Var`s are `Copy`; all data stays on the [`Tape`]. Methods named `try_*` return
/// [`Result`]; the short names and the operators panic with the same message (pointing at
/// the caller's line) when the inputs do not fit.
#[derive(Clone, Copy)]
pub struct Var<'t, S: Scalar> {
    id: usize,
    tape: &'t Tape<S>,
}

impl<S: Scalar> std::fmt::Debug for Var<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Var(#{}, shape {:?})", self.id, self.shape())
    }
}

impl<'t, S: Scalar> Var<'t, S> {
    pub(crate) fn new(id: usize, tape: &'t Tape<S>) -> Self {
        Var { id, tape }
    }

    /// Node id on its tape.
    pub fn id(&self) -> usize {
        self.id
    }

    /// The tape this Var lives on.
    pub fn tape(&self) -> &'t Tape<S> {
        self.tape
    }

    /// Whether `self` and `other` live on the same tape.
    pub fn same_tape(&self, other: &Var<'_, S>) -> bool {
        std::ptr::eq(self.tape, other.tape)
    }

    /// `Err(ForeignVar)` unless `other` lives on this Var's tape.
    pub(crate) fn check_same(&self, op: &'static str, other: &Var<'_, S>) -> Result<()> {
        if self.same_tape(other) {
            Ok(())
        } else {
            Err(Error::ForeignVar { op, node: other.id })
        }
    }

    /// A copy of the value.
    pub fn value(&self) -> ArrayD<S> {
        self.tape.nodes()[self.id].value.clone()
    }

    /// Runs `f` on a borrow of the value (no copy). Do not record ops inside `f`.
    pub fn with_value<R>(&self, f: impl FnOnce(&ArrayD<S>) -> R) -> R {
        f(&self.tape.nodes()[self.id].value)
    }

    /// The shape of the value.
    pub fn shape(&self) -> Vec<usize> {
        self.tape.nodes()[self.id].value.shape().to_vec()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.tape.nodes()[self.id].value.len()
    }

    /// Whether the value has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rank of the value.
    pub fn ndim(&self) -> usize {
        self.tape.nodes()[self.id].value.ndim()
    }

    /// The value of a one-element Var.
    pub fn try_scalar(&self) -> Result<S> {
        let nodes = self.tape.nodes();
        let v = &nodes[self.id].value;
        if v.len() != 1 {
            return Err(Error::shapes("scalar", v.shape(), &[], "a one-element value"));
        }
        Ok(*v.iter().next().expect("one element"))
    }

    /// The value of a one-element Var. Panics otherwise.
    #[track_caller]
    pub fn scalar(&self) -> S {
        fail(self.try_scalar())
    }

    /// Whether a gradient flows to this Var from some parameter.
    pub fn needs_grad(&self) -> bool {
        self.tape.nodes()[self.id].needs_grad
    }

    /// A constant with the same value (no gradient flows through it).
    pub fn detach(&self) -> Var<'t, S> {
        self.tape.constant(self.value())
    }

    /// Backward from this one-element output with seed 1, under the tape's kink policy.
    pub fn backward(&self) -> Result<Grads<S>> {
        self.tape.backward(*self, &BackwardOptions::default())
    }

    /// Backward with options: an explicit seed (any output shape) and/or another kink policy.
    pub fn backward_with(&self, options: &BackwardOptions<S>) -> Result<Grads<S>> {
        self.tape.backward(*self, options)
    }

    /// The Jacobian-vector product of this output for the given parameter tangents (see
    /// [`Tape::jvp`]).
    pub fn jvp(&self, tangents: &[(Var<'t, S>, ArrayD<S>)], options: &BackwardOptions<S>) -> Result<Jvp<S>> {
        self.tape.jvp(*self, tangents, options)
    }

    /// Backward from this output with the given seed (its shape), moved in rather than
    /// copied, under the tape's kink policy.
    pub fn backward_seeded(&self, seed: ArrayD<S>) -> Result<Grads<S>> {
        self.tape.backward_impl(*self, Some(seed), None, &[], 0.0)
    }
}

/// The value of `r`, or a panic with the error's message reported at the caller's line
/// (a closure such as `unwrap_or_else(|e| panic!(..))` would report its own line instead).
#[track_caller]
pub(crate) fn fail<T>(r: Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

macro_rules! binary_operator {
    ($trait:ident, $method:ident, $try:ident) => {
        impl<'t, S: Scalar> $trait<Var<'t, S>> for Var<'t, S> {
            type Output = Var<'t, S>;
            #[track_caller]
            fn $method(self, rhs: Var<'t, S>) -> Var<'t, S> {
                fail(self.$try(rhs))
            }
        }
    };
}
binary_operator!(Add, add, try_add);
binary_operator!(Sub, sub, try_sub);
binary_operator!(Mul, mul, try_mul);
binary_operator!(Div, div, try_div);

impl<'t, S: Scalar> Add<S> for Var<'t, S> {
    type Output = Var<'t, S>;
    fn add(self, rhs: S) -> Var<'t, S> {
        self.affine(S::one(), rhs)
    }
}
impl<'t, S: Scalar> Sub<S> for Var<'t, S> {
    type Output = Var<'t, S>;
    fn sub(self, rhs: S) -> Var<'t, S> {
        self.affine(S::one(), -rhs)
    }
}
impl<'t, S: Scalar> Mul<S> for Var<'t, S> {
    type Output = Var<'t, S>;
    fn mul(self, rhs: S) -> Var<'t, S> {
        self.affine(rhs, S::zero())
    }
}
/// `x / s` records `x * (1 / s)`, one affine node, so its value may differ from the
/// quotient by a rounding. Where `1 / s` overflows (a subnormal `s`) that product would be
/// infinite for small `x`, so the quotient is recorded as a division by a 0-d constant
/// instead. Division by zero gives the IEEE result (inf, or NaN for `0 / 0`), as
/// [`try_div`](Var::try_div) does.
impl<'t, S: Scalar> Div<S> for Var<'t, S> {
    type Output = Var<'t, S>;
    fn div(self, rhs: S) -> Var<'t, S> {
        let scale = S::one() / rhs;
        if scale.is_finite() || rhs == S::zero() || !rhs.is_finite() {
            self.affine(scale, S::zero())
        } else {
            let divisor = self.tape().constant_scalar(rhs);
            self.try_div(divisor).expect("a 0-d divisor broadcasts to every shape")
        }
    }
}
impl<'t, S: Scalar> Neg for Var<'t, S> {
    type Output = Var<'t, S>;
    fn neg(self) -> Var<'t, S> {
        self.affine(-S::one(), S::zero())
    }
}

macro_rules! scalar_lhs {
    ($t:ty) => {
        impl<'t> Add<Var<'t, $t>> for $t {
            type Output = Var<'t, $t>;
            fn add(self, rhs: Var<'t, $t>) -> Var<'t, $t> {
                rhs.affine(1.0, self)
            }
        }
        impl<'t> Sub<Var<'t, $t>> for $t {
            type Output = Var<'t, $t>;
            fn sub(self, rhs: Var<'t, $t>) -> Var<'t, $t> {
                rhs.affine(-1.0, self)
            }
        }
        impl<'t> Mul<Var<'t, $t>> for $t {
            type Output = Var<'t, $t>;
            fn mul(self, rhs: Var<'t, $t>) -> Var<'t, $t> {
                rhs.affine(self, 0.0)
            }
        }
        impl<'t> Div<Var<'t, $t>> for $t {
            type Output = Var<'t, $t>;
            fn div(self, rhs: Var<'t, $t>) -> Var<'t, $t> {
                rhs.recip().affine(self, 0.0)
            }
        }
    };
}
scalar_lhs!(f32);
scalar_lhs!(f64);
