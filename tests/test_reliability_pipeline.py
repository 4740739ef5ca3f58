"""Issue 7, pipeline input: a corpus of bad inputs, each read correctly or rejected per record, and the
good records' TFRecords identical to a run on the clean file; the share of rejects a run may have.

The corpus is written by the tests (`CORPUS` below, one row per kind, with its expected outcome).
Kinds already covered record by record in `test_bad_input.py` (NUL byte, non-UTF-8, ids beyond int64,
every bad logged list) are injected here again, so that one comparison covers them all.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from tests.test_bad_input import BAD_LISTS, SMALL, _list, make_rows, read_rejects, u_data_line
from tests.test_sources import _decoded

ACCEPT_ALL = ["--set", "max_reject_share=1"]

# Per-record kinds injected into a u.data: kind -> (raw line, outcome, what the reject reason says).
# Outcomes: "rejected" (a line of rejects-*.jsonl with file, line, reason); "filtered" (a valid record
# that the 20-core removes: counted, not rejected); "read" (read like any good line).
CORPUS = {
    "header_line": (b"user_id\titem_id\trating\ttimestamp", "rejected", "user id 'user_id' is not an integer"),
    "wrong_separator": (b"4,17,3,881250949", "rejected", "expected 4 fields separated by '\\t', got 1"),
    "double_colon_separator": (b"4::17::3::881250949", "rejected", "expected 4 fields separated by '\\t', got 1"),
    "extra_field": (b"4\t17\t3\t881250949\tx", "rejected", "got 5"),
    "missing_field": (b"4\t17\t881250949", "rejected", "got 3"),
    "negative_user": (b"-4\t17\t3\t881250949", "rejected", "user id -4 must be a positive integer"),
    "float_item": (b"4\t17.5\t3\t881250949", "rejected", "item id '17.5' is not an integer"),
    "non_numeric_timestamp": (b"4\t17\t3\tyesterday", "rejected", "timestamp"),
    "missing_timestamp": (b"4\t17\t3\t", "rejected", "timestamp is missing"),
    "binary_garbage": (b"\x89PNG\x1a\x00\x00\x00\xff\xd8", "rejected", "binary data"),
    "not_utf8": (b"4\t17\t3\t88125\xff0949", "rejected", "not UTF-8 text"),
    "user_with_one_interaction": (b"999\t17\t3\t881250949", "filtered", None),
    # The file's last line, cut in the middle of a record (no newline after it).
    "truncated_last_line": (b"4\t1", "rejected", "got 2"),
}


def _corrupt(rows):
    """The clean rows with every corpus kind injected; returns (bytes, {kind: line number})."""
    lines, where = [], {}
    kinds = [k for k in CORPUS if k != "truncated_last_line"]
    for j, row in enumerate(rows):
        if j % 50 == 25 and j // 50 < len(kinds):
            lines.append(CORPUS[kinds[j // 50]][0])
            where[kinds[j // 50]] = len(lines)
        lines.append(u_data_line(row).encode())
    # A duplicate rating of a kept row, later in the file: rejected, the first one kept.
    u, i, r, t = rows[7]
    lines.append(u_data_line((u, i, 5, t + 60)).encode())
    where["duplicate_rating"] = len(lines)
    lines.append(CORPUS["truncated_last_line"][0])
    where["truncated_last_line"] = len(lines)
    assert set(where) == set(CORPUS) | {"duplicate_rating"}
    return b"\n".join(lines), where  # no newline at the end: the last line is cut


@pytest.fixture(scope="module")
def clean_and_corrupt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    rows = make_rows(seed=21)  # shuffled: every user's timestamps come out of order in the file
    clean = tmp / "clean" / "u.data"
    clean.parent.mkdir()
    clean.write_text("".join(u_data_line(r) + "\n" for r in rows))
    bad = tmp / "bad" / "u.data"
    bad.parent.mkdir()
    data, where = _corrupt(rows)
    bad.write_bytes(data)
    out = {}
    for name, path in (("clean", clean), ("bad", bad)):
        out[f"out_{name}"] = tmp / f"out_{name}"
        stats = run([*SMALL, "--source", "movielens", "--input", path, "--output_dir", out[f"out_{name}"]])
        out[f"{name}_stats"] = stats
    return {"rows": rows, "bad_file": bad, "where": where, **out}


def _user_rows(out):
    """The retriever's user table as written for stage 2 (decompressed)."""
    import gzip

    return [gzip.decompress(p.read_bytes()) for p in sorted((out / "retriever").glob("user_rows-*.jsonl.gz"))]


def run(args):
    from pipeline.run import run as run_pipeline

    return run_pipeline([str(a) for a in args])


def test_good_records_of_a_corrupt_file_are_identical_to_the_clean_run(clean_and_corrupt):
    c = clean_and_corrupt
    clean, _ = _decoded(c["out_clean"], 10, 5)
    bad, _ = _decoded(c["out_bad"], 10, 5)
    assert len(clean) > 100
    assert bad == clean, "the bad lines changed the records built from the good ones"
    a, b = np.load(c["out_clean"] / "retriever" / "mf.npz"), np.load(c["out_bad"] / "retriever" / "mf.npz")
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert _user_rows(c["out_clean"]) == _user_rows(c["out_bad"])


