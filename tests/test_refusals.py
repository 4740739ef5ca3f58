"""Issue 15, classes 4-9: every bad config, input file or data set is refused with one line naming it,
before any work, or becomes a rejected record with its reason. Fast: tiny files written here."""

from __future__ import annotations

import gzip
import json
import math
import os

import pytest

from dnr_tf import config_io
from dnr_tf.config import ExperimentConfig
from pipeline.config import PipelineConfig


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    # A warning line may come first (e.g. lambda_e >= epochs); the error itself is one line.
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("warning: ")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


# --- class 7: every config key has its range ------------------------------------------------------------------

# (config class, dotted key, bad value, words the error must hold besides the key)
BAD_VALUES = [
    (ExperimentConfig, "name", "", "empty"),
    (ExperimentConfig, "model.embedding_dim", 0, "positive"),
    (ExperimentConfig, "model.hidden_dim", -4, "positive"),
    (ExperimentConfig, "model.num_layers", 0, ">= 1"),
    (ExperimentConfig, "model.num_heads", 0, ">= 1"),
    (ExperimentConfig, "model.ffn_dim", 0, ">= 1"),
    (ExperimentConfig, "model.dnn_layers", [64, 0], ">= 1"),
    (ExperimentConfig, "model.dropout", 1.0, "[0, 1)"),
    (ExperimentConfig, "model.dropout", float("nan"), "finite"),
    (ExperimentConfig, "model.num_inducing", 0, ">= 1"),
    (ExperimentConfig, "model.caser_window", 0, ">= 1"),
    (ExperimentConfig, "model.caser_heights", [], "empty"),
    (ExperimentConfig, "model.caser_heights", [9], "caser_window"),
    (ExperimentConfig, "model.caser_filters", 0, ">= 1"),
    (ExperimentConfig, "model.caser_vertical", 0, ">= 1"),
    (ExperimentConfig, "model.geneval_k", 0, ">= 1"),
    (ExperimentConfig, "model.geneval_proposals", 0, ">= 1"),
    (ExperimentConfig, "model.geneval_train_samples", -1, ">= 0"),
    (ExperimentConfig, "dnr.lambda_m", -0.1, ">= 0"),
    (ExperimentConfig, "dnr.lambda_m", float("inf"), "finite"),
    (ExperimentConfig, "dnr.lambda_c", 1.0, "(0, 1)"),
    (ExperimentConfig, "dnr.lambda_c", float("nan"), "finite"),
    (ExperimentConfig, "dnr.beta_alpha", 0.0, "positive"),
    (ExperimentConfig, "dnr.beta_beta", -1.0, "positive"),
    (ExperimentConfig, "dnr.lambda_e", -1, ">= 0"),
    (ExperimentConfig, "dnr.weight_x", -1.0, ">= 0"),
    (ExperimentConfig, "dnr.generator_steps", 0, ">= 1"),
    (ExperimentConfig, "dnr.generator_hidden", 0, ">= 1"),
    (ExperimentConfig, "dnr.generator_embedding_dim", 0, ">= 1"),
    (ExperimentConfig, "dnr.generator_noise_dim", 0, ">= 1"),
    (ExperimentConfig, "dnr.generator_learning_rate", -1e-3, "positive"),
    (ExperimentConfig, "dnr.generator_learning_rate", float("nan"), "finite"),
    (ExperimentConfig, "train.epochs", 0, ">= 1"),
    (ExperimentConfig, "train.batch_size", 0, ">= 1"),
    (ExperimentConfig, "train.learning_rate", 0.0, "positive"),
    (ExperimentConfig, "train.learning_rate", float("inf"), "finite"),
    (ExperimentConfig, "train.weight_decay", -0.1, ">= 0"),
    (ExperimentConfig, "train.k", 0, ">= 1"),
    (ExperimentConfig, "train.k", 10, "ndcg@10"),  # monitor ndcg@6 is not a metric of a k=10 run
    (ExperimentConfig, "train.monitor", "loss", "not a metric"),
    (ExperimentConfig, "train.seed", -1, "[0, 4294967295]"),
    (ExperimentConfig, "train.seed", 2**32, "[0, 4294967295]"),
    (ExperimentConfig, "train.shuffle_buffer", 0, ">= 1"),
    (ExperimentConfig, "train.steps_per_epoch", -1, ">= 1"),
    (ExperimentConfig, "train.steps_per_epoch", 0, ">= 1"),
    (PipelineConfig, "min_count", 0, ">= 1"),
    (PipelineConfig, "kcore_max_iters", 0, ">= 1"),
    (PipelineConfig, "retriever_fraction", 1.0, "(0, 1)"),
    (PipelineConfig, "retriever_fraction", float("nan"), "finite"),
    (PipelineConfig, "stride", 0, ">= 1"),
    (PipelineConfig, "history_len", 0, ">= 1"),
    (PipelineConfig, "list_size", 0, ">= 1"),
    (PipelineConfig, "horizon", 0, ">= 1"),
    (PipelineConfig, "k", 0, "list_size"),
    (PipelineConfig, "paper_retriever_fraction", 0.0, "(0, 1)"),
    (PipelineConfig, "seed", -1, "[0, 4294967295]"),
    (PipelineConfig, "output_shards", 0, ">= 1"),
    (PipelineConfig, "max_reject_share", 1.5, "[0, 1]"),
    (PipelineConfig, "retriever.dim", 0, "positive"),
    (PipelineConfig, "retriever.epochs", 0, "positive"),
    (PipelineConfig, "retriever.batch_size", 0, ">= 1"),
    (PipelineConfig, "retriever.negatives", 0, "positive"),
    (PipelineConfig, "retriever.learning_rate", 0.0, "positive"),
    (PipelineConfig, "retriever.learning_rate", float("nan"), "finite"),
    (PipelineConfig, "retriever.l2", -1e-5, ">= 0"),
    (PipelineConfig, "retriever.holdout_fraction", 0.5, "(0, 0.5)"),
    (PipelineConfig, "retriever.window_shards", 0, ">= 1"),
    (PipelineConfig, "retriever.shuffle_buffer", 0, ">= 1"),
    (PipelineConfig, "synthetic.num_users", 0, "positive"),
    (PipelineConfig, "synthetic.num_items", 0, "positive"),
    (PipelineConfig, "synthetic.dim", 0, ">= 1"),
    (PipelineConfig, "synthetic.requests_per_user", 2, ">= 3"),
    (PipelineConfig, "synthetic.retriever_noise", -0.1, ">= 0"),
    (PipelineConfig, "synthetic.popularity", -0.1, ">= 0"),
    (PipelineConfig, "synthetic.base_logit", float("-inf"), "finite"),
    (PipelineConfig, "synthetic.taste_scale", -1.0, ">= 0"),
]


