"""The headline document over one or more studies: `python -m dnr_tf.report --headline FILES --out MD`.

Reads `reports/*/results.json` and writes a Markdown file that opens with the headline table:
for each data set (its `label`, e.g. "ML-100K, MF (weak)"), the best direct reranker, DNR-B, DNR-G
and the calibrated sampler, each with clean test NDCG@6, its drop under the retrained retriever's
scores, and its difference to the best direct row with a 95% interval and a Holm-corrected p. Then
the full metrics of those rows, the paper's leaky construction in its own section, the ablations
(rows with a `question`), and each study's full report.

Fields read from `results.json` (later fields default, so that older results still load):
- per run: `row`, `dataset`, `seed`, `valid`, `test`, `per_list_test_ndcg`, `best_epoch`,
  `config.train.epochs`; `robustness.retrained` (else no drop is shown); `arm` (`direct`, `dnr_b`,
  `dnr_g`, `calibrated`, or another string); `question` and `reference` (ablation rows).
  A file whose runs carry no `arm` at all predates it: there a non-DNR row counts as `direct` and a
  DNR row's arm is its row name (rows named `dnr_b`, `dnr_g` are those arms).
- per data set (`datasets.<name>`): `dir`, `label` (default `<plan> / <name>`), `leaky` (default:
  true for a data set named `paper`, the paper's construction).

Choices: "best direct" is the `direct` row with the highest mean VALIDATION NDCG@6 (never test); where
a data set has several rows of another arm, the one with the highest validation NDCG@6 stands for it.
Every difference is taken over the seeds both rows have and the same test lists (`dnr_tf.stats`,
paired bootstrap over seeds and lists together); Holm's family is the comparisons of one table.
"""

from __future__ import annotations

import json
import os
import statistics

import numpy as np

from dnr_tf import report

# `no_score`: the reranker without the retriever's score, beside the arms: how much the best direct row
# owes to x at all.
HEADLINE_ARMS = ("no_score", "dnr_b", "dnr_g", "calibrated")
ARM_NAMES = {
    "direct": "best direct",
    "no_score": "no score",
    "dnr_b": "DNR-B",
    "dnr_g": "DNR-G",
    "calibrated": "calibrated sampler",
}
FULL_METRICS = ("hit@6", "ndcg@6", "map@6", "f1@6", "auc")


def load_summaries(paths: list[str]) -> list[tuple[str, dict]]:
    """(path, results.json content) of each file; a ValueError naming the file for one that cannot serve."""
    out = []
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such results.json")
        try:
            with open(path) as f:
                summary = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}: not JSON ({e.msg})") from None
        for key in ("runs", "datasets"):
            if key not in summary:
                raise ValueError(f"{path}: no `{key}` key; is it a study's results.json?")
        for i, run in enumerate(summary["runs"]):
            missing = [k for k in ("row", "dataset", "seed", "valid", "test", "per_list_test_ndcg") if k not in run]
            if missing:
                raise ValueError(f"{path}: runs[{i}] lacks {missing}")
        out.append((path, summary))
    # One code version across every file too (each plan's runs were checked when it was collected):
    # an older report's runs, without a recorded version, do not share a table with the study's.
    from dnr_tf import provenance

    provenance.check_one_version(
        [{**run, "dataset": f"{path}:{run['dataset']}"} for path, summary in out for run in summary["runs"]]
    )
    return out


class DataSet:
    """The rows of one data set of one study: name -> runs (sorted by seed), with their arms."""

    def __init__(self, summary: dict, name: str):
        self.plan = summary.get("plan", "")
        info = summary["datasets"].get(name, {})
        self.name = name
        self.label = info.get("label") or f"{self.plan} / {name}"
        self.leaky = bool(info.get("leaky", name == "paper"))
        self.baselines = summary.get("baselines", {}).get(name, {}).get("metrics", {})
        runs = summary["runs"]
        explicit = any("arm" in r for r in runs)
        self.inferred = not explicit
        self.rows: dict[str, list[dict]] = {}
        for (ds, row), rs in report.group(runs).items():
            if ds == name:
                self.rows[row] = rs
        self.arm = {}
        for row, rs in self.rows.items():
            if explicit:
                self.arm[row] = rs[0].get("arm")
            else:
                self.arm[row] = "direct" if not rs[0].get("config", {}).get("dnr", {}).get("enabled") else row

    def valid(self, row: str) -> float:
        return float(np.mean([r["valid"]["ndcg@6"] for r in self.rows[row]]))

    def best(self, arm: str) -> str | None:
        """The row of `arm` with the highest mean validation NDCG@6 (ties: the first name)."""
        rows = sorted(r for r, a in self.arm.items() if a == arm)
        return max(rows, key=self.valid) if rows else None

    def display(self) -> str:
        return f"{self.label} (leaky)" if self.leaky and "leaky" not in self.label else self.label


