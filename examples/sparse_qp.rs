//! A sparse QP far beyond dense storage: solve it and differentiate its solution.
//!
//! `min 1/2 x^T P x + c^T x` subject to `A x + s = b`, `s in {0}^{m/5} x R_+^{4m/5}`, with
//! `n` variables and `m` constraints at `--density` (default 0.1%): `A` random sparse
//! (every row with at least one entry), `P = D + B B^T` with `D` diagonal in `[0.5, 1.5]` and
//! `B` a sparse `n x n/10` matrix (a sparse low-rank-ish PSD term, `P` at about the same
//! density as `A`), `b = A x0 + slack` with slack 0 on the equality rows and in
//! `[0, 1)` on the others (feasible by construction), `c` standard normal; all from `--seed`.
//!
//! The solver factors the sparse KKT matrix once (and refactors its values when `rho`
//! adapts), refinement and the derivative factor the sparse residual-map Jacobian (reduced
//! to a quasi-definite system: the cones are zero and non-negative), and the hypothesis
//! check estimates its singular values through that factorisation: no dense `n x n`, `m x n` or `(n + m)^2` matrix is
//! formed. One adjoint (the gradient of `sum(x)` with respect to `(P, A, b, c)`, `dA` and
//! `dP` on the patterns of `A` and `P`) is computed.
//!
//! ```text
//! cargo run --release --example sparse_qp -- [--n N] [--m M] [--density D] [--seed S] [--quick]
//! ```
//!
//! `--quick` runs `n = 1,000`, `m = 500` (at the default density `A` then has two entries
//! per row, the minimum). Progress goes to stderr; the last line on stdout is
//! one JSON object with the sizes, times, residuals, the check and the peak memory.

use std::collections::BTreeMap;
use std::time::Instant;

use clap::Parser;
use clarke::convex::CscMatrix;
use clarke::convex::cone::{
    Cone, ConeDerivative, ConeProgram, ConeStatus, Cones, DerivativeOptions, SolutionDirection, SolverOptions, solve,
};
use ndarray::Array1;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "Solve and differentiate a large sparse QP")]
struct Args {
    /// Variables.
    #[arg(long, default_value_t = 10_000)]
    n: usize,
    /// Constraints (a fifth of them equalities).
    #[arg(long, default_value_t = 5_000)]
    m: usize,
    /// Density of A (and about that of P).
    #[arg(long, default_value_t = 1e-3)]
    density: f64,
    /// Seed of the data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// n = 1,000, m = 500.
    #[arg(long)]
    quick: bool,
}

/// Peak resident memory of this process (`VmHWM`), where the system reports it.
fn peak_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A random `m x n` sparse matrix with about `density m n` standard normal entries, at least
/// two per row (a row with one entry fixes a variable, and two such rows on one variable
/// make the program degenerate).
fn constraint_matrix(rng: &mut ChaCha8Rng, m: usize, n: usize, density: f64) -> CscMatrix {
    let target = ((density * m as f64 * n as f64).round() as usize).max(2 * m);
    let mut entries: BTreeMap<(usize, usize), f64> = BTreeMap::new();
    for i in 0..m {
        let first = rng.random_range(0..n);
        let mut second = rng.random_range(0..n);
        while second == first && n > 1 {
            second = rng.random_range(0..n);
        }
        entries.insert((first, i), rng.sample(StandardNormal));
        entries.insert((second, i), rng.sample(StandardNormal));
    }
    while entries.len() < target {
        entries.insert(
            (rng.random_range(0..n), rng.random_range(0..m)),
            rng.sample(StandardNormal),
        );
    }
    let triplets: Vec<(usize, usize, f64)> = entries.into_iter().map(|((j, i), v)| (i, j, v)).collect();
    CscMatrix::from_triplets(m, n, &triplets).expect("valid triplets")
}

/// `P = D + B B^T`: `D` diagonal in `[0.5, 1.5]`, `B` with `n / 10` columns of `k` random
/// entries each (scaled by `1 / sqrt(k)`), `k` chosen so that `P` has about `density n^2`
/// entries. Symmetric positive definite by construction.
fn quadratic(rng: &mut ChaCha8Rng, n: usize, density: f64) -> CscMatrix {
    let rank = (n / 10).max(1);
    let per = ((density * (n as f64) * (n as f64) / rank as f64).sqrt().round() as usize).clamp(2, n);
    let mut entries: BTreeMap<(usize, usize), f64> = BTreeMap::new();
    for j in 0..n {
        entries.insert((j, j), 0.5 + rng.random::<f64>());
    }
    let scale = 1.0 / (per as f64).sqrt();
    for _ in 0..rank {
        let mut col: Vec<(usize, f64)> = Vec::with_capacity(per);
        while col.len() < per {
            let i = rng.random_range(0..n);
            if !col.iter().any(|&(r, _)| r == i) {
                col.push((i, scale * rng.sample::<f64, _>(StandardNormal)));
            }
        }
        for &(i, u) in &col {
            for &(j, w) in &col {
                *entries.entry((j, i)).or_insert(0.0) += u * w;
            }
        }
    }
    let triplets: Vec<(usize, usize, f64)> = entries.into_iter().map(|((j, i), v)| (i, j, v)).collect();
    CscMatrix::from_triplets(n, n, &triplets).expect("valid triplets")
}

