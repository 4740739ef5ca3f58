"""`python -m dnr_tf.export`: the trained reranker as a SavedModel for TF Serving.

Example:
    python -m dnr_tf.export --model_dir runs/ml100k_dnr_b --export_dir saved_models/ml100k_dnr_b

Writes `<export_dir>/<version>/` (the next free integer unless `--version`), the layout TF
Serving watches, with two signatures:
- `serving_default`: `examples` `[None]` string, serialized `tf.train.Example`s in the pipeline's
  record format (labels not needed; lists may differ in length within a batch);
- `predict_lists`: dense `item_ids` int64 `[None, None]`, `retriever_scores` float32
  `[None, None]`, `history` int64 `[None, None]`, `user_id` int64 `[None]` (for the REST API).
Both return `scores` float32 `[batch, list_size]` (p(z = 1) of each candidate, 0.0 on padding),
`top_k_item_ids` int64 `[batch, K]` and `top_k_indices` int32 `[batch, K]` (best first; 0 and -1
where a list has fewer than K candidates). Item id 0 is padding; ids outside the vocabulary use
the out-of-vocabulary embedding. An item id repeated in a list is scored at each position but
enters the top K once, at its best-scored copy (so the top K holds distinct items). A score outside
[0, 1], NaN, a list longer than the trained list size, an input of the wrong rank, or a `history`
or `user_id` whose batch differs from `item_ids`' is rejected with an error naming the field. Only
the reranker is exported: the noise generator is training-only.
`assets.extra/tf_serving_warmup_requests` holds a few real requests.

`--jit_compile` compiles the ranking (the reranker, the de-duplication and the top K; not the input
checks, the parsing or the item-id lookup) with XLA: the same scores within float rounding and the
same top K, at lower latency on CPU (docs/performance.md). XLA compiles once per batch size (about
0.6 s each on the 2-core VM of docs/performance.md), which the warmup file does for the batch size it
holds; TF Serving runs such a model
only when started with `--xla_cpu_compilation_enabled=true`. The default export is not compiled.
The compiled ranking holds its weights as constants (up to `FREEZE_LIMIT_BYTES`; `dnr_export.json`
records `frozen_weights`): an XLA call then reads no weight as an argument, which at one list costs
about as much as its arithmetic (scores within about 3e-7 of the unfrozen cluster's).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys

from dnr_tf import config_io, quiet
from dnr_tf import schema as S
from dnr_tf.runs import load_trained, read_vocab, vocab_signature

WARMUP_FILE = "tf_serving_warmup_requests"
WARMUP_REQUESTS = 4
# `--jit_compile`: the ranking's weights are compiled into the XLA executable as constants up to this
# size (the reranker's variables are saved as before); above it they stay arguments of each call (`serving_fns`).
FREEZE_LIMIT_BYTES = 64 * 2**20


def _item_lookup(reranker):
    """The `IntegerLookup` of the reranker's item embeddings (one vocabulary for all of them)."""
    from dnr_tf.backbones.base import ItemEmbedding

    layers = [layer for layer in reranker._flatten_layers() if isinstance(layer, ItemEmbedding)]
    if not layers or any(layer.vocabulary != layers[0].vocabulary for layer in layers[1:]):
        raise ValueError("jit_compile needs a reranker whose item embeddings share one vocabulary")
    return layers[0].lookup


def graph_nodes(graph_def) -> list:
    """Every node of a graph and of the functions in its library."""
    return list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]


def _random_ops(graph_def) -> list[str]:
    """The random-number op types in a traced graph and the functions it calls."""
    return sorted({n.op for n in graph_nodes(graph_def) if "Random" in n.op})


