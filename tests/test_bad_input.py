"""Bad input through the whole pipeline: every bad record is rejected with its file, line and reason,
counted in stats.json, and the run finishes with the good records; bad runs fail with a one-line
`error: ...` from `pipeline.run.main` and exit status 2.
"""

from __future__ import annotations

import gzip
import json
import math
import os

import numpy as np
import pytest

SMALL = [
    "--set",
    "min_count=2",
    "--set",
    "list_size=10",
    "--set",
    "history_len=5",
    "--set",
    "stride=2",
    "--set",
    "horizon=2",
    "--set",
    "k=3",
    "--set",
    "retriever.epochs=2",
    "--set",
    "retriever.dim=8",
    "--set",
    "kcore_max_iters=2",
    # These runs hold a few bad records among few good ones on purpose; the share limit has its own
    # tests (test_reliability_pipeline.py).
    "--set",
    "max_reject_share=1",
]


def make_rows(num_users=30, num_items=40, per_user=25, seed=0):
    """(user, item, rating, timestamp) rows, shuffled; every user and item far above a 2-core."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, num_users + 1):
        items = rng.choice(np.arange(1, num_items + 1), per_user, replace=False)
        times = np.sort(rng.choice(1_000_000, per_user, replace=False)) + 880_000_000
        ratings = rng.integers(1, 6, per_user)
        rows += [(user, int(i), int(r), int(t)) for i, r, t in zip(items, ratings, times)]
    return [rows[j] for j in rng.permutation(len(rows))]


def u_data_line(row) -> str:
    return "\t".join(str(v) for v in row)


def run_pipeline(*args):
    from pipeline.run import run

    return run([str(a) for a in args])


def read_rejects(out):
    files = sorted(out.glob("rejects-*.jsonl"))
    assert files, "no rejects file written"
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def decoded_request_ids(out, list_size):
    from dnr_tf import schema as S
    from dnr_tf.data import make_dataset, split_pattern

    ids = {}
    for split in ("train", "valid", "test"):
        recs = []
        for batch in make_dataset(split_pattern(os.fspath(out), split), 64):
            assert batch[S.ITEM_IDS].shape[1] == list_size
            recs += [{k: batch[k][j].numpy() for k in batch} for j in range(int(batch[S.USER_ID].shape[0]))]
        assert recs, f"split {split} is empty"
        for r in recs:
            ids[r[S.REQUEST_ID].decode()] = (split, r)
    return ids


# --- bad interaction records (MovieLens u.data) --------------------------------------------------

# kind -> (raw line, substring the reason must hold, the stats.json `rejects` key of the reason).
BAD_INTERACTIONS = {
    "too_few_fields": (b"4\t17\t3", "expected 4 fields separated by '\\t', got 3", "expected_fields_separated_by_got"),
    "too_many_fields": (
        b"4\t17\t3\t881250949\t1",
        "expected 4 fields separated by '\\t', got 5",
        "expected_fields_separated_by_got",
    ),
    "non_numeric_user": (b"u4\t17\t3\t881250949", "user id 'u4' is not an integer", "user_id_is_not_an_integer"),
    "negative_item": (b"4\t-17\t3\t881250949", "item id -17 must be a positive integer", "item_id_must_be_a_positive"),
    "zero_item": (b"4\t0\t3\t881250949", "item id 0 must be a positive integer", "item_id_must_be_a_positive"),
    "missing_timestamp": (b"4\t17\t3\t", "timestamp is missing", "timestamp_is_missing"),
    "nul_byte": (b"4\t17\x00\t3\t881250949", "binary data (NUL byte)", "binary_data_not_a_text_file"),
    "not_utf8": (b"4\t17\t3\t88125\xff0949", "not UTF-8 text", "not_utf_text"),
}


@pytest.fixture(scope="module")
def bad_interactions(tmp_path_factory):
    """One run over a u.data holding good rows, a blank line and every kind of bad record."""
    tmp = tmp_path_factory.mktemp("bad_interactions")
    rows = make_rows(seed=11)
    path = tmp / "u.data"
    lines: list[bytes] = []
    where: dict[str, int] = {}
    first_line: dict[str, int] = {}

    def add(raw: bytes, kind: str | None = None):
        lines.append(raw)
        if kind:
            where[kind] = len(lines)

    for j, row in enumerate(rows):
        if j == 3:
            add(b"")  # a blank line is skipped but still counts for the line numbers
        if j % 60 == 30 and (j // 60) < len(BAD_INTERACTIONS):
            kind = list(BAD_INTERACTIONS)[j // 60]
            add(BAD_INTERACTIONS[kind][0], kind)
        add(u_data_line(row).encode())
        if j in (10, 20):
            first_line[f"dup{j}"] = len(lines)
    # Duplicates of (user, item): one later in the file and in time, one later in the file at the
    # same time. Both later records are rejected, the first ones kept.
    u, i, r, t = rows[10]
    add(u_data_line((u, i, r, t + 5)).encode(), "duplicate_later_time")
    u2, i2, r2, t2 = rows[20]
    add(u_data_line((u2, i2, 5, t2)).encode(), "duplicate_same_time")
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert set(where) == set(BAD_INTERACTIONS) | {"duplicate_later_time", "duplicate_same_time"}

    out = tmp / "out"
    stats = run_pipeline("--source", "movielens", "--input", path, "--output_dir", out, *SMALL)
    dup_reasons = {
        "duplicate_later_time": f"duplicate interaction of user {u} with item {i} "
        f"(kept the first, {path}:{first_line['dup10']})",
        "duplicate_same_time": f"duplicate interaction of user {u2} with item {i2} "
        f"(kept the first, {path}:{first_line['dup20']})",
    }
    return {
        "path": path,
        "out": out,
        "stats": stats,
        "rows": rows,
        "where": where,
        "dup_reasons": dup_reasons,
        "rejects": read_rejects(out),
    }


@pytest.mark.parametrize("kind", list(BAD_INTERACTIONS))
def test_bad_interaction_is_rejected_with_file_line_and_reason(bad_interactions, kind):
    line = bad_interactions["where"][kind]
    at_line = [r for r in bad_interactions["rejects"] if r["line"] == line]
    assert len(at_line) == 1, f"{kind}: expected one reject at line {line}, got {at_line}"
    reject = at_line[0]
    assert reject["file"] == os.fspath(bad_interactions["path"])
    assert BAD_INTERACTIONS[kind][1] in reject["reason"]
    if kind in ("too_few_fields", "too_many_fields"):
        assert reject["text"] == BAD_INTERACTIONS[kind][0].decode()
    if kind == "non_numeric_user":
        assert "u4" in reject["text"]


@pytest.mark.parametrize("kind", ["duplicate_later_time", "duplicate_same_time"])
def test_duplicate_rating_rejects_the_later_and_keeps_the_first(bad_interactions, kind):
    line = bad_interactions["where"][kind]
    dups = [r for r in bad_interactions["rejects"] if r["reason"].startswith("duplicate")]
    assert [r["line"] for r in dups if r["line"] == line] == [line]
    reject = next(r for r in dups if r["line"] == line)
    assert reject["file"] == os.fspath(bad_interactions["path"])
    assert reject["reason"] == bad_interactions["dup_reasons"][kind]


def test_bad_interactions_are_counted_and_the_good_ones_kept(bad_interactions):
    stats, rows, rejects = bad_interactions["stats"], bad_interactions["rows"], bad_interactions["rejects"]
    assert len(rejects) == len(BAD_INTERACTIONS) + 2
    assert sorted(r["line"] for r in rejects) == sorted(bad_interactions["where"].values())
    counts = stats["counts"]
    assert counts["rejected_at_read"] == len(BAD_INTERACTIONS)
    assert counts["rejected_duplicates"] == 2
    assert counts["interactions_read"] == len(rows) + 2  # the duplicates parse; the timeline drops them
    assert counts["interactions_after_kcore"] == len(rows)
    assert counts["users_after_kcore"] == 30 and counts["items_after_kcore"] == len({r[1] for r in rows})
    expected = {}
    for _, _, key in BAD_INTERACTIONS.values():
        expected[key] = expected.get(key, 0) + 1
    expected["duplicate_interaction_of_user_with_item"] = 2
    assert stats["rejects"] == expected
    saved = json.loads((bad_interactions["out"] / "stats.json").read_text())
    assert saved["rejects"] == expected and saved["counts"] == counts
    lists = decoded_request_ids(bad_interactions["out"], 10)
    assert len(lists) == sum(stats["splits"][s]["lists"] for s in ("train", "valid", "test"))
    assert {int(r["user_id"]) for _, r in lists.values()} <= set(range(1, 31))


# --- bad logged lists ----------------------------------------------------------------------------


def _list(request_id, user, ts, items, labels=None, scores=None, history=(1, 2)):
    labels = labels or [1] + [0] * (len(items) - 1)
    scores = scores or [round(0.9 - 0.1 * j, 3) for j in range(len(items))]
    return {
        "request_id": request_id,
        "user_id": user,
        "timestamp": ts,
        "history": list(history),
        "candidates": [{"item_id": i, "retriever_score": s, "label": z} for i, s, z in zip(items, scores, labels)],
    }


OUTSIDE = "candidates_retriever_score_is_outside"


def _bad_lists():
    """kind -> (JSON line, substring of the reason, stats key or None)."""
    base = _list("bad", 9, 100, [5, 6, 7, 8])

    def variant(kind, fn):
        obj = json.loads(json.dumps(base))
        obj["request_id"] = f"bad-{kind}"
        fn(obj)
        return json.dumps(obj)  # json.dumps writes NaN as the bare token `NaN`

    def set_cand(j, field, value):
        def fn(obj):
            obj["candidates"][j][field] = value

        return fn

    return {
        "nan_score": (
            variant("nan", set_cand(1, "retriever_score", math.nan)),
            "candidates[1].retriever_score nan is not a finite number",
            None,
        ),
        "score_above_1": (
            variant("above", set_cand(0, "retriever_score", 1.5)),
            "candidates[0].retriever_score 1.5 is outside [0, 1]",
            OUTSIDE,
        ),
        "negative_score": (
            variant("neg", set_cand(2, "retriever_score", -0.25)),
            "candidates[2].retriever_score -0.25 is outside [0, 1]",
            OUTSIDE,
        ),
        "label_2": (
            variant("label", set_cand(3, "label", 2)),
            "candidates[3].label 2 must be 0 or 1",
            "candidates_label_must_be_or",
        ),
        "empty_candidates": (
            variant("empty", lambda o: o.update(candidates=[])),
            "list has no candidates",
            "list_has_no_candidates",
        ),
        "too_long": (
            json.dumps(_list("bad-long", 9, 100, [1, 2, 3, 4, 5, 6, 7])),
            "list has 7 candidates, above the maximum of 6",
            "list_has_candidates_above_the_maximum",
        ),
        "duplicate_item": (
            variant("dupitem", set_cand(2, "item_id", 5)),
            "candidates[2].item_id 5 appears twice",
            "candidates_item_id_appears_twice_in_the",
        ),
        "missing_field": (
            variant("missing", lambda o: o.pop("timestamp")),
            "missing field 'timestamp'",
            "missing_field",
        ),
        "missing_candidate_field": (
            variant("nolabel", lambda o: o["candidates"][1].pop("label")),
            "candidates[1] is missing field 'label'",
            None,
        ),
        "invalid_json": ('{"request_id": "bad-json", "user_id": 9, ', "not valid JSON", None),
    }


BAD_LISTS = _bad_lists()


@pytest.fixture(scope="module")
def bad_logged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_logged")
    rng = np.random.default_rng(12)
    good = []
    for user in (1, 2, 3, 4):
        for j in range(4):
            items = [int(x) for x in rng.choice(np.arange(1, 40), int(rng.integers(3, 7)), replace=False)]
            good.append(_list(f"req-{user}-{j}", user, 1000 * user + 10 * j, items))
    dup_of = good[5]  # its request id comes again later, with other content
    dup = _list(dup_of["request_id"], 7, 5, [30, 31, 32])
    lines, where = [], {}
    bad = list(BAD_LISTS.items())
    for j, obj in enumerate(good):
        lines.append(json.dumps(obj))
        if j == 2:
            lines.append("")  # blank: skipped, still counted
        if j < len(bad):
            lines.append(bad[j][1][0])
            where[bad[j][0]] = len(lines)
    assert len(where) == len(BAD_LISTS)
    lines.append(json.dumps(dup))
    where["duplicate_request_id"] = len(lines)
    first_line = lines.index(json.dumps(dup_of)) + 1
    path = tmp / "logged.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp / "out"
    stats = run_pipeline(
        "--source",
        "logged",
        "--input",
        path,
        "--output_dir",
        out,
        "--set",
        "list_size=6",
        "--set",
        "history_len=4",
        "--set",
        "k=3",
        "--set",
        "max_reject_share=1",
    )
    return {
        "path": path,
        "out": out,
        "stats": stats,
        "good": good,
        "where": where,
        "rejects": read_rejects(out),
        "dup_of": dup_of,
        "dup_reason": f"duplicate request_id {dup_of['request_id']!r} (kept the first, {path}:{first_line})",
    }


@pytest.mark.parametrize("kind", list(BAD_LISTS))
def test_bad_logged_list_is_rejected_with_file_line_and_reason(bad_logged, kind):
    line = bad_logged["where"][kind]
    at_line = [r for r in bad_logged["rejects"] if r["line"] == line]
    assert len(at_line) == 1, f"{kind}: expected one reject at line {line}, got {at_line}"
    assert at_line[0]["file"] == os.fspath(bad_logged["path"])
    assert BAD_LISTS[kind][1] in at_line[0]["reason"]
    assert at_line[0]["text"] == BAD_LISTS[kind][0][:200]


def test_duplicate_request_id_keeps_the_first(bad_logged):
    line = bad_logged["where"]["duplicate_request_id"]
    at_line = [r for r in bad_logged["rejects"] if r["line"] == line]
    assert len(at_line) == 1
    assert at_line[0]["file"] == os.fspath(bad_logged["path"])
    assert at_line[0]["reason"] == bad_logged["dup_reason"]
    lists = decoded_request_ids(bad_logged["out"], 6)
    _, rec = lists[bad_logged["dup_of"]["request_id"]]
    first = bad_logged["dup_of"]
    assert int(rec["user_id"]) == first["user_id"] and int(rec["timestamp"]) == first["timestamp"]
    n = len(first["candidates"])
    assert rec["item_ids"][:n].tolist() == [c["item_id"] for c in first["candidates"]]


def test_bad_logged_lists_are_counted_and_the_good_ones_kept(bad_logged):
    stats, rejects = bad_logged["stats"], bad_logged["rejects"]
    assert len(rejects) == len(BAD_LISTS) + 1
    assert sorted(r["line"] for r in rejects) == sorted(bad_logged["where"].values())
    counts = stats["counts"]
    assert counts["rejected_at_read"] == len(BAD_LISTS)
    assert counts["rejected_duplicate_request_ids"] == 1
    assert counts["lists_read"] == len(bad_logged["good"]) + 1
    assert sum(stats["rejects"].values()) == len(BAD_LISTS) + 1
    assert stats["rejects"]["duplicate_request_id"] == 1
    for _, _, key in BAD_LISTS.values():
        if key is not None:
            assert stats["rejects"].get(key, 0) >= 1, key
    assert stats["rejects"][OUTSIDE] == 2
    saved = json.loads((bad_logged["out"] / "stats.json").read_text())
    assert saved["rejects"] == stats["rejects"] and saved["counts"] == counts
    lists = decoded_request_ids(bad_logged["out"], 6)
    assert set(lists) == {g["request_id"] for g in bad_logged["good"]}
    for g in bad_logged["good"]:
        split, rec = lists[g["request_id"]]
        j = int(g["request_id"].rsplit("-", 1)[1])
        assert split == ("test" if j == 3 else "valid" if j == 2 else "train")


# --- encodings: gzip, BOM, CRLF ------------------------------------------------------------------


def _encode(rows, variant):
    if variant.startswith("csv"):
        text = "timestamp,user_id,item_id,rating\n" + "".join(f"{t},{u},{i},{r}\n" for u, i, r, t in rows)
    else:
        text = "".join(u_data_line(row) + "\n" for row in rows)
    data = text.encode()
    if "crlf" in variant:
        data = data.replace(b"\n", b"\r\n")
    if "bom" in variant:
        data = b"\xef\xbb\xbf" + data
    if "gzip" in variant:
        data = gzip.compress(data)
    return data


@pytest.mark.parametrize("variant", ["gzip", "bom", "crlf", "csv_gzip_bom_crlf"])
def test_gzip_bom_and_crlf_are_read_like_the_clean_file(tmp_path, variant):
    rows = make_rows(seed=13)
    if variant.startswith("csv"):
        source, name = "csv", "events.csv.gz"
    else:
        source, name = "movielens", "u.data.gz" if "gzip" in variant else "u.data"
    path = tmp_path / name
    path.write_bytes(_encode(rows, variant))
    out = tmp_path / "out"
    stats = run_pipeline("--source", source, "--input", path, "--output_dir", out, *SMALL)
    counts = stats["counts"]
    assert read_rejects(out) == []
    assert "rejects" not in stats
    assert counts["rejected_at_read"] == 0
    assert counts["interactions_read"] == len(rows)
    assert counts["interactions_after_kcore"] == len(rows)
    assert counts["users_after_kcore"] == 30
    lists = decoded_request_ids(out, 10)
    assert len(lists) == sum(stats["splits"][s]["lists"] for s in ("train", "valid", "test"))


def test_ids_and_timestamps_beyond_int64_are_rejected_not_fatal(tmp_path):
    """A value the int64 record format cannot hold is a bad record, not a failed run."""
    rows = make_rows(seed=14)
    too_big = [  # (line, the field the reason must name); three for one user so it passes the 2-core
        (f"{2**64}\t1\t3\t881250949", "user id"),
        (f"{2**64}\t2\t3\t881250950", "user id"),
        (f"{2**64}\t3\t3\t881250951", "user id"),
        (f"7\t{2**63}\t3\t881250949", "item id"),
        (f"8\t{2**63}\t3\t881250949", "item id"),
        ("7\t41\t3\t1e30", "timestamp"),
        ("8\t41\t3\t2e30", "timestamp"),
    ]
    bad = {len(rows) + 1 + j: v for j, v in enumerate(too_big)}
    path = tmp_path / "u.data"
    path.write_text("".join(u_data_line(r) + "\n" for r in rows) + "".join(v[0] + "\n" for v in bad.values()))
    out = tmp_path / "out"
    stats = run_pipeline("--source", "movielens", "--input", path, "--output_dir", out, *SMALL)
    rejects = {r["line"]: r for r in read_rejects(out)}
    assert sorted(rejects) == sorted(bad)
    for line, (_, field) in bad.items():
        assert field in rejects[line]["reason"]
    assert stats["counts"]["interactions_after_kcore"] == len(rows)


# --- CLI errors ----------------------------------------------------------------------------------


def _one_line_error(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_cli_missing_input_file(tmp_path, capsys):
    from pipeline.run import main

    missing = tmp_path / "nowhere" / "u.data"
    assert main(["--source", "movielens", "--input", str(missing), "--output_dir", str(tmp_path / "out")]) == 2
    msg = _one_line_error(capsys)
    assert str(missing) in msg and "matches no file" in msg
    assert not (tmp_path / "out" / "stats.json").exists()


def test_cli_unknown_source_exits_2(tmp_path, capsys):
    from pipeline.run import main

    with pytest.raises(SystemExit) as e:
        main(["--source", "parquet", "--input", "x", "--output_dir", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'parquet'" in err and "Traceback" not in err


def test_cli_unknown_config_key(tmp_path, capsys):
    from pipeline.run import main

    assert main(["--source", "synthetic", "--output_dir", str(tmp_path / "out"), "--set", "nosuchkey=1"]) == 2
    msg = _one_line_error(capsys)
    assert "unknown config key" in msg and "nosuchkey" in msg


def test_cli_nothing_survives(tmp_path, capsys):
    from pipeline.run import main

    path = tmp_path / "u.data"
    # Every user rated one item, every item was rated once: nothing is left in a 2-core.
    path.write_text("".join(f"{u}\t{u + 100}\t4\t{880000000 + u}\n" for u in range(1, 21)) + "bad line\n")
    assert main(["--source", "movielens", "--input", str(path), "--output_dir", str(tmp_path / "out"), *SMALL]) == 2
    msg = _one_line_error(capsys)
    assert "no interaction survives" in msg
    assert "20 read" in msg and "1 rejected" in msg and "2-core" in msg


@pytest.mark.parametrize(
    ("header", "missing"),
    [
        ("user,item,time", "user_id, item_id, timestamp"),
        ("user_id,item_id,rating", "timestamp"),
        (None, "user_id, item_id, timestamp"),
    ],
    ids=["renamed", "no_timestamp", "no_header"],
)
def test_cli_csv_without_required_header(tmp_path, capsys, header, missing):
    from pipeline.run import main

    path = tmp_path / "events.csv"
    body = "".join(f"{u},{u + 1},{880000000 + u}\n" for u in range(1, 6))
    path.write_text((header + "\n" if header else "") + body)
    assert main(["--source", "csv", "--input", str(path), "--output_dir", str(tmp_path / "out")]) == 2
    msg = _one_line_error(capsys)
    assert "CSV header must name columns user_id, item_id, timestamp" in msg
    assert f"missing {missing};" in msg
    assert str(path) in msg


def test_cli_csv_directory_input_reads_its_files(tmp_path, capsys):
    """`expand_input` documents a directory as 'its files'; a directory must not crash the CLI."""
    from pipeline.run import main

    data = tmp_path / "csvdir"
    data.mkdir()
    (data / "part-0.csv").write_text("user_id,item_id\n1,2\n")  # no timestamp column: a clean error
    assert main(["--source", "csv", "--input", str(data), "--output_dir", str(tmp_path / "out")]) == 2
    msg = _one_line_error(capsys)
    assert "missing timestamp" in msg
