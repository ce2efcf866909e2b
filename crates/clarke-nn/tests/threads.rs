//! Thread safety: the same small models trained on three threads at once, each thread owning
//! its tape, parameters and optimiser, end bit for bit where a single-threaded run ends; and
//! a compile-time record of which public types are `Send` / `Sync`.
//!
//! Why this holds (read from the types, and checked at compile time below):
//!
//! - [`Tape`] is neither `Sync` nor `Send`. It keeps its nodes, policy and anomaly state in
//!   `RefCell` / `Cell` (interior mutability without locks: not `Sync`), and a node may hold
//!   a custom op's VJP as `Box<dyn Fn ...>` with no `Send` bound (`Op::Custom`, see
//!   `clarke_core::custom`), so a tape cannot even move to another thread. A [`Var`] is a
//!   `&Tape` plus a node id, hence neither `Send` nor `Sync` either, and nor is
//!   [`Bound`]. A tape is owned by one thread: create it on the thread that records on it.
//! - [`DeqLayer`] is neither `Send` nor `Sync`: it logs its backward reports in a
//!   `ReportLog` (an `Rc<RefCell<..>>` shared with the tape's custom node) and warm-starts
//!   its power iteration from a `RefCell`. Build one per thread (from the same seed to get the
//!   same layer).
//! - Everything that describes or results from a computation is plain data, `Send + Sync`:
//!   [`ParamSet`], [`Grads`], [`KinkPolicy`], [`KinkLedger`], [`KinkRecord`],
//!   [`BackwardOptions`], [`Error`], the optimisers, [`Linear`], [`DeqConfig`], [`Dataset`].
//!   Parameters and gradients can be sent between threads, and shared read-only.
//! - Neither crate has global mutable state; the rayon pool used inside large kernels, large
//!   matrix products and the DEQ's row blocks is the process-wide one, and the split of work
//!   over it depends only on its size, so results do not depend on which thread calls in.

use std::sync::Barrier;

use clarke_core::{
    BackwardOptions, Error, GradcheckOptions, Grads, KinkLedger, KinkPolicy, KinkRecord, Scalar, Tape, TieRule, Var,
};
use clarke_nn::deq::{DeqConfig, DeqLayer};
use clarke_nn::optim::{Adam, Optimizer, Schedule, Sgd};
use clarke_nn::{Bound, Linear, ParamId, ParamSet};
use ndarray::{Array2, ArrayD};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const THREADS: usize = 3;
const SEED: u64 = 2024;

// ------------------------------------------------------------------------------------------
// Send / Sync, checked when this file compiles
// ------------------------------------------------------------------------------------------

fn assert_send<T: Send>() {}
fn assert_sync<T: Sync>() {}

/// Compiles only if `$t` does NOT implement `$trait` (the auto-trait ambiguity trick of the
/// `static_assertions` crate: when `$t: $trait`, both impls apply and the call is ambiguous).
macro_rules! assert_not_impl {
    ($t:ty, $trait:path) => {
        const _: fn() = || {
            trait AmbiguousIfImpl<A> {
                fn some_item() {}
            }
            impl<T: ?Sized> AmbiguousIfImpl<()> for T {}
            #[allow(dead_code)]
            struct Invalid;
            impl<T: ?Sized + $trait> AmbiguousIfImpl<Invalid> for T {}
            let _ = <$t as AmbiguousIfImpl<_>>::some_item;
        };
    };
}

