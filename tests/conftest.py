"""Shared fixtures. Real MovieLens-100K is read from --ml100k (default ../shared/data/ml-100k)."""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_ML100K = ROOT.parent / "shared" / "data" / "ml-100k"


def pytest_addoption(parser):
    parser.addoption(
        "--ml100k",
        default=os.fspath(DEFAULT_ML100K),
        help="directory holding MovieLens-100K u.data (never committed to this project)",
    )


@pytest.fixture(scope="session")
def ml100k_dir(request) -> pathlib.Path:
    path = pathlib.Path(request.config.getoption("--ml100k"))
    if not (path / "u.data").exists():
        pytest.fail(f"MovieLens-100K not found at {path}/u.data: pass --ml100k DIR (GroupLens' ml-100k folder)")
    return path


@pytest.fixture(scope="session")
def ml100k_data(ml100k_dir, tmp_path_factory):
    """The cascade pipeline on real ML-100K, run once per test session: (output dir, stats)."""
    from pipeline.run import run

    out = tmp_path_factory.mktemp("ml100k")
    stats = run(
        [
            "--config",
            os.fspath(ROOT / "configs/pipeline/ml100k.yaml"),
            "--input",
            os.fspath(ml100k_dir / "u.data"),
            "--output_dir",
            os.fspath(out),
        ]
    )
    return out, stats


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """The embedded default data set (the simulator), small: (output dir, stats)."""
    from pipeline.run import run

    out = tmp_path_factory.mktemp("synthetic")
    stats = run(
        [
            "--config",
            os.fspath(ROOT / "configs/pipeline/synthetic.yaml"),
            "--output_dir",
            os.fspath(out),
            "--set",
            "synthetic.num_users=200",
        ]
    )
    return out, stats
