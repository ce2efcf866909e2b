//! The hypothesis check above the dense limit: singular values estimated matrix-free (products
//! by forward mode, transposed products by backward), the same walk and the same verdicts as
//! the dense check.
//!
//! The smooth layers are compared at 256 elements. The walks over kink selections run the
//! dense check once per vertex (two SVDs and an LU each, about a second apiece at that size
//! without optimisation), so their comparisons run at 96 elements: above the dense limit the
//! comparison sets, the same code path as at any size.

use std::time::Instant;

use clarke_core::{Error, KinkPolicy, Result, Tape, Var};
use clarke_implicit::{CheckOptions, CheckOutcome, HypothesisCheck, ImplicitLayer, ImplicitOptions, KinkBand};
use ndarray::{Array1, ArrayD};

/// A map `(z, theta) -> T(z, theta)` or `F(z, theta)` as a plain function.
type Map = for<'s> fn(Var<'s, f64>, &[Var<'s, f64>]) -> Result<Var<'s, f64>>;

/// A parameter (`true`) or a constant of the outer tape.
type Theta = Vec<(ArrayD<f64>, bool)>;

/// Solves the layer from `z0`, runs backward under `policy` and returns the check of its
/// report and what backward returned.
fn check_with(
    root: bool,
    map: Map,
    z0: &ArrayD<f64>,
    theta: &Theta,
    dense_limit: usize,
    policy: KinkPolicy,
) -> (HypothesisCheck, std::result::Result<(), Error>) {
    // Exact kinks: the solver band of a dense-sized layer would build and factor the block
    // once more before the check, and the kinks here are exact or far.
    let options = ImplicitOptions::default()
        .with_kink_band(KinkBand::Exact)
        .with_check(CheckOptions::default().with_dense_limit(dense_limit));
    let layer = if root {
        ImplicitLayer::root(map, options)
    } else {
        ImplicitLayer::fixed_point(map, options)
    }
    .unwrap();
    let tape = Tape::<f64>::with_policy(policy).unwrap();
    let vars: Vec<Var<'_, f64>> = theta
        .iter()
        .map(|(v, param)| {
            if *param {
                tape.param(v.clone())
            } else {
                tape.constant(v.clone())
            }
        })
        .collect();
    let z = layer.apply(z0, &vars).unwrap().z;
    let result = z.sum().backward().map(|_| ());
    (layer.reports().last().unwrap().check, result)
}

/// The dense and the matrix-free check of the same layer.
fn both(
    root: bool,
    map: Map,
    z0: &ArrayD<f64>,
    theta: &Theta,
    policy: KinkPolicy,
) -> [(HypothesisCheck, std::result::Result<(), Error>); 2] {
    let n = z0.len();
    [n + 1, n - 1].map(|limit| check_with(root, map, z0, theta, limit, policy.clone()))
}

fn relative_difference(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs())
}

/// Asserts the two checks give one verdict and one `sigma_min` (to 1e-6 relative), the
/// first dense and the second matrix-free; returns the relative difference.
fn agree(dense: &HypothesisCheck, free: &HypothesisCheck) -> f64 {
    assert!(!dense.matrix_free && dense.products == 0, "{dense}");
    assert!(free.matrix_free && free.products > 0, "{free}");
    assert_eq!(dense.outcome, free.outcome, "dense: {dense}\nmatrix-free: {free}");
    assert_eq!((dense.vertices, dense.exhaustive), (free.vertices, free.exhaustive));
    let (d, f) = (dense.sigma_min.unwrap(), free.sigma_min.unwrap());
    let rel = relative_difference(d, f);
    assert!(rel <= 1e-6, "sigma_min dense {d:e}, matrix-free {f:e} ({rel:e})");
    let (d, f) = (dense.error_bound.unwrap(), free.error_bound.unwrap());
    assert!(
        d == f || relative_difference(d, f) <= 1e-6,
        "error bound dense {d:e}, matrix-free {f:e}"
    );
    rel
}

