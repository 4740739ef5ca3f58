"""DNR training: both optimizers step, the sampler switches, ablations remove their terms, resume."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dnr_tf import config_io
from dnr_tf import schema as S
from dnr_tf.config import DNRConfig, ExperimentConfig, ModelConfig, TrainConfig
from dnr_tf.runs import build_model, read_vocab
from dnr_tf.train import datasets, main, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


def _cfg(**dnr):
    base = config_io.from_dict(ExperimentConfig, config_io.load_yaml(SMOKE))
    return ExperimentConfig(
        name="t", model=base.model, dnr=DNRConfig(**{**config_io.to_dict(base.dnr), **dnr}), train=base.train
    )


def _model_and_batch(data_dir, cfg):
    schema = S.load_schema(data_dir)
    train_ds, _, _ = datasets(str(data_dir), cfg, schema)
    features, labels = next(iter(train_ds))
    return build_model(cfg, read_vocab(str(data_dir)), schema, features), features, labels


def test_smoke_dnr_trains_both_optimizers_and_switches_sampler(smoke_run):
    # The session's smoke run (conftest.py): configs/smoke.yaml, lambda_e = 1 of 2 epochs.
    result, run_dir = smoke_run["result"], smoke_run["run"]
    assert config_io.load_yaml(os.path.join(run_dir, "config.yaml"))["dnr"]["lambda_e"] == 1
    hist = result["history"]
    assert hist["sampler_phase"] == [0.0, 1.0], "heuristic for lambda_e = 1 epoch, then model-based"
    steps_per_epoch = result["steps"]["reranker"] // 2
    assert steps_per_epoch > 0
    assert result["steps"]["generator"] == steps_per_epoch, "one generator step a batch in the model-based epoch"
    for key in ("loss", "l_direct", "l_z", "l_adv", "l_x", "val_loss"):
        assert all(np.isfinite(hist[key])), key
    assert hist["l_adv"][0] == 0.0 and hist["l_adv"][1] < 0.0, "L_adv only in the adversarial phase"
    assert hist["l_x"][1] > 0.0
    for split in ("valid", "test"):
        assert 0.0 < result[split]["ndcg@6"] <= 1.0
    metrics = json.load(open(run_dir / "metrics.json"))
    assert metrics["best_epoch"] in (1, 2)
    assert os.path.exists(run_dir / "best.weights.h5")
    assert not os.path.exists(run_dir / "backup"), "the backup is removed at the end of a run"
    assert glob.glob(str(run_dir / "logs" / "scores" / "events.*"))


def test_generator_steps_change_its_weights_only_when_a_term_is_on(synthetic_data):
    data_dir, _ = synthetic_data
    for use_adv, use_x_reg, should_change in (
        (True, True, True),
        (False, True, True),
        (True, False, True),
        (False, False, False),
    ):
        cfg = _cfg(lambda_e=0, use_adv=use_adv, use_x_reg=use_x_reg)
        model, features, labels = _model_and_batch(data_dir, cfg)
        model.set_sampler_phase(True)
        before = [v.numpy().copy() for v in model.generator.trainable_variables]
        model.train_step((features, labels))  # one step, eagerly: no tf.function to trace per model
        changed = any(np.abs(b - v.numpy()).max() > 0 for b, v in zip(before, model.generator.trainable_variables))
        assert changed == should_change, (use_adv, use_x_reg)


def test_ablation_switches_remove_their_terms(synthetic_data):
    data_dir, _ = synthetic_data
    for use_adv, use_x_reg in ((False, True), (True, False)):
        cfg = _cfg(lambda_e=0, use_adv=use_adv, use_x_reg=use_x_reg, weight_x=2.0)
        model, features, labels = _model_and_batch(data_dir, cfg)
        model.set_sampler_phase(True)
        mask = labels >= 0
        z = (labels == 1).numpy().astype("float32")
        import keras

        keras.utils.set_random_seed(3)
        loss, l_adv, l_x = model._generator_losses(features, z, mask)
        expected = 2.0 * float(l_x) if not use_adv else float(l_adv)
        assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_direct_training_has_no_generator_and_no_l_z(synthetic_data, tmp_path):
    data_dir, _ = synthetic_data
    cfg = _cfg(enabled=False)
    result = train(cfg, str(data_dir), str(tmp_path / "run"), verbose=0)
    assert result["steps"]["generator"] == 0
    assert result["history"]["l_z"] == [0.0, 0.0]
    assert result["history"]["loss"] == pytest.approx(result["history"]["l_direct"])
    # A second run with another config into the finished directory, on purpose (--overwrite), starts
    # afresh: its best epoch is its own.
    again = train(_cfg(enabled=False, lambda_m=0.0), str(data_dir), str(tmp_path / "run"), verbose=0, overwrite=True)
    val = again["history"]["val_ndcg@6"]
    assert len(val) == 2 and again["best_epoch"] == int(np.argmax(val)) + 1


def test_heuristic_only_never_switches(synthetic_data, tmp_path):
    data_dir, _ = synthetic_data
    cfg = _cfg(model_based=False, heuristic="gaussian")
    model, features, labels = _model_and_batch(data_dir, cfg)
    assert model.generator is None
    result = train(cfg, str(data_dir), str(tmp_path / "run"), verbose=0)
    assert result["history"]["sampler_phase"] == [0.0, 0.0]
    assert all(v > 0 for v in result["history"]["l_z"])


def test_heuristic_samples_stay_in_range_and_follow_eq4(synthetic_data):
    data_dir, _ = synthetic_data
    for kind in ("beta", "gaussian"):
        cfg = _cfg(heuristic=kind, lambda_c=0.3, model_based=False)
        model, features, labels = _model_and_batch(data_dir, cfg)
        z = (labels.numpy() == 1).astype("float32")
        x = np.asarray(model.sample_x(features, z))
        assert x.min() >= 0.0 and x.max() <= 1.0
        valid = labels.numpy() >= 0
        # x' = 0.7 z + 0.3 eps with eps in [0, 1] (Beta) -> positives >= 0.7, negatives <= 0.3
        if kind == "beta":
            assert x[(z == 1) & valid].min() >= 0.7 - 1e-6 and x[(z == 0) & valid].max() <= 0.3 + 1e-6


def test_killed_run_resumes_from_its_epoch(smoke_run, tmp_path):
    """The smoke run's command, killed (SIGKILL) after its heuristic epoch and run again, ends as the
    shared smoke run that was never interrupted."""
    data_dir = smoke_run["data_dir"]
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "dnr_tf.train", "--config", SMOKE, "--data_dir", str(data_dir)]
    cmd += ["--model_dir", str(run_dir)]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = run_dir / "backup" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if meta.exists():
            try:
                if json.loads(meta.read_text())["epoch"] >= 1:  # epochs completed
                    break
            except (json.JSONDecodeError, KeyError):
                pass
        if proc.poll() is not None:
            pytest.fail("the training process ended before it could be killed")
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("no backup after 240 s")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(meta.read_text())["epoch"] == 1, "killed before the end"
    assert not (run_dir / "metrics.json").exists()

    # The same command again, in this process (which has built other models: Keras' layer names
    # differ from the killed process's, and the random states must be restored all the same).
    assert main(cmd[3:]) == 0
    result = json.loads((run_dir / "metrics.json").read_text())
    # The history of every epoch (the backup keeps it); the sampler's phase and both optimizers' state restored.
    assert len(result["history"]["loss"]) == 2
    assert result["resumed_after"] == [1] and smoke_run["result"]["resumed_after"] == []
    assert result["history"]["sampler_phase"] == [0.0, 1.0]
    steps = result["steps"]["reranker"]
    assert steps % 2 == 0
    assert result["steps"]["generator"] == steps // 2

    # The same command, never interrupted (the shared smoke run): the same epochs, losses and final
    # metrics. The resumed run skipped the batches of the epoch it had done and restored the noise
    # and dropout states.
    whole = smoke_run["result"]
    for key in ("loss", "l_direct", "l_z", "l_adv", "l_x", "val_ndcg@6"):
        assert whole["history"][key] == pytest.approx(result["history"][key], rel=1e-5, abs=1e-6), key
    assert whole["best_epoch"] == result["best_epoch"]
    assert whole["steps"] == result["steps"]
    for split in ("valid", "test"):
        for key, value in whole[split].items():
            assert result[split][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (split, key)


def test_config_errors_name_the_key(synthetic_data, tmp_path, capsys):
    data_dir, _ = synthetic_data
    base = ["--config", SMOKE, "--data_dir", str(data_dir), "--model_dir", str(tmp_path / "r")]
    assert main([*base, "--set", "dnr.lambda_x=1"]) == 2
    assert "dnr.lambda_x" in capsys.readouterr().err
    assert main([*base, "--set", "dnr.lambda_c=1.5"]) == 2
    assert "dnr.lambda_c" in capsys.readouterr().err
    assert main([*base, "--set", "train.epochs=two"]) == 2
    assert "train.epochs" in capsys.readouterr().err
    assert main([*base, "--set", "train.k=60"]) == 2
    assert "train.k" in capsys.readouterr().err
    assert main(["--config", SMOKE, "--data_dir", str(tmp_path / "nope"), "--model_dir", str(tmp_path / "r")]) == 2
    assert "pipeline.run" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r" / "metrics.json")


def test_configs_for_every_variant_load():
    names = [os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))]
    for name in names:
        cfg = config_io.from_dict(ExperimentConfig, config_io.load_yaml(os.path.join(ROOT, "configs", f"{name}.yaml")))
        assert cfg.name == name
    for required in (
        "ml100k_prm_none",
        "ml100k_prm_concat",
        "ml100k_prm_add",
        "ml100k_prm_weight",
        "ml100k_dnr_g",
        "ml100k_dnr_b",
        "ml100k_w_g",
        "ml100k_w_b",
        "ml100k_g_wo_adv",
        "ml100k_g_wo_x",
        "ml100k_b_wo_adv",
        "ml100k_b_wo_x",
        "ml100k_dnn_concat",
        *(
            f"ml100k_{bb}_{kind}"
            for bb in ("dlcm", "setrank", "mir", "sasrec", "gru4rec", "caser", "geneval")
            for kind in ("concat", "dnr_b")
        ),
        "smoke",
    ):
        assert required in names
    assert isinstance(ModelConfig(), ModelConfig) and isinstance(TrainConfig(), TrainConfig)
