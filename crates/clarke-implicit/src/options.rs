//! How an implicit layer solves, differentiates and checks.

use clarke_core::Scalar;
use clarke_solve::{FixedPointOptions, NewtonKrylovOptions, SolveOptions};

/// The forward solver that finds `z*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardSolver {
    /// `z <- z + beta (T(z) - z)` (damping from [`FixedPointOptions::damping`]). For a root
    /// layer it iterates `z <- z - beta F(z)`.
    Picard,
    /// Anderson acceleration of Picard.
    Anderson,
    /// Limited-memory Broyden on `T(z) - z` (or `F`).
    Broyden,
    /// Newton-Krylov (GMRES on finite-difference Jacobian-vector products) on `T(z) - z`
    /// (or `F`).
    NewtonKrylov,
}

/// The linear solver of the adjoint equation `(I - J_z)^T w = g` (fixed point) or
/// `J_F^T w = g` (root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdjointSolver {
    /// Build `J_z` with one vector-Jacobian product per element of `z` and solve by LU. Exact,
    /// and refuses a singular system; for small `z` (up to a few thousand elements).
    Dense,
    /// The Neumann series `w <- J_z^T w + g` until the tolerance (fixed-point layers only;
    /// converges when the spectral radius of `J_z` is below one).
    Neumann,
    /// Restarted GMRES on the adjoint operator.
    Gmres,
    /// BiCGSTAB on the adjoint operator.
    Bicgstab,
    /// The Neumann iteration with Anderson mixing of the last `memory` iterates
    /// ([`clarke_solve::anderson_neumann`]): a Krylov method on the adjoint system that, like
    /// the plain series, only needs products with `J_z^T`, and far fewer of them when
    /// `J_z`'s spectral radius is near one (fixed-point layers only). It keeps `2 memory`
    /// vectors of the state's size; the DEQ layer mixes per sample and accepts a memory up
    /// to `clarke_nn::deq::MAX_ANDERSON_MEMORY`.
    Anderson {
        /// Number of past iterates mixed (5 is a good default).
        memory: usize,
    },
}

/// How the gradient of `z*` with respect to `theta` is computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GradientMode {
    /// The implicit function theorem: solve the adjoint with the given solver to the
    /// tolerance of [`ImplicitOptions::adjoint`], then `theta_bar = J_theta^T w`.
    Implicit(AdjointSolver),
    /// A fixed number of Neumann terms, `w = sum_{i<k} (J_z^T)^i g`, accepted whatever the
    /// residual (reported), always started from zero (no warm start, so `k` terms mean the
    /// same thing on every call). Fixed-point layers only. Cheap, and biased when `k` is
    /// small: on a linear map it equals the unrolled gradient of `k` iterations from `z*`.
    TruncatedNeumann {
        /// Number of terms `k`.
        terms: usize,
    },
    /// `K` iterations of the map from `z0` recorded on the outer tape and differentiated by
    /// backpropagation (the output is `z_K`, not `z*`). Memory grows with `K`; for
    /// comparison and as a reference. Fixed-point layers only.
    Unrolled {
        /// Number of iterations `K`.
        iterations: usize,
    },
    /// Jacobian-free: the forward solve runs without recording, then one application of
    /// the map at the detached `z*` is recorded, so `theta_bar = J_theta^T g`. Equals the
    /// implicit gradient only when `J_z = 0` at `z*`. Fixed-point layers only.
    OneStep,
    /// Minimum-norm least squares on the dense adjoint system, **ignoring the invertibility
    /// hypothesis**: it returns an answer even when `I - J_z` is singular. This is the
    /// pseudo-inverse that existing tools silently use; it exists to reproduce the
    /// pathologies of the paper (a singular inner Jacobian gives a spurious gradient). The
    /// check still runs and is reported, but never refuses.
    LeastSquaresNoHypothesis,
}

