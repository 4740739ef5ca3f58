"""What `python -m dnr_tf.train` may do with a `--model_dir` that already holds a run.

- another config: refused before any work, the error naming every key that differs;
- the same config: resumed from its backup, or, when it is finished, left as it is (`train` returns
  its `metrics.json`; exit status 0);
- `--overwrite`: the old run's files are moved aside into `<model_dir>/.replaced/` and deleted only
  once the new run has written its `metrics.json`, so until then the old results still exist.

Only the files `train` writes are ever moved or deleted (`RUN_FILES`); anything else a user keeps in
the directory stays.
"""

from __future__ import annotations

import os
import shutil

from dnr_tf import config_io

RUN_FILES = (
    "config.yaml",
    "item_vocab.txt",
    "schema.json",
    "calibration.json",
    "best.weights.h5",
    "best.json",
    "metrics.json",
    "logs",
    "backup",
    "workers",
)
REPLACED = ".replaced"
BACKUP_STATE = os.path.join("backup", "state.json")


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(before: dict, now: dict) -> list[str]:
    """`key old -> new` for every key whose value differs (data_dir excluded: the data is checked by content)."""
    a, b = _flat(before), _flat(now)
    a.pop("data_dir", None)
    b.pop("data_dir", None)
    missing = object()
    return [
        f"{key} {a.get(key, '(unset)')!s} -> {b.get(key, '(unset)')!s}"
        for key in sorted(set(a) | set(b))
        if a.get(key, missing) != b.get(key, missing)
    ]


def _present(model_dir: str) -> list[str]:
    return [name for name in RUN_FILES if os.path.lexists(os.path.join(model_dir, name))]


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def move_aside(model_dir: str) -> None:
    """Moves the run's files into `.replaced/`. If an earlier `--overwrite` was interrupted, `.replaced/`
    already holds the last finished run: then the files here are the unfinished one's and go, unless
    they are a finished run themselves (they then replace `.replaced/`)."""
    replaced = os.path.join(model_dir, REPLACED)
    if os.path.exists(replaced):
        if not os.path.exists(os.path.join(model_dir, "metrics.json")):
            for name in _present(model_dir):
                _remove(os.path.join(model_dir, name))
            return
        shutil.rmtree(replaced)
    tmp = replaced + ".tmp"
    _remove(tmp)
    os.makedirs(tmp)
    for name in _present(model_dir):
        os.replace(os.path.join(model_dir, name), os.path.join(tmp, name))
    os.replace(tmp, replaced)


def prepare(model_dir: str, config: dict, overwrite: bool) -> str:
    """Decides what a run does with `model_dir`: "fresh", "resume" or "finished" (see the module doc).

    Raises `config_io.ConfigError` for a run with another config, before anything is touched.
    """
    path = os.path.join(model_dir, "config.yaml")
    if not os.path.exists(path):
        if overwrite and _present(model_dir):
            move_aside(model_dir)
        return "fresh"
    if overwrite:
        move_aside(model_dir)
        return "fresh"
    before = config_io.load_yaml(path)
    diff = config_differences(before, config)
    if diff:
        raise config_io.ConfigError(
            f"{model_dir} holds a run with another config ({'; '.join(diff)}): resume it with its own config, "
            "train in another --model_dir, or pass --overwrite to replace it"
        )
    if os.path.exists(os.path.join(model_dir, BACKUP_STATE)):
        return "resume"
    if os.path.exists(os.path.join(model_dir, "metrics.json")):
        return "finished"
    # The same run, killed before its first epoch was committed: what it left is no result.
    for name in ("best.weights.h5", "best.json", "logs", "backup", "calibration.json"):
        _remove(os.path.join(model_dir, name))
    return "fresh"


def finish(model_dir: str) -> None:
    """After `metrics.json` is written: the backup and a replaced run are no longer needed."""
    for name in ("backup", REPLACED):
        _remove(os.path.join(model_dir, name))
