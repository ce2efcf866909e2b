"""Lasso fits and support hypergradients with scikit-learn, celer and skglm on the problem of
`lasso_hyperopt --synthetic`.

Data: the centred split that clarke fits, read from DATA/lasso_{x,y}_{train,val}.npy and
DATA/lasso.json (written by `cargo run --release --example lasso_hyperopt -- --synthetic
--save-data DATA`): n = 200 training rows, 200 validation rows, p = 10,000 features, 20
informative (p = 120 with --quick). Inner problem 1/(2n) ||y - X beta||^2 + lambda ||beta||_1
without intercept; every solver stops at duality gap <= tol ||y||^2 / n (scikit-learn's and
celer's convention, clarke's too; skglm's `tol` bounds the optimality violation instead),
tol = 1e-8. Criterion: validation MSE; hypergradient dC/d log lambda by the support solve
(Prop. 5): lambda * grad_S C . (-(X_S^T X_S / n)^{-1} sign(beta_S)).

Timed, as in the example:
  `one hypergradient` at lambda_max/10, lambda_max/20 and the grid points whose supports are
      nearest 20 and 37: a cold fit (from zero) plus the support solve;
  `grid`: the warm-started grid from lambda_max down to lambda_max/100 (30 points; 10 with
      --quick), the lambdas of lasso.json, keeping the best validation MSE.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import data_file, emit, failed, median_time, setup, wanted  # noqa: E402

args = setup(__doc__.splitlines()[0])

import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

PROBLEM = "lasso"
TOL = 1e-8
REPS = args.reps or (1 if args.quick else 3)


def load():
    if data_file(args, "lasso.json"):
        meta = json.load(open(data_file(args, "lasso.json")))
        a = [np.load(data_file(args, f"lasso_{k}.npy")) for k in ("x_train", "y_train", "x_val", "y_val")]
        return (*a, meta["lambda_max"], list(meta["grid"]), "clarke")
    # A draw of the same kind (other numbers): only for trying the script alone.
    p = 120 if args.quick else 10_000
    r = np.random.default_rng(0)
    X = r.standard_normal((400, p))
    beta = np.zeros(p)
    beta[:20] = [(1 + j / 19) * (1 if j % 2 == 0 else -1) for j in range(20)]
    y = X @ beta + r.standard_normal(400)
    mx, my = X[:200].mean(0), y[:200].mean()
    A, b, Av, bv = X[:200] - mx, y[:200] - my, X[200:] - mx, y[200:] - my
    lmax = np.abs(A.T @ b).max() / 200
    k = 10 if args.quick else 30
    return A, b, Av, bv, lmax, list(lmax * 0.01 ** (np.arange(k) / (k - 1))), "own draw"


A, b, Av, bv, LMAX, GRID, SOURCE = load()
N, P = A.shape


def val_mse(coef):
    r = bv - Av @ coef
    return float(r @ r / len(bv))


def hypergradient(lam, coef):
    S = np.flatnonzero(coef)
    if len(S) == 0:
        return 0.0
    r = bv - Av @ coef
    grad_c = -2.0 / len(bv) * (Av[:, S].T @ r)
    gram = A[:, S].T @ A[:, S] / N
    return float(lam * grad_c @ -np.linalg.solve(gram, np.sign(coef[S])))


def estimator(name, lam, tol, warm):
    if name == "sklearn":
        from sklearn.linear_model import Lasso

        return Lasso(alpha=lam, fit_intercept=False, tol=tol, max_iter=1_000_000, warm_start=warm)
    if name == "celer":
        from celer import Lasso

        return Lasso(alpha=lam, fit_intercept=False, tol=tol, max_iter=1000, max_epochs=1_000_000,
                     warm_start=warm)
    if name == "skglm":
        from skglm import Lasso

        return Lasso(alpha=lam, fit_intercept=False, tol=tol, max_iter=1000, max_epochs=1_000_000,
                     warm_start=warm)
    raise ValueError(name)


def fit(name, lam, tol=TOL):
    return estimator(name, lam, tol, False).fit(A, b).coef_.copy()


def grid(name):
    """The warm-started grid: (seconds, best lambda, best MSE, [(lambda, support)])."""
    t = time.perf_counter()
    est = estimator(name, GRID[0], TOL, True)
    best, points = (np.inf, None), []
    for lam in GRID:
        est.set_params(alpha=lam)
        coef = est.fit(A, b).coef_
        v = val_mse(coef)
        points.append((lam, int(np.count_nonzero(coef))))
        if v < best[0]:
            best = (v, lam)
    return time.perf_counter() - t, best[1], best[0], points


def run(name):
    fit(name, LMAX / 10)  # warm-up (numba compiles skglm's kernels on the first call)
    times = []
    for _ in range(REPS):
        times.append(grid(name))
    seconds = float(np.median([g[0] for g in times]))
    _, best_lam, best_val, points = times[-1]
    emit(PROBLEM, name, "grid", len(GRID), seconds, reps=REPS, data=SOURCE, p=P, best_lambda=best_lam,
         best_lambda_frac=best_lam / LMAX, best_val_loss=best_val)
    targets = [("lambda_max/10", LMAX / 10), ("lambda_max/20", LMAX / 20)]
    if P >= 100:
        for want in (20, 37):
            lam = min(points, key=lambda pt: abs(pt[1] - want))[0]  # the first of equal ones
            targets.append((f"support ~{want}", lam))
    for label, lam in targets:
        def once():
            coef = fit(name, lam)
            return coef, hypergradient(lam, coef)

        t, reps = median_time(once, REPS, warmup=0)
        coef, hg = once()
        extra = {}
        if label == "lambda_max/10":
            tight = fit(name, lam, 1e-12)
            extra = {"hypergradient_tol1e-12": hypergradient(lam, tight)}
        emit(PROBLEM, name, "fit+hypergradient", label, t, reps=reps, data=SOURCE, p=P, **{"lambda": lam},
             support=int(np.count_nonzero(coef)), val_loss=val_mse(coef), hypergradient=hg, **extra)


warnings.filterwarnings("ignore")  # convergence chatter of the peers at tight tolerances
for name in ("sklearn", "celer", "skglm"):
    if wanted(args, name):
        try:
            run(name)
        except Exception as e:
            failed(PROBLEM, name, e)
