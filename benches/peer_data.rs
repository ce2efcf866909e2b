//! Writes a bench's problem to a file for the peer scripts of `benches/peers/`, so that the
//! other frameworks run on exactly the same numbers.
//!
//! Off by default: only when the environment variable `CLARKE_PEER_DATA` names a directory
//! does a bench write its data there (`conic_qp.json`, `deq_step_B_d_n.json`), once, before
//! any timing starts. The timed closures are the same either way.

use std::path::PathBuf;

use ndarray::{ArrayD, ArrayView1, ArrayView2};
use serde_json::Value;

/// The environment variable that names the output directory.
pub const ENV: &str = "CLARKE_PEER_DATA";

/// The output directory, when asked for (created if missing).
pub fn dir() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os(ENV)?);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("{ENV}: cannot create {}: {e}", dir.display());
    }
    Some(dir)
}

/// Writes `value` as `dir/name` and says so on stderr.
pub fn write(dir: &std::path::Path, name: &str, value: &Value) {
    let path = dir.join(name);
    let text = serde_json::to_string(value).expect("plain numbers serialise");
    if let Err(e) = std::fs::write(&path, text) {
        panic!("{ENV}: cannot write {}: {e}", path.display());
    }
    eprintln!("peer data written to {}", path.display());
}

/// A matrix as a list of rows (f64 round-trips exactly through serde_json).
pub fn matrix(a: ArrayView2<'_, f64>) -> Value {
    a.outer_iter().map(|r| r.to_vec()).collect::<Vec<_>>().into()
}

/// A vector as a list.
pub fn vector(a: ArrayView1<'_, f64>) -> Value {
    a.to_vec().into()
}

/// A 1-D or 2-D array as nested lists (other ranks flattened).
pub fn array(a: &ArrayD<f64>) -> Value {
    match a.ndim() {
        1 => vector(a.view().into_dimensionality().expect("1-D")),
        2 => matrix(a.view().into_dimensionality().expect("2-D")),
        _ => a.iter().copied().collect::<Vec<_>>().into(),
    }
}

/// The Frobenius norm of an array.
pub fn norm(a: &ArrayD<f64>) -> f64 {
    a.iter().map(|v| v * v).sum::<f64>().sqrt()
}
