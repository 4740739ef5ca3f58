"""`python -m dnr_tf.evaluate`: the PROTOCOL.md metric table of a model on a pipeline split.

Example:
    python -m dnr_tf.evaluate --model saved_models/ml100k_dnr_b/1 --data_dir data/ml100k --split test

`--model` is either an export (any SavedModel with a `serving_default` signature that takes
serialized `tf.train.Example`s as `examples` and returns `scores`, so a model trained elsewhere is
compared on the same lists) or a run directory of `python -m dnr_tf.train` (its best weights).
The retriever's own order and a seeded random order are always reported beside it. The table is
printed and written as JSON (`--output`, by default `eval_<split>.json` in a run directory, or
`eval_<version>_<split>.json` beside an export, never inside the version folder).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from dnr_tf import config_io, quiet
from dnr_tf import schema as S

KEYS = ("hit@{k}", "ndcg@{k}", "map@{k}", "f1@{k}", "precision@{k}", "recall@{k}", "auc")


def _model_list_size(model_path: str) -> int | None:
    """The list size a model was trained on: its run's schema.json or its export's dnr_export.json."""
    for path in (
        os.path.join(model_path, S.SCHEMA_FILE),
        os.path.join(model_path, "assets.extra", "dnr_export.json"),
    ):
        if os.path.exists(path):
            try:
                with open(path) as f:
                    return int(json.load(f)["list_size"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
    return None  # a SavedModel trained elsewhere: its own signature checks the lists


def _model_k(model_path: str) -> int:
    """The cutoff a model was trained for (its run's train.k or its export's k); 6 when unknown."""
    export_info = os.path.join(model_path, "assets.extra", "dnr_export.json")
    try:
        if os.path.exists(os.path.join(model_path, "config.yaml")):
            return int(config_io.load_yaml(os.path.join(model_path, "config.yaml")).get("train", {}).get("k", 6))
        if os.path.exists(export_info):
            with open(export_info) as f:
                return int(json.load(f).get("k", 6))
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return 6


def vocab_check(model_path: str, data_dir: str) -> dict | None:
    """The model's item vocabulary against the data's: `{"model", "data", "same"}` (each a
    `runs.vocab_signature`; with a run directory also `data_items_unknown_to_model`), or None when the
    model's or the data's is not known (an export made before exports recorded it, or one made
    elsewhere; records written by other tools, without `item_vocab.txt`)."""
    from dnr_tf.runs import read_vocab, vocab_signature

    if not os.path.exists(os.path.join(data_dir, "item_vocab.txt")):
        return None
    data_items = read_vocab(data_dir)
    data = vocab_signature(data_items)
    if os.path.exists(os.path.join(model_path, "config.yaml")):
        model_items = read_vocab(model_path)
        model = vocab_signature(model_items)
        unknown = len(set(data_items) - set(model_items))
        return {"model": model, "data": data, "same": model == data, "data_items_unknown_to_model": unknown}
    try:
        with open(os.path.join(model_path, "assets.extra", "dnr_export.json")) as f:
            model = json.load(f)["item_vocab"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"model": model, "data": data, "same": model == data}


def vocab_note(model_path: str, data_dir: str, check: dict) -> str:
    """One line on a model evaluated on data of another item vocabulary (legitimate for a later build of
    the same source; meaningless for another data set, where one id may name another item)."""
    unknown = check.get("data_items_unknown_to_model")
    some = f", {unknown} of them unknown to the model" if unknown is not None else ""
    return (
        f"note: {model_path} was trained with another item vocabulary ({check['model']['items']} items) than "
        f"{data_dir}'s ({check['data']['items']} items{some}): items it never saw score as unknown ones, and "
        "on another data set an id may name another item"
    )


def _scorer(model_path: str):
    """(score function: (serialized, parsed) batch -> scores, description)."""
    if os.path.exists(os.path.join(model_path, "saved_model.pb")):
        import tensorflow as tf

        try:
            loaded = tf.saved_model.load(model_path)
        except Exception as e:  # noqa: BLE001 - any load failure of a corrupt export is one line naming it
            raise ValueError(
                f"{model_path} is not a loadable SavedModel (variables missing or corrupt?): {_first_line(e)}"
            ) from None
        if "serving_default" not in loaded.signatures:
            raise ValueError(f"{model_path} has no serving_default signature")
        fn = loaded.signatures["serving_default"]
        return (lambda serialized, parsed: fn(examples=serialized)["scores"]), f"SavedModel {model_path}"
    if os.path.exists(os.path.join(model_path, "config.yaml")):
        from dnr_tf.runs import load_trained

        try:
            model, _, _ = load_trained(model_path)
        except (FileNotFoundError, ValueError):
            raise
        except Exception as e:  # noqa: BLE001 - a truncated best.weights.h5 is one line naming the run
            raise ValueError(f"{model_path}: its best weights cannot be loaded (corrupt?): {_first_line(e)}") from None

        def score(serialized, parsed):
            features = {key: parsed[key] for key in (S.ITEM_IDS, S.RETRIEVER_SCORES, S.HISTORY)}
            return model(features, training=False)

        return score, f"run {model_path} (best weights)"
    from dnr_tf.export import export_versions

    versions = export_versions(model_path)
    hint = (
        f": it holds export versions {versions}; give {os.path.join(model_path, str(versions[-1]))}" if versions else ""
    )
    raise FileNotFoundError(
        f"{model_path} is neither a SavedModel (saved_model.pb) nor a run directory (config.yaml){hint}"
    )


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def check_inputs(model_path: str | None, data_dir: str, split: str, k: int):
    """Everything that refuses an evaluation, checked before any model is loaded; returns (schema, files).

    Raises:
        ValueError: naming the value: `k` outside [1, list size], lists longer than the model was
            trained on, or an empty split.
        FileNotFoundError: naming the path of a missing split.
    """
    from dnr_tf import data as data_lib

    schema = S.load_schema(data_dir)
    if not 1 <= k <= schema.list_size:
        raise ValueError(f"--k {k} must be in [1, {schema.list_size}] (the list size of {data_dir}/schema.json)")
    if model_path is not None:
        trained = _model_list_size(model_path)
        if trained is not None and schema.list_size > trained:
            raise ValueError(
                f"{data_dir} has lists of {schema.list_size} candidates but {model_path} was trained on lists of "
                f"{trained}: it cannot represent positions past {trained - 1}; evaluate it on data of list_size "
                f"<= {trained}"
            )
    files = sorted(glob.glob(data_lib.split_pattern(data_dir, split)))
    if not files:
        raise FileNotFoundError(f"no {split} records in {data_dir}")
    sizes = _split_sizes(data_dir)
    if sizes.get(split) == 0:
        raise ValueError(f"the {split} split of {data_dir} is empty (0 lists in stats.json): nothing to evaluate")
    return schema, files


def _split_sizes(data_dir: str) -> dict:
    path = os.path.join(data_dir, "stats.json")
    try:
        with open(path) as f:
            splits = json.load(f).get("splits", {})
        return {name: int(s["lists"]) for name, s in splits.items() if "lists" in s}
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return {}


def _table(data_dir: str, split: str, k: int, seed: int, batch_size: int, score=None, checked=None):
    """(metric rows, lists): the model (when `score` is given), the retriever's order, a random
    order and, on data with oracle scores, the oracle's order."""
    import numpy as np
    import tensorflow as tf

    from dnr_tf.metrics import RankingMetrics

    schema, files = checked or check_inputs(None, data_dir, split, k)
    spec = schema.feature_spec()
    names = (["model"] if score else []) + ["retriever_order", "random_order"]
    names += ["oracle_order"] if schema.has_oracle else []
    rows = {name: RankingMetrics(k) for name in names}
    rng = np.random.default_rng(seed)
    lists = 0
    for path in files:  # file by file, so that a corrupt one is named
        batches = iter(tf.data.TFRecordDataset([path], compression_type="GZIP").batch(batch_size))
        while True:
            try:
                serialized = next(batches)
            except StopIteration:
                break
            except tf.errors.OpError as e:
                raise ValueError(f"{path} is corrupt (CRC or gzip error): {_first_line(e)}") from None
            try:
                parsed = tf.io.parse_example(serialized, spec)
            except tf.errors.InvalidArgumentError as e:
                raise ValueError(
                    f"{path} does not match {data_dir}/schema.json (list_size {schema.list_size}, history_len "
                    f"{schema.history_len}, oracle_scores {schema.has_oracle}): {_first_line(e)}"
                ) from None
            labels = parsed[S.LABELS]
            mask = labels >= 0
            n = labels.shape[1]
            if score:
                try:
                    scores = score(serialized, parsed)
                except tf.errors.InvalidArgumentError as e:
                    raise ValueError(f"the model refused the lists of {path}: {_first_line(e)}") from None
                rows["model"].update_state(labels, scores, mask)
            order = np.tile(-np.arange(n, dtype=np.float32), (labels.shape[0], 1))
            rows["retriever_order"].update_state(labels, order, mask)
            rows["random_order"].update_state(labels, rng.random(labels.shape).astype(np.float32), mask)
            if schema.has_oracle:
                rows["oracle_order"].update_state(labels, parsed[S.ORACLE_SCORES], mask)
            lists += int(labels.shape[0])
    if not lists:
        raise ValueError(
            f"the {split} split of {data_dir} holds no list ({len(files)} empty file(s)): nothing to evaluate"
        )
    return {name: {m.name: float(m.result()) for m in r.metrics} for name, r in rows.items()}, lists


