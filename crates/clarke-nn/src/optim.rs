//! Optimisers (SGD with momentum, Adam) and step-size schedules.

use clarke_core::{Error, Result, Scalar};
use ndarray::{ArrayD, Zip};

use crate::params::ParamSet;

/// A step-size schedule `a_k`, `k = 0, 1, ...` counting optimiser steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// `a_k = lr`.
    Constant(f64),
    /// `a_k = lr * factor^(floor(k / every))`.
    Step {
        /// Initial rate.
        lr: f64,
        /// Multiplier applied every `every` steps.
        factor: f64,
        /// Period in steps.
        every: usize,
    },
    /// `a_k = lr / (1 + k / offset)^power`. With `power` in `(1/2, 1]` the steps vanish with
    /// `sum a_k = inf` and `sum a_k^2 < inf`: the conditions under which SGD on a
    /// path-differentiable loss, with conservative gradients, converges (Bolte and Pauwels).
    InverseTime {
        /// Initial rate.
        lr: f64,
        /// Steps after which the rate has dropped by `2^power`.
        offset: f64,
        /// Decay exponent.
        power: f64,
    },
}

impl Schedule {
    /// The rate at step `k`: the formula evaluated as it stands, with `every = 0` read as 1.
    /// The schedule is not validated here (a hand-built `Constant(-1.0)` gives -1); the
    /// optimisers refuse an invalid schedule when they are built and a rate that is not
    /// finite when they step.
    pub fn rate(&self, k: usize) -> f64 {
        match *self {
            Schedule::Constant(lr) => lr,
            Schedule::Step { lr, factor, every } => {
                let periods = k / every.max(1);
                // `powi` takes an i32: past i32::MAX periods the cast would wrap.
                lr * i32::try_from(periods).map_or_else(|_| factor.powf(periods as f64), |n| factor.powi(n))
            }
            Schedule::InverseTime { lr, offset, power } => lr / (1.0 + k as f64 / offset).powf(power),
        }
    }

    /// Whether the schedule is valid (positive finite rate and offset) and satisfies
    /// `sum a_k = inf` and `sum a_k^2 < inf`.
    pub fn is_square_summable_not_summable(&self) -> bool {
        self.validate().is_ok() && matches!(*self, Schedule::InverseTime { power, .. } if power > 0.5 && power <= 1.0)
    }

    fn validate(&self) -> Result<()> {
        let positive = |v: f64| v > 0.0 && v.is_finite();
        let (ok, needs) = match *self {
            Schedule::Constant(lr) => (positive(lr), "lr finite and > 0"),
            Schedule::Step { lr, factor, every } => (
                positive(lr) && positive(factor) && every > 0,
                "lr and factor finite and > 0, every > 0",
            ),
            Schedule::InverseTime { lr, offset, power } => (
                positive(lr) && positive(offset) && power >= 0.0 && power.is_finite(),
                "lr and offset finite and > 0, power finite and >= 0",
            ),
        };
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(
                "Schedule",
                format!("invalid schedule {self:?}: needs {needs}"),
            ))
        }
    }

    /// The rate at step `k` in the working precision `S`, refused when it is not finite
    /// there (a rate above `f32::MAX`, or a growing `Step` schedule that overflowed).
    fn rate_in<S: Scalar>(&self, op: &'static str, k: usize) -> Result<S> {
        let rate = self.rate(k);
        let s = S::from_f64_lossy(rate);
        if s.is_finite() {
            Ok(s)
        } else {
            Err(Error::invalid(
                op,
                format!(
                    "the step size at step {k} is {rate:?}, not finite in {} ({self:?})",
                    S::NAME
                ),
            ))
        }
    }
}

/// Something that updates parameters from their gradients.
pub trait Optimizer<S: Scalar> {
    /// One update. `grads` are in the set's order (see
    /// [`Bound::gradients`](crate::params::Bound::gradients)).
    ///
    /// # Errors
    /// When the gradients do not match the parameters in number or shape, or are not finite.
    fn step(&mut self, params: &mut ParamSet<S>, grads: &[ArrayD<S>]) -> Result<()>;

    /// The step size the next update will use.
    fn current_rate(&self) -> f64;
}

fn check_grads<S: Scalar>(op: &'static str, params: &ParamSet<S>, grads: &[ArrayD<S>]) -> Result<()> {
    if grads.len() != params.len() {
        return Err(Error::invalid(
            op,
            format!("{} gradients for {} parameters", grads.len(), params.len()),
        ));
    }
    for (id, g) in params.ids().zip(grads) {
        let p = params.get(id);
        if p.shape() != g.shape() {
            return Err(Error::ShapeMismatch {
                op,
                lhs: g.shape().to_vec(),
                rhs: p.shape().to_vec(),
                detail: format!("gradient of parameter {:?}", params.name(id)),
            });
        }
        if let Some(v) = g.iter().find(|v| !v.is_finite()) {
            return Err(Error::invalid(
                op,
                format!(
                    "the gradient of parameter {:?} has a non-finite entry {v}",
                    params.name(id)
                ),
            ));
        }
    }
    Ok(())
}

