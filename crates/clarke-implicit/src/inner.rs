//! The inner map of a layer: evaluated without recording during the forward solve, and
//! linearized at the solution during backward.
//!
//! Each evaluation records the map on a fresh, short-lived tape; nothing of it reaches the
//! outer tape. The linearization records the map once at `(z*, theta)` with `z` as the only
//! parameter, and every product with `J_z^T` is a replay of that recording with another seed.
//! The product with `J_theta^T` records the map once more, with `theta` as parameters.

use std::rc::Rc;

use clarke_core::{BackwardOptions, ElementSelection, Error, KinkLedger, KinkPolicy, Result, Scalar, Tape, Var};
use ndarray::{Array1, Array2, ArrayD, ArrayView1, ArrayViewD, ArrayViewMut1, IxDyn};

/// A flat copy of an array in row-major order (a memcpy when it is contiguous).
pub(crate) fn flat<S: Scalar>(a: &ArrayD<S>) -> Array1<S> {
    match a.as_slice() {
        Some(s) => Array1::from(s.to_vec()),
        None => a.iter().copied().collect(),
    }
}

/// An array as a flat vector, without copying when it is in standard layout.
pub(crate) fn into_flat<S: Scalar>(a: ArrayD<S>) -> Result<Array1<S>> {
    let n = a.len();
    if a.is_standard_layout() {
        a.into_shape_with_order(n)
            .map_err(|e| Error::invalid("implicit layer", format!("flattening an array of {n} elements: {e}")))
    } else {
        Ok(a.iter().copied().collect())
    }
}

/// A flat vector reshaped to `shape`; a length that does not fit is a shape mismatch naming
/// the layer.
fn shaped<S: Scalar>(name: &str, v: ArrayView1<'_, S>, shape: &[usize]) -> Result<ArrayD<S>> {
    let n: usize = shape.iter().product();
    if v.len() != n {
        return Err(Error::shapes(
            "implicit layer",
            &[v.len()],
            shape,
            format!(
                "{name}: a vector of {} elements does not fit z's shape {shape:?}",
                v.len()
            ),
        ));
    }
    v.to_owned()
        .into_shape_with_order(IxDyn(shape))
        .map_err(|e| Error::invalid("implicit layer", format!("{name}: {e}")))
}