/// `W z` for a circulant weight with dyadic entries (products with dyadic vectors are exact)
/// and `||W||_2 <= 1/2`: `1/4` on the diagonal, `-1/8` and `1/8` on the circulant
/// off-diagonals `+1` and `+7`. Three terms per element, so that products stay cheap.
fn circulant<'s>(z: Var<'s, f64>) -> Var<'s, f64> {
    let n = z.shape()[0];
    let shift = |k: usize| (0..n).map(|i| (i + k) % n).collect::<Vec<_>>();
    z * 0.25 - z.index_select(0, &shift(1)) * 0.125 + z.index_select(0, &shift(7)) * 0.125
}

/// The same weight applied to an array.
fn circulant_array(z: &Array1<f64>) -> Array1<f64> {
    let n = z.len();
    Array1::from_shape_fn(n, |i| 0.25 * z[i] - 0.125 * z[(i + 1) % n] + 0.125 * z[(i + 7) % n])
}

fn tanh_deq<'s>(z: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    Ok((circulant(z) + th[0]).tanh())
}

#[test]
fn a_tanh_deq_gets_the_same_sigma_min_and_verdict_matrix_free() {
    let n = 256;
    let x = Array1::linspace(-1.0, 1.0, n).into_dyn();
    let theta = vec![(x, true)];
    let [(dense, r1), (free, r2)] = both(false, tanh_deq, &ArrayD::zeros(vec![n]), &theta, KinkPolicy::pytorch());
    r1.unwrap();
    r2.unwrap();
    let rel = agree(&dense, &free);
    assert_eq!(free.outcome, CheckOutcome::Certified, "{free}");
    println!(
        "tanh DEQ n = {n}: sigma_min {:.12e}, relative difference {rel:.2e}",
        free.sigma_min.unwrap()
    );
}

fn relu_deq<'s>(z: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    Ok((circulant(z) + th[0]).relu())
}

/// `relu(W z + c)` with `z*` given and the pre-activation exactly 0 at `kinks`: `c = p - W z*`
/// with `p = z*` where `z* > 0`, `-1/2` elsewhere, 0 at the kinks (all dyadic, so exact).
fn planted_relu(n: usize, kinks: &[usize]) -> (ArrayD<f64>, Theta) {
    let z = Array1::from_shape_fn(n, |i| {
        if kinks.contains(&i) || i % 3 == 0 {
            0.0
        } else {
            (1 + i % 5) as f64 / 8.0
        }
    });
    let p = Array1::from_shape_fn(n, |i| {
        if kinks.contains(&i) {
            0.0
        } else if z[i] > 0.0 {
            z[i]
        } else {
            -0.5
        }
    });
    let c = &p - &circulant_array(&z);
    (z.into_dyn(), vec![(c.into_dyn(), true)])
}

#[test]
fn a_relu_deq_with_planted_kinks_gets_the_same_walk_and_verdict_matrix_free() {
    let n = 96;
    let (z_star, theta) = planted_relu(n, &[10, 50]);
    let [(dense, r1), (free, r2)] = both(false, relu_deq, &z_star, &theta, KinkPolicy::pytorch());
    r1.unwrap();
    r2.unwrap();
    assert_eq!((free.flippable, free.vertices), (2, 4), "{free}");
    let rel = agree(&dense, &free);
    // Dense: det keeps one sign; matrix-free: ||J_z|| <= ||W|| < 1 at every vertex.
    assert_eq!(free.outcome, CheckOutcome::Certified, "{free}");
    assert!(free.max_vertex_norm.unwrap() < 0.55, "{free}");
    let (d, f) = (dense.min_vertex_sigma.unwrap(), free.min_vertex_sigma.unwrap());
    assert!(relative_difference(d, f) <= 1e-6, "min vertex sigma {d:e} vs {f:e}");
    println!("relu DEQ n = {n}, 2 kinks: sigma_min relative difference {rel:.2e}");
}

/// Root form: `F(z) = z + 1/2 tanh(W z) - x`.
fn tanh_root<'s>(z: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    Ok(z + circulant(z).tanh() * 0.5 - th[0])
}

