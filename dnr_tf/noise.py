"""Noise generators p_phi(x | z): synthetic retriever scores x' = (1 - lambda_c) z + lambda_c eps (eq. 4).

- `HeuristicSampler`: eps ~ Beta(alpha, beta) (DNR-B; the paper's alpha = beta = 0.5) or
  eps ~ N(0, 1) (DNR-G). Gaussian x' is clipped to [0, 1], the range of real scores, because a
  reranker never sees a score outside it at serving time (and export rejects one).
- `GeneratorSampler`: the model-based sampler, a 2-layer MLP conditioned on the request (pooled
  history and candidate embeddings of its own), the label z, and fresh Gaussian input (so it is a
  sampler, not a function). With `dnr.generator_eps: sigmoid` (the default) it outputs eps in
  (0, 1) and x' follows eq. 4; with `logit` its output is an unbounded real mixed in logit space
  (`logit_mix`), so that x' does not separate the labels by construction. Training-only: never
  exported.
"""

from __future__ import annotations

import contextlib
import threading

import keras
import tensorflow as tf
from keras import ops

from dnr_tf import schema as S
from dnr_tf.backbones.base import ItemEmbedding, masked_mean


def mix(z, eps, lambda_c: float):
    """x' = (1 - lambda_c) z + lambda_c eps (eq. 4)."""
    return (1.0 - lambda_c) * z + lambda_c * eps


def logit_target(z, lambda_c: float):
    """m_z = (1 - lambda_c) z + lambda_c / 2: eq. 4's x' at eps = 1/2 (the mean of Beta(1/2, 1/2))."""
    return (1.0 - lambda_c) * z + 0.5 * lambda_c


def logit_mix(z, a, lambda_c: float):
    """x' = sigmoid(logit(m_z) + lambda_c a), for a generator output a `[batch, list_size]` in R.

    Eq. 4 in logit space: x' = sigmoid((1 - lambda_c) t(z) + lambda_c a) with the target
    t(z) = logit(m_z) / (1 - lambda_c), m_z = `logit_target(z)`; at a = 0 it is eq. 4 with
    eps = 1/2. Why the labels' ranges overlap: a is unbounded, so for either label x' takes every
    value in (0, 1) (a = (logit(x') - logit(m_z)) / lambda_c gives it); a negative gets an x'
    above a positive's as soon as lambda_c (a_0 - a_1) > logit(m_1) - logit(m_0)
    = 2 logit(1 - lambda_c / 2), a finite margin (2.20 at lambda_c = 0.5). Under `sigmoid`, x'
    of a positive is above (1 - lambda_c) and of a negative below lambda_c, whatever the generator
    learns: for lambda_c <= 0.5 the labels never overlap.
    """
    m = logit_target(z, lambda_c)
    return ops.sigmoid(ops.log(m) - ops.log(1.0 - m) + lambda_c * a)


# This replica's rows of the global batch, set by `global_batch_rows` for one step's trace. Thread-local:
# MirroredStrategy traces each replica's step in a thread of its own.
_rows = threading.local()


def _replica_rows(ctx, batch):
    """(offset, global batch) of this replica's `batch` rows: one all-gather of the replicas' sizes."""
    sizes = ctx.all_gather(tf.reshape(tf.cast(batch, "int32"), [1]), axis=0)
    replica = tf.cast(ctx.replica_id_in_sync_group, "int32")
    return tf.reduce_sum(sizes[:replica]), tf.reduce_sum(sizes)


