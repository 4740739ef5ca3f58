"""Retriever drift at test time: the test lists with perturbed retriever scores.

Perturbations (applied to unpadded candidates only; the list order stays as stored):
- `gauss_<sigma>`: x + N(0, sigma^2), clipped to [0, 1];
- `square`, `sqrt`: a calibration shift, x^2 or sqrt(x);
- `shuffle`: the scores permuted within each list (the score carries no information left);
- `retrained`: the scores of a second, retrained retriever on the same candidates
  (`retriever_scores_retrained`, written by the pipeline's `retrained.enabled`): the drift a
  production reranker meets when its retriever is retrained.
"""

from __future__ import annotations

import numpy as np

from dnr_tf import schema as S

PERTURBATIONS = ("gauss_0.05", "gauss_0.1", "gauss_0.2", "square", "sqrt", "shuffle")
RETRAINED = "retrained"  # not in PERTURBATIONS: it needs data written with `retrained.enabled`
SCORE_FEATURES = (S.RETRIEVER_SCORES, S.RETRIEVER_SCORES_RETRAINED)


def scores_for(features, mask: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """The `[batch, list_size]` x of a batch of `features` (numpy or tensors) under `kind`.

    Raises:
        ValueError: for `retrained` when the data lacks `retriever_scores_retrained`.
    """
    if kind == RETRAINED:
        _check_retrained(features)
        x = np.asarray(features[S.RETRIEVER_SCORES_RETRAINED], np.float32)
        return np.where(mask, x, np.asarray(features[S.RETRIEVER_SCORES], np.float32)).astype(np.float32)
    return perturb(np.asarray(features[S.RETRIEVER_SCORES]), mask, kind, rng)


def _check_retrained(features) -> None:
    if S.RETRIEVER_SCORES_RETRAINED not in features:
        raise ValueError(
            f"perturbation 'retrained' needs the feature {S.RETRIEVER_SCORES_RETRAINED!r}, which this data lacks "
            "(schema.json has_retrained false): rebuild it with `python -m pipeline.run ... "
            "--set retrained.enabled=true`"
        )


def perturb(scores: np.ndarray, mask: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Perturbed copy of `scores` `[batch, list_size]`; padding (mask False) keeps its value."""
    x = scores.astype(np.float32).copy()
    if kind == "clean":
        return x
    if kind.startswith("gauss_"):
        sigma = float(kind.split("_", 1)[1])
        y = np.clip(x + rng.normal(0.0, sigma, x.shape), 0.0, 1.0)
    elif kind == "square":
        y = x * x
    elif kind == "sqrt":
        y = np.sqrt(x)
    elif kind == "shuffle":
        y = x.copy()
        for b in range(len(x)):
            idx = np.flatnonzero(mask[b])
            y[b, idx] = x[b, rng.permutation(idx)]
    else:
        raise ValueError(f"unknown perturbation {kind!r}; known: clean, {', '.join(PERTURBATIONS)}, {RETRAINED}")
    return np.where(mask, y, x).astype(np.float32)


def evaluate_perturbed(model, dataset, kinds, k: int = 6, seed: int = 0) -> dict:
    """NDCG@k and every metric of `model` on `dataset` (features, labels) under each perturbation.

    Returns:
        kind -> metric name -> mean over lists; plus `per_list_ndcg` of the clean run (for paired
        bootstrap tests over lists).
    """
    from dnr_tf.metrics import RankingMetrics, per_list_metrics

    out, per_list = {}, []
    if RETRAINED in kinds:
        for features, _ in dataset.take(1):
            _check_retrained(features)  # refuses before any work
    for kind in ("clean", *kinds):
        rng = np.random.default_rng(seed)
        ranking = RankingMetrics(k)
        for features, labels in dataset:
            mask = labels.numpy() >= 0
            views = {name: features[name].numpy() for name in SCORE_FEATURES if name in features}
            x = scores_for(views, mask, kind, rng)
            # The model sees x under `kind` in the one feature it reads, never the retrained feature itself.
            model_features = {k: v for k, v in features.items() if k != S.RETRIEVER_SCORES_RETRAINED}
            logits = model({**model_features, S.RETRIEVER_SCORES: x}, training=False)
            ranking.update_state(labels, logits, mask)
            if kind == "clean":
                values, valid = per_list_metrics(labels, logits, mask, k)["ndcg"]
                per_list.extend(np.where(np.asarray(valid) > 0, np.asarray(values), np.nan).tolist())
        out[kind] = {m.name: float(m.result()) for m in ranking.metrics}
    out["per_list_ndcg"] = per_list
    return out