impl GradientMode {
    /// A short name for reports.
    pub fn name(&self) -> &'static str {
        match self {
            GradientMode::Implicit(AdjointSolver::Dense) => "implicit (dense LU)",
            GradientMode::Implicit(AdjointSolver::Neumann) => "implicit (Neumann)",
            GradientMode::Implicit(AdjointSolver::Gmres) => "implicit (GMRES)",
            GradientMode::Implicit(AdjointSolver::Bicgstab) => "implicit (BiCGSTAB)",
            GradientMode::Implicit(AdjointSolver::Anderson { .. }) => "implicit (Anderson)",
            GradientMode::TruncatedNeumann { .. } => "truncated Neumann",
            GradientMode::Unrolled { .. } => "unrolled",
            GradientMode::OneStep => "one-step",
            GradientMode::LeastSquaresNoHypothesis => "least squares (no hypothesis)",
        }
    }

    /// Whether this mode solves an adjoint system (and so is governed by the check).
    pub fn solves_adjoint(&self) -> bool {
        matches!(
            self,
            GradientMode::Implicit(_) | GradientMode::TruncatedNeumann { .. } | GradientMode::LeastSquaresNoHypothesis
        )
    }
}

/// What happens when an iterative adjoint solve does not reach its tolerance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnAdjointFailure {
    /// Refuse the backward pass with [`clarke_core::Error::SolveFailed`] (default).
    #[default]
    Error,
    /// Solve the same system densely by LU instead (exact; refuses if singular). The report
    /// records the fallback.
    Dense,
    /// Keep the approximate adjoint of a solve that ran out of iterations (a diverged,
    /// broken-down or non-finite solve is still an error). The report records that the
    /// gradient is approximate and how far the residual is from the tolerance.
    AcceptApproximate,
}

/// Options of the invertibility check of the nonsmooth implicit function theorem.
///
/// The theorem needs **every** element of the conservative Jacobian block that is inverted
/// (`I - J_z`, or `J_F`) to be invertible, not only the one backpropagation happened to
/// select. See [`crate::check`] for what is computed.
///
/// The fields are public and the builders take any value; [`CheckOptions::validate`] says
/// which values are refused, and runs when a layer is built and on every walk.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckOptions {
    /// Run the check on every backward. Default `true`.
    pub enabled: bool,
    /// Refuse the backward pass with [`clarke_core::Error::HypothesisViolated`] when the
    /// outcome is violated. Default `true`. ([`GradientMode::LeastSquaresNoHypothesis`]
    /// never refuses.)
    pub refuse_violated: bool,
    /// Largest `z` (in elements) for which the dense check runs: it costs one
    /// vector-Jacobian product per element of `z` per selection explored. Above it the check
    /// walks the same elements with matrix-free estimates of their singular values (see
    /// [`crate::check`]), or, for a map without forward-mode products, a power-iteration
    /// estimate of the spectral radius of `J_z`; a declared contraction bound certifies in
    /// either case. Default 512.
    pub dense_limit: usize,
    /// Up to this many kink elements, every vertex of the selection box (`2^k`
    /// combinations) is checked; above it, `samples` random vertices. Default 12; values
    /// above [`MAX_EXHAUSTIVE`](crate::check::MAX_EXHAUSTIVE) act as that cap (the report
    /// then says the vertices were sampled).
    pub exhaustive_limit: usize,
    /// Random vertices checked when there are more than `exhaustive_limit` kink elements.
    /// Default 64.
    pub samples: usize,
    /// Seed of the vertex sampler.
    pub seed: u64,
    /// `sigma_min / max(sigma_max, unit)` at or below this is treated as singular (violated),
    /// where `unit` is 1 for a fixed point and the map's derivative scale for a root (see
    /// [`crate::check`]). In `[0, 1)`. Default `1e3 * eps` of the scalar type (see
    /// [`CheckOptions::for_precision`]).
    pub singular_tol: f64,
    /// An absolute floor: `sigma_min` at or below it is singular whatever the scale. Default
    /// 0; set it when the problem has a natural unit (see [`crate::check`]).
    pub singular_floor: f64,
    /// `sigma_min / sigma_max` at or below this (but above `singular_tol`) gives a warning.
    /// In `[0, 1)`. Default `1e-6` for f64, `1e-3` for f32.
    pub warn_tol: f64,
    /// A bound `L` on `||J_z||_2` over **every** selection, declared by the caller (for
    /// example a layer whose weight has spectral norm at most `L` followed by 1-Lipschitz
    /// activations). `L < 1` certifies the hypothesis without computing anything. Default
    /// `None`.
    pub contraction_bound: Option<f64>,
    /// Power iterations for the spectral-radius estimate of a map without forward-mode
    /// products (at least 1); an estimate that has not settled within them gives no
    /// conclusion. Default 50.
    pub radius_iterations: usize,
    /// Tolerance of the matrix-free `sigma_min` estimate (Golub-Kahan-Lanczos): it stops when
    /// its residual bound is at most this times the norm estimate, so the value is within
    /// about `spectral_tol * sigma_max` of a singular value. Finite, in `[0, 1)`. Default
    /// `1e-10` (`1e-5` for `f32`).
    pub spectral_tol: f64,
    /// Tolerance on the relative change of the power iterations that estimate `sigma_max`
    /// and `||J_z||` in the matrix-free check. `sigma_max` only sets the scale of the
    /// singularity test, so a loose tolerance serves; a clustered top of the spectrum (a
    /// large `z` has many singular values near the largest) makes the change per iteration
    /// small long before it is tiny. Finite, in `[0, 1)`. Default `1e-3`.
    pub norm_tol: f64,
    /// Iteration budget of each matrix-free estimate (at least 1); an estimate that does not
    /// meet its tolerance within it draws no conclusion. Default 500.
    pub spectral_iterations: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions::for_precision::<f64>()
    }
}

