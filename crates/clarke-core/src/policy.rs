//! Kink policies: which element of the conservative Jacobian backward selects at a kink.
//!
//! At a point where a nonsmooth op is not differentiable (relu at 0, abs at 0, a tie in
//! `max`, a clamp bound, ...) backpropagation must pick *some* derivative. By the theory of
//! conservative Jacobians (Bolte and Pauwels) every choice inside the convex hull of the
//! one-sided derivatives keeps the chain rule valid, and even choices outside it (relu'(0) =
//! -50, as in Bertoin et al. 2021) give an element of *a* conservative Jacobian. The choice
//! does change the numbers, so clarke makes it explicit: a [`KinkPolicy`] holds one selection
//! per kind of kink, presets reproduce other frameworks, and selections outside the hull are
//! refused unless the policy opts in.

use std::borrow::Cow;
use std::fmt;

use crate::{Error, Result};

/// How a reduction (`max_axis`, `min_axis`) spreads the gradient over tied maxima.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TieRule {
    /// Split the gradient evenly over the tied elements (PyTorch `amax`, JAX, TensorFlow).
    Split,
    /// Give all of it to the first tied element in index order (an `argmax` convention).
    First,
    /// Give all of it to the last tied element.
    Last,
    /// Give the full gradient to *every* tied element. The sum over the tie is then k times
    /// the gradient: outside the convex hull, so it needs
    /// [`KinkPolicy::allow_outside_hull`]. Reproduces candle.
    All,
}

impl fmt::Display for TieRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TieRule::Split => "split",
            TieRule::First => "first",
            TieRule::Last => "last",
            TieRule::All => "all",
        })
    }
}

/// The selections backward applies at kinks, one per kind of kink.
///
/// All slopes are plain numbers: `relu = 0.5` means relu'(0) = 0.5. Fields hold `f64`
/// whatever the tape's scalar type. Build one from a preset and adjust it with the `with_*`
/// methods; [`validate`](Self::validate) (called by every tape that takes a policy) refuses
/// non-finite values and values outside the convex hull of the one-sided derivatives unless
/// [`allow_outside_hull`](Self::allow_outside_hull) was set.
#[derive(Debug, Clone, PartialEq)]
pub struct KinkPolicy {
    /// relu'(0). Hull: [0, 1].
    pub relu: f64,
    /// Leaky relu with slope `alpha` at 0: the derivative is `alpha + t (1 - alpha)`; this is
    /// `t`. Hull: t in [0, 1]. For `alpha = 0` it coincides with `relu`.
    pub leaky_relu: f64,
    /// abs'(0). Hull: [-1, 1].
    pub abs: f64,
    /// sign'(0). sign is discontinuous at 0 and has no conservative Jacobian there; every
    /// framework returns 0. Hull: {0}.
    pub sign: f64,
    /// `maximum(a, b)` / `minimum(a, b)` at a tie `a == b`: the share of the gradient sent to
    /// `a` (the rest goes to `b`). Hull: [0, 1].
    pub tie_weight: f64,
    /// Reductions `max_axis` / `min_axis` (and `max_all`) with tied extrema.
    pub reduce_tie: TieRule,
    /// `clamp(lo, hi)` at `x == lo`: the derivative there. Hull: [0, 1].
    pub clamp_low: f64,
    /// `clamp(lo, hi)` at `x == hi`: the derivative there. Hull: [0, 1].
    pub clamp_high: f64,
    /// Soft-thresholding `S_l(u)` at `|u| == l`: the derivative q there (read by the prox
    /// ops of the convex crate). Hull: [0, 1].
    pub soft_threshold: f64,
    /// Band around every kink: an element with `0 < |x - kink| <= tolerance` is treated as
    /// *at* the kink (the selection applies there, the ledger reports it as *near*, and the
    /// hypothesis check walks it). Default 0: selections apply at exact kinks only, unless a
    /// solver's error bound widens the band (see [`crate::ledger`]).
    pub tolerance: f64,
    /// Accept selections outside the convex hull of the one-sided derivatives.
    pub allow_outside_hull: bool,
    /// Name of the preset this policy started from. Reports print [`label`](Self::label),
    /// which also says what was changed since.
    pub name: &'static str,
}

