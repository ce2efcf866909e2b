//! What a DEQ layer is and how it is solved and differentiated.

use clarke_core::{Error, Result};
use clarke_implicit::{AdjointSolver, CheckOptions, GradientMode, KinkBand};

use super::Activation;

/// How `W` is built from the trained parameters. Both constrained forms guarantee the
/// hypothesis of the nonsmooth implicit function theorem for **every** selection at kinks:
/// `I - diag(d) W` is invertible for every `d` in `[0, 1]^n`, which contains every element of
/// the conservative Jacobian of relu, leaky relu and tanh.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Parametrization {
    /// `W = gamma V / sigma_max(V)` (sigma_max by warm-started power iteration, as in
    /// spectral normalisation). Then `||diag(d) W|| <= gamma < 1`: the map is a contraction,
    /// Picard converges at rate `gamma`, and the Neumann adjoint converges too.
    SpectralNorm {
        /// The bound `gamma` in `(0, 1)`.
        gamma: f64,
    },
    /// `W = (1 - m) I - A^T A + B - B^T` (Winston and Kolter's monotone DEQ): the symmetric part
    /// of `I - W` is at least `m I`, so `v = diag(d) W v` forces `v = 0` for `d` in `[0, 1]`.
    /// `W` may have a norm above one: the forward uses forward-backward splitting (relu) or
    /// Anderson, the adjoint GMRES.
    Monotone {
        /// The monotonicity margin `m > 0`.
        m: f64,
    },
    /// `W` trained freely. Nothing is guaranteed; the check measures what it can.
    Unconstrained,
}

/// How the forward fixed point is found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ForwardMethod {
    /// Picard for the spectral-norm form, Peaceman-Rachford splitting for a monotone relu
    /// cell, Anderson otherwise.
    Auto,
    /// `z <- sigma(z W^T + c)`.
    Picard,
    /// `z <- relu((1 - alpha) z + alpha (z W^T + c))`: forward-backward splitting of the
    /// monotone inclusion whose solution is the relu fixed point; converges for a monotone
    /// `W` when `alpha <= 2 m / ||I - W||^2`. `None` picks `alpha = m / ||I - W||^2`. Relu only
    /// (for other activations the fixed points of this iteration differ).
    ForwardBackward {
        /// The step `alpha`, or `None` to derive it from the parametrisation.
        alpha: Option<f64>,
    },
    /// Peaceman-Rachford splitting of the same monotone inclusion (Winston and Kolter's
    /// solver for monotone DEQs): with `R = (I + alpha (I - W))^-1`, formed once per forward,
    /// `u <- 2 R (2 z - u + alpha c) - (2 z - u)` and `z <- relu(u)`. One GEMM per iteration,
    /// as forward-backward, and it converges for any `alpha > 0` when `W` is monotone, in far
    /// fewer iterations. `None` picks `alpha = 1 / ||I - W||`. Relu only.
    PeacemanRachford {
        /// The step `alpha`, or `None` to derive it from `W`.
        alpha: Option<f64>,
    },
    /// Anderson acceleration (memory `m`) of Picard: each sample mixes its own last `m + 1`
    /// iterates (see `deq/anderson.rs`), with the stopping rule of Picard. It keeps
    /// `2 (m + 1)` copies of the batch's state (images and residuals), against Picard's one,
    /// and at most [`MAX_ANDERSON_MEMORY`] is accepted.
    Anderson {
        /// Number of past differences mixed (the iterates kept are one more).
        memory: usize,
    },
}

/// The largest Anderson memory a DEQ layer accepts (forward or adjoint): the solver keeps
/// `memory + 1` copies of the batch's state.
pub const MAX_ANDERSON_MEMORY: usize = 100;

