"""Differentiable QP layers on the QP of benches/conic_qp.rs: QPLayer (proxsuite), qpth, qpax,
cvxpylayers.

  x*(q) = argmin (1/2) x^T P x + q^T x  subject to  G x <= h,   P = I, n = 20, m = 15, f64
One problem (q[0]) and the batch of 128 costs (shared P, G, h); `fwd` solves, `fwd_bwd` also
backpropagates loss = sum(x * w) to q. P, G, h, q and w are read from DATA/conic_qp.json
(written by the clarke bench under CLARKE_PEER_DATA), with clarke's batch solutions and
gradients, against which every peer is compared.

Accuracy, the same measure for every layer (most return no duals): for each sample, the
best dual certificate of the returned x, y = argmin_{y >= 0} ||P x + q + G^T y|| (NNLS), then
the worst over the batch of: primal ||max(G x - h, 0)||_inf, dual ||P x + q + G^T y||_inf,
gap |x^T P x + q^T x + h^T y|, complementarity |s^T y| with s = max(h - G x, 0).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import data_file, emit, failed, median_time, setup, wanted  # noqa: E402

args = setup(__doc__.splitlines()[0])

import json  # noqa: E402

import numpy as np  # noqa: E402
from scipy.optimize import nnls  # noqa: E402

PROBLEM = "conic_qp"
REPS = args.reps or (3 if args.quick else 20)
BUDGET = 3.0 if args.quick else 30.0


def load():
    path = data_file(args, "conic_qp.json")
    if path:
        with open(path) as f:
            j = json.load(f)
        a = {k: np.asarray(j[k], dtype=np.float64) for k in ("P", "G", "h", "q", "w")}
        ref = j.get("clarke")
        if ref:
            ref = {"x": np.asarray(ref["x"]), "grad_q": np.asarray(ref["grad_q"]), "kkt": ref.get("kkt_worst")}
        return a, ref, "clarke"
    # Same kind of draw as the bench (other numbers): only for trying the script alone.
    n, m, batch = 20, 15, 128
    r = np.random.default_rng(0)
    G = r.standard_normal((m, n))
    h = G @ r.standard_normal(n) + r.uniform(0, 1, m)
    a = {"P": np.eye(n), "G": G, "h": h, "q": r.standard_normal((batch, n)), "w": r.standard_normal(n)}
    return a, None, "own draw"


D, REF, SOURCE = load()
P, G, h, Q, w = D["P"], D["G"], D["h"], D["q"], D["w"]
N, M, BATCH = G.shape[1], G.shape[0], Q.shape[0]


def kkt(X):
    """Worst NNLS-certificate KKT residuals of the batch of solutions X ([batch, n])."""
    worst = {"primal": 0.0, "dual": 0.0, "gap": 0.0, "complementarity": 0.0}
    for x, q in zip(X, Q):
        y, _ = nnls(G.T, -(P @ x + q))
        s = np.maximum(h - G @ x, 0.0)
        r = {
            "primal": float(np.max(np.maximum(G @ x - h, 0.0))),
            "dual": float(np.max(np.abs(P @ x + q + G.T @ y))),
            "gap": float(abs(x @ P @ x + q @ x + h @ y)),
            "complementarity": float(abs(s @ y)),
        }
        worst = {k: max(worst[k], r[k]) for k in worst}
    return worst


def accuracy(X, grad):
    out = {"kkt": kkt(X)}
    if REF is not None:
        out["max_abs_x_vs_clarke"] = float(np.max(np.abs(X - REF["x"])))
        out["max_abs_grad_vs_clarke"] = float(np.max(np.abs(grad - REF["grad_q"])))
    return out


def torch_layer(name):
    import torch

    torch.set_num_threads(args.threads)
    dt = torch.float64
    Pt, Gt, ht, wt = (torch.tensor(a, dtype=dt) for a in (P, G, h, w))
    e = torch.empty(0, dtype=dt)
    settings = {}
    if name == "qplayer":
        from proxsuite.torch.qplayer import QPFunction

        lo = torch.full((M,), -1e20, dtype=dt)
        # The batch on OpenMP threads (OMP_NUM_THREADS = --threads), as clarke runs it on rayon.
        settings = {"eps": 1e-9, "omp_parallel": args.threads > 1}
        fn = QPFunction(**settings)

        def solve(q):
            return fn(Pt, q, e, e, Gt, lo, ht)[0]
    elif name == "qpth":
        from qpth.qp import QPFunction

        settings = {"eps": 1e-12, "maxIter": 50}

        def solve(q):
            return QPFunction(verbose=-1, **settings)(Pt, q, Gt, ht, e, e)
    elif name == "cvxpylayers":
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer

        x = cp.Variable(N)
        qp = cp.Parameter(N)
        prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, P) + qp @ x), [G @ x <= h])
        layer = CvxpyLayer(prob, parameters=[qp], variables=[x])
        settings = {"solver": "default (diffcp)"}

        def solve(q):
            return layer(q)[0]
    else:
        raise ValueError(name)

    def fwd(q0):
        with torch.no_grad():
            return solve(q0)

    def fwd_bwd(q0):
        q = q0.clone().requires_grad_(True)
        (solve(q) * wt).sum().backward()
        return q.grad

    for batch, q0 in ((1, torch.tensor(Q[0], dtype=dt)), (BATCH, torch.tensor(Q, dtype=dt))):
        for mode, f in (("forward", fwd), ("forward+backward", fwd_bwd)):
            t, reps = median_time(lambda: f(q0), REPS, budget=BUDGET)
            emit(PROBLEM, name, mode, batch, t, reps=reps, data=SOURCE, threads=args.threads, settings=settings)
    qb = torch.tensor(Q, dtype=dt)
    X = fwd(qb).reshape(BATCH, N).numpy()
    grad = fwd_bwd(qb).reshape(BATCH, N).numpy()
    emit(PROBLEM, name, "accuracy", BATCH, data=SOURCE, **accuracy(X, grad))


def qpax_layer():
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import qpax

    Pj, Gj, hj, wj = (jnp.asarray(a) for a in (P, G, h, w))
    A, b = jnp.zeros((0, N)), jnp.zeros(0)
    settings = {"solver_tol": 1e-8}

    def x_of(q):
        return qpax.solve_qp_primal(Pj, q, A, b, Gj, hj, **settings)

    def loss(q):
        return jnp.dot(x_of(q), wj)

    fwd1, g1 = jax.jit(x_of), jax.jit(jax.grad(loss))
    fwdb, gb = jax.jit(jax.vmap(x_of)), jax.jit(jax.vmap(jax.grad(loss)))
    for batch, f, g, q in ((1, fwd1, g1, jnp.asarray(Q[0])), (BATCH, fwdb, gb, jnp.asarray(Q))):
        for mode, fn in (("forward", f), ("forward+backward", g)):
            t, reps = median_time(lambda: fn(q).block_until_ready(), REPS, budget=BUDGET)
            emit(PROBLEM, "qpax", mode, batch, t, reps=reps, data=SOURCE, threads=args.threads,
                 settings={**settings, "batch": "jit(vmap)"})
    q = jnp.asarray(Q)
    emit(PROBLEM, "qpax", "accuracy", BATCH, data=SOURCE, **accuracy(np.asarray(fwdb(q)), np.asarray(gb(q))))


if REF is not None and wanted(args, "clarke"):
    # clarke's own solutions under the same measure (the bench prints its own residuals too).
    emit(PROBLEM, "clarke", "accuracy", BATCH, data=SOURCE, kkt=kkt(REF["x"]), kkt_clarke_definition=REF["kkt"])

for name in ("qplayer", "qpth", "qpax", "cvxpylayers"):
    if not wanted(args, name):
        continue
    try:
        qpax_layer() if name == "qpax" else torch_layer(name)
    except Exception as e:  # a peer that fails is reported, not fatal
        failed(PROBLEM, name, e)
