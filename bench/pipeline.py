"""Beam pipeline benchmark: wall time, peak memory and throughput, one and two local workers, as JSON.

    python -m bench.pipeline --ml100k ../shared/data/ml-100k --output bench/results/pipeline.json [--quick]

Data sets:
    ml100k   the real MovieLens-100K `u.data` (configs/pipeline/ml100k.yaml);
    ml1m     a synthetic data set of MovieLens-1M size, written by this script in ML-1M's
             `ratings.dat` format (6,000 users, 3,700 items, 1,000,000 interactions; users and
             items with latent tastes and a popularity skew, so the retriever has something to
             learn), run with configs/pipeline/ml1m.yaml.
Workers: DirectRunner in one process (`--direct_num_workers 1`), and two worker processes
(`--direct_num_workers 2 --direct_running_mode multi_processing`).

Each run is a `python -m pipeline.run` subprocess. Peak memory is sampled from /proc every 0.2 s
as the summed resident set of the subprocess and all its descendants (the Beam workers); the peak
of the largest single process is also reported (`wait4`'s rusage), and each process's own peak
(`VmHWM`): the driver's, where the DirectRunner keeps its PCollections, and each worker's. `--quick`
runs ML-100K and a 100,000-interaction synthetic set with one worker and 3 retriever epochs, under a
minute. The machine's FP32 and bf16 matmul peaks (`bench.peak`) are measured before and after the
runs (`machine.peak_before`, `peak_after`): the same code's times follow the VM's speed from one
session to the next, so compare figures within one JSON file.

    git worktree add /tmp/base REV   # the previous code
    python -m bench.pipeline --datasets ml1m --workers 1 --baseline /tmp/base --output bench/results/pipeline_speed.json

`--baseline` runs each data set with the previous code's pipeline just before the current one, and
adds its time, the speed-up and whether the two wrote the same records (`records_fingerprint`).
`--repeats N` makes each run N times (with `--baseline`, each time just after the baseline's) and adds
`summary`: per data set and worker count, the min, median and max of the wall and stage times and of
the speed-up, since this VM's speed moves by 10-25% from one run to the next.

    python -m bench.pipeline --doubling --output bench/results/pipeline_doubling.json

`--doubling` runs the synthetic set at `--interactions` N (default 100,000; 1,000 users a 100,000)
and at 2N with twice the users and the same 1,500 items, with two worker processes and 3 retriever
epochs, and reports how each peak grew (about two minutes): what issue 9's memory test is about.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from bench import require_at_least_one, spread, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.sysconf("SC_PAGE_SIZE")


def write_ml1m_like(path: str, users: int, items: int, interactions: int, seed: int = 0) -> None:
    """A `ratings.dat` (`user::item::rating::timestamp`) of the given size, deterministic in `seed`.

    Each user gets at least 20 interactions (as in ML-1M); which items is drawn without
    replacement from softmax(taste . item + popularity) by the Gumbel top-k trick, in time order.
    """
    rng = np.random.default_rng(seed)
    dim = 8
    taste = rng.normal(size=(users, dim)).astype(np.float32)
    item_f = rng.normal(size=(items, dim)).astype(np.float32) / np.sqrt(dim)
    popularity = rng.normal(scale=1.0, size=items).astype(np.float32)
    # Interactions per user: a heavy-tailed share of the total, at least 20, at most items / 2.
    share = rng.pareto(1.5, size=users) + 1.0
    counts = np.clip(np.floor(share / share.sum() * interactions), 20, items // 2).astype(np.int64)
    while counts.sum() != interactions:
        diff = interactions - int(counts.sum())
        idx = rng.choice(users, size=min(abs(diff), users), replace=False)
        counts[idx] = np.clip(counts[idx] + np.sign(diff), 20, items // 2)
    start = rng.integers(956_703_932, 1_040_000_000, size=users)
    with open(path, "w") as f:
        for lo in range(0, users, 500):
            hi = min(lo + 500, users)
            logits = taste[lo:hi] @ item_f.T * 2.0 + popularity
            keys = logits + rng.gumbel(size=logits.shape).astype(np.float32)
            for u in range(lo, hi):
                n = int(counts[u])
                chosen = np.argpartition(-keys[u - lo], n)[:n]
                chosen = chosen[np.argsort(-keys[u - lo][chosen])]
                ratings = rng.integers(1, 6, size=n)
                times = start[u] + np.cumsum(rng.integers(1, 5000, size=n))
                rows = zip(chosen.tolist(), ratings.tolist(), times.tolist())
                f.write("".join(f"{u + 1}::{i + 1}::{r}::{t}\n" for i, r, t in rows))


def _tree_processes(root_pid: int) -> dict[int, tuple[int, int]]:
    """pid -> (start time in clock ticks, resident bytes) of `root_pid` and all its descendants."""
    parents, procs = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parents[int(name)] = int(fields[1])
            procs[int(name)] = (int(fields[19]), int(fields[21]) * PAGE)
        except (OSError, IndexError, ValueError):
            continue
    tree, stack = {}, [root_pid]
    while stack:
        pid = stack.pop()
        if pid in procs:
            tree[pid] = procs[pid]
        stack.extend(child for child, parent in parents.items() if parent == pid)
    return tree


def _tree_rss(root_pid: int) -> int:
    """Resident bytes of `root_pid` and all its descendants."""
    return sum(rss for _, rss in _tree_processes(root_pid).values())


def _peak_rss(pid: int) -> int:
    """The peak resident bytes of a live process (`VmHWM`), 0 once it has gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure_peak(work: str, name: str) -> dict:
    """The FP32 and bf16 matmul peaks (`bench.peak`, 1 s a dtype), in a process of its own."""
    path = os.path.join(work, f"peak-{name}.json")
    cmd = [sys.executable, "-m", "bench.peak", "--seconds", "1", "--output", path]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(path) as f:
        peak = json.load(f)
    print(f"machine peak ({name}): FP32 {peak['float32_gflops']:.0f} GFLOP/s", flush=True)
    return peak


