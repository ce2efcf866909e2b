"""Tape overhead in PyTorch eager: the chain of benches/tape_overhead.rs on one-element tensors.

Each step of the chain records five nodes, as in the clarke bench:
  h = relu(h * 1.0001 + 0.01); h = h * w; h = tanh(h) if i is even else h + 0.0
from x = [0.3] and w = [0.999] (both requiring gradients), f64, then sum() and the backward
pass to w. 10,000 and 100,000 nodes; forward_backward and forward_only (the graph is still
recorded, as clarke's forward_only records the tape). The arithmetic on one element is
negligible: the time per node is the framework's cost of recording and differentiating it.

JAX is left out on purpose: under jit the chain is compiled into one fused kernel (that
measures XLA's compiler, not a per-op cost) and op-by-op JAX dispatch is not an autodiff tape.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, failed, median_time, setup, wanted  # noqa: E402

args = setup(__doc__.splitlines()[0])

NODES = [10_000] if args.quick else [10_000, 100_000]
REPS = args.reps or (5 if args.quick else 20)


def torch_runs():
    import torch

    torch.set_num_threads(args.threads)

    def record(nodes):
        x = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
        w = torch.tensor([0.999], dtype=torch.float64, requires_grad=True)
        h = x
        for i in range(nodes // 5):
            h = torch.relu(h * 1.0001 + 0.01)
            h = h * w
            h = torch.tanh(h) if i % 2 == 0 else h + 0.0
        return w, h.sum()

    def forward_backward(nodes):
        w, loss = record(nodes)
        (g,) = torch.autograd.grad(loss, (w,))
        return float(g[0])

    def forward_only(nodes):
        return float(record(nodes)[1].detach())

    for nodes in NODES:
        for mode, f in (("forward_backward", forward_backward), ("forward_only", forward_only)):
            t, reps = median_time(lambda: f(nodes), REPS, budget=30.0)
            emit("tape_overhead", "torch", mode, nodes, t, reps=reps, ns_per_node=t / nodes * 1e9,
                 threads=args.threads)


if wanted(args, "torch"):
    try:
        torch_runs()
    except Exception as e:
        failed("tape_overhead", "torch", e)
