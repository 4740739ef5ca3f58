"""The Keras ranking metrics against the plain NumPy reference (padding, k, ties)."""

import numpy as np
import pytest

from dnr_tf import metrics as km
from dnr_tf import reference_metrics as M


def _random_batch(rng, batch=64, n=12, tie_levels=None):
    labels = (rng.random((batch, n)) < 0.25).astype(np.int64)
    lengths = rng.integers(1, n + 1, batch)
    mask = np.arange(n)[None, :] < lengths[:, None]
    labels[~mask] = -1
    if tie_levels:
        scores = rng.integers(0, tie_levels, (batch, n)).astype(np.float32)  # many ties
    else:
        scores = rng.normal(size=(batch, n)).astype(np.float32)
    scores[~mask] = 100.0  # padding scored high must not count
    return labels, scores, mask


@pytest.mark.parametrize("k,tie_levels", [(1, None), (3, None), (6, None), (6, 3), (12, 2), (4, 1)])
def test_per_list_metrics_match_reference(k, tie_levels):
    rng = np.random.default_rng(k * 10 + (tie_levels or 0))
    labels, scores, mask = _random_batch(rng, tie_levels=tie_levels)
    got = km.per_list_metrics(labels, scores, mask, k)
    for b in range(len(labels)):
        ref = M.list_metrics(labels[b], scores[b], k)
        for name in km.METRIC_NAMES:
            value, valid = (np.asarray(t)[b] for t in got[name])
            if np.isnan(ref[name]):
                assert valid == 0, (name, b)
            else:
                assert valid == 1, (name, b)
                assert value == pytest.approx(ref[name], abs=1e-5), (name, b, k, tie_levels)


def test_keras_metric_means_skip_undefined_lists():
    rng = np.random.default_rng(0)
    labels, scores, mask = _random_batch(rng, batch=40)
    labels[:5] = np.where(mask[:5], 0, -1)  # lists without positives
    ranking = km.RankingMetrics(k=6)
    ranking.update_state(labels[:20], scores[:20], mask[:20])
    ranking.update_state(labels[20:], scores[20:], mask[20:])
    rows = [M.list_metrics(labels[b], scores[b], 6) for b in range(len(labels))]
    expected = M.mean_metrics(rows, 6)
    for metric in ranking.metrics:
        assert float(metric.result()) == pytest.approx(expected[metric.name], abs=1e-5), metric.name
    for metric in ranking.metrics:
        metric.reset_state()
        assert float(metric.result()) == 0.0