def serving_fns(
    reranker,
    list_size: int,
    k: int,
    jit_compile: bool = False,
    history_len: int = 0,
    item_tables: bool = False,
    freeze_limit_bytes: int = FREEZE_LIMIT_BYTES,
):
    """(predict_lists, serve_examples) tf.functions around a built reranker.

    Both trace the reranker within `fused_inference()` (`dnr_tf.backbones.fused`): its attention one
    head at a time in plain products, its input projection without the concatenation, and the
    candidates' share of that projection gathered from a table of every item's, made here once (and
    for PRM its first attention's query, key and value likewise: `item_projection_tables`,
    `LinearStates`; the functions capture the tables, so the SavedModel saves them), with
    `item_tables` (`export_model` sets it with `jit_compile` by default): the tables speed up the XLA
    export, not the default one, whose executor spends on the gathers what the products saved
    (docs/performance.md); leave them out where their size (about 1 KB an item at the default
    sizes) matters more than the speed. The same
    weights and operations in another order, so the scores agree with the in-memory model's to
    float rounding (about 5e-7 on ML-100K) and faster (docs/performance.md).

    With `jit_compile`, everything after the input checks and the item-id lookup (the reranker, the
    de-duplication and the top K) is one XLA cluster. XLA compiles once per input shape, so the lists
    are padded to `list_size` and the histories to at least `history_len` before it (padding changes
    no score: padded candidates and history items are masked), and only the batch size (and a longer
    history) makes a new shape. The cluster's weights (and tables) are compiled into it as constants
    when they take at most `freeze_limit_bytes`: an XLA call otherwise reads every weight as an
    argument (37 for PRM), which at one list costs about as much as its arithmetic. Constant folding
    then sums a few products in another order (scores within about 3e-7 of the unfrozen cluster's).
    `predict_lists.frozen_weights` says which was done (False without `jit_compile`).
    """
    import tensorflow as tf

    from dnr_tf.backbones.fused import fused_inference, ids_as_rows, item_projection_tables

    # Captured: the SavedModel saves them (as constants of the compiled ranking when its weights are frozen).
    tables = item_projection_tables(reranker) if item_tables else {}
    frozen_weights = False

    def rank(item_ids, model_ids, retriever_scores, history):
        """Scores and top K; the reranker reads `model_ids` and `history` (raw ids, or rows)."""
        n = tf.shape(item_ids)[1]
        logits = reranker(
            {S.ITEM_IDS: model_ids, S.RETRIEVER_SCORES: retriever_scores, S.HISTORY: history}, training=False
        )
        mask = tf.not_equal(item_ids, S.PADDING_ID)
        scores = tf.where(mask, tf.sigmoid(logits), 0.0)
        # An item repeated in a list enters the top K once, at its best-scored copy (the first on ties):
        # a copy is left out when another copy of the same id scores higher, or equal at an earlier position.
        same = tf.equal(item_ids[:, :, None], item_ids[:, None, :])  # [batch, copy j, other i]
        position = tf.range(n)
        earlier = position[None, :] < position[:, None]  # [j, i]: i before j
        beaten = (logits[:, None, :] > logits[:, :, None]) | (
            tf.equal(logits[:, None, :], logits[:, :, None]) & earlier[None]
        )
        shown = mask & ~tf.reduce_any(same & beaten, axis=2)
        top = tf.math.top_k(tf.where(shown, logits, -float("inf")), k=tf.minimum(k, n))
        valid = tf.gather(shown, top.indices, batch_dims=1)
        indices = tf.where(valid, top.indices, -1)
        ids = tf.where(valid, tf.gather(item_ids, top.indices, batch_dims=1), tf.zeros_like(item_ids[:, :1]))
        short = k - tf.shape(indices)[1]
        return scores, tf.pad(ids, [[0, 0], [0, short]]), tf.pad(indices, [[0, 0], [0, short]], constant_values=-1)

    if jit_compile:
        lookup = _item_lookup(reranker)

        @tf.function(jit_compile=True)
        def rank_rows(item_ids, rows, retriever_scores, history_rows):
            with ids_as_rows(), fused_inference(tables):
                return rank(item_ids, rows, retriever_scores, history_rows)

        ids = tf.TensorSpec([None, list_size], tf.int64)
        traced = rank_rows.get_concrete_function(
            ids, ids, tf.TensorSpec([None, list_size], tf.float32), tf.TensorSpec([None, None], tf.int64)
        )
        if drawn := _random_ops(traced.graph.as_graph_def()):
            raise ValueError(
                f"--jit_compile: this reranker draws random numbers when it serves ({', '.join(drawn)}), and "
                "XLA draws other numbers than TensorFlow's kernels from the same seed; export it without --jit_compile"
            )
        weight_bytes = sum(v.shape.num_elements() * v.dtype.size for v in traced.variables)
        frozen_weights = 0 < weight_bytes <= freeze_limit_bytes
        if frozen_weights:
            from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

            frozen = convert_variables_to_constants_v2(traced)

            @tf.function(jit_compile=True)
            def rank_rows(item_ids, rows, retriever_scores, history_rows):  # noqa: F811 (the frozen one)
                return frozen(item_ids, rows, retriever_scores, history_rows)

        def ranked(item_ids, retriever_scores, history):
            n = tf.shape(item_ids)[1]
            grow = [[0, 0], [0, list_size - n]]
            item_ids = tf.pad(item_ids, grow, constant_values=S.PADDING_ID)
            retriever_scores = tf.pad(retriever_scores, grow, constant_values=S.PADDING_SCORE)
            history = tf.pad(  # left-padded, as the records are
                history, [[0, 0], [tf.maximum(history_len - tf.shape(history)[1], 0), 0]], constant_values=S.PADDING_ID
            )
            scores, ids, indices = rank_rows(item_ids, lookup(item_ids), retriever_scores, lookup(history))
            # Padding sorts after every real candidate, so the top K is the unpadded list's.
            return scores[:, :n], ids, indices

    def predict(item_ids, retriever_scores, history):
        n = tf.shape(item_ids)[1]
        in_range = tf.math.is_finite(retriever_scores) & (retriever_scores >= 0.0) & (retriever_scores <= 1.0)
        checks = [
            tf.debugging.assert_less_equal(
                n,
                list_size,
                message=f"item_ids: a list has more candidates than the model was trained for ({list_size})",
            ),
            tf.debugging.assert_equal(
                tf.shape(retriever_scores),
                tf.shape(item_ids),
                message="retriever_scores must have the shape of item_ids [batch, list_size]",
            ),
            tf.debugging.Assert(
                tf.reduce_all(in_range),
                ["retriever_scores must be finite numbers in [0, 1] (found NaN, inf or out of range)"],
            ),
            tf.debugging.Assert(tf.reduce_all(item_ids >= 0), ["item_ids must be >= 0 (0 is padding)"]),
            tf.debugging.assert_equal(
                tf.shape(history)[0],
                tf.shape(item_ids)[0],
                message="history must have one row per item_ids row [batch, history_len]",
            ),
        ]
        with tf.control_dependencies(checks), fused_inference(tables):
            if jit_compile:
                scores, ids, indices = ranked(item_ids, retriever_scores, history)
            else:
                scores, ids, indices = rank(item_ids, item_ids, retriever_scores, history)
        return {
            "scores": scores,
            "top_k_item_ids": tf.ensure_shape(ids, [None, k]),
            "top_k_indices": tf.ensure_shape(indices, [None, k]),
        }

    @tf.function
    def predict_lists(item_ids, retriever_scores, history, user_id):
        # Calling a signature checks the dtypes of its inputs, not their shapes: a wrong rank fails here, naming it.
        item_ids, retriever_scores, history = (
            tf.ensure_shape(x, [None, None]) for x in (item_ids, retriever_scores, history)
        )
        user_id = tf.ensure_shape(user_id, [None])
        # user_id is part of the request for logging and future backbones; PRM/DNN read the history.
        one_per_list = tf.debugging.assert_equal(
            tf.shape(user_id)[0], tf.shape(item_ids)[0], message="user_id must hold one id per item_ids row"
        )
        with tf.control_dependencies([one_per_list]):
            return predict(item_ids, retriever_scores, history)

    spec = {
        S.ITEM_IDS: tf.io.RaggedFeature(tf.int64),
        S.RETRIEVER_SCORES: tf.io.RaggedFeature(tf.float32),
        S.HISTORY: tf.io.RaggedFeature(tf.int64),
    }

    @tf.function
    def serve_examples(examples):
        # Named, so that TF's own errors for malformed examples name the node that parses `examples`.
        parsed = tf.io.parse_example(tf.ensure_shape(examples, [None]), spec, name="parse_examples")
        lengths_match = tf.reduce_all(
            tf.equal(parsed[S.ITEM_IDS].row_lengths(), parsed[S.RETRIEVER_SCORES].row_lengths())
        )
        with tf.control_dependencies(
            [tf.debugging.Assert(lengths_match, ["retriever_scores must hold one value per item_ids entry"])]
        ):
            item_ids = parsed[S.ITEM_IDS].to_tensor(default_value=S.PADDING_ID)
        scores = parsed[S.RETRIEVER_SCORES].to_tensor(default_value=S.PADDING_SCORE)
        history = parsed[S.HISTORY].to_tensor(default_value=S.PADDING_ID)
        return predict(item_ids, scores, history)

    predict_lists.frozen_weights = frozen_weights
    return predict_lists, serve_examples


