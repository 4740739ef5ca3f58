"""A pointwise DNN scorer in the spirit of MiDNN (Zhuang et al., 2018): the cheapest baseline.

Each candidate is scored from its own embedding, the request's user state and the score feed,
with no list context and no position. Not reproduced: MiDNN's list-level "global features"
(relative feature statistics across the list).
"""

from __future__ import annotations

import keras
from keras import ops

from dnr_tf.backbones.base import PADDING_LOGIT, CandidateEncoder


class PointwiseDNN(keras.layers.Layer):
    """Per-item MLP. Features in, logits `[batch, list_size]` out."""

    def __init__(self, cfg, item_vocab, list_size: int, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.encoder = CandidateEncoder(cfg, item_vocab, seed=seed, activation="relu")
        self.hidden = [keras.layers.Dense(width, activation="relu") for width in cfg.dnn_layers]
        self.dropout = keras.layers.Dropout(cfg.dropout)
        self.output_logit = keras.layers.Dense(1)

    def build(self, input_shape=None):
        # Sub-layers build on the first call, from the dict of features.
        pass

    def call(self, features, training=False):
        h, mask = self.encoder(features)
        for layer in self.hidden:
            h = self.dropout(layer(h), training=training)
        logits = ops.squeeze(self.output_logit(h), -1)
        return ops.where(mask, logits, PADDING_LOGIT)