/// A map recorded onto any tape: `(z, theta) -> T(z, theta)` or `F(z, theta)`.
pub type MapFn<S> = dyn for<'s> Fn(Var<'s, S>, &[Var<'s, S>]) -> Result<Var<'s, S>>;

/// The map with the layer's name and the shape of `z`.
pub(crate) struct InnerMap<S: Scalar> {
    pub name: String,
    pub map: Rc<MapFn<S>>,
    pub shape: Vec<usize>,
}

impl<S: Scalar> InnerMap<S> {
    fn to_shaped(&self, z: ArrayView1<'_, S>) -> Result<ArrayD<S>> {
        shaped(&self.name, z, &self.shape)
    }

    /// Records the map on `tape` and checks that the output has the shape of `z`.
    pub fn record<'s>(&self, z: Var<'s, S>, theta: &[Var<'s, S>]) -> Result<Var<'s, S>> {
        let out = (self.map)(z, theta)?;
        if out.shape() != self.shape {
            return Err(Error::ShapeMismatch {
                op: "implicit layer",
                lhs: out.shape(),
                rhs: self.shape.clone(),
                detail: format!(
                    "{}: the map returned an array of shape {:?} for z of shape {:?}; it must return z's shape",
                    self.name,
                    out.shape(),
                    self.shape
                ),
            });
        }
        Ok(out)
    }

    /// A scratch tape holding `theta` for repeated evaluations (see [`InnerMap::eval_in`]).
    pub fn scratch(&self, theta: &[ArrayViewD<'_, S>]) -> Scratch<S> {
        let tape = Tape::new();
        let ids = theta.iter().map(|t| tape.constant(t.to_owned()).id()).collect();
        let non_finite_theta = theta.iter().enumerate().find_map(|(i, t)| {
            t.iter()
                .enumerate()
                .find(|(_, v)| !v.is_finite())
                .map(|(j, v)| format!("theta[{i}] has a non-finite value {v} at flat index {j}"))
        });
        Scratch {
            tape,
            ids,
            non_finite_theta,
        }
    }

    /// `T(z, theta)` (or `F`) on the flat state, recorded on a scratch frame of `scratch`
    /// and dropped at once: `theta` is not copied again and nothing outlives the call. A
    /// non-finite output is reported with the inner node that produced it.
    pub fn eval_in(&self, scratch: &Scratch<S>, z: ArrayView1<'_, S>) -> Result<Array1<S>> {
        let zd = self.to_shaped(z)?;
        let value = into_flat(
            scratch
                .tape
                .eval_scoped(&scratch.ids, |t, th| self.record(t.constant(zd), th))?,
        )?;
        if value.iter().all(|v| v.is_finite()) {
            return Ok(value);
        }
        Err(self.locate_non_finite(scratch, z))
    }

    /// One evaluation on its own scratch tape.
    pub fn eval(&self, z: ArrayView1<'_, S>, theta: &[ArrayViewD<'_, S>]) -> Result<Array1<S>> {
        self.eval_in(&self.scratch(theta), z)
    }

    /// Re-runs the map on the same scratch tape with anomaly detection, to name the inner
    /// node that produced a NaN or an infinity.
    fn locate_non_finite(&self, scratch: &Scratch<S>, z: ArrayView1<'_, S>) -> Error {
        let detail = if !z.iter().all(|v| v.is_finite()) {
            Error::invalid("implicit layer", "the iterate z itself is not finite")
        } else {
            let tape = &scratch.tape;
            tape.set_anomaly_detection(true);
            let rerun = self
                .to_shaped(z)
                .and_then(|zd| tape.eval_scoped(&scratch.ids, |t, th| self.record(t.constant(zd), th)))
                .and_then(|_| tape.check_anomaly());
            tape.set_anomaly_detection(false);
            match rerun {
                Err(e) => e,
                Ok(()) => Error::invalid(
                    "implicit layer",
                    match &scratch.non_finite_theta {
                        Some(theta) => format!("the map returned a non-finite value; {theta}"),
                        None => "the map returned a non-finite value".to_string(),
                    },
                ),
            }
        };
        Error::InImplicit {
            node: self.name.clone(),
            context: "the inner map produced a non-finite value",
            source: Box::new(detail),
        }
    }

    /// Records the map at `(z*, theta)` for products with `J_z^T`.
    pub fn linearize<'s>(
        &'s self,
        tape: &'s Tape<S>,
        z_star: ArrayViewD<'_, S>,
        theta: &[ArrayViewD<'_, S>],
        policy: KinkPolicy,
    ) -> Result<Linearization<'s, S>> {
        let z = tape.param(z_star.to_owned());
        let th: Vec<Var<'s, S>> = theta.iter().map(|t| tape.constant(t.to_owned())).collect();
        let out = self.record(z, &th)?;
        Ok(Linearization {
            z,
            out,
            shape: self.shape.clone(),
            policy,
            band: 0.0,
            inner: self,
            theta: theta.iter().map(|t| t.to_owned()).collect(),
        })
    }

    /// `J_theta^T w` for every `theta`, at `(z*, theta)`, under `policy` and the solver band
    /// `band`.
    pub fn theta_vjp(
        &self,
        z_star: ArrayViewD<'_, S>,
        theta: &[ArrayViewD<'_, S>],
        w: ArrayView1<'_, S>,
        policy: &KinkPolicy,
        band: f64,
    ) -> Result<Vec<ArrayD<S>>> {
        let tape = Tape::new();
        let z = tape.constant(z_star.to_owned());
        let th: Vec<Var<'_, S>> = theta.iter().map(|t| tape.param(t.to_owned())).collect();
        let out = self.record(z, &th)?;
        let options = BackwardOptions::seed(self.to_shaped(w)?)
            .with_policy(policy.clone())
            .with_solver_band(band);
        let mut grads = out.backward_with(&options)?;
        Ok(th
            .iter()
            .map(|t| grads.take(*t).unwrap_or_else(|| ArrayD::zeros(t.value().raw_dim())))
            .collect())
    }
}

/// A tape holding the parameters of repeated forward evaluations.
pub(crate) struct Scratch<S: Scalar> {
    tape: Tape<S>,
    ids: Vec<usize>,
    /// The first non-finite parameter value, in words: a parameter may hold an infinity the
    /// map handles (a bound, say), so it is named only when the map's output is not finite.
    non_finite_theta: Option<String>,
}

/// The map recorded at `(z*, theta)`: products with `J_z^T` replay it.
pub(crate) struct Linearization<'s, S: Scalar> {
    z: Var<'s, S>,
    out: Var<'s, S>,
    shape: Vec<usize>,
    policy: KinkPolicy,
    /// The solver error band every product applies (see [`crate::KinkBand`]).
    band: f64,
    inner: &'s InnerMap<S>,
    theta: Vec<ArrayD<S>>,
}

impl<'s, S: Scalar> Linearization<'s, S> {
    /// Number of elements of `z`.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// The map's value at `z*` (flat).
    pub fn value(&self) -> Array1<S> {
        self.out.with_value(flat)
    }

    /// `z*` (flat).
    pub fn z(&self) -> Array1<S> {
        self.z.with_value(flat)
    }

    /// `J_z^T w`, with `selections` overriding the policy at single kink elements.
    pub fn vjp(&self, w: ArrayView1<'_, S>, selections: &[ElementSelection]) -> Result<Array1<S>> {
        let seed = shaped(&self.inner.name, w, &self.shape)?;
        let options = BackwardOptions {
            seed: Some(seed),
            policy: Some(self.policy.clone()),
            element_selections: selections.to_vec(),
            solver_band: self.band,
        };
        let mut grads = self.out.backward_with(&options)?;
        match grads.take(self.z) {
            Some(g) => into_flat(g),
            None => Ok(Array1::zeros(self.len())),
        }
    }

    /// `J_z v`, with the policy, band and `selections` of [`Linearization::vjp`], so that
    /// `<J_z v, w> = <v, J_z^T w>` for the same selections: one forward-mode replay of the
    /// recording.
    ///
    /// A map containing a custom op without a forward-mode rule gives the core's
    /// [`Error::CustomOp`] unchanged: such a map has no matrix-free products with `J_z`.
    pub fn jvp(&self, v: ArrayView1<'_, S>, selections: &[ElementSelection]) -> Result<Array1<S>> {
        let tangent = shaped(&self.inner.name, v, &self.shape)?;
        let options = BackwardOptions {
            seed: None,
            policy: Some(self.policy.clone()),
            element_selections: selections.to_vec(),
            solver_band: self.band,
        };
        let product = self.out.jvp(&[(self.z, tangent)], &options)?;
        into_flat(product.into_tangent())
    }

    /// Whether the map has forward-mode products: `Ok(None)` when it does, `Ok(Some(e))`
    /// with the core's [`Error::CustomOp`] naming the custom op without a forward-mode rule,
    /// and any other error of the replay as an error.
    pub fn forward_mode_refusal(&self) -> Result<Option<Error>> {
        match self.jvp(Array1::zeros(self.len()).view(), &[]) {
            Ok(_) => Ok(None),
            Err(e @ Error::CustomOp { .. }) => Ok(Some(e)),
            Err(e) => Err(e),
        }
    }

    /// `y = J_z^T x` into `y`, for a linear operator; `y` must have `z`'s length.
    pub fn vjp_into(&self, x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>) -> Result<()> {
        self.assign_product("J_z^T x", self.vjp(x, &[])?, y)
    }

    /// `y = J_z x` into `y`, for a linear operator; `y` must have `z`'s length.
    pub fn jvp_into(&self, x: ArrayView1<'_, S>, y: ArrayViewMut1<'_, S>) -> Result<()> {
        self.assign_product("J_z x", self.jvp(x, &[])?, y)
    }

    fn assign_product(&self, what: &str, product: Array1<S>, mut y: ArrayViewMut1<'_, S>) -> Result<()> {
        if product.len() != y.len() {
            return Err(Error::shapes(
                "implicit layer",
                &[product.len()],
                &[y.len()],
                format!("{}: {what} has the wrong length for the operator", self.inner.name),
            ));
        }
        y.assign(&product);
        Ok(())
    }

    /// The dense `J_z` (row `i` is `J_z^T e_i`), one product per element.
    pub fn jacobian(&self, selections: &[ElementSelection]) -> Result<Array2<S>> {
        let n = self.len();
        let mut j = Array2::zeros((n, n));
        let mut e = Array1::zeros(n);
        for i in 0..n {
            e[i] = S::one();
            let row = self.vjp(e.view(), selections)?;
            if row.len() != n {
                return Err(Error::shapes(
                    "implicit layer",
                    &[row.len()],
                    &[n],
                    format!("{}: row {i} of J_z has the wrong length", self.inner.name),
                ));
            }
            j.row_mut(i).assign(&row);
            e[i] = S::zero();
        }
        Ok(j)
    }

    /// The kinks the map hit at `z*` under the policy and the solver band: the ledger of one
    /// backward pass through the recording, so the kinks of fused ops inside the map (which
    /// report them during backward) are there beside those of the core ops.
    pub fn ledger(&self) -> Result<KinkLedger> {
        let options = BackwardOptions {
            seed: Some(ArrayD::zeros(IxDyn(&self.shape))),
            policy: Some(self.policy.clone()),
            element_selections: Vec::new(),
            solver_band: self.band,
        };
        Ok(self.out.backward_with(&options)?.ledger().clone())
    }

    /// Sets the solver band of every later product and ledger.
    pub fn set_band(&mut self, band: f64) {
        self.band = band;
    }

    /// `J_theta^T w` for every `theta`, under the same policy and band.
    pub fn theta_vjp(&self, w: ArrayView1<'_, S>) -> Result<Vec<ArrayD<S>>> {
        let views: Vec<ArrayViewD<'_, S>> = self.theta.iter().map(|t| t.view()).collect();
        let z = self.z.value();
        self.inner.theta_vjp(z.view(), &views, w, &self.policy, self.band)
    }

    /// `J_theta dtheta` (all `theta` together; `None` is a zero tangent), under the same
    /// policy and band: one forward-mode pass through the map recorded with `theta` as
    /// parameters.
    pub fn theta_jvp(&self, tangents: &[Option<ArrayViewD<'_, S>>]) -> Result<Array1<S>> {
        let tape = Tape::new();
        let z = tape.constant(self.z.value());
        let th: Vec<Var<'_, S>> = self.theta.iter().map(|t| tape.param(t.clone())).collect();
        let out = self.inner.record(z, &th)?;
        let pairs: Vec<(Var<'_, S>, ArrayD<S>)> = th
            .iter()
            .zip(tangents)
            .filter_map(|(t, d)| d.as_ref().map(|d| (*t, d.to_owned())))
            .collect();
        if pairs.is_empty() {
            return Ok(Array1::zeros(self.len()));
        }
        let options = BackwardOptions {
            seed: None,
            policy: Some(self.policy.clone()),
            element_selections: Vec::new(),
            solver_band: self.band,
        };
        into_flat(out.jvp(&pairs, &options)?.into_tangent())
    }

    /// The derivative scale of the map in `theta`: the largest row norm of `J_theta` (all
    /// `theta` together), one replay per element of `z`. A root layer's check judges the
    /// singularity of `J_F` against it.
    pub fn theta_scale(&self) -> Result<f64> {
        let tape = Tape::new();
        let z = tape.constant(self.z.value());
        let th: Vec<Var<'_, S>> = self.theta.iter().map(|t| tape.param(t.clone())).collect();
        let out = self.inner.record(z, &th)?;
        let n = self.len();
        let mut e = Array1::<S>::zeros(n);
        let mut worst = 0.0f64;
        for i in 0..n {
            e[i] = S::one();
            let options = BackwardOptions::seed(self.inner.to_shaped(e.view())?)
                .with_policy(self.policy.clone())
                .with_solver_band(self.band);
            let grads = out.backward_with(&options)?;
            let norm2: f64 = th
                .iter()
                .filter_map(|t| grads.get(*t))
                .flat_map(|g| g.iter().map(|v| v.to_f64_exact().powi(2)))
                .sum();
            worst = worst.max(norm2.sqrt());
            e[i] = S::zero();
        }
        Ok(worst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr1;

    fn inner(map: Rc<MapFn<f64>>, n: usize) -> InnerMap<f64> {
        InnerMap {
            name: "test".to_string(),
            map,
            shape: vec![n],
        }
    }

    fn dot(a: &Array1<f64>, b: &Array1<f64>) -> f64 {
        a.dot(b)
    }

    #[test]
    fn jvp_is_the_transpose_of_vjp_at_kinks_with_selections() {
        // relu(W z + theta) with kinks planted at elements 0 and 2; abs at element 1.
        let map: Rc<MapFn<f64>> = Rc::new(|z, th| Ok((th[1].matmul(z) + th[0]).relu() + z.abs() * 0.25));
        let m = inner(map, 3);
        let w = Array2::from_shape_vec((3, 3), vec![0.2, -0.1, 0.3, 0.05, 0.4, -0.2, -0.3, 0.1, 0.25]).unwrap();
        let z = arr1(&[0.5, 0.0, -1.0]);
        // W z + theta = 0 at elements 0 and 2.
        let theta = -w.dot(&z);
        let theta = ArrayD::from(theta.into_dyn());
        let w = w.into_dyn();
        let tape = Tape::new();
        let policy = KinkPolicy::pytorch();
        let lin = m
            .linearize(&tape, z.view().into_dyn(), &[theta.view(), w.view()], policy)
            .unwrap();
        let v = arr1(&[0.3, -1.2, 0.7]);
        let u = arr1(&[-0.4, 0.9, 1.1]);
        let ledger = lin.ledger().unwrap();
        assert!(ledger.kink_elements() >= 3, "{ledger:?}");
        for selections in [
            Vec::new(),
            vec![ElementSelection {
                node: ledger.records()[0].node,
                element: ledger.records()[0].kink_indices[0],
                value: 1.0,
            }],
        ] {
            let jv = lin.jvp(v.view(), &selections).unwrap();
            let jtu = lin.vjp(u.view(), &selections).unwrap();
            let (lhs, rhs) = (dot(&jv, &u), dot(&v, &jtu));
            assert!((lhs - rhs).abs() <= 1e-14 * lhs.abs().max(1.0), "{lhs} vs {rhs}");
        }
        assert!(lin.forward_mode_refusal().unwrap().is_none());
    }

    #[test]
    fn a_custom_op_without_a_forward_rule_is_a_custom_op_error() {
        let map: Rc<MapFn<f64>> = Rc::new(|z, _| {
            let value = z.value().mapv(|v| 0.5 * v);
            z.tape()
                .try_custom_fn("half", &[z], value, |_, _, g| Ok(vec![Some(g.mapv(|v| 0.5 * v))]))
        });
        let m = inner(map, 2);
        let tape = Tape::new();
        let lin = m
            .linearize(&tape, arr1(&[1.0, 2.0]).view().into_dyn(), &[], KinkPolicy::pytorch())
            .unwrap();
        let err = lin.jvp(arr1(&[1.0, 0.0]).view(), &[]).unwrap_err();
        assert!(matches!(&err, Error::CustomOp { op, .. } if op == "half"), "{err}");
        assert!(matches!(
            lin.forward_mode_refusal().unwrap(),
            Some(Error::CustomOp { .. })
        ));
        assert_eq!(lin.vjp(arr1(&[1.0, 0.0]).view(), &[]).unwrap(), arr1(&[0.5, 0.0]));
    }
}
