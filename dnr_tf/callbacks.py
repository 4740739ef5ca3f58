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


def _backup_epochs(backup_dir: str) -> int:
    """Epochs the backup in `backup_dir` has completed (0 without one)."""
    path = os.path.join(backup_dir, "training_metadata.json")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return int(json.load(f).get("epoch", 0))


class EarlyStop(keras.callbacks.Callback):
    """Stops a run once `monitor` has not improved for `patience` epochs (`train.patience`).

    "Improved" is `BestWeights`' rule: strictly above every earlier epoch, so the best epoch here
    is the one `best.json` holds. `min_epochs`: never stop before this many epochs (a DNR run with
    a model-based phase passes lambda_e + patience, so that the phase after the switch gets
    `patience` epochs of its own). `train.epochs` stays the maximum.

    Survives a kill: the counter is not kept in memory alone. Each epoch's monitor value goes to
    `<backup_dir>/early_stop.json` *before* `BackupAndRestore` writes that epoch (put this callback
    before it), and a resumed run recomputes the best epoch from the values of the epochs its
    backup holds, so it stops where an uninterrupted run stops. A run killed after the backup of
    the epoch that decided the stop has nothing left to train: `epochs_to_run` tells `train` to
    call `fit` for no further epoch. With `patience` 0 it only counts the epochs run.
    """

    FILE = "early_stop.json"

    def __init__(self, backup_dir: str, monitor: str, patience: int, min_epochs: int = 0):
        super().__init__()
        self.path = os.path.join(backup_dir, self.FILE)
        self.monitor, self.patience, self.min_epochs = monitor, patience, min_epochs
        self.values: list[float] = []  # the monitor of epoch 1, 2, ...
        self.stopped_early = False
        self.epochs_run = 0

    @staticmethod
    def should_stop(values, patience: int, min_epochs: int = 0) -> bool:
        """True when, after the epochs of `values` (the monitor of epoch 1, 2, ...), the best epoch is
        `patience` or more epochs back and at least `min_epochs` epochs have run."""
        if patience <= 0 or not values or len(values) < min_epochs:
            return False
        best, best_epoch = -math.inf, 0
        for epoch, value in enumerate(values, start=1):
            if value > best:
                best, best_epoch = value, epoch
        return best_epoch > 0 and len(values) - best_epoch >= patience

    def _load(self) -> None:
        """The values of the epochs the backup holds (none for a fresh run)."""
        done = _backup_epochs(os.path.dirname(self.path))
        saved = {}
        if done and os.path.exists(self.path):
            with open(self.path) as f:
                saved = json.load(f)
        # An epoch without a value (a backup written with early stopping off) never counts as the best.
        self.values = [float(saved.get(str(e), -math.inf)) for e in range(1, done + 1)]
        self.epochs_run = done
        self.stopped_early = self.should_stop(self.values, self.patience, self.min_epochs)

    def epochs_to_run(self, max_epochs: int) -> int:
        """The `epochs` for `fit`: `max_epochs`, or the epochs already done when they decided a stop."""
        self._load()
        return self.epochs_run if self.stopped_early else max_epochs

    def on_train_begin(self, logs=None):
        self._load()

    def on_epoch_end(self, epoch, logs=None):
        self.epochs_run = epoch + 1
        if self.patience <= 0:
            return
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise KeyError(f"monitor {self.monitor!r} not in the epoch's logs: {sorted(logs or {})}")
        self.values = [*self.values[:epoch], float(value)]
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({str(e): v for e, v in enumerate(self.values, start=1)}, f)
        os.replace(tmp, self.path)
        if self.should_stop(self.values, self.patience, self.min_epochs):
            self.stopped_early = True
            self.model.stop_training = True


class GeneratorWarmup(keras.callbacks.Callback):
    """`dnr.generator_warmup_steps`: at the start of the first model-based epoch (`start_epoch`,
    lambda_e), `steps` updates of the generator alone toward the heuristic sampler's x' per label
    (`DNRModel.warmup_step`), before the reranker's first step with the generator.

    `batches`: (features, labels) batches of the train split, cycled (`train` passes the stream of
    the switch epoch). Draws come from this callback's own seed, never from the training noise.
    Resume: the count `warmup_done` is a model variable, saved with each epoch's backup. A run
    killed during the warm-up (or before the end of its epoch) resumes from the backup of the
    epoch before, which predates the warm-up: it redoes the whole warm-up, from the same generator
    weights, batches and seed, so the result is that of an uninterrupted run and the steps are
    counted once. A run resumed later finds the count complete and skips it.
    """

    def __init__(self, batches, steps: int, start_epoch: int, seed: int):
        super().__init__()
        self.batches, self.steps, self.start_epoch = batches, steps, start_epoch
        self.seed = keras.random.SeedGenerator(seed, name="warmup_seed")
        self.criterion: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        done_var = getattr(self.model, "warmup_done", None)
        if done_var is None or epoch < self.start_epoch:
            return
        done = int(done_var.numpy())
        if done >= self.steps:
            return
        iterator = iter(self.batches.repeat())
        for _ in range(self.steps - done):
            features, labels = next(iterator)
            self.criterion.append(float(self.model.warmup_step(features, labels, self.seed)))

    def summary(self) -> dict:
        """Steps done (the model's count) and the criterion's mean over the first and the last ten
        steps this process ran (None when it ran none)."""
        done_var = getattr(self.model, "warmup_done", None)
        head, tail = self.criterion[:10], self.criterion[-10:]
        return {
            "steps": int(done_var.numpy()) if done_var is not None else 0,
            "criterion_first": sum(head) / len(head) if head else None,
            "criterion_last": sum(tail) / len(tail) if tail else None,
        }
