"""Training cost of DNR against direct training, on the same batches, in one process, as JSON.

    python -m bench.train_cost --data_dir data/ml100k --output bench/results/train_cost.json [--quick]

`data/ml100k` is what `make ml100k` writes. Cases (the reranker of `configs/ml100k_prm_concat.yaml`
in all of them; DNR is `configs/ml100k_dnr_b.yaml`):
    direct                          PRM with the score concatenated, L_direct only;
    heuristic                       DNR with the Beta sampler: two reranker calls a step (x and x');
    heuristic/fused                 the same, one call on the real and generated lists stacked
                                    (`train.fused_step`);
    model_based                     DNR in its model-based phase (algorithm 1 as written): the
                                    reranker's step, then the generator's step through a third call;
    model_based/fused               the reranker's two calls fused, the generator's step as before;
    model_based/simultaneous        one forward and backward for both updates
                                    (`dnr.generator_update: simultaneous`);
    model_based/simultaneous+fused  both options.

Every case has its own model and Keras train function; rounds of `--steps` steps run each case in
turn (the order rotates a round), the first round is warm-up (tracing) and is dropped, and the
median seconds a step over the other rounds is reported with its ratio to `direct`. The batches are
the first `--batches` batches of the train split, cached in memory and repeated, so every case
sees the same data and input reading is not measured. `--precision mixed_bfloat16` runs every case
under `train.precision: mixed_bfloat16` (compare with a float32 process: one precision a process).

Each case also gets its FLOPs a step (`PASSES` reranker passes, each about 3x the forward FLOPs of
its lists, counted from the reranker's weights as `bench.serving` counts them) and its achieved
GFLOP/s as a share of the FP32 and bf16 matmul peaks measured in the same process (`bench.peak`).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from bench import require_at_least_one, write_json

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads (dnr_tf.quiet)
from dnr_tf import quiet  # noqa: E402

quiet.import_tensorflow_silently()  # before the import below: its start-up lines (dnr_tf.quiet)

import numpy as np  # noqa: E402

from bench import peak as peak_lib  # noqa: E402

DIRECT = "configs/ml100k_prm_concat.yaml"
DNR = "configs/ml100k_dnr_b.yaml"
# Reranker passes (forward and backward) a step, for its FLOPs: the direct step runs one, a DNR step
# two (x and x'), algorithm 1's model-based step a third for the generator's update. A pass over a
# batch costs about 3x its forward FLOPs (the backward pass computes two products per forward one).
PASSES = {
    "direct": 1,
    "heuristic": 2,
    "heuristic/fused": 2,
    "model_based": 3,
    "model_based/fused": 3,
    "model_based/simultaneous": 2,
    "model_based/simultaneous+fused": 2,
}
# name: (config, overrides, model-based phase)
CASES = {
    "direct": (DIRECT, [], False),
    "heuristic": (DNR, ["dnr.model_based=false"], False),
    "heuristic/fused": (DNR, ["dnr.model_based=false", "train.fused_step=true"], False),
    "model_based": (DNR, [], True),
    "model_based/fused": (DNR, ["train.fused_step=true"], True),
    "model_based/simultaneous": (DNR, ["dnr.generator_update=simultaneous"], True),
    "model_based/simultaneous+fused": (DNR, ["dnr.generator_update=simultaneous", "train.fused_step=true"], True),
}


def _config(path: str, overrides: list[str]):
    from dnr_tf import config_io
    from dnr_tf.config import ExperimentConfig

    return config_io.from_dict(ExperimentConfig, config_io.apply_overrides(config_io.load_yaml(path), overrides))


def machine() -> dict:
    import tensorflow as tf

    from dnr_tf.provenance import cpu_id

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_id": "/".join(cpu_id()),  # vendor/family/model: "AMD EPYC" alone names several CPUs
        "cpus": os.cpu_count(),
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
    }


def build_cases(data_dir: str, names: list[str], n_batches: int, precision: str = "float32"):
    from dnr_tf import schema as schema_lib
    from dnr_tf.runs import build_model, read_vocab
    from dnr_tf.train import datasets

    schema = schema_lib.load_schema(data_dir)
    vocab = read_vocab(data_dir)
    cases = {}
    for name in names:
        path, overrides, model_based = CASES[name]
        cfg = _config(path, [*overrides, f"train.precision={precision}"])
        train_ds = datasets(data_dir, cfg, schema)[0].take(n_batches).cache().repeat()
        example = next(iter(train_ds))[0]
        model = build_model(cfg, vocab, schema, example)
        model.set_sampler_phase(model_based)
        model.make_train_function()
        cases[name] = {
            "model": model,
            "iterator": iter(train_ds),
            "batch_size": cfg.train.batch_size,
            "flops_per_list": step_flops_per_list(model, schema.list_size),
        }
    return cases


def step_flops_per_list(model, list_size: int) -> int:
    """Forward FLOPs of one list through the model's reranker (`bench.serving.flops_from_weights`)."""
    from bench.serving import flops_from_weights

    return flops_from_weights([(v.path, v.shape) for v in model.reranker.weights], list_size)["per_list"]


