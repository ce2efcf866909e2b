//! Forward mode through the fused prox and projection ops and the conic layer: every JVP is
//! the transpose of its VJP (dot tests at seeded points, off and exactly at kinks, under
//! several policies and element selections), the ledger of a JVP equals that of the
//! backward call with the same options, and JVPs match central differences off kinks.

use clarke_convex::cd::{CdOptions, Fit, solve};
use clarke_convex::cone::{
    Cone, Cones, ConicLayer, ConicLayerOptions, DerivativeOptions, box_projection, cone_program, lp,
    quadratic_cone_program,
};
use clarke_convex::hypergrad::HypergradOptions;
use clarke_convex::model::{LassoModel, Penalty};
use clarke_convex::project::{project_l1_ball, project_simplex};
use clarke_convex::prox::{group_soft_threshold, soft_threshold};
use clarke_core::{BackwardOptions, Error, KinkPolicy, Result, Tape, Var};
use clarke_implicit::{
    AdjointSolver, CheckOptions, CheckOutcome, ForwardSolver, GradientMode, HypothesisCheck, ImplicitLayer,
    ImplicitOptions,
};
use clarke_solve::FixedPointOptions;
use ndarray::{Array1, Array2, ArrayD, Axis, IxDyn, arr0, arr1, array};

use crate::cone::{planted_qp, tight};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Tolerance of the dot tests of the explicit ops.
const TOL: f64 = 1e-12;

/// Tolerance of the conic layer's dot tests: its derivative is a linear solve.
const CONIC_TOL: f64 = 1e-9;

/// A program of the parameters: records the op under test on `tape`.
type Program = dyn for<'t> Fn(&'t Tape<f64>, &[Var<'t, f64>]) -> Result<Var<'t, f64>>;

fn a1(v: &[f64]) -> ArrayD<f64> {
    arr1(v).into_dyn()
}

fn random(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.random_range(-1.0..1.0))
}

