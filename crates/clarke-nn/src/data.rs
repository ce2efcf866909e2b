//! Tabular data: a CSV loader, feature scaling, index splits and seeded mini-batches.

use std::path::Path;

use clarke_core::{Error, Result, Scalar};
use ndarray::{Array1, Array2, Axis};
use rand::Rng;
use rand::seq::SliceRandom;

/// A classification data set: features `[rows, features]` and integer labels.
///
/// The fields are public; the methods that use them refuse a value whose fields do not fit
/// together (a label count other than the row count, a label not below `classes`).
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Features, one row per example.
    pub x: Array2<f64>,
    /// Labels in `0..classes`.
    pub y: Vec<usize>,
    /// Number of classes (largest label + 1).
    pub classes: usize,
}

impl Dataset {
    /// Reads a CSV file with a header line, numeric features and the integer label in the last
    /// column.
    ///
    /// # Errors
    /// An unreadable file, a row with the wrong number of fields, a non-numeric or non-finite
    /// feature, a label that is not a non-negative integer below `usize::MAX`, or no rows:
    /// each names the line.
    pub fn from_csv(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bad = |detail: String| Error::invalid("Dataset::from_csv", format!("{}: {detail}", path.display()));
        let mut reader = csv::Reader::from_path(path).map_err(|e| bad(e.to_string()))?;
        let columns = reader.headers().map_err(|e| bad(e.to_string()))?.len();
        if columns < 2 {
            return Err(bad(format!(
                "need at least one feature and a label, found {columns} column(s)"
            )));
        }
        let mut data = Vec::new();
        let mut y = Vec::new();
        for (i, record) in reader.records().enumerate() {
            let line = i + 2;
            let record = record.map_err(|e| bad(format!("line {line}: {e}")))?;
            if record.len() != columns {
                return Err(bad(format!(
                    "line {line}: {} fields, the header has {columns}",
                    record.len()
                )));
            }
            for field in record.iter().take(columns - 1) {
                let v: f64 = field
                    .trim()
                    .parse()
                    .map_err(|_| bad(format!("line {line}: feature {field:?} is not a number")))?;
                if !v.is_finite() {
                    return Err(bad(format!("line {line}: feature {field:?} is not finite")));
                }
                data.push(v);
            }
            let label = record[columns - 1].trim();
            // `label + 1` classes must fit in usize; a float label must be an integer in range
            // (`as usize` would saturate 1e30 to usize::MAX).
            let label: usize = label
                .parse::<usize>()
                .ok()
                .or_else(|| {
                    label
                        .parse::<f64>()
                        .ok()
                        .filter(|v| v.fract() == 0.0 && *v >= 0.0 && *v < usize::MAX as f64)
                        .map(|v| v as usize)
                })
                .filter(|&v| v < usize::MAX)
                .ok_or_else(|| {
                    bad(format!(
                        "line {line}: label {label:?} is not a non-negative integer below {}",
                        usize::MAX
                    ))
                })?;
            y.push(label);
        }
        if y.is_empty() {
            return Err(bad("no data rows".into()));
        }
        let x = Array2::from_shape_vec((y.len(), columns - 1), data).map_err(|e| bad(e.to_string()))?;
        let classes = y.iter().max().map_or(0, |m| m + 1);
        Ok(Dataset { x, y, classes })
    }

    /// Number of rows (of labels: the methods that use the rows check that `x` has as many).
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Number of features.
    pub fn features(&self) -> usize {
        self.x.ncols()
    }

    /// Splits rows by index: those for which `test(i)` holds go to the second set.
    ///
    /// # Errors
    /// Fields that do not fit together (see [`Dataset`]), or a split that leaves either side
    /// empty.
    pub fn split_by_index(&self, test: impl Fn(usize) -> bool) -> Result<(Dataset, Dataset)> {
        self.check("Dataset::split_by_index")?;
        let (te, tr): (Vec<usize>, Vec<usize>) = (0..self.len()).partition(|&i| test(i));
        if te.is_empty() || tr.is_empty() {
            return Err(Error::invalid(
                "Dataset::split_by_index",
                format!("the split leaves {} training and {} test rows", tr.len(), te.len()),
            ));
        }
        Ok((self.select(&tr)?, self.select(&te)?))
    }

    /// The rows `idx`, in that order (repeats allowed).
    ///
    /// # Errors
    /// Fields that do not fit together (see [`Dataset`]), or a row index out of range, naming
    /// it.
    pub fn select(&self, idx: &[usize]) -> Result<Dataset> {
        self.check("Dataset::select")?;
        if let Some((k, &i)) = idx.iter().enumerate().find(|&(_, &i)| i >= self.len()) {
            return Err(Error::invalid(
                "Dataset::select",
                format!(
                    "row index {i} (at position {k}) is out of range for {} rows",
                    self.len()
                ),
            ));
        }
        Ok(Dataset {
            x: self.x.select(Axis(0), idx),
            y: idx.iter().map(|&i| self.y[i]).collect(),
            classes: self.classes,
        })
    }

