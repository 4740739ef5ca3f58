"""The retriever stage: matrix factorisation with random negatives (paper appendix D.1).

Trained between the two Beam stages, in the driver, on the retriever window that the first stage
wrote as `window_shards` gzip TSV files. The window is streamed from those files in blocks of
`shuffle_buffer` pairs, each shuffled whole: the driver holds one block and the embedding tables,
never more of the window (a window smaller than a block is read once and kept). The tables it
saves under `<output_dir>/retriever/` are the side input of candidate generation.
`train_and_save` dispatches on `retriever.kind`: MF here, `item2item` in pipeline/item2item.py, and
`mf_item2item` (MF's candidates, item-to-item's x) trains both.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator

import numpy as np

from pipeline.config import MF_CANDIDATES, RetrieverConfig
from pipeline.protocol import Retriever

log = logging.getLogger(__name__)
TABLES = "mf.npz"  # the item table (and the global bias): the side input of candidate generation
USER_ROWS = "user_rows"  # user_rows-SSSSS-of-NNNNN.jsonl.gz: one user a line, joined by key in stage 2
USERS_PER_SHARD = 100_000


def read_pairs(path: str, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """`[n, 2]` (user row, item row) pairs of one gzip TSV `user<TAB>item` file."""
    import gzip

    import tensorflow as tf

    with tf.io.gfile.GFile(path, "rb") as f:
        text = gzip.decompress(f.read())
    if not text.strip():
        return np.zeros((0, 2), np.int64)
    raw = np.loadtxt(io.BytesIO(text), dtype=np.int64, delimiter="\t", ndmin=2)
    return np.stack([np.searchsorted(users, raw[:, 0]), np.searchsorted(items, raw[:, 1])], axis=1)


def kept_share(pairs: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """The `[n, 2]` pairs a stable hash of (seed, user row, item row) keeps, about `fraction` of them.

    The retrained retriever's share of the window (`retrained.keep_fraction`): the same pairs on
    every runner and in every block order (splitmix64 of the three numbers).
    """
    if fraction >= 1.0:
        return pairs
    with np.errstate(over="ignore"):
        z = pairs[:, 0].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z ^= pairs[:, 1].astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F) + np.uint64(seed & 0xFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return pairs[(z >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction]


def pair_blocks(pattern: str, users: np.ndarray, items: np.ndarray, block: int, keep: tuple[int, float] | None = None):
    """Yields the pairs of the files matching `pattern` in blocks of about `block` pairs, each sorted.

    The files are read in name order and a block is emitted once it holds `block` pairs (plus at
    most one file: stage 1 writes `window_shards` files, so one is a small share of the window).
    Sorting makes a block independent of the order in which Beam workers wrote the lines, so the
    same seed gives the same retriever on every runner and worker count. A window that fits in
    one block comes as a single block: the retriever then shuffles it whole. `keep` = (seed,
    fraction) keeps only the share of pairs that `kept_share` chooses.
    """
    import tensorflow as tf

    pending, held = [], 0
    for path in sorted(tf.io.gfile.glob(pattern)):
        pairs = read_pairs(path, users, items)
        if keep is not None:
            pairs = kept_share(pairs, *keep)
        pending.append(pairs)
        held += len(pairs)
        if held >= block:
            yield _sorted(np.concatenate(pending))
            pending, held = [], 0
    if held:
        yield _sorted(np.concatenate(pending))


def _sorted(pairs: np.ndarray) -> np.ndarray:
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def shuffled_batches(blocks: Iterable[np.ndarray], batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Yields `[batch_size, 2]` batches of the pairs of `blocks`, each block shuffled whole on its own.

    The batches run on across blocks (the rest of one block opens the next one's first batch), so only
    the window's last batch is shorter: the train step is traced for two shapes, not one more a block.
    """
    rest = np.zeros((0, 2), np.int64)
    for pairs in blocks:
        shuffled = pairs[rng.permutation(len(pairs))]
        if len(rest):
            shuffled = np.concatenate([rest, shuffled])
        full = len(shuffled) - len(shuffled) % batch_size
        for b in range(0, full, batch_size):
            yield shuffled[b : b + batch_size]
        rest = shuffled[full:]
    if len(rest):
        yield rest


