"""Equal-budget random search for the study runner (`dnr_tf.experiments`): spaces, draws, budgets.

A plan row may carry
    tune: {trials: 8, space: {train.learning_rate: {loguniform: [1e-4, 3e-3]},
                              model.hidden_dim: {choice: [32, 64, 128]}},
           datasets: {beauty: {trials: 3}, sim70: {from: cascade}}}
and a plan data set `tune: {trials: n}`, `{from: DATASET}` or `{trials: n, from: DATASET}` for every
tuned row on it. The trial count on a data set is, first found: the row's `tune.datasets.<name>`, the
data set's `tune`, the row's `tune.trials`, the plan's `tune_trials`. `{from: D}` alone reuses the
setting the row chose on D (no trials here); `{trials: n, from: D}` re-tunes lightly: trial 0 is the
setting chosen on D, trials 1 .. n-1 are fresh draws, and the best of the n on this data set's
validation split wins (so a light re-tune is never worse on validation than the transferred setting).

Draw k of a row on a data set is seeded by (plan `tune_seed`, row, data set, k) alone, so it does
not depend on sharding, on the order of the plan or on the trial count (a larger budget extends it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random

from dnr_tf.config_io import ConfigError

SPEC_KINDS = ("loguniform", "uniform", "choice", "int")


@dataclasses.dataclass(frozen=True)
class Tuning:
    """How one row is tuned on one data set.

    Attributes:
        trials: random-search trials behind the chosen setting (on `source`).
        source: the data set whose validation split chose the setting (the row's own, or `from`'s).
        space: config key -> spec.
        warm: the data set whose chosen setting is trial 0 (a light re-tune), or None.
    """

    trials: int
    source: str
    space: dict
    warm: str | None = None

    def describe(self, plan, row) -> str:
        text = f"{self.trials} trials on {self.source}"
        if self.warm:
            text += f" (trial 0: the choice of {resolve_own(plan, row, self.warm).trials} trials on {self.warm})"
        return text


def check_space(space, where: str) -> None:
    """Refuses a malformed search space with one line naming the row and the key."""
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{where}.space must be a non-empty mapping of config key -> spec")
    for key, spec in space.items():
        at = f"{where}.space.{key}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPEC_KINDS:
            raise ConfigError(f"{at} must be one of {{{': ..., '.join(SPEC_KINDS)}: ...}}, not {spec!r}")
        kind, value = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{at}: choice needs a non-empty list")
            continue
        if not (isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)):
            raise ConfigError(f"{at}: {kind} needs [lo, hi], not {value!r}")
        lo, hi = value
        if not lo < hi:
            raise ConfigError(f"{at}: {kind} needs lo < hi, not {value!r}")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{at}: loguniform needs lo > 0, not {lo!r}")
        if kind == "int" and not all(isinstance(v, int) for v in value):
            raise ConfigError(f"{at}: int needs integer bounds, not {value!r}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def draw_seed(tune_seed: int, row: str, dataset: str, k: int) -> int:
    """A stable 64-bit seed (Python's `hash` of a string changes with every process)."""
    digest = hashlib.sha256(f"{tune_seed}|{row}|{dataset}|{k}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def draw(space: dict, tune_seed: int, row: str, dataset: str, k: int) -> dict:
    """Trial k's setting: one value per key (keys in sorted order), inside the space.

    `loguniform` [lo, hi]: exp of a uniform draw in [log lo, log hi]; `uniform` [lo, hi]; `int`
    [lo, hi]: an integer, both ends included; `choice`: one of the list, equally likely.
    """
    rng = random.Random(draw_seed(tune_seed, row, dataset, k))
    setting = {}
    for key in sorted(space):
        kind, value = next(iter(space[key].items()))
        if kind == "choice":
            setting[key] = value[rng.randrange(len(value))]
        elif kind == "int":
            setting[key] = rng.randint(value[0], value[1])
        elif kind == "uniform":
            setting[key] = rng.uniform(value[0], value[1])
        else:
            setting[key] = math.exp(rng.uniform(math.log(value[0]), math.log(value[1])))
    return setting


def choose(trials: list[dict], monitor: str) -> dict:
    """The trial with the highest validation `monitor` (the first on a tie). Test is never read.

    A trial that failed (a non-finite loss: no validation score) or scored NaN is never chosen.

    Args:
        trials: result dicts of one row's trials, each with `trial` (k) and `valid` (metrics).
    """
    scored = [t for t in trials if math.isfinite(t["valid"].get(monitor, math.nan))]
    if not scored:
        raise ValueError(
            f"no trial of {', '.join(t['run'] for t in trials) or 'none'} has a finite validation {monitor}"
        )
    return max(sorted(scored, key=lambda t: t["trial"]), key=lambda t: t["valid"][monitor])


def resolve(plan, row, dataset: str) -> Tuning | None:
    """How `row` is tuned on `dataset` (None: not tuned, it runs its config as written)."""
    if row.tune is None:
        return None
    tune = row.tune
    where = f"row {row.name}: tune"
    per_dataset = tune.get("datasets") or {}
    override = per_dataset.get(dataset)
    if override is None:
        override = plan.datasets[dataset].tune or {}
    if "from" in override and "trials" not in override:
        source = override["from"]
        if source == dataset or source not in row.datasets:
            raise ConfigError(
                f"{where}: from {source!r} on data set {dataset} must name another data set the row runs on "
                f"({', '.join(d for d in row.datasets if d != dataset) or 'none'})"
            )
        own = resolve_own(plan, row, source)
        return Tuning(trials=own.trials, source=source, space=tune["space"])
    return resolve_own(plan, row, dataset)


def resolve_own(plan, row, dataset: str) -> Tuning:
    """The row's own tuning on `dataset`; refuses a `from` there (no chains of reuse)."""
    tune = row.tune
    where = f"row {row.name}: tune"
    override = (tune.get("datasets") or {}).get(dataset)
    if override is None:
        override = plan.datasets[dataset].tune or {}
    if "from" in override and "trials" not in override:
        raise ConfigError(f"{where}: data set {dataset} reuses another's setting, so no row can take it `from` there")
    trials = override.get("trials", tune.get("trials", plan.tune_trials))
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ConfigError(f"{where}: trials on {dataset} must be an integer >= 1 (row tune.trials or plan tune_trials)")
    warm = override.get("from")
    if warm is not None:
        if warm == dataset or warm not in row.datasets:
            raise ConfigError(
                f"{where}: from {warm!r} on data set {dataset} must name another data set the row runs on "
                f"({', '.join(d for d in row.datasets if d != dataset) or 'none'})"
            )
        if resolve_own(plan, row, warm).warm is not None:
            raise ConfigError(f"{where}: data set {warm} re-tunes from another, so {dataset} cannot start from it")
    return Tuning(trials=trials, source=dataset, space=tune["space"], warm=warm)


def check_row(plan, row) -> None:
    """Refuses a malformed `tune` of one row before any work."""
    if row.tune is None:
        return
    where = f"row {row.name}: tune"
    if not isinstance(row.tune, dict):
        raise ConfigError(f"{where} must be a mapping")
    unknown = sorted(set(row.tune) - {"trials", "space", "datasets"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} (known: datasets, space, trials)")
    check_space(row.tune.get("space"), where)
    per_dataset = row.tune.get("datasets") or {}
    for name, override in per_dataset.items():
        if name not in row.datasets:
            raise ConfigError(f"{where}.datasets.{name}: the row does not run on that data set")
        check_override(override, f"{where}.datasets.{name}")
    for dataset in row.datasets:
        resolve(plan, row, dataset)


def check_override(override, where: str) -> None:
    if not isinstance(override, dict) or not override or set(override) - {"trials", "from"}:
        raise ConfigError(
            f"{where} must be {{trials: N}}, {{from: DATASET}} or {{trials: N, from: DATASET}}, not {override!r}"
        )


def check_budgets(plan) -> None:
    """Every row of one table on one data set must have the same budget (trials, tuned on).

    Untuned rows have budget 0; a row that reuses another data set's setting carries that one's.
    """
    budgets: dict[tuple[str, str], dict[str, str]] = {}
    for row in plan.rows:
        for dataset in row.datasets:
            tuning = resolve(plan, row, dataset)
            text = "untuned" if tuning is None else tuning.describe(plan, row)
            for table in row.tables:
                budgets.setdefault((table, dataset), {})[row.name] = text
    for (table, dataset), rows in budgets.items():
        if len(set(rows.values())) > 1:
            listed = ", ".join(f"{name} {text}" for name, text in rows.items())
            raise ConfigError(
                f"unequal tuning budgets in table {table} on data set {dataset}: {listed} "
                "(every row of one table gets the same budget)"
            )
