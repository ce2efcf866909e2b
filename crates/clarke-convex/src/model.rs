//! Lasso-type models: the training data, the penalty and the objective.
//!
//! One struct, [`LassoModel`], covers the Lasso, the elastic net (a fixed ridge term), the
//! weighted Lasso (one `lambda` per feature, through [`Penalty::PerFeature`]) and sparse
//! logistic regression ([`Loss::Logistic`]):
//!
//! `P(beta) = w sum_i l(y_i, x_i^T beta) + sum_j lambda_j |beta_j| + (l2/2) ||beta||^2`
//!
//! with `l(y, m) = (y - m)^2 / 2` ([`Loss::Squared`]) or `log(1 + e^m) - y m` for labels
//! `y` in `{0, 1}` ([`Loss::Logistic`], no intercept: centre the features).
//! Every solver keeps `r = y - X beta` and the **generalised residual** `rho = -dl/dm`
//! (`rho = r` for the squared loss, `y - sigmoid(X beta)` for the logistic one); the
//! correlations `w X^T rho` decide the support and the equicorrelation set for both.
//!
//! with `w = 1/n` ([`LossScale::Mean`], the scikit-learn convention, the default) or `w = 1`
//! ([`LossScale::Sum`], the convention of the paper's Prop. 5). The model validates its data
//! once (shapes, finite values, no constant column) and precomputes what every solver needs
//! (column-major copy of `X`, squared column norms).

use std::sync::OnceLock;

use clarke_core::{Error, Result};
use ndarray::{Array1, Array2, ArrayView1, ArrayView2};

pub(crate) use crate::design::dot;
use crate::design::{Column, CscMatrix, Design};

/// Weight of the data-fit term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LossScale {
    /// `1/(2n) ||y - X beta||^2` (scikit-learn's Lasso).
    #[default]
    Mean,
    /// `1/2 ||y - X beta||^2` (the paper's Prop. 5).
    Sum,
}

/// The data-fit loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Loss {
    /// `(y - m)^2 / 2`.
    #[default]
    Squared,
    /// `log(1 + e^m) - y m`, labels in `{0, 1}`.
    Logistic,
}

/// `1 / (1 + e^-m)`, without overflow.
#[inline]
pub fn sigmoid(m: f64) -> f64 {
    if m >= 0.0 {
        1.0 / (1.0 + (-m).exp())
    } else {
        let e = m.exp();
        e / (1.0 + e)
    }
}

/// `log(1 + e^m)`, without overflow.
#[inline]
pub fn softplus(m: f64) -> f64 {
    if m > 0.0 {
        m + (-m).exp().ln_1p()
    } else {
        m.exp().ln_1p()
    }
}

/// The l1 penalty: one `lambda` for every feature, or one per feature (weighted Lasso).
#[derive(Debug, Clone, PartialEq)]
pub enum Penalty {
    /// `lambda ||beta||_1`.
    Uniform(f64),
    /// `sum_j lambda_j |beta_j|`.
    PerFeature(Array1<f64>),
}

impl Penalty {
    /// `lambda_j`, for an index `j` already known to be a feature of the penalty's model
    /// (the solvers' inner loops, after [`Penalty::validate`] checked the length).
    ///
    /// # Panics
    /// For a per-feature penalty, when `j` is not below [`Penalty::len`]; a uniform penalty
    /// returns its `lambda` for every `j`. [`Penalty::get`] is the checked form.
    #[inline]
    pub fn at(&self, j: usize) -> f64 {
        match self {
            Penalty::Uniform(l) => *l,
            Penalty::PerFeature(l) => l[j],
        }
    }

    /// `lambda_j`, or `None` when `j` is outside a per-feature penalty (a uniform penalty
    /// has `lambda_j = lambda` for every `j`).
    pub fn get(&self, j: usize) -> Option<f64> {
        match self {
            Penalty::Uniform(l) => Some(*l),
            Penalty::PerFeature(l) => l.get(j).copied(),
        }
    }

    /// Number of hyperparameters (1, or `p`).
    pub fn len(&self) -> usize {
        match self {
            Penalty::Uniform(_) => 1,
            Penalty::PerFeature(l) => l.len(),
        }
    }

