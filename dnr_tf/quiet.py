"""Quiet logs for the entry points: only the project's own output unless `--verbose`.

Called first thing in the `main` of each entry point (`python -m pipeline.run`, `dnr_tf.train`,
`dnr_tf.export`, `dnr_tf.evaluate`, `dnr_tf.experiments`), before TensorFlow is imported: TensorFlow
reads `TF_CPP_MIN_LOG_LEVEL` once, when it loads. Nothing below the entry points calls it.

Quiet means: TensorFlow's C++ log (the absl/oneDNN start-up lines, error-level `E0000` lines) off,
Python warnings of third-party modules off (Keras' `shuffle=True was passed`, NumPy's `__array__`
deprecations), and log records of Beam, absl and TensorFlow below ERROR off, including Beam's root-
logger `apitools not found`. The project's own warnings and log records stay. An explicitly set
`TF_CPP_MIN_LOG_LEVEL` wins.

On some CPUs (seen on an AMD EPYC of family 26, 2026-12-06) TensorFlow 2.21 writes its oneDNN
start-up line through absl before absl's logging is initialised, and that path ignores
`TF_CPP_MIN_LOG_LEVEL`. So a quiet command imports TensorFlow at once, with the process's stderr
(file descriptor 2) sent to /dev/null for the import only (`import_tensorflow_silently`). A failed
import still raises its Python error after stderr is back; a crash inside the import itself shows
only with `--verbose`.

Beam's SDK worker processes (`--direct_running_mode multi_processing`) are started by Beam with the
pipeline's stderr and none of this set up: before the pipeline's log level reaches them they write
Python log records in the default format (`WARNING:root:apitools not found ...`, `INFO:__main__:
Logging handler created.`) and TensorFlow's absl start-up lines. `worker_stderr_filtered` runs the
pipeline with file descriptor 2 on a pipe that drops those lines (`WORKER_NOISE`: below ERROR only)
and passes every other line on; the workers' errors also reach the pipeline through Beam itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings

# Log records from these packages are shown from ERROR up only, unless --verbose.
NOISY = ("apache_beam", "absl", "tensorflow", "keras", "h5py", "urllib3", "google")
OWN = ("dnr_tf", "pipeline", "bench", "__main__")
# Beam's SDK workers (--direct_running_mode multi_processing) log at INFO in processes of their own.
BEAM_WORKER_LOG_LEVEL = "--default_sdk_harness_log_level"
# What those workers write to stderr before their log level is set (see the module docstring): Python
# records below ERROR in logging's default format from Beam's, absl's or the worker's own loggers, and
# absl's C++ lines of levels I and W with absl's pre-initialisation notice.
WORKER_NOISE = re.compile(
    r"(?:DEBUG|INFO|WARNING):(?:root|__main__|apache_beam|absl)[\w.]*:"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] "
)


def verbose_flag(argv: list[str] | None) -> bool:
    """True when the command line asks for `--verbose` (read before arguments are parsed)."""
    import sys

    return "--verbose" in (sys.argv[1:] if argv is None else argv)


class _ThirdPartyFilter(logging.Filter):
    """Drops third-party records below ERROR, also those logged on the root logger from their code."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        name = record.name.split(".")[0]
        if name in NOISY:
            return False
        path = record.pathname.replace(os.sep, "/")
        return not any(f"/{pkg}/" in path for pkg in NOISY)


def configure(verbose: bool) -> None:
    """Sets up logging and warnings for a command; see the module docstring."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return
    user_level = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ThirdPartyFilter())
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    warnings.filterwarnings("default", module=r"(dnr_tf|pipeline|bench)(\.|$)")
    if user_level is None:
        import_tensorflow_silently()


def import_tensorflow_silently() -> None:
    """Imports TensorFlow with file descriptor 2 on /dev/null (see the module docstring)."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def beam_args(beam_args: list[str], verbose: bool) -> list[str]:
    """Beam options with the SDK workers' log level at ERROR, unless verbose or set by the user."""
    if verbose or any(a.startswith(BEAM_WORKER_LOG_LEVEL) for a in beam_args):
        return list(beam_args)
    return [*beam_args, f"{BEAM_WORKER_LOG_LEVEL}=ERROR"]


@contextlib.contextmanager
def worker_stderr_filtered(verbose: bool):
    """Runs the block with file descriptor 2 on a pipe that drops `WORKER_NOISE` lines (not if `verbose`).

    Processes started inside the block inherit the pipe; a thread passes every other line on to the
    real stderr, in order. On leaving, stderr is restored and the thread drains what the block and its
    children wrote (up to 10 s for a child still running; it then keeps passing lines on).
    """
    if verbose:
        yield
        return
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    real = os.dup(2)
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def pump() -> None:
        with os.fdopen(read_fd, "rb") as lines:
            for line in lines:
                if not WORKER_NOISE.match(line.decode("utf-8", "replace")):
                    os.write(real, line)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last write end in this process closes here
        thread.join(timeout=10)
        if not thread.is_alive():
            os.close(real)
