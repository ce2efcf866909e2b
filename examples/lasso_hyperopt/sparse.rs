//! The sparse mode of `lasso_hyperopt`: svmlight data or an rcv1/news20-shaped synthetic
//! matrix, fitted and differentiated without densifying.

use std::time::Instant;

use clarke::convex::cd::{CdOptions, Fit, solve};
use clarke::convex::data::{SparseShape, read_svmlight, sparse_synthetic, split_sparse, write_svmlight};
use clarke::convex::hypergrad::{HypergradOptions, Method, ValidationMse, hypergradient};
use clarke::convex::model::{LassoModel, Penalty};
use clarke::core::{Error, KinkPolicy};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::Args;

/// Informative features planted in a synthetic matrix (20 with `--quick`).
const INFORMATIVE: usize = 100;
/// Noise of the synthetic target, relative to the signal's standard deviation.
const NOISE: f64 = 0.5;

/// Peak resident memory of this process (`VmHWM`), where the system reports it.
fn peak_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// One fit and its timing.
struct Timed<T> {
    value: T,
    seconds: f64,
}

fn timed<T>(f: impl FnOnce() -> Result<T, Error>) -> Result<Timed<T>, Error> {
    let start = Instant::now();
    let value = f()?;
    Ok(Timed {
        value,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Runs the sparse mode (`--sparse-synthetic NAME` or `--data FILE` not ending in `.csv`).
pub fn run(args: &Args, policy: KinkPolicy) -> Result<(), Error> {
    let (name, data) = match &args.sparse_synthetic {
        Some(set) => {
            let shape = SparseShape::named(set, args.quick)?;
            let informative = if args.quick { 20 } else { INFORMATIVE };
            eprintln!(
                "generating a {set}-like matrix: {} x {} at density {} (seed {})",
                shape.n, shape.p, shape.density, args.seed
            );
            (
                format!("{set}-like"),
                sparse_synthetic(shape, informative, NOISE, args.seed)?,
            )
        }
        None => (args.data.clone(), read_svmlight(&args.data, None)?),
    };
    if let Some(path) = &args.save_svmlight {
        write_svmlight(path, &data.x, data.y.view())?;
        eprintln!("wrote {path}");
    }
    let split = split_sparse(&data, args.val_fraction.unwrap_or(0.2))?;
    drop(data);
    let nnz = split.x_train.nnz();
    let n_val = split.x_val.nrows();
    let model = LassoModel::new_sparse(split.x_train, split.y_train.view())?;
    let criterion = ValidationMse::new_sparse(split.x_val, split.y_val.view())?;
    let (n, p) = (model.n(), model.p());
    let lmax = model.lambda_max();
    eprintln!(
        "{name}: {n} training rows, {n_val} validation rows, {p} features, {nnz} stored entries ({:.3}%); lambda_max = {lmax:.6e}",
        100.0 * nnz as f64 / (n as f64 * p as f64)
    );
    let cd = CdOptions::default().with_tol(args.tol);
    let hopts = HypergradOptions::default().with_policy(policy);
    let summary = |fit: &Fit, lambda: f64, extra: Value, fit_s: f64, hyper_s: f64, hg: f64| -> Result<Value, Error> {
        let mut out = json!({
            "example": "lasso_hyperopt",
            "data": name,
            "n": n,
            "p": p,
            "nnz": nnz,
            "n_val": n_val,
            "lambda": lambda,
            "lambda_ratio": lmax / lambda,
            "support": fit.support().len(),
            "tol": args.tol,
            "fit_seconds": fit_s,
            "hypergradient_seconds": hyper_s,
            "peak_memory_bytes": peak_memory_bytes(),
            "objective": fit.objective,
            "gap": fit.gap,
            "val_mse": criterion.value(fit.beta.view())?,
            "hypergradient": hg,
        });
        if let (Value::Object(o), Value::Object(e)) = (&mut out, extra) {
            o.extend(e);
        }
        Ok(out)
    };

    if let Some(ratio) = args.at_ratio {
        // One fit from zero at lambda_max / ratio and one hypergradient: the peers' problem.
        if !(ratio.is_finite() && ratio >= 1.0) {
            return Err(Error::invalid(
                "lasso_hyperopt",
                format!("--at-ratio must be finite and >= 1, got {ratio}"),
            ));
        }
        let lambda = lmax / ratio;
        let penalty = Penalty::Uniform(lambda);
        let fit = timed(|| solve(&model, &penalty, None, &cd)?.into_result())?;
        let hg = timed(|| hypergradient(&model, &fit.value, &criterion, Method::Support, &hopts))?;
        eprintln!(
            "lambda_max/{ratio}: support {}, gap {:.2e}, fit {:.3} s, hypergradient {:.3} s ({}), dC/dlog lambda = {:+.6e}",
            fit.value.support().len(),
            fit.value.gap,
            fit.seconds,
            hg.seconds,
            hg.value.check,
            hg.value.gradient[0]
        );
        let line = summary(
            &fit.value,
            lambda,
            json!({}),
            fit.seconds,
            hg.seconds,
            hg.value.gradient[0],
        )?;
        println!("{line}");
        return Ok(());
    }

    // Tuning: a warm-started coarse grid picks the basin, then hypergradient steps on
    // log lambda with backtracking refine it.
    let grid_points = if args.quick { 5 } else { 10 };
    let steps = if args.quick { 5 } else { args.steps.min(15) };
    let bar = ProgressBar::new((grid_points + steps) as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let (mut fit_seconds, mut hyper_seconds, mut fits) = (0.0, 0.0, 0usize);
    let mut best: Option<(f64, f64, Fit)> = None; // (val, log lambda, fit)
    let mut warm: Option<Fit> = None;
    bar.set_prefix("grid");
    for k in 0..grid_points {
        let ratio = 0.5 * (0.02f64).powf(k as f64 / (grid_points - 1) as f64);
        let lambda = lmax * ratio;
        let fit = timed(|| {
            solve(
                &model,
                &Penalty::Uniform(lambda),
                warm.as_ref().map(|f| f.beta.view()),
                &cd,
            )?
            .into_result()
        })?;
        fit_seconds += fit.seconds;
        fits += 1;
        let val = criterion.value(fit.value.beta.view())?;
        bar.set_message(format!(
            "lambda_max x {ratio:.4}: support {}, validation {val:.5e}",
            fit.value.support().len()
        ));
        bar.inc(1);
        if best.as_ref().is_none_or(|b| val < b.0) {
            best = Some((val, lambda.ln(), fit.value.clone()));
        }
        warm = Some(fit.value);
    }
    let (mut val, mut theta, mut fit) = best.expect("the grid has points");
    let mut step = 0.5;
    bar.set_prefix("descent");
    for _ in 0..steps {
        let hg = timed(|| hypergradient(&model, &fit, &criterion, Method::Support, &hopts))?;
        hyper_seconds += hg.seconds;
        let g = hg.value.gradient[0];
        let mut accepted = false;
        while step > 1e-3 {
            let trial = theta - step * g.signum() * (g.abs() / val).clamp(0.1, 1.0);
            let lambda = trial.exp().min(lmax);
            let next = timed(|| solve(&model, &Penalty::Uniform(lambda), Some(fit.beta.view()), &cd)?.into_result())?;
            fit_seconds += next.seconds;
            fits += 1;
            let v = criterion.value(next.value.beta.view())?;
            if v < val {
                (val, theta, fit) = (v, lambda.ln(), next.value);
                step *= 1.5;
                accepted = true;
                break;
            }
            step *= 0.5;
        }
        bar.set_message(format!(
            "lambda_max x {:.4}: support {}, validation {val:.5e}, dC/dlog lambda {g:+.3e}",
            theta.exp() / lmax,
            fit.support().len()
        ));
        bar.inc(1);
        if !accepted {
            break;
        }
    }
    bar.finish_and_clear();
    let lambda = theta.exp();
    let last = timed(|| hypergradient(&model, &fit, &criterion, Method::Support, &hopts))?;
    hyper_seconds += last.seconds;
    eprintln!(
        "best lambda = lambda_max x {:.5}: support {}, validation MSE {val:.6e}; {fits} fits in {fit_seconds:.2} s, hypergradients {hyper_seconds:.2} s",
        lambda / lmax,
        fit.support().len()
    );
    let line = summary(
        &fit,
        lambda,
        json!({ "fits": fits, "grid_points": grid_points }),
        fit_seconds,
        hyper_seconds,
        last.value.gradient[0],
    )?;
    println!("{line}");
    Ok(())
}
