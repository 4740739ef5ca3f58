"""Issue 7, training: non-finite steps are never applied (counted, or the run stops naming the term and
the epoch), and a run does not resume on data other than the data it started on.

The resume-after-SIGKILL test (same metrics as an uninterrupted run) is in test_train.py.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from dnr_tf import config_io
from dnr_tf import schema as schema_lib
from dnr_tf.config import ExperimentConfig
from dnr_tf.model import NONFINITE_TERMS
from dnr_tf.runs import build_model, read_vocab
from dnr_tf.train import datasets, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


def _cfg(*overrides):
    return config_io.from_dict(ExperimentConfig, config_io.apply_overrides(config_io.load_yaml(SMOKE), list(overrides)))


def _weights(variables):
    return [np.array(v.numpy()) for v in variables]


@pytest.mark.parametrize(
    "model_phase,update",
    [(False, "alternating"), (True, "alternating"), (True, "simultaneous")],
    ids=["heuristic", "model_based", "model_based_simultaneous"],
)
def test_a_nan_batch_is_not_applied_and_is_counted_by_term(synthetic_data, model_phase, update):
    data_dir = str(synthetic_data[0])
    schema = schema_lib.load_schema(data_dir)
    cfg = _cfg("train.on_nonfinite=skip", f"dnr.generator_update={update}")
    features, labels = next(iter(datasets(data_dir, cfg, schema)[0]))
    model = build_model(cfg, read_vocab(data_dir), schema, features)
    model.set_sampler_phase(model_phase)
    reranker, generator = model.reranker.trainable_variables, model.generator.trainable_variables
    before, gen_before = _weights(reranker), _weights(generator)

    scores = features["retriever_scores"].numpy()
    scores[3, 0] = np.nan
    logs = model.train_step(({**features, "retriever_scores": tf.constant(scores)}, labels))
    assert all(np.array_equal(a, b) for a, b in zip(before, _weights(reranker))), "the reranker changed"
    assert all(np.array_equal(a, b) for a, b in zip(gen_before, _weights(generator))), "the generator changed"
    assert int(model.optimizer.iterations.numpy()) == 0
    counts = dict(zip(NONFINITE_TERMS, model.nonfinite_counts.numpy().tolist()))
    assert counts["L_direct"] == 1 and counts["the reranker's gradients"] == 1
    assert counts["L_z"] == 0, "x' does not depend on x: L_z stays finite"
    if model_phase:  # the generator's step: L_x' compares x' with the NaN x
        assert counts["L_x'"] == 1
    assert float(logs["skipped_steps"]) == 1.0
    assert np.isfinite(float(logs["loss"])) or float(logs["loss"]) == 0.0, "no NaN reaches the epoch's means"

    model.train_step((features, labels))  # a clean batch is applied as usual
    assert int(model.optimizer.iterations.numpy()) == 1
    assert not all(np.array_equal(a, b) for a, b in zip(before, _weights(reranker)))
    assert int(model.skipped_steps.numpy()) == 1


def _data_with_a_nan_score(src, dst):
    """A copy of a pipeline output whose first train record has a NaN retriever score."""
    shutil.copytree(src, dst)
    (path,) = sorted(dst.glob("train-*.tfrecord.gz"))
    records = [bytes(r.numpy()) for r in tf.data.TFRecordDataset(str(path), compression_type="GZIP")]
    example = tf.train.Example.FromString(records[0])
    example.features.feature["retriever_scores"].float_list.value[0] = float("nan")
    records[0] = example.SerializeToString()
    with tf.io.TFRecordWriter(str(path), options="GZIP") as writer:
        for r in records:
            writer.write(r)
    return dst


def test_stop_policy_ends_the_run_naming_the_term_and_epoch(synthetic_data, tmp_path, capsys):
    data = _data_with_a_nan_score(synthetic_data[0], tmp_path / "data")
    run_dir = tmp_path / "run"
    args = ["--config", SMOKE, "--data_dir", str(data), "--model_dir", str(run_dir), "--set", "train.epochs=2"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: L_direct and the reranker's gradients not finite in epoch 1 (steps not applied: "), (
        err
    )
    assert "train.on_nonfinite=skip" in err
    assert not (run_dir / "metrics.json").exists()


def test_skip_policy_finishes_with_finite_weights_and_counts(nan_skip_run):
    run_dir = nan_skip_run["run"]  # smoke.yaml (2 epochs), train.on_nonfinite=skip, one NaN score
    result = json.loads((run_dir / "metrics.json").read_text())
    assert len(result["history"]["loss"]) == 2
    assert result["skipped_steps"] == 2, "the NaN list is in one batch of each of the 2 epochs"
    assert result["nonfinite_counts"]["L_direct"] == 2
    assert all(np.isfinite(v) for v in result["test"].values())
    from dnr_tf.runs import load_trained

    model, _, _ = load_trained(str(run_dir))
    assert all(np.all(np.isfinite(v.numpy())) for v in model.reranker.weights)


def test_resume_on_other_data_fails_before_any_work(nan_skip_run, tmp_path, capsys):
    """A copy of conftest's finished `nan_skip_run` (the suite's time: not trained again), resumed with
    its own command on other data."""
    data_dir = nan_skip_run["data_dir"]
    run_dir = tmp_path / "run"
    shutil.copytree(nan_skip_run["run"], run_dir)
    args = ["--config", SMOKE, "--data_dir", str(data_dir), "--model_dir", str(run_dir)]
    args += ["--set", "model.dropout=0", "--set", "train.on_nonfinite=skip"]
    # A run killed after its first epoch leaves a backup; pretend so, then point it at other data.
    (run_dir / "backup").mkdir()
    (run_dir / "backup" / "state.json").write_text(json.dumps({"epoch": 1}))
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    vocab = read_vocab(str(other))
    (other / "item_vocab.txt").write_text("".join(f"{v}\n" for v in vocab[:-1]))
    before = (run_dir / "metrics.json").stat().st_mtime
    assert main([*args[:3], str(other), *args[4:]]) == 2
    err = capsys.readouterr().err
    assert "item_vocab.txt differs from the vocabulary of the run" in err and "fresh --model_dir" in err
    assert (run_dir / "metrics.json").stat().st_mtime == before, "nothing was touched"

    schema = json.loads((other / "schema.json").read_text())
    schema["history_len"] += 1
    (other / "item_vocab.txt").write_text("".join(f"{v}\n" for v in vocab))
    (other / "schema.json").write_text(json.dumps(schema))
    assert main([*args[:3], str(other), *args[4:]]) == 2
    err = capsys.readouterr().err
    assert f"{other}/schema.json: history_len is {schema['history_len']}, but the run in" in err


def test_data_dir_shapes_disagreeing_with_the_config_fail_with_the_key(synthetic_data, tmp_path, capsys):
    data_dir = synthetic_data[0]
    list_size = json.loads((data_dir / "schema.json").read_text())["list_size"]
    base = ["--config", SMOKE, "--data_dir", str(data_dir), "--model_dir", str(tmp_path / "r")]
    assert main([*base, "--set", f"train.k={list_size + 1}", "--set", f"train.monitor=ndcg@{list_size + 1}"]) == 2
    assert f"train.k must not exceed the data's list size {list_size}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists(), "it failed before any work"


def test_export_refuses_non_finite_weights(synthetic_data, tmp_path):
    from dnr_tf.export import export_model

    data_dir = str(synthetic_data[0])
    schema = schema_lib.load_schema(data_dir)
    cfg = _cfg()
    features, _ = next(iter(datasets(data_dir, cfg, schema)[0]))
    model = build_model(cfg, read_vocab(data_dir), schema, features)
    kernel = model.reranker.trainable_variables[3]
    value = kernel.numpy()
    value.flat[0] = np.inf
    kernel.assign(value)
    with pytest.raises(ValueError, match=f"non-finite weights \\({kernel.path}"):
        export_model(model, str(tmp_path / "saved"), k=6, list_size=schema.list_size)
    assert not (tmp_path / "saved").exists() or not any((tmp_path / "saved").iterdir())


def test_weights_saved_before_the_counters_still_load(synthetic_data):
    data_dir = str(synthetic_data[0])
    schema = schema_lib.load_schema(data_dir)
    cfg = _cfg()
    features, _ = next(iter(datasets(data_dir, cfg, schema)[0]))
    model = build_model(cfg, read_vocab(data_dir), schema, features)
    model.nonfinite_counts.assign([1, 0, 0, 0, 0, 0])
    model.load_own_variables({"0": np.array(1, np.int32)})  # what a run of issues 3-6 saved for the model
    assert int(model.sampler_phase.numpy()) == 1
    with pytest.raises(ValueError):
        model.load_own_variables({"0": np.array(1), "1": np.zeros(6), "2": np.array(0), "3": np.array(0)})
