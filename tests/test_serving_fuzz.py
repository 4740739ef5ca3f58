"""Seeded fuzz test of the exported serving signatures, `predict_lists` and `serving_default`.

A driver script runs in a fresh process that cannot import dnr_tf or pipeline (like TF Serving, it has only the
SavedModel), loads the export and sends it a seeded sequence (numpy `default_rng(0)`) of valid, random and
adversarial requests: random lists of every batch size and length, padding, out-of-vocabulary and near-int64-max
ids, empty batches, empty and long histories, lists longer than the trained list size, NaN / inf / negative / > 1
retriever scores, mismatched shapes and batch sizes, wrong ranks, wrong dtypes, ragged lists, and for
`serving_default` random bytes, truncated and corrupted serialized examples, missing features, features of the
wrong type or length. The driver records each answer or error and checks every answer on the spot.

The test asserts:
- the process exits 0: no request crashes it;
- every answer keeps the output contract: `scores` finite, in [0, 1], of shape [batch, list size], exactly 0 on
  padded slots; `top_k_indices` in [-1, list size), the real candidates first, best first, each item once (a
  repeated id at its best copy), no better item left out; `top_k_item_ids` equal to `item_ids` at those indices
  (0 where the index is -1);
- valid requests, out-of-vocabulary and huge ids, empty and long histories, empty batches and empty lists are
  answered; valid answers do not change when a request is padded to the trained list size or a list is scored on
  its own, and `serving_default` answers what `predict_lists` answers for the same lists;
- every rejected request is rejected with an error that names the input at fault: per family, the message of the
  export's own in-graph check (`item_ids: a list has more candidates ...`, `retriever_scores must ...`,
  `history must ...`, `user_id must ...`, `Shape of tensor <input> ...`); where TF rejects the request before the
  graph runs, TF's message naming the input (wrong dtype: by position and both dtypes; ragged lists: the reason and
  the arguments by name); where TF's parser rejects an example, its message naming the example, the feature key or
  the node parsing `examples`;
- the number of cases sent (deterministic for the seed).
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
SEED = 0

DRIVER = r'''
"""Fuzz driver: argv = export path, item vocabulary file, seed. Prints a JSON report on stdout."""
import importlib.abc
import json
import os
import sys
import time


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("dnr_tf", "pipeline"):
            raise ImportError("the export must not need " + name)


sys.meta_path.insert(0, Block())

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

START = time.perf_counter()
EXPORT, VOCAB_FILE, SEED = sys.argv[1], sys.argv[2], int(sys.argv[3])
INFO = json.load(open(os.path.join(EXPORT, "assets.extra", "dnr_export.json")))
K, L = INFO["k"], INFO["list_size"]
VOCAB = np.array([int(v) for v in open(VOCAB_FILE).read().split()], np.int64)
INT64_MAX, INT64_MIN = np.iinfo(np.int64).max, np.iinfo(np.int64).min
FIELDS = ("item_ids", "retriever_scores", "history", "user_id")
SPEC = {
    "item_ids": tf.io.RaggedFeature(tf.int64),
    "retriever_scores": tf.io.RaggedFeature(tf.float32),
    "history": tf.io.RaggedFeature(tf.int64),
}
rng = np.random.default_rng(SEED)
model = tf.saved_model.load(EXPORT)
P = model.signatures["predict_lists"]
S = model.signatures["serving_default"]
# The order in which TF numbers a signature's inputs in its dtype errors ("input #1(zero-based)").
ORDER = [t.name.split(":")[0] for t in P.inputs[: len(FIELDS)]]
CASES, VIOLATIONS = [], []


# ---- generators -------------------------------------------------------------------------------------------------
def ids_of(kind, shape):
    """Item ids: from the vocabulary, or half of them out of it ("oov") or within 1000 of int64 max ("huge")."""
    ids = rng.choice(VOCAB, size=shape).astype(np.int64)
    if kind == "oov":
        ids = np.where(rng.random(shape) < 0.5, ids, rng.integers(int(VOCAB.max()) + 1, 10**12, size=shape))
    elif kind == "huge":
        ids = np.where(rng.random(shape) < 0.5, ids, INT64_MAX - rng.integers(0, 1000, size=shape))
    elif kind == "negative":
        ids = np.where(rng.random(shape) < 0.5, ids, -rng.integers(1, 10**6, size=shape))
        ids.flat[0] = INT64_MIN
    return ids.astype(np.int64)


def batch_size():
    return int(rng.choice([1, 1, 1, 2, 3, 5, 8, 16, 64]))


def request(b=None, n=None, h=None, kind="vocab", history_kind=None):
    """Dense predict_lists inputs: lists right-padded (row lengths 1..n, now and then a row all padding),
    history left-padded like the records (row lengths 0..h)."""
    b = batch_size() if b is None else b
    n = int(rng.choice([1, L, rng.integers(1, L + 1)])) if n is None else n
    h = int(rng.integers(0, 41)) if h is None else h
    ids, scores = ids_of(kind, (b, n)), rng.random((b, n)).astype(np.float32)
    if n:
        pad = np.arange(n)[None, :] >= rng.integers(1, n + 1, size=b)[:, None]
        pad[rng.random(b) < 0.1] = True
        ids[pad], scores[pad] = 0, 0.0
    history = ids_of(history_kind or kind, (b, h))
    if h:
        history[np.arange(h)[None, :] < (h - rng.integers(0, h + 1, size=b))[:, None]] = 0
    user_id = INT64_MAX - rng.integers(0, 1000, size=b) if kind == "huge" else rng.integers(1, 10**6, size=b)
    return {"item_ids": ids, "retriever_scores": scores, "history": history, "user_id": user_id.astype(np.int64)}


def tensors(req):
    return {k: v if isinstance(v, tf.Tensor) else tf.constant(v) for k, v in req.items()}


def lists(b, kind="vocab", pad_to_list_size=False, history=True):
    """b requests as (item ids, retriever scores, history) of random lengths (1..L candidates, 0..40 history)."""
    out = []
    for _ in range(b):
        n = int(rng.choice([1, L, rng.integers(1, L + 1)]))
        ids, scores = ids_of(kind, n), rng.random(n).astype(np.float32)
        if pad_to_list_size:  # like the pipeline's records
            ids, scores = np.pad(ids, (0, L - n)), np.pad(scores, (0, L - n))
        out.append((ids, scores, ids_of(kind, int(rng.integers(0, 41))) if history else None))
    return out


def example(ids=None, scores=None, history=None, types=None):
    """A serialized tf.Example (with a user_id, ignored); `types` overrides a feature's list type."""
    feats = {"user_id": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(rng.integers(1, 10**6))]))}
    features = (("item_ids", ids, "int64"), ("retriever_scores", scores, "float"), ("history", history, "int64"))
    for name, values, kind in features:
        if values is None:
            continue
        kind = (types or {}).get(name, kind)
        if kind == "int64":
            feats[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
        elif kind == "float":
            feats[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))
        else:
            feats[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(v).encode() for v in values]))
    # deterministic: map entries in key order, so that the bytes (and where a corruption lands) follow the seed
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString(deterministic=True)


