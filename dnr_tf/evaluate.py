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

from dnr_tf import quiet
from dnr_tf import schema as S

KEYS = ("hit@{k}", "ndcg@{k}", "map@{k}", "f1@{k}", "precision@{k}", "recall@{k}", "auc")


def _scorer(model_path: str):
    """(score function: (serialized, parsed) batch -> scores, description)."""
    if os.path.exists(os.path.join(model_path, "saved_model.pb")):
        import tensorflow as tf

        loaded = tf.saved_model.load(model_path)
        if "serving_default" not in loaded.signatures:
            raise ValueError(f"{model_path} has no serving_default signature")
        fn = loaded.signatures["serving_default"]
        return (lambda serialized, parsed: fn(examples=serialized)["scores"]), f"SavedModel {model_path}"
    if os.path.exists(os.path.join(model_path, "config.yaml")):
        from dnr_tf.runs import load_trained

        model, _, _ = load_trained(model_path)

        def score(serialized, parsed):
            features = {key: parsed[key] for key in (S.ITEM_IDS, S.RETRIEVER_SCORES, S.HISTORY)}
            return model(features, training=False)

        return score, f"run {model_path} (best weights)"
    raise FileNotFoundError(f"{model_path} is neither a SavedModel (saved_model.pb) nor a run directory (config.yaml)")


def _table(data_dir: str, split: str, k: int, seed: int, batch_size: int, score=None):
    """(metric rows, lists): the model (when `score` is given), the retriever's order, a random
    order and, on data with oracle scores, the oracle's order."""
    import numpy as np
    import tensorflow as tf

    from dnr_tf import data as data_lib
    from dnr_tf.metrics import RankingMetrics

    schema = S.load_schema(data_dir)
    files = sorted(glob.glob(data_lib.split_pattern(data_dir, split)))
    if not files:
        raise FileNotFoundError(f"no {split} records in {data_dir}")
    spec = schema.feature_spec()
    names = (["model"] if score else []) + ["retriever_order", "random_order"]
    names += ["oracle_order"] if schema.has_oracle else []
    rows = {name: RankingMetrics(k) for name in names}
    rng = np.random.default_rng(seed)
    lists = 0
    for serialized in tf.data.TFRecordDataset(files, compression_type="GZIP").batch(batch_size):
        parsed = tf.io.parse_example(serialized, spec)
        labels = parsed[S.LABELS]
        mask = labels >= 0
        n = labels.shape[1]
        if score:
            rows["model"].update_state(labels, score(serialized, parsed), mask)
        order = np.tile(-np.arange(n, dtype=np.float32), (labels.shape[0], 1))
        rows["retriever_order"].update_state(labels, order, mask)
        rows["random_order"].update_state(labels, rng.random(labels.shape).astype(np.float32), mask)
        if schema.has_oracle:
            rows["oracle_order"].update_state(labels, parsed[S.ORACLE_SCORES], mask)
        lists += int(labels.shape[0])
    return {name: {m.name: float(m.result()) for m in r.metrics} for name, r in rows.items()}, lists


def evaluate_orders(data_dir: str, split: str = "test", k: int = 6, seed: int = 0, batch_size: int = 256) -> dict:
    """The model-free rows: the retriever's order, a random order, and the oracle where known."""
    metrics, lists = _table(data_dir, split, k, seed, batch_size)
    return {"split": split, "k": k, "lists": lists, "metrics": metrics}


def evaluate(
    model_path: str, data_dir: str, split: str = "test", k: int = 6, seed: int = 0, batch_size: int = 256
) -> dict:
    """Metrics of the model, the retriever's order and a random order (and the oracle) on one split."""
    score, description = _scorer(model_path)
    metrics, lists = _table(data_dir, split, k, seed, batch_size, score)
    return {
        "model": description,
        "data_dir": os.path.abspath(data_dir),
        "split": split,
        "k": k,
        "lists": lists,
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
    parser.add_argument("--k", type=int, default=6, help="cutoff (items shown)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-order baseline")
    parser.add_argument(
        "--output", help="JSON path (default: <run>/eval_<split>.json, or eval_<version>_<split>.json beside an export)"
    )
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's, Keras' and absl's own logs too")
    args = parser.parse_args(argv)
    try:
        result = evaluate(args.model, args.data_dir, args.split, args.k, args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = os.path.normpath(args.model)
    if args.output:
        output = args.output
    elif os.path.exists(os.path.join(model, "config.yaml")):
        output = os.path.join(model, f"eval_{args.split}.json")
    else:  # never inside a SavedModel version folder that TF Serving loads
        output = os.path.join(os.path.dirname(model), f"eval_{os.path.basename(model)}_{args.split}.json")
    with open(output, "w") as f:
        json.dump(result, f, indent=2)
    print_table(result)
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
