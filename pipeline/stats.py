"""Statistics as Beam PCollections of (dotted key, value), merged into `stats.json` by the driver.

Counting through PCollections (not runner metrics) makes the counts the same on every runner
(the means of per-list figures to their last bit: they sum floats in the order the runner hands
over the lists), and they are written next to the data they describe.
"""

from __future__ import annotations

import json
import math

import apache_beam as beam
import numpy as np

from dnr_tf import reference_metrics as M
from dnr_tf import schema as S
from pipeline.protocol import stable_fraction
from pipeline.sinks import write_one_file

RANK_BUCKETS = ((1, 6), (7, 10), (11, 20), (21, 30), (31, 40), (41, 50))


class MeanDict(beam.CombineFn):
    """Means of dicts of floats, key by key, skipping NaN."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, row):
        for k, v in row.items():
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            s = acc.setdefault(k, [0.0, 0])
            s[0] += float(v)
            s[1] += 1
        return acc

    def merge_accumulators(self, accs):
        out = {}
        for acc in accs:
            for k, (s, n) in acc.items():
                t = out.setdefault(k, [0.0, 0])
                t[0] += s
                t[1] += n
        return out

    def extract_output(self, acc):
        return {k: s / n for k, (s, n) in sorted(acc.items()) if n}


class Summed:
    """Integers to sum by key: a PCollection of `(key, n)` pairs, not yet summed, and the keys that
    must be reported even when no pair holds them (as 0).

    `stat_pairs` sums every `Summed` part of a stage in one `CombinePerKey`, with a `(key, 0)` for
    each of `zero_keys`, so that a count of an empty PCollection is still 0. Integer sums do not
    depend on the order they are taken in, so the figures are those of a combine a figure; the
    pipeline holds one combine where it held one for each figure (most of them global combines,
    each a GroupByKey, a `Create` and a side input for its default element).
    """

    def __init__(self, pairs, *zero_keys: str):
        self.pairs = pairs
        self.zero_keys = zero_keys


def count(pcoll, key: str, label: str) -> Summed:
    """The number of elements of `pcoll`, under `key`."""
    return Summed(pcoll | f"Count{label}" >> beam.Map(lambda _, k=key: (k, 1)), key)


def total(pcoll, key: str, label: str, fn) -> Summed:
    """The sum of the integers `fn(element)` over `pcoll`, under `key`."""
    return Summed(pcoll | f"Measure{label}" >> beam.Map(lambda x, k=key, f=fn: (k, f(x))), key)


def list_stats_row(record: dict, k: int, seed: int) -> dict:
    """Per-list figures: the retriever's order, a random order, positives, rank-bucket positives."""
    labels = np.asarray(record[S.LABELS])
    n = len(labels)
    row = {"lists": 1.0, "positives_per_list": float((labels == 1).sum()), "candidates_per_list": float(n)}
    for name, v in retriever_order_metrics(labels, k).items():
        row[f"retriever_order.{_key(name, k)}"] = v
    rng = np.random.default_rng(int(stable_fraction(seed, record[S.REQUEST_ID]) * 2**32))
    for name, v in M.list_metrics(labels, rng.random(n), k).items():
        row[f"random_order.{_key(name, k)}"] = v
    # The score's own within-list AUC (the stored order is the score's order, so it matches the
    # retriever order's AUC unless a logged list was stored in some other order).
    row["retriever_score_auc"] = M.pairwise_auc(labels, np.asarray(record[S.RETRIEVER_SCORES]))
    if S.RETRIEVER_SCORES_RETRAINED in record:
        retrained = np.asarray(record[S.RETRIEVER_SCORES_RETRAINED], np.float64)
        row["retrained_score_auc"] = M.pairwise_auc(labels, retrained)
        row["retrained_rank_corr"] = rank_correlation(np.asarray(record[S.RETRIEVER_SCORES], np.float64), retrained)
    if S.ORACLE_SCORES in record:
        for name, v in M.list_metrics(labels, np.asarray(record[S.ORACLE_SCORES]), k).items():
            row[f"oracle_order.{_key(name, k)}"] = v
    positives_before = np.concatenate([[0], np.cumsum(labels == 1)])  # [r]: positives at ranks < r + 1
    for lo, hi in RANK_BUCKETS:
        stop = min(hi, n)
        if stop >= lo:  # the share of positives among ranks lo..hi, as `(labels[lo - 1:hi] == 1).mean()`
            row[f"positive_rate_by_rank.{lo}-{hi}"] = int(positives_before[stop] - positives_before[lo - 1]) / (
                stop - lo + 1
            )
    return row