// A tape is owned by one thread: interior mutability (RefCell / Cell) makes it !Sync, and a
// custom op's boxed VJP closure (no Send bound) makes it !Send.
assert_not_impl!(Tape<f64>, Sync);
assert_not_impl!(Tape<f64>, Send);
assert_not_impl!(Tape<f32>, Sync);
// A Var borrows its tape: !Send and !Sync, like &Tape.
assert_not_impl!(Var<'static, f64>, Sync);
assert_not_impl!(Var<'static, f64>, Send);
assert_not_impl!(Bound<'static, f64>, Send);
// A DEQ layer shares its report log with the tape through an Rc.
assert_not_impl!(DeqLayer<f64>, Send);
assert_not_impl!(DeqLayer<f64>, Sync);
// So do the implicit layers and their report log (Rc handles shared with the tape).
assert_not_impl!(clarke_implicit::ReportLog, Send);
assert_not_impl!(clarke_implicit::ReportLog, Sync);
assert_not_impl!(clarke_implicit::ImplicitLayer<f64>, Send);
assert_not_impl!(clarke_implicit::ImplicitLayer<f64>, Sync);

#[test]
fn data_types_are_send_and_sync() {
    fn both<T: Send + Sync>() {
        assert_send::<T>();
        assert_sync::<T>();
    }
    both::<ParamSet<f64>>();
    both::<ParamSet<f32>>();
    both::<ParamId>();
    both::<Grads<f64>>();
    both::<Grads<f32>>();
    both::<KinkPolicy>();
    both::<TieRule>();
    both::<KinkLedger>();
    both::<KinkRecord>();
    both::<clarke_core::Selection>();
    both::<clarke_core::ElementSelection>();
    both::<BackwardOptions<f64>>();
    both::<GradcheckOptions>();
    both::<Error>();
    both::<Linear>();
    both::<Sgd<f64>>();
    both::<Adam<f32>>();
    both::<Schedule>();
    both::<DeqConfig>();
    both::<clarke_nn::data::Dataset>();
    both::<clarke_nn::data::Scaler>();
}

// ------------------------------------------------------------------------------------------
// Training runs
// ------------------------------------------------------------------------------------------

/// What a run ends with: parameters, the loss and exact kink hits of every step, the ledger
/// of the last backward.
struct Run<S: Scalar> {
    params: ParamSet<S>,
    losses: Vec<S>,
    kink_hits: Vec<usize>,
    ledger: KinkLedger,
}

/// The bits of every parameter value (so that -0.0 vs 0.0 or NaN payloads would show).
fn bits<S: Scalar>(p: &ParamSet<S>) -> Vec<Vec<u64>> {
    p.values()
        .iter()
        .map(|v| v.iter().map(|x| x.to_f64_exact().to_bits()).collect())
        .collect()
}

fn assert_same<S: Scalar>(what: &str, a: &Run<S>, b: &Run<S>) {
    assert_eq!(bits(&a.params), bits(&b.params), "{what}: parameters differ");
    let lb: Vec<u64> = a.losses.iter().map(|l| l.to_f64_exact().to_bits()).collect();
    let lb2: Vec<u64> = b.losses.iter().map(|l| l.to_f64_exact().to_bits()).collect();
    assert_eq!(lb, lb2, "{what}: loss histories differ");
    assert_eq!(a.kink_hits, b.kink_hits, "{what}: kink hits differ");
    assert_eq!(a.ledger, b.ledger, "{what}: last ledgers differ");
}

/// A seeded three-class problem: `rows` points in `d` dimensions on a 1/8 grid, labelled by
/// the sign pattern of two coordinates. Every 8th row is zero: with a zero bias its relu
/// pre-activations sit exactly on the kink.
fn data<S: Scalar>(rows: usize, d: usize, seed: u64) -> (Array2<S>, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut x = Array2::from_shape_fn((rows, d), |_| {
        S::from_f64_lossy(f64::from(rng.random_range(-8i32..=8)) / 8.0)
    });
    for mut row in x.outer_iter_mut().step_by(8) {
        row.fill(S::zero());
    }
    let y = x
        .outer_iter()
        .map(|r| match (r[0] > S::zero(), r[1] > S::zero()) {
            (true, true) => 0,
            (false, false) => 1,
            _ => 2,
        })
        .collect();
    (x, y)
}

/// Linear(4 -> 16) + relu + Linear(16 -> 3) + softmax cross-entropy, SGD with momentum on
/// seeded mini-batches; everything owned by the calling thread.
fn train_mlp<S: Scalar>(steps: usize) -> Run<S> {
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let mut params = ParamSet::<S>::new();
    let l1 = Linear::new(&mut params, "l1", 4, 16, &mut rng).unwrap();
    let l2 = Linear::new(&mut params, "l2", 16, 3, &mut rng).unwrap();
    let mut opt = Sgd::new(Schedule::Constant(0.05), 0.9).unwrap();
    let (x, y) = data::<S>(96, 4, SEED + 1);
    let (mut losses, mut kink_hits) = (Vec::new(), Vec::new());
    let mut ledger = KinkLedger::default();
    for _ in 0..steps {
        for batch in clarke_nn::data::batches(x.nrows(), 32, &mut rng).unwrap() {
            let tape = Tape::with_policy(KinkPolicy::pytorch().with_relu(0.5)).unwrap();
            let bound = params.bind(&tape);
            let xb = tape.constant(x.select(ndarray::Axis(0), &batch).into_dyn());
            let labels: Vec<usize> = batch.iter().map(|&i| y[i]).collect();
            let h = l1.forward(&bound, xb).unwrap().relu();
            let loss = l2.forward(&bound, h).unwrap().softmax_cross_entropy(&labels);
            let grads = loss.backward().unwrap();
            let g = bound.gradients(&grads, &params).unwrap();
            opt.step(&mut params, &g).unwrap();
            losses.push(loss.scalar());
            kink_hits.push(grads.ledger().exact_hits());
            ledger = grads.ledger().clone();
        }
    }
    Run {
        params,
        losses,
        kink_hits,
        ledger,
    }
}

/// A DEQ layer (width 32) + Linear head, Adam, on a batch of 128: large enough that the
/// layer's forward and adjoint solves split the batch into row blocks on the rayon pool.
fn train_deq(steps: usize) -> Run<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let mut params = ParamSet::<f64>::new();
    let deq = DeqLayer::new(&mut params, "deq", 4, 32, DeqConfig::default(), &mut rng).unwrap();
    let head = Linear::new(&mut params, "head", 32, 3, &mut rng).unwrap();
    let mut opt = Adam::new(Schedule::Constant(0.01)).unwrap();
    let (x, y) = data::<f64>(128, 4, SEED + 2);
    let (mut losses, mut kink_hits) = (Vec::new(), Vec::new());
    let mut ledger = KinkLedger::default();
    for _ in 0..steps {
        let tape = Tape::new();
        let bound = params.bind(&tape);
        let z = deq.forward(&bound, tape.constant(x.clone().into_dyn())).unwrap();
        let loss = head.forward(&bound, z).unwrap().softmax_cross_entropy(&y);
        let grads = loss.backward().unwrap();
        let g = bound.gradients(&grads, &params).unwrap();
        opt.step(&mut params, &g).unwrap();
        losses.push(loss.scalar());
        kink_hits.push(grads.ledger().exact_hits());
        ledger = grads.ledger().clone();
    }
    Run {
        params,
        losses,
        kink_hits,
        ledger,
    }
}

/// Runs `train` on `THREADS` scoped threads released together by a barrier, then once on
/// this thread, and checks that all runs agree bit for bit.
fn same_on_every_thread<S: Scalar>(what: &str, train: impl Fn() -> Run<S> + Sync) -> Run<S> {
    let barrier = Barrier::new(THREADS);
    let runs: Vec<Run<S>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    train()
                })
            })
            .collect();
        // ParamSet, the losses and KinkLedger are Send: they come back to this thread.
        handles
            .into_iter()
            .map(|h| h.join().expect("a training thread panicked"))
            .collect()
    });
    let single = train();
    for (i, run) in runs.iter().enumerate() {
        assert_same(&format!("{what}: thread {i} vs single-threaded"), run, &single);
    }
    single
}