#[test]
fn a_root_layer_gets_the_same_sigma_min_and_verdict_matrix_free() {
    let n = 256;
    let x = Array1::linspace(-0.5, 0.5, n).into_dyn();
    let theta = vec![(x, true)];
    let [(dense, r1), (free, r2)] = both(true, tanh_root, &ArrayD::zeros(vec![n]), &theta, KinkPolicy::pytorch());
    r1.unwrap();
    r2.unwrap();
    let rel = agree(&dense, &free);
    assert_eq!(free.outcome, CheckOutcome::Certified, "{free}");
    println!("tanh root n = {n}: sigma_min relative difference {rel:.2e}");
}

/// `T(z) = m * (z - z^3) + (1 - m) * (tanh(z) / 2 + x)`: with `m = e_0` and `x_0 = 0`,
/// `z*_0 = 0` and `J_z` has the eigenvalue 1 there.
fn one_neutral_direction<'s>(z: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    let cubic = z - z * z * z;
    let rest = z.tanh() * 0.5 + th[2];
    Ok(th[0] * cubic + th[1] * rest)
}

/// `T(z) = m * relu(z) + (1 - m) * (tanh(z) / 2 + x)`: `z*_0 = 0` sits on the kink; the
/// policy's `relu'(0) = 0` gives an invertible block, the vertex `relu'(0) = 1` a singular one.
fn one_kinked_direction<'s>(z: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    let rest = z.tanh() * 0.5 + th[2];
    Ok(th[0] * z.relu() + th[1] * rest)
}

/// The mask `e_0`, its complement and `x` (nonzero off element 0), and the fixed point `z*`
/// of both maps above (found by the solver from `z0 = 0` elsewhere than element 0).
fn masked_theta(n: usize) -> (ArrayD<f64>, Theta) {
    let mut m = Array1::zeros(n);
    m[0] = 1.0;
    let x = Array1::from_shape_fn(n, |i| if i == 0 { 0.0 } else { 0.25 + (i % 7) as f64 / 16.0 });
    let theta = vec![
        (m.clone().into_dyn(), false),
        (m.mapv(|v| 1.0 - v).into_dyn(), false),
        (x.into_dyn(), true),
    ];
    (ArrayD::zeros(vec![n]), theta)
}

fn assert_refused(result: &std::result::Result<(), Error>) {
    assert!(matches!(result, Err(Error::HypothesisViolated { .. })), "{result:?}");
}

#[test]
fn a_selected_element_with_an_eigenvalue_one_is_violated_both_ways() {
    let n = 96;
    let (z0, theta) = masked_theta(n);
    let [(dense, r1), (free, r2)] = both(false, one_neutral_direction, &z0, &theta, KinkPolicy::pytorch());
    assert_refused(&r1);
    assert_refused(&r2);
    for c in [&dense, &free] {
        assert_eq!(c.outcome, CheckOutcome::Violated, "{c}");
        assert!(c.sigma_min.unwrap() < 1e-12, "{c}");
        assert!(c.reasons[0].contains("the selected element is singular"), "{c}");
    }
    assert!(free.matrix_free, "{free}");
}

#[test]
fn a_singular_vertex_is_found_by_the_exhaustive_matrix_free_walk() {
    let n = 96;
    let (z0, theta) = masked_theta(n);
    let [(dense, r1), (free, r2)] = both(false, one_kinked_direction, &z0, &theta, KinkPolicy::pytorch());
    assert_refused(&r1);
    assert_refused(&r2);
    for c in [&dense, &free] {
        assert_eq!(c.outcome, CheckOutcome::Violated, "{c}");
        assert!(c.exhaustive && c.vertices == 2, "{c}");
        // The selected element (relu'(0) = 0) is invertible: I - J_z = diag(1, ...).
        assert!((c.sigma_min.unwrap() - 0.5).abs() < 0.5, "{c}");
        assert!(c.min_vertex_sigma.unwrap() < 1e-12, "{c}");
        assert!(
            c.reasons[0].contains("selections") && c.reasons[0].contains("=1"),
            "{c}"
        );
    }
    assert!(free.matrix_free, "{free}");
}

