"""The fused forms of the XLA export (`fused_inference`): `attend` computes what `MultiHeadAttention`
computes, and the candidate encoder what its concatenation and projection compute."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from dnr_tf.backbones.fused import attend, fused_inference, item_projection_tables


def _inputs(seed=0, batch=3, t=7, s=5, dim=8):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(batch, t, dim)).astype("float32")
    value = rng.normal(size=(batch, s, dim)).astype("float32")
    mask = rng.random((batch, 1, s)) < 0.7
    mask[:, :, 0] = True
    mask[1] = False  # a row that attends to nothing: Keras' masked softmax decides, in both paths
    return query, value, mask


def _counting(layer):
    """Counts the calls of the layer's query projection (the fused path never calls it)."""
    calls = []
    original = layer._query_dense.call
    layer._query_dense.call = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    return calls


@pytest.mark.parametrize("use_bias", [True, False])
def test_fused_self_and_cross_attention_match_the_layer(use_bias):
    layer = keras.layers.MultiHeadAttention(2, 4, use_bias=use_bias, dropout=0.3, seed=1)
    query, value, mask = _inputs()
    self_mask = np.broadcast_to(mask[:, :, :1], (3, 1, 7)) | (np.arange(7) % 2 == 0)
    expected_self = np.asarray(layer(query, query, attention_mask=self_mask, training=False))
    expected_cross = np.asarray(layer(query, value, attention_mask=mask, training=False))
    calls = _counting(layer)
    with fused_inference():
        fused_self = np.asarray(attend(layer, query, query, self_mask, training=False))
        fused_cross = np.asarray(attend(layer, query, value, mask, training=False))
    assert not calls  # both took the fused path
    np.testing.assert_allclose(fused_self, expected_self, atol=1e-5)
    np.testing.assert_allclose(fused_cross, expected_cross, atol=1e-5)


def test_an_unbuilt_layer_builds_through_its_own_call():
    layer = keras.layers.MultiHeadAttention(2, 4)
    query, value, mask = _inputs(3)
    with fused_inference():
        first = np.asarray(attend(layer, query, value, mask))
    assert layer.built
    np.testing.assert_array_equal(first, np.asarray(layer(query, value, attention_mask=mask)))


def test_outside_the_context_and_in_training_it_is_the_layer_itself():
    layer = keras.layers.MultiHeadAttention(2, 4, dropout=0.5, seed=3)
    query, value, mask = _inputs(1)
    layer(query, value, attention_mask=mask)  # builds
    calls = _counting(layer)
    plain = np.asarray(attend(layer, query, value, mask, training=False))
    np.testing.assert_array_equal(plain, np.asarray(layer(query, value, attention_mask=mask, training=False)))
    with fused_inference():
        attend(layer, query, query, mask[:, :, :1] | True, training=True)  # dropout: the layer's own call
    assert len(calls) == 3  # the plain call, the layer's, and the training call all projected the query


@pytest.mark.parametrize("score_feed", ["none", "concat", "add", "weight"])
def test_fused_input_projection_matches_the_encoder(score_feed):
    from dnr_tf import schema as S
    from dnr_tf.backbones.base import CandidateEncoder
    from dnr_tf.config import ModelConfig

    cfg = ModelConfig(backbone="prm", embedding_dim=6, hidden_dim=8, score_feed=score_feed)
    encoder = CandidateEncoder(cfg, list(range(1, 21)), activation="relu")
    rng = np.random.default_rng(2)
    ids = rng.integers(1, 25, (4, 9))
    ids[0, 5:] = 0
    history = rng.integers(0, 21, (4, 5))
    history[1] = 0
    features = {S.ITEM_IDS: ids, S.RETRIEVER_SCORES: rng.random((4, 9)).astype("float32"), S.HISTORY: history}
    expected, mask = encoder(features)
    concatenations = []
    item_input = encoder.feed.item_input
    encoder.feed.item_input = lambda *a: concatenations.append(1) or item_input(*a)
    with fused_inference():
        fused, fused_mask = encoder(features)
    assert not concatenations
    np.testing.assert_array_equal(np.asarray(fused_mask), np.asarray(mask))
    np.testing.assert_allclose(np.asarray(fused), np.asarray(expected), atol=1e-5)

    # With the export's table, the candidates' share is gathered: the embedding serves the history alone.
    tables = item_projection_tables(encoder)
    assert [tuple(t.shape) for t in tables.values()] == [(22, 8)]  # 20 items, padding and unknown ids
    lookups = []
    embed = encoder.items.embedding.call
    encoder.items.embedding.call = lambda rows: lookups.append(1) or embed(rows)
    with fused_inference(tables):
        gathered, gathered_mask = encoder(features)
    assert len(lookups) == 1 and not concatenations
    np.testing.assert_array_equal(np.asarray(gathered_mask), np.asarray(mask))
    np.testing.assert_allclose(np.asarray(gathered), np.asarray(expected), atol=1e-5)