/// The error for an update that is not finite: parameter `index` of `params`, element `flat`
/// (in logical order), with the gradient entry that produced it.
fn unstable_update<S: Scalar>(
    op: &'static str,
    params: &ParamSet<S>,
    index: usize,
    flat: usize,
    grad: &ArrayD<S>,
) -> Error {
    let id = params.ids().nth(index).expect("the index of a parameter");
    Error::invalid(
        op,
        format!(
            "parameter {:?}: the update of element {flat} (value {}, gradient {}) is not finite in {}; nothing was changed (lower the step size or scale the loss)",
            params.name(id),
            params.get(id).iter().nth(flat).map_or(f64::NAN, |v| v.to_f64_exact()),
            grad.iter().nth(flat).map_or(f64::NAN, |v| v.to_f64_exact()),
            S::NAME
        ),
    )
}

/// Checks that `params` is the set an optimiser first stepped (`set`, recorded on the first
/// step) and still has the shapes of the optimiser's per-parameter `state`.
fn check_state<S: Scalar>(op: &'static str, set: Option<u64>, state: &[ArrayD<S>], params: &ParamSet<S>) -> Result<()> {
    let Some(set) = set else {
        return Ok(());
    };
    if set != params.identity() {
        return Err(Error::invalid(
            op,
            format!(
                "this optimiser steps parameter set {set}, not set {} (use one optimiser per set)",
                params.identity()
            ),
        ));
    }
    if state.len() != params.len() {
        return Err(Error::invalid(
            op,
            format!(
                "the optimiser holds state for {} parameters, the set has {}",
                state.len(),
                params.len()
            ),
        ));
    }
    for ((id, p), s) in params.ids().zip(params.values()).zip(state) {
        if p.shape() != s.shape() {
            return Err(Error::ShapeMismatch {
                op,
                lhs: p.shape().to_vec(),
                rhs: s.shape().to_vec(),
                detail: format!(
                    "parameter {:?} changed shape since the optimiser's first step",
                    params.name(id)
                ),
            });
        }
    }
    Ok(())
}

/// SGD with (heavy-ball) momentum and optional weight decay: `v <- mu v + g + wd p`,
/// `p <- p - a_k v`.
///
/// A step whose new parameters or velocities would not all be finite is refused and changes
/// nothing. The first step ties the optimiser to its [`ParamSet`] (and the set's clones): stepping
/// another set, or a set whose parameters changed shape, is an error.
#[derive(Debug, Clone)]
pub struct Sgd<S: Scalar> {
    schedule: Schedule,
    momentum: f64,
    weight_decay: f64,
    velocity: Vec<ArrayD<S>>,
    /// Identity of the set stepped, from the first step on.
    set: Option<u64>,
    steps: usize,
}

impl<S: Scalar> Sgd<S> {
    /// SGD with the given schedule and momentum in `[0, 1)`.
    ///
    /// # Errors
    /// An invalid schedule or momentum, or an initial rate that is not finite in `S`.
    pub fn new(schedule: Schedule, momentum: f64) -> Result<Self> {
        schedule.validate()?;
        schedule.rate_in::<S>("Sgd::new", 0)?;
        if !(0.0..1.0).contains(&momentum) {
            return Err(Error::invalid(
                "Sgd::new",
                format!("momentum must lie in [0, 1), got {momentum}"),
            ));
        }
        Ok(Sgd {
            schedule,
            momentum,
            weight_decay: 0.0,
            velocity: Vec::new(),
            set: None,
            steps: 0,
        })
    }

    /// Adds L2 weight decay.
    ///
    /// # Errors
    /// A decay that is negative, or not finite in `S`.
    pub fn with_weight_decay(mut self, wd: f64) -> Result<Self> {
        if !(wd >= 0.0 && S::from_f64_lossy(wd).is_finite()) {
            return Err(Error::invalid(
                "Sgd::with_weight_decay",
                format!("the weight decay must be finite in {} and >= 0, got {wd:?}", S::NAME),
            ));
        }
        self.weight_decay = wd;
        Ok(self)
    }
}

impl<S: Scalar> Optimizer<S> for Sgd<S> {
    fn step(&mut self, params: &mut ParamSet<S>, grads: &[ArrayD<S>]) -> Result<()> {
        const OP: &str = "Sgd::step";
        check_grads(OP, params, grads)?;
        check_state(OP, self.set, &self.velocity, params)?;
        let lr = self.schedule.rate_in::<S>(OP, self.steps)?;
        if self.set.is_none() {
            self.velocity = params.values().iter().map(|p| ArrayD::zeros(p.raw_dim())).collect();
            self.set = Some(params.identity());
        }
        let (mu, wd) = (S::from_f64_lossy(self.momentum), S::from_f64_lossy(self.weight_decay));
        let update = |p: S, v: S, g: S| {
            let v = mu * v + g + wd * p;
            (p - lr * v, v)
        };
        for (i, ((p, v), g)) in params.values().iter().zip(&self.velocity).zip(grads).enumerate() {
            let unstable = p.iter().zip(v).zip(g).position(|((&p, &v), &g)| {
                let (p, v) = update(p, v, g);
                !(p.is_finite() && v.is_finite())
            });
            if let Some(flat) = unstable {
                return Err(unstable_update(OP, params, i, flat, g));
            }
        }
        for ((p, v), g) in params.values_mut().iter_mut().zip(&mut self.velocity).zip(grads) {
            Zip::from(p)
                .and(v)
                .and(g)
                .for_each(|p, v, &g| (*p, *v) = update(*p, *v, g));
        }
        self.steps += 1;
        Ok(())
    }

