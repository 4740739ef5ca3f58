"""Issue 15, classes 2-3: a run killed at any file write, or stopped by a full disk, resumes to the
uninterrupted result; a `--model_dir` holding a run is never silently reused or emptied.

A kill -9 leaves on disk exactly what had been written when it came. `safe_io.HOOK` is called before
every step of every write of a run, so copying the run directory there gives what a kill at that
moment leaves (and a copy whose temporary file is cut in half, a kill in the middle of writing it).
Each copy is then resumed with `train`, as the same command would, and compared with the run that
was not interrupted. Copies that differ only in temporary files are one state for a resume, which
ignores those files by name: one copy of each such group is resumed, the one holding the temporary
file (cut in half where there is one), so ignoring it is itself under test.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil

import keras
import pytest

from dnr_tf import config_io, safe_io
from dnr_tf.config import ExperimentConfig
from dnr_tf.train import main, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")  # heuristic sampler for 1 epoch, then model-based
# 3 epochs: the last is then the best on this data, so a lost best epoch shows.
SETS = ["train.learning_rate=0.0003", "train.epochs=3"]


class Killed(BaseException):
    """Stands for a kill: nothing of the run's own error handling runs."""


def _cfg(*overrides):
    data = config_io.apply_overrides(config_io.load_yaml(SMOKE), [*SETS, *overrides])
    return config_io.from_dict(ExperimentConfig, data)