def check_export_dir(export_dir: str, version: int | None) -> None:
    """Refuses, before any work, an export directory that cannot be one (a file, not writable:
    `config_io.check_output_dir`) and a negative version (versions are the numbered folders TF
    Serving watches; `export_versions` counts only names of digits)."""
    config_io.check_output_dir(export_dir, "--export_dir")
    if version is not None and version < 0:
        raise ValueError(f"--version must be >= 0, not {version}")


def export_versions(export_dir: str) -> list[int]:
    """The versions under an export directory (`saved_models/<name>`): its entries named by digits, in order."""
    names = (os.path.basename(p) for p in glob.glob(os.path.join(export_dir, "*")))
    return sorted(int(name) for name in names if name.isdigit())


def next_version(export_dir: str) -> int:
    return max(export_versions(export_dir), default=0) + 1


def export_model(
    model,
    export_dir: str,
    k: int,
    list_size: int,
    version: int | None = None,
    warmup_examples: list[bytes] | None = None,
    info: dict | None = None,
    jit_compile: bool = False,
    history_len: int = 0,
    item_tables: bool | None = None,
    freeze_limit_bytes: int = FREEZE_LIMIT_BYTES,
) -> str:
    """Saves `model.reranker` with both signatures into `<export_dir>/<version>/`; returns that path.

    `jit_compile`: the ranking is compiled by XLA (see `serving_fns`); TF Serving runs such a model
    only with `--xla_cpu_compilation_enabled=true`. `history_len` is the records' history length.
    `item_tables`: the tables of every item's projections (see `serving_fns`; default: with
    `jit_compile`). `freeze_limit_bytes`: the XLA cluster's weights up to this size are compiled in as
    constants (see `serving_fns`; `dnr_export.json` records `frozen_weights`).

    The SavedModel is written into a temporary folder and renamed into place, so that TF Serving,
    which watches `export_dir`, never loads a half-written version.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    bad = [v.path for v in model.reranker.weights if not bool(np.all(np.isfinite(v.numpy())))]
    if bad:
        raise ValueError(
            f"not exported: the reranker has non-finite weights ({', '.join(bad[:5])}); a model with NaN or inf "
            "weights would answer NaN scores"
        )
    layers = model.reranker._flatten_layers()
    mixed = sorted({x.dtype_policy.name for x in layers if x.dtype_policy.compute_dtype in ("bfloat16", "float16")})
    if mixed:
        raise ValueError(
            f"not exported: the reranker computes under {', '.join(mixed)}; the export serves float32 scores: "
            "build it in float32 (dnr_tf.runs.load_trained(model_dir, precision='float32'), as export_run does)"
        )
    check_export_dir(export_dir, version)
    version = next_version(export_dir) if version is None else version
    final = os.path.join(export_dir, str(version))
    if os.path.exists(final):
        raise FileExistsError(f"{final} exists: TF Serving versions are immutable; pick another --version")
    tmp = os.path.join(export_dir, f".tmp-{version}")
    shutil.rmtree(tmp, ignore_errors=True)

    item_tables = jit_compile if item_tables is None else item_tables
    predict_lists, serve_examples = serving_fns(
        model.reranker, list_size, k, jit_compile, history_len, item_tables, freeze_limit_bytes
    )
    archive = keras.export.ExportArchive()
    archive.track(model.reranker)
    archive.add_endpoint(
        "serving_default", serve_examples, input_signature=[tf.TensorSpec([None], tf.string, name="examples")]
    )
    archive.add_endpoint(
        "predict_lists",
        predict_lists,
        input_signature=[
            tf.TensorSpec([None, None], tf.int64, name="item_ids"),
            tf.TensorSpec([None, None], tf.float32, name="retriever_scores"),
            tf.TensorSpec([None, None], tf.int64, name="history"),
            tf.TensorSpec([None], tf.int64, name="user_id"),
        ],
    )
    archive.write_out(tmp, verbose=False)
    extra = os.path.join(tmp, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    if warmup_examples:
        write_warmup(os.path.join(extra, WARMUP_FILE), warmup_examples)
    with open(os.path.join(extra, "dnr_export.json"), "w") as f:
        meta = {"k": k, "list_size": list_size, "jit_compile": jit_compile, "item_tables": item_tables}
        meta["frozen_weights"] = predict_lists.frozen_weights
        json.dump({**meta, **(info or {})}, f, indent=2)
    os.replace(tmp, final)
    return final


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2): tag, varint length, bytes."""
    out = bytearray()
    for value in ((number << 3) | 2, len(payload)):
        while value > 0x7F:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out) + payload


