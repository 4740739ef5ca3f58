"""Per-user list construction (pipeline/protocol.py) on hand-made timelines."""

import numpy as np
import pytest

from dnr_tf import schema as S
from pipeline import protocol
from pipeline.protocol import Interaction, Retriever


def _retriever(num_items=30, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    return Retriever(
        item_ids=np.arange(1, num_items + 1, dtype=np.int64),
        item_emb=rng.normal(size=(num_items, dim)).astype(np.float32),
        item_bias=rng.normal(size=num_items).astype(np.float32),
        global_bias=0.0,
    )


def _timeline(items):
    return [Interaction(7, int(i), 100 + t, 4.0) for t, i in enumerate(items)]


def _build(items, retriever, **kw):
    args = dict(retriever_fraction=0.5, stride=2, history_len=3, list_size=30, horizon=2)
    args.update(kw)
    return protocol.cascade_lists(7, _timeline(items), np.ones(4, np.float32), 0.0, retriever, **args)


def test_cascade_requests_candidates_labels_and_split():
    retriever = _retriever()
    items = list(range(1, 17))  # 16 interactions: window 8, requests at 8, 10, 12, 14
    records, counts = _build(items, retriever)
    assert counts["requests"] == 4
    # Every candidate list holds all unconsumed items (list_size = catalogue) so every request has positives.
    assert [r[S.REQUEST_ID] for r in records] == ["7:8", "7:10", "7:12", "7:14"]
    assert [r["split"] for r in records] == ["train", "train", "valid", "test"]
    for rec in records:
        r = int(rec[S.REQUEST_ID].split(":")[1])
        consumed = set(items[:r])
        assert not consumed & set(rec[S.ITEM_IDS]), "consumed items are never candidates"
        positives = {i for i, z in zip(rec[S.ITEM_IDS], rec[S.LABELS]) if z == 1}
        assert positives == set(items[r : r + 2])
        assert rec[S.HISTORY] == items[r - 3 : r]
        assert rec[S.TIMESTAMP] == 100 + r
        # Stored in the retriever's order: scores descending.
        assert np.all(np.diff(rec[S.RETRIEVER_SCORES]) <= 0)


def test_labels_truncated_at_next_split():
    # horizon 4 > stride 2: without truncation a train list would see valid-period items.
    records, counts = _build(list(range(1, 17)), _retriever(), horizon=4)
    by_split = {}
    for rec in records:
        by_split.setdefault(rec["split"], []).append(int(rec[S.REQUEST_ID].split(":")[1]))
    first_valid = min(by_split["valid"])
    first_test = min(by_split["test"])
    items = list(range(1, 17))
    for rec in records:
        positives = {i for i, z in zip(rec[S.ITEM_IDS], rec[S.LABELS]) if z == 1}
        later = (
            set(items[first_valid:])
            if rec["split"] == "train"
            else set(items[first_test:])
            if rec["split"] == "valid"
            else set()
        )
        assert not positives & later, f"{rec['split']} list {rec[S.REQUEST_ID]} labels from a later split"
    assert counts["dropped_truncated"] >= 0


def test_lists_without_positive_are_dropped_and_counted():
    retriever = _retriever()
    # A short candidate list: the retriever's top 2 rarely hold the next items.
    records, counts = _build(list(range(1, 17)), retriever, list_size=2)
    assert counts["requests"] == 4
    assert counts["dropped_no_positive"] + len(records) == 4
    assert all(1 in rec[S.LABELS] for rec in records)


def test_order_timeline_sorts_and_drops_repeats():
    rows = [
        Interaction(1, 5, 30, 1.0, "f", 1),
        Interaction(1, 3, 10, 1.0, "f", 2),
        Interaction(1, 5, 20, 1.0, "f", 3),
        Interaction(1, 2, 10, 1.0, "f", 4),
    ]
    kept, dups = protocol.order_timeline(rows)
    assert [(r.item, r.timestamp) for r in kept] == [(2, 10), (3, 10), (5, 20)]
    assert [(d.item, d.line) for d in dups] == [(5, 1)]


def test_paper_protocol_inserts_the_chunk():
    retriever = _retriever()
    items = list(range(1, 13))
    records, _ = protocol.paper_lists(
        7, _timeline(items), np.ones(4, np.float32), 0.0, retriever, chunk=3, history_len=3, list_size=10
    )
    assert len(records) == 4
    for c, rec in enumerate(records):
        chunk = set(items[3 * c : 3 * c + 3])
        assert {i for i, z in zip(rec[S.ITEM_IDS], rec[S.LABELS]) if z == 1} == chunk
        assert len(rec[S.ITEM_IDS]) == 10 and len(set(rec[S.ITEM_IDS])) == 10
    assert [r["split"] for r in records] == ["train", "train", "valid", "test"]


def test_stable_fraction_is_stable_and_uniform():
    values = [protocol.stable_fraction(0, "x", i) for i in range(2000)]
    assert values == [protocol.stable_fraction(0, "x", i) for i in range(2000)]
    assert 0.45 < np.mean(values) < 0.55


def _request_by_request(retriever, vec, bias, items, ends, k):
    return [retriever.top_k(vec, bias, set(items[:end]), k) for end in ends]


def test_top_k_prefixes_equal_top_k_request_by_request():
    rng = np.random.default_rng(3)
    for case in range(60):
        num_items = int(rng.integers(1, 40))
        ret = _retriever(num_items=num_items, seed=case)
        ids = rng.permutation(np.arange(100, 100 + 3 * num_items))[:num_items].astype(np.int64)  # not sorted
        emb, bias = ret.item_emb.copy(), ret.item_bias.copy()
        if case % 3 == 0:  # ties: repeated rows give equal logits, broken by table order
            emb[num_items // 2 :] = emb[0]
            bias[num_items // 2 :] = bias[0]
        if case % 5 == 0:  # non-finite logits are never candidates
            bias[rng.integers(0, num_items, size=2)] = rng.choice([np.inf, -np.inf, np.nan])
        ret = Retriever(item_ids=ids, item_emb=emb, item_bias=bias, global_bias=0.3)
        vec = rng.normal(size=4).astype(np.float32)
        # A timeline of table ids and ids the table does not know, with repeats.
        items = rng.choice(np.concatenate([ids, [1, 2, 3]]), size=int(rng.integers(0, 30))).tolist()
        ends = sorted(rng.integers(0, len(items) + 1, size=6).tolist())
        k = int(rng.integers(0, num_items + 3))
        for chunk_size in (65_536, 7):  # one chunk: the fast path; several: request by request
            chunked = Retriever(ids, emb, bias, 0.3, chunk_size=chunk_size)
            got = list(chunked.top_k_prefixes(vec, 0.1, items, ends, k))
            want = _request_by_request(chunked, vec, 0.1, items, ends, k)
            assert len(got) == len(want) == len(ends)
            for (gi, gs), (wi, ws) in zip(got, want):
                np.testing.assert_array_equal(gi, wi)
                np.testing.assert_array_equal(gs, ws)  # bit for bit
                assert gs.dtype == ws.dtype == np.float32


def test_top_k_prefixes_refuses_decreasing_ends():
    with pytest.raises(ValueError, match="must not decrease"):
        list(_retriever().top_k_prefixes(np.ones(4, np.float32), 0.0, [1, 2, 3], [2, 1], 5))


def test_cascade_lists_the_same_through_the_scorer_interface_request_by_request():
    class Slow:  # a scorer without `top_k_prefixes`: the fallback of `prefix_top_k`
        def __init__(self, inner):
            self.inner = inner

        def top_k(self, history, exclude, k):
            return self.inner.top_k(history, exclude, k)

        def scores(self, history, ids):
            return self.inner.scores(history, ids)

    ret = _retriever(num_items=40)
    items = list(np.random.default_rng(1).permutation(np.arange(1, 41))[:30])
    vec = np.ones(4, np.float32)
    args = dict(retriever_fraction=0.3, stride=2, history_len=3, list_size=10, horizon=3)
    fast, fast_counts = protocol.cascade_lists(7, _timeline(items), vec, 0.0, ret, **args)
    slow, slow_counts = protocol.cascade_lists(
        7, _timeline(items), vec, 0.0, ret, scorer=Slow(protocol.MFScorer(ret, vec, 0.0)), **args
    )
    assert fast and fast == slow and fast_counts == slow_counts