def evaluate_orders(data_dir: str, split: str = "test", k: int = 6, seed: int = 0, batch_size: int = 256) -> dict:
    """The model-free rows: the retriever's order, a random order, and the oracle where known."""
    metrics, lists = _table(data_dir, split, k, seed, batch_size)
    return {"split": split, "k": k, "lists": lists, "metrics": metrics}


def evaluate(
    model_path: str, data_dir: str, split: str = "test", k: int | None = None, seed: int = 0, batch_size: int = 256
) -> dict:
    """Metrics of the model, the retriever's order and a random order (and the oracle) on one split.

    `k` defaults to the model's own (`train.k` of its run, `k` of its export), else 6.
    """
    if k is None:
        k = _model_k(model_path)
    checked = check_inputs(model_path, data_dir, split, k)
    vocab = vocab_check(model_path, data_dir)
    if vocab is not None and not vocab["same"]:
        print(vocab_note(model_path, data_dir, vocab), file=sys.stderr, flush=True)
    score, description = _scorer(model_path)
    metrics, lists = _table(data_dir, split, k, seed, batch_size, score, checked)
    return {
        "model": description,
        "data_dir": os.path.abspath(data_dir),
        "split": split,
        "k": k,
        "lists": lists,
        "item_vocab": vocab,
        "metrics": metrics,
    }


