"""The serving graph's fused forms of the backbones' layers (`dnr_tf.export` traces within them).

Within `fused_inference()` the backbones' attention (`attend`) and `CandidateEncoder` compute what
their layers compute in plainer products (XLA on CPU lowers Keras' einsums badly), and, given the
export's tables (`item_projection_tables`), gather the items' shares of the products that depend on
the item alone instead of multiplying them (`LinearStates`). Within `ids_as_rows()` the item ids
arrive already looked up (the XLA export's lookup runs before its compiled part). Training and a
run's evaluation never enter either context: their graphs are the layers' own.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, NamedTuple

from keras import ops

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
    row, not a product (about 9% of PRM's FLOPs at the default sizes, docs/performance.md). The
    same products summed in another order: the projections agree to float rounding.

    And `{(id(attention), j): table}` for an attention that reads a linear encoder's output as it is
    (a layer's `linear_attention`: PRM's first block): the encoder's table times the j-th of its
    query, key and value heads' kernels (`_projections`), `[vocabulary rows, key_dim]` (see `attend`).
    """
    import tensorflow as tf

    from dnr_tf.backbones.base import CandidateEncoder

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
        if attention is None or id(encoder) not in tables or not encoder.is_linear or not _fusable_layer(attention):
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


def _fusable_layer(layer) -> bool:
    """True for a `MultiHeadAttention` whose fused form (`attend`) computes what its own call does: built,
    float32, the default attention axes, no gate or sliding window, plain projections.

    It reads the layer's internals as Keras 3.15 (pinned in setup.py) has them; tests/test_fused_attention.py
    compares the two paths, so a Keras that changes them fails there, not in a served model.
    """
    if not layer.built or layer.compute_dtype != "float32":  # its projections come with the first call
        return False
    projections = (layer._query_dense, layer._key_dense, layer._value_dense)
    return (
        layer._dot_product_equation == _SCORES_EQUATION
        and layer._combine_equation == _COMBINE_EQUATION
        and all(d.equation == _PROJECTION_EQUATION for d in projections)
        and layer._output_dense.equation == _OUTPUT_EQUATION
        and not layer._use_gate
        and getattr(layer, "_sliding_window", None) is None
        and all(_plain_dense(d) for d in (*projections, layer._output_dense))
    )


def _fusable(layer, query, value) -> bool:
    """True where `attend`'s fused path computes what `layer(query, value, ...)` does at inference."""
    from keras.src import backend

    return (
        _fusable_layer(layer)
        and len(query.shape) == 3
        and len(value.shape) == 3
        and backend.get_keras_mask(query) is None
        and backend.get_keras_mask(value) is None
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

    from_tables = {}  # (id(dense), head) -> that projection of the `linear` states, from the export's tables
    if linear is not None and query is value:
        projections = _projections(layer)
        tables = [(_ITEM_TABLES.get() or {}).get((id(layer), j)) for j in range(len(projections))]
        if all(t is not None for t in tables):
            # One product of the per-list, per-score and constant parts with every kernel side by side.
            kernels = [dense.kernel[:, head, :] for dense, head in projections]
            products = linear.times(ops.concatenate(kernels, axis=-1))
            start = 0
            for (dense, head), kernel, table in zip(projections, kernels, tables):
                stop = start + kernel.shape[-1]
                from_tables[id(dense), head] = products.columns(start, stop, table).value()
                start = stop

    def project(dense, x, head):
        y = from_tables.get((id(dense), head))
        if y is None:
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
