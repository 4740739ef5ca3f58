"""The study's report: tables with mean +- std over seeds, paired bootstrap intervals, robustness, figures.

Used by `python -m dnr_tf.experiments` at the end of a plan; also
`python -m dnr_tf.report --out reports/ml100k [--results_md docs/results.md]` to rewrite one study's
report from its `results.json` alone, and
`python -m dnr_tf.report --headline reports/study/results.json --out docs/results.md` for the document
that opens with the headline table over every study (see `headline`).

Comparisons (`dnr_tf.stats`): the difference of test NDCG@6 between two rows, over the seeds BOTH rows
have (never a row's other seeds) and the same test lists, from a paired bootstrap that resamples
seeds and lists together (2,000 replicates): the mean difference and its 95% percentile interval
first, then the two-sided bootstrap p-value after Holm's correction within the table's family of
comparisons. In a study table the family is the DNR rows against the table's reference, the best
non-DNR row by mean **validation** NDCG@6 (never test).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict

import numpy as np

from dnr_tf import stats

METRICS = ("hit@6", "ndcg@6", "map@6", "f1@6", "auc")
SWEEPS = {"fig3_lambda_c": "dnr.lambda_c", "fig3_lambda_m": "dnr.lambda_m", "fig3_lambda_e": "dnr.lambda_e"}
TABLE_TITLES = {
    "t1": "Table 1 analog: rerankers, without and with the score, and DNR",
    "t2": "Table 2 analog: ways to feed the retriever score",
    "t3": "Table 3 analog: DNR ablations",
    "calibrated": "Beyond the paper: samplers whose x' is as informative as the real x",
    "nopos": "Position embedding off: x is the reranker's only view of the retriever's order",
}


def group(results):
    """(dataset, row) -> runs sorted by seed."""
    out = defaultdict(list)
    for r in results:
        out[(r["dataset"], r["row"])].append(r)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in out.items()}


def mean_std(values):
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def shared_seeds(a_runs, b_runs) -> list[int]:
    """The seeds both rows ran with, sorted."""
    return sorted({r["seed"] for r in a_runs} & {r["seed"] for r in b_runs})


def lists_matched(runs) -> bool:
    """Whether column j of `per_list_matrix(runs)` is the same test list in every run: all recorded
    their list ids. (Runs without them are compared unpaired: `stats.unpaired_difference`.)"""
    return all("per_list_test_ids" in r for r in runs)


def per_list_matrix(runs) -> np.ndarray:
    """`[runs, lists]` per-list test NDCG, column j the same test list in every run.

    Runs that record `per_list_test_ids` are matched by id (two builds of one data set can hold the
    same lists in another order). Without ids in every run, the stored order is returned, and its
    columns need not be the same lists (`lists_matched` is False: compare those runs unpaired).
    """
    if lists_matched(runs):
        order = runs[0]["per_list_test_ids"]
        rows = []
        for r in runs:
            where = {rid: j for j, rid in enumerate(r["per_list_test_ids"])}
            if set(where) != set(order):
                raise ValueError(f"run {r.get('run', '?')}: its test lists are not those of {runs[0].get('run', '?')}")
            values = r["per_list_test_ndcg"]
            rows.append([values[where[rid]] for rid in order])
        return np.array(rows, dtype=np.float64)
    return np.array([r["per_list_test_ndcg"] for r in runs], dtype=np.float64)


def compare(a_runs, b_runs, resamples: int = stats.RESAMPLES) -> stats.Interval | None:
    """Test NDCG@6 of row a minus row b over their shared seeds and test lists (None without a shared seed).

    Lists whose per-list NDCG@6 is missing (NaN) in any of the runs compared are left out of both arms.
    """
    seeds = shared_seeds(a_runs, b_runs)
    if not seeds:
        return None
    a = {r["seed"]: r for r in a_runs}
    b = {r["seed"]: r for r in b_runs}
    lists = {len(x[s]["per_list_test_ndcg"]) for x in (a, b) for s in seeds}
    if len(lists) != 1:
        raise ValueError(
            f"rows {a_runs[0]['row']} and {b_runs[0]['row']} ({a_runs[0]['dataset']}): per_list_test_ndcg "
            f"lengths {sorted(lists)} differ; a paired comparison needs the same test lists"
        )
    runs = [a[s] for s in seeds] + [b[s] for s in seeds]
    matrix = per_list_matrix(runs)
    va, vb = matrix[: len(seeds)], matrix[len(seeds) :]
    if not lists_matched(runs):  # lists cannot be paired: each run's are drawn on their own
        return stats.unpaired_difference(
            [row[np.isfinite(row)] for row in va], [row[np.isfinite(row)] for row in vb], resamples=resamples
        )
    keep = np.isfinite(va).all(axis=0) & np.isfinite(vb).all(axis=0)
    if not keep.any():
        return None
    return stats.paired_difference(va[:, keep], vb[:, keep], resamples=resamples)


def holm_family(comparisons: list) -> list[float]:
    """Holm-adjusted p of each comparison of one table (NaN where it could not be made)."""
    raw = [c.p if c is not None else float("nan") for c in comparisons]
    return [float(p) for p in stats.holm(raw)] if raw else []


def _diff(c: stats.Interval | None) -> str:
    return "" if c is None else f"{c.mean:+.4f} [{c.low:+.4f}, {c.high:+.4f}]"


def _cmp_data(c: stats.Interval | None, p_holm: float) -> dict:
    if c is None:
        return {"diff": None, "ci95": None, "p_bootstrap": None, "p_holm": None, "seeds_shared": 0}
    return {"diff": c.mean, "ci95": [c.low, c.high], "p_bootstrap": c.p, "p_holm": p_holm, "seeds_shared": c.seeds}


def is_dnr(run) -> bool:
    return bool(run["config"]["dnr"]["enabled"])


def _fmt(values) -> str:
    m, s = mean_std(values)
    return f"{m:.4f} ± {s:.4f}"


def _p(p: float | None) -> str:
    return "" if p is None or math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else "<0.001")


def table(groups, baselines, dataset: str, tag: str) -> tuple[list[str], list[dict]]:
    """Markdown lines of one table, and its rows as data."""
    rows = [(name, runs) for (ds, name), runs in groups.items() if ds == dataset and tag in runs[0]["tables"]]
    if not rows:
        return [], []
    direct = [(n, r) for n, r in rows if not is_dnr(r[0])]
    ref = max(direct, key=lambda nr: np.mean([x["valid"]["ndcg@6"] for x in nr[1]])) if direct else None
    comparisons = {n: compare(r, ref[1]) for n, r in rows if ref is not None and is_dnr(r[0])}
    adjusted = dict(zip(comparisons, holm_family(list(comparisons.values())), strict=True))
    lines = [
        "| model | seeds | "
        + " | ".join(m.upper() for m in METRICS)
        + " | valid NDCG@6 | NDCG@6 - reference [95% CI] | p (Holm) |",
        "|---" * (len(METRICS) + 5) + "|",
    ]
    base = baselines.get(dataset, {}).get("metrics", {})
    for name in ("oracle_order", "retriever_order", "random_order"):
        if name in base:
            lines.append(
                f"| {name.replace('_', ' ')} | | " + " | ".join(f"{base[name][m]:.4f}" for m in METRICS) + " | | | |"
            )
    data = []
    for name, runs in rows:
        c, p_holm = comparisons.get(name), adjusted.get(name, float("nan"))
        label = f"**{name}**" if ref is not None and name == ref[0] else name
        cells = [_fmt([r["test"][m] for r in runs]) for m in METRICS]
        lines.append(
            f"| {label} | {len(runs)} | "
            + " | ".join(cells)
            + f" | {_fmt([r['valid']['ndcg@6'] for r in runs])} | {_diff(c)} | {_p(p_holm)} |"
        )
        data.append(
            {
                "row": name,
                "seeds": len(runs),
                "dnr": is_dnr(runs[0]),
                "test": {m: mean_std([r["test"][m] for r in runs]) for m in METRICS},
                "valid_ndcg@6": mean_std([r["valid"]["ndcg@6"] for r in runs]),
                "reference": ref[0] if ref else None,
                **(_cmp_data(c, p_holm) if name in comparisons else {}),
            }
        )
    if ref is not None:
        note = f"\nReference (best non-DNR row by validation NDCG@6, in bold): `{ref[0]}`."
        if comparisons:
            note += (
                " Each DNR row's difference to it is over the seeds both rows have, with a 95% interval from a "
                "paired bootstrap over seeds and test lists; p is Holm-corrected over the "
                f"{len(comparisons)} comparisons of this table."
            )
        lines.append(note)
    return lines, data


def own_backbone_lines(groups, dataset: str) -> tuple[list[str], list[dict]]:
    """DNR-B against the same reranker trained directly: rows `<x>_dnr_b` and `<x>_concat`, paired by seed."""
    names = {name: runs for (ds, name), runs in groups.items() if ds == dataset}
    pairs = [
        (n[: -len("_dnr_b")], n) for n in names if n.endswith("_dnr_b") and n[: -len("_dnr_b")] + "_concat" in names
    ]
    if not pairs:
        return [], []
    pairs.sort()
    comparisons = [compare(names[dnr_name], names[base + "_concat"]) for base, dnr_name in pairs]
    adjusted = holm_family(comparisons)
    lines = [
        "| reranker | seeds | direct (c score) | DNR-B | DNR-B - direct [95% CI] | p (Holm) |",
        "|---|---|---|---|---|---|",
    ]
    data = []
    for (base, dnr_name), c, p_holm in zip(pairs, comparisons, adjusted, strict=True):
        seeds = shared_seeds(names[dnr_name], names[base + "_concat"])
        a = [r["test"]["ndcg@6"] for r in names[base + "_concat"] if r["seed"] in seeds]
        b = [r["test"]["ndcg@6"] for r in names[dnr_name] if r["seed"] in seeds]
        lines.append(f"| {base} | {len(seeds)} | {_fmt(a)} | {_fmt(b)} | {_diff(c)} | {_p(p_holm)} |")
        data.append({"reranker": base, "seeds": len(seeds), **_cmp_data(c, p_holm)})
    lines.append(
        "\nTest NDCG@6, mean ± std over the seeds both rows have; each DNR-B row is paired with the same "
        "reranker trained directly (same seeds, same lists): the difference with its 95% interval from a paired "
        f"bootstrap over seeds and lists, p Holm-corrected over the {len(pairs)} pairs of this table. `prm_i8` is "
        "PRM rerun with the code of the other rows of this table (issue 8). The `_i9` rows rerun every pair after "
        "the fix of Keras' Adam on embedding gradients (issue 9, docs/scaling.md); the rows without it ran before "
        "that fix."
    )
    return lines, data


def robustness_lines(groups, dataset: str) -> list[str]:
    runs = [(name, rs) for (ds, name), rs in groups.items() if ds == dataset and rs[0].get("robustness")]
    if not runs:
        return []
    kinds = list(dict.fromkeys(k for _, rs in runs for r in rs for k in r["robustness"] if k != "clean"))
    if not kinds:
        return []
    lines = [
        "| model | clean NDCG@6 | " + " | ".join(f"drop, {k}" for k in kinds) + " |",
        "|---" * (len(kinds) + 2) + "|",
    ]
    for name, rs in runs:
        clean = [r["robustness"]["clean"]["ndcg@6"] for r in rs]
        drops = [
            _fmt(
                [r["robustness"]["clean"]["ndcg@6"] - r["robustness"][k]["ndcg@6"] for r in rs if k in r["robustness"]]
            )
            if any(k in r["robustness"] for r in rs)
            else "n/a"  # a kind this row was not evaluated under (e.g. `retrained` before it existed)
            for k in kinds
        ]
        lines.append(f"| {name} | {_fmt(clean)} | " + " | ".join(drops) + " |")
    return lines


def oracle_gap_lines(groups, baselines, dataset: str) -> list[str]:
    base = baselines.get(dataset, {}).get("metrics", {})
    if "oracle_order" not in base:
        return []
    lo, hi = base["retriever_order"]["ndcg@6"], base["oracle_order"]["ndcg@6"]
    lines = [
        f"Retriever order NDCG@6 {lo:.4f}, oracle order {hi:.4f}.",
        "",
        "| model | test NDCG@6 | share of the retriever-to-oracle gap closed |",
        "|---|---|---|",
    ]
    for (ds, name), rs in groups.items():
        if ds == dataset:
            v = [r["test"]["ndcg@6"] for r in rs]
            lines.append(f"| {name} | {_fmt(v)} | {_fmt([(x - lo) / (hi - lo) for x in v])} |")
    return lines


def sweep_figure(groups, dataset: str, tag: str, path: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = SWEEPS[tag]
    points = []
    for (ds, _), rs in groups.items():
        if ds == dataset and tag in rs[0]["tables"]:
            section, name = key.split(".")
            points.append((rs[0]["config"][section][name], *mean_std([r["test"]["ndcg@6"] for r in rs])))
    if len(points) < 2:
        return False
    points.sort()
    x, m, s = (np.array(v) for v in zip(*points))
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.errorbar(x, m, yerr=s, marker="o", capsize=3)
    ax.set_xlabel(key.split(".")[1])
    ax.set_ylabel("test NDCG@6")
    ax.set_title(f"DNR sensitivity to {key.split('.')[1]} ({dataset})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def has_model(run) -> bool:
    """Whether a run's folder still holds its trained model: a fresh clone has only `result.json` there."""
    folder = run.get("_model_dir") or ""
    return all(os.path.exists(os.path.join(folder, name)) for name in ("config.yaml", "best.weights.h5"))


