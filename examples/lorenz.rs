//! Optimising a quadratic two ways: what implicit differentiation does when its hypothesis is
//! dropped.
//!
//! With the Lorenz field `L(u) = (10 (y - x), x (28 - z) - y, x y - 8/3 z)`:
//! - explicit: maximise `u^T L(u)` (a quadratic form, indefinite: gradient ascent diverges);
//! - implicit: maximise `u^T s` with `s` in `argmin ||s - L(u)||^4`, the same problem. The inner
//!   optimality condition `4 ||s - L||^2 (s - L) = 0` has Jacobian exactly 0 at its solution:
//!   the implicit function theorem's hypothesis fails. clarke's check reports it violated and
//!   the default refuses to differentiate. Only the opt-in least-squares mode answers, with the
//!   pseudo-inverse of 0 (that is 0): the "gradient" becomes `L(u)`, and gradient ascent turns
//!   into the explicit Euler scheme of the Lorenz system: bounded, chaotic, not increasing the
//!   objective.
//!
//! ```text
//! cargo run --release --example lorenz -- [--steps N] [--step-size A] [--plot PATH] [--quick]
//! ```
//!
//! Progress on stderr; the last line on stdout is one JSON object.

use clap::Parser;
use clarke::core::{Error, Result, Tape, Var};
use clarke::implicit::{AdjointSolver, CheckOutcome, GradientMode, ImplicitLayer, ImplicitOptions};
use clarke::nn::plot::{Panel, save_png};
use ndarray::{Array1, ArrayD, arr1};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "Gradient ascent on u^T L(u), explicitly and through a degenerate implicit layer")]
struct Args {
    /// Iterations of the implicit (least-squares) ascent.
    #[arg(long, default_value_t = 20000)]
    steps: usize,
    /// Iterations of the explicit ascent (it diverges; stopped early if it overflows).
    #[arg(long, default_value_t = 200)]
    explicit_steps: usize,
    /// Step size of both ascents.
    #[arg(long, default_value_t = 0.005)]
    step_size: f64,
    /// Save the two trajectories (x-z projection) and the objective as a PNG.
    #[arg(long)]
    plot: Option<String>,
    /// A short run for CI (2,000 implicit steps).
    #[arg(long)]
    quick: bool,
}

/// The Lorenz vector field (sigma = 10, rho = 28, beta = 8/3) on the tape.
fn lorenz<'s>(u: Var<'s, f64>) -> Var<'s, f64> {
    let (x, y, z) = (u.slice_axis(0, 0..1), u.slice_axis(0, 1..2), u.slice_axis(0, 2..3));
    let l1 = (y - x) * 10.0;
    let l2 = x * (z * -1.0 + 28.0) - y;
    let l3 = x * y - z * (8.0 / 3.0);
    u.tape().concat(&[l1, l2, l3], 0)
}

/// The inner problem `s in argmin ||s - L(u)||^4` as a root: `4 ||s - L||^2 (s - L) = 0`.
fn inner<'s>(s: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    let d = s - lorenz(th[0]);
    Ok(d * (d * d).sum() * 4.0)
}

/// The objective and its gradient, explicitly.
fn explicit_step(u: &Array1<f64>) -> Result<(f64, Array1<f64>)> {
    let tape = Tape::<f64>::new();
    let uv = tape.param(u.clone().into_dyn());
    let objective = (uv * lorenz(uv)).sum();
    let g = objective.backward()?;
    Ok((objective.scalar(), g.wrt(uv)?.iter().copied().collect()))
}

/// The objective `u^T s*` and its gradient through the implicit layer. The inner solve is
/// exact (it starts at `s = L(u)`), which is exactly where the hypothesis fails.
fn implicit_step(layer: &ImplicitLayer<f64>, u: &Array1<f64>) -> Result<(f64, Array1<f64>)> {
    let tape = Tape::<f64>::new();
    let uv = tape.param(u.clone().into_dyn());
    let s0: ArrayD<f64> = lorenz(tape.constant(u.clone().into_dyn())).value();
    let s = layer.apply(&s0, &[uv])?.z;
    let objective = (uv * s).sum();
    let g = objective.backward()?;
    Ok((objective.scalar(), g.wrt(uv)?.iter().copied().collect()))
}

