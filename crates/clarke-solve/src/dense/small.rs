//! Cholesky solves of tiny systems, in place, without a call into a library: the normal
//! equations of Anderson acceleration (a handful of unknowns per sample and iteration),
//! where a factorisation routine's setup would cost more than the arithmetic.

/// Solves `h x = b` in place (`b` becomes `x`) for a symmetric positive definite `h`
/// (`k x k`, row-major; its lower triangle is overwritten by the Cholesky factor). Returns
/// `false`, leaving `b` unspecified, when a pivot is not positive and finite or the solution
/// is not finite: `h` is then not (numerically) positive definite.
///
/// # Panics
/// If `h` has fewer than `k * k` entries or `b` fewer than `k`.
///
/// ```
/// use clarke_solve::dense::small_spd_solve;
///
/// let mut h = [4.0, 2.0, 2.0, 3.0];
/// let mut b = [2.0, 1.0]; // h [0.5, 0] = [2, 1]
/// assert!(small_spd_solve(&mut h, &mut b, 2));
/// assert!((b[0] - 0.5).abs() < 1e-15 && b[1].abs() < 1e-15);
/// ```
pub fn small_spd_solve(h: &mut [f64], b: &mut [f64], k: usize) -> bool {
    assert!(
        h.len() >= k * k && b.len() >= k,
        "small_spd_solve: h needs {k}x{k} entries and b {k}"
    );
    for j in 0..k {
        let mut d = h[j * k + j];
        for p in 0..j {
            d -= h[j * k + p] * h[j * k + p];
        }
        if !(d > 0.0 && d.is_finite()) {
            return false;
        }
        let d = d.sqrt();
        h[j * k + j] = d;
        for i in j + 1..k {
            let mut s = h[i * k + j];
            for p in 0..j {
                s -= h[i * k + p] * h[j * k + p];
            }
            h[i * k + j] = s / d;
        }
    }
    for i in 0..k {
        let mut s = b[i];
        for p in 0..i {
            s -= h[i * k + p] * b[p];
        }
        b[i] = s / h[i * k + i];
    }
    for i in (0..k).rev() {
        let mut s = b[i];
        for p in i + 1..k {
            s -= h[p * k + i] * b[p];
        }
        b[i] = s / h[i * k + i];
    }
    b[..k].iter().all(|v| v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solves_a_known_system_and_refuses_an_indefinite_one() {
        let h0 = [4.0, 2.0, 0.0, 2.0, 5.0, 1.0, 0.0, 1.0, 3.0];
        let x = [1.0, -2.0, 0.5];
        let mut b: Vec<f64> = (0..3).map(|i| (0..3).map(|j| h0[i * 3 + j] * x[j]).sum()).collect();
        let mut h = h0;
        assert!(small_spd_solve(&mut h, &mut b, 3));
        for (got, want) in b.iter().zip(x) {
            assert!((got - want).abs() < 1e-14, "{got} vs {want}");
        }
        let (mut h, mut b) = ([1.0, 2.0, 2.0, 1.0], [1.0, 1.0]);
        assert!(!small_spd_solve(&mut h, &mut b, 2));
        let (mut h, mut b) = ([f64::NAN], [1.0]);
        assert!(!small_spd_solve(&mut h, &mut b, 1));
        // k = 0 is the empty system.
        assert!(small_spd_solve(&mut [], &mut [], 0));
    }
}
