"""`train.precision: mixed_bfloat16`: float32 weights, bfloat16 arithmetic, float32 losses; the export
serves such a run in float32."""

import json
import math
import os
import pathlib

import numpy as np
import pytest

from dnr_tf import schema as S

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mixed_run(synthetic_data, tmp_path_factory):
    """configs/smoke.yaml (heuristic epoch, then model-based) trained under mixed precision."""
    from dnr_tf.train import main

    tmp = tmp_path_factory.mktemp("mixed_run")
    args = ["--config", os.fspath(ROOT / "configs/smoke.yaml"), "--data_dir", os.fspath(synthetic_data[0])]
    args += ["--model_dir", os.fspath(tmp / "run"), "--set", "train.precision=mixed_bfloat16"]
    assert main(args) == 0
    return {"run": tmp / "run", "data_dir": synthetic_data[0], "tmp": tmp}


def _features(data_dir, n=16):
    from dnr_tf import config_io
    from dnr_tf.config import ExperimentConfig
    from dnr_tf.train import datasets

    cfg = config_io.from_dict(ExperimentConfig, config_io.load_yaml(os.fspath(ROOT / "configs/smoke.yaml")))
    schema = S.load_schema(os.fspath(data_dir))
    features, _ = next(iter(datasets(os.fspath(data_dir), cfg, schema)[2]))
    return {key: value[:n] for key, value in features.items()}


def _compute_dtypes(model) -> set:
    return {layer.dtype_policy.compute_dtype for layer in model.reranker._flatten_layers() if layer.weights}


def test_a_mixed_run_trains_both_phases_in_bfloat16_with_float32_weights_and_losses(mixed_run):
    import keras

    from dnr_tf.runs import load_trained

    metrics = json.loads((mixed_run["run"] / "metrics.json").read_text())
    for split in ("valid", "test"):
        for name in ("loss", "l_direct", "l_z", "ndcg@6", "auc"):
            assert math.isfinite(metrics[split][name]), (split, name)
    history = metrics["history"]
    assert history["sampler_phase"] == [0.0, 1.0], "a heuristic epoch, then a model-based one"
    for name in ("loss", "l_direct", "l_z", "l_adv", "l_x", "val_l_adv", "val_l_x"):
        assert all(math.isfinite(v) for v in history[name]), name
    assert history["l_adv"][1] != 0.0 and history["l_x"][1] != 0.0, "the generator's losses were computed"

    model, cfg, _ = load_trained(os.fspath(mixed_run["run"]))
    assert cfg.train.precision == "mixed_bfloat16"
    assert _compute_dtypes(model) == {"bfloat16"}
    assert {layer.dtype_policy.compute_dtype for layer in model.generator._flatten_layers() if layer.weights} == {
        "bfloat16"
    }
    assert {w.dtype for w in model.trainable_weights} == {"float32"}
    assert keras.config.dtype_policy().name == "float32", "the process's policy is restored after the build"

    features = _features(mixed_run["data_dir"])
    logits = model(features)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    float32_model, _, _ = load_trained(os.fspath(mixed_run["run"]), precision="float32")
    assert _compute_dtypes(float32_model) == {"float32"}
    reference = np.asarray(float32_model(features))
    mask = features[S.ITEM_IDS].numpy() != 0
    diff = np.abs(np.asarray(logits) - reference)[mask]
    # bfloat16 keeps 8 bits of mantissa: the same model, other roundings (and not the float32 path).
    assert 0 < diff.max() < 0.1, diff.max()


def test_the_default_precision_builds_float32_layers(synthetic_data):
    from dnr_tf import config_io
    from dnr_tf.config import ExperimentConfig
    from dnr_tf.runs import build_model, read_vocab

    data_dir = os.fspath(synthetic_data[0])
    cfg = config_io.from_dict(ExperimentConfig, config_io.load_yaml(os.fspath(ROOT / "configs/smoke.yaml")))
    assert cfg.train.precision == "float32"
    model = build_model(cfg, read_vocab(data_dir), S.load_schema(data_dir), _features(data_dir))
    assert _compute_dtypes(model) == {"float32"}


