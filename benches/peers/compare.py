"""clarke against its peers on the same problems, in one go: one Markdown table.

  python3 benches/peers/compare.py [--quick] [--only GROUP ...] [--threads N] [--python PY]

Runs the clarke side (criterion benches `deq_step`, `tape_overhead`, `conic_qp`, `qp_layer` of
`benches/main.rs`, the examples `deq_digits`, `lasso_hyperopt --synthetic` and `lasso_hyperopt
--sparse-synthetic` / `--data`), which also write their problems to target/peers/data
(CLARKE_PEER_DATA, --save-data, --save-svmlight, --save-start), then every peer script of this directory on
those files, and prints: work, clarke, each peer, the best peer and the ratio best peer / clarke
(above 1: clarke is faster), then the accuracy figures and the machine line. Every measurement
is also written as JSON lines to target/peers/results-DATE.jsonl.

The interpreter of the peer scripts is --python, else $PYTHON, else python3. GROUP is one of
deq_step, tape_overhead, conic_qp, qp_layer, deq_digits, lasso, lasso_sparse (several may be
given).
"""

import argparse
import datetime
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GROUPS = ["deq_step", "tape_overhead", "conic_qp", "qp_layer", "deq_digits", "lasso", "lasso_sparse"]

# Criterion filters (regexes on "group/function/parameter"), full and quick.
FILTERS = {
    "deq_step": (r"^deq_step/", r"^deq_step/(implicit|unrolled|implicit\+check)/\(64, 64, 64\)$"),
    "tape_overhead": (r"^tape_overhead/", r"^tape_overhead/.*/10000$"),
    "conic_qp": (r"^conic_qp/", r"^conic_qp/"),
    "qp_layer": (r"^qp_layer/", r"^qp_layer/.*/small "),
}
# clarke's criterion parameters, as the peer scripts name the sizes.
CLARKE_SIZES = {
    ("qp_layer", "small 1"): "20x15 batch 1",
    ("qp_layer", "small 128"): "20x15 batch 128",
    ("qp_layer", "large 1"): "100/50/100 batch 1",
    ("qp_layer", "large 128"): "100/50/100 batch 128",
}
# Python script of each group.
SCRIPTS = {
    "deq_step": "deq_step.py",
    "tape_overhead": "tape_overhead.py",
    "conic_qp": "conic_qp.py",
    "qp_layer": "qp_layer.py",
    "deq_digits": "deq_digits.py",
    "lasso": "lasso.py",
    "lasso_sparse": "lasso_sparse.py",
}
# clarke modes compared with another mode of the peers (which have no hypothesis check).
PEER_MODE = {
    ("deq_step", "implicit+check"): "implicit",
    ("conic_qp", "forward+backward unchecked"): "forward+backward",
    ("deq_digits", "train (no check)"): "train",
    ("lasso_sparse", "fit+hypergradient"): "fit",  # the peers have no hypergradient
}
# The sparse Lasso problems (`lasso_hyperopt --sparse-synthetic KIND`): svmlight files written
# to the data directory, and the lambda_max / R each is fitted at.
SPARSE_KINDS = ["rcv1", "news20"]
SPARSE_RATIOS = [10, 100]
SPARSE_TOL = 1e-8


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(cmd, env=None, log_path=None, keep_stdout=True):
    """Runs `cmd` from the project root; returns (stdout, exit status). stderr, and stdout
    when not kept, go to `log_path`."""
    log("$ " + " ".join(cmd))
    full_env = {**os.environ, **(env or {})}
    with open(log_path or os.devnull, "w") as err:
        res = subprocess.run(cmd, cwd=ROOT, env=full_env, text=True, stderr=err,
                             stdout=subprocess.PIPE if keep_stdout else err)
    if res.returncode != 0:
        log(f"  exit status {res.returncode}" + (f" (see {log_path})" if log_path else ""))
    return res.stdout or "", res.returncode


def first_error(log_path):
    """The first line of a log that reports an error (else its last line), for the summary."""
    try:
        lines = [line.strip() for line in open(log_path) if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [""])[0][:200]


def json_lines(text):
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def pin(cmd, threads):
    """Pins `cmd` to the first `threads` cores when fewer than all are asked for (JAX/XLA and
    OpenMP size their pools from the visible cores)."""
    if threads < (os.cpu_count() or threads) and shutil.which("taskset"):
        return ["taskset", "-c", f"0-{threads - 1}"] + cmd
    return cmd


