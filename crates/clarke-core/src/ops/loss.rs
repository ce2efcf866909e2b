//! log-softmax, softmax cross-entropy with integer labels, mean squared error.

use ndarray::{ArrayD, Axis, Ix2, IxDyn, Zip};

use crate::kernels::check_axis;
use crate::op::{Ctx, InputGrads, InputTangents, Op, add_term};
use crate::tape::Inputs;
use crate::var::Var;
use crate::{Error, Result, Scalar};

pub(crate) enum LossOp<S> {
    LogSoftmax {
        axis: usize,
    },
    /// Mean over rows of `-log softmax(logits)[label]`; keeps the softmax for backward.
    SoftmaxCrossEntropy {
        labels: Vec<usize>,
        probs: ArrayD<S>,
    },
    /// `mean((a - b)^2)`.
    Mse,
}

/// `x - logsumexp(x)` along `axis`, stably.
fn log_softmax<S: Scalar>(x: &ArrayD<S>, axis: usize) -> ArrayD<S> {
    let mut out = x.clone();
    for mut lane in out.lanes_mut(Axis(axis)) {
        let m = lane.iter().fold(S::neg_infinity(), |m, &v| m.max(v));
        let m = if m.is_finite() { m } else { S::zero() };
        let lse = lane.iter().map(|&v| (v - m).exp()).sum::<S>().ln() + m;
        lane.mapv_inplace(|v| v - lse);
    }
    out
}

/// `t - sum(p t)` along `axis`, in place, with the probabilities `p = prob(q)` read from
/// `q` (the log-softmax, or the softmax itself): the tangent of a log-softmax, and over `p`
/// the relative tangent of a softmax (`p_dot = p (t - sum(p t))`).
fn center_by_softmax<S: Scalar>(t: &mut ArrayD<S>, q: &ArrayD<S>, axis: usize, prob: impl Fn(S) -> S) {
    Zip::from(t.lanes_mut(Axis(axis)))
        .and(q.lanes(Axis(axis)))
        .for_each(|mut tl, ql| {
            let mean = Zip::from(&tl).and(&ql).fold(S::zero(), |acc, &t, &q| acc + prob(q) * t);
            tl.mapv_inplace(|t| t - mean);
        });
}

