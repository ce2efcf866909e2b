//! Property-based fuzz of the engine (proptest).
//!
//! Two properties, each over f32 and f64:
//!
//! - **graphs**: random programs of the core ops (`+ - * /`, affine maps, the smooth unary
//!   ops, relu / leaky relu / abs / sign / clamp and their `_with` overrides, maximum /
//!   minimum, max/min reductions, sums and means, reshape, broadcast, permute, slice, concat,
//!   matmul where the shapes allow, detach, constants) over random shapes (empty, rank 0,
//!   broadcasting), random values (exact zeros and ties on a grid, sometimes NaN, infinities,
//!   huge and subnormal values), random kink policies (presets, selections, tolerances,
//!   out-of-hull opt-in), solver bands, element selections, seeds and anomaly mode. Each case
//!   must either stop at a clean typed `Err` (only `try_*` forms are called where an op can
//!   fail) or return gradients that have the parameters' shapes, replay bit for bit, come
//!   with a consistent ledger (the same records as `Tape::kink_ledger`), are finite whenever
//!   the inputs are finite and the program stays well scaled, and pass a finite-difference
//!   check there (`gradcheck`'s refusal to difference across a kink is an accepted outcome).
//! - **kink probes**: a nonsmooth op on parameters with planted exact kinks (zeros, ties,
//!   bound hits, values at the policy's tolerance), a random graph on top of it, and a random
//!   policy, per-op override and element selection. The upstream gradient `u` at the op is
//!   measured by replaying the graph with the op's output as a leaf; the gradient of the
//!   op's inputs must then be exactly `selection * u` at the kinks and the ordinary derivative
//!   times `u` elsewhere (bit for bit; reductions over broadcast axes to rounding), and the
//!   op's ledger record must list exactly the elements counted here.
//!
//! A panic anywhere fails the property with the case printed (and shrunk by proptest).
//!
//! The bugs this fuzz found in the library (the NaN gradient of `x^0` where `1/x`
//! overflows, the transposed `kink_indices` of reductions over a leading axis, `gradcheck`
//! differencing across the kink of a reduction lane that holds its extremum twice) are fixed;
//! the `regression_*` tests below keep their minimal cases.
//!
//! `cargo test` runs 64 cases of each property. The ignored `fuzz_100k` runs 100,000 of
//! each and prints what happened:
//! `cargo test -p clarke-core --release --test integration fuzz:: -- --ignored --nocapture`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use clarke_core::{
    BackwardOptions, ElementSelection, Error, GradcheckOptions, KinkLedger, KinkPolicy, KinkRecord, Result, Scalar,
    Selection, Tape, TieRule, Var, gradcheck,
};
use ndarray::{ArrayD, Axis, IxDyn};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

type Check = std::result::Result<(), String>;

/// Spacing of the value grid: zeros, ties and clamp-bound hits happen on it.
const GRID: f64 = 0.25;
/// A program is well scaled when every value stays within this bound...
const WELL_BOUND: f64 = 1e3;
/// ...and every argument of log, sqrt, a fractional power, recip or a divisor stays this far
/// from its singularity. Gradients must then be finite.
const WELL_MARGIN: f64 = 0.1;
/// The f32 finite-difference check runs on better scaled programs only.
const F32_FD_BOUND: f64 = 1e2;
const F32_FD_MARGIN: f64 = 0.5;

// ------------------------------------------------------------------------------------------
// Programs
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Input {
    shape: Vec<usize>,
    values: Vec<f64>,
    param: bool,
}

impl Input {
    fn array<S: Scalar>(&self) -> ArrayD<S> {
        let data = self.values.iter().map(|&v| S::from_f64_lossy(v)).collect();
        ArrayD::from_shape_vec(IxDyn(&self.shape), data).expect("values match the shape")
    }

    fn leaf<'t, S: Scalar>(&self, tape: &'t Tape<S>) -> Var<'t, S> {
        if self.param {
            tape.param(self.array())
        } else {
            tape.constant(self.array())
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Bin {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Debug, Clone, Copy)]
enum Un {
    Exp,
    Log,
    Sqrt,
    Recip,
    Powi(i32),
    Powf(f64),
    Tanh,
    Sigmoid,
    Softplus,
    Neg,
    Affine(f64, f64),
}

#[derive(Debug, Clone, Copy)]
enum Kink {
    Relu,
    ReluWith(f64),
    Leaky(f64),
    /// (alpha, slope at 0)
    LeakyWith(f64, f64),
    Abs,
    AbsWith(f64),
    Sign,
    Clamp(f64, f64),
    /// (lo, hi, derivative at lo, derivative at hi)
    ClampWith(f64, f64, f64, f64),
}

/// One step of a program. Operands are picked by offset from the newest node (`0`: the last
/// one); a binary op looks for an operand whose shape fits unless `strict`, which takes the
/// picked node whatever its shape (to exercise shape errors).
#[derive(Debug, Clone)]
enum Step {
    Bin {
        op: Bin,
        a: usize,
        b: usize,
        strict: bool,
    },
    Un {
        op: Un,
        a: usize,
    },
    Kink {
        op: Kink,
        a: usize,
    },
    Ext {
        max: bool,
        weight: Option<f64>,
        a: usize,
        b: usize,
        strict: bool,
    },
    /// max/min over an axis (`None`: over everything; axis code 3: one past the rank).
    Reduce {
        max: bool,
        axis: Option<u8>,
        keep: bool,
        rule: Option<TieRule>,
        a: usize,
    },
    /// Axis code 7: one past the rank.
    Sum {
        a: usize,
        axes: Vec<u8>,
        keep: bool,
        mean: bool,
    },
    Reshape {
        a: usize,
        variant: u8,
    },
    Broadcast {
        a: usize,
        lead: u8,
        bad: bool,
    },
    Permute {
        a: usize,
        rotate: bool,
    },
    Slice {
        a: usize,
        axis: u8,
        start: u8,
        len: u8,
    },
    Concat {
        a: usize,
        b: usize,
        axis: u8,
        strict: bool,
    },
    Matmul {
        a: usize,
        b: usize,
        n: u8,
        strict: bool,
    },
    LogSoftmax {
        a: usize,
        axis: u8,
    },
    /// Softmax cross-entropy of a 2-D node with labels derived from `salt` (out of range when
    /// `bad`).
    CrossEntropy {
        a: usize,
        salt: u8,
        bad: bool,
    },
    Mse {
        a: usize,
        b: usize,
        strict: bool,
    },
    Detach {
        a: usize,
    },
    Const {
        like: usize,
        salt: u8,
    },
}

/// How the program's last node becomes the backward output.
#[derive(Debug, Clone, Copy)]
enum Finish {
    Sum,
    Mean,
    /// Keep the output; backward with a seed of its shape.
    Seeded(u8),
    /// Keep the output; backward without a seed (an error unless it has one element).
    NoSeed,
    /// Keep the output; backward with a seed of the wrong shape.
    WrongSeed,
}

#[derive(Debug, Clone)]
struct PolicySpec {
    preset: usize,
    relu: Option<f64>,
    leaky: Option<f64>,
    abs: Option<f64>,
    tie: Option<f64>,
    clamp: Option<(f64, f64)>,
    reduce: Option<TieRule>,
    tolerance: f64,
    outside: bool,
    /// Set on the tape (`Tape::with_policy`) rather than passed to backward.
    on_tape: bool,
}

impl PolicySpec {
    fn policy(&self) -> KinkPolicy {
        let mut p = KinkPolicy::preset(KinkPolicy::PRESETS[self.preset]).expect("a preset");
        if let Some(s) = self.relu {
            p = p.with_relu(s);
        }
        if let Some(t) = self.leaky {
            p = p.with_leaky_relu(t);
        }
        if let Some(s) = self.abs {
            p = p.with_abs(s);
        }
        if let Some(w) = self.tie {
            p = p.with_tie_weight(w);
        }
        if let Some((l, h)) = self.clamp {
            p = p.with_clamp(l, h);
        }
        if let Some(r) = self.reduce {
            p = p.with_reduce_tie(r);
        }
        p = p.with_tolerance(self.tolerance);
        if self.outside {
            p = p.allow_outside_hull();
        }
        p
    }
}

/// An element selection: on the node `node` back from the newest (or on a node id past the
/// tape when `bogus`).
#[derive(Debug, Clone, Copy)]
struct Pin {
    node: usize,
    element: u8,
    value: f64,
    bogus: bool,
}

#[derive(Debug, Clone)]
struct GraphCase {
    f32: bool,
    inputs: Vec<Input>,
    steps: Vec<Step>,
    finish: Finish,
    policy: PolicySpec,
    anomaly: bool,
    solver_band: f64,
    pin: Option<Pin>,
}

#[derive(Debug, Clone, Copy)]
enum ProbeOp {
    Unary(Kink),
    Ext {
        max: bool,
        weight: Option<f64>,
    },
    Reduce {
        max: bool,
        axis: Option<u8>,
        keep: bool,
        rule: Option<TieRule>,
    },
}

#[derive(Debug, Clone)]
struct Probe {
    f32: bool,
    op: ProbeOp,
    x: Input,
    /// Second operand of maximum / minimum (unused otherwise).
    y: Input,
    others: Vec<Input>,
    steps: Vec<Step>,
    finish: Finish,
    policy: PolicySpec,
    solver_band: f64,
    /// Element selection (flat element, value) on the probed node.
    pin: Option<(u8, f64)>,
    /// Apply the op to the transposes of the parameters (strided, not standard layout).
    transpose: bool,
}