def data_sets(summaries: list[tuple[str, dict]]) -> list[DataSet]:
    """Every data set with runs, in file order then the plan's order of data sets."""
    out = []
    for _, summary in summaries:
        used = {r["dataset"] for r in summary["runs"]}
        names = [n for n in summary["datasets"] if n in used] + sorted(used - set(summary["datasets"]))
        out += [DataSet(summary, n) for n in names]
    return out


def _epochs(runs) -> str:
    """min/median/max best epoch, and how many runs selected their last allowed epoch."""
    best = [r["best_epoch"] for r in runs if r.get("best_epoch") is not None]
    if not best:
        return ""
    last = sum(
        1
        for r in runs
        if r.get("best_epoch") is not None and r["best_epoch"] == r.get("config", {}).get("train", {}).get("epochs")
    )
    return f"{min(best)}/{statistics.median(best):g}/{max(best)} ({last} of {len(best)} at last)"


def _drop(runs) -> str:
    drops = [
        r["robustness"]["clean"]["ndcg@6"] - r["robustness"]["retrained"]["ndcg@6"]
        for r in runs
        if "retrained" in r.get("robustness", {}) and "clean" in r["robustness"]
    ]
    if not drops:
        return "n/a"
    cell = report._fmt(drops)
    return cell if len(drops) == len(runs) else f"{cell} ({len(drops)} seeds)"


def comparison_table(entries, resamples: int) -> tuple[list[str], list[dict]]:
    """Rows (data set, arm, row name, reference row name or None) -> the headline-style table and its data.

    The family of Holm's correction is every comparison of this table.
    """
    comparisons = [
        report.compare(ds.rows[row], ds.rows[ref], resamples) if ref and ref != row else None
        for ds, _, row, ref in entries
    ]
    adjusted = report.holm_family(comparisons)
    lines = [
        "| data set | arm | row | test NDCG@6 | drop, retrained x | NDCG@6 - best direct [95% CI] | p (Holm) "
        "| seeds | best epoch min/median/max |",
        "|---" * 9 + "|",
    ]
    data = []
    for (ds, arm, row, ref), c, p in zip(entries, comparisons, adjusted, strict=True):
        runs = ds.rows[row]
        shown = "direct" if arm == "direct" and row != ref else ARM_NAMES.get(arm, arm or "")
        lines.append(
            f"| {ds.display()} | {shown} | `{row}` | {report._fmt([r['test']['ndcg@6'] for r in runs])} "
            f"| {_drop(runs)} | {report._diff(c) if c else ('reference' if row == ref else '')} "
            f"| {report._p(p)} | {len(runs)} | {_epochs(runs)} |"
        )
        data.append(
            {
                "label": ds.label,
                "dataset": ds.name,
                "plan": ds.plan,
                "leaky": ds.leaky,
                "arm": arm,
                "row": row,
                "reference": ref,
                "seeds": [r["seed"] for r in runs],
                "test_ndcg@6": report.mean_std([r["test"]["ndcg@6"] for r in runs]),
                "valid_ndcg@6": ds.valid(row),
                **(report._cmp_data(c, p) if c else {}),
            }
        )
    return lines, data


