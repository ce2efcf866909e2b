"""Shared plumbing of the peer scripts: arguments, thread counts, timing, JSON lines.

Every script calls `setup()` before importing NumPy, PyTorch or JAX, so that the thread
counts are in the environment before any of them starts a thread pool.
"""

import argparse
import json
import os
import statistics
import sys
import time


def setup(description, extra=None):
    """Parses the common flags (and `extra(parser)`'s), fixes the thread counts, returns them."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a tiny version, for testing the script")
    p.add_argument(
        "--data",
        default=os.environ.get("CLARKE_PEER_DATA"),
        help="directory with the problem files written by the clarke side "
        "(default: $CLARKE_PEER_DATA; without it the script draws its own data)",
    )
    p.add_argument("--threads", type=int, default=int(os.environ.get("PEER_THREADS", "2")),
                   help="threads for every framework (default 2, or $PEER_THREADS)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default: per script)")
    p.add_argument("--only", nargs="*", default=None, help="run only these frameworks")
    if extra:
        extra(p)
    args = p.parse_args()
    t = str(args.threads)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = t
    # XLA's CPU client sizes its pools from the visible cores; compare.py pins the process
    # with taskset when fewer threads than cores are asked for.
    return args


def wanted(args, name):
    return args.only is None or name in args.only


def median_time(f, reps, warmup=1, budget=None):
    """Median wall time of `f()` over `reps` calls after `warmup` calls (seconds).

    With `budget` (seconds), stops early once at least 3 calls are timed and the budget is
    spent, so that slow cases stay bounded."""
    for _ in range(warmup):
        f()
    ts = []
    start = time.perf_counter()
    while len(ts) < reps:
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
        if budget is not None and len(ts) >= 3 and time.perf_counter() - start > budget:
            break
    return statistics.median(ts), len(ts)


def emit(problem, framework, mode, size, median_s=None, **extra):
    """Prints one measurement as a JSON line on stdout."""
    rec = {"problem": problem, "framework": framework, "mode": mode, "size": str(size)}
    if median_s is not None:
        rec["median_s"] = median_s
    rec.update(extra)
    print(json.dumps(rec), flush=True)


def failed(problem, framework, err):
    """Reports a peer that could not run (missing package, API change) without stopping."""
    msg = f"{type(err).__name__}: {err}"[:400]
    print(json.dumps({"problem": problem, "framework": framework, "error": msg}), flush=True)
    print(f"{problem}/{framework}: {msg}", file=sys.stderr)


def data_file(args, name):
    """`args.data/name` if it exists, else None (the script then draws its own data)."""
    if not args.data:
        return None
    path = os.path.join(args.data, name)
    return path if os.path.exists(path) else None
