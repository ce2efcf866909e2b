//! Matrix products (2-D, matrix-vector, vector-matrix, dot, batched) and axis permutations.
//!
//! Products go through [`gemm`](crate::gemm::gemm()) on strided views, so the transposes in
//! the backward rules (`G B^T`, `A^T G`) cost no copies.

use ndarray::{Array2, ArrayD, ArrayView2, Axis, Ix1, Ix2, Ix3, IxDyn};

use crate::gemm::gemm;
use crate::kernels::{add_into, checked_len};
use crate::op::{Ctx, InputGrads, InputTangents, Op, add_term};
use crate::tape::Inputs;
use crate::var::Var;
use crate::{Error, Result, Scalar};

/// Which product, by the ranks of the operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Product {
    /// (m, k) x (k, n) -> (m, n)
    MatMat,
    /// (m, k) x (k,) -> (m,)
    MatVec,
    /// (k,) x (k, n) -> (n,)
    VecMat,
    /// (k,) x (k,) -> ()
    Dot,
    /// (b, m, k) x (b, k, n) -> (b, m, n)
    Batched,
    /// (b, m, k) x (k, n) -> (b, m, n): one weight matrix for the whole batch
    BatchedShared,
}

pub(crate) enum LinalgOp {
    MatMul(Product),
    /// Axis permutation: output axis i is input axis `perm[i]`.
    Permute(Vec<usize>),
}

fn as2<S: Scalar>(a: &ArrayD<S>) -> ArrayView2<'_, S> {
    a.view()
        .into_dimensionality::<Ix2>()
        .expect("rank checked at record time")
}

/// (m, 1) column view of a vector.
fn col<S: Scalar>(a: &ArrayD<S>) -> ArrayView2<'_, S> {
    a.view()
        .into_dimensionality::<Ix1>()
        .expect("rank checked")
        .insert_axis(Axis(1))
}

/// (1, n) row view of a vector.
fn row<S: Scalar>(a: &ArrayD<S>) -> ArrayView2<'_, S> {
    a.view()
        .into_dimensionality::<Ix1>()
        .expect("rank checked")
        .insert_axis(Axis(0))
}

/// `a b` into a new matrix.
fn mm<S: Scalar>(a: ArrayView2<'_, S>, b: ArrayView2<'_, S>) -> Array2<S> {
    let mut c = Array2::zeros((a.nrows(), b.ncols()));
    gemm(S::one(), a, b, false, c.view_mut());
    c
}

/// A 3-D array as (b * m, k) when its memory allows it without a copy.
fn flatten_batch<S: Scalar>(a: &ArrayD<S>) -> Option<ArrayView2<'_, S>> {
    let s = a.shape();
    a.view().into_shape_with_order((s[0] * s[1], s[2])).ok()
}

fn forward<S: Scalar>(p: Product, a: &ArrayD<S>, b: &ArrayD<S>) -> ArrayD<S> {
    match p {
        Product::MatMat => mm(as2(a), as2(b)).into_dyn(),
        Product::MatVec => mm(as2(a), col(b))
            .into_shape_with_order(IxDyn(&[a.shape()[0]]))
            .expect("m x 1"),
        Product::VecMat => mm(row(a), as2(b))
            .into_shape_with_order(IxDyn(&[b.shape()[1]]))
            .expect("1 x n"),
        Product::Dot => {
            let d = mm(row(a), col(b))[[0, 0]];
            ArrayD::from_elem(IxDyn(&[]), d)
        }
        Product::Batched => {
            let (a3, b3) = (
                a.view().into_dimensionality::<Ix3>().unwrap(),
                b.view().into_dimensionality::<Ix3>().unwrap(),
            );
            let (bs, m, _) = a3.dim();
            let n = b3.dim().2;
            let mut c = ndarray::Array3::<S>::zeros((bs, m, n));
            for i in 0..bs {
                gemm(
                    S::one(),
                    a3.index_axis(Axis(0), i),
                    b3.index_axis(Axis(0), i),
                    false,
                    c.index_axis_mut(Axis(0), i),
                );
            }
            c.into_dyn()
        }
        Product::BatchedShared => {
            let s = a.shape().to_vec();
            let n = b.shape()[1];
            let flat = match flatten_batch(a) {
                Some(v) => mm(v, as2(b)),
                None => mm(
                    a.as_standard_layout()
                        .into_shape_with_order((s[0] * s[1], s[2]))
                        .unwrap()
                        .view(),
                    as2(b),
                ),
            };
            flat.into_shape_with_order(IxDyn(&[s[0], s[1], n])).expect("b*m x n")
        }
    }
}

