"""SavedModel export: serves in a fresh process without dnr_tf, matches the in-memory model, rejects bad input."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from dnr_tf import schema as S
from dnr_tf.evaluate import evaluate
from dnr_tf.export import WARMUP_FILE, next_version, read_examples
from dnr_tf.runs import load_trained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


@pytest.fixture(scope="module")
def exported(smoke_run):
    """The session's smoke run (conftest.py), its export and its best model loaded back."""
    model, _, schema = load_trained(str(smoke_run["run"]))
    return {
        "path": smoke_run["export"],
        "run": smoke_run["run"],
        "model": model,
        "schema": schema,
        "data_dir": smoke_run["data_dir"],
    }


def _dense_batch(data_dir, n=8):
    from dnr_tf import data as data_lib

    batch = next(iter(data_lib.make_dataset(data_lib.split_pattern(data_dir, "test"), n)))
    return {key: batch[key].numpy() for key in (S.ITEM_IDS, S.RETRIEVER_SCORES, S.HISTORY, S.USER_ID)}


# A script for a fresh process that cannot import this project (as TF Serving would load the export).
_WITHOUT_DNR_TF = textwrap.dedent(
    """
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("dnr_tf", "pipeline"):
                raise ImportError("the export must not need " + name)
    sys.meta_path.insert(0, Block())
    import numpy as np, tensorflow as tf
    def read_examples(path):  # _write_examples' framing: a 4-byte length before each record
        raw, ex, i = open(path, "rb").read(), [], 0
        while i < len(raw):
            n = int.from_bytes(raw[i:i + 4], "little"); ex.append(raw[i + 4:i + 4 + n]); i += 4 + n
        return ex
    """
)


def _write_examples(path, examples):
    path.write_bytes(b"".join(len(e).to_bytes(4, "little") + e for e in examples))


