//! Gradient descent through an LP layer whose solution map jumps: a limit cycle across the
//! line where the implicit function theorem's hypothesis fails, and what the check says.
//!
//! The outer problem (Bolte, Le, Pauwels, Silveti-Falls 2021, the "cycles" example):
//!
//! ```text
//! minimise over (x, y)   (x - s1)^2 + 4 (y - s2)^2
//! with s = (a, b) in argmax { (a + b) c(x, y) : a in [0, 3], b in [0, 5] },  c = -2x + y + 2
//! ```
//!
//! The inner LP `min -c (a + b)` over the box is a conic layer (four rows `G s <= h`, one
//! non-negative cone) whose cost is built on the tape from `(x, y)`, so the gradient flows
//! through the layer into `c` and from there into `(x, y)`. The solution is the vertex
//! `(3, 5)` above the line `c = 0` and `(0, 0)` below it: off the line `ds/d(x, y) = 0` and the
//! gradient is the explicit part `(2 (x - s1), 8 (y - s2))`. On the line every point of the
//! box is optimal, the Jacobian `M` of the residual map is singular, and the layer refuses to
//! differentiate.
//!
//! 1. The gradient at `(1, 1)` is `(-4, -32)`, at `(4, 0)` it is `(8, 0)`; at `(1, 0)`, on
//!    the line, the backward pass is refused. The run stops with an error otherwise.
//! 2. Gradient descent with the check off: with step 0.24 the iterates fall into a 4-cycle
//!    that jumps across the line twice per period, the loss alternating between two values;
//!    with step 0.2 they converge to `(3, 5)`. Then random starts for steps 0.2 to 0.245,
//!    classified (converged, cycle and its period) and compared with descent on the exact
//!    piecewise-constant solution map.
//! 3. The same descent with the check on (every step certified: the iterates never come near
//!    the line); a sweep of points at distance `10^-k` from the line along its normal, for two
//!    solver tolerances, showing the band where the check refuses (the solver's tolerance:
//!    there the solver returns a point of the optimal face, or a vertex whose duals are below
//!    the kink tolerance); and the gradient the least-squares derivative returns in that band
//!    with the check off: a number, silently, far from either side's gradient.
//!
//! `--plot PATH` draws both trajectories in the `(x, y)` plane with the line, the loss per
//! iteration, and `sigma_min(M)` along the sweep.
//!
//! ```text
//! cargo run --release --example lp_cycle -- [--step A] [--small-step A] [--x0 X] [--y0 Y]
//!     [--iterations N] [--starts K] [--plot PATH] [--quick]
//! ```
//!
//! Tables on stderr; the last line on stdout is one JSON object.

use std::time::Instant;

use clap::Parser;
use clarke::convex::cone::{
    Cone, ConeSolution, Cones, ConicBackwardReport, ConicLayerOptions, DerivativeOptions, SolverOptions, cone_program,
};
use clarke::core::{Error, Result, Tape};
use clarke::implicit::CheckOutcome;
use clarke::nn::plot::{Panel, save_png};
use ndarray::{Array1, Array2, arr1, arr2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(about = "Gradient descent through a degenerate LP layer: a limit cycle across the line c = 0")]
struct Args {
    /// Step size of the descent that cycles.
    #[arg(long, default_value_t = 0.24)]
    step: f64,
    /// Step size of the descent that converges (for contrast).
    #[arg(long, default_value_t = 0.2)]
    small_step: f64,
    /// Starting x.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    x0: f64,
    /// Starting y.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    y0: f64,
    /// Iterations of each descent.
    #[arg(long, default_value_t = 200)]
    iterations: usize,
    /// Random starts in [-10, 10]^2 per step size for the scan (0 skips it).
    #[arg(long, default_value_t = 40)]
    starts: usize,
    /// Save the trajectories in the (x, y) plane, the loss per iteration and the sweep as a
    /// PNG.
    #[arg(long)]
    plot: Option<String>,
    /// A short run for CI (40 checked steps, 4 random starts, one sweep).
    #[arg(long)]
    quick: bool,
}

/// Iterates repeating within this distance are a cycle (or a fixed point, period 1).
const PERIOD_TOL: f64 = 1e-6;
/// Periods looked for.
const MAX_PERIOD: usize = 12;
/// Iterations of each random-start run (the slowest rate, `|1 - 8 * 0.245| = 0.96`, needs
/// about 400 to settle within the tolerance).
const SCAN_ITERATIONS: usize = 400;