/// Options of a DEQ layer.
#[derive(Debug, Clone, PartialEq)]
pub struct DeqConfig {
    /// The nonlinearity.
    pub activation: Activation,
    /// How `W` is parametrised.
    pub parametrization: Parametrization,
    /// Forward solver.
    pub forward: ForwardMethod,
    /// Per-sample relative change `||z_new - z|| / max(||z_new||, 1)` at which the forward
    /// stops.
    pub forward_tol: f64,
    /// Forward iteration cap; a forward that hits it without reaching the tolerance is an
    /// error (see [`DeqConfig::fixed_forward_iterations`]).
    pub forward_max_iter: usize,
    /// Run exactly this many forward iterations and accept the result whatever the residual
    /// (reported). For benchmarks against other tools that do so.
    pub fixed_forward_iterations: Option<usize>,
    /// Gradient mode: implicit with a Neumann, GMRES, BiCGSTAB or dense per-sample adjoint;
    /// truncated Neumann; unrolled; one-step.
    pub gradient: GradientMode,
    /// Relative residual of the adjoint solve.
    pub adjoint_tol: f64,
    /// Adjoint iteration cap; an unconverged adjoint is an error.
    pub adjoint_max_iter: usize,
    /// Run the hypothesis check on every backward pass.
    pub check: bool,
    /// Thresholds, vertex limits and the refusal rule of the check (the same options as the
    /// generic implicit layer's; the parametrisation supplies the certificates, so
    /// `contraction_bound` does not apply). Above `dense_limit` units the norm of `W` is
    /// estimated and each sample is walked matrix-free (`norm_tol`, `spectral_tol`,
    /// `spectral_iterations`).
    pub check_options: CheckOptions,
    /// How pre-activations within the forward solver's error of the kink are treated
    /// (default: as at the kink, see [`KinkBand`]).
    pub kink_band: KinkBand,
    /// Most power iterations per forward for the spectral norm (warm-started across steps,
    /// so a few per training step track `sigma_max(V)` as it moves).
    pub power_iterations: usize,
    /// The power iteration stops early when the singular vector moves less than this (l1).
    pub power_tol: f64,
}

impl Default for DeqConfig {
    fn default() -> Self {
        DeqConfig {
            activation: Activation::Relu,
            parametrization: Parametrization::SpectralNorm { gamma: 0.9 },
            forward: ForwardMethod::Auto,
            forward_tol: 1e-6,
            forward_max_iter: 500,
            fixed_forward_iterations: None,
            gradient: GradientMode::Implicit(AdjointSolver::Neumann),
            adjoint_tol: 1e-6,
            adjoint_max_iter: 500,
            check: true,
            check_options: CheckOptions::default(),
            kink_band: KinkBand::default(),
            power_iterations: 10,
            power_tol: 1e-7,
        }
    }
}

