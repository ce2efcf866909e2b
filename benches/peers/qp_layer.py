"""Differentiable QP layers on the QPs of benches/qp_layer.rs: QPLayer (proxsuite), qpth, qpax,
cvxpylayers.

  x*(theta) = argmin (1/2) x^T Q x + p^T x  subject to  A x = b,  l <= G x <= u,   f64
Two problems: `small` (n = 20, 15 rows G x <= u, no l, no A; size "20x15") and `large` (n = 100,
50 equalities, 100 two-sided rows; size "100/50/100"), each for one problem (p[0]) and the batch
of 128 linear terms (Q, A, b, G, l, u shared). `forward` solves; `forward+backward` also
backpropagates loss = sum(x * w) to every argument the peer can differentiate. The data and
clarke's batch solutions and gradients are read from DATA/qp_layer.json (written by the clarke
bench under CLARKE_PEER_DATA); an infinite bound is `null` there (-inf in l, +inf in u).

How each peer writes the constraints:
- QPLayer: as they are (`l <= G x <= u`, `A x = b`); an infinite side is +-1e20, proxsuite's
  infinity.
- qpth and qpax: `G x <= h` only, so every finite side is one row: `[G_U; -G_L] x <= [u_U; -l_L]`
  (U, L: the rows with a finite upper, lower side); `A x = b` as it is.
- cvxpylayers: a cvxpy problem with parameters p, A, b, G, l, u and constraints
  `A x == b`, `G[U] x <= u[U]`, `G[L] x >= l[L]`; Q is a constant (diffcp cannot take a
  parametric quadratic form), so it has no gradient of Q.

Accuracy, the same measure for every layer (most return no multipliers): for each sample the
best certificate of the returned x, multipliers y (free) for A x = b and z_U, z_L >= 0 for the
finite sides, minimising ||Q x + p + A^T y + G_U^T z_U - G_L^T z_L||^2 + sum (s_i z_i)^2 with s_i
the slack of side i (bounded least squares over the sides with slack at most 1e-2 relative to
their bound; the others get z_i = 0), then the worst over the batch of: stationarity
(inf-norm of that residual), primal (|A x - b| and the violation of the bounds), complementarity
(max s_i z_i). Then the largest differences from clarke's x and gradients.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import data_file, emit, failed, median_time, setup, wanted  # noqa: E402

args = setup(__doc__.splitlines()[0])

import json  # noqa: E402

import numpy as np  # noqa: E402
from scipy.optimize import lsq_linear  # noqa: E402

PROBLEM = "qp_layer"
REPS = args.reps or (3 if args.quick else 20)
BUDGET = 3.0 if args.quick else 30.0
ARGS = ("Q", "p", "A", "b", "G", "l", "u")
INF = 1e20  # QPLayer's infinite bound


def decode(v, fill):
    """A JSON list with null for an infinite entry -> float array with `fill` there."""
    return np.array([fill if e is None else e for e in v], dtype=np.float64)


class Problem:
    def __init__(self, name, d, ref):
        self.name = name
        self.Q = np.asarray(d["Q"], dtype=np.float64)
        self.P = np.asarray(d["p"], dtype=np.float64)  # [batch, n]
        self.w = np.asarray(d["w"], dtype=np.float64)
        self.G = np.asarray(d["G"], dtype=np.float64)
        self.l = decode(d["l"], -np.inf)
        self.u = decode(d["u"], np.inf)
        n = self.Q.shape[0]
        self.A = np.asarray(d["A"], dtype=np.float64).reshape(-1, n) if "A" in d else np.zeros((0, n))
        self.b = np.asarray(d["b"], dtype=np.float64) if "b" in d else np.zeros(0)
        self.n, self.me, self.mi, self.batch = n, self.A.shape[0], self.G.shape[0], self.P.shape[0]
        self.U = np.flatnonzero(np.isfinite(self.u))
        self.L = np.flatnonzero(np.isfinite(self.l))
        # G x <= h with one row per finite side.
        self.Gh = np.vstack([self.G[self.U], -self.G[self.L]])
        self.h = np.concatenate([self.u[self.U], -self.l[self.L]])
        self.ref = ref

    def finite(self, side):
        """Whether the bound `side` ("l" or "u") has a finite entry."""
        return bool(len(self.L if side == "l" else self.U)) if side in ("l", "u") else False

    def label(self, batch):
        dims = f"{self.n}x{self.mi}" if self.me == 0 else f"{self.n}/{self.me}/{self.mi}"
        return f"{dims} batch {batch}"

    def split_h(self, gG, gh):
        """Gradients of the stacked (G_h, h) of qpth and qpax -> those of (G, l, u)."""
        kU = len(self.U)
        G = np.zeros_like(self.G)
        u, lo = np.zeros(self.mi), np.zeros(self.mi)
        np.add.at(G, self.U, gG[:kU])
        np.add.at(G, self.L, -gG[kU:])
        u[self.U] = gh[:kU]
        lo[self.L] = -gh[kU:]
        return G, lo, u

    def kkt(self, X):
        """Worst residuals of the batch of solutions X ([batch, n]) with their best certificate."""
        worst = {"stationarity": 0.0, "primal": 0.0, "complementarity": 0.0}
        GU, GL = self.G[self.U], self.G[self.L]
        M = np.hstack([self.A.T, GU.T, -GL.T])
        bound = np.abs(np.concatenate([self.u[self.U], self.l[self.L]]))
        for x, p in zip(X, self.P):
            r0 = self.Q @ x + p
            s = np.concatenate([np.maximum(self.u[self.U] - GU @ x, 0.0), np.maximum(GL @ x - self.l[self.L], 0.0)])
            # Candidates: the sides within 1e-2 (relative to the bound) of being active; a side
            # further away would pay s_i z_i anyway (its z_i is 0 in the certificate).
            near = np.flatnonzero(s <= 1e-2 * np.maximum(1.0, bound))
            cols = np.concatenate([np.arange(self.me), self.me + near]).astype(int)
            k = len(cols)
            S = np.zeros((len(near), k))
            S[:, self.me:] = np.diag(s[near])
            lb = np.concatenate([np.full(self.me, -np.inf), np.zeros(len(near))])
            mult = np.zeros(M.shape[1])
            if k:
                res = lsq_linear(np.vstack([M[:, cols], S]), np.concatenate([-r0, np.zeros(len(near))]),
                                 bounds=(lb, np.full(k, np.inf)), method="bvls", tol=1e-14)
                mult[cols] = res.x
            viol = [np.abs(self.A @ x - self.b), np.maximum(GU @ x - self.u[self.U], 0.0),
                    np.maximum(self.l[self.L] - GL @ x, 0.0)]
            r = {
                "stationarity": float(np.max(np.abs(r0 + M @ mult))),
                "primal": float(max((np.max(v) for v in viol if v.size), default=0.0)),
                "complementarity": float(np.max(s * mult[self.me:], initial=0.0)),
            }
            worst = {key: max(worst[key], r[key]) for key in worst}
        return worst

    def accuracy(self, X, grads):
        """KKT residuals of X and the differences of X and `grads` (dict by argument) from clarke's."""
        out = {"kkt": self.kkt(X)}
        if self.ref is not None:
            out["max_abs_x_vs_clarke"] = float(np.max(np.abs(X - self.ref["x"])))
            diff, scale = {}, {}
            for k, g in grads.items():
                r = self.ref.get("grad_" + k)
                if r is None:
                    continue
                diff[k] = float(np.max(np.abs(np.asarray(g).reshape(r.shape) - r), initial=0.0))
                scale[k] = float(np.max(np.abs(r), initial=0.0))
            out["max_abs_grad_vs_clarke"] = diff
            out["max_abs_grad_clarke"] = scale
        return out


