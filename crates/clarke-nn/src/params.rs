//! Named parameters, their binding to a tape, and saving / loading them.
//!
//! A model owns a [`ParamSet`]; each training step binds it to a fresh tape
//! ([`ParamSet::bind`]), runs the layers on the [`Bound`] variables, and collects the
//! gradients in parameter order ([`Bound::gradients`]) for an optimiser.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use clarke_core::{Error, Grads, Result, Scalar, Tape, Var};
use ndarray::{ArrayD, IxDyn};
use serde_json::{Value, json};

/// The identity of the next [`ParamSet`].
static NEXT_SET: AtomicU64 = AtomicU64::new(0);

/// A parameter of a [`ParamSet`]: the identity of the set and the position in it.
///
/// An id works only with the set that issued it (and its clones) and with the [`Bound`]s
/// of that set; anything else is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamId {
    set: u64,
    index: usize,
}

impl ParamId {
    /// Position in the set: the index of this parameter's gradient in
    /// [`Bound::gradients`].
    pub fn index(self) -> usize {
        self.index
    }
}

/// `Ok(index)` when `id` belongs to the set `set` of `len` parameters.
fn check_id(op: &'static str, id: ParamId, set: u64, len: usize) -> Result<usize> {
    if id.set != set {
        return Err(Error::invalid(
            op,
            format!(
                "parameter #{} belongs to parameter set {}, not to set {set} ({len} parameters)",
                id.index, id.set
            ),
        ));
    }
    if id.index >= len {
        return Err(Error::invalid(
            op,
            format!("parameter #{} does not exist: set {set} has {len} parameters", id.index),
        ));
    }
    Ok(id.index)
}