impl CheckOptions {
    /// Defaults with tolerances suited to the scalar type.
    pub fn for_precision<S: Scalar>() -> Self {
        let eps = S::epsilon().to_f64_exact();
        CheckOptions {
            enabled: true,
            refuse_violated: true,
            dense_limit: 512,
            exhaustive_limit: 12,
            samples: 64,
            seed: 0x5eed,
            singular_tol: 1e3 * eps,
            singular_floor: 0.0,
            warn_tol: if eps > 1e-10 { 1e-3 } else { 1e-6 },
            contraction_bound: None,
            radius_iterations: 50,
            spectral_tol: if eps > 1e-10 { 1e-5 } else { 1e-10 },
            norm_tol: 1e-3,
            spectral_iterations: 500,
        }
    }

    /// The check switched off (the report says it did not run).
    pub fn off() -> Self {
        CheckOptions {
            enabled: false,
            ..Default::default()
        }
    }

    /// Declares a contraction bound `L >= ||J_z||_2` valid for every selection.
    pub fn with_contraction_bound(mut self, bound: f64) -> Self {
        self.contraction_bound = Some(bound);
        self
    }

    /// Sets whether a violated check refuses the backward pass.
    pub fn with_refuse_violated(mut self, refuse: bool) -> Self {
        self.refuse_violated = refuse;
        self
    }

