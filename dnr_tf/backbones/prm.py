"""PRM: Personalized Re-ranking Model (Pei et al., RecSys 2019), the paper's main backbone.

Reproduced: item embedding + learned position embedding of the initial (retriever) order + a
personalisation vector of the request, a transformer encoder over the candidate list, a per-item
output layer. Not reproduced: PRM's pre-trained personalisation vector from a separate CTR model;
here it is pooled from the user's history embeddings and learned end to end.
"""

from __future__ import annotations

import keras
from keras import ops

from dnr_tf.backbones.base import PADDING_LOGIT, CandidateEncoder, candidate_mask
from dnr_tf.backbones.fused import attend


class TransformerBlock(keras.layers.Layer):
    """Post-norm self-attention + feed-forward; padded candidates are never attended to."""

    def __init__(self, hidden_dim: int, num_heads: int, ffn_dim: int, dropout: float, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(num_heads, hidden_dim // num_heads, dropout=dropout)
        self.ffn_in = keras.layers.Dense(ffn_dim, activation="relu")
        self.ffn_out = keras.layers.Dense(hidden_dim)
        self.norm1 = keras.layers.LayerNormalization()
        self.norm2 = keras.layers.LayerNormalization()
        self.dropout = keras.layers.Dropout(dropout)

    def call(self, h, mask, training=False, linear=None):
        """`linear`: `h` as `LinearStates` (served, after a linear encoder; see `attend`)."""
        attention_mask = ops.expand_dims(mask, 1)  # [batch, 1 (queries), list (keys)]
        attended = attend(self.attention, h, h, attention_mask, training, linear=linear)
        h = self.norm1(h + self.dropout(attended, training=training))
        return self.norm2(h + self.dropout(self.ffn_out(self.ffn_in(h)), training=training))


class PRM(keras.layers.Layer):
    """Transformer reranker over the candidate list. Features in, logits `[batch, list_size]` out."""

    def __init__(self, cfg, item_vocab, list_size: int, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.cfg = cfg
        self.list_size = list_size
        self.encoder = CandidateEncoder(cfg, item_vocab, seed=seed)
        self.position = (
            keras.layers.Embedding(
                list_size,
                cfg.hidden_dim,
                embeddings_initializer=keras.initializers.RandomNormal(stddev=0.05, seed=seed + 1),
            )
            if cfg.use_position
            else None
        )
        self.blocks = [
            TransformerBlock(cfg.hidden_dim, cfg.num_heads, cfg.ffn_dim, cfg.dropout, name=f"block_{i}")
            for i in range(cfg.num_layers)
        ]
        self.output_hidden = keras.layers.Dense(cfg.hidden_dim, activation="relu")
        self.output_logit = keras.layers.Dense(1)

    def build(self, input_shape=None):
        # Sub-layers build on the first call, from the dict of features.
        pass

    @property
    def linear_attention(self):
        """The attention that reads the encoder's output (plus positions) as it is: the first block's."""
        return self.blocks[0].attention if self.blocks else None

    def call(self, features, training=False):
        linear = None if training else self.encoder.linear_states(features)
        if linear is not None:  # served with the export's tables (`fused_inference`)
            h, mask = linear.value(), candidate_mask(features)
        else:
            h, mask = self.encoder(features)
        if self.position is not None:
            # Positions past the trained list size share the last row (shorter lists are padded).
            n = ops.shape(h)[1]
            positions = ops.minimum(ops.arange(n), self.list_size - 1)
            position = self.position(positions)
            h = h + ops.expand_dims(position, 0)
            if linear is not None:
                linear = linear._replace(constant=linear.constant + position)
        for i, block in enumerate(self.blocks):
            h = block(h, mask, training=training, linear=linear if i == 0 else None)
        logits = ops.squeeze(self.output_logit(self.output_hidden(h)), -1)
        return ops.where(mask, logits, PADDING_LOGIT)