// ------------------------------------------------------------------------------------------
// The interpreter
// ------------------------------------------------------------------------------------------

/// What a program's values looked like (for the finiteness and finite-difference claims).
#[derive(Debug, Clone, Copy)]
struct Trace {
    finite: bool,
    max_abs: f64,
    max_len: usize,
    margin: f64,
    /// The program detaches a value: its gradient is not the derivative of its function.
    detached: bool,
}

impl Trace {
    fn new() -> Self {
        Trace {
            finite: true,
            max_abs: 0.0,
            max_len: 0,
            margin: f64::INFINITY,
            detached: false,
        }
    }

    fn see<S: Scalar>(&mut self, v: Var<'_, S>) {
        v.with_value(|a| {
            self.max_len = self.max_len.max(a.len());
            for &x in a {
                let x = x.to_f64_exact();
                if x.is_finite() {
                    self.max_abs = self.max_abs.max(x.abs());
                } else {
                    self.finite = false;
                }
            }
        });
    }

    /// An argument that must stay positive (log, sqrt, fractional powers).
    fn positive<S: Scalar>(&mut self, v: Var<'_, S>) {
        v.with_value(|a| a.iter().for_each(|&x| self.margin = self.margin.min(x.to_f64_exact())));
    }

    /// An argument that must stay away from zero (recip, divisors, negative powers).
    fn nonzero<S: Scalar>(&mut self, v: Var<'_, S>) {
        v.with_value(|a| {
            a.iter()
                .for_each(|&x| self.margin = self.margin.min(x.to_f64_exact().abs()))
        });
    }

    fn well_scaled(&self, bound: f64, margin: f64) -> bool {
        self.finite && self.max_abs <= bound && self.margin >= margin
    }
}

struct Built<'t, S: Scalar> {
    out: Var<'t, S>,
    nodes: Vec<Var<'t, S>>,
    trace: Trace,
}

fn pick<'t, S: Scalar>(nodes: &[Var<'t, S>], k: usize) -> Var<'t, S> {
    nodes[nodes.len() - 1 - k % nodes.len()]
}

/// The first node from offset `k` on whose shape passes `ok`.
fn find<'t, S: Scalar>(nodes: &[Var<'t, S>], k: usize, ok: impl Fn(&[usize]) -> bool) -> Option<Var<'t, S>> {
    let n = nodes.len();
    (0..n).map(|j| nodes[n - 1 - (k + j) % n]).find(|v| ok(&v.shape()))
}

fn broadcastable(a: &[usize], b: &[usize]) -> bool {
    a.iter()
        .rev()
        .zip(b.iter().rev())
        .all(|(&x, &y)| x == y || x == 1 || y == 1)
}

/// A deterministic array on the grid (zeros included), for constants and seeds.
fn grid_array<S: Scalar>(shape: &[usize], salt: u8) -> ArrayD<S> {
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|i| S::from_f64_lossy(((i * 5 + usize::from(salt) * 3) % 9) as f64 * GRID - 1.0))
        .collect();
    ArrayD::from_shape_vec(IxDyn(shape), data).expect("sizes match")
}

fn apply_kink<'t, S: Scalar>(x: Var<'t, S>, op: Kink) -> Result<Var<'t, S>> {
    let lit = S::from_f64_lossy;
    Ok(match op {
        Kink::Relu => x.relu(),
        Kink::ReluWith(s) => x.try_relu_with(s)?,
        Kink::Leaky(a) => x.leaky_relu(lit(a)),
        Kink::LeakyWith(a, s) => x.try_leaky_relu_with(lit(a), s)?,
        Kink::Abs => x.abs(),
        Kink::AbsWith(s) => x.try_abs_with(s)?,
        Kink::Sign => x.sign(),
        Kink::Clamp(lo, hi) => x.try_clamp(lit(lo), lit(hi))?,
        Kink::ClampWith(lo, hi, l, h) => x.try_clamp_with(lit(lo), lit(hi), l, h)?,
    })
}

fn apply_ext<'t, S: Scalar>(x: Var<'t, S>, y: Var<'t, S>, max: bool, weight: Option<f64>) -> Result<Var<'t, S>> {
    match (max, weight) {
        (true, None) => x.try_maximum(y),
        (true, Some(w)) => x.try_maximum_with(y, w),
        (false, None) => x.try_minimum(y),
        (false, Some(w)) => x.try_minimum_with(y, w),
    }
}

/// The axis a reduction code means for rank `nd` (code 3: one past the rank).
fn reduce_axis(code: u8, nd: usize) -> usize {
    if code == 3 { nd } else { usize::from(code) % nd.max(1) }
}

fn apply_reduce<'t, S: Scalar>(
    x: Var<'t, S>,
    max: bool,
    axis: Option<u8>,
    keep: bool,
    rule: Option<TieRule>,
) -> Result<Var<'t, S>> {
    let Some(code) = axis else {
        return if max { x.try_max_all() } else { x.try_min_all() };
    };
    let ax = reduce_axis(code, x.ndim());
    match (max, rule) {
        (true, None) => x.try_max_axis(ax, keep),
        (true, Some(r)) => x.try_max_axis_with(ax, keep, r),
        (false, None) => x.try_min_axis(ax, keep),
        (false, Some(r)) => x.try_min_axis_with(ax, keep, r),
    }
}

fn apply<'t, S: Scalar>(tape: &'t Tape<S>, nodes: &[Var<'t, S>], step: &Step, trace: &mut Trace) -> Result<Var<'t, S>> {
    let lit = S::from_f64_lossy;
    let second = |a: Var<'t, S>, b: usize, strict: bool| {
        if strict {
            pick(nodes, b)
        } else {
            find(nodes, b, |s| broadcastable(&a.shape(), s)).unwrap_or_else(|| pick(nodes, b))
        }
    };
    Ok(match *step {
        Step::Bin { op, a, b, strict } => {
            let x = pick(nodes, a);
            let y = second(x, b, strict);
            match op {
                Bin::Add => x.try_add(y)?,
                Bin::Sub => x.try_sub(y)?,
                Bin::Mul => x.try_mul(y)?,
                Bin::Div => {
                    trace.nonzero(y);
                    x.try_div(y)?
                }
            }
        }
        Step::Un { op, a } => {
            let x = pick(nodes, a);
            match op {
                Un::Exp => x.exp(),
                Un::Log => {
                    trace.positive(x);
                    x.log()
                }
                Un::Sqrt => {
                    trace.positive(x);
                    x.sqrt()
                }
                Un::Recip => {
                    trace.nonzero(x);
                    x.recip()
                }
                Un::Powi(n) => {
                    if n < 0 {
                        trace.nonzero(x);
                    }
                    x.powi(n)
                }
                Un::Powf(p) => {
                    // x^p is smooth on the whole line for p = 0 and whole p >= 1.
                    if p != 0.0 && (p.fract() != 0.0 || p < 1.0) {
                        trace.positive(x);
                    }
                    x.powf(lit(p))
                }
                Un::Tanh => x.tanh(),
                Un::Sigmoid => x.sigmoid(),
                Un::Softplus => x.softplus(),
                Un::Neg => -x,
                Un::Affine(s, c) => x.affine(lit(s), lit(c)),
            }
        }
        Step::Kink { op, a } => apply_kink(pick(nodes, a), op)?,
        Step::Ext {
            max,
            weight,
            a,
            b,
            strict,
        } => {
            let x = pick(nodes, a);
            apply_ext(x, second(x, b, strict), max, weight)?
        }
        Step::Reduce {
            max,
            axis,
            keep,
            rule,
            a,
        } => {
            let x = pick(nodes, a);
            apply_reduce(x, max, axis, keep, rule)?
        }
        Step::Sum {
            a,
            ref axes,
            keep,
            mean,
        } => {
            let x = pick(nodes, a);
            let nd = x.ndim();
            let axes: Vec<usize> = axes
                .iter()
                .filter_map(|&k| match (k, nd) {
                    (7, _) => Some(nd),
                    (_, 0) => None,
                    _ => Some(usize::from(k) % nd),
                })
                .collect();
            if mean {
                x.try_mean_axes(&axes, keep)?
            } else {
                x.try_sum_axes(&axes, keep)?
            }
        }
        Step::Reshape { a, variant } => {
            let x = pick(nodes, a);
            let (s, n) = (x.shape(), x.len());
            let target: Vec<usize> = match variant % 7 {
                0 => vec![n],
                1 => vec![1, n],
                2 => vec![n, 1],
                3 if n == 0 => vec![0, 3],
                3 => {
                    let d = (2..=n).find(|d| n % d == 0).unwrap_or(1);
                    vec![d, n / d]
                }
                4 if n == 1 => vec![],
                4 => vec![1, n, 1],
                5 => s.iter().rev().copied().collect(),
                _ => vec![n + 1],
            };
            x.try_reshape(&target)?
        }
        Step::Broadcast { a, lead, bad } => {
            let x = pick(nodes, a);
            let s = x.shape();
            let mut t: Vec<usize> = s.iter().map(|&d| if d == 1 { 3 } else { d }).collect();
            match lead % 3 {
                1 => t.insert(0, 2),
                2 => t.insert(0, 0),
                _ => {}
            }
            if bad {
                let off = t.len() - s.len();
                match s.iter().position(|&d| d != 1) {
                    Some(i) => t[off + i] += 1,
                    None if !s.is_empty() => t.clear(),
                    None => {}
                }
            }
            x.try_broadcast_to(&t)?
        }
        Step::Permute { a, rotate } => {
            let x = pick(nodes, a);
            let nd = x.ndim();
            if rotate && nd > 0 {
                let perm: Vec<usize> = (1..nd).chain(std::iter::once(0)).collect();
                x.try_permute(&perm)?
            } else {
                x.t()
            }
        }
        Step::Slice { a, axis, start, len } => {
            let x = pick(nodes, a);
            let s = x.shape();
            let ax = usize::from(axis) % s.len().max(1);
            let dim = s.get(ax).copied().unwrap_or(0);
            let st = usize::from(start) % (dim + 1);
            // len code 5: one past the end.
            let en = if len == 5 {
                dim + 1
            } else {
                st + usize::from(len) % (dim - st + 1)
            };
            x.try_slice_axis(ax, st..en)?
        }
        Step::Concat { a, b, axis, strict } => {
            let x = pick(nodes, a);
            let s = x.shape();
            let ax = usize::from(axis) % s.len().max(1);
            let y = if strict {
                pick(nodes, b)
            } else {
                let fits = |t: &[usize]| {
                    t.len() == s.len() && t.iter().zip(&s).enumerate().all(|(i, (p, q))| i == ax || p == q)
                };
                find(nodes, b, fits).unwrap_or_else(|| pick(nodes, b))
            };
            tape.try_concat(&[x, y], ax)?
        }
        Step::Matmul { a, b, n, strict } => {
            let x = pick(nodes, a);
            let s = x.shape();
            let y = if strict {
                pick(nodes, b)
            } else {
                let fits = |t: &[usize]| match s.len() {
                    1 | 2 => {
                        let k = s[s.len() - 1];
                        (t.len() == 1 || t.len() == 2) && t[0] == k
                    }
                    3 => (t.len() == 2 && t[0] == s[2]) || (t.len() == 3 && t[0] == s[0] && t[1] == s[2]),
                    _ => false,
                };
                match find(nodes, b, fits) {
                    Some(y) => y,
                    None if (1..=3).contains(&s.len()) => {
                        tape.constant(grid_array(&[s[s.len() - 1], usize::from(n % 4)], n))
                    }
                    None => pick(nodes, b),
                }
            };
            x.try_matmul(y)?
        }
        Step::LogSoftmax { a, axis } => {
            let x = pick(nodes, a);
            x.try_log_softmax(usize::from(axis) % x.ndim().max(1))?
        }
        Step::CrossEntropy { a, salt, bad } => {
            let x = pick(nodes, a);
            let s = x.shape();
            let labels: Vec<usize> = match *s.as_slice() {
                [n, c] if c > 0 && !bad => (0..n).map(|i| (i * 7 + usize::from(salt)) % c).collect(),
                [n, c] => vec![c; n],
                _ => vec![0],
            };
            x.try_softmax_cross_entropy(&labels)?
        }
        Step::Mse { a, b, strict } => {
            let x = pick(nodes, a);
            let y = if strict {
                pick(nodes, b)
            } else {
                find(nodes, b, |t| t == x.shape().as_slice()).unwrap_or_else(|| pick(nodes, b))
            };
            x.try_mse(y)?
        }
        Step::Detach { a } => {
            trace.detached = true;
            pick(nodes, a).detach()
        }
        Step::Const { like, salt } => tape.constant(grid_array(&pick(nodes, like).shape(), salt)),
    })
}