def _nested(key: str, value) -> dict:
    data: dict = {}
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return data


@pytest.mark.parametrize("cls,key,value,words", BAD_VALUES, ids=[f"{k}={v}" for _, k, v, _ in BAD_VALUES])
def test_every_key_out_of_range_is_refused_naming_it(cls, key, value, words):
    with pytest.raises(config_io.ConfigError) as info:
        config_io.from_dict(cls, _nested(key, value))
    message = str(info.value)
    assert key.split(".")[-1] in message and words in message, message
    assert "\n" not in message


def test_list_size_zero_names_list_size_not_k():
    with pytest.raises(config_io.ConfigError, match=r"^list_size must be >= 1"):
        config_io.from_dict(PipelineConfig, {"list_size": 0})


@pytest.mark.parametrize("text", ["1e-4", "1E-4", "+1e-4", ".0001", "0.0001"])
def test_numbers_parse_as_users_write_them(text, tmp_path):
    overridden = config_io.apply_overrides({}, [f"train.learning_rate={text}", f"dnr.generator_learning_rate={text}"])
    cfg = config_io.from_dict(ExperimentConfig, overridden)
    assert cfg.train.learning_rate == cfg.dnr.generator_learning_rate == pytest.approx(1e-4)
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  learning_rate: {text}\n")
    assert config_io.from_dict(ExperimentConfig, config_io.load_yaml(str(path))).train.learning_rate == 1e-4
    with pytest.raises(config_io.ConfigError, match="train.learning_rate must be a number, not '1e-4x'"):
        config_io.from_dict(ExperimentConfig, {"train": {"learning_rate": "1e-4x"}})


