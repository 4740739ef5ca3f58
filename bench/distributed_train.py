"""Distributed training benchmark: seconds per epoch under each `--strategy`, and how far each run's
losses are from the one-process run's, as JSON.

    python -m bench.distributed_train --data_dir data/synthetic --output bench/results/distributed_train.json

Runs `python -m dnr_tf.train` with the smoke config (dropout 0, `--epochs` epochs; the model-based
sampler from epoch 2) three ways: one process, `--strategy mirrored --cpu_replicas 2`, and
`--strategy multi_worker` with two local worker processes (`dnr_tf.distribute.local_cluster`).
Each run's seconds per epoch come from its `metrics.json` (training and validation, timed by the
run itself); the first epoch includes tracing. On a machine without GPUs every replica shares the
same cores, so this measures the cost of distribution, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import numpy as np

from bench import require_at_least_one, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSSES = ("loss", "l_direct", "l_z", "l_adv", "l_x", "val_loss")


def _train(data_dir: str, model_dir: str, epochs: int, extra: list[str], tf_configs: list[str], log: str) -> dict:
    args = [
        sys.executable,
        "-m",
        "dnr_tf.train",
        "--config",
        os.path.join(ROOT, "configs", "smoke.yaml"),
        "--data_dir",
        data_dir,
        "--model_dir",
        model_dir,
        "--set",
        "model.dropout=0",
        "--set",
        f"train.epochs={epochs}",
        *extra,
    ]
    base = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    procs = []
    for i, tf_config in enumerate(tf_configs or [None]):
        env = {**base, "TF_CPP_MIN_LOG_LEVEL": "2", **({"TF_CONFIG": tf_config} if tf_config else {})}
        out = open(f"{log}.{i}", "w")
        procs.append((subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=out), out))
    codes = []
    for proc, out in procs:
        codes.append(proc.wait())
        out.close()
    if any(codes):
        raise RuntimeError(f"training failed (exit {codes}); see {log}.*")
    with open(os.path.join(model_dir, "metrics.json")) as f:
        return json.load(f)


def main(argv=None) -> int:
    from dnr_tf import quiet

    quiet.configure(quiet.verbose_flag(argv))  # only the benchmark's own output
    parser = argparse.ArgumentParser(prog="python -m bench.distributed_train", description=__doc__.split("\n")[0])
    parser.add_argument("--verbose", action="store_true", help="TensorFlow's and Beam's own log lines too")
    parser.add_argument("--data_dir", default="data/synthetic", help="a pipeline output (`make demo` builds this one)")
    parser.add_argument("--output", default="bench/results/distributed_train.json")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--work_dir", help="where the runs are written (default: a temporary folder)")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.data_dir, "schema.json")):
        parser.error(f"{args.data_dir}/schema.json not found: pass --data_dir, a `python -m pipeline.run` output")
    require_at_least_one(parser, args, "epochs")
    from dnr_tf.distribute import local_cluster

    work = args.work_dir or tempfile.mkdtemp(prefix="bench_distributed_")
    cases = [
        ("default", [], []),
        ("mirrored, 2 CPU replicas", ["--strategy", "mirrored", "--cpu_replicas", "2"], []),
        ("multi_worker, 2 local workers", ["--strategy", "multi_worker"], local_cluster(2)),
    ]
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "data_dir": os.path.abspath(args.data_dir),
        "epochs": args.epochs,
        "runs": [],
    }
    reference = None
    for i, (name, extra, tf_configs) in enumerate(cases):
        print(f"{name} ...", flush=True)
        metrics = _train(args.data_dir, os.path.join(work, f"run{i}"), args.epochs, extra, tf_configs, f"{work}/{i}")
        reference = reference or metrics
        drift = max(
            float(np.max(np.abs(np.array(metrics["history"][k]) - np.array(reference["history"][k])))) for k in LOSSES
        )
        row = {
            "strategy": name,
            "replicas": metrics["strategy"]["replicas"],
            "seconds_per_epoch": metrics["seconds_per_epoch"],
            "median_seconds_per_epoch": statistics.median(metrics["seconds_per_epoch"]),
            "steps": metrics["steps"],
            "max_loss_difference_to_one_process": drift,
            "test_ndcg@6": metrics["test"]["ndcg@6"],
        }
        result["runs"].append(row)
        print(
            f"  {row['median_seconds_per_epoch']:.1f} s an epoch; losses within {drift:.1e} of one process", flush=True
        )
    write_json(args.output, result)
    print(f"written to {args.output} (runs and logs in {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
