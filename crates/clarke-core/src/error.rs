//! The one error type of clarke.
//!
//! Every fallible operation in the workspace returns [`Result<T>`]. Variants are structured
//! (shapes, values, iteration counts) so that callers can react to them and so that the
//! message names the op, the shapes and the offending value.

use std::fmt;

/// Where in a computation a non-finite value was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// While recording a node (the forward pass).
    Forward,
    /// While propagating gradients (the backward pass).
    Backward,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Forward => "forward",
            Stage::Backward => "backward",
        })
    }
}

/// Everything that can go wrong in clarke.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Two operands (or an operand and a required shape) do not fit together.
    #[error("{op}: shape mismatch: {lhs:?} vs {rhs:?} ({detail})")]
    ShapeMismatch {
        /// The op that was being recorded.
        op: &'static str,
        /// Shape of the first operand (or the shape found).
        lhs: Vec<usize>,
        /// Shape of the second operand (or the shape required).
        rhs: Vec<usize>,
        /// What the op needed.
        detail: String,
    },
    /// An argument is out of its domain (an axis past the rank, an index out of range, ...).
    #[error("{op}: invalid argument: {detail}")]
    InvalidArgument {
        /// The op or function that refused the argument.
        op: &'static str,
        /// What was wrong, with the value.
        detail: String,
    },
    /// A `Var` recorded on one tape was used with another tape.
    #[error("{op}: a Var from another tape was used (node {node}); Vars only combine with Vars of the same tape")]
    ForeignVar {
        /// The op that received the foreign Var.
        op: &'static str,
        /// Node id of the foreign Var (on its own tape).
        node: usize,
    },
    /// `backward` was called on a non-scalar output without an explicit seed.
    #[error(
        "backward: output has shape {shape:?}; backward without a seed needs a scalar (one element) output, or pass a seed of that shape"
    )]
    NonScalarOutput {
        /// Shape of the output.
        shape: Vec<usize>,
    },
    /// A kink selection lies outside the convex hull of the one-sided derivatives and the
    /// policy did not opt in, or is not a finite number.
    #[error("{op}: invalid kink selection {value}: allowed range is [{low}, {high}]{hint}")]
    InvalidSelection {
        /// Which selection (for example `"relu'(0)"`).
        op: &'static str,
        /// The selection that was refused.
        value: f64,
        /// Lower end of the convex hull of the one-sided derivatives.
        low: f64,
        /// Upper end of that hull.
        high: f64,
        /// How to opt in, when opting in is possible.
        hint: &'static str,
    },
    /// A NaN or an infinity appeared (reported in anomaly mode, and by solvers and checks).
    #[error(
        "{stage}: node {node} ({op}) produced {count} non-finite value(s), first {value} at flat index {index}; its inputs were finite"
    )]
    NonFinite {
        /// Forward or backward.
        stage: Stage,
        /// The op of the first node that produced a non-finite value.
        op: &'static str,
        /// Its node id.
        node: usize,
        /// How many elements were non-finite.
        count: usize,
        /// First non-finite value (NaN, inf or -inf).
        value: f64,
        /// Its flat (row-major) index.
        index: usize,
    },
    /// An iterative solver stopped before reaching its tolerance.
    #[error("{solver}: not converged after {iterations} iterations: residual {residual:e} > tolerance {tolerance:e}")]
    NotConverged {
        /// The solver.
        solver: &'static str,
        /// Iterations run.
        iterations: usize,
        /// Final residual.
        residual: f64,
        /// Requested tolerance.
        tolerance: f64,
    },
    /// A linear system was singular (or numerically so) and no least-squares answer was asked for.
    #[error("{op}: singular system: {detail}")]
    Singular {
        /// Where.
        op: &'static str,
        /// The pivot or singular-value estimate that showed it.
        detail: String,
    },
    /// The invertibility hypothesis of the nonsmooth implicit function theorem failed.
    #[error("{node}: hypothesis violated: {detail}")]
    HypothesisViolated {
        /// The implicit node or layer.
        node: String,
        /// The estimate (for example the smallest singular value of I - J_z) and the selection.
        detail: String,
    },
    /// An implicit layer's forward or adjoint solve stopped without reaching its tolerance
    /// (or diverged, or met a non-finite value), and the layer's failure policy is to refuse.
    #[error("{node}: {stage} solve failed: {solver} {status} after {iterations} iterations, residual {residual:e} > tolerance {tolerance:e}; residual trace {}", format_trace(.trace))]
    SolveFailed {
        /// The implicit layer.
        node: String,
        /// `"forward"` or `"adjoint"`.
        stage: &'static str,
        /// The solver.
        solver: &'static str,
        /// How it ended (`"diverged"`, `"maximum iterations reached"`, ...).
        status: &'static str,
        /// Iterations run.
        iterations: usize,
        /// Final residual.
        residual: f64,
        /// Requested tolerance.
        tolerance: f64,
        /// Residual after each iteration, when it was recorded.
        trace: Box<[f64]>,
    },
    /// An error raised inside an implicit layer (by its inner map, a solver or a check), with
    /// the layer's name and what it was doing.
    #[error("{node}: {context}: {source}")]
    InImplicit {
        /// The implicit layer.
        node: String,
        /// What the layer was doing (`"forward solve"`, `"adjoint solve"`, ...).
        context: &'static str,
        /// The underlying error.
        #[source]
        source: Box<Error>,
    },
    /// A finite-difference check would difference across a kink and refuses.
    #[error(
        "gradcheck: refusing to difference across a kink: node {node} ({op}) changes branch when input {input} element {element} moves by ±{step:e}; check a point away from the kink or test the kink value exactly"
    )]
    KinkInFiniteDifference {
        /// The nonsmooth node whose branch changes.
        node: usize,
        /// Its op.
        op: &'static str,
        /// Which input of the checked function was perturbed.
        input: usize,
        /// Flat index of the perturbed element (or `usize::MAX` for a direction test).
        element: usize,
        /// Finite-difference step.
        step: f64,
    },
    /// A gradient check found a mismatch.
    #[error(
        "gradcheck: input {input} element {element}: analytic {analytic:e} vs numeric {numeric:e} (abs err {abs_err:e}, rel err {rel_err:e})"
    )]
    GradientMismatch {
        /// Which input.
        input: usize,
        /// Flat index in that input (or `usize::MAX` for a direction test), output index folded in.
        element: usize,
        /// Value from backward.
        analytic: f64,
        /// Value from finite differences.
        numeric: f64,
        /// Absolute error.
        abs_err: f64,
        /// Relative error.
        rel_err: f64,
    },
    /// A user-defined op returned something inconsistent.
    #[error("custom op {op}: {detail}")]
    CustomOp {
        /// The custom op's name.
        op: String,
        /// What was wrong.
        detail: String,
    },
    /// Reading or parsing data failed.
    #[error("data: {0}")]
    Data(String),
}

/// A residual trace for an error message: every entry when short, else the first and last
/// few.
fn format_trace(trace: &[f64]) -> String {
    let show = |xs: &[f64]| xs.iter().map(|r| format!("{r:.3e}")).collect::<Vec<_>>().join(", ");
    match trace.len() {
        0 => "not recorded".to_string(),
        n if n <= 12 => format!("[{}]", show(trace)),
        n => format!(
            "[{}, ... ({} more) ..., {}]",
            show(&trace[..5]),
            n - 10,
            show(&trace[n - 5..])
        ),
    }
}

/// Result type of clarke.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Builds a [`Error::ShapeMismatch`].
    pub fn shapes(op: &'static str, lhs: &[usize], rhs: &[usize], detail: impl Into<String>) -> Self {
        Error::ShapeMismatch {
            op,
            lhs: lhs.to_vec(),
            rhs: rhs.to_vec(),
            detail: detail.into(),
        }
    }

    /// Builds an [`Error::InvalidArgument`].
    pub fn invalid(op: &'static str, detail: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            detail: detail.into(),
        }
    }
}