# ---------------------------------------------------------------- the clarke side


def clarke_criterion(groups, quick, threads, target, data_dir, out_dir):
    filt = "|".join("(" + FILTERS[g][1 if quick else 0] + ")" for g in groups)
    cmd = ["cargo", "bench", "--bench", "benches", "--", filt]
    if quick:
        cmd += ["--warm-up-time", "0.3", "--measurement-time", "1"]
    start = time.time()
    env = {"CLARKE_PEER_DATA": data_dir, "OPENBLAS_NUM_THREADS": "1", "RAYON_NUM_THREADS": str(threads)}
    _, rc = run(pin(cmd, threads), env=env, log_path=os.path.join(out_dir, "clarke-bench.log"), keep_stdout=False)
    recs = []
    for bench in glob.glob(os.path.join(target, "criterion", "*", "**", "new", "benchmark.json"), recursive=True):
        if os.path.getmtime(bench) < start - 1:
            continue  # an older run's result
        meta = json.load(open(bench))
        group = meta.get("group_id")
        if group not in groups:
            continue
        est = json.load(open(os.path.join(os.path.dirname(bench), "estimates.json")))
        mode = meta.get("function_id") or meta.get("title")
        size = meta.get("value_str") or ""
        size = CLARKE_SIZES.get((group, size), size)
        recs.append({"problem": group, "framework": "clarke", "mode": mode, "size": size,
                     "median_s": est["median"]["point_estimate"] * 1e-9, "source": "criterion",
                     "threads": threads})
    if rc != 0 and not recs:
        log("  the clarke benches failed; see " + os.path.join(out_dir, "clarke-bench.log"))
    return recs


def sparse_label(kind):
    return f"{kind}-like"


def build_examples(threads, out_dir):
    _, rc = run(pin(["cargo", "build", "--release", "--example", "deq_digits", "--example", "lasso_hyperopt"],
                    threads), log_path=os.path.join(out_dir, "clarke-build.log"), keep_stdout=False)
    return rc == 0


def example(target, name, args, threads, out_dir, tag):
    exe = os.path.join(target, "release", "examples", name)
    env = {"OPENBLAS_NUM_THREADS": "1", "RAYON_NUM_THREADS": str(threads)}
    out, rc = run(pin([exe] + args, threads), env=env, log_path=os.path.join(out_dir, f"clarke-{tag}.log"))
    lines = json_lines(out)
    return lines[-1] if rc == 0 and lines else None


def clarke_deq_digits(target, quick, threads, data_dir, out_dir):
    recs = []
    anderson = ["--forward", "anderson", "--adjoint", "anderson"]
    # The three runs share one seed, so one starting point (initial weights, power vector,
    # batches) serves them all; the PyTorch script starts from it too.
    start = ["--save-start", data_dir]
    for mode, extra, tag in (("train", start, ""), ("train (no check)", ["--no-check"], "-nocheck"),
                             ("train, Anderson", anderson, "-anderson")):
        j = example(target, "deq_digits", extra + (["--quick"] if quick else []), threads, out_dir,
                    "deq_digits" + tag)
        if j is None:
            continue
        recs.append({"problem": "deq_digits", "framework": "clarke", "mode": mode, "size": f"{j['epochs']} epochs",
                     "median_s": j["train_seconds"], "runs": 1, "test_accuracy": j["test_accuracy"],
                     "final_train_loss": j["final_train_loss"], "mean_forward_iters": j["mean_forward_iters"],
                     "mean_adjoint_iters": j["mean_adjoint_iters"], "check": j.get("check"), "threads": threads})
    return recs


