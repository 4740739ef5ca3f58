"""Shared fixtures. Real MovieLens-100K is read from --ml100k (default ../shared/data/ml-100k)."""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# `make test` runs two xdist workers on two cores: each runs TensorFlow's ops on one thread, so that the
# two do not fight over the cores (set before any test module imports TensorFlow; subprocesses inherit it).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
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


@pytest.fixture(scope="session")
def smoke_run(synthetic_data, tmp_path_factory):
    """configs/smoke.yaml (DNR-B, 2 epochs) trained once on `synthetic_data` and exported once.

    Shared by the training, export and serving tests, which only read it (the suite's time: one
    training and one export instead of three and two). A dict: `run` (run directory), `result`
    (what `train` returned), `export` (the SavedModel path, version 1), `data_dir`.
    """
    from dnr_tf import config_io
    from dnr_tf.config import ExperimentConfig
    from dnr_tf.export import export_run
    from dnr_tf.train import train

    data_dir, _ = synthetic_data
    tmp = tmp_path_factory.mktemp("smoke_run")
    cfg = config_io.from_dict(ExperimentConfig, config_io.load_yaml(os.fspath(ROOT / "configs/smoke.yaml")))
    result = train(cfg, str(data_dir), str(tmp / "run"), verbose=0)
    path = export_run(str(tmp / "run"), str(tmp / "saved" / "smoke"))
    return {"run": tmp / "run", "result": result, "export": path, "data_dir": data_dir}


@pytest.fixture(scope="session")
def nan_skip_run(synthetic_data, tmp_path_factory):
    """configs/smoke.yaml with dropout 0 and `train.on_nonfinite=skip`, trained once in this process on
    a copy of `synthetic_data` whose first train list has a NaN retriever score.

    Shared by the skip policy's test and the distribution tests, which compare their runs (dropout
    masks are drawn per replica, hence dropout 0) with this one process's. A dict: `data_dir` (the
    copy with the NaN), `run` (run directory), `result` (its metrics.json).
    """
    import json

    from test_reliability_train import _data_with_a_nan_score

    from dnr_tf.train import main

    tmp = tmp_path_factory.mktemp("nan_skip_run")
    data_dir = _data_with_a_nan_score(synthetic_data[0], tmp / "data")
    args = ["--config", os.fspath(ROOT / "configs/smoke.yaml"), "--data_dir", os.fspath(data_dir)]
    args += ["--model_dir", os.fspath(tmp / "run"), "--set", "model.dropout=0", "--set", "train.on_nonfinite=skip"]
    assert main(args) == 0
    result = json.loads((tmp / "run" / "metrics.json").read_text())
    return {"data_dir": data_dir, "run": tmp / "run", "result": result}


# --- scheduling on pytest-xdist workers (`make test`: -n 2 --dist loadgroup) ---
# Each file runs whole on one worker (its module fixtures are built once), and the files that share
# a costly session fixture form one group: ML-100K's pipeline (35 s) and the smoke run are built
# once, not on each worker. (Handing the slowest files out first was tried on 2026-12-04: the two
# heaviest, which start training subprocesses, then ran side by side, and two runs took 15 min 23 s and 15 min 56 s
# against 13 min 17 s in xdist's own order, the groups with most tests first, which is kept. One
# run each, on a machine whose speed varies between runs.)
GROUPS = {
    "test_ml100k_pipeline.py": "test_fused_step.py",
    # `smoke_run` (a DNR-B training and an export) is shared by these five.
    "test_export.py": "test_train.py",
    "test_serving_fuzz.py": "test_train.py",
    "test_serving_c_api.py": "test_train.py",
    "test_phase_switch.py": "test_train.py",
    # `nan_skip_run` (a DNR-B training on data with a NaN score) is shared by these two.
    "test_reliability_train.py": "test_distribute.py",
    # No shared fixture: xdist hands out the groups with most tests first, and this file (3 tests, about
    # 130 s on a slow VM, in-process training) came last and ran alone on one worker while the other
    # idled (2026-12-06 20:50: 70 s). With the 97 quick refusal tests it is handed out first.
    "test_kill_safety.py": "test_refusals.py",
}


# tryfirst: xdist's worker reads the markers in its own pytest_collection_modifyitems (it suffixes each
# node id with its group); a marker added after that is ignored, and every test is scheduled alone.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(GROUPS.get(item.path.name, item.path.name)))