/// Runs `steps` from the nodes `start` and applies `finish`.
fn build<'t, S: Scalar>(
    tape: &'t Tape<S>,
    start: &[Var<'t, S>],
    steps: &[Step],
    finish: Finish,
) -> Result<Built<'t, S>> {
    let mut trace = Trace::new();
    for &v in start {
        trace.see(v);
    }
    let mut nodes = start.to_vec();
    for step in steps {
        let v = apply(tape, &nodes, step, &mut trace)?;
        trace.see(v);
        nodes.push(v);
    }
    let last = *nodes.last().expect("at least one start node");
    let out = match finish {
        Finish::Sum => last.sum(),
        Finish::Mean => {
            let all: Vec<usize> = (0..last.ndim()).collect();
            last.try_mean_axes(&all, false)?
        }
        Finish::Seeded(_) | Finish::NoSeed | Finish::WrongSeed => last,
    };
    trace.see(out);
    Ok(Built { out, nodes, trace })
}

fn seed_options<S: Scalar>(finish: Finish, out: Var<'_, S>, options: &mut BackwardOptions<S>) {
    match finish {
        Finish::Seeded(salt) => options.seed = Some(grid_array(&out.shape(), salt)),
        Finish::WrongSeed => options.seed = Some(ArrayD::zeros(IxDyn(&[out.len() + 1]))),
        Finish::Sum | Finish::Mean | Finish::NoSeed => {}
    }
}

// ------------------------------------------------------------------------------------------
// Outcomes
// ------------------------------------------------------------------------------------------

fn kind(e: &Error) -> String {
    match e {
        Error::ShapeMismatch { op, .. } => format!("ShapeMismatch({op})"),
        Error::InvalidArgument { op, .. } => format!("InvalidArgument({op})"),
        Error::ForeignVar { .. } => "ForeignVar".into(),
        Error::NonScalarOutput { .. } => "NonScalarOutput".into(),
        Error::InvalidSelection { .. } => "InvalidSelection".into(),
        Error::NonFinite { stage, .. } => format!("NonFinite({stage})"),
        Error::KinkInFiniteDifference { .. } => "KinkInFiniteDifference".into(),
        Error::GradientMismatch { .. } => "GradientMismatch".into(),
        other => format!("other: {other}"),
    }
}

#[derive(Default)]
struct Stats {
    graphs: usize,
    graphs_f32: usize,
    policy_err: BTreeMap<String, usize>,
    record_err: BTreeMap<String, usize>,
    backward_err: BTreeMap<String, usize>,
    graphs_ok: usize,
    ok_with_kinks: usize,
    finite_checked: usize,
    fd_passed: usize,
    fd_passed_f32: usize,
    fd_refused: usize,
    fd_not_run: usize,
    fd_detached: usize,
    fd_nothing: usize,
    probes: usize,
    probes_f32: usize,
    probe_err: BTreeMap<String, usize>,
    probe_unreached: usize,
    probe_checked: BTreeMap<&'static str, usize>,
    probe_kink_elements: usize,
    probe_pins_applied: usize,
}

fn bump<K: Ord>(map: &mut BTreeMap<K, usize>, key: K) {
    *map.entry(key).or_insert(0) += 1;
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sum = |m: &BTreeMap<String, usize>| m.values().sum::<usize>();
        let list = |f: &mut fmt::Formatter<'_>, m: &BTreeMap<String, usize>| -> fmt::Result {
            let mut v: Vec<_> = m.iter().collect();
            v.sort_by(|a, b| b.1.cmp(a.1));
            for (k, n) in v {
                writeln!(f, "      {n:>7}  {k}")?;
            }
            Ok(())
        };
        if self.graphs > 0 {
            writeln!(
                f,
                "graphs: {} cases ({} f32, {} f64)",
                self.graphs,
                self.graphs_f32,
                self.graphs - self.graphs_f32
            )?;
            writeln!(f, "  clean Err from the policy: {}", sum(&self.policy_err))?;
            list(f, &self.policy_err)?;
            writeln!(f, "  clean Err while recording (try_* ops): {}", sum(&self.record_err))?;
            list(f, &self.record_err)?;
            writeln!(f, "  clean Err from backward: {}", sum(&self.backward_err))?;
            list(f, &self.backward_err)?;
            writeln!(
                f,
                "  gradients returned: {} ({} with a kink element in the ledger); ledger, shapes, replay checked on all",
                self.graphs_ok, self.ok_with_kinks
            )?;
            writeln!(
                f,
                "    finite and well scaled (gradients checked finite): {}",
                self.finite_checked
            )?;
            writeln!(
                f,
                "    finite-difference check passed: {} ({} f32, {} f64)",
                self.fd_passed,
                self.fd_passed_f32,
                self.fd_passed - self.fd_passed_f32
            )?;
            writeln!(f, "    finite-difference check refused at a kink: {}", self.fd_refused)?;
            writeln!(
                f,
                "    finite-difference check not run (not well scaled): {}",
                self.fd_not_run
            )?;
            writeln!(
                f,
                "    finite-difference check not run (program detaches a value): {}",
                self.fd_detached
            )?;
            writeln!(
                f,
                "    finite-difference check refused (no input or output element): {}",
                self.fd_nothing
            )?;
        }
        if self.probes > 0 {
            writeln!(
                f,
                "kink probes: {} cases ({} f32, {} f64)",
                self.probes,
                self.probes_f32,
                self.probes - self.probes_f32
            )?;
            writeln!(f, "  clean Err: {}", sum(&self.probe_err))?;
            list(f, &self.probe_err)?;
            writeln!(
                f,
                "  op not reached by the graph (zero gradient checked): {}",
                self.probe_unreached
            )?;
            let checked: usize = self.probe_checked.values().sum();
            writeln!(
                f,
                "  exact selection and ledger checked: {checked} cases, {} kink elements, {} element selections applied",
                self.probe_kink_elements, self.probe_pins_applied
            )?;
            for (k, n) in &self.probe_checked {
                writeln!(f, "      {n:>7}  {k}")?;
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------
// Checks shared by both properties
// ------------------------------------------------------------------------------------------

/// Every record is internally consistent, records are in node order on this tape, and the
/// classes agree with the policy's tolerance and the solver band.
fn check_ledger(ledger: &KinkLedger, tape_len: usize, policy: &KinkPolicy, solver_band: f64) -> Check {
    let mut last = 0;
    for r in ledger.records() {
        let bad = |what: &str| Err(format!("inconsistent ledger record ({what}): {r:?}"));
        if r.exact + r.near + r.within_solver_error != r.kink_indices.len() {
            return bad("exact + near + within_solver_error != kink_indices.len()");
        }
        if r.kink_indices.windows(2).any(|w| w[0] >= w[1]) {
            return bad("indices not increasing");
        }
        if r.kink_indices.last().is_some_and(|&i| i >= r.elements) {
            return bad("index past the elements");
        }
        if r.elements != r.shape.iter().product::<usize>() {
            return bad("elements != product of shape");
        }
        if r.node >= tape_len || r.node < last {
            return bad("node out of order or past the tape");
        }
        if r.near > 0 && policy.tolerance == 0.0 {
            return bad("near hits without a tolerance");
        }
        if r.within_solver_error > 0 && solver_band <= policy.tolerance {
            return bad("hits within solver error without a band wider than the tolerance");
        }
        if r.max_distance > policy.tolerance.max(solver_band) || (r.at_kink() == r.exact && r.max_distance != 0.0) {
            return bad("max_distance");
        }
        last = r.node;
    }
    Ok(())
}

fn same<S: Scalar>(a: S, b: S) -> bool {
    a == b || (a.is_nan() && b.is_nan())
}

/// Runs a check, turning a panic into a failure.
fn guarded(f: impl FnOnce() -> Check) -> Check {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            Err(format!("panicked: {msg}"))
        }
    }
}