def clarke_lasso(target, quick, threads, data_dir, out_dir):
    args = ["--synthetic", "--save-data", data_dir] + (["--quick"] if quick else [])
    j = example(target, "lasso_hyperopt", args, threads, out_dir, "lasso")
    if j is None:
        return []
    g = j["grid"]
    recs = [{"problem": "lasso", "framework": "clarke", "mode": "grid", "size": str(g["points"]),
             "median_s": g["seconds"], "runs": 1, "best_lambda": g["best_lambda"],
             "best_lambda_frac": g["best_lambda"] / j["lambda_max"], "best_val_loss": g["best_val_loss"], "p": j["p"]}]
    tight = {round(row["f"], 6): row for row in j["table"]}
    for s in j["one_hypergradient"]:
        label = re.sub(r" \(.*\)$", "", s["at"])
        rec = {"problem": "lasso", "framework": "clarke", "mode": "fit+hypergradient", "size": label,
               "median_s": s["total_seconds"], "runs": 1, "lambda": s["lambda"], "support": s["support"],
               "fit_seconds": s["fit_seconds"], "hypergradient_seconds": s["hypergradient_seconds"], "p": j["p"]}
        if label == "lambda_max/10" and 0.1 in tight:
            rec["hypergradient_tol1e-12"] = tight[0.1]["grad_support"]
        recs.append(rec)
    return recs


