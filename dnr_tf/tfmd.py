"""The record contract in TFX's own format: a `tensorflow_metadata` `Schema` text proto.

The pipeline writes `schema.pbtxt` beside `schema.json`, so that TFX and TensorFlow Data Validation
users can load and validate the TFRecords with their own tools, e.g.
`tfdv.validate_statistics(stats, tfdv.load_schema_text("data/ml100k/schema.pbtxt"))`.

It is derived from `RecordSchema.to_json()["features"]`, the feature table of `dnr_tf/schema.py`,
so a feature added there appears here without a second edit. Per feature: its type (`BYTES`, `INT`,
`FLOAT`), its fixed shape, presence in every record, a domain where the table gives a `range`,
NaN disallowed for floats, and the padding value as an annotation. `labels` are required in the
`TRAINING` environment only: a served request carries none. Needs only `tensorflow-metadata`
(installed with tensorflow-datasets), not TFX or TFDV.
"""

from __future__ import annotations

import os

from dnr_tf import schema as S

TFMD_FILE = "schema.pbtxt"
ENVIRONMENTS = ("TRAINING", "SERVING")
# Features that a served request does not carry.
TRAINING_ONLY = (S.LABELS, S.ORACLE_SCORES)
_TYPES = {"bytes": "BYTES", "int64": "INT", "float32": "FLOAT"}


def to_tfmd(schema: S.RecordSchema):
    """The `tensorflow_metadata.proto.v0.schema_pb2.Schema` of the records that `schema` describes."""
    from tensorflow_metadata.proto.v0 import schema_pb2

    out = schema_pb2.Schema()
    out.default_environment.extend(ENVIRONMENTS)
    for name, spec in schema.to_json()["features"].items():
        feature = out.feature.add(name=name, type=schema_pb2.FeatureType.Value(_TYPES[spec["dtype"]]))
        feature.presence.min_fraction = 1.0
        feature.presence.min_count = 1
        feature.shape.SetInParent()  # a scalar is a shape without dims
        for size in spec["shape"]:
            feature.shape.dim.add(size=size)
        if "range" in spec:
            domain = feature.float_domain if spec["dtype"] == "float32" else feature.int_domain
            domain.min, domain.max = spec["range"]
        if spec["dtype"] == "float32":
            feature.float_domain.disallow_nan = True
        if "padding" in spec:
            feature.annotation.comment.append(f"padding value {spec['padding']}")
        if name in TRAINING_ONLY:
            feature.not_in_environment.append("SERVING")
    return out


def write_tfmd(schema: S.RecordSchema, data_dir: str) -> str:
    """Writes `<data_dir>/schema.pbtxt`; returns its path."""
    from google.protobuf import text_format

    path = os.path.join(data_dir, TFMD_FILE)
    with open(path, "w") as f:
        f.write(text_format.MessageToString(to_tfmd(schema)))
    return path


def load_tfmd(data_dir: str):
    """Reads `<data_dir>/schema.pbtxt` back into a `Schema` proto."""
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    with open(os.path.join(data_dir, TFMD_FILE)) as f:
        return text_format.Parse(f.read(), schema_pb2.Schema())
