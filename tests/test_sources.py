"""Every source through the whole pipeline, with the lists read back by `dnr_tf.data.make_dataset`.

Small synthetic inputs are written by the tests themselves (no network, no real data set), with
small protocol values, so each run takes a few seconds. The last tests are Beam unit tests of the
line reader (`ReadNumbered`) and of the k-core filter.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

LIST_SIZE = 10
HISTORY_LEN = 5
STRIDE = 2
HORIZON = 2
RETRIEVER_FRACTION = 0.5  # the default
SMALL = [
    "--set",
    "min_count=2",
    "--set",
    f"list_size={LIST_SIZE}",
    "--set",
    f"history_len={HISTORY_LEN}",
    "--set",
    f"stride={STRIDE}",
    "--set",
    f"horizon={HORIZON}",
    "--set",
    "k=3",
    "--set",
    "retriever.epochs=2",
    "--set",
    "retriever.dim=8",
    "--set",
    "kcore_max_iters=2",
]
SPLITS = ("train", "valid", "test")


# --- input generators ----------------------------------------------------------------------------


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


def write_movielens(path, rows, sep):
    path.write_text("".join(sep.join(str(v) for v in row) + "\n" for row in rows))
    return path


def write_csv(path, rows, columns):
    """A CSV whose header names `columns` (a subset of user_id,item_id,rating,timestamp) in that order."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for user, item, rating, ts in rows:
            values = {"user_id": user, "item_id": item, "rating": rating, "timestamp": ts}
            w.writerow([values[c] for c in columns])
    return path


def expected_cascade_requests(rows):
    lengths = {}
    for user, *_ in rows:
        lengths[user] = lengths.get(user, 0) + 1
    return sum(len(range(int(n * RETRIEVER_FRACTION), n - HORIZON + 1, STRIDE)) for n in lengths.values())


# --- reading the output back ---------------------------------------------------------------------


def read_split(out, split, list_size, history_len, batch_size=16):
    """The decoded records of one split, one dict of numpy values per list; checks batch shapes."""
    from dnr_tf.data import make_dataset, split_pattern

    records = []
    for batch in make_dataset(split_pattern(os.fspath(out), split), batch_size):
        batch = {k: v.numpy() for k, v in batch.items()}
        n = len(batch["user_id"])
        assert 1 <= n <= batch_size
        for key in ("item_ids", "retriever_scores", "labels"):
            assert batch[key].shape == (n, list_size), key
        assert batch["history"].shape == (n, history_len)
        assert batch["item_ids"].dtype == np.int64 and batch["labels"].dtype == np.int64
        assert batch["retriever_scores"].dtype == np.float32
        records += [{k: v[j] for k, v in batch.items()} for j in range(n)]
    return records


def read_all(out, list_size=LIST_SIZE, history_len=HISTORY_LEN):
    """{split: [record, ...]} after the checks every source's output must pass."""
    schema = json.loads((out / "schema.json").read_text())
    assert schema["list_size"] == list_size and schema["history_len"] == history_len
    stats = json.loads((out / "stats.json").read_text())
    by_split = {}
    for split in SPLITS:
        records = read_split(out, split, list_size, history_len)
        assert records, f"split {split} is empty"
        assert len(records) == stats["splits"][split]["lists"]
        for rec in records:
            labels, ids, scores = rec["labels"], rec["item_ids"], rec["retriever_scores"]
            assert set(np.unique(labels)) <= {-1, 0, 1}
            assert (labels == 1).sum() >= 1, "a list without a positive"
            assert np.all((scores >= 0.0) & (scores <= 1.0))
            # Padding is consistent: id 0 <=> label -1 <=> score 0, and only at the end.
            pad = ids == 0
            assert np.array_equal(pad, labels == -1)
            assert np.all(scores[pad] == 0.0)
            n = int((~pad).sum())
            assert n >= 1 and not pad[:n].any()
            assert len(set(ids[:n].tolist())) == n, "an item twice in a list"
            hist = rec["history"]
            h = int((hist != 0).sum())
            assert not (hist[: len(hist) - h] != 0).any(), "history must be left-padded"
        by_split[split] = records
    ids = [r["request_id"] for s in SPLITS for r in by_split[s]]
    assert len(ids) == len(set(ids)), "a request id in two lists"
    return by_split