def clarke_lasso_sparse(target, quick, threads, data_dir, out_dir):
    """Writes the svmlight files, fits each at every ratio; returns (records, files written)."""
    recs, written, known_p = [], 0, {}
    for kind in SPARSE_KINDS:
        name = f"{kind}_like.svm"
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            os.remove(path)  # a failed run must not leave the peers an older file
        args = ["--sparse-synthetic", kind, "--save-svmlight", path] + (["--quick"] if quick else [])
        tag = f"lasso_sparse-{kind}"
        j = example(target, "lasso_hyperopt", args, threads, out_dir, tag)
        if j is None or not os.path.exists(path):
            log_path = os.path.join(out_dir, f"clarke-{tag}.log")
            msg = (f"`lasso_hyperopt --sparse-synthetic {kind} --save-svmlight FILE` did not write {name}: "
                   f"{first_error(log_path) or 'no output'} (see {log_path})")
            log("  " + msg)
            recs.append({"problem": "lasso_sparse", "framework": "clarke", "error": msg})
            continue
        written += 1
        if isinstance(j.get("p"), int):
            known_p[name] = j["p"]  # the generator's p, trailing empty columns included
        for ratio in SPARSE_RATIOS:
            args = ["--data", path, "--tol", f"{SPARSE_TOL:g}", "--at-ratio", str(ratio)]
            need = ("fit_seconds", "hypergradient_seconds", "support", "objective", "gap")
            # As many runs as the peers' reps (each a fresh process, cold fit): the median
            # run by fit + hypergradient time.
            runs = [example(target, "lasso_hyperopt", args, threads, out_dir, f"{tag}-{ratio}")
                    for _ in range(1 if quick else 3)]
            runs = [x for x in runs if x is not None and all(k in x for k in need)]
            runs.sort(key=lambda x: x["fit_seconds"] + x["hypergradient_seconds"])
            r = runs[len(runs) // 2] if runs else None
            if r is None or any(k not in r for k in need):
                log_path = os.path.join(out_dir, f"clarke-{tag}-{ratio}.log")
                msg = (f"`lasso_hyperopt --data {name} --at-ratio {ratio}` gave no last JSON line with "
                       f"{', '.join(need)}: {first_error(log_path) or 'no error logged'} (see {log_path})")
                log("  " + msg)
                recs.append({"problem": "lasso_sparse", "framework": "clarke", "error": msg})
                continue
            if isinstance(r.get("p"), int):
                known_p[name] = max(known_p.get(name, 0), r["p"])
            size = f"{sparse_label(kind)} lambda_max/{ratio}"
            extra = {k: r.get(k) for k in ("n", "p", "nnz", "n_val", "lambda", "lambda_ratio", "support", "objective",
                                           "gap", "tol", "val_mse", "hypergradient", "fit_seconds",
                                           "hypergradient_seconds", "peak_memory_bytes")}
            extra.update({"file": name, "runs": len(runs), "threads": threads})
            if "gap_relative" in r:
                extra["gap_relative"] = r["gap_relative"]
            recs.append({"problem": "lasso_sparse", "framework": "clarke", "mode": "fit+hypergradient", "size": size,
                         "median_s": r["fit_seconds"] + r["hypergradient_seconds"], **extra})
            recs.append({"problem": "lasso_sparse", "framework": "clarke", "mode": "fit", "size": size,
                         "median_s": r["fit_seconds"], **extra})
    if known_p:  # the peer script reads the files with this many features (trailing empty columns count)
        with open(os.path.join(data_dir, "lasso_sparse.json"), "w") as f:
            json.dump({"p": known_p}, f)
    return recs, written


# ---------------------------------------------------------------- the peers


def peers(group, python, quick, threads, data_dir, out_dir):
    cmd = [python, os.path.join(HERE, SCRIPTS[group]), "--data", data_dir, "--threads", str(threads)]
    if quick:
        cmd.append("--quick")
    out, _ = run(pin(cmd, threads), env={"PEER_THREADS": str(threads)},
                 log_path=os.path.join(out_dir, f"peer-{group}.log"))
    return json_lines(out)


# ---------------------------------------------------------------- the report


def fmt_time(s):
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def sparse_key(size):
    """"rcv1-like lambda_max/10" -> (0, 10.0): the kinds in SPARSE_KINDS order, then R."""
    label, _, ratio = size.rpartition(" lambda_max/")
    kinds = [sparse_label(k) for k in SPARSE_KINDS]
    try:
        r = float(ratio)
    except ValueError:
        r = 0.0
    return (kinds.index(label) if label in kinds else len(kinds), label, r)


def fmt_mb(b):
    return f"{b / 2**20:.0f} MB" if isinstance(b, (int, float)) else "-"


def sparse_accuracy(records):
    """Per file and R: support, objective, gap and peak memory of every side (clarke first)."""
    rows = [r for r in records if r.get("problem") == "lasso_sparse" and "error" not in r
            and r.get("mode") == ("fit+hypergradient" if r.get("framework") == "clarke" else "fit")]
    scale = {r["size"]: r["gap_scale"] for r in rows if r.get("gap_scale")}
    rows.sort(key=lambda r: (sparse_key(r["size"]), r["framework"] != "clarke"))
    out = []
    for r in rows:
        f, size = r["framework"], r["size"]
        s = f"- lasso_sparse {size}, {f}: support {r.get('support')}"
        if isinstance(r.get("objective"), (int, float)):
            s += f", objective {r['objective']:.12g}"
        if f == "clarke":
            gap = r.get("gap")
            rel = r.get("gap_relative")
            if rel is None and isinstance(gap, (int, float)) and scale.get(size):
                rel = gap / scale[size]
        else:
            gap, rel = r.get("gap_abs"), r.get("gap")
        if isinstance(gap, (int, float)):
            s += f", duality gap {gap:.1e}" + (f" ({rel:.1e} of ||y_c||^2 / n_train)" if rel is not None else "")
        if isinstance(r.get("val_mse"), (int, float)):
            s += f", validation MSE {r['val_mse']:.10g}"
        if f == "clarke":
            if isinstance(r.get("hypergradient"), (int, float)):
                s += f", dC/dlog lambda {r['hypergradient']:.8g}"
            s += f"; peak memory {fmt_mb(r.get('peak_memory_bytes'))} (the whole run: reading, fit, hypergradient)"
        else:
            s += (f"; peak memory {fmt_mb(r.get('peak_memory_bytes'))} during the fit "
                  f"(+{fmt_mb(r.get('fit_memory_increase_bytes'))} over it; {fmt_mb(r.get('load_peak_memory_bytes'))} "
                  f"reading the file; interpreter included)")
        out.append(s)
    return out


def machine_line(threads):
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or cpu
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return f"machine: {cpu}, {os.cpu_count()} cores, {date}; {threads} threads for every framework"


def table(records):
    timed = [r for r in records if "median_s" in r and "error" not in r]
    clarke = [r for r in timed if r["framework"] == "clarke"]
    others = [r for r in timed if r["framework"] != "clarke"]
    frameworks = []
    for r in others:
        if r["framework"] not in frameworks:
            frameworks.append(r["framework"])
    peer_at = {(r["problem"], r["mode"], r["size"], r["framework"]): r["median_s"] for r in others}
    rows = [(r["problem"], r["mode"], r["size"], r) for r in clarke]
    seen = {(p, m, s) for p, m, s, _ in rows}
    seen |= {(p, PEER_MODE.get((p, m), m), s) for p, m, s, _ in rows}
    for r in others:
        key = (r["problem"], r["mode"], r["size"])
        if key not in seen:
            seen.add(key)
            rows.append((*key, None))
    order = {g: i for i, g in enumerate(GROUPS)}
    lasso = ["lambda_max/10", "lambda_max/20", "support ~20", "support ~37"]

    def key(row):
        problem, mode, size, _ = row
        if problem == "lasso":
            return (order[problem], (lasso.index(size) if size in lasso else 99,), mode)
        if problem == "lasso_sparse":
            return (order[problem], sparse_key(size), mode != "fit+hypergradient")
        return (order.get(problem, 99), tuple(int(x) for x in re.findall(r"\d+", size)), mode)

    rows.sort(key=key)
    head = ["work", "clarke"] + frameworks + ["best peer", "best peer / clarke"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for problem, mode, size, rec in rows:
        pmode = PEER_MODE.get((problem, mode), mode)
        cells = [peer_at.get((problem, pmode, size, f)) for f in frameworks]
        present = [(t, f) for t, f in zip(cells, frameworks) if t is not None]
        best = min(present) if present else None
        c = rec["median_s"] if rec else None
        ratio = f"{best[0] / c:.2f}x" if best and c else "-"
        label = f"{problem} {mode} {size}".strip()
        lines.append("| " + " | ".join([label, fmt_time(c)] + [fmt_time(t) for t in cells]
                                       + [f"{best[1]} {fmt_time(best[0])}" if best else "-", ratio]) + " |")
    return "\n".join(lines)


def accuracy(records):
    out = []
    order = {g: i for i, g in enumerate(GROUPS)}
    records = sorted(records, key=lambda r: (order.get(r.get("problem"), 99), r.get("framework") != "clarke"))
    g = lambda x, k: x.get(k) if isinstance(x, dict) else None  # noqa: E731
    for r in records:
        if "error" in r:
            out.append(f"- {r['problem']} / {r['framework']}: did not run: {r['error']}")
    for r in records:
        p, f = r.get("problem"), r.get("framework")
        if p == "conic_qp" and r.get("mode") == "accuracy":
            k = r["kkt"]
            s = (f"- conic_qp batch {r['size']}, {f}: worst KKT residuals (NNLS dual certificate) primal "
                 f"{k['primal']:.1e}, dual {k['dual']:.1e}, gap {k['gap']:.1e}, complementarity {k['complementarity']:.1e}")
            if "max_abs_x_vs_clarke" in r:
                s += (f"; max |x - x_clarke| {r['max_abs_x_vs_clarke']:.1e}, "
                      f"max |dL/dq - clarke's| {r['max_abs_grad_vs_clarke']:.1e}")
            out.append(s)
        elif p == "qp_layer" and r.get("mode") == "accuracy":
            k = r["kkt"]
            s = (f"- qp_layer {r['size']}, {f}: worst KKT residuals (best certificate) stationarity "
                 f"{k['stationarity']:.1e}, primal {k['primal']:.1e}, complementarity {k['complementarity']:.1e}")
            if isinstance(r.get("kkt_clarke_definition"), (int, float)):
                s += f" (clarke's own measure: {r['kkt_clarke_definition']:.1e})"
            if "max_abs_x_vs_clarke" in r:
                s += f"; max |x - x_clarke| {r['max_abs_x_vs_clarke']:.1e}"
                d, c = r.get("max_abs_grad_vs_clarke") or {}, r.get("max_abs_grad_clarke") or {}
                if d:
                    s += "; max |grad - clarke's| (max |clarke's|): " + ", ".join(
                        f"{a} {d[a]:.1e} ({c.get(a, 0.0):.1e})" for a in ("Q", "p", "A", "b", "G", "l", "u") if a in d)
            out.append(s)
        elif p == "deq_step" and "vs_clarke_max_rel_diff" in r:
            out.append(f"- deq_step {r['mode']} {r['size']}, {f}: loss and gradient norms vs clarke's, "
                       f"max relative difference {r['vs_clarke_max_rel_diff']:.1e}")
        elif p == "deq_digits" and "test_accuracy" in r:
            out.append(f"- deq_digits {r['mode']}, {f}: test accuracy {100 * r['test_accuracy']:.1f}%, final "
                       f"train loss {r['final_train_loss']:.4f}, mean iterations forward "
                       f"{r['mean_forward_iters']:.1f} / adjoint {r['mean_adjoint_iters']:.1f}")
        elif p == "lasso" and r.get("mode") == "grid" and "best_val_loss" in r:
            out.append(f"- lasso grid ({r['size']} points), {f}: best lambda = lambda_max x "
                       f"{r['best_lambda_frac']:.4g}, validation MSE {r['best_val_loss']:.8g}")
        elif p == "lasso" and r.get("mode") == "fit+hypergradient":
            s = f"- lasso at {r['size']}, {f}: lambda {r['lambda']:.6g}, support {r.get('support')}"
            if g(r, "hypergradient_tol1e-12") is not None:
                s += f", dC/dlog lambda (fit to tol 1e-12) {r['hypergradient_tol1e-12']:.10g}"
            out.append(s)
    out += sparse_accuracy(records)
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes and short criterion runs, for testing")
    ap.add_argument("--only", nargs="+", choices=GROUPS, default=None, help="run only these groups")
    ap.add_argument("--threads", type=int, default=2, help="threads for every framework (default 2)")
    ap.add_argument("--python", default=os.environ.get("PYTHON", "python3"),
                    help="interpreter with the peer packages (default $PYTHON, else python3)")
    ap.add_argument("--skip-clarke", action="store_true", help="peers only (on data already written)")
    ap.add_argument("--skip-peers", action="store_true", help="clarke only")
    args = ap.parse_args()
    groups = args.only or GROUPS
    target = os.path.abspath(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")))
    out_dir = os.path.join(target, "peers")
    data_dir = os.path.join(out_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    records = []
    peer_groups = list(groups)

    if not args.skip_clarke:
        crit = [g for g in groups if g in FILTERS]
        if crit:
            records += clarke_criterion(crit, args.quick, args.threads, target, data_dir, out_dir)
        examples = [g for g in ("deq_digits", "lasso", "lasso_sparse") if g in groups]
        written = 0
        built = bool(examples) and build_examples(args.threads, out_dir)
        if examples and not built:
            log(f"  the examples did not build; see {os.path.join(out_dir, 'clarke-build.log')}")
        if built and "deq_digits" in groups:
            records += clarke_deq_digits(target, args.quick, args.threads, data_dir, out_dir)
        if built and "lasso" in groups:
            records += clarke_lasso(target, args.quick, args.threads, data_dir, out_dir)
        if built and "lasso_sparse" in groups:
            recs, written = clarke_lasso_sparse(target, args.quick, args.threads, data_dir, out_dir)
            records += recs
        if "lasso_sparse" in groups and (not built or not written):
            # Without clarke's files the peers would fit a draw of their own: not a comparison.
            msg = "no svmlight file from lasso_hyperopt --sparse-synthetic; the sparse Lasso peers are skipped"
            log("  lasso_sparse: " + msg)
            records.append({"problem": "lasso_sparse", "framework": "peers", "error": msg})
            peer_groups.remove("lasso_sparse")
    if not args.skip_peers:
        for g in peer_groups:
            records += peers(g, args.python, args.quick, args.threads, data_dir, out_dir)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    raw = os.path.join(out_dir, f"results-{stamp}.jsonl")
    machine = machine_line(args.threads)
    with open(raw, "w") as f:
        f.write(json.dumps({"machine": machine, "quick": args.quick, "groups": groups}) + "\n")
        for r in records:
            f.write(json.dumps(r) + "\n")

    print(f"## clarke and its peers{' (--quick: tiny sizes, short runs)' if args.quick else ''}\n")
    print(table(records))
    print("\nMedian wall time per call (criterion's median for clarke's benches; the examples and the "
          "Lasso rows are single runs on clarke's side). Ratio above 1: clarke is faster.")
    if any(r.get("problem") == "lasso_sparse" for r in records):
        print("The sparse Lasso rows set clarke's fit + hypergradient, and its fit alone, against the peers' "
              "fit alone (they have no hypergradient).")
    print()
    acc = accuracy(records)
    if acc:
        print("### Accuracy and agreement\n")
        print(acc + "\n")
    print(machine)
    print(f"raw measurements: {os.path.relpath(raw, ROOT)}")
    if not any("median_s" in r for r in records):
        log("nothing was measured; see the messages above")
        sys.exit(1)


if __name__ == "__main__":
    main()
