"""Pieces shared by the table-1 backbones: a sequence mask helper and a pointwise scoring head."""

from __future__ import annotations

import keras
from keras import ops

from dnr_tf import schema as S


def history_mask(features):
    """`[batch, history_len]` bool: True for real history items (the history is left-padded with 0)."""
    return ops.not_equal(features[S.HISTORY], S.PADDING_ID)


class PointwiseHead(keras.layers.Layer):
    """logit_i = w . relu(W [u; h_i; u * h_i] + b) + c: a request vector u against each candidate's h_i.

    Used by the history encoders (SASRec, GRU4Rec, Caser), whose own papers score a candidate by a
    dot product with u; the MLP over [u, h, u * h] contains that product and lets the score feed
    in h_i matter on its own.
    """

    def __init__(self, hidden_dim: int, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(hidden_dim, activation="relu")
        self.dropout = keras.layers.Dropout(dropout)
        self.out = keras.layers.Dense(1)

    def call(self, u, h, training=False):
        n = ops.shape(h)[1]
        u = ops.repeat(ops.expand_dims(u, 1), n, axis=1)
        x = ops.concatenate([u, h, u * h], axis=-1)
        return ops.squeeze(self.out(self.dropout(self.hidden(x), training=training)), -1)
