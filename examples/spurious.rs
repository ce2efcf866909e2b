//! Programs that compute relu or the identity, and what backpropagation returns for them at
//! the kink, for several choices of relu'(0).
//!
//! `relu2(t) = relu(-t) + t` is relu as a function, `zero(t) = relu2(t) - relu(t)` is the zero
//! function, `t - zero(t)` and `relu(t) - relu(-t)` are the identity; yet at `t = 0` AD
//! returns `1 - s`, `1 - 2s`, `2s`, `2s` for `relu'(0) = s`: an element of a conservative
//! Jacobian of the *program*, not a derivative of the *function*. Away from 0 every program
//! gets the true derivative. Also the precision-dependent kink of `relu((a + c) - a)` with
//! `a = 1e8`, `c = 1`: exactly at the kink in f32, off it in f64.
//!
//! ```text
//! cargo run --release --example spurious -- [--plot PATH] [--quick]
//! ```
//!
//! A table on stderr; the last line on stdout is one JSON object with every value.

use clap::Parser;
use clarke::core::{BackwardOptions, KinkPolicy, Result, Scalar, Tape, Var};
use clarke::nn::plot::{Panel, save_png};
use ndarray::arr0;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "What AD returns at relu's kink for programs equal to relu or the identity")]
struct Args {
    /// Save AD's output at 0 against relu'(0) for every program as a PNG.
    #[arg(long)]
    plot: Option<String>,
    /// Accepted for uniformity with the other examples (this one is instant).
    #[arg(long)]
    quick: bool,
}

/// A program, the function it computes, and the derivative of that function away from 0.
struct Program {
    name: &'static str,
    function: &'static str,
    build: for<'t> fn(Var<'t, f64>) -> Var<'t, f64>,
    /// The derivative of the function at `t != 0`.
    true_derivative: fn(f64) -> f64,
    /// The true derivative at 0, when the function is differentiable there.
    at_zero: Option<f64>,
    /// The digest's formula for AD's output at 0 under relu'(0) = s.
    expected: fn(f64) -> f64,
}

fn relu2<'t>(t: Var<'t, f64>) -> Var<'t, f64> {
    (-t).relu() + t
}

fn programs() -> Vec<Program> {
    vec![
        Program {
            name: "relu2(t) = relu(-t) + t",
            function: "relu",
            build: relu2,
            true_derivative: |t| if t > 0.0 { 1.0 } else { 0.0 },
            at_zero: None,
            expected: |s| 1.0 - s,
        },
        Program {
            name: "relu3(t) = (relu(t) + relu2(t)) / 2",
            function: "relu",
            build: |t| (t.relu() + relu2(t)) * 0.5,
            true_derivative: |t| if t > 0.0 { 1.0 } else { 0.0 },
            at_zero: None,
            expected: |_| 0.5,
        },
        Program {
            name: "zero(t) = relu2(t) - relu(t)",
            function: "0",
            build: |t| relu2(t) - t.relu(),
            true_derivative: |_| 0.0,
            at_zero: Some(0.0),
            expected: |s| 1.0 - 2.0 * s,
        },
        Program {
            name: "t - zero(t)",
            function: "t",
            build: |t| t - (relu2(t) - t.relu()),
            true_derivative: |_| 1.0,
            at_zero: Some(1.0),
            expected: |s| 2.0 * s,
        },
        Program {
            name: "relu(t) - relu(-t)",
            function: "t",
            build: |t| t.relu() - (-t).relu(),
            true_derivative: |_| 1.0,
            at_zero: Some(1.0),
            expected: |s| 2.0 * s,
        },
    ]
}

/// AD's derivative of a program at `t` under relu'(0) = `s`, with the number of kink hits.
fn ad(program: &Program, t: f64, s: f64) -> Result<(f64, usize)> {
    let tape = Tape::<f64>::new();
    let x = tape.param(arr0(t).into_dyn());
    let y = (program.build)(x);
    let grads = y.backward_with(&BackwardOptions::policy(KinkPolicy::pytorch().with_relu(s)))?;
    Ok((grads.wrt(x)?[[]], grads.ledger().exact_hits()))
}