def run_pipeline(args: list[str], log_path: str, tree: str = ROOT) -> dict:
    """Runs `python -m pipeline.run args` in `tree` (a checkout), sampling its process tree's memory."""
    peak = [0]
    own_peaks = {}  # pid -> (start time, peak resident bytes)
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.run", *args], cwd=tree, stdout=log, stderr=log)
        done = threading.Event()

        def sample():
            while not done.is_set():
                tree = _tree_processes(proc.pid)
                peak[0] = max(peak[0], sum(rss for _, rss in tree.values()))
                for pid, (started, rss) in tree.items():
                    before = own_peaks.get(pid, (started, 0))[1]
                    own_peaks[pid] = (started, max(before, rss, _peak_rss(pid)))
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    if rc != 0:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"pipeline.run {' '.join(args)} failed (exit {rc}); log {log_path}:\n{tail}")
    workers = [own_peaks[pid] for pid in own_peaks if pid != proc.pid]
    return {
        "wall_s": wall,
        "peak_tree_rss_mb": peak[0] / 2**20,
        # ru_maxrss of the waited subprocess: its largest single process, workers included (KiB).
        "peak_largest_process_mb": usage.ru_maxrss / 1024,
        "peak_driver_mb": own_peaks.get(proc.pid, (0, 0))[1] / 2**20,
        # Each Beam stage starts its own workers: in start order, stage 1's come first. The `/bin/sh`
        # that starts each worker (under 2 MB) is left out.
        "peak_workers_mb": [rss / 2**20 for _, rss in sorted(workers) if rss > 32 * 2**20],
    }


def summarize_runs(runs: list[dict]) -> dict:
    """Per (data set, workers): min, median and max of the wall time, the stages' times, and, with a
    baseline, of its wall time and the speed-up, over the repeated runs."""
    groups: dict[str, list[dict]] = {}
    for row in runs:
        groups.setdefault(f"{row['dataset']}-w{row['workers']}", []).append(row)
    out = {}
    for key, rows in groups.items():
        values = {"wall_s": [r["wall_s"] for r in rows]}
        for stage in rows[0].get("stage_timings_s", {}):
            values[stage] = [r["stage_timings_s"][stage] for r in rows]
        if "baseline" in rows[0]:
            values["baseline_wall_s"] = [r["baseline"]["wall_s"] for r in rows]
            values["speedup"] = [r["speedup"] for r in rows]
        out[key] = {name: spread(v) for name, v in values.items()}
    return out