// ------------------------------------------------------------------------------------------
// Property 1: random graphs
// ------------------------------------------------------------------------------------------

fn check_graph<S: Scalar>(c: &GraphCase, stats: &RefCell<Stats>) -> Check {
    let mut st = stats.borrow_mut();
    st.graphs += 1;
    if S::NAME == "f32" {
        st.graphs_f32 += 1;
    }
    let policy = c.policy.policy();
    let tape = if c.policy.on_tape {
        match Tape::<S>::with_policy(policy.clone()) {
            Ok(t) => t,
            Err(e) => {
                bump(&mut st.policy_err, kind(&e));
                return Ok(());
            }
        }
    } else {
        Tape::new()
    };
    tape.set_anomaly_detection(c.anomaly);
    let arrays: Vec<ArrayD<S>> = c.inputs.iter().map(Input::array).collect();
    let leaves: Vec<Var<'_, S>> = c.inputs.iter().map(|i| i.leaf(&tape)).collect();
    let built = match build(&tape, &leaves, &c.steps, c.finish) {
        Ok(b) => b,
        Err(e) => {
            bump(&mut st.record_err, kind(&e));
            return Ok(());
        }
    };
    let out = built.out;
    let mut options = BackwardOptions::<S>::default();
    if !c.policy.on_tape {
        options.policy = Some(policy.clone());
    }
    options.solver_band = c.solver_band;
    seed_options(c.finish, out, &mut options);
    if let Some(pin) = c.pin {
        let node = if pin.bogus {
            tape.len() + 3
        } else {
            pick(&built.nodes, pin.node).id()
        };
        options.element_selections.push(ElementSelection {
            node,
            element: usize::from(pin.element),
            value: pin.value,
        });
    }
    let inputs_finite = arrays.iter().all(|a| a.iter().all(|v| v.is_finite()));
    let well = inputs_finite && built.trace.well_scaled(WELL_BOUND, WELL_MARGIN);
    let grads = match tape.backward(out, &options) {
        Ok(g) => g,
        Err(e) => {
            if well && matches!(e, Error::NonFinite { .. }) {
                return Err(format!("backward refused a well-scaled case: {e}"));
            }
            bump(&mut st.backward_err, kind(&e));
            return Ok(());
        }
    };

    // The ledger: consistent, and the records backward made are the tape's records.
    let band = c.solver_band;
    check_ledger(grads.ledger(), tape.len(), &policy, band)?;
    let full = tape
        .kink_ledger(Some(&policy), band)
        .map_err(|e| format!("kink_ledger refused what backward accepted: {e}"))?;
    for r in grads.ledger().records() {
        if full.record(r.node) != Some(r) {
            return Err(format!(
                "backward's ledger record {r:?} differs from the tape's {:?}",
                full.record(r.node)
            ));
        }
    }
    if !grads.ledger().is_clean() {
        st.ok_with_kinks += 1;
    }

    // Shapes, finiteness, and a replay that gives the same bits.
    let again = tape
        .backward(out, &options)
        .map_err(|e| format!("a replay of backward failed: {e}"))?;
    if again.ledger() != grads.ledger() {
        return Err("a replay of backward gave another ledger".into());
    }
    for (leaf, input) in leaves.iter().zip(&c.inputs) {
        if !input.param {
            continue;
        }
        let g = grads.wrt(*leaf).map_err(|e| format!("wrt: {e}"))?;
        if g.shape() != input.shape.as_slice() {
            return Err(format!(
                "gradient of shape {:?} for a parameter of shape {:?}",
                g.shape(),
                input.shape
            ));
        }
        let g2 = again.wrt(*leaf).map_err(|e| format!("wrt: {e}"))?;
        if g.iter().zip(g2.iter()).any(|(a, b)| !same(*a, *b)) {
            return Err(format!("a replay of backward gave other gradients: {g} vs {g2}"));
        }
        if well && g.iter().any(|v| !v.is_finite()) {
            return Err(format!(
                "non-finite gradient {g} for finite, well-scaled inputs (values within {:.3e}, singular arguments {:.3e} away)",
                built.trace.max_abs, built.trace.margin
            ));
        }
    }
    st.graphs_ok += 1;
    if well {
        st.finite_checked += 1;
    }

    // Finite differences, where the program is well scaled for the precision.
    let f64_run = S::NAME == "f64";
    let fd_ok = if f64_run {
        well
    } else {
        inputs_finite && built.trace.well_scaled(F32_FD_BOUND, F32_FD_MARGIN)
    };
    if built.trace.detached {
        st.fd_detached += 1;
        return Ok(());
    }
    if !fd_ok {
        st.fd_not_run += 1;
        return Ok(());
    }
    let mag = built.trace.max_abs * built.trace.max_len as f64;
    let options = if f64_run {
        GradcheckOptions {
            step: 1e-6,
            rtol: 1e-5,
            atol: 1e-8 * (1.0 + mag),
            ..GradcheckOptions::default()
        }
    } else {
        GradcheckOptions {
            step: 1.0 / 128.0,
            rtol: 3e-2,
            atol: 1e-3 * (1.0 + mag),
            ..GradcheckOptions::default()
        }
    };
    // The check's own backward runs under the policy without its tolerance band: a band
    // treats points near a kink as at it, which no difference quotient reproduces.
    let fd_policy = policy.with_tolerance(0.0);
    let checked = gradcheck(
        |t, v| {
            t.set_policy(fd_policy.clone())?;
            Ok(build(t, v, &c.steps, c.finish)?.out)
        },
        &arrays,
        &options,
    );
    // A check with no input element or no output element would compare nothing: gradcheck
    // refuses it, and only it.
    let nothing_to_check = arrays.iter().all(|a| a.is_empty()) || out.value().is_empty();
    match checked {
        Err(Error::InvalidArgument { ref detail, .. }) if nothing_to_check && detail.contains("nothing to check") => {
            st.fd_nothing += 1
        }
        _ if nothing_to_check => return Err(format!("gradcheck compared nothing and said {checked:?}")),
        Ok(_) if f64_run => st.fd_passed += 1,
        Ok(_) => {
            st.fd_passed += 1;
            st.fd_passed_f32 += 1;
        }
        Err(Error::KinkInFiniteDifference { .. }) => st.fd_refused += 1,
        Err(e) => return Err(format!("finite-difference check failed: {e}")),
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Property 2: exact selections at planted kinks
// ------------------------------------------------------------------------------------------

/// (exact, near, within solver error, indices, max distance) of a scan over `distances`.
fn classify(distances: &[f64], tolerance: f64, solver_band: f64) -> (usize, usize, usize, Vec<usize>, f64) {
    let (mut exact, mut near, mut within, mut indices, mut max_d) = (0, 0, 0, Vec::new(), 0.0f64);
    for (i, d) in distances.iter().enumerate() {
        let d = d.abs();
        if d == 0.0 {
            exact += 1;
        } else if d <= tolerance {
            near += 1;
        } else if d <= solver_band {
            within += 1;
        } else {
            continue;
        }
        max_d = max_d.max(d);
        indices.push(i);
    }
    (exact, near, within, indices, max_d)
}

/// What the probed node must have done: the gradients of its inputs and its ledger record.
struct Expected<S> {
    /// Per input of the op (logical order), exact unless `sum_tolerance` is set.
    grads: Vec<ArrayD<S>>,
    /// Gradients that sum over broadcast axes: compare to this relative tolerance.
    sum_tolerance: Option<f64>,
    op: &'static str,
    shape: Vec<usize>,
    distances: Vec<f64>,
    selection: Selection,
    overridden: bool,
    hull: Option<(f64, f64)>,
    pin_applied: bool,
}

fn unary_expected<S: Scalar>(
    k: Kink,
    x: &ArrayD<S>,
    u: &ArrayD<S>,
    pol: &KinkPolicy,
    band: S,
    pin: Option<(usize, f64)>,
) -> Expected<S> {
    let lit = S::from_f64_lossy;
    let (zero, one) = (S::zero(), S::one());
    let at_zero = |v: S| v.abs() <= band;
    // The slope at the kink as the engine applies it (f64 selection rounded to S).
    let (op, sel, overridden, hull) = match k {
        Kink::Relu => ("relu", Selection::Slope(pol.relu), false, Some((0.0, 1.0))),
        Kink::ReluWith(s) => ("relu", Selection::Slope(s), true, Some((0.0, 1.0))),
        Kink::Leaky(a) | Kink::LeakyWith(a, _) => {
            let a64 = lit(a).to_f64_exact();
            let hull = Some((a64.min(1.0), a64.max(1.0)));
            match k {
                // The policy's position t in [0, 1] between alpha and 1.
                Kink::Leaky(_) => (
                    "leaky_relu",
                    Selection::Slope(a64 + pol.leaky_relu * (1.0 - a64)),
                    false,
                    hull,
                ),
                Kink::LeakyWith(_, s) => ("leaky_relu", Selection::Slope(s), true, hull),
                _ => unreachable!(),
            }
        }
        Kink::Abs => ("abs", Selection::Slope(pol.abs), false, Some((-1.0, 1.0))),
        Kink::AbsWith(s) => ("abs", Selection::Slope(s), true, Some((-1.0, 1.0))),
        Kink::Sign => ("sign", Selection::Slope(pol.sign), false, Some((0.0, 0.0))),
        Kink::Clamp(..) => (
            "clamp",
            Selection::Clamp {
                low: pol.clamp_low,
                high: pol.clamp_high,
            },
            false,
            Some((0.0, 1.0)),
        ),
        Kink::ClampWith(_, _, l, h) => ("clamp", Selection::Clamp { low: l, high: h }, true, Some((0.0, 1.0))),
    };
    let derivative = |v: S| -> S {
        match (k, sel) {
            (Kink::Relu | Kink::ReluWith(_), Selection::Slope(s)) => {
                if v > band {
                    one
                } else if at_zero(v) {
                    lit(s)
                } else {
                    zero
                }
            }
            (Kink::Leaky(a) | Kink::LeakyWith(a, _), Selection::Slope(s)) => {
                if v > band {
                    one
                } else if at_zero(v) {
                    lit(s)
                } else {
                    lit(a)
                }
            }
            (Kink::Abs | Kink::AbsWith(_), Selection::Slope(s)) => {
                if v > band {
                    one
                } else if v < -band {
                    -one
                } else if at_zero(v) {
                    lit(s)
                } else {
                    zero
                }
            }
            (Kink::Sign, Selection::Slope(s)) => {
                if at_zero(v) {
                    lit(s)
                } else {
                    zero
                }
            }
            (Kink::Clamp(lo, hi) | Kink::ClampWith(lo, hi, ..), Selection::Clamp { low, high }) => {
                let (lo, hi) = (lit(lo), lit(hi));
                if (v - lo).abs() <= band {
                    lit(low)
                } else if (v - hi).abs() <= band {
                    lit(high)
                } else if v > lo && v < hi {
                    one
                } else {
                    zero
                }
            }
            _ => unreachable!(),
        }
    };
    let pinned_kink = |v: S| match k {
        Kink::Clamp(lo, hi) | Kink::ClampWith(lo, hi, ..) => at_zero(v - lit(lo)) || at_zero(v - lit(hi)),
        _ => at_zero(v),
    };
    let distance = |v: S| match k {
        Kink::Clamp(lo, hi) | Kink::ClampWith(lo, hi, ..) => {
            let (lo, hi) = (lit(lo), lit(hi));
            if (v - lo).abs() <= (v - hi).abs() {
                v - lo
            } else {
                v - hi
            }
        }
        _ => v,
    };
    let mut pin_applied = false;
    let grads: Vec<S> = x
        .iter()
        .zip(u.iter())
        .enumerate()
        .map(|(i, (&v, &g))| match pin {
            Some((e, value)) if e == i && pinned_kink(v) => {
                pin_applied = true;
                g * lit(value)
            }
            _ => g * derivative(v),
        })
        .collect();
    Expected {
        grads: vec![ArrayD::from_shape_vec(x.raw_dim(), grads).expect("same size")],
        sum_tolerance: None,
        op,
        shape: x.shape().to_vec(),
        distances: x.iter().map(|&v| distance(v).to_f64_exact()).collect(),
        selection: sel,
        overridden,
        hull,
        pin_applied,
    }
}

/// Sums `full` (of the broadcast shape) back to `shape`.
fn sum_to<S: Scalar>(full: &ArrayD<S>, shape: &[usize]) -> ArrayD<S> {
    let mut out = ArrayD::<S>::zeros(IxDyn(shape));
    let off = full.ndim() - shape.len();
    for (idx, &v) in full.indexed_iter() {
        let target: Vec<usize> = (0..shape.len())
            .map(|i| if shape[i] == 1 { 0 } else { idx[off + i] })
            .collect();
        out[target.as_slice()] += v;
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn ext_expected<S: Scalar>(
    max: bool,
    weight: Option<f64>,
    a: &ArrayD<S>,
    b: &ArrayD<S>,
    u: &ArrayD<S>,
    pol: &KinkPolicy,
    band: S,
    pin: Option<(usize, f64)>,
) -> Expected<S> {
    let lit = S::from_f64_lossy;
    let (zero, one) = (S::zero(), S::one());
    let w64 = weight.unwrap_or(pol.tie_weight);
    let w = lit(w64);
    let shape = u.shape().to_vec();
    let av = a.broadcast(IxDyn(&shape)).expect("broadcast checked at record time");
    let bv = b.broadcast(IxDyn(&shape)).expect("broadcast checked at record time");
    let equal = a.shape() == b.shape();
    let (mut ga, mut gb, mut distances) = (Vec::new(), Vec::new(), Vec::new());
    let mut pin_applied = false;
    for (i, ((&p, &q), &g)) in av.iter().zip(bv.iter()).zip(u.iter()).enumerate() {
        let tie = (p - q).abs() <= band;
        let wins = if max { p > q } else { q > p };
        let share = if tie {
            w
        } else if wins {
            one
        } else {
            zero
        };
        match pin {
            // A pin addresses the broadcast shape, as the ledger does.
            Some((e, value)) if e == i && tie => {
                pin_applied = true;
                ga.push(g * lit(value));
                gb.push(g * (one - lit(value)));
            }
            _ => {
                ga.push(g * share);
                gb.push(g * (one - share));
            }
        }
        distances.push((p - q).to_f64_exact());
    }
    let ga = ArrayD::from_shape_vec(IxDyn(&shape), ga).expect("same size");
    let gb = ArrayD::from_shape_vec(IxDyn(&shape), gb).expect("same size");
    Expected {
        grads: vec![sum_to(&ga, a.shape()), sum_to(&gb, b.shape())],
        sum_tolerance: (!equal).then_some(if S::NAME == "f32" { 1e-5 } else { 1e-13 }),
        op: if max { "maximum" } else { "minimum" },
        shape,
        distances,
        selection: Selection::TieWeight(w64),
        overridden: weight.is_some(),
        hull: Some((0.0, 1.0)),
        pin_applied,
    }
}

#[allow(clippy::too_many_arguments)]
fn reduce_expected<S: Scalar>(
    max: bool,
    axis: Option<usize>,
    keep: bool,
    rule: Option<TieRule>,
    x: &ArrayD<S>,
    y: &ArrayD<S>,
    u: &ArrayD<S>,
    pol: &KinkPolicy,
    band: S,
) -> Expected<S> {
    let r = rule.unwrap_or(pol.reduce_tie);
    // The gradient of one lane, and its gap (extremum to runner-up; the ledger's distance).
    let lane_grad = |lane: &[S], m: S, g: S| -> (Vec<S>, f64) {
        let tied: Vec<bool> = lane.iter().map(|&v| (v - m).abs() <= band).collect();
        let count = tied.iter().filter(|&&t| t).count();
        let mut out = vec![S::zero(); lane.len()];
        if count > 0 {
            match r {
                TieRule::Split | TieRule::All => {
                    let share = if r == TieRule::Split {
                        g / S::from_usize(count).expect("small")
                    } else {
                        g
                    };
                    for (o, &t) in out.iter_mut().zip(&tied) {
                        if t {
                            *o = share;
                        }
                    }
                }
                TieRule::First => out[tied.iter().position(|&t| t).expect("a tie")] = g,
                TieRule::Last => out[tied.iter().rposition(|&t| t).expect("a tie")] = g,
            }
        }
        let mut seen = false;
        let mut gap = f64::INFINITY;
        for &v in lane {
            if v == m && !seen {
                seen = true;
            } else {
                gap = gap.min((v - m).abs().to_f64_exact());
            }
        }
        (out, gap)
    };
    let mut gx = ArrayD::<S>::zeros(x.raw_dim());
    let mut distances = Vec::new();
    let name = match (axis, max) {
        (Some(_), true) => "max_axis",
        (Some(_), false) => "min_axis",
        (None, true) => "max_all",
        (None, false) => "min_all",
    };
    match axis {
        None => {
            let lane: Vec<S> = x.iter().copied().collect();
            let (g, gap) = lane_grad(&lane, y[[]], u[[]]);
            gx = ArrayD::from_shape_vec(x.raw_dim(), g).expect("same size");
            distances.push(gap);
        }
        Some(ax) => {
            let (yv, uv) = if keep {
                (y.index_axis(Axis(ax), 0), u.index_axis(Axis(ax), 0))
            } else {
                (y.view(), u.view())
            };
            // Lanes, extrema and upstream values, all in row-major order of the other axes.
            let lanes: Vec<Vec<S>> = x.lanes(Axis(ax)).into_iter().map(|l| l.to_vec()).collect();
            let ms: Vec<S> = yv.iter().copied().collect();
            let gs: Vec<S> = uv.iter().copied().collect();
            for (((mut out, lane), &m), &g) in gx.lanes_mut(Axis(ax)).into_iter().zip(&lanes).zip(&ms).zip(&gs) {
                let (lg, gap) = lane_grad(lane, m, g);
                out.iter_mut().zip(lg).for_each(|(o, v)| *o = v);
                distances.push(gap);
            }
        }
    }
    Expected {
        grads: vec![gx],
        sum_tolerance: None,
        op: name,
        shape: y.shape().to_vec(),
        distances,
        selection: Selection::Tie(r),
        overridden: rule.is_some(),
        hull: None,
        pin_applied: false,
    }
}

fn compare<S: Scalar>(what: &str, got: &ArrayD<S>, want: &ArrayD<S>, tolerance: Option<f64>, u: &ArrayD<S>) -> Check {
    if got.shape() != want.shape() {
        return Err(format!("{what}: shape {:?}, expected {:?}", got.shape(), want.shape()));
    }
    let scale = 1.0 + u.iter().map(|v| v.to_f64_exact().abs()).fold(0.0, f64::max) * u.len() as f64;
    for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
        let ok = match tolerance {
            None => same(g, w),
            Some(t) => same(g, w) || (g.to_f64_exact() - w.to_f64_exact()).abs() <= t * scale,
        };
        if !ok {
            return Err(format!(
                "{what}: element {i} is {:e}, expected {:e}\n  got      {got}\n  expected {want}\n  upstream {u}",
                g.to_f64_exact(),
                w.to_f64_exact()
            ));
        }
    }
    Ok(())
}

fn check_record(r: &KinkRecord, e: &Expected<impl Scalar>, tolerance: f64, solver_band: f64) -> Check {
    let (exact, near, within, indices, max_d) = classify(&e.distances, tolerance, solver_band);
    let indices_ok = r.kink_indices == indices;
    let fields = [
        ("op", r.op == e.op),
        ("shape", r.shape == e.shape),
        ("elements", r.elements == e.distances.len()),
        ("exact", r.exact == exact),
        ("near", r.near == near),
        ("within_solver_error", r.within_solver_error == within),
        ("kink_indices", indices_ok),
        ("max_distance", r.max_distance == max_d),
        ("selection", r.selection == e.selection),
        ("overridden", r.overridden == e.overridden),
        ("hull", r.hull == e.hull),
    ];
    if let Some((name, _)) = fields.iter().find(|(_, ok)| !ok) {
        return Err(format!(
            "ledger record field {name} is wrong: {r:?}\n  expected op {}, shape {:?}, {} elements, exact {exact}, near {near}, within {within}, indices {indices:?}, max distance {max_d}, selection {:?}, overridden {}, hull {:?}\n  distances {:?}",
            e.op,
            e.shape,
            e.distances.len(),
            e.selection,
            e.overridden,
            e.hull,
            e.distances
        ));
    }
    Ok(())
}

fn maybe_t<S: Scalar>(v: Var<'_, S>, transpose: bool) -> Var<'_, S> {
    if transpose { v.t() } else { v }
}

fn check_probe<S: Scalar>(p: &Probe, stats: &RefCell<Stats>) -> Check {
    let mut st = stats.borrow_mut();
    st.probes += 1;
    if S::NAME == "f32" {
        st.probes_f32 += 1;
    }
    let policy = p.policy.policy();
    let new_tape = || {
        if p.policy.on_tape {
            Tape::<S>::with_policy(policy.clone())
        } else {
            Ok(Tape::new())
        }
    };
    let tape = match new_tape() {
        Ok(t) => t,
        Err(e) => {
            bump(&mut st.probe_err, format!("policy: {}", kind(&e)));
            return Ok(());
        }
    };
    let x = tape.param(p.x.array());
    let y = matches!(p.op, ProbeOp::Ext { .. }).then(|| tape.param(p.y.array()));
    // The op's operands: the parameters or their transposes.
    let (xk, yk) = (maybe_t(x, p.transpose), y.map(|y| maybe_t(y, p.transpose)));
    let z = match p.op {
        ProbeOp::Unary(k) => apply_kink(xk, k),
        ProbeOp::Ext { max, weight } => apply_ext(xk, yk.expect("two operands"), max, weight),
        ProbeOp::Reduce { max, axis, keep, rule } => apply_reduce(xk, max, axis, keep, rule),
    };
    let z = match z {
        Ok(z) => z,
        Err(e) => {
            bump(&mut st.probe_err, format!("probed op: {}", kind(&e)));
            return Ok(());
        }
    };
    // The probed node is the newest one: the graph's first step reads it by default.
    let start: Vec<Var<'_, S>> = p.others.iter().map(|i| i.leaf(&tape)).chain([z]).collect();
    let built = match build(&tape, &start, &p.steps, p.finish) {
        Ok(b) => b,
        Err(e) => {
            bump(&mut st.probe_err, format!("graph: {}", kind(&e)));
            return Ok(());
        }
    };
    let mut options = BackwardOptions::<S>::default();
    if !p.policy.on_tape {
        options.policy = Some(policy.clone());
    }
    options.solver_band = p.solver_band;
    seed_options(p.finish, built.out, &mut options);
    let mut options_a = options.clone();
    if let Some((e, v)) = p.pin {
        options_a.element_selections.push(ElementSelection {
            node: z.id(),
            element: usize::from(e),
            value: v,
        });
    }
    let grads = match tape.backward(built.out, &options_a) {
        Ok(g) => g,
        Err(e) => {
            bump(&mut st.probe_err, format!("backward: {}", kind(&e)));
            return Ok(());
        }
    };
    check_ledger(grads.ledger(), tape.len(), &policy, p.solver_band)?;

    // The upstream gradient at the probed node: the same graph with the node's value as a leaf.
    let tape_b = new_tape().map_err(|e| format!("second tape: {e}"))?;
    let zb = tape_b.param(z.value());
    let start_b: Vec<Var<'_, S>> = p.others.iter().map(|i| i.leaf(&tape_b)).chain([zb]).collect();
    let built_b = build(&tape_b, &start_b, &p.steps, p.finish)
        .map_err(|e| format!("the graph failed on the second tape only: {e}"))?;
    let grads_b = tape_b
        .backward(built_b.out, &options)
        .map_err(|e| format!("backward failed on the second tape only: {e}"))?;
    check_ledger(grads_b.ledger(), tape_b.len(), &policy, p.solver_band)?;
    let u = grads_b.wrt(zb).map_err(|e| e.to_string())?.clone();

    let operands: Vec<Var<'_, S>> = std::iter::once(x).chain(y).collect();
    // Gradients with respect to the op's operands (transposed back when the op read transposes).
    let got: Vec<ArrayD<S>> = operands
        .iter()
        .map(|v| {
            grads.wrt(*v).map(|g| {
                if p.transpose {
                    g.clone().reversed_axes()
                } else {
                    g.clone()
                }
            })
        })
        .collect::<Result<_>>()
        .map_err(|e| e.to_string())?;
    let Some(record) = grads.ledger().record(z.id()) else {
        // No gradient reached the node: everything upstream of it is zero.
        if u.iter()
            .chain(got.iter().flat_map(|g| g.iter()))
            .any(|v| *v != S::zero())
        {
            return Err(format!(
                "no ledger record for the probed node, yet upstream {u} and gradients {got:?}"
            ));
        }
        st.probe_unreached += 1;
        return Ok(());
    };
    let band = S::from_f64_lossy(policy.tolerance.max(p.solver_band));
    let pin = p.pin.map(|(e, v)| (usize::from(e), v));
    let xv = xk.value();
    let (label, expected) = match p.op {
        ProbeOp::Unary(k) => (
            match k {
                Kink::Relu | Kink::ReluWith(_) => "relu",
                Kink::Leaky(_) | Kink::LeakyWith(..) => "leaky_relu",
                Kink::Abs | Kink::AbsWith(_) => "abs",
                Kink::Sign => "sign",
                Kink::Clamp(..) | Kink::ClampWith(..) => "clamp",
            },
            unary_expected(k, &xv, &u, &policy, band, pin),
        ),
        ProbeOp::Ext { max, weight } => {
            let yv = yk.expect("two operands").value();
            let label = if xv.shape() == yv.shape() {
                "maximum/minimum"
            } else {
                "maximum/minimum, broadcast"
            };
            (label, ext_expected(max, weight, &xv, &yv, &u, &policy, band, pin))
        }
        ProbeOp::Reduce { max, axis, keep, rule } => {
            let ax = axis.map(|c| reduce_axis(c, xv.ndim()));
            // max_all / min_all have no per-op tie rule.
            let rule = ax.and(rule);
            (
                if ax.is_some() { "max/min_axis" } else { "max/min_all" },
                reduce_expected(max, ax, keep, rule, &xv, &z.value(), &u, &policy, band),
            )
        }
    };
    for (i, (g, w)) in got.iter().zip(&expected.grads).enumerate() {
        compare(&format!("gradient of operand {i}"), g, w, expected.sum_tolerance, &u)?;
    }
    check_record(record, &expected, policy.tolerance, p.solver_band)?;
    bump(&mut st.probe_checked, label);
    st.probe_kink_elements += record.at_kink();
    if expected.pin_applied {
        st.probe_pins_applied += 1;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Strategies
// ------------------------------------------------------------------------------------------

fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![1 => Just(0usize), 3 => Just(1usize), 6 => 2usize..=4]
}

fn shape() -> BoxedStrategy<Vec<usize>> {
    prop_oneof![2 => Just(Vec::new()), 3 => vec(dim(), 1), 4 => vec(dim(), 2), 2 => vec(dim(), 3)].boxed()
}

/// The same shape, a broadcast-compatible variant of it, or another shape.
fn related(base: Vec<usize>) -> BoxedStrategy<Vec<usize>> {
    let n = base.len();
    let b = base.clone();
    prop_oneof![
        3 => Just(base),
        3 => (vec(prop::bool::weighted(0.4), n), 0..=n).prop_map(move |(ones, drop)| b
            .iter()
            .zip(ones)
            .skip(drop)
            .map(|(&d, one)| if one { 1 } else { d })
            .collect()),
        2 => shape(),
    ]
    .boxed()
}

fn grid() -> impl Strategy<Value = f64> {
    (-8i32..=8).prop_map(|k| f64::from(k) * GRID)
}

fn bad_value() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(1e30),
        Just(-1e30),
        Just(1e300),
        Just(-1e300),
        Just(f64::MAX),
        Just(1e-40),
        Just(-0.0),
        Just(f64::MIN_POSITIVE),
    ]
}

fn value(bad: bool) -> BoxedStrategy<f64> {
    if bad {
        prop_oneof![10 => grid(), 4 => -3.0f64..3.0, 3 => bad_value()].boxed()
    } else {
        prop_oneof![3 => grid(), 1 => -3.0f64..3.0].boxed()
    }
}

fn input(shape: Vec<usize>, values: BoxedStrategy<f64>, param: f64) -> BoxedStrategy<Input> {
    let n: usize = shape.iter().product();
    (vec(values, n), prop::bool::weighted(param))
        .prop_map(move |(values, param)| Input {
            shape: shape.clone(),
            values,
            param,
        })
        .boxed()
}

/// A selection in [0, 1] (ends and midpoint often), rarely outside it or NaN.
fn sel() -> BoxedStrategy<f64> {
    prop_oneof![
        9 => Just(0.0),
        6 => Just(0.5),
        9 => Just(1.0),
        6 => 0.0f64..=1.0,
        1 => prop_oneof![Just(-50.0), Just(2.0), Just(f64::NAN)],
    ]
    .boxed()
}

/// A selection in [-1, 1] (abs'(0)).
fn abs_sel() -> BoxedStrategy<f64> {
    prop_oneof![6 => sel(), 1 => Just(-1.0), 1 => -1.0f64..=1.0].boxed()
}

fn rule() -> impl Strategy<Value = TieRule> {
    prop_oneof![
        3 => Just(TieRule::Split),
        2 => Just(TieRule::First),
        2 => Just(TieRule::Last),
        1 => Just(TieRule::All),
    ]
}

fn alpha() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), Just(0.01), Just(0.2), Just(1.0), Just(3.0)]
}