def test_yaml_nan_and_inf_are_refused(tmp_path):
    for text in (".nan", ".inf", "-.inf"):
        path = tmp_path / "c.yaml"
        path.write_text(f"dnr:\n  lambda_m: {text}\n")
        with pytest.raises(config_io.ConfigError, match="dnr.lambda_m must be a finite number"):
            config_io.from_dict(ExperimentConfig, config_io.load_yaml(str(path)))


# --- class 8: a binary or directory --config, an output directory that is a file --------------------------------


@pytest.mark.parametrize("kind", ["binary", "directory", "bad_yaml"])
def test_unreadable_config_is_one_line_naming_it(kind, tmp_path, capsys):
    from dnr_tf.train import main as train_main
    from pipeline.run import main as pipeline_main

    path = tmp_path / "config.yaml"
    if kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_text("train:\n  k: [1,\n")
    for main in (train_main, pipeline_main):
        argv = ["--config", str(path), "--data_dir", str(tmp_path), "--model_dir", str(tmp_path / "run")]
        if main is pipeline_main:
            argv = ["--config", str(path), "--output_dir", str(tmp_path / "out")]
        assert main(argv) == 2
        line = _one_line_error(capsys)
        assert str(path) in line, line


def test_pipeline_output_dir_that_is_a_file_is_refused_before_work(tmp_path, capsys):
    from pipeline.run import main

    target = tmp_path / "out"
    target.write_text("a user's file\n")
    assert main(["--output_dir", str(target), "--set", "synthetic.num_users=20"]) == 2
    line = _one_line_error(capsys)
    assert f"--output_dir {target} is a file" in line
    assert target.read_text() == "a user's file\n"
    assert main(["--output_dir", str(target / "sub"), "--set", "synthetic.num_users=20"]) == 2
    assert f"{target} is a file" in _one_line_error(capsys)


# --- class 6 and 9: bad records in the shared reading code and the parsers ------------------------------------


def test_truncated_gzip_is_one_line_naming_the_file_before_the_run(tmp_path, capsys):
    from pipeline.run import main
    from pipeline.sources import files

    text = "".join(f"{u}\t{i}\t3\t{880000000 + i}\n" for u in range(1, 40) for i in range(1, 40)).encode()
    packed = gzip.compress(text)
    path = tmp_path / "u.data"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(files.InputFileError, match=f"{path}: gzip stream truncated or corrupt after line"):
        list(files.numbered_lines(str(path)))
    out = tmp_path / "out"
    assert main(["--source", "movielens", "--input", str(path), "--output_dir", str(out)]) == 2
    line = _one_line_error(capsys)
    assert str(path) in line and "truncated or corrupt" in line, line
    assert not out.exists()  # refused before any work


def test_a_line_longer_than_the_limit_is_a_reject_and_the_next_line_reads(tmp_path):
    from pipeline.sources import files

    path = tmp_path / "in.txt"
    path.write_bytes(b"good 1\n" + b"x" * 5000 + b"\ngood 2\n")
    lines = list(files.numbered_lines(str(path), max_line_bytes=1000))
    assert lines == [(1, "good 1", None), (2, None, "line longer than 1000 bytes"), (3, "good 2", None)]


def test_csv_field_over_the_csv_limit_is_a_rejected_record():
    from pipeline.sources.interactions import parse_csv

    huge = "9" * 200_000  # above csv.field_size_limit() (131072)
    lines = [(1, "user_id,item_id,timestamp", None), (2, f'1,"{huge}",5', None), (3, "1,2,5", None)]
    out = list(parse_csv("in.csv", iter(lines)))
    assert out[0]["line"] == 2 and "not a valid CSV line" in out[0]["reason"] and "field larger" in out[0]["reason"]
    assert (out[1].user, out[1].item, out[1].timestamp) == (1, 2, 5)


