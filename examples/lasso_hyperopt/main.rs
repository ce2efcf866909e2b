//! Lasso hyperparameter tuning by hypergradient, against a warm-started grid search.
//!
//! Data: `data/diabetes.csv` (442 rows, 10 features, target last). Training rows 0..300,
//! validation rows 300..442, both centred by the training means. Inner problem
//! `1/(2 n_train) ||y - X beta||^2 + lambda ||beta||_1`; criterion: validation mean squared
//! error; `lambda_max = ||X_train^T y_train||_inf / n_train`.
//!
//! ```text
//! cargo run --release --example lasso_hyperopt -- [--synthetic] [--weighted] [--plot PATH]
//!                                                 [--kink PRESET] [--seed S] [--quick]
//!                                                 [--save-data DIR]
//! ```
//!
//! For `lambda = f lambda_max`, `f` in {0.5, 0.1, 0.02, 0.005, 0.001}, it prints the support
//! size, the validation loss and `dL/d log lambda` from the four methods (implicit layer on
//! the forward-backward map, the support-restricted solve of Prop. 5, unrolled ISTA, and the
//! implicit forward method's tangent sweeps on the active set) with the hypothesis check; then times one hypergradient, runs the gradient-based search and
//! the grid, and compares them. `--synthetic`: n = 200 training and 200 validation rows,
//! p = 10,000 features, 20 informative (seeded). `--weighted`: one `lambda` per feature.
//! Progress goes to stderr; the last line on stdout is one JSON object with the results.
//! `--save-data DIR` also writes the centred split that is fitted (`lasso_x_train.npy`,
//! `lasso_y_train.npy`, `lasso_x_val.npy`, `lasso_y_val.npy`: little-endian f64, exact) and
//! `lasso.json` (sizes, `lambda_max`, the grid), for the peers in `benches/peers/lasso.py`.
//!
//! **Sparse data** (compressed sparse columns, never densified):
//!
//! ```text
//! cargo run --release --example lasso_hyperopt -- --sparse-synthetic rcv1|news20 [--quick]
//!                                                 [--seed S] [--save-svmlight FILE]
//! cargo run --release --example lasso_hyperopt -- --data FILE.svm [--val-fraction F]
//!                                                 [--tol T] [--at-ratio R]
//! ```
//!
//! `--sparse-synthetic` generates a seeded matrix with the shape and density of rcv1
//! (20,242 x 19,960, 0.16%) or news20 (19,996 x 1,355,191, 0.03%), with planted features
//! (`--quick`: 2,000 rows and a tenth of news20's columns); `--data` reads an svmlight /
//! libsvm file (any name not ending in `.csv`). The last `floor(n F)` rows validate (`F =
//! 0.2`), `y` is centred by its training mean, `X` is left sparse (no intercept). Without
//! `--at-ratio` it tunes `lambda` (a warm-started grid, then hypergradient steps, with a
//! progress bar); with `--at-ratio R` it fits once from zero at `lambda_max / R` to
//! duality gap `T ||y||^2 / n` and computes one hypergradient (Prop. 5), the problem the
//! peers of `benches/peers/lasso_sparse.py` solve. The last stdout line is one JSON
//! object: `n`, `p`, `nnz`, `n_val`, `lambda`, `support`, `fit_seconds`,
//! `hypergradient_seconds`, `peak_memory_bytes` (the process's peak resident memory),
//! `objective`, `gap`, `val_mse`, `hypergradient`.

mod sparse;

use std::path::Path;
use std::time::Instant;