def check_interaction_lists(by_split, rows):
    """Lists built from `rows` respect time: history before the request, positives after it."""
    when = {(u, i): t for u, i, _, t in rows}
    per_user = {}
    for split, records in by_split.items():
        for rec in records:
            user, ts = int(rec["user_id"]), int(rec["timestamp"])
            per_user.setdefault(user, []).append((split, ts))
            for h in rec["history"][rec["history"] != 0].tolist():
                assert when[(user, h)] < ts, "history item consumed after the request"
            ids, labels = rec["item_ids"], rec["labels"]
            for item in ids[labels == 1].tolist():
                assert when[(user, item)] >= ts, "positive consumed before the request"
            for item in ids[ids != 0].tolist():
                assert (user, item) not in when or when[(user, item)] >= ts, "candidate already consumed"
    for lists in per_user.values():
        splits = [s for s, _ in lists]
        assert splits.count("test") <= 1 and splits.count("valid") <= 1
        times = {s: max(t for s2, t in lists if s2 == s) for s in set(splits)}
        if "test" in times and "valid" in times:
            assert times["valid"] < min(t for s, t in lists if s == "test")
        if "train" in times and "valid" in times:
            assert times["train"] < min(t for s, t in lists if s == "valid")
    return per_user


def run_pipeline(*args):
    from pipeline.run import run

    return run([str(a) for a in args])


def check_counts(stats, rows):
    counts = stats["counts"]
    assert counts["interactions_read"] == len(rows)
    assert counts["rejected_at_read"] == 0
    assert counts["rejected_duplicates"] == 0
    assert counts["interactions_after_kcore"] == len(rows)
    assert counts["users_after_kcore"] == len({r[0] for r in rows})
    assert counts["items_after_kcore"] == len({r[1] for r in rows})
    assert "rejects" not in stats


# --- the sources ---------------------------------------------------------------------------------


def test_movielens_100k_u_data(tmp_path):
    rows = make_rows(seed=1)
    path = write_movielens(tmp_path / "u.data", rows, "\t")
    out = tmp_path / "out"
    stats = run_pipeline("--source", "movielens", "--input", path, "--output_dir", out, *SMALL)
    check_counts(stats, rows)
    assert stats["lists"]["requests"] == expected_cascade_requests(rows)
    by_split = read_all(out)
    check_interaction_lists(by_split, rows)
    for name in ("item_vocab.txt", "user_vocab.txt", "retriever/mf.npz"):
        assert (out / name).exists(), name
    assert not (out / "_work").exists()
    train_items = {int(x) for x in (out / "item_vocab.txt").read_text().split()}
    assert train_items <= {r[1] for r in rows}
    assert len(train_items) == json.loads((out / "schema.json").read_text())["num_items"]


def test_movielens_1m_ratings_dat_auto_detected(tmp_path):
    rows = make_rows(seed=2)
    path = write_movielens(tmp_path / "ratings.dat", rows, "::")
    out = tmp_path / "out"
    stats = run_pipeline("--source", "movielens", "--input", path, "--output_dir", out, *SMALL)
    assert stats["config"]["movielens_format"] == "auto"
    check_counts(stats, rows)
    check_interaction_lists(read_all(out), rows)


def test_movielens_1m_directory_input(tmp_path):
    rows = make_rows(seed=3)
    data = tmp_path / "ml-1m"
    data.mkdir()
    write_movielens(data / "ratings.dat", rows, "::")
    (data / "movies.dat").write_text("1::Toy Story (1995)::Animation\n")  # must not be read
    out = tmp_path / "out"
    stats = run_pipeline("--source", "movielens", "--input", data, "--output_dir", out, *SMALL)
    check_counts(stats, rows)
    check_interaction_lists(read_all(out), rows)


