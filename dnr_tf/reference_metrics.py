"""Plain NumPy ranking metrics, exactly as ../shared/PROTOCOL.md defines them.

These are the reference implementation: the pipeline uses them for `stats.json` (the retriever's
own order and a random order), and the Keras metrics of `dnr_tf.metrics` are tested against them.

Conventions, for one list with labels in {1, 0} and -1 on padding:
- The model's order sorts candidates by score, descending; ties keep the stored (retriever) order;
  padding is never ranked.
- With hits = positives among the top K and P = positives in the list:
  hit@K = hits / min(K, P); precision@K = hits / K; recall@K = hits / P;
  f1@K = 2 p r / (p + r) (0 without hits); ndcg@K = DCG@K / IDCG@K with binary gains and
  1 / log2(rank + 1) discounts, IDCG over min(K, P) positives;
  map@K = sum over ranks r <= K holding a positive of precision@r, divided by min(K, P);
  auc = share of (positive, negative) pairs ordered correctly, ties counted 1/2.
- A list without positives has no defined metric (NaN); a list without negatives has no AUC
  (NaN). Means skip NaN.
"""

from __future__ import annotations

import numpy as np

METRIC_NAMES = ("hit", "ndcg", "map", "precision", "recall", "f1", "auc")


def rank_order(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Indices of the unpadded candidates, best first; ties keep the stored order.

    Args:
        scores: `[list_size]` model scores.
        labels: `[list_size]` labels, -1 on padding.
    """
    valid = np.flatnonzero(labels >= 0)
    # A stable sort on the negated score keeps the stored order among equal scores.
    return valid[np.argsort(-np.asarray(scores, np.float64)[valid], kind="stable")]


def list_metrics(labels: np.ndarray, scores: np.ndarray, k: int) -> dict[str, float]:
    """Every metric of one list.

    Args:
        labels: `[list_size]` in {1, 0, -1 (padding)}.
        scores: `[list_size]`, higher is better.
        k: cutoff (K = 6 in the paper).

    Returns:
        A dict with the keys of `METRIC_NAMES` (suffix-free); NaN where undefined.
    """
    labels = np.asarray(labels)
    ranked = labels[rank_order(scores, labels)] == 1
    out = ranked_metrics(ranked, k)
    if 0 < ranked.sum() < len(ranked):  # positives and negatives
        out["auc"] = pairwise_auc(labels, scores)
    return out


def ranked_metrics(ranked: np.ndarray, k: int) -> dict[str, float]:
    """The metrics of `list_metrics` but the AUC, from the list already in the model's order.

    Args:
        ranked: `[n]` booleans, True on a positive, best first, padding removed.
        k: cutoff.

    Returns:
        A dict with the keys of `METRIC_NAMES`; `auc` is NaN (it needs the scores' ties).
    """
    num_pos = int(ranked.sum())
    out = dict.fromkeys(METRIC_NAMES, float("nan"))
    if num_pos == 0:
        return out
    top = ranked[:k]
    hits = int(top.sum())
    ideal = min(k, num_pos)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float((top * discounts[: len(top)]).sum())
    idcg = float(discounts[:ideal].sum())
    precision_at_r = np.cumsum(top) / np.arange(1, len(top) + 1)
    precision = hits / k
    recall = hits / num_pos
    out.update(
        hit=hits / ideal,
        ndcg=dcg / idcg,
        map=float((precision_at_r * top).sum()) / ideal,
        precision=precision,
        recall=recall,
        f1=0.0 if hits == 0 else 2 * precision * recall / (precision + recall),
    )
    return out


def pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Share of (positive, negative) pairs with the positive scored higher; ties count 1/2."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, np.float64)
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def retriever_order_scores(labels: np.ndarray) -> np.ndarray:
    """Scores that reproduce the stored order (the retriever's own ranking)."""
    return -np.arange(len(labels), dtype=np.float64)


def mean_metrics(rows: list[dict[str, float]], k: int | None = None) -> dict[str, float]:
    """Means over lists, skipping NaN; keys get an `@k` suffix when `k` is given."""
    out = {}
    for name in METRIC_NAMES:
        values = np.array([r[name] for r in rows], np.float64)
        values = values[~np.isnan(values)]
        key = f"{name}@{k}" if (k is not None and name != "auc") else name
        out[key] = float(values.mean()) if len(values) else float("nan")
    return out
