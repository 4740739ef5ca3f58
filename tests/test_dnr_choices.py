"""Issue 14 items 4 and 6: early stopping, and DNR's own choices as options (logit eps, eq. 8, warm-up)."""

import json
import math
import os
import shutil

import keras
import numpy as np
import pytest

from dnr_tf import callbacks as cb
from dnr_tf import config_io
from dnr_tf import schema as S
from dnr_tf.config import DNRConfig, ExperimentConfig, TrainConfig
from dnr_tf.model import DNRModel, quantile_gap, targets, x_regulariser
from dnr_tf.noise import logit_mix
from dnr_tf.runs import build_model, read_vocab
from dnr_tf.train import datasets, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


def _cfg(train=None, **dnr):
    base = config_io.from_dict(ExperimentConfig, config_io.load_yaml(SMOKE))
    return ExperimentConfig(
        name="t",
        model=base.model,
        dnr=DNRConfig(**{**config_io.to_dict(base.dnr), **dnr}),
        train=TrainConfig(**{**config_io.to_dict(base.train), **(train or {})}),
    )


def _model_and_batch(data_dir, cfg):
    schema = S.load_schema(data_dir)
    train_ds, _, _ = datasets(str(data_dir), cfg, schema)
    features, labels = next(iter(train_ds))
    return build_model(cfg, read_vocab(str(data_dir)), schema, features), features, labels


# --- early stopping ------------------------------------------------------------------------------


class _Stub:
    stop_training = False


def _run_monitor(values, patience, min_epochs, backup_dir):
    """Feeds `values` as epoch logs to an EarlyStop; the epoch (1-based) that set stop_training."""
    early = cb.EarlyStop(str(backup_dir), "val_ndcg@6", patience, min_epochs)
    early.set_model(_Stub())
    early.on_train_begin()
    for epoch, value in enumerate(values):
        early.on_epoch_end(epoch, {"val_ndcg@6": value})
        if early.model.stop_training:
            return epoch + 1
    return None


@pytest.mark.parametrize(
    "values, patience, min_epochs, stop",
    [
        ([0.1, 0.2, 0.2, 0.15, 0.3], 2, 0, 4),  # best epoch 2; a tie (0.2) is no improvement
        ([0.1, 0.2, 0.3, 0.4, 0.5], 1, 0, None),  # always improving: runs to the maximum
        ([0.5, 0.4, 0.3, 0.2, 0.1], 1, 0, 2),
        ([0.5, 0.4, 0.3, 0.2, 0.1], 1, 3, 3),  # a DNR run switching at lambda_e = 2, patience 1
        ([0.5, 0.4, 0.3, 0.2, 0.1], 0, 0, None),  # patience 0: off
        ([0.1, math.nan, 0.1, 0.1], 2, 0, 3),  # NaN never improves
    ],
)
def test_early_stop_rule_on_constructed_monitor_sequences(values, patience, min_epochs, stop, tmp_path):
    assert _run_monitor(values, patience, min_epochs, tmp_path / "backup") == stop


def test_early_stop_counter_comes_back_from_the_backup(tmp_path):
    backup = tmp_path / "backup"
    # Killed after epoch 3's backup (values 0.1, 0.3, 0.2): one more bad epoch stops it (patience 2).
    backup.mkdir()
    history = {"val_ndcg@6": [0.1, 0.3, 0.2]}
    (backup / "state.json").write_text(json.dumps({"epoch": 3, "history": history}))  # RunBackup's commit
    resumed = cb.EarlyStop(str(backup), "val_ndcg@6", 2, 0)
    resumed.set_model(_Stub())
    assert resumed.epochs_to_run(10) == 10
    resumed.on_train_begin()
    assert resumed.epochs_run == 3
    resumed.on_epoch_end(3, {"val_ndcg@6": 0.25})
    assert resumed.model.stop_training and resumed.stopped_early and resumed.epochs_run == 4
    # Killed after the backup of the epoch that decided the stop: no epoch left to run.
    history["val_ndcg@6"].append(0.25)
    (backup / "state.json").write_text(json.dumps({"epoch": 4, "history": history}))
    again = cb.EarlyStop(str(backup), "val_ndcg@6", 2, 0)
    assert again.epochs_to_run(10) == 4 and again.stopped_early


