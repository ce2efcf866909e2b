//! The hypothesis check of the implicit function theorem for a cone program.
//!
//! The derivative inverts `M = (Q - I) J + I` (see [`super::residual`]). The theorem of
//! Bolte, Le, Pauwels and Silveti-Falls needs **every** element of the conservative Jacobian
//! of `Pi_{K*}` at the solution to give an invertible `M`, not only the selected one. Away
//! from the kinks of the projections (strict complementarity: no entry with `y_i = s_i = 0`,
//! no second-order block on a cone boundary, no zero eigenvalue) there is one element; on a
//! kink the selection ranges over a convex set and the check walks it:
//!
//! - every non-negative entry within the boundary tolerance of its kink is a selection
//!   `q_i in [0, 1]` that moves one column of `M` affinely, so `det M` is affine in each
//!   `q_i` separately. If `det M` has one sign at all `2^k` vertices, no element of the box is
//!   singular: **certified** (exact, like the implicit node's check).
//! - second-order and PSD blocks on a boundary move several columns at once; their vertices
//!   and the midpoint are examined, which finds sign changes but certifies nothing:
//!   **warning** at best.
//! - a singular element, or a determinant that changes sign between two elements (so an
//!   element in between is singular): **violated**.
//!
//! Entries within the tolerance (not only exact kinks) are walked, because a numerical
//! solution within the solver's accuracy of a kink is indistinguishable from one on it.
//!
//! **Above the dense limit** (`n + m > CheckOptions::dense_limit`, the case of large sparse
//! programs) no dense `M` is formed and no SVD runs. Without kinks the one element is
//! measured through the derivative's LU (sparse for a sparse program): inverse and power
//! iteration as below. With kinks the same vertices are walked by
//! [`clarke_implicit::check::walk_vertices_matrix_free`] on products `M d`, `M^T d` with each
//! vertex's projection Jacobian (Lanczos for `sigma_min`, power iteration for `sigma_max`),
//! and the midpoint of boundary blocks is estimated the same way. Either way the verdict is
//! at best a warning (an estimate, not a certificate); a singular estimate is a violation.
//!
//! The walk, its thresholds and its verdicts are those of
//! [`clarke_implicit::check::walk_vertices`], the engine every layer uses; this module adds
//! what is particular to cones: the strict-complementarity margins, a fast certificate from
//! the derivative's LU when there is no kink, and the midpoint of boundary blocks.

use clarke_core::{ElementSelection, Result};
use std::cell::RefCell;

use clarke_implicit::check::{Flippable, Form, Spectrum, WalkInput, walk_vertices, walk_vertices_matrix_free};
use clarke_implicit::{CheckOptions, CheckOutcome, HypothesisCheck};
use clarke_solve::{FnOperator, SpectralOptions, smallest_singular_value, spectral_norm};
use ndarray::{Array1, Array2, ArrayView1, ArrayViewMut1, s};

use super::cones::{Boundary, BoundaryKind, Cone, Cones, ProjectionJacobian, psd_eigen, soc_margin};
use super::problem::ConeProgram;
use super::residual::{ResidualLu, apply_jacobian, apply_jacobian_transpose, jacobian_matrix};
use super::sparse::JacobianFactor;

/// Strict complementarity of one cone at a solution.
#[derive(Debug, Clone, PartialEq)]
pub struct ConeMargin {
    /// Index of the cone in the product.
    pub cone: usize,
    /// Its kind (`"nonneg"`, `"soc"`, `"psd"`).
    pub kind: &'static str,
    /// Distance of `v = y - s` from the projection's kinks in this cone: `min_i |v_i|`
    /// (`= min_i (y_i + s_i)`) for the orthant, `| ||x|| - |t| |` for a second-order cone,
    /// the smallest `|lambda|` for a PSD block.
    pub margin: f64,
    /// `margin` above the boundary tolerance.
    pub strict: bool,
}

