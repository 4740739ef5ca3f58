"""MIR: Multi-level Interaction Reranking with user behaviour history (Xi et al., WSDM 2022), table 1.

Reproduced, in its simplest form: the candidate *set* is encoded by self-attention without position
(intra-set), the user's history *list* by self-attention with position (intra-list), and the two
interact by set-to-list cross attention (every candidate attends to the history items), the
candidate's own state and its history read-out are combined with their product, and an MLP scores
each candidate. Not reproduced: MIR's SLAttention with its personalised, time-aware affinity
weights, and the feature-level interactions of its input layer.
"""

from __future__ import annotations

import keras
from keras import ops

from dnr_tf import schema as S
from dnr_tf.backbones.base import PADDING_LOGIT, CandidateEncoder
from dnr_tf.backbones.fused import attend
from dnr_tf.backbones.heads import history_mask
from dnr_tf.backbones.prm import TransformerBlock


class MIR(keras.layers.Layer):
    """Set-to-list interaction between candidates and history. Features in, logits out."""

    def __init__(self, cfg, item_vocab, list_size: int, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.encoder = CandidateEncoder(cfg, item_vocab, seed=seed)
        self.history_projection = keras.layers.Dense(cfg.hidden_dim)
        self.max_history = 512
        self.history_position = keras.layers.Embedding(
            self.max_history,
            cfg.hidden_dim,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=0.05, seed=seed + 2),
        )
        self.intra_set = TransformerBlock(cfg.hidden_dim, cfg.num_heads, cfg.ffn_dim, cfg.dropout, name="intra_set")
        self.intra_list = TransformerBlock(cfg.hidden_dim, cfg.num_heads, cfg.ffn_dim, cfg.dropout, name="intra_list")
        self.cross = keras.layers.MultiHeadAttention(cfg.num_heads, cfg.hidden_dim // cfg.num_heads, name="set_to_list")
        self.hidden = keras.layers.Dense(cfg.hidden_dim, activation="relu")
        self.dropout = keras.layers.Dropout(cfg.dropout)
        self.output_logit = keras.layers.Dense(1)

    def build(self, input_shape=None):
        pass

    def call(self, features, training=False):
        h, mask = self.encoder(features)
        hmask = history_mask(features)
        hist = self.history_projection(self.encoder.items(features[S.HISTORY]))
        length = ops.shape(hist)[1]
        # Positions counted from the most recent item (the history is left-padded, oldest first).
        positions = ops.minimum(ops.flip(ops.arange(length), 0), self.max_history - 1)
        hist = hist + ops.expand_dims(self.history_position(positions), 0)
        cand = self.intra_set(h, mask, training=training)
        hist = self.intra_list(hist, hmask, training=training)
        read = attend(self.cross, cand, hist, ops.expand_dims(hmask, 1), training)
        # A request without history reads nothing (attention over no key would be uniform over padding).
        has_history = ops.cast(ops.any(hmask, axis=1), read.dtype)[:, None, None]
        read = read * has_history
        x = ops.concatenate([cand, read, cand * read], axis=-1)
        logits = ops.squeeze(self.output_logit(self.dropout(self.hidden(x), training=training)), -1)
        return ops.where(mask, logits, PADDING_LOGIT)