fn bound() -> impl Strategy<Value = f64> {
    prop_oneof![20 => (-4i32..=4).prop_map(|k| f64::from(k) * GRID), 1 => Just(f64::NAN)]
}

fn kink() -> BoxedStrategy<Kink> {
    prop_oneof![
        3 => Just(Kink::Relu),
        1 => sel().prop_map(Kink::ReluWith),
        1 => alpha().prop_map(Kink::Leaky),
        1 => (alpha(), sel()).prop_map(|(a, t)| Kink::LeakyWith(a, a + t * (1.0 - a))),
        2 => Just(Kink::Abs),
        1 => abs_sel().prop_map(Kink::AbsWith),
        1 => Just(Kink::Sign),
        2 => (bound(), bound(), prop::bool::weighted(0.85))
            .prop_map(|(a, b, sorted)| if sorted && a > b { Kink::Clamp(b, a) } else { Kink::Clamp(a, b) }),
        1 => (bound(), bound(), sel(), sel()).prop_map(|(a, b, l, h)| Kink::ClampWith(a.min(b), a.max(b), l, h)),
    ]
    .boxed()
}

fn unary() -> impl Strategy<Value = Un> {
    prop_oneof![
        Just(Un::Exp),
        Just(Un::Log),
        Just(Un::Sqrt),
        Just(Un::Recip),
        (-2i32..=3).prop_map(Un::Powi),
        prop_oneof![Just(0.0), Just(0.5), Just(1.5), Just(2.0), Just(3.0), Just(-0.5)].prop_map(Un::Powf),
        Just(Un::Tanh),
        Just(Un::Sigmoid),
        Just(Un::Softplus),
        Just(Un::Neg),
        (grid(), grid()).prop_map(|(s, c)| Un::Affine(s, c)),
    ]
}

