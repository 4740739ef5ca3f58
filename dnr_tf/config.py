"""Every training value, with its default, in one set of frozen dataclasses (`configs/*.yaml`)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from dnr_tf.config_io import check

BACKBONES = ("prm", "dnn", "dlcm", "setrank", "mir", "sasrec", "gru4rec", "caser", "geneval")
SCORE_FEEDS = ("none", "concat", "add", "weight")
# The validation metrics a run reports (dnr_tf.metrics.METRIC_NAMES; not imported: it loads Keras).
MONITORS = ("hit", "ndcg", "map", "precision", "recall", "f1", "auc")
MAX_SEED = 2**32 - 1  # numpy's and keras.utils.set_random_seed's limit


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The reranker backbone.

    Attributes:
        backbone: `prm` (transformer over the list, the paper's main backbone), `dnn` (pointwise
            MLP, MiDNN-like: no list context), or one of the other rerankers of the paper's table 1:
            `dlcm`, `setrank`, `mir`, `sasrec`, `gru4rec`, `caser`, `geneval` (`dnr_tf/backbones/`).
        score_feed: how the retriever score enters (paper table 2): `none`, `concat` (c score),
            `add` (+ score, projected and added), `weight` (w score, scales the item input).
        embedding_dim: item embedding size.
        hidden_dim: model width (the paper uses 128).
        num_layers: transformer encoder blocks (prm).
        num_heads: attention heads (prm).
        ffn_dim: transformer feed-forward width (prm).
        dnn_layers: hidden widths of the pointwise scorer (dnn).
        dropout: dropout rate.
        use_position: learned position embedding of the retriever order (prm); off, the score
            is the reranker's only view of the retriever's order.
        num_inducing: inducing points of each induced self-attention block (setrank).
        caser_window: the last L history items Caser convolves (caser).
        caser_heights: heights of Caser's horizontal filters (caser).
        caser_filters: horizontal filters of each height (caser).
        caser_vertical: vertical filters (caser).
        geneval_k: length of the lists the generator proposes and the evaluator scores (geneval).
        geneval_proposals: lists proposed at inference, the greedy one included (geneval).
        geneval_train_samples: lists drawn per request to train the evaluator, besides the greedy
            one (geneval).
    """

    backbone: Literal["prm", "dnn", "dlcm", "setrank", "mir", "sasrec", "gru4rec", "caser", "geneval"] = "prm"
    score_feed: Literal["none", "concat", "add", "weight"] = "concat"
    embedding_dim: int = 64
    hidden_dim: int = 64
    num_layers: int = 1
    num_heads: int = 2
    ffn_dim: int = 128
    dnn_layers: tuple[int, ...] = (128, 64)
    dropout: float = 0.1
    use_position: bool = True
    num_inducing: int = 16
    caser_window: int = 5
    caser_heights: tuple[int, ...] = (1, 2, 3)
    caser_filters: int = 16
    caser_vertical: int = 4
    geneval_k: int = 6
    geneval_proposals: int = 4
    geneval_train_samples: int = 2

    def validate(self) -> None:
        check(self.embedding_dim > 0, "model.embedding_dim", "must be positive")
        check(self.hidden_dim > 0, "model.hidden_dim", "must be positive")
        check(self.num_heads >= 1, "model.num_heads", "must be >= 1")
        check(self.ffn_dim >= 1, "model.ffn_dim", "must be >= 1")
        check(all(w >= 1 for w in self.dnn_layers), "model.dnn_layers", "must hold widths >= 1")
        check(self.caser_window >= 1, "model.caser_window", "must be >= 1")
        check(bool(self.caser_heights), "model.caser_heights", "must not be empty")
        check(self.caser_filters >= 1, "model.caser_filters", "must be >= 1")
        check(self.caser_vertical >= 1, "model.caser_vertical", "must be >= 1")
        check(self.hidden_dim % self.num_heads == 0, "model.hidden_dim", "must be a multiple of model.num_heads")
        check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        check(self.num_layers >= 1, "model.num_layers", "must be >= 1")
        check(self.num_inducing >= 1, "model.num_inducing", "must be >= 1")
        check(self.geneval_k >= 1, "model.geneval_k", "must be >= 1")
        check(self.geneval_proposals >= 1, "model.geneval_proposals", "must be >= 1")
        check(self.geneval_train_samples >= 0, "model.geneval_train_samples", "must be >= 0")
        check(
            all(1 <= h <= self.caser_window for h in self.caser_heights),
            "model.caser_heights",
            "must be in [1, model.caser_window]",
        )


