"""QPLayer's closest feasible QP against the closed forms clarke's `qp_layer` matches.

  python3 benches/peers/qp_infeasible.py

For an infeasible QP, proxsuite's QPLayer (`QPFunction(structural_feasibility=False)`) and
clarke's `qp_layer` with `InfeasibleMode::ClosestFeasible` both return the solution of the
closest feasible QP (the constraints shifted by the least-squares shift that makes them
feasible, Bambade et al. 2023) and its derivative. On one-variable QPs where an equality and
an inequality conflict, the closest feasible QP has one point, `xbar = argmin_x (a x - b)^2 +
(g x - u)_+^2 + (l - g x)_+^2`, so `x*` and its derivatives have closed forms:

  x = b, x <= u (u < b):     x* = (a b + g u) / (a^2 + g^2) = (b + u)/2 at a = g = 1,
                             dx/db = dx/du = 1/2, dx/da = -u/2, dx/dg = -b/2;
  2x = b, x >= l (l > b/2):  x* = (2 b + l)/5, dx/db = 2/5, dx/dl = 1/5,
                             dx/da = (b (a^2 + g^2) - 2 a (a b + g l)) / (a^2 + g^2)^2 = -7/25,
                             dx/dg = (l (a^2 + g^2) - 2 g (a b + g l)) / (a^2 + g^2)^2 = -1/25
                             (a = 2, g = 1, b = l = 1).

clarke's tests (`crates/clarke-convex/tests/qp_layer.rs`) assert these values to 1e-8 (and
central differences in every argument). This script runs QPLayer on the same QPs, with its
defaults and with a tighter setting (100,000 iterations, backward tolerance 1e-9), and prints
the largest difference from the closed forms, and central differences of QPLayer's own
(tight) forward in b and in the bound, which show whether its backward agrees with its
forward. A second inequality row that is never active is
added to each QP: with a single inequality row, QPLayer's infeasible backward fails on an
indexing error (proxsuite 0.7).
"""

import numpy as np
import torch
from proxsuite.torch.qplayer import QPFunction

torch.set_default_dtype(torch.float64)
BIG = 1e20  # QPLayer's infinite bound


def qplayer(q, p, a, b, g, l, u, **settings):
    t = lambda v: torch.tensor(v, dtype=torch.float64, requires_grad=True)  # noqa: E731
    args = [t([q]), t([p]), t(a), t(b), t(g), t(l), t(u)]
    x = QPFunction(structural_feasibility=False, **settings)(*args)[0]
    x.sum().backward()
    grads = [arg.grad.numpy().ravel() for arg in args]
    return x.detach().numpy().ravel()[0], grads


CASES = {
    "x = b, x <= u": (
        dict(q=[[1.0]], p=[0.0], a=[[1.0]], b=[2.0], g=[[1.0], [1.0]], l=[-BIG, -BIG], u=[0.5, 100.0]),
        {"x": 1.25, "b": 0.5, "u": 0.5, "A": -0.25, "G": -1.0},
    ),
    "2x = b, x >= l": (
        dict(q=[[1.0]], p=[0.0], a=[[2.0]], b=[1.0], g=[[1.0], [1.0]], l=[1.0, -100.0], u=[BIG, BIG]),
        {"x": 0.6, "b": 0.4, "l": 0.2, "A": -7 / 25, "G": -1 / 25},
    ),
}
SETTINGS = {
    "defaults": {},
    "100,000 iterations, backward tol 1e-9": {"maxIter": 100_000, "eps_backward": 1e-9},
}


def forward_difference(qp, key, settings, h=1e-5):
    """Central difference of QPLayer's x* in the first entry of `key`."""

    def at(t):
        moved = dict(qp)
        moved[key] = [qp[key][0] + t] + list(qp[key][1:])
        return qplayer(**moved, **settings)[0]

    return (at(h) - at(-h)) / (2 * h)


def main():
    print("| QP | QPLayer settings | x* | dx/db | dx/d(bound) | dx/dA | dx/dG | largest difference from the closed form |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (qp, exact) in CASES.items():
        bound = "u" if "u" in exact else "l"
        for label, settings in SETTINGS.items():
            x, (gq, gp, ga, gb, gg, gl, gu) = qplayer(**qp, **settings)
            got = {"x": x, "b": gb[0], "A": ga[0], "G": gg[0], bound: (gu if bound == "u" else gl)[0]}
            worst = max(abs(got[k] - exact[k]) for k in exact)
            print(f"| {name} | {label} | {x:.6g} | {got['b']:.6g} | {got[bound]:.6g} | {got['A']:.6g} "
                  f"| {got['G']:.6g} | {worst:.1e} |")
        tight = SETTINGS["100,000 iterations, backward tol 1e-9"]
        key = bound if bound == "u" else "l"
        fd_b, fd_bound = forward_difference(qp, "b", tight), forward_difference(qp, key, tight)
        print(f"| {name} | central differences of QPLayer's tight forward | | {fd_b:.6g} | {fd_bound:.6g} | | | |")
        print(f"| {name} | closed form (clarke to 1e-8) | {exact['x']:.6g} | {exact['b']:.6g} | "
              f"{exact[bound]:.6g} | {exact['A']:.6g} | {exact['G']:.6g} | 0 |")


if __name__ == "__main__":
    main()