def test_every_corpus_kind_has_its_outcome(clean_and_corrupt):
    c = clean_and_corrupt
    rejects = {r["line"]: r for r in read_rejects(c["out_bad"])}
    expected_rejected = {k for k, (_, outcome, _) in CORPUS.items() if outcome == "rejected"} | {"duplicate_rating"}
    assert len(rejects) == len(expected_rejected)
    for kind, line in c["where"].items():
        if kind in expected_rejected:
            assert line in rejects, f"{kind} (line {line}) was not rejected"
            r = rejects[line]
            assert r["file"] == os.fspath(c["bad_file"]) and r["line"] == line
            reason = CORPUS[kind][2] if kind in CORPUS else "duplicate interaction of user"
            assert reason in r["reason"], (kind, r["reason"])
        else:
            assert line not in rejects, f"{kind} must not be rejected"
    counts, clean_counts = c["bad_stats"]["counts"], c["clean_stats"]["counts"]
    # The one-interaction user is read, then removed by the k-core, which leaves the same data.
    assert counts["interactions_read"] == clean_counts["interactions_read"] + 2  # + that user + the duplicate
    assert counts["users_read"] == clean_counts["users_read"] + 1
    assert counts["interactions_after_kcore"] == clean_counts["interactions_after_kcore"]
    assert counts["rejected_at_read"] + counts.get("rejected_duplicates", 0) == len(expected_rejected)


def _rows_file(path, rows, bad_lines):
    lines = [u_data_line(r) for r in rows]
    for j in range(bad_lines):
        lines.insert(3 + 7 * j, f"{j + 1}\tnot-an-item\t3\t881250949")
    path.write_text("\n".join(lines) + "\n")


def test_reject_share_above_the_limit_fails_without_tfrecords(tmp_path, capsys):
    from pipeline.run import main

    rows = make_rows(seed=22)  # 750 rows
    base = SMALL[:-2]  # SMALL ends with the max_reject_share=1 of the per-record tests
    assert base[-1] != "max_reject_share=1" and SMALL[-1] == "max_reject_share=1"
    under, over = tmp_path / "under" / "u.data", tmp_path / "over" / "u.data"
    under.parent.mkdir()
    over.parent.mkdir()
    _rows_file(under, rows, 5)  # 5 / 755 = 0.7% <= 1%
    _rows_file(over, rows, 12)  # 12 / 762 = 1.6% > 1%
    stats = run([*base, "--source", "movielens", "--input", under, "--output_dir", tmp_path / "ok"])
    assert sum(stats["rejects"].values()) == 5
    assert list((tmp_path / "ok").glob("train-*.tfrecord.gz"))

    out = tmp_path / "refused"
    args = [*base, "--source", "movielens", "--input", over, "--output_dir", out]
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert "12 of 762 input records (1.6%) were rejected, above max_reject_share=0.01" in err
    assert "Most frequent reasons: item_id_is_not_an_integer 12" in err, err
    assert "rejects-*.jsonl" in err
    assert not list(out.glob("*.tfrecord.gz")), "no TFRecords from a refused run"
    failed = out.parent / f"{out.name}.failed"  # a failed run keeps its rejects beside the output (pipeline.publish)
    assert str(failed) in err, err
    assert len(read_rejects(failed)) == 12, "the rejects are kept to be looked at"
    assert json.loads((failed / "stats.json").read_text())["counts"]["rejected_at_read"] == 12
    # The same input is accepted when the user raises the share.
    stats = run([*args[:-2], "--set", "max_reject_share=0.02", "--output_dir", tmp_path / "accepted"])
    assert sum(stats["rejects"].values()) == 12


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "no interaction survives: 0 read, 0 rejected"),
        (bytes(range(256)) * 40, "were rejected, above max_reject_share"),  # a file that is not text
        (b"".join(b"%d::%d::3::88125%04d\n" % (u, i, i) for u in range(1, 9) for i in range(1, 9)),
         "expected_fields_separated_by_got 64"),  # ratings.dat content under the u.data name
        (b"user_id\titem_id\trating\ttimestamp\n", "user_id_is_not_an_integer 1"),  # a header and nothing else
    ],
    ids=["empty_file", "binary_file", "wrong_separator_whole_file", "header_only"],
)  # fmt: skip
def test_whole_bad_files_fail_with_one_clear_line(tmp_path, capsys, content, message):
    from pipeline.run import main

    path = tmp_path / "u.data"
    path.write_bytes(content)
    assert main(["--source", "movielens", "--input", str(path), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not list((tmp_path / "out").glob("*.tfrecord.gz"))


def test_good_logged_lists_are_identical_to_the_clean_run(tmp_path):
    rng = np.random.default_rng(23)
    good = []
    for user in range(1, 7):
        for j in range(4):
            items = [int(x) for x in rng.choice(np.arange(1, 40), int(rng.integers(3, 7)), replace=False)]
            good.append(json.dumps(_list(f"req-{user}-{j}", user, 1000 * user + 10 * j, items)))
    inf = _list("bad-inf", 9, 100, [5, 6, 7])
    inf["candidates"][1]["retriever_score"] = math.inf
    bad_lines = [line for line, _, _ in BAD_LISTS.values()] + [json.dumps(inf), good[4]]  # + a repeated request id
    mixed = list(good)
    for j, line in enumerate(bad_lines):
        mixed.insert(2 + 2 * j, line)
    (tmp_path / "clean.jsonl").write_text("\n".join(good) + "\n")
    (tmp_path / "bad.jsonl").write_text("\r\n".join(mixed) + "\r\n")  # Windows line endings as well
    small = ["--set", "list_size=6", "--set", "history_len=4", "--set", "k=3", *ACCEPT_ALL]
    decoded = {}
    for name in ("clean", "bad"):
        out = tmp_path / f"out_{name}"
        stats = run(["--source", "logged", "--input", tmp_path / f"{name}.jsonl", "--output_dir", out, *small])
        decoded[name] = _decoded(out, 6, 4)[0]
    assert decoded["bad"] == decoded["clean"]
    assert sum(stats["rejects"].values()) == len(bad_lines)
    rejects = read_rejects(tmp_path / "out_bad")
    assert any("inf is not a finite number" in r["reason"] for r in rejects), [r["reason"] for r in rejects]