@dataclasses.dataclass(frozen=True)
class DNRConfig:
    """The denoising framework (paper sections 3.3-3.4, algorithm 1).

    Attributes:
        enabled: train with L_theta = L_direct + lambda_m L_z; off, plain direct training (PRM).
        lambda_m: weight of the augmented reconstruction loss L_z (eq. 6).
        lambda_c: noise level of x' = (1 - lambda_c) z + lambda_c eps (eq. 4), in (0, 1).
        heuristic: heuristic sampler: `beta` (eps ~ Beta(alpha, beta), DNR-B), `gaussian`
            (eps ~ N(0, 1), DNR-G; x' is clipped to [0, 1]), or `calibrated` (beyond the paper:
            x' ~ Beta(a_z, b_z), one Beta per label fitted by moments to the real x of the train
            split, so x' is exactly as informative about z as x is; lambda_c is not used).
        beta_alpha: alpha of the Beta sampler.
        beta_beta: beta of the Beta sampler.
        model_based: switch to the learned sampler after `lambda_e` epochs (DNR-G / DNR-B);
            off, the heuristic sampler throughout (the "w/ G", "w/ B" ablations).
        lambda_e: epochs with the heuristic sampler before the model-based one.
        use_adv: the adversarial term L_adv (eq. 7) in the generator's loss.
        use_x_reg: the regulariser L_x' (eq. 8) in the generator's loss.
        weight_x: weight of L_x' against L_adv.
        x_reg: the form of L_x': `log_ratio` (the squared log-ratio mean (log x - log x')^2, bounded
            below by 0 at x' = x) or `eq8` (eq. 8 as printed, -E[log(x / x')], with x and x' clipped
            to [1e-6, 1]; unbounded below without the clip and minimised by x' -> 1e-6, not by
            x' = x; `dnr_tf.model.x_regulariser`).
        generator_eps: how the generator's output a (an unbounded real) makes x': `sigmoid`
            (eq. 4 with eps = sigmoid(a) in (0, 1): for lambda_c <= 0.5 positives' x' lie in
            (1 - lambda_c, 1) and negatives' in (0, lambda_c), so x' separates the labels by
            construction) or `logit` (x' = sigmoid(logit(m_z) + lambda_c a), m_z = (1 - lambda_c) z
            + lambda_c / 2: both labels' x' range over all of (0, 1); `dnr_tf.noise.logit_mix`).
        generator_warmup_steps: at the switch to the model-based sampler, first train the
            generator alone for this many steps to match the heuristic sampler's x' per label
            (`DNRModel.warmup_step`); 0: off. Counted in metrics.json `steps.generator_warmup`.
        generator_steps: generator updates per reranker update.
        generator_hidden: hidden width of the generator's 2-layer MLP.
        generator_embedding_dim: the generator's own item embedding size.
        generator_noise_dim: size of the fresh Gaussian input that makes it a sampler.
        generator_learning_rate: Adam learning rate of the generator.
        generator_update: `alternating` (algorithm 1 as written: the reranker's update, then the
            generator's gradient through the updated reranker on a fresh x') or `simultaneous`
            (both gradients from one forward and backward pass at the same reranker weights and
            the same x': the generator's gradient reaches it through a gradient-reversal of
            -1/lambda_m; about the cost of the heuristic step; needs lambda_m > 0). See
            docs/performance.md for its cost and its metrics.
    """

    enabled: bool = True
    lambda_m: float = 0.5
    lambda_c: float = 0.5
    heuristic: Literal["beta", "gaussian", "calibrated"] = "beta"
    beta_alpha: float = 0.5
    beta_beta: float = 0.5
    model_based: bool = True
    lambda_e: int = 2
    use_adv: bool = True
    use_x_reg: bool = True
    weight_x: float = 1.0
    generator_steps: int = 1
    generator_hidden: int = 64
    generator_embedding_dim: int = 16
    generator_noise_dim: int = 8
    generator_learning_rate: float = 1e-3
    generator_update: Literal["alternating", "simultaneous"] = "alternating"
    x_reg: Literal["log_ratio", "eq8"] = "log_ratio"
    generator_eps: Literal["sigmoid", "logit"] = "sigmoid"
    generator_warmup_steps: int = 0

    def validate(self) -> None:
        check(0.0 < self.lambda_c < 1.0, "dnr.lambda_c", "must be in (0, 1)")
        check(self.lambda_m >= 0.0, "dnr.lambda_m", "must be >= 0")
        check(self.lambda_e >= 0, "dnr.lambda_e", "must be >= 0")
        check(self.beta_alpha > 0 and self.beta_beta > 0, "dnr.beta_alpha", "and dnr.beta_beta must be positive")
        check(self.generator_steps >= 1, "dnr.generator_steps", "must be >= 1")
        check(self.weight_x >= 0.0, "dnr.weight_x", "must be >= 0")
        check(self.generator_hidden >= 1, "dnr.generator_hidden", "must be >= 1")
        check(self.generator_embedding_dim >= 1, "dnr.generator_embedding_dim", "must be >= 1")
        check(self.generator_noise_dim >= 1, "dnr.generator_noise_dim", "must be >= 1")
        check(self.generator_learning_rate > 0, "dnr.generator_learning_rate", "must be positive")
        check(
            self.generator_update == "alternating" or self.lambda_m > 0,
            "dnr.generator_update",
            "simultaneous needs dnr.lambda_m > 0 (the generator's gradient is reversed through L_z)",
        )
        check(self.x_reg in ("log_ratio", "eq8"), "dnr.x_reg", "must be log_ratio or eq8")
        check(self.generator_eps in ("sigmoid", "logit"), "dnr.generator_eps", "must be sigmoid or logit")
        check(self.generator_warmup_steps >= 0, "dnr.generator_warmup_steps", "must be >= 0 (0: no warm-up)")

    @property
    def trains_generator(self) -> bool:
        return self.enabled and self.model_based and (self.use_adv or self.use_x_reg)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop.

    Attributes:
        epochs: passes over the train split.
        batch_size: lists per step.
        learning_rate: Adam learning rate of the reranker.
        weight_decay: AdamW weight decay (0: plain Adam).
        k: items shown; the cutoff of the metrics.
        seed: seed of initialisation, shuffling and noise.
        monitor: validation metric that picks the best epoch.
        shuffle_buffer: lists in the shuffle buffer.
        steps_per_epoch: cap on steps an epoch (None: the whole split).
        on_nonfinite: a step whose loss terms or gradients are not all finite is never applied;
            `stop` then ends the run with a message naming the term and the epoch, `skip` goes on
            and counts such steps (`skipped_steps` in the logs and metrics.json).
        fused_step: one reranker call on the real and the generated lists stacked along the batch,
            with the same losses and gradients as two calls (tested). Off by default: on the 2-core
            CPU of docs/performance.md it is 5-10% slower than two calls; it is the usual win where
            per-call overhead dominates (accelerators), not measured here.
        patience: early stopping (`dnr_tf.callbacks.EarlyStop`): stop once `monitor` has not
            improved for this many epochs; `epochs` is then the maximum. 0: off (every epoch runs).
            A DNR run with a model-based phase never stops before that phase has had `patience`
            epochs (epoch lambda_e + patience), so an early stop cannot skip the switch.
        precision: `float32`, or `mixed_bfloat16`: Keras' mixed precision, float32 weights with
            bfloat16 arithmetic in the reranker and the generator; their outputs (logits, x') and
            every loss stay float32. A run evaluates in its precision; the export serves in float32.
            On the 2-core CPU of docs/performance.md a step is about 1.1-1.2x faster, and the study's
            three ML-100K headline rows kept their test NDCG@6 (5 seeds each; docs/performance.md).
            Not the default: float32 runs reproduce the study's bit for bit on one machine.
    """

    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    k: int = 6
    seed: int = 0
    monitor: str = "ndcg@6"
    shuffle_buffer: int = 10_000
    steps_per_epoch: int | None = None
    on_nonfinite: Literal["stop", "skip"] = "stop"
    fused_step: bool = False
    patience: int = 0
    precision: Literal["float32", "mixed_bfloat16"] = "float32"

    def validate(self) -> None:
        check(self.epochs >= 1, "train.epochs", "must be >= 1")
        check(self.patience >= 0, "train.patience", "must be >= 0 (0: no early stopping)")
        check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        check(self.learning_rate > 0, "train.learning_rate", "must be positive")
        check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        check(self.k >= 1, "train.k", "must be >= 1")
        check(0 <= self.seed <= MAX_SEED, "train.seed", f"must be in [0, {MAX_SEED}]")
        monitors = [name if name == "auc" else f"{name}@{self.k}" for name in MONITORS]
        check(
            self.monitor in monitors,
            "train.monitor",
            f"{self.monitor!r} is not a metric of this run (train.k={self.k}): use one of {', '.join(monitors)}",
        )
        check(self.shuffle_buffer >= 1, "train.shuffle_buffer", "must be >= 1")
        check(
            self.steps_per_epoch is None or self.steps_per_epoch >= 1,
            "train.steps_per_epoch",
            "must be >= 1 (or null: the whole split)",
        )


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: `python -m dnr_tf.train --config configs/<name>.yaml`."""

    name: str = "experiment"
    model: ModelConfig = ModelConfig()
    dnr: DNRConfig = DNRConfig()
    train: TrainConfig = TrainConfig()

    def validate(self) -> None:
        check(bool(self.name), "name", "must not be empty")
