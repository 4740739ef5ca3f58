"""The NumPy reference metrics against values computed by hand from PROTOCOL.md's definitions."""

import math

import numpy as np
import pytest

from dnr_tf import reference_metrics as M


def test_hand_computed_list():
    # Order by score: items 0..5 in stored order; positives at ranks 2 and 5; one more at rank 8.
    labels = np.array([0, 1, 0, 0, 1, 0, 0, 1, 0, -1])
    scores = -np.arange(10.0)
    m = M.list_metrics(labels, scores, k=6)
    discount = lambda r: 1 / math.log2(r + 1)  # noqa: E731
    assert m["hit"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(2 / 6)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * (1 / 3) * (2 / 3) / (1 / 3 + 2 / 3))
    assert m["ndcg"] == pytest.approx((discount(2) + discount(5)) / (discount(1) + discount(2) + discount(3)))
    assert m["map"] == pytest.approx((1 / 2 + 2 / 5) / 3)
    # AUC over 3 positives x 6 negatives (padding excluded): count the correctly ordered pairs.
    pos, neg = [1, 4, 7], [0, 2, 3, 5, 6, 8]
    correct = sum(p < n for p in pos for n in neg)
    assert m["auc"] == pytest.approx(correct / 18)


def test_padding_is_never_ranked():
    labels = np.array([-1, -1, 0, 1])
    scores = np.array([9.0, 8.0, 0.0, -1.0])  # padding scored highest must not take top ranks
    m = M.list_metrics(labels, scores, k=1)
    assert m["hit"] == 0.0
    m = M.list_metrics(labels, scores, k=2)
    assert m["hit"] == 1.0 and m["ndcg"] == pytest.approx(1 / math.log2(3))


def test_ties_keep_stored_order_and_auc_counts_half():
    labels = np.array([0, 1, 0])
    scores = np.zeros(3)
    m = M.list_metrics(labels, scores, k=1)
    assert m["hit"] == 0.0  # the tie keeps item 0 first
    assert m["auc"] == pytest.approx(0.5)


def test_undefined_metrics_are_nan_and_skipped_in_means():
    assert math.isnan(M.list_metrics(np.array([0, 0]), np.zeros(2), 1)["ndcg"])
    assert math.isnan(M.list_metrics(np.array([1, 1]), np.zeros(2), 1)["auc"])
    rows = [M.list_metrics(np.array([1, 0]), np.array([1.0, 0.0]), 1), M.list_metrics(np.array([0, 0]), np.zeros(2), 1)]
    assert M.mean_metrics(rows, 1)["ndcg@1"] == 1.0


def test_perfect_and_worst_orders():
    labels = np.array([1, 1, 0, 0, 0, 0, 0, 0])
    best = M.list_metrics(labels, np.array([8, 7, 6, 5, 4, 3, 2, 1.0]), 6)
    worst = M.list_metrics(labels, np.array([1, 2, 3, 4, 5, 6, 7, 8.0]), 6)
    assert best["ndcg"] == best["map"] == best["hit"] == best["auc"] == 1.0
    assert worst["auc"] == 0.0 and worst["hit"] == 0.0 and worst["f1"] == 0.0


def test_the_stats_shortcuts_give_the_reference_floats():
    """`stats.json`'s per-list rows skip the reference's sort for the retriever's order and its
    slices for the rank buckets; the figures must stay the same floats, padding and edge cases included."""
    from pipeline import stats

    rng = np.random.default_rng(5)
    cases = [np.ones(50, int), np.zeros(50, int), np.array([1]), np.array([0]), np.array([1, 0, -1, -1])]
    cases += [rng.choice([1, 0, 0, 0, -1], size=int(rng.integers(1, 60))) for _ in range(300)]
    for labels in cases:
        want = M.list_metrics(labels, M.retriever_order_scores(labels), 6)
        got = stats.retriever_order_metrics(labels, 6)
        assert list(got) == list(want)
        for name in want:
            assert got[name] == want[name] or (np.isnan(got[name]) and np.isnan(want[name])), name
        record = {
            "labels": labels.tolist(),
            "retriever_scores": list(-np.arange(len(labels), dtype=float)),
            "request_id": "7:3",
        }
        row = stats.list_stats_row(record, 6, seed=0)
        for lo, hi in stats.RANK_BUCKETS:
            seg = labels[lo - 1 : hi]
            key = f"positive_rate_by_rank.{lo}-{hi}"
            assert (row[key] == float((seg == 1).mean())) if len(seg) else key not in row