fn bin() -> impl Strategy<Value = Bin> {
    prop_oneof![Just(Bin::Add), Just(Bin::Sub), Just(Bin::Mul), Just(Bin::Div)]
}

/// An operand: usually the newest node.
fn node() -> BoxedStrategy<usize> {
    prop_oneof![3 => Just(0usize), 2 => 0usize..16].boxed()
}

fn strict() -> prop::bool::Weighted {
    prop::bool::weighted(0.08)
}

fn step() -> BoxedStrategy<Step> {
    prop_oneof![
        4 => (bin(), node(), node(), strict()).prop_map(|(op, a, b, strict)| Step::Bin { op, a, b, strict }),
        3 => (unary(), node()).prop_map(|(op, a)| Step::Un { op, a }),
        5 => (kink(), node()).prop_map(|(op, a)| Step::Kink { op, a }),
        3 => (any::<bool>(), prop::option::weighted(0.3, sel()), node(), node(), strict())
            .prop_map(|(max, weight, a, b, strict)| Step::Ext { max, weight, a, b, strict }),
        2 => (any::<bool>(), prop::option::weighted(0.8, axis_code()), any::<bool>(), prop::option::weighted(0.3, rule()), node())
            .prop_map(|(max, axis, keep, rule, a)| Step::Reduce { max, axis, keep, rule, a }),
        2 => (node(), vec(prop_oneof![9 => 0u8..6, 1 => Just(7u8)], 0..=3), any::<bool>(), prop::bool::weighted(0.3))
            .prop_map(|(a, axes, keep, mean)| Step::Sum { a, axes, keep, mean }),
        2 => (node(), prop_oneof![12 => 0u8..6, 1 => Just(6u8)]).prop_map(|(a, variant)| Step::Reshape { a, variant }),
        1 => (node(), 0u8..3, strict()).prop_map(|(a, lead, bad)| Step::Broadcast { a, lead, bad }),
        1 => (node(), any::<bool>()).prop_map(|(a, rotate)| Step::Permute { a, rotate }),
        1 => (node(), 0u8..4, 0u8..5, prop_oneof![12 => 0u8..5, 1 => Just(5u8)])
            .prop_map(|(a, axis, start, len)| Step::Slice { a, axis, start, len }),
        1 => (node(), node(), 0u8..4, strict()).prop_map(|(a, b, axis, strict)| Step::Concat { a, b, axis, strict }),
        2 => (node(), node(), 0u8..8, strict()).prop_map(|(a, b, n, strict)| Step::Matmul { a, b, n, strict }),
        1 => (node(), 0u8..3).prop_map(|(a, axis)| Step::LogSoftmax { a, axis }),
        1 => (node(), any::<u8>(), strict()).prop_map(|(a, salt, bad)| Step::CrossEntropy { a, salt, bad }),
        1 => (node(), node(), strict()).prop_map(|(a, b, strict)| Step::Mse { a, b, strict }),
        1 => prop_oneof![node().prop_map(|a| Step::Detach { a }), (node(), any::<u8>()).prop_map(|(like, salt)| Step::Const { like, salt })],
    ]
    .boxed()
}