impl Default for KinkPolicy {
    /// The PyTorch selections.
    fn default() -> Self {
        Self::pytorch()
    }
}

impl KinkPolicy {
    /// PyTorch: relu'(0) = 0, leaky relu slope alpha at 0, abs'(0) = 0, `maximum` ties split
    /// 1/2-1/2, `amax` ties split evenly, clamp passes the gradient at its bounds (1),
    /// softshrink 0 at its kink.
    pub fn pytorch() -> Self {
        KinkPolicy {
            relu: 0.0,
            leaky_relu: 0.0,
            abs: 0.0,
            sign: 0.0,
            tie_weight: 0.5,
            reduce_tie: TieRule::Split,
            clamp_low: 1.0,
            clamp_high: 1.0,
            soft_threshold: 0.0,
            tolerance: 0.0,
            allow_outside_hull: false,
            name: "pytorch",
        }
    }

    /// JAX: relu'(0) = 0, `leaky_relu` takes the `x >= 0` branch at 0 (slope 1), abs'(0) = 1,
    /// `maximum` ties 1/2-1/2, reductions split evenly, `clip` (built from maximum and
    /// minimum) gives 1/2 at its bounds.
    pub fn jax() -> Self {
        KinkPolicy {
            relu: 0.0,
            leaky_relu: 1.0,
            abs: 1.0,
            sign: 0.0,
            tie_weight: 0.5,
            reduce_tie: TieRule::Split,
            clamp_low: 0.5,
            clamp_high: 0.5,
            soft_threshold: 0.0,
            tolerance: 0.0,
            allow_outside_hull: false,
            name: "jax",
        }
    }

    /// TensorFlow: relu'(0) = 0, leaky relu slope alpha at 0, abs'(0) = 0, `maximum` sends a
    /// tie to its first argument, reductions split evenly, `clip_by_value` passes the gradient
    /// at its bounds.
    pub fn tensorflow() -> Self {
        KinkPolicy {
            tie_weight: 1.0,
            name: "tensorflow",
            ..Self::pytorch()
        }
    }

    /// The minimum-norm element of the Clarke Jacobian at every kink: relu'(0) = 0,
    /// abs'(0) = 0, ties 1/2-1/2, clamp bounds 0, soft-threshold 0.
    pub fn min_norm() -> Self {
        KinkPolicy {
            clamp_low: 0.0,
            clamp_high: 0.0,
            name: "min_norm",
            ..Self::pytorch()
        }
    }

    /// The midpoint of every hull: relu'(0) = 1/2, abs'(0) = 0, ties and bounds 1/2.
    pub fn midpoint() -> Self {
        KinkPolicy {
            relu: 0.5,
            leaky_relu: 0.5,
            abs: 0.0,
            sign: 0.0,
            tie_weight: 0.5,
            reduce_tie: TieRule::Split,
            clamp_low: 0.5,
            clamp_high: 0.5,
            soft_threshold: 0.5,
            tolerance: 0.0,
            allow_outside_hull: false,
            name: "midpoint",
        }
    }

    /// The right end of every hull: relu'(0) = 1 (the other selection of Bertoin et al.),
    /// leaky relu slope 1, abs'(0) = 1, ties to the first argument, clamp bounds 1,
    /// soft-threshold 1.
    pub fn one() -> Self {
        KinkPolicy {
            relu: 1.0,
            leaky_relu: 1.0,
            abs: 1.0,
            sign: 0.0,
            tie_weight: 1.0,
            reduce_tie: TieRule::First,
            clamp_low: 1.0,
            clamp_high: 1.0,
            soft_threshold: 1.0,
            tolerance: 0.0,
            allow_outside_hull: false,
            name: "one",
        }
    }