impl<S: Scalar> LossOp<S> {
    pub fn name(&self) -> &'static str {
        match self {
            LossOp::LogSoftmax { .. } => "log_softmax",
            LossOp::SoftmaxCrossEntropy { .. } => "softmax_cross_entropy",
            LossOp::Mse => "mse",
        }
    }

    pub fn backward(&self, ctx: &Ctx<'_, S>, g: ArrayD<S>) -> InputGrads<S> {
        let mut out = InputGrads::new();
        match self {
            LossOp::LogSoftmax { axis } => {
                // dx = g - softmax * sum(g) along the axis.
                let y = ctx.output;
                let mut gx = g;
                Zip::from(gx.lanes_mut(Axis(*axis)))
                    .and(y.lanes(Axis(*axis)))
                    .for_each(|mut gl, yl| {
                        let total = gl.sum();
                        Zip::from(&mut gl).and(&yl).for_each(|g, &y| *g -= y.exp() * total);
                    });
                out.push(Some(gx));
            }
            LossOp::SoftmaxCrossEntropy { labels, probs } => {
                let gv = *g.iter().next().expect("0-d loss");
                let n = S::from_usize(labels.len()).expect("count fits");
                let scale = gv / n;
                let mut gx = probs.clone().into_dimensionality::<Ix2>().expect("2-D logits");
                for (mut row, &l) in gx.outer_iter_mut().zip(labels) {
                    row[l] -= S::one();
                    row.mapv_inplace(|v| v * scale);
                }
                out.push(Some(gx.into_dyn()));
                if ctx.inputs.len() > 1 {
                    out.push(None);
                }
            }
            LossOp::Mse => {
                let (a, b) = (&ctx.inputs[0], &ctx.inputs[1]);
                let gv = *g.iter().next().expect("0-d loss");
                let k = (S::one() + S::one()) * gv / S::from_usize(a.len().max(1)).expect("count fits");
                let diff = Zip::from(a).and(b).map_collect(|&a, &b| k * (a - b));
                let gb = ctx.needs(1).then(|| diff.mapv(|v| -v));
                out.push(ctx.needs(0).then_some(diff));
                out.push(gb);
            }
        }
        out
    }

    /// The tangent of [`backward`](Self::backward) (see `Op::backward_tangent`): backward
    /// applied to `g_dot`, plus the exact second-order terms: `-p y_dot sum(g)` along the
    /// axis for log-softmax (`p = exp(y)`), `p_dot g / n` for the cross-entropy
    /// (`p_dot = p (t - sum(p t))` per row), `k g (ta - tb)` and its negative for the squared
    /// error (`k = 2 / len`).
    pub fn backward_tangent(
        &self,
        ctx: &Ctx<'_, S>,
        g: &ArrayD<S>,
        g_dot: ArrayD<S>,
        t: &InputTangents<'_, S>,
        y_dot: Option<&ArrayD<S>>,
    ) -> InputGrads<S> {
        let mut out = self.backward(ctx, g_dot);
        let gv = || *g.iter().next().expect("0-d loss");
        match self {
            LossOp::LogSoftmax { axis } => {
                if let Some(yd) = y_dot {
                    let mut term = yd.clone();
                    Zip::from(term.lanes_mut(Axis(*axis)))
                        .and(g.lanes(Axis(*axis)))
                        .and(ctx.output.lanes(Axis(*axis)))
                        .for_each(|mut tl, gl, yl| {
                            let total = gl.sum();
                            Zip::from(&mut tl).and(&yl).for_each(|t, &y| *t = -y.exp() * *t * total);
                        });
                    add_term(&mut out, 0, Some(term));
                }
            }
            LossOp::SoftmaxCrossEntropy { labels, probs } => {
                if let Some(tx) = t[0] {
                    let scale = gv() / S::from_usize(labels.len()).expect("count fits");
                    let mut term = tx.clone();
                    center_by_softmax(&mut term, probs, 1, |p| p);
                    Zip::from(&mut term).and(probs).for_each(|t, &p| *t = scale * p * *t);
                    add_term(&mut out, 0, Some(term));
                }
            }
            LossOp::Mse => {
                let a = &ctx.inputs[0];
                let k = (S::one() + S::one()) * gv() / S::from_usize(a.len().max(1)).expect("count fits");
                let term = match (t[0], t[1]) {
                    (Some(ta), Some(tb)) => Some(Zip::from(ta).and(tb).map_collect(|&ta, &tb| k * (ta - tb))),
                    (Some(ta), None) => Some(ta.mapv(|v| k * v)),
                    (None, Some(tb)) => Some(tb.mapv(|v| -k * v)),
                    (None, None) => None,
                };
                add_term(&mut out, 1, term.as_ref().map(|d| d.mapv(|v| -v)));
                add_term(&mut out, 0, term);
            }
        }
        out
    }

    /// The tangent of the output: `t - sum(softmax * t)` along the axis for log-softmax,
    /// `mean over rows of (softmax . t - t[label])` for the cross-entropy,
    /// `2 mean((a - b)(ta - tb))` for the squared error.
    pub fn jvp(&self, ctx: &Ctx<'_, S>, t: &InputTangents<'_, S>) -> ArrayD<S> {
        let scalar = |v: S| ArrayD::from_elem(IxDyn(&[]), v);
        match self {
            LossOp::LogSoftmax { axis } => {
                let mut dy = t[0].expect("a tangent reaches the node").clone();
                center_by_softmax(&mut dy, ctx.output, *axis, S::exp);
                dy
            }
            LossOp::SoftmaxCrossEntropy { labels, probs } => {
                fn as2<S: Scalar>(a: &ArrayD<S>) -> ndarray::ArrayView2<'_, S> {
                    a.view().into_dimensionality::<Ix2>().expect("2-D logits")
                }
                let tx = as2(t[0].expect("a tangent reaches the node"));
                let n = S::from_usize(labels.len()).expect("count fits");
                let total: S = as2(probs)
                    .outer_iter()
                    .zip(tx.outer_iter())
                    .zip(labels)
                    .map(|((p, t), &l)| Zip::from(&p).and(&t).fold(S::zero(), |acc, &p, &t| acc + p * t) - t[l])
                    .sum();
                scalar(total / n)
            }
            LossOp::Mse => {
                let (a, b) = (&ctx.inputs[0], &ctx.inputs[1]);
                let k = (S::one() + S::one()) / S::from_usize(a.len().max(1)).expect("count fits");
                let dot = |d: &ArrayD<S>| {
                    Zip::from(a)
                        .and(b)
                        .and(d)
                        .fold(S::zero(), |acc, &a, &b, &d| acc + (a - b) * d)
                };
                let total = match (t[0], t[1]) {
                    (Some(ta), Some(tb)) => dot(ta) - dot(tb),
                    (Some(ta), None) => dot(ta),
                    (None, Some(tb)) => -dot(tb),
                    (None, None) => S::zero(),
                };
                scalar(k * total)
            }
        }
    }
}