    /// The features converted to the training precision.
    ///
    /// # Errors
    /// A feature that is not finite in `S` (NaN, or 1e300 in f32), naming its row and column.
    pub fn x_as<S: Scalar>(&self) -> Result<Array2<S>> {
        let x = self.x.mapv(S::from_f64_lossy);
        if let Some(((i, j), _)) = x.indexed_iter().find(|(_, v)| !v.is_finite()) {
            return Err(Error::invalid(
                "Dataset::x_as",
                format!(
                    "row {i}, column {j}: feature {:?} is not finite in {}",
                    self.x[[i, j]],
                    S::NAME
                ),
            ));
        }
        Ok(x)
    }

    /// Refuses fields that do not fit together: a label count other than the row count of
    /// `x`, or a label not below `classes`.
    fn check(&self, op: &'static str) -> Result<()> {
        if self.x.nrows() != self.y.len() {
            return Err(Error::shapes(
                op,
                self.x.shape(),
                &[self.y.len(), self.x.ncols()],
                format!("x has {} rows for {} labels", self.x.nrows(), self.y.len()),
            ));
        }
        if let Some((i, &label)) = self.y.iter().enumerate().find(|&(_, &l)| l >= self.classes) {
            return Err(Error::invalid(
                op,
                format!("row {i}: label {label} is out of range for {} classes", self.classes),
            ));
        }
        Ok(())
    }
}

/// A per-feature affine scaling `x -> (x - shift) / scale`, fitted on training data and
/// applied unchanged to test data.
#[derive(Debug, Clone, PartialEq)]
pub struct Scaler {
    shift: Array1<f64>,
    scale: Array1<f64>,
}

impl Scaler {
    /// Divides every feature by the same constant (digits: 16). A negative constant flips the
    /// features; a tiny one may overflow, which [`Scaler::apply`] refuses.
    ///
    /// # Errors
    /// A zero or non-finite constant.
    pub fn constant(features: usize, divisor: f64) -> Result<Self> {
        if !(divisor != 0.0 && divisor.is_finite()) {
            return Err(Error::invalid(
                "Scaler::constant",
                format!("cannot divide by {divisor}"),
            ));
        }
        Ok(Scaler {
            shift: Array1::zeros(features),
            scale: Array1::from_elem(features, divisor),
        })
    }

    /// Maps each feature's training range to `[0, 1]`; a constant feature is only shifted.
    ///
    /// # Errors
    /// No rows to fit on, a non-finite feature (naming its row and column), or a range that
    /// overflows (wider than `f64::MAX`).
    pub fn min_max(x: &Array2<f64>) -> Result<Self> {
        const OP: &str = "Scaler::min_max";
        fit_input(OP, x)?;
        let lo = x.fold_axis(Axis(0), f64::INFINITY, |a, &b| a.min(b));
        let hi = x.fold_axis(Axis(0), f64::NEG_INFINITY, |a, &b| a.max(b));
        let scale = (&hi - &lo).mapv(|r| if r > 0.0 { r } else { 1.0 });
        Scaler { shift: lo, scale }.fitted(OP, "range")
    }

    /// Zero mean and unit variance per feature on the training data; a constant feature is
    /// only centred.
    ///
    /// # Errors
    /// No rows to fit on, a non-finite feature (naming its row and column), or a mean or
    /// standard deviation that overflows (features beyond about `1e154` in magnitude).
    pub fn standardize(x: &Array2<f64>) -> Result<Self> {
        const OP: &str = "Scaler::standardize";
        fit_input(OP, x)?;
        let mean = x.mean_axis(Axis(0)).unwrap_or_else(|| Array1::zeros(x.ncols()));
        let std = x.std_axis(Axis(0), 0.0).mapv(|s| if s > 0.0 { s } else { 1.0 });
        Scaler {
            shift: mean,
            scale: std,
        }
        .fitted(OP, "mean or standard deviation")
    }

    /// Applies the scaling.
    ///
    /// # Errors
    /// When the number of features differs from the fitted one, a feature is not finite, or
    /// a scaled value overflows (a test value far outside the training range): each names
    /// the row and column.
    pub fn apply(&self, x: &Array2<f64>) -> Result<Array2<f64>> {
        const OP: &str = "Scaler::apply";
        if x.ncols() != self.shift.len() {
            return Err(Error::shapes(
                OP,
                x.shape(),
                &[x.nrows(), self.shift.len()],
                "the scaler was fitted on another number of features",
            ));
        }
        finite_features(OP, x)?;
        let scaled = (x - &self.shift) / &self.scale;
        if let Some(((i, j), v)) = scaled.indexed_iter().find(|(_, v)| !v.is_finite()) {
            return Err(Error::invalid(
                OP,
                format!(
                    "row {i}, column {j}: feature {:?} scales to {v} (shift {:?}, scale {:?})",
                    x[[i, j]],
                    self.shift[j],
                    self.scale[j]
                ),
            ));
        }
        Ok(scaled)
    }