def prediction_log(examples: list[bytes], model_name: str, signature_name: str = "serving_default") -> bytes:
    """A serialized `tensorflow.serving.PredictionLog` holding one `PredictRequest` on `examples`.

    Written by hand (the wire format of five fields), so that exporting needs no
    tensorflow-serving-api. Field numbers from tensorflow_serving/apis: PredictionLog.predict_log = 6,
    PredictLog.request = 1, PredictRequest.model_spec = 1 and inputs = 2 (a map: key 1, value 2),
    ModelSpec.name = 1 and signature_name = 3. The test parses the result with that package.
    """
    import tensorflow as tf

    tensor = tf.make_tensor_proto(examples, dtype=tf.string).SerializeToString()
    spec = _field(1, model_name.encode()) + _field(3, signature_name.encode())
    request = _field(1, spec) + _field(2, _field(1, b"examples") + _field(2, tensor))
    return _field(6, _field(1, request))


def write_warmup(path: str, examples: list[bytes], model_name: str = "dnr") -> None:
    """TF Serving warmup: `PredictionLog` records of `serving_default` requests, as a TFRecord file."""
    import tensorflow as tf

    with tf.io.TFRecordWriter(path) as writer:
        for start in range(0, len(examples), 2):
            writer.write(prediction_log(examples[start : start + 2], model_name))


