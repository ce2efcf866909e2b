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
    /// The rate at step `k`.
    pub fn rate(&self, k: usize) -> f64 {
        match *self {
            Schedule::Constant(lr) => lr,
            Schedule::Step { lr, factor, every } => lr * factor.powi((k / every.max(1)) as i32),
            Schedule::InverseTime { lr, offset, power } => lr / (1.0 + k as f64 / offset).powf(power),
        }
    }

    /// Whether the schedule satisfies `sum a_k = inf` and `sum a_k^2 < inf`.
    pub fn is_square_summable_not_summable(&self) -> bool {
        matches!(*self, Schedule::InverseTime { power, .. } if power > 0.5 && power <= 1.0)
    }

    fn validate(&self) -> Result<()> {
        let ok = match *self {
            Schedule::Constant(lr) => lr > 0.0 && lr.is_finite(),
            Schedule::Step { lr, factor, every } => lr > 0.0 && lr.is_finite() && factor > 0.0 && every > 0,
            Schedule::InverseTime { lr, offset, power } => lr > 0.0 && lr.is_finite() && offset > 0.0 && power >= 0.0,
        };
        if ok {
            Ok(())
        } else {
            Err(Error::invalid("Schedule", format!("invalid schedule {self:?}")))
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

/// SGD with (heavy-ball) momentum and optional weight decay: `v <- mu v + g + wd p`,
/// `p <- p - a_k v`.
#[derive(Debug, Clone)]
pub struct Sgd<S: Scalar> {
    schedule: Schedule,
    momentum: f64,
    weight_decay: f64,
    velocity: Vec<ArrayD<S>>,
    steps: usize,
}

impl<S: Scalar> Sgd<S> {
    /// SGD with the given schedule and momentum in `[0, 1)`.
    ///
    /// # Errors
    /// An invalid schedule or momentum.
    pub fn new(schedule: Schedule, momentum: f64) -> Result<Self> {
        schedule.validate()?;
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
            steps: 0,
        })
    }

    /// Adds L2 weight decay.
    pub fn with_weight_decay(mut self, wd: f64) -> Self {
        self.weight_decay = wd;
        self
    }
}

impl<S: Scalar> Optimizer<S> for Sgd<S> {
    fn step(&mut self, params: &mut ParamSet<S>, grads: &[ArrayD<S>]) -> Result<()> {
        check_grads("Sgd::step", params, grads)?;
        if self.velocity.is_empty() {
            self.velocity = params.values().iter().map(|p| ArrayD::zeros(p.raw_dim())).collect();
        }
        let (mu, wd) = (S::from_f64_lossy(self.momentum), S::from_f64_lossy(self.weight_decay));
        let lr = S::from_f64_lossy(self.schedule.rate(self.steps));
        for ((p, v), g) in params.values_mut().iter_mut().zip(&mut self.velocity).zip(grads) {
            Zip::from(&mut *v)
                .and(g)
                .and(&*p)
                .for_each(|v, &g, &p| *v = mu * *v + g + wd * p);
            p.scaled_add(-lr, v);
        }
        self.steps += 1;
        Ok(())
    }

    fn current_rate(&self) -> f64 {
        self.schedule.rate(self.steps)
    }
}

/// Adam (Kingma and Ba) with bias correction.
#[derive(Debug, Clone)]
pub struct Adam<S: Scalar> {
    schedule: Schedule,
    beta1: f64,
    beta2: f64,
    eps: f64,
    m: Vec<ArrayD<S>>,
    v: Vec<ArrayD<S>>,
    steps: usize,
}

impl<S: Scalar> Adam<S> {
    /// Adam with `beta1 = 0.9`, `beta2 = 0.999`, `eps = 1e-8`.
    ///
    /// # Errors
    /// An invalid schedule.
    pub fn new(schedule: Schedule) -> Result<Self> {
        schedule.validate()?;
        Ok(Adam {
            schedule,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            m: Vec::new(),
            v: Vec::new(),
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
        check_grads("Adam::step", params, grads)?;
        if self.m.is_empty() {
            self.m = params.values().iter().map(|p| ArrayD::zeros(p.raw_dim())).collect();
            self.v = self.m.clone();
        }
        let t = (self.steps + 1) as i32;
        let lr = self.schedule.rate(self.steps);
        let step = lr * (1.0 - self.beta2.powi(t)).sqrt() / (1.0 - self.beta1.powi(t));
        let (b1, b2) = (S::from_f64_lossy(self.beta1), S::from_f64_lossy(self.beta2));
        let (step, eps) = (S::from_f64_lossy(step), S::from_f64_lossy(self.eps));
        for (((p, m), v), g) in params
            .values_mut()
            .iter_mut()
            .zip(&mut self.m)
            .zip(&mut self.v)
            .zip(grads)
        {
            Zip::from(&mut *p)
                .and(&mut *m)
                .and(&mut *v)
                .and(g)
                .for_each(|p, m, v, &g| {
                    *m = b1 * *m + (S::one() - b1) * g;
                    *v = b2 * *v + (S::one() - b2) * g * g;
                    *p -= step * *m / (v.sqrt() + eps);
                });
        }
        self.steps += 1;
        Ok(())
    }

    fn current_rate(&self) -> f64 {
        self.schedule.rate(self.steps)
    }
}
