"""The candidate-list record: the one contract between the Beam pipeline and the trainer.

One `tf.train.Example` per request. Both `pipeline/` (which writes records) and
`dnr_tf.data` (which reads them) import this module, so the two cannot drift apart.

| feature            | dtype  | shape            | padding | meaning                                   |
|--------------------|--------|------------------|---------|-------------------------------------------|
| `request_id`       | bytes  | []               |         | unique id of the request                  |
| `user_id`          | int64  | []               |         | raw user id                               |
| `timestamp`        | int64  | []               |         | time of the request (seconds)             |
| `item_ids`         | int64  | [list_size]      | 0       | raw candidate ids, in the retriever order |
| `retriever_scores` | float  | [list_size]      | 0.0     | retriever score x in [0, 1]               |
| `labels`           | int64  | [list_size]      | -1      | feedback z in {0, 1}                      |
| `history`          | int64  | [history_len]    | 0       | consumed items, oldest first, left-padded |
| `oracle_scores`    | float  | [list_size]      | 0.0     | true p(z=1) (synthetic source only)       |
| `retriever_scores_retrained` | float | [list_size] | 0.0 | optional: a retrained retriever's x, same items |

Item and user ids are raw positive integers; 0 is reserved for padding. The model maps raw ids
to embedding rows itself (with an out-of-vocabulary row), so a served model takes the same ids
the logs hold.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

REQUEST_ID = "request_id"
USER_ID = "user_id"
TIMESTAMP = "timestamp"
ITEM_IDS = "item_ids"
RETRIEVER_SCORES = "retriever_scores"
LABELS = "labels"
HISTORY = "history"
ORACLE_SCORES = "oracle_scores"
RETRIEVER_SCORES_RETRAINED = "retriever_scores_retrained"

PADDING_ID = 0
PADDING_SCORE = 0.0
PADDING_LABEL = -1

DEFAULT_LIST_SIZE = 50
DEFAULT_HISTORY_LEN = 20
SCHEMA_FILE = "schema.json"
SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class RecordSchema:
    """Shapes of one record; written to `schema.json` beside the TFRecords.

    Attributes:
        list_size: candidates per request (padded to this length).
        history_len: items of user history (left-padded to this length).
        has_oracle: whether records carry `oracle_scores` (synthetic data only).
        num_items: distinct items in the data set (informative; the model reads the vocabulary).
        num_users: distinct users in the data set.
        has_retrained: whether records carry `retriever_scores_retrained` (pipeline `retrained.enabled`).
    """

    list_size: int = DEFAULT_LIST_SIZE
    history_len: int = DEFAULT_HISTORY_LEN
    has_oracle: bool = False
    num_items: int = 0
    num_users: int = 0
    has_retrained: bool = False

    def feature_spec(self) -> dict:
        """The `tf.io.parse_example` spec of a record."""
        import tensorflow as tf

        spec = {
            REQUEST_ID: tf.io.FixedLenFeature([], tf.string, default_value=b""),
            USER_ID: tf.io.FixedLenFeature([], tf.int64),
            TIMESTAMP: tf.io.FixedLenFeature([], tf.int64, default_value=0),
            ITEM_IDS: tf.io.FixedLenFeature([self.list_size], tf.int64),
            RETRIEVER_SCORES: tf.io.FixedLenFeature([self.list_size], tf.float32),
            LABELS: tf.io.FixedLenFeature([self.list_size], tf.int64, default_value=[PADDING_LABEL] * self.list_size),
            HISTORY: tf.io.FixedLenFeature([self.history_len], tf.int64, default_value=[PADDING_ID] * self.history_len),
        }
        if self.has_oracle:
            spec[ORACLE_SCORES] = tf.io.FixedLenFeature([self.list_size], tf.float32)
        if self.has_retrained:
            spec[RETRIEVER_SCORES_RETRAINED] = tf.io.FixedLenFeature([self.list_size], tf.float32)
        return spec

    def to_json(self) -> dict:
        """The content of `schema.json`: shapes, dtypes and padding values."""
        features = {
            REQUEST_ID: {"dtype": "bytes", "shape": []},
            USER_ID: {"dtype": "int64", "shape": []},
            TIMESTAMP: {"dtype": "int64", "shape": []},
            ITEM_IDS: {"dtype": "int64", "shape": [self.list_size], "padding": PADDING_ID},
            RETRIEVER_SCORES: {
                "dtype": "float32",
                "shape": [self.list_size],
                "padding": PADDING_SCORE,
                "range": [0.0, 1.0],
            },
            LABELS: {"dtype": "int64", "shape": [self.list_size], "padding": PADDING_LABEL},
            HISTORY: {"dtype": "int64", "shape": [self.history_len], "padding": PADDING_ID},
        }
        if self.has_oracle:
            features[ORACLE_SCORES] = {
                "dtype": "float32",
                "shape": [self.list_size],
                "padding": PADDING_SCORE,
            }
        if self.has_retrained:
            features[RETRIEVER_SCORES_RETRAINED] = {
                "dtype": "float32",
                "shape": [self.list_size],
                "padding": PADDING_SCORE,
                "range": [0.0, 1.0],
            }
        return {
            "schema_version": SCHEMA_VERSION,
            "list_size": self.list_size,
            "history_len": self.history_len,
            "has_oracle": self.has_oracle,
            "has_retrained": self.has_retrained,
            "num_items": self.num_items,
            "num_users": self.num_users,
            "features": features,
        }

    @classmethod
    def from_json(cls, obj: Mapping) -> RecordSchema:
        return cls(
            list_size=int(obj["list_size"]),
            history_len=int(obj["history_len"]),
            has_oracle=bool(obj.get("has_oracle", False)),
            num_items=int(obj.get("num_items", 0)),
            num_users=int(obj.get("num_users", 0)),
            has_retrained=bool(obj.get("has_retrained", False)),
        )


def write_schema(schema: RecordSchema, data_dir: str) -> str:
    path = os.path.join(data_dir, SCHEMA_FILE)
    with open(path, "w") as f:
        json.dump(schema.to_json(), f, indent=2)
    return path


def load_schema(data_dir: str) -> RecordSchema:
    """Reads `<data_dir>/schema.json`.

    Raises:
        FileNotFoundError: with the path, when the directory holds no schema (not a pipeline output).
    """
    path = os.path.join(data_dir, SCHEMA_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: --data_dir must be an output directory of `python -m pipeline.run`")
    with open(path) as f:
        return RecordSchema.from_json(json.load(f))


def pad(values: Sequence, length: int, fill, *, left: bool = False) -> list:
    """Pads (or, for history, keeps the most recent) `values` to exactly `length`."""
    values = list(values)
    if left:
        values = values[-length:] if length else []
        return [fill] * (length - len(values)) + values
    if len(values) > length:
        raise ValueError(f"{len(values)} values do not fit a list of {length}")
    return values + [fill] * (length - len(values))


def to_example(record: Mapping, schema: RecordSchema) -> bytes:
    """Serializes one request to a `tf.train.Example` in the record format above.

    Args:
        record: a dict with the feature names as keys; lists may be shorter than the schema's
            sizes (they are padded), `history` may be longer (the most recent items are kept).
        schema: the shapes to pad to.

    Returns:
        The serialized example, its feature map in name order: the same bytes in every process
        (protobuf's default order of map entries varies from one process to the next), so that a
        build's files can be compared by their checksums.
    """
    import tensorflow as tf

    def ints(values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))

    def floats(values):
        return tf.train.Feature(float_list=tf.train.FloatList(value=values))

    n = schema.list_size
    features = {
        REQUEST_ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(record[REQUEST_ID]).encode("utf-8")])),
        USER_ID: ints([int(record[USER_ID])]),
        TIMESTAMP: ints([int(record[TIMESTAMP])]),
        ITEM_IDS: ints(pad(record[ITEM_IDS], n, PADDING_ID)),
        RETRIEVER_SCORES: floats(pad(record[RETRIEVER_SCORES], n, PADDING_SCORE)),
        LABELS: ints(pad(record[LABELS], n, PADDING_LABEL)),
        HISTORY: ints(pad(record[HISTORY], schema.history_len, PADDING_ID, left=True)),
    }
    if schema.has_oracle:
        features[ORACLE_SCORES] = floats(pad(record[ORACLE_SCORES], n, PADDING_SCORE))
    if schema.has_retrained:
        features[RETRIEVER_SCORES_RETRAINED] = floats(pad(record[RETRIEVER_SCORES_RETRAINED], n, PADDING_SCORE))
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)


def as_numpy_record(record: Mapping, schema: RecordSchema) -> dict:
    """The padded arrays of one record, as `make_dataset` would yield them (for stats and tests)."""
    n = schema.list_size
    return {
        ITEM_IDS: np.asarray(pad(record[ITEM_IDS], n, PADDING_ID), np.int64),
        RETRIEVER_SCORES: np.asarray(pad(record[RETRIEVER_SCORES], n, PADDING_SCORE), np.float32),
        LABELS: np.asarray(pad(record[LABELS], n, PADDING_LABEL), np.int64),
    }
