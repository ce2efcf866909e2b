"""The digits DEQ of examples/deq_digits.rs (default run) trained in PyTorch eager, f64, CPU.

Same data (the project's data/digits.csv; test = rows whose index is a multiple of 5, pixels
/ 16; --quick: the first 320 training rows and 2 epochs, as the example's --quick), same
network and training:
  W = 0.9 V / sigma_max(V), sigma = u^T V v with (u, v) from a warm-started power iteration
      (at most 10 steps, stopping when v moves less than 1e-7 in l1), the gradient taking
      u, v as fixed (spectral normalisation);
  z* = relu(z* W^T + x U^T + b), width 128, Picard from z = 0 until every sample's
      ||z_new - z|| / max(||z_new||, 1) <= 1e-5 (at most 1000); output relu(z* W^T + x U^T + b);
  backward: Neumann y <- g + (y o d) W, d = relu'(pre) (relu'(0) = 0), until every sample's
      change is <= 1e-5 ||g_i|| (at most 1000), then the gradients of W (through V), U, b;
  logits = z V_h^T + c, mean softmax cross-entropy, Adam (lr 3e-3, betas 0.9/0.999, eps 1e-8),
  batch 64, 20 epochs. The starting point is clarke's: the initial parameters, the power
  iteration's initial vector and every epoch's batches come from deq_digits_start.json in
  --data (written by `deq_digits --save-start`), so both sides train the same network on
  the same batches and their losses and accuracies can be compared step for step. Without
  that file (a run of this script alone) the start is drawn as clarke's (Glorot uniform V and
  U, He uniform head, zero biases, batches reshuffled every epoch) from torch's generator.
No hypothesis check (clarke runs one on every backward pass by default; compare.py times
clarke with and without it). Then the same training again (mode "train, Anderson") with both
solves accelerated as clarke's `--forward anderson --adjoint anderson`: per-sample Anderson
over the last 6 iterates (memory 5) in the constrained form of clarke's kernel
(z_next = sum_j alpha_j T(z_j), alpha = H^-1 1 / (1^T H^-1 1), H = G G^T + lambda I over the
residuals G_j, lambda = 1e-10 max_j ||G_j||^2, the plain step for a sample whose H does not
factor), batched with bmm, same stopping rules. Prints one JSON
line per mode: training wall time (evaluation excluded), test accuracy, mean iteration counts.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import data_file, emit, failed, setup  # noqa: E402


def extra(p):
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--csv", default=os.path.join(here, "..", "..", "data", "digits.csv"),
                   help="the digits CSV (default: the project's data/digits.csv)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)


args = setup(__doc__.splitlines()[0], extra)

import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

WIDTH, BATCH, LR, TOL, MAX_ITER, GAMMA = 128, 64, 3e-3, 1e-5, 1000, 0.9
POWER_ITER, POWER_TOL, QUICK_TRAIN_ROWS = 10, 1e-7, 320
MEMORY, REGULARIZATION = 5, 1e-10


def run(accelerate):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dt = torch.float64
    D = np.loadtxt(args.csv, delimiter=",", skiprows=1)
    X, y = D[:, :-1] / 16.0, D[:, -1].astype(np.int64)
    test = np.arange(len(y)) % 5 == 0
    Xtr, ytr, Xte, yte = X[~test], y[~test], X[test], y[test]
    epochs = args.epochs
    if args.quick:
        Xtr, ytr, epochs = Xtr[:QUICK_TRAIN_ROWS], ytr[:QUICK_TRAIN_ROWS], 2
    Xtr, ytr, Xte, yte = (torch.tensor(a) for a in (Xtr, ytr, Xte, yte))
    n, d, classes = WIDTH, Xtr.shape[1], int(y.max()) + 1

    start = load_start(epochs, len(ytr))
    if start is not None:
        def given(name, shape):
            p = start["params"][name]
            if tuple(p["shape"]) != shape:
                raise ValueError(f"deq_digits_start.json: {name} has shape {p['shape']}, expected {list(shape)}")
            return torch.tensor(p["data"], dtype=dt).reshape(shape).requires_grad_()

        V, U, b = given("deq.v", (n, n)), given("deq.u", (n, d)), given("deq.bias", (n,))
        Vh, c = given("head.weight", (classes, n)), given("head.bias", (classes,))
        right = torch.tensor(start["power_vector"], dtype=dt)
        epoch_batches = [[torch.tensor(idx) for idx in epoch] for epoch in start["batches"][:epochs]]
    else:
        def uniform(shape, a):
            return ((torch.rand(shape, dtype=dt) * 2 - 1) * a).requires_grad_()

        V = uniform((n, n), np.sqrt(6 / (2 * n)))
        U = uniform((n, d), np.sqrt(6 / (n + d)))
        b = torch.zeros(n, dtype=dt, requires_grad=True)
        Vh = uniform((classes, n), np.sqrt(6 / n))
        c = torch.zeros(classes, dtype=dt, requires_grad=True)
        right = torch.rand(n, dtype=dt) * 2 - 1
        epoch_batches = None
    params = [V, U, b, Vh, c]
    opt = torch.optim.Adam(params, lr=LR, betas=(0.9, 0.999), eps=1e-8)
    counts = {"forward": 0, "adjoint": 0, "steps": 0}

    def weight():
        nonlocal right
        with torch.no_grad():
            v = right / right.norm()
            u = V @ v
            u = u / u.norm()
            for _ in range(1, POWER_ITER):
                nxt = V.T @ u
                nxt = nxt / nxt.norm()
                change = (nxt - v).abs().sum().item()
                v = nxt
                u = V @ v
                u = u / u.norm()
                if change < POWER_TOL:
                    break
            right = v
        sigma = u @ V @ v
        return V * (GAMMA / sigma)

    memory = MEMORY if accelerate else 0

    def solve(T, x, scale):
        """x = T(x) from x, stopping when every row's ||T(x) - x|| / scale(T(x)) is within
        TOL; returns (T(x_k), iterations). With memory 0 the plain iteration (Picard for the
        forward, Neumann for the adjoint); otherwise per-sample Anderson in the constrained
        form of clarke's DEQ kernel."""
        images, residuals = [], []
        for it in range(1, MAX_ITER + 1):
            t = T(x)
            g = t - x
            if ((g.norm(dim=1) / scale(t)).max().item()) <= TOL:
                return t, it
            if len(images) == memory + 1:
                images.pop(0)
                residuals.pop(0)
            images.append(t)
            residuals.append(g)
            k = len(images)
            if k < 2:
                x = t
                continue
            G = torch.stack(residuals, dim=1)  # B x k x n
            H = G @ G.transpose(1, 2)
            lam = REGULARIZATION * H.diagonal(dim1=1, dim2=2).amax(dim=1)
            H = H + lam[:, None, None] * torch.eye(k, dtype=dt)
            L, info = torch.linalg.cholesky_ex(H)
            ones = torch.ones(x.shape[0], k, 1, dtype=dt)
            y = torch.cholesky_solve(ones, L)
            total = y.sum(dim=1, keepdim=True)
            alpha = y / total
            usable = (info == 0) & torch.isfinite(alpha).all(dim=(1, 2)) & (total.abs() > 0).flatten()
            mixed = (alpha.transpose(1, 2) @ torch.stack(images, dim=1)).squeeze(1)
            x = torch.where(usable[:, None], mixed, t)
        return t, MAX_ITER

    def deq(x, train):
        W = weight()
        inj = x @ U.T + b
        with torch.no_grad():
            Wd, injd = W.detach(), inj.detach()
            z = torch.zeros(x.shape[0], n, dtype=dt)
            z, it = solve(lambda v: torch.relu(v @ Wd.T + injd), z, lambda t: t.norm(dim=1).clamp(min=1.0))
        pre = z @ W.T + inj
        out = torch.relu(pre)
        if train:
            counts["forward"] += it
            dm = (pre.detach() > 0).to(dt)

            def neumann(g):
                g_norm = g.norm(dim=1).clamp(min=np.finfo(np.float64).tiny)
                yv, k = solve(lambda v: g + (v * dm) @ Wd, g, lambda _t: g_norm)
                counts["adjoint"] += k
                return yv

            out.register_hook(neumann)
        return out

    def evaluate():
        with torch.no_grad():
            logits = deq(Xte, False) @ Vh.T + c
        return (logits.argmax(1) == yte).double().mean().item()

    train_s, per_epoch, last_loss = 0.0, [], float("nan")
    for epoch in range(epochs):
        t = time.perf_counter()
        if epoch_batches is None:
            perm = torch.randperm(len(ytr))
            batches = [perm[i:i + BATCH] for i in range(0, len(ytr), BATCH)]
        else:
            batches = epoch_batches[epoch]
        losses = []
        for idx in batches:
            loss = F.cross_entropy(deq(Xtr[idx], True) @ Vh.T + c, ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            counts["steps"] += 1
        train_s += time.perf_counter() - t
        last_loss = float(np.mean(losses))
        per_epoch.append(evaluate())
    steps = max(counts["steps"], 1)
    emit("deq_digits", "torch", "train, Anderson" if accelerate else "train", f"{epochs} epochs", train_s, runs=1, threads=args.threads,
         test_accuracy=per_epoch[-1], final_train_loss=last_loss, train_rows=len(ytr),
         mean_forward_iters=counts["forward"] / steps, mean_adjoint_iters=counts["adjoint"] / steps,
         test_accuracy_per_epoch=per_epoch, hypothesis_check=False,
         start="clarke's" if start is not None else "torch's generator")


def load_start(epochs, rows):
    """clarke's starting point from --data, or None when there is none (see the docstring)."""
    path = data_file(args, "deq_digits_start.json")
    if path is None:
        return None
    with open(path) as f:
        start = json.load(f)
    batches = start["batches"]
    if len(batches) < epochs:
        raise ValueError(f"{path} holds the batches of {len(batches)} epochs, {epochs} are trained")
    for e, epoch in enumerate(batches[:epochs]):
        seen = sorted(i for idx in epoch for i in idx)
        if seen != list(range(rows)):
            raise ValueError(f"{path}: the batches of epoch {e + 1} are not a partition of the {rows} training rows")
    return start


for accelerate in (False, True):
    try:
        run(accelerate)
    except Exception as e:
        failed("deq_digits", "torch", e)
