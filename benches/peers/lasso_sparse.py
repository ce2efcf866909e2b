"""Sparse Lasso fits with scikit-learn, celer and skglm on the svmlight files of `lasso_hyperopt
--sparse-synthetic`.

Data: svmlight files (`target index:value ...`, 1-based sorted indices, one row per line), by
default DATA/rcv1_like.svm and DATA/news20_like.svm (written by `cargo run --release --example
lasso_hyperopt -- --sparse-synthetic rcv1|news20 --save-svmlight FILE`), or the files given with
--file; without either, a small draw of the same kind (only for trying the script). The number
of features is taken from --n-features, else from DATA/lasso_sparse.json ({"p":
{"rcv1_like.svm": p, ...}}, written by compare.py from the example's output), else from the
largest index in the file (trailing empty columns then do not count; they change neither the
solution nor the work of a fit, only the reported p).

The same problem as `lasso_hyperopt --data FILE --at-ratio R`:
  split: n_val = floor(n * F) (F = --val-fraction, 0.2), training = the first n - n_val rows
      in file order, validation = the rest;
  centring: y by the training mean of y (training and validation targets alike); X is not
      centred (it stays sparse);
  objective: 1/(2 n_train) ||y_c - X beta||^2 + lambda ||beta||_1, no intercept, at
      lambda = lambda_max / R, lambda_max = ||X_train^T y_c||_inf / n_train, R in --ratios
      (10 and 100);
  tolerance T (--tol, 1e-8), relative to ||y_c||^2 / n_train:
    scikit-learn `Lasso(tol=T)`: stops when its largest coordinate update is at most
      T max|beta_j| and then its duality gap is at most T ||y_c||^2 / n_train: the same gap
      convention (with a stricter first test);
    celer `Lasso(tol=T)`: stops when its duality gap is at most T ||y_c||^2 / n_train
      (`tol *= norm(y)**2 / n_samples` in celer/lasso_fast.pyx): the same convention; its
      dual point is the better of the rescaled residual and an extrapolated one, so the gap
      with the rescaled residual alone (reported here) can end above the tolerance (ten
      times above it at lambda_max/100 on a test file of news20's size);
    skglm `Lasso(tol=T * lambda)`: skglm's `tol` bounds the optimality violation (the largest
      distance of -grad_j to the subdifferential of lambda |beta_j|, in the units of lambda),
      not the gap. The gap with the rescaled residual is sum_j beta_j (grad_j + lambda
      sign beta_j) plus the loss of rescaling the dual point, both at most about
      violation / lambda * ||y_c||^2 / n_train, so tol = T * lambda gives a gap of the same
      order as T ||y_c||^2 / n_train; the gap reached is reported.
  The duality gap reported for every solver is clarke's: primal minus dual at the dual point
  r / s, r = y_c - X beta, s = max(1, ||X^T r||_inf / (n_train lambda)), dual
  (||y_c||^2 - ||y_c - r / s||^2) / (2 n_train); `gap` is relative to ||y_c||^2 / n_train,
  `gap_abs` is not.

Timed: the fit alone, cold (from zero), the median of --reps runs (3; 1 with --quick), after a
warm-up fit on a tiny problem (numba compiles skglm's sparse kernels on its first call). The
peers have no hypergradient; compare.py sets clarke's fit + hypergradient against these fits,
and clarke's fit against them too. The conversions (training rows to CSC with int32 indices,
validation rows to CSR) are outside the timing; scikit-learn runs with `copy_X=False` (nothing
is centred without an intercept, so it need not copy X).

Memory (Linux): every peer runs on every file in a fresh interpreter (this script again, with
--in-process), so that the libraries and peaks of one peer do not count against another.
Before each timed fit the process's RSS high-water mark is reset (writing 5 to
/proc/self/clear_refs); after it, `peak_memory_bytes` is `getrusage(RUSAGE_SELF).ru_maxrss`:
the peak RSS of the whole process during the fit, with the interpreter, NumPy, SciPy,
scikit-learn (the svmlight reader), the peer's library (for skglm, numba and its compiled
kernels) and the data in memory; `fit_memory_increase_bytes` is that peak minus the RSS
just before the fit (what the fit itself adds; tracemalloc is off); `load_peak_memory_bytes`
is the peak while reading and converting the file. Where the reset is not possible the peak is
the process's lifetime peak (`peak_reset` false). clarke's figure is the VmHWM of its whole
run (reading the file, the fit and the hypergradient).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import data_file, emit, failed, setup, wanted  # noqa: E402


def extra(p):
    p.add_argument("--file", nargs="+", default=None,
                   help="svmlight files to fit (default: DATA/rcv1_like.svm and DATA/news20_like.svm)")
    p.add_argument("--n-features", type=int, default=None,
                   help="number of features of every file (default: DATA/lasso_sparse.json, else the largest index)")
    p.add_argument("--ratios", type=float, nargs="+", default=[10.0, 100.0],
                   help="fit at lambda_max / R for each R (default 10 100)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="validation share, the last rows (default 0.2)")
    p.add_argument("--tol", type=float, default=1e-8,
                   help="duality-gap tolerance relative to ||y_c||^2 / n_train (default 1e-8)")
    p.add_argument("--in-process", action="store_true",
                   help="run every peer in this process (default: one process per file and peer)")
    p.add_argument("--source", default=None, help=argparse.SUPPRESS)  # set for the per-peer processes


args = setup(__doc__.splitlines()[0], extra)

import atexit  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from sklearn.datasets import dump_svmlight_file, load_svmlight_file  # noqa: E402

PROBLEM = "lasso_sparse"
TOL = args.tol
REPS = args.reps or (1 if args.quick else 3)
FILES = ("rcv1_like.svm", "news20_like.svm")


# ---------------------------------------------------------------- memory


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def reset_peak():
    """Resets the process's RSS high-water mark (VmHWM, and with it ru_maxrss) to the current
    RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- data


