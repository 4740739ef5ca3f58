"""What a new user meets first: --list_keys, quiet logs, progress lines, warnings, and the TFMD schema."""

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest

from dnr_tf import config_io
from dnr_tf.config import ExperimentConfig
from pipeline.config import PipelineConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


def _leaves(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize(
    "module, cls", [("dnr_tf.train", ExperimentConfig), ("pipeline.run", PipelineConfig)], ids=["train", "pipeline"]
)
def test_list_keys_prints_every_key_with_its_default_and_meaning(module, cls, capsys):
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as stop:
        main(["--list_keys"])  # no other flag needed, like --help
    assert stop.value.code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    listed = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in lines if not line.startswith(" ")}
    expected = _leaves(config_io.to_dict(cls()))
    assert set(listed) == set(expected)
    for key, default in expected.items():
        assert json.loads(listed[key]) == default, key
        # Every key a `--set` can take comes back through the strict loader.
        assert config_io.apply_overrides({}, [f"{key}={listed[key]}"])
    # Meanings come from the dataclass docstrings, indented under their key (`name` has none).
    meanings = {lines[i].split("=")[0]: lines[i + 1] for i in range(len(lines) - 1) if lines[i + 1].startswith("    ")}
    if cls is ExperimentConfig:
        assert "heuristic sampler before the model-based one" in meanings["dnr.lambda_e"]
        assert "(paper table 2)" in meanings["model.score_feed"]
    else:
        assert "k-core threshold" in meanings["min_count"]
        assert "passes over the retriever window" in meanings["retriever.epochs"]
    assert len(meanings) >= len(expected) - 1


def test_lambda_e_beyond_the_epochs_warns_in_one_line(tmp_path, capsys):
    from dnr_tf.progress import phase_warning
    from dnr_tf.train import main

    base = ["--config", SMOKE, "--data_dir", str(tmp_path / "none"), "--model_dir", str(tmp_path / "run")]
    assert main([*base, "--set", "train.epochs=2", "--set", "dnr.lambda_e=3"]) == 2  # no data: stops after the warning
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("warning: dnr.lambda_e=3 >= train.epochs=2: the model-based sampler never starts")
    assert err[1].startswith("error: ") and len(err) == 2
    main(base)  # smoke: lambda_e 1 of 2 epochs
    assert "warning" not in capsys.readouterr().err
    cfg = config_io.from_dict(ExperimentConfig, config_io.apply_overrides(config_io.load_yaml(SMOKE), []))
    assert phase_warning(cfg) is None
    for overrides in (["dnr.model_based=false"], ["dnr.enabled=false"]):  # no model-based phase is asked for
        data = config_io.apply_overrides(config_io.load_yaml(SMOKE), ["dnr.lambda_e=5", *overrides])
        assert phase_warning(config_io.from_dict(ExperimentConfig, data)) is None


def test_epoch_line_is_short_and_its_eta_leaves_out_the_first_epoch(monkeypatch):
    from dnr_tf import progress

    clock = iter([0.0, 30.0, 30.0, 32.0, 32.0, 34.0])  # epoch 1: 30 s (start-up), then 2 s each
    monkeypatch.setattr(progress.time, "time", lambda: next(clock))
    out = io.StringIO()
    line = progress.EpochLine(epochs=4, monitor="val_ndcg@6", steps_per_epoch=10, stream=out)
    logs = {"loss": 1.0, "l_direct": 0.5, "l_z": 0.4, "l_adv": 0.7, "l_x": 0.1, "val_ndcg@6": 0.1834}
    logs.update({f"val_metric_{i}": 0.5 for i in range(24)})  # the other metrics stay off the console
    for epoch in range(3):
        line.on_epoch_begin(epoch)
        line.on_epoch_end(epoch, logs)
    lines = out.getvalue().splitlines()
    assert lines[0] == (
        "epoch 1/4  loss 1.0000 (l_direct 0.5000 l_z 0.4000 l_adv 0.7000 l_x 0.1000)  val ndcg@6 0.1834  30.0s  ETA 90s"
    )
    assert lines[2].endswith("2.0s  ETA 2s")  # the median of epochs 2-3, not the first's start-up
    assert all(len(text) < 120 for text in lines)
    assert progress.steady_seconds([30.0, 2.0, 3.0]) == [2.0, 3.0] and progress.steady_seconds([5.0]) == [5.0]


