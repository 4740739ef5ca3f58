"""`--source sequences`: files of `user item item ...` lines, the item's position being its time.

Every input is a small file the test writes itself. The end-to-end test runs the whole pipeline on
a generated file of a few hundred users, reads the lists back with `dnr_tf.data.make_dataset`, and
holds them to PROTOCOL.md's leak checks, with the timelines rebuilt here from the raw lines.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib

import numpy as np
import pytest

from pipeline.protocol import Interaction
from pipeline.sources.files import numbered_lines
from pipeline.sources.sequences import Sequence, parse_sequences, sequence_interactions

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _parse(path):
    path = os.fspath(path)
    return list(parse_sequences(path, numbered_lines(path)))


def test_parse_gzip_bom_crlf_and_blank_lines(tmp_path):
    text = "\ufeff1 5 6 7\r\n\r\n2 8 9\r\n   \r\n3 10 11 12 13\r\n"
    path = tmp_path / "seqs.txt"  # gzip by content, not by name
    path.write_bytes(gzip.compress(text.encode("utf-8")))
    p = os.fspath(path)
    assert _parse(path) == [
        Sequence(1, (5, 6, 7), p, 1),
        Sequence(2, (8, 9), p, 3),
        Sequence(3, (10, 11, 12, 13), p, 5),
    ]
    # Tabs and runs of spaces separate tokens too.
    plain = tmp_path / "plain.txt"
    plain.write_text("4\t20  21\t 22\n")
    assert _parse(plain) == [Sequence(4, (20, 21, 22), os.fspath(plain), 1)]


BAD_LINES = [
    ("x7 1 2", "user id 'x7' is not an integer"),
    ("5", "user 5 has no item"),
    ("6 1 0 3", "item 2 0 must be a positive integer"),
    ("7 1 2 -3", "item 3 -3 must be a positive integer"),
    ("8 1 2.5", "item 2 '2.5' is not an integer"),
    ("0 1 2", "user id 0 must be a positive integer"),
    ("9 1 abc 4", "item 2 'abc' is not an integer"),
    ("10 1 99999999999999999999", "item 2 99999999999999999999 does not fit in int64"),
]


def test_each_bad_line_rejected_with_file_line_reason_and_good_lines_kept(tmp_path):
    lines = ["1 1 2 3"]
    for bad, _ in BAD_LINES:
        lines += [bad, f"{100 + len(lines)} 4 5"]
    path = tmp_path / "seqs.txt"
    path.write_bytes("\n".join(lines).encode() + b"\n11 1 \xff\xfe 2\n")
    out = _parse(path)
    rejects = [r for r in out if isinstance(r, dict)]
    good = [r for r in out if isinstance(r, Sequence)]
    assert [(s.user, s.items, s.line) for s in good] == [(1, (1, 2, 3), 1)] + [
        (100 + 2 * j + 1, (4, 5), 2 * j + 3) for j in range(len(BAD_LINES))
    ]
    assert len(rejects) == len(BAD_LINES) + 1
    for j, (bad, reason) in enumerate(BAD_LINES):
        r = rejects[j]
        assert r["file"] == os.fspath(path)
        assert r["line"] == 2 * j + 2, bad
        assert reason in r["reason"], (bad, r["reason"])
        assert r["text"] == bad
    assert rejects[-1]["line"] == len(lines) + 1 and "not UTF-8" in rejects[-1]["reason"]


def test_positions_are_timestamps_and_a_second_line_of_a_user_is_rejected():
    first = Sequence(3, (30, 10, 20), "a.txt", 4)
    later_same_file = Sequence(3, (40,), "a.txt", 9)
    other_file = Sequence(3, (50, 60), "b.txt", 1)
    out = list(sequence_interactions((3, [other_file, later_same_file, first])))
    interactions = [r for r in out if isinstance(r, Interaction)]
    assert [(r.user, r.item, r.timestamp, r.file, r.line) for r in interactions] == [
        (3, 30, 1, "a.txt", 4),
        (3, 10, 2, "a.txt", 4),
        (3, 20, 3, "a.txt", 4),
    ]
    rejects = [r for r in out if isinstance(r, dict)]
    assert [(r["file"], r["line"]) for r in rejects] == [("a.txt", 9), ("b.txt", 1)]
    for r in rejects:
        assert "user 3 already has a line (a.txt:4)" in r["reason"]
    # A reject of the parse passes through untouched.
    bad = {"file": "a.txt", "line": 2, "reason": "user 5 has no item", "text": "5"}
    assert list(sequence_interactions(bad)) == [bad]


def test_read_sequences_in_beam_over_two_files(tmp_path):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from pipeline.sources.files import REJECTS
    from pipeline.sources.sequences import ReadSequences

    (tmp_path / "a.txt").write_text("1 5 6\n2 7 8 9\n1 10\n")
    (tmp_path / "b.txt").write_text("2 11 12\n3 13 x\n4 14 15\n")
    a, b = os.fspath(tmp_path / "a.txt"), os.fspath(tmp_path / "b.txt")
    with TestPipeline() as p:
        read = p | ReadSequences(os.fspath(tmp_path / "*.txt"))
        records = read.records | "Fields" >> beam.Map(lambda r: (r.user, r.item, r.timestamp, r.file, r.line))
        rejects = read[REJECTS] | "Where" >> beam.Map(lambda r: (r["file"], r["line"], r["reason"].split(" (")[0]))
        expected = [(1, 5, 1, a, 1), (1, 6, 2, a, 1), (2, 7, 1, a, 2), (2, 8, 2, a, 2), (2, 9, 3, a, 2)]
        expected += [(4, 14, 1, b, 3), (4, 15, 2, b, 3)]
        assert_that(records, equal_to(expected), label="Interactions")
        assert_that(
            rejects,
            equal_to(
                [
                    (a, 3, "user 1 already has a line"),
                    (b, 1, "user 2 already has a line"),
                    (b, 2, "item 2 'x' is not an integer"),
                ]
            ),
            label="Rejects",
        )


# --- end to end ----------------------------------------------------------------------------------

NUM_USERS, NUM_ITEMS, LIST_SIZE, HISTORY_LEN = 300, 80, 20, 8


def _generate(path, seed=0):
    """Users of 5-14 items: popular items come first in everyone's taste (so MF learns something),
    one item twice in a line (rejected as a duplicate) and one bad line."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, NUM_ITEMS + 1) ** 0.8
    lines, timelines = [], {}
    for user in rng.permutation(np.arange(1, NUM_USERS + 1)).tolist():
        n = int(rng.integers(5, 15))
        items = rng.choice(np.arange(1, NUM_ITEMS + 1), n, replace=False, p=weights / weights.sum()).tolist()
        timelines[user] = items
        lines.append(" ".join(map(str, [user, *items])))
    lines = [line for line in lines if line.split()[0] != "77"]
    timelines.pop(77)
    lines.insert(5, "77 12 zero 3")  # line 6: rejected, so user 77 has no timeline
    user = int(lines[0].split()[0])
    lines[0] += f" {timelines[user][0]}"  # a repeat: its later position is rejected, the first kept
    path.write_text("\n".join(lines) + "\n")
    return timelines


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    from pipeline.run import run

    tmp = tmp_path_factory.mktemp("sequences")
    timelines = _generate(tmp / "seqs.txt")
    out = tmp / "out"
    args = ["--config", ROOT / "configs/pipeline/beauty.yaml", "--input", tmp / "seqs.txt", "--output_dir", out]
    small = {
        "min_count": 1,  # no k-core filter: the timelines are the lines
        "list_size": LIST_SIZE,
        "history_len": HISTORY_LEN,
        "retriever.dim": 8,
        "retriever.epochs": 5,
        "retriever.batch_size": 256,
        "max_reject_share": 0.05,
    }
    for key, value in small.items():
        args += ["--set", f"{key}={value}"]
    stats = run([str(a) for a in args])
    return out, stats, timelines


