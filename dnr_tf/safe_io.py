"""Files a run depends on are written aside and renamed into place, so a kill or a full disk never
leaves one half-written.

Every write goes `<dir>/.<name>.tmp` (same directory, so the rename is atomic on a POSIX file
system) -> `os.replace` -> `<dir>/<name>`. A reader sees the old file or the new one, never a part.
A write that fails (ENOSPC, EIO, ...) removes its temporary file and raises `WriteError`, one line
naming the file.

`HOOK` is for fault-injection tests only: when set, it is called as `HOOK(event, path)` before each
step of each write (`event` "write" before the temporary file is written, "rename" before it is
renamed into place), so a test can stop the process, or copy what is on disk, at every point.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable

HOOK: Callable[[str, str], None] | None = None


class WriteError(OSError):
    """A file of a run could not be written (a full disk, say); the message names it."""

    def __str__(self) -> str:
        return self.strerror


def _hook(event: str, path: str) -> None:
    if HOOK is not None:
        HOOK(event, path)


def temp_path(path: str) -> str:
    """Where `path` is written before its rename (Keras wants weights files to end `.weights.h5`)."""
    directory, name = os.path.split(path)
    suffix = ".weights.h5" if name.endswith(".weights.h5") else ""
    return os.path.join(directory, f".{name[: len(name) - len(suffix)]}.tmp{suffix}")


def write_with(path: str, write: Callable[[str], None]) -> None:
    """Calls `write(tmp)` to write the file, then renames it to `path`."""
    tmp = temp_path(path)
    _hook("write", path)
    try:
        write(tmp)
        _hook("rename", path)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, WriteError):
            raise
        reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise WriteError(e.errno, f"cannot write {path}: {reason}") from e


def write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    write_with(path, write)


def write_json(path: str, obj, **kwargs) -> None:
    write_text(path, json.dumps(obj, **kwargs))


def copy_file(src: str, dst: str) -> None:
    write_with(dst, lambda tmp: shutil.copyfile(src, tmp))


def save_weights(model, path: str) -> None:
    write_with(path, lambda tmp: model.save_weights(tmp, overwrite=True))
