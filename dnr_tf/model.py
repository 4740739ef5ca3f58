"""The DNR model: a reranker q_theta(z | x, u) and a noise generator p_phi(x | z), trained alternately.

Per batch (paper algorithm 1):
1. sample x' from the active sampler: heuristic during the first `lambda_e` epochs, model-based
   after (the switch is `set_sampler_phase`, called by `SamplerSchedule` at every epoch start);
2. reranker step, generator fixed:  L_theta = L_direct(x) + lambda_m L_z(x')          (eq. 6)
       L_direct = BCE(z, q_theta(x)),  L_z = BCE(z, q_theta(x')), over unpadded candidates;
3. generator step(s), reranker fixed (model-based phase only):
       L_phi = L_adv + weight_x L_x'
       L_adv = -BCE(z, q_theta(x'))  (eq. 7: minimise log q_theta(z | x'), i.e. make x' that the
               reranker fails to reconstruct)
       L_x'  = mean over unpadded candidates of (log x - log x')^2.
   Eq. 8 as printed, L_x' = -E[log(x / x')], is unbounded below in x' (it drives x' to 0), so it
   cannot keep x' near x as the text intends; the squared log-ratio is the bounded instance-level
   alignment with the same log-ratio, and it is 0 exactly when x' = x.
With `dnr.enabled` off the model is a plain reranker trained on L_direct (PRM and its c/+/w score
feeds train through the same code).
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from dnr_tf import schema as S
from dnr_tf.backbones import build_backbone
from dnr_tf.config import ExperimentConfig
from dnr_tf.metrics import RankingMetrics
from dnr_tf.noise import GeneratorSampler, HeuristicSampler

LOSS_TERMS = ("loss", "l_direct", "l_z", "l_adv", "l_x")
_LOG_EPS = 1e-6


def masked_bce(z, logits, mask):
    """Mean binary cross-entropy over unpadded candidates; z, logits, mask `[batch, list_size]`."""
    maskf = ops.cast(mask, "float32")
    safe_logits = ops.where(mask, logits, 0.0)
    bce = ops.binary_crossentropy(z, safe_logits, from_logits=True)
    return ops.sum(bce * maskf) / ops.maximum(ops.sum(maskf), 1.0)


def x_regulariser(x, x_fake, mask):
    """L_x' = mean over unpadded candidates of (log x - log x')^2."""
    maskf = ops.cast(mask, "float32")
    diff = ops.log(ops.clip(x, _LOG_EPS, 1.0)) - ops.log(ops.clip(x_fake, _LOG_EPS, 1.0))
    return ops.sum(diff * diff * maskf) / ops.maximum(ops.sum(maskf), 1.0)


class DNRModel(keras.Model):
    """Reranker + noise generator with the alternating updates of DNR in `train_step`.

    Call it on a features dict (see `dnr_tf.backbones.base`) for logits `[batch, list_size]`.
    `calibration` ((a0, b0), (a1, b1)) is needed by the `calibrated` heuristic sampler only.
    `fit` takes `(features, labels)` pairs with labels `[batch, list_size]` (-1 on padding).
    """

    def __init__(self, cfg: ExperimentConfig, item_vocab, list_size: int, calibration=None, **kwargs):
        super().__init__(**kwargs)
        self.cfg = cfg
        dnr = cfg.dnr
        seed = cfg.train.seed
        self.reranker = build_backbone(cfg.model, item_vocab, list_size, seed=seed)
        self.heuristic = HeuristicSampler(dnr.heuristic, dnr.lambda_c, dnr.beta_alpha, dnr.beta_beta, calibration)
        self.generator = None
        self.generator_optimizer = None
        if dnr.enabled and dnr.model_based:
            self.generator = GeneratorSampler(
                item_vocab,
                dnr.generator_embedding_dim,
                dnr.generator_hidden,
                dnr.generator_noise_dim,
                dnr.lambda_c,
                seed=seed,
                name="generator",
            )
            self.generator_optimizer = keras.optimizers.Adam(dnr.generator_learning_rate, name="generator_adam")
        self.noise_seed = keras.random.SeedGenerator(seed + 1000, name="noise_seed")
        self.sampler_phase = self.add_weight(
            shape=(), dtype="int32", initializer="zeros", trainable=False, name="sampler_phase"
        )
        self._model_phase = False
        self.trackers = {name: keras.metrics.Mean(name=name) for name in LOSS_TERMS}
        self.ranking = RankingMetrics(cfg.train.k)

    # --- building --------------------------------------------------------------------------------

    def build_all(self, features) -> None:
        """Builds every sub-model and both optimizers on a batch, before any update or restore.

        A Keras 3 optimizer binds to the variables it first sees, and a checkpoint restores
        optimizer slots only into built optimizers.
        """
        self(features)
        if self.generator is not None:
            z = ops.zeros_like(features[S.RETRIEVER_SCORES])
            self.generator(features, z, seed=self.noise_seed)
            self.generator_optimizer.build(self.generator.trainable_variables)
        self.optimizer.build(self.reranker.trainable_variables)

    def build(self, input_shape=None):
        # Sub-models build on their first call (build_all); nothing to create here.
        pass

    def call(self, features, training=False):
        return self.reranker(features, training=training)

    @property
    def metrics(self):
        return [*self.trackers.values(), *self.ranking.metrics]

    # --- the sampler phase -----------------------------------------------------------------------

    @property
    def model_phase(self) -> bool:
        """True once the model-based sampler is active (after lambda_e epochs)."""
        return self._model_phase

    def set_sampler_phase(self, model_based: bool) -> None:
        """Switches the sampler; the train step is retraced so that each phase runs only its work."""
        model_based = bool(model_based) and self.generator is not None
        self.sampler_phase.assign(int(model_based))
        if model_based != self._model_phase:
            self._model_phase = model_based
            self.train_function = None
            self.test_function = None
            self.make_train_function(force=True)
            self.make_test_function(force=True)

    def sample_x(self, features, z, training=False):
        """`[batch, list_size]` synthetic scores x' from the active sampler."""
        if self._model_phase:
            return self.generator(features, z, seed=self.noise_seed, training=training)
        return self.heuristic(z, self.noise_seed)

    # --- steps -----------------------------------------------------------------------------------

    def _reranker_losses(self, features, labels, training):
        """L_direct, L_z and the reranker's logits on the real x."""
        mask = ops.greater_equal(labels, 0)
        z = ops.cast(ops.equal(labels, 1), "float32")
        logits = self.reranker(features, training=training)
        l_direct = masked_bce(z, logits, mask)
        l_z = ops.zeros(())
        if self.cfg.dnr.enabled:
            x_fake = ops.stop_gradient(self.sample_x(features, z))
            fake_logits = self.reranker({**features, S.RETRIEVER_SCORES: x_fake}, training=training)
            l_z = masked_bce(z, fake_logits, mask)
        return l_direct, l_z, logits, mask, z

    def _generator_losses(self, features, z, mask):
        x_fake = self.generator(features, z, seed=self.noise_seed, training=True)
        logits = self.reranker({**features, S.RETRIEVER_SCORES: x_fake}, training=False)
        l_adv = -masked_bce(z, logits, mask)
        l_x = x_regulariser(features[S.RETRIEVER_SCORES], x_fake, mask)
        dnr = self.cfg.dnr
        loss = (l_adv if dnr.use_adv else 0.0) + (dnr.weight_x * l_x if dnr.use_x_reg else 0.0)
        return loss, l_adv, l_x

    def train_step(self, data):
        features, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        dnr = self.cfg.dnr
        with tf.GradientTape() as tape:
            l_direct, l_z, logits, mask, z = self._reranker_losses(features, labels, training=True)
            loss = l_direct + dnr.lambda_m * l_z if dnr.enabled else l_direct
        variables = self.reranker.trainable_variables
        self.optimizer.apply(tape.gradient(loss, variables), variables)

        l_adv = l_x = ops.zeros(())
        if self._model_phase and dnr.trains_generator:
            gen_vars = self.generator.trainable_variables
            for _ in range(dnr.generator_steps):
                with tf.GradientTape() as gtape:
                    gen_loss, l_adv, l_x = self._generator_losses(features, z, mask)
                self.generator_optimizer.apply(gtape.gradient(gen_loss, gen_vars), gen_vars)
        return self._update_metrics(loss, l_direct, l_z, l_adv, l_x, labels, logits, mask)

    def test_step(self, data):
        features, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        dnr = self.cfg.dnr
        l_direct, l_z, logits, mask, z = self._reranker_losses(features, labels, training=False)
        loss = l_direct + dnr.lambda_m * l_z if dnr.enabled else l_direct
        l_adv = l_x = ops.zeros(())
        if self._model_phase and dnr.trains_generator:
            _, l_adv, l_x = self._generator_losses(features, z, mask)
        return self._update_metrics(loss, l_direct, l_z, l_adv, l_x, labels, logits, mask)

    def _update_metrics(self, loss, l_direct, l_z, l_adv, l_x, labels, logits, mask):
        for name, value in zip(LOSS_TERMS, (loss, l_direct, l_z, l_adv, l_x)):
            self.trackers[name].update_state(value)
        self.ranking.update_state(labels, logits, mask)
        logs = {m.name: m.result() for m in self.metrics}
        logs["sampler_phase"] = ops.cast(self.sampler_phase, "float32")
        return logs


class SamplerSchedule(keras.callbacks.Callback):
    """Heuristic sampler for the first `lambda_e` epochs, then the model-based one (algorithm 1).

    Decided from the epoch number at every epoch start, so a run resumed from a checkpoint lands
    in the right phase.
    """

    def __init__(self, lambda_e: int):
        super().__init__()
        self.lambda_e = lambda_e

    def on_epoch_begin(self, epoch, logs=None):
        self.model.set_sampler_phase(epoch >= self.lambda_e)