impl DeqConfig {
    /// Sets the activation.
    pub fn with_activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }

    /// Sets the parametrisation.
    pub fn with_parametrization(mut self, parametrization: Parametrization) -> Self {
        self.parametrization = parametrization;
        self
    }

    /// Sets the forward method.
    pub fn with_forward(mut self, forward: ForwardMethod) -> Self {
        self.forward = forward;
        self
    }

    /// Sets the forward tolerance and iteration cap.
    pub fn with_forward_tolerance(mut self, tol: f64, max_iter: usize) -> Self {
        self.forward_tol = tol;
        self.forward_max_iter = max_iter;
        self
    }

    /// Runs exactly `k` forward iterations (see the field).
    pub fn with_fixed_forward_iterations(mut self, k: usize) -> Self {
        self.fixed_forward_iterations = Some(k);
        self
    }

    /// Sets the gradient mode.
    pub fn with_gradient(mut self, gradient: GradientMode) -> Self {
        self.gradient = gradient;
        self
    }

    /// Sets the adjoint tolerance and iteration cap.
    pub fn with_adjoint_tolerance(mut self, tol: f64, max_iter: usize) -> Self {
        self.adjoint_tol = tol;
        self.adjoint_max_iter = max_iter;
        self
    }

    /// Sets the power-iteration budget of the spectral-norm form. The gradient through the
    /// normalisation treats the singular vectors as fixed (`d sigma = u^T dV v`), which is
    /// exact once they have converged; tests that compare with finite differences need a
    /// converged estimate.
    pub fn with_power_iterations(mut self, max_iter: usize, tol: f64) -> Self {
        self.power_iterations = max_iter;
        self.power_tol = tol;
        self
    }

    /// Sets the options of the hypothesis check (thresholds, vertex limits, refusal).
    pub fn with_check_options(mut self, options: CheckOptions) -> Self {
        self.check_options = options;
        self
    }

    /// Sets how pre-activations within the forward solver's error of the kink are treated.
    pub fn with_kink_band(mut self, band: KinkBand) -> Self {
        self.kink_band = band;
        self
    }

    /// Turns the per-backward hypothesis check on or off.
    pub fn with_check(mut self, on: bool) -> Self {
        self.check = on;
        self
    }

    /// The forward method after resolving [`ForwardMethod::Auto`].
    pub fn resolved_forward(&self) -> ForwardMethod {
        match (self.forward, self.parametrization, self.activation) {
            (ForwardMethod::Auto, Parametrization::Monotone { .. }, Activation::Relu) => {
                ForwardMethod::PeacemanRachford { alpha: None }
            }
            (ForwardMethod::Auto, Parametrization::Monotone { .. }, _) => ForwardMethod::Anderson { memory: 5 },
            (ForwardMethod::Auto, _, _) => ForwardMethod::Picard,
            (f, _, _) => f,
        }
    }

    /// Checks the options, naming the bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |detail: String| Err(Error::invalid("DeqConfig", detail));
        match self.parametrization {
            Parametrization::SpectralNorm { gamma } if !(gamma > 0.0 && gamma < 1.0) => {
                return bad(format!("the spectral-norm bound gamma must lie in (0, 1), got {gamma}"));
            }
            Parametrization::Monotone { m } if !(m > 0.0 && m.is_finite()) => {
                return bad(format!(
                    "the monotonicity margin m must be positive and finite, got {m}"
                ));
            }
            _ => {}
        }
        if let Activation::LeakyRelu(a) = self.activation {
            if !(0.0..1.0).contains(&a) {
                return bad(format!("the leaky relu slope must lie in [0, 1), got {a}"));
            }
        }
        match self.resolved_forward() {
            method @ (ForwardMethod::ForwardBackward { .. } | ForwardMethod::PeacemanRachford { .. })
                if self.activation != Activation::Relu =>
            {
                let splitting = if matches!(method, ForwardMethod::ForwardBackward { .. }) {
                    "forward-backward"
                } else {
                    "Peaceman-Rachford"
                };
                return bad(format!(
                    "{splitting} splitting solves the relu cell only; {} needs Picard or Anderson",
                    self.activation.name()
                ));
            }
            ForwardMethod::ForwardBackward { alpha: Some(a) } if !(a > 0.0 && a <= 1.0) => {
                return bad(format!("the forward-backward step must lie in (0, 1], got {a}"));
            }
            ForwardMethod::PeacemanRachford { alpha: Some(a) } if !(a > 0.0 && a.is_finite()) => {
                return bad(format!(
                    "the Peaceman-Rachford step must be positive and finite, got {a}"
                ));
            }
            ForwardMethod::Anderson { memory: 0 } => return bad("Anderson needs a memory of at least 1".into()),
            ForwardMethod::Anderson { memory } if memory > MAX_ANDERSON_MEMORY => {
                return bad(format!(
                    "the forward Anderson memory is {memory}, above {MAX_ANDERSON_MEMORY}: each sample would keep that many copies of its state, and past a few dozen they only add dependent differences"
                ));
            }
            _ => {}
        }
        // A zero tolerance asks for an exact fixed point (as the generic implicit layer
        // allows): the solve then runs to its cap and says so if it never gets there.
        let valid = |t: f64| t >= 0.0 && t.is_finite();
        if !valid(self.forward_tol) || !valid(self.adjoint_tol) {
            return bad(format!(
                "tolerances must be finite and >= 0 (forward {}, adjoint {})",
                self.forward_tol, self.adjoint_tol
            ));
        }
        self.check_options.validate()?;
        if let KinkBand::SolverError { factor } = self.kink_band {
            if !(factor.is_finite() && factor >= 0.0) {
                return bad(format!("the kink band factor must be finite and >= 0, got {factor}"));
            }
        }
        if self.forward_max_iter == 0 || self.adjoint_max_iter == 0 || self.fixed_forward_iterations == Some(0) {
            return bad("iteration caps must be at least 1".into());
        }
        match self.gradient {
            GradientMode::LeastSquaresNoHypothesis => bad(
                "the DEQ layer does not offer the least-squares mode; use clarke_implicit::fixed_point with the cell as its map"
                    .into(),
            ),
            GradientMode::Unrolled { iterations: 0 } | GradientMode::TruncatedNeumann { terms: 0 } => {
                bad("unrolled and truncated modes need at least one iteration".into())
            }
            GradientMode::Implicit(AdjointSolver::Anderson { memory }) if memory > MAX_ANDERSON_MEMORY => bad(format!(
                "the adjoint Anderson memory is {memory}, above {MAX_ANDERSON_MEMORY}: each sample would keep that many copies of its adjoint, and past a few dozen they only add dependent differences"
            )),
            _ => Ok(()),
        }
    }
}