/// `d/dc relu((a + c) - a)` at `a = 1e8, c = 1` in precision `S`, under relu'(0) = `s`.
fn absorbed<S: Scalar>(s: f64) -> Result<(f64, usize)> {
    let tape = Tape::<S>::new();
    let a = tape.constant(arr0(S::from_f64_lossy(1e8)).into_dyn());
    let c = tape.param(arr0(S::one()).into_dyn());
    let y = ((a + c) - a).relu();
    let grads = y.backward_with(&BackwardOptions::policy(KinkPolicy::pytorch().with_relu(s)))?;
    Ok((grads.wrt(c)?[[]].to_f64_exact(), grads.ledger().exact_hits()))
}

fn main() {
    if let Err(e) = run(&Args::parse()) {
        eprintln!("spurious: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let selections = [0.0, 0.5, 1.0];
    let mut rows = Vec::new();
    let mut mismatches = 0usize;
    eprintln!(
        "{:<38} {:>8} {:>10} | {:>8} {:>8} {:>8} | kinks",
        "program (AD at t = 0)", "function", "true f'(0)", "s = 0", "s = 1/2", "s = 1"
    );
    for p in programs() {
        let mut at_zero = Vec::new();
        let mut hits = 0;
        for &s in &selections {
            let (g, k) = ad(&p, 0.0, s)?;
            if g != (p.expected)(s) {
                mismatches += 1;
            }
            hits = k;
            at_zero.push(g);
        }
        // Away from the kink every selection gives the true derivative.
        let mut off_kink = Vec::new();
        for t in [-1.5, 0.75] {
            for &s in &selections {
                let (g, k) = ad(&p, t, s)?;
                if g != (p.true_derivative)(t) || k != 0 {
                    mismatches += 1;
                }
            }
            off_kink.push(json!({ "t": t, "ad": ad(&p, t, 0.0)?.0, "true": (p.true_derivative)(t) }));
        }
        let truth = p.at_zero.map_or("none".to_string(), |v| v.to_string());
        eprintln!(
            "{:<38} {:>8} {:>10} | {:>8} {:>8} {:>8} | {hits}",
            p.name, p.function, truth, at_zero[0], at_zero[1], at_zero[2]
        );
        rows.push(json!({
            "program": p.name,
            "function": p.function,
            "true_derivative_at_0": p.at_zero,
            "ad_at_0": { "s=0": at_zero[0], "s=0.5": at_zero[1], "s=1": at_zero[2] },
            "kink_hits": hits,
            "off_kink": off_kink,
        }));
    }
    let (f32_0, f32_hits) = absorbed::<f32>(0.0)?;
    let (f32_1, _) = absorbed::<f32>(1.0)?;
    let (f64_0, f64_hits) = absorbed::<f64>(0.0)?;
    let (f64_1, _) = absorbed::<f64>(1.0)?;
    eprintln!(
        "\nrelu((1e8 + c) - 1e8), d/dc at c = 1: f32 {f32_0} (s = 0) / {f32_1} (s = 1), {f32_hits} kink hit; \
         f64 {f64_0} / {f64_1}, {f64_hits} kink hits"
    );
    if mismatches > 0 {
        return Err(format!("{mismatches} AD outputs differ from the expected values").into());
    }
    if let Some(path) = &args.plot {
        let grid: Vec<f64> = (0..=20).map(|i| i as f64 / 20.0).collect();
        let mut panel = Panel::new("AD output at t = 0 against relu'(0)").labels("relu'(0) = s", "AD derivative at 0");
        for p in programs() {
            let pts = grid
                .iter()
                .map(|&s| Ok((s, ad(&p, 0.0, s)?.0)))
                .collect::<Result<Vec<_>>>()?;
            panel = panel.line(p.name, pts);
        }
        save_png(path, &[panel])?;
        eprintln!("plot written to {path}");
    }
    let summary = json!({
        "example": "spurious",
        "programs": rows,
        "precision": {
            "f32": { "s=0": f32_0, "s=1": f32_1, "kink_hits": f32_hits },
            "f64": { "s=0": f64_0, "s=1": f64_1, "kink_hits": f64_hits },
        },
        "all_match_expected": mismatches == 0,
    });
    println!("{summary}");
    Ok(())
}