    /// Sets the absolute singularity floor (see [`CheckOptions::singular_floor`]).
    pub fn with_singular_floor(mut self, floor: f64) -> Self {
        self.singular_floor = floor;
        self
    }
    /// Sets the number of kink elements up to which every vertex is walked.
    pub fn with_exhaustive_limit(mut self, limit: usize) -> Self {
        self.exhaustive_limit = limit;
        self
    }
    /// Refuses options that cannot mean anything: a threshold that is negative or not finite,
    /// a relative threshold (`singular_tol`, `warn_tol`) of 1 or more (`sigma_min / scale`
    /// never exceeds 1, so every element would be singular, or none certified), no samples,
    /// no power iterations, a spectral tolerance outside `[0, 1)`, no spectral iterations.
    /// Every layer validates its options when it is built, and
    /// [`walk_vertices`](crate::check::walk_vertices) validates them again on each walk.
    pub fn validate(&self) -> clarke_core::Result<()> {
        let refuse = |detail: String| Err(clarke_core::Error::invalid("CheckOptions", detail));
        for (what, v) in [
            ("singular_tol", self.singular_tol),
            ("singular_floor", self.singular_floor),
            ("warn_tol", self.warn_tol),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return refuse(format!("{what} must be finite and >= 0, got {v}"));
            }
        }
        for (what, v) in [("singular_tol", self.singular_tol), ("warn_tol", self.warn_tol)] {
            if v >= 1.0 {
                return refuse(format!(
                    "{what} is a ratio sigma_min / scale and must be below 1, got {v}"
                ));
            }
        }
        if let Some(b) = self.contraction_bound {
            if !(b.is_finite() && b >= 0.0) {
                return refuse(format!("the contraction bound must be finite and >= 0, got {b}"));
            }
        }
        if self.samples == 0 {
            return refuse(
                "samples must be at least 1 (the walk samples vertices above the exhaustive limit), got 0".into(),
            );
        }
        for (what, v) in [("spectral_tol", self.spectral_tol), ("norm_tol", self.norm_tol)] {
            if !(v.is_finite() && (0.0..1.0).contains(&v)) {
                return refuse(format!(
                    "{what} is a relative tolerance of a spectral estimate and must be finite, >= 0 and below 1, got {v}"
                ));
            }
        }
        if self.spectral_iterations == 0 {
            return refuse(
                "spectral_iterations must be at least 1 (each matrix-free estimate runs up to that many iterations), got 0"
                    .into(),
            );
        }
        if self.radius_iterations == 0 {
            return refuse(
                "radius_iterations must be at least 1 (the matrix-free check runs that many power iterations), got 0"
                    .into(),
            );
        }
        Ok(())
    }
    /// Sets the largest `z` for the dense check.
    pub fn with_dense_limit(mut self, limit: usize) -> Self {
        self.dense_limit = limit;
        self
    }
}

/// Everything an implicit layer needs to know.
///
/// The fields are public and the builders take any value: [`crate::ImplicitLayer::fixed_point`]
/// and [`crate::ImplicitLayer::root`] validate the mode, the check and the kink band when the
/// layer is built, and the solvers of `clarke-solve` validate their own options
/// (`forward`, `newton`, `adjoint`) each time they run, naming the solver.
#[derive(Debug, Clone, PartialEq)]
pub struct ImplicitOptions {
    /// Name of the layer in errors and reports (default `"fixed_point"` or `"root"`).
    pub name: Option<String>,
    /// The forward solver. Default Anderson for fixed points, Newton-Krylov for roots.
    pub forward_solver: Option<ForwardSolver>,
    /// Options of Picard, Anderson and Broyden.
    pub forward: FixedPointOptions,
    /// Options of Newton-Krylov.
    pub newton: NewtonKrylovOptions,
    /// Refuse (with the residual trace) when the forward solve does not converge. Default
    /// `true`. Turn it off to run a fixed iteration budget (the report keeps the residual and
    /// the check's error bound accounts for it).
    pub require_forward_convergence: bool,
    /// The gradient mode. Default implicit with GMRES.
    pub mode: GradientMode,
    /// Options of the iterative adjoint solvers.
    pub adjoint: SolveOptions,
    /// What an unconverged iterative adjoint solve does.
    pub on_adjoint_failure: OnAdjointFailure,
    /// Start each adjoint solve from the previous backward's adjoint (when shapes agree).
    /// Default `true`.
    pub warm_start: bool,
    /// The invertibility check.
    pub check: CheckOptions,
    /// How kinks met within the forward solver's error are handled. Default
    /// [`KinkBand::SolverError`] with a factor of 10.
    pub kink_band: KinkBand,
}

/// Which elements of the inner map count as at a kink when the layer is differentiated.
///
/// The forward solve stops at a point `z` that is only known to its accuracy: to first order
/// `||z - z*|| <= ||T(z) - z|| / sigma_min(I - J_z)` (or `||F(z)|| / sigma_min(J_F)`). An
/// argument of a kink inside the map whose distance to the kink is below that bound may sit
/// on the kink at the exact solution, so clarke treats it as at the kink: the policy's
/// selection applies, the ledger reports it as *within solver error*, and the check walks it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KinkBand {
    /// Only exact kinks (and those within the policy's tolerance) select: the behaviour of
    /// every other framework.
    Exact,
    /// Elements within `factor` times the first-order error bound on `z` of a kink are at it.
    /// The factor covers the first-order nature of the bound and kink arguments that move
    /// faster than `z` (an argument `w^T z` with `||w|| > 1`).
    SolverError {
        /// Multiplier of the error bound (finite, >= 1 is sensible).
        factor: f64,
    },
}