def doubling(work: str, interactions: int, workers: int) -> dict:
    """Peaks at N and 2N interactions (twice the users, the same items): which memory grows with the input."""
    items = 1_500
    rows = []
    for scale in (1, 2):
        n, users = interactions * scale, interactions * scale // 100
        path = os.path.join(work, f"ratings-{users}x{items}x{n}.dat")
        if not os.path.exists(path):
            write_ml1m_like(path, users, items, n)
        out = os.path.join(work, f"out-doubling-{n}")
        extra = ["--direct_num_workers", str(workers), "--set", "retriever.epochs=3"]
        if workers > 1:
            extra += ["--direct_running_mode", "multi_processing"]
        print(f"{n:,} interactions, {users:,} users, {workers} worker(s) ...", flush=True)
        run_args = ["--config", "configs/pipeline/ml1m.yaml", "--input", path, "--output_dir", out, *extra]
        row = run_pipeline(run_args, os.path.join(work, f"doubling-{n}.log"))
        row.update(interactions=n, users=users, items=items, workers=workers)
        rows.append(row)
        print(
            f"  peak {row['peak_tree_rss_mb']:,.0f} MB (all processes), driver {row['peak_driver_mb']:,.0f} MB, "
            f"workers {', '.join(f'{w:,.0f}' for w in row['peak_workers_mb'])} MB",
            flush=True,
        )
    one, two = rows
    growth = {key: two[key] - one[key] for key in ("peak_tree_rss_mb", "peak_largest_process_mb", "peak_driver_mb")}
    if len(one["peak_workers_mb"]) == len(two["peak_workers_mb"]):
        growth["peak_workers_mb"] = [b - a for a, b in zip(one["peak_workers_mb"], two["peak_workers_mb"])]
    return {"runs": rows, "growth_mb": growth}


DATASETS = ("ml100k", "ml1m")


def dataset_names(text: str) -> list[str]:
    """`--datasets`' comma-separated names (`check_args` has refused unknown ones)."""
    return [n for n in text.split(",") if n]


def worker_counts(text: str) -> list[int]:
    """`--workers`' comma-separated counts (`check_args` has refused what is not a count >= 1)."""
    return [int(w) for w in text.split(",") if w.strip()]


def check_args(parser, args) -> None:
    """One line through `parser.error` for what would fail, or measure nothing, after the work began."""
    require_at_least_one(parser, args, "repeats")
    names = dataset_names(args.datasets)
    unknown = [n for n in names if n not in DATASETS]
    if unknown or not names:
        parser.error(f"--datasets: unknown {', '.join(unknown) or '(none given)'} (known: {', '.join(DATASETS)})")
    try:
        counts = worker_counts(args.workers)
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        parser.error(f"--workers: comma-separated worker counts of at least 1, not {args.workers!r}")
    if args.doubling:
        require_at_least_one(parser, args, "interactions")
    if args.baseline and not os.path.isfile(os.path.join(args.baseline, "pipeline", "run.py")):
        parser.error(f"--baseline: {args.baseline} is not a checkout of this project (no pipeline/run.py)")


