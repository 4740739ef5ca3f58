"""Every command the README shows works as written: the cheap ones run, the others parse their flags.

The commands come from README.md's fenced `bash` blocks, so the README cannot drift from the code:
a command whose kind this file does not know fails the test. `saved_model_cli` runs in
test_export.py, on a real export, with the README's own lines.
"""

import argparse
import contextlib
import importlib
import json
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def readme_commands(kind: str = "bash") -> list[list[str]]:
    """The commands of the README's fenced blocks of `kind`, as argument lists (continuations joined)."""
    text = open(README).read()
    commands = []
    for block in re.findall(rf"```{kind}\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[-1] == "&":
                words = words[:-1]
            if words:
                commands.append(words)
    return commands


def readme_inline_commands() -> list[list[str]]:
    """Commands quoted inline in the README's text (`python -m ... --flag ...`), line breaks joined."""
    spans = re.findall(r"`((?:python -m|saved_model_cli) [^`]+)`", open(README).read())
    return [shlex.split(" ".join(span.split())) for span in spans if "--" in span]


def readme_json_blocks() -> list[str]:
    return re.findall(r"```json\n(.*?)```", open(README).read(), flags=re.S)


class _Parsed(Exception):
    def __init__(self, namespace, extras):
        super().__init__("parsed")
        self.namespace, self.extras = namespace, extras


@contextlib.contextmanager
def _stop_after_parsing():
    """Makes argparse raise `_Parsed` with its result instead of letting the command do its work."""
    original = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = original(self, args, namespace)
        raise _Parsed(namespace, extras)

    argparse.ArgumentParser.parse_known_args = parse_known_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_known_args = original


def _check_repo_paths(args: list[str]) -> None:
    for value in args:
        for path in re.findall(r"(?:^|=|@)((?:configs|docs)/[\w./-]+)", value):
            assert os.path.exists(os.path.join(ROOT, path)), f"README names {path}, which does not exist"


def _parse_module(module: str, args: list[str]):
    """Parses a `python -m module ...` command as the module would, and checks its configs; does no work."""
    _check_repo_paths(args)
    if module == "pipeline.run":
        from apache_beam.options.pipeline_options import PipelineOptions

        from pipeline.run import parse_args

        cfg, output_dir, beam_args = parse_args(args)  # loads and validates the config
        known = PipelineOptions(beam_args).get_all_options(drop_default=True)
        for flag in (a.split("=")[0][2:] for a in beam_args if a.startswith("--")):
            assert flag in known, f"{flag}: not a Beam pipeline option"
        return cfg
    if module == "dnr_tf.train":
        from dnr_tf.train import parse_args

        return parse_args(args)[0]  # loads and validates the config
    main = importlib.import_module(module).main
    with _stop_after_parsing(), pytest.raises(_Parsed) as parsed:
        main(args)
    assert not parsed.value.extras, f"{module}: unknown arguments {parsed.value.extras}"
    if module == "dnr_tf.experiments":
        from dnr_tf.experiments import load_plan

        load_plan(parsed.value.namespace.plan, parsed.value.namespace.data_dir)
    return parsed.value.namespace


def _parse_script(path: str, args: list[str]):
    _check_repo_paths([path, *args])
    old = sys.argv
    sys.argv = [path, *args]
    try:
        with _stop_after_parsing(), pytest.raises(_Parsed) as parsed:
            runpy.run_path(os.path.join(ROOT, path), run_name="__main__")
    finally:
        sys.argv = old
    assert not parsed.value.extras
    return parsed.value.namespace


CHEAP = {("dnr_tf.train", "--list_keys"), ("pipeline.run", "--list_keys")}


def test_every_readme_command_parses_or_runs(capsys):
    commands = readme_commands() + readme_inline_commands()
    kinds = set()
    make_targets = open(os.path.join(ROOT, "Makefile")).read()
    for words in commands:
        while re.match(r"^[A-Z_]+=", words[0]):  # an environment variable for the command
            name, value = words.pop(0).split("=", 1)
            if name == "TF_CONFIG":
                assert json.loads(value)["task"]["type"] in ("worker", "chief")
        head = words[0]
        if head == "python" and words[1] == "-m":
            module, args = words[2], words[3:]
            kinds.add(module)
            if (module, *args) in CHEAP:  # runs: prints and exits 0
                with pytest.raises(SystemExit) as stop:
                    importlib.import_module(module).main(args)
                assert stop.value.code == 0 and "=" in capsys.readouterr().out
            else:
                _parse_module(module, args)
        elif head == "python":
            kinds.add(words[1])
            _parse_script(words[1], words[2:])
        elif head == "make":
            assert re.search(rf"^{re.escape(words[1])}:", make_targets, flags=re.M), f"no make target {words[1]}"
            kinds.add("make")
        elif head == "pip":  # the README's install by hand is the Makefile's, step for step
            step = " ".join(shlex.quote(w) for w in words[2:])
            assert f"pip install --quiet {step}" in make_targets, f"the Makefile does not install {step}"
            kinds.add(head)
        elif head == "tensorboard":
            assert words[1:] == ["--logdir", "runs"]  # the demo's hint and `make tensorboard` say the same
            assert os.path.exists(os.path.join(os.path.dirname(sys.executable), "tensorboard"))
            kinds.add(head)
        elif head in ("docker", "curl"):  # TF Serving is not run here: the files they name exist
            _check_repo_paths(words)
            kinds.add(head)
        elif head == "saved_model_cli":  # run on a real export in test_export.py
            kinds.add(head)
        else:
            pytest.fail(f"README command of an unknown kind (teach tests/test_readme.py to check it): {words}")
    assert {"pipeline.run", "dnr_tf.train", "dnr_tf.export", "dnr_tf.evaluate", "dnr_tf.experiments"} <= kinds
    assert {"bench.serving", "docs/serving/grpc_client.py", "make", "saved_model_cli", "pip"} <= kinds


def test_a_wrong_flag_in_the_readme_would_fail():
    """The parse check is not a formality: a misspelled flag or a missing config fails it."""
    with pytest.raises(SystemExit):
        _parse_module("dnr_tf.export", ["--model_dir", "runs/x", "--exportdir", "saved_models/x"])
    with pytest.raises(AssertionError, match="not a Beam pipeline option"):
        _parse_module("pipeline.run", ["--output_dir", "data/x", "--direct_num_worker", "2"])
    with pytest.raises(AssertionError, match="does not exist"):
        _parse_module("dnr_tf.evaluate", ["--model", "m", "--data_dir", "d", "--config", "configs/nope.yaml"])


def test_the_readme_logged_list_runs_through_the_logged_command(tmp_path):
    """The README's JSONL example, three requests of it, through its `--source logged` command."""
    (example,) = [b for b in readme_json_blocks() if '"candidates"' in b]
    base = json.loads(example)
    lines = [json.dumps({**base, "request_id": f"r{i}", "timestamp": base["timestamp"] + i}) for i in range(3)]
    (tmp_path / "lists-0.jsonl").write_text("\n".join(lines) + "\n")
    (command,) = [w for w in readme_commands() if w[:3] == ["python", "-m", "pipeline.run"] and "logged" in w]
    args = command[3:]
    args[args.index("--input") + 1] = str(tmp_path / "lists-*.jsonl")
    args[args.index("--output_dir") + 1] = str(tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.run", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == "", "quiet by default: no TensorFlow or Beam log lines"
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert {s: stats["splits"][s]["lists"] for s in ("train", "valid", "test")} == {"train": 1, "valid": 1, "test": 1}
    assert "lists: 3 lists read, 0 without positive dropped, 3 kept" in done.stdout
    assert (tmp_path / "out" / "schema.pbtxt").exists()