impl LinalgOp {
    pub fn name(&self) -> &'static str {
        match self {
            LinalgOp::MatMul(_) => "matmul",
            LinalgOp::Permute(_) => "permute",
        }
    }

    pub fn backward<S: Scalar>(&self, ctx: &Ctx<'_, S>, g: ArrayD<S>) -> InputGrads<S> {
        let mut out = InputGrads::new();
        match self {
            LinalgOp::Permute(perm) => {
                let mut inv = vec![0; perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    inv[p] = i;
                }
                out.push(Some(g.permuted_axes(IxDyn(&inv))));
            }
            LinalgOp::MatMul(p) => {
                let (a, b) = (&ctx.inputs[0], &ctx.inputs[1]);
                let (ga, gb) = matmul_backward(*p, a, b, &g, ctx.needs(0), ctx.needs(1));
                out.push(ga);
                out.push(gb);
            }
        }
        out
    }

    /// The tangent of [`backward`](Self::backward) (see `Op::backward_tangent`): backward
    /// applied to `g_dot`, plus for a product the terms where the backward factors move:
    /// `A_bar = G B^T` gains `G tb^T` and `B_bar = A^T G` gains `ta^T G` (each by the same
    /// product rule as backward, for every rank pair). A permutation is linear.
    pub fn backward_tangent<S: Scalar>(
        &self,
        ctx: &Ctx<'_, S>,
        g: &ArrayD<S>,
        g_dot: ArrayD<S>,
        t: &InputTangents<'_, S>,
    ) -> InputGrads<S> {
        let mut out = self.backward(ctx, g_dot);
        if let LinalgOp::MatMul(p) = self {
            let (a, b) = (&ctx.inputs[0], &ctx.inputs[1]);
            if let Some(tb) = t[1] {
                add_term(&mut out, 0, matmul_backward(*p, a, tb, g, ctx.needs(0), false).0);
            }
            if let Some(ta) = t[0] {
                add_term(&mut out, 1, matmul_backward(*p, ta, b, g, false, ctx.needs(1)).1);
            }
        }
        out
    }

    /// The tangent of the output: the permuted tangent, or `ta b + a tb` (the product
    /// rule, each term by the same product as the value).
    pub fn jvp<S: Scalar>(&self, ctx: &Ctx<'_, S>, t: &InputTangents<'_, S>) -> ArrayD<S> {
        match self {
            LinalgOp::Permute(perm) => t[0]
                .expect("a tangent reaches the node")
                .clone()
                .permuted_axes(IxDyn(perm)),
            LinalgOp::MatMul(p) => {
                let (a, b) = (&ctx.inputs[0], &ctx.inputs[1]);
                match (t[0], t[1]) {
                    (Some(ta), Some(tb)) => {
                        let mut y = forward(*p, ta, b);
                        add_into(&mut y, &forward(*p, a, tb));
                        y
                    }
                    (Some(ta), None) => forward(*p, ta, b),
                    (None, Some(tb)) => forward(*p, a, tb),
                    (None, None) => ArrayD::zeros(ctx.output.raw_dim()),
                }
            }
        }
    }
}

fn matmul_backward<S: Scalar>(
    p: Product,
    a: &ArrayD<S>,
    b: &ArrayD<S>,
    g: &ArrayD<S>,
    need_a: bool,
    need_b: bool,
) -> (Option<ArrayD<S>>, Option<ArrayD<S>>) {
    match p {
        Product::MatMat => {
            let g2 = as2(g);
            let ga = need_a.then(|| mm(g2, as2(b).t()).into_dyn());
            let gb = need_b.then(|| mm(as2(a).t(), g2).into_dyn());
            (ga, gb)
        }
        Product::MatVec => {
            // y = A v: dA = g v^T, dv = A^T g.
            let ga = need_a.then(|| mm(col(g), row(b)).into_dyn());
            let gb = need_b.then(|| {
                mm(as2(a).t(), col(g))
                    .into_shape_with_order(IxDyn(&[b.len()]))
                    .expect("k x 1")
            });
            (ga, gb)
        }
        Product::VecMat => {
            // y = v B: dv = B g, dB = v g^T.
            let ga = need_a.then(|| {
                mm(as2(b), col(g))
                    .into_shape_with_order(IxDyn(&[a.len()]))
                    .expect("k x 1")
            });
            let gb = need_b.then(|| mm(col(a), row(g)).into_dyn());
            (ga, gb)
        }
        Product::Dot => {
            let gv = *g.iter().next().expect("0-d");
            (need_a.then(|| b.mapv(|v| v * gv)), need_b.then(|| a.mapv(|v| v * gv)))
        }
        Product::Batched => {
            let a3 = a.view().into_dimensionality::<Ix3>().unwrap();
            let b3 = b.view().into_dimensionality::<Ix3>().unwrap();
            let g3 = g.view().into_dimensionality::<Ix3>().unwrap();
            let ga = need_a.then(|| {
                let mut ga = ndarray::Array3::<S>::zeros(a3.raw_dim());
                for i in 0..a3.dim().0 {
                    gemm(
                        S::one(),
                        g3.index_axis(Axis(0), i),
                        b3.index_axis(Axis(0), i).t(),
                        false,
                        ga.index_axis_mut(Axis(0), i),
                    );
                }
                ga.into_dyn()
            });
            let gb = need_b.then(|| {
                let mut gb = ndarray::Array3::<S>::zeros(b3.raw_dim());
                for i in 0..a3.dim().0 {
                    gemm(
                        S::one(),
                        a3.index_axis(Axis(0), i).t(),
                        g3.index_axis(Axis(0), i),
                        false,
                        gb.index_axis_mut(Axis(0), i),
                    );
                }
                gb.into_dyn()
            });
            (ga, gb)
        }
        Product::BatchedShared => {
            let s = a.shape().to_vec();
            let a_std;
            let a2 = match flatten_batch(a) {
                Some(v) => v,
                None => {
                    a_std = a.as_standard_layout().into_owned();
                    flatten_batch(&a_std).expect("standard layout")
                }
            };
            let g_std;
            let g2 = match flatten_batch(g) {
                Some(v) => v,
                None => {
                    g_std = g.as_standard_layout().into_owned();
                    flatten_batch(&g_std).expect("standard layout")
                }
            };
            let ga = need_a.then(|| mm(g2, as2(b).t()).into_shape_with_order(IxDyn(&s)).expect("b*m x k"));
            let gb = need_b.then(|| mm(a2.t(), g2).into_dyn());
            (ga, gb)
        }
    }
}

