"""The backbone interface and the pieces backbones share.

A backbone is a `keras.layers.Layer` called on a dict of batched features:
    item_ids          int64   [batch, list_size]   raw ids, 0 = padding
    retriever_scores  float32 [batch, list_size]   x (or the generated x')
    history           int64   [batch, history_len] raw ids, 0 = padding
and returns per-item logits `[batch, list_size]`, with padding at `PADDING_LOGIT`.
"""

from __future__ import annotations

import keras
from keras import ops

from dnr_tf import schema as S
from dnr_tf.backbones.fused import _FUSED, _ITEM_TABLES, _ROWS_GIVEN, LinearStates, _plain_dense

PADDING_LOGIT = -1e9


def candidate_mask(features):
    """`[batch, list_size]` bool: True for real candidates."""
    return ops.not_equal(features[S.ITEM_IDS], S.PADDING_ID)


class ItemEmbedding(keras.layers.Layer):
    """Raw item id -> embedding; 0 (padding) -> row 0, ids outside the vocabulary -> row 1.

    Args:
        vocabulary: raw item ids seen in training (`item_vocab.txt`).
        dim: embedding size.
    """

    def __init__(self, vocabulary, dim: int, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary = [int(v) for v in vocabulary]
        self.dim = dim
        self.lookup = keras.layers.IntegerLookup(
            vocabulary=self.vocabulary, mask_token=S.PADDING_ID, num_oov_indices=1, vocabulary_dtype="int64"
        )
        self.embedding = keras.layers.Embedding(
            len(self.vocabulary) + 2,
            dim,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=0.05, seed=seed),
        )

    def rows(self, ids):
        """The embedding table's rows of raw ids (given as they are within `ids_as_rows()`)."""
        return ids if _ROWS_GIVEN.get() else self.lookup(ids)

    def call(self, ids):
        return self.embedding(self.rows(ids))

    def get_config(self):
        return {**super().get_config(), "vocabulary": self.vocabulary, "dim": self.dim}


def float32(x):
    """`x` in float32: a model's outputs under `train.precision: mixed_bfloat16` come in bfloat16, and
    every loss is computed in float32. A float32 `x` is returned as it is (no op)."""
    return x if keras.backend.standardize_dtype(x.dtype) == "float32" else ops.cast(x, "float32")


def masked_bce(z, logits, mask):
    """Mean binary cross-entropy over unpadded candidates; z, logits, mask `[batch, list_size]`
    (logits in any float type: the loss is float32)."""
    logits = float32(logits)
    maskf = ops.cast(mask, "float32")
    safe_logits = ops.where(mask, logits, 0.0)
    bce = ops.binary_crossentropy(z, safe_logits, from_logits=True)
    return ops.sum(bce * maskf) / ops.maximum(ops.sum(maskf), 1.0)


def masked_mean(values, mask):
    """Mean of `values` `[batch, n, d]` over positions where `mask` `[batch, n]` holds."""
    weights = ops.cast(ops.expand_dims(mask, -1), values.dtype)
    return ops.sum(values * weights, axis=1) / ops.maximum(ops.sum(weights, axis=1), 1.0)


