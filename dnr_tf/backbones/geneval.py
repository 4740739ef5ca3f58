"""A generator-evaluator reranker in the spirit of EG-Rerank (Huzhang et al., 2021) and PIER (Shi et
al., 2023): the simplest faithful version of that family, stated as such.

- Generator: PRM's network scores every candidate (logits g); it proposes top-K lists: the greedy
  one, and others drawn from the Plackett-Luce distribution of g (Gumbel top-K).
- Evaluator: scores a whole top-K list *in order and in context*. A GRU reads the K chosen
  candidates slot by slot (each with its own state, a slot embedding and the mean state of the
  whole candidate set) and predicts each slot's click; the list's value is the sum of the predicted
  clicks. It is trained on lists drawn from the generator, against the logged labels of their items.
- At inference the proposal the evaluator values most is shown: its K items get the top logits in
  its order, every other candidate keeps g (below them). The proposals' noise is drawn from a fixed
  seed, so serving is deterministic.

Training: in training mode the layer returns g, so L_direct (and DNR's L_z) train the generator as
any backbone; the evaluator's loss comes through `auxiliary_loss`, which `DNRModel` adds to the
reranker's loss (on the real x). Not reproduced: the reinforcement-learning or policy-gradient
training of the generator against the evaluator (EG-Rerank, NAR4Rec), PIER's hashing-based
permutation retrieval from a larger pool, and any position bias (the logged labels here do not
depend on the position, so the evaluator learns clicks of items in the context of the list above).
The scores the export returns are rank scores, not probabilities, for this backbone.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from dnr_tf.backbones.base import PADDING_LOGIT, CandidateEncoder, float32, masked_bce, masked_mean
from dnr_tf.backbones.prm import PRM

_INFERENCE_SEED = 1234


class GeneratorEvaluator(keras.layers.Layer):
    """PRM generator + list-wise evaluator. Features in, logits `[batch, list_size]` out."""

    def __init__(self, cfg, item_vocab, list_size: int, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.k = cfg.geneval_k
        self.num_proposals = cfg.geneval_proposals
        self.train_samples = cfg.geneval_train_samples
        self.generator = PRM(cfg, item_vocab, list_size, seed=seed, name="generator_prm")
        self.encoder = CandidateEncoder(cfg, item_vocab, seed=seed + 3, activation="relu")
        self.slot = keras.layers.Embedding(
            cfg.geneval_k, cfg.hidden_dim, embeddings_initializer=keras.initializers.RandomNormal(stddev=0.05)
        )
        self.gru = keras.layers.GRU(cfg.hidden_dim, return_sequences=True, seed=seed)
        self.click = keras.layers.Dense(1)
        self.sample_seed = keras.random.SeedGenerator(seed + 5, name="proposal_seed")

    def build(self, input_shape=None):
        pass

    def _proposals(self, g, mask, count, seed):
        """`[count, batch, k]` candidate indices: the greedy top-K, then Gumbel top-K draws."""
        logits = ops.where(mask, float32(ops.stop_gradient(g)), -1e30)  # the Gumbel draws are float32
        k = tf.minimum(self.k, tf.shape(logits)[1])
        out = [tf.math.top_k(logits, k=k).indices]
        for j in range(count - 1):
            # A fixed integer seed (inference) would repeat the same draw: offset it per proposal.
            # A SeedGenerator (training) advances by itself.
            draw_seed = seed + j if isinstance(seed, int) else seed
            u = keras.random.uniform(ops.shape(logits), minval=1e-6, maxval=1.0 - 1e-6, seed=draw_seed)
            out.append(tf.math.top_k(logits - ops.log(-ops.log(u)), k=k).indices)
        return tf.stack(out)

    def _evaluate(self, h, mask, order, training):
        """Click logits `[batch, k]` of the list `order` `[batch, k]`, and which slots hold a candidate."""
        slots = tf.gather(h, order, batch_dims=1)
        valid = tf.gather(mask, order, batch_dims=1)
        k = tf.shape(order)[1]
        context = ops.repeat(ops.expand_dims(masked_mean(h, mask), 1), k, axis=1)
        slot = ops.broadcast_to(ops.expand_dims(self.slot(ops.arange(k)), 0), ops.shape(slots))
        x = ops.concatenate([slots, context, slot], -1)
        return ops.squeeze(self.click(self.gru(x, mask=valid, training=training)), -1), valid

    def call(self, features, training=False):
        g = self.generator(features, training=training)
        if training:
            return g
        h, mask = self.encoder(features)
        proposals = self._proposals(g, mask, self.num_proposals, _INFERENCE_SEED)
        values = []
        for j in range(self.num_proposals):
            clicks, valid = self._evaluate(h, mask, proposals[j], training=False)
            values.append(ops.sum(ops.sigmoid(clicks) * ops.cast(valid, clicks.dtype), axis=1))
        best = ops.argmax(ops.stack(values, axis=1), axis=1)  # [batch]
        order = tf.gather(tf.transpose(proposals, (1, 0, 2)), best, batch_dims=1)  # [batch, k]
        valid = tf.gather(mask, order, batch_dims=1)
        k = tf.shape(order)[1]
        top = ops.max(ops.where(mask, g, -1e30), axis=1, keepdims=True) + 1.0
        rank_logits = top + ops.cast(k - ops.arange(k), g.dtype)[None, :]  # slot 0 highest
        rows = tf.repeat(tf.range(tf.shape(g)[0])[:, None], k, axis=1)
        index = tf.stack([rows, order], -1)
        # The shown list's items above every other candidate, in its order; padding slots unchanged.
        logits = tf.tensor_scatter_nd_update(g, index, tf.where(valid, rank_logits, tf.gather_nd(g, index)))
        return ops.where(mask, logits, PADDING_LOGIT)

    def auxiliary_loss(self, features, labels, logits, training=True):
        """The evaluator's BCE on lists drawn from the generator (the greedy one and samples).

        `logits` are this layer's training output on `features` (the generator's g): reused, not
        recomputed.
        """
        g = logits
        h, mask = self.encoder(features)
        z = ops.cast(ops.equal(labels, 1), "float32")
        proposals = self._proposals(g, mask, 1 + self.train_samples, self.sample_seed)
        losses = []
        for j in range(1 + self.train_samples):
            clicks, valid = self._evaluate(h, mask, proposals[j], training=training)
            losses.append(masked_bce(tf.gather(z, proposals[j], batch_dims=1), clicks, valid))
        return ops.mean(ops.stack(losses))
