"""The benchmark scripts' own logic (their timings are never tested): the ML-1M-size data generator."""

from __future__ import annotations

import collections

from bench.pipeline import write_ml1m_like
from pipeline.sources.interactions import parse_movielens


def test_ml1m_like_file_has_the_asked_size_and_parses_as_ratings_dat(tmp_path):
    path = tmp_path / "ratings.dat"
    write_ml1m_like(str(path), users=60, items=120, interactions=3_000, seed=3)
    lines = path.read_text().splitlines()
    assert len(lines) == 3_000
    records = list(parse_movielens("1m")(str(path), [(n, text, None) for n, text in enumerate(lines, 1)]))
    assert not [r for r in records if isinstance(r, dict)], "no line is rejected"
    per_user = collections.defaultdict(list)
    for r in records:
        per_user[r.user].append((r.timestamp, r.item))
    assert len(per_user) == 60 and min(len(v) for v in per_user.values()) >= 20
    for events in per_user.values():
        items = [i for _, i in events]
        times = [t for t, _ in events]
        assert len(set(items)) == len(items), "an item at most once a user"
        assert times == sorted(times) and len(set(times)) == len(times)
        assert all(1 <= i <= 120 for i in items)
    # Deterministic in the seed; another seed, other data.
    again = tmp_path / "again.dat"
    write_ml1m_like(str(again), users=60, items=120, interactions=3_000, seed=3)
    assert again.read_bytes() == path.read_bytes()
    other = tmp_path / "other.dat"
    write_ml1m_like(str(other), users=60, items=120, interactions=3_000, seed=4)
    assert other.read_bytes() != path.read_bytes()
