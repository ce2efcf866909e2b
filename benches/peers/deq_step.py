"""One DEQ training step in PyTorch (eager) and JAX (jit), the step of benches/deq_step.rs.

Problem (f64, CPU), for (B, d, n) in (64, 64, 64), (128, 64, 256), (256, 256, 512):
  Z = relu(Z W^T + X U^T + b)   (B x n; X is B x d), W with spectral norm 0.9
  logits = Z V^T + c (10 classes); loss = mean softmax cross-entropy
  implicit: 30 Picard iterations from Z = 0 without a tape, one recorded application
            out = relu(Z30 W^T + X U^T + b), then 30 adjoint Neumann iterations
            y <- g + (y o d) W  (d = relu'(pre), g = dL/dout: 31 terms of the series),
            then the gradients of W, U, b (delta = y o d) and of V, c.
  unrolled: the 30 iterations from Z = 0 recorded, loss on Z30, plain backprop.
The weights, inputs and labels are read from DATA/deq_step_B_d_n.json (written by the
clarke bench under CLARKE_PEER_DATA); the loss and gradient norms are checked against
clarke's. Prints one JSON line per measurement (median seconds per step).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import data_file, emit, failed, median_time, setup, wanted  # noqa: E402

args = setup(__doc__.splitlines()[0])

import json  # noqa: E402

import numpy as np  # noqa: E402

K = 30
SIZES = [(64, 64, 64)] if args.quick else [(64, 64, 64), (128, 64, 256), (256, 256, 512)]
REPS = args.reps or (5 if args.quick else 20)
BUDGET = 2.0 if args.quick else 20.0
PROBLEM = "deq_step"


def problem(B, d, n):
    """(W, U, b, V, c, X, y, reference) from clarke's file, else a draw of the same kind."""
    path = data_file(args, f"deq_step_{B}_{d}_{n}.json")
    if path:
        with open(path) as f:
            j = json.load(f)
        arr = lambda k: np.asarray(j[k], dtype=np.float64)  # noqa: E731
        return (arr("W"), arr("U"), arr("b"), arr("V"), arr("c"), arr("X"),
                np.asarray(j["y"], dtype=np.int64), j.get("clarke_implicit"), "clarke")
    r = np.random.default_rng(0)
    W = r.uniform(-1, 1, (n, n))
    W *= 0.9 / np.linalg.norm(W, 2)
    a = np.sqrt(6 / (n + d))
    U = r.uniform(-a, a, (n, d))
    V = r.uniform(-np.sqrt(6 / n), np.sqrt(6 / n), (10, n))
    X = r.uniform(0, 1, (B, d))
    return W, U, np.zeros(n), V, np.zeros(10), X, r.integers(0, 10, B), None, "own draw"


NAMES = ["deq.w", "deq.u", "deq.bias", "head.weight", "head.bias"]


def check(ref, loss, grads):
    """Largest relative difference of the loss and gradient norms against clarke's."""
    if not ref:
        return {}
    diffs = [abs(loss - ref["loss"]) / max(abs(ref["loss"]), 1e-300)]
    for name, g in zip(NAMES, grads):
        r = ref["grad_norms"][name]
        diffs.append(abs(float(np.linalg.norm(g)) - r) / max(r, 1e-300))
    return {"vs_clarke_max_rel_diff": max(diffs)}