/// A reduction axis code: usually a valid axis, rarely one past the rank.
fn axis_code() -> impl Strategy<Value = u8> {
    prop_oneof![12 => 0u8..3, 1 => Just(3u8)]
}

fn finish() -> impl Strategy<Value = Finish> {
    prop_oneof![
        10 => Just(Finish::Sum),
        2 => Just(Finish::Mean),
        6 => any::<u8>().prop_map(Finish::Seeded),
        1 => Just(Finish::NoSeed),
        1 => Just(Finish::WrongSeed),
    ]
}

/// A tolerance or solver band: usually none, sometimes on the grid (elements exactly at it
/// occur) or not representable in f32, rarely invalid.
fn band() -> impl Strategy<Value = f64> {
    prop_oneof![
        32 => Just(0.0),
        4 => Just(GRID),
        2 => Just(0.5),
        4 => Just(1e-3),
        1 => prop_oneof![Just(-1.0), Just(f64::NAN), Just(f64::INFINITY)],
    ]
}

fn policy_spec() -> impl Strategy<Value = PolicySpec> {
    (
        0..KinkPolicy::PRESETS.len(),
        prop::option::weighted(0.4, sel()),
        prop::option::weighted(0.3, sel()),
        prop::option::weighted(0.3, abs_sel()),
        prop::option::weighted(0.3, sel()),
        prop::option::weighted(0.3, (sel(), sel())),
        prop::option::weighted(0.3, rule()),
        band(),
        prop::bool::weighted(0.1),
        any::<bool>(),
    )
        .prop_map(
            |(preset, relu, leaky, abs, tie, clamp, reduce, tolerance, outside, on_tape)| PolicySpec {
                preset,
                relu,
                leaky,
                abs,
                tie,
                clamp,
                reduce,
                tolerance,
                outside,
                on_tape,
            },
        )
}

/// A flat element index: usually among the first few (where small arrays have kinks).
fn pin_element() -> impl Strategy<Value = u8> {
    prop_oneof![8 => 0u8..6, 1 => 0u8..64]
}

