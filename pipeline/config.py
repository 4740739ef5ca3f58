"""Every parameter of the pipeline, with the defaults of ../shared/PROTOCOL.md, in one place."""

from __future__ import annotations

import dataclasses
from typing import Literal

from dnr_tf.config_io import check

SOURCES = ("movielens", "csv", "tfds", "synthetic", "logged", "sequences")
RETRIEVER_KINDS = ("mf", "item2item", "mf_item2item")
# Kinds whose candidates come from MF (they need its user rows) and kinds whose x is item-to-item's.
MF_CANDIDATES = ("mf", "mf_item2item")
I2I_SCORES = ("item2item", "mf_item2item")


def retrained_kind(kind: str) -> str:
    """The kind the retrained retriever is trained as: `mf_item2item` keeps its candidates (the lists
    are fixed), so only its model of x, item-to-item, is trained again."""
    return "item2item" if kind == "mf_item2item" else kind


@dataclasses.dataclass(frozen=True)
class RetrieverConfig:
    """The retriever, trained on the retriever window.

    Attributes:
        kind: `mf`, matrix factorisation with random negatives (paper appendix D.1; the weak x),
            or `item2item`, item-to-item similarities of the window scored against the user's
            history before each request (pipeline/item2item.py; the strong x), or `mf_item2item`,
            MF's candidates scored (and ordered) by item-to-item: the same lists as `mf` with a
            stronger x, for data where item-to-item's own lists separate the labels worse than MF's.
        dim: embedding size.
        epochs: passes over the retriever window.
        batch_size: positive pairs per step.
        negatives: random negative items per positive.
        learning_rate: Adam learning rate.
        l2: L2 penalty on the embeddings of a batch.
        holdout_fraction: share of window interactions held out (by a stable hash) for the AUC.
        window_shards: files each split of the window is written to by stage 1; each is sorted
            by one worker, which so holds 1 / window_shards of the window at most.
        shuffle_buffer: pairs in a shuffle block while the retriever streams its window (16 bytes
            a pair): the driver holds one block, never the whole window; a window that fits in
            one block is shuffled whole every epoch.
        i2i_neighbors: item-to-item kinds: most similar items kept per item.
        i2i_shrink: item-to-item kinds: shrinkage of the cosine, c_ij / (sqrt(n_i n_j) + shrink).
        i2i_history: item-to-item kinds: most recent history items that score a request.
        i2i_decay: item-to-item kinds: weight of each older history item relative to the next one.
    """

    kind: Literal["mf", "item2item", "mf_item2item"] = "mf"
    dim: int = 32
    epochs: int = 15
    batch_size: int = 1024
    negatives: int = 4
    learning_rate: float = 0.005
    l2: float = 1e-5
    holdout_fraction: float = 0.1
    window_shards: int = 16
    shuffle_buffer: int = 200_000
    i2i_neighbors: int = 100
    i2i_shrink: float = 10.0
    i2i_history: int = 20
    i2i_decay: float = 0.5

    def validate(self) -> None:
        check(self.kind in RETRIEVER_KINDS, "retriever.kind", f"must be one of {', '.join(RETRIEVER_KINDS)}")
        check(self.i2i_neighbors >= 1, "retriever.i2i_neighbors", "must be >= 1")
        check(self.i2i_shrink >= 0, "retriever.i2i_shrink", "must be >= 0")
        check(self.i2i_history >= 1, "retriever.i2i_history", "must be >= 1")
        check(0.0 < self.i2i_decay <= 1.0, "retriever.i2i_decay", "must be in (0, 1]")
        check(self.dim > 0, "retriever.dim", "must be positive")
        check(self.batch_size >= 1, "retriever.batch_size", "must be >= 1")
        check(self.learning_rate > 0, "retriever.learning_rate", "must be positive")
        check(self.l2 >= 0, "retriever.l2", "must be >= 0")
        check(self.window_shards >= 1, "retriever.window_shards", "must be >= 1")
        check(self.shuffle_buffer >= 1, "retriever.shuffle_buffer", "must be >= 1")
        check(self.epochs > 0, "retriever.epochs", "must be positive")
        check(self.negatives > 0, "retriever.negatives", "must be positive")
        check(0.0 < self.holdout_fraction < 0.5, "retriever.holdout_fraction", "must be in (0, 0.5)")


