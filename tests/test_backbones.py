"""Backbones: shapes, padding masks, score feeds and out-of-vocabulary ids."""

import dataclasses

import numpy as np
import pytest

from dnr_tf import schema as S
from dnr_tf.backbones import build_backbone
from dnr_tf.backbones.base import PADDING_LOGIT
from dnr_tf.config import ModelConfig

VOCAB = list(range(1, 41))


def _features(rng, batch=4, n=10, h=5):
    ids = rng.integers(1, 41, (batch, n))
    ids[0, 7:] = 0  # a padded list
    ids[1, 3] = 999  # out of vocabulary
    scores = np.where(ids > 0, rng.random((batch, n)), 0.0).astype("float32")
    history = rng.integers(0, 41, (batch, h))
    history[2] = 0  # no history at all
    return {S.ITEM_IDS: ids, S.RETRIEVER_SCORES: scores, S.HISTORY: history}


@pytest.mark.parametrize("backbone", ["prm", "dnn"])
@pytest.mark.parametrize("feed", ["none", "concat", "add", "weight"])
def test_shapes_masks_and_score_feed(backbone, feed):
    rng = np.random.default_rng(0)
    cfg = ModelConfig(backbone=backbone, score_feed=feed, embedding_dim=8, hidden_dim=8, ffn_dim=16, dropout=0.0)
    model = build_backbone(cfg, VOCAB, list_size=10)
    features = _features(rng)
    logits = np.asarray(model(features))
    assert logits.shape == (4, 10)
    padded = features[S.ITEM_IDS] == 0
    assert np.all(logits[padded] == PADDING_LOGIT)
    assert np.all(np.isfinite(logits[~padded])) and np.all(np.abs(logits[~padded]) < 1e6)
    other = {**features, S.RETRIEVER_SCORES: np.where(padded, 0.0, rng.random((4, 10))).astype("float32")}
    changed = np.abs(np.asarray(model(other)) - logits)[~padded].max() > 1e-6
    assert changed == (feed != "none"), "the score reaches the logits exactly when a feed is on"


def test_prm_without_positions_is_permutation_equivariant():
    rng = np.random.default_rng(1)
    cfg = ModelConfig(embedding_dim=8, hidden_dim=8, ffn_dim=16, dropout=0.0, use_position=False)
    model = build_backbone(cfg, VOCAB, list_size=10)
    features = _features(rng)
    features[S.ITEM_IDS][0, 7:] = 5  # no padding, so any permutation is valid
    perm = rng.permutation(10)
    permuted = {
        **features,
        S.ITEM_IDS: features[S.ITEM_IDS][:, perm],
        S.RETRIEVER_SCORES: features[S.RETRIEVER_SCORES][:, perm],
    }
    np.testing.assert_allclose(np.asarray(model(permuted)), np.asarray(model(features))[:, perm], atol=1e-5)
    with_pos = build_backbone(dataclasses.replace(cfg, use_position=True), VOCAB, list_size=10)
    assert np.abs(np.asarray(with_pos(permuted)) - np.asarray(with_pos(features))[:, perm]).max() > 1e-4
