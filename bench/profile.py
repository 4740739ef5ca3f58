"""Where a serving call and a training step spend their time: the TensorFlow profiler's op times, as JSON.

    python -m bench.profile --data_dir data/ml100k --run_dir runs/ml100k_dnr_b --output bench/results/profile.json

Issue 17 asks to profile before changing anything. Cases: `serving`, the run's reranker behind
`dnr_tf.export.serving_fns` (`predict_lists`) on 256 test lists; and the training steps `direct`,
`heuristic` and `model_based` of `bench.train_cost` (batch 128). `--cases` picks some, and
`--serving_batch` sets the serving case's batch. (The profiler's op statistics do not see inside an
XLA cluster, so the `--jit_compile` export cannot be profiled this way: its ops show as none.) Each
case is warmed up, then `--calls` calls run under `tf.profiler.experimental`, and the trace is read
with the profiler's own `framework_op_stats` tool. Reported per case: milliseconds a call (timed
without the profiler), the self time of every op a call, summed by op type and by the model scope it
ran in (the first two name scopes under the call, e.g. `reranker_1/block_0_1` or
`gradient_tape/reranker_1`), and the share of the two cores the ops kept busy (self time a call / (2
x wall time)).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import tempfile
import time

from bench import require_at_least_one, require_paths, write_json

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads (dnr_tf.quiet)
from dnr_tf import quiet  # noqa: E402

quiet.import_tensorflow_silently()  # before the import below: its start-up lines (dnr_tf.quiet)

import tensorflow as tf  # noqa: E402

TRAIN_CASES = ("direct", "heuristic", "model_based")


def _op_stats(logdir: str) -> list[dict]:
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as plugin

    paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    data, ok = plugin.xspace_to_tools_data(paths, "framework_op_stats", {})
    if not ok:
        raise RuntimeError(f"the profiler could not read its trace in {logdir}")
    table = json.loads(data)[0]
    cols = [c["id"] for c in table["cols"]]
    rows = [{cols[i]: (c or {}).get("v") for i, c in enumerate(r["c"])} for r in table["rows"]]
    return [r for r in rows if r["type"] != "IDLE"]


def _scope(name: str) -> str:
    parts = name.split("/")
    if parts[0].startswith("StatefulPartitionedCall") and len(parts) > 1:
        parts = parts[1:]
    return "/".join(parts[:2]) if len(parts) > 2 else "(top level)"


def profile(call, calls: int, top: int = 15) -> dict:
    """Times `call` (already warm), then profiles `calls` calls; the breakdown described above."""
    start = time.perf_counter()
    for _ in range(calls):
        call()
    wall_ms = 1e3 * (time.perf_counter() - start) / calls
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(calls):
            call()
        tf.profiler.experimental.stop()
        rows = _op_stats(logdir)
    busy = sum(r["total_self_time"] for r in rows) / calls / 1e3  # ms a call
    by_type, by_scope = collections.Counter(), collections.Counter()
    for r in rows:
        by_type[r["type"]] += r["total_self_time"] / calls / 1e3
        by_scope[_scope(r["operation"])] += r["total_self_time"] / calls / 1e3
    return {
        "ms_per_call": wall_ms,
        "busy_ms_per_call": busy,
        "busy_share_of_cores": busy / (wall_ms * (os.cpu_count() or 1)),
        "by_op_type_ms": dict(by_type.most_common(top)),
        "by_scope_ms": dict(by_scope.most_common(top)),
    }


def serving_case(data_dir: str, run_dir: str, batch: int = 256):
    import numpy as np

    from bench.serving import _records
    from dnr_tf import schema as S
    from dnr_tf.export import serving_fns
    from dnr_tf.runs import load_trained

    model, cfg, schema = load_trained(run_dir)
    predict_lists, _ = serving_fns(model.reranker, schema.list_size, cfg.train.k)
    spec = {
        S.ITEM_IDS: tf.io.RaggedFeature(tf.int64),
        S.RETRIEVER_SCORES: tf.io.RaggedFeature(tf.float32),
        S.HISTORY: tf.io.RaggedFeature(tf.int64),
    }
    parsed = tf.io.parse_example(tf.constant(_records(data_dir, batch)), spec)
    args = [parsed[k].to_tensor() for k in (S.ITEM_IDS, S.RETRIEVER_SCORES, S.HISTORY)]
    args.append(tf.constant(np.zeros(batch, np.int64)))

    def call():
        predict_lists(*args)["scores"].numpy()

    return call


def train_case(data_dir: str, name: str):
    from bench.train_cost import build_cases

    case = build_cases(data_dir, [name], n_batches=20)[name]
    model, iterator = case["model"], case["iterator"]

    def call():
        float(model.train_function(iterator)["loss"])

    return call


def main(argv=None) -> int:
    quiet.configure(quiet.verbose_flag(argv))  # only the benchmark's own output
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--verbose", action="store_true", help="TensorFlow's and Beam's own log lines too")
    parser.add_argument("--data_dir", required=True, help="data/ml100k (make ml100k)")
    parser.add_argument("--run_dir", required=True, help="a finished run of that data, for the serving case")
    parser.add_argument("--calls", type=int, default=30, help="profiled calls a case")
    parser.add_argument("--cases", default=",".join(("serving", *TRAIN_CASES)), help="comma-separated cases")
    parser.add_argument("--serving_batch", type=int, default=256, help="lists a serving call")
    parser.add_argument("--output", default="bench/results/profile.json")
    args = parser.parse_args(argv)
    require_paths(parser, ((os.path.join(args.data_dir, "schema.json"), "--data_dir"), (args.run_dir, "--run_dir")))
    require_at_least_one(parser, args, "calls", "serving_batch")
    from bench.train_cost import machine

    result = {"machine": machine(), "calls": args.calls, "cases": {}}
    wanted = args.cases.split(",")
    if unknown := sorted(set(wanted) - {"serving", *TRAIN_CASES}):
        parser.error(f"--cases: unknown {', '.join(unknown)} (known: serving, {', '.join(TRAIN_CASES)})")
    cases = {"serving": lambda: serving_case(args.data_dir, args.run_dir, args.serving_batch)}
    cases.update({name: (lambda name=name: train_case(args.data_dir, name)) for name in TRAIN_CASES})
    result["serving_batch"] = args.serving_batch
    for name, make in ((name, cases[name]) for name in wanted):
        call = make()
        for _ in range(10):  # tracing and warm-up
            call()
        result["cases"][name] = row = profile(call, args.calls)
        print(
            f"{name:12s} {row['ms_per_call']:6.1f} ms a call, ops busy {row['busy_ms_per_call']:5.1f} ms "
            f"({100 * row['busy_share_of_cores']:.0f}% of the cores); top op types: "
            + ", ".join(f"{k} {v:.1f}" for k, v in list(row["by_op_type_ms"].items())[:4]),
            flush=True,
        )
    write_json(args.output, result)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
