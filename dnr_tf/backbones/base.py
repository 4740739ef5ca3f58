"""The backbone interface and the pieces backbones share.

A backbone is a `keras.layers.Layer` called on a dict of batched features:
    item_ids          int64   [batch, list_size]   raw ids, 0 = padding
    retriever_scores  float32 [batch, list_size]   x (or the generated x')
    history           int64   [batch, history_len] raw ids, 0 = padding
and returns per-item logits `[batch, list_size]`, with padding at `PADDING_LOGIT`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, NamedTuple

import keras
from keras import ops

from dnr_tf import schema as S

PADDING_LOGIT = -1e9

_ROWS_GIVEN = contextvars.ContextVar("dnr_rows_given", default=False)


@contextlib.contextmanager
def ids_as_rows():
    """Calls traced within take item ids already mapped by `ItemEmbedding.lookup` (its table's rows).

    For a serving function compiled by XLA: the lookup's hash table cannot be compiled, so it runs
    before the compiled part, which starts from the rows. Every `ItemEmbedding` of a model shares one
    vocabulary (the pipeline's), so one lookup serves them all.
    """
    token = _ROWS_GIVEN.set(True)
    try:
        yield
    finally:
        _ROWS_GIVEN.reset(token)


_FUSED = contextvars.ContextVar("dnr_fused_inference", default=False)
_ITEM_TABLES = contextvars.ContextVar("dnr_item_tables", default=None)


@contextlib.contextmanager
def fused_inference(item_tables: dict | None = None):
    """Calls traced within take the fused forms of `attend` and `CandidateEncoder` (see there).

    For the exported serving functions (`dnr_tf.export.serving_fns`, with or without XLA): the same
    weights and operations in plainer products. Training and the evaluation of a run never enter
    it, so their graphs are the layers' own. `item_tables` (from `item_projection_tables`): each
    encoder's items already projected, gathered instead of multiplied.
    """
    tokens = _FUSED.set(True), _ITEM_TABLES.set(item_tables or {})
    try:
        yield
    finally:
        _ITEM_TABLES.reset(tokens[1])
        _FUSED.reset(tokens[0])


def item_projection_tables(model) -> dict:
    """`{id(encoder): table}` for each built `CandidateEncoder` of `model` whose fused form applies.

    A table holds every vocabulary row's item embedding times the encoder's input projection's item
    rows (`[vocabulary rows, hidden_dim]` float32, a non-trainable `tf.Variable`), computed once when
    the serving functions are made: served, a candidate's share of the projection is then a gathered
    row, not a product (about 9% of the model's FLOPs at batch 256, docs/performance.md). The
    same products summed in another order: the projections agree to float rounding.

    And `{(id(attention), j): table}` for an attention that reads a linear encoder's output as it is
    (a layer's `linear_attention`: PRM's first block): the encoder's table times the j-th of its
    query, key and value heads' kernels (`_projections`), `[vocabulary rows, key_dim]` (see `attend`).
    """
    import tensorflow as tf

    tables = {}
    layers = list(model._flatten_layers(include_self=True))
    for layer in layers:
        embedding = layer.items.embedding if isinstance(layer, CandidateEncoder) else None
        if embedding is None or not (layer.projection.built and embedding.built):
            continue
        if _plain_dense(layer.projection) and _plain_dense(embedding):
            rows = ops.matmul(embedding.embeddings, layer.projection.kernel[: embedding.embeddings.shape[-1]])
            tables[id(layer)] = tf.Variable(rows, trainable=False, name=f"{layer.name}_item_projection")
    for layer in layers:  # an attention that reads an encoder's output as its sum (PRM's first block)
        encoder, attention = getattr(layer, "encoder", None), getattr(layer, "linear_attention", None)
        if attention is None or id(encoder) not in tables or not encoder.is_linear or not _plain_attention(attention):
            continue
        for j, (dense, head) in enumerate(_projections(attention)):
            rows = ops.matmul(tables[id(encoder)], dense.kernel[:, head, :])
            tables[id(attention), j] = tf.Variable(rows, trainable=False, name=f"{attention.name}_item_projection_{j}")
    return tables


def _projections(layer) -> list:
    """(dense, head) of a `MultiHeadAttention`'s query, key and value projections, in that order."""
    return [
        (dense, head)
        for dense in (layer._query_dense, layer._key_dense, layer._value_dense)
        for head in range(layer._num_heads)
    ]


def _plain_attention(layer) -> bool:
    """A built float32 attention whose projections are plain (the tables are its own products)."""
    return (
        layer.built
        and layer.compute_dtype == "float32"
        and all(_plain_dense(dense) for dense in (layer._query_dense, layer._key_dense, layer._value_dense))
    )


class LinearStates(NamedTuple):
    """Candidates' hidden states `[batch, n, d]` as the sum a linear encoder makes them from, within
    `fused_inference(tables)`: `scale * table[rows] + per_list + x * per_score + constant`.

    `table` `[vocabulary rows, d]`: every item's share (`item_projection_tables`); `rows` `[batch, n]`;
    `scale`: x `[batch, n, 1]` for the `weight` feed, else None; `per_list` `[batch, 1, d]`: the user
    state's share; `x` `[batch, n, 1]`; `per_score` `[d]` or None; `constant` `[d]`, or `[n, d]` with
    positions. A product of the states with a kernel is then the same sum of smaller products, and the
    items' share of it a gathered row of a table made once (`attend`).
    """

    table: Any
    rows: Any
    scale: Any
    per_list: Any
    x: Any
    per_score: Any
    constant: Any

    def value(self):
        h = ops.take(self.table, self.rows, axis=0)
        if self.scale is not None:
            h = h * self.scale
        h = h + self.per_list
        if self.per_score is not None:
            h = h + self.x * self.per_score
        return h + self.constant

    def times(self, kernel):
        """The states times `kernel` `[d, k]`, but for the items' share: each column block of it takes
        its own table (`columns`)."""
        return self._replace(
            table=None,
            per_list=ops.matmul(self.per_list, kernel),
            per_score=None if self.per_score is None else ops.matmul(ops.expand_dims(self.per_score, 0), kernel)[0],
            constant=ops.matmul(self.constant if len(self.constant.shape) > 1 else self.constant[None], kernel),
        )

    def columns(self, start: int, stop: int, table):
        """Columns `start:stop` of `times(kernel)`, whose items' share is `table` (`self.table` times those columns)."""
        return self._replace(
            table=table,
            per_list=self.per_list[..., start:stop],
            per_score=None if self.per_score is None else self.per_score[start:stop],
            constant=self.constant[..., start:stop],
        )


# Keras' equations for one attention axis (the default): scores, combination, projections, output.
_SCORES_EQUATION, _COMBINE_EQUATION = "aecd,abcd->acbe", "acbe,aecd->abcd"
_PROJECTION_EQUATION, _OUTPUT_EQUATION = "abc,cde->abde", "abcd,cde->abe"


def _plain_dense(layer) -> bool:
    """A dense (or embedding) layer whose call is its kernel product and bias (or its table's rows) in
    float32: no LoRA, no quantization."""
    return layer.compute_dtype == "float32" and not layer.lora_enabled and layer.quantization_mode is None


def _fusable(layer, query, value) -> bool:
    """True where `attend`'s fused path computes what `layer(query, value, ...)` does at inference.

    It reads the layer's internals as Keras 3.15 (pinned in setup.py) has them; tests/test_fused_attention.py
    compares the two paths, so a Keras that changes them fails there, not in a served model.
    """
    from keras.src import backend

    if not layer.built or layer.compute_dtype != "float32":  # its projections come with the first call
        return False
    projections = (layer._query_dense, layer._key_dense, layer._value_dense)
    return (
        len(query.shape) == 3
        and len(value.shape) == 3
        and layer._dot_product_equation == _SCORES_EQUATION
        and layer._combine_equation == _COMBINE_EQUATION
        and all(d.equation == _PROJECTION_EQUATION for d in projections)
        and layer._output_dense.equation == _OUTPUT_EQUATION
        and not layer._use_gate
        and getattr(layer, "_sliding_window", None) is None
        and backend.get_keras_mask(query) is None
        and backend.get_keras_mask(value) is None
        and all(_plain_dense(d) for d in (*projections, layer._output_dense))
    )


def attend(layer, query, value, attention_mask=None, training=False, linear=None):
    """`layer(query, value, attention_mask=attention_mask, training=training)` for a `MultiHeadAttention`.

    Within `fused_inference()`, at inference, the same attention one head at a time, in plain
    products: each head's query, key and value are `[batch, T, key_dim]` products of the inputs
    with that head's slice of the kernels, its scores a batched matmul by the keys' transpose, and
    the heads' outputs side by side are the output projection's input as it is. The layer's own
    einsums make XLA (on CPU) transpose every projection to `[batch, heads, T, key_dim]` and
    lower the scores to a strided dot that ran at a sixth of the speed of its twin, the product
    with the values (2.7 ms of a 13 ms call at batch 256); TensorFlow's own kernels gain less
    (docs/performance.md has both). Same weights and operations, summed in
    another order: the outputs agree to about 1e-7. Anywhere else (training, or a layer with a
    gate, a sliding window, Keras masks, other attention axes or a compute dtype other than
    float32) this is the layer's own call.

    `linear`: the `LinearStates` that `query` and `value` both are (self-attention on a linear
    encoder's output). With the export's tables for this layer, each projection is then that sum's
    projection: the items' share a gathered row, the rest products of `[batch, 1, d]`, `[n, d]` and
    `[d]` parts (about a quarter of PRM's FLOPs at the default sizes, docs/performance.md).
    """
    if not _FUSED.get() or training or not _fusable(layer, query, value):
        return layer(query, value, attention_mask=attention_mask, training=training)
    import tensorflow as tf

    mask = layer._compute_attention_mask(query, value, attention_mask=attention_mask)

    projections = _projections(layer)
    tables = _ITEM_TABLES.get() or {}
    gathered = [tables.get((id(layer), j)) for j in range(len(projections))] if linear is not None else []
    if gathered and all(t is not None for t in gathered) and query is value:
        # One product of the per-list, per-score and constant parts with every kernel side by side.
        kernels = [dense.kernel[:, head, :] for dense, head in projections]
        products = linear.times(ops.concatenate(kernels, axis=-1))
        ends = [sum(k.shape[-1] for k in kernels[: j + 1]) for j in range(len(kernels))]
    else:
        products = None

    def project(dense, x, head):
        if products is not None and x is query:
            j = projections.index((dense, head))
            y = products.columns(ends[j] - dense.kernel.shape[-1], ends[j], gathered[j]).value()
        else:
            y = ops.matmul(x, dense.kernel[:, head, :])
        return y if dense.bias is None else y + dense.bias[head]

    heads = []
    for head in range(layer._num_heads):
        q = project(layer._query_dense, query, head) * ops.cast(layer._inverse_sqrt_key_dim, query.dtype)
        scores = tf.matmul(q, project(layer._key_dense, value, head), transpose_b=True)  # [batch, T, S]
        weights = layer._masked_softmax(scores[:, None], mask)[:, 0]  # the layer's softmax wants a heads axis
        heads.append(ops.matmul(weights, project(layer._value_dense, value, head)))
    combined = ops.concatenate(heads, axis=-1)  # [batch, T, heads * value_dim]: head-major, as the kernel is
    return layer._output_dense(ops.reshape(combined, (*ops.shape(combined)[:2], layer._num_heads, -1)))


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


def masked_bce(z, logits, mask):
    """Mean binary cross-entropy over unpadded candidates; z, logits, mask `[batch, list_size]`."""
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

    def linear_states(self, features):
        """The output as `LinearStates` (within `fused_inference(tables)`, for a linear encoder with a
        table), or None."""
        table = (_ITEM_TABLES.get() or {}).get(id(self)) if _FUSED.get() else None
        if table is None or not self.is_linear:
            return None
        history = features[S.HISTORY]
        user_state = self.user(self.items(history), ops.not_equal(history, S.PADDING_ID))
        kernel, e, u = self.projection.kernel, self.items.dim, user_state.shape[-1]
        x = ops.expand_dims(ops.cast(features[S.RETRIEVER_SCORES], user_state.dtype), -1)
        per_score = kernel[e + u] if self.feed.mode == "concat" else None
        constant = self.projection.bias if self.projection.bias is not None else ops.zeros(kernel.shape[-1:])
        if self.feed.mode == "add":  # after the projection: x times the feed's kernel, plus its bias
            per_score = self.feed.projection.kernel[0]
            if self.feed.projection.bias is not None:
                constant = constant + self.feed.projection.bias
        return LinearStates(
            table,
            self.items.rows(features[S.ITEM_IDS]),
            x if self.feed.mode == "weight" else None,
            ops.expand_dims(ops.matmul(user_state, kernel[e : e + u]), 1),
            x,
            per_score,
            constant,
        )

    def call(self, features):
        states = self.linear_states(features)
        if states is not None:
            return states.value(), candidate_mask(features)
        scores = features[S.RETRIEVER_SCORES]
        history = features[S.HISTORY]
        user_state = self.user(self.items(history), ops.not_equal(history, S.PADDING_ID))
        table = (_ITEM_TABLES.get() or {}).get(id(self)) if _FUSED.get() else None
        if table is not None:
            projected = ops.take(table, self.items.rows(features[S.ITEM_IDS]), axis=0)
            h = self._projected(None, user_state, scores, projected)
        elif _FUSED.get() and _plain_dense(self.projection):
            h = self._projected(self.items(features[S.ITEM_IDS]), user_state, scores)
        else:
            h = self.projection(self.feed.item_input(self.items(features[S.ITEM_IDS]), user_state, scores))
        return self.feed.after_projection(h, scores), candidate_mask(features)

    def _projected(self, item_emb, user_state, scores, projected=None):
        """`projection(feed.item_input(...))` without the concatenation (within `fused_inference()`).

        The user state is the same for every candidate of a list, so its share of the product is
        computed once a list rather than once a candidate: half the projection's FLOPs at the
        default sizes, the same weights summed in another order. `projected`: the items' share
        already computed (rows of `item_projection_tables`), in place of `item_emb`'s product.
        """
        kernel, e, u = self.projection.kernel, self.items.dim, user_state.shape[-1]
        x = ops.expand_dims(ops.cast(scores, user_state.dtype), -1)
        if projected is None:
            projected = ops.matmul(item_emb * x if self.feed.mode == "weight" else item_emb, kernel[:e])
        elif self.feed.mode == "weight":  # (item_emb * x) @ kernel = x * (item_emb @ kernel): one x a candidate
            projected = projected * x
        h = projected + ops.expand_dims(ops.matmul(user_state, kernel[e : e + u]), 1)
        if self.feed.mode == "concat":
            h = h + x * kernel[e + u]
        if self.projection.bias is not None:
            h = h + self.projection.bias
        return self.projection.activation(h)
