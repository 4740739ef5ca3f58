"""Training callbacks: the run's backup (best epoch, random states), epoch timing, score histograms."""

from __future__ import annotations

import json
import math
import os
import time

import keras
import tensorflow as tf
from keras import ops

from dnr_tf import safe_io
from dnr_tf import schema as S


class BestWeights:
    """The epoch with the highest `monitor` (model selection on validation) and its weights.

    Its state (best epoch and value) lives in the run's backup (`RunBackup`), committed with the
    epoch's weights, so a run killed at any point resumes with the best epoch an uninterrupted run
    would pick. `best.weights.h5` and `best.json` in the run directory are published copies of the
    backup's best, written aside and renamed into place.
    """

    def __init__(self, model_dir: str, monitor: str):
        self.monitor = monitor
        self.weights_path = os.path.join(model_dir, "best.weights.h5")
        self.state_path = os.path.join(model_dir, "best.json")
        self.best_value, self.best_epoch = -math.inf, None

    def update(self, epoch: int, logs: dict) -> bool:
        """Takes epoch `epoch` (0-based) as the best if its `monitor` is higher; says whether it did."""
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise KeyError(f"monitor {self.monitor!r} not in the epoch's logs: {sorted(logs or {})}")
        value = float(value)
        if value > self.best_value:
            self.best_value, self.best_epoch = value, epoch + 1
            return True
        return False

    def publish(self, weights: str) -> None:
        """Makes `best.weights.h5` / `best.json` the copy of `weights` (the best epoch's), unless they are."""
        if os.path.exists(self.state_path) and os.path.exists(self.weights_path):
            with open(self.state_path) as f:
                published = json.load(f)
            if (published.get("epoch"), published.get("value")) == (self.best_epoch, self.best_value):
                return
        safe_io.copy_file(weights, self.weights_path)
        state = {"epoch": self.best_epoch, "value": self.best_value, "monitor": self.monitor}
        safe_io.write_json(self.state_path, state)

    def restore(self, model) -> None:
        if self.best_epoch is not None:
            model.load_weights(self.weights_path)


class RunBackup(keras.callbacks.Callback):
    """The run's backup, committed once an epoch: what a killed run resumes from with the same command.

    At the end of epoch e: the weights (model and both optimizers) go to `backup/epoch-<e>.weights.h5`;
    then `backup/state.json`, the commit, names that file and holds the best epoch (and its weights
    file, kept while it is the best), the states of every random generator of the model (noise,
    dropout: Keras does not save `SeedGenerator` states), the history and the epoch seconds; then
    files no longer named are removed and the best is published (`BestWeights.publish`). Every file
    is written aside and renamed into place, so a kill at any point leaves the previous commit, whose
    files are all still there: the resumed run redoes at most the epoch it was in and ends as an
    uninterrupted run would. Put it first among the callbacks, so that it restores the model before
    any other callback reads it at the start of training. The backup stays after `fit`: `train`
    removes it once `metrics.json` is written.
    """

    FILE = "state.json"

    def __init__(self, backup_dir: str, best: BestWeights):
        super().__init__()
        self.backup_dir = backup_dir
        self.best = best
        self.history: dict[str, list[float]] = {}
        self.seconds: list[float] = []
        self.epoch = 0
        self._best_weights = None

    @staticmethod
    def completed_epochs(backup_dir: str) -> int:
        """Epochs committed in a run's backup (0 when it has none)."""
        path = os.path.join(backup_dir, RunBackup.FILE)
        if not os.path.exists(path):
            return 0
        with open(path) as f:
            return int(json.load(f)["epoch"])

    def _generators(self):
        return {v.path: v for v in self.model.variables if v.path.endswith("seed_generator_state")}

    def on_train_begin(self, logs=None):
        path = os.path.join(self.backup_dir, self.FILE)
        if not os.path.exists(path):
            return
        with open(path) as f:
            state = json.load(f)
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(os.path.join(self.backup_dir, state["weights"]))
        generators = self._generators()
        for name, value in state["rng"].items():
            if name in generators:
                generators[name].assign(value)
        self.epoch, self.history, self.seconds = state["epoch"], state["history"], state["seconds"]
        best = state["best"]
        self.best.best_epoch, self.best.best_value = best["epoch"], best["value"]
        self._best_weights = best["weights"]
        if best["epoch"] is not None:
            self.best.publish(os.path.join(self.backup_dir, best["weights"]))
        self.model._initial_epoch = self.epoch  # what keras.callbacks.BackupAndRestore sets, too

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.time() - self._start
        os.makedirs(self.backup_dir, exist_ok=True)
        weights = f"epoch-{epoch + 1}.weights.h5"
        safe_io.save_weights(self.model, os.path.join(self.backup_dir, weights))
        if self.best.update(epoch, logs):
            self._best_weights = weights
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        self.seconds.append(seconds)
        self.epoch = epoch + 1
        state = {
            "epoch": self.epoch,
            "weights": weights,
            "best": {
                "epoch": self.best.best_epoch,
                "value": self.best.best_value,
                "monitor": self.best.monitor,
                "weights": self._best_weights,
            },
            "rng": {name: v.numpy().tolist() for name, v in self._generators().items()},
            "history": self.history,
            "seconds": self.seconds,
        }
        safe_io.write_json(os.path.join(self.backup_dir, self.FILE), state)
        keep = {self.FILE, weights, self._best_weights}
        for name in os.listdir(self.backup_dir):
            if name not in keep:
                path = os.path.join(self.backup_dir, name)
                if os.path.isfile(path):
                    os.remove(path)
        if self.best.best_epoch is not None:
            self.best.publish(os.path.join(self.backup_dir, self._best_weights))