use clap::Parser;
use clarke::convex::cd::{CdOptions, solve};
use clarke::convex::data::{Split, read_csv, split_centred, try_synthetic};
use clarke::convex::hypergrad::{HypergradOptions, Method, ValidationMse, hypergradient};
use clarke::convex::model::{LassoModel, Penalty};
use clarke::convex::search::{SearchOptions, Stepper, gradient_search, grid_search, try_geometric_grid};
use clarke::core::KinkPolicy;
use clarke::nn::plot::{Panel, save_png};
use ndarray::Array1;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "Tune the Lasso penalty by hypergradient and compare with a grid search")]
struct Args {
    /// Synthetic data: n = 200 (+200 validation), p = 10,000, 20 informative features.
    #[arg(long)]
    synthetic: bool,
    /// One lambda per feature (weighted Lasso).
    #[arg(long)]
    weighted: bool,
    /// Write a PNG of the validation loss against lambda with the search path.
    #[arg(long)]
    plot: Option<String>,
    /// Kink policy preset (its soft-threshold selection applies at kinks).
    #[arg(long, default_value = "pytorch")]
    kink: String,
    /// Seed of the synthetic data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Grid points (lambda_max down to lambda_max / 100).
    #[arg(long, default_value_t = 30)]
    grid: usize,
    /// Points of the coarse grid that picks the search's starting basin (0: start at
    /// lambda_max/10).
    #[arg(long, default_value_t = 5)]
    coarse: usize,
    /// Largest number of search steps.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// A short run for CI: fewer search steps and grid points, a smaller synthetic problem.
    #[arg(long)]
    quick: bool,
    /// Path of the data file: CSV (header line, target last) when it ends in `.csv`,
    /// svmlight / libsvm otherwise (read as a sparse design).
    #[arg(long, default_value = "data/diabetes.csv")]
    data: String,
    /// A sparse synthetic matrix shaped like `rcv1` or `news20`.
    #[arg(long)]
    sparse_synthetic: Option<String>,
    /// Write the sparse data (every row) to this svmlight file.
    #[arg(long)]
    save_svmlight: Option<String>,
    /// Fraction of the rows (the last `floor(n F)`) held out for validation. Default 0.2
    /// for sparse data; a CSV file without it keeps diabetes' split (rows 300.. validate).
    #[arg(long)]
    val_fraction: Option<f64>,
    /// Duality-gap tolerance of the fits (sparse data), relative to `||y||^2 / n`.
    #[arg(long, default_value_t = 1e-8)]
    tol: f64,
    /// Sparse data: fit once at `lambda_max / R` and compute one hypergradient instead of
    /// tuning.
    #[arg(long)]
    at_ratio: Option<f64>,
    /// Also write the centred train/validation split (NumPy .npy) and the grid to this
    /// directory, for the peer scripts.
    #[arg(long)]
    save_data: Option<String>,
}

/// Writes `a` (row-major, `shape`) as a NumPy `.npy` file of little-endian f64.
fn write_npy(path: &Path, shape: &[usize], a: impl Iterator<Item = f64>) -> std::io::Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let dims = if dims.len() == 1 {
        format!("{},", dims[0])
    } else {
        dims.join(", ")
    };
    let mut header = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': ({dims}), }}");
    // Magic (6) + version (2) + length (2) + header + newline: a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in a {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes)
}

/// The split, `lambda_max` and the grid, for the peer scripts.
fn save_data(dir: &str, split: &Split, lmax: f64, grid: &[f64], name: &str) -> Result<(), clarke::core::Error> {
    let io = |e: std::io::Error| clarke::core::Error::Data(format!("--save-data {dir}: {e}"));
    let dir = Path::new(dir);
    std::fs::create_dir_all(dir).map_err(io)?;
    // `iter` walks an ndarray in logical (row-major) order whatever its memory layout.
    for (file, shape, values) in [
        (
            "lasso_x_train.npy",
            split.x_train.shape(),
            split.x_train.iter().copied().collect::<Vec<_>>(),
        ),
        ("lasso_y_train.npy", split.y_train.shape(), split.y_train.to_vec()),
        (
            "lasso_x_val.npy",
            split.x_val.shape(),
            split.x_val.iter().copied().collect(),
        ),
        ("lasso_y_val.npy", split.y_val.shape(), split.y_val.to_vec()),
    ] {
        write_npy(&dir.join(file), shape, values.into_iter()).map_err(io)?;
    }
    let meta = json!({
        "data": name,
        "n_train": split.x_train.nrows(),
        "n_val": split.x_val.nrows(),
        "p": split.x_train.ncols(),
        "lambda_max": lmax,
        "grid": grid,
        "objective": "1/(2 n_train) ||y - X beta||^2 + lambda ||beta||_1, no intercept (centred data)",
        "tol": "duality gap <= tol * ||y||^2 / n_train; 1e-8 for the grid and the timed fits",
    });
    std::fs::write(dir.join("lasso.json"), meta.to_string()).map_err(io)?;
    eprintln!("split written to {}", dir.display());
    Ok(())
}