@pytest.mark.parametrize(
    "columns",
    [("timestamp", "rating", "item_id", "user_id"), ("item_id", "timestamp", "user_id")],
    ids=["with_rating", "without_rating"],
)
def test_csv_with_header_in_any_column_order(tmp_path, columns):
    rows = make_rows(seed=4)
    path = write_csv(tmp_path / "events.csv", rows, columns)
    out = tmp_path / "out"
    stats = run_pipeline("--source", "csv", "--input", path, "--output_dir", out, *SMALL)
    check_counts(stats, rows)
    assert stats["lists"]["requests"] == expected_cascade_requests(rows)
    check_interaction_lists(read_all(out), rows)


def test_tfds_movielens_with_mock_data(tmp_path):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    rows = make_rows(seed=5)
    bad_index = 7  # an example whose user id is not a number: rejected, with its index as line

    def as_dataset(self, *args, **kwargs):
        features = self.info.features

        def examples():
            for j, (user, item, rating, ts) in enumerate(rows):
                yield {
                    "bucketized_user_age": np.float32(25.0),
                    "movie_genres": np.array([4], np.int64),
                    "movie_id": str(item).encode(),
                    "movie_title": b"Some Movie (1995)",
                    "raw_user_age": np.float32(27.0),
                    "timestamp": np.int64(ts),
                    "user_gender": True,
                    "user_id": b"x7" if j == bad_index else str(user).encode(),
                    "user_occupation_label": np.int64(3),
                    "user_occupation_text": b"engineer",
                    "user_rating": np.float32(rating),
                    "user_zip_code": b"55455",
                }

        return tf.data.Dataset.from_generator(examples, output_signature=features.get_tensor_spec())

    out = tmp_path / "out"
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=as_dataset):
        stats = run_pipeline(
            "--source",
            "tfds",
            "--input",
            "movielens/100k-ratings",
            "--output_dir",
            out,
            "--set",
            f"tfds_data_dir={tmp_path / 'tfds'}",
            *SMALL,
        )
    good = [r for j, r in enumerate(rows) if j != bad_index]
    counts = stats["counts"]
    assert counts["interactions_read"] == len(good)
    assert counts["rejected_at_read"] == 1
    assert counts["interactions_after_kcore"] == len(good)
    rejects = [json.loads(x) for f in sorted(out.glob("rejects-*.jsonl")) for x in f.read_text().splitlines()]
    assert len(rejects) == 1
    assert rejects[0]["file"] == "tfds:movielens/100k-ratings"
    assert rejects[0]["line"] == bad_index
    assert "user id 'x7' is not an integer" in rejects[0]["reason"]
    check_interaction_lists(read_all(out), good)


@pytest.mark.parametrize(
    "name, message",
    [
        ("movielens/nope-ratings", "--input movielens/nope-ratings: not a TFDS MovieLens ratings data set"),
        (
            "movielens/100k-ratings",
            "TFDS movielens/100k-ratings could not be downloaded and prepared into {dir}/movielens/100k-ratings/"
            "0.1.1 (ConnectionError: no route to host); without network, copy a prepared TFDS folder there",
        ),
    ],
)
def test_a_tfds_name_or_download_that_fails_is_one_line_before_the_pipeline(
    tmp_path, monkeypatch, capsys, name, message
):
    """The data set is checked and prepared in the driver: a failure is not a traceback from a Beam worker."""
    import tensorflow_datasets as tfds

    from pipeline.run import main

    def no_network(self, *args, **kwargs):
        raise ConnectionError("no route to host\n(the rest of a long message)")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
    out = tmp_path / "out"
    args = [
        "--source",
        "tfds",
        "--input",
        name,
        "--output_dir",
        str(out),
        "--set",
        f"tfds_data_dir={tmp_path / 'tfds'}",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message.format(dir=tmp_path / "tfds") in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "tfds") == [], "nothing written, no staging left"


def test_tfds_can_reach_its_download_path(tmp_path):
    """The import that TFDS's download makes first (`importlib_resources`, a dependency in setup.py since
    tensorflow-datasets 4.9.10 stopped pulling it): `--source tfds` failed on it with ModuleNotFoundError."""
    import tensorflow_datasets as tfds

    builder = tfds.builder("movielens/100k-ratings", data_dir=str(tmp_path))
    assert builder.code_path.name == "movielens.py" and not builder.is_prepared()