fn main() {
    if let Err(e) = run(&Args::parse()) {
        eprintln!("lorenz: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let steps = if args.quick { 2000 } else { args.steps };
    let alpha = args.step_size;
    let u0 = arr1(&[1.0, 1.0, 1.0]);

    // 1. Explicit: gradient ascent on the indefinite quadratic diverges.
    let mut u = u0.clone();
    let mut explicit_path = vec![u.clone()];
    let mut explicit_objective = explicit_step(&u)?.0;
    for _ in 0..args.explicit_steps {
        let (f, g) = explicit_step(&u)?;
        explicit_objective = f;
        let next = &u + &(g * alpha);
        if !next.iter().all(|v| v.is_finite()) {
            break;
        }
        u = next;
        explicit_path.push(u.clone());
    }
    let explicit_norm = u.dot(&u).sqrt();
    eprintln!(
        "explicit ascent: {} steps of {alpha}: ||u|| = {explicit_norm:.3e}, u^T L(u) = {explicit_objective:.3e}",
        explicit_path.len() - 1
    );

    // 2. Implicit with the default options: the check sees J_F = 0 and refuses.
    let default_layer = ImplicitLayer::root(inner, ImplicitOptions::default().with_name("argmin ||s - L(u)||^4"))?;
    let refused = implicit_step(&default_layer, &u0);
    let refusal = match &refused {
        Err(Error::HypothesisViolated { detail, .. }) => detail.clone(),
        Err(e) => return Err(format!("expected the check to refuse, got another error: {e}").into()),
        Ok(_) => return Err("expected the check to refuse the degenerate inner problem".into()),
    };
    let default_check = default_layer
        .reports()
        .last()
        .map(|r| r.check.outcome)
        .unwrap_or(CheckOutcome::Violated);
    eprintln!("implicit, default options: refused ({refusal})");

    // A dense adjoint with the check off refuses too (the system is singular).
    let mut unchecked = ImplicitOptions::default().with_mode(GradientMode::Implicit(AdjointSolver::Dense));
    unchecked.check.enabled = false;
    let dense_error = implicit_step(&ImplicitLayer::root(inner, unchecked)?, &u0)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    eprintln!("implicit, check off, dense adjoint: {dense_error}");

    // 3. Implicit, least squares ignoring the hypothesis: the Euler scheme of the Lorenz system.
    let ls_layer = ImplicitLayer::root(
        inner,
        ImplicitOptions::default()
            .with_name("argmin ||s - L(u)||^4")
            .with_mode(GradientMode::LeastSquaresNoHypothesis),
    )?;
    let mut u = u0.clone();
    let mut implicit_path = vec![u.clone()];
    let mut objectives = Vec::with_capacity(steps);
    let (mut max_abs, mut euler_gap) = (0.0f64, 0.0f64);
    for k in 0..steps {
        let (f, g) = implicit_step(&ls_layer, &u)?;
        objectives.push(f);
        // The spurious gradient is L(u): compare with the field itself.
        let field = lorenz_field(&u);
        euler_gap = euler_gap.max((&g - &field).iter().fold(0.0f64, |m, v| m.max(v.abs())));
        u = &u + &(g * alpha);
        max_abs = max_abs.max(u.iter().fold(0.0f64, |m, v| m.max(v.abs())));
        implicit_path.push(u.clone());
        if (k + 1) % (steps / 5).max(1) == 0 {
            eprintln!("implicit (least squares) step {:>6}: u = {u:.3}, u^T s = {f:.2}", k + 1);
        }
    }
    let report = ls_layer.reports().last().expect("one report per backward");
    let ls_check = report.check.outcome;
    eprintln!("last least-squares report:\n{report}");
    let first = objectives.first().copied().unwrap_or(f64::NAN);
    let last = objectives.last().copied().unwrap_or(f64::NAN);
    let increased_steps = objectives.windows(2).filter(|w| w[1] > w[0]).count();

    if let Some(path) = &args.plot {
        let norms = |p: &[Array1<f64>]| {
            p.iter()
                .enumerate()
                .map(|(k, u)| (k as f64, u.dot(u).sqrt()))
                .collect::<Vec<_>>()
        };
        let xz = |p: &[Array1<f64>]| p.iter().map(|u| (u[0], u[2])).collect::<Vec<_>>();
        let panels = [
            Panel::new("implicit ascent, least squares: Euler scheme of Lorenz")
                .labels("x", "z")
                .line("u_k (x, z)", xz(&implicit_path)),
            Panel::new("norm of the iterates")
                .labels("step", "||u_k||")
                .log_y()
                .line("explicit ascent (diverges)", norms(&explicit_path))
                .line(
                    "implicit, least squares (bounded)",
                    norms(&implicit_path[..implicit_path.len().min(2000)]),
                ),
            Panel::new("objective u^T s along the implicit ascent")
                .labels("step", "u^T L(u)")
                .line(
                    "objective",
                    objectives.iter().enumerate().map(|(k, f)| (k as f64, *f)).collect(),
                ),
        ];
        save_png(path, &panels)?;
        eprintln!("plot written to {path}");
    }
    let summary = json!({
        "example": "lorenz",
        "step_size": alpha,
        "explicit": {
            "steps": explicit_path.len() - 1,
            "final_norm": explicit_norm,
            "final_objective": explicit_objective,
        },
        "implicit_default": {
            "check": default_check.to_string(),
            "refused": refused.is_err(),
            "dense_adjoint_with_check_off": dense_error,
        },
        "implicit_least_squares": {
            "check": ls_check.to_string(),
            "steps": steps,
            "max_abs_coordinate": max_abs,
            "objective_first": first,
            "objective_last": last,
            "steps_where_objective_increased": increased_steps,
            "max_gap_between_gradient_and_lorenz_field": euler_gap,
            "final_u": u.to_vec(),
        },
    });
    println!("{summary}");
    Ok(())
}

/// `L(u)` on plain arrays.
fn lorenz_field(u: &Array1<f64>) -> Array1<f64> {
    let (x, y, z) = (u[0], u[1], u[2]);
    arr1(&[10.0 * (y - x), x * (28.0 - z) - y, x * y - 8.0 / 3.0 * z])
}