def dense(lists_):
    """predict_lists inputs for the same lists serving_default parses (right-padded, as its to_tensor pads)."""
    n = max((len(ids) for ids, _, _ in lists_), default=0)
    h = max((len(hist) for _, _, hist in lists_ if hist is not None), default=0)
    ids = np.zeros((len(lists_), n), np.int64)
    scores = np.zeros((len(lists_), n), np.float32)
    history = np.zeros((len(lists_), h), np.int64)
    for r, (i, s, hist) in enumerate(lists_):
        ids[r, : len(i)], scores[r, : len(s)] = i, s
        if hist is not None:
            history[r, : len(hist)] = hist
    return {"item_ids": ids, "retriever_scores": scores, "history": history, "user_id": np.ones(len(lists_), np.int64)}


# ---- checks -----------------------------------------------------------------------------------------------------
def contract(out, item_ids):
    """Problems with an answer: NaN or out-of-range scores; with item_ids, the shapes, padding and the top k."""
    bad = []
    scores, idx, top = (out[key].numpy() for key in ("scores", "top_k_indices", "top_k_item_ids"))
    if not np.all(np.isfinite(scores)):
        bad.append("scores not finite (NaN or inf)")
    elif scores.size and (scores.min() < 0.0 or scores.max() > 1.0):
        bad.append("scores outside [0, 1]")
    if item_ids is None:
        return bad
    b, n = item_ids.shape
    if scores.shape != (b, n) or idx.shape != (b, K) or top.shape != (b, K):
        return bad + [f"shapes {scores.shape} {idx.shape} {top.shape} for item_ids {item_ids.shape}, k={K}"]
    if (scores.dtype, idx.dtype, top.dtype) != (np.float32, np.int32, np.int64):
        bad.append(f"dtypes {scores.dtype} {idx.dtype} {top.dtype}")
    real = item_ids != 0
    if np.any(scores[~real] != 0.0):
        bad.append("a padded slot has a nonzero score")
    for r in range(b):
        m = min(K, len(set(item_ids[r, real[r]].tolist())))  # a repeated item enters the top k once
        row = idx[r]
        if np.any((row < -1) | (row >= n)):
            bad.append(f"row {r}: top_k_indices {row} outside [-1, {n})")
        elif np.any(row[:m] < 0) or np.any(row[m:] != -1):
            bad.append(f"row {r}: top_k_indices {row}: expected {m} indices, then -1")
        elif len(set(top[r, :m].tolist())) != m or not np.all(real[r, row[:m]]):
            bad.append(f"row {r}: top_k_indices {row} repeat an item or point at padding")
        elif np.any(top[r, :m] != item_ids[r, row[:m]]) or np.any(top[r, m:] != 0):
            bad.append(f"row {r}: top_k_item_ids {top[r]} are not item_ids at top_k_indices {row}")
        else:
            best = scores[r, row[:m]]
            rest = np.flatnonzero(real[r] & ~np.isin(item_ids[r], top[r, :m]))
            if np.any(np.diff(best) > 0.0):
                bad.append(f"row {r}: top k not best first: {best}")
            elif m and rest.size and scores[r, rest].max() > best.min():
                bad.append(f"row {r}: a better candidate than the top k is left out")
    return bad