def read_examples(data_dir: str, split: str = "valid", n: int = WARMUP_REQUESTS) -> list[bytes]:
    """The first `n` serialized records of a split (real requests for the warmup file)."""
    import tensorflow as tf

    from dnr_tf import data as data_lib

    files = sorted(glob.glob(data_lib.split_pattern(data_dir, split)))
    if not files:
        return []
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP").take(n)
    return [bytes(x.numpy()) for x in ds]


def export_run(
    model_dir: str,
    export_dir: str,
    version: int | None = None,
    data_dir: str | None = None,
    jit_compile: bool = False,
    item_tables: bool | None = None,
) -> str:
    """Exports the best model of a run; warmup requests come from the run's data (or `data_dir`).
    The export computes in float32, also for a run trained with `train.precision: mixed_bfloat16`
    (whose weights are float32)."""
    check_export_dir(export_dir, version)
    model, cfg, schema = load_trained(model_dir, precision="float32")
    if data_dir is None:
        data_dir = config_io.load_yaml(os.path.join(model_dir, "config.yaml")).get("data_dir")
    examples = read_examples(data_dir) if data_dir and os.path.isdir(data_dir) else []
    if not examples:
        print("warning: no records found for the warmup file (pass --data_dir)", file=sys.stderr)
    info = {
        "name": cfg.name,
        "backbone": cfg.model.backbone,
        "score_feed": cfg.model.score_feed,
        "dnr": cfg.dnr.enabled,
        "trained_precision": cfg.train.precision,
        "model_dir": os.path.abspath(model_dir),
        # The run's item vocabulary, so that `dnr_tf.evaluate` can tell data of another vocabulary.
        "item_vocab": vocab_signature(read_vocab(model_dir)),
    }
    return export_model(
        model,
        export_dir,
        cfg.train.k,
        schema.list_size,
        version,
        examples,
        info,
        jit_compile,
        schema.history_len,
        item_tables,
    )


def main(argv=None) -> int:
    quiet.configure(quiet.verbose_flag(argv))  # before TensorFlow is imported
    parser = argparse.ArgumentParser(prog="python -m dnr_tf.export", description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", required=True, help="a run directory of `python -m dnr_tf.train`")
    parser.add_argument("--export_dir", required=True, help="saved_models/<model_name>")
    parser.add_argument("--version", type=int, help="integer version (default: the next free one)")
    parser.add_argument("--data_dir", help="records for the warmup file (default: the run's data)")
    parser.add_argument(
        "--jit_compile",
        action="store_true",
        help="compile the ranking with XLA (faster on CPU; TF Serving needs --xla_cpu_compilation_enabled=true)",
    )
    parser.add_argument(
        "--no_item_tables",
        action="store_true",
        help="with --jit_compile: leave out the tables of every item's projections (smaller, slower; ~1 KB an item)",
    )
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's, Keras' and absl's own logs too")
    args = parser.parse_args(argv)
    try:
        if args.no_item_tables and not args.jit_compile:
            raise ValueError("--no_item_tables applies to --jit_compile exports (the default export makes no tables)")
        path = export_run(
            args.model_dir,
            args.export_dir,
            args.version,
            args.data_dir,
            args.jit_compile,
            False if args.no_item_tables else None,
        )
    except (config_io.ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    compiled = ", compiled by XLA" if args.jit_compile else ""
    print(f"exported to {path} (signatures: serving_default, predict_lists{compiled})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