/// `c(x, y) = -2x + y + 2`: the LP maximises `(a + b) c`.
fn c_of(p: [f64; 2]) -> f64 {
    -2.0 * p[0] + p[1] + 2.0
}

/// The box `[0, 3] x [0, 5]` as `G s <= h`.
struct BoxLp {
    g: Array2<f64>,
    h: Array1<f64>,
    cones: Cones,
}

impl BoxLp {
    fn new() -> Result<Self> {
        Ok(BoxLp {
            g: arr2(&[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]),
            h: arr1(&[3.0, 5.0, 0.0, 0.0]),
            cones: Cones::new(vec![Cone::NonNeg(4)])?,
        })
    }
}

/// The layer's options: the hypothesis check on or off, and the solver's tolerance.
fn layer_options(check: bool, tolerance: f64) -> ConicLayerOptions {
    let opts = ConicLayerOptions::default().with_solver(SolverOptions::default().with_tolerance(tolerance));
    if check {
        opts
    } else {
        opts.with_derivative(DerivativeOptions::unchecked())
    }
}

/// One forward and backward pass at `(x, y)`.
struct Eval {
    loss: f64,
    /// The LP's solution `s = (a, b)` as returned by the solver.
    s: [f64; 2],
    /// The gradient with respect to `(x, y)`, or why the backward pass was refused.
    grad: std::result::Result<[f64; 2], Error>,
    /// The layer's report of the backward pass.
    report: Option<ConicBackwardReport>,
    /// The solver's result.
    solution: ConeSolution,
}

impl Eval {
    /// The explicit part of the gradient, `(2 (x - s1), 8 (y - s2))`; the rest went through
    /// the layer.
    fn explicit(&self, p: [f64; 2]) -> [f64; 2] {
        [2.0 * (p[0] - self.s[0]), 8.0 * (p[1] - self.s[1])]
    }

    fn outcome(&self) -> CheckOutcome {
        match &self.report {
            Some(r) if r.violated > 0 => CheckOutcome::Violated,
            Some(r) if r.warnings > 0 => CheckOutcome::Warning,
            Some(r) if r.certified > 0 => CheckOutcome::Certified,
            _ => CheckOutcome::NotChecked,
        }
    }
}

fn evaluate(lp_box: &BoxLp, p: [f64; 2], opts: &ConicLayerOptions) -> Result<Eval> {
    let tape = Tape::<f64>::new();
    let theta = tape.param(arr1(&p).into_dyn());
    let (x, y) = (theta.try_slice_axis(0, 0..1)?, theta.try_slice_axis(0, 1..2)?);
    // The LP's cost vector -c (1, 1), on the tape.
    let neg_c = x * 2.0 - y - 2.0;
    let cost = tape.try_concat(&[neg_c, neg_c], 0)?;
    let a = tape.constant(lp_box.g.clone().into_dyn());
    let b = tape.constant(lp_box.h.clone().into_dyn());
    let layer = cone_program(a, b, cost, &lp_box.cones, opts)?;
    let (s1, s2) = (layer.x.try_slice_axis(0, 0..1)?, layer.x.try_slice_axis(0, 1..2)?);
    let (d1, d2) = (x - s1, y - s2);
    let loss = (d1 * d1 + d2 * d2 * 4.0).sum();
    let grad = loss.backward().and_then(|g| {
        let g = g.wrt(theta)?;
        Ok([g[0], g[1]])
    });
    let sv = layer.x.value();
    Ok(Eval {
        loss: loss.scalar(),
        s: [sv[0], sv[1]],
        grad,
        report: layer.log.last(),
        solution: layer.solutions[0].clone(),
    })
}

/// A gradient-descent run.
struct Run {
    step: f64,
    /// Iterates, the start first.
    points: Vec<[f64; 2]>,
    /// Loss at each iterate where a gradient was taken.
    losses: Vec<f64>,
    /// The check's outcome at each step.
    outcomes: Vec<CheckOutcome>,
    /// Smallest `sigma_min(M)` at each step (when the check ran).
    sigmas: Vec<Option<f64>>,
    /// Why the run stopped early (a refused backward pass).
    stopped: Option<String>,
}