def _decoded(out, list_size, history_len):
    """Every decoded record of a run as sorted (request_id, {feature: bytes}) pairs."""
    by_split = read_all(out, list_size, history_len)
    recs = []
    for split, records in by_split.items():
        for r in records:
            recs.append((r["request_id"], split, tuple((k, np.asarray(v).tobytes()) for k, v in sorted(r.items()))))
    return sorted(recs), by_split


def test_synthetic_oracle_scores_and_determinism(tmp_path):
    args = [
        "--source",
        "synthetic",
        "--set",
        "synthetic.num_users=25",
        "--set",
        "synthetic.num_items=60",
        "--set",
        "synthetic.requests_per_user=5",
        "--set",
        "synthetic.base_logit=-2.0",
        "--set",
        "list_size=8",
        "--set",
        "history_len=6",
        "--set",
        "k=3",
    ]
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / name
        stats = run_pipeline(*args, "--set", f"seed={seed}", "--output_dir", out)
        assert stats["counts"]["lists_read"] == 25 * 5
        assert stats["counts"]["rejected_at_read"] == 0
        runs[name] = (out, stats, *_decoded(out, 8, 6))

    out, stats, decoded, by_split = runs["a"]
    schema = json.loads((out / "schema.json").read_text())
    assert schema["has_oracle"] is True
    assert schema["features"]["oracle_scores"]["shape"] == [8]
    kept = sum(len(v) for v in by_split.values())
    assert kept == 25 * 5 - stats["lists"]["dropped_no_positive"]
    for records in by_split.values():
        for r in records:
            oracle, ids = r["oracle_scores"], r["item_ids"]
            assert oracle.shape == (8,) and oracle.dtype == np.float32
            assert np.all((oracle[ids != 0] > 0.0) & (oracle[ids != 0] < 1.0))
            assert np.all(oracle[ids == 0] == 0.0)
            assert r["request_id"].decode().startswith(f"syn-{int(r['user_id'])}-")
    # The latest kept list of each user is test, the one before valid.
    per_user = {}
    for split, records in by_split.items():
        for r in records:
            per_user.setdefault(int(r["user_id"]), []).append((int(r["timestamp"]), split))
    for lists in per_user.values():
        splits = [s for _, s in sorted(lists)]
        assert splits == (["train"] * (len(splits) - 2) + ["valid", "test"])[-len(splits) :]

    assert runs["a"][2] == runs["b"][2], "the same seed must give byte-identical records"
    assert runs["a"][2] != runs["c"][2], "another seed must give other records"
    c_scores = {rid: dict(feats)["retriever_scores"] for rid, _, feats in runs["c"][2]}
    same = [rid for rid, _, feats in decoded if c_scores.get(rid) == dict(feats)["retriever_scores"]]
    assert len(same) < len(decoded) / 2


def _logged_list(rng, request_id, user, ts, n, num_items=30):
    items = rng.choice(np.arange(1, num_items + 1), n, replace=False)
    scores = np.sort(rng.random(n))[::-1]
    labels = (rng.random(n) < 0.3).astype(int)
    labels[rng.integers(n)] = 1
    return {
        "request_id": request_id,
        "user_id": user,
        "timestamp": ts,
        "history": [int(x) for x in rng.choice(np.arange(1, num_items + 1), int(rng.integers(0, 9)), replace=False)],
        "candidates": [
            {"item_id": int(i), "retriever_score": round(float(s), 6), "label": int(z)}
            for i, s, z in zip(items, scores, labels)
        ],
    }