impl<'t, S: Scalar> Var<'t, S> {
    /// Matrix product by the ranks of the operands: (m,k)x(k,n), (m,k)x(k), (k)x(k,n),
    /// (k)x(k) (a 0-d dot product), (b,m,k)x(b,k,n) and (b,m,k)x(k,n).
    pub fn try_matmul(self, other: Var<'t, S>) -> Result<Var<'t, S>> {
        self.check_same("matmul", &other)?;
        let value = {
            let nodes = self.tape().nodes();
            let (a, b) = (&nodes[self.id()].value, &nodes[other.id()].value);
            let (sa, sb) = (a.shape(), b.shape());
            let (p, inner_a, inner_b) = match (sa.len(), sb.len()) {
                (2, 2) => (Product::MatMat, sa[1], sb[0]),
                (2, 1) => (Product::MatVec, sa[1], sb[0]),
                (1, 2) => (Product::VecMat, sa[0], sb[0]),
                (1, 1) => (Product::Dot, sa[0], sb[0]),
                (3, 3) => {
                    if sa[0] != sb[0] {
                        return Err(Error::shapes(
                            "matmul",
                            sa,
                            sb,
                            "batched product needs equal batch sizes",
                        ));
                    }
                    (Product::Batched, sa[2], sb[1])
                }
                (3, 2) => (Product::BatchedShared, sa[2], sb[0]),
                _ => {
                    return Err(Error::shapes(
                        "matmul",
                        sa,
                        sb,
                        "supported ranks: 2x2, 2x1, 1x2, 1x1, 3x3 (batched), 3x2 (shared right operand)",
                    ));
                }
            };
            if inner_a != inner_b {
                return Err(Error::shapes(
                    "matmul",
                    sa,
                    sb,
                    format!("inner dimensions differ: {inner_a} vs {inner_b}"),
                ));
            }
            let out = match p {
                Product::MatMat => vec![sa[0], sb[1]],
                Product::MatVec => vec![sa[0]],
                Product::VecMat => vec![sb[1]],
                Product::Dot => vec![],
                Product::Batched => vec![sa[0], sa[1], sb[2]],
                Product::BatchedShared => vec![sa[0], sa[1], sb[1]],
            };
            // Empty operands can have long axes whose product no array can hold.
            checked_len("matmul", &out).map_err(|_| {
                Error::invalid(
                    "matmul",
                    format!(
                        "the product of {sa:?} and {sb:?} would have shape {out:?}, whose element count overflows isize"
                    ),
                )
            })?;
            (p, forward(p, a, b))
        };
        let (p, value) = value;
        Ok(self.tape().push(
            Op::Linalg(Box::new(LinalgOp::MatMul(p))),
            Inputs::from_slice(&[self.id(), other.id()]),
            value,
        ))
    }

    /// Panicking form of [`try_matmul`](Self::try_matmul).
    #[track_caller]
    pub fn matmul(self, other: Var<'t, S>) -> Var<'t, S> {
        crate::var::fail(self.try_matmul(other))
    }

    /// Permutes the axes: output axis `i` is input axis `perm[i]` (no copy).
    pub fn try_permute(self, perm: &[usize]) -> Result<Var<'t, S>> {
        let nd = self.ndim();
        let mut seen = vec![false; nd];
        if perm.len() != nd || perm.iter().any(|&p| p >= nd || std::mem::replace(&mut seen[p], true)) {
            return Err(Error::invalid(
                "permute",
                format!("{perm:?} is not a permutation of the {nd} axes"),
            ));
        }
        let value = self.with_value(|x| x.clone().permuted_axes(IxDyn(perm)));
        Ok(self.tape().push(
            Op::Linalg(Box::new(LinalgOp::Permute(perm.to_vec()))),
            Inputs::from_slice(&[self.id()]),
            value,
        ))
    }

    /// Panicking form of [`try_permute`](Self::try_permute).
    #[track_caller]
    pub fn permute(self, perm: &[usize]) -> Var<'t, S> {
        crate::var::fail(self.try_permute(perm))
    }

    /// Reverses the axes (the transpose of a matrix).
    pub fn t(self) -> Var<'t, S> {
        let perm: Vec<usize> = (0..self.ndim()).rev().collect();
        self.permute(&perm)
    }
}