def full_table(entries, resamples: int) -> list[str]:
    """H@6, NDCG@6 (with its seed x list interval), MAP@6, F1@6, AUC of the rows, beside the retriever's order."""
    head = " | ".join(m.upper() for m in FULL_METRICS)
    lines = [
        f"| data set | row | seeds | {head} | NDCG@6 95% CI (seeds x lists) | valid NDCG@6 |",
        "|---" * (len(FULL_METRICS) + 5) + "|",
    ]
    shown = set()
    for ds, _, row, _ in entries:
        if id(ds) not in shown:
            shown.add(id(ds))
            for name in ("oracle_order", "retriever_order", "random_order"):
                if name in ds.baselines:
                    cells = " | ".join(f"{ds.baselines[name].get(m, float('nan')):.4f}" for m in FULL_METRICS)
                    lines.append(f"| {ds.display()} | {name.replace('_', ' ')} | | {cells} | | |")
        runs = ds.rows[row]
        cells = " | ".join(report._fmt([r["test"][m] for r in runs]) for m in FULL_METRICS)
        per_list = report.per_list_matrix(runs)
        if report.lists_matched(runs):
            per_list = per_list[:, np.isfinite(per_list).all(axis=0)]
            ci = report.stats.bootstrap_mean(per_list, resamples=resamples) if per_list.size else None
        else:  # each run's lists drawn on their own
            rows = [row[np.isfinite(row)] for row in per_list]
            ci = report.stats.bootstrap_mean_unpaired(rows, resamples=resamples) if all(r.size for r in rows) else None
        ci_cell = f"[{ci.low:.4f}, {ci.high:.4f}]" if ci else ""
        valid = report._fmt([r["valid"]["ndcg@6"] for r in runs])
        lines.append(f"| {ds.display()} | `{row}` | {len(runs)} | {cells} | {ci_cell} | {valid} |")
    return lines


def headline_entries(sets: list[DataSet], leaky: bool) -> list[tuple]:
    """(data set, arm, row, reference) for the headline (or, with `leaky`, the leaky section's) table.

    Headline: per data set the best direct row, then the best row of each of HEADLINE_ARMS, each
    compared with the best direct row. Leaky section: every direct row and every row of
    HEADLINE_ARMS (the paper's construction runs PRM with and without the score), each compared
    with the best direct row.
    """
    entries = []
    for ds in sets:
        if ds.leaky != leaky:
            continue
        ref = ds.best("direct")
        if leaky:
            direct = sorted((r for r, a in ds.arm.items() if a == "direct"), key=lambda r: (r != ref, r))
            rows = [("direct", r) for r in direct]
            rows += [(arm, r) for arm in HEADLINE_ARMS for r in sorted(x for x, a in ds.arm.items() if a == arm)]
        else:
            rows = [(arm, ds.best(arm)) for arm in ("direct", *HEADLINE_ARMS) if ds.best(arm)]
        entries += [(ds, arm, row, ref) for arm, row in rows]
    return entries


def ablation_table(sets: list[DataSet], resamples: int) -> tuple[list[str], list[dict]]:
    """Rows with a `question`, each against its `reference` row (default: the data set's DNR-B row)."""
    entries = []
    for ds in sets:
        for row in sorted(ds.rows):
            question = ds.rows[row][0].get("question")
            if question:
                ref = ds.rows[row][0].get("reference") or ds.best("dnr_b")
                entries.append((ds, row, question, ref if ref in ds.rows else None))
    if not entries:
        return [], []
    comparisons = [
        report.compare(ds.rows[row], ds.rows[ref], resamples) if ref and ref != row else None
        for ds, row, _, ref in entries
    ]
    adjusted = report.holm_family(comparisons)
    lines = [
        "| data set | row | question | test NDCG@6 | seeds | reference | NDCG@6 - reference [95% CI] | p (Holm) |",
        "|---" * 8 + "|",
    ]
    data = []
    for (ds, row, question, ref), c, p in zip(entries, comparisons, adjusted, strict=True):
        runs = ds.rows[row]
        lines.append(
            f"| {ds.display()} | `{row}` | {question} | {report._fmt([r['test']['ndcg@6'] for r in runs])} "
            f"| {len(runs)} | {f'`{ref}`' if ref else ''} | {report._diff(c)} | {report._p(p)} |"
        )
        data.append({"label": ds.label, "row": row, "question": question, "reference": ref, **report._cmp_data(c, p)})
    return lines, data


def partial_notice(summaries: list[tuple[str, dict]]) -> list[str]:
    """A paragraph naming the studies collected with runs still missing (`experiments --finished_only`)."""
    partial = [(path, summary["missing"]) for path, summary in summaries if summary.get("missing")]
    if not partial:
        return []
    named = "; ".join(
        f"`{path}`: {len(missing)} runs missing ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})"
        for path, missing in partial
    )
    return [
        f"**Partial study.** Collected before every run had finished: {named}. A row holds the seeds that "
        "finished (its seed count says how many); rows and data sets without a finished run are absent.",
        "",
    ]


