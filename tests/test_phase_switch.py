"""The switch to the model-based sampler without a new trace (`DNRModel._phase_in_graph`).

With the generator updated alternately, the train and test steps hold both phases behind a
`tf.cond` on the phase, traced once (on several replicas too: `test_distribute.py`); the retraced
steps (one graph a phase, what the simultaneous update still uses) must train the same run bit for bit.
"""

from __future__ import annotations

import h5py
import keras
import numpy as np
import tensorflow as tf

from dnr_tf.model import DNRModel, SamplerSchedule
from tests.test_train import _cfg, _model_and_batch


def _traced(monkeypatch):
    """Counts the Python runs of `train_step` and `test_step`: once a trace inside `fit`."""
    counts = {"train_step": 0, "test_step": 0}
    for name in counts:
        original = getattr(DNRModel, name)

        def counted(self, data, _original=original, _name=name):
            counts[_name] += 1
            return _original(self, data)

        monkeypatch.setattr(DNRModel, name, counted)
    return counts


class _PerEpoch(keras.callbacks.Callback):
    """The generator optimizer's step count and the train function at every epoch's end."""

    def __init__(self):
        super().__init__()
        self.generator_steps, self.functions = [], []

    def on_epoch_end(self, epoch, logs=None):
        self.generator_steps.append(int(self.model.generator_optimizer.iterations.numpy()))
        self.functions.append(self.model.train_function)


def test_the_switch_keeps_the_trace_and_runs_each_phases_work(synthetic_data, monkeypatch):
    data_dir, _ = synthetic_data
    model, features, labels = _model_and_batch(data_dir, _cfg(lambda_e=1))
    assert model._phase_in_graph
    counts = _traced(monkeypatch)
    batches = tf.data.Dataset.from_tensors((features, labels)).repeat(3)
    generator_before = [v.numpy().copy() for v in model.generator.trainable_variables]
    seen = _PerEpoch()
    history = model.fit(batches, epochs=3, callbacks=[SamplerSchedule(1), seen], verbose=0)
    assert counts == {"train_step": 1, "test_step": 0}, "one trace for both phases"
    assert seen.functions[0] is seen.functions[1] is seen.functions[2]
    assert history.history["sampler_phase"] == [0.0, 1.0, 1.0]
    assert seen.generator_steps == [0, 3, 6], "the generator steps only in the model-based epochs"
    assert history.history["l_adv"][0] == 0.0 and history.history["l_adv"][1] < 0.0
    changed = [np.abs(b - v.numpy()).max() > 0 for b, v in zip(generator_before, model.generator.trainable_variables)]
    assert any(changed)

    # Evaluated in either phase by the one test trace, with the phase's own terms.
    model.set_sampler_phase(False)
    heuristic = model.evaluate(batches, verbose=0, return_dict=True)
    model.set_sampler_phase(True)
    model_based = model.evaluate(batches, verbose=0, return_dict=True)
    assert counts["test_step"] == 1
    assert heuristic["l_adv"] == 0.0 and model_based["l_adv"] < 0.0
    assert heuristic["l_z"] != model_based["l_z"], "L_z on the heuristic x', then on the generator's"
    assert heuristic["l_direct"] == model_based["l_direct"]


def _weights(path):
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_the_retraced_steps_train_the_same_run_bit_for_bit(smoke_run, tmp_path, monkeypatch):
    """configs/smoke.yaml (heuristic epoch, then model-based) with one graph a phase, as before the
    phase went into the graph, against the session's smoke run (conftest.py), which has it there:
    every epoch's losses and metrics, the final ones and the best weights are the same bits."""
    from dnr_tf.train import train

    monkeypatch.setattr(DNRModel, "_phase_in_graph", property(lambda self: False))
    counts = _traced(monkeypatch)
    cfg = _cfg()
    assert cfg.dnr.lambda_e == 1 and cfg.train.epochs == 2
    got = train(cfg, str(smoke_run["data_dir"]), str(tmp_path / "run"), verbose=0)
    assert counts["train_step"] == 2, "retraced at the switch"
    want = smoke_run["result"]
    assert got["history"] == want["history"]
    assert got["valid"] == want["valid"] and got["test"] == want["test"]
    assert got["steps"] == want["steps"] and got["best_epoch"] == want["best_epoch"]
    a, b = _weights(tmp_path / "run" / "best.weights.h5"), _weights(smoke_run["run"] / "best.weights.h5")
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_no_dataset_runs_tf_datas_autotuning_thread(synthetic_data):
    """Its thread could hold the training iterator's destruction at the end of `fit` for about 20 s
    (`dnr_tf.data._without_autotune_model`): every dataset training, validation, test and
    `dnr_tf.evaluate` read is built without it, and still yields its batches."""
    from dnr_tf import schema as S
    from dnr_tf.data import make_dataset
    from dnr_tf.train import datasets

    data_dir, _ = synthetic_data
    built = list(datasets(str(data_dir), _cfg(), S.load_schema(str(data_dir))))
    built.append(make_dataset(str(data_dir / "test-*.tfrecord.gz"), batch_size=8))
    built.append(make_dataset(str(data_dir / "train-*.tfrecord.gz"), batch_size=8, shuffle=True, seed=0, repeat=True))
    for ds in built:
        assert ds.options().autotune.enabled is False
        assert next(iter(ds)) is not None
