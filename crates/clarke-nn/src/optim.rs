//! Optimisers (SGD with momentum, Adam) and step-size schedules.

use clarke_core::{Error, Result, Scalar};
use ndarray::{ArrayD, Zip};

use crate::params::{ParamSet, first_non_finite};

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
        if let Some(v) = first_non_finite(g) {
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

/// Writes Adam's update of one parameter into `next` (`[p, m, v]`, of the parameter's
/// shape) and returns the flat index of the first element whose new value or moments are
/// not finite. Contiguous arrays of one layout (the rule) go through one slice pass
/// compiled for AVX2 where the CPU has it; others element by element in logical order.
fn adam_into<S: Scalar>(
    p: &ArrayD<S>,
    m: &ArrayD<S>,
    v: &ArrayD<S>,
    g: &ArrayD<S>,
    next: &mut [ArrayD<S>; 3],
    update: impl Fn(S, S, S, S) -> (S, S, S),
) -> Option<usize> {
    let finite = |(p, m, v): (S, S, S)| p.is_finite() && m.is_finite() && v.is_finite();
    let [np, nm, nv] = next;
    let slices = (
        p.as_slice(),
        m.as_slice(),
        v.as_slice(),
        g.as_slice(),
        np.as_slice_mut(),
        nm.as_slice_mut(),
        nv.as_slice_mut(),
    );
    if let (Some(p), Some(m), Some(v), Some(g), Some(np), Some(nm), Some(nv)) = slices {
        let all_finite = clarke_core::avx::with_avx2(
            #[inline(always)]
            || adam_slices([p, m, v, g], [&mut *np, &mut *nm, &mut *nv], &update),
        );
        return if all_finite {
            None
        } else {
            (0..p.len()).find(|&k| !finite((np[k], nm[k], nv[k])))
        };
    }
    let mut first = None;
    let outputs = np.iter_mut().zip(nm.iter_mut()).zip(nv.iter_mut());
    let inputs = p.iter().zip(m.iter()).zip(v.iter()).zip(g.iter());
    for (k, ((((&p, &m), &v), &g), ((np, nm), nv))) in inputs.zip(outputs).enumerate() {
        let new = update(p, m, v, g);
        (*np, *nm, *nv) = new;
        if first.is_none() && !finite(new) {
            first = Some(k);
        }
    }
    first
}

/// The slice pass of [`adam_into`]: writes `update` of every element of `p, m, v, g` into
/// `np, nm, nv` and returns whether all of them are finite. The slices are arguments, not
/// captures, so the compiler knows the outputs alias no input and vectorises the loop (from
/// a closure's captures it ran one element at a time); one length for all of them removes
/// the bounds checks.
#[inline(always)]
fn adam_slices<S: Scalar>(
    [p, m, v, g]: [&[S]; 4],
    [np, nm, nv]: [&mut [S]; 3],
    update: &impl Fn(S, S, S, S) -> (S, S, S),
) -> bool {
    let n = p.len();
    let (m, v, g) = (&m[..n], &v[..n], &g[..n]);
    let (np, nm, nv) = (&mut np[..n], &mut nm[..n], &mut nv[..n]);
    let mut ok = true;
    for k in 0..n {
        let (a, b, c) = update(p[k], m[k], v[k], g[k]);
        (np[k], nm[k], nv[k]) = (a, b, c);
        ok &= a.is_finite() & b.is_finite() & c.is_finite();
    }
    ok
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
        let update = move |p: S, v: S, g: S| {
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

/// Adam (Kingma and Ba) with bias correction and `eps = 1e-8`, as in the paper's Algorithm 1
/// (and PyTorch's `Adam`): `p -= lr m_hat / (sqrt(v_hat) + eps)` with the bias-corrected
/// moments `m_hat = m / (1 - beta1^t)` and `v_hat = v / (1 - beta2^t)`.
///
/// The paper's shorter form, `p -= lr sqrt(1 - beta2^t) / (1 - beta1^t) m / (sqrt(v) + eps)`,
/// is not used: it adds `eps` before the correction of `v`, which in the first steps is up to
/// 30 times larger, so components with gradients near `eps` move differently.
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
    /// Where a step writes the new parameters and moments before it commits them (swapped
    /// in once every update is known to be finite, so a refused step changes nothing and an
    /// accepted one computes each update once).
    next: Vec<[ArrayD<S>; 3]>,
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
            next: Vec::new(),
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
        let step = lr / (1.0 - self.beta1.powi(t));
        let root_correction = 1.0 / (1.0 - self.beta2.powi(t)).sqrt();
        let (b1, b2) = (S::from_f64_lossy(self.beta1), S::from_f64_lossy(self.beta2));
        let (step, eps) = (S::from_f64_lossy(step), S::from_f64_lossy(self.eps));
        let root_correction = S::from_f64_lossy(root_correction);
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
        // `move`: the constants are the closure's own values, not references that the stores
        // of the update loop might alias (which kept that loop from vectorising).
        let update = move |p: S, m: S, v: S, g: S| {
            let m = b1 * m + (S::one() - b1) * g;
            let v = b2 * v + (S::one() - b2) * g * g;
            (p - step * m / (v.sqrt() * root_correction + eps), m, v)
        };
        if self.next.len() != self.m.len() {
            self.next = self.m.iter().map(|m| std::array::from_fn(|_| m.clone())).collect();
        }
        for (i, ((((p, m), v), g), next)) in params
            .values()
            .iter()
            .zip(&self.m)
            .zip(&self.v)
            .zip(grads)
            .zip(&mut self.next)
            .enumerate()
        {
            if let Some(flat) = adam_into(p, m, v, g, next, update) {
                return Err(unstable_update(OP, params, i, flat, g));
            }
        }
        for (((p, m), v), [np, nm, nv]) in params
            .values_mut()
            .iter_mut()
            .zip(&mut self.m)
            .zip(&mut self.v)
            .zip(&mut self.next)
        {
            std::mem::swap(p, np);
            std::mem::swap(m, nm);
            std::mem::swap(v, nv);
        }
        self.steps += 1;
        Ok(())
    }

    fn current_rate(&self) -> f64 {
        self.schedule.rate(self.steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn, ShapeBuilder};

    /// Adam's update by its definition, for one element over the steps' gradients.
    fn adam_by_hand(p0: f64, grads: &[f64], lr: f64) -> f64 {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (k, &g) in grads.iter().enumerate() {
            let t = (k + 1) as i32;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let m_hat = m / (1.0 - b1.powi(t));
            let v_hat = v / (1.0 - b2.powi(t));
            p -= lr * m_hat / (v_hat.sqrt() + eps);
        }
        p
    }

    /// Two steps on a standard-layout vector and a column-major matrix (the element-by-element
    /// path) match the definition; a refused step between them changes neither the
    /// parameters nor the moments. The first gradient of 2e-8 tells the definition from the
    /// paper's shorter form, which moves that element by a tenth as much.
    #[test]
    fn adam_steps_match_the_definition_in_both_layouts_and_a_refused_step_changes_nothing() {
        let mut params = ParamSet::<f64>::new();
        params
            .add("v", ArrayD::from_shape_vec(IxDyn(&[3]), vec![1.0, -2.0, 0.5]).unwrap())
            .unwrap();
        let col_major = ndarray::Array2::from_shape_vec((2, 2).f(), vec![0.1, 0.2, 0.3, 0.4]).unwrap();
        params.add("m", col_major.into_dyn()).unwrap();
        let g1 = [
            ArrayD::from_shape_vec(IxDyn(&[3]), vec![0.5, -1.0, 2e-8]).unwrap(),
            ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![1.0, -0.5, 0.25, 3.0]).unwrap(),
        ];
        let g2 = [g1[0].mapv(|x| -0.3 * x + 0.1), g1[1].mapv(|x| 0.7 * x - 0.2)];
        let before = params.clone();
        let mut adam = Adam::new(Schedule::Constant(0.01)).unwrap();
        adam.step(&mut params, &g1).unwrap();
        let overflowing = [ArrayD::from_elem(IxDyn(&[3]), f64::MAX), g1[1].clone()];
        assert!(adam.step(&mut params, &overflowing).is_err());
        adam.step(&mut params, &g2).unwrap();
        for i in 0..2 {
            let p0 = &before.values()[i];
            let got = &params.values()[i];
            for (idx, &p) in p0.indexed_iter() {
                let want = adam_by_hand(p, &[g1[i][&idx], g2[i][&idx]], 0.01);
                assert!(
                    (got[&idx] - want).abs() <= 1e-15 * want.abs().max(1.0),
                    "{i} {idx:?}: {} vs {want}",
                    got[&idx]
                );
            }
        }
    }
}
