"""One request through TensorFlow's C API, as a C++ model server calls the SavedModel, written as JSON.

    python -m bench.serving_c_api --model saved_models/ml100k_dnr_b/1 --data_dir data/ml100k \
        [--compare_model saved_models/ml100k_dnr_b_xla/1] [--repeats 3] \
        --output bench/results/serving_c_api.json [--quick]

`bench.serving` times the exports from Python, whose own call of a signature that computes nothing
costs about 0.3 ms p50 and 0.45 ms p99 on a slow VM: a floor that TF Serving, calling the model
from C++, does not pay. This benchmark compiles `bench/c_api/serving.c` against the installed
TensorFlow's C API (a C compiler, `$CC` or `gcc`, is needed) and times one request of the first
test record in a process without Python: each export loaded with `TF_LoadSessionFromSavedModel`
(the C++ SavedModel loader TF Serving uses, "serve" tag, default session options), its inputs
built once, then `TF_SessionRun` of each case: `predict_lists` (dense tensors) and
`serving_default` (a serialized tf.Example) of `--model` and of `--compare_model`, and a SavedModel
whose `predict_lists` computes nothing (`empty_signature`: the floor of a session run from C). The
cases take turns in rounds of `--block` timed calls each, after 5 untimed ones (`--block_warmup`:
the case's weights back in the caches after the other cases' calls, as in a server that serves one
model), so that a slow spell of the VM hits each case alike; `--block 1` calls them in turn call by
call, untimed calls left out (each call then follows the other cases' and finds the caches cold). What TF
Serving adds around the session run (the gRPC or REST request, its conversion to tensors and back)
is not included.

Before reporting, each case's outputs from C are checked against the same signature called from
Python on the same request (scores within 1e-5, the same top-K item ids); a mismatch stops the
benchmark. `--repeats N` starts the C process N times (the VM's speed moves from one run to the
next) and gives each percentile's min, median and max. The machine's peak (`bench.peak.measure`)
is measured in this process before and after the C runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile

from bench import require_at_least_one, spread, write_json

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads (dnr_tf.quiet)
from dnr_tf import quiet  # noqa: E402

quiet.import_tensorflow_silently()  # before the import below: its start-up lines (dnr_tf.quiet)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench import peak as peak_lib  # noqa: E402
from bench import serving  # noqa: E402

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "c_api", "serving.c")
SIGNATURES = ("predict_lists", "serving_default")
SCORE_TOLERANCE = 1e-5
BLOCK_WARMUP = 5  # untimed calls of a case at the start of each of its blocks
_DTYPES = {tf.float32: 1, tf.int32: 3, tf.string: 7, tf.int64: 9}  # TF_DataType's numbers


def compiler() -> str:
    return os.environ.get("CC", "gcc")


def library() -> str:
    """The installed TensorFlow's C API library (the C benchmark loads it when it starts)."""
    return os.path.join(os.path.dirname(os.path.abspath(tf.__file__)), "libtensorflow_cc.so.2")


def build(out_dir: str) -> str:
    """Compiles `bench/c_api/serving.c` against this TensorFlow's C API; returns the binary's path."""
    tf_dir = os.path.dirname(os.path.abspath(tf.__file__))
    include = os.path.join(tf_dir, "include")
    if shutil.which(compiler()) is None:
        raise RuntimeError(f"no C compiler {compiler()!r} on PATH (set $CC): it builds {SOURCE}")
    if not os.path.exists(os.path.join(include, "tensorflow", "c", "c_api.h")):
        raise RuntimeError(f"TensorFlow's C headers not found under {include}")
    binary = os.path.join(out_dir, "serving")
    # Not linked against TensorFlow (which takes seconds): the program loads its library when it starts.
    cmd = [compiler(), "-O2", "-std=gnu11", SOURCE, f"-I{include}", "-ldl", "-o", binary]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"compiling {SOURCE} failed: {done.stderr.strip().splitlines()[-1]}")
    return binary


