"""Quiet logs for the entry points: only the project's own output unless `--verbose`.

Called first thing in the `main` of each entry point (`python -m pipeline.run`, `dnr_tf.train`,
`dnr_tf.export`, `dnr_tf.evaluate`, `dnr_tf.experiments`), before TensorFlow is imported: TensorFlow
reads `TF_CPP_MIN_LOG_LEVEL` once, when it loads. Nothing below the entry points calls it.

Quiet means: TensorFlow's C++ log (the absl/oneDNN start-up lines, error-level `E0000` lines) off,
Python warnings of third-party modules off (Keras' `shuffle=True was passed`, NumPy's `__array__`
deprecations), and log records of Beam, absl and TensorFlow below ERROR off, including Beam's root-
logger `apitools not found`. The project's own warnings and log records stay. An explicitly set
`TF_CPP_MIN_LOG_LEVEL` wins.
"""

from __future__ import annotations

import logging
import os
import warnings

# Log records from these packages are shown from ERROR up only, unless --verbose.
NOISY = ("apache_beam", "absl", "tensorflow", "keras", "h5py", "urllib3", "google")
OWN = ("dnr_tf", "pipeline", "bench", "__main__")
# Beam's SDK workers (--direct_running_mode multi_processing) log at INFO in processes of their own.
BEAM_WORKER_LOG_LEVEL = "--default_sdk_harness_log_level"


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
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ThirdPartyFilter())
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    warnings.filterwarnings("default", module=r"(dnr_tf|pipeline|bench)(\.|$)")


def beam_args(beam_args: list[str], verbose: bool) -> list[str]:
    """Beam options with the SDK workers' log level at ERROR, unless verbose or set by the user."""
    if verbose or any(a.startswith(BEAM_WORKER_LOG_LEVEL) for a in beam_args):
        return list(beam_args)
    return [*beam_args, f"{BEAM_WORKER_LOG_LEVEL}=ERROR"]