def _run_without_dnr_tf(script, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


def _expected(model, dense, k=6):
    logits = np.asarray(model({key: dense[key] for key in (S.ITEM_IDS, S.RETRIEVER_SCORES, S.HISTORY)}))
    mask = dense[S.ITEM_IDS] != 0
    scores = np.where(mask, 1 / (1 + np.exp(-logits)), 0.0)
    top = np.argsort(-np.where(mask, logits, -np.inf), axis=1, kind="stable")[:, :k]
    return scores, top


@pytest.fixture(scope="module")
def fresh_process(exported, tmp_path_factory):
    """The requests of the three fresh-process tests below, answered by one process that cannot
    import dnr_tf (as TF Serving loads an export): the default export and, made here, the
    `--jit_compile` one. One TensorFlow import and one load of each export serve all three tests."""
    from dnr_tf.export import main

    tmp = tmp_path_factory.mktemp("fresh_process")
    assert main(["--model_dir", str(exported["run"]), "--export_dir", str(tmp / "xla"), "--jit_compile"]) == 0
    xla = str(tmp / "xla" / "1")

    # test_fresh_process_without_dnr_tf: four test lists, through both signatures.
    dense4 = _dense_batch(exported["data_dir"], 4)
    np.savez(tmp / "fresh.npz", **dense4)
    _write_examples(tmp / "fresh.bin", read_examples(str(exported["data_dir"]), "test", 4))

    # test_a_repeated_item_enters_the_top_k_once_in_a_fresh_process: one item three times in one request.
    dense1 = _dense_batch(exported["data_dir"], 1)
    a, b = (int(v) for v in dense1[S.ITEM_IDS][0, :2])
    ids = np.array([[a, a, a, b]], np.int64)
    scores = np.array([[0.9, 0.8, 0.7, 0.1]], np.float32)
    history = dense1[S.HISTORY][:1]
    example = tf.train.Example(
        features=tf.train.Features(
            feature={
                S.ITEM_IDS: tf.train.Feature(int64_list=tf.train.Int64List(value=ids[0].tolist())),
                S.RETRIEVER_SCORES: tf.train.Feature(float_list=tf.train.FloatList(value=scores[0].tolist())),
                S.HISTORY: tf.train.Feature(int64_list=tf.train.Int64List(value=history[0].tolist())),
            }
        )
    ).SerializeToString()
    np.savez(tmp / "repeat.npz", ids=ids, scores=scores, history=history)
    (tmp / "repeat.bin").write_bytes(example)

    # test_jit_compile_export_matches_the_default_in_a_fresh_process: full, short and long-history
    # requests, the examples and five bad requests, to both exports.
    dense = _dense_batch(exported["data_dir"], 8)
    c, d = (int(v) for v in dense[S.ITEM_IDS][0, :2])
    long_history = np.concatenate([dense[S.HISTORY][:1], [[c, d, 7]]], axis=1)
    np.savez(
        tmp / "jit.npz",
        **dense,
        short_ids=np.array([[c, c, 10**15, d]], np.int64),
        short_scores=np.array([[0.2, 0.9, 0.5, 0.5]], np.float32),
        long_history=long_history,
    )
    examples8 = read_examples(str(exported["data_dir"]), "test", 8)
    _write_examples(tmp / "jit.bin", examples8)

    script = _WITHOUT_DNR_TF + textwrap.dedent(
        f"""
        out = {{}}
        m = tf.saved_model.load({exported["path"]!r})

        d = np.load({str(tmp / "fresh.npz")!r})
        a = m.signatures["predict_lists"](item_ids=tf.constant(d["item_ids"]),
            retriever_scores=tf.constant(d["retriever_scores"]), history=tf.constant(d["history"]),
            user_id=tf.constant(d["user_id"]))
        b = m.signatures["serving_default"](examples=tf.constant(read_examples({str(tmp / "fresh.bin")!r})))
        out.update({{"fresh/a": a["scores"].numpy(), "fresh/b": b["scores"].numpy(),
                    "fresh/ids": a["top_k_item_ids"].numpy()}})

        d = np.load({str(tmp / "repeat.npz")!r})
        a = m.signatures["predict_lists"](item_ids=tf.constant(d["ids"]), retriever_scores=tf.constant(d["scores"]),
            history=tf.constant(d["history"]), user_id=tf.constant([1], tf.int64))
        ex = open({str(tmp / "repeat.bin")!r}, "rb").read()
        b = m.signatures["serving_default"](examples=tf.constant([ex]))
        out.update({{"repeat/" + p + k: o[k].numpy() for p, o in (("a_", a), ("b_", b)) for k in o}})

        d = np.load({str(tmp / "jit.npz")!r})
        ex = read_examples({str(tmp / "jit.bin")!r})
        def lists(m, ids, scores, history):
            return m.signatures["predict_lists"](item_ids=tf.constant(ids), retriever_scores=tf.constant(scores),
                history=tf.constant(history), user_id=tf.ones([len(ids)], tf.int64))
        for name, m in (("plain", m), ("xla", tf.saved_model.load({xla!r}))):
            calls = {{
                "full": lists(m, d["item_ids"], d["retriever_scores"], d["history"]),
                "short": lists(m, d["short_ids"], d["short_scores"], d["history"][:1]),
                "long_history": lists(m, d["item_ids"][:1], d["retriever_scores"][:1], d["long_history"]),
                "examples": m.signatures["serving_default"](examples=tf.constant(ex)),
            }}
            out.update({{f"{{name}}/{{c}}/{{k}}": v[k].numpy() for c, v in calls.items() for k in v}})
            bad = [
                (d["short_ids"], d["short_scores"] + 1.0, d["history"][:1]),  # a score above 1
                (np.ones((1, 60), np.int64), np.full((1, 60), 0.5, np.float32), d["history"][:1]),  # too long
                (d["short_ids"], d["short_scores"][:, :3], d["history"][:1]),  # shapes differ
                (-d["short_ids"], d["short_scores"], d["history"][:1]),  # negative ids
                (d["short_ids"], d["short_scores"], d["history"][:2]),  # two history rows for one list
            ]
            refused = []
            for args in bad:
                try:
                    lists(m, *args)
                    refused.append("")
                except tf.errors.InvalidArgumentError as e:
                    refused.append([line for line in e.message.splitlines() if "assertion failed" in line][0])
            out[name + "/refused"] = np.array(refused)
        out["fresh/dnr_tf_modules"] = np.array(sum(k.startswith(("dnr_tf", "pipeline")) for k in sys.modules))
        np.savez({str(tmp / "out.npz")!r}, **out)
        """
    )
    _run_without_dnr_tf(script, tmp)
    return {
        "out": dict(np.load(tmp / "out.npz")),
        "xla": xla,
        "dense4": dense4,
        "repeated": (a, b),
        "examples8": examples8,
        "long_history_len": long_history.shape[1],
    }


def test_versions_layout_and_warmup(exported):
    path = exported["path"]
    assert os.path.basename(path) == "1" and os.path.exists(os.path.join(path, "saved_model.pb"))
    assert next_version(os.path.dirname(path)) == 2
    from tensorflow_serving.apis import prediction_log_pb2

    records = list(tf.data.TFRecordDataset(os.path.join(path, "assets.extra", WARMUP_FILE)))
    assert records
    for raw in records:
        log = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        assert log.predict_log.request.model_spec.signature_name == "serving_default"
        examples = tf.make_ndarray(log.predict_log.request.inputs["examples"])
        assert len(examples) >= 1 and tf.train.Example.FromString(examples[0]).features.feature[S.ITEM_IDS]
    info = json.load(open(os.path.join(path, "assets.extra", "dnr_export.json")))
    assert info["k"] == 6 and info["list_size"] == 50 and info["dnr"] is True
    # The generator is training-only: none of its variables is exported.
    names = [name for name, _ in tf.train.list_variables(os.path.join(path, "variables", "variables"))]
    assert names and not any("generator" in name for name in names)


def test_signatures_match_the_in_memory_model(exported):
    loaded = tf.saved_model.load(exported["path"])
    dense = _dense_batch(exported["data_dir"])
    scores, top = _expected(exported["model"], dense)
    out = loaded.signatures["predict_lists"](
        item_ids=tf.constant(dense[S.ITEM_IDS]),
        retriever_scores=tf.constant(dense[S.RETRIEVER_SCORES]),
        history=tf.constant(dense[S.HISTORY]),
        user_id=tf.constant(dense[S.USER_ID]),
    )
    np.testing.assert_allclose(out["scores"].numpy(), scores, atol=1e-5)
    np.testing.assert_array_equal(out["top_k_indices"].numpy(), top)
    np.testing.assert_array_equal(out["top_k_item_ids"].numpy(), np.take_along_axis(dense[S.ITEM_IDS], top, 1))
    examples = read_examples(str(exported["data_dir"]), "test", 8)
    out2 = loaded.signatures["serving_default"](examples=tf.constant(examples))
    np.testing.assert_allclose(out2["scores"].numpy(), scores, atol=1e-5)


def test_fresh_process_without_dnr_tf(exported, fresh_process):
    """Both signatures of the default export, in a process that cannot import dnr_tf, give the
    in-memory model's scores and top K."""
    out, dense = fresh_process["out"], fresh_process["dense4"]
    assert out["fresh/dnr_tf_modules"] == 0, "the process imported dnr_tf or pipeline"
    scores, top = _expected(exported["model"], dense)
    np.testing.assert_allclose(out["fresh/a"], scores, atol=1e-5)
    np.testing.assert_allclose(out["fresh/b"], scores, atol=1e-5)
    np.testing.assert_array_equal(out["fresh/ids"], np.take_along_axis(dense[S.ITEM_IDS], top, 1))


def test_saved_model_cli_show_and_run(exported):
    """The README's own `saved_model_cli` command lines, on this export (only `--dir` replaced)."""
    from tests.test_readme import readme_commands, readme_inline_commands

    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    lines = {w[1]: w for w in readme_commands() + readme_inline_commands() if w[0] == "saved_model_cli"}
    assert set(lines) == {"show", "run"}

    def as_run(words):
        words = [cli, *words[1:]]
        words[words.index("--dir") + 1] = exported["path"]
        return words

    show = subprocess.run(as_run(lines["show"]), capture_output=True, text=True, check=True)
    for name in ("serving_default", "predict_lists", "examples", "scores", "top_k_item_ids", "top_k_indices"):
        assert name in show.stdout
    run = subprocess.run(as_run(lines["run"]), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    indices = lines[lines.index("Result for output key top_k_indices:") + 1]
    ids = lines[lines.index("Result for output key top_k_item_ids:") + 1]
    numbers = [int(v) for v in indices.strip("[] ").split()]
    assert sorted(numbers[:3]) == [0, 1, 2] and numbers[3:] == [-1, -1, -1], indices
    assert (
        sorted(int(v) for v in ids.strip("[] ").split()[:3]) == [1, 2, 3] and ids.strip("[] ").split()[3:] == ["0"] * 3
    )


def _call(loaded, ids, scores, history=None):
    ids = np.asarray(ids, np.int64)
    history = np.zeros((len(ids), 3), np.int64) if history is None else history
    return loaded.signatures["predict_lists"](
        item_ids=tf.constant(ids),
        retriever_scores=tf.constant(np.asarray(scores, np.float32)),
        history=tf.constant(history),
        user_id=tf.constant(np.ones(len(ids), np.int64)),
    )


def test_bad_inputs_name_the_problem(exported):
    loaded = tf.saved_model.load(exported["path"])
    with pytest.raises(tf.errors.InvalidArgumentError, match="retriever_scores"):
        _call(loaded, [[1, 2, 3]], [[0.5, float("nan"), 0.1]])
    with pytest.raises(tf.errors.InvalidArgumentError, match="retriever_scores"):
        _call(loaded, [[1, 2, 3]], [[0.5, 1.5, 0.1]])
    with pytest.raises(tf.errors.InvalidArgumentError, match="more candidates than the model was trained for"):
        _call(loaded, np.ones((1, 60)), np.full((1, 60), 0.5))
    with pytest.raises(tf.errors.InvalidArgumentError, match="retriever_scores must have the shape of item_ids"):
        _call(loaded, [[1, 2, 3]], [[0.5, 0.1]])
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
        loaded.signatures["predict_lists"](
            item_ids=tf.constant([[1.0, 2.0]]),
            retriever_scores=tf.constant([[0.5, 0.5]]),
            history=tf.constant([[1]], tf.int64),
            user_id=tf.constant([1], tf.int64),
        )
    with pytest.raises(tf.errors.InvalidArgumentError):
        loaded.signatures["serving_default"](examples=tf.constant([b"not a tf.Example"]))


def test_short_lists_padding_and_unknown_ids(exported):
    loaded = tf.saved_model.load(exported["path"])
    out = _call(loaded, [[10**15, 3, 0, 0]], [[0.9, 0.4, 0.0, 0.0]])  # an unknown id and two padded slots
    scores = out["scores"].numpy()
    assert np.all(np.isfinite(scores)) and scores[0, 2] == 0.0 and scores[0, 3] == 0.0 and scores[0, 0] > 0
    assert sorted(out["top_k_indices"].numpy()[0, :2].tolist()) == [0, 1]
    assert out["top_k_indices"].numpy()[0, 2:].tolist() == [-1] * 4
    assert out["top_k_item_ids"].numpy()[0, 2:].tolist() == [0] * 4


def test_evaluate_export_equals_run(exported):
    from_export = evaluate(exported["path"], str(exported["data_dir"]), "test")
    from_run = evaluate(str(exported["run"]), str(exported["data_dir"]), "test")
    for key, value in from_run["metrics"]["model"].items():
        assert from_export["metrics"]["model"][key] == pytest.approx(value, abs=1e-6), key
    trained = json.load(open(exported["run"] / "metrics.json"))["test"]
    assert from_run["metrics"]["model"]["ndcg@6"] == pytest.approx(trained["ndcg@6"], abs=1e-5)
    assert from_run["metrics"]["retriever_order"]["ndcg@6"] > 0 and from_run["lists"] > 0


def test_serving_docs_artefacts_work(exported):
    """The README's REST body, gRPC request and models.config, checked against the export."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    docs = os.path.join(ROOT, "docs", "serving")
    loaded = tf.saved_model.load(exported["path"])
    body = json.load(open(os.path.join(docs, "predict_lists_request.json")))
    sig = loaded.signatures[body["signature_name"]]
    dtypes = {name: spec.dtype for name, spec in sig.structured_input_signature[1].items()}
    out = sig(**{name: tf.constant(value, dtypes[name]) for name, value in body["inputs"].items()})
    assert out["scores"].shape == (1, 6) and out["scores"].numpy()[0, 5] == 0.0

    sys.path.insert(0, docs)
    try:
        from grpc_client import build_request
    finally:
        sys.path.remove(docs)
    examples = read_examples(str(exported["data_dir"]), "test", 2)
    request = build_request(examples, "smoke")
    assert request.model_spec.signature_name == "serving_default"
    served = loaded.signatures["serving_default"](examples=tf.constant(tf.make_ndarray(request.inputs["examples"])))
    assert served["top_k_item_ids"].shape == (2, 6)

    config = text_format.Parse(
        open(os.path.join(docs, "models.config")).read(), model_server_config_pb2.ModelServerConfig()
    )
    assert [c.name for c in config.model_config_list.config] == ["ml100k_dnr_b", "ml100k_prm_concat"]


def test_train_with_export_flag(smoke_run, tmp_path):
    """`train --export` on a copy of the session's smoke run (the same command: nothing is trained,
    and the export is the one a fresh run makes at its end, `main`'s last step either way)."""
    from dnr_tf.train import main

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run["run"], run_dir)
    export_dir = tmp_path / "saved" / "smoke"
    args = ["--config", SMOKE, "--data_dir", str(smoke_run["data_dir"]), "--model_dir", str(run_dir)]
    args += ["--export", str(export_dir)]
    assert main(args) == 0
    assert (export_dir / "1" / "saved_model.pb").exists()
    assert main(args) == 0, "a second run exports the next version"
    assert (export_dir / "2" / "saved_model.pb").exists()


def test_serving_bench_counts_the_flops_of_the_smoke_prm_by_hand(exported):
    from bench.serving import flops_per_list

    e, h, f, n = 16, 16, 32, 50  # configs/smoke.yaml: embedding, width, feed-forward; list size
    per_candidate = (
        2 * (e + h + 1) * h  # input projection of [item embedding, user state, x]
        + 3 * 2 * h * h  # query, key, value
        + 2 * 2 * n * h  # attention scores and weighted sum
        + 2 * h * h  # attention output
        + 2 * h * f * 2  # feed-forward
        + 2 * h * h  # output hidden layer
        + 2 * h  # logit
    )
    counted = flops_per_list(tf.saved_model.load(exported["path"]), n)
    assert counted["attention_blocks"] == 1
    assert counted["per_request"] == 2 * e * h  # the user state, once a list
    assert counted["per_list"] == n * per_candidate + 2 * e * h
    # bench.train_cost counts the same from the Keras model's weights (`.../kernel` paths, no `:0`).
    from bench.train_cost import step_flops_per_list

    assert step_flops_per_list(exported["model"], n) == counted["per_list"]


# --- issue 15: evaluate refuses what the model cannot represent; serving ranks a repeated item once -----------


def _hand_data(data_dir, list_size, lists=3, empty_test=False):
    """A pipeline output written by hand: `lists` records in each split (test empty on request)."""
    os.makedirs(data_dir, exist_ok=True)
    schema = S.RecordSchema(list_size=list_size, history_len=3)
    options = tf.io.TFRecordOptions(compression_type="GZIP")
    for split in ("train", "valid", "test"):
        with tf.io.TFRecordWriter(os.path.join(data_dir, f"{split}-00000-of-00001.tfrecord.gz"), options) as w:
            for j in range(0 if empty_test and split == "test" else lists):
                rec = {
                    S.REQUEST_ID: f"{split}{j}",
                    S.USER_ID: 1,
                    S.TIMESTAMP: j,
                    S.ITEM_IDS: list(range(1, list_size + 1)),
                    S.RETRIEVER_SCORES: [0.5] * list_size,
                    S.LABELS: [int(i == j) for i in range(list_size)],
                    S.HISTORY: [1],
                }
                w.write(S.to_example(rec, schema))
    S.write_schema(schema, str(data_dir))
    return str(data_dir)


def _eval_cli(model, data_dir, capsys, *extra):
    from dnr_tf.evaluate import main

    rc = main(["--model", str(model), "--data_dir", str(data_dir), "--output", os.devnull, *extra])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_evaluate_given_an_export_directory_names_its_versions(exported, capsys):
    parent = os.path.dirname(exported["path"])
    line = _eval_cli(parent, exported["data_dir"], capsys)
    version = os.path.basename(exported["path"])
    assert f"{parent} is neither a SavedModel" in line and f"give {exported['path']}" in line, line
    assert f"it holds export versions [{version}]" in line, line


def test_evaluate_refuses_k_outside_the_list(exported, capsys):
    for k in ("0", "51", "-1"):
        for model in (exported["run"], exported["path"]):
            line = _eval_cli(model, exported["data_dir"], capsys, "--k", k)
            assert f"--k {k} must be in [1, 50]" in line and "schema.json" in line, line


def test_evaluate_refuses_lists_longer_than_trained(exported, tmp_path, capsys):
    data = _hand_data(tmp_path / "long", list_size=60)
    for model in (exported["run"], exported["path"]):
        line = _eval_cli(model, data, capsys)
        assert "lists of 60 candidates" in line and "trained on lists of 50" in line and str(model) in line, line


def test_evaluate_refuses_an_empty_split(exported, tmp_path, capsys):
    data = _hand_data(tmp_path / "empty", list_size=50, empty_test=True)
    line = _eval_cli(exported["run"], data, capsys)
    assert "the test split of" in line and "holds no list" in line, line


def test_evaluate_names_a_corrupt_tfrecord_and_records_that_disagree_with_schema(exported, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(exported["data_dir"], data)
    (test_file,) = sorted(data.glob("test-*.tfrecord.gz"))
    raw = bytearray(test_file.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(64)
    test_file.write_bytes(bytes(raw))
    line = _eval_cli(exported["path"], data, capsys)
    assert f"{test_file} is corrupt" in line, line

    shutil.copy(exported["data_dir"] / test_file.name, test_file)
    schema = json.loads((data / "schema.json").read_text())
    schema["history_len"] = 7  # the records hold 20
    (data / "schema.json").write_text(json.dumps(schema))
    line = _eval_cli(exported["run"], data, capsys)
    assert f"{test_file} does not match {data}/schema.json" in line, line


@pytest.mark.parametrize("damage", ["variables_missing", "variables_truncated"])
def test_evaluate_refuses_a_corrupt_saved_model_in_one_line(exported, tmp_path, capsys, damage):
    import shutil

    model = tmp_path / "1"
    shutil.copytree(exported["path"], model)
    (data_file,) = sorted((model / "variables").glob("variables.data-*"))
    if damage == "variables_missing":
        shutil.rmtree(model / "variables")
    else:
        data_file.write_bytes(data_file.read_bytes()[:100])
    line = _eval_cli(model, exported["data_dir"], capsys)
    assert str(model) in line and "not a loadable SavedModel" in line, line


def test_evaluate_uses_the_runs_k(exported, tmp_path, capsys):
    import shutil

    import yaml

    from dnr_tf.evaluate import main

    run = tmp_path / "run_k3"
    shutil.copytree(exported["run"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"].update(k=3, monitor="ndcg@3")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert (
        main(["--model", str(run), "--data_dir", str(exported["data_dir"]), "--output", str(tmp_path / "e.json")]) == 0
    )
    out = capsys.readouterr().out
    assert "ndcg@3" in out and "nan" not in out.lower(), out
    assert json.loads((tmp_path / "e.json").read_text())["k"] == 3


def test_a_repeated_item_enters_the_top_k_once_in_a_fresh_process(fresh_process):
    """The same item three times in one request: both signatures rank it once, at its best copy."""
    out, (a, b) = fresh_process["out"], fresh_process["repeated"]
    for p in ("repeat/a_", "repeat/b_"):
        scores_out, top_ids, top_idx = out[p + "scores"][0], out[p + "top_k_item_ids"][0], out[p + "top_k_indices"][0]
        assert np.all(scores_out > 0)  # every copy is scored
        best_copy = int(np.argmax(scores_out[:3]))
        assert sorted(top_ids[:2].tolist()) == sorted([a, b]) and top_ids[2:].tolist() == [0] * 4, top_ids
        assert sorted(top_idx[:2].tolist()) == sorted([best_copy, 3]) and top_idx[2:].tolist() == [-1] * 4, top_idx


def test_warmup_without_tensorflow_serving(tmp_path, monkeypatch):
    """A plain `pip install -e .` has no tensorflow-serving-api: the warmup file is still written, and valid."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    from dnr_tf.export import write_warmup

    examples = [tf.train.Example().SerializeToString(), b"\x01" * 300, b"abc"]
    for name in [m for m in sys.modules if m.split(".")[0] == "tensorflow_serving"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorflow_serving", None)  # `import tensorflow_serving` now fails
    write_warmup(str(tmp_path / WARMUP_FILE), examples, model_name="m")
    monkeypatch.undo()
    records = [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / WARMUP_FILE))]
    expected = []
    for start in (0, 2):
        request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="m", signature_name="serving_default"))
        request.inputs["examples"].CopyFrom(tf.make_tensor_proto(examples[start : start + 2], dtype=tf.string))
        expected.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
    assert [prediction_log_pb2.PredictionLog.FromString(r) for r in records] == expected


def test_jit_compile_export_matches_the_default_in_a_fresh_process(exported, fresh_process):
    """`--jit_compile`: the ranking is one XLA cluster in the SavedModel, and a process without dnr_tf gets
    the default export's scores (1e-5) and top K (exactly) on full lists, a short list with a repeated and an
    unknown id, a history longer than the records', and `serving_default`; bad input is still refused."""
    from tensorflow.core.protobuf import saved_model_pb2

    path = fresh_process["xla"]
    assert json.load(open(os.path.join(path, "assets.extra", "dnr_export.json")))["jit_compile"] is True
    graph = saved_model_pb2.SavedModel.FromString(open(os.path.join(path, "saved_model.pb"), "rb").read())
    compiled = [f.signature.name for f in _xla_functions(graph) if any(n.op == "TopKV2" for n in f.node_def)]
    assert compiled, "no XLA-compiled function holds the top K"
    from dnr_tf.backbones.fused import _PROJECTION_EQUATION

    assert _PROJECTION_EQUATION not in _einsum_equations(graph.meta_graphs[0].graph_def), "not the fused attention"
    info = json.load(open(os.path.join(path, "assets.extra", "dnr_export.json")))
    assert info["item_tables"] is True and info["frozen_weights"] is True
    _assert_item_tables(graph, exported["model"].reranker, frozen=True)
    assert _xla_reads(graph) == [], "the compiled ranking reads no variable: its weights are constants"
    assert fresh_process["long_history_len"] == exported["schema"].history_len + 3

    out = fresh_process["out"]
    for call in ("full", "short", "long_history", "examples"):
        plain = {k: out[f"plain/{call}/{k}"] for k in ("scores", "top_k_item_ids", "top_k_indices")}
        xla = {k: out[f"xla/{call}/{k}"] for k in plain}
        assert xla["scores"].shape == plain["scores"].shape, call
        np.testing.assert_allclose(xla["scores"], plain["scores"], atol=1e-5, err_msg=call)
        np.testing.assert_array_equal(xla["top_k_indices"], plain["top_k_indices"], err_msg=call)
        np.testing.assert_array_equal(xla["top_k_item_ids"], plain["top_k_item_ids"], err_msg=call)
    assert out["xla/short/top_k_indices"][0, 3:].tolist() == [-1] * 3  # a, the unknown id and b: three distinct
    # Each bad request is refused by the same check, with the same message, as by the default export.
    assert out["xla/refused"].tolist() == out["plain/refused"].tolist()
    phrases = ["must be finite numbers in [0, 1]", "more candidates than", "must have the shape", ">= 0", "one row per"]
    for message, phrase in zip(out["xla/refused"].tolist(), phrases, strict=True):
        assert phrase in message, (phrase, message)

    from bench.serving import side_by_side

    loaded = tf.saved_model.load(exported["path"])  # the bench's bookkeeping, not XLA's speed: one export twice
    pair = {"model": loaded, "compare_model": loaded}
    side = side_by_side(pair, fresh_process["examples8"], [4], calls=10, seconds=0.2)
    for sig in ("predict_lists", "serving_default"):
        assert side["single_request_ms"][sig]["compare_model"]["p50"] > 0
        assert np.isfinite(side["speedup_compare_model_over_model"]["throughput"]["4"][sig])


def _einsum_equations(graph_def) -> set[str]:
    from dnr_tf.export import graph_nodes

    return {n.attr["equation"].s.decode() for n in graph_nodes(graph_def) if n.op == "Einsum"}


def test_the_export_traces_the_fused_attention(exported):
    """Both exports trace the reranker within `fused_inference()`: none of Keras' einsums projecting the
    query, key and value (`[batch, T, heads, key_dim]`, which then needs transposes) is left in the
    SavedModel, while the layer's own call, traced the same way outside the context, has them."""
    from tensorflow.core.protobuf import saved_model_pb2

    from dnr_tf.backbones.fused import _PROJECTION_EQUATION

    spec = {
        S.ITEM_IDS: tf.TensorSpec([None, None], tf.int64),
        S.RETRIEVER_SCORES: tf.TensorSpec([None, None], tf.float32),
        S.HISTORY: tf.TensorSpec([None, None], tf.int64),
    }
    reranker = exported["model"].reranker
    plain = tf.function(lambda f: reranker(f, training=False), input_signature=[spec]).get_concrete_function()
    assert _PROJECTION_EQUATION in _einsum_equations(plain.graph.as_graph_def())
    saved = saved_model_pb2.SavedModel.FromString(open(os.path.join(exported["path"], "saved_model.pb"), "rb").read())
    assert _PROJECTION_EQUATION not in _einsum_equations(saved.meta_graphs[0].graph_def)
    # The default export makes no tables of the items' projections (the XLA export does: below).
    assert not [name for name in _saved_variables(saved) if "_item_projection" in name]


def _saved_variables(saved) -> dict:
    """{name: shape} of a SavedModel's variables."""
    return {
        n.variable.name: [d.size for d in n.variable.shape.dim]
        for n in saved.meta_graphs[0].object_graph_def.nodes
        if n.WhichOneof("kind") == "variable"
    }


def _constants(saved) -> list:
    """Every constant of two or more dimensions in a SavedModel's functions (a frozen XLA export's weights)."""
    return [
        tf.make_ndarray(n.attr["value"].tensor)
        for f in saved.meta_graphs[0].graph_def.library.function
        for n in f.node_def
        if n.op == "Const" and len(n.attr["value"].tensor.tensor_shape.dim) >= 2
    ]


def _xla_functions(saved) -> list:
    """The SavedModel's XLA-compiled functions and the functions they call (what XLA compiles)."""
    library = {f.signature.name: f for f in saved.meta_graphs[0].graph_def.library.function}
    todo = [name for name, f in library.items() if f.attr["_XlaMustCompile"].b]
    found = {}
    while todo:
        f = library[todo.pop()]
        if f.signature.name not in found:
            found[f.signature.name] = f
            todo += [a.func.name for n in f.node_def for a in n.attr.values() if a.func.name in library]
    return list(found.values())


def _xla_reads(saved) -> list:
    """The variable reads in what XLA compiles."""
    functions = _xla_functions(saved)
    assert functions, "no XLA-compiled function"
    reads = ("ReadVariableOp", "ResourceGather", "VarHandleOp")
    return [n.name for f in functions for n in f.node_def if n.op in reads]


def _assert_item_tables(saved, reranker, frozen):
    """The candidates' share of the input projection, and PRM's first attention's query, key and value of
    every head: a table each, of every vocabulary row; saved as variables, or, in a frozen XLA export,
    constants of the compiled function (equal to the tables the export computes)."""
    from dnr_tf.backbones.fused import item_projection_tables

    want = [v.numpy() for v in item_projection_tables(reranker).values()]
    assert len(want) == 1 + 3 * reranker.blocks[0].attention._num_heads
    if frozen:
        constants = _constants(saved)
        for table in want:
            assert any(c.shape == table.shape and np.array_equal(c, table) for c in constants), table.shape
        assert not [name for name in _saved_variables(saved) if "_item_projection" in name], "saved twice"
        return
    saved_variables = _saved_variables(saved)
    embedding = reranker.encoder.items.embedding.embeddings
    hidden = reranker.encoder.projection.kernel.shape[-1]
    tables = [shape for name, shape in saved_variables.items() if name.endswith("_item_projection")]
    assert tables == [[embedding.shape[0], hidden]], saved_variables
    attention = reranker.blocks[0].attention
    heads = [shape for name, shape in saved_variables.items() if "_item_projection_" in name]
    assert heads == [[embedding.shape[0], attention._key_dim]] * (3 * attention._num_heads), saved_variables


def test_no_item_tables_export_saves_none_and_scores_the_same(exported, tmp_path, capsys):
    """`--jit_compile --no_item_tables`: no table of the items' projections in the SavedModel (for catalogues
    where their size, about 1 KB an item, matters), and the default export's scores and top K; without
    `--jit_compile` the flag is refused in one line, before any work."""
    from tensorflow.core.protobuf import saved_model_pb2

    from dnr_tf.export import main

    args = ["--model_dir", str(exported["run"]), "--export_dir", str(tmp_path / "small"), "--no_item_tables"]
    assert main(args) == 2
    assert "--no_item_tables applies to --jit_compile exports" in capsys.readouterr().err
    assert not (tmp_path / "small").exists()
    assert main([*args, "--jit_compile"]) == 0
    path = str(tmp_path / "small" / "1")
    assert json.load(open(os.path.join(path, "assets.extra", "dnr_export.json")))["item_tables"] is False
    assert json.load(open(os.path.join(exported["path"], "assets.extra", "dnr_export.json")))["item_tables"] is False
    saved = saved_model_pb2.SavedModel.FromString(open(os.path.join(path, "saved_model.pb"), "rb").read())
    names = list(_saved_variables(saved))
    assert names and not [name for name in names if "_item_projection" in name]
    # Nor among the constants its weights were frozen into (no table has the shape of one).
    assert json.load(open(os.path.join(path, "assets.extra", "dnr_export.json")))["frozen_weights"] is True
    from dnr_tf.backbones.fused import item_projection_tables

    shapes = {tuple(v.shape) for v in item_projection_tables(exported["model"].reranker).values()}
    embedding = tuple(exported["model"].reranker.encoder.items.embedding.embeddings.shape)
    frozen = [c.shape for c in _constants(saved)]
    assert embedding in frozen and not shapes - {embedding} & set(frozen), frozen

    dense = _dense_batch(exported["data_dir"], 8)
    inputs = {key: tf.constant(dense[key]) for key in (S.ITEM_IDS, S.RETRIEVER_SCORES, S.HISTORY)}
    outs = [
        tf.saved_model.load(p).signatures["predict_lists"](**inputs, user_id=tf.constant(dense[S.USER_ID]))
        for p in (path, exported["path"])
    ]
    np.testing.assert_allclose(outs[0]["scores"].numpy(), outs[1]["scores"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(outs[0]["top_k_item_ids"].numpy(), outs[1]["top_k_item_ids"].numpy())


def test_weights_over_the_freeze_limit_stay_variables_and_score_the_same(exported, tmp_path):
    """An XLA export whose weights exceed `freeze_limit_bytes` keeps them (and the tables) as variables
    that the compiled ranking reads, and gives the frozen export's scores (1e-5) and top K (exactly)."""
    from tensorflow.core.protobuf import saved_model_pb2

    from dnr_tf.export import export_model

    schema = exported["schema"]
    kwargs = {"k": 6, "list_size": schema.list_size, "jit_compile": True, "history_len": schema.history_len}
    paths = [
        export_model(exported["model"], str(tmp_path / name), freeze_limit_bytes=limit, **kwargs)
        for name, limit in (("variables", 0), ("frozen", 2**30))
    ]
    infos = [json.load(open(os.path.join(p, "assets.extra", "dnr_export.json"))) for p in paths]
    assert [info["frozen_weights"] for info in infos] == [False, True]
    saved = [saved_model_pb2.SavedModel.FromString(open(os.path.join(p, "saved_model.pb"), "rb").read()) for p in paths]
    _assert_item_tables(saved[0], exported["model"].reranker, frozen=False)
    assert len(_xla_reads(saved[0])) >= 8 and _xla_reads(saved[1]) == []

    dense = _dense_batch(exported["data_dir"], 8)
    inputs = {key: tf.constant(dense[key]) for key in (S.ITEM_IDS, S.RETRIEVER_SCORES, S.HISTORY, S.USER_ID)}
    outs = [tf.saved_model.load(p).signatures["predict_lists"](**inputs) for p in paths]
    np.testing.assert_allclose(outs[0]["scores"].numpy(), outs[1]["scores"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(outs[0]["top_k_item_ids"].numpy(), outs[1]["top_k_item_ids"].numpy())
    scores, _ = _expected(exported["model"], dense)
    np.testing.assert_allclose(outs[1]["scores"].numpy(), scores, atol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--export_dir", "{file}"], "is a file, not a directory"),
        (
            ["--export_dir", "{dir}", "--version", "-1"],
            "--version must be >= 0, not -1",
        ),
    ],
)
def test_export_refuses_a_file_as_export_dir_and_a_negative_version_in_one_line(
    exported, tmp_path, capsys, monkeypatch, args, message
):
    from dnr_tf import export as export_lib

    a_file = tmp_path / "a_file"
    a_file.write_text("a user's file\n")
    args = [a.format(file=a_file, dir=tmp_path / "exports") for a in args]
    # Refused before the run is loaded: nothing traced, nothing written, the file as it was.
    monkeypatch.setattr(export_lib, "load_trained", lambda *a, **k: pytest.fail("loaded before the check"))
    assert export_lib.main(["--model_dir", str(exported["run"]), *args]) == 2
    assert message in capsys.readouterr().err
    assert a_file.read_text() == "a user's file\n" and not (tmp_path / "exports").exists()


def test_evaluate_notes_data_of_another_item_vocabulary(exported, tmp_path, capsys):
    """The export records its run's item vocabulary; evaluating on data of another one (a later build, or
    another data set whose ids may name other items) says so in one line and in the JSON."""
    from dnr_tf.runs import read_vocab, vocab_signature

    info = json.loads(open(os.path.join(exported["path"], "assets.extra", "dnr_export.json")).read())
    assert info["item_vocab"] == vocab_signature(read_vocab(str(exported["run"])))
    same = {}
    for model in (exported["path"], str(exported["run"])):
        same[model] = evaluate(model, str(exported["data_dir"]))
        assert same[model]["item_vocab"]["same"] is True and "note:" not in capsys.readouterr().err
    other = tmp_path / "data"
    shutil.copytree(exported["data_dir"], other)
    items = read_vocab(str(other))
    (other / "item_vocab.txt").write_text("".join(f"{i}\n" for i in [*items[1:], 10**9, 10**9 + 1]))
    for model, unknown in ((exported["path"], ""), (str(exported["run"]), ", 2 of them unknown to the model")):
        result = evaluate(model, str(other))
        assert result["item_vocab"]["same"] is False
        err = capsys.readouterr().err
        assert f"was trained with another item vocabulary ({len(items)} items) than {other}'s " in err
        assert f"({len(items) + 1} items{unknown}): items it never saw score as unknown ones" in err
        # The note changes nothing of the figures: the records are the same lists.
        assert result["metrics"] == same[model]["metrics"]