impl Default for KinkBand {
    fn default() -> Self {
        KinkBand::SolverError { factor: 10.0 }
    }
}

impl KinkBand {
    /// The band for a solve with residual `residual` and a lower bound `sigma` on the
    /// smallest singular value of the inverted block.
    ///
    /// The inputs are taken as given: the layers pass a finite residual `>= 0`, a `sigma >= 0`
    /// and a factor validated when the layer is built, and get a finite band `>= 0` back (a
    /// `sigma` of 0 falls back to `factor * residual`). A negative, NaN or overflowing input
    /// gives a band that the backward pass refuses (it needs a finite band `>= 0`).
    pub fn width(&self, residual: f64, sigma: f64) -> f64 {
        match *self {
            KinkBand::Exact => 0.0,
            KinkBand::SolverError { factor } => {
                let bound = if sigma > 0.0 { residual / sigma } else { f64::INFINITY };
                let band = factor * bound;
                if band.is_finite() {
                    band
                } else {
                    // A singular block gives no bound: fall back to the residual itself;
                    // the check reports the singularity.
                    factor * residual
                }
            }
        }
    }
}

impl Default for ImplicitOptions {
    fn default() -> Self {
        ImplicitOptions::for_precision::<f64>()
    }
}

impl ImplicitOptions {
    /// Defaults with tolerances suited to the scalar type (`f32` solves to about `1e-5`).
    pub fn for_precision<S: Scalar>() -> Self {
        let newton_tol = if S::epsilon().to_f64_exact() > 1e-10 {
            1e-5
        } else {
            1e-10
        };
        ImplicitOptions {
            name: None,
            forward_solver: None,
            forward: FixedPointOptions::for_precision::<S>(),
            newton: NewtonKrylovOptions::default().with_tol(newton_tol),
            require_forward_convergence: true,
            mode: GradientMode::Implicit(AdjointSolver::Gmres),
            adjoint: SolveOptions::for_precision::<S>(),
            on_adjoint_failure: OnAdjointFailure::Error,
            warm_start: true,
            check: CheckOptions::for_precision::<S>(),
            kink_band: KinkBand::default(),
        }
    }

    /// Sets the layer's name.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets how kinks within the forward solver's error are handled.
    pub fn with_kink_band(mut self, band: KinkBand) -> Self {
        self.kink_band = band;
        self
    }
    /// Sets the gradient mode.
    pub fn with_mode(mut self, mode: GradientMode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets the forward solver.
    pub fn with_forward_solver(mut self, solver: ForwardSolver) -> Self {
        self.forward_solver = Some(solver);
        self
    }

    /// Sets the options of Picard, Anderson and Broyden.
    pub fn with_forward(mut self, forward: FixedPointOptions) -> Self {
        self.forward = forward;
        self
    }

    /// Sets the options of Newton-Krylov.
    pub fn with_newton(mut self, newton: NewtonKrylovOptions) -> Self {
        self.newton = newton;
        self
    }

    /// Runs the forward solver for a fixed budget: `iterations` steps, accepted whatever the
    /// residual (the report keeps it).
    pub fn with_fixed_forward_iterations(mut self, iterations: usize) -> Self {
        self.forward = self.forward.with_max_iter(iterations).with_tol(0.0);
        self.require_forward_convergence = false;
        self
    }

    /// Sets the options of the iterative adjoint solvers.
    pub fn with_adjoint(mut self, adjoint: SolveOptions) -> Self {
        self.adjoint = adjoint;
        self
    }

    /// Sets the failure policy of the adjoint solve.
    pub fn with_on_adjoint_failure(mut self, policy: OnAdjointFailure) -> Self {
        self.on_adjoint_failure = policy;
        self
    }

    /// Sets the check options.
    pub fn with_check(mut self, check: CheckOptions) -> Self {
        self.check = check;
        self
    }

    /// Turns the adjoint warm start on or off.
    pub fn with_warm_start(mut self, on: bool) -> Self {
        self.warm_start = on;
        self
    }
}