def main(argv=None) -> int:
    from dnr_tf import quiet

    quiet.configure(quiet.verbose_flag(argv))  # only the benchmark's own output
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--verbose", action="store_true", help="TensorFlow's and Beam's own log lines too")
    default_ml100k = os.path.join(os.path.dirname(ROOT), "shared", "data", "ml-100k")
    parser.add_argument("--ml100k", default=default_ml100k, help="directory holding MovieLens-100K u.data")
    parser.add_argument("--output", help="default bench/results/pipeline.json, or pipeline_doubling.json")
    parser.add_argument("--work_dir", help="where data and outputs are written (default: a temporary folder)")
    parser.add_argument("--datasets", default="ml100k,ml1m", help="comma-separated: ml100k, ml1m")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--quick", action="store_true", help="a run under a minute")
    parser.add_argument("--doubling", action="store_true", help="peak memory at N and 2N interactions only")
    parser.add_argument("--interactions", type=int, default=100_000, help="N of --doubling")
    parser.add_argument(
        "--baseline",
        help="a checkout of the previous code (git worktree add DIR REV): each run is also made with its "
        "pipeline, just before, and the row gets its time, the speed-up and whether the records are the same",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each (data set, workers), in turn with --baseline's"
    )
    args = parser.parse_args(argv)
    check_args(parser, args)
    args.output = args.output or f"bench/results/pipeline{'_doubling' if args.doubling else ''}.json"
    if args.doubling:
        work = args.work_dir or tempfile.mkdtemp(prefix="bench_doubling_")
        os.makedirs(work, exist_ok=True)
        workers = max(worker_counts(args.workers))
        result = {
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "doubling": doubling(work, args.interactions, workers),
        }
        write_json(args.output, result)
        print(f"written to {args.output} (data and logs in {work})")
        return 0
    names = dataset_names(args.datasets)
    workers = worker_counts(args.workers)
    if "ml100k" in names and not os.path.exists(os.path.join(args.ml100k, "u.data")):
        parser.error(f"{args.ml100k}/u.data not found: pass --ml100k DIR")
    interactions = 100_000 if args.quick else 1_000_000
    if args.quick:
        workers = [1]
    work = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="bench_pipeline_"))
    os.makedirs(work, exist_ok=True)

    inputs = {}
    if "ml100k" in names:
        ml100k = os.path.join(os.path.abspath(args.ml100k), "u.data")  # the baseline runs in another tree
        inputs["ml100k"] = (["--config", "configs/pipeline/ml100k.yaml", "--input", ml100k], 100_000)
    if "ml1m" in names:
        users, items = (6_000, 3_700) if not args.quick else (1_000, 1_500)
        path = os.path.join(work, f"ratings-{users}x{items}x{interactions}.dat")
        if not os.path.exists(path):
            t = time.perf_counter()
            write_ml1m_like(path, users, items, interactions)
            print(f"wrote {path} in {time.perf_counter() - t:.0f} s", flush=True)
        inputs["ml1m"] = (["--config", "configs/pipeline/ml1m.yaml", "--input", path], interactions)

    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            # How fast this VM ran today: the same code's times follow it from session to session.
            "peak_before": measure_peak(work, "before"),
        },
        "quick": args.quick,
        "runs": [],
    }
    for (name, (base_args, n_interactions)), w, rep in itertools.product(inputs.items(), workers, range(args.repeats)):
        tag = f"{name}-w{w}" + (f"-r{rep}" if rep else "")  # a run's output and logs, one set per repeat
        out = os.path.join(work, f"out-{tag}")
        extra = ["--direct_num_workers", str(w)]
        if w > 1:
            extra += ["--direct_running_mode", "multi_processing"]
        if args.quick:
            extra += ["--set", "retriever.epochs=3"]
        print(f"{name}, {w} worker(s)" + (f", repeat {rep + 1}" if args.repeats > 1 else "") + " ...", flush=True)
        if args.baseline:
            base_out = out + "-baseline"
            log = os.path.join(work, f"{tag}-baseline.log")
            base = run_pipeline([*base_args, "--output_dir", base_out, *extra], log, tree=args.baseline)
        row = run_pipeline([*base_args, "--output_dir", out, *extra], os.path.join(work, f"{tag}.log"))
        with open(os.path.join(out, "stats.json")) as f:
            stats = json.load(f)
        row["stage_timings_s"] = stats.get("timings", {})
        if args.baseline:
            from dnr_tf.provenance import records_fingerprint

            with open(os.path.join(base_out, "stats.json")) as f:
                base["stage_timings_s"] = json.load(f).get("timings", {})
            row["baseline"] = base
            row["speedup"] = base["wall_s"] / row["wall_s"]
            row["same_records"] = records_fingerprint(out) == records_fingerprint(base_out)
            print(f"  baseline {base['wall_s']:.1f} s {base['stage_timings_s']}", flush=True)
        row.update(
            dataset=name,
            workers=w,
            repeat=rep,
            interactions=n_interactions,
            interactions_per_s=n_interactions / row["wall_s"],
            lists=sum(int(s.get("lists", 0)) for s in stats.get("splits", {}).values()),
        )
        result["runs"].append(row)
        print(
            f"  {row['wall_s']:.1f} s, {row['interactions_per_s']:,.0f} interactions/s, "
            f"peak {row['peak_tree_rss_mb']:,.0f} MB (all processes), {row['lists']:,} lists "
            f"{row['stage_timings_s']}" + (f", {row['speedup']:.2f}x the baseline" if args.baseline else ""),
            flush=True,
        )
    result["machine"]["peak_after"] = measure_peak(work, "after")
    if args.repeats > 1:
        result["summary"] = summarize_runs(result["runs"])
        for key, row in result["summary"].items():
            cells = [f"{name} {v['min']:.1f} / {v['median']:.1f} / {v['max']:.1f}" for name, v in row.items()]
            print(f"{key} over {args.repeats} runs (min / median / max): " + ", ".join(cells))
    write_json(args.output, result)
    print(f"written to {args.output} (data and logs in {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
