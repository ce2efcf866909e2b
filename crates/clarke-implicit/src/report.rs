//! What an implicit layer did: its forward solve, each backward pass, and the check.

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;

use clarke_core::KinkLedger;
use clarke_solve::{FixedPointReport, SolveReport};

use crate::options::GradientMode;

/// The verdict of the invertibility check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckOutcome {
    /// Every element of the conservative Jacobian block that is inverted is invertible, by a
    /// certificate: a contraction bound, or an exhaustive walk of the selection box with the
    /// determinant keeping one sign (exact, see [`crate::check`]).
    Certified,
    /// No violation found, but no certificate either (sampled vertices, a matrix-free
    /// estimate, ties in reductions that cannot be flipped) or a nearly singular element.
    Warning,
    /// An element is singular: the implicit gradient is not justified by the theorem.
    Violated,
    /// The check did not run (switched off).
    NotChecked,
}

impl fmt::Display for CheckOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckOutcome::Certified => "certified",
            CheckOutcome::Warning => "warning",
            CheckOutcome::Violated => "violated",
            CheckOutcome::NotChecked => "not checked",
        })
    }
}

/// The invertibility check of one backward pass, with its numbers.
///
/// `A` below is the inverted block: `I - J_z` for a fixed-point layer, `J_F` (in `z`) for a
/// root layer.
#[derive(Debug, Clone, PartialEq)]
pub struct HypothesisCheck {
    /// The verdict.
    pub outcome: CheckOutcome,
    /// Smallest singular value of `A` for the selected element (dense check, or its
    /// matrix-free estimate, see [`matrix_free`](Self::matrix_free)), or the lower bound
    /// `1 - L` from a contraction bound `L`.
    pub sigma_min: Option<f64>,
    /// Largest singular value of `A` for the selected element (dense check or matrix-free
    /// estimate).
    pub sigma_max: Option<f64>,
    /// `forward residual / sigma_min`: a bound on the distance from the returned `z` to the
    /// exact solution, to first order.
    pub error_bound: Option<f64>,
    /// Power-iteration estimate of the spectral radius of `J_z` (fixed-point layers above the
    /// dense limit whose map has no forward-mode products).
    pub spectral_radius: Option<f64>,
    /// Largest `||J_z||_2` over the vertices checked (fixed-point layers; in the matrix-free
    /// check, estimated and only when there are kinks); below one on an exhaustive walk it
    /// certifies contraction for every selection.
    pub max_vertex_norm: Option<f64>,
    /// The declared contraction bound, when one was given.
    pub contraction_bound: Option<f64>,
    /// Kink elements the inner map hit at `z*` (exactly).
    pub kink_elements: usize,
    /// Of these, the ones whose selection the check can move (element-wise ops).
    pub flippable: usize,
    /// Vertices of the selection box examined (other than the selected element).
    pub vertices: usize,
    /// Whether every vertex was examined.
    pub exhaustive: bool,
    /// Smallest `sigma_min(A)` over the vertices examined.
    pub min_vertex_sigma: Option<f64>,
    /// Whether `det A` changed sign between two examined elements: then some element in
    /// between is singular.
    pub determinant_sign_change: bool,
    /// Whether the singular values are matrix-free estimates (`z` above the dense limit):
    /// `sigma_min` by Golub-Kahan-Lanczos, which never lies below the true value, and
    /// `sigma_max` and `||J_z||` by power iteration, which never lie above it. Such a walk has
    /// no determinant signs.
    pub matrix_free: bool,
    /// Products with the block, the Jacobian or their transposes that the matrix-free
    /// estimates used (0 for the dense check).
    pub products: usize,
    /// Why the verdict is what it is, in words.
    pub reasons: Vec<String>,
}

impl HypothesisCheck {
    /// A check that did not run.
    pub fn not_checked(reason: &str) -> Self {
        HypothesisCheck {
            outcome: CheckOutcome::NotChecked,
            sigma_min: None,
            sigma_max: None,
            error_bound: None,
            spectral_radius: None,
            max_vertex_norm: None,
            contraction_bound: None,
            kink_elements: 0,
            flippable: 0,
            vertices: 0,
            exhaustive: false,
            min_vertex_sigma: None,
            determinant_sign_change: false,
            matrix_free: false,
            products: 0,
            reasons: vec![reason.to_string()],
        }
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.3e}"))
}

impl fmt::Display for HypothesisCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: sigma_min {} (sigma_max {}), error bound {}, {} kink element(s), {} vertex(es){}, min vertex sigma {}",
            self.outcome,
            opt(self.sigma_min),
            opt(self.sigma_max),
            opt(self.error_bound),
            self.kink_elements,
            self.vertices,
            if self.exhaustive { " (all)" } else { "" },
            opt(self.min_vertex_sigma),
        )?;
        if let Some(r) = self.spectral_radius {
            write!(f, ", spectral radius of J_z ~ {r:.3e}")?;
        }
        if let Some(n) = self.max_vertex_norm {
            write!(f, ", max ||J_z|| {n:.3e}")?;
        }
        if self.determinant_sign_change {
            f.write_str(", det changes sign")?;
        }
        if self.matrix_free {
            write!(f, ", matrix-free ({} products)", self.products)?;
        }
        for r in &self.reasons {
            write!(f, "; {r}")?;
        }
        Ok(())
    }
}

