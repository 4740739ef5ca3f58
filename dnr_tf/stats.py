"""Statistics for the study: a hierarchical bootstrap over seeds and test lists, and Holm's correction.

A study row is trained once per seed and evaluated on the same test lists under every seed, so one
row is a matrix `v[s, l]` of per-list metric values, `[n_seeds, n_lists]`. Two sources of variance
count: training (the seed) and the sample of lists. The bootstrap here resamples both, crossed:
each replicate draws `n_seeds` seeds with replacement and, once, `n_lists` lists with replacement,
and the same drawn lists serve every drawn seed and both arms of a comparison (the lists are the
same lists under every seed and in both rows; resampling them independently per seed would shrink
the list variance by the number of seeds). The crossed bootstrap also counts the seed x list
interaction twice, so its intervals err on the wide side.

numpy only; every function is deterministic given its `seed`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
_CHUNK = 256  # replicates computed at once: [chunk, n_lists] floats stay small on large test sets


@dataclasses.dataclass(frozen=True)
class Interval:
    """A bootstrap estimate: the observed mean, its percentile interval and (for differences) p."""

    mean: float
    low: float
    high: float
    p: float = float("nan")
    seeds: int = 0
    lists: int = 0


def _matrix(values, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[None, :]
    if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] == 0:
        raise ValueError(f"{name}: expected per-list values [n_seeds, n_lists], got shape {v.shape}")
    return v


def _counts(rng: np.random.Generator, b: int, n: int) -> np.ndarray:
    """[b, n]: how often each of n items is drawn in b samples of n draws with replacement."""
    draws = rng.integers(0, n, (b, n)) + n * np.arange(b)[:, None]
    return np.bincount(draws.reshape(-1), minlength=b * n).reshape(b, n).astype(np.float64)


def _replicates(v: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Bootstrap replicates of the grand mean of `v` [S, L]: [resamples].

    Replicate b with seed counts `c_s` (a multinomial draw of S from S) and list counts `k_l`
    (L from L) is  mean*_b = sum_{s,l} c_s k_l v[s, l] / (S L),  the mean of `v` over the drawn
    seeds x drawn lists.
    """
    n_seeds, n_lists = v.shape
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        b = min(_CHUNK, resamples - start)
        seed_counts = _counts(rng, b, n_seeds)  # [b, S]
        list_counts = _counts(rng, b, n_lists)  # [b, L]
        # einsum without BLAS: a [b, S] x [S, L] product this small is slower through a threaded BLAS
        out[start : start + b] = np.einsum("bs,sl,bl->b", seed_counts, v, list_counts) / (n_seeds * n_lists)
    return out


def _rows(values, name: str) -> list[np.ndarray]:
    rows = [np.asarray(r, dtype=np.float64).reshape(-1) for r in values]
    if not rows or any(r.size == 0 for r in rows):
        raise ValueError(f"{name}: expected one non-empty row of per-list values per seed")
    if not all(np.all(np.isfinite(r)) for r in rows):
        raise ValueError(f"{name}: per-list values must be finite")
    return rows


