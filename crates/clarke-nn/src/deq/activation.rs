//! Activations of the DEQ cell: values, conservative derivatives at kinks, tape recording.

use clarke_core::{KinkPolicy, KinkRecord, Scalar, Selection, Var};
use ndarray::{Array2, ArrayView2, ArrayViewMut2, Zip};

/// The nonlinearity `sigma` of a DEQ cell. All three are 1-Lipschitz with derivatives (and
/// conservative-derivative selections) in `[0, 1]`, which is what the parametrisations'
/// guarantees need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// `max(p, 0)`; its kink at 0 takes `relu'(0)` from the backward call's kink policy.
    Relu,
    /// `max(p, alpha p)` with `0 <= alpha < 1`; at 0 the policy's `leaky_relu` selection `t`
    /// gives the derivative `alpha + t (1 - alpha)`.
    LeakyRelu(f64),
    /// `tanh(p)`: smooth, no kinks.
    Tanh,
}

/// The derivative of the activation at the solution, with the kinks it hit.
pub(crate) struct Derivative<S> {
    /// `sigma'(p)` elementwise, with the policy's selection at kinks.
    pub d: Array2<S>,
    /// The kink record, for activations that have a kink.
    pub record: Option<KinkRecord>,
}

impl Activation {
    /// Name used in reports and the kink ledger.
    pub fn name(&self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::LeakyRelu(_) => "leaky_relu",
            Activation::Tanh => "tanh",
        }
    }

    /// Lipschitz constant (1 for all three).
    pub fn lipschitz(&self) -> f64 {
        1.0
    }

    /// The activation of one value.
    #[inline]
    pub(crate) fn value<S: Scalar>(&self, p: S) -> S {
        match *self {
            Activation::Relu => {
                if p > S::zero() {
                    p
                } else {
                    S::zero()
                }
            }
            Activation::LeakyRelu(alpha) => {
                if p > S::zero() {
                    p
                } else {
                    S::from_f64_lossy(alpha) * p
                }
            }
            Activation::Tanh => p.tanh(),
        }
    }

    /// Applies the activation elementwise in place.
    pub(crate) fn apply_in_place<S: Scalar>(&self, mut a: ArrayViewMut2<'_, S>) {
        a.mapv_inplace(|p| self.value(p));
    }

    /// Records the activation on a tape.
    pub(crate) fn record<'t, S: Scalar>(&self, v: Var<'t, S>) -> Var<'t, S> {
        match *self {
            Activation::Relu => v.relu(),
            Activation::LeakyRelu(alpha) => v.leaky_relu(S::from_f64_lossy(alpha)),
            Activation::Tanh => v.tanh(),
        }
    }

    /// `sigma'(p)` under `policy`, and the ledger record of the kinks (`node` names the
    /// layer's node on the outer tape).
    pub(crate) fn derivative<S: Scalar>(
        &self,
        p: ArrayView2<'_, S>,
        policy: &KinkPolicy,
        node: usize,
    ) -> Derivative<S> {
        let (below, at_kink, hull) = match *self {
            Activation::Tanh => {
                let d = p.mapv(|v| {
                    let t = v.tanh();
                    S::one() - t * t
                });
                return Derivative { d, record: None };
            }
            Activation::Relu => (0.0, policy.relu, (0.0, 1.0)),
            Activation::LeakyRelu(alpha) => (alpha, alpha + policy.leaky_relu * (1.0 - alpha), (alpha, 1.0)),
        };
        let (below_s, kink_s) = (S::from_f64_lossy(below), S::from_f64_lossy(at_kink));
        let mut d = Array2::<S>::zeros(p.raw_dim());
        Zip::from(&mut d).and(p).for_each(|d, &v| {
            *d = if v > S::zero() {
                S::one()
            } else if v < S::zero() {
                below_s
            } else {
                kink_s
            }
        });
        let tol = policy.tolerance;
        let mut kink_indices = Vec::new();
        let mut near = 0;
        for (i, &v) in p.iter().enumerate() {
            if v == S::zero() {
                kink_indices.push(i);
            } else if v.to_f64_exact().abs() <= tol {
                near += 1;
            }
        }
        let selection = match self {
            Activation::Relu => Selection::Slope(policy.relu),
            _ => Selection::Slope(policy.leaky_relu),
        };
        let record = KinkRecord {
            node,
            op: self.name(),
            elements: p.len(),
            exact: kink_indices.len(),
            near,
            selection,
            overridden: false,
            kink_indices,
            hull: Some(hull),
        };
        Derivative {
            d,
            record: Some(record),
        }
    }
}
