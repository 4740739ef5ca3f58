"""Serving benchmark through the loaded SavedModel (what TF Serving runs), written as JSON.

    python -m bench.serving --model saved_models/ml100k_dnr_b/1 --data_dir data/ml100k \
        [--run_dir runs/ml100k_dnr_b] [--compare_model saved_models/ml100k_dnr_b_xla/1 [--repeats 3]] \
        --output bench/results/serving.json [--quick]

Measures `predict_lists` (dense tensors) in-process: the latency of one request of 50 candidates
(p50, p99 over `--calls` calls, after warm-up) and the throughput in lists per second at several
batch sizes, and the same of `serving_default` (serialized tf.Examples, parsing included). One
request is also timed with both signatures, the parsing alone and a signature that computes
nothing (`empty_signature`: the harness's own floor) called in turn, call by call
(`single_request_interleaved_ms`: p50 to p99.9, the maximum and the calls over twice the median).
It imports nothing of dnr_tf for the measured path: the SavedModel alone is timed.

FLOPs of one list are counted from the SavedModel's weights (`flops_per_list`): 2 x the size of
every dense and attention kernel per candidate (the user-state layer once per request), plus the
attention's scores and weighted sum (2 x 2 x list size x width per candidate and block); lookups,
norms and activations are left out (they are a few per cent). It is the model's count: the exports
compute less where their tables replace products (docs/performance.md), so "achieved GFLOP/s" is a
rate of the model's work. With `--run_dir`, the same serving
function is also timed in memory (the trained model rebuilt by dnr_tf, not exported), in rounds
alternating with the export, to check that the export is not slower. With `--compare_model`
(another export of the same reranker, e.g. `dnr_tf.export --jit_compile`), both exports are timed
in alternating rounds on the same requests (`exports_side_by_side`: one-request percentiles over
the pooled rounds, throughput as the median of the rounds, and the ratio of the second to the first);
`--repeats N` runs that comparison N times and gives each ratio's min, median and max, and each
export's one-request p50 and p99 in ms (`exports_side_by_side_repeats`), since this VM's speed
moves from one run to the next.
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import time

from bench import spread, write_json

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads (dnr_tf.quiet)
from dnr_tf import quiet  # noqa: E402

quiet.import_tensorflow_silently()  # before the import below: its start-up lines (dnr_tf.quiet)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench import peak as peak_lib  # noqa: E402

# The three list fields as the export's `serving_default` parses them.
_LISTS = {
    "item_ids": tf.io.RaggedFeature(tf.int64),
    "retriever_scores": tf.io.RaggedFeature(tf.float32),
    "history": tf.io.RaggedFeature(tf.int64),
}


def request_files(data_dir: str) -> list[str]:
    """The test records of a pipeline output, the requests of the serving benchmarks."""
    return sorted(glob.glob(os.path.join(data_dir, "test-*.tfrecord.gz")))


def check_inputs(parser, model: str, data_dir: str, compare_model: str | None = None) -> None:
    """`parser.error` (one line, before any work) for a missing export or a data_dir without test records."""
    for path, flag in ((model, "--model"), (compare_model, "--compare_model")):
        if path is not None and not os.path.exists(os.path.join(path, "saved_model.pb")):
            parser.error(f"{flag}: no saved_model.pb in {path} (give saved_models/<name>/<version>)")
    if not request_files(data_dir):
        parser.error(f"--data_dir: no test-*.tfrecord.gz in {data_dir} (a pipeline output)")


def _records(data_dir: str, n: int) -> list[bytes]:
    files = request_files(data_dir)
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP").repeat().take(n)
    return [bytes(x.numpy()) for x in ds]


def _dense(records: list[bytes]) -> dict:
    spec = {**_LISTS, "user_id": tf.io.FixedLenFeature([], tf.int64)}
    parsed = tf.io.parse_example(tf.constant(records), spec)
    return {
        "item_ids": parsed["item_ids"].to_tensor(),
        "retriever_scores": parsed["retriever_scores"].to_tensor(),
        "history": parsed["history"].to_tensor(),
        "user_id": parsed["user_id"],
    }


def flops_per_list(loaded, list_size: int) -> dict:
    """Multiply-add FLOPs (x2) of one list of `list_size` candidates, from the exported weights."""
    return flops_from_weights([(v.name, v.shape) for v in loaded.variables], list_size)


def flops_from_weights(weights, list_size: int) -> dict:
    """`flops_per_list` from (name, shape) pairs: a SavedModel's `kernel:0` variables or a Keras
    reranker's `.../kernel` paths (the generator's are left out by the caller)."""
    per_candidate = per_request = 0
    attention_blocks = 0
    width = 0
    for name, shape in weights:
        name, shape = name.removesuffix(":0"), [int(d) for d in shape]
        if not name.endswith("kernel"):
            continue  # embeddings (lookups), biases, norms
        size = 2 * int(np.prod(shape))
        if "user_state" in name:
            per_request += size
            continue
        per_candidate += size
        if len(shape) == 3 and shape[0] > shape[1]:  # [width, heads, head_dim]: query, key or value
            attention_blocks += 1
            width = shape[1] * shape[2]
    blocks = attention_blocks // 3
    # QK^T and the weighted sum of values: 2 x list_size x width each, per candidate and block.
    per_candidate += blocks * 2 * 2 * list_size * width
    return {
        "list_size": list_size,
        "per_candidate": per_candidate,
        "per_request": per_request,
        "per_list": per_candidate * list_size + per_request,
        "attention_blocks": blocks,
    }


def _latencies(fn, calls: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(calls)
    for i in range(calls):
        start = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - start
    return out


def interleaved(fns: dict, calls: int, warmup: int = 50) -> dict:
    """Latency percentiles of several callers timed call by call in turn (so a slow spell of the
    machine hits each alike), with the count of calls over twice their own median (spikes)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: np.empty(calls) for name in fns}
    for i in range(calls):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name][i] = time.perf_counter() - start
    return {name: latency_row(1e3 * t) for name, t in times.items()}