def _records(out):
    from dnr_tf.data import make_dataset, split_pattern

    by_split = {}
    for split in ("train", "valid", "test"):
        rows = []
        for batch in make_dataset(split_pattern(os.fspath(out), split), 64):
            batch = {k: v.numpy() for k, v in batch.items()}
            assert batch["item_ids"].shape[1:] == (LIST_SIZE,) and batch["history"].shape[1:] == (HISTORY_LEN,)
            rows += [{k: v[j] for k, v in batch.items()} for j in range(len(batch["user_id"]))]
        by_split[split] = rows
    return by_split


def test_end_to_end_counts_and_rejects(e2e):
    out, stats, timelines = e2e
    cfg = stats["config"]
    assert cfg["source"] == "sequences"
    assert stats["counts"]["interactions_read"] == sum(len(v) for v in timelines.values()) + 1
    assert stats["counts"]["rejected_at_read"] == 1
    assert stats["counts"]["rejected_duplicates"] == 1
    rejects = [json.loads(x) for f in sorted(out.glob("rejects-*.jsonl")) for x in f.read_text().splitlines()]
    assert sorted(r["line"] for r in rejects) == [1, 6]
    assert any("item 2 'zero' is not an integer" in r["reason"] for r in rejects)
    assert stats["lists"]["requests"] > 0
    kept = sum(stats["splits"][s]["lists"] for s in ("train", "valid", "test"))
    assert (
        kept + stats["lists"]["dropped_no_positive"] + stats["lists"]["dropped_truncated"] == stats["lists"]["requests"]
    )


