"""Per-user list construction: the cascade protocol and the paper's, as pure functions.

Everything here works on one user's timeline at a time, so the Beam pipeline can run it in
parallel over users with no global state except the retriever's embedding tables.
See ../shared/PROTOCOL.md for the rules and why they are what they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from dnr_tf import schema as S


class Interaction(NamedTuple):
    """One interaction as read from a source; `file` and `line` point back at the input."""

    user: int
    item: int
    timestamp: int
    rating: float
    file: str = ""
    line: int = 0


@dataclasses.dataclass(frozen=True)
class Retriever:
    """Matrix factorisation tables: score(u, i) = sigmoid(u . v_i + b_i + b_u + b).

    Attributes:
        item_ids: `[num_items]` raw ids, in table order.
        item_emb: `[num_items, dim]`.
        item_bias: `[num_items]`.
        global_bias: scalar.
    """

    item_ids: np.ndarray
    item_emb: np.ndarray
    item_bias: np.ndarray
    global_bias: float
    chunk_size: int = 65_536

    def logits(self, user_vec: np.ndarray, user_bias: float) -> np.ndarray:
        """`[num_items]` logits of one user over the whole catalogue."""
        return self.item_emb @ user_vec + self.item_bias + user_bias + self.global_bias

    def top_k(
        self,
        user_vec: np.ndarray,
        user_bias: float,
        exclude: set[int],
        k: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The `k` best items for a user, excluding raw ids in `exclude`.

        The catalogue is scored `chunk_size` items at a time, keeping the best `k` so far, so a
        request never holds more than one chunk of scores (a catalogue of millions of items).

        Returns:
            (raw item ids `[k']`, scores in (0, 1) `[k']`), best first, k' <= k; ties broken by
            table order so the result is deterministic.
        """
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        excluded = np.fromiter(exclude, np.int64, len(exclude)) if exclude else None
        best_idx, best_logit = np.zeros(0, np.int64), np.zeros(0, np.float64)
        for start in range(0, len(self.item_ids), self.chunk_size):
            stop = min(start + self.chunk_size, len(self.item_ids))
            chunk = self.item_emb[start:stop] @ user_vec + self.item_bias[start:stop] + user_bias + self.global_bias
            logits = chunk.astype(np.float64)  # the same arithmetic as `logits`, chunk by chunk
            if excluded is not None:
                logits[np.isin(self.item_ids[start:stop], excluded)] = -np.inf
            idx = np.concatenate([best_idx, np.arange(start, stop)])
            val = np.concatenate([best_logit, logits])
            idx, val = idx[np.isfinite(val)], val[np.isfinite(val)]
            if len(idx) > k:
                # The k best by (logit desc, table order asc): everything at or above the k-th
                # value (a partition), then the exact cut among those.
                kth = np.partition(val, len(val) - k)[len(val) - k]
                idx, val = idx[val >= kth], val[val >= kth]
            best_idx, best_logit = idx, val
        order = np.lexsort((best_idx, -best_logit))[:k]
        return self.item_ids[best_idx[order]], sigmoid(best_logit[order]).astype(np.float32)

    def top_k_prefixes(
        self, user_vec: np.ndarray, user_bias: float, items: Sequence[int], ends: Sequence[int], k: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`top_k(user_vec, user_bias, set(items[:end]), k)` for each end of `ends`, in order.

        The cascade's requests of one user exclude growing prefixes of one timeline. A catalogue
        of one chunk is scored and ordered once for all of them, and each request then takes the
        first `k` items of that order it has not consumed: the same items and scores as `top_k`,
        whose order is (logit desc, table order asc) over the finite logits. A larger catalogue
        goes through `top_k` request by request, holding one chunk of scores at a time.
        """
        ends = list(ends)
        if any(b < a for a, b in zip(ends, ends[1:])):
            raise ValueError(f"top_k_prefixes: ends must not decrease, got {ends}")
        sorter = np.argsort(self.item_ids, kind="stable")
        table = self.item_ids[sorter]
        if k <= 0 or not 0 < len(table) <= self.chunk_size or np.any(table[1:] == table[:-1]):
            for end in ends:
                yield self.top_k(user_vec, user_bias, set(items[:end]), k)
            return
        # The same arithmetic as `top_k` on its single chunk.
        logits = (self.item_emb[0:] @ user_vec + self.item_bias[0:] + user_bias + self.global_bias).astype(np.float64)
        finite = np.flatnonzero(np.isfinite(logits))
        order = finite[np.lexsort((finite, -logits[finite]))]
        ids = np.asarray(items, np.int64)
        slot = np.minimum(np.searchsorted(self.item_ids, ids, sorter=sorter), len(sorter) - 1)
        position = np.where(self.item_ids[sorter[slot]] == ids, sorter[slot], -1)  # -1: not in the table
        consumed = np.zeros(len(self.item_ids), bool)
        done = 0
        for end in ends:
            seen = position[done:end]
            consumed[seen[seen >= 0]] = True
            done = max(done, end)
            best = order[~consumed[order]][:k]
            yield self.item_ids[best], sigmoid(logits[best]).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class MFScorer:
    """One user's view of an MF retriever, behind the scorer interface of `cascade_lists`.

    A scorer has `top_k(history, exclude, k)` -> (raw ids, x) and `scores(history, ids)` -> x,
    `history` being the user's raw item ids before the request, oldest first. MF ignores it (its
    user vector is fixed at the end of the window); `pipeline.item2item.ItemToItem` uses it.
    """

    retriever: Retriever
    user_vec: np.ndarray
    user_bias: float

    def top_k(self, history, exclude: set[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.retriever.top_k(self.user_vec, self.user_bias, exclude, k)

    def top_k_prefixes(self, items, ends, k: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`top_k(items[:end], set(items[:end]), k)` for each end (see `Retriever.top_k_prefixes`)."""
        return self.retriever.top_k_prefixes(self.user_vec, self.user_bias, items, ends, k)

    def scores(self, history, ids) -> np.ndarray:
        """x = sigmoid(MF logit) of the raw ids `ids` `[n]` (an id outside the table scores 0)."""
        ret = self.retriever
        ids = np.asarray(ids, np.int64)
        sorter = np.argsort(ret.item_ids)
        pos = np.minimum(np.searchsorted(ret.item_ids, ids, sorter=sorter), len(ret.item_ids) - 1)
        idx = sorter[pos]
        known = ret.item_ids[idx] == ids
        logits = ret.item_emb[idx] @ self.user_vec + ret.item_bias[idx] + self.user_bias + ret.global_bias
        return np.where(known, sigmoid(logits.astype(np.float64)), 0.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class RescoredScorer:
    """The candidates of one scorer, scored and ordered by another (`retriever.kind: mf_item2item`).

    A two-step retriever: `candidates` picks the items (the same lists as it would alone), and
    `scorer` gives their x, the list ordered by it (ties keep the candidate order).
    """

    candidates: object
    scorer: object

    def top_k(self, history, exclude: set[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        ids, _ = self.candidates.top_k(history, exclude, k)
        return self._rescored(history, ids)

    def top_k_prefixes(self, items, ends, k: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        ends = list(ends)
        for end, (ids, _) in zip(ends, prefix_top_k(self.candidates, items, ends, k)):
            yield self._rescored(items[:end], ids)

    def _rescored(self, history, ids) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(self.scorer.scores(history, ids), np.float32)
        order = np.argsort(-x, kind="stable")
        return ids[order], x[order]

    def scores(self, history, ids) -> np.ndarray:
        return self.scorer.scores(history, ids)


def prefix_top_k(scorer, items: Sequence[int], ends: Sequence[int], k: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`scorer.top_k(items[:end], set(items[:end]), k)` for each end, through the scorer's
    `top_k_prefixes` where it has one (the same results, computed once for all requests)."""
    fast = getattr(scorer, "top_k_prefixes", None)
    if fast is not None:
        return fast(items, ends, k)
    return (scorer.top_k(items[:end], set(items[:end]), k) for end in ends)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def stable_fraction(*keys) -> float:
    """A number in [0, 1) from a stable hash of `keys` (the same on every worker and run)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def order_timeline(interactions: Sequence[Interaction]) -> tuple[list[Interaction], list[Interaction]]:
    """Sorts a user's interactions by (timestamp, item) and drops repeated items.

    Returns:
        (kept timeline, duplicates): a repeated (user, item) keeps its first occurrence.
    """
    ordered = sorted(interactions, key=lambda r: (r.timestamp, r.item, r.file, r.line))
    seen: set[int] = set()
    kept, dups = [], []
    for r in ordered:
        (dups if r.item in seen else kept).append(r)
        seen.add(r.item)
    return kept, dups


def retriever_window_size(n: int, fraction: float) -> int:
    """Interactions of a timeline of length n that train the retriever: floor(fraction * n)."""
    return int(n * fraction)


class ListRecord(dict):
    """A request's record (the schema's feature names) plus its `split`."""


def cascade_lists(
    user: int,
    timeline: Sequence[Interaction],
    user_vec: np.ndarray,
    user_bias: float,
    retriever: Retriever,
    *,
    retriever_fraction: float,
    stride: int,
    history_len: int,
    list_size: int,
    horizon: int,
    scorer=None,
    retrained=None,
) -> tuple[list[ListRecord], dict[str, int]]:
    """The cascade protocol for one user (PROTOCOL.md, steps 4-8).

    Requests start after the retriever window, one every `stride` interactions, and need `horizon`
    future interactions. Candidates are the retriever's top `list_size` items the user has not
    consumed before the request, in the retriever's order; positives are those consumed within
    the next `horizon` interactions, the window truncated where the user's next split begins.

    The retriever is `scorer` (see `MFScorer`), by default MF from `retriever`, `user_vec` and
    `user_bias`. A `retrained` scorer scores the same candidates as `retriever_scores_retrained`.

    Returns:
        (records with their `split`, counters: requests, dropped_no_positive, dropped_truncated).
    """
    items = [r.item for r in timeline]
    n = len(items)
    start = retriever_window_size(n, retriever_fraction)
    counts = {"requests": 0, "dropped_no_positive": 0, "dropped_truncated": 0}
    if scorer is None:
        scorer = MFScorer(retriever, user_vec, user_bias)
    candidates, extra = [], {}
    requests = range(start, n - horizon + 1, stride)
    for r, (ids, scores) in zip(requests, prefix_top_k(scorer, items, requests, list_size)):
        counts["requests"] += 1
        positives_any = set(items[r : r + horizon]) & set(ids.tolist())
        if not positives_any:
            counts["dropped_no_positive"] += 1
            continue
        candidates.append((r, ids, scores))
        if retrained is not None:
            extra[r] = {S.RETRIEVER_SCORES_RETRAINED: [float(v) for v in retrained.scores(items[:r], ids)]}
    return _split_and_label(user, timeline, candidates, horizon, history_len, counts, extra)


def _split_and_label(user, timeline, candidates, horizon, history_len, counts, extra=None):
    """Assigns splits (last kept list -> test, the one before -> valid) and truncates labels."""
    items = [r.item for r in timeline]
    n = len(candidates)
    splits = ["train"] * n
    if n >= 1:
        splits[-1] = "test"
    if n >= 2:
        splits[-2] = "valid"
    # A list's label window ends where the user's next split begins, so no train (valid) label
    # comes from the valid (test) period.
    split_start = {}
    for (r, _, _), split in zip(candidates, splits):
        split_start.setdefault(split, r)
    next_start = {"train": split_start.get("valid", split_start.get("test")), "valid": split_start.get("test")}
    records = []
    for (r, ids, scores), split in zip(candidates, splits):
        end = r + horizon
        limit = next_start.get(split)
        if limit is not None:
            end = min(end, limit)
        future = set(items[r:end])
        labels = [int(i in future) for i in ids.tolist()]
        if not any(labels):
            counts["dropped_truncated"] += 1
            continue
        records.append(_record(user, timeline, r, ids, scores, labels, split, history_len, (extra or {}).get(r)))
    return records, counts


def _record(user, timeline, r, ids, scores, labels, split, history_len, extra=None) -> ListRecord:
    ts = timeline[r].timestamp if r < len(timeline) else timeline[-1].timestamp
    return ListRecord(
        {
            S.REQUEST_ID: f"{user}:{r}",
            S.USER_ID: int(user),
            S.TIMESTAMP: int(ts),
            S.ITEM_IDS: [int(i) for i in ids],
            S.RETRIEVER_SCORES: [float(s) for s in scores],
            S.LABELS: labels,
            S.HISTORY: [t.item for t in timeline[max(0, r - history_len) : r]],
            **(extra or {}),
            "split": split,
        }
    )


def paper_lists(
    user: int,
    timeline: Sequence[Interaction],
    user_vec: np.ndarray,
    user_bias: float,
    retriever: Retriever,
    *,
    chunk: int,
    history_len: int,
    list_size: int,
) -> tuple[list[ListRecord], dict[str, int]]:
    """The paper's construction (appendix C.1), for replication only: it leaks labels.

    The timeline is cut into consecutive chunks of `chunk` items (the revealed lists); each list
    holds the chunk plus the retriever's top `list_size - chunk` other unconsumed items, all in
    the retriever's order; the chunk's items are the positives.
    """
    items = [r.item for r in timeline]
    counts = {"requests": 0, "dropped_no_positive": 0, "dropped_truncated": 0}
    records = []
    starts = list(range(0, len(items) - chunk + 1, chunk))
    for c, r in enumerate(starts):
        counts["requests"] += 1
        revealed = items[r : r + chunk]
        others, _ = retriever.top_k(user_vec, user_bias, set(items[: r + chunk]), list_size - chunk)
        ids = np.array(revealed + others.tolist(), np.int64)
        idx = _table_index(retriever, ids)
        logits = retriever.item_emb[idx] @ user_vec + retriever.item_bias[idx] + user_bias + retriever.global_bias
        order = np.lexsort((np.arange(len(ids)), -logits))
        ids, scores = ids[order], sigmoid(logits[order]).astype(np.float32)
        labels = [int(i in set(revealed)) for i in ids.tolist()]
        split = "test" if c == len(starts) - 1 else ("valid" if c == len(starts) - 2 else "train")
        records.append(_record(user, timeline, r, ids, scores, labels, split, history_len))
    return records, counts


def _table_index(retriever: Retriever, ids: np.ndarray) -> np.ndarray:
    sorter = np.argsort(retriever.item_ids)
    return sorter[np.searchsorted(retriever.item_ids, ids, sorter=sorter)]


def split_logged_lists(lists: Sequence[dict]) -> Iterator[ListRecord]:
    """Splits one user's logged lists by time: last -> test, the one before -> valid, rest -> train."""
    ordered = sorted(lists, key=lambda r: (r[S.TIMESTAMP], r[S.REQUEST_ID]))
    n = len(ordered)
    for j, rec in enumerate(ordered):
        split = "test" if j == n - 1 else ("valid" if j == n - 2 else "train")
        yield ListRecord({**rec, "split": split})