def test_epoch_line_eta_after_the_first_epoch_leaves_out_its_tracing(monkeypatch):
    from dnr_tf import progress

    # Epoch 1: its first step 8 s (the trace), 3 more steps, validation whose first batch takes 2 s.
    clock = iter([0.0, 8.0, 8.5, 9.0, 9.5, 9.5, 11.5, 12.0, 12.0])
    monkeypatch.setattr(progress.time, "time", lambda: next(clock))
    out = io.StringIO()
    line = progress.EpochLine(epochs=4, monitor="val_ndcg@6", steps_per_epoch=4, stream=out, every_seconds=1e9)
    line.on_epoch_begin(0)
    for batch in range(4):
        line.on_train_batch_end(batch)
    line.on_test_begin()
    line.on_test_batch_end(0)
    line.on_test_batch_end(1)
    line.on_epoch_end(0, {"loss": 1.0})
    assert out.getvalue().splitlines()[-1].endswith("12.0s  ETA 6s")  # 3 epochs of 12 - 8 - 2 s
    line.on_test_begin()  # a later validation, or one after the epochs: not counted
    line.on_test_batch_end(0)
    assert line.first_calls == 10.0
    assert progress.steady_seconds([12.0], 10.0) == [2.0] and progress.steady_seconds([12.0], 13.0) == [12.0]


def test_epoch_line_shows_progress_inside_a_long_epoch(monkeypatch):
    from dnr_tf import progress

    now = [0.0]
    monkeypatch.setattr(progress.time, "time", lambda: now[0])
    out = io.StringIO()
    line = progress.EpochLine(epochs=2, monitor="val_ndcg@6", steps_per_epoch=100, stream=out, every_seconds=10)
    line.on_epoch_begin(0)
    for step in range(100):
        now[0] = step * 0.5  # 50 s an epoch: a line every 10 s
        line.on_train_batch_end(step)
    lines = out.getvalue().splitlines()
    assert lines[0] == "  epoch 1/2: step 21/100, 10s" and len(lines) == 4


def test_build_lists_does_not_mix_yield_and_return():
    from apache_beam.transforms.core import _check_fn_use_yield_and_return

    from pipeline.stages import _BuildLists

    assert not _check_fn_use_yield_and_return(_BuildLists.process)