def own_file():
    """A draw of the same kind (sparse design, planted coefficients), written to a temporary
    svmlight file: only for trying the script alone."""
    n, p, density = (500, 1_000, 0.01) if args.quick else (2_000, 5_000, 0.005)
    r = np.random.default_rng(0)
    X = sp.random(n, p, density=density, format="csr", random_state=r, data_rvs=r.standard_normal)
    beta = np.zeros(p)
    beta[:20] = [(1 + j / 19) * (1 if j % 2 == 0 else -1) for j in range(20)]
    y = X @ beta + 0.1 * r.standard_normal(n)
    tmp = tempfile.mkdtemp()
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    path = os.path.join(tmp, "own_draw.svm")
    dump_svmlight_file(X, y, path, zero_based=False)
    return path, p


def files():
    """[(path, n_features or None, source)]."""
    if args.file:
        return [(f, args.n_features, args.source or "file") for f in args.file]
    known = {}
    if data_file(args, "lasso_sparse.json"):
        known = json.load(open(data_file(args, "lasso_sparse.json"))).get("p", {})
    found = [(data_file(args, f), args.n_features or known.get(f), "clarke") for f in FILES if data_file(args, f)]
    if found:
        return found
    path, p = own_file()
    return [(path, p, "own draw")]


def label_of(path):
    """rcv1_like.svm -> rcv1-like."""
    return os.path.splitext(os.path.basename(path))[0].replace("_", "-")


class Problem:
    def __init__(self, path, n_features):
        X, y = load_svmlight_file(path, n_features=n_features, dtype=np.float64, zero_based=False)
        n = X.shape[0]
        n_val = math.floor(n * args.val_fraction)
        nt = n - n_val
        self.n, self.p, self.n_val = nt, X.shape[1], n_val
        y = np.asarray(y, dtype=np.float64)
        mean = y[:nt].mean()
        self.y = np.ascontiguousarray(y[:nt] - mean)
        self.yv = np.ascontiguousarray(y[nt:] - mean)
        A = X[:nt].tocsc()
        A.sort_indices()
        A.indices = A.indices.astype(np.int32, copy=False)
        A.indptr = A.indptr.astype(np.int32, copy=False)
        self.A = A
        self.Av = X[nt:].tocsr()
        self.nnz = int(A.nnz)
        del X
        self.y_sq = float(self.y @ self.y)
        self.scale = self.y_sq / nt  # the gap is reported relative to ||y_c||^2 / n_train
        self.lmax = float(np.abs(self.A.T @ self.y).max()) / nt

    def gap(self, lam, beta):
        """(objective, absolute duality gap), clarke's way: the dual point r / s."""
        r = self.y - self.A @ beta
        primal = float(r @ r) / (2 * self.n) + lam * float(np.abs(beta).sum())
        s = max(1.0, float(np.abs(self.A.T @ r).max()) / (self.n * lam))
        d = self.y - r / s
        dual = (self.y_sq - float(d @ d)) / (2 * self.n)
        return primal, max(primal - dual, 0.0)

    def val_mse(self, beta):
        r = self.yv - self.Av @ beta
        return float(r @ r) / max(len(r), 1)