/// The check of one derivative: the verdict with its numbers, where the kinks are, and
/// strict complementarity per cone.
#[derive(Debug, Clone, PartialEq)]
pub struct ConicCheck {
    /// The verdict and its numbers (`sigma_min` of the selected `M`, vertices walked, ...).
    pub check: HypothesisCheck,
    /// The boundary tolerance used.
    pub boundary_tol: f64,
    /// The kinks within the tolerance.
    pub boundaries: Vec<Boundary>,
    /// Strict complementarity per cone (zero cones left out).
    pub margins: Vec<ConeMargin>,
}

impl ConicCheck {
    /// The verdict.
    pub fn outcome(&self) -> CheckOutcome {
        self.check.outcome
    }

    /// Whether strict complementarity holds in every cone.
    pub fn strictly_complementary(&self) -> bool {
        self.margins.iter().all(|m| m.strict)
    }
}

impl std::fmt::Display for ConicCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let weak = self.margins.iter().filter(|m| !m.strict).count();
        write!(
            f,
            "{}; strict complementarity {} ({} of {} cones weak, tolerance {:.1e})",
            self.check,
            if weak == 0 { "holds" } else { "fails" },
            weak,
            self.margins.len(),
            self.boundary_tol
        )
    }
}

/// Distance of `v` from the kinks of `Pi_{K*}`, per cone.
pub(crate) fn cone_margins(cones: &Cones, v: ArrayView1<'_, f64>, tol: f64) -> Vec<ConeMargin> {
    cones
        .blocks()
        .filter_map(|(index, cone, r)| {
            let vb = v.slice(s![r]);
            let margin = match cone {
                Cone::Zero(_) => return None,
                Cone::NonNeg(_) => vb.iter().fold(f64::INFINITY, |a, x| a.min(x.abs())),
                Cone::Soc(_) => soc_margin(vb),
                Cone::Psd(k) => psd_eigen(vb, k).0.iter().fold(f64::INFINITY, |a, l| a.min(l.abs())),
            };
            Some(ConeMargin {
                cone: index,
                kind: cone.name(),
                margin,
                strict: margin > tol,
            })
        })
        .collect()
}

/// What the check examines: the linearisation of a solution.
pub(crate) struct Linearisation<'a> {
    /// The program.
    pub prog: &'a ConeProgram,
    /// `v = y - s` at the solution.
    pub v: ArrayView1<'a, f64>,
    /// The kinks within tolerance.
    pub boundaries: &'a [Boundary],
    /// The selection at those kinks for the selected element.
    pub default_q: f64,
    /// `M` for the selected element (`None` when it is too large to form: the check then
    /// only reports the kinks).
    pub selected: Option<&'a Array2<f64>>,
    /// Its LU, when the derivative factored it.
    pub lu: Option<&'a ResidualLu>,
    /// Its sparse factorisation, when the derivative of a sparse program factored it.
    pub sparse_lu: Option<&'a JacobianFactor>,
    /// The solution's KKT residual (for the error bound).
    pub residual: f64,
}