class UserState(keras.layers.Layer):
    """The personalisation vector of a request: pooled history embeddings through a dense layer."""

    def __init__(self, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(dim, activation="relu")

    def call(self, history_embeddings, history_mask):
        return self.dense(masked_mean(history_embeddings, history_mask))


class ScoreFeed(keras.layers.Layer):
    """How the retriever score x enters the item input (the paper's table 2 and appendix C.3).

    - `none`: not at all.
    - `concat` ("c score"): x concatenated to the item input with the user state.
    - `add` ("+ score"): x projected to the model width and added after the input projection.
    - `weight` ("w score"): the item embedding scaled by x.
    """

    def __init__(self, mode: str, hidden_dim: int, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("none", "concat", "add", "weight"):
            raise ValueError(f"unknown score_feed {mode!r}")
        self.mode = mode
        self.projection = keras.layers.Dense(hidden_dim) if mode == "add" else None

    def item_input(self, item_emb, user_state, scores):
        """`[batch, list_size, e + u (+1)]`: what the input projection sees."""
        n = ops.shape(item_emb)[1]
        user = ops.repeat(ops.expand_dims(user_state, 1), n, axis=1)
        x = ops.expand_dims(ops.cast(scores, item_emb.dtype), -1)
        if self.mode == "weight":
            item_emb = item_emb * x
        parts = [item_emb, user]
        if self.mode == "concat":
            parts.append(x)
        return ops.concatenate(parts, axis=-1)

    def after_projection(self, hidden, scores):
        if self.mode != "add":
            return hidden
        return hidden + self.projection(ops.expand_dims(ops.cast(scores, hidden.dtype), -1))


class CandidateEncoder(keras.layers.Layer):
    """Features -> per-candidate hidden states `[batch, list_size, hidden_dim]` and the mask.

    Item embedding, the request's user state and the score feed, projected to the model width:
    the input every backbone starts from.
    """

    def __init__(self, cfg, item_vocab, seed: int = 0, activation=None, **kwargs):
        super().__init__(**kwargs)
        self.items = ItemEmbedding(item_vocab, cfg.embedding_dim, seed=seed)
        self.user = UserState(cfg.hidden_dim)
        self.feed = ScoreFeed(cfg.score_feed, cfg.hidden_dim)
        self.projection = keras.layers.Dense(cfg.hidden_dim, activation=activation)

    def build(self, input_shape=None):
        # Sub-layers build on the first call, from the dict of features.
        pass

    @property
    def is_linear(self) -> bool:
        """Its output is a linear function of its inputs' parts (no activation): `linear_states` applies."""
        return self.projection.activation is keras.activations.linear

    def _table(self):
        """The export's table of this encoder's items' projections (within `fused_inference(tables)`), or None."""
        return (_ITEM_TABLES.get() or {}).get(id(self)) if _FUSED.get() else None

    def linear_states(self, features):
        """The output as `LinearStates` (within `fused_inference(tables)`, for a linear encoder with a
        table), or None."""
        table = self._table()
        return self._states(features, table) if table is not None and self.is_linear else None

    def _states(self, features, table):
        """The input projection as `LinearStates` whose items' share is `table`; for a linear encoder with
        the `add` feed folded in (x times the feed's kernel, plus its bias), so that it is the whole output."""
        history = features[S.HISTORY]
        user_state = self.user(self.items(history), ops.not_equal(history, S.PADDING_ID))
        kernel, e, u = self.projection.kernel, self.items.dim, user_state.shape[-1]
        x = ops.expand_dims(ops.cast(features[S.RETRIEVER_SCORES], user_state.dtype), -1)
        per_score = kernel[e + u] if self.feed.mode == "concat" else None
        constant = self.projection.bias if self.projection.bias is not None else ops.zeros(kernel.shape[-1:])
        if self.feed.mode == "add" and self.is_linear:
            per_score = self.feed.projection.kernel[0]
            if self.feed.projection.bias is not None:
                constant = constant + self.feed.projection.bias
        return LinearStates(
            table,
            self.items.rows(features[S.ITEM_IDS]),
            x if self.feed.mode == "weight" else None,  # (e * x) @ kernel = x * (e @ kernel): one x a candidate
            ops.expand_dims(ops.matmul(user_state, kernel[e : e + u]), 1),
            x,
            per_score,
            constant,
        )

    def call(self, features):
        scores = features[S.RETRIEVER_SCORES]
        table = self._table()
        if table is not None:
            states = self._states(features, table)
            if self.is_linear:
                return states.value(), candidate_mask(features)
            h = self.projection.activation(states.value())
            return self.feed.after_projection(h, scores), candidate_mask(features)
        history = features[S.HISTORY]
        user_state = self.user(self.items(history), ops.not_equal(history, S.PADDING_ID))
        item_emb = self.items(features[S.ITEM_IDS])
        if _FUSED.get() and _plain_dense(self.projection):
            h = self._projected(item_emb, user_state, scores)
        else:
            h = self.projection(self.feed.item_input(item_emb, user_state, scores))
        return self.feed.after_projection(h, scores), candidate_mask(features)

    def _projected(self, item_emb, user_state, scores):
        """`projection(feed.item_input(...))` without the concatenation (within `fused_inference()`).

        The user state is the same for every candidate of a list, so its share of the product is
        computed once a list rather than once a candidate: half the projection's FLOPs at the
        default sizes, the same weights summed in another order.
        """
        kernel, e, u = self.projection.kernel, item_emb.shape[-1], user_state.shape[-1]
        x = ops.expand_dims(ops.cast(scores, item_emb.dtype), -1)
        if self.feed.mode == "weight":
            item_emb = item_emb * x
        h = ops.matmul(item_emb, kernel[:e]) + ops.expand_dims(ops.matmul(user_state, kernel[e : e + u]), 1)
        if self.feed.mode == "concat":
            h = h + x * kernel[e + u]
        if self.projection.bias is not None:
            h = h + self.projection.bias
        return self.projection.activation(h)
