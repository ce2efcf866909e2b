//! Given weights for a DEQ layer, and the trained parameters that reproduce them in each
//! parametrisation.
//!
//! A user who imports weights (from another framework, a checkpoint, a paper's example)
//! gives `W`, `U` and the bias; this module finds the parameters of the layer's form whose
//! `W` is the given one, or says why no such parameters exist.

use clarke_core::{Error, Result, Scalar};
use faer::{Mat, Side};
use ndarray::{Array1, Array2, ArrayD, ArrayView2};

use super::Parametrization;

/// Relative gap allowed between `sigma_max(W)` and `gamma` when a `W` is given to the
/// spectral-norm form (the form always trains a `W` of norm exactly `gamma`).
pub const SPECTRAL_NORM_SLACK: f64 = 1e-4;

/// The weights of a DEQ cell `z = sigma(W z + U x + b)`, as plain arrays.
#[derive(Debug, Clone, PartialEq)]
pub struct DeqWeights<S> {
    /// `W`, `[width, width]`.
    pub w: Array2<S>,
    /// `U`, `[width, input_dim]`.
    pub u: Array2<S>,
    /// `b`, `[width]`.
    pub bias: Array1<S>,
}

impl<S: Scalar> DeqWeights<S> {
    /// `(input_dim, width)` after checking that the shapes agree and every entry is finite.
    ///
    /// # Errors
    /// A shape that does not match the others (both are named) or a non-finite entry.
    pub fn dims(&self) -> Result<(usize, usize)> {
        let n = self.w.nrows();
        let op = "DeqWeights";
        if self.w.ncols() != n || n == 0 {
            return Err(Error::shapes(
                op,
                self.w.shape(),
                &[n, n],
                "W must be square and non-empty",
            ));
        }
        if self.u.nrows() != n || self.u.ncols() == 0 {
            return Err(Error::shapes(
                op,
                self.u.shape(),
                &[n, self.u.ncols().max(1)],
                format!("U must be [width, input_dim] with width {n} (from W) and input_dim >= 1"),
            ));
        }
        if self.bias.len() != n {
            return Err(Error::shapes(op, self.bias.shape(), &[n], "the bias must be [width]"));
        }
        fn first_bad<'a, S: Scalar>(values: impl Iterator<Item = &'a S>) -> Option<(usize, S)> {
            values.copied().enumerate().find(|(_, v)| !v.is_finite())
        }
        let found = [
            ("W", first_bad(self.w.iter())),
            ("U", first_bad(self.u.iter())),
            ("bias", first_bad(self.bias.iter())),
        ];
        if let Some((name, Some((i, v)))) = found.into_iter().find(|(_, bad)| bad.is_some()) {
            return Err(Error::invalid(
                op,
                format!("{name} has a non-finite entry {v} at flat index {i}"),
            ));
        }
        Ok((self.u.ncols(), n))
    }
}