/// Runs the check (see the module docs).
pub(crate) fn run(lin: &Linearisation<'_>, opts: &CheckOptions) -> Result<HypothesisCheck> {
    let Linearisation {
        prog,
        v,
        boundaries,
        default_q,
        selected,
        lu,
        residual,
        ..
    } = *lin;
    let exact = boundaries.iter().filter(|b| b.exact).count();
    let scalar = boundaries
        .iter()
        .filter(|b| matches!(b.kind, BoundaryKind::Entry(_)))
        .count();
    let blocks = boundaries.len() - scalar;
    let mut check = HypothesisCheck {
        outcome: CheckOutcome::Warning,
        kink_elements: exact,
        flippable: boundaries.len(),
        reasons: Vec::new(),
        ..HypothesisCheck::not_checked("")
    };
    if !opts.enabled {
        return Ok(HypothesisCheck::not_checked("the check is switched off"));
    }
    let dim = prog.n() + prog.m();
    let selected = match selected {
        Some(m) if dim <= opts.dense_limit => m,
        _ if dim > opts.dense_limit => {
            return match (boundaries.len(), lin.sparse_lu, lu) {
                (0, Some(sparse), _) => factored_estimate(lin, |d, t| sparse.solve(d, t), check, opts),
                (0, None, Some(dense)) => factored_estimate(
                    lin,
                    |d, t| if t { dense.solve_transpose(d) } else { dense.solve(d) },
                    check,
                    opts,
                ),
                _ => matrix_free(lin, opts, blocks),
            };
        }
        _ => {
            check.reasons.push(format!(
                "M is {dim} x {dim}, above the dense limit {}: not examined ({} kink(s) within tolerance)",
                opts.dense_limit,
                boundaries.len()
            ));
            return Ok(check);
        }
    };
    let k = boundaries.len();
    let selected_j = prog.cones.dual_jacobian(v, boundaries, &[], default_q);
    let estimate = match (k, lu) {
        // Products with M through A and J (about (2 nnz(A) + n^2) multiply-adds) instead of
        // the formed M ((n + m)^2).
        (0, Some(lu)) => Some(estimated_extremes(
            selected.nrows(),
            |d, out| apply_jacobian(prog, &selected_j, d, out),
            |d, out| apply_jacobian_transpose(prog, &selected_j, d, out),
            |d, transpose| if transpose { lu.solve_transpose(d) } else { lu.solve(d) },
        )?),
        _ => None,
    };
    // Near the warning threshold the estimate's bias (toward a larger ratio) matters: there
    // the SVD decides.
    if let Some((sigma_min, sigma_max)) = estimate.filter(|(lo, hi)| *lo > 1e2 * opts.warn_tol * *hi) {
        // One element, and its LU exists (so it is invertible to working precision): its
        // extreme singular values come from the factorisation instead of an SVD.
        check.sigma_min = Some(sigma_min);
        check.sigma_max = Some(sigma_max);
        check.error_bound = Some(residual / sigma_min);
        check.exhaustive = true;
        check.outcome = CheckOutcome::Certified;
        check.reasons.push(
            "strictly complementary solution: one element, invertible (singular values estimated from its LU)".into(),
        );
        return Ok(check);
    }
    // The walk of the one engine: `M` is the inverted block (a root form, judged relative to
    // its own largest singular value), each boundary a selection in [0, 1].
    let input = walk_input(boundaries, residual);
    let matrix_at = |selections: &[ElementSelection]| -> Array2<f64> {
        let mut pattern = vec![None; k];
        for e in selections {
            pattern[e.element] = Some(e.value);
        }
        let j = prog.cones.dual_jacobian(v, boundaries, &pattern, default_q);
        jacobian_matrix(prog, &j)
    };
    let mut walked = walk_vertices(&input, opts, |selections| {
        Ok(if selections.is_empty() {
            selected.clone()
        } else {
            matrix_at(selections)
        })
    })?
    .check;
    walked.flippable = k;
    if blocks > 0 && walked.outcome != CheckOutcome::Violated {
        // A boundary block moves several columns at once: det M is not affine in its
        // selection, so vertices certify nothing; the midpoint is examined too.
        let midpoint = midpoint_selections(k);
        let spec = Spectrum::of(matrix_at(&midpoint).view())?;
        judge_midpoint(&mut walked, spec.sigma_min, spec.relative(), opts, blocks, false);
    }
    Ok(walked)
}