/// The report of one backward pass through an implicit layer.
#[derive(Debug, Clone, PartialEq)]
pub struct BackwardReport {
    /// The layer's name.
    pub node: String,
    /// The gradient mode.
    pub mode: GradientMode,
    /// The forward solve that produced `z*` (for the unrolled mode: its `K` iterations).
    pub forward: FixedPointReport,
    /// `||T(z) - z||_2` (fixed point) or `||F(z)||_2` (root) at the returned `z`, absolute.
    pub forward_residual: f64,
    /// The adjoint solve (absent for the unrolled and one-step modes).
    pub adjoint: Option<SolveReport>,
    /// A fallback that was taken, in words (only with an opt-in failure policy).
    pub fallback: Option<String>,
    /// Whether the gradient is approximate: an unconverged forward or adjoint solve that the
    /// options accepted, or a truncated mode.
    pub approximate: bool,
    /// The invertibility check.
    pub check: HypothesisCheck,
    /// The kinks the inner map hit at `z*`, under the backward call's policy (empty for the
    /// unrolled and one-step modes, whose kinks are in the outer ledger).
    pub kinks: KinkLedger,
}

impl fmt::Display for BackwardReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} [{}]", self.node, self.mode.name())?;
        writeln!(
            f,
            "  forward: {} {} after {} iterations, residual {:.3e} (|T(z)-z| or |F(z)| = {:.3e})",
            self.forward.solver,
            self.forward.status,
            self.forward.iterations,
            self.forward.residual,
            self.forward_residual
        )?;
        match &self.adjoint {
            Some(a) => writeln!(
                f,
                "  adjoint: {} {} after {} iterations, residual {:.3e}",
                a.solver, a.status, a.iterations, a.residual
            )?,
            None => writeln!(f, "  adjoint: none (gradient by backpropagation)")?,
        }
        if let Some(fb) = &self.fallback {
            writeln!(f, "  fallback: {fb}")?;
        }
        if self.approximate {
            writeln!(f, "  gradient is approximate")?;
        }
        writeln!(f, "  kinks at z*: {}", self.kinks.summary())?;
        write!(f, "  check: {}", self.check)
    }
}

/// Which product through a layer a report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Pass {
    /// A backward pass (vector-Jacobian product): the report's `adjoint` is the solve of
    /// `A^T w = g`.
    #[default]
    Backward,
    /// A forward-mode product through the layer ([`clarke_core::Tape::jvp`]): the report's
    /// `adjoint` is the solve of the tangent system `A dz = J_theta dtheta` (`A dz =
    /// -J_theta dtheta` for a root), with the same check, kinks and failure policy as a
    /// backward pass.
    ForwardMode,
}

impl fmt::Display for Pass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pass::Backward => "backward",
            Pass::ForwardMode => "forward mode",
        })
    }
}

/// The reports of every backward pass (and forward-mode product) through one layer, oldest
/// first.
///
/// A cheap handle: clones share the same log.
#[derive(Debug, Clone, Default)]
pub struct ReportLog {
    reports: Rc<RefCell<Vec<(Pass, BackwardReport)>>>,
}

impl ReportLog {
    /// Appends the report of a backward pass, as given: the log records what the layers did
    /// and judges nothing. Layers built outside this crate on the same theorem (the fused DEQ
    /// cell of `clarke-nn`) log their backward passes here too.
    pub fn push(&self, report: BackwardReport) {
        self.push_pass(Pass::Backward, report);
    }

    /// Appends the report of a product of the given kind (see [`Pass`]).
    pub fn push_pass(&self, pass: Pass, report: BackwardReport) {
        self.reports.borrow_mut().push((pass, report));
    }

    /// The most recent report.
    pub fn last(&self) -> Option<BackwardReport> {
        self.reports.borrow().last().map(|(_, r)| r.clone())
    }

    /// Which product the most recent report is about.
    pub fn last_pass(&self) -> Option<Pass> {
        self.reports.borrow().last().map(|(p, _)| *p)
    }

    /// All reports so far.
    pub fn all(&self) -> Vec<BackwardReport> {
        self.reports.borrow().iter().map(|(_, r)| r.clone()).collect()
    }

    /// Which product each report is about, in the order of [`ReportLog::all`].
    pub fn passes(&self) -> Vec<Pass> {
        self.reports.borrow().iter().map(|(p, _)| *p).collect()
    }

    /// Number of reports so far.
    pub fn len(&self) -> usize {
        self.reports.borrow().len()
    }

    /// Whether no report was logged yet.
    pub fn is_empty(&self) -> bool {
        self.reports.borrow().is_empty()
    }
}