def test_entry_points_are_quiet_unless_verbose(tmp_path):
    """What `quiet.configure` does before TensorFlow, Beam and Keras load: their start-up noise is gone."""
    script = textwrap.dedent(
        """
        import sys
        from dnr_tf import quiet
        quiet.configure(quiet.verbose_flag(sys.argv[1:]))
        import logging, warnings
        import apache_beam, tensorflow as tf
        tf.reduce_sum(tf.constant([1, 2])).numpy()
        warnings.warn("third-party", DeprecationWarning)  # from __main__: not one of the project modules
        logging.getLogger("apache_beam.runners").warning("beam noise")
        logging.getLogger("pipeline").warning("own warning")
        print("done")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "PYTHONWARNINGS")}
    env["PYTHONPATH"] = ROOT
    quiet_run, loud = (
        subprocess.run([sys.executable, "-c", script, *flag], env=env, capture_output=True, text=True, check=True)
        for flag in ([], ["--verbose"])
    )
    assert quiet_run.stdout == "done\n" and quiet_run.stderr.splitlines() == ["WARNING pipeline: own warning"]
    # TensorFlow's own start-up lines depend on the CPU (cpu_feature_guard): only Python's logs are asserted.
    for noise in ("beam noise", "own warning"):
        assert noise in loud.stderr


def test_quiet_adds_the_beam_worker_log_level_once():
    from dnr_tf import quiet

    assert quiet.beam_args(["--direct_num_workers", "2"], False)[-1] == "--default_sdk_harness_log_level=ERROR"
    assert quiet.beam_args(["--default_sdk_harness_log_level=INFO"], False) == ["--default_sdk_harness_log_level=INFO"]
    assert quiet.beam_args([], True) == []


def test_tfmd_schema_parses_and_matches_schema_json(synthetic_data):
    from tensorflow_metadata.proto.v0 import schema_pb2

    from dnr_tf import schema as S
    from dnr_tf import tfmd

    data_dir, _ = synthetic_data
    proto = tfmd.load_tfmd(str(data_dir))  # the file the pipeline wrote, parsed as a text proto
    table = json.load(open(os.path.join(data_dir, "schema.json")))["features"]
    types = {"bytes": schema_pb2.BYTES, "int64": schema_pb2.INT, "float32": schema_pb2.FLOAT}
    assert [f.name for f in proto.feature] == list(table)
    for feature in proto.feature:
        spec = table[feature.name]
        assert feature.type == types[spec["dtype"]], feature.name
        assert feature.HasField("shape") and [d.size for d in feature.shape.dim] == spec["shape"], feature.name
        assert feature.presence.min_fraction == 1.0
    scores = next(f for f in proto.feature if f.name == S.RETRIEVER_SCORES)
    assert (scores.float_domain.min, scores.float_domain.max) == (0.0, 1.0) and scores.float_domain.disallow_nan
    labels = next(f for f in proto.feature if f.name == S.LABELS)
    assert list(labels.not_in_environment) == ["SERVING"] and list(proto.default_environment) == ["TRAINING", "SERVING"]
    # Derived from schema.py's table: a schema without the oracle has no oracle feature.
    names = [f.name for f in tfmd.to_tfmd(S.RecordSchema(list_size=7, has_oracle=False)).feature]
    assert S.ORACLE_SCORES not in names and S.ORACLE_SCORES in table
    item_ids = next(f for f in tfmd.to_tfmd(S.RecordSchema(list_size=7)).feature if f.name == S.ITEM_IDS)
    assert item_ids.shape.dim[0].size == 7


def test_export_and_train_do_not_import_each_other():
    """Run building and loading live in dnr_tf/runs.py: export needs no train, and train's module no export."""
    script = (
        "import sys, dnr_tf.export; assert 'dnr_tf.train' not in sys.modules, 'export imports train'; "
        "import dnr_tf.train; assert 'dnr_tf.runs' in sys.modules"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True)
    import dnr_tf.train

    source = open(dnr_tf.train.__file__).read()
    assert "from dnr_tf.export import export_run" in source.split("def main(")[1], "only main exports, lazily"


def test_worker_stderr_filter_drops_the_workers_start_up_lines_only(tmp_path):
    """A child process started inside `quiet.worker_stderr_filtered` writes Beam's and absl's start-up
    lines and real ones to the stderr it inherits: only the real ones, in order, reach the real stderr."""
    script = textwrap.dedent(
        r"""
        import subprocess, sys
        from dnr_tf import quiet
        child = (
            "import sys; w = sys.stderr.write; "
            "w('WARNING:root:apitools not found, and bigquery client libraries are not available\\n'); "
            "w('INFO:__main__:Logging handler created.\\n'); "
            "w('WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n'); "
            "w('I0000 00:00:1796523527.822164   27530 port.cc:153] oneDNN custom operations are on.\\n'); "
            "w('ERROR:root:a worker error\\n'); "
            "w('E0000 00:00:1796523527.822164   27530 op.cc:1] a C++ error\\n'); w('no newline')"
        )
        with quiet.worker_stderr_filtered(verbose=sys.argv[1:] == ["--verbose"]):
            print("own line", file=sys.stderr)
            subprocess.run([sys.executable, "-c", child], check=True)
        print("after", file=sys.stderr)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.fspath(ROOT)}
    quiet_run, loud = (
        subprocess.run([sys.executable, "-c", script, *flag], env=env, capture_output=True, text=True, check=True)
        for flag in ([], ["--verbose"])
    )
    assert quiet_run.stderr == (
        "own line\nERROR:root:a worker error\nE0000 00:00:1796523527.822164   27530 op.cc:1] a C++ error\n"
        "no newlineafter\n"
    )
    assert len(loud.stderr.splitlines()) == 8, "--verbose: nothing filtered"