    /// `self`, or an error naming the first feature whose fitted `what` overflowed.
    fn fitted(self, op: &'static str, what: &str) -> Result<Self> {
        let overflow = self
            .shift
            .iter()
            .zip(&self.scale)
            .position(|(s, c)| !(s.is_finite() && c.is_finite()));
        match overflow {
            None => Ok(self),
            Some(j) => Err(Error::invalid(
                op,
                format!(
                    "column {j}: the {what} overflows (shift {:?}, scale {:?})",
                    self.shift[j], self.scale[j]
                ),
            )),
        }
    }
}

/// Refuses data to fit a scaler on: no rows (the fitted shift would be infinite or
/// arbitrary) or a non-finite feature.
fn fit_input(op: &'static str, x: &Array2<f64>) -> Result<()> {
    if x.nrows() == 0 {
        return Err(Error::shapes(
            op,
            x.shape(),
            &[1, x.ncols()],
            "fitting needs at least one row",
        ));
    }
    finite_features(op, x)
}

/// Refuses a non-finite feature, naming its row and column.
fn finite_features(op: &'static str, x: &Array2<f64>) -> Result<()> {
    match x.indexed_iter().find(|(_, v)| !v.is_finite()) {
        None => Ok(()),
        Some(((i, j), v)) => Err(Error::invalid(
            op,
            format!("row {i}, column {j}: feature {v} is not finite"),
        )),
    }
}

/// Seeded mini-batches of row indices: a fresh permutation per epoch, cut into batches of
/// `batch` rows (the last one shorter). No rows give no batches.
///
/// # Errors
/// A batch size of 0.
pub fn batches(rows: usize, batch: usize, rng: &mut impl Rng) -> Result<Vec<Vec<usize>>> {
    if batch == 0 {
        return Err(Error::invalid(
            "batches",
            format!("the batch size must be positive, got 0 (for {rows} rows)"),
        ));
    }
    let mut idx: Vec<usize> = (0..rows).collect();
    idx.shuffle(rng);
    Ok(idx.chunks(batch).map(|c| c.to_vec()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("clarke-data-{}-{name}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_splits_and_scales() {
        let p = write("ok.csv", "a,b,label\n0,16,1\n8,4,0\n16,0,2\n4,4,1\n2,2,0\n");
        let d = Dataset::from_csv(&p).unwrap();
        assert_eq!((d.len(), d.features(), d.classes), (5, 2, 3));
        let (train, test) = d.split_by_index(|i| i % 5 == 0).unwrap();
        assert_eq!((train.len(), test.len()), (4, 1));
        assert_eq!(test.y, vec![1]);
        let s = Scaler::constant(2, 16.0).unwrap();
        assert_eq!(s.apply(&test.x).unwrap()[[0, 1]], 1.0);
        let mm = Scaler::min_max(&train.x).unwrap().apply(&train.x).unwrap();
        assert!(mm.iter().all(|v| (0.0..=1.0).contains(v)));
        let st = Scaler::standardize(&d.x).unwrap().apply(&d.x).unwrap();
        assert!(st.mean_axis(Axis(0)).unwrap().iter().all(|m| m.abs() < 1e-12));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn bad_files_name_the_line() {
        let p = write("bad.csv", "a,b,label\n0,1,1\n0,x,1\n");
        let e = Dataset::from_csv(&p).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("\"x\""), "{e}");
        let p2 = write("short.csv", "a,b,label\n0,1\n");
        assert!(Dataset::from_csv(&p2).unwrap_err().to_string().contains("line 2"));
        let p3 = write("label.csv", "a,label\n0,-1\n");
        assert!(Dataset::from_csv(&p3).unwrap_err().to_string().contains("label"));
        let p4 = write("nan.csv", "a,label\nNaN,1\n");
        assert!(Dataset::from_csv(&p4).unwrap_err().to_string().contains("not finite"));
        for p in [p, p2, p3, p4] {
            std::fs::remove_file(p).unwrap();
        }
        assert!(Scaler::constant(2, 0.0).is_err());
    }

    #[test]
    fn batches_are_a_seeded_permutation() {
        let mut r1 = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut r2 = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let a = batches(10, 4, &mut r1).unwrap();
        assert_eq!(a, batches(10, 4, &mut r2).unwrap());
        assert_eq!(a.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 4, 2]);
        let mut all: Vec<usize> = a.concat();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }
}
