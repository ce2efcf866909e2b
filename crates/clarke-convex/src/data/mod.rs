//! Regression data: a numeric CSV reader, a train/validation split centred by the training
//! means, and a seeded synthetic sparse regression problem; for sparse designs, the
//! svmlight format ([`svmlight`]), a split that keeps them sparse and a generator with the
//! shape and density of rcv1 or news20 ([`sparse`]).

pub mod sparse;
pub mod svmlight;

pub use sparse::{SparseRegression, SparseShape, SparseSplit, sparse_synthetic, split_sparse};
pub use svmlight::{parse_svmlight, read_svmlight, write_svmlight};

use std::path::Path;

use clarke_core::{Error, Result};
use ndarray::{Array1, Array2, Axis, s};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// A regression data set: features and target.
#[derive(Debug, Clone)]
pub struct Regression {
    /// Feature names (from the header).
    pub names: Vec<String>,
    /// `n x p` features.
    pub x: Array2<f64>,
    /// Target.
    pub y: Array1<f64>,
}

/// Reads a numeric CSV with a header line; the last column is the target.
///
/// # Errors
/// [`Error::Data`] naming the file (and the line and column): an unreadable or empty file,
/// fewer than two columns, a line with another number of fields, a field that is not a
/// number or is not finite (`NaN` and `inf` parse as numbers but no model accepts them),
/// no data line after the header.
pub fn read_csv(path: impl AsRef<Path>) -> Result<Regression> {
    let path = path.as_ref();
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::Data(format!("cannot read {}: {e}", path.display())))?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = lines
        .next()
        .ok_or_else(|| Error::Data(format!("{}: empty file", path.display())))?
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    if header.len() < 2 {
        return Err(Error::Data(format!(
            "{}: need at least one feature and a target column, header has {}",
            path.display(),
            header.len()
        )));
    }
    let cols = header.len();
    let mut values = Vec::new();
    let mut rows = 0;
    for (k, line) in lines.enumerate() {
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != cols {
            return Err(Error::Data(format!(
                "{}: line {} has {} fields, the header has {cols}",
                path.display(),
                k + 2,
                fields.len()
            )));
        }
        for (c, f) in fields.iter().enumerate() {
            let v: f64 = f.trim().parse().map_err(|_| {
                Error::Data(format!(
                    "{}: line {}, column {:?}: {:?} is not a number",
                    path.display(),
                    k + 2,
                    header[c],
                    f
                ))
            })?;
            if !v.is_finite() {
                return Err(Error::Data(format!(
                    "{}: line {}, column {:?}: {v} is not finite",
                    path.display(),
                    k + 2,
                    header[c]
                )));
            }
            values.push(v);
        }
        rows += 1;
    }
    if rows == 0 {
        return Err(Error::Data(format!(
            "{}: no data line after the header",
            path.display()
        )));
    }
    let all = Array2::from_shape_vec((rows, cols), values).map_err(|e| Error::Data(e.to_string()))?;
    Ok(Regression {
        names: header[..cols - 1].to_vec(),
        x: all.slice(s![.., ..cols - 1]).to_owned(),
        y: all.column(cols - 1).to_owned(),
    })
}

/// A train/validation split, both centred by the **training** means.
#[derive(Debug, Clone)]
pub struct Split {
    /// Training features.
    pub x_train: Array2<f64>,
    /// Training target.
    pub y_train: Array1<f64>,
    /// Validation features.
    pub x_val: Array2<f64>,
    /// Validation target.
    pub y_val: Array1<f64>,
}

/// Rows `train` for training and `val` for validation, centred by the training means of
/// `X` and `y`. Errors on empty or out-of-range row ranges.
pub fn split_centred(data: &Regression, train: std::ops::Range<usize>, val: std::ops::Range<usize>) -> Result<Split> {
    let n = data.x.nrows();
    for (what, r) in [("training", &train), ("validation", &val)] {
        if r.start >= r.end || r.end > n {
            return Err(Error::invalid(
                "split_centred",
                format!("the {what} rows {r:?} are empty or outside the {n} rows of the data"),
            ));
        }
    }
    let xt = data.x.slice(s![train.clone(), ..]);
    let yt = data.y.slice(s![train.clone()]);
    let mx = xt.mean_axis(Axis(0)).expect("non-empty");
    let my = yt.mean().expect("non-empty");
    Ok(Split {
        x_train: &xt - &mx,
        y_train: yt.mapv(|v| v - my),
        x_val: &data.x.slice(s![val.clone(), ..]) - &mx,
        y_val: data.y.slice(s![val]).mapv(|v| v - my),
    })
}

/// A seeded sparse regression problem: `n` rows of i.i.d. standard normal features (`p`
/// columns), `informative` non-zero coefficients (the first ones, values `+-1` to `+-2`),
/// Gaussian noise of standard deviation `noise`.
///
/// # Errors
/// `n == 0` or `p == 0` (no data), `informative > p`, or a `noise` that is not finite and
/// `>= 0`, naming `synthetic` and the value.
pub fn try_synthetic(n: usize, p: usize, informative: usize, noise: f64, seed: u64) -> Result<Regression> {
    check_synthetic("synthetic", n, p, informative, noise)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x = Array2::from_shape_simple_fn((n, p), || StandardNormal.sample(&mut rng));
    let k = informative;
    let mut beta = Array1::zeros(p);
    for j in 0..k {
        let mag = 1.0 + (j as f64) / (k.max(2) - 1) as f64;
        beta[j] = if j % 2 == 0 { mag } else { -mag };
    }
    let eps: Array1<f64> = Array1::from_shape_simple_fn(n, || StandardNormal.sample(&mut rng));
    let y = x.dot(&beta) + eps * noise;
    Ok(Regression {
        names: (0..p).map(|j| format!("x{j}")).collect(),
        x,
        y,
    })
}

/// Checks what every synthetic generator is asked for: a non-empty shape, at most `p`
/// informative features, a finite noise level `>= 0`.
pub(crate) fn check_synthetic(op: &'static str, n: usize, p: usize, informative: usize, noise: f64) -> Result<()> {
    if n == 0 || p == 0 {
        return Err(Error::invalid(
            op,
            format!("empty data: asked for {n} rows and {p} columns"),
        ));
    }
    if informative > p {
        return Err(Error::invalid(
            op,
            format!("{informative} informative features asked for, but there are only p = {p}"),
        ));
    }
    if !(noise.is_finite() && noise >= 0.0) {
        return Err(Error::invalid(
            op,
            format!("noise is a standard deviation and must be finite and >= 0, got {noise}"),
        ));
    }
    Ok(())
}

/// Panicking form of [`try_synthetic`], for examples and tests with fixed arguments.
///
/// # Panics
/// On the arguments [`try_synthetic`] refuses, with its error.
#[track_caller]
pub fn synthetic(n: usize, p: usize, informative: usize, noise: f64, seed: u64) -> Regression {
    try_synthetic(n, p, informative, noise, seed).unwrap_or_else(|e| panic!("{e}"))
}