def headline(summaries: list[tuple[str, dict]], resamples: int = report.stats.RESAMPLES) -> tuple[list[str], dict]:
    """Markdown lines of the headline, full, leaky and ablation tables, and those tables as data."""
    sets = data_sets(summaries)
    lines, data = [], {}
    main = headline_entries(sets, leaky=False)
    what = (
        "Test NDCG@6 mean ± std over seeds; drop = clean minus NDCG@6 with the retrained retriever's scores in "
        "place of x (same lists), mean ± std over seeds; the difference to the data set's best direct row (the "
        "`direct` row with the best mean validation NDCG@6) is over the seeds both rows have, with a 95% "
        "interval from a paired bootstrap that resamples seeds and test lists together (2,000 replicates), and "
        "its two-sided bootstrap p after Holm's correction over the {n} comparisons of this table. Best epoch: "
        "min/median/max over seeds, and how many runs selected the last epoch they were allowed (not converged)."
    )
    lines += ["## Headline: best direct reranker, DNR-B, DNR-G and the calibrated sampler", ""]
    lines += partial_notice(summaries)
    inferred = sorted({ds.plan for ds in sets if ds.inferred})
    if inferred:
        lines += [
            f"Results of {', '.join(f'`{p}`' for p in inferred)} predate the run field `arm`: there every non-DNR "
            "row competes as `direct` (ablation rows too) and a DNR row's arm is its name.",
            "",
        ]
    if main:
        tlines, data["headline"] = comparison_table(main, resamples)
        lines += [*tlines, "", what.format(n=sum(1 for e in main if e[3] and e[3] != e[2])), ""]
        lines += ["### Full metrics of the headline rows", "", *full_table(main, resamples), ""]
    else:
        lines += [
            "No leak-free data set of these results has a row of arm `direct`, `dnr_b`, `dnr_g` or `calibrated`.",
            "",
        ]
    leaky = headline_entries(sets, leaky=True)
    if leaky:
        tlines, data["leaky"] = comparison_table(leaky, resamples)
        lines += [
            "## The paper's construction (leaky: for comparison with the paper only)",
            "",
            "Appendix C.1 as written: the retriever saw most targets and the 6 targets are inserted into its",
            "top 44, so these lists leak the labels (../shared/PROTOCOL.md). Every direct row is shown; each",
            "other row is compared with the best direct one by validation.",
            "",
            *tlines,
            "",
            "Columns as in the headline; Holm's correction over the "
            f"{sum(1 for e in leaky if e[3] and e[3] != e[2])} comparisons of this table.",
            "",
            *full_table(leaky, resamples),
            "",
        ]
    ab_lines, ab_data = ablation_table(sets, resamples)
    if ab_lines:
        data["ablations"] = ab_data
        lines += [
            "## Ablations: DNR's own choices",
            "",
            *ab_lines,
            "",
            "Each row against its reference (the row's `reference`, else the data set's DNR-B row), over the "
            "seeds both have; 95% interval from the paired seed x list bootstrap; p Holm-corrected over the "
            f"{sum(1 for e in ab_data if e['diff'] is not None)} comparisons of this table.",
            "",
        ]
    return lines, data


def write_headline(summaries: list[tuple[str, dict]], md_path: str, details: bool = True) -> str:
    """Writes the headline document (and, with `details`, every study's full report below it) to `md_path`."""
    md_dir = os.path.dirname(os.path.abspath(md_path))
    fig_dir = os.path.join(md_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    paths = [p for p, _ in summaries]
    lines = [
        "# Results",
        "",
        "Generated by `python -m dnr_tf.report --headline "
        + " ".join(paths)
        + f" --out {md_path}`; do not edit by hand.",
        "Each study's runs: `python -m dnr_tf.experiments --plan <its plan> --out <its folder>` (its plan is named "
        "in its section below). Metrics as in ../shared/PROTOCOL.md, K = 6, on each data set's test lists.",
        "",
    ]
    body, _ = headline(summaries)
    lines += body
    if details:
        for path, summary in summaries:
            out = os.path.dirname(os.path.abspath(path))
            rel = os.path.relpath(fig_dir, md_dir)
            runs = summary["runs"]
            epochs = sorted({r.get("config", {}).get("train", {}).get("epochs") for r in runs} - {None})
            lines += [
                f"## Study `{summary.get('plan', '')}` ({path}; plan {summary.get('plan_path') or 'unknown'})",
                "",
                f"{len(runs)} runs; epochs a run {epochs}; seeds {sorted({r['seed'] for r in runs})}.",
                "",
            ]
            study, _ = report.study_lines(summary, out, fig_dir, rel, level=3, prefix=f"{summary.get('plan', '')}_")
            lines += study
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return md_path