def test_logged_lists_split_by_time(tmp_path):
    rng = np.random.default_rng(6)
    lists = []
    for user, n_lists in ((3, 1), (5, 2), (8, 3), (11, 6)):
        times = rng.choice(100_000, n_lists, replace=False) + 1_700_000_000
        for j, ts in enumerate(times):
            lists.append(_logged_list(rng, f"req-{user}-{j}", user, int(ts), int(rng.integers(3, 7))))
    order = rng.permutation(len(lists))  # file order is not time order
    path = tmp_path / "logged.jsonl"
    path.write_text("".join(json.dumps(lists[j]) + "\n" for j in order))
    out = tmp_path / "out"
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
    )
    assert stats["counts"]["lists_read"] == len(lists)
    assert stats["counts"]["rejected_at_read"] == 0
    assert stats["counts"]["rejected_duplicate_request_ids"] == 0
    by_split = read_all(out, 6, 4)

    expected_split = {}
    for user in {x["user_id"] for x in lists}:
        mine = sorted((x for x in lists if x["user_id"] == user), key=lambda x: x["timestamp"])
        for j, x in enumerate(mine):
            last = len(mine) - 1
            expected_split[x["request_id"]] = "test" if j == last else "valid" if j == last - 1 else "train"
    got_split = {r["request_id"].decode(): s for s, recs in by_split.items() for r in recs}
    assert got_split == expected_split

    source = {x["request_id"]: x for x in lists}
    for records in by_split.values():
        for r in records:
            x = source[r["request_id"].decode()]
            n = len(x["candidates"])
            assert int(r["user_id"]) == x["user_id"] and int(r["timestamp"]) == x["timestamp"]
            assert r["item_ids"].tolist() == [c["item_id"] for c in x["candidates"]] + [0] * (6 - n)
            assert r["labels"].tolist() == [c["label"] for c in x["candidates"]] + [-1] * (6 - n)
            np.testing.assert_allclose(
                r["retriever_scores"][:n], [c["retriever_score"] for c in x["candidates"]], rtol=1e-6
            )
            hist = x["history"][-4:]
            assert r["history"].tolist() == [0] * (4 - len(hist)) + hist


