//! Elementwise kernels and broadcasting helpers shared by the op families.

use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn, Zip};

use crate::{Error, Result, Scalar};

/// Elementwise kernels switch to rayon at this many elements.
///
/// Measured with the `elementwise` bench on a 2-core machine: below about 1e5 elements the
/// cost of splitting work across threads is larger than the work (see `benches/`).
pub const PARALLEL_ELEMENTS: usize = 1 << 17;

/// Whether an elementwise kernel over `len` elements should run in parallel.
#[inline]
pub(crate) fn parallel(len: usize) -> bool {
    len >= PARALLEL_ELEMENTS
}

// The kernels below take a slice fast path for contiguous standard-layout arrays: ndarray's
// generic `Zip` over dynamic-rank arrays spends hundreds of instructions per call on layout
// analysis, which dominates for the small arrays of long tapes.

/// `x[i] = f(x[i])` in place, in parallel for large arrays.
#[inline]
pub(crate) fn map_inplace<S: Scalar>(x: &mut ArrayD<S>, f: impl Fn(S) -> S + Sync + Send) {
    if parallel(x.len()) {
        x.par_mapv_inplace(f);
    } else if let Some(s) = x.as_slice_mut() {
        for v in s {
            *v = f(*v);
        }
    } else {
        x.mapv_inplace(f);
    }
}

/// `f` applied to every element, in parallel for large arrays.
#[inline]
pub(crate) fn map<S: Scalar>(x: &ArrayD<S>, f: impl Fn(S) -> S + Sync + Send) -> ArrayD<S> {
    if parallel(x.len()) {
        Zip::from(x).par_map_collect(|&v| f(v))
    } else if x.len() <= SMALL_ELEMENTS && x.is_standard_layout() {
        // For tiny arrays, cloning the shape and strides beats recomputing the strides.
        let mut y = x.clone();
        map_inplace(&mut y, f);
        y
    } else if let Some(s) = x.as_slice() {
        from_vec_like(x, s.iter().map(|&v| f(v)).collect())
    } else {
        x.mapv(f)
    }
}

/// An array of `like`'s shape (standard layout) holding `data`.
#[inline]
pub(crate) fn from_vec_like<S: Scalar>(like: &ArrayD<S>, data: Vec<S>) -> ArrayD<S> {
    ArrayD::from_shape_vec(like.raw_dim(), data).expect("same element count")
}

/// Arrays up to this many elements are built by cloning an input and updating it in place.
const SMALL_ELEMENTS: usize = 16;

/// `g[i] = f(g[i], x[i])` in place, in parallel for large arrays. Shapes must match.
#[inline]
pub(crate) fn update_with<S: Scalar>(g: &mut ArrayD<S>, x: &ArrayD<S>, f: impl Fn(S, S) -> S + Sync + Send) {
    if parallel(g.len()) {
        Zip::from(g).and(x).par_for_each(|g, &x| *g = f(*g, x));
    } else if let (true, Some(xs)) = (g.is_standard_layout(), x.as_slice()) {
        let gs = g.as_slice_mut().expect("standard layout");
        for (g, &x) in gs.iter_mut().zip(xs) {
            *g = f(*g, x);
        }
    } else {
        Zip::from(g).and(x).for_each(|g, &x| *g = f(*g, x));
    }
}

/// `acc += g` for equal-shaped arrays (gradient accumulation).
#[inline]
pub(crate) fn add_into<S: Scalar>(acc: &mut ArrayD<S>, g: &ArrayD<S>) {
    update_with(acc, g, |a, g| a + g);
}

/// `f(a[i], b[i])` for equal-shaped arrays, in parallel for large arrays.
#[inline]
pub(crate) fn zip_map<S: Scalar>(a: &ArrayD<S>, b: &ArrayD<S>, f: impl Fn(S, S) -> S + Sync + Send) -> ArrayD<S> {
    if parallel(a.len()) {
        Zip::from(a).and(b).par_map_collect(|&a, &b| f(a, b))
    } else if a.len() <= SMALL_ELEMENTS && a.is_standard_layout() && b.is_standard_layout() {
        let mut y = a.clone();
        update_with(&mut y, b, f);
        y
    } else if let (Some(xs), Some(ys)) = (a.as_slice(), b.as_slice()) {
        from_vec_like(a, xs.iter().zip(ys).map(|(&x, &y)| f(x, y)).collect())
    } else {
        Zip::from(a).and(b).map_collect(|&a, &b| f(a, b))
    }
}

/// NumPy broadcasting of two shapes.
pub(crate) fn broadcast_shape(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
        let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(Error::shapes(
                op,
                a,
                b,
                format!("cannot broadcast: axis {i} of the broadcast shape has sizes {da} and {db}"),
            ));
        };
    }
    checked_len(op, &out).map_err(|_| {
        Error::shapes(
            op,
            a,
            b,
            format!(
                "the broadcast shape {out:?} has too many elements: the product of its axis lengths overflows isize"
            ),
        )
    })?;
    Ok(out)
}

/// The element count of `shape`, refusing a shape no array can have: the product of its
/// non-zero axis lengths must fit in `isize` (what ndarray requires, even when an axis is 0).
/// Ops whose result shape is not one of their inputs' call it before allocating.
pub(crate) fn checked_len(op: &'static str, shape: &[usize]) -> Result<usize> {
    let nonzero = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| isize::try_from(n).is_ok());
    match nonzero {
        Some(_) if shape.contains(&0) => Ok(0),
        Some(n) => Ok(n),
        None => Err(Error::invalid(
            op,
            format!("shape {shape:?} has too many elements: the product of its axis lengths overflows isize"),
        )),
    }
}

/// View of `x` broadcast to `shape` (which must be a valid broadcast target).
pub(crate) fn broadcast_view<'a, S: Scalar>(x: &'a ArrayD<S>, shape: &[usize]) -> ArrayViewD<'a, S> {
    x.broadcast(IxDyn(shape))
        .expect("broadcast target checked by the caller")
}

/// The tangent `t` broadcast to `shape`, or zeros of that shape when `t` is `None` (`zero`
/// is a 0-d zero broadcast in place: nothing of the full shape is allocated).
pub(crate) fn tangent_view<'a, S: Scalar>(
    t: Option<&'a ArrayD<S>>,
    shape: &[usize],
    zero: &'a ArrayD<S>,
) -> ArrayViewD<'a, S> {
    broadcast_view(t.unwrap_or(zero), shape)
}

/// Sums a gradient of the broadcast shape back to `shape` (the inverse of broadcasting).
pub(crate) fn reduce_to_shape<S: Scalar>(g: ArrayD<S>, shape: &[usize]) -> ArrayD<S> {
    if g.shape() == shape {
        return g;
    }
    let mut g = g;
    let extra = g.ndim() - shape.len();
    for _ in 0..extra {
        g = g.sum_axis(Axis(0));
    }
    for (axis, &d) in shape.iter().enumerate() {
        if d == 1 && g.shape()[axis] != 1 {
            g = g.sum_axis(Axis(axis)).insert_axis(Axis(axis));
        }
    }
    g
}

/// Returns an error naming `op` if `axis` is not an axis of an array of rank `ndim`.
pub(crate) fn check_axis(op: &'static str, axis: usize, ndim: usize) -> Result<()> {
    if axis >= ndim {
        return Err(Error::invalid(
            op,
            format!("axis {axis} out of range for an array of rank {ndim}"),
        ));
    }
    Ok(())
}
