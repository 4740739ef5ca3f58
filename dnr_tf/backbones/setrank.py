"""SetRank (Pang et al., SIGIR 2020), table 1 of the DNR paper.

Reproduced: the permutation-invariant ranker: stacked induced multi-head self-attention blocks
(IMSAB: `num_inducing` learned points attend to the candidate set, then every candidate attends to
them) with no position information, and a per-item scoring layer. The result does not depend on
the order of the candidates (tested). Not reproduced: SetRank's ordinal embeddings of initial
rankings (the order-aware variant) and its attention rank loss; the score feed is how the
retriever's view enters here, and the loss is the shared BCE.
"""

from __future__ import annotations

import keras
from keras import ops

from dnr_tf.backbones.base import PADDING_LOGIT, CandidateEncoder
from dnr_tf.backbones.fused import attend


class MAB(keras.layers.Layer):
    """Multi-head attention block: LayerNorm(x + Attention(x, y)), then LayerNorm(h + FFN(h))."""

    def __init__(self, hidden_dim: int, num_heads: int, ffn_dim: int, dropout: float, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(num_heads, hidden_dim // num_heads, dropout=dropout)
        self.ffn_in = keras.layers.Dense(ffn_dim, activation="relu")
        self.ffn_out = keras.layers.Dense(hidden_dim)
        self.norm1 = keras.layers.LayerNormalization()
        self.norm2 = keras.layers.LayerNormalization()

    def call(self, x, y, attention_mask=None, training=False):
        h = self.norm1(x + attend(self.attention, x, y, attention_mask, training))
        return self.norm2(h + self.ffn_out(self.ffn_in(h)))


class IMSAB(keras.layers.Layer):
    """Induced set attention: inducing points summarise the set, the set attends to the summary."""

    def __init__(self, hidden_dim: int, num_heads: int, ffn_dim: int, dropout: float, num_inducing: int, **kwargs):
        super().__init__(**kwargs)
        self.num_inducing = num_inducing
        self.hidden_dim = hidden_dim
        self.summarise = MAB(hidden_dim, num_heads, ffn_dim, dropout)
        self.broadcast = MAB(hidden_dim, num_heads, ffn_dim, dropout)

    def build(self, input_shape=None):
        self.inducing = self.add_weight(
            shape=(self.num_inducing, self.hidden_dim), initializer="glorot_uniform", name="inducing"
        )

    def call(self, x, mask, training=False):
        batch = ops.shape(x)[0]
        points = ops.broadcast_to(ops.expand_dims(self.inducing, 0), (batch, self.num_inducing, self.hidden_dim))
        summary = self.summarise(points, x, attention_mask=ops.expand_dims(mask, 1), training=training)
        return self.broadcast(x, summary, training=training)


class SetRank(keras.layers.Layer):
    """Permutation-invariant set encoder. Features in, logits `[batch, list_size]` out."""

    def __init__(self, cfg, item_vocab, list_size: int, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.encoder = CandidateEncoder(cfg, item_vocab, seed=seed)
        self.blocks = [
            IMSAB(cfg.hidden_dim, cfg.num_heads, cfg.ffn_dim, cfg.dropout, cfg.num_inducing, name=f"imsab_{i}")
            for i in range(cfg.num_layers)
        ]
        self.output_hidden = keras.layers.Dense(cfg.hidden_dim, activation="relu")
        self.output_logit = keras.layers.Dense(1)

    def build(self, input_shape=None):
        pass

    def call(self, features, training=False):
        h, mask = self.encoder(features)
        for block in self.blocks:
            h = block(h, mask, training=training)
        logits = ops.squeeze(self.output_logit(self.output_hidden(h)), -1)
        return ops.where(mask, logits, PADDING_LOGIT)
