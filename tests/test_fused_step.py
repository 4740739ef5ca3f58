"""The optimised train step computes what the reference step computes (issue 6), on a real ML-100K batch.

- `train.fused_step` (one reranker call on the real and generated lists stacked) against two calls:
  the same losses and gradients, in the heuristic and the model-based phase.
- `dnr.generator_update: simultaneous` (one tape, gradient reversal) against the gradients of
  L_theta and of L_adv + weight_x L_x' written out with two tapes at the same weights and x'.
Dropout is 0 so that both sides see the same network (dropout masks are drawn per call).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dnr_tf import config_io
from dnr_tf import schema as schema_lib
from dnr_tf.config import ExperimentConfig
from dnr_tf.model import masked_bce, targets, x_regulariser
from dnr_tf.runs import build_model, read_vocab
from dnr_tf.train import datasets

TOL = 1e-5


def _cfg(**overrides):
    data = config_io.load_yaml("configs/smoke.yaml")
    data = config_io.apply_overrides(data, ["model.dropout=0.0"] + [f"{k}={v}" for k, v in overrides.items()])
    return config_io.from_dict(ExperimentConfig, data)


@pytest.fixture(scope="module")
def batch(ml100k_data):
    data_dir = str(ml100k_data[0])
    schema = schema_lib.load_schema(data_dir)
    features, labels = next(iter(datasets(data_dir, _cfg(), schema)[0]))
    return data_dir, schema, read_vocab(data_dir), features, labels


def _model(batch, model_phase, **overrides):
    _, schema, vocab, features, _ = batch
    model = build_model(_cfg(**overrides), vocab, schema, features)
    model.set_sampler_phase(model_phase)
    return model


def _dense(grads):
    return [tf.convert_to_tensor(g).numpy() for g in grads]


def _assert_close(a, b, what):
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_allclose(x, y, rtol=TOL, atol=TOL, err_msg=f"{what} [{i}]")


@pytest.mark.parametrize("model_phase", [False, True], ids=["heuristic", "model_based"])
def test_fused_step_matches_two_reranker_calls(batch, model_phase):
    features, labels = batch[3], batch[4]
    fused = _model(batch, model_phase, **{"train.fused_step": "true"})
    reference = _model(batch, model_phase, **{"train.fused_step": "false"})
    _assert_close(_dense(fused.reranker.weights), _dense(reference.reranker.weights), "initial weights")

    losses_f, grads_f, gen_f = fused.compute_step(features, labels)
    losses_r, grads_r, gen_r = reference.compute_step(features, labels)
    assert gen_f is None and gen_r is None, "alternating: the generator's gradient is a separate step"
    for name in ("loss", "l_direct", "l_z"):
        np.testing.assert_allclose(float(losses_f[name]), float(losses_r[name]), rtol=TOL, atol=TOL, err_msg=name)
    assert float(losses_f["l_z"]) > 0 and float(losses_f["l_z"]) != pytest.approx(float(losses_f["l_direct"]))
    np.testing.assert_allclose(losses_f["logits"].numpy(), losses_r["logits"].numpy(), rtol=TOL, atol=TOL)
    _assert_close(_dense(grads_f), _dense(grads_r), "reranker gradients")
    assert any(np.abs(g).max() > 1e-4 for g in _dense(grads_f)), "the gradients are not all zero"


@pytest.mark.parametrize(
    "use_adv,use_x_reg,fused", [(True, True, False), (True, True, True), (False, True, False), (True, False, False)]
)
def test_simultaneous_update_gives_the_gradients_of_eq_6_to_8(batch, use_adv, use_x_reg, fused):
    features, labels = batch[3], batch[4]
    options = {"dnr.generator_update": "simultaneous", "dnr.use_adv": use_adv, "dnr.use_x_reg": use_x_reg}
    model = _model(batch, True, **options, **{"train.fused_step": str(fused).lower()})
    dnr = model.cfg.dnr
    state = model.noise_seed.state.numpy()
    losses, grads, gen_grads = model.compute_step(features, labels)
    assert gen_grads is not None

    # Written out: the same x' (same noise), two separate objectives.
    model.noise_seed.state.assign(state)
    mask, z = targets(labels)
    theta, phi = model.reranker.trainable_variables, model.generator.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        x_gen = model.generator(features, z, seed=model.noise_seed, training=True)
        logits = model.reranker(features, training=True)
        fake_logits = model.reranker({**features, "retriever_scores": x_gen}, training=True)
        l_direct, l_z = masked_bce(z, logits, mask), masked_bce(z, fake_logits, mask)
        l_theta = l_direct + dnr.lambda_m * l_z
        l_x = x_regulariser(features["retriever_scores"], x_gen, mask)
        l_phi = (-l_z if use_adv else 0.0) + (dnr.weight_x * l_x if use_x_reg else 0.0)
    ref_theta = tape.gradient(l_theta, theta)
    ref_phi = tape.gradient(l_phi, phi)

    for name, value in (("l_direct", l_direct), ("l_z", l_z), ("l_adv", -l_z), ("l_x", l_x)):
        np.testing.assert_allclose(float(losses[name]), float(value), rtol=TOL, atol=TOL, err_msg=name)
    _assert_close(_dense(grads), _dense(ref_theta), "reranker gradients")
    _assert_close(
        _dense(gen_grads),
        [np.zeros_like(v.numpy()) if g is None else g for v, g in zip(phi, _dense_or_none(ref_phi))],
        "generator gradients",
    )
    assert any(np.abs(g).max() > 1e-6 for g in _dense(gen_grads)), "the generator gets a gradient"


def _dense_or_none(grads):
    return [None if g is None else tf.convert_to_tensor(g).numpy() for g in grads]


def test_simultaneous_step_trains_both_models_once_a_batch(batch):
    features, labels = batch[3], batch[4]
    model = _model(batch, True, **{"dnr.generator_update": "simultaneous"})
    before = _dense(model.generator.weights)
    logs = model.train_step((features, labels))
    assert int(model.optimizer.iterations.numpy()) == 1
    assert int(model.generator_optimizer.iterations.numpy()) == 1
    assert all(np.isfinite(float(logs[k])) for k in ("loss", "l_adv", "l_x"))
    assert any(not np.allclose(a, b) for a, b in zip(before, _dense(model.generator.weights)))


def test_simultaneous_needs_lambda_m():
    with pytest.raises(config_io.ConfigError, match="dnr.generator_update"):
        _cfg(**{"dnr.generator_update": "simultaneous", "dnr.lambda_m": 0.0})