def same(a, b, what):
    """Problems if two answers for the same lists differ (scores, and the scores of their top k)."""
    sa, sb = a["scores"].numpy(), b["scores"].numpy()
    n = sa.shape[1]
    if sb.shape[0] != sa.shape[0] or not np.allclose(sa, sb[:, :n], atol=1e-5):
        return [f"{what}: scores differ"]
    top_a = np.take_along_axis(sa, np.maximum(a["top_k_indices"].numpy(), 0), 1)
    top_b = np.take_along_axis(sb, np.maximum(b["top_k_indices"].numpy(), 0), 1)
    if not np.allclose(top_a, top_b, atol=1e-5):
        return [f"{what}: top k differ"]
    return []


def padding_and_alone(out, req):
    """A valid answer is unchanged by padding the lists to the trained list size and by scoring row 0 alone."""
    bad = []
    ids = req["item_ids"]
    if 0 < ids.shape[1] < L:
        padded = dict(req)
        for key in ("item_ids", "retriever_scores"):
            padded[key] = np.pad(req[key], [[0, 0], [0, L - ids.shape[1]]])
        bad += same(out, P(**tensors(padded)), "padded to the list size")
    if ids.shape[0] > 1:
        alone = P(**tensors({key: value[:1] for key, value in req.items()}))
        bad += same({key: value[:1] for key, value in out.items()}, alone, "row 0 alone")
    return bad


def parsed_item_ids(examples):
    """item_ids as serving_default sees them (our own parse of the same bytes), or None if they do not parse."""
    try:
        return tf.io.parse_example(tf.constant(examples, tf.string), SPEC)["item_ids"].to_tensor().numpy()
    except tf.errors.InvalidArgumentError:
        return None


# ---- the driver -------------------------------------------------------------------------------------------------
def message_of(e):
    if isinstance(e, UnicodeDecodeError):  # TF could not decode its own message (raw example bytes): keep them
        text = e.object.decode("utf-8", "backslashreplace")
    else:
        text = getattr(e, "message", None) or str(e)
    text = " ".join(text.split())
    return text if len(text) <= 3000 else text[:2000] + " ... " + text[-1000:]


def send(family, signature, inputs, check, **meta):
    """Calls a signature; records `ok` (after `check(answer)`, whose problems are violations) or the error."""
    i = len(CASES)
    print(f"case {i} {family}", file=sys.stderr, flush=True)  # the last line names the case if the process dies
    record = {"i": i, "family": family, "signature": signature, **meta}
    try:
        out = (P if signature == "predict_lists" else S)(**inputs)
    except Exception as e:  # every error is recorded; the test judges it
        record.update(outcome="error", type=type(e).__name__, message=message_of(e))
    else:
        record["outcome"] = "ok"
        try:
            problems = check(out)
        except Exception as e:
            problems = [f"checking the answer failed: {type(e).__name__}: {message_of(e)}"]
        VIOLATIONS.extend(f"case {i} ({family}): {p}" for p in problems)
    CASES.append(record)


