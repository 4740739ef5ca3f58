"""Issue 15, class 1: a pipeline run never empties its output directory. It builds beside it and
publishes on success only, removes only files its manifest lists, and refuses a second run into the
same directory, naming the holder of the lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from dnr_tf.config_io import ConfigError
from pipeline import publish
from pipeline.run import PipelineError, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = os.path.join(ROOT, "configs", "pipeline", "synthetic.yaml")


def _synthetic(out, *sets):
    args = ["--config", SYNTHETIC, "--output_dir", str(out), "--set", "synthetic.num_users=120"]
    for s in sets:
        args += ["--set", s]
    return run(args)


def _tree(directory) -> dict:
    """Every file under `directory` (relative path -> bytes)."""
    out = {}
    for root, _, names in os.walk(directory):
        for n in names:
            path = os.path.join(root, n)
            out[os.path.relpath(path, directory)] = open(path, "rb").read()
    return out


def _lock_of(pid: int) -> str:
    return json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2026-01-02 03:04:05"})


def test_reruns_never_lose_the_good_output_nor_a_users_files(tmp_path, capsys):
    out = tmp_path / "data"
    _synthetic(out, "output_shards=2")
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert "train-00001-of-00002.tfrecord.gz" in manifest
    assert sorted(manifest) == sorted(p for p in _tree(out) if p != "manifest.json")
    # A user's own files, with names the landed pipeline deleted (train-*, *_vocab.txt).
    (out / "train-notes.txt").write_text("mine")
    (out / "my_vocab.txt").write_text("mine too")
    good = _tree(out)
    parent = os.listdir(tmp_path)

    # A run into the same directory while another holds it: refused, naming the holder.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".data.lock").write_text(_lock_of(holder.pid))
        with pytest.raises(PipelineError) as refused:
            _synthetic(out)
        message = str(refused.value)
        assert f"being written by another run (pid {holder.pid} on host {socket.gethostname()}, started " in message
        assert "started 2026-01-02 03:04:05; lock " in message and len(message.splitlines()) == 1, message
    finally:
        holder.kill()
        holder.wait()
    assert _tree(out) == good

    # A failing rerun (most of its records rejected): the last good output is untouched; the rejects
    # are kept where the error says; no staging, beam-temp or _work is left behind; the lock is freed
    # (it was a dead pid's: taken over, saying so).
    bad = tmp_path / "bad.csv"
    good_lines = "".join(f"{u},{i},{u * 10 + i}\n" for u in range(1, 6) for i in (1, 2, 3))
    bad.write_text("user_id,item_id,timestamp\n" + good_lines + "x,y\n" * 10)
    with pytest.raises(PipelineError) as failure:
        run(["--source", "csv", "--input", str(bad), "--output_dir", str(out), "--set", "min_count=1"])
    assert "taking over the lock" in capsys.readouterr().out
    message = str(failure.value)
    assert f"{tmp_path}/data.failed/rejects-*.jsonl" in message, message
    assert (tmp_path / "data.failed").is_dir() and list((tmp_path / "data.failed").glob("rejects-*.jsonl"))
    assert _tree(out) == good
    assert sorted(os.listdir(tmp_path)) == sorted([*parent, "bad.csv", "data.failed"])

    # A successful rerun with fewer shards: the old shard that the new run lacks goes; the user's stay.
    _synthetic(out, "output_shards=1")
    now = _tree(out)
    assert now["train-notes.txt"] == b"mine" and now["my_vocab.txt"] == b"mine too"
    assert "train-00001-of-00002.tfrecord.gz" not in now and "train-00000-of-00001.tfrecord.gz" in now
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert sorted(manifest) == sorted(p for p in now if p not in ("manifest.json", "train-notes.txt", "my_vocab.txt"))
    assert sorted(os.listdir(tmp_path)) == sorted([*parent, "bad.csv"]), "data.failed/ removed, no lock left"


def test_outputs_that_no_manifest_lists_are_never_written_over(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "schema.json").write_text("{}")  # a user's, or a run of a version without manifests
    with pytest.raises(PipelineError, match="holds schema.json, which no manifest.json of this pipeline lists"):
        _synthetic(out)
    assert (out / "schema.json").read_text() == "{}"
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a directory"):  # checked before the lock, before any work
        _synthetic(tmp_path / "file")
    assert publish.lock_path(str(out)) == str(tmp_path / ".data.lock")
    assert not os.path.exists(publish.lock_path(str(out)))