def retriever_order_metrics(labels: np.ndarray, k: int) -> dict[str, float]:
    """`list_metrics(labels, retriever_order_scores(labels), k)`, the same floats without its sort:
    the stored order is the retriever's."""
    valid = labels[labels >= 0]
    ranked = valid == 1
    out = M.ranked_metrics(ranked, k)
    if 0 < ranked.sum() < len(ranked):
        out["auc"] = M.pairwise_auc(labels, M.retriever_order_scores(labels))
    return out


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two `[n]` score vectors (ties get their mean rank); NaN if either is constant."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)
    if len(a) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def retriever_summary(stats: dict, kind: str, retrained: bool) -> dict:
    """The `retrievers` section of `stats.json`, from the figures the stages wrote.

    For the main retriever (`main`) and, when written, the retrained one (`retrained`): per split
    the within-list AUC of its x, the positives per list and the share of requests dropped (no
    positive among the candidates, or none left after truncation). The retrained retriever scores
    the main one's candidates, so its lists, positives and drops are the main one's; its rank
    correlation with the main x within lists is given per split.
    """
    splits = stats.get("splits", {})
    lists = stats.get("lists", {})
    requests = lists.get("requests", stats.get("counts", {}).get("lists_read"))  # list sources: lists simulated
    dropped = lists.get("dropped_no_positive", 0) + lists.get("dropped_truncated", 0)
    common = {
        "positives_per_list": {s: v.get("positives_per_list") for s, v in splits.items()},
        "lists": {s: v.get("lists") for s, v in splits.items()},
        "requests": requests,
        "dropped_share": dropped / requests if requests else None,
    }
    auc = {s: v.get("retriever_score_auc") for s, v in splits.items()}
    out = {"main": {"kind": kind, "auc_in_list": auc, **common}}
    if retrained:
        out["retrained"] = {
            "kind": kind,
            "same_candidates_as": "main",
            "auc_in_list": {s: v.get("retrained_score_auc") for s, v in splits.items()},
            "rank_corr_with_main": {s: v.get("retrained_rank_corr") for s, v in splits.items()},
            **common,
        }
    return out


def _key(name: str, k: int) -> str:
    return name if name == "auc" else f"{name}@{k}"


class SplitListStats(beam.PTransform):
    """(`splits.<split>.<figure>`, value) pairs: per-split means of `list_stats_row`, and list counts."""

    def __init__(self, k: int, seed: int):
        super().__init__()
        self._k = k
        self._seed = seed

    def expand(self, records):
        k, seed = self._k, self._seed
        per_split = (
            records
            | "Rows" >> beam.Map(lambda r: (r["split"], list_stats_row(r, k, seed)))
            | "Mean" >> beam.CombinePerKey(MeanDict())
        )
        counts = (
            records | "SplitKey" >> beam.Map(lambda r: r["split"]) | "SplitCount" >> beam.combiners.Count.PerElement()
        )
        means = per_split | "Flatten" >> beam.FlatMap(
            lambda kv: [(f"splits.{kv[0]}.{name}", v) for name, v in kv[1].items() if name != "lists"]
        )
        sizes = counts | "SizeKeys" >> beam.Map(lambda kv: (f"splits.{kv[0]}.lists", kv[1]))
        return (means, sizes) | "All" >> beam.Flatten()


def stat_pairs(parts: list):
    """The (key, value) pairs of `parts` as one PCollection: the `Summed` parts summed by key, all in
    one combine (see `Summed`), and the others, PCollections of (key, value) pairs, as they are."""
    summed = [part for part in parts if isinstance(part, Summed)]
    pairs = [part for part in parts if not isinstance(part, Summed)]
    if summed:
        sums = [part.pairs for part in summed]
        zeros = [(k, 0) for part in summed for k in part.zero_keys]
        if zeros:
            sums.append(summed[0].pairs.pipeline | "StatsZeros" >> beam.Create(zeros))
        pairs.append(tuple(sums) | "FlattenSums" >> beam.Flatten() | "SumStats" >> beam.CombinePerKey(sum))
    return tuple(pairs) | "FlattenStats" >> beam.Flatten()


def write_stats(parts: list, prefix: str) -> None:
    """Writes the (key, value) pairs of `parts` (`stat_pairs`) as JSON lines into one file, for the driver."""
    lines = stat_pairs(parts) | "StatsToJson" >> beam.Map(lambda kv: json.dumps({"key": kv[0], "value": kv[1]}))
    write_one_file(lines, prefix, "WriteStatsFile", suffix=".jsonl")


def merge_into(stats: dict, lines) -> dict:
    """Merges JSON lines of {"key": "a.b.c", "value": v} into a nested dict (sums repeated keys)."""
    for line in lines:
        if not line.strip():
            continue
        obj = json.loads(line)
        node = stats
        parts = obj["key"].split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        leaf = parts[-1]
        value = obj["value"]
        if leaf in node and isinstance(node[leaf], (int, float)) and isinstance(value, (int, float)):
            node[leaf] += value
        else:
            node[leaf] = value
    return stats
