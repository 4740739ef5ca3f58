"""DLCM: Deep Listwise Context Model (Ai et al., SIGIR 2018), table 1 of the DNR paper.

Reproduced: a GRU reads the candidates in their initial order (the retriever's, best first), its
final state is the local context s_n of the list, and each candidate is scored by DLCM's
function phi(o_i, s_n) = V . (o_i * tanh(W s_n + b)) of its GRU output o_i. Not reproduced: DLCM
feeds the list in reverse order and trains with its attention-based listwise loss; here the list
is read best first (padding at the end, masked) and the loss is the shared BCE.
"""

from __future__ import annotations

import keras
from keras import ops

from dnr_tf.backbones.base import PADDING_LOGIT, CandidateEncoder


class DLCM(keras.layers.Layer):
    """GRU over the list + local-context scoring. Features in, logits `[batch, list_size]` out."""

    def __init__(self, cfg, item_vocab, list_size: int, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.encoder = CandidateEncoder(cfg, item_vocab, seed=seed, activation="relu")
        self.gru = keras.layers.GRU(cfg.hidden_dim, return_sequences=True, return_state=True, seed=seed)
        self.context = keras.layers.Dense(cfg.hidden_dim, activation="tanh")
        self.dropout = keras.layers.Dropout(cfg.dropout)
        self.v = keras.layers.Dense(1)

    def build(self, input_shape=None):
        pass

    def call(self, features, training=False):
        h, mask = self.encoder(features)
        outputs, state = self.gru(h, mask=mask, training=training)
        context = ops.expand_dims(self.context(state), 1)  # tanh(W s_n + b)
        logits = ops.squeeze(self.v(self.dropout(outputs * context, training=training)), -1)
        return ops.where(mask, logits, PADDING_LOGIT)
