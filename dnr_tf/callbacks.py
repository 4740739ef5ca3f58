"""Training callbacks: best-epoch weights that survive a resume, epoch timing, score histograms."""

from __future__ import annotations

import json
import math
import os
import time

import keras
import tensorflow as tf
from keras import ops

from dnr_tf import schema as S


class BestWeights(keras.callbacks.Callback):
    """Saves the weights of the epoch with the highest `monitor` (model selection on validation).

    Unlike `ModelCheckpoint(save_best_only=True)`, the best value and epoch are kept in
    `best.json`, so a run resumed by `BackupAndRestore` does not overwrite a better earlier epoch.
    """

    def __init__(self, model_dir: str, monitor: str):
        super().__init__()
        self.monitor = monitor
        self.weights_path = os.path.join(model_dir, "best.weights.h5")
        self.state_path = os.path.join(model_dir, "best.json")
        self.best_value, self.best_epoch = -math.inf, None
        if os.path.exists(self.state_path) and os.path.exists(self.weights_path):
            with open(self.state_path) as f:
                state = json.load(f)
            self.best_value, self.best_epoch = state["value"], state["epoch"]

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise KeyError(f"monitor {self.monitor!r} not in the epoch's logs: {sorted(logs or {})}")
        value = float(value)
        if value > self.best_value:
            self.best_value, self.best_epoch = value, epoch + 1
            # Written aside, then renamed: a run killed while writing keeps the previous best.
            tmp_weights = self.weights_path.replace(".weights.h5", ".tmp.weights.h5")
            self.model.save_weights(tmp_weights, overwrite=True)
            os.replace(tmp_weights, self.weights_path)
            with open(self.state_path + ".tmp", "w") as f:
                json.dump({"epoch": self.best_epoch, "value": value, "monitor": self.monitor}, f)
            os.replace(self.state_path + ".tmp", self.state_path)

    def restore(self, model) -> None:
        if self.best_epoch is not None:
            model.load_weights(self.weights_path)


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


class RngStateBackup(keras.callbacks.Callback):
    """Saves the states of every random generator of the model (noise, dropout) with each epoch's
    backup and restores them on resume, so that a resumed run draws what an uninterrupted one draws.

    Keras' `BackupAndRestore` saves weights and optimizer state, not `SeedGenerator` states. Put this
    callback *before* it: the states of epoch e are written before its weights and metadata, and the
    file keeps the last two epochs, so a run killed between the two writes (or one that
    `BackupAndRestore` rolls back to its previous copy) still finds the states of the epoch it
    resumes from. No callback may draw from the model's generators at the end of an epoch.
    """

    FILE = "rng_state.json"

    def __init__(self, backup_dir: str):
        super().__init__()
        self.path = os.path.join(backup_dir, self.FILE)

    def _generators(self):
        return {v.path: v for v in self.model.variables if v.path.endswith("seed_generator_state")}

    def _saved(self) -> dict:
        if not os.path.exists(self.path):
            return {}
        with open(self.path) as f:
            return json.load(f)

    def on_train_begin(self, logs=None):
        meta = os.path.join(os.path.dirname(self.path), "training_metadata.json")
        if not os.path.exists(meta):
            return
        with open(meta) as f:
            epoch = str(json.load(f).get("epoch"))
        saved = self._saved()
        if epoch not in saved:
            print(f"warning: no random states saved for epoch {epoch}; the resumed run draws anew", flush=True)
            return
        generators = self._generators()
        for path, state in saved[epoch].items():
            if path in generators:
                generators[path].assign(state)

    def on_epoch_end(self, epoch, logs=None):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        saved = self._saved()
        saved[str(epoch + 1)] = {path: v.numpy().tolist() for path, v in self._generators().items()}
        saved = {k: saved[k] for k in sorted(saved, key=int)[-2:]}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(saved, f)
        os.replace(tmp, self.path)
