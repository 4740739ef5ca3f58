"""The retriever streams its window in bounded blocks and stays deterministic across worker counts."""

from __future__ import annotations

import gzip
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from bench.pipeline import write_ml1m_like
from pipeline import retriever as mf
from pipeline.config import RetrieverConfig
from pipeline.run import run as run_pipeline
from tests.test_sources import _decoded

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _write_shard(path, pairs):
    path.write_bytes(gzip.compress("".join(f"{u}\t{i}\n" for u, i in pairs).encode()))


def test_pair_blocks_are_bounded_sorted_and_cover_the_window(tmp_path):
    rng = np.random.default_rng(0)
    users, items = np.array([3, 10, 42, 77]), np.array([5, 6, 9, 11, 20])
    shards = [[(int(rng.choice(users)), int(rng.choice(items))) for _ in range(n)] for n in (40, 0, 35, 50)]
    for k, pairs in enumerate(shards):
        _write_shard(tmp_path / f"window-train-{k:05d}-of-00004.tsv.gz", pairs)
    pattern = os.fspath(tmp_path / "window-train-*")
    expected = sorted((int(np.searchsorted(users, u)), int(np.searchsorted(items, i))) for s in shards for u, i in s)

    blocks = list(mf.pair_blocks(pattern, users, items, block=60))
    assert [len(b) for b in blocks] == [75, 50], "a block closes once it holds `block` pairs (plus one file)"
    for b in blocks:
        assert [tuple(r) for r in b] == sorted(tuple(r) for r in b)
    assert sorted(tuple(r) for b in blocks for r in b) == expected

    (whole,) = mf.pair_blocks(pattern, users, items, block=1000)
    assert [tuple(r) for r in whole] == expected, "a window that fits comes whole, sorted"


def test_batches_run_on_across_blocks_and_only_the_last_is_short():
    blocks = [np.arange(2 * n).reshape(n, 2) + 1000 * k for k, n in enumerate((23, 5, 40, 9))]
    batches = list(mf.shuffled_batches(iter(blocks), 8, np.random.default_rng(0)))
    assert [len(b) for b in batches] == [8] * 9 + [5]
    assert sorted(map(tuple, np.concatenate(batches))) == sorted(map(tuple, np.concatenate(blocks)))
    # Each block is shuffled on its own: the first 23 pairs out are the first block's.
    assert {tuple(r) for r in np.concatenate(batches)[:23]} == {tuple(r) for r in blocks[0]}
    # One block: the batches of one permutation of it, in order.
    block = blocks[2]
    order = np.random.default_rng(1).permutation(len(block))
    got = list(mf.shuffled_batches([block], 16, np.random.default_rng(1)))
    assert [b.tolist() for b in got] == [block[order[i : i + 16]].tolist() for i in range(0, 40, 16)]


@pytest.mark.parametrize("shuffle_buffer, reads", [(60, 3), (1_000, 1)])
def test_every_epoch_trains_on_the_whole_window(tmp_path, monkeypatch, shuffle_buffer, reads):
    """A window of several blocks is streamed whole every epoch; a window of one block is read once and kept."""
    rng = np.random.default_rng(1)
    users, items = np.array([3, 10, 42, 77]), np.array([5, 6, 9, 11, 20])
    for k, n in enumerate((40, 35, 50)):
        pairs = zip(rng.choice(users, n), rng.choice(items, n))
        _write_shard(tmp_path / f"window-train-{k:05d}-of-00003.tsv.gz", pairs)
    streamed, pair_blocks = [], mf.pair_blocks

    def counted(*args):
        for block in pair_blocks(*args):
            streamed.append(len(block))
            yield block

    monkeypatch.setattr(mf, "pair_blocks", counted)
    cfg = RetrieverConfig(dim=4, epochs=3, batch_size=16, shuffle_buffer=shuffle_buffer)
    mf.train_mf(os.fspath(tmp_path / "window-train-*"), {}, users, items, cfg, seed=0, progress=lambda line: None)
    assert sum(streamed) == reads * 125, f"blocks read {streamed} over 3 epochs of a 125-pair window"


def test_one_and_two_workers_give_the_same_retriever_and_lists(tmp_path, shuffle_buffer=700):
    """A window of several blocks (the streamed path): the same retriever and lists on one worker and on
    two worker processes. (A window of one block is the same code with one block: the tests above
    cover its reading; what can differ across workers, the window's shards, is the same for both.)"""
    ratings = tmp_path / "ratings.dat"
    write_ml1m_like(os.fspath(ratings), users=80, items=150, interactions=4_000, seed=1)
    args = [
        "--source", "movielens", "--input", os.fspath(ratings), "--set", "movielens_format=1m",
        "--set", "min_count=5", "--set", "retriever.epochs=2", "--set", "retriever.dim=8",
        "--set", f"retriever.shuffle_buffer={shuffle_buffer}", "--set", "retriever.window_shards=4",
        "--set", "list_size=20", "--set", "history_len=5",
    ]  # fmt: skip
    one = tmp_path / "one"
    two = tmp_path / "two"
    stats = run_pipeline([*args, "--output_dir", os.fspath(one), "--direct_num_workers", "1"])
    # Two worker processes, as a user runs it: the command line, whose stderr must stay empty (the
    # workers' start-up noise is filtered, `dnr_tf.quiet.worker_stderr_filtered`).
    two_workers = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "PYTHONWARNINGS")}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.run", *args, "--output_dir", os.fspath(two), *two_workers],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == "", "quiet by default, the worker processes' lines included"
    window = stats["retriever"]["window_train_interactions"]
    assert window > shuffle_buffer, "the window must span several blocks"
    a, b = np.load(one / "retriever" / "mf.npz"), np.load(two / "retriever" / "mf.npz")
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    rows = [
        [gzip.decompress(p.read_bytes()) for p in sorted((d / "retriever").glob("user_rows-*"))] for d in (one, two)
    ]
    assert rows[0] == rows[1] and rows[0], "the same user table"
    assert _decoded(one, 20, 5)[0] == _decoded(two, 20, 5)[0]
    assert stats["retriever"]["auc_heldout"] > 0.5