def train_mf(
    train_pattern: str,
    eval_patterns: dict[str, str],
    users: np.ndarray,
    items: np.ndarray,
    cfg: RetrieverConfig,
    seed: int,
    progress=print,
    keep: tuple[int, float] | None = None,
) -> tuple[Retriever, dict, dict]:
    """Trains MF on (user, item) pairs; returns the retriever, the user tables, and its metrics.

    Args:
        train_pattern: gzip TSV files of `user<TAB>item` training pairs.
        eval_patterns: name -> files of pairs to measure the AUC on (held-out, future).
        users: `[num_users]` sorted raw user ids (the vocabulary).
        items: `[num_items]` sorted raw item ids.
        cfg: hyperparameters.
        seed: seed of initialisation, shuffling and negative sampling.
        progress: called with one line per epoch.
        keep: (seed, fraction): train on the share of the pairs that `kept_share` keeps.

    Returns:
        (retriever, {"user_ids", "user_emb", "user_bias"}, metrics dict with `auc_<name>`).
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    num_users, num_items = len(users), len(items)
    init = keras.initializers.RandomNormal(stddev=0.05, seed=seed)
    user_emb = keras.layers.Embedding(num_users, cfg.dim, embeddings_initializer=init)
    item_emb = keras.layers.Embedding(
        num_items, cfg.dim, embeddings_initializer=keras.initializers.RandomNormal(stddev=0.05, seed=seed + 1)
    )
    user_bias = keras.layers.Embedding(num_users, 1, embeddings_initializer="zeros")
    item_bias = keras.layers.Embedding(num_items, 1, embeddings_initializer="zeros")
    global_bias = tf.Variable(0.0)
    for layer in (user_emb, item_emb, user_bias, item_bias):
        layer.build((None,))
    variables = [user_emb.embeddings, item_emb.embeddings, user_bias.embeddings, item_bias.embeddings, global_bias]
    optimizer = keras.optimizers.Adam(cfg.learning_rate)
    optimizer.build(variables)
    gen = tf.random.Generator.from_seed(seed)

    def logits(u, i):
        # u: [B], i: [B, m] -> [B, m]
        ue = user_emb(u)[:, None, :]
        return tf.reduce_sum(ue * item_emb(i), -1) + tf.squeeze(item_bias(i), -1) + user_bias(u) + global_bias

    @tf.function
    def step(u, pos):
        neg = gen.uniform([tf.shape(u)[0], cfg.negatives], 0, num_items, dtype=tf.int64)
        cand = tf.concat([pos[:, None], neg], axis=1)
        labels = tf.concat([tf.ones_like(pos[:, None]), tf.zeros_like(neg)], axis=1)
        with tf.GradientTape() as tape:
            lg = logits(u, cand)
            bce = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(tf.cast(labels, tf.float32), lg))
            reg = (
                cfg.l2
                * (tf.reduce_sum(user_emb(u) ** 2) + tf.reduce_sum(item_emb(cand) ** 2))
                / tf.cast(tf.shape(u)[0], tf.float32)
            )
            loss = bce + reg
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return bce

    cached = None  # the whole window, when it fits in one shuffle block

    def window_blocks():
        nonlocal cached
        if cached is not None:
            yield from cached
            return
        for k, pairs in enumerate(pair_blocks(train_pattern, users, items, cfg.shuffle_buffer, keep)):
            # A block is closed once it is full, so only a short first block is the whole window.
            if k == 0 and len(pairs) < cfg.shuffle_buffer:
                cached = [pairs]
            yield pairs

    rng = np.random.default_rng(seed)
    for epoch in range(cfg.epochs):
        start = time.time()
        losses = []
        for rows in shuffled_batches(window_blocks(), cfg.batch_size, rng):
            losses.append(step(tf.constant(rows[:, 0]), tf.constant(rows[:, 1])))
        if not losses:
            raise ValueError(f"the retriever window is empty ({train_pattern})")
        loss = float(tf.reduce_mean(tf.stack(losses)))
        progress(f"  retriever epoch {epoch + 1}/{cfg.epochs}: loss {loss:.4f} ({time.time() - start:.1f}s)")

    metrics = {
        f"auc_{name}": _auc(pattern, users, items, logits, seed, cfg.shuffle_buffer)
        for name, pattern in eval_patterns.items()
    }
    retriever = Retriever(
        item_ids=np.asarray(items, np.int64),
        item_emb=item_emb.embeddings.numpy().astype(np.float32),
        item_bias=item_bias.embeddings.numpy()[:, 0].astype(np.float32),
        global_bias=float(global_bias.numpy()),
    )
    user_tables = {
        "user_ids": np.asarray(users, np.int64),
        "user_emb": user_emb.embeddings.numpy().astype(np.float32),
        "user_bias": user_bias.embeddings.numpy()[:, 0].astype(np.float32),
    }
    return retriever, user_tables, {**metrics, "num_users": num_users, "num_items": num_items}


def train_and_save(
    cfg: RetrieverConfig,
    train_pattern: str,
    eval_patterns: dict[str, str],
    users: np.ndarray,
    items: np.ndarray,
    seed: int,
    directory: str,
    keep: tuple[int, float] | None = None,
) -> dict:
    """Trains the retriever of `cfg.kind` on the window and saves it under `directory`; returns its metrics.

    `mf` writes `mf.npz`, the user rows and `metrics.json` (`save`); `item2item` writes
    `item2item.npz` and `metrics.json` (it has no user table: it scores the user's history);
    `mf_item2item` writes both, and its metrics are item-to-item's (the model of x) with MF's (the
    candidates') under `candidates`.
    """
    if cfg.kind in MF_CANDIDATES:
        retriever, user_tables, metrics = train_mf(train_pattern, eval_patterns, users, items, cfg, seed, keep=keep)
        save(retriever, user_tables, metrics, directory)
        if cfg.kind == "mf":
            return metrics
        candidates = metrics
    import tensorflow as tf

    from pipeline import item2item

    def whole(pattern, k=None):
        blocks = list(pair_blocks(pattern, users, items, 1 << 62, k))
        return blocks[0] if blocks else np.zeros((0, 2), np.int64)

    evals = {name: whole(pattern) for name, pattern in eval_patterns.items()}
    retriever, metrics = item2item.train_item2item(whole(train_pattern, keep), items, cfg, evals, seed)
    metrics["num_users"] = len(users)
    if cfg.kind == "mf_item2item":
        metrics["candidates"] = {"kind": "mf", **candidates}
    item2item.save(retriever, directory)
    with tf.io.gfile.GFile(os.path.join(directory, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def load_kind(kind: str, directory: str):
    """The side input of candidate generation: MF's item table (`Retriever`), an `ItemToItem`, or
    for `mf_item2item` the pair (`Retriever`, `ItemToItem`)."""
    if kind == "mf":
        return load(directory)
    from pipeline import item2item

    if kind == "mf_item2item":
        return load(directory), item2item.load(directory)
    return item2item.load(directory)


def _auc(pattern, users, items, logits, seed, block: int) -> float:
    """AUC of positives against uniformly drawn items (one negative per positive)."""
    import tensorflow as tf

    rng = np.random.default_rng(seed + 1)
    correct, total = 0.0, 0
    for pairs in pair_blocks(pattern, users, items, block):
        for b in range(0, len(pairs), 4096):
            u, i = tf.constant(pairs[b : b + 4096, 0]), tf.constant(pairs[b : b + 4096, 1])
            neg = rng.integers(0, len(items), size=len(u))
            pos_s = logits(u, i[:, None])[:, 0].numpy()
            neg_s = logits(u, tf.constant(neg)[:, None])[:, 0].numpy()
            correct += float((pos_s > neg_s).sum() + 0.5 * (pos_s == neg_s).sum())
            total += len(pos_s)
    return correct / total if total else float("nan")


def save(retriever: Retriever, user_tables: dict, metrics: dict, directory: str) -> None:
    """Writes the item table (`mf.npz`) and the user rows (`user_rows-*.jsonl.gz`, one user a line:
    `[user id, bias, [embedding]]`), which stage 2 joins to the timelines by user instead of loading."""
    import gzip

    import tensorflow as tf

    tf.io.gfile.makedirs(directory)
    buffer = io.BytesIO()  # np.savez seeks; write to memory, then to any filesystem.
    np.savez(
        buffer,
        item_ids=retriever.item_ids,
        item_emb=retriever.item_emb,
        item_bias=retriever.item_bias,
        global_bias=np.float32(retriever.global_bias),
    )
    with tf.io.gfile.GFile(os.path.join(directory, TABLES), "wb") as f:
        f.write(buffer.getvalue())
    ids, emb, bias = user_tables["user_ids"], user_tables["user_emb"], user_tables["user_bias"]
    shards = max(1, -(-len(ids) // USERS_PER_SHARD))
    for shard in range(shards):
        rows = range(shard * USERS_PER_SHARD, min((shard + 1) * USERS_PER_SHARD, len(ids)))
        # float(np.float32) and back is exact: stage 2 sees the very same float32 values.
        text = "".join(json.dumps([int(ids[j]), float(bias[j]), [float(v) for v in emb[j]]]) + "\n" for j in rows)
        path = os.path.join(directory, f"{USER_ROWS}-{shard:05d}-of-{shards:05d}.jsonl.gz")
        with tf.io.gfile.GFile(path, "wb") as f:
            # Level 1: 9% larger than gzip's default 9 on these floats, and 12x faster to write.
            f.write(gzip.compress(text.encode(), compresslevel=1, mtime=0))
    with tf.io.gfile.GFile(os.path.join(directory, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)


def parse_user_row(line: str) -> tuple[int, tuple[np.ndarray, float]]:
    """(user id, (embedding float32, bias)) from a line of `user_rows-*.jsonl.gz`."""
    user, bias, emb = json.loads(line)
    return int(user), (np.asarray(emb, np.float32), float(np.float32(bias)))


def read_npz(path: str) -> dict:
    """The arrays of an `.npz` file on any Beam-readable path (np.load needs a seekable file)."""
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as f:
        data = np.load(io.BytesIO(f.read()))
        return {k: data[k] for k in data.files}


def load(directory: str) -> Retriever:
    """Loads the item table that `save` wrote (works for any Beam-readable path)."""
    arrays = read_npz(os.path.join(directory, TABLES))
    return Retriever(
        item_ids=arrays["item_ids"],
        item_emb=arrays["item_emb"],
        item_bias=arrays["item_bias"],
        global_bias=float(arrays["global_bias"]),
    )