def test_end_to_end_lists_follow_the_line_order(e2e):
    out, stats, timelines = e2e
    by_split = _records(out)
    assert all(by_split.values())
    assert sum(len(v) for v in by_split.values()) == sum(stats["splits"][s]["lists"] for s in by_split)
    for rows in by_split.values():
        for r in rows:
            user, idx = (int(x) for x in r["request_id"].decode().split(":"))
            items = timelines[user]
            # The request at timeline index idx happens at the position of that item (1-based).
            assert int(r["timestamp"]) == idx + 1
            assert [h for h in r["history"].tolist() if h] == items[max(0, idx - HISTORY_LEN) : idx]
            ids = r["item_ids"][r["labels"] >= 0].tolist()
            assert not set(ids) & set(items[:idx]), "a candidate consumed before the request"


def test_end_to_end_leak_checks(e2e):
    out, stats, timelines = e2e
    by_split = _records(out)
    frac, horizon = stats["config"]["retriever_fraction"], stats["config"]["horizon"]
    # 1. The retriever's own order is at least as good as random, over all lists.
    for split in ("train", "valid", "test"):
        assert stats["splits"][split]["retriever_score_auc"] >= 0.5, split
    # 2. The share of positives does not rise toward the end of the stored list.
    labels = np.stack([r["labels"] for rows in by_split.values() for r in rows])
    rate = (labels == 1).mean(axis=0)
    assert rate[LIST_SIZE // 2 :].mean() <= rate[: LIST_SIZE // 2].mean()
    first = {}
    for split, rows in by_split.items():
        for r in rows:
            user, idx = (int(x) for x in r["request_id"].decode().split(":"))
            first[(user, split)] = min(first.get((user, split), idx), idx)
    for split, rows in by_split.items():
        for r in rows:
            user, idx = (int(x) for x in r["request_id"].decode().split(":"))
            items = timelines[user]
            positives = set(r["item_ids"][r["labels"] == 1].tolist())
            assert positives and positives <= set(items[idx : idx + horizon])
            # 3. No test positive is in the user's retriever window.
            if split == "test":
                assert not positives & set(items[: int(len(items) * frac)])
            # 4. No train (valid) label from at or after the user's first valid (test) request.
            for later in {"train": ("valid", "test"), "valid": ("test",), "test": ()}[split]:
                if (user, later) in first:
                    assert not positives & set(items[first[(user, later)] :]), (split, later)


@pytest.mark.parametrize("name", ["beauty", "sports"])
def test_amazon_configs_load(name):
    from dnr_tf import config_io
    from pipeline.config import PipelineConfig

    cfg = config_io.from_dict(PipelineConfig, config_io.load_yaml(ROOT / f"configs/pipeline/{name}.yaml"))
    assert (cfg.source, cfg.protocol, cfg.list_size, cfg.k) == ("sequences", "cascade", 50, 6)
    assert cfg.input == f"../shared/data/amazon/{name}.txt"