# ---------------------------------------------------------------- the peers


def estimator(name, lam, tol):
    """The peer's estimator at lambda with T = tol (each peer's own convention: see the top)."""
    if name == "sklearn":
        from sklearn.linear_model import Lasso

        return Lasso(alpha=lam, fit_intercept=False, tol=tol, max_iter=1_000_000, precompute=False,
                     copy_X=False), tol
    if name == "celer":
        from celer import Lasso

        return Lasso(alpha=lam, fit_intercept=False, tol=tol, max_iter=1000, max_epochs=1_000_000), tol
    if name == "skglm":
        from skglm import Lasso

        return Lasso(alpha=lam, fit_intercept=False, tol=tol * lam, max_iter=1000, max_epochs=1_000_000), tol * lam
    raise ValueError(name)


def warm_up(name):
    """One fit on a tiny sparse problem: imports, and numba's compilation for skglm."""
    r = np.random.default_rng(1)
    X = sp.random(40, 60, density=0.2, format="csc", random_state=r, data_rvs=r.standard_normal)
    X.indices = X.indices.astype(np.int32)
    X.indptr = X.indptr.astype(np.int32)
    y = r.standard_normal(40)
    lam = float(np.abs(X.T @ y).max()) / 40 / 10
    estimator(name, lam, 1e-6)[0].fit(X, y)


def run(name, prob, path, source, load_peak):
    warm_up(name)
    for ratio in args.ratios:
        lam = prob.lmax / ratio
        times, peaks, increases, reset = [], [], [], True
        for _ in range(REPS):
            est, solver_tol = estimator(name, lam, TOL)
            reset = reset_peak() and reset
            before = rss_bytes()
            t = time.perf_counter()
            est.fit(prob.A, prob.y)
            times.append(time.perf_counter() - t)
            peaks.append(maxrss_bytes())
            increases.append(max(peaks[-1] - before, 0))
        beta = np.asarray(est.coef_, dtype=np.float64).ravel().copy()
        objective, gap = prob.gap(lam, beta)
        emit(PROBLEM, name, "fit", f"{label_of(path)} lambda_max/{ratio:g}", statistics.median(times), reps=REPS,
             data=source, file=os.path.basename(path), n=prob.n, p=prob.p, nnz=prob.nnz,
             n_val=prob.n_val, lambda_max=prob.lmax, **{"lambda": lam}, lambda_ratio=ratio,
             support=int(np.count_nonzero(beta)), objective=objective, gap=gap / prob.scale, gap_abs=gap,
             gap_scale=prob.scale, tol=TOL, solver_tol=solver_tol, val_mse=prob.val_mse(beta),
             peak_memory_bytes=max(peaks), fit_memory_increase_bytes=max(increases),
             load_peak_memory_bytes=load_peak, peak_reset=reset)


def in_process(path, n_features, source, names):
    reset_peak()
    try:
        prob = Problem(path, n_features)
    except Exception as e:
        for name in names:
            failed(PROBLEM, name, e)
        return
    load_peak = maxrss_bytes()
    for name in names:
        try:
            run(name, prob, path, source, load_peak)
        except Exception as e:
            failed(PROBLEM, name, e)


def own_process(path, n_features, source, name):
    """Runs one peer on one file in a fresh interpreter, so that its memory figures hold the
    interpreter, the data and that peer alone (not the libraries and peaks of the others)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--in-process", "--file", path, "--only", name,
           "--threads", str(args.threads), "--reps", str(REPS), "--ratios", *[f"{r:g}" for r in args.ratios],
           "--val-fraction", repr(args.val_fraction), "--tol", repr(TOL), "--source", source]
    if n_features:
        cmd += ["--n-features", str(n_features)]
    if args.quick:
        cmd.append("--quick")
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    out = [line for line in res.stdout.splitlines() if line.startswith("{")]
    for line in out:
        print(line, flush=True)
    if res.returncode != 0 and not out:
        failed(PROBLEM, name, RuntimeError(f"exit status {res.returncode} on {os.path.basename(path)}"))


warnings.filterwarnings("ignore")  # convergence chatter of the peers at tight tolerances
NAMES = [name for name in ("sklearn", "celer", "skglm") if wanted(args, name)]
for path, n_features, source in files():
    if args.in_process:
        in_process(path, n_features, source, NAMES)
    else:
        for name in NAMES:
            own_process(path, n_features, source, name)