def test_json_nested_200000_deep_and_huge_integers_are_rejected_records():
    from pipeline.sources.logged import parse_logged

    good = json.dumps(
        {
            "request_id": "r",
            "user_id": 1,
            "timestamp": 5,
            "history": [],
            "candidates": [{"item_id": 3, "retriever_score": 0.5, "label": 1}],
        }
    )
    deep = "[" * 200_000 + "]" * 200_000
    digits = '{"user_id": ' + "7" * 5000 + "}"
    out = list(parse_logged(10)("lists.jsonl", iter([(1, deep, None), (2, digits, None), (3, good, None)])))
    assert out[0]["line"] == 1 and "nested too deeply" in out[0]["reason"]
    assert out[1]["line"] == 2 and "not valid JSON here" in out[1]["reason"]
    assert out[2][1] == ("lists.jsonl", 3)


@pytest.mark.parametrize(
    "field,value,reason",
    [
        ("timestamp", "-0.5", "timestamp -0.5 is negative"),
        ("timestamp", "-1e-9", "is negative"),
        ("user", "1" * 5000, "does not fit in int64"),
        ("item", "-" + "2" * 5000, "does not fit in int64"),
    ],
)
def test_interaction_fields_are_rejected_not_misread(field, value, reason):
    from pipeline.sources.interactions import make_interaction

    fields = {"user": "1", "item": "2", "timestamp": "5", field: value}
    out = make_interaction("u.data", 7, fields["user"], fields["item"], fields["timestamp"], "3")
    assert isinstance(out, dict) and out["line"] == 7 and reason in out["reason"], out


# --- class 5: one list per user ---------------------------------------------------------------------------------


def test_one_list_per_user_fails_the_pipeline_naming_the_empty_splits(tmp_path, capsys):
    from pipeline.run import main

    path = tmp_path / "lists.jsonl"
    rows = []
    for user in range(1, 21):
        cands = [{"item_id": i, "retriever_score": 0.5, "label": int(i == user % 5 + 1)} for i in range(1, 6)]
        rows.append({"request_id": f"r{user}", "user_id": user, "timestamp": user, "history": [], "candidates": cands})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--source", "logged", "--input", str(path), "--output_dir", str(tmp_path / "out"), "--set", "list_size=5"]
    assert main(argv + ["--set", "k=3"]) == 2
    line = _one_line_error(capsys)
    assert "the train and valid splits are empty (lists: train 0, valid 0, test 20)" in line, line


def _write_split(data_dir, split, records, schema):
    import tensorflow as tf

    from dnr_tf import schema as S

    options = tf.io.TFRecordOptions(compression_type="GZIP")
    with tf.io.TFRecordWriter(os.path.join(data_dir, f"{split}-00000-of-00001.tfrecord.gz"), options) as w:
        for rec in records:
            w.write(S.to_example(rec, schema))


def tiny_data(data_dir, list_size=5, lists=(4, 2, 2), history_len=3):
    """A pipeline output written by hand: `lists` records per split, items 1..list_size."""
    from dnr_tf import schema as S

    os.makedirs(data_dir, exist_ok=True)
    schema = S.RecordSchema(list_size=list_size, history_len=history_len, num_items=list_size, num_users=9)
    for split, n in zip(("train", "valid", "test"), lists):
        records = [
            {
                S.REQUEST_ID: f"{split}{j}",
                S.USER_ID: j + 1,
                S.TIMESTAMP: j,
                S.ITEM_IDS: list(range(1, list_size + 1)),
                S.RETRIEVER_SCORES: [1.0 - i / list_size for i in range(list_size)],
                S.LABELS: [int(i == j % list_size) for i in range(list_size)],
                S.HISTORY: [1, 2],
            }
            for j in range(n)
        ]
        _write_split(data_dir, split, records, schema)
    S.write_schema(schema, data_dir)
    with open(os.path.join(data_dir, "item_vocab.txt"), "w") as f:
        f.write("".join(f"{i}\n" for i in range(1, list_size + 1)))
    splits = {split: {"lists": n} for split, n in zip(("train", "valid", "test"), lists)}
    with open(os.path.join(data_dir, "stats.json"), "w") as f:
        json.dump({"splits": splits}, f)
    return schema