impl<'t, S: Scalar> Var<'t, S> {
    /// `x - logsumexp(x)` along `axis`, computed stably.
    pub fn try_log_softmax(self, axis: usize) -> Result<Var<'t, S>> {
        check_axis("log_softmax", axis, self.ndim())?;
        let value = self.with_value(|x| log_softmax(x, axis));
        Ok(self.tape().push(
            Op::Loss(Box::new(LossOp::LogSoftmax { axis })),
            Inputs::from_slice(&[self.id()]),
            value,
        ))
    }
    /// Panicking form of [`try_log_softmax`](Self::try_log_softmax).
    #[track_caller]
    pub fn log_softmax(self, axis: usize) -> Var<'t, S> {
        crate::var::fail(self.try_log_softmax(axis))
    }
    /// `softmax` along `axis` (recorded as `exp(log_softmax)`).
    #[track_caller]
    pub fn softmax(self, axis: usize) -> Var<'t, S> {
        self.log_softmax(axis).exp()
    }

    /// Mean softmax cross-entropy of `(n, classes)` logits against `n` integer labels.
    pub fn try_softmax_cross_entropy(self, labels: &[usize]) -> Result<Var<'t, S>> {
        let shape = self.shape();
        if shape.len() != 2 || shape[0] != labels.len() {
            return Err(Error::shapes(
                "softmax_cross_entropy",
                &shape,
                &[labels.len()],
                "logits must be (n, classes) with one label per row",
            ));
        }
        if shape[0] == 0 {
            return Err(Error::invalid("softmax_cross_entropy", "empty batch"));
        }
        if let Some(&bad) = labels.iter().find(|&&l| l >= shape[1]) {
            return Err(Error::invalid(
                "softmax_cross_entropy",
                format!("label {bad} out of range for {} classes", shape[1]),
            ));
        }
        let (loss, probs) = self.with_value(|x| {
            let lsm = log_softmax(x, 1);
            let total: S = lsm.outer_iter().zip(labels).map(|(row, &l)| -row[l]).sum();
            let n = S::from_usize(labels.len()).expect("count fits");
            (total / n, lsm.mapv(S::exp))
        });
        let value = ArrayD::from_elem(IxDyn(&[]), loss);
        let op = LossOp::SoftmaxCrossEntropy {
            labels: labels.to_vec(),
            probs,
        };
        Ok(self
            .tape()
            .push(Op::Loss(Box::new(op)), Inputs::from_slice(&[self.id()]), value))
    }
    /// Panicking form of [`try_softmax_cross_entropy`](Self::try_softmax_cross_entropy).
    #[track_caller]
    pub fn softmax_cross_entropy(self, labels: &[usize]) -> Var<'t, S> {
        crate::var::fail(self.try_softmax_cross_entropy(labels))
    }

    /// Mean squared error `mean((self - target)^2)`; shapes must be equal.
    pub fn try_mse(self, target: Var<'t, S>) -> Result<Var<'t, S>> {
        self.check_same("mse", &target)?;
        let value = {
            let nodes = self.tape().nodes();
            let (a, b) = (&nodes[self.id()].value, &nodes[target.id()].value);
            if a.shape() != b.shape() {
                return Err(Error::shapes(
                    "mse",
                    a.shape(),
                    b.shape(),
                    "prediction and target must have equal shapes",
                ));
            }
            if a.is_empty() {
                return Err(Error::invalid("mse", "empty arrays"));
            }
            let n = S::from_usize(a.len()).expect("count fits");
            let s: S = Zip::from(a)
                .and(b)
                .fold(S::zero(), |acc, &a, &b| acc + (a - b) * (a - b));
            ArrayD::from_elem(IxDyn(&[]), s / n)
        };
        Ok(self.tape().push(
            Op::Loss(Box::new(LossOp::Mse)),
            Inputs::from_slice(&[self.id(), target.id()]),
            value,
        ))
    }
    /// Panicking form of [`try_mse`](Self::try_mse).
    #[track_caller]
    pub fn mse(self, target: Var<'t, S>) -> Var<'t, S> {
        crate::var::fail(self.try_mse(target))
    }
}
