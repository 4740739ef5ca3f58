"""Run directories of `python -m dnr_tf.train`: building the model of a config, loading a run back.

Imported by `dnr_tf.train` (which writes runs) and `dnr_tf.export` / `dnr_tf.evaluate` (which read
them), so that neither entry point imports the other for these.
"""

from __future__ import annotations

import json
import os

from dnr_tf import config_io
from dnr_tf import schema as S
from dnr_tf.config import ExperimentConfig


def read_vocab(directory: str) -> list[int]:
    """The item vocabulary of a pipeline output (or of a run, which keeps a copy)."""
    path = os.path.join(directory, "item_vocab.txt")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: expected an output directory of `python -m pipeline.run` "
            "(or a run directory of `python -m dnr_tf.train`)"
        )
    with open(path) as f:
        return [int(line) for line in f if line.strip()]


def vocab_signature(items: list[int]) -> dict:
    """`{"items", "sha256"}` of an item vocabulary: what an export records of its run's, and what
    `dnr_tf.evaluate` compares with the data's."""
    import hashlib

    return {"items": len(items), "sha256": hashlib.sha256("\n".join(map(str, items)).encode()).hexdigest()}


def load_run(model_dir: str):
    """(config, item vocabulary, record schema) of a run directory that `train` wrote."""
    from dnr_tf import schema as schema_lib

    path = os.path.join(model_dir, "config.yaml")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: --model_dir must be a run directory of `python -m dnr_tf.train`")
    data = config_io.load_yaml(path)
    data.pop("data_dir", None)
    return config_io.from_dict(ExperimentConfig, data), read_vocab(model_dir), schema_lib.load_schema(model_dir)


def build_model(cfg: ExperimentConfig, item_vocab, schema, example_features, calibration=None, precision=None):
    """The DNR model of `cfg`, built and compiled; `precision` overrides `cfg.train.precision`."""
    import keras

    from dnr_tf.model import DNRModel

    keras.utils.set_random_seed(cfg.train.seed)
    previous = keras.config.dtype_policy()
    # The layers take the policy in force when they are made and built; the process's is restored.
    keras.config.set_dtype_policy(precision or cfg.train.precision)
    try:
        model = DNRModel(cfg, item_vocab, schema.list_size, calibration=calibration, name="dnr")
        if cfg.train.weight_decay > 0:
            optimizer = keras.optimizers.AdamW(cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
        else:
            optimizer = keras.optimizers.Adam(cfg.train.learning_rate)
        model.compile(optimizer=optimizer)
        model.build_all(example_features)
    finally:
        keras.config.set_dtype_policy(previous)
    return model


def load_trained(model_dir: str, precision: str | None = None):
    """The DNR model of a run directory, with its best weights; (model, config, schema). `precision`:
    the arithmetic's (default: the run's `train.precision`; the weights are float32 either way)."""
    import numpy as np

    cfg, vocab, schema = load_run(model_dir)
    weights = os.path.join(model_dir, "best.weights.h5")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{weights} not found: the run has not finished an epoch")
    n = schema.list_size
    dummy = {
        S.ITEM_IDS: np.ones((1, n), np.int64) * vocab[0],
        S.RETRIEVER_SCORES: np.full((1, n), 0.5, np.float32),
        S.HISTORY: np.zeros((1, schema.history_len), np.int64),
        S.USER_ID: np.ones((1,), np.int64),
    }
    calibration = None
    if os.path.exists(os.path.join(model_dir, "calibration.json")):
        with open(os.path.join(model_dir, "calibration.json")) as f:
            c = json.load(f)
        calibration = [c["beta_given_z0"], c["beta_given_z1"]]
    model = build_model(cfg, vocab, schema, dummy, calibration, precision)
    model.load_weights(weights)
    return model, cfg, schema
