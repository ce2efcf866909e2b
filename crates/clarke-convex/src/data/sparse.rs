//! Sparse regression data: a train/validation split that keeps the design sparse, and a
//! seeded generator with the shape and density of rcv1 or news20.

use clarke_core::{Error, Result};
use ndarray::Array1;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::check_synthetic;
use crate::design::CscMatrix;

/// A regression data set with a sparse design.
#[derive(Debug, Clone)]
pub struct SparseRegression {
    /// `n x p` features, compressed sparse columns.
    pub x: CscMatrix,
    /// Target.
    pub y: Array1<f64>,
}

/// A train/validation split of sparse data.
#[derive(Debug, Clone)]
pub struct SparseSplit {
    /// Training features.
    pub x_train: CscMatrix,
    /// Training target, centred by its mean.
    pub y_train: Array1<f64>,
    /// Validation features.
    pub x_val: CscMatrix,
    /// Validation target, centred by the **training** mean.
    pub y_val: Array1<f64>,
}

/// The last `floor(n * val_fraction)` rows for validation, the rest (in file order) for
/// training; `y` centred by its training mean. `X` is not centred: centring would fill it
/// in (scikit-learn and celer do not centre sparse designs either), so the models fitted on
/// it have no intercept beyond the centred `y`.
///
/// # Errors
/// A `val_fraction` outside `(0, 1)`, or one that leaves no training or no validation row.
pub fn split_sparse(data: &SparseRegression, val_fraction: f64) -> Result<SparseSplit> {
    const OP: &str = "split_sparse";
    let n = data.x.nrows();
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        return Err(Error::invalid(
            OP,
            format!("the validation fraction must lie in (0, 1), got {val_fraction}"),
        ));
    }
    let n_val = (n as f64 * val_fraction).floor() as usize;
    if n_val == 0 || n_val == n {
        return Err(Error::invalid(
            OP,
            format!("a validation fraction of {val_fraction} of {n} rows leaves {n_val} validation rows"),
        ));
    }
    let n_train = n - n_val;
    let mean = data.y.slice(ndarray::s![..n_train]).mean().expect("non-empty");
    Ok(SparseSplit {
        x_train: data.x.rows(0..n_train)?,
        y_train: data.y.slice(ndarray::s![..n_train]).mapv(|v| v - mean),
        x_val: data.x.rows(n_train..n)?,
        y_val: data.y.slice(ndarray::s![n_train..]).mapv(|v| v - mean),
    })
}

/// The shape of a sparse synthetic problem.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SparseShape {
    /// Rows.
    pub n: usize,
    /// Columns.
    pub p: usize,
    /// Fraction of stored entries.
    pub density: f64,
}

impl SparseShape {
    /// rcv1 (binary, train): 20,242 x 19,960 at 0.16%; `quick`: 2,000 x 2,000 at 1% (20
    /// entries per column and row, the full shape has 32).
    pub fn rcv1(quick: bool) -> Self {
        if quick {
            SparseShape {
                n: 2_000,
                p: 2_000,
                density: 0.01,
            }
        } else {
            SparseShape {
                n: 20_242,
                p: 19_960,
                density: 0.0016,
            }
        }
    }

    /// news20 (binary): 19,996 x 1,355,191 at 0.03%; `quick`: 2,000 x 135,519 at 0.3% (a
    /// tenth of the rows and columns, the same entries per row).
    pub fn news20(quick: bool) -> Self {
        if quick {
            SparseShape {
                n: 2_000,
                p: 135_519,
                density: 0.003,
            }
        } else {
            SparseShape {
                n: 19_996,
                p: 1_355_191,
                density: 0.0003,
            }
        }
    }

    /// The shape of a named data set (`"rcv1"` or `"news20"`).
    ///
    /// # Errors
    /// Any other name.
    pub fn named(name: &str, quick: bool) -> Result<Self> {
        match name {
            "rcv1" => Ok(Self::rcv1(quick)),
            "news20" => Ok(Self::news20(quick)),
            other => Err(Error::invalid(
                "SparseShape::named",
                format!("unknown data set {other:?}: rcv1 or news20"),
            )),
        }
    }
}