def signature_tensors(export_dir: str, signature: str) -> tuple[dict, dict]:
    """(input key -> tensor name, output key -> tensor name) of a signature, read from saved_model.pb."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    for meta in proto.meta_graphs:
        if "serve" in meta.meta_info_def.tags and signature in meta.signature_def:
            sig = meta.signature_def[signature]
            return {k: v.name for k, v in sig.inputs.items()}, {k: v.name for k, v in sig.outputs.items()}
    raise ValueError(f"{export_dir}: no signature {signature!r} under the 'serve' tag")


def _write_input(path: str, value: tf.Tensor) -> None:
    with open(path, "wb") as f:
        if value.dtype == tf.string:
            for item in value.numpy().reshape(-1):
                f.write(np.uint64(len(item)).tobytes() + item)
        else:
            f.write(value.numpy().tobytes())


def requests(data_dir: str) -> dict:
    """One request (the first test record) as each signature takes it: signature -> {input key: tensor}."""
    records = serving._records(data_dir, 1)
    return {"predict_lists": serving._dense(records), "serving_default": {"examples": tf.constant(records)}}


def cases(exports: dict, empty_dir: str) -> list[tuple[str, str, str]]:
    """(case name, export dir, signature): both signatures of each export, then the empty signature."""
    out = [(f"{name}-{sig}", path, sig) for name, path in exports.items() for sig in SIGNATURES]
    return out + [("empty_signature-predict_lists", empty_dir, "predict_lists")]


def write_manifest(work: str, case_list, request: dict) -> dict:
    """Writes the manifest and the inputs for `bench/c_api/serving.c`; returns case -> output keys in order."""
    outputs, lines = {}, []
    for name, path, sig in case_list:
        inputs, outs = signature_tensors(path, sig)
        lines.append(f"case {name} {os.path.abspath(path)}")
        for key, tensor in sorted(inputs.items()):
            value = request[sig][key]
            file = os.path.join(work, f"{name}.in.{key}")
            _write_input(file, value)
            dims = " ".join(str(d) for d in value.shape)
            lines.append(f"input {tensor} {_DTYPES[value.dtype]} {len(value.shape)} {dims} {file}")
        outputs[name] = sorted(outs)
        lines += [f"output {outs[key]}" for key in outputs[name]]
    with open(os.path.join(work, "manifest"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return outputs


def default_block_warmup(block: int) -> int:
    """Untimed calls at the start of each block: none when the cases are called in turn call by call."""
    return BLOCK_WARMUP if block > 1 else 0


def run_c(
    binary: str,
    work: str,
    n_cases: int,
    calls: int,
    warmup: int,
    block: int,
    verbose: bool = False,
    block_warmup: int | None = None,
) -> np.ndarray:
    """Runs the C benchmark once, in rounds of `block` calls a case (each after `block_warmup` untimed
    ones); returns `[n_cases, calls]` call times in ms (`calls` rounded up to whole rounds)."""
    rounds = -(-calls // block)
    block_warmup = default_block_warmup(block) if block_warmup is None else block_warmup
    times, out_dir = os.path.join(work, "times"), os.path.join(work, "outputs")
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ)
    if not verbose:
        env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    done = subprocess.run(
        [
            binary,
            library(),
            os.path.join(work, "manifest"),
            str(rounds),
            str(block),
            str(block_warmup),
            str(warmup),
            times,
            out_dir,
        ],
        capture_output=not verbose,
        text=True,
        env=env,
    )
    if done.returncode:
        lines = (done.stderr or "").strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"{binary} exited with status {done.returncode}")
    return np.fromfile(times, np.int64).reshape(n_cases, rounds * block) / 1e6


def c_outputs(work: str, name: str, keys: list[str], reference: dict) -> dict:
    """The outputs the C process wrote for case `name`, shaped and typed as `reference`'s tensors."""
    out = {}
    for k, key in enumerate(keys):
        ref = reference[key].numpy()
        out[key] = np.fromfile(os.path.join(work, "outputs", f"{name}.{k}"), ref.dtype).reshape(ref.shape)
    return out


def check_outputs(work: str, case_list, outputs: dict, request: dict) -> dict:
    """Each case's C outputs against its signature called from Python; raises on a mismatch."""
    checks, loaded = {}, {}
    for name, path, sig in case_list:
        if path not in loaded:
            loaded[path] = tf.saved_model.load(path)
        reference = loaded[path].signatures[sig](**request[sig])
        got = c_outputs(work, name, outputs[name], reference)
        diff = float(np.max(np.abs(got["scores"] - reference["scores"].numpy())))
        same_top = bool(np.array_equal(got["top_k_item_ids"], reference["top_k_item_ids"].numpy()))
        if not diff <= SCORE_TOLERANCE or not same_top:
            raise RuntimeError(
                f"{name}: the C API's outputs differ from Python's (scores by {diff:.2e}, same top K: {same_top})"
            )
        checks[name] = {"max_abs_score_diff": diff, "same_top_k_item_ids": same_top}
    return checks