fn descend(lp_box: &BoxLp, start: [f64; 2], step: f64, iterations: usize, opts: &ConicLayerOptions) -> Result<Run> {
    let mut run = Run {
        step,
        points: vec![start],
        losses: Vec::with_capacity(iterations),
        outcomes: Vec::with_capacity(iterations),
        sigmas: Vec::with_capacity(iterations),
        stopped: None,
    };
    let mut p = start;
    for k in 0..iterations {
        let e = evaluate(lp_box, p, opts)?;
        run.losses.push(e.loss);
        run.outcomes.push(e.outcome());
        run.sigmas.push(e.report.as_ref().and_then(|r| r.min_sigma));
        match e.grad {
            Ok(g) => {
                p = [p[0] - step * g[0], p[1] - step * g[1]];
                run.points.push(p);
            }
            Err(err) => {
                run.stopped = Some(format!("step {k} at ({:.6}, {:.6}): {err}", p[0], p[1]));
                break;
            }
        }
    }
    Ok(run)
}

impl Run {
    /// Sign changes of `c` along the iterates (jumps across the line).
    fn crossings(&self) -> usize {
        crossings(&self.points)
    }

    fn last(&self) -> [f64; 2] {
        *self.points.last().expect("the start is always there")
    }
}

fn crossings(points: &[[f64; 2]]) -> usize {
    points
        .windows(2)
        .filter(|w| c_of(w[0]).signum() != c_of(w[1]).signum())
        .count()
}

/// The smallest period `p <= MAX_PERIOD` with the last `3p` iterates repeating within
/// `PERIOD_TOL`, and the largest repeat distance.
fn period(points: &[[f64; 2]]) -> Option<(usize, f64)> {
    (1..=MAX_PERIOD).find_map(|p| {
        if points.len() < 4 * p {
            return None;
        }
        let gap = (points.len() - 3 * p..points.len())
            .map(|i| dist(points[i], points[i - p]))
            .fold(0.0f64, f64::max);
        (gap <= PERIOD_TOL).then_some((p, gap))
    })
}

fn dist(a: [f64; 2], b: [f64; 2]) -> f64 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)).sqrt()
}

/// The exact solution map: `(3, 5)` above the line, `(0, 0)` below.
fn vertex(p: [f64; 2]) -> [f64; 2] {
    if c_of(p) > 0.0 { [3.0, 5.0] } else { [0.0, 0.0] }
}

/// The loss on the exact solution map.
fn exact_loss(p: [f64; 2]) -> f64 {
    let s = vertex(p);
    (p[0] - s[0]).powi(2) + 4.0 * (p[1] - s[1]).powi(2)
}

/// Gradient descent on the exact piecewise-constant solution map (zero Jacobian off the line).
fn exact_descent(start: [f64; 2], step: f64, iterations: usize) -> Vec<[f64; 2]> {
    let mut points = vec![start];
    let mut p = start;
    for _ in 0..iterations {
        let s = vertex(p);
        p = [p[0] - step * 2.0 * (p[0] - s[0]), p[1] - step * 8.0 * (p[1] - s[1])];
        points.push(p);
    }
    points
}

/// The exact cycle of descent on the exact solution map through the given sequence of
/// vertices: per coordinate `z <- r z + (1 - r) s` with `r = 1 - 2 step` (x) and
/// `1 - 8 step` (y), so the first point is the fixed point of the composition.
fn exact_cycle(vertices: &[[f64; 2]], step: f64) -> Vec<[f64; 2]> {
    let rates = [1.0 - 2.0 * step, 1.0 - 8.0 * step];
    let p = vertices.len() as i32;
    let mut first = [0.0; 2];
    for (d, &r) in rates.iter().enumerate() {
        let acc: f64 = vertices
            .iter()
            .enumerate()
            .map(|(i, v)| r.powi(p - 1 - i as i32) * (1.0 - r) * v[d])
            .sum();
        first[d] = acc / (1.0 - r.powi(p));
    }
    let mut out = vec![first];
    for v in &vertices[..vertices.len() - 1] {
        let z = *out.last().expect("non-empty");
        out.push([
            rates[0] * z[0] + (1.0 - rates[0]) * v[0],
            rates[1] * z[1] + (1.0 - rates[1]) * v[1],
        ]);
    }
    out
}

