"""What `python -m dnr_tf.train` prints while it trains: a short line per epoch, and progress inside one.

The full metrics (28 of them) stay in TensorBoard (`logs/`) and `metrics.json`; the console gets
the loss terms, the monitored validation metric, the epoch's time and an ETA. Inside an epoch, a bar
redrawn in place when the stream is a terminal, else a plain line every `every_seconds`.
"""

from __future__ import annotations

import sys
import time

import keras

LOSS_TERMS = ("loss", "l_direct", "l_z", "l_adv", "l_x")


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def steady_seconds(seconds: list[float], first_calls: float = 0.0) -> list[float]:
    """Epoch times without the first one (graph tracing and start-up), when there are others.

    With the first epoch alone, `first_calls` (the seconds its first train step and first validation
    batch took: the steps' tracing) are taken out of it, where that leaves a positive time."""
    if len(seconds) > 1:
        return list(seconds[1:])
    if seconds and 0.0 < first_calls < seconds[0]:
        return [seconds[0] - first_calls]
    return list(seconds)


def phase_warning(cfg) -> str | None:
    """One line when a DNR config's model-based phase cannot start within its epochs; else None."""
    dnr = cfg.dnr
    if dnr.enabled and dnr.model_based and dnr.trains_generator and dnr.lambda_e >= cfg.train.epochs:
        return (
            f"warning: dnr.lambda_e={dnr.lambda_e} >= train.epochs={cfg.train.epochs}: the model-based sampler "
            "never starts; every epoch uses the heuristic sampler (raise train.epochs or lower dnr.lambda_e)"
        )
    return None


class EpochLine(keras.callbacks.Callback):
    """Prints `epoch e/E  loss ... (l_direct ... l_z ...)  val ndcg@6 ...  2.1s  ETA 12s` after each epoch.

    Args:
        epochs: the run's epochs (a resumed run starts at a later one).
        monitor: the validation metric shown (`val_ndcg@6`).
        steps_per_epoch: steps in an epoch, for the progress inside it (None: unknown).
        stream: where to print (stdout).
        every_seconds: without a terminal, a progress line at most this often inside an epoch.
    """

    def __init__(self, epochs: int, monitor: str, steps_per_epoch=None, stream=None, every_seconds: float = 10.0):
        super().__init__()
        self.epochs = epochs
        self.monitor = monitor
        self.steps = steps_per_epoch
        self.stream = stream or sys.stdout
        self.every = every_seconds
        self.seconds: list[float] = []
        self.first_calls = 0.0  # the first epoch's first train step and validation batch (tracing)
        self.test_start = None  # the first epoch's validation, until its first batch ends
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def _print(self, text: str, end: str = "\n") -> None:
        self.stream.write(text + end)
        self.stream.flush()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.start = self.last = time.time()

    def on_train_batch_end(self, batch, logs=None):
        now = time.time()
        done = batch + 1
        if batch == 0 and not self.seconds:
            self.first_calls += now - self.start
        if self.tty:
            if now - self.last < 0.2:
                return
            self.last = now
            total = self.steps or 0
            bar = f"[{'#' * int(20 * done / total):20s}] " if total else ""
            of = f"/{total}" if total else ""
            self._print(f"\repoch {self.epoch + 1}/{self.epochs} {bar}{done}{of} steps {now - self.start:.0f}s", end="")
        elif now - self.last >= self.every and (not self.steps or done < self.steps):
            self.last = now
            of = f"/{self.steps}" if self.steps else ""
            self._print(f"  epoch {self.epoch + 1}/{self.epochs}: step {done}{of}, {now - self.start:.0f}s")

    def on_test_begin(self, logs=None):
        self.test_start = time.time() if not self.seconds else None

    def on_test_batch_end(self, batch, logs=None):
        if batch == 0 and self.test_start is not None:
            self.first_calls += time.time() - self.test_start
            self.test_start = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        seconds = time.time() - self.start
        self.seconds.append(seconds)
        terms = [t for t in LOSS_TERMS[1:] if t in logs]
        text = f"epoch {epoch + 1}/{self.epochs}"
        if "loss" in logs:
            text += f"  loss {logs['loss']:.4f}"
        if terms:
            text += " (" + " ".join(f"{t} {logs[t]:.4f}" for t in terms) + ")"
        if self.monitor in logs:
            text += f"  {self.monitor.replace('val_', 'val ')} {logs[self.monitor]:.4f}"
        text += f"  {seconds:.1f}s"
        left = self.epochs - epoch - 1
        if left > 0:
            text += f"  ETA {left * median(steady_seconds(self.seconds, self.first_calls)):.0f}s"
        self._print(("\r" + " " * 60 + "\r" if self.tty else "") + text)
