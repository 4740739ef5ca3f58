"""A bfloat16 export against the float32 one, from the same run: score differences, test metrics, speed, as JSON.

    python -m bench.bf16_export --data_dir data/ml100k --run_dir runs/ml100k_dnr_b \
        --output bench/results/bf16_export.json

Issue 17's likely road to faster serving: the reranker built under Keras' `bfloat16` dtype policy
(weights held and layers computed in bfloat16; inputs and answers float32), exported with the same
signatures. It is an option only if its scores stay within 1e-2 of the float32 export's and its
test NDCG@6 within 0.002, and if it is faster. This script builds both exports of one run into a
temporary folder and measures, in one process: the largest, mean and 99th-percentile absolute
difference of `scores` over the test split; `dnr_tf.evaluate`'s test metrics of each; and
`serving_default` throughput at batch 256 and one-request latency, the two exports alternating over
`--rounds` rounds (the median and range are reported). `dnr_tf.export` has no bfloat16 option: see
docs/performance.md for why.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from bench import require_at_least_one, require_paths, write_json

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads (dnr_tf.quiet)
from dnr_tf import quiet  # noqa: E402

quiet.import_tensorflow_silently()  # before the import below: its start-up lines (dnr_tf.quiet)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def export(run_dir: str, out: str, policy: str) -> str:
    import types

    from dnr_tf.export import export_model
    from dnr_tf.runs import load_trained

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        model, cfg, schema = load_trained(run_dir)
    finally:
        keras.config.set_dtype_policy(previous)
    reranker = model.reranker if policy == "float32" else Float32Logits(model.reranker)
    # export_model reads only `.reranker` of the model it is given.
    return export_model(types.SimpleNamespace(reranker=reranker), out, cfg.train.k, schema.list_size, version=1)


class Float32Logits(keras.layers.Layer):
    """The reranker, answering float32 logits as the float32 export's signatures do."""

    def __init__(self, inner, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.inner = inner
        self.built = True  # `inner` is

    def call(self, features, training=False):
        return keras.ops.cast(self.inner(features, training=training), "float32")


def main(argv=None) -> int:
    quiet.configure(quiet.verbose_flag(argv))  # only the benchmark's own output
    parser = argparse.ArgumentParser(prog="python -m bench.bf16_export", description=__doc__.split("\n")[0])
    parser.add_argument("--verbose", action="store_true", help="TensorFlow's and Beam's own log lines too")
    parser.add_argument("--data_dir", required=True, help="data/ml100k (make ml100k)")
    parser.add_argument("--run_dir", required=True, help="a finished run of that data")
    parser.add_argument("--rounds", type=int, default=10, help="alternating timing rounds")
    parser.add_argument("--output", default="bench/results/bf16_export.json")
    args = parser.parse_args(argv)
    require_paths(parser, ((os.path.join(args.data_dir, "schema.json"), "--data_dir"), (args.run_dir, "--run_dir")))
    require_at_least_one(parser, args, "rounds")
    from bench.train_cost import machine
    from dnr_tf.evaluate import evaluate
    from dnr_tf.export import read_examples

    test = read_examples(args.data_dir, "test", n=-1)  # the whole split
    result = {"machine": machine(), "run_dir": os.path.abspath(args.run_dir), "test_lists": len(test)}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {p: export(args.run_dir, os.path.join(tmp, p), p) for p in ("float32", "bfloat16")}
        fns = {p: tf.saved_model.load(path).signatures["serving_default"] for p, path in paths.items()}
        scores = {p: fn(examples=tf.constant(test))["scores"].numpy() for p, fn in fns.items()}
        diff = np.abs(scores["float32"] - scores["bfloat16"])
        result["score_abs_diff"] = {
            "max": float(diff.max()),
            "mean": float(diff.mean()),
            "p99": float(np.quantile(diff, 0.99)),
        }
        result["test_metrics"] = {p: evaluate(path, args.data_dir)["metrics"]["model"] for p, path in paths.items()}
        batch, one = tf.constant((test * 2)[:256]), tf.constant(test[:1])
        speed = {p: {"lists_per_s": [], "latency_s": []} for p in fns}
        for fn in fns.values():
            for _ in range(20):
                fn(examples=batch)["scores"].numpy()
        for r in range(args.rounds):
            for p in list(fns) if r % 2 == 0 else list(fns)[::-1]:
                start, n = time.perf_counter(), 0
                while time.perf_counter() - start < 0.5:
                    fns[p](examples=batch)["scores"].numpy()
                    n += 1
                speed[p]["lists_per_s"].append(256 * n / (time.perf_counter() - start))
                for _ in range(100):
                    start = time.perf_counter()
                    fns[p](examples=one)["scores"].numpy()
                    speed[p]["latency_s"].append(time.perf_counter() - start)
    result["speed"] = {
        p: {
            "batch256_lists_per_s_median": float(np.median(s["lists_per_s"])),
            "batch256_lists_per_s_range": [float(min(s["lists_per_s"])), float(max(s["lists_per_s"]))],
            "one_request_p50_ms": 1e3 * float(np.median(s["latency_s"])),
            "one_request_p99_ms": 1e3 * float(np.quantile(s["latency_s"], 0.99)),
        }
        for p, s in speed.items()
    }
    write_json(args.output, result)
    d, m = result["score_abs_diff"], result["test_metrics"]
    print(f"scores: bfloat16 - float32: max |diff| {d['max']:.4f}, p99 {d['p99']:.4f}, mean {d['mean']:.5f}")
    print(f"test ndcg@6: float32 {m['float32']['ndcg@6']:.4f}, bfloat16 {m['bfloat16']['ndcg@6']:.4f}")
    for p, s in result["speed"].items():
        print(
            f"{p:9s} batch 256: {s['batch256_lists_per_s_median']:7.0f} lists/s; one request p50 "
            f"{s['one_request_p50_ms']:.3f} ms, p99 {s['one_request_p99_ms']:.3f} ms"
        )
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