def density_figure(results, datasets, path: str) -> bool:
    """Figure 5 analog: densities of real x and of x' from each sampler, by label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from keras import ops

    from dnr_tf import schema as schema_lib
    from dnr_tf.noise import HeuristicSampler
    from dnr_tf.runs import load_trained
    from dnr_tf.train import datasets as make_datasets
    from dnr_tf.train import score_calibration

    candidates = [
        r
        for r in results
        if r["dataset"] == "cascade"
        and r["config"]["dnr"]["enabled"]
        and r["config"]["dnr"]["model_based"]
        and has_model(r)  # only result.json of a run is committed
    ]
    if not candidates:
        return False
    run = min(candidates, key=lambda r: (r["seed"], r["row"]))
    data_dir = datasets["cascade"]["dir"]
    model, cfg, _ = load_trained(run["_model_dir"])
    train_ds, _, _ = make_datasets(data_dir, cfg, schema_lib.load_schema(data_dir))
    calibration = score_calibration(train_ds)
    lc = cfg.dnr.lambda_c
    samplers = {
        f"Gaussian (λc {lc})": HeuristicSampler("gaussian", lc),
        f"Beta(0.5, 0.5) (λc {lc})": HeuristicSampler("beta", lc),
        "calibrated": HeuristicSampler("calibrated", lc, calibration=calibration),
    }
    model.set_sampler_phase(True)
    values = defaultdict(lambda: ([], []))
    for features, labels in train_ds.take(10):
        y = labels.numpy()
        z = (y == 1).astype("float32")
        draws = {
            "real x": features["retriever_scores"].numpy(),
            f"model-based ({run['row']}, seed {run['seed']})": np.asarray(
                model.sample_x(features, ops.convert_to_tensor(z))
            ),
        }
        for name, sampler in samplers.items():
            draws[name] = np.asarray(sampler(ops.convert_to_tensor(z), model.noise_seed))
        for name, x in draws.items():
            values[name][0].extend(x[y == 0].tolist())
            values[name][1].extend(x[y == 1].tolist())
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=False)
    bins = np.linspace(0, 1, 51)
    for label, ax in enumerate(axes):
        for name, (neg, pos) in values.items():
            ax.hist(
                pos if label else neg,
                bins=bins,
                density=True,
                histtype="step",
                label=name,
                linewidth=1.5 if name == "real x" else 1,
            )
        ax.set_title(f"z = {label}")
        ax.set_xlabel("score")
    axes[0].set_ylabel("density")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def study_lines(
    summary: dict, out: str, fig_dir: str, rel: str, level: int = 2, prefix: str = ""
) -> tuple[list[str], dict]:
    """The body of one study's report (every table, robustness, figures) and its tables as data.

    `level` is the Markdown level of a data set's heading (its tables one below); figures go to
    `fig_dir` as `<prefix><data set>_<figure>.png`, linked through `rel`.
    """
    results = summary["runs"]
    for r in results:
        r["_model_dir"] = os.path.join(out, "runs", r["run"])
    groups = group(results)
    baselines = summary.get("baselines", {})
    h, hh = "#" * level, "#" * (level + 1)
    lines, tables = [], {}
    for ds in sorted({r["dataset"] for r in results}):
        lines += [f"{h} Data set `{ds}` ({summary['datasets'][ds]['dir']})", ""]
        for tag, title in TABLE_TITLES.items():
            tlines, tdata = table(groups, baselines, ds, tag)
            if tlines:
                lines += [f"{hh} {title}", "", *tlines, ""]
                tables[f"{ds}/{tag}"] = tdata
        own, own_data = own_backbone_lines(groups, ds)
        if own:
            lines += [f"{hh} DNR-B against each reranker trained directly", "", *own, ""]
            tables[f"{ds}/own_backbone"] = own_data
        rob = robustness_lines(groups, ds)
        if rob:
            lines += [f"{hh} Robustness: NDCG@6 drop on test with perturbed retriever scores", "", *rob, ""]
        gap = oracle_gap_lines(groups, baselines, ds)
        if gap:
            lines += [f"{hh} The oracle ceiling", "", *gap, ""]
        for tag in SWEEPS:
            name = f"{prefix}{ds}_{tag}.png"
            if sweep_figure(groups, ds, tag, os.path.join(fig_dir, name)):
                lines += [f"![{tag}]({rel}/{name})", ""]
    fig5 = f"{prefix}fig5_scores.png"
    has_models = any(r["dataset"] == "cascade" and has_model(r) for r in results)
    if has_models and density_figure(results, summary["datasets"], os.path.join(fig_dir, fig5)):
        lines += [f"{h} Figure 5 analog: real scores and generated x' by label", "", f"![fig5]({rel}/{fig5})", ""]
    elif os.path.exists(os.path.join(fig_dir, fig5)):  # drawn earlier, when the trained models were at hand
        lines += [
            f"{h} Figure 5 analog: real scores and generated x' by label",
            "",
            "(Drawn by an earlier report of these runs; the trained models are not kept with results.json.)",
            "",
            f"![fig5]({rel}/{fig5})",
            "",
        ]
    for r in results:
        r.pop("_model_dir", None)
    return lines, tables


def write_report(summary: dict, out: str, results_md: str | None = None) -> str:
    """Writes the Markdown report (and its figures) to `results_md` or `<out>/results.md`."""
    results = summary["runs"]
    md_path = results_md or os.path.join(out, "results.md")
    fig_dir = os.path.join(os.path.dirname(os.path.abspath(md_path)), "figures")
    os.makedirs(fig_dir, exist_ok=True)
    rel = os.path.relpath(fig_dir, os.path.dirname(os.path.abspath(md_path)))
    epochs = sorted({r["config"]["train"]["epochs"] for r in results})
    seeds = sorted({r["seed"] for r in results})
    command = (
        f"python -m dnr_tf.experiments --plan {summary.get('plan_path') or 'configs/study/<plan>.yaml'} "
        f"--out {out} --results_md {md_path}"
    )
    lines = [
        f"# Study results: {summary['plan']}",
        "",
        "Generated by `python -m dnr_tf.report` from `results.json`; do not edit by hand. To reproduce (the plan",
        "builds its data sets; finished runs are never redone):",
        "",
        f"```bash\n{command}\n```",
        "",
        f"{len(results)} runs; epochs a run {epochs}; seeds {seeds}. The epoch of every run is picked on validation",
        "NDCG@6; every table reports test metrics, mean ± std over seeds, with ../shared/PROTOCOL.md's definitions",
        "and K = 6. The retriever's order, a random order (and on synthetic data the oracle's order) are measured",
        "on the same test lists. A difference between two rows is taken over the seeds both rows have.",
        "",
    ]
    if summary.get("missing"):
        missing = summary["missing"]
        lines += [
            f"**Partial study** (`--finished_only`): {len(missing)} runs of the plan had not finished "
            f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); the tables hold the finished ones.",
            "",
        ]
    body, tables = study_lines(summary, out, fig_dir, rel)
    lines += body
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "tables.json"), "w") as f:
        json.dump(tables, f, indent=2)
    return md_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dnr_tf.report", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out",
        required=True,
        help="the study's output folder (holds results.json); with --headline, the Markdown file to write",
    )
    parser.add_argument("--results_md", help="where the Markdown goes (default <out>/results.md)")
    parser.add_argument(
        "--headline",
        nargs="+",
        metavar="RESULTS_JSON",
        help="write the headline document over these studies' results.json files to --out",
    )
    args = parser.parse_args(argv)
    if args.headline:
        from dnr_tf.headline import load_summaries, write_headline

        try:
            summaries = load_summaries(args.headline)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(write_headline(summaries, args.out))
        return 0
    with open(os.path.join(args.out, "results.json")) as f:
        summary = json.load(f)
    print(write_report(summary, args.out, args.results_md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