@dataclasses.dataclass(frozen=True)
class RetrainedConfig:
    """A second, retrained retriever: production drift on the same candidate lists.

    The retriever of `retriever.kind` is trained again, with seed `seed`, on the `keep_fraction`
    share of the retriever window's training pairs chosen by a stable hash of (seed, user, item)
    (the window and nothing later, so it stays leak-free). It scores the main retriever's
    candidates of every list, written as `retriever_scores_retrained`; the candidates and their
    order are the main retriever's. On the simulator it is a second noisy view of the true factors,
    drawn with `seed`.

    Attributes:
        enabled: write `retriever_scores_retrained`.
        seed: seed of the second retriever (initialisation, sampling, the kept share, the
            simulator's noise); must differ from the pipeline's `seed`.
        keep_fraction: share of the window's training pairs the second retriever trains on.
    """

    enabled: bool = False
    seed: int = 1
    keep_fraction: float = 0.9

    def validate(self) -> None:
        check(0.0 < self.keep_fraction <= 1.0, "retrained.keep_fraction", "must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """The cascade simulator (the embedded default data set).

    Attributes:
        num_users: simulated users.
        num_items: simulated items.
        dim: latent factor size of the true preference model.
        requests_per_user: requests simulated per user.
        retriever_noise: std of the noise on the retriever's view of the factors (0 = oracle).
        popularity: std of the item popularity bias (logit scale).
        base_logit: global offset of the true logit (sets the positive rate).
        taste_scale: scale of the user-item affinity (how much personal taste matters).
        sharpness: multiplies the whole true logit (and the retriever's, on the same scale):
            p = sigmoid(sharpness * (base_logit + taste_scale <U_u, V_i> + b_i)). Above 1 the labels
            become nearly deterministic functions of the logit, which lifts the ceiling that
            Bernoulli labels put on the within-list AUC of x; with `retriever_noise` it sweeps
            that AUC (configs/pipeline/synthetic_auc*.yaml). 1.0 is the original simulator.
    """

    num_users: int = 600
    num_items: int = 400
    dim: int = 8
    requests_per_user: int = 8
    retriever_noise: float = 0.8
    popularity: float = 0.5
    base_logit: float = -4.0
    taste_scale: float = 1.5
    sharpness: float = 1.0

    def validate(self) -> None:
        check(self.sharpness > 0, "synthetic.sharpness", "must be positive")
        check(self.num_users > 0, "synthetic.num_users", "must be positive")
        check(self.num_items > 0, "synthetic.num_items", "must be positive")
        check(self.dim >= 1, "synthetic.dim", "must be >= 1")
        check(self.popularity >= 0, "synthetic.popularity", "must be >= 0")
        check(self.taste_scale >= 0, "synthetic.taste_scale", "must be >= 0")
        check(self.requests_per_user >= 3, "synthetic.requests_per_user", "must be >= 3 (train, valid, test)")
        check(self.retriever_noise >= 0, "synthetic.retriever_noise", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The whole pipeline.

    Attributes:
        source: one of `SOURCES`.
        input: file or glob (movielens, csv, logged, sequences) or TFDS name (tfds); unused for synthetic.
        protocol: `cascade` (leak-free, default) or `paper` (appendix C.1; leaks, replication only).
        movielens_format: `auto` (from the file name), `100k` (tab) or `1m` (`::`).
        tfds_data_dir: TFDS data directory (None: the TFDS default).
        min_count: k-core threshold for users and items, iterated to a fixed point.
        kcore_max_iters: unrolled k-core passes; the run fails if the last pass still removes.
        retriever_fraction: leading share of each user's timeline that trains the retriever.
        stride: interactions between two requests of a user.
        history_len: items of history per request.
        list_size: candidates per request.
        horizon: future interactions whose items are positives.
        k: items shown (the cutoff of the stats' metrics).
        paper_retriever_fraction: share of all interactions training the retriever (paper protocol).
        seed: seed of everything random (retriever, simulator, random-order baseline).
        output_shards: files per split. A record's file is a stable hash of its request id, and each
            file holds its records by user, time and request id, so every runner writes the same files.
        max_reject_share: the run fails, writing no TFRecords, when more than this share of the input
            records is rejected (every one is still listed in `rejects-*.jsonl`): a data set built
            from what is left would be skewed. 1.0 accepts any share.
        retriever: the retriever (`retriever.kind`: mf, item2item or mf_item2item).
        retrained: the second, retrained retriever (`retriever_scores_retrained`).
        synthetic: the simulator.
    """

    source: Literal["movielens", "csv", "tfds", "synthetic", "logged", "sequences"] = "synthetic"
    input: str = ""
    protocol: Literal["cascade", "paper"] = "cascade"
    movielens_format: Literal["auto", "100k", "1m"] = "auto"
    tfds_data_dir: str | None = None
    min_count: int = 20
    kcore_max_iters: int = 10
    retriever_fraction: float = 0.5
    stride: int = 6
    history_len: int = 20
    list_size: int = 50
    horizon: int = 6
    k: int = 6
    paper_retriever_fraction: float = 0.8
    seed: int = 0
    output_shards: int = 1
    max_reject_share: float = 0.01
    retriever: RetrieverConfig = RetrieverConfig()
    retrained: RetrainedConfig = RetrainedConfig()
    synthetic: SyntheticConfig = SyntheticConfig()

    def validate(self) -> None:
        check(self.min_count >= 1, "min_count", "must be >= 1")
        check(self.kcore_max_iters >= 1, "kcore_max_iters", "must be >= 1")
        check(0.0 < self.retriever_fraction < 1.0, "retriever_fraction", "must be in (0, 1)")
        check(self.stride >= 1, "stride", "must be >= 1")
        check(self.history_len >= 1, "history_len", "must be >= 1")
        check(self.horizon >= 1, "horizon", "must be >= 1")
        check(self.list_size >= 1, "list_size", "must be >= 1")
        check(0 <= self.seed <= 2**32 - 1, "seed", f"must be in [0, {2**32 - 1}]")
        check(1 <= self.k <= self.list_size, "k", f"must be in [1, list_size={self.list_size}]")
        check(
            self.list_size > self.horizon or self.protocol == "cascade",
            "list_size",
            "must exceed horizon under the paper protocol",
        )
        check(0.0 < self.paper_retriever_fraction < 1.0, "paper_retriever_fraction", "must be in (0, 1)")
        check(
            self.output_shards >= 1,
            "output_shards",
            "must be >= 1 (records are sharded by request id, so that every runner writes the same files)",
        )
        check(0.0 <= self.max_reject_share <= 1.0, "max_reject_share", "must be in [0, 1]")
        check(
            self.retriever.kind == "mf" or self.protocol == "cascade",
            "retriever.kind",
            f"{self.retriever.kind} needs protocol cascade (the paper protocol scores with MF only)",
        )
        if self.retrained.enabled:
            check(self.source != "logged", "retrained.enabled", "logged lists carry their own scores")
            check(self.protocol == "cascade", "retrained.enabled", "needs protocol cascade")
            check(self.retrained.seed != self.seed, "retrained.seed", f"must differ from seed ({self.seed})")
            check(
                self.retriever.kind not in I2I_SCORES or self.retrained.keep_fraction < 1.0,
                "retrained.keep_fraction",
                f"must be below 1 for {self.retriever.kind} (item-to-item has no seed: on the same pairs it would "
                "copy the main retriever)",
            )
        if self.source in ("movielens", "csv", "logged", "sequences"):
            check(bool(self.input), "input", f"is required for source {self.source}")
