//! # clarke-core
//!
//! A tape-based reverse-mode automatic differentiation engine over `ndarray`, for `f32` and
//! `f64`, whose nonsmooth nodes (relu, abs, max, clamp, ...) have **selectable conservative
//! derivatives** and report the kinks they hit.
//!
//! Backpropagation through a program built from relu, abs, max and the like does not compute
//! a gradient at a kink: it computes an element of a *conservative Jacobian* (Bolte and
//! Pauwels), and which element depends on the derivative each op selects at its kink. clarke
//! makes that choice explicit ([`KinkPolicy`], with presets reproducing PyTorch, JAX and
//! TensorFlow, per-op overrides, and per-backward re-runs under another policy) and reports
//! it ([`KinkLedger`]).
//!
//! ```
//! use clarke_core::{BackwardOptions, KinkPolicy, Tape};
//! use ndarray::arr0;
//!
//! // relu2(t) = relu(-t) + t equals relu(t), yet AD at t = 0 returns 1 - relu'(0).
//! let tape = Tape::<f64>::new();
//! let t = tape.param(arr0(0.0).into_dyn());
//! let y = (-t).relu() + t;
//! let g0 = y.backward().unwrap();
//! assert_eq!(g0.wrt(t).unwrap()[[]], 1.0);
//! let g1 = y.backward_with(&BackwardOptions::policy(KinkPolicy::pytorch().with_relu(1.0))).unwrap();
//! assert_eq!(g1.wrt(t).unwrap()[[]], 0.0);
//! assert_eq!(g1.ledger().exact_hits(), 1);
//! ```
#![deny(missing_docs)]

pub mod avx;
pub mod backward;
pub mod custom;
pub mod error;
pub mod forward;
pub mod gemm;
pub mod gradcheck;
pub mod grads;
pub mod hvp;
pub mod kernels;
pub mod ledger;
pub mod nonsmooth;
pub(crate) mod op;
pub mod ops;
pub mod policy;
pub mod scalar;
pub mod tape;
pub mod var;

pub use backward::{BackwardOptions, ElementSelection};
pub use custom::{CustomOp, JvpContext, VjpContext};
pub use error::{Error, Result, Stage};
pub use forward::Jvp;
pub use gradcheck::{GradcheckOptions, GradcheckReport, gradcheck, gradcheck_direction};
pub use grads::Grads;
pub use hvp::Hvp;
pub use ledger::{KinkLedger, KinkRecord, KinkScan, Selection};
pub use policy::{KinkPolicy, TieRule};
pub use scalar::Scalar;
pub use tape::Tape;
pub use var::Var;

/// The names most programs need.
pub mod prelude {
    pub use crate::{
        BackwardOptions, Error, Grads, Hvp, Jvp, KinkLedger, KinkPolicy, Result, Scalar, Tape, TieRule, Var,
    };
}