fn load(args: &Args) -> Result<(String, Split), clarke::core::Error> {
    if args.synthetic {
        let p = if args.quick { 120 } else { 10_000 };
        let data = try_synthetic(400, p, 20, 1.0, args.seed)?;
        Ok((
            format!("synthetic (p = {p}, seed {})", args.seed),
            split_centred(&data, 0..200, 200..400)?,
        ))
    } else {
        let data = read_csv(&args.data)?;
        let n = data.x.nrows();
        let n_train = match args.val_fraction {
            Some(f) if !(f > 0.0 && f < 1.0) => {
                return Err(clarke::core::Error::invalid(
                    "lasso_hyperopt",
                    format!("--val-fraction must lie in (0, 1), got {f}"),
                ));
            }
            Some(f) => n - (n as f64 * f).floor() as usize,
            None => 300.min(n),
        };
        Ok((args.data.clone(), split_centred(&data, 0..n_train, n_train..n)?))
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "n/c".to_string(), |v| format!("{v:+.6e}"))
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), clarke::core::Error> {
    let policy = KinkPolicy::preset(&args.kink)?;
    if args.sparse_synthetic.is_some() || (!args.synthetic && !args.data.ends_with(".csv")) {
        return sparse::run(args, policy);
    }
    let (name, split) = load(args)?;
    let model = LassoModel::new(split.x_train.view(), split.y_train.view())?;
    let val = ValidationMse::new(split.x_val.view(), split.y_val.view())?;
    let (n, p) = (model.n(), model.p());
    let lmax = model.lambda_max();
    eprintln!(
        "{name}: {n} training rows, {} validation rows, {p} features; lambda_max = {lmax:.6e}",
        split.x_val.nrows()
    );
    let hopts = HypergradOptions::default().with_policy(policy.clone());
    let mut hopts_unrolled = hopts.clone();
    hopts_unrolled.unrolled_max_iter = match (args.synthetic, args.quick) {
        (true, true) => 500,
        (true, false) => 3_000,
        _ => 200_000,
    };
    let make_penalty = |l: f64| {
        if args.weighted {
            Penalty::PerFeature(Array1::from_elem(p, l))
        } else {
            Penalty::Uniform(l)
        }
    };
    let norm = |g: &Array1<f64>| g.iter().fold(0.0f64, |m, v| m.max(v.abs()));

    // 1. The three hypergradients along the path.
    let factors: &[f64] = if args.quick && args.synthetic {
        &[0.5, 0.1, 0.02]
    } else {
        &[0.5, 0.1, 0.02, 0.005, 0.001]
    };
    eprintln!(
        "\n{:>6} {:>11} {:>5} {:>12} {:>15} {:>15} {:>15} {:>15} {:>9}  hypothesis",
        "f", "lambda", "|S|", "val loss", "implicit", "support", "unrolled", "forward", "max rel"
    );
    let tight = CdOptions::default().with_tol(1e-12);
    let mut table = Vec::new();
    let mut warm: Option<Array1<f64>> = None;
    for &f in factors {
        let pen = make_penalty(f * lmax);
        let fit = solve(&model, &pen, warm.as_ref().map(|b| b.view()), &tight)?;
        warm = Some(fit.beta.clone());
        let mut grads: Vec<Option<Array1<f64>>> = Vec::new();
        let mut times = Vec::new();
        let mut notes = Vec::new();
        let (check, _) = clarke::convex::hypergrad::support::analyze(&model, &fit, &hopts)?;
        for m in Method::ALL {
            let o = if m == Method::Unrolled { &hopts_unrolled } else { &hopts };
            match hypergradient(&model, &fit, &val, m, o) {
                Ok(hg) => {
                    times.push(Some(hg.seconds));
                    if let Some(lc) = &hg.layer_check {
                        notes.push(format!("layer: {}", lc.outcome));
                    }
                    grads.push(Some(hg.gradient));
                }
                Err(e) => {
                    notes.push(format!("{m}: {e}"));
                    times.push(None);
                    grads.push(None);
                }
            }
        }
        let scalar = |g: &Option<Array1<f64>>| g.as_ref().map(|g| if args.weighted { g.sum() } else { g[0] });
        let reference = grads[1].clone();
        let max_rel = grads
            .iter()
            .flatten()
            .filter_map(|g| {
                reference.as_ref().map(|r| {
                    let d = norm(&(g - r));
                    d / norm(r).max(1e-300)
                })
            })
            .fold(0.0f64, f64::max);
        let secs: Vec<String> = times
            .iter()
            .map(|t| t.map_or_else(|| "-".to_string(), |t| format!("{t:.4}")))
            .collect();
        let value = val.value(fit.beta.view())?;
        eprintln!(
            "{f:>6} {:>11.4e} {:>5} {:>12.6e} {:>15} {:>15} {:>15} {:>15} {:>9.1e}  {} (|E| = {}, kinks {}, sigma_min {:.2e}); seconds {}{}",
            f * lmax,
            fit.support().len(),
            value,
            fmt_opt(scalar(&grads[0])),
            fmt_opt(scalar(&grads[1])),
            fmt_opt(scalar(&grads[2])),
            fmt_opt(scalar(&grads[3])),
            max_rel,
            check.outcome,
            check.equicorrelation.len(),
            check.kinks.len(),
            check.sigma_min,
            secs.join("/"),
            if notes.is_empty() {
                String::new()
            } else {
                format!("; {}", notes.join("; "))
            }
        );
        table.push(json!({
            "f": f,
            "lambda": f * lmax,
            "support": fit.support().len(),
            "val_loss": value,
            "gap": fit.gap,
            "grad_implicit": scalar(&grads[0]),
            "grad_support": scalar(&grads[1]),
            "grad_unrolled": scalar(&grads[2]),
            "grad_forward": scalar(&grads[3]),
            "seconds_implicit": times[0],
            "seconds_support": times[1],
            "seconds_unrolled": times[2],
            "seconds_forward": times[3],
            "max_rel_diff": max_rel,
            "hypothesis": check.outcome.to_string(),
            "equicorrelation": check.equicorrelation.len(),
            "kinks": check.kinks.len(),
            "sigma_min": check.sigma_min,
            "notes": notes,
        }));
    }
    if args.weighted {
        eprintln!(
            "(weighted: columns show the sum of the per-feature hypergradients; max rel is over the whole vector)"
        );
    }

    // 2. The grid, then one hypergradient timed, then the gradient-based search.
    let cd = CdOptions::default().with_tol(1e-8);
    let grid_points = if args.quick { args.grid.min(10) } else { args.grid };
    let steps = if args.quick { args.steps.min(8) } else { args.steps };
    let lambdas = try_geometric_grid(lmax, 0.01, grid_points)?;
    if let Some(dir) = &args.save_data {
        save_data(dir, &split, lmax, &lambdas, &name)?;
    }
    let grid = grid_search(&model, &val, &lambdas, &cd)?;
    eprintln!(
        "\ngrid ({grid_points} points, warm-started): best lambda {:.4e} (lambda_max/{:.1}), validation loss {:.6e}, {:.3} s",
        grid.best_lambda,
        lmax / grid.best_lambda,
        grid.best_value,
        grid.seconds
    );
    // One hypergradient, timed: a cold inner solve to tol 1e-8 plus the support solve, at
    // lambda_max/10, lambda_max/20 and at the grid points whose supports are nearest 20 and 37.
    let mut speed = Vec::new();
    eprintln!("\none hypergradient (inner solve to tol 1e-8 from zero + Prop. 5 solve):");
    let mut targets: Vec<(String, f64)> = vec![
        ("lambda_max/10".into(), lmax / 10.0),
        ("lambda_max/20".into(), lmax / 20.0),
    ];
    for want in if p >= 100 { vec![20usize, 37] } else { Vec::new() } {
        if let Some(g) = grid.points.iter().min_by_key(|g| g.support.abs_diff(want)) {
            targets.push((format!("support ~{want} (lambda_max/{:.2})", lmax / g.lambda), g.lambda));
        }
    }
    for (label, l) in targets {
        let pen = make_penalty(l);
        let t0 = Instant::now();
        let fit = solve(&model, &pen, None, &cd)?.into_result()?;
        let t_fit = t0.elapsed().as_secs_f64();
        let hg = hypergradient(&model, &fit, &val, Method::Support, &hopts)?;
        let total = t0.elapsed().as_secs_f64();
        eprintln!(
            "  {label}: support {}, fit {:.4} s ({} epochs, gap {:.2e}), hypergradient {:.5} s, total {:.4} s",
            fit.support().len(),
            t_fit,
            fit.epochs,
            fit.gap,
            hg.seconds,
            total
        );
        speed.push(json!({
            "at": label,
            "lambda": l,
            "support": fit.support().len(),
            "fit_seconds": t_fit,
            "hypergradient_seconds": hg.seconds,
            "total_seconds": total,
            "epochs": fit.epochs,
        }));
    }

    let options = SearchOptions {
        stepper: if args.weighted {
            Stepper::Adam { lr: 0.1 }
        } else {
            Stepper::LineSearch { initial_step: 1.0 }
        },
        max_iter: if args.weighted { steps.max(20) } else { steps },
        hypergrad: hopts.clone(),
        cd: cd.clone(),
        coarse_grid: args.coarse,
        ..Default::default()
    };
    let search = gradient_search(&model, &val, &make_penalty(lmax / 10.0), &options)?;
    eprintln!(
        "search ({}, from {}): best validation loss {:.6e} at lambda {:.4e}, {} steps, {} solves, {} hypergradients, {:.3} s; {}",
        if args.weighted {
            "Adam on log lambda_j"
        } else {
            "secant/BB steps with backtracking on log lambda"
        },
        if args.coarse > 0 {
            format!("the best of a {}-point coarse grid", args.coarse)
        } else {
            "lambda_max/10".to_string()
        },
        search.best_value,
        search
            .path
            .iter()
            .min_by(|a, b| a.value.total_cmp(&b.value))
            .map_or(f64::NAN, |s| s.lambda),
        search.path.len() - 1,
        search.solves,
        search.hypergradients,
        search.seconds,
        search.stop
    );
    for (k, s) in search.path.iter().enumerate() {
        eprintln!(
            "  step {k:>2}: lambda {:.4e}  val {:.6e}  |grad| {:.3e}  support {}",
            s.lambda, s.value, s.gradient_norm, s.support
        );
    }
    eprintln!(
        "search vs grid: validation loss {:.6e} vs {:.6e} ({}), time {:.3} s vs {:.3} s ({:.1}x)",
        search.best_value,
        grid.best_value,
        if search.best_value <= grid.best_value {
            "search at least as good"
        } else {
            "grid better"
        },
        search.seconds,
        grid.seconds,
        grid.seconds / search.seconds.max(1e-12)
    );

    if let Some(path) = &args.plot {
        let curve: Vec<(f64, f64)> = grid.points.iter().map(|g| (g.lambda, g.value)).collect();
        let trail: Vec<(f64, f64)> = search.path.iter().map(|s| (s.lambda, s.value)).collect();
        let panel = Panel::new(format!("validation loss, {name}"))
            .labels("lambda", "validation MSE")
            .log_x()
            .log_y()
            .line("grid", curve)
            .line_points("gradient search", trail);
        save_png(path, &[panel]).map_err(|e| clarke::core::Error::Data(format!("writing {path}: {e}")))?;
        eprintln!("plot written to {path}");
    }

    let out = json!({
        "example": "lasso_hyperopt",
        "data": name,
        "weighted": args.weighted,
        "kink_policy": policy.label(),
        "n_train": n,
        "n_val": split.x_val.nrows(),
        "p": p,
        "lambda_max": lmax,
        "table": table,
        "one_hypergradient": speed,
        "grid": {
            "points": grid_points,
            "best_lambda": grid.best_lambda,
            "best_val_loss": grid.best_value,
            "seconds": grid.seconds,
        },
        "search": {
            "best_lambda_geomean": match &search.best_penalty {
                Penalty::Uniform(l) => *l,
                Penalty::PerFeature(l) => (l.iter().map(|v| v.ln()).sum::<f64>() / l.len() as f64).exp(),
            },
            "best_val_loss": search.best_value,
            "steps": search.path.len() - 1,
            "solves": search.solves,
            "hypergradients": search.hypergradients,
            "seconds": search.seconds,
            "stop": search.stop,
            "path": search.path.iter().map(|s| json!([s.lambda, s.value])).collect::<Vec<_>>(),
        },
        "search_vs_grid": {
            "val_loss_ratio": search.best_value / grid.best_value,
            "time_ratio": search.seconds / grid.seconds,
        },
    });
    println!("{out}");
    Ok(())
}