/// `T(z) = m * (-2 relu(z)) + (1 - m) * (tanh(z) / 2 + x)`: at the kink `z*_0 = 0` the
/// block's entry is `1 + 2d > 0` for every `d` in `[0, 1]` (the dense walk certifies by the
/// determinant's sign), but `||J_z|| = 2` at the vertex `d = 1`.
fn one_expanding_kink<'s>(z: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    let rest = z.tanh() * 0.5 + th[2];
    Ok(th[0] * z.relu() * -2.0 + th[1] * rest)
}

#[test]
fn without_determinant_signs_an_expanding_kink_is_only_a_warning() {
    let n = 256;
    let (z0, theta) = masked_theta(n);
    let (c, result) = check_with(false, one_expanding_kink, &z0, &theta, n - 1, KinkPolicy::pytorch());
    result.unwrap();
    assert_eq!(c.outcome, CheckOutcome::Warning, "{c}");
    assert!(c.exhaustive && c.vertices == 2 && c.matrix_free, "{c}");
    assert!((c.max_vertex_norm.unwrap() - 2.0).abs() < 1e-2, "{c}");
    assert!(c.reasons.iter().any(|r| r.contains("no determinant signs")), "{c}");
}

/// `T(z) = d * z + x` with `J_z = diag(d)`: the singular values of `I - J_z` are `1 - d_i`.
fn diagonal<'s>(z: Var<'s, f64>, th: &[Var<'s, f64>]) -> Result<Var<'s, f64>> {
    Ok(th[0] * z + th[1])
}

#[test]
fn five_thousand_elements_are_certified_with_the_closed_form_sigma_min() {
    let n = 5000;
    // d in [0, 1/2], one element at 0.9: sigma_min = 0.1, sigma_max = 1.
    let d = Array1::from_shape_fn(n, |i| if i == 1234 { 0.9 } else { 0.5 * i as f64 / n as f64 });
    let x = Array1::from_shape_fn(n, |i| ((i % 11) as f64 - 5.0) / 8.0);
    let z_star = &x / &d.mapv(|v| 1.0 - v);
    let theta = [(d.into_dyn(), false), (x.into_dyn(), true)];
    let start = Instant::now();
    let layer = ImplicitLayer::fixed_point(diagonal, ImplicitOptions::default()).unwrap();
    let tape = Tape::<f64>::new();
    let vars: Vec<Var<'_, f64>> = theta
        .iter()
        .map(|(v, p)| {
            if *p {
                tape.param(v.clone())
            } else {
                tape.constant(v.clone())
            }
        })
        .collect();
    let z = layer.apply(&z_star.into_dyn(), &vars).unwrap().z;
    z.sum().backward().unwrap();
    let elapsed = start.elapsed();
    let c = layer.reports().last().unwrap().check;
    assert_eq!(c.outcome, CheckOutcome::Certified, "{c}");
    assert!(c.matrix_free, "{c}");
    let sigma = c.sigma_min.unwrap();
    assert!(
        relative_difference(sigma, 0.1) <= 1e-8,
        "sigma_min {sigma:e}, closed form 0.1"
    );
    assert!(relative_difference(c.sigma_max.unwrap(), 1.0) <= 2e-2, "{c}");
    println!(
        "n = {n}: sigma_min {sigma:.15e} (closed form 0.1), {} products, {elapsed:?} for solve and backward",
        c.products
    );
}

/// A seeded `n x n` matrix of uniform entries in `[-1, 1]` scaled to spectral norm `norm`.
fn scaled_matrix(n: usize, norm: f64, seed: u64) -> ndarray::Array2<f64> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let w = ndarray::Array2::from_shape_fn((n, n), |_| rng.random_range(-1.0..1.0));
    let top = clarke_solve::dense::singular_values(w.view()).unwrap()[0];
    w * (norm / top)
}

/// `J = diag(d) W` with the selections overriding `d` at their elements.
fn selected_d(d: &Array1<f64>, selections: &[clarke_core::ElementSelection]) -> Array1<f64> {
    let mut d = d.clone();
    for s in selections {
        d[s.element] = s.value;
    }
    d
}