fn dot(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Records `f` on `inputs` (all parameters), draws tangents for the inputs listed in
/// `with_tangent` (the others get none) and a seed `w` like the output, and checks
/// `<J v, w> = <v, J^T w>` to `tol` with forward mode and backward under the same `options`,
/// and that both calls report the same ledger. Returns the relative error.
fn dot_test(
    name: &str,
    f: &Program,
    inputs: &[ArrayD<f64>],
    with_tangent: &[usize],
    options: impl Fn(usize) -> BackwardOptions<f64>,
    seed: u64,
    tol: f64,
) -> f64 {
    let tape = Tape::<f64>::new();
    let vars: Vec<Var<'_, f64>> = inputs.iter().map(|x| tape.param(x.clone())).collect();
    let y = f(&tape, &vars).unwrap_or_else(|e| panic!("{name}: {e}"));
    // The options may name the output node (element selections).
    let options = options(y.id());
    let v: Vec<ArrayD<f64>> = inputs
        .iter()
        .enumerate()
        .map(|(i, x)| {
            if with_tangent.contains(&i) {
                random(x.shape(), seed * 31 + i as u64)
            } else {
                ArrayD::zeros(x.shape())
            }
        })
        .collect();
    let w = random(&y.shape(), seed * 31 + 17);
    let pairs: Vec<(Var<'_, f64>, ArrayD<f64>)> = with_tangent.iter().map(|&i| (vars[i], v[i].clone())).collect();
    let jvp = y.jvp(&pairs, &options).unwrap_or_else(|e| panic!("{name}: jvp: {e}"));
    let grads = y
        .backward_with(&options.clone().with_seed(w.clone()))
        .unwrap_or_else(|e| panic!("{name}: backward: {e}"));
    let lhs = dot(jvp.tangent(), &w);
    let rhs: f64 = vars
        .iter()
        .zip(&v)
        .map(|(x, v)| grads.wrt(*x).map_or(0.0, |g| dot(v, g)))
        .sum();
    let scale = lhs.abs().max(rhs.abs());
    assert!(scale > 0.0, "{name}: both products are 0");
    let rel = (lhs - rhs).abs() / scale;
    assert!(
        rel <= tol,
        "{name}: <Jv, w> = {lhs:e}, <v, J^T w> = {rhs:e}, relative error {rel:e}"
    );
    assert_eq!(jvp.ledger(), grads.ledger(), "{name}: ledgers differ");
    rel
}

/// The policies of the kink tests: the selection `q` = 0, 1 and 1/2 at soft-threshold and
/// relu-type kinks.
fn policies() -> Vec<KinkPolicy> {
    [0.0, 1.0, 0.5]
        .into_iter()
        .map(|q| KinkPolicy::pytorch().with_soft_threshold(q).with_relu(q))
        .collect()
}

/// Dot tests of `f` at `inputs` under every policy of [`policies`], then under one policy
/// with element selections at `selected` (flat indices of the op's output elements or
/// groups), each with tangents of every input, then of each input alone. Returns the worst
/// relative error and checks that the ledgers saw `kinks` exact kinks.
fn dot_tests_at(name: &str, f: &Program, inputs: &[ArrayD<f64>], selected: &[usize], kinks: usize) -> f64 {
    let mut tangent_sets: Vec<Vec<usize>> = vec![(0..inputs.len()).collect()];
    if inputs.len() > 1 {
        tangent_sets.extend((0..inputs.len()).map(|i| vec![i]));
    }
    let mut worst = 0.0f64;
    let mut seed = 1;
    for listed in &tangent_sets {
        for policy in policies() {
            let options = |_| BackwardOptions::policy(policy.clone());
            worst = worst.max(dot_test(name, f, inputs, listed, options, seed, TOL));
            seed += 1;
        }
        let selections = |node| {
            selected
                .iter()
                .zip([0.25, 0.75, 1.0, 0.0])
                .fold(BackwardOptions::policy(KinkPolicy::midpoint()), |o, (&e, q)| {
                    o.with_element_selection(node, e, q)
                })
        };
        worst = worst.max(dot_test(name, f, inputs, listed, selections, seed, TOL));
        seed += 1;
    }
    // The ledger of either mode lists the kinks.
    let tape = Tape::<f64>::new();
    let vars: Vec<Var<'_, f64>> = inputs.iter().map(|x| tape.param(x.clone())).collect();
    let y = f(&tape, &vars).unwrap();
    let pairs: Vec<(Var<'_, f64>, ArrayD<f64>)> = vars.iter().map(|x| (*x, x.value())).collect();
    let jvp = y.jvp(&pairs, &BackwardOptions::default()).unwrap();
    assert_eq!(
        jvp.ledger().exact_hits(),
        kinks,
        "{name}: exact kinks in the jvp ledger"
    );
    worst
}

/// `(f(theta + h v) - f(theta - h v)) / 2h` against the JVP at seeded tangents, to 1e-7
/// relative to the tangent's largest entry.
fn central_difference_test(name: &str, f: &Program, inputs: &[ArrayD<f64>], seed: u64) {
    let eval = |theta: &[ArrayD<f64>]| -> ArrayD<f64> {
        let tape = Tape::<f64>::new();
        let vars: Vec<Var<'_, f64>> = theta.iter().map(|x| tape.param(x.clone())).collect();
        f(&tape, &vars).unwrap().value()
    };
    let v: Vec<ArrayD<f64>> = inputs
        .iter()
        .enumerate()
        .map(|(i, x)| random(x.shape(), seed + i as u64))
        .collect();
    let h = 1e-6;
    let at = |s: f64| -> Vec<ArrayD<f64>> { inputs.iter().zip(&v).map(|(t, v)| t + &(v * s)).collect() };
    let fd = (eval(&at(h)) - eval(&at(-h))) / (2.0 * h);
    let tape = Tape::<f64>::new();
    let vars: Vec<Var<'_, f64>> = inputs.iter().map(|x| tape.param(x.clone())).collect();
    let y = f(&tape, &vars).unwrap();
    let pairs: Vec<(Var<'_, f64>, ArrayD<f64>)> = vars.iter().copied().zip(v.iter().cloned()).collect();
    let jvp = y.jvp(&pairs, &BackwardOptions::default()).unwrap();
    assert!(jvp.ledger().records().iter().all(|r| r.exact == 0), "{name}: off kinks");
    let scale = jvp.tangent().iter().fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(scale > 0.0, "{name}: zero tangent");
    let err = (jvp.tangent() - &fd).iter().fold(0.0f64, |m, x| m.max(x.abs())) / scale;
    assert!(
        err <= 1e-7,
        "{name}: jvp vs central differences: relative error {err:e}"
    );
}

fn soft_threshold_op<'t>(_: &'t Tape<f64>, v: &[Var<'t, f64>]) -> Result<Var<'t, f64>> {
    Ok(soft_threshold(v[0], v[1])?.out)
}

/// Three groups: `[0, 2)`, `[2, 4)`, `[4, 6)`.
fn group_op<'t>(_: &'t Tape<f64>, v: &[Var<'t, f64>]) -> Result<Var<'t, f64>> {
    Ok(group_soft_threshold(v[0], v[1], &[0..2, 2..4, 4..6])?.out)
}

fn simplex_op<'t>(_: &'t Tape<f64>, v: &[Var<'t, f64>]) -> Result<Var<'t, f64>> {
    Ok(project_simplex(v[0], 1.0)?.out)
}

fn l1_ball_op<'t>(_: &'t Tape<f64>, v: &[Var<'t, f64>]) -> Result<Var<'t, f64>> {
    Ok(project_l1_ball(v[0], 2.0)?.out)
}

#[test]
fn soft_threshold_dot_tests_off_and_at_kinks() {
    let mut worst = 0.0f64;
    // Off kinks, scalar and per-element thresholds.
    let u = a1(&[2.0, -0.3, -1.7, 0.9, 0.2]);
    for lambda in [arr0(0.5).into_dyn(), a1(&[0.5, 0.1, 2.0, 0.4, 0.3])] {
        worst = worst.max(dot_tests_at(
            "soft_threshold off kinks",
            &soft_threshold_op,
            &[u.clone(), lambda],
            &[],
            0,
        ));
    }
    // Exactly at kinks: |u_1| == |u_3| == lambda (scalar), |u_0| == lambda_0 and
    // |u_2| == lambda_2 (per element).
    let at_scalar = [a1(&[3.0, -1.0, 0.25, 1.0]), arr0(1.0).into_dyn()];
    worst = worst.max(dot_tests_at(
        "soft_threshold at kinks",
        &soft_threshold_op,
        &at_scalar,
        &[1, 3],
        2,
    ));
    let at_vector = [a1(&[0.5, -2.0, -0.7, 0.1]), a1(&[0.5, 1.0, 0.7, 0.3])];
    worst = worst.max(dot_tests_at(
        "soft_threshold at kinks, per-element lambda",
        &soft_threshold_op,
        &at_vector,
        &[0, 2],
        2,
    ));
    // The tangent at the kinks is q du (and -q sign(u) dlambda), as backward gives.
    for q in [0.0, 1.0, 0.5] {
        let tape = Tape::<f64>::new();
        let u = tape.param(at_scalar[0].clone());
        let lambda = tape.param(at_scalar[1].clone());
        let y = soft_threshold(u, lambda).unwrap().out;
        let options = BackwardOptions::policy(KinkPolicy::pytorch().with_soft_threshold(q));
        let jvp = y.jvp(&[(u, a1(&[1.0, 1.0, 1.0, 1.0]))], &options).unwrap();
        assert_eq!(jvp.tangent(), &a1(&[1.0, q, 0.0, q]));
        let jvp = y.jvp(&[(lambda, arr0(1.0).into_dyn())], &options).unwrap();
        assert_eq!(jvp.tangent(), &a1(&[-1.0, q, 0.0, -q]));
    }
    println!("soft_threshold: worst dot-test relative error {worst:e}");
}

#[test]
fn soft_threshold_jvp_matches_central_differences() {
    let u = a1(&[2.0, -0.3, -1.7, 0.9, 0.2]);
    central_difference_test(
        "soft_threshold",
        &soft_threshold_op,
        &[u.clone(), arr0(0.5).into_dyn()],
        3,
    );
    central_difference_test(
        "soft_threshold, per-element lambda",
        &soft_threshold_op,
        &[u, a1(&[0.5, 0.1, 1.0, 0.4, 0.3])],
        5,
    );
}

#[test]
fn group_soft_threshold_dot_tests_off_and_at_kinks() {
    let mut worst = 0.0f64;
    // Off kinks: one active group, one inactive, one with a zero threshold (the identity).
    let off = [a1(&[0.3, -1.2, 0.1, 0.2, 0.7, -0.4]), a1(&[0.5, 0.5, 0.0])];
    worst = worst.max(dot_tests_at("group_soft_threshold off kinks", &group_op, &off, &[], 0));
    let off_scalar = [a1(&[0.3, -1.2, 0.1, 0.2, 0.7, -0.4]), arr0(0.5).into_dyn()];
    worst = worst.max(dot_tests_at(
        "group_soft_threshold off kinks, scalar lambda",
        &group_op,
        &off_scalar,
        &[],
        0,
    ));
    // Group 0 has ||u_0|| == 5 == lambda_0; group 1 is active, group 2 has lambda 0.
    let at = [a1(&[3.0, -4.0, 1.0, 0.0, 0.1, 0.2]), a1(&[5.0, 0.5, 0.0])];
    worst = worst.max(dot_tests_at("group_soft_threshold at a kink", &group_op, &at, &[0], 1));
    // Groups 0 and 1 both at a shared lambda of 5, group 2 active.
    let at_scalar = [a1(&[3.0, -4.0, 0.0, 5.0, 6.0, 8.0]), arr0(5.0).into_dyn()];
    worst = worst.max(dot_tests_at(
        "group_soft_threshold at kinks, scalar lambda",
        &group_op,
        &at_scalar,
        &[0, 1],
        2,
    ));
    println!("group_soft_threshold: worst dot-test relative error {worst:e}");
}

#[test]
fn group_soft_threshold_jvp_matches_central_differences() {
    let u = a1(&[0.3, -1.2, 0.1, 0.2, 0.7, -0.4]);
    central_difference_test(
        "group_soft_threshold",
        &group_op,
        &[u.clone(), a1(&[0.5, 0.1, 0.05])],
        7,
    );
    central_difference_test(
        "group_soft_threshold, scalar lambda",
        &group_op,
        &[u, arr0(0.2).into_dyn()],
        9,
    );
}

#[test]
fn projection_dot_tests_off_and_at_kinks() {
    let mut worst = 0.0f64;
    let off = [a1(&[0.9, 0.35, -0.2, 0.6, -1.1])];
    worst = worst.max(dot_tests_at("project_simplex off kinks", &simplex_op, &off, &[], 0));
    worst = worst.max(dot_tests_at("project_l1_ball off kinks", &l1_ball_op, &off, &[], 0));
    // Inside the l1 ball: the identity, no kinks.
    worst = worst.max(dot_tests_at(
        "project_l1_ball inside",
        &l1_ball_op,
        &[a1(&[0.3, -0.5, 0.2])],
        &[],
        0,
    ));
    // u_2 == tau == 0 for the simplex of radius 1 (two active coordinates, so that the
    // Jacobian is not 0 at q = 0); |u_2| == |u_3| == tau == 1/2 for the l1 ball of radius 2.
    let at_simplex = [a1(&[0.625, 0.375, 0.0, -1.0])];
    worst = worst.max(dot_tests_at(
        "project_simplex at a kink",
        &simplex_op,
        &at_simplex,
        &[2],
        1,
    ));
    let at_l1 = [a1(&[1.75, -1.25, 0.5, -0.5, 0.125])];
    worst = worst.max(dot_tests_at(
        "project_l1_ball at kinks",
        &l1_ball_op,
        &at_l1,
        &[2, 3],
        2,
    ));
    println!("projections: worst dot-test relative error {worst:e}");
}

#[test]
fn projection_jvps_match_central_differences() {
    let u = a1(&[0.9, 0.35, -0.2, 0.6, -1.1]);
    central_difference_test("project_simplex", &simplex_op, std::slice::from_ref(&u), 11);
    central_difference_test("project_l1_ball", &l1_ball_op, &[u], 13);
    central_difference_test("project_l1_ball inside", &l1_ball_op, &[a1(&[0.3, -0.5, 0.2])], 15);
}

/// The conic layer with a tight solver, its output `which` (0: x, 1: y, 2: s).
fn conic_output<'t>(out: ConicLayer<'t, f64>, which: usize) -> Var<'t, f64> {
    [out.x, out.y, out.s][which]
}

fn conic_options() -> ConicLayerOptions {
    ConicLayerOptions::default().with_solver(tight())
}

/// The LP vertex of `min -x_1 - 2 x_2` over `x_1 + x_2 <= 4`, `x_1 + 3 x_2 <= 6`, `x >= 0`
/// (nondegenerate, multipliers `(1/2, 1/2)`): its `A`, `b`, `c` and cones.
fn vertex_lp() -> ([ArrayD<f64>; 3], Cones) {
    let g = array![[1.0, 1.0], [1.0, 3.0], [-1.0, 0.0], [0.0, -1.0]];
    let h = array![4.0, 6.0, 0.0, 0.0];
    let prog = lp(array![-1.0, -2.0].view(), Some((g.view(), h.view())), None).unwrap();
    ([prog.a.into_dyn(), prog.b.into_dyn(), prog.c.into_dyn()], prog.cones)
}

#[test]
fn conic_layer_dot_tests_and_ledgers() {
    let mut worst = 0.0f64;
    let all = |_| BackwardOptions::default();
    // A strictly convex QP with P, A, b, c on the tape.
    let pl = planted_qp(9, 5, 7, 3);
    let cones = pl.prog.cones.clone();
    let qp_inputs = [
        pl.prog.p.clone().unwrap().into_dyn(),
        pl.prog.a.clone().into_dyn(),
        pl.prog.b.clone().into_dyn(),
        pl.prog.c.clone().into_dyn(),
    ];
    for which in 0..3 {
        let cones = cones.clone();
        let f: &Program = &move |_, v| {
            let out = quadratic_cone_program(v[0], v[1], v[2], v[3], &cones, &conic_options())?;
            Ok(conic_output(out, which))
        };
        for listed in [vec![0, 1, 2, 3], vec![2], vec![0, 3]] {
            worst = worst.max(dot_test(
                "conic QP",
                f,
                &qp_inputs,
                &listed,
                all,
                40 + which as u64,
                CONIC_TOL,
            ));
        }
    }
    // The LP vertex.
    let (lp_inputs, lp_cones) = vertex_lp();
    for which in 0..3 {
        let cones = lp_cones.clone();
        let f: &Program = &move |_, v| {
            Ok(conic_output(
                cone_program(v[0], v[1], v[2], &cones, &conic_options())?,
                which,
            ))
        };
        worst = worst.max(dot_test(
            "conic LP",
            f,
            &lp_inputs,
            &[0, 1, 2],
            all,
            50 + which as u64,
            CONIC_TOL,
        ));
    }
    // A batch of three costs sharing P, A and b: batched tangents of c, shared ones of b.
    let costs = ndarray::stack![Axis(0), pl.prog.c, &pl.prog.c * 0.5, &pl.prog.c * -1.0];
    let batch_inputs = [
        qp_inputs[0].clone(),
        qp_inputs[1].clone(),
        qp_inputs[2].clone(),
        costs.into_dyn(),
    ];
    let f: &Program = &move |_, v| Ok(quadratic_cone_program(v[0], v[1], v[2], v[3], &cones, &conic_options())?.x);
    worst = worst.max(dot_test(
        "conic QP batch",
        f,
        &batch_inputs,
        &[0, 1, 2, 3],
        all,
        60,
        CONIC_TOL,
    ));
    // A weakly active box constraint (y_0 = s_0 = 0): a kink of the projection, selected by
    // relu'(0) in both modes, under every policy.
    let bp = box_projection(array![1.0, 0.2].view(), -1.0, 1.0).unwrap();
    let box_inputs = [
        bp.p.clone().unwrap().into_dyn(),
        bp.a.clone().into_dyn(),
        bp.b.clone().into_dyn(),
        bp.c.clone().into_dyn(),
    ];
    let box_cones = bp.cones.clone();
    let f: &Program = &move |_, v| Ok(quadratic_cone_program(v[0], v[1], v[2], v[3], &box_cones, &conic_options())?.x);
    for (k, policy) in policies().into_iter().enumerate() {
        let options = |_| BackwardOptions::policy(policy.clone());
        worst = worst.max(dot_test(
            "conic box QP at a kink",
            f,
            &box_inputs,
            &[0, 1, 2, 3],
            options,
            70 + k as u64,
            CONIC_TOL,
        ));
    }
    let tape = Tape::<f64>::new();
    let vars: Vec<Var<'_, f64>> = box_inputs.iter().map(|x| tape.param(x.clone())).collect();
    let x = f(&tape, &vars).unwrap();
    let jvp = x
        .jvp(&[(vars[3], box_inputs[3].clone())], &BackwardOptions::default())
        .unwrap();
    let kinks: usize = jvp
        .ledger()
        .records()
        .iter()
        .map(|r| r.exact + r.within_solver_error)
        .sum();
    assert_eq!(kinks, 1, "the weakly active constraint is in the jvp ledger");
    println!("conic layer: worst dot-test relative error {worst:e}");
}

#[test]
fn conic_layer_jvp_matches_central_differences() {
    let pl = planted_qp(2, 4, 6, 2);
    let cones = pl.prog.cones.clone();
    let inputs = [
        pl.prog.p.clone().unwrap().into_dyn(),
        pl.prog.a.clone().into_dyn(),
        pl.prog.b.clone().into_dyn(),
        pl.prog.c.clone().into_dyn(),
    ];
    // A symmetric tangent of P keeps the program a QP.
    let f: &Program = &move |_, v| {
        let p = (v[0] + v[0].t()) * 0.5;
        Ok(quadratic_cone_program(p, v[1], v[2], v[3], &cones, &conic_options())?.x)
    };
    central_difference_test("conic QP", f, &inputs, 21);
}

#[test]
fn conic_layer_jvp_refuses_a_violated_check_as_backward() {
    // The degenerate LP at c = 0 (a whole edge optimal) as sample 1 of a batch of three.
    let g = array![[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]];
    let h = array![3.0, 5.0, 0.0, 0.0];
    let cones = Cones::new(vec![Cone::NonNeg(4)]).unwrap();
    let tape = Tape::<f64>::new();
    let a = tape.constant(g.into_dyn());
    let b = tape.constant(h.into_dyn());
    let costs = array![[-1.0, -1.0], [0.0, 0.0], [6.0, 6.0]].into_dyn();
    let c = tape.param(costs.clone());
    let out = cone_program(a, b, c, &cones, &ConicLayerOptions::default()).unwrap();
    let err = out
        .x
        .jvp(&[(c, costs.clone())], &BackwardOptions::default())
        .unwrap_err();
    match &err {
        Error::HypothesisViolated { node, .. } => assert!(node.contains("sample 1 of 3"), "{node}"),
        other => panic!("expected a violated hypothesis, got {other}"),
    }
    let report = out.log.last().unwrap();
    assert_eq!((report.certified, report.violated), (2, 1));
    assert_eq!(report.first_uncertified().unwrap().1.outcome(), CheckOutcome::Violated);

    // With the check off the product goes through, as backward does.
    let tape = Tape::<f64>::new();
    let a = tape.constant(array![[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]].into_dyn());
    let b = tape.constant(array![3.0, 5.0, 0.0, 0.0].into_dyn());
    let c = tape.param(array![0.0, 0.0].into_dyn());
    let opts = ConicLayerOptions::default().with_derivative(DerivativeOptions::unchecked());
    let out = cone_program(a, b, c, &cones, &opts).unwrap();
    let jvp = out
        .x
        .jvp(&[(c, array![1.0, -1.0].into_dyn())], &BackwardOptions::default())
        .unwrap();
    assert!(jvp.tangent().iter().all(|v| v.is_finite()));
    assert_eq!(out.log.last().unwrap().not_checked, 1);
}

/// The Lasso forward-backward layer `T(beta, theta) = S_{gamma e^theta}(beta - gamma w X^T
/// (X beta - y))` (the layer of the implicit hypergradient, squared loss) with the given
/// check options: its hypothesis check after one backward pass.
fn lasso_layer_check(model: &LassoModel, fit: &Fit, check: CheckOptions) -> HypothesisCheck {
    let gamma = HypergradOptions::default().step_for(model).unwrap();
    let (w, l2) = (model.weight(), model.l2());
    let options = ImplicitOptions::default()
        .with_name("lasso forward-backward")
        .with_forward_solver(ForwardSolver::Anderson)
        .with_forward(FixedPointOptions::default().with_tol(1e-12).with_max_iter(1_000))
        .with_mode(GradientMode::Implicit(AdjointSolver::Dense))
        .with_warm_start(false)
        .with_check(check);
    let layer = ImplicitLayer::fixed_point(
        move |z, th| {
            let (log_lambda, x, y) = (th[0], th[1], th[2]);
            let r = x.try_matmul(z)?.try_sub(y)?;
            let u = z - (r.try_matmul(x)? * w + z * l2) * gamma;
            Ok(soft_threshold(u, log_lambda.exp() * gamma)?.out)
        },
        options,
    )
    .unwrap();
    let tape = Tape::<f64>::new();
    let Penalty::Uniform(lambda) = fit.penalty else {
        unreachable!("a uniform penalty")
    };
    let log_lambda = tape.param(arr0(lambda.ln()).into_dyn());
    let x = tape.constant(model.x().into_dyn());
    let y = tape.constant(model.y().to_owned().into_dyn());
    let solution = layer.apply(&fit.beta.clone().into_dyn(), &[log_lambda, x, y]).unwrap();
    solution.z.sum().backward().unwrap();
    layer.reports().last().unwrap().check
}

#[test]
fn lasso_implicit_layer_gets_a_matrix_free_check_that_agrees_with_the_dense_one() {
    let (n, p) = (40, 30);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let x = Array2::from_shape_simple_fn((n, p), || rng.random_range(-1.0..1.0));
    let truth = Array1::from_shape_fn(p, |j| if j < 5 { 1.0 + j as f64 } else { 0.0 });
    let y = x.dot(&truth) + Array1::from_shape_simple_fn(n, || 0.1 * rng.random_range(-1.0..1.0));
    let model = LassoModel::new(x.view(), y.view()).unwrap();
    let lambda_max = model.weight() * x.t().dot(&y).iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let cd = CdOptions::default().with_tol(1e-15).with_max_epochs(1_000_000);
    let fit = solve(&model, &Penalty::Uniform(0.1 * lambda_max), None, &cd).unwrap();
    let support = fit.beta.iter().filter(|b| **b != 0.0).count();
    assert!(support > 0 && support < p, "support {support}");

    let dense = lasso_layer_check(&model, &fit, CheckOptions::default());
    // `p` above the dense limit: the check runs on products by forward mode and backward,
    // through the soft-threshold's JVP.
    let matrix_free = lasso_layer_check(&model, &fit, CheckOptions::default().with_dense_limit(p / 3));
    assert!(!dense.matrix_free, "{dense:?}");
    assert!(matrix_free.matrix_free, "{matrix_free:?}");
    assert!(matrix_free.spectral_radius.is_none(), "{matrix_free:?}");
    assert_eq!(matrix_free.outcome, dense.outcome, "{dense:?}\n{matrix_free:?}");
    let (a, b) = (dense.sigma_min.unwrap(), matrix_free.sigma_min.unwrap());
    println!("sigma_min: dense {a:e}, matrix-free {b:e}, outcome {:?}", dense.outcome);
    assert!((a - b).abs() <= 1e-6 * a, "sigma_min: dense {a:e}, matrix-free {b:e}");
}
