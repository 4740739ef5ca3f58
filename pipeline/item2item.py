"""The item-to-item retriever (`retriever.kind: item2item`): a stronger x than MF.

Item-based collaborative filtering (Sarwar et al., WWW 2001; Linden et al., IEEE Internet
Computing 2003). Trained in the driver on the retriever window's training pairs only:

    sim(i, j) = c_ij / (sqrt(n_i n_j) + shrink)

with c_ij the users of the window who consumed both items and n_i those who consumed i; each item
keeps its `i2i_neighbors` most similar items. At a request at position r of a user's timeline,
every item is scored against that user's own history before r, the most recent items first:

    s(i) = sum_{a=1..L} decay^(a-1) sim(h_{r-a}, i),   x = s / (1 + s) in [0, 1)

(L = `i2i_history`, decay = `i2i_decay`), plus a tie-break by window popularity far below any
similarity. Leak-free by construction: the similarities see only the window, the scores only
the user's interactions before the request. Unlike MF, the score follows the user's history as
it grows after the window, which is why it is the stronger retriever of the two.
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np

from pipeline.config import RetrieverConfig

TABLE = "item2item.npz"
# Far below any similarity (>= 1 / (n_max + shrink)): popularity only orders items no history reaches.
_POPULARITY_WEIGHT = 1e-9


@dataclasses.dataclass(frozen=True)
class ItemToItem:
    """Sparse neighbour table of the item-to-item retriever.

    Attributes:
        item_ids: `[num_items]` raw ids, sorted (table order).
        neighbors: `[num_items, n]` table rows of each item's most similar items (-1: none).
        sims: `[num_items, n]` their similarities (0 where `neighbors` is -1).
        popularity: `[num_items]` window interactions of each item, scaled to [0, 1].
        history: L, the most recent history items that score a request.
        decay: weight of each older history item relative to the next one.
    """

    item_ids: np.ndarray
    neighbors: np.ndarray
    sims: np.ndarray
    popularity: np.ndarray
    history: int
    decay: float

    def raw_scores(self, history_items) -> np.ndarray:
        """`[num_items]` s(i) (float64) for a history (raw ids, oldest first); unknown ids add nothing."""
        s = _POPULARITY_WEIGHT * self.popularity.astype(np.float64)
        recent = list(history_items)[-self.history :][::-1] if self.history else []
        if not recent:
            return s
        rows = np.searchsorted(self.item_ids, recent)
        known = (rows < len(self.item_ids)) & (self.item_ids[np.minimum(rows, len(self.item_ids) - 1)] == recent)
        weights = self.decay ** np.arange(len(recent), dtype=np.float64)
        for row, w in zip(rows[known], weights[known]):
            nb = self.neighbors[row]
            ok = nb >= 0
            np.add.at(s, nb[ok], w * self.sims[row][ok])
        return s

    def top_k(self, history_items, exclude: set[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        """The `k` best items for a history, excluding raw ids in `exclude`.

        Returns:
            (raw item ids `[k']`, scores x in [0, 1) `[k']`), best first, ties broken by table order.
        """
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        s = self.raw_scores(history_items)
        if exclude:
            s[np.isin(self.item_ids, np.fromiter(exclude, np.int64, len(exclude)))] = -np.inf
        idx = np.flatnonzero(np.isfinite(s))
        if len(idx) > k:
            kth = np.partition(s[idx], len(idx) - k)[len(idx) - k]
            idx = idx[s[idx] >= kth]
        order = np.lexsort((idx, -s[idx]))[:k]
        idx = idx[order]
        return self.item_ids[idx], squash(s[idx]).astype(np.float32)

    def scores(self, history_items, ids) -> np.ndarray:
        """x of the raw ids `ids` `[n]` for a history (an unknown id scores 0)."""
        s = self.raw_scores(history_items)
        ids = np.asarray(ids, np.int64)
        rows = np.searchsorted(self.item_ids, ids)
        rows = np.minimum(rows, len(self.item_ids) - 1)
        known = self.item_ids[rows] == ids
        return np.where(known, squash(s[rows]), 0.0).astype(np.float32)


def squash(s: np.ndarray) -> np.ndarray:
    """s / (1 + s): a monotone map of s >= 0 into [0, 1)."""
    return s / (1.0 + s)


def train_item2item(
    pairs: np.ndarray,
    items: np.ndarray,
    cfg: RetrieverConfig,
    eval_pairs: dict[str, np.ndarray] | None = None,
    seed: int = 0,
) -> tuple[ItemToItem, dict]:
    """Builds the neighbour table from `[n, 2]` (user row, item row) window pairs.

    Args:
        pairs: the retriever window's training pairs (rows into the user and item vocabularies).
        items: `[num_items]` sorted raw item ids.
        cfg: `i2i_neighbors`, `i2i_shrink`, `i2i_history`, `i2i_decay`.
        eval_pairs: name -> held-out pairs to measure the AUC on: a held-out item against a
            uniformly drawn one, each scored against the user's training pairs as the history.
        seed: seed of the AUC's negatives.

    Returns:
        (retriever, metrics with `auc_<name>`, `num_items`).
    """
    import scipy.sparse as sp

    num_items = len(items)
    num_users = int(pairs[:, 0].max()) + 1 if len(pairs) else 0
    if eval_pairs:
        num_users = max([num_users] + [int(p[:, 0].max()) + 1 for p in eval_pairs.values() if len(p)])
    if not len(pairs):
        raise ValueError("the retriever window is empty")
    x = sp.csr_matrix((np.ones(len(pairs), np.float32), (pairs[:, 0], pairs[:, 1])), shape=(num_users, num_items))
    x.data[:] = 1.0  # a repeated pair counts once
    n = np.asarray(x.sum(axis=0)).ravel()
    co = (x.T @ x).tocsr()
    co.setdiag(0.0)
    co.eliminate_zeros()
    co = co.tocoo()
    sim = co.data / (np.sqrt(n[co.row] * n[co.col]) + cfg.i2i_shrink)
    m = cfg.i2i_neighbors
    neighbors = np.full((num_items, m), -1, np.int64)
    sims = np.zeros((num_items, m), np.float32)
    order = np.lexsort((co.col, -sim, co.row))  # by row, best first, ties by table order
    row, col, val = co.row[order], co.col[order], sim[order]
    starts = np.searchsorted(row, np.arange(num_items))
    rank = np.arange(len(row)) - starts[row]
    keep = rank < m
    neighbors[row[keep], rank[keep]] = col[keep]
    sims[row[keep], rank[keep]] = val[keep]
    retriever = ItemToItem(
        item_ids=np.asarray(items, np.int64),
        neighbors=neighbors,
        sims=sims,
        popularity=(n / max(n.max(), 1.0)).astype(np.float32),
        history=cfg.i2i_history,
        decay=cfg.i2i_decay,
    )
    metrics = {"num_items": num_items}
    if eval_pairs:
        s = sp.csr_matrix(
            (sims[neighbors >= 0], (np.nonzero(neighbors >= 0)[0], neighbors[neighbors >= 0])),
            shape=(num_items, num_items),
        )
        rng = np.random.default_rng(seed + 1)
        for name, ev in eval_pairs.items():
            if not len(ev):
                metrics[f"auc_{name}"] = float("nan")
                continue
            neg = rng.integers(0, num_items, size=len(ev))
            correct = 0.0
            for b in range(0, len(ev), 4096):
                u, i, j = ev[b : b + 4096, 0], ev[b : b + 4096, 1], neg[b : b + 4096]
                profile = (x[u] @ s).tocsr()  # [b, num_items]: s(i) with the user's window as history
                pos_s = np.asarray(profile[np.arange(len(u)), i]).ravel() + _POPULARITY_WEIGHT * retriever.popularity[i]
                neg_s = np.asarray(profile[np.arange(len(u)), j]).ravel() + _POPULARITY_WEIGHT * retriever.popularity[j]
                correct += float((pos_s > neg_s).sum() + 0.5 * (pos_s == neg_s).sum())
            metrics[f"auc_{name}"] = correct / len(ev)
    return retriever, metrics


def save(retriever: ItemToItem, directory: str) -> None:
    import tensorflow as tf

    tf.io.gfile.makedirs(directory)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        item_ids=retriever.item_ids,
        neighbors=retriever.neighbors,
        sims=retriever.sims,
        popularity=retriever.popularity,
        history=np.int64(retriever.history),
        decay=np.float64(retriever.decay),
    )
    with tf.io.gfile.GFile(os.path.join(directory, TABLE), "wb") as f:
        f.write(buffer.getvalue())


def load(directory: str) -> ItemToItem:
    """Loads the table that `save` wrote (works for any Beam-readable path)."""
    from pipeline.retriever import read_npz

    arrays = read_npz(os.path.join(directory, TABLE))
    return ItemToItem(
        item_ids=arrays["item_ids"],
        neighbors=arrays["neighbors"],
        sims=arrays["sims"],
        popularity=arrays["popularity"],
        history=int(arrays["history"]),
        decay=float(arrays["decay"]),
    )