/// The dense walk and the matrix-free walk of `J = diag(d) W` (`plus` added on the diagonal)
/// with relu kinks at `kinks`.
fn both_walks(
    form: clarke_implicit::check::Form,
    w: &ndarray::Array2<f64>,
    d: &Array1<f64>,
    plus: f64,
    kinks: &[usize],
) -> (HypothesisCheck, HypothesisCheck) {
    use clarke_implicit::check::{Flippable, WalkInput, walk_vertices, walk_vertices_matrix_free};
    let n = w.nrows();
    let input = WalkInput {
        form,
        flippable: kinks
            .iter()
            .map(|&element| Flippable {
                node: 0,
                element,
                low: 0.0,
                high: 1.0,
            })
            .collect(),
        kink_elements: kinks.len(),
        frozen: 0,
        within_solver_error: 0,
        forward_residual: 1e-12,
        unit: 1.0,
    };
    let options = CheckOptions::default();
    let dense = walk_vertices(&input, &options, |selections| {
        let ds = selected_d(d, selections);
        let mut j = w * &ds.view().insert_axis(ndarray::Axis(1));
        j.diag_mut().mapv_inplace(|v| v + plus);
        Ok(j)
    })
    .unwrap()
    .check;
    let free = walk_vertices_matrix_free(&input, &options, n, |selections, transpose, x, mut y| {
        let ds = selected_d(d, selections);
        let jx = if transpose {
            w.t().dot(&(&ds * &x))
        } else {
            &ds * &w.dot(&x)
        };
        y.assign(&(jx + &x * plus));
        Ok(())
    })
    .unwrap();
    (dense, free)
}

/// Asserts one verdict and `sigma_min` (selected and over the vertices) within 1e-8
/// relative; returns the largest relative difference.
fn agree_closely(dense: &HypothesisCheck, free: &HypothesisCheck) -> f64 {
    assert_eq!(dense.outcome, free.outcome, "dense: {dense}\nmatrix-free: {free}");
    assert!(free.matrix_free && free.products > 0, "{free}");
    let mut worst = relative_difference(dense.sigma_min.unwrap(), free.sigma_min.unwrap());
    if let (Some(a), Some(b)) = (dense.min_vertex_sigma, free.min_vertex_sigma) {
        worst = worst.max(relative_difference(a, b));
    }
    assert!(
        worst <= 1e-8,
        "relative difference {worst:e}\ndense: {dense}\nmatrix-free: {free}"
    );
    worst
}

#[test]
fn caller_products_walk_like_the_dense_jacobian() {
    use clarke_implicit::check::Form;
    let n = 40;
    let d = Array1::from_shape_fn(n, |i| if i % 3 == 0 { 0.0 } else { 1.0 });
    let kinks = [0, 3, 6];
    // A contraction at every vertex: certified both ways.
    let w = scaled_matrix(n, 0.8, 1);
    let (dense, free) = both_walks(Form::FixedPoint, &w, &d, 0.0, &kinks);
    assert_eq!(dense.outcome, CheckOutcome::Certified, "{dense}");
    assert_eq!(free.vertices, 8, "{free}");
    let contraction = agree_closely(&dense, &free);
    // A root block without kinks: sigma_min of diag(d) W + 3 I.
    let w = scaled_matrix(n, 1.5, 2);
    let (dense, free) = both_walks(Form::Root, &w, &d, 3.0, &[]);
    assert_eq!(dense.outcome, CheckOutcome::Certified, "{dense}");
    let root = agree_closely(&dense, &free);
    // J[5][5] = 1 alone in its row: I - J is singular when the kink at 5 selects 1.
    let mut w = scaled_matrix(n, 0.5, 3);
    w.row_mut(5).fill(0.0);
    w[[5, 5]] = 1.0;
    let mut d0 = d.clone();
    d0[5] = 0.0;
    let (dense, free) = both_walks(Form::FixedPoint, &w, &d0, 0.0, &[5]);
    assert_eq!(dense.outcome, CheckOutcome::Violated, "{dense}");
    assert_eq!(free.outcome, CheckOutcome::Violated, "{free}");
    let violated = relative_difference(dense.sigma_min.unwrap(), free.sigma_min.unwrap());
    assert!(violated <= 1e-8, "{violated:e}");
    println!(
        "caller products against dense: contraction {contraction:.1e}, root {root:.1e}, violated {violated:.1e} (relative sigma_min)"
    );
}
