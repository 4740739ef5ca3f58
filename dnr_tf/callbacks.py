"""Training callbacks: the run's backup (best epoch, random states), epoch timing, score histograms."""

from __future__ import annotations

import json
import math
import os
import time

import keras
import tensorflow as tf
from keras import ops

from dnr_tf import config_io, safe_io
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
        self.resumed_after: list[int] = []  # the committed epoch each resume of this run started from
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

    def _generators(self) -> list:
        """The states of the model's random generators, in the model's variable order (the same for
        the same config). Their paths hold Keras' name counters, which count per process: a second
        model built in a process has `seed_generator_5` where the first had `seed_generator`. So a
        resume matches them by position: by path, a run resumed in a process that had built another
        model (a test, a notebook, the study's runner) silently kept fresh dropout states."""
        return [v for v in self.model.variables if v.path.endswith("seed_generator_state")]

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
        saved = list(state["rng"].values())  # written in the model's variable order (`on_epoch_end`)
        if len(saved) != len(generators):
            raise config_io.ConfigError(
                f"{path}: the backup holds {len(saved)} random generator states, this model has "
                f"{len(generators)}: it is not this run's backup"
            )
        for variable, value in zip(generators, saved):
            variable.assign(value)
        self.epoch, self.history, self.seconds = state["epoch"], state["history"], state["seconds"]
        self.resumed_after = [*state.get("resumed_after", []), self.epoch]  # a backup from before 2026-12-07: none
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
            "rng": {v.path: v.numpy().tolist() for v in self._generators()},  # by path: readable; restored by position
            "history": self.history,
            "seconds": self.seconds,
            "resumed_after": self.resumed_after,
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


class EarlyStop(keras.callbacks.Callback):
    """Stops a run once `monitor` has not improved for `patience` epochs (`train.patience`).

    "Improved" is `BestWeights`' rule: strictly above every earlier epoch, so the best epoch here
    is the one `best.json` holds. `min_epochs`: never stop before this many epochs (a DNR run with
    a model-based phase passes lambda_e + patience, so that the phase after the switch gets
    `patience` epochs of its own). `train.epochs` stays the maximum.

    Survives a kill: the counter is not kept in memory alone. The monitor of every committed epoch
    is in the backup's history (`RunBackup`, `backup/state.json`), and a resumed run recomputes the
    best epoch from it, so it stops where an uninterrupted run stops. A run killed after the commit
    of the epoch that decided the stop has nothing left to train: `epochs_to_run` tells `train` to
    call `fit` for no further epoch. With `patience` 0 it only counts the epochs run. Put it after
    `RunBackup`, which restores the history at the start of training.
    """

    def __init__(self, backup_dir: str, monitor: str, patience: int, min_epochs: int = 0):
        super().__init__()
        self.backup_dir = backup_dir
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
        path = os.path.join(self.backup_dir, RunBackup.FILE)
        history = {}
        if os.path.exists(path):
            with open(path) as f:
                history = json.load(f)["history"]
        self.values = [float(v) for v in history.get(self.monitor, [])]
        self.epochs_run = RunBackup.completed_epochs(self.backup_dir)
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