@contextlib.contextmanager
def global_batch_rows(batch):
    """Within it, `draw_for_batch` places this replica's `batch` rows with one all-gather made here.

    A train or test step enters it first, so that the all-gather (a cross-replica call) sits outside
    the `tf.cond` that chooses the sampler: a replica's `cond` cannot hold one. It draws nothing, so
    the random streams are those of a draw that gathers its own sizes. Every draw inside must be for
    `batch` rows (a step's draws are for its lists). Does nothing with one replica, or inside
    another `global_batch_rows` (the step's rows hold for its `sample_x`).
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1 or getattr(_rows, "value", None) is not None:
        yield
        return
    _rows.value = _replica_rows(ctx, batch)
    try:
        yield
    finally:
        _rows.value = None


def draw_for_batch(draw, batch):
    """This replica's rows of `draw(rows)`, a random draw for the whole global batch.

    Under a distribution strategy every replica draws the noise of the global batch from the same
    seed and keeps the rows of its own lists, so that the draws do not depend on how many replicas
    (or workers) share the batch: training under `--strategy` sees the noise one process sees. The
    batch is split across replicas in replica order (tf.distribute's split of a global batch);
    `all_gather` of the per-replica sizes handles an uneven last batch (made once a step by
    `global_batch_rows` when the step entered it). With one replica it is `draw(batch)`.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return draw(batch)
    rows = getattr(_rows, "value", None)
    offset, total = rows if rows is not None else _replica_rows(ctx, batch)
    return draw(total)[offset : offset + batch]


def fit_beta(mean: float, var: float) -> tuple[float, float]:
    """Beta(a, b) with the given mean and variance (method of moments)."""
    if not 0.0 < mean < 1.0 or not 0.0 < var < mean * (1.0 - mean):
        raise ValueError(f"no Beta has mean {mean} and variance {var}")
    common = mean * (1.0 - mean) / var - 1.0
    return mean * common, (1.0 - mean) * common


class HeuristicSampler:
    """A non-parametric sampler of x'.

    Args:
        kind: `beta`, `gaussian` or `calibrated`.
        lambda_c: noise level in (0, 1) (beta and gaussian).
        alpha, beta: the Beta parameters (beta).
        calibration: ((a0, b0), (a1, b1)), the Beta of x given z = 0 and z = 1 (calibrated).
    """

    def __init__(self, kind: str, lambda_c: float, alpha: float = 0.5, beta: float = 0.5, calibration=None):
        if kind not in ("beta", "gaussian", "calibrated"):
            raise ValueError(f"unknown heuristic sampler {kind!r}")
        if kind == "calibrated" and calibration is None:
            raise ValueError("the calibrated sampler needs the Beta parameters of x given each label")
        self.kind, self.lambda_c, self.alpha, self.beta = kind, lambda_c, alpha, beta
        self.calibration = calibration

    def __call__(self, z, seed):
        """`[batch, list_size]` x' for labels z `[batch, list_size]` (float 0/1), from `seed`."""
        batch, n = ops.shape(z)[0], ops.shape(z)[1]
        if self.kind == "calibrated":
            (a0, b0), (a1, b1) = self.calibration
            x0 = draw_for_batch(lambda rows: keras.random.beta((rows, n), a0, b0, seed=seed), batch)
            x1 = draw_for_batch(lambda rows: keras.random.beta((rows, n), a1, b1, seed=seed), batch)
            return z * x1 + (1.0 - z) * x0
        if self.kind == "beta":
            eps = draw_for_batch(lambda rows: keras.random.beta((rows, n), self.alpha, self.beta, seed=seed), batch)
            return mix(z, eps, self.lambda_c)
        eps = draw_for_batch(lambda rows: keras.random.normal((rows, n), seed=seed), batch)
        return ops.clip(mix(z, eps, self.lambda_c), 0.0, 1.0)


class GeneratorSampler(keras.layers.Layer):
    """The model-based sampler eps_phi(u, i, z, noise), personalised by the request.

    Args:
        item_vocab: raw item ids (its own embedding table: the generator's updates never touch the
            reranker's variables).
        embedding_dim: its item embedding size.
        hidden_dim: width of the hidden layer of the 2-layer MLP.
        noise_dim: size of the fresh N(0, 1) input of every candidate.
        lambda_c: noise level in (0, 1).
        eps_space: `sigmoid` (eps = sigmoid(a) in (0, 1), x' by eq. 4) or `logit` (x' =
            `logit_mix(z, a, lambda_c)`), a the MLP's unbounded output.
    """

    def __init__(
        self,
        item_vocab,
        embedding_dim: int,
        hidden_dim: int,
        noise_dim: int,
        lambda_c: float,
        seed: int = 0,
        eps_space: str = "sigmoid",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.items = ItemEmbedding(item_vocab, embedding_dim, seed=seed + 17)
        self.hidden = keras.layers.Dense(hidden_dim, activation="relu")
        self.out = keras.layers.Dense(1)
        self.noise_dim = noise_dim
        self.lambda_c = lambda_c
        if eps_space not in ("sigmoid", "logit"):
            raise ValueError(f"unknown dnr.generator_eps {eps_space!r}")
        self.eps_space = eps_space

    def raw(self, features, z, seed):
        """`[batch, list_size]` a, the MLP's unbounded output."""
        item_emb = self.items(features[S.ITEM_IDS])
        history = features[S.HISTORY]
        request = masked_mean(self.items(history), ops.not_equal(history, S.PADDING_ID))
        n = ops.shape(item_emb)[1]
        request = ops.repeat(ops.expand_dims(request, 1), n, axis=1)
        noise = draw_for_batch(lambda rows: keras.random.normal((rows, n, self.noise_dim), seed=seed), ops.shape(z)[0])
        inputs = ops.concatenate([item_emb, request, ops.expand_dims(z, -1), noise], axis=-1)
        return ops.squeeze(self.out(self.hidden(inputs)), -1)

    def epsilon(self, features, z, seed):
        """`[batch, list_size]` eps = sigmoid(a) in (0, 1) (the `sigmoid` eps)."""
        return ops.sigmoid(self.raw(features, z, seed))

    def build(self, input_shape=None):
        # Sub-layers build on the first call, from the dict of features.
        pass

    def call(self, features, z, seed):
        """`[batch, list_size]` x': (1 - lambda_c) z + lambda_c eps (`sigmoid`) or `logit_mix` (`logit`)."""
        if self.eps_space == "logit":
            return logit_mix(z, self.raw(features, z, seed), self.lambda_c)
        return mix(z, self.epsilon(features, z, seed), self.lambda_c)