def _train_cfg():
    return config_io.from_dict(
        ExperimentConfig,
        {
            "model": {"embedding_dim": 4, "hidden_dim": 4, "ffn_dim": 4},
            "train": {"epochs": 1, "k": 3, "monitor": "ndcg@3"},
        },
    )


@pytest.mark.parametrize("split", ["train", "valid"])
def test_training_on_an_empty_split_refuses_with_one_line(split, tmp_path, capsys):
    from dnr_tf.train import train

    lists = {"train": (0, 2, 2), "valid": (4, 0, 2)}[split]
    tiny_data(tmp_path / "data", lists=lists)
    with pytest.raises(config_io.ConfigError, match=f"the {split} split of .* is empty"):
        train(_train_cfg(), str(tmp_path / "data"), str(tmp_path / "run"), verbose=0)
    assert not (tmp_path / "run").exists()  # refused before any work


def test_training_refuses_records_that_disagree_with_schema_json(tmp_path):
    from dnr_tf import schema as S
    from dnr_tf.train import train

    data = tmp_path / "data"
    schema = tiny_data(data)
    S.write_schema(S.RecordSchema(list_size=7, history_len=schema.history_len), str(data))  # records hold 5
    with pytest.raises(config_io.ConfigError, match=r"train-00000-of-00001.tfrecord.gz does not match .*schema.json"):
        train(_train_cfg(), str(data), str(tmp_path / "run"), verbose=0)


def test_training_refuses_a_model_dir_that_is_a_file(tmp_path):
    from dnr_tf.train import train

    tiny_data(tmp_path / "data")
    (tmp_path / "run").write_text("not a directory\n")
    with pytest.raises(config_io.ConfigError, match=f"--model_dir {tmp_path / 'run'} is a file"):
        train(_train_cfg(), str(tmp_path / "data"), str(tmp_path / "run"), verbose=0)


def test_train_table_uses_the_runs_k(capsys):
    from dnr_tf.train import print_table

    metrics = {"hit@3": 0.5, "ndcg@3": 0.4, "map@3": 0.3, "f1@3": 0.2, "auc": 0.6}
    print_table(
        {"k": 3, "best_epoch": 1, "monitor": "val_ndcg@3", "valid": metrics, "test": metrics, "seconds_per_epoch": []}
    )
    out = capsys.readouterr().out
    assert "ndcg@3" in out and "nan" not in out.lower(), out
    assert not any(math.isnan(v) for v in metrics.values())


def test_training_names_a_corrupt_tfrecord(tmp_path, capsys):
    from dnr_tf.train import main

    tiny_data(tmp_path / "data", lists=(40, 2, 2))
    path = tmp_path / "data" / "train-00000-of-00001.tfrecord.gz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 :] = bytes(len(raw) - len(raw) // 2)  # the second half zeroed: a gzip (or CRC) error
    path.write_bytes(bytes(raw))
    config = tmp_path / "c.yaml"
    config.write_text(
        "model: {embedding_dim: 4, hidden_dim: 4, ffn_dim: 4}\ntrain: {epochs: 1, k: 3, monitor: ndcg@3}\n"
    )
    argv = ["--config", str(config), "--data_dir", str(tmp_path / "data"), "--model_dir", str(tmp_path / "run")]
    assert main(argv) == 2
    line = _one_line_error(capsys)
    assert f"{path} is corrupt" in line, line


def test_the_multi_threaded_direct_runner_is_refused_before_work(tmp_path, capsys):
    """Beam's DirectRunner in `multi_threading` mode lost users in this pipeline's k-core (docs/scaling.md)."""
    from pipeline.run import main

    out = tmp_path / "out"
    args = ["--output_dir", str(out), "--set", "synthetic.num_users=20", "--direct_num_workers", "2"]
    assert main([*args, "--direct_running_mode", "multi_threading"]) == 2
    line = _one_line_error(capsys)
    assert "--direct_running_mode multi_threading" in line and "multi_processing" in line
    assert not out.exists()