    /// Whether there are no hyperparameters (an empty per-feature penalty).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `log lambda` (the hyperparameters the hypergradients are taken with respect to).
    pub fn log(&self) -> Array1<f64> {
        match self {
            Penalty::Uniform(l) => Array1::from_elem(1, l.ln()),
            Penalty::PerFeature(l) => l.mapv(f64::ln),
        }
    }

    /// The penalty with `lambda = exp(theta)`, of the same kind as `self`.
    ///
    /// # Errors
    /// A `theta` whose length is not [`Penalty::len`] (one entry for a uniform penalty).
    pub fn from_log_like(&self, theta: ArrayView1<'_, f64>) -> Result<Penalty> {
        if theta.len() != self.len() {
            return Err(Error::shapes(
                "Penalty::from_log_like",
                &[theta.len()],
                &[self.len()],
                "theta = log lambda needs one entry per hyperparameter of the penalty",
            ));
        }
        Ok(match self {
            Penalty::Uniform(_) => Penalty::Uniform(theta[0].exp()),
            Penalty::PerFeature(_) => Penalty::PerFeature(theta.mapv(f64::exp)),
        })
    }

    /// Checks every `lambda > 0`, finite, and the length against `p`.
    pub fn validate(&self, op: &'static str, p: usize) -> Result<()> {
        let bad = |j: usize, v: f64| {
            Error::invalid(
                op,
                format!("lambda must be finite and > 0, got lambda[{j}] = {v}; the hyperparameter is log lambda"),
            )
        };
        match self {
            Penalty::Uniform(l) => {
                if !(l.is_finite() && *l > 0.0) {
                    return Err(Error::invalid(op, format!("lambda must be finite and > 0, got {l}")));
                }
            }
            Penalty::PerFeature(l) => {
                if l.len() != p {
                    return Err(Error::shapes(
                        op,
                        &[l.len()],
                        &[p],
                        "a per-feature penalty needs one lambda per column of X",
                    ));
                }
                if let Some((j, &v)) = l.iter().enumerate().find(|(_, v)| !(v.is_finite() && **v > 0.0)) {
                    return Err(bad(j, v));
                }
            }
        }
        Ok(())
    }
}

/// Checks a design and a response: matching lengths, at least one row and column, finite
/// values, no constant column.
pub fn validate_data(op: &'static str, x: ArrayView2<'_, f64>, y: ArrayView1<'_, f64>) -> Result<()> {
    check_response(op, x.dim(), y)?;
    if let Some(((i, j), v)) = x.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(Error::invalid(
            op,
            format!("X has a non-finite value {v} at row {i}, column {j}"),
        ));
    }
    Ok(())
}

/// Checks a response against the shape `(n, p)` of its design: `n` entries, at least one row
/// and column, finite values.
pub(crate) fn check_response(op: &'static str, (n, p): (usize, usize), y: ArrayView1<'_, f64>) -> Result<()> {
    if n != y.len() {
        return Err(Error::shapes(
            op,
            &[n, p],
            &[y.len()],
            format!("X has {n} rows but y has {} entries", y.len()),
        ));
    }
    if n == 0 || p == 0 {
        return Err(Error::invalid(op, format!("empty data: X is {n} x {p}")));
    }
    if let Some((i, v)) = y.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::invalid(op, format!("y has a non-finite value {v} at row {i}")));
    }
    Ok(())
}

/// Checks labels of a logistic model: every label 0 or 1, both present.
fn check_labels(op: &'static str, y: ArrayView1<'_, f64>) -> Result<()> {
    if let Some((i, v)) = y.iter().enumerate().find(|(_, v)| **v != 0.0 && **v != 1.0) {
        return Err(Error::invalid(op, format!("labels must be 0 or 1, got {v} at row {i}")));
    }
    if let Some(&first) = y.first()
        && y.iter().all(|v| *v == first)
    {
        return Err(Error::invalid(
            op,
            format!("every label is {first}: logistic regression needs both classes"),
        ));
    }
    Ok(())
}