    fn current_rate(&self) -> f64 {
        self.schedule.rate(self.steps)
    }
}

/// Adam (Kingma and Ba) with bias correction and `eps = 1e-8`.
///
/// A step whose new parameters or moments would not all be finite (a squared gradient
/// beyond the scalar's range, which would otherwise stall the update at 0) is refused and
/// changes nothing. The first step ties the optimiser to its [`ParamSet`] (and the set's clones): stepping
/// another set, or a set whose parameters changed shape, is an error.
#[derive(Debug, Clone)]
pub struct Adam<S: Scalar> {
    schedule: Schedule,
    beta1: f64,
    beta2: f64,
    eps: f64,
    m: Vec<ArrayD<S>>,
    v: Vec<ArrayD<S>>,
    /// Identity of the set stepped, from the first step on.
    set: Option<u64>,
    steps: usize,
}

impl<S: Scalar> Adam<S> {
    /// Adam with `beta1 = 0.9`, `beta2 = 0.999`, `eps = 1e-8`.
    ///
    /// # Errors
    /// An invalid schedule, or an initial rate that is not finite in `S`.
    pub fn new(schedule: Schedule) -> Result<Self> {
        schedule.validate()?;
        schedule.rate_in::<S>("Adam::new", 0)?;
        Ok(Adam {
            schedule,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            m: Vec::new(),
            v: Vec::new(),
            set: None,
            steps: 0,
        })
    }

    /// Sets the moment decay rates.
    ///
    /// # Errors
    /// Rates outside `[0, 1)`.
    pub fn with_betas(mut self, beta1: f64, beta2: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
            return Err(Error::invalid(
                "Adam::with_betas",
                format!("betas must lie in [0, 1), got ({beta1}, {beta2})"),
            ));
        }
        self.beta1 = beta1;
        self.beta2 = beta2;
        Ok(self)
    }
}

impl<S: Scalar> Optimizer<S> for Adam<S> {
    fn step(&mut self, params: &mut ParamSet<S>, grads: &[ArrayD<S>]) -> Result<()> {
        const OP: &str = "Adam::step";
        check_grads(OP, params, grads)?;
        check_state(OP, self.set, &self.m, params)?;
        self.schedule.rate_in::<S>(OP, self.steps)?;
        let lr = self.schedule.rate(self.steps);
        let t = (self.steps + 1) as i32;
        let step = lr * (1.0 - self.beta2.powi(t)).sqrt() / (1.0 - self.beta1.powi(t));
        let (b1, b2) = (S::from_f64_lossy(self.beta1), S::from_f64_lossy(self.beta2));
        let (step, eps) = (S::from_f64_lossy(step), S::from_f64_lossy(self.eps));
        if !step.is_finite() {
            return Err(Error::invalid(
                OP,
                format!(
                    "the bias-corrected step at step {} is not finite in {}",
                    self.steps,
                    S::NAME
                ),
            ));
        }
        if self.set.is_none() {
            self.m = params.values().iter().map(|p| ArrayD::zeros(p.raw_dim())).collect();
            self.v = self.m.clone();
            self.set = Some(params.identity());
        }
        let update = |p: S, m: S, v: S, g: S| {
            let m = b1 * m + (S::one() - b1) * g;
            let v = b2 * v + (S::one() - b2) * g * g;
            (p - step * m / (v.sqrt() + eps), m, v)
        };
        for (i, (((p, m), v), g)) in params.values().iter().zip(&self.m).zip(&self.v).zip(grads).enumerate() {
            let unstable = p.iter().zip(m).zip(v).zip(g).position(|(((&p, &m), &v), &g)| {
                let (p, m, v) = update(p, m, v, g);
                !(p.is_finite() && m.is_finite() && v.is_finite())
            });
            if let Some(flat) = unstable {
                return Err(unstable_update(OP, params, i, flat, g));
            }
        }
        for (((p, m), v), g) in params
            .values_mut()
            .iter_mut()
            .zip(&mut self.m)
            .zip(&mut self.v)
            .zip(grads)
        {
            Zip::from(p)
                .and(m)
                .and(v)
                .and(g)
                .for_each(|p, m, v, &g| (*p, *m, *v) = update(*p, *m, *v, g));
        }
        self.steps += 1;
        Ok(())
    }

    fn current_rate(&self) -> f64 {
        self.schedule.rate(self.steps)
    }
}
