"""The pipeline runs unchanged on Beam's portable runner (issue 9): `--runner PortableRunner` with an
embedded job server and loopback workers, the same Fn API path as Flink, Spark and Dataflow, gives the
records and retriever the DirectRunner gives."""

from __future__ import annotations

import gzip
import os

import numpy as np

from bench.pipeline import write_ml1m_like
from pipeline.run import run as run_pipeline
from tests.test_sources import _decoded


def test_portable_runner_gives_the_direct_runners_data(tmp_path):
    ratings = tmp_path / "ratings.dat"
    write_ml1m_like(os.fspath(ratings), users=60, items=120, interactions=3_000, seed=5)
    args = [
        "--source", "movielens", "--input", os.fspath(ratings), "--set", "movielens_format=1m",
        "--set", "min_count=5", "--set", "retriever.epochs=2", "--set", "retriever.dim=8",
        "--set", "list_size=20", "--set", "history_len=5",
    ]  # fmt: skip
    direct, portable = tmp_path / "direct", tmp_path / "portable"
    run_pipeline([*args, "--output_dir", os.fspath(direct)])
    stats = run_pipeline(
        [*args, "--output_dir", os.fspath(portable), "--runner", "PortableRunner", "--job_endpoint", "embed",
         "--environment_type", "LOOPBACK"]
    )  # fmt: skip
    assert stats["counts"]["interactions_read"] == 3_000
    assert _decoded(portable, 20, 5)[0] == _decoded(direct, 20, 5)[0]
    a, b = np.load(direct / "retriever" / "mf.npz"), np.load(portable / "retriever" / "mf.npz")
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    rows = [
        [gzip.decompress(p.read_bytes()) for p in sorted((d / "retriever").glob("user_rows-*"))]
        for d in (direct, portable)
    ]
    assert rows[0] == rows[1]