def latency_row(ms: np.ndarray) -> dict:
    """p50 to p99.9 and the maximum of call times in ms, with the count of calls over twice the median."""
    row = {f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99, 99.9)}
    row["max"] = float(ms.max())
    row["over_twice_p50"] = int(np.sum(ms > 2 * row["p50"]))
    return row


def _parse_only():
    """What `serving_default` does before `predict_lists`' path: parse the examples, pad to dense."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def parse(examples):
        parsed = tf.io.parse_example(examples, _LISTS)
        return [parsed[key].to_tensor() for key in _LISTS]

    return parse


def empty_signature(k: int = 6):
    """A loaded SavedModel signature with `predict_lists`' inputs and outputs that computes nothing.

    Timed beside the export, it is the floor of one call through a loaded signature from Python
    (the inputs' conversion, the function call, the outputs): the share of one request's latency
    that no change to the model can remove in this harness.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as path:
        save_empty_signature(path, k)
        return tf.saved_model.load(path).signatures["predict_lists"]


def save_empty_signature(path: str, k: int = 6) -> None:
    """Saves at `path` the SavedModel of `empty_signature` (its `predict_lists` computes nothing)."""
    ids, scores = tf.TensorSpec([None, None], tf.int64), tf.TensorSpec([None, None], tf.float32)

    class Empty(tf.Module):
        @tf.function(input_signature=[ids, scores, ids, tf.TensorSpec([None], tf.int64)])
        def predict_lists(self, item_ids, retriever_scores, history, user_id):
            top = tf.zeros([tf.shape(item_ids)[0], k], tf.int64)
            return {"scores": retriever_scores, "top_k_item_ids": top, "top_k_indices": tf.cast(top, tf.int32)}

    module = Empty()
    tf.saved_model.save(module, path, signatures={"predict_lists": module.predict_lists})


def _rate(call, batch: int, seconds: float) -> float:
    for _ in range(5):
        call()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
        n += 1
    return batch * n / (time.perf_counter() - start)


def export_vs_memory(loaded, run_dir: str, records: list[bytes], batches: list[int], seconds: float) -> dict:
    """The exported `predict_lists` against the same function around the trained model in memory.

    Three callers alternate in rounds (5 rounds of `seconds / 5` per batch size, so that a slower
    spell of the machine hits all): the export's signature (what the other figures time; Python
    wraps its inputs and outputs on every call), the export's restored function (the same graph,
    called like the in-memory one) and the in-memory function. Medians of the rounds.
    """
    from dnr_tf.export import serving_fns
    from dnr_tf.runs import load_trained

    model, cfg, schema = load_trained(run_dir)
    memory_fn, _ = serving_fns(model.reranker, schema.list_size, cfg.train.k)
    out = {}
    for batch in batches:
        dense = _dense(records[:batch])
        callers = {
            "export_signature": loaded.signatures["predict_lists"],
            "export_function": loaded.predict_lists,
            "in_memory": memory_fn,
        }
        rates = {name: [] for name in callers}
        for _ in range(5):
            for name, fn in callers.items():
                rates[name].append(_rate(lambda fn=fn, dense=dense: fn(**dense), batch, seconds / 5))
        row = {name: float(np.median(r)) for name, r in rates.items()}
        row["export_signature_over_in_memory"] = row["export_signature"] / row["in_memory"]
        row["export_function_over_in_memory"] = row["export_function"] / row["in_memory"]
        out[str(batch)] = row
    return out


def side_by_side(loaded: dict, records: list[bytes], batches: list[int], calls: int, seconds: float) -> dict:
    """Two loaded exports (`loaded`: name -> export) in alternating rounds on the same requests (see the
    module doc); the ratios are the second's over the first's."""
    rounds = 5
    names = list(loaded)
    one, one_ex = _dense(records[:1]), tf.constant(records[:1])
    single = {}
    for sig, args in (("predict_lists", one), ("serving_default", {"examples": one_ex})):
        lat = {name: [] for name in names}
        for name in names:  # warm-up (and, for an XLA export, its compilation for this shape)
            _latencies(lambda fn=loaded[name].signatures[sig], args=args: fn(**args), 0, warmup=50)
        for _ in range(rounds):
            for name in names:
                fn = loaded[name].signatures[sig]
                lat[name].append(_latencies(lambda fn=fn, args=args: fn(**args), calls // rounds, warmup=5))
        single[sig] = {
            name: {q: 1e3 * float(np.percentile(np.concatenate(lat[name]), int(q[1:]))) for q in ("p50", "p99")}
            for name in names
        }
    throughput = {}
    for batch in batches:
        dense, ex = _dense(records[:batch]), tf.constant(records[:batch])
        row = {}
        for sig, args in (("predict_lists", dense), ("serving_default", {"examples": ex})):
            rates = {name: [] for name in names}
            for _ in range(rounds):
                for name in names:
                    fn = loaded[name].signatures[sig]
                    rates[name].append(_rate(lambda fn=fn, args=args: fn(**args), batch, seconds / rounds))
            row[sig] = {name: float(np.median(r)) for name, r in rates.items()}
            row[sig]["ranges"] = {name: [float(min(r)), float(max(r))] for name, r in rates.items()}
        throughput[str(batch)] = row
    first, second = names[0], names[1]
    ratios = {
        "throughput": {
            batch: {sig: row[sig][second] / row[sig][first] for sig in ("predict_lists", "serving_default")}
            for batch, row in throughput.items()
        },
        "single_request_p50": {sig: single[sig][first]["p50"] / single[sig][second]["p50"] for sig in single},
        "single_request_p99": {sig: single[sig][first]["p99"] / single[sig][second]["p99"] for sig in single},
    }
    return {
        "rounds": rounds,
        "single_request_ms": single,
        "throughput_lists_per_s": throughput,
        f"speedup_{second}_over_{first}": ratios,
    }


def summarize_repeats(speedups: list[dict]) -> dict:
    """min, median and max of each ratio over repeated side-by-side runs (their `speedup_...` dicts)."""
    first = speedups[0]
    return {
        "runs": len(speedups),
        "throughput": {
            batch: {sig: spread([s["throughput"][batch][sig] for s in speedups]) for sig in row}
            for batch, row in first["throughput"].items()
        },
        **{
            key: {sig: spread([s[key][sig] for s in speedups]) for sig in first[key]}
            for key in ("single_request_p50", "single_request_p99")
        },
    }


def summarize_latencies(singles: list[dict]) -> dict:
    """min, median and max of each export's one-request p50 and p99 (ms) over repeated side-by-side
    runs (their `single_request_ms` dicts: signature -> export -> percentile)."""
    first = singles[0]
    return {
        sig: {name: {q: spread([s[sig][name][q] for s in singles]) for q in first[sig][name]} for name in first[sig]}
        for sig in first
    }


def run(
    model: str,
    data_dir: str,
    calls: int,
    batches: list[int],
    seconds: float,
    run_dir: str | None = None,
    peak_size: tuple[int, float] = (2048, 2.0),
    compare_model: str | None = None,
    repeats: int = 1,
) -> dict:
    """`peak_size`: (n, seconds) of the peak matmuls (`bench.peak.measure`); `repeats`: side-by-side runs
    of `compare_model` (the first is `exports_side_by_side`; all of them are summarised)."""
    loaded = tf.saved_model.load(model)
    dense_fn = loaded.signatures["predict_lists"]
    examples_fn = loaded.signatures["serving_default"]
    records = _records(data_dir, max(batches))
    result = {
        "model": os.path.abspath(model),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "tensorflow": tf.__version__,
        },
    }
    one = _dense(records[:1])
    lat = _latencies(lambda: dense_fn(**one), calls, warmup=50)
    one_ex = tf.constant(records[:1])
    lat_ex = _latencies(lambda: examples_fn(examples=one_ex), calls, warmup=50)
    result["single_request"] = {
        "candidates": int(one["item_ids"].shape[1]),
        "calls": calls,
        "predict_lists_ms": {"p50": 1e3 * float(np.percentile(lat, 50)), "p99": 1e3 * float(np.percentile(lat, 99))},
        "serving_default_ms": {
            "p50": 1e3 * float(np.percentile(lat_ex, 50)),
            "p99": 1e3 * float(np.percentile(lat_ex, 99)),
        },
    }
    # What the parsing adds, and where the p99 comes from: both signatures and the parsing alone, call by call.
    parse, empty = _parse_only(), empty_signature()
    result["single_request_interleaved_ms"] = interleaved(
        {
            "predict_lists": lambda: dense_fn(**one),
            "serving_default": lambda: examples_fn(examples=one_ex),
            "parse_only": lambda: parse(one_ex),
            "empty_signature": lambda: empty(**one),
        },
        calls,
    )
    result["throughput_lists_per_s"] = {}
    for batch in batches:
        dense = _dense(records[:batch])
        ex = tf.constant(records[:batch])
        row = {}
        for name, call in (
            ("predict_lists", lambda dense=dense: dense_fn(**dense)),
            ("serving_default", lambda ex=ex: examples_fn(examples=ex)),
        ):
            row[name] = _rate(call, batch, seconds)
        result["throughput_lists_per_s"][str(batch)] = row
    flops = flops_per_list(loaded, int(one["item_ids"].shape[1]))
    best = max(row["predict_lists"] for row in result["throughput_lists_per_s"].values())
    flops["achieved_gflops_at_best_batch"] = best * flops["per_list"] / 1e9
    result["flops"] = flops
    # The machine's measured peak, in this process, and the serving figure as a share of it.
    result["peak"] = peak_lib.measure(*peak_size)
    result["flops"]["shares"] = peak_lib.shares(
        {"predict_lists_at_best_batch": flops["achieved_gflops_at_best_batch"]}, result["peak"]
    )
    if run_dir:
        result["export_vs_in_memory_lists_per_s"] = export_vs_memory(loaded, run_dir, records, batches, seconds)
    if compare_model:
        pair = {"model": loaded, "compare_model": tf.saved_model.load(compare_model)}
        result["exports_side_by_side"] = {
            "compare_model": os.path.abspath(compare_model),
            **side_by_side(pair, records, batches, calls, seconds),
        }
        result["peak_after"] = peak_lib.measure(*peak_size)
        if repeats > 1:
            key = "speedup_compare_model_over_model"
            first = result["exports_side_by_side"]
            runs = [
                {"peak_after": result["peak_after"], "single_request_ms": first["single_request_ms"], key: first[key]}
            ]
            for _ in range(repeats - 1):
                again = side_by_side(pair, records, batches, calls, seconds)
                runs.append(
                    {
                        "peak_after": peak_lib.measure(*peak_size),
                        "single_request_ms": again["single_request_ms"],
                        key: again[key],
                    }
                )
            result["exports_side_by_side_repeats"] = {
                "runs": runs,
                "summary": {
                    **summarize_repeats([r[key] for r in runs]),
                    "single_request_ms": summarize_latencies([r["single_request_ms"] for r in runs]),
                },
            }
    return result


def main(argv=None) -> int:
    quiet.configure(quiet.verbose_flag(argv))  # only the benchmark's own output
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n")[0])
    parser.add_argument("--verbose", action="store_true", help="TensorFlow's and Beam's own log lines too")
    parser.add_argument("--model", required=True, help="saved_models/<name>/<version>")
    parser.add_argument("--data_dir", required=True, help="pipeline output whose test records are the requests")
    parser.add_argument("--run_dir", help="the run the export came from: also time the model in memory")
    parser.add_argument("--compare_model", help="another export (e.g. --jit_compile) timed side by side with --model")
    parser.add_argument(
        "--repeats", type=int, default=1, help="side-by-side runs with --compare_model (the VM varies run to run)"
    )
    parser.add_argument("--output", default="bench/results/serving.json")
    parser.add_argument("--quick", action="store_true", help="a run under a minute")
    args = parser.parse_args(argv)
    if args.repeats < 1 or (args.repeats > 1 and not args.compare_model):
        parser.error("--repeats: at least 1, and more than 1 only with --compare_model")
    check_inputs(parser, args.model, args.data_dir, args.compare_model)
    calls, seconds, peak_size = (300, 1.0, (1024, 0.6)) if args.quick else (2000, 5.0, (2048, 2.0))
    result = run(
        args.model,
        args.data_dir,
        calls,
        [1, 16, 64, 256],
        seconds,
        args.run_dir,
        peak_size,
        args.compare_model,
        args.repeats,
    )
    write_json(args.output, result)
    s = result["single_request"]
    print(f"one request of {s['candidates']} candidates, {s['calls']} calls:")
    for name in ("predict_lists", "serving_default"):
        print(f"  {name:16s} p50 {s[f'{name}_ms']['p50']:.2f} ms   p99 {s[f'{name}_ms']['p99']:.2f} ms")
    print("one request, the callers in turn call by call (ms; spikes: calls over twice their p50):")
    for name, row in result["single_request_interleaved_ms"].items():
        print(
            f"  {name:16s} p50 {row['p50']:.3f}   p99 {row['p99']:.3f}   p99.9 {row['p99.9']:.3f}   "
            f"max {row['max']:.2f}   spikes {row['over_twice_p50']}"
        )
    print("throughput (lists/s):")
    for batch, row in result["throughput_lists_per_s"].items():
        dense_rate, examples_rate = row["predict_lists"], row["serving_default"]
        print(f"  batch {batch:>4s}: predict_lists {dense_rate:9.0f}   serving_default {examples_rate:9.0f}")
    f = result["flops"]
    print(
        f"FLOPs of one list of {f['list_size']}: {f['per_list'] / 1e6:.2f} M "
        f"({f['achieved_gflops_at_best_batch']:.1f} GFLOP/s achieved at the best batch)"
    )
    share = f["shares"]["predict_lists_at_best_batch"]
    print(
        f"measured peak in this process: FP32 {result['peak']['float32_gflops']:.1f}, bf16 "
        f"{result['peak']['bfloat16_gflops']:.1f} GFLOP/s; serving at {100 * share['share_of_fp32_peak']:.0f}% "
        f"of FP32 peak, {100 * share['share_of_bf16_peak']:.0f}% of bf16"
    )
    if "export_vs_in_memory_lists_per_s" in result:
        print("export against the same function in memory (lists/s, alternating rounds):")
        for batch, row in result["export_vs_in_memory_lists_per_s"].items():
            print(
                f"  batch {batch:>4s}: export signature {row['export_signature']:8.0f}   export function "
                f"{row['export_function']:8.0f}   in memory {row['in_memory']:8.0f}   "
                f"signature / in memory {row['export_signature_over_in_memory']:.3f}"
            )
    if "exports_side_by_side" in result:
        side = result["exports_side_by_side"]
        print(f"--model against --compare_model, {side['rounds']} alternating rounds:")
        for sig, row in side["single_request_ms"].items():
            a, b = row["model"], row["compare_model"]
            p50, p99 = f"{a['p50']:.2f} -> {b['p50']:.2f}", f"{a['p99']:.2f} -> {b['p99']:.2f}"
            print(f"  one request, {sig:16s} p50 {p50} ms   p99 {p99} ms")
        for batch, row in side["throughput_lists_per_s"].items():
            cells = "   ".join(
                f"{sig} {row[sig]['model']:8.0f} -> {row[sig]['compare_model']:8.0f} "
                f"({row[sig]['compare_model'] / row[sig]['model']:.2f}x)"
                for sig in ("predict_lists", "serving_default")
            )
            print(f"  batch {batch:>4s}: {cells}")
    if "exports_side_by_side_repeats" in result:
        summary = result["exports_side_by_side_repeats"]["summary"]
        print(f"--compare_model over --model in {summary['runs']} side-by-side runs (min / median / max):")
        for batch, row in summary["throughput"].items():
            cells = "   ".join(
                f"{sig} {row[sig]['min']:.2f} / {row[sig]['median']:.2f} / {row[sig]['max']:.2f}x" for sig in row
            )
            print(f"  batch {batch:>4s}: {cells}")
        for sig, row in summary["single_request_ms"].items():
            cells = "   ".join(
                f"{name} {row[name]['p99']['min']:.2f} / {row[name]['p99']['median']:.2f} / "
                f"{row[name]['p99']['max']:.2f}"
                for name in row
            )
            print(f"  one request's p99 (ms), {sig:16s} {cells}")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
