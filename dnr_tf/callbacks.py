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
            self.model.save_weights(self.weights_path, overwrite=True)
            with open(self.state_path, "w") as f:
                json.dump({"epoch": self.best_epoch, "value": value, "monitor": self.monitor}, f)

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

    def on_epoch_end(self, epoch, logs=None):
        labels = self.labels
        z = ops.cast(ops.equal(labels, 1), "float32")
        x = self.features[S.RETRIEVER_SCORES]
        x_fake = self.model.sample_x(self.features, z)
        pos, neg = ops.equal(labels, 1), ops.equal(labels, 0)
        with self.writer.as_default(step=epoch + 1):
            tf.summary.histogram("x/positive", tf.boolean_mask(x, pos))
            tf.summary.histogram("x/negative", tf.boolean_mask(x, neg))
            if self.model.cfg.dnr.enabled:
                tf.summary.histogram("x_prime/positive", tf.boolean_mask(x_fake, pos))
                tf.summary.histogram("x_prime/negative", tf.boolean_mask(x_fake, neg))
            tf.summary.scalar("sampler_phase", int(self.model.model_phase))
        self.writer.flush()
