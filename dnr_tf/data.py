"""tf.data input: candidate-list TFRecords (as `pipeline.run` writes them) -> batches of dicts."""

from __future__ import annotations

import glob
import os

import tensorflow as tf

from dnr_tf import schema as schema_lib

SPLITS = ("train", "valid", "test")


def split_pattern(data_dir: str, split: str) -> str:
    """The file pattern of one split of a pipeline output directory."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return os.path.join(data_dir, f"{split}-*.tfrecord.gz")


def make_dataset(
    file_pattern: str,
    batch_size: int,
    *,
    schema: schema_lib.RecordSchema | None = None,
    shuffle: bool = False,
    shuffle_buffer: int = 10_000,
    seed: int | None = None,
    repeat: bool = False,
    drop_remainder: bool = False,
    cache: bool = False,
    epochs_from: int | None = None,
    epochs: int = 1,
) -> tf.data.Dataset:
    """Reads candidate-list records into batches of feature dicts.

    Args:
        file_pattern: glob of gzip TFRecord files, e.g. `data/ml100k/train-*.tfrecord.gz`.
        batch_size: lists per batch.
        schema: record shapes; by default read from `schema.json` beside the files.
        shuffle: shuffle files and records (deterministically when `seed` is given).
        shuffle_buffer: records held by the shuffle buffer.
        seed: seed of the shuffle.
        repeat: repeat forever.
        drop_remainder: drop a last, smaller batch.
        cache: cache the parsed records in memory (small data sets).
        epochs_from: with `shuffle`, the `epochs` epochs from this epoch number on, one after the
            other, epoch e shuffled with a seed made of (`seed`, e) alone: the batches of an epoch do
            not depend on how many iterators were made before, so a resumed run gets an
            uninterrupted run's batches by starting at its next epoch. Set the global seed first
            (`keras.utils.set_random_seed`): tf.data mixes it into every shuffle's seed.
        epochs: how many epochs `epochs_from` gives.

    Returns:
        A dataset of dicts: `item_ids` int64 `[batch, list_size]`, `retriever_scores` float32
        `[batch, list_size]`, `labels` int64 `[batch, list_size]` (-1 on padding), `history` int64
        `[batch, history_len]`, `user_id`, `timestamp` int64 `[batch]`, `request_id` string
        `[batch]`, and `oracle_scores` and `retriever_scores_retrained` (float32 `[batch, list_size]`,
        padding 0.0) where the data has them (`schema.json`'s `has_oracle`, `has_retrained`).

    Raises:
        FileNotFoundError: when the pattern matches no file.
    """
    files = sorted(glob.glob(file_pattern))
    if not files:
        raise FileNotFoundError(f"no TFRecord file matches {file_pattern}")
    if schema is None:
        schema = schema_lib.load_schema(os.path.dirname(files[0]))
    spec = schema.feature_spec()

    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed)
    ds = ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
        cycle_length=min(len(files), 4),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    # Batch before parsing: one vectorised parse_example per batch is much faster than one a record.
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(
        lambda serialized: tf.io.parse_example(serialized, spec),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if cache:
        ds = ds.cache()
    if shuffle and epochs_from is not None:
        records = ds
        base = 0 if seed is None else int(seed) * 1_000_003

        def epoch(e: int):
            one = records.unbatch().shuffle(shuffle_buffer, seed=base + e, reshuffle_each_iteration=False)
            return one.batch(batch_size, drop_remainder=drop_remainder)

        stream = epoch(epochs_from)
        for e in range(epochs_from + 1, epochs_from + epochs):
            stream = stream.concatenate(epoch(e))
        return _without_autotune_model(stream.prefetch(tf.data.AUTOTUNE))
    if shuffle:
        # Records were batched in file order; reshuffle across batches with a record-level buffer.
        ds = ds.unbatch().shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if repeat:
        ds = ds.repeat()
    return _without_autotune_model(ds.prefetch(tf.data.AUTOTUNE))


def _without_autotune_model(ds):
    """`ds` without tf.data's autotuning thread (`options.autotune.enabled = False`).

    With it, destroying an iterator that has lived for a while (the training iterator at the end of
    `fit`) sometimes waits for that thread's current optimisation period to run out: `train` then
    spent about 20 s after its last epoch in 7 of 33 ML-100K runs (DNR-B and DNR-G, 15-26 epochs,
    both before and after 2026-12-07's change of the train step; gdb: `RootDataset::Iterator::~Iterator`
    waiting on the thread, itself waiting in `Model::OptimizeLoop`). Nothing here needs its tuning:
    the records are cached after the first epoch, and the same epoch times were measured without it
    (docs/performance.md, issue 17). The parallel calls and the prefetch buffer keep their own
    defaults; the order of the records, and so every number, is unchanged (`deterministic=True`)."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)
