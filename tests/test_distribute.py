"""`python -m dnr_tf.train --strategy`: two local workers (TF_CONFIG), two mirrored replicas, one process.

The smoke config (DNR-B: the heuristic sampler for one epoch, then the model-based one with its own
optimizer) is trained with dropout 0, because dropout masks are drawn per replica; DNR's noise is
drawn for the global batch (`noise.draw_for_batch`), so it is the same on any number of replicas.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOSSES = ("loss", "l_direct", "l_z", "l_adv", "l_x", "val_loss", "val_l_direct", "val_l_z")
# Rank metrics jump when near-tied scores swap, so a 1e-6 change of a weight can move them more.
RANKING = ("ndcg@6", "auc", "val_ndcg@6", "val_auc")


def _train_args(data_dir, model_dir, *extra):
    return [
        sys.executable,
        "-m",
        "dnr_tf.train",
        "--config",
        os.fspath(ROOT / "configs" / "smoke.yaml"),
        "--data_dir",
        os.fspath(data_dir),
        "--model_dir",
        os.fspath(model_dir),
        "--set",
        "model.dropout=0",
        "--set",
        "train.on_nonfinite=skip",
        *extra,
    ]


def _env(**extra):
    env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def _metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.json")) as f:
        return json.load(f)


def _assert_same_run(got, want):
    """Same loss trajectory (float sums in another order: 1e-4 relative) and metrics (1e-3)."""
    assert got["best_epoch"] == want["best_epoch"]
    assert got["steps"] == want["steps"], "both optimizers took the same steps"
    assert got["history"]["sampler_phase"] == want["history"]["sampler_phase"]
    assert got["skipped_steps"] == want["skipped_steps"], "a non-finite step skipped by every replica, counted once"
    assert got["nonfinite_counts"] == want["nonfinite_counts"]
    for key in LOSSES:
        np.testing.assert_allclose(got["history"][key], want["history"][key], rtol=1e-4, atol=1e-6, err_msg=key)
    for key in RANKING:
        np.testing.assert_allclose(got["history"][key], want["history"][key], rtol=1e-3, err_msg=key)
    for split in ("valid", "test"):
        np.testing.assert_allclose(got[split]["loss"], want[split]["loss"], rtol=1e-4, err_msg=f"{split} loss")
        for key in ("ndcg@6", "auc"):
            np.testing.assert_allclose(got[split][key], want[split][key], rtol=1e-3, err_msg=f"{split} {key}")


@pytest.fixture(scope="module")
def nan_data(nan_skip_run):
    """The synthetic data with a NaN retriever score in one train list, trained with
    `train.on_nonfinite=skip` by every run of this file: each run also shows that a non-finite step on
    one replica (or worker) is skipped by all, counted once, and leaves the run the one process's."""
    return nan_skip_run["data_dir"]


@pytest.fixture(scope="module")
def one_process(nan_skip_run):
    """The same command's run in one process, no strategy (conftest's `nan_skip_run`)."""
    want = nan_skip_run["result"]
    assert want["skipped_steps"] == 2, "the NaN list is in one batch of each epoch"
    assert want["nonfinite_counts"]["L_direct"] == 2
    return want


def test_two_local_workers_train_like_one_process(nan_data, one_process, tmp_path):
    data_dir = nan_data
    model_dir = tmp_path / "run"
    from dnr_tf.distribute import local_cluster

    workers = []
    for index, tf_config in enumerate(local_cluster(2)):
        log = open(tmp_path / f"worker-{index}.log", "w")
        args = _train_args(data_dir, model_dir, "--strategy", "multi_worker")
        workers.append((subprocess.Popen(args, cwd=ROOT, env=_env(TF_CONFIG=tf_config), stdout=log, stderr=log), log))
    try:
        codes = [proc.wait(timeout=400) for proc, _ in workers]
    finally:
        for proc, log in workers:
            if proc.poll() is None:
                proc.kill()
            log.close()
    logs = [(tmp_path / f"worker-{i}.log").read_text()[-3000:] for i in range(2)]
    assert codes == [0, 0], logs

    chief = _metrics(model_dir)
    assert chief["strategy"] == {"name": "multi_worker", "replicas": 2, "chief": True}
    assert chief["history"]["sampler_phase"] == [0.0, 1.0], "heuristic epoch, then model-based"
    _assert_same_run(chief, one_process)
    # Only the chief wrote the run; the other worker wrote its own copy aside, with the same numbers.
    assert sorted(os.listdir(model_dir)) == sorted(
        ["best.json", "best.weights.h5", "config.yaml", "item_vocab.txt", "logs", "metrics.json", "schema.json"]
        + ["workers"]
    )
    assert os.listdir(model_dir / "workers") == ["worker-1"]
    other = _metrics(model_dir / "workers" / "worker-1")
    assert other["strategy"]["chief"] is False
    assert other["history"] == chief["history"]
    assert "worker's copy of the run" in logs[1]