def test_a_mixed_precision_layer_and_encoder_keep_their_own_call():
    """Under a bfloat16 compute policy the fused path (float32 products) would compute something else:
    the layer's and the encoder's own calls run instead, to the bit."""
    from dnr_tf import schema as S
    from dnr_tf.backbones.base import CandidateEncoder
    from dnr_tf.config import ModelConfig

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        layer = keras.layers.MultiHeadAttention(2, 4)
        encoder = CandidateEncoder(ModelConfig(backbone="prm", embedding_dim=6, hidden_dim=8), list(range(1, 21)))
    finally:
        keras.config.set_dtype_policy(previous)
    query, value, mask = _inputs(4)
    expected = np.asarray(layer(query, value, attention_mask=mask))
    rng = np.random.default_rng(5)
    features = {
        S.ITEM_IDS: rng.integers(1, 21, (2, 5)),
        S.RETRIEVER_SCORES: rng.random((2, 5)).astype("float32"),
        S.HISTORY: rng.integers(1, 21, (2, 3)),
    }
    encoded = np.asarray(encoder(features)[0])
    assert item_projection_tables(encoder) == {}  # its embedding and projection compute in bfloat16
    with fused_inference():
        np.testing.assert_array_equal(np.asarray(attend(layer, query, value, mask)), expected)
        np.testing.assert_array_equal(np.asarray(encoder(features)[0]), encoded)


def _features(seed=4, batch=4, n=9):
    from dnr_tf import schema as S

    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 25, (batch, n))
    ids[0, 6:] = 0
    history = rng.integers(0, 21, (batch, 5))
    return {S.ITEM_IDS: ids, S.RETRIEVER_SCORES: rng.random((batch, n)).astype("float32"), S.HISTORY: history}


def _check_served_from_tables(model, features):
    """With the export's tables, `model.linear_attention` projects the encoder's output as a sum
    (`LinearStates`): the logits are the model's own, and zeroing those tables changes them (the path is taken)."""
    from dnr_tf import schema as S

    expected = np.asarray(model(features))
    tables = item_projection_tables(model)
    attention = model.linear_attention
    own = [key for key in tables if isinstance(key, tuple)]
    assert sorted(own) == [(id(attention), j) for j in range(6)]  # query, key and value of two heads
    assert all(tuple(tables[key].shape) == (22, 4) for key in own)
    with fused_inference(tables):
        served = np.asarray(model(features))
    np.testing.assert_allclose(served, expected, atol=1e-5)
    for key in own:
        tables[key].assign(np.zeros((22, 4), "float32"))
    with fused_inference(tables):
        assert np.abs(np.asarray(model(features)) - expected)[features[S.ITEM_IDS] != 0].max() > 1e-3


@pytest.mark.parametrize(
    ("score_feed", "use_position"), [("none", True), ("concat", True), ("add", False), ("weight", True)]
)
def test_prm_served_from_the_tables_matches_its_own_call(score_feed, use_position):
    """PRM's first attention reads the encoder's output (plus positions) as a sum; a second block reads
    plain states."""
    from dnr_tf.backbones.prm import PRM
    from dnr_tf.config import ModelConfig

    cfg = ModelConfig(
        backbone="prm",
        embedding_dim=6,
        hidden_dim=8,
        num_heads=2,
        ffn_dim=12,
        num_layers=2,
        score_feed=score_feed,
        use_position=use_position,
    )
    _check_served_from_tables(PRM(cfg, list(range(1, 21)), list_size=9, seed=3), _features())
