"""Candidate generation over a large catalogue (issue 9): the retriever's top-k, chunk by chunk, equals
the full sort (ties by table order, exclusions, k above what is left) and holds one chunk at a time."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from pipeline.protocol import Retriever, sigmoid


def _retriever(rng, n, dim=4, chunk=7, ties=False):
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    if ties:
        emb = np.round(emb)  # many equal logits
    return Retriever(
        item_ids=np.arange(100, 100 + n, dtype=np.int64) * 3,
        item_emb=emb,
        item_bias=(np.zeros(n) if ties else rng.normal(size=n)).astype(np.float32),
        global_bias=0.1,
        chunk_size=chunk,
    )


def _reference(r, user, bias, exclude, k):
    logits = r.logits(user, bias).astype(np.float64)
    keep = ~np.isin(r.item_ids, list(exclude)) if exclude else np.ones(len(logits), bool)
    idx = np.flatnonzero(keep)
    order = idx[np.lexsort((idx, -logits[idx]))][:k]
    return r.item_ids[order], sigmoid(logits[order]).astype(np.float32)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 7, 50, 1000])
def test_chunked_top_k_equals_the_full_sort(ties, chunk):
    rng = np.random.default_rng(chunk + 10 * ties)
    r = _retriever(rng, 50, chunk=chunk, ties=ties)
    for trial in range(20):
        user = rng.normal(size=4).astype(np.float32)
        if ties:
            user = np.round(user)
        exclude = {int(x) for x in rng.choice(r.item_ids, int(rng.integers(0, 45)), replace=False)}
        k = int(rng.integers(1, 60))
        ids, scores = r.top_k(user, 0.2, exclude, k)
        want_ids, want_scores = _reference(r, user, 0.2, exclude, k)
        np.testing.assert_array_equal(ids, want_ids, err_msg=f"trial {trial}")
        # A chunk's matrix product may round its last bit differently from the whole catalogue's.
        np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
        assert not set(ids.tolist()) & exclude
    assert r.top_k(user, 0.0, set(), 0)[0].size == 0


def test_a_million_items_are_scored_one_chunk_at_a_time():
    rng = np.random.default_rng(0)
    n = 1_000_000
    r = Retriever(
        item_ids=np.arange(1, n + 1, dtype=np.int64),
        item_emb=rng.normal(size=(n, 8)).astype(np.float32),
        item_bias=np.zeros(n, np.float32),
        global_bias=0.0,
        chunk_size=65_536,
    )
    user = rng.normal(size=8).astype(np.float32)
    tracemalloc.start()
    ids, _ = r.top_k(user, 0.0, {1, 2, 3}, 50)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(ids) == 50
    full = r.item_emb @ user
    np.testing.assert_array_equal(ids, r.item_ids[np.argsort(-full, kind="stable")][:50])
    # One chunk of float32 and float64 scores is about 0.8 MB; the whole catalogue's would be 12 MB.
    assert peak < 3 * 2**20, f"peak {peak / 2**20:.1f} MB while scoring"
