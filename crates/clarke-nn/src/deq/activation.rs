//! Activations of the DEQ cell: values, conservative derivatives at kinks, tape recording.

use clarke_core::nonsmooth;
use clarke_core::{KinkPolicy, KinkRecord, KinkScan, Scalar, Selection, Var};
use ndarray::{Array2, ArrayView2, ArrayViewMut2};

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
    /// `sigma'(p)` elementwise, with the policy's selection at kinks (within the band).
    pub d: Array2<S>,
    /// The kink record, for activations that have a kink.
    pub record: Option<KinkRecord>,
    /// Per sample, the units treated as at the kink.
    pub units: Vec<Vec<usize>>,
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

    /// The activation of one value (the same definition as the tape's ops; NaN propagates).
    #[inline]
    pub(crate) fn value<S: Scalar>(&self, p: S) -> S {
        match *self {
            Activation::Relu => nonsmooth::relu(p),
            Activation::LeakyRelu(alpha) => nonsmooth::leaky_relu(p, S::from_f64_lossy(alpha)),
            Activation::Tanh => p.tanh(),
        }
    }

    /// Applies the activation elementwise in place.
    /// The match is outside the loop so that each activation's loop vectorises.
    pub(crate) fn apply_in_place<S: Scalar>(&self, mut a: ArrayViewMut2<'_, S>) {
        match *self {
            Activation::Relu => a.mapv_inplace(nonsmooth::relu),
            Activation::LeakyRelu(alpha) => {
                let alpha = S::from_f64_lossy(alpha);
                a.mapv_inplace(|p| nonsmooth::leaky_relu(p, alpha));
            }
            Activation::Tanh => a.mapv_inplace(|p| p.tanh()),
        }
    }

    /// Records the activation on a tape.
    pub(crate) fn record<'t, S: Scalar>(&self, v: Var<'t, S>) -> Var<'t, S> {
        match *self {
            Activation::Relu => v.relu(),
            Activation::LeakyRelu(alpha) => v.leaky_relu(S::from_f64_lossy(alpha)),
            Activation::Tanh => v.tanh(),
        }
    }

    /// `sigma'(p)` under `policy`, with the solver error band `bands[b]` for sample `b`, and
    /// the ledger record of the kinks (elements treated as at the kink get the policy's
    /// selection: the slope actually applied is what the record says).
    pub(crate) fn derivative<S: Scalar>(
        &self,
        p: ArrayView2<'_, S>,
        policy: &KinkPolicy,
        bands: &[f64],
    ) -> Derivative<S> {
        let (alpha, at_kink, hull) = match *self {
            Activation::Tanh => {
                let d = p.mapv(|v| {
                    let t = v.tanh();
                    S::one() - t * t
                });
                return Derivative {
                    d,
                    record: None,
                    units: vec![Vec::new(); p.nrows()],
                };
            }
            Activation::Relu => (0.0, policy.relu, (0.0, 1.0)),
            Activation::LeakyRelu(alpha) => (
                alpha,
                nonsmooth::leaky_relu_slope(alpha, policy.leaky_relu),
                (alpha, 1.0),
            ),
        };
        let (alpha_s, at_s) = (S::from_f64_lossy(alpha), S::from_f64_lossy(at_kink));
        let n = p.ncols();
        let mut d = Array2::<S>::zeros(p.raw_dim());
        let mut scan = KinkScan::new(policy.tolerance, 0.0);
        let mut units = Vec::with_capacity(p.nrows());
        for (b, (mut drow, prow)) in d.outer_iter_mut().zip(p.outer_iter()).enumerate() {
            let band = bands.get(b).copied().unwrap_or(0.0);
            scan.set_solver_band(band);
            let band_s = S::from_f64_lossy(scan.band());
            let mut row_units = Vec::new();
            for (i, (dv, &v)) in drow.iter_mut().zip(prow.iter()).enumerate() {
                *dv = nonsmooth::leaky_relu_derivative(v, alpha_s, at_s, band_s);
                if scan.visit(b * n + i, v.to_f64_exact()) {
                    row_units.push(i);
                }
            }
            units.push(row_units);
        }
        let record = scan.finish(0, self.name(), p.shape(), Selection::Slope(at_kink), Some(hull));
        Derivative {
            d,
            record: Some(record),
            units,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clarke_core::Tape;
    use ndarray::arr2;

    /// The fused activation and the tape's op are one definition: same values (NaN
    /// propagates), same derivative and selection inside the band.
    #[test]
    fn fused_and_tape_activations_agree() {
        let p = arr2(&[[f64::NAN, -1.0, 0.0, 1e-9, 2.0]]);
        for act in [Activation::Relu, Activation::LeakyRelu(0.25)] {
            let tape = Tape::<f64>::new();
            let v = tape.param(p.clone().into_dyn());
            let out = act.record(v);
            for (fused, &taped) in p.iter().map(|&x| act.value(x)).zip(out.value().iter()) {
                assert!(
                    fused == taped || (fused.is_nan() && taped.is_nan()),
                    "{fused} vs {taped}"
                );
            }
            let policy = KinkPolicy::pytorch().with_relu(0.5).with_leaky_relu(0.5);
            let grads = out
                .sum()
                .backward_with(&clarke_core::BackwardOptions::policy(policy.clone()).with_solver_band(1e-8))
                .unwrap();
            let fused = act.derivative(p.view(), &policy, &[1e-8]);
            assert_eq!(
                fused.d.iter().copied().collect::<Vec<_>>(),
                grads.wrt(v).unwrap().iter().copied().collect::<Vec<_>>()
            );
            let (taped, fused) = (&grads.ledger().records()[0], fused.record.unwrap());
            assert_eq!(taped.selection, fused.selection);
            assert_eq!(taped.kink_indices, fused.kink_indices);
            assert_eq!(fused.kink_indices, vec![2, 3]);
        }
    }
}
