"""The DNR model: a reranker q_theta(z | x, u) and a noise generator p_phi(x | z), trained alternately.

Per batch (paper algorithm 1):
1. sample x' from the active sampler: heuristic during the first `lambda_e` epochs, model-based
   after (the switch is `set_sampler_phase`, called by `SamplerSchedule` at every epoch start; the
   steps choose the phase in the graph, on one replica or several, so the switch needs no new
   trace: `_phase_in_graph`);
2. reranker step, generator fixed:  L_theta = L_direct(x) + lambda_m L_z(x')          (eq. 6)
       L_direct = BCE(z, q_theta(x)),  L_z = BCE(z, q_theta(x')), over unpadded candidates;
3. generator step(s), reranker fixed (model-based phase only):
       L_phi = L_adv + weight_x L_x'
       L_adv = -BCE(z, q_theta(x'))  (eq. 7: minimise log q_theta(z | x'), i.e. make x' that the
               reranker fails to reconstruct)
       L_x'  = mean over unpadded candidates of (log x - log x')^2          (`dnr.x_reg: log_ratio`)
   Eq. 8 as printed, L_x' = -E[log(x / x')], is unbounded below in x' (it drives x' to 0), so it
   cannot keep x' near x as the text intends; the squared log-ratio is the bounded instance-level
   alignment with the same log-ratio, and it is 0 exactly when x' = x. `dnr.x_reg: eq8` trains
   the printed form instead, made finite by clipping (`x_regulariser`), to measure the difference.
Generator warm-up (`dnr.generator_warmup_steps`, `warmup_step`): at the switch, the generator
alone is first fitted to the heuristic sampler's x' per label, so the reranker never meets an
untrained generator.
Cost (docs/performance.md): the real and the generated lists go through the reranker in one call,
stacked along the batch (`train.fused_step`); with `dnr.generator_update: simultaneous` the
generator's gradient comes from that same forward and backward pass (`compute_step`).
A backbone with an `auxiliary_loss` (the generator-evaluator's evaluator) adds it to the reranker's
loss, on the real x.
With `dnr.enabled` off the model is a plain reranker trained on L_direct (PRM and its c/+/w score
feeds train through the same code).
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from dnr_tf import schema as S
from dnr_tf.backbones import build_backbone
from dnr_tf.backbones.base import float32, masked_bce
from dnr_tf.config import ExperimentConfig
from dnr_tf.metrics import RankingMetrics
from dnr_tf.noise import GeneratorSampler, HeuristicSampler, global_batch_rows

LOSS_TERMS = ("loss", "l_direct", "l_z", "l_adv", "l_x")
# What `nonfinite_counts` counts, in its order (how the messages name them).
NONFINITE_TERMS = ("L_direct", "L_z", "L_adv", "L_x'", "the reranker's gradients", "the generator's gradients")
_LOG_EPS = 1e-6


def targets(labels):
    """(mask, z) of labels `[batch, list_size]` (-1 on padding): real candidates, float 0/1 feedback."""
    return ops.greater_equal(labels, 0), ops.cast(ops.equal(labels, 1), "float32")


def reverse_gradient(x, scale: float):
    """x in the forward pass; its gradient multiplied by `scale` in the backward pass."""
    x_fixed = ops.stop_gradient(x)
    return x_fixed + scale * (x - x_fixed)


def all_finite(tensors):
    """True when every value of every tensor (or IndexedSlices) is finite; None entries are skipped."""
    checks = []
    for t in tensors:
        if t is None:
            continue
        values = t.values if isinstance(t, tf.IndexedSlices) else t
        checks.append(tf.reduce_all(tf.math.is_finite(values)))
    return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)


def replicas_in_sync() -> int:
    """Replicas that share each global batch (1 without a distribution strategy)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def scale_for_replicas(loss):
    """The per-replica loss whose gradient, summed over replicas (as the optimizer's all-reduce
    does), is the gradient of the global batch's loss: each replica's mean divided by the replicas."""
    n = replicas_in_sync()
    return loss if n == 1 else loss * (1.0 / n)