@pytest.fixture(scope="module")
def whole_run(synthetic_data, tmp_path_factory):
    """The uninterrupted run, with a copy of its directory before every write step of its last epoch:
    (data dir, result, [(label, copied dir)], run dir). Tests copy the run dir; none writes into it."""
    data_dir = str(synthetic_data[0])
    root = tmp_path_factory.mktemp("kills")
    run_dir = root / "whole"
    snaps = []
    state = {"last_epoch": False}

    def hook(event, path):
        name = os.path.relpath(path, run_dir)
        if name == "backup/epoch-3.weights.h5" and event == "write":
            state["last_epoch"] = True  # the last epoch's first write
        if not state["last_epoch"]:
            return
        label = f"{len(snaps):02d} before {event} {name}"
        snap = root / f"snap{len(snaps):02d}"
        shutil.copytree(run_dir, snap)
        snaps.append((label, snap))
        tmp = safe_io.temp_path(path)
        # Killed halfway through writing a file: a weights file and the commit file. (Any temporary
        # file is ignored by name on resume; one of each kind shows it, every write is killed above.)
        halfway = name in ("backup/epoch-3.weights.h5", "backup/state.json")
        if event == "rename" and halfway and os.path.getsize(tmp) > 1:
            cut = root / f"snap{len(snaps):02d}"
            shutil.copytree(run_dir, cut)
            cut_tmp = cut / os.path.relpath(tmp, run_dir)
            with open(cut_tmp, "r+b") as f:
                f.truncate(os.path.getsize(tmp) // 2)
            snaps.append((f"{len(snaps):02d} halfway through writing {name}", cut))

    safe_io.HOOK = hook
    try:
        result = train(_cfg(), data_dir, str(run_dir), verbose=0)
    finally:
        safe_io.HOOK = None
    return data_dir, result, snaps, run_dir


def _state(snap) -> tuple:
    """What a resume reads from a copied run directory: every file but the temporary ones."""
    files = []
    for directory, _, names in os.walk(snap):
        for name in names:
            if ".tmp" not in name:
                path = os.path.join(directory, name)
                with open(path, "rb") as f:
                    files.append((os.path.relpath(path, snap), hashlib.sha256(f.read()).hexdigest()))
    return tuple(sorted(files))


def _one_per_state(snaps):
    """One copy per distinct state, in order: the last of its group (it holds the temporary file)."""
    groups: dict[tuple, tuple] = {}
    for label, snap in snaps:
        groups[_state(snap)] = (label, snap)  # a dict keeps the first insertion's order
    return list(groups.values())


def test_a_kill_at_every_write_of_an_epoch_resumes_to_the_uninterrupted_result(whole_run):
    data_dir, whole, snaps, _ = whole_run
    assert whole["best_epoch"] == 3, "the last epoch must be the best, or a lost best epoch would go unseen"
    labels = [label for label, _ in snaps]
    for needed in ("backup/epoch-3.weights.h5", "backup/state.json", "best.weights.h5", "best.json", "metrics.json"):
        assert any(label.endswith(f"before write {needed}") for label in labels), (needed, labels)
        assert any(label.endswith(f"before rename {needed}") for label in labels), (needed, labels)
    assert any("halfway through writing backup/epoch-3.weights.h5" in label for label in labels)
    # A kill before the epoch's commit redoes that epoch from the previous commit; one after it redoes
    # no training. Either way the result is the uninterrupted run's, exactly (this process has built
    # other models before: the random states are restored whatever Keras named them here).
    states = _one_per_state(snaps)
    assert len(states) >= 5, [label for label, _ in states]  # one state before each file is renamed into place
    assert any("halfway" in label for label, _ in states)
    redone = 0
    for label, snap in states:
        state = snap / "backup" / "state.json"
        committed = json.loads(state.read_text())["epoch"] if state.exists() else None
        redone += committed is not None and committed < 3
        resumed = train(_cfg(), data_dir, str(snap), verbose=0)
        assert resumed["best_epoch"] == whole["best_epoch"], label
        # A resume starts from the committed epoch; with no backup left (metrics.json written), the
        # finished run is returned as it was, never resumed.
        assert resumed["resumed_after"] == ([committed] if committed else []), label
        for split in ("valid", "test"):
            for key, value in whole[split].items():
                assert resumed[split][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (label, split, key)
        for key in ("loss", "val_loss"):
            assert resumed["history"][key] == pytest.approx(whole["history"][key], rel=1e-5), (label, key)
        assert json.loads((snap / "best.json").read_text())["epoch"] == whole["best_epoch"], label
        assert not (snap / "backup").exists(), label
        left = [n for n in os.listdir(snap) if ".tmp" in n]
        assert not left, (label, left)
    assert redone >= 2, "kills before the last epoch's commit: that epoch redone"


def _full_disk_after(n_ok: int):
    """A `Model.save_weights` that, after `n_ok` good calls, writes half a file and fails with ENOSPC."""
    real = keras.Model.save_weights
    calls = {"n": 0}

    def save_weights(self, filepath, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= n_ok:
            return real(self, filepath, *args, **kwargs)
        real(self, filepath, *args, **kwargs)
        with open(filepath, "r+b") as f:
            f.truncate(os.path.getsize(filepath) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    return save_weights


def test_a_full_disk_is_one_line_and_the_same_command_resumes(whole_run, tmp_path, monkeypatch, capsys):
    """The disk fills at the first backup write, then (the same command again) in the third epoch; the
    same command once more, with space, finishes the run. One run dir goes through both failures."""
    data_dir, whole, _, _ = whole_run
    args = ["--config", SMOKE, "--data_dir", data_dir, "--model_dir", str(tmp_path / "run")]
    args += [arg for s in SETS for arg in ("--set", s)]
    for n_ok in (0, 2):  # good save_weights calls before the disk is full: none, then two epochs' backups
        with monkeypatch.context() as m:
            m.setattr(keras.Model, "save_weights", _full_disk_after(n_ok))
            assert main(args) == 2, n_ok
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: cannot write "), (n_ok, err)
        assert "no space left on device" in err and "resumes" in err, (n_ok, err)
        assert not (tmp_path / "run" / "metrics.json").exists(), n_ok
    assert json.loads((tmp_path / "run" / "backup" / "state.json").read_text())["epoch"] == 2
    assert main(args) == 0  # space again
    resumed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert resumed["best_epoch"] == whole["best_epoch"]
    assert len(resumed["history"]["loss"]) == 3
    assert resumed["resumed_after"] == [2], "the first failure committed nothing; the second, two epochs"
    for key, value in whole["test"].items():  # epoch 3 redone (the failed run's was not committed)
        assert resumed["test"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_a_model_dir_with_a_run_is_never_silently_reused(whole_run, tmp_path, capsys):
    data_dir, _, _, whole_dir = whole_run
    run = tmp_path / "run"
    shutil.copytree(whole_dir, run)  # a finished run of this command (the suite's time: not trained again)
    args = ["--config", SMOKE, "--data_dir", data_dir, "--model_dir", str(run)]
    args += [arg for s in SETS for arg in ("--set", s)]
    (run / "notes.txt").write_text("mine")
    finished = {name: (run / name).read_bytes() for name in ("metrics.json", "best.weights.h5", "best.json")}
    config = (run / "config.yaml").read_text()
    capsys.readouterr()

    # The same command again: finished, nothing retrained or deleted.
    assert main(args) == 0
    assert "already holds this run, finished" in capsys.readouterr().out
    assert {name: (run / name).read_bytes() for name in finished} == finished

    # Another config: refused before any work, naming every key that differs. (The heuristic sampler
    # only: the runs below trace one training step, not two.)
    other = [*args, "--set", "dnr.model_based=false", "--set", "model.hidden_dim=8"]
    assert main(other) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "holds a run with another config (dnr.model_based True -> False; model.hidden_dim 16 -> 8)" in err, err
    assert "--overwrite" in err
    assert (run / "config.yaml").read_text() == config
    assert {name: (run / name).read_bytes() for name in finished} == finished

    # --overwrite, killed at its first commit: the old results are kept aside, the user's file stays.
    def kill_at_commit(event, path):
        if path.endswith("state.json") and event == "rename":
            raise Killed()

    safe_io.HOOK = kill_at_commit
    try:
        with pytest.raises(Killed):
            main([*other, "--overwrite"])
    finally:
        safe_io.HOOK = None
    assert {name: (run / ".replaced" / name).read_bytes() for name in finished} == finished
    assert (run / "notes.txt").read_text() == "mine"

    # --overwrite again: the new run's results replace the old ones only now; its logs are its own.
    assert main([*other, "--overwrite"]) == 0
    assert not (run / ".replaced").exists()
    assert (run / "notes.txt").read_text() == "mine"
    result = json.loads((run / "metrics.json").read_text())
    assert result["history"]["sampler_phase"] == [0.0, 0.0, 0.0]
    assert len(os.listdir(run / "logs" / "train")) == 1, "one run's TensorBoard events"
    assert "hidden_dim: 8" in (run / "config.yaml").read_text()


def test_a_backup_with_other_random_generators_is_refused_in_one_line(whole_run, tmp_path, capsys):
    """The random states are restored by position (Keras' names count per process); a backup whose
    count differs is not this model's and is refused, naming its file, before any step."""
    data_dir, _, snaps, _ = whole_run
    label, snap = next((label, snap) for label, snap in snaps if (snap / "backup" / "state.json").exists())
    run = tmp_path / "run"
    shutil.copytree(snap, run)
    state_path = run / "backup" / "state.json"
    state = json.loads(state_path.read_text())
    assert len(state["rng"]) >= 2, state["rng"].keys()  # the noise's and dropout's
    state["rng"].popitem()
    state_path.write_text(json.dumps(state))
    args = ["--config", SMOKE, "--data_dir", data_dir, "--model_dir", str(run)]
    args += [arg for s in SETS for arg in ("--set", s)]
    assert main(args) == 2, label
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(state_path) in err and "random generator states" in err, err
    assert json.loads(state_path.read_text()) == state, "the backup is left as it was"