def test_the_export_of_a_mixed_run_serves_its_weights_in_float32(mixed_run):
    import tensorflow as tf

    from dnr_tf.export import export_run
    from dnr_tf.runs import load_trained

    path = export_run(os.fspath(mixed_run["run"]), os.fspath(mixed_run["tmp"] / "export"))
    info = json.loads((pathlib.Path(path) / "assets.extra" / "dnr_export.json").read_text())
    assert info["trained_precision"] == "mixed_bfloat16"
    features = _features(mixed_run["data_dir"])
    served = tf.saved_model.load(path).signatures["predict_lists"](**features)["scores"].numpy()
    model, _, _ = load_trained(os.fspath(mixed_run["run"]), precision="float32")
    logits = np.asarray(model(features))
    expected = np.where(features[S.ITEM_IDS].numpy() != 0, 1 / (1 + np.exp(-logits)), 0.0)
    np.testing.assert_allclose(served, expected, atol=1e-5)

    # The model itself, as built for its run (bfloat16 arithmetic), is refused before anything is written:
    # its scores would come out in bfloat16.
    from dnr_tf.export import export_model

    mixed, _, schema = load_trained(os.fspath(mixed_run["run"]))
    out = mixed_run["tmp"] / "refused"
    with pytest.raises(ValueError, match=r"^not exported: the reranker computes under mixed_bfloat16"):
        export_model(mixed, os.fspath(out), 6, schema.list_size, history_len=schema.history_len)
    assert not out.exists()


def test_an_unknown_precision_is_refused_naming_the_key(synthetic_data, tmp_path, capsys):
    from dnr_tf.train import main

    args = ["--config", os.fspath(ROOT / "configs/smoke.yaml"), "--data_dir", os.fspath(synthetic_data[0])]
    args += ["--model_dir", os.fspath(tmp_path / "run"), "--set", "train.precision=float16"]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "train.precision" in err and "mixed_bfloat16" in err, err
    assert not (tmp_path / "run").exists()


def test_the_training_bench_builds_its_cases_in_the_asked_precision(synthetic_data):
    from bench.train_cost import build_cases

    for precision, dtype in (("mixed_bfloat16", "bfloat16"), ("float32", "float32")):
        cases = build_cases(os.fspath(synthetic_data[0]), ["direct", "heuristic"], 1, precision)
        for case in cases.values():
            assert _compute_dtypes(case["model"]) == {dtype}, precision


def test_the_generator_evaluator_trains_and_serves_under_mixed_precision(synthetic_data):
    """GenEval draws its proposals with float32 noise (a bfloat16 g would not add to it), in training
    (its evaluator's loss) and when it serves."""
    import keras

    from dnr_tf import config_io
    from dnr_tf.config import ExperimentConfig
    from dnr_tf.runs import build_model, read_vocab
    from dnr_tf.train import datasets

    data_dir = os.fspath(synthetic_data[0])
    overrides = ["model.backbone=geneval", "train.precision=mixed_bfloat16"]
    cfg = config_io.from_dict(
        ExperimentConfig,
        config_io.apply_overrides(config_io.load_yaml(os.fspath(ROOT / "configs/smoke.yaml")), overrides),
    )
    schema = S.load_schema(data_dir)
    train_ds = datasets(data_dir, cfg, schema)[0].take(1)
    features = _features(data_dir)
    model = build_model(cfg, read_vocab(data_dir), schema, features)
    assert _compute_dtypes(model) == {"bfloat16"}
    # The heuristic phase trains its evaluator on drawn proposals (the model-based phase adds the
    # generator's path, which the mixed run above covers); the call below serves them.
    logs = model.fit(train_ds, epochs=1, verbose=0).history
    assert all(math.isfinite(v[-1]) for v in logs.values()), logs
    logits = model(features)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    assert np.isfinite(np.asarray(logits)).all()