def load():
    path = data_file(args, "qp_layer.json")
    if path:
        with open(path) as f:
            j = json.load(f)
        out = []
        for name in ("small", "large"):
            d = j[name]
            c = d["clarke"]
            ref = {k: np.asarray(v, dtype=np.float64) for k, v in c.items() if k.startswith("grad_") or k == "x"}
            ref["kkt"] = c.get("kkt_worst")
            out.append(Problem(name, d, ref))
        return out, "clarke"
    # Same kind of draw as the bench (other numbers): only for trying the script alone.
    r = np.random.default_rng(0)
    batch = 128
    n, m = 20, 15
    G = r.standard_normal((m, n))
    small = {"Q": np.eye(n), "G": G, "l": [None] * m, "u": list(G @ r.standard_normal(n) + r.uniform(0, 1, m)),
             "p": r.standard_normal((batch, n)), "w": r.standard_normal(n)}
    n, me, mi = 100, 50, 100
    L0 = r.standard_normal((n, n))
    A, G, x0 = r.standard_normal((me, n)), r.standard_normal((mi, n)), r.standard_normal(n)
    large = {"Q": L0 @ L0.T / n + np.eye(n), "A": A, "b": A @ x0, "G": G,
             "l": list(G @ x0 - r.uniform(1, 10, mi)), "u": list(G @ x0 + r.uniform(1, 10, mi)),
             "p": r.standard_normal((batch, n)), "w": r.standard_normal(n)}
    return [Problem("small", small, None), Problem("large", large, None)], "own draw"