def send_lists(family, req, consistency=False, **meta):
    def check(out):
        bad = contract(out, np.asarray(req["item_ids"]))
        return bad + padding_and_alone(out, req) if consistency and not bad else bad

    send(family, "predict_lists", tensors(req), check, **meta)


def send_examples(family, examples, lists_=None, **meta):
    """serving_default on `examples`; an answer for known `lists_` must match predict_lists on the same lists."""

    def check(out):
        if lists_ is None:
            ids = parsed_item_ids(examples)
            return ["answered examples that do not parse"] if ids is None else contract(out, ids)
        req = dense(lists_)
        bad = contract(out, req["item_ids"])
        return bad or same(out, P(**tensors(req)), "serving_default vs predict_lists")

    send(family, "serving_default", {"examples": tf.constant(examples, tf.string)}, check, **meta)


def with_one_bad(b, bad):
    """b valid serialized examples with one (at a random position) replaced by `bad`."""
    examples = [example(*x) for x in lists(b)]
    examples[int(rng.integers(0, b))] = bad
    return examples


def predict_lists_cases():
    for _ in range(60):
        send_lists("p_valid", request(), consistency=True)
    for _ in range(20):
        send_lists("p_oov_ids", request(kind="oov"), consistency=True)
    for _ in range(20):
        send_lists("p_huge_ids", request(kind="huge"), consistency=True)
    for _ in range(15):
        send_lists("p_empty_history", request(h=0), consistency=True)
    for h in (100, 500, 2000, 5000) * 3:
        send_lists("p_long_history", request(b=int(rng.integers(1, 5)), h=h))
    for n, h in ((0, 0), (1, 0), (L, 0), (0, 5), (1, 5), (L, 5), (7, 20), (L, 40)):
        send_lists("p_empty_batch", request(b=0, n=n, h=h))
    for b in (1, 2, 4, 16):
        send_lists("p_empty_lists", request(b=b, n=0))
    for _ in range(10):
        req = request()
        real = req["item_ids"] != 0
        edge = rng.choice(np.array([0.0, -0.0, 1.0, 1e-45, np.nextafter(1.0, 0.0)], np.float32), size=real.shape)
        req["retriever_scores"] = np.where(real & (rng.random(real.shape) < 0.5), edge, req["retriever_scores"])
        send_lists("p_score_bounds", req, consistency=True)
    for _ in range(8):
        send_lists("p_negative_history", request(h=int(rng.integers(1, 41)), history_kind="negative"))
    for n in [L + 1, L + 2, 2 * L, 4 * L, 5000] + [int(rng.integers(L + 1, 4 * L)) for _ in range(7)]:
        send_lists("p_too_long", request(b=1 if n == 5000 else None, n=n), field="item_ids")
    bad_scores = {
        "p_scores_nan": lambda: np.nan,
        "p_scores_inf": lambda: rng.choice([np.inf, -np.inf]),
        "p_scores_negative": lambda: rng.choice([-1e-7, -0.5, -1.0, -3.4e38]),
        "p_scores_above_one": lambda: rng.choice([np.nextafter(np.float32(1), np.float32(2)), 1.5, 2.0, 3.4e38]),
    }
    for family, value in bad_scores.items():
        for _ in range(10):
            req = request(b=int(rng.integers(1, 9)))
            r, c = int(rng.integers(0, req["item_ids"].shape[0])), int(rng.integers(0, req["item_ids"].shape[1]))
            req["retriever_scores"][r, c] = value()  # on a real candidate or on padding: both are rejected
            send_lists(family, req, field="retriever_scores")
    for _ in range(12):
        req = request(b=int(rng.integers(1, 9)), n=int(rng.integers(1, L)))
        b, n = req["item_ids"].shape
        shape = [(b, n + 1), (b, n - 1) if n > 1 else (b, 2), (b + 1, n), (n, b) if n != b else (b, n + 3)][_ % 4]
        req["retriever_scores"] = rng.random(shape).astype(np.float32)
        send_lists("p_shape_mismatch", req, field="retriever_scores")
    for field, family in (("history", "p_history_batch"), ("user_id", "p_user_id_batch")):
        for j in range(8):
            req = request(b=int(rng.integers(1, 9)))
            other = request(b=req["item_ids"].shape[0] + (1 if j % 2 else -1))
            req[field] = other[field]
            send_lists(family, req, field=field)
    for _ in range(10):
        req = request(b=int(rng.integers(1, 9)))
        r, c = int(rng.integers(0, req["item_ids"].shape[0])), int(rng.integers(0, req["item_ids"].shape[1]))
        req["item_ids"][r, c] = rng.choice([-1, -(10**9), INT64_MIN])
        send_lists("p_negative_ids", req, field="item_ids")
    wrong_ranks = [
        ("item_ids", lambda v: v[0]),
        ("item_ids", lambda v: v[None]),
        ("retriever_scores", lambda v: v[0]),
        ("retriever_scores", lambda v: v[:, :, None]),
        ("history", lambda v: v[0]),
        ("history", lambda v: v[None]),
        ("user_id", lambda v: v[0]),
        ("user_id", lambda v: v[:, None]),
    ]
    for j in range(12):
        field, reshape = wrong_ranks[j % len(wrong_ranks)]
        req = request(b=int(rng.integers(1, 5)), h=int(rng.integers(1, 21)))
        req[field] = reshape(req[field])
        send_lists("p_wrong_rank", req, field=field)
    wrong_dtypes = [
        ("item_ids", "int32"),
        ("item_ids", "float32"),
        ("item_ids", "float64"),
        ("item_ids", "string"),
        ("retriever_scores", "float64"),
        ("retriever_scores", "float16"),
        ("retriever_scores", "int64"),
        ("retriever_scores", "string"),
        ("history", "int32"),
        ("history", "float32"),
        ("user_id", "int32"),
        ("user_id", "string"),
    ]
    for j in range(16):
        field, dtype = wrong_dtypes[j % len(wrong_dtypes)]
        req = tensors(request(b=int(rng.integers(1, 5))))
        value = req[field].numpy()
        req[field] = tf.constant(value.astype(str)) if dtype == "string" else tf.constant(value, dtype)
        expected = P.structured_input_signature[1][field].dtype.name
        meta = {"field": field, "index": ORDER.index(field), "expected": expected, "given": dtype}
        send("p_wrong_dtype", "predict_lists", req, lambda out: contract(out, None), **meta)
    for j in range(10):
        lengths = rng.choice(np.arange(1, 8), size=int(rng.integers(2, 5)), replace=False)  # never rectangular
        rows = [list(rng.choice(VOCAB, size=int(n))) for n in lengths]
        scores = [list(rng.random(len(row)).round(3)) for row in rows]
        kind = ("python", "ragged_tensor", "numpy_object")[j % 3]
        if kind == "ragged_tensor":
            ids_in, scores_in = tf.ragged.constant(rows, tf.int64), tf.ragged.constant(scores, tf.float32)
        elif kind == "numpy_object":
            ids_in, scores_in = np.array(rows, dtype=object), np.array(scores, dtype=object)
        else:
            ids_in, scores_in = [[int(v) for v in row] for row in rows], [[float(v) for v in row] for row in scores]
        req = {"item_ids": ids_in, "retriever_scores": scores_in}
        req |= {"history": tf.ones([len(rows), 3], tf.int64), "user_id": tf.ones([len(rows)], tf.int64)}
        send("p_ragged", "predict_lists", req, lambda out: contract(out, None), field="item_ids", kind=kind)