def test_paper_protocol_lists_hold_exactly_horizon_positives(tmp_path):
    rows = make_rows(seed=8)
    path = write_movielens(tmp_path / "u.data", rows, "\t")
    out = tmp_path / "out"
    stats = run_pipeline("--source", "movielens", "--input", path, "--output_dir", out, "--protocol", "paper", *SMALL)
    assert stats["config"]["protocol"] == "paper"
    check_counts(stats, rows)
    by_split = read_all(out)
    per_user = check_interaction_lists(by_split, rows)
    for records in by_split.values():
        for r in records:
            assert int((r["labels"] == 1).sum()) == HORIZON
            assert int((r["labels"] != -1).sum()) == LIST_SIZE
    lengths = {}
    for user, *_ in rows:
        lengths[user] = lengths.get(user, 0) + 1
    assert sum(len(v) for v in by_split.values()) == sum(n // HORIZON for n in lengths.values())
    for user, lists in per_user.items():
        splits = [s for s, _ in lists]
        assert (splits.count("test"), splits.count("valid")) == (1, 1)
        assert splits.count("train") == lengths[user] // HORIZON - 2


# --- Beam unit tests -----------------------------------------------------------------------------


def _echo_lines(path, lines):
    from pipeline.sources.files import reject

    for number, text, bad in lines:
        if text is None:
            yield reject(path, number, bad)
        else:
            yield (os.path.basename(path), number, text)


def test_read_numbered_file_names_line_numbers_and_rejects(tmp_path):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from pipeline.sources.files import REJECTS, ReadNumbered

    a = tmp_path / "a.txt"
    a.write_bytes(b"\xef\xbb\xbfalpha\r\n\n  \nbe\x00ta\n\xffgamma\ndelta\n")
    b = tmp_path / "b.txt"
    import gzip

    b.write_bytes(gzip.compress(b"one\ntwo\r\n\nthree"))
    with TestPipeline() as p:
        read = p | ReadNumbered(os.fspath(tmp_path / "*.txt"), _echo_lines)
        assert_that(
            read.records,
            equal_to(
                [
                    ("a.txt", 1, "alpha"),
                    ("a.txt", 6, "delta"),
                    ("b.txt", 1, "one"),
                    ("b.txt", 2, "two"),
                    ("b.txt", 4, "three"),
                ]
            ),
            label="Records",
        )
        assert_that(
            read[REJECTS] | beam.Map(lambda r: (os.path.basename(r["file"]), r["line"], r["reason"], r["text"])),
            equal_to([("a.txt", 4, "binary data (NUL byte): not a text file", ""), ("a.txt", 5, "not UTF-8 text", "")]),
            label="Rejects",
        )
        assert_that(read[REJECTS] | beam.Map(lambda r: r["file"]), equal_to([os.fspath(a)] * 2), label="FullPath")


def _interaction(user, item, ts):
    from pipeline.protocol import Interaction

    return Interaction(user, item, ts, 4.0, "in.tsv", 100 * user + ts)


def _hand_timelines():
    I = _interaction  # noqa: E741
    return [
        (1, [I(1, 1, 1), I(1, 2, 2), I(1, 3, 3)]),
        (2, [I(2, 1, 1), I(2, 2, 2)]),
        (3, [I(3, 3, 1), I(3, 4, 2)]),  # item 4 is rare; then user 3 has one item left, then item 3 is rare
        (4, [I(4, 5, 1)]),
    ]


def test_kcore_two_core_reaches_the_fixed_point():
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from pipeline.stages import kcore
    from pipeline.stats import stat_pairs

    I = _interaction  # noqa: E741
    with TestPipeline() as p:
        stat_parts = []
        kept, item_counts = kcore(p | beam.Create(_hand_timelines()), 2, 3, stat_parts)
        assert_that(kept, equal_to([(1, [I(1, 1, 1), I(1, 2, 2)]), (2, [I(2, 1, 1), I(2, 2, 2)])]), label="Kept")
        assert_that(item_counts, equal_to([(1, 2), (2, 2)]), label="Counts")
        assert_that(
            stat_pairs(stat_parts),
            equal_to(
                [
                    ("kcore.interactions_after_pass.1", 5),
                    ("kcore.interactions_after_pass.2", 4),
                    ("kcore.interactions_after_pass.3", 4),
                    ("kcore.items_below_min_count_after_last_pass", 0),
                ]
            ),
            label="Stats",
        )


def test_counts_and_totals_are_summed_in_one_combine_and_an_empty_one_is_zero():
    """`stats.count` and `stats.total` are summed by key in `stat_pairs`' one combine, with a zero for
    every key (an empty PCollection reports 0, as a global combine did); other parts pass as they are."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from pipeline import stats

    with TestPipeline() as p:
        words = p | "Words" >> beam.Create(["a", "bb", "ccc", "dddd", "bb"])
        empty = p | "Empty" >> beam.Create([]).with_output_types(str)
        parts = [
            stats.count(words, "counts.words", "Words"),
            stats.total(words, "counts.letters", "Letters", len),
            stats.count(empty, "counts.none", "None"),
            stats.total(empty, "counts.no_letters", "NoLetters", len),
            stats.count(words | beam.Filter(lambda w: len(w) == 2), "counts.pairs", "Pairs"),
            p | "Other" >> beam.Create([("splits.train.auc", 0.75)]),
        ]
        assert_that(
            stats.stat_pairs(parts),
            equal_to(
                [
                    ("counts.words", 5),
                    ("counts.letters", 12),
                    ("counts.none", 0),
                    ("counts.no_letters", 0),
                    ("counts.pairs", 2),
                    ("splits.train.auc", 0.75),
                ]
            ),
        )


@pytest.mark.parametrize("lines", [["b", "a", "é \\u00e9", '{"key": 1}'], []])
def test_write_one_file_writes_what_write_to_text_writes(tmp_path, lines):
    """The file of `sinks.write_one_file` is `WriteToText(..., num_shards=1)`'s: its name, its lines
    (in some order), and an empty file for an empty PCollection."""
    import apache_beam as beam

    from pipeline import sinks

    with beam.Pipeline() as p:
        pcoll = p | beam.Create(lines).with_output_types(str)
        _ = pcoll | beam.io.WriteToText(os.fspath(tmp_path / "beam" / "x"), file_name_suffix=".jsonl", num_shards=1)
        sinks.write_one_file(pcoll, os.fspath(tmp_path / "ours" / "x"), "Ours", suffix=".jsonl")
    (theirs,) = (tmp_path / "beam").iterdir()
    (ours,) = (tmp_path / "ours").iterdir()
    assert ours.name == theirs.name == "x-00000-of-00001.jsonl"
    assert sorted(ours.read_bytes().splitlines(keepends=True)) == sorted(theirs.read_bytes().splitlines(keepends=True))
    assert len(ours.read_bytes().splitlines()) == len(lines)


def test_kcore_reports_an_unreached_fixed_point():
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from pipeline.stages import kcore
    from pipeline.stats import stat_pairs

    I = _interaction  # noqa: E741
    with TestPipeline() as p:
        stat_parts = []
        kept, item_counts = kcore(p | beam.Create(_hand_timelines()), 2, 1, stat_parts)
        # One pass drops item 4, user 3 and user 4, but item 3 (now seen once) is still there.
        assert_that(
            kept, equal_to([(1, [I(1, 1, 1), I(1, 2, 2), I(1, 3, 3)]), (2, [I(2, 1, 1), I(2, 2, 2)])]), label="Kept"
        )
        assert_that(item_counts, equal_to([(1, 2), (2, 2), (3, 1)]), label="Counts")
        assert_that(stat_pairs(stat_parts[-1:]), equal_to([("kcore.items_below_min_count_after_last_pass", 1)]))


def _split_files(out, split):
    """[(file name, [(request_id, user_id, timestamp), ...] in file order)] of one split."""
    import glob

    from tensorflow.core.example import example_pb2

    from dnr_tf import data as data_lib
    from dnr_tf.provenance import _tfrecords

    files = []
    for path in sorted(glob.glob(data_lib.split_pattern(str(out), split))):
        recs = []
        for raw in _tfrecords(path):
            f = example_pb2.Example.FromString(raw).features.feature
            recs.append(
                {
                    "request_id": f["request_id"].bytes_list.value[0].decode(),
                    "user_id": f["user_id"].int64_list.value[0],
                    "timestamp": f["timestamp"].int64_list.value[0],
                }
            )
        files.append((os.path.basename(path), recs))
    return files


def test_records_are_written_in_their_own_order_whatever_the_input_order(tmp_path):
    # Beam's sink wrote a file's records in the order bundles reached it: the same records in another
    # input order (or built after another data set in one process) came out in another order, and
    # training's seeded shuffle follows file order. Now a file holds its records by user, time and
    # request id, and a record's file is a hash of its request id.
    from pipeline.stages import record_order

    rng = np.random.default_rng(11)
    lists = []
    for user in (12, 3, 40, 7, 25):
        times = rng.choice(1000, 6, replace=False) + 1_700_000_000
        times[1] = times[0]  # two requests at one time: their ids decide, numbers compared as numbers
        for j, ts in enumerate(times):
            lists.append(_logged_list(rng, f"{user}:{(96, 102, 7, 250, 31, 5)[j]}", user, int(ts), 4))
    builds = {}
    for name, rows, shards in (
        ("a", lists, 2),
        ("b", [lists[j] for j in rng.permutation(len(lists))], 2),
        ("c", lists[::-1], 1),
    ):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in rows))
        out = tmp_path / name
        flags = ["--set", "list_size=4", "--set", "k=2", "--set", f"output_shards={shards}"]
        run_pipeline("--source", "logged", "--input", path, "--output_dir", out, *flags)
        builds[name] = {split: _split_files(out, split) for split in SPLITS}
    for name, splits in builds.items():
        for files in splits.values():
            assert len(files) == (1 if name == "c" else 2), files
            for file_name, recs in files:
                assert recs == sorted(recs, key=record_order), (name, file_name)
    assert builds["a"] == builds["b"]  # the same records in another input order: the same files
    for split in SPLITS:  # one file holds what two held
        (one,) = builds["c"][split]
        assert one[1] == sorted((r for _, recs in builds["a"][split] for r in recs), key=record_order)
        assert len(one[1]) > 2 and all(recs for _, recs in builds["a"][split])
    assert record_order({"request_id": "7:96", "user_id": 7, "timestamp": 5}) < record_order(
        {"request_id": "7:102", "user_id": 7, "timestamp": 5}
    )


@pytest.mark.parametrize(
    "value, want",
    [
        ("1", 1),
        ("978300760", 978300760),
        ("9" * 18, 10**18 - 1),  # the longest the shortcut takes
        ("1" + "0" * 18, 10**18),  # 19 digits: fits in int64, through the full check
        ("9" * 19, "does not fit in int64"),
        ("007", 7),
        ("+5", 5),
        (" 12 ", 12),
        ("0", "must be a positive integer"),
        ("-3", "must be a positive integer"),
        (str(2**63), "does not fit in int64"),
        ("1" * 30, "does not fit in int64"),
        ("\u0661\u0662", "is not an integer"),  # Arabic-Indic digits: str.isdigit, not [0-9]
        ("\u00b2", "is not an integer"),  # superscript two
        ("", "is not an integer"),
        ("1.5", "is not an integer"),
    ],
)
def test_id_parsing_shortcut_keeps_every_verdict(value, want):
    from pipeline.sources.interactions import _positive_int

    number, err = _positive_int(value, "user id")
    if isinstance(want, int):
        assert (number, err) == (want, None) and type(number) is int
    else:
        assert number is None and want in err and err.startswith("user id")


@pytest.mark.parametrize(
    "value, want",
    [
        ("0", 0),
        ("881250949", 881250949),
        ("9" * 18, 10**18 - 1),
        ("1" + "0" * 18, 10**18),
        ("9" * 19, "does not fit in int64"),
        ("0042", 42),
        ("12.7", 12),
        (" 5", 5),
        ("\u0661", 1),  # Python's int() reads any Unicode digit, as before the shortcut
        ("", "is missing"),
        ("1e30", "does not fit in int64"),
        ("-1", "is negative"),
    ],
)
def test_timestamp_parsing_shortcut_keeps_every_verdict(value, want):
    from pipeline.sources.interactions import _timestamp

    number, err = _timestamp(value)
    if isinstance(want, int):
        assert (number, err) == (want, None) and type(number) is int
    else:
        assert number is None and want in err


def test_interaction_coder_round_trips_and_is_what_stage_one_groups_with():
    import math

    import apache_beam as beam

    from pipeline import stages
    from pipeline.protocol import Interaction

    coder = stages.InteractionCoder()
    cases = [
        Interaction(1, 2, 3, 4.5, "u.data", 7),
        Interaction(2**63 - 1, 2**63 - 1, 2**63 - 1, -0.0, "dir/\u00e9t\u00e9 ratings.dat", 10**9),
        Interaction(5, 6, 0, float("nan"), "", 0),
        Interaction(np.int64(5), np.int64(6), np.int64(7), np.float32(2.5), "x", np.int64(1)),  # numpy scalars
        Interaction(2**70, 3, 4, 1.0, "huge.csv", 2),  # beyond int64: the pickled fallback
    ]
    for r in cases:
        back = coder.decode(coder.encode(r))
        assert type(back) is Interaction and coder.encode(r) == coder.encode(back)
        assert back[:3] == r[:3] and back[4:] == r[4:] and all(type(v) is int for v in back[:3] + back[5:])
        assert back.rating == r.rating or (math.isnan(back.rating) and math.isnan(r.rating))
    assert coder.is_deterministic()
    keyed = beam.coders.registry.get_coder(stages.KeyedInteraction)
    timeline = beam.coders.registry.get_coder(stages.TimelineType)
    assert isinstance(keyed._coders[1], stages.InteractionCoder)
    assert isinstance(timeline._coders[1]._elem_coder, stages.InteractionCoder)


def test_distinct_in_bundle_then_distinct_is_the_set_of_every_value():
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from pipeline import stages

    rng = np.random.default_rng(4)
    records = [{"ids": rng.integers(0, 300, size=int(rng.integers(0, 12))).tolist()} for _ in range(500)]
    want = sorted({i for r in records for i in r["ids"]})
    with TestPipeline() as p:
        got = (
            p
            | beam.Create(records)
            | beam.Reshuffle()  # several bundles
            | beam.ParDo(stages._DistinctInBundle(lambda r: r["ids"]))
            | beam.Distinct()
        )
        assert_that(got, equal_to(want))
    with TestPipeline() as p:  # nothing in, nothing out
        assert_that(p | beam.Create([]) | beam.ParDo(stages._DistinctInBundle(lambda r: r["ids"])), equal_to([]))
