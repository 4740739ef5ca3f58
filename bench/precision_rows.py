"""Study rows retrained in float32 and in mixed precision, against the study's own runs, as JSON.

    python -m bench.precision_rows --study reports/study --dataset cascade --data_dir <records> \\
        --rows prm_direct,dnr_b,dnr_g --work_dir runs/precision_rows \\
        --output docs/performance/train_precision_<date>/ml100k_rows.json

Each (row, seed) is trained from the config its `<study>/runs/<row>__<dataset>__s<seed>/result.json`
records, once as it is (float32) and once with `train.precision: mixed_bfloat16`, on `--data_dir`,
which must hold the study's records (`records` fingerprint, checked before any work). Runs are kept
in `--work_dir/<precision>_<row>_s<seed>/` and a finished one is not trained again (the job can be
stopped and run again). Each run's per-list test NDCG@6 is computed as the study computes it
(`dnr_tf.robustness.evaluate_perturbed`); the JSON gives, per row, the crossed bootstrap's mean and
95% interval (`dnr_tf.stats`) of the study's runs, of the float32 re-runs and of the mixed ones, the
paired differences mixed - float32 (Holm-corrected over the rows) and float32 - study, and every
seed's mean. The float32 column is also a re-run of the study on this machine: a run reproduces its
recorded figures bit for bit only on a CPU like the study's (README, "Re-run on another machine").
"""

from __future__ import annotations

import argparse
import json
import os

from bench import require_paths, write_json

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads (dnr_tf.quiet)
from dnr_tf import quiet  # noqa: E402

quiet.import_tensorflow_silently()  # before anything imports it: its start-up lines (dnr_tf.quiet)

PRECISIONS = {"float32": "fp32", "mixed_bfloat16": "bf16"}


def study_runs(study: str, dataset: str, rows: list[str], seeds: list[int]) -> dict:
    """{(row, seed): the study's result.json}; a missing one is a one-line error."""
    out = {}
    for row in rows:
        for seed in seeds:
            path = os.path.join(study, "runs", f"{row}__{dataset}__s{seed}", "result.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} not found: the study has no run of {row} seed {seed} on {dataset}")
            with open(path) as f:
                out[row, seed] = json.load(f)
    return out


def summarize(per_list: dict, study: dict, rows: list[str], seeds: list[int], resamples: int = 2000) -> dict:
    """Per row: bootstrap means and paired differences (see the module docstring).

    `per_list`: {"<fp32|bf16>_<row>_s<seed>": per-list values}; `study`: {(row, seed): result.json}.
    """
    import numpy as np

    from dnr_tf import stats

    out, pvalues = {}, []
    for row in rows:
        arms = {
            "study": np.array([study[row, s]["per_list_test_ndcg"] for s in seeds]),
            "float32": np.array([per_list[f"fp32_{row}_s{s}"] for s in seeds]),
            "mixed_bfloat16": np.array([per_list[f"bf16_{row}_s{s}"] for s in seeds]),
        }
        diff = stats.paired_difference(arms["mixed_bfloat16"], arms["float32"], resamples)
        out[row] = {
            "seeds": seeds,
            **{name: stats.bootstrap_mean(v, resamples).__dict__ for name, v in arms.items()},
            "mixed_minus_float32": diff.__dict__,
            "float32_minus_study": stats.paired_difference(arms["float32"], arms["study"], resamples).__dict__,
            "per_seed": {name: v.mean(axis=1).tolist() for name, v in arms.items()},
        }
        pvalues.append(diff.p)
    for row, p in zip(rows, stats.holm(pvalues)):
        out[row]["mixed_minus_float32"]["p_holm"] = float(p)
    return out


def run_all(study: dict, data_dir: str, work_dir: str, rows, seeds) -> dict:
    """Trains what is missing and returns the per-list values of every run (kept in work_dir)."""
    from dnr_tf import config_io
    from dnr_tf import schema as schema_lib
    from dnr_tf.config import ExperimentConfig
    from dnr_tf.robustness import evaluate_perturbed
    from dnr_tf.runs import load_trained
    from dnr_tf.train import datasets, train

    cache = os.path.join(work_dir, "per_list.json")
    per_list = {}
    if os.path.exists(cache):
        with open(cache) as f:
            per_list = json.load(f)
    schema = schema_lib.load_schema(data_dir)
    todo = [(p, row, s) for p in PRECISIONS for row in rows for s in seeds]
    for i, (precision, row, seed) in enumerate(todo, 1):
        key = f"{PRECISIONS[precision]}_{row}_s{seed}"
        if key in per_list:
            continue
        model_dir = os.path.join(work_dir, key)
        data = config_io.apply_overrides(study[row, seed]["config"], [f"train.precision={precision}"])
        cfg = config_io.from_dict(ExperimentConfig, data)
        if not os.path.exists(os.path.join(model_dir, "metrics.json")):
            print(f"[{i}/{len(todo)}] training {key}", flush=True)
            train(cfg, data_dir, model_dir, verbose=0)
        model, _, _ = load_trained(model_dir)
        result = evaluate_perturbed(model, datasets(data_dir, cfg, schema)[2], [], k=cfg.train.k, seed=seed)
        per_list[key] = [float(v) for v in result["per_list_ndcg"]]
        write_json(cache, per_list)
    return per_list


def main(argv=None) -> int:
    quiet.configure(quiet.verbose_flag(argv))
    parser = argparse.ArgumentParser(prog="python -m bench.precision_rows", description=__doc__.split("\n")[0])
    parser.add_argument("--verbose", action="store_true", help="TensorFlow's and Beam's own log lines too")
    parser.add_argument("--study", default="reports/study", help="the study's output folder (its runs/)")
    parser.add_argument("--dataset", default="cascade", help="the study's name of the data set")
    parser.add_argument("--data_dir", required=True, help="the data set's records, as the study built them")
    parser.add_argument("--rows", default="prm_direct,dnr_b,dnr_g")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--work_dir", required=True, help="where the runs are kept (a finished run is reused)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    require_paths(parser, [(os.path.join(args.data_dir, "schema.json"), "--data_dir"), (args.study, "--study")])
    rows = [r for r in args.rows.split(",") if r]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    try:
        study = study_runs(args.study, args.dataset, rows, seeds)
    except FileNotFoundError as e:
        parser.error(str(e))
    from dnr_tf import provenance

    records = provenance.records_fingerprint(args.data_dir)
    recorded = {r.get("records") for r in study.values()}
    if recorded != {records}:
        parser.error(
            f"--data_dir: its records ({records}) are not the study's ({', '.join(sorted(map(str, recorded)))}): "
            "build the data set as the study's plan does"
        )
    per_list = run_all(study, args.data_dir, args.work_dir, rows, seeds)
    rows_summary = summarize(per_list, study, rows, seeds)
    result = {"study": args.study, "dataset": args.dataset, "records": records, "rows": rows_summary}
    write_json(args.output, result)
    for row, o in result["rows"].items():
        d = o["mixed_minus_float32"]
        print(
            f"{row}: study {o['study']['mean']:.4f}  float32 {o['float32']['mean']:.4f}  "
            f"mixed {o['mixed_bfloat16']['mean']:.4f}  mixed - float32 {d['mean']:+.4f} "
            f"[{d['low']:+.4f}, {d['high']:+.4f}] Holm p {d['p_holm']:.2f}"
        )
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