class EpochTimer(keras.callbacks.Callback):
    """Wall seconds of every epoch (training and validation)."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.time() - self._start)


class ScoreHistograms(keras.callbacks.Callback):
    """TensorBoard histograms of real x and generated x' by label, every epoch (the paper's fig. 5).

    Uses one fixed training batch and the sampler active in that epoch.
    """

    def __init__(self, log_dir: str, features, labels):
        super().__init__()
        self.writer = tf.summary.create_file_writer(log_dir)
        self.features, self.labels = features, labels
        self.seed = keras.random.SeedGenerator(7, name="histogram_seed")  # not the training's noise

    def on_epoch_end(self, epoch, logs=None):
        labels = self.labels
        z = ops.cast(ops.equal(labels, 1), "float32")
        x = self.features[S.RETRIEVER_SCORES]
        x_fake = self.model.sample_x(self.features, z, seed=self.seed)
        pos, neg = ops.equal(labels, 1), ops.equal(labels, 0)
        with self.writer.as_default(step=epoch + 1):
            tf.summary.histogram("x/positive", tf.boolean_mask(x, pos))
            tf.summary.histogram("x/negative", tf.boolean_mask(x, neg))
            if self.model.cfg.dnr.enabled:
                tf.summary.histogram("x_prime/positive", tf.boolean_mask(x_fake, pos))
                tf.summary.histogram("x_prime/negative", tf.boolean_mask(x_fake, neg))
            tf.summary.scalar("sampler_phase", int(self.model.model_phase))
        self.writer.flush()


class NonFiniteLoss(RuntimeError):
    """A training step whose loss or gradients were not finite, under `train.on_nonfinite: stop`."""


class NonFiniteGuard(keras.callbacks.Callback):
    """Acts, at the end of each epoch, on the steps `DNRModel.train_step` refused to apply because a
    term was not finite (checked once an epoch: a per-batch check would sync every step).

    `stop`: raises `NonFiniteLoss` naming the term(s), the epoch and how many steps were skipped.
    `skip`: lets the run go on and prints how many and why.
    Either way no non-finite update reached the weights.
    """

    def __init__(self, policy: str):
        super().__init__()
        if policy not in ("stop", "skip"):
            raise ValueError(f"unknown train.on_nonfinite {policy!r}")
        self.policy = policy
        self._seen = None

    def _counts(self):
        return [int(v) for v in self.model.nonfinite_counts.numpy()]

    def on_train_begin(self, logs=None):
        self._seen = self._counts()

    def on_epoch_end(self, epoch, logs=None):
        from dnr_tf.model import NONFINITE_TERMS

        counts = self._counts()
        new = {name: now - before for name, now, before in zip(NONFINITE_TERMS, counts, self._seen) if now > before}
        self._seen = counts
        if not new:
            return
        detail = ", ".join(f"{name} {n}" for name, n in new.items())
        if self.policy == "skip":
            print(f"warning: epoch {epoch + 1}: steps skipped for non-finite values ({detail})", flush=True)
            return
        self.model.stop_training = True
        raise NonFiniteLoss(
            f"{' and '.join(new)} not finite in epoch {epoch + 1} (steps not applied: {detail}); the run stops "
            "(train.on_nonfinite=stop). No non-finite update reached the weights, and the best weights are "
            "intact. Lower train.learning_rate, check the data, or set train.on_nonfinite=skip to skip such "
            "steps and count them."
        )