def any_replica(flags):
    """`flags` (bool `[k]`) with each entry true on every replica when it is true on any one.

    The non-finite guard decides on these: all replicas take the same branch around the
    optimizer's collective all-reduce, and a step that is bad on one worker is skipped by all.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return flags
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(flags, "int32")) > 0


def dense_gradients(grads):
    """The gradients with every `tf.IndexedSlices` (an embedding lookup's) summed into a dense tensor.

    Keras 3's Adam squares an IndexedSlices gradient slice by slice before its duplicate indices are
    summed, so an embedding row looked up k times in a batch gets the sum of k squared partial
    gradients as its second moment instead of the square of their sum: its steps shrink, and differ
    with how the lookups are split (the replicas of a distribution strategy split them). Its update
    of the moments is dense anyway, so a dense gradient costs no more than that update.
    """
    return [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]


def x_regulariser(x, x_fake, mask, kind: str = "log_ratio"):
    """L_x' over the unpadded candidates of x, x_fake `[batch, list_size]` (mask: bool, same shape).

    With l = log clip(x, 1e-6, 1) - log clip(x', 1e-6, 1) and the mean over unpadded candidates:
    - `log_ratio`: L_x' = mean(l^2), bounded below by 0, reached exactly at x' = x.
    - `eq8`: L_x' = -mean(l) = mean(log x' - log x), eq. 8 as printed, with the expectation over
      p_phi estimated by the one draw x' of each candidate. As printed it takes log 0 where x or x'
      is 0 (a retriever score of 0 exists; a generated x' underflows to 0) and is unbounded below
      (minimised by x' -> 0). The clip at 1e-6 (the `log_ratio` clip) makes it finite, with
      finite gradient 1/x' <= 1e6, and bounds it below by log 1e-6 - log x; below the clip its
      gradient is 0. Its minimiser stays x' = 1e-6, not x' = x: it pulls x' down.
    """
    maskf = ops.cast(mask, "float32")
    diff = ops.log(ops.clip(x, _LOG_EPS, 1.0)) - ops.log(ops.clip(x_fake, _LOG_EPS, 1.0))
    if kind == "eq8":
        return -ops.sum(diff * maskf) / ops.maximum(ops.sum(maskf), 1.0)
    return ops.sum(diff * diff * maskf) / ops.maximum(ops.sum(maskf), 1.0)


def quantile_gap(x_a, x_b, mask, z):
    """Warm-up criterion: sum over labels c of the squared 1-D Wasserstein-2 distance between the
    x_a and x_b `[batch, list_size]` of the unpadded candidates with z = c.

    Both are drawn for the same candidates, so each label has as many values in both: sorted
    (padding and the other label set to 2, above every score, where both agree), the i-th
    smallest of x_a is paired with the i-th smallest of x_b (quantile matching), and
    W2^2 = mean over pairs of the squared gap. Differentiable in x_a (sorting permutes values).
    """
    total = ops.zeros(())
    for label in (0.0, 1.0):
        chosen = ops.logical_and(mask, ops.equal(z, label))
        a = ops.sort(ops.reshape(ops.where(chosen, x_a, 2.0), (-1,)))
        b = ops.sort(ops.reshape(ops.where(chosen, x_b, 2.0), (-1,)))
        n = ops.sum(ops.cast(chosen, "float32"))
        total = total + ops.sum(ops.square(a - b)) / ops.maximum(n, 1.0)
    return total


class VariableReport(keras.metrics.Metric):
    """Reports a model variable in the logs as it stands (the sampler phase, the skipped steps).

    A metric rather than an extra log entry: Keras recomputes an epoch's logs from the model's
    metrics (in the cross-replica context, so aggregated over every replica and worker) only when
    the step's logs hold exactly those metrics.
    """

    def __init__(self, read, name: str, **kwargs):
        super().__init__(name=name, **kwargs)
        self._read = read

    def update_state(self, *args, **kwargs):
        pass

    def result(self):
        return ops.cast(self._read(), "float32")

    def reset_state(self):
        pass


class _PhaseFlag:
    """The phase the steps choose in the graph when `DNRModel._phase_in_graph`: 1 model-based, 0
    heuristic. Held outside the model's weights (a plain object is not tracked), since it is the
    phase being trained or evaluated now, set by `set_sampler_phase`, whereas the saved
    `sampler_phase` is the phase of the epoch the weights come from: restoring the best epoch's
    weights after the last epoch does not change the sampler the final evaluation uses."""

    def __init__(self):
        self.variable = tf.Variable(0, dtype=tf.int32, trainable=False, name="phase_flag")


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
                eps_space=dnr.generator_eps,
                name="generator",
            )
            self.generator_optimizer = keras.optimizers.Adam(dnr.generator_learning_rate, name="generator_adam")
        self.noise_seed = keras.random.SeedGenerator(seed + 1000, name="noise_seed")
        self.sampler_phase = self.add_weight(
            shape=(), dtype="int32", initializer="zeros", trainable=False, name="sampler_phase"
        )
        self._model_phase = False
        self._phase = _PhaseFlag() if self.generator is not None else None
        # Steps with a non-finite loss term or gradient are never applied (see `train_step`).
        self.nonfinite_counts = self.add_weight(
            shape=(len(NONFINITE_TERMS),),
            dtype="int32",
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",  # every replica adds the same, all-reduced flags
            name="nonfinite_counts",
        )
        self.skipped_steps = self.add_weight(
            shape=(),
            dtype="int32",
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
            name="skipped_steps",
        )
        self.warmup_optimizer = self.warmup_done = None
        if self.generator is not None and dnr.generator_warmup_steps > 0:
            # Its own optimizer: the adversarial phase's starts as it would without a warm-up.
            self.warmup_optimizer = keras.optimizers.Adam(dnr.generator_learning_rate, name="generator_warmup_adam")
            self.warmup_done = self.add_weight(
                shape=(), dtype="int32", initializer="zeros", trainable=False, name="generator_warmup_done"
            )
        self._warmup_fn = None
        self.trackers = {name: keras.metrics.Mean(name=name) for name in LOSS_TERMS}
        self.ranking = RankingMetrics(cfg.train.k)
        self.reports = [
            VariableReport(lambda: self.sampler_phase, name="sampler_phase"),
            VariableReport(lambda: self.skipped_steps, name="skipped_steps"),
        ]

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
            if self.warmup_optimizer is not None:
                self.warmup_optimizer.build(self.generator.trainable_variables)
        self.optimizer.build(self.reranker.trainable_variables)
        self._built_all = True

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Skipped once `build_all` has run: every layer and optimizer is built, so Keras' symbolic
        build has nothing to do, and under MultiWorkerMirroredStrategy it fails on a dict batch (it
        all-reduces the first batch to get its shapes; Keras 3.15)."""
        if getattr(self, "_built_all", False):
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def build(self, input_shape=None):
        # Sub-models build on their first call (build_all); nothing to create here.
        pass

    def load_own_variables(self, store):
        """Loads `sampler_phase` and the non-finite counters; weights saved before the counters
        existed (they hold `sampler_phase` alone) load with the counters at 0."""
        if len(store.keys()) == 1:
            self.sampler_phase.assign(store["0"])
            return
        super().load_own_variables(store)

    def call(self, features, training=False):
        return self._rerank(features, training)

    # Every reranker and generator output goes through these two: under `train.precision:
    # mixed_bfloat16` the sub-models compute in bfloat16, and their outputs (logits, x') enter the
    # losses, the metrics and each other in float32 (a float32 output passes as it is).
    def _rerank(self, features, training):
        return float32(self.reranker(features, training=training))

    def _generate(self, features, z, seed, training):
        return float32(self.generator(features, z, seed=seed, training=training))

    @property
    def metrics(self):
        return [*self.trackers.values(), *self.ranking.metrics, *self.reports]

    # --- the sampler phase -----------------------------------------------------------------------

    @property
    def model_phase(self) -> bool:
        """True once the model-based sampler is active (after lambda_e epochs)."""
        return self._model_phase

    @property
    def _phase_in_graph(self) -> bool:
        """True when the train and test steps read the phase from `_phase` (`_PhaseFlag`) in the graph
        (a `tf.cond` around each phase's own work), so that the switch needs no new trace: a model
        with a generator, updated alternately (the simultaneous update changes the reranker's own
        step). Otherwise each phase has its own trace. On several replicas the noise's all-gather
        of the replicas' batch sizes, a cross-replica call that a replica's `cond` cannot hold (a
        RuntimeError under either strategy, 2026-12-07), is made before the `cond`, once a step
        (`noise.global_batch_rows`)."""
        dnr = self.cfg.dnr
        return self.generator is not None and not (dnr.trains_generator and dnr.generator_update == "simultaneous")

    def _by_phase(self, model_based, heuristic):
        """`model_based()` in the model-based phase, `heuristic()` before: chosen in the graph when
        `_phase_in_graph` (both traced, one run), else by the phase the step was traced in."""
        if self._phase_in_graph:
            return tf.cond(self._phase.variable > 0, model_based, heuristic)
        return model_based() if self._model_phase else heuristic()

    def set_sampler_phase(self, model_based: bool) -> None:
        """Switches the sampler. Without `_phase_in_graph` the steps are retraced so that each
        phase's graph holds only its work."""
        model_based = bool(model_based) and self.generator is not None
        self.sampler_phase.assign(int(model_based))
        if self._phase is not None:
            self._phase.variable.assign(int(model_based))
        if model_based != self._model_phase:
            self._model_phase = model_based
            if self._phase_in_graph:
                return
            self.train_function = None
            self.test_function = None
            self.make_train_function(force=True)
            self.make_test_function(force=True)

    def sample_x(self, features, z, training=False, seed=None):
        """`[batch, list_size]` synthetic scores x' from the active sampler (`seed`: the training noise by
        default; callbacks pass their own so that they never move the training's random state)."""
        seed = self.noise_seed if seed is None else seed
        with global_batch_rows(ops.shape(z)[0]):
            return self._by_phase(lambda: self._generate(features, z, seed, training), lambda: self.heuristic(z, seed))

    # --- steps -----------------------------------------------------------------------------------

    def _reranker_pair(self, features, x_fake, training):
        """Logits on the real x and on x'.

        Fused (`train.fused_step`): one reranker call on the real and the generated lists stacked
        along the batch, so every layer runs one larger matrix product instead of two; the
        backbones are per-list, so the logits are the same as from two calls.
        """
        fake = {**features, S.RETRIEVER_SCORES: x_fake}
        if not self.cfg.train.fused_step:
            return self._rerank(features, training), self._rerank(fake, training)
        n = ops.shape(x_fake)[0]
        stacked = {key: ops.concatenate([features[key], fake[key]], axis=0) for key in features}
        logits = self._rerank(stacked, training)
        return logits[:n], logits[n:]

    def _reranker_losses(self, features, labels, training):
        """L_direct, L_z and the reranker's logits on the real x (x' from the active sampler)."""
        mask, z = targets(labels)
        if not self.cfg.dnr.enabled:
            logits = self._rerank(features, training)
            return masked_bce(z, logits, mask), ops.zeros(()), logits, mask, z
        x_fake = ops.stop_gradient(self.sample_x(features, z))
        logits, fake_logits = self._reranker_pair(features, x_fake, training)
        return masked_bce(z, logits, mask), masked_bce(z, fake_logits, mask), logits, mask, z

    def _generator_losses(self, features, z, mask):
        x_fake = self._generate(features, z, self.noise_seed, training=True)
        logits = self._rerank({**features, S.RETRIEVER_SCORES: x_fake}, training=False)
        l_adv = -masked_bce(z, logits, mask)
        dnr = self.cfg.dnr
        l_x = x_regulariser(features[S.RETRIEVER_SCORES], x_fake, mask, dnr.x_reg)
        loss = (l_adv if dnr.use_adv else 0.0) + (dnr.weight_x * l_x if dnr.use_x_reg else 0.0)
        return loss, l_adv, l_x

    @property
    def _simultaneous(self) -> bool:
        dnr = self.cfg.dnr
        return self._model_phase and dnr.trains_generator and dnr.generator_update == "simultaneous"

    def compute_step(self, features, labels):
        """The first update of a train step: its losses and gradients, nothing applied.

        Returns `(losses, reranker_grads, generator_grads)`: losses a dict of `LOSS_TERMS` (and
        `logits`, `mask`, `z`); generator_grads is None unless the generator update is
        simultaneous, in which case both gradients come from one tape:
            objective = L_direct + lambda_m L_z(x'_r) + weight_x L_x'(x')
        where x'_r is x' with its gradient scaled by -1/lambda_m (a gradient reversal), so the
        reranker's gradient is that of L_theta and the generator's that of L_adv + weight_x L_x'
        (eq. 7-8), both at the current reranker weights and the same x'.
        """
        dnr = self.cfg.dnr
        simultaneous = self._simultaneous
        l_adv = l_x = ops.zeros(())
        with tf.GradientTape() as tape:
            if simultaneous:
                mask, z = targets(labels)
                x_gen = self._generate(features, z, self.noise_seed, training=True)
                x_fake = reverse_gradient(x_gen, -1.0 / dnr.lambda_m if dnr.use_adv else 0.0)
                logits, fake_logits = self._reranker_pair(features, x_fake, training=True)
                l_direct, l_z = masked_bce(z, logits, mask), masked_bce(z, fake_logits, mask)
                l_adv = -l_z
                l_x = x_regulariser(features[S.RETRIEVER_SCORES], x_gen, mask, dnr.x_reg)
            else:
                l_direct, l_z, logits, mask, z = self._reranker_losses(features, labels, training=True)
            loss = l_direct + dnr.lambda_m * l_z if dnr.enabled else l_direct
            auxiliary = getattr(self.reranker, "auxiliary_loss", None)
            if auxiliary is not None:  # a backbone's own extra term (the generator-evaluator's evaluator)
                loss = loss + auxiliary(features, labels, logits, training=True)
            objective = loss + dnr.weight_x * l_x if simultaneous and dnr.use_x_reg else loss
            objective = scale_for_replicas(objective)
        variables = self.reranker.trainable_variables
        gen_vars = self.generator.trainable_variables if simultaneous else []
        grads = dense_gradients(tape.gradient(objective, variables + gen_vars))
        losses = {"loss": loss, "l_direct": l_direct, "l_z": l_z, "l_adv": l_adv, "l_x": l_x}
        losses.update(logits=logits, mask=mask, z=z)
        return losses, grads[: len(variables)], (grads[len(variables) :] if simultaneous else None)

    def _apply_if_finite(self, optimizer, grads, variables, flags, count=True, when=None):
        """Applies the update only when every flag holds on every replica (and `when`, a scalar bool
        the same on every replica, if given); counts the flags that do not (once a step, however
        many replicas saw it). Returns whether the update was applied."""
        bad = any_replica(tf.logical_not(tf.stack([f for _, f in flags])))
        ok = tf.logical_not(tf.reduce_any(bad))
        if when is not None:
            ok = tf.logical_and(ok, when)
        if count:
            index = [NONFINITE_TERMS.index(name) for name, _ in flags]
            counts = tf.scatter_nd(tf.constant(index)[:, None], tf.cast(bad, "int32"), [len(NONFINITE_TERMS)])
            self.nonfinite_counts.assign_add(counts)

        def apply():
            optimizer.apply(grads, variables)
            return tf.constant(True)

        ctx = tf.distribute.get_replica_context()
        if ctx is None or tf.__internal__.distribute.strategy_supports_no_merge_call():
            return tf.cond(ok, apply, lambda: tf.constant(False))

        # A strategy whose optimizer update goes through `merge_call` (MirroredStrategy on local
        # devices) does not allow a `merge_call` inside a replica's `cond`: decide in the
        # cross-replica context, as Keras' LossScaleOptimizer does. `ok` is the same on every replica.
        def cross_replica(strategy, ok, grads):
            def apply_all():
                strategy.extended.call_for_each_replica(optimizer.apply, args=(grads, variables))
                return tf.constant(True)

            ok = strategy.experimental_local_results(ok)[0]
            return tf.cond(ok, apply_all, lambda: tf.constant(False))

        return ctx.merge_call(cross_replica, args=(ok, grads))

    def train_step(self, data):
        """Algorithm 1 on one batch. A step whose loss terms or gradients are not all finite is not
        applied (neither model changes); it is counted in `nonfinite_counts` by term, and
        `NonFiniteGuard` stops the run or lets it go on (`train.on_nonfinite`)."""
        features, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        with global_batch_rows(ops.shape(labels)[0]):
            return self._train_step(features, labels)

    def _train_step(self, features, labels):
        dnr = self.cfg.dnr
        losses, grads, gen_grads = self.compute_step(features, labels)
        flags = [
            ("L_direct", tf.math.is_finite(losses["l_direct"])),
            ("L_z", tf.math.is_finite(losses["l_z"])),
            ("the reranker's gradients", all_finite(grads)),
        ]
        if gen_grads is not None:
            flags += [
                ("L_adv", tf.math.is_finite(losses["l_adv"])),
                ("L_x'", tf.math.is_finite(losses["l_x"])),
                ("the generator's gradients", all_finite(gen_grads)),
            ]
        applied = self._apply_if_finite(self.optimizer, grads, self.reranker.trainable_variables, flags)
        self.skipped_steps.assign_add(tf.cast(tf.logical_not(applied), "int32"))
        l_adv, l_x = losses["l_adv"], losses["l_x"]
        extra_generator_steps = 0
        if gen_grads is not None:
            self._apply_if_finite(
                self.generator_optimizer, gen_grads, self.generator.trainable_variables, flags, count=False
            )
            extra_generator_steps = dnr.generator_steps - 1
        elif (self._phase_in_graph or self._model_phase) and dnr.trains_generator:
            extra_generator_steps = dnr.generator_steps
        gen_vars = self.generator.trainable_variables if extra_generator_steps else []

        def generator_step():
            with tf.GradientTape() as gtape:
                gen_loss, l_adv, l_x = self._generator_losses(features, losses["z"], losses["mask"])
                gen_loss = scale_for_replicas(gen_loss)
            return [l_adv, l_x, *dense_gradients(gtape.gradient(gen_loss, gen_vars))]

        def no_generator_step():  # the heuristic phase, when the phase is chosen in the graph
            return [ops.zeros(()), ops.zeros(()), *[tf.zeros_like(v) for v in gen_vars]]

        # In the graph, the heuristic phase's generator step is skipped: nothing applied, nothing counted.
        in_phase = self._phase.variable > 0 if extra_generator_steps and self._phase_in_graph else None
        for _ in range(extra_generator_steps):
            l_adv, l_x, *gen_step_grads = self._by_phase(generator_step, no_generator_step)
            gen_flags = [
                ("L_adv", tf.math.is_finite(l_adv)),
                ("L_x'", tf.math.is_finite(l_x)),
                ("the generator's gradients", all_finite(gen_step_grads)),
            ]
            self._apply_if_finite(self.generator_optimizer, gen_step_grads, gen_vars, gen_flags, when=in_phase)
        return self._update_metrics(
            losses["loss"],
            losses["l_direct"],
            losses["l_z"],
            l_adv,
            l_x,
            labels,
            losses["logits"],
            losses["mask"],
            applied,
        )

    def warmup_step(self, features, labels, seed):
        """One warm-up update of the generator alone; returns the criterion before the update.

        Criterion: `quantile_gap` between the generator's x' and the heuristic sampler's x' drawn
        for the same candidates (the same z), both from `seed` (the warm-up's own generator, not the
        training noise). Only the generator's variables get gradients: the reranker is untouched.
        Counted in `warmup_done`.
        """
        if self._warmup_fn is None:
            self._warmup_fn = tf.function(self._warmup_update)
        return self._warmup_fn(features, labels, seed)

    def _warmup_update(self, features, labels, seed):
        mask, z = targets(labels)
        target = ops.stop_gradient(self.heuristic(z, seed))
        variables = self.generator.trainable_variables
        with tf.GradientTape() as tape:
            gap = quantile_gap(self._generate(features, z, seed, training=True), target, mask, z)
        grads = dense_gradients(tape.gradient(gap, variables))
        self.warmup_optimizer.apply(grads, variables)
        self.warmup_done.assign_add(1)
        return gap

    def test_step(self, data):
        features, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        with global_batch_rows(ops.shape(labels)[0]):
            return self._test_step(features, labels)

    def _test_step(self, features, labels):
        dnr = self.cfg.dnr
        l_direct, l_z, logits, mask, z = self._reranker_losses(features, labels, training=False)
        loss = l_direct + dnr.lambda_m * l_z if dnr.enabled else l_direct
        l_adv = l_x = ops.zeros(())
        if dnr.trains_generator and (self._phase_in_graph or self._model_phase):
            l_adv, l_x = self._by_phase(
                lambda: self._generator_losses(features, z, mask)[1:], lambda: (ops.zeros(()), ops.zeros(()))
            )
        return self._update_metrics(loss, l_direct, l_z, l_adv, l_x, labels, logits, mask)

    def _update_metrics(self, loss, l_direct, l_z, l_adv, l_x, labels, logits, mask, applied=None):
        """Updates the epoch's means; a step that was not applied (`applied` False) adds nothing."""
        if applied is None:
            for name, value in zip(LOSS_TERMS, (loss, l_direct, l_z, l_adv, l_x)):
                self.trackers[name].update_state(value)
            self.ranking.update_state(labels, logits, mask)
        else:
            weight = ops.cast(applied, "float32")
            for name, value in zip(LOSS_TERMS, (loss, l_direct, l_z, l_adv, l_x)):
                self.trackers[name].update_state(ops.where(applied, value, 0.0), sample_weight=weight)
            # Not applied: no list has a positive, so none counts (and no NaN reaches the sums).
            self.ranking.update_state(
                ops.where(applied, labels, 0), ops.where(applied, logits, 0.0), ops.logical_and(mask, applied)
            )
        logs = {m.name: m.result() for m in self.metrics}
        if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
            # Keras 3 averages a step's logs over workers along axis 0, which a scalar lacks
            # (TensorFlow issue 72388); these only feed the progress bar: the epoch's logs are
            # recomputed from the metrics, over every worker.
            logs = {name: ops.reshape(value, (1,)) for name, value in logs.items()}
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