PROBLEMS, SOURCE = load()
if args.quick:
    PROBLEMS = PROBLEMS[:1]


def torch_layer(name, pb):
    import torch

    torch.set_num_threads(args.threads)
    # QPLayer allocates its gradients with the default dtype: f64 throughout.
    torch.set_default_dtype(torch.float64)
    dt = torch.float64
    T = lambda a: torch.tensor(a, dtype=dt)  # noqa: E731
    wt = T(pb.w)
    if name == "qplayer":
        from proxsuite.torch.qplayer import QPFunction

        # The batch on OpenMP (proxsuite takes half the machine's cores for it).
        settings = {"eps": 1e-9, "omp_parallel": args.threads > 1}
        fn = QPFunction(**settings)
        e = torch.empty(0, dtype=dt)
        data = {"Q": T(pb.Q), "A": T(pb.A) if pb.me else e, "b": T(pb.b) if pb.me else e, "G": T(pb.G),
                "l": T(np.maximum(pb.l, -INF)), "u": T(np.minimum(pb.u, INF))}
        diff = ["Q", "A", "b", "G", "l", "u"] if pb.me else ["Q", "G", "l", "u"]

        def solve(p, d):
            return fn(d["Q"], p, d["A"], d["b"], d["G"], d["l"], d["u"])[0]

        def grads_of(d, gp, batch):
            out = {k: d[k].grad.numpy() for k in diff}
            out["p"] = gp
            return out
    elif name == "qpth":
        from qpth.qp import QPFunction

        settings = {"eps": 1e-12, "maxIter": 50}
        e = torch.empty(0, dtype=dt)
        data = {"Q": T(pb.Q), "G": T(pb.Gh), "h": T(pb.h), "A": T(pb.A) if pb.me else e,
                "b": T(pb.b) if pb.me else e}
        diff = ["Q", "G", "h", "A", "b"] if pb.me else ["Q", "G", "h"]

        def solve(p, d):
            return QPFunction(verbose=-1, **settings)(d["Q"], p, d["G"], d["h"], d["A"], d["b"])

        def grads_of(d, gp, batch):
            # qpth averages the gradients of the shared arguments over the batch: times the
            # batch, the sum that the loss's gradient is.
            g = {k: d[k].grad.numpy() * (batch if batch > 1 else 1) for k in diff}
            out = {"Q": g["Q"], "p": gp}
            out["G"], out["l"], out["u"] = pb.split_h(g["G"], g["h"])
            if pb.me:
                out["A"], out["b"] = g["A"], g["b"]
            return out
    elif name == "cvxpylayers":
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer

        x = cp.Variable(pb.n)
        par = {"p": cp.Parameter(pb.n), "G": cp.Parameter((pb.mi, pb.n))}
        cons = []
        if pb.me:
            par["A"], par["b"] = cp.Parameter((pb.me, pb.n)), cp.Parameter(pb.me)
            cons.append(par["A"] @ x == par["b"])
        if len(pb.U):
            par["u"] = cp.Parameter(pb.mi)
            cons.append(par["G"][pb.U] @ x <= par["u"][pb.U])
        if len(pb.L):
            par["l"] = cp.Parameter(pb.mi)
            cons.append(par["G"][pb.L] @ x >= par["l"][pb.L])
        diff = [k for k in ("A", "b", "G", "l", "u") if k in par]
        order = ["p"] + diff
        prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, pb.Q) + par["p"] @ x), cons)
        layer = CvxpyLayer(prob, parameters=[par[k] for k in order], variables=[x])
        settings = {"solver": "default (diffcp)", "Q": "constant"}
        # An infinite bound takes part in no constraint; its value is a placeholder.
        data = {"A": T(pb.A), "b": T(pb.b), "G": T(pb.G), "l": T(np.where(np.isfinite(pb.l), pb.l, 0.0)),
                "u": T(np.where(np.isfinite(pb.u), pb.u, 0.0))}

        def solve(p, d):
            return layer(p, *[d[k] for k in diff])[0]

        def grads_of(d, gp, batch):
            out = {k: d[k].grad.numpy() for k in diff}
            out["p"] = gp
            return out
    else:
        raise ValueError(name)

    def fwd(p0):
        with torch.no_grad():
            return solve(p0, data)

    def fwd_bwd(p0):
        d = {k: v.clone().requires_grad_(k in diff) for k, v in data.items()}
        p = p0.clone().requires_grad_(True)
        (solve(p, d) * wt).sum().backward()
        return d, p.grad

    sizes = [(1, T(pb.P[0])), (pb.batch, T(pb.P))]
    # qpth's batched solve of the larger QP did not finish in half an hour on the reference
    # machine (its batch of one takes 60 to 80 ms): it is timed on one problem only there.
    batch_stalls = name == "qpth" and pb.n >= 100
    if batch_stalls:
        sizes = sizes[:1]
        print(f"qpth: {pb.label(pb.batch)} left out (its batched solve does not finish)", file=sys.stderr)
    for batch, p0 in sizes:
        for mode, f in (("forward", fwd), ("forward+backward", fwd_bwd)):
            t, reps = median_time(lambda: f(p0), REPS, budget=BUDGET)
            emit(PROBLEM, name, mode, pb.label(batch), t, reps=reps, data=SOURCE, threads=args.threads,
                 settings=settings, differentiates=["p"] + [k for k in ARGS if k in diff or ("h" in diff and pb.finite(k))])
    if batch_stalls:
        return
    pb_all = T(pb.P)
    X = fwd(pb_all).reshape(pb.batch, pb.n).numpy()
    d, gp = fwd_bwd(pb_all)
    grads = grads_of(d, gp.reshape(pb.batch, pb.n).numpy(), pb.batch)
    emit(PROBLEM, name, "accuracy", pb.label(pb.batch), data=SOURCE, **pb.accuracy(X, grads))