/// The parameters (name suffix, value) that give `w` in the form `form`.
///
/// - Unconstrained: `w` itself.
/// - Spectral norm: `V = W`, accepted when `sigma_max(W)` is `gamma` within
///   [`SPECTRAL_NORM_SLACK`] (relative): the form's `W = gamma V / sigma_max(V)` always has
///   norm `gamma`, so any other `W` is out of its reach.
/// - Monotone: `B = (W - W^T) / 4` and `A = diag(sqrt(lambda)) Q^T` from the eigenpairs of
///   `(1 - m) I - (W + W^T) / 2`, which must be positive semidefinite (the condition that
///   `I - W` is `m`-strongly monotone); eigenvalues down to `-1e-12 * scale` count as 0.
///
/// # Errors
/// A `W` the form cannot represent, with the measured quantity.
pub(crate) fn weight_params<S: Scalar>(
    form: Parametrization,
    w: ArrayView2<'_, S>,
) -> Result<Vec<(&'static str, ArrayD<S>)>> {
    let _avx = clarke_core::avx::UpperStateGuard;
    let n = w.nrows();
    match form {
        Parametrization::Unconstrained => Ok(vec![("w", w.to_owned().into_dyn())]),
        Parametrization::SpectralNorm { gamma } => {
            let sigma = clarke_solve::spectral_norm_dense(w)?;
            if (sigma - gamma).abs() > SPECTRAL_NORM_SLACK * gamma {
                return Err(Error::invalid(
                    "DeqLayer weights",
                    format!(
                        "the spectral-norm form trains W = gamma V / sigma_max(V), whose norm is always gamma = {gamma}; \
                         the given W has sigma_max {sigma:.6e}: scale it by gamma / sigma_max, or use \
                         Parametrization::Unconstrained to keep it as it is"
                    ),
                ));
            }
            Ok(vec![("v", w.to_owned().into_dyn())])
        }
        Parametrization::Monotone { m } => {
            let f = |i: usize, j: usize| w[[i, j]].to_f64_exact();
            let sym = Mat::<f64>::from_fn(n, n, |i, j| {
                let identity = if i == j { 1.0 - m } else { 0.0 };
                identity - 0.5 * (f(i, j) + f(j, i))
            });
            let eigen = sym.self_adjoint_eigen(Side::Lower).map_err(|e| {
                Error::invalid(
                    "DeqLayer weights",
                    format!("eigendecomposition of (1 - m) I - sym(W) failed: {e:?}"),
                )
            })?;
            let (values, vectors) = (eigen.S(), eigen.U());
            let scale = (0..n).fold(1.0f64, |a, i| a.max(values[i].abs()));
            let lowest = (0..n).map(|i| values[i]).fold(f64::INFINITY, f64::min);
            if lowest < -1e-12 * scale {
                return Err(Error::invalid(
                    "DeqLayer weights",
                    format!(
                        "the monotone form needs the symmetric part of I - W to be at least m I (m = {m}); \
                         for the given W, (1 - m) I - sym(W) has eigenvalue {lowest:.6e} < 0, so I - W is only \
                         {:.6e}-monotone: use Parametrization::Unconstrained or a smaller m",
                        m + lowest
                    ),
                ));
            }
            let a = Array2::from_shape_fn((n, n), |(k, j)| {
                S::from_f64_lossy(values[k].max(0.0).sqrt() * vectors[(j, k)])
            });
            let b = Array2::from_shape_fn((n, n), |(i, j)| S::from_f64_lossy(0.25 * (f(i, j) - f(j, i))));
            Ok(vec![("a", a.into_dyn()), ("b_skew", b.into_dyn())])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn monotone_w(a: &Array2<f64>, b: &Array2<f64>, m: f64) -> Array2<f64> {
        Array2::eye(a.nrows()) * (1.0 - m) - a.t().dot(a) + b - b.t()
    }

    #[test]
    fn monotone_parameters_reproduce_w() {
        let a0 = array![[0.3, -0.2, 0.1], [0.0, 0.5, 0.4], [-0.6, 0.1, 0.2]];
        let b0 = array![[0.0, 0.7, -0.3], [0.2, 0.1, 0.5], [-0.4, 0.0, 0.3]];
        let w = monotone_w(&a0, &b0, 0.5);
        let params = weight_params(Parametrization::Monotone { m: 0.5 }, w.view()).unwrap();
        let get = |name: &str| {
            let found = params.iter().find(|(n, _)| *n == name).unwrap();
            found.1.clone().into_dimensionality::<ndarray::Ix2>().unwrap()
        };
        let rebuilt = monotone_w(&get("a"), &get("b_skew"), 0.5);
        let err = (&rebuilt - &w).mapv(f64::abs).fold(0.0f64, |a, &v| a.max(v));
        assert!(err < 1e-12, "max error {err}");
    }

    #[test]
    fn monotone_form_refuses_a_w_outside_it() {
        // sym(I - W) = -I: not monotone at all.
        let w = Array2::<f64>::eye(2) * 2.0;
        let err = weight_params(Parametrization::Monotone { m: 0.1 }, w.view()).unwrap_err();
        assert!(err.to_string().contains("eigenvalue"), "{err}");
    }

    #[test]
    fn spectral_form_takes_a_w_of_norm_gamma_only() {
        let w = array![[0.9, 0.0], [0.0, 0.3]];
        let params = weight_params(Parametrization::SpectralNorm { gamma: 0.9 }, w.view()).unwrap();
        assert_eq!(params[0].0, "v");
        let err = weight_params(Parametrization::SpectralNorm { gamma: 0.5 }, w.view()).unwrap_err();
        assert!(err.to_string().contains("sigma_max 9.0"), "{err}");
    }
}
