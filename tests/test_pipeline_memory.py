"""Memory stays bounded when the input doubles (issue 9): the retriever the driver trains streams its window.

What is measured: the peak memory that Python traces (`tracemalloc`: Python objects and NumPy arrays)
while `pipeline.retriever.train_mf` trains on a window of N (user, item) pairs and then of 2N pairs with
twice the users and the same items. This is the one step of the pipeline that runs in the project's own
process, outside Beam, and the one that once read the whole window. It streams the window in blocks of
`shuffle_buffer` pairs (plus at most one file), so the peak must not grow with the window. Holding the
window as one `[n, 2]` int64 array costs 16 bytes a pair; the test allows a quarter of what the extra
N pairs would take as one such copy (0.46 MB). Measured: the peak moved by -0.08 to +0.04 MB when the
window doubled. It grew by 3.9 MB when training read the window into one array, by 6.4 MB when the AUC
did, and by 3.0 MB with a graph traced and kept for each block (when each block ended on a short batch
of its own size). TensorFlow's own C++ buffers are not traced; they hold the embedding tables and one
batch.

Why the resident memory of the whole pipeline is not asserted: Beam's DirectRunner buffers PCollections
in the driver, and its workers' data plane buffers their input and output. With
`python -m bench.pipeline --doubling` (2 worker processes; 100,000 then 200,000 interactions, 1,000 then
2,000 users, 1,500 items; three runs, the last in docs/performance/pipeline_doubling.json) the peak of
all processes went from 2.06-2.09 to 2.19-2.20 GB, the driver's from 0.82-0.84 to 1.00-1.05 GB, each
stage-1 worker's from 0.34-0.38 to 0.50-0.55 GB, and each stage-2 worker's (it holds the item table)
from 0.63-0.65 to 0.66-0.68 GB. Of a stage-1 worker's growth, 10-25 MB was memory traced by Python,
and none of its largest allocations was in this project's code: they were Beam's gRPC data buffers
(Beam flushes an output stream at 10 MB and lets a send queue hold 100 MB). The rest is native memory
of gRPC and of the allocator (with glibc told to give freed memory back, the growth halved). The
driver's growth is the DirectRunner's own buffers; a distributed runner keeps them in its shuffle. A
DoFn that held every interaction would add 23-46 MB at 200,000 (230 bytes an `Interaction`, half or
all of them in one worker), while a stage-1 worker grew by 140-177 MB without one over three runs: a
test on resident memory could not tell the two apart at a size it can afford (the two runs take 70 s),
and a test that cannot fail is no test.
"""

from __future__ import annotations

import gzip
import os
import tracemalloc

import numpy as np

from pipeline import retriever as mf
from pipeline.config import RetrieverConfig

ITEMS = np.arange(1, 1_501) * 7
PAIRS = 120_000  # N; the second window holds 2N
FILE_PAIRS = 10_000  # pairs in a window file, on average
BLOCK = 20_000  # retriever.shuffle_buffer


def _write_window(directory, pairs: int, users: np.ndarray, seed: int) -> str:
    """Gzip TSV window files as stage 1 writes them, of unequal sizes like its hash shards."""
    rng = np.random.default_rng(seed)
    directory.mkdir()
    files = pairs // FILE_PAIRS
    for shard, size in enumerate(rng.multinomial(pairs, [1 / files] * files)):
        u, i = rng.choice(users, size), rng.choice(ITEMS, size)
        text = "".join(f"{a}\t{b}\n" for a, b in zip(u.tolist(), i.tolist()))
        path = directory / f"window-train-{shard:05d}-of-{files:05d}.tsv.gz"
        path.write_bytes(gzip.compress(text.encode(), mtime=0))
    return os.fspath(directory / "window-train-*")


def _peak_while_training(pattern: str, users: np.ndarray, monkeypatch) -> tuple[int, list[int]]:
    """Peak bytes traced while training one epoch on `pattern` and measuring the AUC on it, and the
    blocks each pass over the window was read in (counted as they stream: no pass of the test's own)."""
    cfg = RetrieverConfig(dim=8, epochs=1, batch_size=1024, shuffle_buffer=BLOCK)
    blocks, pair_blocks = [], mf.pair_blocks

    def counted(*args):
        blocks.append(0)
        for block in pair_blocks(*args):
            blocks[-1] += 1
            yield block
            del block  # not held while the next block is read

    monkeypatch.setattr(mf, "pair_blocks", counted)
    tracemalloc.start()
    try:
        mf.train_mf(pattern, {"window": pattern}, users, ITEMS, cfg, seed=0, progress=lambda line: None)
        return tracemalloc.get_traced_memory()[1], blocks
    finally:
        tracemalloc.stop()
        monkeypatch.setattr(mf, "pair_blocks", pair_blocks)


def test_retriever_peak_memory_does_not_grow_when_the_window_doubles(tmp_path, monkeypatch):
    users = np.arange(1, 1_001) * 3
    more_users = np.arange(1, 2_001) * 3
    small = _write_window(tmp_path / "warmup", FILE_PAIRS, users[:100], seed=0)
    one = _write_window(tmp_path / "n", PAIRS, users, seed=1)
    two = _write_window(tmp_path / "2n", 2 * PAIRS, more_users, seed=2)

    # Imports (outside tracemalloc, which slows them tenfold) and TensorFlow's first traces, not measured.
    assert sum(len(block) for block in mf.pair_blocks(small, users[:100], ITEMS, BLOCK)) == FILE_PAIRS
    _peak_while_training(small, users[:100], monkeypatch)
    peak_n, blocks_n = _peak_while_training(one, users, monkeypatch)
    peak_2n, blocks_2n = _peak_while_training(two, more_users, monkeypatch)
    # Each pass (the epoch's, the AUC's) streams the window in blocks, more of them for 2N.
    assert len(blocks_n) == len(blocks_2n) >= 2, (blocks_n, blocks_2n)
    for n, two_n in zip(blocks_n, blocks_2n):
        assert n >= 4 and two_n > n, f"blocks {blocks_n}, {blocks_2n}: the window must stream"

    allowed = PAIRS * 16 // 4
    assert peak_2n - peak_n < allowed, (
        f"the retriever's peak grew from {peak_n / 2**20:.2f} MB to {peak_2n / 2**20:.2f} MB when its window "
        f"doubled ({PAIRS:,} to {2 * PAIRS:,} pairs, blocks of {BLOCK:,}); allowed {allowed / 2**20:.2f} MB"
    )
