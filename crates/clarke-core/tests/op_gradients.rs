//! Every op against finite differences, in f64, at seeded random points away from kinks.
//!
//! `gradcheck` compares the full Jacobian from backward with central differences and refuses
//! (rather than passing by accident) if a perturbation crosses a kink, so a pass here means
//! every entry matched. The cases are the table of `op_cases`, which the forward-mode dot
//! tests share.

use clarke_core::{GradcheckOptions, Tape, gradcheck};
use ndarray::{ArrayD, IxDyn};

use crate::op_cases::{self, Case, random};

fn check_all(cases: Vec<Case>) {
    for (name, f, inputs) in cases {
        let report = gradcheck(f, &inputs, &GradcheckOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(report.compared > 0, "{name}: nothing compared");
    }
}

op_cases::test_every_table!(check_all);

#[test]
fn sigmoid_and_softplus_are_stable_far_out() {
    fn run<S: clarke_core::Scalar>() {
        let tape = Tape::<S>::new();
        let x = tape.param(
            ArrayD::from_shape_vec(IxDyn(&[2]), vec![S::from_f64_lossy(-800.0), S::from_f64_lossy(800.0)]).unwrap(),
        );
        let y = (x.sigmoid() + x.softplus()).sum();
        assert!(y.scalar().is_finite());
        let g = y.backward().unwrap();
        let g = g.wrt(x).unwrap();
        assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
        // d/dx (sigmoid + softplus) = s(1 - s) + s: ~0 at -800, ~1 at 800.
        assert!(g[[0]].to_f64_exact().abs() < 1e-12);
        assert!((g[[1]].to_f64_exact() - 1.0).abs() < 1e-6);
    }
    run::<f32>();
    run::<f64>();
}

#[test]
fn matmul_values_match_a_triple_loop() {
    let (a, b) = (random(&[3, 5], 1, -1.0, 1.0), random(&[5, 4], 2, -1.0, 1.0));
    let tape = Tape::<f64>::new();
    let c = tape.constant(a.clone()).matmul(tape.constant(b.clone())).value();
    for i in 0..3 {
        for j in 0..4 {
            let want: f64 = (0..5).map(|k| a[[i, k]] * b[[k, j]]).sum();
            assert!((c[[i, j]] - want).abs() < 1e-14);
        }
    }
}

#[test]
fn index_select_scatter_adds_multiplicities() {
    let tape = Tape::<f64>::new();
    let x = tape.param(random(&[3, 2], 1, -1.0, 1.0));
    let y = x.index_select(0, &[2, 0, 2, 2]).sum();
    let g = y.backward().unwrap();
    let g = g.wrt(x).unwrap();
    assert_eq!(g.as_slice().unwrap(), &[1.0, 1.0, 0.0, 0.0, 3.0, 3.0]);
}

#[test]
fn loss_values_match_their_formulas() {
    let logits = random(&[3, 4], 1, -2.0, 2.0);
    let labels = [1usize, 3, 0];
    let tape = Tape::<f64>::new();
    let x = tape.constant(logits.clone());
    let lsm = x.log_softmax(1).value();
    for r in 0..3 {
        let s: f64 = (0..4).map(|c| lsm[[r, c]].exp()).sum();
        assert!((s - 1.0).abs() < 1e-12);
    }
    let ce = x.softmax_cross_entropy(&labels).scalar();
    let want: f64 = labels
        .iter()
        .enumerate()
        .map(|(r, &l)| {
            let z: f64 = (0..4).map(|c| logits[[r, c]].exp()).sum();
            z.ln() - logits[[r, l]]
        })
        .sum::<f64>()
        / 3.0;
    assert!((ce - want).abs() < 1e-12);
    let (a, b) = (random(&[5], 2, -1.0, 1.0), random(&[5], 3, -1.0, 1.0));
    let mse = tape.constant(a.clone()).mse(tape.constant(b.clone())).scalar();
    let want = a.iter().zip(b.iter()).map(|(p, q)| (p - q) * (p - q)).sum::<f64>() / 5.0;
    assert!((mse - want).abs() < 1e-14);
}