/// The value of `r`, or a panic with its message at the caller's line.
#[track_caller]
fn or_panic<T>(r: Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// A named, ordered collection of parameter arrays.
///
/// Every set has its own identity, kept by its clones: its [`ParamId`]s, its [`Bound`]s and
/// the optimisers that stepped it refuse another set.
#[derive(Debug, Clone)]
pub struct ParamSet<S: Scalar> {
    id: u64,
    names: Vec<String>,
    values: Vec<ArrayD<S>>,
}

impl<S: Scalar> Default for ParamSet<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Scalar> ParamSet<S> {
    /// An empty set with a new identity.
    pub fn new() -> Self {
        ParamSet {
            id: NEXT_SET.fetch_add(1, Ordering::Relaxed),
            names: Vec::new(),
            values: Vec::new(),
        }
    }

    /// The identity of this set (shared by its clones).
    pub(crate) fn identity(&self) -> u64 {
        self.id
    }

    /// Adds a parameter. Names must be unique.
    ///
    /// # Errors
    /// A duplicate name, or a non-finite initial value.
    pub fn add(&mut self, name: impl Into<String>, value: ArrayD<S>) -> Result<ParamId> {
        let name = name.into();
        if self.names.contains(&name) {
            return Err(Error::invalid(
                "ParamSet::add",
                format!("a parameter named {name:?} exists already"),
            ));
        }
        if let Some(v) = value.iter().find(|v| !v.is_finite()) {
            return Err(Error::invalid(
                "ParamSet::add",
                format!("parameter {name:?} has a non-finite initial value {v}"),
            ));
        }
        self.names.push(name);
        self.values.push(value);
        Ok(ParamId {
            set: self.id,
            index: self.values.len() - 1,
        })
    }

    /// Number of parameters (arrays).
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Total number of scalars.
    pub fn num_scalars(&self) -> usize {
        self.values.iter().map(|v| v.len()).sum()
    }

    /// The value of a parameter.
    ///
    /// # Errors
    /// An id of another set.
    pub fn try_get(&self, id: ParamId) -> Result<&ArrayD<S>> {
        let i = check_id("ParamSet::get", id, self.id, self.values.len())?;
        Ok(&self.values[i])
    }

    /// The value of a parameter. Panics (at the caller's line) on an id of another set.
    #[track_caller]
    pub fn get(&self, id: ParamId) -> &ArrayD<S> {
        or_panic(self.try_get(id))
    }

    /// The value of a parameter, mutably.
    ///
    /// What is written here is not checked: the layers check the shapes and finiteness of
    /// their parameters when they run, the optimisers the shapes against their state, and
    /// [`ParamSet::save`] the finiteness.
    ///
    /// # Errors
    /// An id of another set.
    pub fn try_get_mut(&mut self, id: ParamId) -> Result<&mut ArrayD<S>> {
        let i = check_id("ParamSet::get_mut", id, self.id, self.values.len())?;
        Ok(&mut self.values[i])
    }

    /// The value of a parameter, mutably (unchecked, as [`ParamSet::try_get_mut`]). Panics
    /// (at the caller's line) on an id of another set.
    #[track_caller]
    pub fn get_mut(&mut self, id: ParamId) -> &mut ArrayD<S> {
        or_panic(self.try_get_mut(id))
    }

    /// The name of a parameter. Panics (at the caller's line) on an id of another set.
    #[track_caller]
    pub fn name(&self, id: ParamId) -> &str {
        let i = or_panic(check_id("ParamSet::name", id, self.id, self.names.len()));
        &self.names[i]
    }

    /// Looks a parameter up by name.
    pub fn id(&self, name: &str) -> Option<ParamId> {
        let set = self.id;
        self.names
            .iter()
            .position(|n| n == name)
            .map(|index| ParamId { set, index })
    }

    /// All ids, in insertion order.
    pub fn ids(&self) -> impl Iterator<Item = ParamId> + use<S> {
        let set = self.id;
        (0..self.values.len()).map(move |index| ParamId { set, index })
    }

    /// All values, in insertion order.
    pub fn values(&self) -> &[ArrayD<S>] {
        &self.values
    }

    /// All values, mutably (for optimisers; unchecked, as [`ParamSet::try_get_mut`]).
    pub fn values_mut(&mut self) -> &mut [ArrayD<S>] {
        &mut self.values
    }

    /// Records every parameter on `tape` as a gradient-requiring variable.
    ///
    /// The values are recorded as they are: [`ParamSet::add`] and the optimisers keep them
    /// finite, and the layers refuse a parameter made non-finite or reshaped through
    /// [`ParamSet::get_mut`] when they use it.
    pub fn bind<'t>(&self, tape: &'t Tape<S>) -> Bound<'t, S> {
        Bound {
            set: self.id,
            tape,
            vars: self.values.iter().map(|v| tape.param(v.clone())).collect(),
        }
    }

    /// Records every parameter on `tape` as a constant (evaluation without gradients), as
    /// they are (see [`ParamSet::bind`]).
    pub fn bind_constant<'t>(&self, tape: &'t Tape<S>) -> Bound<'t, S> {
        Bound {
            set: self.id,
            tape,
            vars: self.values.iter().map(|v| tape.constant(v.clone())).collect(),
        }
    }

    /// Saves the parameters as JSON (`{"scalar": "f64", "params": [{"name", "shape",
    /// "data"}]}`); values are written with full precision.
    ///
    /// # Errors
    /// A non-finite value (JSON has no number for it: it would be written as `null`, which
    /// [`ParamSet::load`] refuses), naming the parameter; or a file that cannot be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        for (name, value) in self.names.iter().zip(&self.values) {
            if let Some((i, v)) = value.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(Error::invalid(
                    "ParamSet::save",
                    format!("parameter {name:?} has the non-finite value {v} at flat index {i}"),
                ));
            }
        }
        let params: Vec<Value> = self
            .names
            .iter()
            .zip(&self.values)
            .map(|(n, v)| {
                json!({
                    "name": n,
                    "shape": v.shape(),
                    "data": v.iter().map(|x| x.to_f64_exact()).collect::<Vec<f64>>(),
                })
            })
            .collect();
        let doc = json!({ "scalar": S::NAME, "params": params });
        std::fs::write(path.as_ref(), doc.to_string())
            .map_err(|e| Error::invalid("ParamSet::save", format!("{}: {e}", path.as_ref().display())))
    }

    /// Loads values saved by [`ParamSet::save`] into this set: every parameter must be present
    /// once with the same shape, and the file must hold no other parameter (the set's
    /// structure comes from the model, the file fills it; a file of another model is refused).
    /// Nothing is loaded unless everything is.
    ///
    /// # Errors
    /// An unreadable file, a missing, repeated or unknown parameter, a shape mismatch, or a
    /// value that is not finite in `S` (checked after the conversion: 1e300 is finite in f64,
    /// not in f32).
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bad = |detail: String| Error::invalid("ParamSet::load", format!("{}: {detail}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let doc: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let entries = doc["params"]
            .as_array()
            .ok_or_else(|| bad("no \"params\" array".into()))?;
        let mut loaded = Vec::with_capacity(self.values.len());
        for (name, current) in self.names.iter().zip(&self.values) {
            let entry = entries
                .iter()
                .find(|e| e["name"].as_str() == Some(name))
                .ok_or_else(|| bad(format!("parameter {name:?} is missing")))?;
            let shape: Vec<usize> = entry["shape"]
                .as_array()
                .ok_or_else(|| bad(format!("parameter {name:?} has no shape")))?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<_>>()
                .ok_or_else(|| bad(format!("parameter {name:?} has a malformed shape")))?;
            if shape != current.shape() {
                return Err(Error::ShapeMismatch {
                    op: "ParamSet::load",
                    lhs: shape,
                    rhs: current.shape().to_vec(),
                    detail: format!("parameter {name:?}: the file's shape differs from the model's"),
                });
            }
            let data: Vec<S> = entry["data"]
                .as_array()
                .ok_or_else(|| bad(format!("parameter {name:?} has no data")))?
                .iter()
                .map(|x| {
                    let v = x
                        .as_f64()
                        .ok_or_else(|| bad(format!("parameter {name:?} has a non-numeric value {x}")))?;
                    // Finite in f64 is not enough: 1e300 overflows f32.
                    let s = S::from_f64_lossy(v);
                    if s.is_finite() {
                        Ok(s)
                    } else {
                        Err(bad(format!(
                            "parameter {name:?} has the value {v:?}, not finite in {}",
                            S::NAME
                        )))
                    }
                })
                .collect::<Result<_>>()?;
            let value =
                ArrayD::from_shape_vec(IxDyn(&shape), data).map_err(|e| bad(format!("parameter {name:?}: {e}")))?;
            loaded.push(value);
        }
        let mut seen = HashSet::with_capacity(entries.len());
        for (k, entry) in entries.iter().enumerate() {
            let name = entry["name"]
                .as_str()
                .ok_or_else(|| bad(format!("entry {k} of \"params\" has no name")))?;
            if !self.names.iter().any(|n| n == name) {
                return Err(bad(format!(
                    "parameter {name:?} in the file is not a parameter of this set"
                )));
            }
            if !seen.insert(name) {
                return Err(bad(format!("parameter {name:?} appears more than once")));
            }
        }
        self.values = loaded;
        Ok(())
    }
}