/// What a run ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// At `(3, 5)`.
    Converged,
    /// A cycle of this period.
    Cycle(usize),
    /// Anything else (a fixed point elsewhere, or not settled).
    Other,
}

fn ending(points: &[[f64; 2]]) -> Ending {
    match period(points) {
        Some((1, _)) if dist(*points.last().expect("non-empty"), [3.0, 5.0]) < 1e-5 => Ending::Converged,
        Some((p, _)) if p > 1 => Ending::Cycle(p),
        _ => Ending::Other,
    }
}

fn fmt_grad(g: &std::result::Result<[f64; 2], Error>) -> String {
    match g {
        Ok(g) => format!("({:+.6}, {:+.6})", g[0], g[1]),
        Err(Error::HypothesisViolated { .. }) => "refused".into(),
        Err(e) => format!("error: {e}"),
    }
}

/// One point of the sweep towards the line.
struct SweepRow {
    distance: f64,
    c: f64,
    refused: bool,
    sigma_min: Option<f64>,
    json: Value,
}

/// Points at distance `10^-k` from `base` (on the line) along the normal, on both sides, with
/// the check on and off, at one solver tolerance.
fn sweep(lp_box: &BoxLp, base: [f64; 2], tolerance: f64, k_max: i32) -> Result<Vec<SweepRow>> {
    let normal = [-2.0 / 5f64.sqrt(), 1.0 / 5f64.sqrt()];
    let (on_opts, off_opts) = (layer_options(true, tolerance), layer_options(false, tolerance));
    eprintln!(
        "\n  solver tolerance {tolerance:.0e}: points at distance 10^-k from (1, 0) along the normal (c = +-sqrt(5) 10^-k)"
    );
    eprintln!(
        "    side   k  c           s returned               ADMM  refinement  check on   sigma_min(M)  kinks  gradient, check off"
    );
    let mut rows = Vec::new();
    for k in 1..=k_max {
        let d = 10f64.powi(-k);
        for side in [1.0, -1.0] {
            let p = [base[0] + side * d * normal[0], base[1] + side * d * normal[1]];
            let side_name = if side > 0.0 { "c>0" } else { "c<0" };
            let on_eval = match evaluate(lp_box, p, &on_opts) {
                Ok(e) => e,
                Err(e) => {
                    // The solver did not reach the tolerance: nothing to differentiate.
                    eprintln!("    {side_name}  {k:>3}  {:+.3e}  {e}", c_of(p));
                    rows.push(SweepRow {
                        distance: d,
                        c: c_of(p),
                        refused: false,
                        sigma_min: None,
                        json: json!({"k": k, "distance": d, "c": c_of(p), "error": e.to_string()}),
                    });
                    continue;
                }
            };
            let off_grad = evaluate(lp_box, p, &off_opts).and_then(|e| e.grad);
            // The layer's report keeps the check of a refused sample too.
            let report = on_eval.report.as_ref().expect("a checked backward pass reports");
            let (sigma_min, kinks, outcome) = (report.min_sigma, report.kinks, on_eval.outcome());
            let refused = matches!(on_eval.grad, Err(Error::HypothesisViolated { .. }));
            let verdict = if refused {
                "refused".to_string()
            } else {
                outcome.to_string()
            };
            let refinement = match on_eval.solution.refinement.stopped {
                "converged" | "converged (at rounding level)" => "converged",
                r if r.contains("singular") => "M singular",
                r => r,
            };
            eprintln!(
                "    {side_name}  {k:>3}  {:+.3e}  ({:.9}, {:.9})  {:>5}  {:<10}  {:<9}  {:<12}  {:>5}  {}",
                c_of(p),
                on_eval.s[0] + 0.0,
                on_eval.s[1] + 0.0,
                on_eval.solution.iterations,
                refinement,
                verdict,
                sigma_min.map_or("-".into(), |s| format!("{s:.3e}")),
                kinks,
                fmt_grad(&off_grad)
            );
            rows.push(SweepRow {
                distance: d,
                c: c_of(p),
                refused,
                sigma_min,
                json: json!({
                    "k": k,
                    "distance": d,
                    "c": c_of(p),
                    "s": on_eval.s,
                    "admm_iterations": on_eval.solution.iterations,
                    "refinement": on_eval.solution.refinement.stopped,
                    "refused": refused,
                    "outcome": outcome.to_string(),
                    "sigma_min": sigma_min,
                    "kinks": kinks,
                    "gradient_check_off": off_grad.as_ref().ok(),
                }),
            });
        }
    }
    Ok(rows)
}