def torch_runs(size, data):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    B, d, n = size
    W, U, b, V, c, X, y = [torch.tensor(a) for a in data[:7]]
    params = [p.requires_grad_() for p in (W, U, b, V, c)]

    def forward_solve():
        with torch.no_grad():
            inj = X @ U.T + b
            Z = torch.zeros(B, n, dtype=torch.float64)
            for _ in range(K):
                Z = torch.relu(Z @ W.T + inj)
        return Z

    def implicit():
        # The adjoint by hand: y <- g + (y o d) W, the same products as clarke's kernel.
        Z = forward_solve()
        pre = Z @ W.T + X @ U.T + b
        out = torch.relu(pre)
        d_mask = (pre.detach() > 0).to(torch.float64)
        Wd = W.detach()

        def neumann(g):
            yv = g
            for _ in range(K):
                yv = g + (yv * d_mask) @ Wd
            return yv

        out.register_hook(neumann)
        loss = F.cross_entropy(out @ V.T + c, y)
        return loss, torch.autograd.grad(loss, params)

    def implicit_vjp():
        # The adjoint through autograd, one VJP of the cell per iteration (the usual DEQ code).
        Z0 = forward_solve().requires_grad_()
        f = torch.relu(Z0 @ W.T + X @ U.T + b)
        fd = f.detach().requires_grad_()
        loss = F.cross_entropy(fd @ V.T + c, y)
        g, gV, gc = torch.autograd.grad(loss, (fd, V, c))
        yv = g
        for _ in range(K):
            yv = g + torch.autograd.grad(f, Z0, yv, retain_graph=True)[0]
        gW, gU, gb = torch.autograd.grad(f, (W, U, b), yv)
        return loss, (gW, gU, gb, gV, gc)

    def unrolled():
        inj = X @ U.T + b
        Z = torch.zeros(B, n, dtype=torch.float64)
        for _ in range(K):
            Z = torch.relu(Z @ W.T + inj)
        loss = F.cross_entropy(Z @ V.T + c, y)
        return loss, torch.autograd.grad(loss, params)

    out = []
    for fw, mode, f, checked in (("torch", "implicit", implicit, True),
                                 ("torch-vjp", "implicit", implicit_vjp, True),
                                 ("torch", "unrolled", unrolled, False)):
        if not wanted(args, fw):
            continue
        loss, grads = f()
        extra = check(data[7], float(loss.detach()), [g.numpy() for g in grads]) if checked else {}
        t, reps = median_time(f, REPS, budget=BUDGET)
        out.append((fw, mode, t, reps, extra))
    return out


def jax_runs(size, data):
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    B, d, n = size
    W, U, b, V, c, X, y = [jnp.asarray(a) for a in data[:7]]
    params = (W, U, b, V, c)

    def ce(Z, V, c):
        logits = Z @ V.T + c
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[jnp.arange(B), y])

    def picard(W, inj):
        return jax.lax.fori_loop(0, K, lambda i, Z: jax.nn.relu(Z @ W.T + inj), jnp.zeros((B, n)))

    @jax.custom_vjp
    def deq(W, U, b):
        inj = X @ U.T + b
        return jax.nn.relu(picard(W, inj) @ W.T + inj)

    def deq_fwd(W, U, b):
        inj = X @ U.T + b
        Z = picard(W, inj)
        pre = Z @ W.T + inj
        return jax.nn.relu(pre), (Z, (pre > 0).astype(jnp.float64), W)

    def deq_bwd(res, g):
        Z, dm, W = res
        yv = jax.lax.fori_loop(0, K, lambda i, yv: g + (yv * dm) @ W, g)
        delta = yv * dm
        return delta.T @ Z, delta.T @ X, delta.sum(0)

    deq.defvjp(deq_fwd, deq_bwd)

    def loss_implicit(p):
        W, U, b, V, c = p
        return ce(deq(W, U, b), V, c)

    def loss_unrolled(p):
        W, U, b, V, c = p
        return ce(picard(W, X @ U.T + b), V, c)

    out = []
    for mode, loss_fn, checked in (("implicit", loss_implicit, True), ("unrolled", loss_unrolled, False)):
        step = jax.jit(jax.value_and_grad(loss_fn))
        loss, grads = jax.block_until_ready(step(params))  # compiles
        extra = check(data[7], float(loss), [np.asarray(g) for g in grads]) if checked else {}
        t, reps = median_time(lambda: jax.block_until_ready(step(params)), REPS, budget=BUDGET)
        out.append(("jax", mode, t, reps, extra))
    return out


for size in SIZES:
    data = problem(*size)
    label = "(%d, %d, %d)" % size
    for name, runs in (("torch", torch_runs), ("jax", jax_runs)):
        if not (wanted(args, name) or (name == "torch" and wanted(args, "torch-vjp"))):
            continue
        try:
            for fw, mode, t, reps, extra in runs(size, data):
                emit(PROBLEM, fw, mode, label, t, reps=reps, data=data[8], threads=args.threads,
                     iterations=K, **extra)
        except Exception as e:  # a peer that fails is reported, not fatal
            failed(PROBLEM, name, e)