def print_table(result: dict) -> None:
    k = result["k"]
    keys = [key.format(k=k) for key in KEYS]
    print(f"{result['model']} on {result['split']} ({result['lists']} lists)")
    print(f"{'':16s} " + " ".join(f"{key:>11s}" for key in keys))
    for name, metrics in result["metrics"].items():
        print(f"{name:16s} " + " ".join(f"{metrics[key]:11.4f}" for key in keys))


def main(argv=None) -> int:
    quiet.configure(quiet.verbose_flag(argv))  # before TensorFlow is imported
    parser = argparse.ArgumentParser(prog="python -m dnr_tf.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="saved_models/<name>/<version> or runs/<name>")
    parser.add_argument("--data_dir", required=True, help="an output directory of `python -m pipeline.run`")
    parser.add_argument("--split", default="test", choices=("train", "valid", "test"))
    parser.add_argument("--k", type=int, help="cutoff (items shown; default: the model's train.k, else 6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-order baseline")
    parser.add_argument(
        "--output", help="JSON path (default: <run>/eval_<split>.json, or eval_<version>_<split>.json beside an export)"
    )
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's, Keras' and absl's own logs too")
    args = parser.parse_args(argv)
    model = os.path.normpath(args.model)
    if args.output:
        output = args.output
    elif os.path.exists(os.path.join(model, "config.yaml")):
        output = os.path.join(model, f"eval_{args.split}.json")
    else:  # never inside a SavedModel version folder that TF Serving loads
        output = os.path.join(os.path.dirname(model), f"eval_{os.path.basename(model)}_{args.split}.json")
    try:
        if os.path.isdir(output):
            raise ValueError(f"--output {output} is a directory; give a JSON file path")
        config_io.check_output_dir(os.path.dirname(os.path.abspath(output)), "--output's folder")
        result = evaluate(args.model, args.data_dir, args.split, args.k, args.seed)
        with open(output, "w") as f:
            json.dump(result, f, indent=2)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(result)
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
