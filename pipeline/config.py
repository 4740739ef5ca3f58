"""Every parameter of the pipeline, with the defaults of ../shared/PROTOCOL.md, in one place."""

from __future__ import annotations

import dataclasses
from typing import Literal

from dnr_tf.config_io import check

SOURCES = ("movielens", "csv", "tfds", "synthetic", "logged", "sequences")


@dataclasses.dataclass(frozen=True)
class RetrieverConfig:
    """Matrix factorisation retriever (paper appendix D.1), trained on the retriever window.

    Attributes:
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
    """

    dim: int = 32
    epochs: int = 15
    batch_size: int = 1024
    negatives: int = 4
    learning_rate: float = 0.005
    l2: float = 1e-5
    holdout_fraction: float = 0.1
    window_shards: int = 16
    shuffle_buffer: int = 200_000

    def validate(self) -> None:
        check(self.dim > 0, "retriever.dim", "must be positive")
        check(self.window_shards >= 1, "retriever.window_shards", "must be >= 1")
        check(self.shuffle_buffer >= 1, "retriever.shuffle_buffer", "must be >= 1")
        check(self.epochs > 0, "retriever.epochs", "must be positive")
        check(self.negatives > 0, "retriever.negatives", "must be positive")
        check(0.0 < self.holdout_fraction < 0.5, "retriever.holdout_fraction", "must be in (0, 0.5)")


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
    """

    num_users: int = 600
    num_items: int = 400
    dim: int = 8
    requests_per_user: int = 8
    retriever_noise: float = 0.8
    popularity: float = 0.5
    base_logit: float = -4.0
    taste_scale: float = 1.5

    def validate(self) -> None:
        check(self.num_users > 0, "synthetic.num_users", "must be positive")
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
        output_shards: shards per split (0 lets the runner decide).
        max_reject_share: the run fails, writing no TFRecords, when more than this share of the input
            records is rejected (every one is still listed in `rejects-*.jsonl`): a data set built
            from what is left would be skewed. 1.0 accepts any share.
        retriever: the MF retriever.
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
    synthetic: SyntheticConfig = SyntheticConfig()

    def validate(self) -> None:
        check(self.min_count >= 1, "min_count", "must be >= 1")
        check(self.kcore_max_iters >= 1, "kcore_max_iters", "must be >= 1")
        check(0.0 < self.retriever_fraction < 1.0, "retriever_fraction", "must be in (0, 1)")
        check(self.stride >= 1, "stride", "must be >= 1")
        check(self.history_len >= 1, "history_len", "must be >= 1")
        check(self.horizon >= 1, "horizon", "must be >= 1")
        check(1 <= self.k <= self.list_size, "k", f"must be in [1, list_size={self.list_size}]")
        check(
            self.list_size > self.horizon or self.protocol == "cascade",
            "list_size",
            "must exceed horizon under the paper protocol",
        )
        check(0.0 < self.paper_retriever_fraction < 1.0, "paper_retriever_fraction", "must be in (0, 1)")
        check(self.output_shards >= 0, "output_shards", "must be >= 0")
        check(0.0 <= self.max_reject_share <= 1.0, "max_reject_share", "must be in [0, 1]")
        if self.source in ("movielens", "csv", "logged", "sequences"):
            check(bool(self.input), "input", f"is required for source {self.source}")
