"""History encoders of table 1, each scoring every candidate pointwise against the user's sequence:

- SASRec (Kang & McAuley, ICDM 2018): causal self-attention over the history with learned
  positions; the state at the most recent item is the request vector.
- GRU4Rec (Hidasi et al., ICLR 2016): a GRU over the history; its final state is the request vector.
- Caser (Tang & Wang, WSDM 2018): horizontal convolutions (heights `caser_heights`, max-pooled over
  time) and a vertical convolution over the embedding matrix of the last `caser_window` items (the
  paper's L), concatenated and projected to the request vector.

Reproduced: each encoder of the user's sequence. Not reproduced: their training objectives
(next-item prediction with sampled negatives, GRU4Rec's session-parallel mini-batches and ranking
losses, Caser's skip targets) and Caser's user embedding; here every candidate is scored by
`PointwiseHead` from the request vector and its own `CandidateEncoder` state (which carries the
score feed), and trained with the shared BCE.
"""

from __future__ import annotations

import keras
from keras import ops

from dnr_tf import schema as S
from dnr_tf.backbones.base import PADDING_LOGIT, CandidateEncoder
from dnr_tf.backbones.fused import attend
from dnr_tf.backbones.heads import PointwiseHead, history_mask

MAX_HISTORY = 512


class _HistoryScorer(keras.layers.Layer):
    """Candidates from `CandidateEncoder`, the request vector from `encode_history`, a pointwise head."""

    def __init__(self, cfg, item_vocab, list_size: int, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.cfg = cfg
        self.encoder = CandidateEncoder(cfg, item_vocab, seed=seed)
        self.history_projection = keras.layers.Dense(cfg.hidden_dim)
        self.head = PointwiseHead(cfg.hidden_dim, cfg.dropout)

    def build(self, input_shape=None):
        pass

    def encode_history(self, hist, hmask, training):
        raise NotImplementedError

    def call(self, features, training=False):
        h, mask = self.encoder(features)
        hmask = history_mask(features)
        hist = self.history_projection(self.encoder.items(features[S.HISTORY]))
        u = self.encode_history(hist, hmask, training)
        u = u * ops.cast(ops.any(hmask, axis=1), u.dtype)[:, None]  # no history: no request vector
        return ops.where(mask, self.head(u, h, training=training), PADDING_LOGIT)


class SASRec(_HistoryScorer):
    def __init__(self, cfg, item_vocab, list_size: int, seed: int = 0, **kwargs):
        super().__init__(cfg, item_vocab, list_size, seed=seed, **kwargs)
        self.position = keras.layers.Embedding(
            MAX_HISTORY, cfg.hidden_dim, embeddings_initializer=keras.initializers.RandomNormal(stddev=0.05, seed=seed)
        )
        self.attention = [
            keras.layers.MultiHeadAttention(cfg.num_heads, cfg.hidden_dim // cfg.num_heads, dropout=cfg.dropout)
            for _ in range(cfg.num_layers)
        ]
        self.ffn = [
            (keras.layers.Dense(cfg.ffn_dim, activation="relu"), keras.layers.Dense(cfg.hidden_dim))
            for _ in range(cfg.num_layers)
        ]
        self.norms = [
            (keras.layers.LayerNormalization(), keras.layers.LayerNormalization()) for _ in range(cfg.num_layers)
        ]

    def encode_history(self, hist, hmask, training):
        length = ops.shape(hist)[1]
        positions = ops.minimum(ops.flip(ops.arange(length), 0), MAX_HISTORY - 1)  # 0 = most recent
        x = hist + ops.expand_dims(self.position(positions), 0)
        causal = ops.tril(ops.ones((length, length), dtype="bool"))
        attention_mask = ops.logical_and(ops.expand_dims(causal, 0), ops.expand_dims(hmask, 1))
        # A query with no real key (a left-padded slot) attends to itself, so no softmax is empty.
        attention_mask = ops.logical_or(attention_mask, ops.expand_dims(ops.eye(length, dtype="bool"), 0))
        for attention, (ffn_in, ffn_out), (norm1, norm2) in zip(self.attention, self.ffn, self.norms):
            x = norm1(x + attend(attention, x, x, attention_mask, training))
            x = norm2(x + ffn_out(ffn_in(x)))
        return x[:, -1, :]  # the most recent item (left padding puts it last)


class GRU4Rec(_HistoryScorer):
    def __init__(self, cfg, item_vocab, list_size: int, seed: int = 0, **kwargs):
        super().__init__(cfg, item_vocab, list_size, seed=seed, **kwargs)
        self.gru = keras.layers.GRU(cfg.hidden_dim, seed=seed)

    def encode_history(self, hist, hmask, training):
        # Masked (left-padded) steps carry the state: the output is the state after the last item.
        return self.gru(hist, mask=hmask, training=training)


class Caser(_HistoryScorer):
    def __init__(self, cfg, item_vocab, list_size: int, seed: int = 0, **kwargs):
        super().__init__(cfg, item_vocab, list_size, seed=seed, **kwargs)
        self.horizontal = [
            keras.layers.Conv1D(cfg.caser_filters, height, activation="relu", padding="valid")
            for height in cfg.caser_heights
        ]
        self.vertical = keras.layers.Dense(cfg.caser_vertical, use_bias=False)  # over time, per dimension
        self.projection = keras.layers.Dense(cfg.hidden_dim, activation="relu")
        self.dropout = keras.layers.Dropout(cfg.dropout)

    def encode_history(self, hist, hmask, training):
        hist = hist * ops.cast(ops.expand_dims(hmask, -1), hist.dtype)  # padding rows are zeros
        window = self.cfg.caser_window  # the last L items, left-padded when the history is shorter
        hist = ops.pad(hist, [[0, 0], [window, 0], [0, 0]])[:, -window:, :]
        pooled = [ops.max(conv(hist), axis=1) for conv in self.horizontal]
        vertical = self.vertical(ops.transpose(hist, (0, 2, 1)))  # [batch, dim, caser_vertical]
        pooled.append(ops.reshape(vertical, (ops.shape(hist)[0], -1)))
        return self.projection(self.dropout(ops.concatenate(pooled, axis=-1), training=training))
