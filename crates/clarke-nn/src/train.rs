//! Training-loop helpers: accuracy, per-epoch metrics, a progress display and curve plots.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use clarke_core::{Error, Result, Scalar};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ndarray::ArrayView2;

use crate::plot::{Panel, save_png};

/// Fraction of rows whose largest logit is at the label (the first largest on ties); 0 for
/// no rows.
///
/// # Errors
/// A label count other than the row count, a label that is not a column of `logits`, or a
/// non-finite logit (a NaN row has no largest logit): each names the row.
pub fn accuracy<S: Scalar>(logits: ArrayView2<'_, S>, labels: &[usize]) -> Result<f64> {
    const OP: &str = "accuracy";
    if logits.nrows() != labels.len() {
        return Err(Error::shapes(
            OP,
            logits.shape(),
            &[labels.len(), logits.ncols()],
            "one label per row of logits",
        ));
    }
    let mut correct = 0;
    for (i, (row, &y)) in logits.outer_iter().zip(labels).enumerate() {
        if y >= row.len() {
            return Err(Error::invalid(
                OP,
                format!("row {i}: label {y} is out of range for {} classes", row.len()),
            ));
        }
        if let Some((j, v)) = row.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::invalid(OP, format!("row {i}: logit {j} is {v}")));
        }
        let best = row
            .iter()
            .enumerate()
            .fold((0, row[0]), |b, (j, &v)| if v > b.1 { (j, v) } else { b });
        if best.0 == y {
            correct += 1;
        }
    }
    if labels.is_empty() {
        return Ok(0.0);
    }
    Ok(correct as f64 / labels.len() as f64)
}

/// What one epoch did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochRecord {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// Mean training loss over the epoch's batches.
    pub train_loss: f64,
    /// Accuracy on the test rows after the epoch.
    pub test_accuracy: f64,
    /// Mean forward iterations per batch (0 when not applicable).
    pub forward_iterations: f64,
    /// Mean adjoint iterations per batch (0 when not applicable).
    pub adjoint_iterations: f64,
    /// Wall-clock seconds of the epoch's training steps.
    pub seconds: f64,
}

/// The metrics of every epoch so far.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Records, oldest first.
    pub epochs: Vec<EpochRecord>,
}

impl History {
    /// Appends a record.
    pub fn push(&mut self, record: EpochRecord) {
        self.epochs.push(record);
    }

    /// The last record.
    pub fn last(&self) -> Option<&EpochRecord> {
        self.epochs.last()
    }

    /// Total training seconds.
    pub fn train_seconds(&self) -> f64 {
        self.epochs.iter().map(|e| e.seconds).sum()
    }

    /// Saves loss, test accuracy and iteration counts per epoch as a three-panel PNG.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn plot(&self, path: impl AsRef<Path>, title: &str) -> std::io::Result<()> {
        let pts = |f: fn(&EpochRecord) -> f64| self.epochs.iter().map(|e| (e.epoch as f64, f(e))).collect();
        let panels = [
            Panel::new(format!("{title}: training loss"))
                .labels("epoch", "cross-entropy")
                .log_y()
                .line_points("train loss", pts(|e| e.train_loss)),
            Panel::new("test accuracy")
                .labels("epoch", "accuracy")
                .line_points("test", pts(|e| e.test_accuracy)),
            Panel::new("solver iterations per batch")
                .labels("epoch", "iterations")
                .line_points("forward", pts(|e| e.forward_iterations))
                .line_points("adjoint", pts(|e| e.adjoint_iterations)),
        ];
        save_png(path, &panels)
    }
}

/// A progress display on stderr: a bar on a terminal, one line per epoch otherwise.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    total: usize,
}

impl Progress {
    /// A display for `epochs` epochs.
    pub fn new(epochs: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(epochs as u64), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} epochs [{elapsed}] {msg}")
                    .expect("a valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress { bar, total: epochs }
    }

    /// Reports a finished epoch.
    pub fn epoch(&self, r: &EpochRecord) {
        // Iteration counts only for models that have them (0 means not applicable).
        let iterations = if r.forward_iterations > 0.0 || r.adjoint_iterations > 0.0 {
            format!(
                "  fwd it {:.1}  adj it {:.1}",
                r.forward_iterations, r.adjoint_iterations
            )
        } else {
            String::new()
        };
        let msg = format!(
            "loss {:.4}  test acc {:.4}{iterations}  {:.2}s",
            r.train_loss, r.test_accuracy, r.seconds
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(r.epoch as u64);
                bar.set_message(msg);
            }
            None => eprintln!("epoch {:>3}/{}  {msg}", r.epoch, self.total),
        }
    }

    /// Removes the bar (a final line stays).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn accuracy_counts_argmax_hits() {
        let logits = array![[0.1, 0.9], [2.0, -1.0], [0.0, 0.5]];
        assert!((accuracy(logits.view(), &[1, 0, 0]).unwrap() - 2.0 / 3.0).abs() < 1e-15);
    }

    #[test]
    fn history_sums_and_plots() {
        let mut h = History::default();
        for e in 1..=3 {
            h.push(EpochRecord {
                epoch: e,
                train_loss: 1.0 / e as f64,
                test_accuracy: 0.5 + 0.1 * e as f64,
                forward_iterations: 20.0,
                adjoint_iterations: 15.0,
                seconds: 0.5,
            });
        }
        assert_eq!(h.train_seconds(), 1.5);
        let path = std::env::temp_dir().join(format!("clarke-history-{}.png", std::process::id()));
        h.plot(&path, "test").unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > 1000);
        std::fs::remove_file(path).unwrap();
    }
}
