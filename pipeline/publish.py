"""A pipeline run never loses the last good data set, nor a user's files: lock, stage, publish.

- **Lock.** `<parent>/.<name>.lock` (O_CREAT | O_EXCL) holds the pid, host and start time of the run
  writing `<parent>/<name>`. A second run is refused with a line naming them. A lock whose pid is
  dead on this host is taken over, and the run says so.
- **Staging.** The run builds everything in `<parent>/.<name>.staging-<pid>/` (beside the output, so
  on the same file system), including Beam's `beam-temp-*` and the `_work/` files.
- **Publish, on success only.** A `manifest.json` lists every file the run wrote. If the output
  directory does not exist, the staging directory is renamed to it (one rename). Otherwise each file
  is renamed into place, the previous run's files that the new one does not have are removed (those
  of its manifest, never others), and the new manifest is written last. While the files move, the
  manifest lists both runs' files, so a kill in those milliseconds leaves nothing unlisted.
- **Failure.** The output directory is untouched; the staging directory is removed; the rejects and
  `stats.json` (what a user needs to see why) are kept in `<parent>/<name>.failed/`, which the
  error message names and the next successful run removes.
"""

from __future__ import annotations

import datetime
import errno
import fnmatch
import json
import os
import shutil
import socket

MANIFEST = "manifest.json"
FAILED_NOTE = "failed_run.txt"
# Names of the pipeline's outputs: a file of these names that no manifest lists is not overwritten.
OUTPUT_PATTERNS = (
    "train-*.tfrecord.gz",
    "valid-*.tfrecord.gz",
    "test-*.tfrecord.gz",
    "rejects-*.jsonl",
    "stats.json",
    "schema.json",
    "schema.pbtxt",
    "item_vocab.txt",
    "user_vocab.txt",
    "retriever",
    MANIFEST,
)
DEBUG_PATTERNS = ("rejects-*", "stats.json")


class OutputError(RuntimeError):
    """The output directory cannot be written safely; the message says why."""


def _split(output_dir: str) -> tuple[str, str]:
    path = os.path.abspath(output_dir.rstrip("/"))
    return os.path.dirname(path), os.path.basename(path)


def lock_path(output_dir: str) -> str:
    parent, name = _split(output_dir)
    return os.path.join(parent, f".{name}.lock")


def staging_path(output_dir: str) -> str:
    parent, name = _split(output_dir)
    return os.path.join(parent, f".{name}.staging-{os.getpid()}")


def failed_path(output_dir: str) -> str:
    parent, name = _split(output_dir)
    return os.path.join(parent, f"{name}.failed")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire(output_dir: str) -> str:
    """Takes the output directory's lock; returns its path. Raises `OutputError` if a live run holds it."""
    path = lock_path(output_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    started = datetime.datetime.now().isoformat(" ", "seconds")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    holder = json.load(f)
            except (OSError, ValueError):
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            if isinstance(pid, int) and host == me["host"] and not _alive(pid):
                print(
                    f"[pipeline] taking over the lock {path} of run pid {pid} (started {holder.get('started')}), "
                    "which is no longer running",
                    flush=True,
                )
                os.remove(path)
                continue
            raise OutputError(
                f"{output_dir} is being written by another run (pid {pid} on host {host}, started "
                f"{holder.get('started')}; lock {path}): wait for it to end, or, if that run is gone, remove the lock"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise OutputError(f"could not take the lock {path}: other runs keep taking it")


def release(lock: str) -> None:
    if os.path.exists(lock):
        os.remove(lock)


def _manifest(directory: str) -> list[str]:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(json.load(f)["files"])


def check_output(output_dir: str) -> None:
    """Refuses (before any work) an output path that is a file, or a directory holding files of the
    pipeline's names that no manifest lists: a user's, or an older version's, that a run would mix
    with its own or write over."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputError(f"--output_dir {output_dir} is a file, not a directory")
    if not os.path.isdir(output_dir):
        return
    listed = set(_manifest(output_dir))
    listed_tops = {p.split("/")[0] for p in listed} | {MANIFEST}
    foreign = [
        name
        for name in sorted(os.listdir(output_dir))
        if name not in listed_tops and any(fnmatch.fnmatch(name, pat) for pat in OUTPUT_PATTERNS)
    ]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(
            f"{output_dir} holds {shown}, which no {MANIFEST} of this pipeline lists (a file of yours, or an output "
            "of a version without manifests): the run would mix with it or write over it. Move it away, or "
            "choose another --output_dir"
        )


def clean_stale(output_dir: str) -> None:
    """Removes staging directories of earlier runs that were killed (the lock holder calls it)."""
    parent, name = _split(output_dir)
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        if entry.startswith(f".{name}.staging-"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _files(directory: str) -> list[str]:
    out = []
    for root, _, names in os.walk(directory):
        for n in names:
            out.append(os.path.relpath(os.path.join(root, n), directory).replace(os.sep, "/"))
    return sorted(out)


def _write_manifest(directory: str, files: list[str]) -> None:
    tmp = os.path.join(directory, f".{MANIFEST}.tmp")
    with open(tmp, "w") as f:
        json.dump({"written_by": "python -m pipeline.run", "files": sorted(files)}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, MANIFEST))


def publish(staging: str, output_dir: str) -> None:
    """Moves a finished run from `staging` into `output_dir` (see the module doc)."""
    new = [f for f in _files(staging) if f != MANIFEST]
    _write_manifest(staging, new)
    failed = failed_path(output_dir)
    if os.path.exists(os.path.join(failed, FAILED_NOTE)):
        shutil.rmtree(failed)
    if not os.path.exists(output_dir):
        os.replace(staging, output_dir)
        return
    old = _manifest(output_dir)
    _write_manifest(output_dir, sorted(set(old) | set(new)))
    for rel in new:
        dst = os.path.join(output_dir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(os.path.join(staging, rel), dst)
    for rel in sorted(set(old) - set(new)):
        path = os.path.join(output_dir, rel)
        if os.path.lexists(path):
            os.remove(path)
        parent = os.path.dirname(rel)
        while parent:  # a directory of ours (retriever/) left empty
            try:
                os.rmdir(os.path.join(output_dir, parent))
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    raise
                break
            parent = os.path.dirname(parent)
    _write_manifest(output_dir, new)
    shutil.rmtree(staging, ignore_errors=True)


def keep_for_debugging(staging: str, output_dir: str, error: str) -> str | None:
    """After a failure: moves the rejects and stats out of `staging` into `<name>.failed/`; returns it
    (None when there was nothing to keep)."""
    keep = [n for n in sorted(os.listdir(staging)) if any(fnmatch.fnmatch(n, p) for p in DEBUG_PATTERNS)]
    if not keep:
        return None
    failed = failed_path(output_dir)
    if os.path.exists(os.path.join(failed, FAILED_NOTE)):
        shutil.rmtree(failed)
    os.makedirs(failed, exist_ok=True)
    for n in keep:
        os.replace(os.path.join(staging, n), os.path.join(failed, n))
    with open(os.path.join(failed, FAILED_NOTE), "w") as f:
        f.write(f"error: {error}\n")
    return failed
