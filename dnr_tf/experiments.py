"""`python -m dnr_tf.experiments`: run a study plan (many configs x seeds x data sets), resumably.

Example:
    python -m dnr_tf.experiments --plan configs/study/ml100k.yaml --data_dir data/ml100k \\
        --out reports/ml100k

A plan (YAML) names data sets, seeds, overrides applied to every run, and rows:
    name: ml100k
    seeds: [0, 1, 2, 3, 4]
    set: {train.epochs: 10}
    datasets:
      cascade: {dir: data/ml100k}                  # --data_dir replaces this one's dir
      paper: {dir: data/ml100k_paper, pipeline: configs/pipeline/ml100k_paper.yaml,
              input: ../shared/data/ml-100k/u.data}
    rows:
      - {name: prm_concat, config: configs/ml100k_prm_concat.yaml, tables: [t1, t2], datasets: [cascade, paper]}
      - {name: dnr_b_lc0.1, config: configs/ml100k_dnr_b.yaml, set: {dnr.lambda_c: 0.1},
         tables: [fig3_lambda_c], seeds: [0, 1]}
    robustness: [gauss_0.05, gauss_0.1, gauss_0.2, square, sqrt, shuffle]

A data set with a `pipeline` config is built first when its dir holds no `schema.json`. Every run
(row x data set x seed) writes `<out>/runs/<row>__<dataset>__s<seed>/` (the training run) and
`result.json` (config, seed, best epoch, validation and test metrics, robustness, wall time); a run
with a `result.json` is never redone, and a half-done run resumes from its backup. At the end,
`<out>/results.json` collects every result, and `dnr_tf.report` writes the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from dnr_tf import config_io, quiet
from dnr_tf.config import ExperimentConfig


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    config: str
    tables: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ("cascade",)
    seeds: tuple[int, ...] | None = None
    set: dict | None = None


@dataclasses.dataclass(frozen=True)
class Dataset:
    dir: str
    pipeline: str | None = None
    input: str | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    rows: tuple[Row, ...]
    datasets: dict
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    set: dict | None = None
    robustness: tuple[str, ...] = ()


def load_plan(path: str, data_dir: str | None = None) -> Plan:
    raw = config_io.load_yaml(path)
    raw.pop("path", None)
    datasets = {
        name: config_io.from_dict(Dataset, d, prefix=f"datasets.{name}.") for name, d in raw.get("datasets", {}).items()
    }
    if data_dir:
        datasets["cascade"] = dataclasses.replace(datasets.get("cascade", Dataset(dir=data_dir)), dir=data_dir)
    raw = {**raw, "datasets": datasets}
    plan = config_io.from_dict(Plan, raw)
    unknown = sorted({d for row in plan.rows for d in row.datasets} - set(datasets))
    if unknown:
        raise config_io.ConfigError(f"rows use data sets {unknown} that the plan's `datasets` does not define")
    for row in plan.rows:
        if not os.path.exists(row.config):
            raise config_io.ConfigError(f"row {row.name}: config {row.config} not found")
    return plan


def run_id(row: str, dataset: str, seed: int) -> str:
    return f"{row}__{dataset}__s{seed}"


def runs_of(plan: Plan):
    """(row, dataset name, seed) of every run, in plan order."""
    for row in plan.rows:
        for dataset in row.datasets:
            for seed in row.seeds if row.seeds is not None else plan.seeds:
                yield row, dataset, seed


def ensure_dataset(name: str, ds: Dataset) -> None:
    """Builds a data set with its pipeline config when its directory has no schema.json yet."""
    if os.path.exists(os.path.join(ds.dir, "schema.json")):
        return
    if not ds.pipeline:
        raise FileNotFoundError(
            f"data set {name}: {ds.dir} holds no pipeline output and the plan gives no pipeline config"
        )
    from pipeline.run import run as run_pipeline

    print(f"[study] building data set {name} -> {ds.dir}", flush=True)
    argv = ["--config", ds.pipeline, "--output_dir", ds.dir]
    if ds.input:
        argv += ["--input", ds.input]
    run_pipeline(argv)


def experiment_config(plan: Plan, row: Row, seed: int) -> ExperimentConfig:
    data = config_io.load_yaml(row.config)
    overrides = [f"{k}={json.dumps(v)}" for k, v in {**(plan.set or {}), **(row.set or {})}.items()]
    overrides.append(f"train.seed={seed}")
    overrides.append(f"name={row.name}")
    return config_io.from_dict(ExperimentConfig, config_io.apply_overrides(data, overrides))


def run_one(plan: Plan, row: Row, dataset: str, seed: int, out: str) -> dict:
    """Trains one run (resuming if half done), evaluates it under every perturbation, saves result.json."""
    from dnr_tf import schema as schema_lib
    from dnr_tf.robustness import evaluate_perturbed
    from dnr_tf.runs import load_trained
    from dnr_tf.train import datasets, train

    cfg = experiment_config(plan, row, seed)
    data_dir = plan.datasets[dataset].dir
    model_dir = os.path.join(out, "runs", run_id(row.name, dataset, seed))
    start = time.time()
    trained = train(cfg, data_dir, model_dir, verbose=0)
    model, _, schema = load_trained(model_dir)
    _, _, test_ds = datasets(data_dir, cfg, schema_lib.load_schema(data_dir))
    robust = evaluate_perturbed(model, test_ds, plan.robustness, k=cfg.train.k, seed=seed)
    result = {
        "run": run_id(row.name, dataset, seed),
        "row": row.name,
        "dataset": dataset,
        "seed": seed,
        "tables": list(row.tables),
        "config": config_io.to_dict(cfg),
        "best_epoch": trained["best_epoch"],
        "valid": trained["valid"],
        "test": trained["test"],
        "robustness": {k: v for k, v in robust.items() if k != "per_list_ndcg"},
        "per_list_test_ndcg": robust["per_list_ndcg"],
        "seconds_per_epoch": trained["seconds_per_epoch"],
        "wall_seconds": time.time() - start,
    }
    with open(os.path.join(model_dir, "result.json"), "w") as f:
        json.dump(result, f)
    return result


def baselines(plan: Plan, out: str) -> dict:
    """The retriever's order, a random order (and the oracle, where known) on each data set's test split."""
    from dnr_tf.evaluate import evaluate_orders

    path = os.path.join(out, "baselines.json")
    done = json.load(open(path)) if os.path.exists(path) else {}
    for name, ds in plan.datasets.items():
        if name not in done and any(name in row.datasets for row in plan.rows):
            done[name] = evaluate_orders(ds.dir, "test")
    with open(path, "w") as f:
        json.dump(done, f, indent=2)
    return done


def run_plan(plan: Plan, out: str, progress=print, shard: tuple[int, int] = (0, 1), plan_path: str = "") -> dict | None:
    """Runs every missing run of the plan, then writes `<out>/results.json` and returns it.

    With `shard` (i, n), only runs i, i + n, i + 2n, ... are trained and None is returned: several
    processes can share a plan; a last call without a shard collects (and trains what is missing).
    """
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    for name, ds in plan.datasets.items():
        if any(name in row.datasets for row in plan.rows):
            ensure_dataset(name, ds)
    todo = list(runs_of(plan))
    index, count = shard
    results = []
    for i, (row, dataset, seed) in enumerate(todo, 1):
        if (i - 1) % count != index:
            continue
        path = os.path.join(out, "runs", run_id(row.name, dataset, seed), "result.json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
            continue
        result = run_one(plan, row, dataset, seed, out)
        results.append(result)
        progress(
            f"[study] {i}/{len(todo)} {result['run']}: test ndcg@6 {result['test']['ndcg@6']:.4f} "
            f"(best epoch {result['best_epoch']}, {result['wall_seconds']:.0f}s)"
        )
    if count > 1:
        return None
    summary = {
        "plan": plan.name,
        "plan_path": plan_path,
        "datasets": {k: dataclasses.asdict(v) for k, v in plan.datasets.items()},
        "baselines": baselines(plan, out),
        "runs": results,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f)
    return summary


def main(argv=None) -> int:
    quiet.configure(quiet.verbose_flag(argv))  # before TensorFlow is imported
    parser = argparse.ArgumentParser(prog="python -m dnr_tf.experiments", description=__doc__.split("\n")[0])
    parser.add_argument("--plan", required=True, help="YAML study plan (configs/study/*.yaml)")
    parser.add_argument("--data_dir", help="the cascade data set (replaces the plan's datasets.cascade.dir)")
    parser.add_argument("--out", required=True, help="reports/<name>: runs, results.json")
    parser.add_argument("--results_md", help="also write the report there (e.g. docs/results.md)")
    parser.add_argument(
        "--shard", default="0/1", help="I/N: train only every N-th run from the I-th (parallel workers)"
    )
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's, Keras' and absl's own logs too")
    args = parser.parse_args(argv)
    try:
        index, count = (int(v) for v in args.shard.split("/"))
        plan = load_plan(args.plan, args.data_dir)
        summary = run_plan(plan, args.out, shard=(index, count), plan_path=args.plan)
    except (config_io.ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary is None:
        print(f"[study] shard {args.shard} done; run again without --shard to collect the report")
        return 0
    from dnr_tf.report import write_report

    path = write_report(summary, args.out, args.results_md)
    print(f"[study] {len(summary['runs'])} runs; results in {args.out}/results.json, report {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
