"""`python -m dnr_tf.experiments`: run a study plan (many configs x seeds x data sets), resumably.

Example:
    python -m dnr_tf.experiments --plan configs/study/ml100k.yaml --data_dir data/ml100k \\
        --out reports/ml100k

A plan (YAML) names data sets, seeds, overrides applied to every run, and rows:
    name: ml100k
    seeds: [0, 1, 2, 3, 4]
    set: {train.epochs: 10}
    tune_trials: 8                                 # trials of every tuned row (equal budgets)
    tune_seed: 0                                   # the trials' training seed; seeds the draws
    datasets:
      cascade: {dir: data/ml100k, label: "ML-100K, MF (weak)"}   # --data_dir replaces this dir
      paper: {dir: data/ml100k_paper, pipeline: configs/pipeline/ml100k_paper.yaml,
              input: ../shared/data/ml-100k/u.data, leaky: true, tune: {from: cascade}}
    rows:
      - {name: prm_concat, config: configs/ml100k_prm_concat.yaml, tables: [t1], datasets: [cascade, paper],
         arm: direct, tune: {space: {train.learning_rate: {loguniform: [1e-4, 3e-3]}}}}
      - {name: dnr_b_lc0.1, config: configs/ml100k_dnr_b.yaml, set: {dnr.lambda_c: 0.1},
         tables: [fig3_lambda_c], seeds: [0, 1], question: "Does a small lambda_c help?", reference: prm_concat}
    robustness: [gauss_0.05, gauss_0.1, gauss_0.2, square, sqrt, shuffle]

A data set with a `pipeline` config (and `pipeline_set` overrides) is built first when its dir
holds no `schema.json`. Without `tune`, every run (row x data set x seed) writes
`<out>/runs/<row>__<dataset>__s<seed>/` (the training run) and `result.json` (config, seed, best
epoch, validation and test metrics, robustness, wall time). With `tune` (syntax: `dnr_tf.tuning`),
the row first runs its trials `<row>__<dataset>__t<k>/` (seed `tune_seed`, setting k of a random
search), picks the trial with the highest validation monitor, then runs its seeds with that setting;
the seed equal to `tune_seed` reuses the chosen trial (the same config and seed: the same run) when
that trial records its test lists' ids (`per_list_test_ids`; trials from before 2026-12-05 do not, and
their seed is trained again so that every seed's lists can be paired by id). A
run with a `result.json` is never redone, and a half-done run resumes from its backup. At the end,
`<out>/results.json` collects every seed run (`runs`) and every trial (`trials`), and
`dnr_tf.report` writes the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

from dnr_tf import config_io, provenance, quiet, tuning
from dnr_tf.config import ExperimentConfig

PHASES = ("all", "tune", "final")


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a plan.

    Attributes:
        arm: what the row is in a comparison: `direct`, `dnr_b`, `dnr_g`, `calibrated`, or anything
            (an ablation).
        question: the question an ablation row answers.
        reference: the row it is compared with.
        tune: random search (`dnr_tf.tuning`); None: the config as written.
    """

    name: str
    config: str
    tables: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ("cascade",)
    seeds: tuple[int, ...] | None = None
    set: dict | None = None
    arm: str = ""
    question: str = ""
    reference: str = ""
    tune: dict | None = None


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One data set of a plan.

    Attributes:
        label: what the report calls it, e.g. "ML-100K, MF (weak)".
        leaky: built with the paper's construction (labels leak); reports say so.
        pipeline_set: `--set KEY=VALUE` overrides of the pipeline config when it is built.
        set: training overrides for every run on it (after the plan's, before the row's).
        tune: `{trials: n}` or `{from: DATASET}` for every tuned row on it (a row's own
            `tune.datasets.<name>` wins).
        robustness: the perturbations evaluated on it (None: the plan's).
        seeds: the seeds of every row on it that does not give its own (None: the plan's).
    """

    dir: str
    pipeline: str | None = None
    input: str | None = None
    label: str = ""
    leaky: bool = False
    pipeline_set: dict | None = None
    set: dict | None = None
    tune: dict | None = None
    robustness: tuple[str, ...] | None = None
    seeds: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    rows: tuple[Row, ...]
    datasets: dict
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    set: dict | None = None
    robustness: tuple[str, ...] = ()
    tune_trials: int | None = None
    tune_seed: int = 0


@dataclasses.dataclass(frozen=True)
class Work:
    """One run of a plan: a trial (`k` set) or a seed run of the row's setting."""

    row: Row
    dataset: str
    seed: int
    k: int | None = None

    @property
    def run(self) -> str:
        return (
            trial_id(self.row.name, self.dataset, self.k)
            if self.k is not None
            else run_id(self.row.name, self.dataset, self.seed)
        )


def load_plan(path: str, data_dir: str | None = None) -> Plan:
    """Reads and checks a plan: data sets, row configs, search spaces and equal budgets, before any work."""
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
    names = [row.name for row in plan.rows]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise config_io.ConfigError(f"rows {duplicates} appear more than once in the plan")
    for name, ds in datasets.items():
        if ds.tune is not None:
            tuning.check_override(ds.tune, f"datasets.{name}.tune")
    for row in plan.rows:
        if not os.path.exists(row.config):
            raise config_io.ConfigError(f"row {row.name}: config {row.config} not found")
        if row.reference and row.reference not in names:
            raise config_io.ConfigError(f"row {row.name}: reference {row.reference!r} is not a row of the plan")
        tuning.check_row(plan, row)
    tuning.check_budgets(plan)
    return plan


def check_configs(plan: Plan) -> int:
    """Builds the config of every run (every trial's setting included); a bad key or value is refused.

    Returns the number of runs checked.
    """
    count = 0
    for work in works_of(plan):
        setting = trial_setting(plan, work, None) if work.k is not None else {}
        try:
            experiment_config(plan, work.row, work.seed, work.dataset, setting)
        except config_io.ConfigError as e:
            raise config_io.ConfigError(f"run {work.run}: {e}") from None
        count += 1
    return count


def run_id(row: str, dataset: str, seed: int) -> str:
    return f"{row}__{dataset}__s{seed}"


def trial_id(row: str, dataset: str, k: int) -> str:
    return f"{row}__{dataset}__t{k}"


def row_seeds(plan: Plan, row: Row, dataset: str) -> tuple[int, ...]:
    """The row's own seeds, else its data set's, else the plan's."""
    if row.seeds is not None:
        return row.seeds
    ds = plan.datasets[dataset].seeds
    return ds if ds is not None else plan.seeds


def runs_of(plan: Plan):
    """(row, dataset name, seed) of every seed run, in plan order."""
    for row in plan.rows:
        for dataset in row.datasets:
            for seed in row_seeds(plan, row, dataset):
                yield row, dataset, seed


def works_of(plan: Plan, phase: str = "all") -> list[Work]:
    """Every run of the plan: the trials first (row by row), then the seed runs data set by data set
    (in the plan's order), seed by seed, every row of one seed together: a study stopped partway has
    every arm of its first data sets at the same seeds, not one arm on every data set."""
    trials = []
    for row in plan.rows:
        for dataset in row.datasets:
            tune = tuning.resolve(plan, row, dataset)
            if tune is not None and tune.source == dataset:
                trials += [Work(row, dataset, plan.tune_seed, k) for k in range(tune.trials)]
    order = {name: i for i, name in enumerate(plan.datasets)}
    finals = sorted(
        (Work(row, dataset, seed) for row, dataset, seed in runs_of(plan)),
        key=lambda w: (order[w.dataset], w.seed),  # stable: rows in plan order within a seed
    )
    return {"all": trials + finals, "tune": trials, "final": finals}[phase]


def _build_held_elsewhere(directory: str) -> bool:
    """True while another live process on this host holds the pipeline lock of `directory`."""
    from pipeline import publish

    try:
        with open(publish.lock_path(directory)) as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return False
    pid = holder.get("pid")
    return isinstance(pid, int) and pid != os.getpid() and publish._alive(pid)


class BuildError(Exception):
    """The pipeline refused or failed: its one-line reason."""


def _build_data_set(argv: list[str]) -> None:
    """`python -m pipeline.run ARGV` in a process of its own.

    Not in this one: the order in which stage 2 writes the records depends on the Beam runner's state
    in the process that runs it (measured on ML-100K, 2026-12-05: built after another data set in the
    same process, the same records came out in another order), and training's seeded shuffle follows
    that order. A fresh process gives every build of a data set the order of a plain CLI build.
    Its progress goes to this process's stdout.
    """
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.run", *argv], stdout=None, stderr=subprocess.PIPE, text=True, check=False
    )
    if done.returncode != 0:
        errors = [line[len("error: ") :] for line in done.stderr.splitlines() if line.startswith("error: ")]
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise BuildError(errors[-1] if errors else f"the pipeline failed: {tail[0]}")
    if done.stderr.strip():
        print(done.stderr.rstrip(), file=sys.stderr, flush=True)


def _pipeline_argv(ds: Dataset) -> list[str]:
    argv = ["--config", ds.pipeline, "--output_dir", ds.dir]
    if ds.input:
        argv += ["--input", ds.input]
    for key, value in (ds.pipeline_set or {}).items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    return argv


def check_built_config(name: str, ds: Dataset) -> None:
    """Refuses a data set directory built with another pipeline config than the plan's.

    The plan's config (its YAML and `pipeline_set`) is compared with the one the build recorded in
    `stats.json`, key by key, the input path aside (the data fingerprint covers what was read);
    keys only one side has (added to the pipeline later, at their default) are not compared.

    Raises:
        ValueError: one line naming the data set, its directory and the keys that differ.
    """
    stats_path = os.path.join(ds.dir, "stats.json")
    if not ds.pipeline or not os.path.exists(stats_path):
        return  # a data set the plan does not build: nothing to compare it with
    from dnr_tf.run_dir import _flat  # the flattening train uses to name a run's differing keys
    from pipeline.run import parse_args

    cfg, _, _ = parse_args(_pipeline_argv(ds))
    want = _flat(config_io.to_dict(cfg))
    with open(stats_path) as f:
        built = _flat(json.load(f).get("config", {}))
    differ = sorted(k for k in want.keys() & built.keys() if k != "input" and want[k] != built[k])
    if differ:
        shown = ", ".join(f"{k} ({built[k]!r} built, {want[k]!r} planned)" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise ValueError(
            f"data set {name}: {ds.dir} was built with another pipeline config: {shown}{more}; "
            "move that directory away to rebuild it, or point the plan at another dir"
        )


def ensure_dataset(name: str, ds: Dataset, poll_s: float = 10.0) -> None:
    """Builds a data set with its pipeline config when its directory has no schema.json yet.

    Shards share data sets: while another shard's pipeline holds the directory's lock, this one
    waits for that build instead of failing on the lock.

    Raises:
        FileNotFoundError: no pipeline output and no pipeline config to build it.
        ValueError: the pipeline failed (its one-line reason, after the data set's name); a failed
            build leaves the directory as it was (`pipeline.publish`).
    """
    schema = os.path.join(ds.dir, "schema.json")
    for attempt in range(2):
        waited = False
        while not os.path.exists(schema) and _build_held_elsewhere(ds.dir):
            if not waited:
                print(f"[study] data set {name}: another shard is building {ds.dir}; waiting", flush=True)
                waited = True
            time.sleep(poll_s)
        if os.path.exists(schema):
            check_built_config(name, ds)
            return
        if not ds.pipeline:
            raise FileNotFoundError(
                f"data set {name}: {ds.dir} holds no pipeline output and the plan gives no pipeline config"
            )
        print(f"[study] building data set {name} -> {ds.dir}", flush=True)
        try:
            _build_data_set(_pipeline_argv(ds))
        except BuildError as e:
            # Another shard took the lock between our check and our start: wait for its build.
            if attempt == 0 and _build_held_elsewhere(ds.dir):
                continue
            raise ValueError(f"data set {name}: {e}") from None
        if not os.path.exists(schema):
            raise ValueError(f"data set {name}: the pipeline left no {schema}")
        return


def experiment_config(
    plan: Plan, row: Row, seed: int, dataset: str | None = None, setting: dict | None = None
) -> ExperimentConfig:
    """The row's config with the plan's, the data set's, the row's and the tuned overrides, in that order."""
    data = config_io.load_yaml(row.config)
    ds_set = plan.datasets[dataset].set if dataset else None
    merged = {**(plan.set or {}), **(ds_set or {}), **(row.set or {}), **(setting or {})}
    overrides = [f"{k}={json.dumps(v)}" for k, v in merged.items()]
    overrides.append(f"train.seed={seed}")
    overrides.append(f"name={row.name}")
    return config_io.from_dict(ExperimentConfig, config_io.apply_overrides(data, overrides))


def trial_setting(plan: Plan, work: Work, out: str | None) -> dict | None:
    """Trial k's setting: a draw, or for trial 0 of a light re-tune the setting chosen on the data set
    it starts from (None while that one's trials are not all done). `out` None: a draw (to check configs).
    """
    tune = tuning.resolve(plan, work.row, work.dataset)
    if work.k == 0 and tune.warm and out is not None:
        record = tuning_record(plan, work.row, tune.warm, out)
        return None if record is None else dict(record["chosen"])
    return tuning.draw(tune.space, plan.tune_seed, work.row.name, work.dataset, work.k)


def row_fields(plan: Plan, row: Row) -> dict:
    return {"arm": row.arm, "question": row.question, "reference": row.reference}


def train_and_evaluate(cfg: ExperimentConfig, data_dir: str, model_dir: str, robustness, seed: int) -> dict:
    """Trains one run (resuming if half done) and evaluates it on test under every perturbation."""
    from dnr_tf import schema as schema_lib
    from dnr_tf.robustness import evaluate_perturbed
    from dnr_tf.runs import load_trained
    from dnr_tf.train import datasets, train

    trained = train(cfg, data_dir, model_dir, verbose=0)
    model, _, schema = load_trained(model_dir)
    _, _, test_ds = datasets(data_dir, cfg, schema_lib.load_schema(data_dir))
    robust = evaluate_perturbed(model, test_ds, robustness, k=cfg.train.k, seed=seed)
    return {
        "best_epoch": trained["best_epoch"],
        "epochs_run": trained["epochs_run"],  # with max_epochs: was the best epoch the last allowed?
        "max_epochs": trained["max_epochs"],
        "stopped_early": trained["stopped_early"],
        "valid": trained["valid"],
        "test": trained["test"],
        "robustness": {k: v for k, v in robust.items() if k != "per_list_ndcg"},
        "per_list_test_ndcg": robust["per_list_ndcg"],
        "per_list_test_ids": test_request_ids(data_dir, len(robust["per_list_ndcg"])),
        "seconds_per_epoch": trained["seconds_per_epoch"],
        "resumed_after": trained.get("resumed_after", []),  # a finished run of older code: none recorded
    }


def test_request_ids(data_dir: str, expected: int) -> list[str]:
    """The `request_id` of each test list, in the order `per_list_test_ndcg` holds them (file order).

    Two builds of one data set can hold the same lists in another order (README "The study"), so a
    paired comparison matches lists by these ids, not by position.
    """
    from dnr_tf import data as data_lib

    ids = [
        rid.decode()
        for batch in data_lib.make_dataset(data_lib.split_pattern(data_dir, "test"), 1024)
        for rid in batch["request_id"].numpy()
    ]
    if len(ids) != expected:
        raise ValueError(f"{data_dir}: {len(ids)} test request ids for {expected} per-list values")
    return ids


def run_one(
    plan: Plan,
    row: Row,
    dataset: str,
    seed: int,
    out: str,
    setting: dict | None = None,
    run: str | None = None,
    extra: dict | None = None,
) -> dict:
    """Trains one run (resuming if half done), evaluates it under every perturbation, saves result.json."""
    run = run or run_id(row.name, dataset, seed)
    cfg = experiment_config(plan, row, seed, dataset, setting)
    model_dir = os.path.join(out, "runs", run)
    start = time.time()
    ds = plan.datasets[dataset]
    robustness = plan.robustness if ds.robustness is None else ds.robustness
    trained = train_and_evaluate(cfg, ds.dir, model_dir, robustness, seed)
    result = {
        "run": run,
        "row": row.name,
        "dataset": dataset,
        "seed": seed,
        "tables": list(row.tables),
        **row_fields(plan, row),
        **(extra or {}),
        "config": config_io.to_dict(cfg),
        **trained,
        "wall_seconds": time.time() - start,
        **versions(ds.dir),
    }
    write_result(model_dir, result)
    return result


def versions(data_dir: str) -> dict:
    """`code`, `data` and `records`: what a run ran on (`dnr_tf.provenance`)."""
    return {
        "code": provenance.code_fingerprint(),
        "data": provenance.data_fingerprint(data_dir),
        "records": provenance.records_fingerprint(data_dir),
    }


def write_result(model_dir: str, result: dict) -> None:
    """result.json, written whole or not at all (it marks a run as done)."""
    os.makedirs(model_dir, exist_ok=True)
    tmp = os.path.join(model_dir, "result.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, os.path.join(model_dir, "result.json"))


def read_result(out: str, run: str) -> dict | None:
    path = os.path.join(out, "runs", run, "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def tuning_record(plan: Plan, row: Row, dataset: str, out: str) -> dict | None:
    """The row's tuning on `dataset` once all its trials are done: trials, chosen setting, budget.

    None while a trial is missing. Untuned rows get budget 0 and no trials.
    """
    tune = tuning.resolve(plan, row, dataset)
    if tune is None:
        return {
            "budget": 0,
            "tuned_on": None,
            "warm_from": None,
            "described": "untuned",
            "seed": None,
            "monitor": None,
            "trials": [],
            "chosen": {},
        }
    trials = []
    for k in range(tune.trials):
        result = read_result(out, trial_id(row.name, tune.source, k))
        if result is None:
            return None
        trials.append(result)
    monitor = trials[0]["config"]["train"]["monitor"]
    best = tuning.choose(trials, monitor)
    return {
        "budget": tune.trials,
        "tuned_on": tune.source,
        "warm_from": tune.warm,
        "described": tune.describe(plan, row),
        "seed": plan.tune_seed,
        "monitor": monitor,
        "space": tune.space,
        "trials": [{"run": t["run"], "setting": t["setting"], "valid": t["valid"].get(monitor)} for t in trials],
        "chosen": best["setting"],
        "chosen_trial": best["run"],
    }


def do_work(plan: Plan, work: Work, out: str) -> dict | None:
    """Runs one piece of work, or returns None when it must wait for its row's trials."""
    row, dataset = work.row, work.dataset
    if work.k is not None:
        setting = trial_setting(plan, work, out)
        if setting is None:
            return None
        extra = {"trial": work.k, "setting": setting, "phase": "tune"}
        try:
            return run_one(plan, row, dataset, work.seed, out, setting, work.run, extra)
        except Exception as e:  # noqa: BLE001 - a diverged trial is a result (never chosen); anything else raises
            if type(e).__name__ != "NonFiniteLoss":
                raise
            return failed_trial(plan, work, out, setting, extra, str(e))
    record = tuning_record(plan, row, dataset, out)
    if record is None:
        return None
    extra = {"phase": "final", "tuning": record}
    trial = read_result(out, record["chosen_trial"]) if record["tuned_on"] == dataset else None
    if trial is not None and work.seed == plan.tune_seed and "per_list_test_ids" in trial:
        # The chosen trial is this very run (same config, same seed): reuse it rather than train it twice.
        # A trial from before `per_list_test_ids` is not reused: its lists could be paired with the
        # other seeds' by position only, so seed 0 is trained again on the data set as built now.
        model_dir = os.path.join(out, "runs", work.run)
        src = os.path.join(out, "runs", record["chosen_trial"])
        shutil.copytree(src, model_dir, ignore=shutil.ignore_patterns("backup", "result.json*"), dirs_exist_ok=True)
        keep = {k: v for k, v in trial.items() if k not in ("trial", "setting", "phase")}
        result = {**keep, "run": work.run, **extra, "reused_trial": record["chosen_trial"]}
        write_result(model_dir, result)
        return result
    return run_one(plan, row, dataset, work.seed, out, record["chosen"], work.run, extra)


def failed_trial(plan: Plan, work: Work, out: str, setting: dict, extra: dict, error: str) -> dict:
    """The result of a trial whose training stopped on a non-finite loss: no scores, never chosen."""
    cfg = experiment_config(plan, work.row, work.seed, work.dataset, setting)
    result = {
        "run": work.run,
        "row": work.row.name,
        "dataset": work.dataset,
        "seed": work.seed,
        "tables": list(work.row.tables),
        **row_fields(plan, work.row),
        **extra,
        "config": config_io.to_dict(cfg),
        "failed": error,
        "best_epoch": None,
        "valid": {},
        "test": {},
        "wall_seconds": 0.0,
        **versions(plan.datasets[work.dataset].dir),
    }
    write_result(os.path.join(out, "runs", work.run), result)
    return result


def baselines(plan: Plan, out: str, build: bool = True) -> dict:
    """The retriever's order, a random order (and the oracle, where known) on each data set's test split.

    With `build` False, data sets not built yet are left out instead of built."""
    from dnr_tf.evaluate import evaluate_orders

    path = os.path.join(out, "baselines.json")
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            done = json.load(f)
    for name, ds in plan.datasets.items():
        if name not in done and any(name in row.datasets for row in plan.rows):
            if not build and not os.path.exists(os.path.join(ds.dir, "schema.json")):
                continue
            ensure_dataset(name, ds)
            done[name] = evaluate_orders(ds.dir, "test")
    with open(path, "w") as f:
        json.dump(done, f, indent=2)
    return done


def run_plan(
    plan: Plan,
    out: str,
    progress=print,
    shard: tuple[int, int] = (0, 1),
    plan_path: str = "",
    phase: str = "all",
    finished_only: bool = False,
) -> dict | None:
    """Runs every missing run of the plan, then writes `<out>/results.json` and returns it.

    With `shard` (i, n), only runs i, i + n, i + 2n, ... of the work list (trials first, then seed
    runs) are trained and None is returned: several processes can share a plan; a last call without a
    shard collects (and trains what is missing). A seed run of a tuned row waits for all the row's
    trials (and trial 0 of a light re-tune for the trials it starts from): a shard passes over it
    while another shard's trial is missing and retries it after its other work; a later call picks
    up what is still waiting. `phase`: `tune` runs only the trials,
    `final` only the seed runs (those whose trials are done), `all` both.

    With `finished_only`, nothing is trained or built: the finished runs are collected, and
    `results.json` names the runs still missing under `missing` (the reports say the study is partial).
    """
    if finished_only:
        return collect_finished(plan, out, plan_path)
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    check_configs(plan)
    todo = works_of(plan)
    wanted = {w.run for w in works_of(plan, phase)}
    index, count = shard
    mine = [(i, w) for i, w in enumerate(todo, 1) if (i - 1) % count == index and w.run in wanted]
    for name in dict.fromkeys(w.dataset for _, w in mine):  # before any work: inputs of data sets to build
        ds = plan.datasets[name]
        built = os.path.exists(os.path.join(ds.dir, "schema.json"))
        if not built and ds.input and "://" not in ds.input and not os.path.exists(ds.input):
            raise FileNotFoundError(f"data set {name}: input {ds.input} not found (nothing was trained)")
        if built:
            check_built_config(name, ds)
    waiting = True
    while waiting:
        waiting, progressed = [], False
        for i, work in mine:
            if read_result(out, work.run) is not None:
                continue
            ensure_dataset(work.dataset, plan.datasets[work.dataset])  # built when first needed, once
            result = do_work(plan, work, out)
            if result is None:
                waiting.append((i, work))
                continue
            progressed = True
            if "failed" in result:
                progress(f"[study] {i}/{len(todo)} {result['run']}: failed, never chosen ({result['failed']})")
                continue
            progress(
                f"[study] {i}/{len(todo)} {result['run']}: valid ndcg@6 {result['valid']['ndcg@6']:.4f} "
                f"(best epoch {result['best_epoch']}, {result['wall_seconds']:.0f}s)"
            )
        mine = waiting
        if waiting and not progressed:
            names = ", ".join(w.run for _, w in waiting[:3]) + (", ..." if len(waiting) > 3 else "")
            progress(f"[study] {len(waiting)} runs wait for trials of other shards ({names}): run again")
            break
    if count > 1 or phase != "all" or waiting:
        return None
    return collect_finished(plan, out, plan_path, build=True)


def collect_finished(plan: Plan, out: str, plan_path: str = "", build: bool = False) -> dict:
    """Writes `<out>/results.json` from the finished runs and returns it; `missing` lists the others.

    `build`: build the data sets the baselines need (a full collection); else leave out those not built.
    """
    results, trials, missing = [], [], []
    for work in works_of(plan):
        result = read_result(out, work.run)
        if result is None:
            missing.append(work.run)
        else:
            (trials if work.k is not None else results).append(result)
    provenance.check_one_version(results + trials)  # no table mixes code or data versions
    summary = {
        "plan": plan.name,
        "plan_path": plan_path,
        "tune_seed": plan.tune_seed,
        "datasets": {k: dataclasses.asdict(v) for k, v in plan.datasets.items()},
        "baselines": baselines(plan, out, build=build),
        "runs": results,
        "trials": trials,
    }
    if missing:
        summary["missing"] = missing
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f)
    return summary


def budget_table(plan: Plan) -> list[str]:
    """Lines `row dataset: trials, seeds` for `--dry_run`: what each arm gets, and the run counts."""
    lines = []
    for row in plan.rows:
        for dataset in row.datasets:
            tune = tuning.resolve(plan, row, dataset)
            how = "untuned" if tune is None else tune.describe(plan, row)
            lines.append(f"{row.name:28s} {dataset:16s} {how:24s} seeds {list(row_seeds(plan, row, dataset))}")
    works = works_of(plan)
    trials = sum(w.k is not None for w in works)
    reused = sum(
        1
        for w in works
        if w.k is None
        and w.seed == plan.tune_seed
        and (t := tuning.resolve(plan, w.row, w.dataset)) is not None
        and t.source == w.dataset
    )
    lines.append(f"runs to train: {trials} trials + {len(works) - trials - reused} seed runs ({reused} reuse a trial)")
    return lines


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
    parser.add_argument(
        "--phase", choices=PHASES, default="all", help="tune: only the trials; final: only the seed runs; all: both"
    )
    parser.add_argument(
        "--dry_run", action="store_true", help="check the plan and every run's config, print the budgets, train nothing"
    )
    parser.add_argument(
        "--finished_only",
        action="store_true",
        help="collect the finished runs into results.json and the report, train and build nothing "
        "(a partial study: the runs still missing are named)",
    )
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's, Keras' and absl's own logs too")
    args = parser.parse_args(argv)
    try:
        try:
            index, count = (int(v) for v in args.shard.split("/"))
        except ValueError:
            raise ValueError(f"--shard {args.shard}: give I/N, two integers (e.g. 0/2)") from None
        if not 0 <= index < count:
            raise ValueError(f"--shard {args.shard}: I must be in [0, N)")
        config_io.check_output_dir(args.out, "--out")
        plan = load_plan(args.plan, args.data_dir)
        if args.dry_run:
            checked = check_configs(plan)
            print("\n".join(budget_table(plan)))
            print(f"[study] plan {args.plan}: {checked} run configs checked")
            return 0
        if args.finished_only and (count > 1 or args.phase != "all"):
            raise ValueError("--finished_only collects the whole plan: give it without --shard and --phase")
        shard, phase, finished = (index, count), args.phase, args.finished_only
        summary = run_plan(plan, args.out, shard=shard, plan_path=args.plan, phase=phase, finished_only=finished)
    except (config_io.ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary is None:
        print(f"[study] shard {args.shard} phase {args.phase} done; run again without --shard to collect the report")
        return 0
    from dnr_tf.report import write_report

    path = write_report(summary, args.out, args.results_md)
    print(f"[study] {len(summary['runs'])} runs; results in {args.out}/results.json, report {path}")
    if summary.get("missing"):
        print(f"[study] partial: {len(summary['missing'])} runs of the plan not finished (results.json 'missing')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
