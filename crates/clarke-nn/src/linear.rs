//! The affine layer `y = x W^T + b`.

use clarke_core::{Error, Result, Scalar, Var};
use ndarray::ArrayD;
use rand::Rng;

use crate::init::he_uniform;
use crate::params::{Bound, ParamId, ParamSet};

/// `y = x W^T + b` with `W` `[out, in]` and `b` `[out]`; `x` is `[batch, in]`.
#[derive(Debug, Clone, Copy)]
pub struct Linear {
    weight: ParamId,
    bias: ParamId,
    input_dim: usize,
    output_dim: usize,
}

impl Linear {
    /// Adds `name.weight` (He-uniform) and `name.bias` (zeros) to `params`.
    ///
    /// # Errors
    /// A zero dimension or a duplicate name.
    pub fn new<S: Scalar>(
        params: &mut ParamSet<S>,
        name: &str,
        input_dim: usize,
        output_dim: usize,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        if input_dim == 0 || output_dim == 0 {
            return Err(Error::invalid(
                "Linear::new",
                format!("dimensions must be positive, got {input_dim} -> {output_dim}"),
            ));
        }
        let weight = params.add(
            format!("{name}.weight"),
            he_uniform::<S>(output_dim, input_dim, rng).into_dyn(),
        )?;
        let bias = params.add(format!("{name}.bias"), ArrayD::zeros(vec![output_dim]))?;
        Ok(Linear {
            weight,
            bias,
            input_dim,
            output_dim,
        })
    }

    /// The weight's id.
    pub fn weight(&self) -> ParamId {
        self.weight
    }

    /// The bias's id.
    pub fn bias(&self) -> ParamId {
        self.bias
    }

    /// Output width.
    pub fn output_dim(&self) -> usize {
        self.output_dim
    }

    /// Applies the layer on the tape.
    ///
    /// # Errors
    /// When `x` is not `[batch, input_dim]`, `bound` is not a binding of the set holding
    /// the layer's parameters, a parameter was replaced (through `ParamSet::get_mut`) by an
    /// array of another shape (a bias of shape `[1]` would broadcast silently), or `x` or a
    /// parameter has a non-finite entry.
    pub fn forward<'t, S: Scalar>(&self, bound: &Bound<'t, S>, x: Var<'t, S>) -> Result<Var<'t, S>> {
        let shape = x.shape();
        if shape.len() != 2 || shape[1] != self.input_dim {
            return Err(Error::ShapeMismatch {
                op: "linear",
                lhs: shape,
                rhs: vec![0, self.input_dim],
                detail: format!("x must be [batch, {}]", self.input_dim),
            });
        }
        let weight = checked(bound, self.weight, "weight", &[self.output_dim, self.input_dim])?;
        let bias = checked(bound, self.bias, "bias", &[self.output_dim])?;
        finite("x", &x)?;
        x.try_matmul(weight.t())?.try_add(bias)
    }
}

/// The variable of parameter `id` (the layer's `what`), refused unless it has `shape` and
/// finite entries.
fn checked<'t, S: Scalar>(bound: &Bound<'t, S>, id: ParamId, what: &str, shape: &[usize]) -> Result<Var<'t, S>> {
    let v = bound.try_var(id)?;
    let found = v.shape();
    if found != shape {
        return Err(Error::shapes(
            "linear",
            &found,
            shape,
            format!("the {what} was replaced by an array of another shape"),
        ));
    }
    finite(&format!("the {what}"), &v)?;
    Ok(v)
}

/// Refuses a variable with a non-finite entry, naming it and the entry's flat index.
fn finite<S: Scalar>(what: &str, v: &Var<'_, S>) -> Result<()> {
    v.with_value(|a| match a.iter().enumerate().find(|(_, e)| !e.is_finite()) {
        None => Ok(()),
        Some((i, e)) => Err(Error::invalid(
            "linear",
            format!("{what} has a non-finite entry {e} at flat index {i}"),
        )),
    })
}