def serving_default_cases():
    for _ in range(40):
        lists_ = lists(batch_size(), pad_to_list_size=bool(rng.random() < 0.3))
        send_examples("s_valid", [example(*x) for x in lists_], lists_)
    for j in range(16):
        lists_ = lists(batch_size(), kind=("oov", "huge")[j % 2])
        send_examples("s_oov_huge_ids", [example(*x) for x in lists_], lists_)
    for _ in range(10):
        lists_ = lists(batch_size(), history=False)
        send_examples("s_missing_history", [example(*x) for x in lists_], lists_)
    for _ in range(4):
        send_examples("s_empty_batch", [], [])
    for j in range(8):
        empty = [b"", example(), example(history=ids_of("vocab", 5))][j % 3]
        send_examples("s_no_candidates", with_one_bad(int(rng.integers(1, 4)), empty) if j > 2 else [empty])
    for _ in range(8):
        ids = ids_of("vocab", int(rng.integers(1, L + 1)))
        send_examples("s_missing_scores", with_one_bad(int(rng.integers(1, 5)), example(ids, None, ids[:3])))
    for _ in range(8):
        scores = rng.random(int(rng.integers(1, L + 1)))
        send_examples("s_missing_item_ids", with_one_bad(int(rng.integers(1, 5)), example(None, scores, [1, 2])))
    for _ in range(10):
        n = int(rng.integers(1, L + 1))
        m = int(rng.choice([k for k in (0, n - 1, n + 1, 2 * n) if k != n and k >= 0]))
        bad = example(ids_of("vocab", n), rng.random(m), ids_of("vocab", 4))
        send_examples("s_scores_wrong_length", with_one_bad(int(rng.integers(1, 5)), bad))
    for _ in range(8):
        n = int(rng.integers(1, L + 1))
        ids = ids_of("vocab", n).astype(float) + rng.choice([0.0, 0.5])  # whole numbers or not, as floats
        bad = example(ids, rng.random(n), [3], {"item_ids": "float"})
        send_examples("s_float_item_ids", with_one_bad(int(rng.integers(1, 5)), bad), field="item_ids")
    wrong_types = [
        ("item_ids", "bytes"),
        ("retriever_scores", "int64"),
        ("retriever_scores", "bytes"),
        ("history", "float"),
        ("history", "bytes"),
    ]
    for j in range(10):
        field, kind = wrong_types[j % len(wrong_types)]
        n = int(rng.integers(1, L + 1))
        bad = example(ids_of("vocab", n), rng.integers(0, 2, size=n), ids_of("vocab", 3), {field: kind})
        send_examples("s_wrong_feature_type", with_one_bad(int(rng.integers(1, 5)), bad), field=field)
    for n in (L + 1, 2 * L, 5000, L + 7, 3 * L, L + 2, 4 * L, L + 30):
        bad = example(ids_of("vocab", n), rng.random(n), [1])
        send_examples("s_too_long", with_one_bad(int(rng.integers(1, 4)), bad), field="item_ids")
    for j in range(12):
        n = int(rng.integers(1, L + 1))
        scores = rng.random(n)
        scores[int(rng.integers(0, n))] = [np.nan, np.inf, -np.inf, -0.25, 1.0001, 7.0][j % 6]
        bad = example(ids_of("vocab", n), scores, [1])
        send_examples("s_bad_scores", with_one_bad(int(rng.integers(1, 5)), bad), field="retriever_scores")
    for _ in range(8):
        ids = ids_of("negative", int(rng.integers(1, L + 1)))
        bad = example(ids, rng.random(len(ids)), [1])
        send_examples("s_negative_ids", with_one_bad(int(rng.integers(1, 5)), bad), field="item_ids")
    for _ in range(30):
        size = int(rng.choice([0, 1, 2, 5, 20, 100, 1000]))
        send_examples("s_random_bytes", with_one_bad(int(rng.integers(1, 4)), rng.bytes(size)))
    for _ in range(30):
        full = example(*lists(1)[0])
        send_examples("s_truncated", with_one_bad(int(rng.integers(1, 4)), full[: int(rng.integers(1, len(full)))]))
    for _ in range(30):
        full = bytearray(example(*lists(1)[0]))
        for pos in rng.integers(0, len(full), size=int(rng.integers(1, 4))):
            full[pos] = int(rng.integers(0, 256))
        send_examples("s_corrupted", with_one_bad(int(rng.integers(1, 4)), bytes(full)))
    good = [example(*x) for x in lists(2)]
    wrong_ranks = [
        tf.constant(good[0]),  # a scalar
        tf.constant([good]),  # [1, 2]
        tf.constant([[good[0]], [good[1]]]),  # [2, 1]
        tf.constant([[good]]),  # [1, 1, 2]
        tf.zeros([1, 0], tf.string),
        tf.zeros([0, 3], tf.string),
    ]
    for tensor in wrong_ranks:
        send("s_wrong_rank", "serving_default", {"examples": tensor}, lambda out: contract(out, None), field="examples")
    wrong_dtypes = [("int32", [1, 2]), ("int64", [1]), ("float32", [0.5]), ("float64", [0.5]), ("bool", [True])]
    for dtype, value in wrong_dtypes + [("int32", [])]:
        inputs = {"examples": tf.constant(value, dtype)}
        meta = {"field": "examples", "index": 0, "expected": "string", "given": dtype}
        send("s_wrong_dtype", "serving_default", inputs, lambda out: contract(out, None), **meta)