#[test]
fn mlp_training_is_identical_on_three_threads_f64() {
    let run = same_on_every_thread("mlp f64", || train_mlp::<f64>(8));
    // The model trained, and the planted relu kinks were hit (and selected at 0.5) on the way.
    assert!(run.losses.last().unwrap() < &run.losses[0], "{:?}", run.losses);
    assert!(run.kink_hits.iter().sum::<usize>() > 0, "{:?}", run.kink_hits);
    assert!(run.params.values().iter().all(|v| v.iter().all(|x| x.is_finite())));
}

#[test]
fn mlp_training_is_identical_on_three_threads_f32() {
    let run = same_on_every_thread("mlp f32", || train_mlp::<f32>(8));
    assert!(run.losses.last().unwrap() < &run.losses[0], "{:?}", run.losses);
    assert!(run.kink_hits.iter().sum::<usize>() > 0, "{:?}", run.kink_hits);
}

#[test]
fn deq_training_is_identical_on_three_threads() {
    let run = same_on_every_thread("deq", || train_deq(3));
    assert_eq!(run.losses.len(), 3);
    // The zero rows put z* = relu(b) = 0 exactly on the kink at the first step (b starts at 0).
    assert!(run.kink_hits[0] > 0, "{:?}", run.kink_hits);
    assert!(run.losses.iter().all(|l| l.is_finite()));
}

/// The DEQ splits its batch into one row block per thread of the *current* rayon pool, and
/// each block iterates until its own rows converge, so the fixed point depends on the pool's
/// size: bit for bit under the same pool (above), to the solvers' tolerance under another
/// (a 1-thread pool here; `RAYON_NUM_THREADS` or `ThreadPool::install` do the same).
#[test]
fn deq_training_agrees_to_solver_tolerance_under_another_pool_size() {
    let global = train_deq(3);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let one = pool.install(|| train_deq(3));
    for (a, b) in global.params.values().iter().zip(one.params.values()) {
        let diff = (a - b).iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(diff < 1e-6, "parameters moved by {diff:e} with another pool size");
    }
}

/// Parameters trained on one thread and gradients computed on others can be shared: the
/// gradient of one fixed loss computed on three threads from a shared `&ParamSet` is the
/// same, and the `Grads` (with their ledger) cross back to the spawning thread.
#[test]
fn a_shared_param_set_gives_the_same_gradients_on_every_thread() {
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let mut params = ParamSet::<f64>::new();
    let lin = Linear::new(&mut params, "lin", 4, 3, &mut rng).unwrap();
    let (x, y) = data::<f64>(16, 4, SEED + 3);
    let gradient = |params: &ParamSet<f64>| -> (Vec<ArrayD<f64>>, KinkLedger) {
        let tape = Tape::new();
        let bound = params.bind(&tape);
        let h = lin.forward(&bound, tape.constant(x.clone().into_dyn())).unwrap().relu();
        let grads = h.softmax_cross_entropy(&y).backward().unwrap();
        (bound.gradients(&grads, params).unwrap(), grads.ledger().clone())
    };
    let shared = &params;
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS).map(|_| s.spawn(|| gradient(shared))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let single = gradient(&params);
    for (g, ledger) in &results {
        assert_eq!(g, &single.0);
        assert_eq!(ledger, &single.1);
    }
}