def run(
    model: str,
    data_dir: str,
    calls: int,
    warmup: int,
    compare_model: str | None = None,
    repeats: int = 1,
    peak_size: tuple[int, float] = (2048, 2.0),
    verbose: bool = False,
    block: int = 250,
    binary: str | None = None,
    block_warmup: int | None = None,
) -> dict:
    """Times one request through the C API (see the module doc). `binary`: an already built
    `bench/c_api/serving.c` (`build`); by default it is compiled for this run."""
    exports = {"model": model, **({"compare_model": compare_model} if compare_model else {})}
    calls = -(-calls // block) * block  # whole rounds of `block` calls
    block_warmup = default_block_warmup(block) if block_warmup is None else block_warmup
    request = requests(data_dir)
    result = {
        "model": os.path.abspath(model),
        **({"compare_model": os.path.abspath(compare_model)} if compare_model else {}),
        "candidates": int(request["predict_lists"]["item_ids"].shape[1]),
        "calls": calls,
        "warmup": warmup,
        "block": block,
        "block_warmup": block_warmup,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "tensorflow": tf.__version__,
        },
        "peak_before": peak_lib.measure(*peak_size),
    }
    with tempfile.TemporaryDirectory() as work:
        empty_dir = os.path.join(work, "empty_signature")
        serving.save_empty_signature(empty_dir)
        case_list = cases(exports, empty_dir)
        binary = binary or build(work)
        outputs = write_manifest(work, case_list, request)
        runs = []
        for r in range(repeats):
            ms = run_c(binary, work, len(case_list), calls, warmup, block, verbose, block_warmup)
            runs.append({name: serving.latency_row(ms[i]) for i, (name, _, _) in enumerate(case_list)})
            print(f"  C API run {r + 1}/{repeats} done", file=sys.stderr, flush=True)
        result["outputs_match_python"] = check_outputs(work, case_list, outputs, request)
    result["peak_after"] = peak_lib.measure(*peak_size)
    result["runs_ms"] = runs
    result["summary_ms"] = {
        name: {q: spread([run[name][q] for run in runs]) for q in ("p50", "p90", "p99", "p99.9", "max")}
        for name in runs[0]
    }
    if compare_model:
        result["ratio_model_over_compare_model"] = {
            sig: {
                q: spread([run[f"model-{sig}"][q] / run[f"compare_model-{sig}"][q] for run in runs])
                for q in ("p50", "p99")
            }
            for sig in SIGNATURES
        }
    return result


def main(argv=None) -> int:
    quiet.configure(quiet.verbose_flag(argv))
    parser = argparse.ArgumentParser(prog="python -m bench.serving_c_api", description=__doc__.split("\n")[0])
    parser.add_argument("--verbose", action="store_true", help="TensorFlow's own log lines too")
    parser.add_argument("--model", required=True, help="saved_models/<name>/<version>")
    parser.add_argument("--data_dir", required=True, help="pipeline output whose first test record is the request")
    parser.add_argument("--compare_model", help="another export of the same reranker, timed call by call with --model")
    parser.add_argument("--repeats", type=int, default=1, help="C processes to run (the VM varies run to run)")
    parser.add_argument("--calls", type=int, help="timed calls of each case (default 5000; 500 with --quick)")
    parser.add_argument(
        "--block", type=int, default=250, help="timed calls of a case in each of its turns (1: call by call)"
    )
    parser.add_argument(
        "--block_warmup",
        type=int,
        help=f"untimed calls of a case before each of its blocks (default {BLOCK_WARMUP}; 0 with --block 1)",
    )
    parser.add_argument("--output", default="bench/results/serving_c_api.json")
    parser.add_argument("--quick", action="store_true", help="a run under a minute")
    args = parser.parse_args(argv)
    require_at_least_one(parser, args, "repeats", "calls", "block")
    if args.block_warmup is not None and args.block_warmup < 0:
        parser.error("--block_warmup: at least 0")
    serving.check_inputs(parser, args.model, args.data_dir, args.compare_model)
    if shutil.which(compiler()) is None:
        parser.error(f"no C compiler {compiler()!r} on PATH (set $CC)")
    calls = args.calls or (500 if args.quick else 5000)
    warmup, peak_size = (50, (1024, 0.6)) if args.quick else (200, (2048, 2.0))
    try:
        result = run(
            args.model,
            args.data_dir,
            calls,
            warmup,
            args.compare_model,
            args.repeats,
            peak_size,
            args.verbose,
            min(args.block, calls),
            block_warmup=args.block_warmup,
        )
    except (RuntimeError, ValueError) as e:
        print(f"python -m bench.serving_c_api: error: {e}", file=sys.stderr)
        return 2
    write_json(args.output, result)
    print(
        f"one request of {result['candidates']} candidates through the C API, {result['calls']} calls a case "
        f"in blocks of {result['block']}, {args.repeats} process(es) (ms, min / median / max over processes):"
    )
    for name, row in result["summary_ms"].items():
        cells = "   ".join(
            f"{q} {row[q]['min']:.3f} / {row[q]['median']:.3f} / {row[q]['max']:.3f}" for q in ("p50", "p99", "p99.9")
        )
        print(f"  {name:34s} {cells}")
    for sig, row in result.get("ratio_model_over_compare_model", {}).items():
        print(
            f"  --model over --compare_model, {sig}: p50 {row['p50']['median']:.2f}x, p99 {row['p99']['median']:.2f}x"
        )
    print(
        f"measured peak in this process: FP32 {result['peak_before']['float32_gflops']:.1f} before, "
        f"{result['peak_after']['float32_gflops']:.1f} after (GFLOP/s)"
    )
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
