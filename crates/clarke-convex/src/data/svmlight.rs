//! The svmlight / libsvm text format, in which rcv1, news20 and finance are distributed.
//!
//! One row per line: `target index:value index:value ... [# comment]`, indices increasing
//! within a line. Indices are 1-based, as in the distributed files; a file whose smallest
//! index is 0 is read as 0-based (scikit-learn's `zero_based="auto"`). A `qid:` field is
//! skipped. [`write_svmlight`] writes 1-based indices and every value in the shortest form
//! that reads back to the same `f64`, so a written file is read back exactly (by this
//! module and by scikit-learn's `load_svmlight_file`).

use std::fmt::Write as _;
use std::io::{BufRead, Write as _};
use std::path::Path;

use clarke_core::{Error, Result};
use ndarray::{Array1, ArrayView1};

use super::SparseRegression;
use crate::design::CscMatrix;

/// Reads an svmlight file. `n_features` fixes the number of columns (it must be at least
/// the largest index read); `None` takes the largest index read.
///
/// # Errors
/// [`Error::Data`] naming the file and line: an unreadable or empty file, a target or value
/// that is not a finite number, a field that is not `index:value`, an index that is not a
/// non-negative integer, indices that do not increase within a line (unsorted or
/// duplicate), an index beyond `n_features`.
pub fn read_svmlight(path: impl AsRef<Path>, n_features: Option<usize>) -> Result<SparseRegression> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| Error::Data(format!("cannot read {}: {e}", path.display())))?;
    parse_reader(std::io::BufReader::with_capacity(1 << 20, file), n_features).map_err(|e| match e {
        Error::Data(msg) => Error::Data(format!("{}: {msg}", path.display())),
        other => other,
    })
}

/// [`read_svmlight`] on the text of a file (errors name the line, not the file).
///
/// # Errors
/// As [`read_svmlight`].
pub fn parse_svmlight(text: &str, n_features: Option<usize>) -> Result<SparseRegression> {
    parse_reader(text.as_bytes(), n_features)
}

/// The reader of [`read_svmlight`]: one line at a time, so the text is never held whole
/// (the matrix is built as compressed rows, then one counting pass turns it to columns).
fn parse_reader(mut reader: impl BufRead, n_features: Option<usize>) -> Result<SparseRegression> {
    let mut y = Vec::new();
    let mut row_ptr = vec![0usize];
    let mut cols: Vec<usize> = Vec::new();
    let mut vals: Vec<f64> = Vec::new();
    let mut min_index = usize::MAX;
    let mut raw = String::new();
    let mut line_no = 0;
    loop {
        raw.clear();
        let read = reader
            .read_line(&mut raw)
            .map_err(|e| Error::Data(format!("line {}: {e}", line_no + 1)))?;
        if read == 0 {
            break;
        }
        line_no += 1;
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split_ascii_whitespace();
        let target = fields.next().expect("a non-empty line has a field");
        let t: f64 = target
            .parse()
            .map_err(|_| Error::Data(format!("line {line_no}: the target {target:?} is not a number")))?;
        if !t.is_finite() {
            return Err(Error::Data(format!("line {line_no}: the target {t} is not finite")));
        }
        let start = cols.len();
        for field in fields {
            let (index, value) = field
                .split_once(':')
                .ok_or_else(|| Error::Data(format!("line {line_no}: the field {field:?} is not index:value")))?;
            if index == "qid" {
                continue;
            }
            let j: usize = index.parse().map_err(|_| {
                Error::Data(format!(
                    "line {line_no}: the index {index:?} is not a non-negative integer"
                ))
            })?;
            let v: f64 = value.parse().map_err(|_| {
                Error::Data(format!(
                    "line {line_no}: the value {value:?} of index {j} is not a number"
                ))
            })?;
            if !v.is_finite() {
                return Err(Error::Data(format!("line {line_no}: the value of index {j} is {v}")));
            }
            if let Some(&prev) = cols[start..].last()
                && j <= prev
            {
                let what = if j == prev { "repeated" } else { "not increasing" };
                return Err(Error::Data(format!(
                    "line {line_no}: index {j} follows index {prev}: indices are {what}; each line must list its indices once, in increasing order"
                )));
            }
            min_index = min_index.min(j);
            cols.push(j);
            vals.push(v);
        }
        y.push(t);
        row_ptr.push(cols.len());
    }
    if y.is_empty() {
        return Err(Error::Data("no data line".to_string()));
    }
    let offset = usize::from(min_index != 0 && min_index != usize::MAX);
    let needed = cols.iter().max().map_or(0, |&m| m + 1 - offset);
    let p = match n_features {
        Some(p) if p < needed => {
            return Err(Error::Data(format!(
                "index {} is beyond the {p} features asked for",
                needed - 1 + offset
            )));
        }
        Some(p) => p,
        None => needed,
    };
    // The rows read are the columns of X^T (p x n), already checked increasing; X is its
    // transpose.
    cols.iter_mut().for_each(|j| *j -= offset);
    let xt = CscMatrix::try_new(p, y.len(), row_ptr, cols, vals)?;
    Ok(SparseRegression {
        x: xt.transpose(),
        y: Array1::from(y),
    })
}

/// Writes `(X, y)` in the svmlight format with 1-based indices (values in their shortest
/// exact form).
///
/// # Errors
/// `y` with another length than the rows of `X`, or a failed write, naming the file.
pub fn write_svmlight(path: impl AsRef<Path>, x: &CscMatrix, y: ArrayView1<'_, f64>) -> Result<()> {
    let path = path.as_ref();
    if y.len() != x.nrows() {
        return Err(Error::shapes(
            "write_svmlight",
            &[x.nrows(), x.ncols()],
            &[y.len()],
            "y needs one entry per row of X",
        ));
    }
    // The rows of X are the columns of X^T.
    let rows = x.transpose();
    let io = |e: std::io::Error| Error::Data(format!("cannot write {}: {e}", path.display()));
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    let mut line = String::new();
    for (i, &target) in y.iter().enumerate() {
        line.clear();
        write!(line, "{target:?}").expect("writing to a String");
        let (features, values) = rows.column(i);
        for (&j, &v) in features.iter().zip(values) {
            write!(line, " {}:{v:?}", j + 1).expect("writing to a String");
        }
        line.push('\n');
        out.write_all(line.as_bytes()).map_err(io)?;
    }
    out.flush().map_err(io)
}
