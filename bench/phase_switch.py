"""The switch to the model-based sampler (issue 17, target 5): each epoch's seconds, side by side.

    git worktree add /tmp/base REV   # the previous code
    python -m bench.phase_switch --data_dir data/ml100k --baseline /tmp/base --repeats 3 \
        --output bench/results/phase_switch.json

Trains `--config` (default `configs/ml100k_dnr_b.yaml`: heuristic for 3 epochs, then model-based)
with `python -m dnr_tf.train`, in a subprocess, `--repeats` times; with `--baseline` (a checkout of
the previous code) each time just after the same command in that checkout. From each run's
`metrics.json` (`seconds_per_epoch`, which includes the epoch's validation):
- `first_epoch_s`, `switch_epoch_s`: the first epoch (the first trace) and the first model-based one;
- `heuristic_epoch_s`, `model_based_epoch_s`: the median of the other epochs of each phase;
- `switch_extra_s`: what the switch's epoch costs over the other model-based epochs, and
  `first_extra_s` the same for the first epoch;
- `train_s` (`train_seconds`: `fit`, from its start to its return), `outside_epochs_s` (what of it
  no epoch counts: the end of `fit`, where tf.data's autotuning thread could hold an iterator's
  destruction for about 20 s, `dnr_tf.data._without_autotune_model`) and `wall_s` (the command's,
  start-up included).
With `--baseline`, each row also has the baseline's figures, the speed-ups of `train_s` and `wall_s`,
and `same_run`: whether the two runs' every-epoch history, final metrics and best weights are the
same bits. `summary` has the min, median and max of every figure over the repeats. The FP32 and bf16
matmul peaks (`bench.peak`) are measured before and after: compare figures within one file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench import require_at_least_one, require_paths, spread, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "ml100k_dnr_b.yaml")
FIGURES = (
    "first_epoch_s",
    "switch_epoch_s",
    "heuristic_epoch_s",
    "model_based_epoch_s",
    "first_extra_s",
    "switch_extra_s",
    "outside_epochs_s",
    "train_s",
    "wall_s",
)


def _median(values):
    return statistics.median(values) if values else None


def epoch_figures(seconds: list[float], phases: list[float]) -> dict:
    """The per-epoch figures of one run: `seconds` (each epoch's) and `phases` (its `sampler_phase`,
    0 heuristic, 1 model-based), both in epoch order. A run with no model-based epoch, or no first
    heuristic one, has None for the figures it lacks."""
    if len(seconds) != len(phases) or not seconds:
        raise ValueError(f"{len(seconds)} epoch times for {len(phases)} epoch phases")
    switch = next((i for i, p in enumerate(phases) if p >= 1), None)
    heuristic = [s for i, (s, p) in enumerate(zip(seconds, phases)) if p < 1 and i > 0]
    model_based = [s for i, (s, p) in enumerate(zip(seconds, phases)) if p >= 1 and i not in (0, switch)]
    first_phase = heuristic if phases[0] < 1 else model_based
    steady_first, steady_model = _median(first_phase), _median(model_based)
    switch_s = seconds[switch] if switch not in (None, 0) else None
    return {
        "first_epoch_s": seconds[0],
        "switch_epoch_s": switch_s,
        "heuristic_epoch_s": _median(heuristic),
        "model_based_epoch_s": steady_model,
        "first_extra_s": None if steady_first is None else seconds[0] - steady_first,
        "switch_extra_s": None if switch_s is None or steady_model is None else switch_s - steady_model,
    }


def run_fingerprint(model_dir: str) -> str:
    """A hash of what a run computed: its history and final metrics (timings left out) and the bytes
    of every array of its best weights."""
    import h5py
    import numpy as np

    with open(os.path.join(model_dir, "metrics.json")) as f:
        metrics = json.load(f)
    kept = {key: metrics[key] for key in ("history", "valid", "test", "best_epoch", "steps") if key in metrics}
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True).encode())
    with h5py.File(os.path.join(model_dir, "best.weights.h5")) as f:
        names = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        for name in sorted(names):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(f[name][()]).tobytes())
    return digest.hexdigest()


def run_training(tree: str, config: str, data_dir: str, model_dir: str, sets: list[str], log_path: str) -> dict:
    """`python -m dnr_tf.train` in `tree` (a checkout); its figures, wall time and fingerprint."""
    args = [sys.executable, "-m", "dnr_tf.train", "--config", config, "--data_dir", data_dir]
    args += ["--model_dir", model_dir, *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(log_path, "w") as log:
        start = time.perf_counter()
        done = subprocess.run(args, cwd=tree, env=env, stdout=log, stderr=log, check=False)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"dnr_tf.train in {tree} failed (exit {done.returncode}); log {log_path}:\n{tail}")
    with open(os.path.join(model_dir, "metrics.json")) as f:
        metrics = json.load(f)
    row = epoch_figures(metrics["seconds_per_epoch"], metrics["history"]["sampler_phase"])
    row.update(train_s=metrics["train_seconds"], wall_s=wall, fingerprint=run_fingerprint(model_dir))
    row["outside_epochs_s"] = metrics["train_seconds"] - sum(metrics["seconds_per_epoch"])
    return row


def summarize(rows: list[dict]) -> dict:
    """min / median / max over the repeats of every figure (and the baseline's, and the speed-ups)."""
    out = {}
    for key in FIGURES:
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            out[key] = spread(values)
        base = [r["baseline"][key] for r in rows if "baseline" in r and r["baseline"].get(key) is not None]
        if base:
            out[f"baseline_{key}"] = spread(base)
    for key in ("train_speedup", "wall_speedup"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = spread(values)
    if rows and "same_run" in rows[0]:
        out["same_run"] = all(r["same_run"] for r in rows)
    return out


def main(argv=None) -> int:
    from dnr_tf import quiet

    quiet.configure(quiet.verbose_flag(argv))  # only the benchmark's own output
    parser = argparse.ArgumentParser(prog="python -m bench.phase_switch", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="TensorFlow's own log lines too")
    parser.add_argument("--data_dir", default=os.path.join(ROOT, "data", "ml100k"), help="the pipeline's output")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="a training config with a model-based phase")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE, passed to both trainings")
    parser.add_argument("--baseline", help="a checkout of the previous code (git worktree add DIR REV)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each code")
    parser.add_argument("--work_dir", help="where the runs are written (default: a temporary folder)")
    parser.add_argument("--output", default=os.path.join(ROOT, "bench", "results", "phase_switch.json"))
    args = parser.parse_args(argv)
    require_at_least_one(parser, args, "repeats")
    require_paths(parser, [(args.config, "--config"), (os.path.join(args.data_dir, "schema.json"), "--data_dir")])
    if args.baseline and not os.path.isfile(os.path.join(args.baseline, "dnr_tf", "train.py")):
        parser.error(f"--baseline: {args.baseline} is not a checkout of this project (no dnr_tf/train.py)")
    config, data_dir = os.path.abspath(args.config), os.path.abspath(args.data_dir)

    from bench.peak import measure
    from bench.train_cost import machine

    work = args.work_dir or tempfile.mkdtemp(prefix="bench_phase_switch_")
    os.makedirs(work, exist_ok=True)
    result = {
        "machine": machine(),  # with the CPU's model: runs on other CPUs can differ in their bits
        "config": config,
        "sets": args.set,
        "baseline": os.path.abspath(args.baseline) if args.baseline else None,
        "runs": [],
    }
    result["machine"]["peak_before"] = measure()
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1}/{args.repeats} ...", flush=True)
        base = None
        if args.baseline:
            tag = f"baseline-{repeat}"
            base = run_training(
                args.baseline, config, data_dir, os.path.join(work, tag), args.set, os.path.join(work, f"{tag}.log")
            )
            print(f"  baseline: {_line(base)}", flush=True)
        tag = f"current-{repeat}"
        row = run_training(ROOT, config, data_dir, os.path.join(work, tag), args.set, os.path.join(work, f"{tag}.log"))
        row["repeat"] = repeat
        if base is not None:
            row["baseline"] = base
            row["train_speedup"] = base["train_s"] / row["train_s"]
            row["wall_speedup"] = base["wall_s"] / row["wall_s"]
            row["same_run"] = base["fingerprint"] == row["fingerprint"]
        print(f"  current:  {_line(row)}" + (f", same run: {row['same_run']}" if base else ""), flush=True)
        result["runs"].append(row)
    result["machine"]["peak_after"] = measure()
    result["summary"] = summarize(result["runs"])
    write_json(args.output, result)
    print(f"written to {args.output} (runs in {work})")
    return 0


def _line(row: dict) -> str:
    def fmt(key, sign=""):
        value = row.get(key)
        return "-" if value is None else f"{value:{sign}.2f}"

    return (
        f"first epoch {fmt('first_epoch_s')} s ({fmt('first_extra_s', '+')}), switch epoch "
        f"{fmt('switch_epoch_s')} s ({fmt('switch_extra_s', '+')}), train {fmt('train_s')} s "
        f"({fmt('outside_epochs_s')} s outside the epochs), wall {fmt('wall_s')} s"
    )


if __name__ == "__main__":
    sys.exit(main())