fn main() {
    if let Err(e) = run(&Args::parse()) {
        eprintln!("lp_cycle: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let t_all = Instant::now();
    let lp_box = BoxLp::new()?;
    let default_tol = SolverOptions::default().eps_abs;
    let (checked, unchecked) = (layer_options(true, default_tol), layer_options(false, default_tol));
    let iterations = args.iterations;
    let start = [args.x0, args.y0];

    // 1. The test values: off the line the gradient is the explicit part (ds/d(x, y) = 0),
    //    on the line the check refuses.
    let t = Instant::now();
    eprintln!("== 1. gradients through the LP layer (check on)");
    let mut t12 = Vec::new();
    for (p, want) in [([1.0, 1.0], [-4.0, -32.0]), ([4.0, 0.0], [8.0, 0.0])] {
        let e = evaluate(&lp_box, p, &checked)?;
        let g = match &e.grad {
            Ok(g) => *g,
            Err(err) => return Err(format!("the backward pass at {p:?} failed: {err}").into()),
        };
        let ex = e.explicit(p);
        eprintln!(
            "  ({:.0}, {:.0}): c = {:+.0}, s = ({:.6}, {:.6}), gradient {} (expected ({:+}, {:+}); through the layer ({:+.1e}, {:+.1e}); check {})",
            p[0],
            p[1],
            c_of(p),
            e.s[0],
            e.s[1],
            fmt_grad(&e.grad),
            want[0],
            want[1],
            g[0] - ex[0],
            g[1] - ex[1],
            e.outcome()
        );
        let err = (g[0] - want[0]).abs().max((g[1] - want[1]).abs());
        if err > 1e-6 {
            return Err(format!("the gradient at {p:?} is {g:?}, expected {want:?} (error {err:.3e})").into());
        }
        t12.push(json!({"point": p, "gradient": g, "expected": want, "error": err}));
    }
    let on_line = [1.0, 0.0];
    let e = evaluate(&lp_box, on_line, &checked)?;
    let refusal = match &e.grad {
        Err(Error::HypothesisViolated { detail, .. }) => detail.clone(),
        Err(err) => return Err(format!("expected the check to refuse on the line, got another error: {err}").into()),
        Ok(g) => return Err(format!("expected the check to refuse on the line, got the gradient {g:?}").into()),
    };
    eprintln!(
        "  (1, 0): c = 0, the solver returns s = ({:.6}, {:.6}), a point inside the optimal face (refinement: {}); the backward pass is refused:\n    {refusal}",
        e.s[0], e.s[1], e.solution.refinement.stopped
    );
    let time_t12 = t.elapsed().as_secs_f64();

    // 2. Gradient descent with the check off.
    let t = Instant::now();
    eprintln!(
        "\n== 2. gradient descent with the check off, from ({}, {}), {iterations} iterations",
        start[0], start[1]
    );
    let big = descend(&lp_box, start, args.step, iterations, &unchecked)?;
    let small = descend(&lp_box, start, args.small_step, iterations, &unchecked)?;
    let time_gd_off = t.elapsed().as_secs_f64();
    let mut summaries = Vec::new();
    let mut cycle_json = json!(null);
    let mut cycle_points: Vec<[f64; 2]> = Vec::new();
    for r in [&big, &small] {
        let last = r.last();
        let n = r.losses.len();
        let tail = &r.losses[n.saturating_sub(20)..];
        let (lo, hi) = tail
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        eprintln!(
            "  step {}: last iterate ({:.6}, {:.6}), {} crossings of c = 0, loss over the last {} iterations in [{lo:.4}, {hi:.4}]",
            r.step,
            last[0],
            last[1],
            r.crossings(),
            tail.len()
        );
        let found = period(&r.points);
        match found {
            Some((1, gap)) => eprintln!(
                "    converged: |z_N - z_(N-1)| = {gap:.2e}, distance to (3, 5) = {:.2e}, final loss {:.3e}",
                dist(last, [3.0, 5.0]),
                tail.last().copied().unwrap_or(f64::NAN)
            ),
            Some((p, gap)) => {
                let pts = &r.points[r.points.len() - p..];
                // Start the printout at the first point above the line after one below it.
                let shift = (0..p)
                    .find(|&i| c_of(pts[i]) > 0.0 && c_of(pts[(i + p - 1) % p]) <= 0.0)
                    .unwrap_or(0);
                let cycle: Vec<[f64; 2]> = (0..p).map(|i| pts[(i + shift) % p]).collect();
                let exact = exact_cycle(&cycle.iter().map(|&z| vertex(z)).collect::<Vec<_>>(), r.step);
                let exact_gap = cycle
                    .iter()
                    .zip(&exact)
                    .map(|(a, b)| dist(*a, *b))
                    .fold(0.0f64, f64::max);
                eprintln!(
                    "    a {p}-cycle (repeats within {gap:.1e}), {} crossings per period; its points, c, the LP's vertex and the loss:",
                    crossings(&[cycle.clone(), vec![cycle[0]]].concat())
                );
                for z in &cycle {
                    let s = vertex(*z);
                    eprintln!(
                        "      ({:+.4}, {:+.4})  c = {:+.4}  s = ({}, {})  f = {:.2}",
                        z[0],
                        z[1],
                        c_of(*z),
                        s[0],
                        s[1],
                        exact_loss(*z)
                    );
                }
                eprintln!("    distance to the exact cycle of descent on the exact solution map: {exact_gap:.1e}");
                if r.step == args.step {
                    cycle_points = cycle.clone();
                    cycle_json = json!({
                        "period": p,
                        "repeat_gap": gap,
                        "points": cycle,
                        "c": cycle.iter().map(|z| c_of(*z)).collect::<Vec<_>>(),
                        "loss": cycle.iter().map(|z| exact_loss(*z)).collect::<Vec<_>>(),
                        "gap_to_exact_cycle": exact_gap,
                    });
                }
            }
            None => eprintln!("    no period <= {MAX_PERIOD} within {PERIOD_TOL:.0e}: not settled"),
        }
        summaries.push(json!({
            "step": r.step,
            "final_point": last,
            "final_loss": r.losses.last(),
            "tail_loss_range": [lo, hi],
            "crossings": r.crossings(),
            "period": found.map(|p| p.0),
        }));
    }

    // 2b. Random starts: how often each step size cycles, through the layer and on the exact
    //     solution map.
    let t = Instant::now();
    let starts = if args.quick { args.starts.min(4) } else { args.starts };
    let mut scan = Vec::new();
    if starts > 0 {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let points: Vec<[f64; 2]> = (0..starts)
            .map(|_| [rng.random_range(-10.0..10.0), rng.random_range(-10.0..10.0)])
            .collect();
        eprintln!(
            "\n  {starts} random starts in [-10, 10]^2, {SCAN_ITERATIONS} iterations each (layer / exact solution map):"
        );
        eprintln!("    step   to (3, 5)   cycles      other     period: runs          agree");
        for step in [0.2, 0.23, 0.24, 0.245] {
            let endings: Vec<(Ending, Ending)> = points
                .par_iter()
                .map(|&p| {
                    let run = descend(&lp_box, p, step, SCAN_ITERATIONS, &unchecked)?;
                    Ok((ending(&run.points), ending(&exact_descent(p, step, SCAN_ITERATIONS))))
                })
                .collect::<Result<Vec<_>>>()?;
            let count = |which: usize, f: &dyn Fn(Ending) -> bool| {
                endings.iter().filter(|e| f(if which == 0 { e.0 } else { e.1 })).count()
            };
            let conv = |w| count(w, &|e| e == Ending::Converged);
            let cyc = |w| count(w, &|e| matches!(e, Ending::Cycle(_)));
            let other = |w| count(w, &|e| e == Ending::Other);
            // Cycles through the layer by period: (period, runs).
            let mut periods: Vec<(usize, usize)> = Vec::new();
            for e in &endings {
                if let Ending::Cycle(p) = e.0 {
                    match periods.iter_mut().find(|(q, _)| *q == p) {
                        Some(entry) => entry.1 += 1,
                        None => periods.push((p, 1)),
                    }
                }
            }
            periods.sort_unstable();
            let agree = endings.iter().filter(|e| e.0 == e.1).count();
            eprintln!(
                "    {step:<5}  {:>3} / {:<3}  {:>3} / {:<3}  {:>3} / {:<3}  {:<20}  {agree}/{starts}",
                conv(0),
                conv(1),
                cyc(0),
                cyc(1),
                other(0),
                other(1),
                periods
                    .iter()
                    .map(|(p, n)| format!("{p}: {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            scan.push(json!({
                "step": step,
                "converged": conv(0),
                "cycles": cyc(0),
                "other": other(0),
                "periods": periods.iter().map(|(p, n)| json!({"period": p, "runs": n})).collect::<Vec<_>>(),
                "exact_map": {"converged": conv(1), "cycles": cyc(1), "other": other(1)},
                "agree_with_exact_map": agree,
            }));
        }
    }
    let time_scan = t.elapsed().as_secs_f64();

    // 3a. The same descent with the check on.
    let t = Instant::now();
    let checked_iterations = if args.quick { iterations.min(40) } else { iterations };
    eprintln!("\n== 3. the check on");
    let on = descend(&lp_box, start, args.step, checked_iterations, &checked)?;
    let time_gd_on = t.elapsed().as_secs_f64();
    let count = |o: CheckOutcome| on.outcomes.iter().filter(|&&x| x == o).count();
    let same = on
        .points
        .iter()
        .zip(&big.points)
        .map(|(a, b)| dist(*a, *b))
        .fold(0.0f64, f64::max);
    eprintln!(
        "  descent with step {}, {} iterations; the first steps:",
        args.step,
        on.losses.len()
    );
    eprintln!("       k  (x, y)                c           check      sigma_min(M)");
    for k in 0..on.losses.len().min(8) {
        let z = on.points[k];
        eprintln!(
            "    {k:>4}  ({:+.5}, {:+.5})  {:+.3e}  {:<9}  {}",
            z[0],
            z[1],
            c_of(z),
            on.outcomes[k].to_string(),
            on.sigmas[k].map_or("-".into(), |s| format!("{s:.3e}"))
        );
    }
    let min_abs_c = on.points[..on.losses.len()]
        .iter()
        .map(|z| c_of(*z).abs())
        .fold(f64::INFINITY, f64::min);
    eprintln!(
        "  all {} steps: {} certified, {} warnings, {} violated; smallest |c| on the path {min_abs_c:.3e}; the iterates are those of the unchecked run (max difference {same:.1e}){}",
        on.losses.len(),
        count(CheckOutcome::Certified),
        count(CheckOutcome::Warning),
        count(CheckOutcome::Violated),
        on.stopped.as_ref().map_or(String::new(), |s| format!("; stopped: {s}"))
    );

    // 3b. The sweep towards the line, at the default tolerance and a tighter one.
    let t = Instant::now();
    let tolerances: Vec<f64> = if args.quick {
        vec![default_tol]
    } else {
        vec![default_tol, 1e-9]
    };
    let mut sweeps = Vec::new();
    for &tol in &tolerances {
        let rows = sweep(&lp_box, on_line, tol, 12)?;
        let first = rows.iter().find(|r| r.refused).map(|r| r.distance);
        let band_closed = first.is_some_and(|d| rows.iter().filter(|r| r.distance <= d).all(|r| r.refused));
        match first {
            Some(d) => eprintln!(
                "    the check refuses from distance {d:.0e} (|c| = {:.1e}) down to the line{}",
                d * 5f64.sqrt(),
                if band_closed {
                    ", at every point closer"
                } else {
                    ", not at every point closer"
                }
            ),
            None => eprintln!("    the check refuses nowhere in the sweep"),
        }
        sweeps.push((tol, rows, first));
    }
    let time_sweep = t.elapsed().as_secs_f64();

    // 3c. On the line with the check off: a number nothing justifies.
    let off_line = evaluate(&lp_box, on_line, &unchecked)?;
    let silent = match &off_line.grad {
        Ok(g) => *g,
        Err(e) => return Err(format!("the unchecked backward pass on the line failed: {e}").into()),
    };
    let ex = off_line.explicit(on_line);
    eprintln!(
        "\n  on the line at (1, 0), check off: s = ({:.6}, {:.6}), gradient ({:+.6}, {:+.6}), of which ({:+.1e}, {:+.1e}) through the layer\n  (the minimum-norm least-squares solution of the singular adjoint system; check: {}). With the check on: refused.",
        off_line.s[0],
        off_line.s[1],
        silent[0],
        silent[1],
        silent[0] - ex[0],
        silent[1] - ex[1],
        off_line.outcome()
    );
    eprintln!("  The gradient on either side of the line is (-4, -40) (c > 0) or (+2, 0) (c < 0).");

    if let Some(path) = &args.plot {
        plot(path, &big, &small, &cycle_points, &sweeps)?;
        eprintln!("\nplot written to {path}");
    }

    let default_first = sweeps[0].2;
    let summary = json!({
        "example": "lp_cycle",
        "quick": args.quick,
        "start": start,
        "iterations": iterations,
        "t12": {
            "gradients": t12,
            "refused_on_line": true,
            "refusal": refusal,
        },
        "check_off": {
            "large_step": summaries[0],
            "small_step": summaries[1],
            "cycle": cycle_json,
            "crossings": big.crossings(),
            "final_loss_large_step": big.losses.last(),
            "final_loss_small_step": small.losses.last(),
            "random_starts": {"starts": starts, "iterations": SCAN_ITERATIONS, "by_step": scan},
        },
        "check_on": {
            "iterations": on.losses.len(),
            "certified": count(CheckOutcome::Certified),
            "warnings": count(CheckOutcome::Warning),
            "violated": count(CheckOutcome::Violated),
            "max_difference_to_check_off": same,
        },
        "sweep": {
            "first_violation_distance": default_first,
            "by_tolerance": sweeps.iter().map(|(tol, rows, first)| json!({
                "solver_tolerance": tol,
                "first_violation_distance": first,
                "points": rows.iter().map(|r| r.json.clone()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        },
        "on_line_check_off": {
            "s": off_line.s,
            "gradient": silent,
            "through_layer": [silent[0] - ex[0], silent[1] - ex[1]],
        },
        "seconds": {
            "t12": time_t12,
            "descent_check_off": time_gd_off,
            "random_starts": time_scan,
            "descent_check_on": time_gd_on,
            "sweep": time_sweep,
            "total": t_all.elapsed().as_secs_f64(),
        },
    });
    println!("{summary}");
    Ok(())
}

type Sweep = (f64, Vec<SweepRow>, Option<f64>);

fn plot(path: &str, big: &Run, small: &Run, cycle: &[[f64; 2]], sweeps: &[Sweep]) -> std::io::Result<()> {
    // The line c = 0 (y = 2x - 2), drawn a little beyond the iterates so that the legend sits
    // in an empty corner.
    let line: Vec<(f64, f64)> = [-1.0, 6.0].iter().map(|&x| (x, 2.0 * x - 2.0)).collect();
    let xy = |r: &Run| r.points.iter().map(|p| (p[0], p[1])).collect::<Vec<_>>();
    let loss = |r: &Run| {
        r.losses
            .iter()
            .enumerate()
            .map(|(k, f)| (k as f64, *f))
            .collect::<Vec<_>>()
    };
    let mut plane = Panel::new("descent through the LP layer (line c = -2x + y + 2 = 0)")
        .labels("x", "y")
        .line_points(format!("step {}", big.step), xy(big))
        .line_points(format!("step {}", small.step), xy(small));
    if !cycle.is_empty() {
        plane = plane.points(
            format!("{}-cycle", cycle.len()),
            cycle.iter().map(|p| (p[0], p[1])).collect(),
        );
    }
    plane = plane.line("c = 0", line);
    let mut sigma = Panel::new("sigma_min(M) approaching the line (c > 0 side)")
        .labels("k (distance 10^-k from the line)", "log10 sigma_min(M)");
    for (tol, rows, _) in sweeps {
        let pts = rows
            .iter()
            .filter(|r| r.c > 0.0)
            .filter_map(|r| r.sigma_min.map(|s| (-r.distance.log10(), s.max(1e-300).log10())))
            .collect();
        sigma = sigma.line_points(format!("solver tolerance {tol:.0e}"), pts);
    }
    let panels = [
        plane,
        Panel::new("loss per iteration")
            .labels("iteration", "(x - s1)^2 + 4 (y - s2)^2")
            .line(format!("step {}", big.step), loss(big))
            .line(format!("step {}", small.step), loss(small)),
        sigma,
    ];
    save_png(path, &panels)
}