def qpax_layer(pb):
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import qpax

    settings = {"solver_tol": 1e-8}
    J = jnp.asarray
    shared = (J(pb.Q), J(pb.A), J(pb.b), J(pb.Gh), J(pb.h))
    wj = J(pb.w)

    def x_of(Q, p, A, b, G, h):
        return qpax.solve_qp_primal(Q, p, A, b, G, h, **settings)

    xb_of = jax.vmap(x_of, in_axes=(None, 0, None, None, None, None))

    def loss1(Q, p, A, b, G, h):
        return jnp.dot(x_of(Q, p, A, b, G, h), wj)

    def lossb(Q, p, A, b, G, h):
        return jnp.sum(xb_of(Q, p, A, b, G, h) * wj)

    def call(f):
        return lambda p: f(shared[0], p, *shared[1:])

    fwd1, fwdb = jax.jit(call(x_of)), jax.jit(call(xb_of))
    g1 = jax.jit(call(jax.grad(loss1, argnums=(0, 1, 2, 3, 4, 5))))
    gb = jax.jit(call(jax.grad(lossb, argnums=(0, 1, 2, 3, 4, 5))))
    ready = lambda r: jax.block_until_ready(r)  # noqa: E731
    for batch, f, g, p in ((1, fwd1, g1, J(pb.P[0])), (pb.batch, fwdb, gb, J(pb.P))):
        for mode, fn in (("forward", f), ("forward+backward", g)):
            t, reps = median_time(lambda: ready(fn(p)), REPS, budget=BUDGET)
            emit(PROBLEM, "qpax", mode, pb.label(batch), t, reps=reps, data=SOURCE, threads=args.threads,
                 settings={**settings, "batch": "jit(vmap)"},
                 differentiates=[k for k in ARGS if k in "QpG" or (pb.me and k in "Ab") or pb.finite(k)])
    p = J(pb.P)
    X = np.asarray(fwdb(p))
    gQ, gp, gA, gbb, gG, gh = (np.asarray(a) for a in gb(p))
    grads = {"Q": gQ, "p": gp}
    grads["G"], grads["l"], grads["u"] = pb.split_h(gG, gh)
    if pb.me:
        grads["A"], grads["b"] = gA, gbb
    emit(PROBLEM, "qpax", "accuracy", pb.label(pb.batch), data=SOURCE, **pb.accuracy(X, grads))


for pb in PROBLEMS:
    if pb.ref is not None and wanted(args, "clarke"):
        # clarke's own solutions under the same measure (the bench prints its own residuals too).
        emit(PROBLEM, "clarke", "accuracy", pb.label(pb.batch), data=SOURCE, kkt=pb.kkt(pb.ref["x"]),
             kkt_clarke_definition=pb.ref["kkt"])
    for name in ("qplayer", "qpth", "qpax", "cvxpylayers"):
        if not wanted(args, name):
            continue
        try:
            qpax_layer(pb) if name == "qpax" else torch_layer(name, pb)
        except Exception as e:  # a peer that fails is reported, not fatal
            failed(PROBLEM, name, RuntimeError(f"{pb.label(pb.batch)}: {type(e).__name__}: {e}"))
