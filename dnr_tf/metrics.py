"""Ranking metrics of PROTOCOL.md as Keras metrics: H@K, NDCG@K, MAP@K, P@K, R@K, F1@K, AUC.

Why not keras-rs: its `MeanAveragePrecision` divides by all positives P where PROTOCOL.md divides
by min(K, P), and its metrics break score ties at random by default; the definitions here keep
ties in the stored (retriever) order, exactly as `dnr_tf.reference_metrics` does, and are tested
against it.

Ranks are computed by pairwise comparison (O(list_size^2) a list, 2,500 comparisons for 50
candidates), which gives the exact, tie-stable order without a sort.
"""

from __future__ import annotations

import keras
from keras import ops

METRIC_NAMES = ("hit", "ndcg", "map", "precision", "recall", "f1", "auc")


def metric_key(name: str, k: int) -> str:
    return name if name == "auc" else f"{name}@{k}"


def per_list_metrics(labels, scores, mask, k: int) -> dict:
    """Every metric of every list in a batch.

    Args:
        labels: `[batch, list_size]` in {0, 1} (any value where `mask` is False).
        scores: `[batch, list_size]` model scores, higher is better.
        mask: `[batch, list_size]` bool, False on padding.
        k: cutoff.

    Returns:
        name -> (values `[batch]`, valid `[batch]` float 0/1). A list without positives is
        invalid for every metric; a list without negatives is invalid for AUC.
    """
    mask = ops.cast(mask, "bool")
    pos = ops.logical_and(ops.equal(ops.cast(labels, "int32"), 1), mask)
    neg = ops.logical_and(ops.logical_not(pos), mask)
    posf, negf, maskf = (ops.cast(t, "float32") for t in (pos, neg, mask))
    scores = ops.cast(scores, "float32")
    n = ops.shape(scores)[1]
    s_i = ops.expand_dims(scores, 2)  # [B, L, 1]: the item being ranked
    s_j = ops.expand_dims(scores, 1)  # [B, 1, L]: the items it is compared with
    idx = ops.arange(n)
    j_before_i = ops.less(ops.expand_dims(idx, 0), ops.expand_dims(idx, 1))  # [L, L]: [i, j] = j < i
    # rank_i = #{valid j: s_j > s_i} + #{valid j < i: s_j == s_i}  (0-based, ties keep stored order)
    ahead = ops.logical_or(ops.greater(s_j, s_i), ops.logical_and(ops.equal(s_j, s_i), ops.expand_dims(j_before_i, 0)))
    ahead = ops.logical_and(ahead, ops.expand_dims(mask, 1))
    rank = ops.sum(ops.cast(ahead, "float32"), axis=2)  # [B, L]
    in_top = ops.cast(ops.less(rank, float(k)), "float32") * maskf

    num_pos = ops.sum(posf, axis=1)
    num_neg = ops.sum(negf, axis=1)
    hits = ops.sum(in_top * posf, axis=1)
    ideal = ops.minimum(num_pos, float(k))
    safe_ideal = ops.maximum(ideal, 1.0)
    discount = 1.0 / (ops.log(rank + 2.0) / ops.log(2.0))
    dcg = ops.sum(in_top * posf * discount, axis=1)
    ideal_ranks = ops.cast(ops.arange(k), "float32")
    ideal_discounts = 1.0 / (ops.log(ideal_ranks + 2.0) / ops.log(2.0))
    idcg = ops.sum(
        ops.expand_dims(ideal_discounts, 0)
        * ops.cast(ops.less(ops.expand_dims(ideal_ranks, 0), ops.expand_dims(ideal, 1)), "float32"),
        axis=1,
    )
    # precision at the rank of each positive i: positives ranked at or above i, over rank_i + 1
    rank_j = ops.expand_dims(rank, 1)
    rank_i = ops.expand_dims(rank, 2)
    pos_above = ops.sum(ops.cast(ops.less_equal(rank_j, rank_i), "float32") * ops.expand_dims(posf, 1), axis=2)
    precision_at_i = pos_above / (rank + 1.0)
    ap = ops.sum(precision_at_i * posf * in_top, axis=1) / safe_ideal

    precision = hits / float(k)
    recall = hits / ops.maximum(num_pos, 1.0)
    f1 = ops.where(hits > 0, 2.0 * precision * recall / ops.maximum(precision + recall, 1e-12), 0.0)

    pair = ops.expand_dims(posf, 2) * ops.expand_dims(negf, 1)  # [B, i pos, j neg]
    correct = ops.cast(ops.greater(s_i, s_j), "float32") + 0.5 * ops.cast(ops.equal(s_i, s_j), "float32")
    auc = ops.sum(pair * correct, axis=(1, 2)) / ops.maximum(num_pos * num_neg, 1.0)

    has_pos = ops.cast(num_pos > 0, "float32")
    has_both = has_pos * ops.cast(num_neg > 0, "float32")
    return {
        "hit": (hits / safe_ideal, has_pos),
        "ndcg": (dcg / ops.maximum(idcg, 1e-12), has_pos),
        "map": (ap, has_pos),
        "precision": (precision, has_pos),
        "recall": (recall, has_pos),
        "f1": (f1, has_pos),
        "auc": (auc, has_both),
    }


class ListMean(keras.metrics.Metric):
    """The mean over lists of one per-list value, skipping lists where it is undefined."""

    def __init__(self, name: str, **kwargs):
        super().__init__(name=name, **kwargs)
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, values, valid):
        valid = ops.cast(valid, "float32")
        self.total.assign_add(ops.sum(ops.cast(values, "float32") * valid))
        self.count.assign_add(ops.sum(valid))

    def result(self):
        return ops.divide_no_nan(self.total, self.count)

    def reset_state(self):
        self.total.assign(0.0)
        self.count.assign(0.0)


class RankingMetrics:
    """The PROTOCOL.md metric set at cutoff k, as a list of `ListMean`s updated together."""

    def __init__(self, k: int, names=METRIC_NAMES):
        self.k = k
        self.metrics = [ListMean(metric_key(n, k)) for n in names]
        self._names = tuple(names)

    def update_state(self, labels, scores, mask):
        values = per_list_metrics(labels, scores, mask, self.k)
        for name, metric in zip(self._names, self.metrics):
            metric.update_state(*values[name])
