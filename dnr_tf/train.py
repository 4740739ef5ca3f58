"""`python -m dnr_tf.train`: train a reranker (directly or with DNR) on a pipeline output.

Example:
    python -m dnr_tf.train --config configs/ml100k_dnr_b.yaml --data_dir data/ml100k \\
        --model_dir runs/ml100k_dnr_b --set train.epochs=5 --set dnr.lambda_c=0.5

Writes into `--model_dir`: `config.yaml` (resolved), `logs/` (TensorBoard), `backup/` (only while
running: one commit an epoch, `callbacks.RunBackup`, so a killed run resumes with the same command;
removed when the run finishes),
`best.weights.h5` and `best.json` (the epoch with the best validation metric), and `metrics.json`
(validation and test metrics of the best model, seconds per epoch, the history).

A `--model_dir` that holds a run with another config is refused (the error names the keys that
differ); with the same config the run resumes, or, if it is finished, is left as it is and its
result printed (exit 0). `--overwrite` starts over: the old run is kept in `.replaced/` until the
new one has its results (`dnr_tf.run_dir`). Every file is written aside and renamed into place
(`dnr_tf.safe_io`); docs/reliability.md says what survives a kill or a full disk.

`--strategy mirrored` trains on every local GPU, `--strategy multi_worker` on the cluster that the
TF_CONFIG environment variable describes (`dnr_tf.distribute`; docs/scaling.md). `train.batch_size`
is the global batch. Only the chief writes `--model_dir`; each other worker writes its own copy of
the run under `<model_dir>/workers/<task>-<index>/`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import yaml

from dnr_tf import config_io, config_keys, distribute, quiet  # distribute imports TensorFlow only when called
from dnr_tf.config import ExperimentConfig
from dnr_tf.runs import build_model, read_vocab

FEATURES = ("item_ids", "retriever_scores", "history", "user_id")


def parse_args(argv=None) -> tuple[ExperimentConfig, str, str, str | None, dict]:
    parser = argparse.ArgumentParser(prog="python -m dnr_tf.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML experiment config (configs/*.yaml)")
    parser.add_argument("--data_dir", required=True, help="output directory of `python -m pipeline.run`")
    parser.add_argument("--model_dir", required=True, help="where the run is written (runs/<name>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument(
        "--export",
        nargs="?",
        const="",
        default=None,
        metavar="EXPORT_DIR",
        help="also export the best model for TF Serving (default saved_models/<name>)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run already in --model_dir (kept aside until the new run has its results)",
    )
    parser.add_argument(
        "--strategy",
        choices=distribute.STRATEGIES,
        default="default",
        help="tf.distribute strategy: one device, every local GPU, or the TF_CONFIG cluster (docs/scaling.md)",
    )
    parser.add_argument(
        "--cpu_replicas",
        type=int,
        default=0,
        metavar="N",
        help="with --strategy mirrored and no GPU: split the CPU into N logical devices, one replica each",
    )
    parser.add_argument(
        "--list_keys",
        action=config_keys.list_keys_action(ExperimentConfig),
        help="print every config key (for --set) with its default and meaning, and exit",
    )
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's, Keras' and absl's own logs too")
    args = parser.parse_args(argv)
    data = config_io.apply_overrides(config_io.load_yaml(args.config), args.set)
    cfg = config_io.from_dict(ExperimentConfig, data)
    export = None if args.export is None else (args.export or os.path.join("saved_models", cfg.name))
    opts = {"strategy": args.strategy, "cpu_replicas": args.cpu_replicas, "overwrite": args.overwrite}
    return cfg, args.data_dir, args.model_dir, export, opts


def split_sizes(data_dir: str) -> dict[str, int]:
    """Lists per split from the pipeline's stats.json (empty when it has none)."""
    path = os.path.join(data_dir, "stats.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        splits = json.load(f).get("splits", {})
    return {name: int(s["lists"]) for name, s in splits.items() if "lists" in s}


def datasets(
    data_dir: str,
    cfg: ExperimentConfig,
    schema,
    epochs_from: int | None = None,
    epochs: int = 1,
    distributed: bool = False,
):
    """(train, valid, test) datasets of (features, labels) pairs.

    With `epochs_from`, train is the stream of `epochs` epochs from that epoch on, each shuffled by
    (seed, epoch) alone (`make_dataset`): what `train` uses, so that a resumed run sees the batches
    an uninterrupted one would. Without it, train is one shuffled pass.
    `distributed`: for a multi-worker strategy, shard by data rather than by file. Every worker reads
    the same (seeded, so identical) stream and keeps its replicas' share of each global batch: a
    split may have a single file, and the batches are then those of one process.
    """
    import tensorflow as tf

    from dnr_tf import data as data_lib
    from dnr_tf.schema import RETRIEVER_SCORES_RETRAINED

    sizes = split_sizes(data_dir)

    def to_pairs(batch):
        return {k: batch[k] for k in FEATURES}, batch["labels"]

    def to_test_pairs(batch):
        # The retrained retriever's x, where the data has it, rides along for the `retrained` robustness kind.
        features, labels = to_pairs(batch)
        if RETRIEVER_SCORES_RETRAINED in batch:
            features[RETRIEVER_SCORES_RETRAINED] = batch[RETRIEVER_SCORES_RETRAINED]
        return features, labels

    out = []
    for split in data_lib.SPLITS:
        train = split == "train"
        batch = cfg.train.batch_size if train else max(cfg.train.batch_size, 256)
        ds = data_lib.make_dataset(
            data_lib.split_pattern(data_dir, split),
            batch,
            schema=schema,
            shuffle=train,
            shuffle_buffer=cfg.train.shuffle_buffer,
            seed=cfg.train.seed,
            cache=True,
            epochs_from=epochs_from if train else None,
            epochs=epochs,
        ).map(to_test_pairs if split == "test" else to_pairs)
        if split in sizes and not (train and epochs_from is not None):
            # Known length: Keras shows real progress bars and does not warn at the end of epoch 1.
            ds = ds.apply(tf.data.experimental.assert_cardinality(math.ceil(sizes[split] / batch)))
        if distributed:
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
            ds = ds.with_options(options)
        out.append(ds)
    return tuple(out)


def check_schema(cfg: ExperimentConfig, schema) -> None:
    config_io.check(
        cfg.train.k <= schema.list_size, "train.k", f"must not exceed the data's list size {schema.list_size}"
    )


def check_splits(data_dir: str, schema) -> None:
    """Refuses, before any work, a split that is missing or empty, or whose records the schema cannot parse.

    Reads the first record of each split (the whole split only when stats.json does not count it).

    Raises:
        ConfigError: one line naming the split, the file and what is wrong.
    """
    import glob

    import tensorflow as tf

    from dnr_tf import data as data_lib

    sizes = split_sizes(data_dir)
    for split in data_lib.SPLITS:
        files = sorted(glob.glob(data_lib.split_pattern(data_dir, split)))
        if not files:
            raise FileNotFoundError(
                f"no {split}-*.tfrecord.gz in {data_dir}: expected an output of `python -m pipeline.run`"
            )
        first, path = None, None
        for path in files:
            try:
                first = next(iter(tf.data.TFRecordDataset([path], compression_type="GZIP").take(1)), None)
            except tf.errors.OpError as e:
                raise config_io.ConfigError(f"{path} is corrupt: {_first_line(e)}") from None
            if first is not None:
                break
        if first is None or sizes.get(split) == 0:
            raise config_io.ConfigError(
                f"the {split} split of {data_dir} is empty: training needs lists in train, valid and test "
                "(rebuild the data with more lists per user; see the pipeline's stats.json)"
            )
        try:
            tf.io.parse_example(first[None], schema.feature_spec())
        except tf.errors.InvalidArgumentError as e:
            raise config_io.ConfigError(
                f"{path} does not match {data_dir}/schema.json (list_size {schema.list_size}, history_len "
                f"{schema.history_len}): {_first_line(e)}"
            ) from None


def find_corrupt_file(data_dir: str) -> str | None:
    """The first TFRecord file of `data_dir` that does not read to its end (CRC or gzip error), if any."""
    import glob

    import tensorflow as tf

    for path in sorted(glob.glob(os.path.join(data_dir, "*.tfrecord.gz"))):
        try:
            for _ in tf.data.TFRecordDataset([path], compression_type="GZIP"):
                pass
        except tf.errors.OpError:
            return path
    return None


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def check_resume(model_dir: str, data_dir: str, schema) -> None:
    """A run resumed from its backup must see the data it started on: same record shapes and items."""
    from dnr_tf import schema as schema_lib

    if not os.path.exists(os.path.join(model_dir, "backup", "state.json")):
        return
    if os.path.exists(os.path.join(model_dir, schema_lib.SCHEMA_FILE)):
        before = schema_lib.load_schema(model_dir)
        for field in ("list_size", "history_len"):
            if getattr(before, field) != getattr(schema, field):
                raise config_io.ConfigError(
                    f"{data_dir}/schema.json: {field} is {getattr(schema, field)}, but the run in {model_dir} "
                    f"started on data with {field} {getattr(before, field)}; resume it on that data, or train "
                    "in a fresh --model_dir"
                )
    if os.path.exists(os.path.join(model_dir, "item_vocab.txt")) and read_vocab(model_dir) != read_vocab(data_dir):
        raise config_io.ConfigError(
            f"{data_dir}/item_vocab.txt differs from the vocabulary of the run in {model_dir} (its item embeddings "
            "are indexed by it); resume it on the data it started on, or train in a fresh --model_dir"
        )


def resumed_epochs(model_dir: str) -> int:
    """Epochs a run's backup has completed (0 for a fresh run)."""
    from dnr_tf.callbacks import RunBackup

    return RunBackup.completed_epochs(os.path.join(model_dir, "backup"))


def score_calibration(train_ds) -> list[list[float]]:
    """[[a0, b0], [a1, b1]]: a Beta per label fitted by moments to the real x of the train split."""
    import numpy as np

    from dnr_tf.noise import fit_beta

    sums = np.zeros((2, 3))  # per label: count, sum, sum of squares
    for features, labels in train_ds:
        x = features["retriever_scores"].numpy().astype(np.float64)
        y = labels.numpy()
        for z in (0, 1):
            v = x[y == z]
            sums[z] += (len(v), v.sum(), (v * v).sum())
    params = []
    for z in (0, 1):
        n, s1, s2 = sums[z]
        mean = s1 / n
        params.append(list(fit_beta(mean, s2 / n - mean * mean)))
    return params


def train(
    cfg: ExperimentConfig,
    data_dir: str,
    model_dir: str,
    verbose: int | None = None,
    strategy: str = "default",
    cpu_replicas: int = 0,
    overwrite: bool = False,
) -> dict:
    """Trains, picks the best epoch on validation, evaluates it on test; returns `metrics.json`.

    `verbose`: None prints a short line per epoch and progress inside it (`dnr_tf.progress`); an
    integer is Keras' own `fit` verbosity instead (0: silent).

    `strategy`, `cpu_replicas`: see `dnr_tf.distribute`. A worker other than the chief writes its
    files under `<model_dir>/workers/<task>-<index>/` and returns its own copy of the metrics.
    `overwrite`: replace a run already in `model_dir` (`dnr_tf.run_dir`). A finished run with the same
    config is not trained again: its `metrics.json` is returned, with `"already_finished": True`.
    """
    dist = distribute.make_strategy(strategy, cpu_replicas)  # first: before any other TensorFlow work
    chief, worker = distribute.worker_role(strategy)
    if not chief:
        model_dir = os.path.join(model_dir, "workers", worker)
    distributed = strategy != "default"

    import keras

    from dnr_tf import callbacks as cb
    from dnr_tf import progress, run_dir, safe_io
    from dnr_tf import schema as schema_lib
    from dnr_tf.model import NONFINITE_TERMS, SamplerSchedule

    schema = schema_lib.load_schema(data_dir)
    check_schema(cfg, schema)
    check_resume(model_dir, data_dir, schema)  # before the records are read: names the file that differs
    check_splits(data_dir, schema)
    config_io.check_output_dir(model_dir, "--model_dir")
    config_io.check(
        not (distributed and cfg.dnr.generator_warmup_steps),
        "dnr.generator_warmup_steps",
        "is not supported with --strategy (the warm-up runs on one device); set it to 0",
    )
    item_vocab = read_vocab(data_dir)
    config_text = yaml.safe_dump({**config_io.to_dict(cfg), "data_dir": os.path.abspath(data_dir)}, sort_keys=False)
    state = run_dir.prepare(model_dir, yaml.safe_load(config_text), overwrite)
    check_resume(model_dir, data_dir, schema)
    if state == "finished":
        with open(os.path.join(model_dir, "metrics.json")) as f:
            return {**json.load(f), "already_finished": True}
    os.makedirs(model_dir, exist_ok=True)
    # The run is self-contained: export and evaluate need its vocabulary and record shapes.
    for name in ("item_vocab.txt", schema_lib.SCHEMA_FILE):
        safe_io.copy_file(os.path.join(data_dir, name), os.path.join(model_dir, name))
    safe_io.write_text(os.path.join(model_dir, "config.yaml"), config_text)
    backup_dir = os.path.join(model_dir, "backup")

    keras.utils.set_random_seed(cfg.train.seed)  # tf.data mixes the global seed into its shuffles
    one_pass, valid_ds, test_ds = datasets(data_dir, cfg, schema, distributed=distributed)
    calibration = score_calibration(one_pass) if cfg.dnr.heuristic == "calibrated" else None
    pass_len = int(one_pass.cardinality())
    if pass_len <= 0:  # no stats.json: count once
        pass_len = sum(1 for _ in one_pass)
    steps_per_epoch = cfg.train.steps_per_epoch or pass_len
    # The run's epochs, each shuffled by (seed, epoch). A resumed run starts at its next epoch; with
    # `steps_per_epoch` capped (epochs then are not passes), the batches it has done are skipped.
    done = resumed_epochs(model_dir)
    epochs = cfg.train.epochs
    if cfg.train.steps_per_epoch:
        passes = math.ceil(epochs * steps_per_epoch / pass_len) + 1
        stream = datasets(data_dir, cfg, schema, epochs_from=0, epochs=passes, distributed=distributed)[0]
        train_ds = stream.skip(done * steps_per_epoch).repeat()
    else:
        train_ds = datasets(
            data_dir, cfg, schema, epochs_from=done, epochs=max(epochs - done, 1), distributed=distributed
        )[0]
    example = next(iter(train_ds))[0]
    if calibration is not None:
        safe_io.write_json(
            os.path.join(model_dir, "calibration.json"),
            {"beta_given_z0": calibration[0], "beta_given_z1": calibration[1]},
        )
    with dist.scope():  # both models, both optimizers and every counter are the strategy's variables
        model = build_model(cfg, item_vocab, schema, example, calibration)
    monitor = f"val_{cfg.train.monitor}"
    best = cb.BestWeights(model_dir, monitor)
    backup = cb.RunBackup(backup_dir, best)  # first: it restores the model and owns the best epoch
    heuristic_epochs = cfg.dnr.lambda_e if cfg.dnr.model_based else 10**9
    # A model-based phase gets `patience` epochs after the switch before an early stop may end it.
    switches = model.generator is not None and cfg.dnr.lambda_e < epochs
    early = cb.EarlyStop(backup_dir, monitor, cfg.train.patience, (cfg.dnr.lambda_e + cfg.train.patience) * switches)
    warmup = None
    if model.warmup_done is not None:
        warmup_batches = datasets(data_dir, cfg, schema, epochs_from=cfg.dnr.lambda_e, epochs=1)[0]
        warmup = cb.GeneratorWarmup(
            warmup_batches, cfg.dnr.generator_warmup_steps, cfg.dnr.lambda_e, seed=cfg.train.seed + 2000
        )
    callbacks = [
        backup,
        SamplerSchedule(heuristic_epochs),
        *([warmup] if warmup else []),
        cb.NonFiniteGuard(cfg.train.on_nonfinite),
        early,  # after RunBackup: it reads the history the backup restores
        keras.callbacks.TensorBoard(os.path.join(model_dir, "logs"), histogram_freq=0),
        cb.ScoreHistograms(os.path.join(model_dir, "logs", "scores"), example, next(iter(train_ds))[1]),
    ]
    if verbose is None and chief:
        callbacks.append(progress.EpochLine(cfg.train.epochs, monitor, steps_per_epoch))
    start = time.time()
    model.fit(
        train_ds,
        validation_data=valid_ds,
        epochs=early.epochs_to_run(cfg.train.epochs),
        callbacks=callbacks,
        verbose=verbose or 0,
        steps_per_epoch=steps_per_epoch,
    )
    wall = time.time() - start

    # Optimizer step counts of the whole run (restoring the best epoch's weights rewinds them).
    steps = {
        "reranker": int(model.optimizer.iterations.numpy()),
        "generator": int(model.generator_optimizer.iterations.numpy()) if model.generator_optimizer else 0,
        "generator_warmup": int(model.warmup_done.numpy()) if warmup else 0,
    }
    # Before the restore below, which rewinds the warm-up's step count too when the best epoch came first.
    warmup_summary = warmup.summary() if warmup else None
    skipped = int(model.skipped_steps.numpy())
    nonfinite = dict(zip(NONFINITE_TERMS, (int(v) for v in model.nonfinite_counts.numpy())))
    # The last epoch's sampler, as in an uninterrupted run, also for a resume that had no epoch left.
    model.set_sampler_phase(backup.epoch > heuristic_epochs)
    best.restore(model)
    valid = _evaluate(model, valid_ds)
    test = _evaluate(model, test_ds)
    result = {
        "name": cfg.name,
        "k": cfg.train.k,
        "best_epoch": best.best_epoch,
        "epochs_run": early.epochs_run,
        "max_epochs": cfg.train.epochs,
        "stopped_early": early.stopped_early,
        "patience": cfg.train.patience,
        "monitor": monitor,
        "valid": valid,
        "test": test,
        "seconds_per_epoch": backup.seconds,
        "train_seconds": wall,
        "steps": steps,
        "calibration": calibration,
        "generator_warmup": warmup_summary,
        "skipped_steps": skipped,
        "nonfinite_counts": nonfinite,
        "strategy": {"name": strategy, "replicas": int(dist.num_replicas_in_sync), "chief": chief},
        "history": backup.history,  # every epoch's, a resumed run's included (kept in the backup)
        "resumed_after": backup.resumed_after,  # [] for a run never interrupted
    }
    safe_io.write_json(os.path.join(model_dir, "metrics.json"), result, indent=2)
    run_dir.finish(model_dir)
    return result


def _evaluate(model, ds) -> dict:
    logs = model.evaluate(ds, verbose=0, return_dict=True)
    return {k: float(v) for k, v in logs.items()}


def print_table(result: dict) -> None:
    k = result.get("k", 6)
    keys = (f"hit@{k}", f"ndcg@{k}", f"map@{k}", f"f1@{k}", "auc")
    print(f"best epoch {result['best_epoch']} by {result['monitor']}")
    print(f"{'split':6s} " + " ".join(f"{k:>8s}" for k in keys))
    for split in ("valid", "test"):
        print(f"{split:6s} " + " ".join(f"{result[split].get(k, float('nan')):8.4f}" for k in keys))
    secs = result["seconds_per_epoch"]
    if len(secs) > 1:
        steady = sorted(secs[1:])[len(secs[1:]) // 2]
        first = f"the first, with start-up: {secs[0]:.1f}"
        print(f"seconds per epoch: median {steady:.1f} over epochs 2-{len(secs)} ({first})")
    elif secs:
        print(f"seconds per epoch: {secs[0]:.1f} (one epoch, start-up included)")


def main(argv=None) -> int:
    quiet.configure(quiet.verbose_flag(argv))  # before TensorFlow is imported
    try:
        cfg, data_dir, model_dir, export_dir, dist = parse_args(argv)
        from dnr_tf.progress import phase_warning  # imports Keras, so after quiet.configure

        if warning := phase_warning(cfg):
            print(warning, file=sys.stderr, flush=True)
        result = train(cfg, data_dir, model_dir, **dist)
    except (config_io.ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, say: one line, and the same command resumes once there is space
        print(f"error: {e}; the same command resumes the run from its last completed epoch", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a NonFiniteLoss gets its one line; anything else its traceback
        if type(e).__name__ == "DataLossError":  # a CRC or gzip error while training: name the file
            corrupt = find_corrupt_file(data_dir)
            print(f"error: {corrupt or data_dir} is corrupt (CRC or gzip error): {_first_line(e)}", file=sys.stderr)
            return 2
        if type(e).__name__ != "NonFiniteLoss":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 3
    print_table(result)
    if result.get("already_finished"):
        print(f"{model_dir} already holds this run, finished; nothing trained (--overwrite trains it again)")
    if not result["strategy"]["chief"]:
        print(f"worker's copy of the run written under {model_dir}/workers/; the chief writes the run and exports")
        return 0
    print(f"run written to {model_dir}/ (metrics.json, best.weights.h5, logs/ for TensorBoard)")
    if export_dir is not None:
        from dnr_tf.export import export_run

        print(f"exported to {export_run(model_dir, export_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