/// The parameters of a [`ParamSet`] recorded on one tape.
#[derive(Debug, Clone)]
pub struct Bound<'t, S: Scalar> {
    /// Identity of the set that was bound.
    set: u64,
    tape: &'t Tape<S>,
    vars: Vec<Var<'t, S>>,
}

impl<'t, S: Scalar> Bound<'t, S> {
    /// The variable of a parameter.
    ///
    /// # Errors
    /// An id of another set than the one bound.
    pub fn try_var(&self, id: ParamId) -> Result<Var<'t, S>> {
        Ok(self.vars[check_id("Bound::var", id, self.set, self.vars.len())?])
    }

    /// The variable of a parameter. Panics (at the caller's line) on an id of another set
    /// than the one bound.
    #[track_caller]
    pub fn var(&self, id: ParamId) -> Var<'t, S> {
        or_panic(self.try_var(id))
    }

    /// The gradient of every parameter, in set order (zeros for a parameter the output does
    /// not depend on).
    ///
    /// # Errors
    /// `set` is not the set that was bound (or has changed size since), `grads` come from a
    /// backward pass on another tape, or a gradient entry is non-finite (naming the parameter).
    pub fn gradients(&self, grads: &Grads<S>, set: &ParamSet<S>) -> Result<Vec<ArrayD<S>>> {
        if set.id != self.set || set.len() != self.vars.len() {
            return Err(Error::invalid(
                "Bound::gradients",
                format!(
                    "the parameters of set {} ({} parameters) are bound, not those of set {} ({} parameters)",
                    self.set,
                    self.vars.len(),
                    set.id,
                    set.len()
                ),
            ));
        }
        if !grads.is_from(self.tape) {
            return Err(Error::invalid(
                "Bound::gradients",
                "the gradients come from a backward pass on another tape than the one the parameters are bound to",
            ));
        }
        self.vars
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let g = grads.get(*v).cloned().unwrap_or_else(|| ArrayD::zeros(v.shape()));
                if let Some(bad) = first_non_finite(&g) {
                    return Err(Error::invalid(
                        "Bound::gradients",
                        format!(
                            "the gradient of parameter {:?} has a non-finite entry {bad}",
                            set.names[i]
                        ),
                    ));
                }
                Ok(g)
            })
            .collect()
    }
}

/// The first non-finite entry of `a` (in memory order), if any. A contiguous array is first
/// checked in one pass without early exit, which vectorises: a gradient or parameter check
/// on every training step then costs a fraction of a nanosecond per element.
pub(crate) fn first_non_finite<S: Scalar>(a: &ArrayD<S>) -> Option<S> {
    match a.as_slice_memory_order() {
        Some(s) if s.iter().fold(true, |ok, v| ok & v.is_finite()) => None,
        Some(s) => s.iter().copied().find(|v| !v.is_finite()),
        None => a.iter().copied().find(|v| !v.is_finite()),
    }
}