/// The check above the dense limit of a strictly complementary solution whose `M` the
/// derivative factored (sparse for a sparse program, a dense LU otherwise): one
/// element, and its LU exists (so it is invertible to working precision, as below the
/// limit), with `sigma_min` and `sigma_max` estimated through the factorisation
/// ([`estimated_extremes`]) and products `M d` that do not form `M`. An estimate, not a
/// certificate: a warning, or a violation when the estimated ratio is below the singular
/// threshold or a solve meets a singular `M`.
fn factored_estimate(
    lin: &Linearisation<'_>,
    solve: impl Fn(ArrayView1<'_, f64>, bool) -> Result<Array1<f64>>,
    mut check: HypothesisCheck,
    opts: &CheckOptions,
) -> Result<HypothesisCheck> {
    let (prog, dim) = (lin.prog, lin.prog.n() + lin.prog.m());
    let j = prog.cones.dual_jacobian(lin.v, lin.boundaries, &[], lin.default_q);
    let estimate = estimated_extremes(
        dim,
        |d, out| apply_jacobian(prog, &j, d, out),
        |d, out| apply_jacobian_transpose(prog, &j, d, out),
        solve,
    );
    let (sigma_min, sigma_max) = match estimate {
        Ok(pair) => pair,
        Err(clarke_core::Error::Singular { detail, .. }) => {
            check.outcome = CheckOutcome::Violated;
            check
                .reasons
                .push(format!("the selected element is singular: {detail}"));
            return Ok(check);
        }
        Err(e) => return Err(e),
    };
    check.sigma_min = Some(sigma_min);
    check.sigma_max = Some(sigma_max);
    check.error_bound = Some(lin.residual / sigma_min);
    check.exhaustive = true;
    check.matrix_free = true;
    if sigma_min <= opts.singular_tol * sigma_max {
        check.outcome = CheckOutcome::Violated;
        check.reasons.push(format!(
            "the selected element is singular: sigma_min ~ {sigma_min:.3e}, sigma_max ~ {sigma_max:.3e} (estimates through its factorisation)"
        ));
    } else {
        check.reasons.push(format!(
            "strictly complementary solution: one element; M is {dim} x {dim}, above the dense limit {}: its LU exists and sigma_min, sigma_max are estimated through it (inverse and power iteration): an estimate, not a certificate",
            opts.dense_limit
        ));
    }
    Ok(check)
}

/// The selections of one element of the walk (element, bits of the value): the key of the
/// cached projection Jacobian.
type SelectionKey = Vec<(usize, u64)>;

/// Every one of the `k` kink elements at the middle of its selection interval (`0.5`): a
/// boundary block moves several columns at once, so `det M` is not affine in its selection
/// and the vertices alone certify nothing.
fn midpoint_selections(k: usize) -> Vec<ElementSelection> {
    (0..k)
        .map(|element| ElementSelection {
            node: 0,
            element,
            value: 0.5,
        })
        .collect()
}

/// Folds the midpoint of the block selections into a walk's verdict (the dense and the
/// matrix-free walks alike): its `sigma_min` counts as one more vertex; a `relative`
/// `sigma_min / sigma_max` at or below the singular threshold is a violation, otherwise the
/// verdict is a warning (vertices and midpoint certify nothing for a block). `estimated`:
/// the singular values are estimates, and the reasons say so.
fn judge_midpoint(
    walked: &mut HypothesisCheck,
    sigma_min: f64,
    relative: f64,
    opts: &CheckOptions,
    blocks: usize,
    estimated: bool,
) {
    walked.vertices += 1;
    walked.min_vertex_sigma = Some(walked.min_vertex_sigma.map_or(sigma_min, |s| s.min(sigma_min)));
    if relative <= opts.singular_tol {
        walked.outcome = CheckOutcome::Violated;
        let value = if estimated {
            format!("~ {sigma_min:.3e} (estimate)")
        } else {
            format!("= {sigma_min:.3e}")
        };
        walked.reasons.insert(
            0,
            format!("the midpoint of the block selections is singular: sigma_min(M) {value}"),
        );
    } else {
        walked.outcome = CheckOutcome::Warning;
        let invertible = if estimated { " (estimates)" } else { "" };
        walked.reasons.push(format!(
            "{blocks} second-order or PSD block(s) on a boundary: vertices and midpoint invertible{invertible}, no certificate"
        ));
    }
}

/// The walk input of a linearisation: `M` is the inverted block (a root form, judged
/// relative to its own largest singular value), each boundary a selection in `[0, 1]`.
fn walk_input(boundaries: &[Boundary], residual: f64) -> WalkInput {
    let k = boundaries.len();
    let exact = boundaries.iter().filter(|b| b.exact).count();
    WalkInput {
        form: Form::Root,
        flippable: (0..k)
            .map(|element| Flippable {
                node: 0,
                element,
                low: 0.0,
                high: 1.0,
            })
            .collect(),
        kink_elements: exact,
        frozen: 0,
        within_solver_error: k - exact,
        forward_residual: residual,
        unit: 0.0,
    }
}

/// The check above the dense limit: the same vertices (every kink within tolerance a
/// selection in `[0, 1]`, the same [`Cones::dual_jacobian`] per vertex) walked by
/// [`walk_vertices_matrix_free`] with products `M d` and `M^T d` only (sparse for a sparse
/// program), `sigma_min` by Golub-Kahan-Lanczos and `sigma_max` by power iteration. The
/// midpoint of boundary blocks is estimated the same way. An estimate certifies nothing:
/// the verdict is at best a warning; a singular estimate (a `sigma_min` estimate never lies
/// below the true value) or a singular midpoint is a violation.
fn matrix_free(lin: &Linearisation<'_>, opts: &CheckOptions, blocks: usize) -> Result<HypothesisCheck> {
    let Linearisation {
        prog,
        v,
        boundaries,
        default_q,
        residual,
        ..
    } = *lin;
    let dim = prog.n() + prog.m();
    let k = boundaries.len();
    let input = walk_input(boundaries, residual);
    let jacobian_at = |selections: &[ElementSelection]| -> ProjectionJacobian {
        let mut pattern = vec![None; k];
        for e in selections {
            pattern[e.element] = Some(e.value);
        }
        prog.cones.dual_jacobian(v, boundaries, &pattern, default_q)
    };
    // The walk asks for many products per element: the element's J is built once.
    let cache: RefCell<Option<(SelectionKey, ProjectionJacobian)>> = RefCell::new(None);
    let products =
        |selections: &[ElementSelection], transpose: bool, x: ArrayView1<'_, f64>, y: ArrayViewMut1<'_, f64>| {
            let key: SelectionKey = selections.iter().map(|e| (e.element, e.value.to_bits())).collect();
            let mut cached = cache.borrow_mut();
            if cached.as_ref().is_none_or(|(k, _)| *k != key) {
                *cached = Some((key, jacobian_at(selections)));
            }
            let j = &cached.as_ref().expect("just set").1;
            if transpose {
                apply_jacobian_transpose(prog, j, x, y);
            } else {
                apply_jacobian(prog, j, x, y);
            }
            Ok(())
        };
    let mut walked = walk_vertices_matrix_free(&input, opts, dim, products)?;
    walked.flippable = k;
    if blocks > 0 && walked.outcome != CheckOutcome::Violated {
        let midpoint = midpoint_selections(k);
        let j = jacobian_at(&midpoint);
        let op = FnOperator::new(dim, dim, |x, y| {
            apply_jacobian(prog, &j, x, y);
            Ok(())
        })
        .with_transpose(|x, y| {
            apply_jacobian_transpose(prog, &j, x, y);
            Ok(())
        });
        let spectral = SpectralOptions::default()
            .with_tol(opts.spectral_tol)
            .with_max_iter(opts.spectral_iterations)
            .with_seed(opts.seed);
        let low = smallest_singular_value(&op, &spectral)?;
        let high = spectral_norm(
            &op,
            &SpectralOptions {
                tol: opts.norm_tol,
                ..spectral
            },
        )?;
        walked.products += low.matvecs + high.matvecs;
        let relative = if high.value > 0.0 {
            low.value / high.value.max(low.value)
        } else {
            0.0
        };
        judge_midpoint(&mut walked, low.value, relative, opts, blocks, true);
    }
    if walked.outcome == CheckOutcome::Certified {
        walked.outcome = CheckOutcome::Warning;
    }
    walked.reasons.push(format!(
        "M is {dim} x {dim}, above the dense limit {}: checked matrix-free ({} products); its singular values are Lanczos and power-iteration estimates: an estimate, not a certificate",
        opts.dense_limit, walked.products
    ));
    Ok(walked)
}

/// Estimates of `sigma_min(M)` (inverse iteration on `M^T M` through the LU) and
/// `sigma_max(M)` (power iteration), each stopped when it changes by less than `1e-4`
/// relative (at most twelve steps, from a fixed start). Both are Rayleigh-quotient values,
/// so `sigma_min` is an upper bound and `sigma_max` a lower bound of the true values, tight
/// when the extreme singular values are separated; the check falls back to an SVD when the
/// estimated ratio comes near its thresholds.
///
/// `apply(d, out)` writes `M d`, `apply_t` `M^T d`, and `solve(d, transpose)` returns
/// `M^{-1} d` or `M^{-T} d` (from a dense LU or a sparse factorisation).
fn estimated_extremes(
    n: usize,
    apply: impl Fn(ArrayView1<'_, f64>, ArrayViewMut1<'_, f64>),
    apply_t: impl Fn(ArrayView1<'_, f64>, ArrayViewMut1<'_, f64>),
    solve: impl Fn(ArrayView1<'_, f64>, bool) -> Result<Array1<f64>>,
) -> Result<(f64, f64)> {
    let product = |d: &Array1<f64>, transpose: bool| {
        let mut out = Array1::zeros(n);
        if transpose {
            apply_t(d.view(), out.view_mut());
        } else {
            apply(d.view(), out.view_mut());
        }
        out
    };
    let start = Array1::from_shape_fn(n, |i| 1.0 + 0.5 * ((i as f64) * 0.618_034).fract());
    let normalise = |v: Array1<f64>| {
        let norm = v.dot(&v).sqrt();
        if norm > 0.0 { v / norm } else { v }
    };
    let settled = |new: f64, old: f64| (new - old).abs() <= 1e-4 * new.abs().max(f64::MIN_POSITIVE);
    let mut v = normalise(start.clone());
    let mut sigma_max = 0.0;
    for _ in 0..12 {
        let mv = product(&v, false);
        let estimate = mv.dot(&mv).sqrt();
        let done = settled(estimate, sigma_max);
        sigma_max = estimate;
        if done {
            break;
        }
        v = normalise(product(&mv, true));
    }
    let mut u = normalise(start);
    let mut sigma_min = f64::INFINITY;
    for _ in 0..12 {
        let w = solve(u.view(), true)?;
        u = normalise(solve(w.view(), false)?);
        let mu = product(&u, false);
        let estimate = mu.dot(&mu).sqrt();
        let done = settled(estimate, sigma_min);
        sigma_min = estimate;
        if done {
            break;
        }
    }
    Ok((sigma_min, sigma_max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clarke_solve::DenseLu;
    use clarke_solve::dense::singular_values;

    #[test]
    fn estimated_extremes_match_the_svd_on_a_kkt_like_matrix() {
        // M = [[P, A^T J], [-A, I - J]] for a small QP with two active constraints.
        let m = ndarray::array![
            [2.0, 0.5, 1.0, -1.0, 0.0],
            [0.5, 1.0, 0.3, 2.0, 0.0],
            [0.0, 0.0, 1.0, 0.0, 0.0],
            [-1.0, -0.3, 0.0, 0.0, 0.0],
            [1.0, -2.0, 0.0, 0.0, 1.0]
        ];
        let m = m.t().to_owned();
        let lu = DenseLu::new(m.view()).unwrap();
        let (lo, hi) = estimated_extremes(
            m.nrows(),
            |d, mut out| out.assign(&m.dot(&d)),
            |d, mut out| out.assign(&m.t().dot(&d)),
            |d, transpose| if transpose { lu.solve_transpose(d) } else { lu.solve(d) },
        )
        .unwrap();
        let sv = singular_values(m.view()).unwrap();
        let (true_hi, true_lo) = (sv[0], sv[sv.len() - 1]);
        assert!((lo - true_lo).abs() < 1e-3 * true_lo, "{lo} vs {true_lo}");
        assert!((hi - true_hi).abs() < 1e-2 * true_hi, "{hi} vs {true_hi}");
        assert!(lo >= true_lo * (1.0 - 1e-12) && hi <= true_hi * (1.0 + 1e-12));
    }
}