    /// The preset with this name: `pytorch`, `jax`, `tensorflow`, `min_norm`, `midpoint`,
    /// `one`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "pytorch" | "torch" => Ok(Self::pytorch()),
            "jax" => Ok(Self::jax()),
            "tensorflow" | "tf" => Ok(Self::tensorflow()),
            "min_norm" | "min-norm" => Ok(Self::min_norm()),
            "midpoint" => Ok(Self::midpoint()),
            "one" => Ok(Self::one()),
            other => Err(Error::invalid(
                "KinkPolicy::preset",
                format!("unknown preset {other:?}; known: {}", Self::PRESETS.join(", ")),
            )),
        }
    }

    /// Names accepted by [`preset`](Self::preset).
    pub const PRESETS: &'static [&'static str] = &["pytorch", "jax", "tensorflow", "min_norm", "midpoint", "one"];

    /// Sets relu'(0).
    pub fn with_relu(mut self, slope: f64) -> Self {
        self.relu = slope;
        self
    }
    /// Sets the leaky-relu position t in [0, 1] between the left slope alpha and 1.
    pub fn with_leaky_relu(mut self, t: f64) -> Self {
        self.leaky_relu = t;
        self
    }
    /// Sets abs'(0).
    pub fn with_abs(mut self, slope: f64) -> Self {
        self.abs = slope;
        self
    }
    /// Sets sign'(0).
    pub fn with_sign(mut self, slope: f64) -> Self {
        self.sign = slope;
        self
    }
    /// Sets the share of a `maximum`/`minimum` tie sent to the first argument.
    pub fn with_tie_weight(mut self, weight: f64) -> Self {
        self.tie_weight = weight;
        self
    }
    /// Sets the tie rule of reductions.
    pub fn with_reduce_tie(mut self, rule: TieRule) -> Self {
        self.reduce_tie = rule;
        self
    }
    /// Sets the clamp derivatives at the lower and upper bounds.
    pub fn with_clamp(mut self, at_low: f64, at_high: f64) -> Self {
        self.clamp_low = at_low;
        self.clamp_high = at_high;
        self
    }
    /// Sets the soft-threshold derivative at its kink.
    pub fn with_soft_threshold(mut self, q: f64) -> Self {
        self.soft_threshold = q;
        self
    }
    /// Sets the band around every kink inside which elements are treated as at the kink.
    pub fn with_tolerance(mut self, tolerance: f64) -> Self {
        self.tolerance = tolerance;
        self
    }
    /// Opts in to selections outside the convex hull of the one-sided derivatives
    /// (relu'(0) = -50, say). Such a selection is still an element of *a* conservative
    /// Jacobian, but not of the Clarke Jacobian.
    pub fn allow_outside_hull(mut self) -> Self {
        self.allow_outside_hull = true;
        self
    }

    /// What reports print: the preset's name when the policy is that preset, otherwise
    /// `custom (pytorch with relu'(0)=0.5)`, naming every value changed since the preset.
    pub fn label(&self) -> String {
        self.label_cow().into_owned()
    }

    /// [`label`](Self::label) without an allocation when the policy is an unchanged preset
    /// (every backward call labels its ledger).
    pub(crate) fn label_cow(&self) -> Cow<'static, str> {
        let Ok(base) = Self::preset(self.name) else {
            return Cow::Owned(format!("custom ({self})"));
        };
        let mut changed = Vec::new();
        let mut diff = |what: &str, a: f64, b: f64| {
            if a != b && !(a.is_nan() && b.is_nan()) {
                changed.push(format!("{what}={a}"));
            }
        };
        diff("relu'(0)", self.relu, base.relu);
        diff("leaky t", self.leaky_relu, base.leaky_relu);
        diff("abs'(0)", self.abs, base.abs);
        diff("sign'(0)", self.sign, base.sign);
        diff("tie", self.tie_weight, base.tie_weight);
        diff("clamp low", self.clamp_low, base.clamp_low);
        diff("clamp high", self.clamp_high, base.clamp_high);
        diff("soft", self.soft_threshold, base.soft_threshold);
        diff("tol", self.tolerance, base.tolerance);
        if self.reduce_tie != base.reduce_tie {
            changed.push(format!("reduce={}", self.reduce_tie));
        }
        if self.allow_outside_hull != base.allow_outside_hull {
            changed.push("outside hull allowed".to_string());
        }
        if changed.is_empty() {
            Cow::Borrowed(self.name)
        } else {
            Cow::Owned(format!("custom ({} with {})", self.name, changed.join(", ")))
        }
    }

    /// Checks every selection: finite, and inside its hull unless the policy opts out.
    pub fn validate(&self) -> Result<()> {
        let o = self.allow_outside_hull;
        check_selection("relu'(0)", self.relu, 0.0, 1.0, o)?;
        check_selection("leaky_relu t", self.leaky_relu, 0.0, 1.0, o)?;
        check_selection("abs'(0)", self.abs, -1.0, 1.0, o)?;
        check_selection("sign'(0)", self.sign, 0.0, 0.0, o)?;
        check_selection("tie_weight", self.tie_weight, 0.0, 1.0, o)?;
        check_selection("clamp'(low)", self.clamp_low, 0.0, 1.0, o)?;
        check_selection("clamp'(high)", self.clamp_high, 0.0, 1.0, o)?;
        check_selection("soft_threshold'", self.soft_threshold, 0.0, 1.0, o)?;
        check_tie_rule(self.reduce_tie, o)?;
        if !(self.tolerance.is_finite() && self.tolerance >= 0.0) {
            return Err(Error::invalid(
                "KinkPolicy",
                format!("tolerance must be finite and >= 0, got {}", self.tolerance),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for KinkPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: relu'(0)={} leaky t={} abs'(0)={} sign'(0)={} tie={} reduce={} clamp=({},{}) soft={}",
            // A preset's label; a policy whose name is no preset prints its name (and `label`
            // prints this Display, so the two never call each other in a loop).
            if Self::preset(self.name).is_ok() {
                self.label()
            } else {
                self.name.to_string()
            },
            self.relu,
            self.leaky_relu,
            self.abs,
            self.sign,
            self.tie_weight,
            self.reduce_tie,
            self.clamp_low,
            self.clamp_high,
            self.soft_threshold
        )?;
        if self.tolerance > 0.0 {
            write!(f, " tol={:e}", self.tolerance)?;
        }
        if self.allow_outside_hull {
            f.write_str(" (outside hull allowed)")?;
        }
        Ok(())
    }
}

/// Checks one selection value against its hull `[low, high]`.
pub fn check_selection(op: &'static str, value: f64, low: f64, high: f64, outside_ok: bool) -> Result<()> {
    if !value.is_finite() {
        return Err(Error::InvalidSelection {
            op,
            value,
            low,
            high,
            hint: " (selections must be finite)",
        });
    }
    if !outside_ok && (value < low || value > high) {
        return Err(Error::InvalidSelection {
            op,
            value,
            low,
            high,
            hint: "; call allow_outside_hull() on the policy to opt in to selections outside the convex hull",
        });
    }
    Ok(())
}

/// Checks that a tie rule is allowed.
pub fn check_tie_rule(rule: TieRule, outside_ok: bool) -> Result<()> {
    if rule == TieRule::All && !outside_ok {
        return Err(Error::InvalidSelection {
            op: "reduce tie rule All",
            value: f64::NAN,
            low: 0.0,
            high: 1.0,
            hint: "; TieRule::All sums to k times the gradient over a k-way tie: call allow_outside_hull() to opt in",
        });
    }
    Ok(())
}