def _replicates_unpaired(rows: list[np.ndarray], seed_counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Replicates of the mean over seeds of each seed's mean over lists, the lists drawn anew for
    every seed (run): for runs whose j-th value need not be the same test list. `seed_counts`
    [resamples, S] are given, so that two arms can share them."""
    resamples, n_seeds = seed_counts.shape
    out = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        b = min(_CHUNK, resamples - start)
        row_means = np.stack([(_counts(rng, b, row.size) @ row) / row.size for row in rows], axis=1)  # [b, S]
        out[start : start + b] = np.einsum("bs,bs->b", seed_counts[start : start + b], row_means) / n_seeds
    return out


def unpaired_difference(a, b, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """Difference of two rows over shared seeds when their runs' test lists cannot be matched.

    `a`, `b`: one row of per-list values per seed, the same seeds in the same order (rows may differ
    in length). As `paired_difference`, seeds are drawn once for both arms, but each run's lists are
    drawn on their own: the j-th value of one run need not be the j-th test list of another (runs
    that did not record their list ids, README "The study"). The estimate is the mean over seeds of
    each run's mean over lists; the interval is wider in expectation than a paired one, as the lists'
    shared difficulty no longer cancels.
    """
    a, b = _rows(a, "a"), _rows(b, "b")
    if len(a) != len(b):
        raise ValueError(f"a and b must share seeds: {len(a)} and {len(b)} rows")
    rng = np.random.default_rng(seed)
    seed_counts = _counts(rng, resamples, len(a))
    reps = _replicates_unpaired(a, seed_counts, rng) - _replicates_unpaired(b, seed_counts, rng)
    low, high = _percentiles(reps, level)
    tail = min(np.sum(reps <= 0), np.sum(reps >= 0))
    p = min(1.0, 2.0 * (tail + 1) / (resamples + 1))
    mean = float(np.mean([r.mean() for r in a]) - np.mean([r.mean() for r in b]))
    return Interval(mean, low, high, p, seeds=len(a), lists=min(r.size for r in a + b))


def bootstrap_mean_unpaired(values, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """`bootstrap_mean` for runs whose j-th values need not be the same test list: lists drawn per run."""
    rows = _rows(values, "values")
    rng = np.random.default_rng(seed)
    reps = _replicates_unpaired(rows, _counts(rng, resamples, len(rows)), rng)
    low, high = _percentiles(reps, level)
    return Interval(
        float(np.mean([r.mean() for r in rows])), low, high, seeds=len(rows), lists=min(r.size for r in rows)
    )


def _percentiles(replicates: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_mean(values, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """Mean of one row over seeds and lists with a percentile interval from the crossed bootstrap.

    Args:
        values: per-list values `[n_seeds, n_lists]` (one row per seed; a 1-D array is one seed).
        resamples: bootstrap replicates B.
        level: coverage of the interval (0.95: the 2.5% and 97.5% quantiles of the replicates).
        seed: the generator's seed.

    Returns:
        `Interval(mean = mean_{s,l} v[s, l], low, high)`; `p` is NaN.
    """
    v = _matrix(values, "values")
    if not np.all(np.isfinite(v)):
        raise ValueError("values: per-list values must be finite")
    low, high = _percentiles(_replicates(v, resamples, seed), level)
    return Interval(float(v.mean()), low, high, seeds=v.shape[0], lists=v.shape[1])


def paired_difference(a, b, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """Paired crossed bootstrap of the difference of two rows that share seeds and test lists.

    Row s of `a` and of `b` must be the same seed, column l the same test list. With
    d[s, l] = a[s, l] - b[s, l], the estimate is  D = mean_{s,l} d[s, l]  and each replicate is
    D*_b = sum_{s,l} c_s k_l d[s, l] / (S L)  (seeds and lists drawn with replacement, the same draw
    for both arms). The interval is the percentile interval of the D*_b, and the two-sided p-value

        p = min(1, 2 * min(#{D*_b <= 0} + 1, #{D*_b >= 0} + 1) / (B + 1)),

    twice the smaller bootstrap tail at 0, with the usual +1 so that p is never 0 (its floor is
    2 / (B + 1)). Identical arms give D = 0, the interval [0, 0] and p = 1.

    Args:
        a: per-list values of the first row, `[n_seeds, n_lists]`.
        b: the second row, same shape, same seeds in the same order, same lists.
        resamples: bootstrap replicates B.
        level: coverage of the interval.
        seed: the generator's seed.

    Returns:
        `Interval(mean=D, low, high, p, seeds, lists)` of a - b.
    """
    a, b = _matrix(a, "a"), _matrix(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must share seeds and lists: shapes {a.shape} and {b.shape}")
    d = a - b
    if not np.all(np.isfinite(d)):
        raise ValueError("a, b: per-list values must be finite")
    reps = _replicates(d, resamples, seed)
    low, high = _percentiles(reps, level)
    tail = min(np.sum(reps <= 0), np.sum(reps >= 0))
    p = min(1.0, 2.0 * (tail + 1) / (resamples + 1))
    return Interval(float(d.mean()), low, high, p, seeds=d.shape[0], lists=d.shape[1])


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values for one family of m comparisons.

    With the p-values sorted ascending, p_(1) <= ... <= p_(m), the adjusted value of the i-th is

        p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)),

    monotone in i and capped at 1. Rejecting where p~ <= alpha controls the family-wise error at
    alpha. NaN entries (comparisons that could not be made) stay NaN and do not count in m.

    Args:
        pvalues: `[m]` raw p-values.

    Returns:
        `[m]` adjusted p-values, in the input's order.
    """
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    if idx.size == 0:
        return out
    if np.any((p[idx] < 0) | (p[idx] > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p[idx].tolist()}")
    order = idx[np.argsort(p[idx], kind="stable")]
    m = order.size
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out