fn pin() -> impl Strategy<Value = Pin> {
    (node(), pin_element(), sel(), prop::bool::weighted(0.05)).prop_map(|(node, element, value, bogus)| Pin {
        node,
        element,
        value,
        bogus,
    })
}

fn graph_case() -> impl Strategy<Value = GraphCase> {
    (any::<bool>(), prop::bool::weighted(0.25), shape())
        .prop_flat_map(|(f32, bad, s0)| {
            let first = input(s0.clone(), value(bad), 0.9);
            let rest = vec(related(s0).prop_flat_map(move |s| input(s, value(bad), 0.7)), 0..=2);
            (
                Just(f32),
                first,
                rest,
                vec(step(), 1..=8),
                finish(),
                policy_spec(),
                prop::bool::weighted(0.2),
                band(),
                prop::option::weighted(0.15, pin()),
            )
        })
        .prop_map(
            |(f32, first, mut inputs, steps, finish, policy, anomaly, solver_band, pin)| {
                inputs.insert(0, first);
                GraphCase {
                    f32,
                    inputs,
                    steps,
                    finish,
                    policy,
                    anomaly,
                    solver_band,
                    pin,
                }
            },
        )
}

/// Probe values: mostly a coarse grid (zeros, ties, clamp bounds), sometimes values at or
/// near the 1e-3 tolerance, -0.0, NaN, or off the grid.
fn probe_value() -> BoxedStrategy<f64> {
    prop_oneof![
        14 => (-4i32..=4).prop_map(|k| f64::from(k) * GRID),
        1 => prop_oneof![Just(1e-3), Just(-1e-3), Just(5e-4), Just(2e-3), Just(-0.0), Just(f64::NAN), Just(0.3)],
    ]
    .boxed()
}

fn probe_op() -> impl Strategy<Value = ProbeOp> {
    prop_oneof![
        5 => kink().prop_map(ProbeOp::Unary),
        3 => (any::<bool>(), prop::option::weighted(0.3, sel())).prop_map(|(max, weight)| ProbeOp::Ext { max, weight }),
        2 => (any::<bool>(), prop::option::weighted(0.85, axis_code()), any::<bool>(), prop::option::weighted(0.4, rule()))
            .prop_map(|(max, axis, keep, rule)| ProbeOp::Reduce { max, axis, keep, rule }),
    ]
}

fn probe() -> impl Strategy<Value = Probe> {
    (any::<bool>(), shape())
        .prop_flat_map(|(f32, s0)| {
            let x = input(s0.clone(), probe_value(), 1.0);
            let y = related(s0.clone()).prop_flat_map(|s| input(s, probe_value(), 1.0));
            let others = vec(related(s0).prop_flat_map(|s| input(s, value(false), 0.7)), 0..=1);
            (
                Just(f32),
                probe_op(),
                x,
                y,
                others,
                vec(step(), 0..=5),
                prop_oneof![3 => Just(Finish::Sum), 2 => any::<u8>().prop_map(Finish::Seeded)],
                policy_spec(),
                prop_oneof![8 => Just(0.0), 1 => Just(GRID), 1 => Just(1e-3)],
                prop::option::weighted(0.4, (pin_element(), sel())),
                prop::bool::weighted(0.25),
            )
        })
        .prop_map(
            |(f32, op, x, y, others, steps, finish, policy, solver_band, pin, transpose)| Probe {
                f32,
                op,
                x,
                y,
                others,
                steps,
                finish,
                policy,
                solver_band,
                pin,
                transpose,
            },
        )
}

// ------------------------------------------------------------------------------------------
// Runners
// ------------------------------------------------------------------------------------------

fn run<T: fmt::Debug + Clone>(cases: u32, strategy: impl Strategy<Value = T>, check: impl Fn(&T) -> Check) {
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |case| guarded(|| check(&case)).map_err(TestCaseError::fail));
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, case)) => panic!("fuzz failure: {reason}\nminimal case: {case:#?}"),
        Err(TestError::Abort(reason)) => panic!("fuzz aborted: {reason}"),
    }
}

fn graph_check(stats: &RefCell<Stats>) -> impl Fn(&GraphCase) -> Check + '_ {
    move |c| {
        if c.f32 {
            check_graph::<f32>(c, stats)
        } else {
            check_graph::<f64>(c, stats)
        }
    }
}

fn probe_check(stats: &RefCell<Stats>) -> impl Fn(&Probe) -> Check + '_ {
    move |p| {
        if p.f32 {
            check_probe::<f32>(p, stats)
        } else {
            check_probe::<f64>(p, stats)
        }
    }
}

/// Found by this fuzz: `x.powi(0)` and `x.powf(0.0)` are the constant 1, but their backward
/// computed `g * 0 * x^-1 = 0 * inf = NaN` at `x == 0` (and wherever `1/x` overflows, f32
/// `x = 1e-40`). The derivative is 0 everywhere.
#[test]
fn regression_zero_power_has_a_zero_gradient_at_zero() {
    fn grads<S: Scalar>() -> Vec<f64> {
        let tape = Tape::<S>::new();
        let x = tape.param(ArrayD::from_shape_vec(IxDyn(&[2]), vec![S::zero(), S::one() + S::one()]).unwrap());
        let mut out = Vec::new();
        for y in [x.powi(0), x.powf(S::zero())] {
            let g = y.sum().backward().unwrap();
            out.extend(g.wrt(x).unwrap().iter().map(|v| v.to_f64_exact()));
        }
        out
    }
    for g in [grads::<f32>(), grads::<f64>()] {
        assert_eq!(g, vec![0.0; 4]);
    }
    let tape = Tape::<f32>::new();
    let x = tape.param(ArrayD::from_elem(IxDyn(&[]), 1e-40f32));
    assert_eq!(x.powi(0).backward().unwrap().wrt(x).unwrap()[[]], 0.0);
}

/// Found by this fuzz: the ledger record of `max_axis` / `min_axis` over an axis other than
/// the last two listed its tied lanes transposed (the reduced axis was swapped with the last
/// one instead of moved to the end). `kink_indices` are row-major flat indices of the output.
#[test]
fn regression_reduction_ledger_indices_are_row_major() {
    let tape = Tape::<f64>::new();
    let values = vec![1.0, 0.0, 2.0, 3.0, 4.0, 0.0, 5.0, 6.0];
    let x = tape.param(ArrayD::from_shape_vec(IxDyn(&[2, 2, 2]), values).unwrap());
    let y = x.min_axis(0, false);
    let g = y.sum().backward().unwrap();
    // The tied lane [0, 1] splits its unit between x[0,0,1] and x[1,0,1].
    let want = ArrayD::from_shape_vec(IxDyn(&[2, 2, 2]), vec![1.0, 0.5, 1.0, 1.0, 0.0, 0.5, 0.0, 0.0]).unwrap();
    assert_eq!(g.wrt(x).unwrap(), &want);
    let r = g.ledger().record(y.id()).unwrap();
    assert_eq!((r.exact, r.shape.as_slice()), (1, &[2usize, 2][..]));
    assert_eq!(r.kink_indices, vec![1]);
    assert_eq!(r.position(r.kink_indices[0]), vec![0, 1]);
}

/// Found by this fuzz: `gradcheck` differenced across the kink of a max/min reduction whose
/// lane holds its extremum more than once (every tied lane had the same region code, whatever
/// the tied elements). It must refuse.
#[test]
fn regression_gradcheck_refuses_at_lanes_with_repeated_extrema() {
    let x = ArrayD::from_shape_vec(IxDyn(&[2]), vec![0.0f64, 0.0]).unwrap();
    let r = gradcheck(
        |t, v| {
            t.try_concat(&[v[0], v[0]], 0)?
                .try_max_axis_with(0, false, TieRule::First)
        },
        &[x],
        &GradcheckOptions::default(),
    );
    assert!(matches!(r, Err(Error::KinkInFiniteDifference { .. })), "{r:?}");
    let x = ArrayD::from_shape_vec(IxDyn(&[3]), vec![0.0f64, 0.0, -1.0]).unwrap();
    let r = gradcheck(
        |_, v| v[0].try_max_axis_with(0, false, TieRule::First),
        &[x],
        &GradcheckOptions::default(),
    );
    assert!(matches!(r, Err(Error::KinkInFiniteDifference { .. })), "{r:?}");
}

#[test]
fn fuzz_random_graphs() {
    let stats = RefCell::new(Stats::default());
    run(64, graph_case(), graph_check(&stats));
    println!("{}", stats.borrow());
}

#[test]
fn fuzz_exact_selections_at_planted_kinks() {
    let stats = RefCell::new(Stats::default());
    run(64, probe(), probe_check(&stats));
    println!("{}", stats.borrow());
}

/// 100,000 cases of each property (or `CLARKE_FUZZ_CASES`), with a summary. Run in release
/// mode: `cargo test -p clarke-core --release --test integration fuzz:: -- --ignored --nocapture`.
#[test]
#[ignore = "long: 100,000 cases of each property; run in release mode"]
fn fuzz_100k() {
    let cases: u32 = std::env::var("CLARKE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let stats = RefCell::new(Stats::default());
    let start = Instant::now();
    run(cases, graph_case(), graph_check(&stats));
    let graphs = start.elapsed();
    let start = Instant::now();
    run(cases, probe(), probe_check(&stats));
    let probes = start.elapsed();
    println!("{}", stats.borrow());
    println!(
        "wall time: graphs {:.1} s, probes {:.1} s, total {:.1} s",
        graphs.as_secs_f64(),
        probes.as_secs_f64(),
        (graphs + probes).as_secs_f64()
    );
}
