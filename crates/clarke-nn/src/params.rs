//! Named parameters, their binding to a tape, and saving / loading them.
//!
//! A model owns a [`ParamSet`]; each training step binds it to a fresh tape
//! ([`ParamSet::bind`]), runs the layers on the [`Bound`] variables, and collects the
//! gradients in parameter order ([`Bound::gradients`]) for an optimiser.

use std::path::Path;

use clarke_core::{Error, Grads, Result, Scalar, Tape, Var};
use ndarray::{ArrayD, IxDyn};
use serde_json::{json, Value};

/// Index of a parameter in its [`ParamSet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamId(pub(crate) usize);

impl ParamId {
    /// Position in the set: the index of this parameter's gradient in
    /// [`Bound::gradients`].
    pub fn index(self) -> usize {
        self.0
    }
}

/// A named, ordered collection of parameter arrays.
#[derive(Debug, Clone, Default)]
pub struct ParamSet<S: Scalar> {
    names: Vec<String>,
    values: Vec<ArrayD<S>>,
}

impl<S: Scalar> ParamSet<S> {
    /// An empty set.
    pub fn new() -> Self {
        ParamSet {
            names: Vec::new(),
            values: Vec::new(),
        }
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
        Ok(ParamId(self.values.len() - 1))
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
    pub fn get(&self, id: ParamId) -> &ArrayD<S> {
        &self.values[id.0]
    }

    /// The value of a parameter, mutably.
    pub fn get_mut(&mut self, id: ParamId) -> &mut ArrayD<S> {
        &mut self.values[id.0]
    }

    /// The name of a parameter.
    pub fn name(&self, id: ParamId) -> &str {
        &self.names[id.0]
    }

    /// Looks a parameter up by name.
    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.names.iter().position(|n| n == name).map(ParamId)
    }

    /// All ids, in insertion order.
    pub fn ids(&self) -> impl Iterator<Item = ParamId> {
        (0..self.values.len()).map(ParamId)
    }

    /// All values, in insertion order.
    pub fn values(&self) -> &[ArrayD<S>] {
        &self.values
    }

    /// All values, mutably (for optimisers).
    pub fn values_mut(&mut self) -> &mut [ArrayD<S>] {
        &mut self.values
    }

    /// Records every parameter on `tape` as a gradient-requiring variable.
    pub fn bind<'t>(&self, tape: &'t Tape<S>) -> Bound<'t, S> {
        Bound {
            vars: self.values.iter().map(|v| tape.param(v.clone())).collect(),
        }
    }

    /// Records every parameter on `tape` as a constant (evaluation without gradients).
    pub fn bind_constant<'t>(&self, tape: &'t Tape<S>) -> Bound<'t, S> {
        Bound {
            vars: self.values.iter().map(|v| tape.constant(v.clone())).collect(),
        }
    }

    /// Saves the parameters as JSON (`{"scalar": "f64", "params": [{"name", "shape",
    /// "data"}]}`); values are written with full precision.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
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
    /// with the same shape (the set's structure comes from the model, the file fills it).
    ///
    /// # Errors
    /// An unreadable file, a missing parameter, a shape mismatch, or a non-finite value.
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
                .map(|x| x.as_f64().filter(|x| x.is_finite()).map(S::from_f64_lossy))
                .collect::<Option<_>>()
                .ok_or_else(|| bad(format!("parameter {name:?} has a non-numeric or non-finite value")))?;
            let value =
                ArrayD::from_shape_vec(IxDyn(&shape), data).map_err(|e| bad(format!("parameter {name:?}: {e}")))?;
            loaded.push(value);
        }
        self.values = loaded;
        Ok(())
    }
}

/// The parameters of a [`ParamSet`] recorded on one tape.
#[derive(Debug, Clone)]
pub struct Bound<'t, S: Scalar> {
    vars: Vec<Var<'t, S>>,
}

impl<'t, S: Scalar> Bound<'t, S> {
    /// The variable of a parameter.
    pub fn var(&self, id: ParamId) -> Var<'t, S> {
        self.vars[id.0]
    }

    /// The gradient of every parameter, in set order (zeros for a parameter the output does
    /// not depend on).
    ///
    /// # Errors
    /// A non-finite gradient entry, naming the parameter.
    pub fn gradients(&self, grads: &Grads<S>, set: &ParamSet<S>) -> Result<Vec<ArrayD<S>>> {
        self.vars
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let g = grads.get(*v).cloned().unwrap_or_else(|| ArrayD::zeros(v.shape()));
                if let Some(bad) = g.iter().find(|x| !x.is_finite()) {
                    return Err(Error::invalid(
                        "gradients",
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