predict_lists_cases()
serving_default_cases()
counts = {}
for case in CASES:
    family = counts.setdefault(case["family"], {})
    family[case["outcome"]] = family.get(case["outcome"], 0) + 1
report = {
    "seed": SEED,
    "k": K,
    "list_size": L,
    "order": ORDER,
    "total": len(CASES),
    "counts": counts,
    "violations": VIOLATIONS,
    "seconds": round(time.perf_counter() - START, 1),
    "dnr_tf_imported": any(m.split(".")[0] in ("dnr_tf", "pipeline") for m in sys.modules),
    "cases": CASES,
}
print(json.dumps(report))
'''

# What each family must get. "answered": it must be answered (and the answer keep the contract);
# otherwise (allowed outcomes, allowed error types, a regex the error message must match). Templates are filled from
# the case ({field}, {index}, {expected}, {given}) and the export ({list_size}); TF writes float32 as "float".
ANSWERED = "answered"
INVALID_ARGUMENT = ("InvalidArgumentError",)
# Malformed examples meet TF's parser before our checks. Its message names the example ("Could not parse example
# input"), the feature ("Key: history, ...") or at least the node that parses `examples` (named parse_examples by the
# export); where the example does parse, one of our checks names the field. The parser puts the raw bytes of an
# unparsable example into its message; where they are not UTF-8, TF's Python binding raises UnicodeDecodeError instead
# of InvalidArgumentError: the driver records that message's bytes, which are judged alike.
PARSER = ("InvalidArgumentError", "UnicodeDecodeError")
MALFORMED = (
    r"Could not parse example input|\bnode parse_examples/|Key: (item_ids|retriever_scores|history)\b"
    r"|assertion failed: \[(item_ids|retriever_scores|history)\b"
)
OUT_OF_RANGE = r"retriever_scores must be finite numbers in \[0, 1\] \(found NaN, inf or out of range\)"
TOO_LONG = r"item_ids: a list has more candidates than the model was trained for \({list_size}\)"
ONE_SCORE_PER_ITEM = r"retriever_scores must hold one value per item_ids entry"
SIGNATURE_DTYPE = r"input #{index}\(zero-based\) was expected to be a {expected} tensor but is a {given} tensor"
RULES = {
    "p_valid": ANSWERED,
    "p_oov_ids": ANSWERED,
    "p_huge_ids": ANSWERED,
    "p_empty_history": ANSWERED,
    "p_long_history": ANSWERED,
    "p_empty_batch": ANSWERED,
    "p_empty_lists": ANSWERED,
    "p_score_bounds": ANSWERED,
    # Negative history ids are out of the vocabulary (answered with the OOV row); rejecting them is fine too.
    "p_negative_history": ({"ok", "error"}, INVALID_ARGUMENT, r"\bhistory\b"),
    "p_too_long": ({"error"}, INVALID_ARGUMENT, TOO_LONG),
    "p_scores_nan": ({"error"}, INVALID_ARGUMENT, OUT_OF_RANGE),
    "p_scores_inf": ({"error"}, INVALID_ARGUMENT, OUT_OF_RANGE),
    "p_scores_negative": ({"error"}, INVALID_ARGUMENT, OUT_OF_RANGE),
    "p_scores_above_one": ({"error"}, INVALID_ARGUMENT, OUT_OF_RANGE),
    "p_shape_mismatch": (
        {"error"},
        INVALID_ARGUMENT,
        r"retriever_scores must have the shape of item_ids \[batch, list_size\]",
    ),
    "p_history_batch": ({"error"}, INVALID_ARGUMENT, r"history must have one row per item_ids row"),
    "p_user_id_batch": ({"error"}, INVALID_ARGUMENT, r"user_id must hold one id per item_ids row"),
    "p_negative_ids": ({"error"}, INVALID_ARGUMENT, r"item_ids must be >= 0 \(0 is padding\)"),
    "p_wrong_rank": (
        {"error"},
        INVALID_ARGUMENT,
        r"Shape of tensor {field} \[[\d,]*\] is not compatible with expected shape",
    ),
    # TF checks a signature's dtypes before the graph runs: its message names the input by position and both dtypes.
    "p_wrong_dtype": ({"error"}, INVALID_ARGUMENT, SIGNATURE_DTYPE),
    # A ragged request cannot become a dense tensor: TF refuses to bind it, echoing the arguments by name.
    "p_ragged": (
        {"error"},
        ("TypeError", "ValueError"),
        r"Binding inputs to tf\.function failed due to `.*(non-rectangular|RaggedTensor|not 'list').*'{field}': ",
    ),
    "s_valid": ANSWERED,
    "s_oov_huge_ids": ANSWERED,
    "s_missing_history": ANSWERED,
    "s_empty_batch": ANSWERED,
    # Examples without item_ids are lists without candidates (like item_ids [batch, 0] in predict_lists).
    "s_no_candidates": ({"ok", "error"}, INVALID_ARGUMENT, r"\bitem_ids\b"),
    "s_missing_scores": ({"error"}, INVALID_ARGUMENT, ONE_SCORE_PER_ITEM),
    "s_missing_item_ids": ({"error"}, INVALID_ARGUMENT, ONE_SCORE_PER_ITEM),
    "s_scores_wrong_length": ({"error"}, INVALID_ARGUMENT, ONE_SCORE_PER_ITEM),
    "s_float_item_ids": ({"error"}, INVALID_ARGUMENT, r"Key: item_ids, Index: \d+\. Data types don't match"),
    "s_wrong_feature_type": ({"error"}, INVALID_ARGUMENT, r"Key: {field}, Index: \d+\. Data types don't match"),
    "s_too_long": ({"error"}, INVALID_ARGUMENT, TOO_LONG),
    "s_bad_scores": ({"error"}, INVALID_ARGUMENT, OUT_OF_RANGE),
    "s_negative_ids": ({"error"}, INVALID_ARGUMENT, r"item_ids must be >= 0 \(0 is padding\)"),
    "s_random_bytes": ({"ok", "error"}, PARSER, MALFORMED),
    "s_truncated": ({"ok", "error"}, PARSER, MALFORMED),
    "s_corrupted": ({"ok", "error"}, PARSER, MALFORMED),
    "s_wrong_rank": (
        {"error"},
        INVALID_ARGUMENT,
        r"Shape of tensor examples \[[\d,]*\] is not compatible with expected shape",
    ),
    "s_wrong_dtype": ({"error"}, INVALID_ARGUMENT, SIGNATURE_DTYPE),
}
TF_DTYPE_NAMES = {"float32": "float", "float64": "double", "float16": "half"}
TOTAL_CASES = 537


@pytest.fixture(scope="module")
def export(smoke_run):
    """The session's smoke run, exported (conftest.py): (SavedModel path, item vocabulary file)."""
    return smoke_run["export"], smoke_run["run"] / "item_vocab.txt"


def _judge(case, list_size):
    """Why a case's outcome breaks its family's rule, or None."""
    rule = RULES[case["family"]]
    if rule == ANSWERED:
        return None if case["outcome"] == "ok" else f"must be answered, got {case['type']}: {case['message'][:400]}"
    outcomes, types, pattern = rule
    if case["outcome"] not in outcomes:
        return f"must be rejected naming the input, but was answered ({case})"
    if case["outcome"] == "ok":
        return None
    if case["type"] not in types:
        return f"error type {case['type']} not in {types}: {case['message'][:400]}"
    given, expected = case.get("given"), case.get("expected")
    names = {"given": TF_DTYPE_NAMES.get(given, given), "expected": TF_DTYPE_NAMES.get(expected, expected)}
    regex = pattern.format(**{**case, **names, "list_size": list_size})
    if not re.search(regex, case["message"]):
        return f"error does not match {regex!r}: {case['message'][:600]}"
    return None


def test_fuzzed_requests_are_answered_or_rejected_naming_the_input(export, tmp_path):
    """Every fuzzed request to both signatures, in a process without dnr_tf, is answered within the output contract
    or rejected with an error naming the input at fault; nothing crashes the process or returns NaN scores."""
    path, vocab = export
    script = tmp_path / "fuzz_driver.py"
    script.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), path, str(vocab), str(SEED)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        errors="backslashreplace",  # TF's warnings echo the raw bytes of unparsable examples
        timeout=300,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"the driver died (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout)
    print(f"\nfuzz: {report['total']} cases, seed {SEED}, {seconds:.1f} s ({report['seconds']} s sending them)")
    for family, outcomes in report["counts"].items():
        print(f"  {family:24s}" + "  ".join(f"{outcome} {n}" for outcome, n in sorted(outcomes.items())))

    assert not report["dnr_tf_imported"]
    assert report["order"] == ["history", "item_ids", "retriever_scores", "user_id"]  # TF's numbering of inputs
    assert report["violations"] == [], "answers that break the output contract:\n" + "\n".join(report["violations"])
    assert set(report["counts"]) == set(RULES), "the driver's families and the rules differ"
    failures = []
    for case in report["cases"]:
        why = _judge(case, report["list_size"])
        if why:
            failures.append(f"case {case['i']} ({case['family']}, {case.get('field', '')}): {why}")
    assert not failures, f"{len(failures)} cases break their family's rule:\n" + "\n".join(failures[:30])
    assert report["total"] == TOTAL_CASES == sum(sum(c.values()) for c in report["counts"].values())