/// A seeded sparse regression problem of the given shape, built like a text corpus:
///
/// - column `j` holds about `n density w_j` entries, the weights `w_j` log-normal
///   (`sigma = 1.5`, mean 1) so that a few words are frequent and most are rare, at least
///   one entry per column;
/// - the rows of a column are drawn uniformly without replacement, the values are
///   `1 + |z|` (`z` standard normal, a term-frequency-like positive weight), and every row
///   is scaled to unit norm (as tf-idf rows are);
/// - `informative` coefficients are planted on frequent columns (drawn among the tenth most
///   frequent), `+-1` to `+-2`, and `y = X beta + noise sd(X beta) e`.
///
/// # Errors
/// An empty shape, a density outside `(0, 1]`, more informative features than columns, a
/// negative or non-finite `noise`.
pub fn sparse_synthetic(shape: SparseShape, informative: usize, noise: f64, seed: u64) -> Result<SparseRegression> {
    const OP: &str = "sparse_synthetic";
    let SparseShape { n, p, density } = shape;
    check_synthetic(OP, n, p, informative, noise)?;
    if !(density > 0.0 && density <= 1.0) {
        return Err(Error::invalid(
            OP,
            format!("the density must lie in (0, 1], got {density}"),
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    const SIGMA: f64 = 1.5;
    // Log-normal weights with mean 1: exp(sigma z - sigma^2 / 2).
    let weights: Vec<f64> = (0..p)
        .map(|_| {
            let z: f64 = StandardNormal.sample(&mut rng);
            (SIGMA * z - 0.5 * SIGMA * SIGMA).exp()
        })
        .collect();
    let mean_nnz = n as f64 * density;
    let mut col_ptr = Vec::with_capacity(p + 1);
    col_ptr.push(0);
    let mut row_idx = Vec::with_capacity((mean_nnz * p as f64 * 1.1) as usize);
    let mut values = Vec::with_capacity(row_idx.capacity());
    for &w in &weights {
        let count = ((mean_nnz * w).round() as usize).clamp(1, n);
        let mut rows = sample(&mut rng, n, count).into_vec();
        rows.sort_unstable();
        for i in rows {
            row_idx.push(i);
            let z: f64 = StandardNormal.sample(&mut rng);
            values.push(1.0 + z.abs());
        }
        col_ptr.push(row_idx.len());
    }
    // Unit rows.
    let mut row_sq = vec![0.0; n];
    for (&i, &v) in row_idx.iter().zip(&values) {
        row_sq[i] += v * v;
    }
    for (&i, v) in row_idx.iter().zip(values.iter_mut()) {
        *v /= row_sq[i].sqrt();
    }
    let x = CscMatrix::try_new(n, p, col_ptr, row_idx, values)?;
    // Planted coefficients on frequent columns.
    let mut by_frequency: Vec<usize> = (0..p).collect();
    by_frequency.sort_unstable_by(|&a, &b| weights[b].total_cmp(&weights[a]));
    let pool = (p / 10).max(informative);
    let mut beta = vec![0.0; p];
    for (k, pick) in sample(&mut rng, pool, informative).into_iter().enumerate() {
        let magnitude = 1.0 + rng.random::<f64>();
        beta[by_frequency[pick]] = if k % 2 == 0 { magnitude } else { -magnitude };
    }
    let mut signal = vec![0.0; n];
    for (j, &b) in beta.iter().enumerate() {
        if b != 0.0 {
            let (rows, vals) = x.column(j);
            for (&i, &v) in rows.iter().zip(vals) {
                signal[i] += b * v;
            }
        }
    }
    let mean = signal.iter().sum::<f64>() / n as f64;
    let sd = (signal.iter().map(|s| (s - mean) * (s - mean)).sum::<f64>() / n as f64).sqrt();
    let y = signal
        .iter()
        .map(|s| {
            let e: f64 = StandardNormal.sample(&mut rng);
            s + noise * sd * e
        })
        .collect();
    Ok(SparseRegression {
        x,
        y: Array1::from_vec(y),
    })
}