def test_short_run_stops_early_and_a_run_killed_mid_warmup_resumes_to_the_same_end(
    synthetic_data, tmp_path, monkeypatch
):
    data_dir, _ = synthetic_data
    # A learning rate too small to change any reranker weight: the monitor is flat from epoch 1, and
    # with patience 2 a direct run would stop after epoch 3; DNR switching at lambda_e = 2 gives the
    # model-based phase its 2 epochs first, so it stops after epoch 4 of at most 6. The generator
    # (its own learning rate) warms up for 3 steps at the start of epoch 3, then trains.
    # The generator also uses the new options (logit eps, eq. 8's regulariser): this run is their
    # real training too (finite losses, both optimizers stepping, the warm-up's criterion).
    cfg = _cfg(
        train={"epochs": 6, "patience": 2, "learning_rate": 1e-12, "steps_per_epoch": 2},
        lambda_e=2,
        generator_warmup_steps=3,
        generator_eps="logit",
        x_reg="eq8",
    )
    # A kill -9 leaves on disk what had been written when it came: the run's directory, copied during
    # the warm-up's second step (after epoch 2's commit), is what a kill there leaves.
    original = DNRModel.warmup_step
    calls = []

    def copied_at_second_step(self, *args):
        calls.append(1)
        if len(calls) == 2:
            shutil.copytree(tmp_path / "whole", tmp_path / "run")
        return original(self, *args)

    monkeypatch.setattr(DNRModel, "warmup_step", copied_at_second_step)
    whole = train(cfg, str(data_dir), str(tmp_path / "whole"), verbose=0)
    monkeypatch.setattr(DNRModel, "warmup_step", original)
    assert len(calls) == 3 and json.load(open(tmp_path / "run" / "backup" / "state.json"))["epoch"] == 2
    assert whole["stopped_early"] is True
    assert (whole["epochs_run"], whole["best_epoch"], whole["max_epochs"]) == (4, 1, 6)
    assert whole["history"]["sampler_phase"] == [0.0, 0.0, 1.0, 1.0]
    assert whole["steps"] == {"reranker": 8, "generator": 4, "generator_warmup": 3}
    assert json.load(open(tmp_path / "whole" / "metrics.json"))["epochs_run"] == 4
    hist = whole["history"]
    for key in ("loss", "l_direct", "l_z", "l_adv", "l_x", "val_loss"):
        assert all(np.isfinite(hist[key])), key
    assert hist["l_x"][:2] == [0.0, 0.0] and 0.0 not in hist["l_x"][2:], "eq. 8's term in the model-based epochs"
    warm = whole["generator_warmup"]
    assert warm["steps"] == 3 and np.isfinite(warm["criterion_first"]) and np.isfinite(warm["criterion_last"])

    # That copy resumed with the same config: the warm-up redone, then epochs 3 and 4.
    resumed = train(cfg, str(data_dir), str(tmp_path / "run"), verbose=0)
    # The history keeps every epoch (RunBackup), the two before the resume included.
    assert len(resumed["history"]["loss"]) == 4 and resumed["epochs_run"] == 4
    assert resumed["resumed_after"] == [2]
    for key in ("stopped_early", "epochs_run", "best_epoch"):
        assert resumed[key] == whole[key], key
    assert resumed["steps"]["generator_warmup"] == 3, "the warm-up redone whole, counted once"
    assert resumed["generator_warmup"] == pytest.approx(whole["generator_warmup"], rel=1e-5)
    # The generator after the warm-up is the uninterrupted run's: its losses in epochs 3-4 agree.
    for key in ("l_adv", "l_x", "val_ndcg@6"):
        assert resumed["history"][key] == pytest.approx(whole["history"][key], rel=1e-5, abs=1e-6), key
    for split in ("valid", "test"):
        for key, value in whole[split].items():
            assert resumed[split][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (split, key)


# --- DNR's choices -------------------------------------------------------------------------------


@pytest.mark.parametrize("x_reg", ["log_ratio", "eq8"])
def test_simultaneous_update_with_logit_eps_steps_both_models(synthetic_data, x_reg):
    data_dir, _ = synthetic_data
    cfg = _cfg(lambda_e=0, generator_eps="logit", x_reg=x_reg, generator_update="simultaneous")
    model, features, labels = _model_and_batch(data_dir, cfg)
    model.set_sampler_phase(True)
    rer = [v.numpy().copy() for v in model.reranker.trainable_variables]
    gen = [v.numpy().copy() for v in model.generator.trainable_variables]
    logs = model.train_step((features, labels))  # one step, eagerly: no tf.function to trace
    assert all(np.isfinite(float(logs[k])) for k in ("loss", "l_adv", "l_x"))
    assert any(np.abs(b - v.numpy()).max() > 0 for b, v in zip(rer, model.reranker.trainable_variables))
    assert any(np.abs(b - v.numpy()).max() > 0 for b, v in zip(gen, model.generator.trainable_variables))


def test_logit_eps_covers_all_of_0_1_for_both_labels():
    lambda_c = 0.5
    targets_x = np.array([[0.01, 0.2, 0.5, 0.8, 0.99]], "float32")
    for label in (0.0, 1.0):
        z = np.full_like(targets_x, label)
        m = (1 - lambda_c) * z + lambda_c / 2
        a = (np.log(targets_x / (1 - targets_x)) - np.log(m / (1 - m))) / lambda_c
        np.testing.assert_allclose(np.asarray(logit_mix(z, a, lambda_c)), targets_x, rtol=1e-5)


def test_logit_eps_draws_overlap_where_sigmoid_eps_cannot(synthetic_data):
    data_dir, _ = synthetic_data
    draws = {}
    for eps in ("sigmoid", "logit"):
        cfg = _cfg(lambda_e=0, lambda_c=0.5, generator_eps=eps)
        model, features, labels = _model_and_batch(data_dir, cfg)
        # A generator with a wide output (as an adversary may learn), the same for both.
        kernel = model.generator.out.kernel
        kernel.assign(kernel.numpy() * 50.0)
        valid = labels.numpy() >= 0
        out = {}
        for label in (0.0, 1.0):
            z = np.full(labels.shape, label, "float32")
            out[label] = np.asarray(model.generator(features, z, seed=keras.random.SeedGenerator(3)))[valid]
        draws[eps] = out
    logit, sigmoid = draws["logit"], draws["sigmoid"]
    assert logit[0.0].max() > logit[1.0].min(), "a negative's x' above a positive's"
    assert ((logit[0.0] > 0.5).mean() > 0.05) and ((logit[1.0] < 0.5).mean() > 0.05)
    assert sigmoid[0.0].max() <= 0.5 <= sigmoid[1.0].min(), "sigmoid eps separates the labels at 0.5"


def test_eq8_matches_a_hand_computed_value():
    x = np.array([[0.5, 0.8, 0.1, 0.7]], "float32")
    x_fake = np.array([[0.25, 0.4, 0.0, 0.3]], "float32")
    mask = np.array([[True, True, True, False]])
    # -mean log(x / x') over the three unpadded candidates, x' = 0 clipped to 1e-6
    expected = (math.log(0.25 / 0.5) + math.log(0.4 / 0.8) + math.log(1e-6 / 0.1)) / 3
    assert float(x_regulariser(x, x_fake, mask, "eq8")) == pytest.approx(expected, rel=1e-5)
    squared = (math.log(2) ** 2 + math.log(2) ** 2 + math.log(1e-6 / 0.1) ** 2) / 3
    assert float(x_regulariser(x, x_fake, mask, "log_ratio")) == pytest.approx(squared, rel=1e-5)


def test_quantile_gap_is_the_per_label_sorted_squared_gap():
    z = np.array([[1.0, 0.0, 0.0, 1.0, 0.0]], "float32")
    mask = np.array([[True, True, True, True, False]])
    a = np.array([[0.9, 0.1, 0.3, 0.6, 0.5]], "float32")
    b = np.array([[0.7, 0.4, 0.2, 0.95, 0.0]], "float32")
    # positives: sorted a (0.6, 0.9) vs sorted b (0.7, 0.95); negatives: (0.1, 0.3) vs (0.2, 0.4)
    expected = ((0.1**2 + 0.05**2) / 2) + ((0.1**2 + 0.1**2) / 2)
    assert float(quantile_gap(a, b, mask, z)) == pytest.approx(expected, rel=1e-5)


def test_warmup_moves_the_generator_to_the_heuristic_and_leaves_the_reranker(synthetic_data):
    data_dir, _ = synthetic_data
    cfg = _cfg(lambda_e=1, generator_warmup_steps=40, generator_learning_rate=0.01)
    model, features, labels = _model_and_batch(data_dir, cfg)
    mask, z = targets(labels)

    def gap():  # the criterion on fixed draws
        seed = keras.random.SeedGenerator(11)
        x_gen = model.generator(features, z, seed=seed)
        return float(quantile_gap(x_gen, model.heuristic(z, seed), mask, z))

    reranker = [v.numpy().copy() for v in model.reranker.variables]
    before = gap()
    warm_seed = keras.random.SeedGenerator(5)
    for _ in range(40):
        model.warmup_step(features, labels, warm_seed)
    after = gap()
    assert after < 0.5 * before, (before, after)
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(reranker, model.reranker.variables))
    assert int(model.optimizer.iterations.numpy()) == 0
    assert int(model.generator_optimizer.iterations.numpy()) == 0, "the adversarial optimizer starts fresh"
    assert int(model.warmup_done.numpy()) == 40


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.patience=-1", "train.patience"),
        ("dnr.generator_warmup_steps=-2", "dnr.generator_warmup_steps"),
        ("dnr.x_reg=eq9", "dnr.x_reg"),
        ("dnr.generator_eps=tanh", "dnr.generator_eps"),
        ("train.patience=1.5", "train.patience"),
    ],
)
def test_new_options_are_validated_naming_the_key(override, key):
    with pytest.raises(config_io.ConfigError, match=key.replace(".", r"\.")):
        config_io.from_dict(ExperimentConfig, config_io.apply_overrides(config_io.load_yaml(SMOKE), [override]))