fn main() -> clarke::core::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.n = 1_000;
        args.m = 500;
    }
    let (n, m) = (args.n, args.m);
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let t = Instant::now();
    let a = constraint_matrix(&mut rng, m, n, args.density);
    let p = quadratic(&mut rng, n, args.density);
    let x0 = Array1::from_shape_fn(n, |_| rng.sample::<f64, _>(StandardNormal));
    let eq = m / 5;
    let mut ax0 = Array1::<f64>::zeros(m);
    for j in 0..n {
        let (rows, vals) = a.column(j);
        for (&i, &v) in rows.iter().zip(vals) {
            ax0[i] += v * x0[j];
        }
    }
    let b = Array1::from_shape_fn(m, |i| ax0[i] + if i < eq { 0.0 } else { rng.random::<f64>() });
    let c = Array1::from_shape_fn(n, |_| rng.sample::<f64, _>(StandardNormal));
    let cones = Cones::new(vec![Cone::Zero(eq), Cone::NonNeg(m - eq)])?;
    let (nnz_a, nnz_p) = (a.nnz(), p.nnz());
    let prog = ConeProgram::new_sparse(a, b, c, cones)?.with_sparse_quadratic(p)?;
    let build_seconds = t.elapsed().as_secs_f64();
    eprintln!(
        "n = {n}, m = {m} ({eq} equalities): nnz(A) = {nnz_a} ({:.3}%), nnz(P) = {nnz_p} ({:.3}%), built and checked in {build_seconds:.2} s",
        100.0 * nnz_a as f64 / (n as f64 * m as f64),
        100.0 * nnz_p as f64 / (n as f64 * n as f64)
    );

    let t = Instant::now();
    let sol = solve(&prog, &SolverOptions::default(), None)?;
    let solve_seconds = t.elapsed().as_secs_f64();
    eprintln!(
        "solve: {} after {} ADMM iterations in {solve_seconds:.2} s; KKT residuals primal {:.2e}, dual {:.2e}, gap {:.2e} (ADMM: {:.2e}, {:.2e}); refinement: {} step(s), {}",
        sol.status,
        sol.iterations,
        sol.residuals.primal,
        sol.residuals.dual,
        sol.residuals.gap,
        sol.admm_residuals.primal,
        sol.admm_residuals.dual,
        sol.refinement.steps,
        sol.refinement.stopped
    );
    if sol.status != ConeStatus::Solved {
        return Err(sol.ensure_solved("sparse_qp").unwrap_err());
    }

    // The derivative: the sparse factorisation of M and the check above the dense limit,
    // then one adjoint.
    let t = Instant::now();
    let deriv = ConeDerivative::new(&prog, &sol, 0.0, &DerivativeOptions::default())?;
    let linearise_seconds = t.elapsed().as_secs_f64();
    let check = deriv.check();
    eprintln!("linearisation (the factorisation of M and the check) in {linearise_seconds:.2} s: {check}");
    let g = SolutionDirection {
        x: Array1::ones(n),
        y: Array1::zeros(m),
        s: Array1::zeros(m),
    };
    let t = Instant::now();
    let grad = deriv.adjoint(&g)?;
    let adjoint_seconds = t.elapsed().as_secs_f64();
    let grad_a = grad
        .sparse_a
        .as_ref()
        .map_or(0.0, |a| a.as_faer().val().iter().map(|v| v * v).sum::<f64>().sqrt());
    eprintln!(
        "adjoint of sum(x) in {adjoint_seconds:.3} s: ||d/dc|| = {:.4e}, ||d/db|| = {:.4e}, ||d/dA|| on A's pattern = {grad_a:.4e}",
        grad.c.dot(&grad.c).sqrt(),
        grad.b.dot(&grad.b).sqrt()
    );
    let peak = peak_memory_bytes();
    if let Some(bytes) = peak {
        eprintln!("peak memory (VmHWM): {:.1} MiB", bytes as f64 / (1024.0 * 1024.0));
    }
    println!(
        "{}",
        json!({
            "example": "sparse_qp",
            "n": n,
            "m": m,
            "equalities": eq,
            "nnz_a": nnz_a,
            "nnz_p": nnz_p,
            "status": sol.status.as_str(),
            "admm_iterations": sol.iterations,
            "refinement_steps": sol.refinement.steps,
            "primal_residual": sol.residuals.primal,
            "dual_residual": sol.residuals.dual,
            "gap": sol.residuals.gap,
            "build_seconds": build_seconds,
            "solve_seconds": solve_seconds,
            "linearise_seconds": linearise_seconds,
            "adjoint_seconds": adjoint_seconds,
            "derivative_seconds": linearise_seconds + adjoint_seconds,
            "kinks": check.boundaries.len(),
            "check": format!("{:?}", check.outcome()),
            "sigma_min_estimate": check.check.sigma_min,
            "peak_memory_bytes": peak,
        })
    );
    Ok(())
}