/// Checks a sparse design and a response: matching lengths, at least one row and column,
/// finite `y`, no constant non-zero column (a column stored in full with one repeated value;
/// an empty column is allowed, its coefficient stays at zero).
fn validate_sparse(op: &'static str, x: &CscMatrix, y: ArrayView1<'_, f64>) -> Result<()> {
    let (n, p) = (x.nrows(), x.ncols());
    check_response(op, (n, p), y)?;
    if n >= 2 {
        for j in 0..p {
            let (rows, values) = x.column(j);
            if rows.len() == n && values[0] != 0.0 && values.iter().all(|&v| v == values[0]) {
                return Err(Error::invalid(
                    op,
                    format!(
                        "column {j} of X is constant (every row is {}): it cannot be told apart from the intercept and makes the solution non-unique; drop it",
                        values[0]
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn check_constant_columns(op: &'static str, x: ArrayView2<'_, f64>) -> Result<()> {
    if x.nrows() < 2 {
        return Ok(()); // one row: nothing to centre, every column is trivially constant
    }
    for (j, col) in x.columns().into_iter().enumerate() {
        let first = col[0];
        if col.iter().all(|&v| v == first) {
            return Err(Error::invalid(
                op,
                format!(
                    "column {j} of X is constant (every row is {first}): it cannot be told apart from the intercept and makes the solution non-unique; drop it"
                ),
            ));
        }
    }
    Ok(())
}

/// Training data and the model's fixed settings.
#[derive(Debug)]
pub struct LassoModel {
    /// The design `X`, dense or sparse.
    design: Design,
    y: Array1<f64>,
    col_sq: Vec<f64>,
    scale: LossScale,
    loss: Loss,
    l2: f64,
    lipschitz: OnceLock<f64>,
}

impl Clone for LassoModel {
    fn clone(&self) -> Self {
        LassoModel {
            design: self.design.clone(),
            y: self.y.clone(),
            col_sq: self.col_sq.clone(),
            scale: self.scale,
            loss: self.loss,
            l2: self.l2,
            lipschitz: self.lipschitz.clone(),
        }
    }
}

impl LassoModel {
    /// A Lasso on `(X, y)`. Errors (naming the value, row and column): mismatched lengths,
    /// empty data, NaN or infinite values, a constant column (with two or more rows).
    pub fn new(x: ArrayView2<'_, f64>, y: ArrayView1<'_, f64>) -> Result<Self> {
        const OP: &str = "LassoModel::new";
        validate_data(OP, x, y)?;
        check_constant_columns(OP, x)?;
        Ok(Self::from_design(Design::dense(x), y))
    }

    /// A Lasso on a sparse design `X` (compressed sparse columns) and `y`: the same model as
    /// [`LassoModel::new`] on `X.to_dense()`, with every solver and hypergradient working
    /// on the stored entries (memory in proportion to the non-zeros). Empty columns are
    /// allowed: the penalty holds their coefficients at zero.
    ///
    /// # Errors
    /// `X` with another number of rows than `y` has entries, empty data, a non-finite `y`,
    /// a constant non-zero column (with two or more rows). The matrix itself was checked
    /// by its constructor.
    pub fn new_sparse(x: CscMatrix, y: ArrayView1<'_, f64>) -> Result<Self> {
        const OP: &str = "LassoModel::new_sparse";
        validate_sparse(OP, &x, y)?;
        Ok(Self::from_design(Design::Sparse(x), y))
    }

    /// Sparse logistic regression on a sparse design: [`LassoModel::logistic`] on
    /// compressed sparse columns (see [`LassoModel::new_sparse`]).
    ///
    /// # Errors
    /// As [`LassoModel::new_sparse`], and on labels other than 0 and 1 or a single class.
    pub fn logistic_sparse(x: CscMatrix, y: ArrayView1<'_, f64>) -> Result<Self> {
        const OP: &str = "LassoModel::logistic_sparse";
        check_labels(OP, y)?;
        validate_sparse(OP, &x, y)?;
        let mut model = Self::from_design(Design::Sparse(x), y);
        model.loss = Loss::Logistic;
        Ok(model)
    }

    fn from_design(design: Design, y: ArrayView1<'_, f64>) -> Self {
        let col_sq = (0..design.p()).map(|j| design.col(j).weighted_square(None)).collect();
        LassoModel {
            design,
            y: y.to_owned(),
            col_sq,
            scale: LossScale::Mean,
            loss: Loss::Squared,
            l2: 0.0,
            lipschitz: OnceLock::new(),
        }
    }

    /// Sparse logistic regression on `(X, y)` with labels `y` in `{0, 1}` (both present).
    /// Errors as [`LassoModel::new`], and on any other label value.
    pub fn logistic(x: ArrayView2<'_, f64>, y: ArrayView1<'_, f64>) -> Result<Self> {
        const OP: &str = "LassoModel::logistic";
        validate_data(OP, x, y)?;
        check_labels(OP, y)?;
        let mut model = Self::new(x, y).map_err(|e| match e {
            Error::InvalidArgument { detail, .. } => Error::invalid(OP, detail),
            other => other,
        })?;
        model.loss = Loss::Logistic;
        Ok(model)
    }

    /// The data-fit loss.
    pub fn loss(&self) -> Loss {
        self.loss
    }

    /// The generalised residual `rho = -dl/dm` from `r = y - X beta`: `r` itself for the
    /// squared loss, `y - sigmoid(y - r)` for the logistic loss.
    pub(crate) fn generalized_residual(&self, r: &[f64]) -> Vec<f64> {
        match self.loss {
            Loss::Squared => r.to_vec(),
            Loss::Logistic => self.y.iter().zip(r).map(|(&y, &ri)| y - sigmoid(y - ri)).collect(),
        }
    }

    /// The curvature `d^2 l / dm^2` at every row from `r = y - X beta` (1, or
    /// `sigmoid (1 - sigmoid)`).
    pub(crate) fn curvature(&self, r: &[f64]) -> Vec<f64> {
        match self.loss {
            Loss::Squared => vec![1.0; r.len()],
            Loss::Logistic => self
                .y
                .iter()
                .zip(r)
                .map(|(&y, &ri)| {
                    let s = sigmoid(y - ri);
                    s * (1.0 - s)
                })
                .collect(),
        }
    }

    /// The data-fit term `w sum_i l(y_i, m_i)` from `r = y - X beta`.
    pub(crate) fn datafit(&self, r: &[f64]) -> f64 {
        let w = self.weight();
        match self.loss {
            Loss::Squared => 0.5 * w * dot(r, r),
            Loss::Logistic => {
                w * self
                    .y
                    .iter()
                    .zip(r)
                    .map(|(&y, &ri)| {
                        let m = y - ri;
                        softplus(m) - y * m
                    })
                    .sum::<f64>()
            }
        }
    }

    /// Largest curvature of the loss (1, or 1/4 for the logistic loss).
    pub fn curvature_bound(&self) -> f64 {
        match self.loss {
            Loss::Squared => 1.0,
            Loss::Logistic => 0.25,
        }
    }

    /// Sets the data-fit weight (default [`LossScale::Mean`]).
    pub fn with_loss_scale(mut self, scale: LossScale) -> Self {
        self.scale = scale;
        self.lipschitz = OnceLock::new();
        self
    }

    /// Adds the ridge term `(l2/2) ||beta||^2` (the elastic net; `l2 >= 0`, fixed).
    pub fn with_l2(mut self, l2: f64) -> Result<Self> {
        if !(l2.is_finite() && l2 >= 0.0) {
            return Err(Error::invalid(
                "LassoModel::with_l2",
                format!("l2 must be finite and >= 0, got {l2}"),
            ));
        }
        self.l2 = l2;
        self.lipschitz = OnceLock::new();
        Ok(self)
    }

    /// Rows.
    pub fn n(&self) -> usize {
        self.design.n()
    }
    /// Columns (features).
    pub fn p(&self) -> usize {
        self.design.p()
    }
    /// Whether the design is stored as compressed sparse columns.
    pub fn is_sparse(&self) -> bool {
        self.design.as_sparse().is_some()
    }
    /// Stored entries of the design (`n p` for a dense one).
    pub fn nnz(&self) -> usize {
        self.design.nnz()
    }
    /// The design.
    pub(crate) fn design(&self) -> &Design {
        &self.design
    }
    /// The ridge weight.
    pub fn l2(&self) -> f64 {
        self.l2
    }
    /// The response.
    pub fn y(&self) -> ArrayView1<'_, f64> {
        self.y.view()
    }
    /// The data-fit weight `w` (`1/n` or `1`).
    pub fn weight(&self) -> f64 {
        match self.scale {
            LossScale::Mean => 1.0 / self.n() as f64,
            LossScale::Sum => 1.0,
        }
    }
    /// Column `j` of `X`.
    #[inline]
    pub(crate) fn col(&self, j: usize) -> Column<'_> {
        self.design.col(j)
    }
    /// `||x_j||^2`.
    #[inline]
    pub(crate) fn col_sq(&self, j: usize) -> f64 {
        self.col_sq[j]
    }
    /// `X` as an owned dense row-major matrix (for tape-based methods; `n p` values even
    /// for a sparse design).
    pub fn x(&self) -> Array2<f64> {
        self.design.to_dense()
    }

    /// `X beta`.
    ///
    /// # Errors
    /// A `beta` whose length is not the number of features.
    pub fn predict(&self, beta: ArrayView1<'_, f64>) -> Result<Array1<f64>> {
        if beta.len() != self.p() {
            return Err(Error::shapes(
                "LassoModel::predict",
                &[beta.len()],
                &[self.p()],
                "beta must have one entry per feature",
            ));
        }
        Ok(self.predict_unchecked(beta))
    }

    /// `X beta` for a `beta` of length `p` (checked by the callers).
    fn predict_unchecked(&self, beta: ArrayView1<'_, f64>) -> Array1<f64> {
        match beta.as_slice() {
            Some(b) => Array1::from(self.design.predict(b)),
            None => Array1::from(self.design.predict(&beta.to_vec())),
        }
    }

    /// `w X^T v` for every column (parallel over columns for large `X`).
    pub(crate) fn correlations(&self, v: &[f64]) -> Array1<f64> {
        self.design.correlations(self.weight(), v)
    }

    /// `lambda_max = ||w X^T rho(0)||_inf` (`rho(0) = y`, or `y - 1/2` for the logistic
    /// loss): the smallest `lambda` with `beta = 0`.
    pub fn lambda_max(&self) -> f64 {
        let rho = self.generalized_residual(self.y.as_slice().expect("contiguous"));
        self.correlations(&rho).iter().fold(0.0, |m, v| m.max(v.abs()))
    }

    /// Lipschitz constant of the smooth part's gradient: `w ||X||_2^2 + l2` (times 1/4 on the
    /// first term for the logistic loss; power iteration, computed once).
    pub fn lipschitz(&self) -> f64 {
        *self.lipschitz.get_or_init(|| {
            let p = self.p();
            let mut v = vec![1.0 / (p as f64).sqrt(); p];
            let mut est = 0.0;
            for _ in 0..100 {
                let xv = self.predict_unchecked(ArrayView1::from(&v[..]));
                let g = self.correlations(xv.as_slice().expect("contiguous"));
                let norm = g.iter().map(|a| a * a).sum::<f64>().sqrt();
                if norm == 0.0 {
                    break;
                }
                let prev = est;
                est = norm;
                v = g.iter().map(|a| a / norm).collect();
                if (est - prev).abs() <= 1e-6 * est {
                    break;
                }
            }
            // A few percent above the estimate: power iteration approaches from below.
            est * 1.02 * self.curvature_bound() + self.l2
        })
    }

    /// The objective `P(beta)` of the penalised problem.
    ///
    /// # Errors
    /// A `beta` or a penalty of another length than the features, or a penalty that is not
    /// finite and positive.
    pub fn objective(&self, beta: ArrayView1<'_, f64>, penalty: &Penalty) -> Result<f64> {
        penalty.validate("LassoModel::objective", self.p())?;
        let residual = &self.y - &self.predict(beta)?;
        let fit = self.datafit(residual.as_slice().expect("contiguous"));
        let l1: f64 = beta.iter().enumerate().map(|(j, b)| penalty.at(j) * b.abs()).sum();
        let l2 = 0.5 * self.l2 * beta.iter().map(|b| b * b).sum::<f64>();
        Ok(fit + l1 + l2)
    }
}