def test_mirrored_replicas_killed_and_resumed_train_like_one_process(nan_data, one_process, tmp_path):
    """Two mirrored replicas, killed after the heuristic epoch and resumed with the same command
    (backup and random states restored into the strategy's variables): the model-based epoch and the
    final metrics are the uninterrupted one process's. The NaN list sits in one replica's half of its
    batch: both replicas skip that step (the optimizer's all-reduce runs in both or neither), in
    either epoch, and the skip count survives the kill."""
    data_dir = nan_data
    args = _train_args(data_dir, tmp_path / "run", "--strategy", "mirrored", "--cpu_replicas", "2")
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = tmp_path / "run" / "backup" / "state.json"  # RunBackup's commit
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            try:
                if json.loads(meta.read_text())["epoch"] >= 1:
                    break
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            if proc.poll() is not None:
                pytest.fail("the mirrored run ended before it could be killed")
            time.sleep(0.1)
        else:
            pytest.fail("no backup of epoch 1 within 300 s")
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "run" / "metrics.json").exists(), "killed before the end"

    done = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    got = _metrics(tmp_path / "run")
    assert got["strategy"] == {"name": "mirrored", "replicas": 2, "chief": True}
    # The history keeps every epoch (RunBackup): the heuristic one before the kill, the model-based one after.
    assert got["history"]["sampler_phase"] == [0.0, 1.0], "the resumed run kept epoch 1 and did epoch 2"
    _assert_same_run(got, one_process)


def test_one_step_on_two_replicas_is_the_step_of_one_process(synthetic_data):
    """Noise, losses and the replicas' summed gradient against one process, on one batch, for the
    heuristic and the model-based step: the optimizer-independent check (Adam is blind to a
    gradient's scale, so a missing 1/replicas would not show in the trajectories)."""
    data_dir, _ = synthetic_data
    args = [sys.executable, os.fspath(ROOT / "tests" / "distributed_step.py"), os.fspath(data_dir), "0", "1"]
    done = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.strip().splitlines() if line.startswith("{")]
    assert [got["model_based"] for got in lines] == [False, True]
    for got in lines:
        assert got["replicas"] == 2
        assert got["generator_grads"] == (5 if got["model_based"] else 0)
        assert got["l_z"] > 0.1
        assert got["noise"] == 0.0, "x' is drawn for the global batch, then split"
        # The alternating update chooses the sampler in the graph on two replicas as on one: the
        # switch retraces nothing and the generator's x' is one process's (the simultaneous update
        # has a trace a phase).
        assert got["phase_in_graph"] is (not got["model_based"])
        assert got["traces"] == 1
        if not got["model_based"]:
            assert got["switched_noise"] == 0.0, "the generator's x' after the switch, on two replicas"
        assert got["losses"] < 1e-6
        assert got["gradients"] < 1e-5 * max(1.0, got["gradient_scale"])


@pytest.mark.parametrize(
    "tf_config, message",
    [
        (None, "needs the TF_CONFIG environment variable"),
        ("{not json", "TF_CONFIG is not JSON"),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}}', "`task` must give"),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}', "task.index 3"),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "ps", "index": 0}}', "task.type 'ps'"),
    ],
)
def test_a_bad_tf_config_is_named(synthetic_data, tmp_path, monkeypatch, capsys, tf_config, message):
    from dnr_tf.train import main

    data_dir, _ = synthetic_data
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    args = _train_args(data_dir, tmp_path / "run", "--strategy", "multi_worker")[3:]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "nothing written before the cluster is known"


def test_cpu_replicas_needs_mirrored(synthetic_data, tmp_path, capsys):
    from dnr_tf.train import main

    data_dir, _ = synthetic_data
    assert main(_train_args(data_dir, tmp_path / "run", "--cpu_replicas", "2")[3:]) == 2
    assert "--cpu_replicas applies to --strategy mirrored only" in capsys.readouterr().err


def test_embedding_gradients_are_summed_before_adam():
    """Keras 3's Adam squares an IndexedSlices gradient slice by slice: a row looked up twice with
    partial gradients 1 and -0.9 gets a second moment from 1 + 0.81 instead of 0.1^2, and so a step
    ~13 times too small. `dense_gradients` sums the slices first; the step is then Adam's."""
    import keras
    import tensorflow as tf

    from dnr_tf.model import dense_gradients

    def first_step(transform):
        table = keras.Variable(np.zeros((3, 2), "float32"))
        adam = keras.optimizers.Adam(0.1)
        adam.build([table])
        with tf.GradientTape() as tape:
            rows = tf.gather(table.value, [0, 0, 1])
            loss = tf.reduce_sum(rows * tf.constant([[1.0, 1.0], [-0.9, -0.9], [1.0, 1.0]]))
        grads = tape.gradient(loss, [table.value])
        assert isinstance(grads[0], tf.IndexedSlices)
        adam.apply(transform(grads), [table])
        return table.numpy()

    summed = first_step(dense_gradients)
    np.testing.assert_allclose(summed[:2], -0.1, rtol=1e-4)  # Adam's first step: lr * sign(gradient)
    sliced = first_step(lambda grads: grads)
    assert abs(sliced[0, 0]) < 0.01, "Keras' behaviour this works around (if it changes, this fails)"