def time_steps(case: dict, steps: int) -> list[float]:
    model, iterator = case["model"], case["iterator"]
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        logs = model.train_function(iterator)
        float(logs["loss"])  # the step has finished
        out.append(time.perf_counter() - start)
    return out


def run(data_dir: str, names: list[str], rounds: int, steps: int, n_batches: int, precision: str = "float32") -> dict:
    cases = build_cases(data_dir, names, n_batches, precision)
    keys = list(cases)
    times = {key: [] for key in keys}
    for r in range(rounds + 1):
        order = keys[r % len(keys) :] + keys[: r % len(keys)]
        for key in order:
            t = time_steps(cases[key], steps)
            if r > 0:  # round 0 traces and warms up
                times[key].extend(t)
        print(f"round {r}/{rounds} done" + (" (warm-up, dropped)" if r == 0 else ""), flush=True)
    base = float(np.median(times["direct"]))
    result = {
        "machine": machine(),
        "data_dir": os.path.abspath(data_dir),
        "batch_size": cases["direct"]["batch_size"],
        "precision": precision,
        "rounds": rounds,
        "steps_per_round": steps,
        "cases": {},
    }
    for key in keys:
        t = np.array(times[key])
        result["cases"][key] = {
            "median_s_per_step": float(np.median(t)),
            "p10_s": float(np.percentile(t, 10)),
            "p90_s": float(np.percentile(t, 90)),
            "steps_timed": int(t.size),
            "ratio_to_direct": float(np.median(t)) / base,
            "gflop_per_step": 3 * PASSES[key] * cases[key]["batch_size"] * cases[key]["flops_per_list"] / 1e9,
        }
        result["cases"][key]["achieved_gflops"] = result["cases"][key]["gflop_per_step"] / float(np.median(t))
    return result


def add_shares(result: dict) -> dict:
    """Each case's achieved GFLOP/s as a share of the peak measured in this process."""
    shares = peak_lib.shares({k: row["achieved_gflops"] for k, row in result["cases"].items()}, result["peak"])
    for key, row in result["cases"].items():
        row["share_of_fp32_peak"] = shares[key]["share_of_fp32_peak"]
        row["share_of_bf16_peak"] = shares[key]["share_of_bf16_peak"]
    return result


def main(argv=None) -> int:
    quiet.configure(quiet.verbose_flag(argv))  # only the benchmark's own output
    parser = argparse.ArgumentParser(prog="python -m bench.train_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--verbose", action="store_true", help="TensorFlow's and Beam's own log lines too")
    parser.add_argument("--data_dir", default="data/ml100k", help="pipeline output (make ml100k)")
    parser.add_argument("--output", default="bench/results/train_cost.json")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (after one warm-up round)")
    parser.add_argument("--steps", type=int, default=20, help="steps per case a round")
    parser.add_argument("--batches", type=int, default=20, help="distinct batches, repeated")
    parser.add_argument("--quick", action="store_true", help="a run under a minute (2 rounds of 5 steps)")
    parser.add_argument(
        "--precision", choices=("float32", "mixed_bfloat16"), default="float32", help="train.precision of every case"
    )
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.data_dir, "schema.json")):
        parser.error(f"{args.data_dir}/schema.json not found: build the data first (make ml100k)")
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or "direct" not in names:
        parser.error(f"--cases: unknown {unknown}" if unknown else "--cases must include direct (the baseline)")
    require_at_least_one(parser, args, "rounds", "steps", "batches")
    rounds, steps = (2, 5) if args.quick else (args.rounds, args.steps)
    result = run(args.data_dir, names, rounds, steps, args.batches, args.precision)
    result["peak"] = peak_lib.measure(*((1024, 0.6) if args.quick else (2048, 2.0)))  # same process
    add_shares(result)
    write_json(args.output, result)
    batch, cpu = result["batch_size"], result["machine"]["cpu"]
    print(f"median seconds a training step, batch {batch}, {args.precision}, {cpu}:")
    for key, row in result["cases"].items():
        print(
            f"  {key:30s} {1e3 * row['median_s_per_step']:8.1f} ms   x{row['ratio_to_direct']:.2f}   "
            f"{row['achieved_gflops']:6.1f} GFLOP/s = {100 * row['share_of_fp32_peak']:.0f}% of the FP32 peak"
        )
    print(f"measured peak in this process: FP32 {result['peak']['float32_gflops']:.1f} GFLOP/s")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
