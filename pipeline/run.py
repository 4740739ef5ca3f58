"""`python -m pipeline.run`: interactions or logged lists -> candidate-list TFRecords.

Example:
    python -m pipeline.run --source movielens --input ../shared/data/ml-100k/u.data \\
        --output_dir data/ml100k --direct_num_workers 2 --direct_running_mode multi_processing

Arguments this module does not know are Beam pipeline options and pass through untouched, so
`--runner FlinkRunner ...` or `--runner DataflowRunner --project ... --temp_location ...` run the
same code elsewhere. Writes `train|valid|test-*.tfrecord.gz`, `schema.json`, `stats.json`,
`schema.pbtxt`, `item_vocab.txt`, `user_vocab.txt`, `rejects-*.jsonl`, `retriever/` and `manifest.json`
(the list of them) into `--output_dir`. The run builds beside it and publishes only on success, under a
lock; it never removes a file its manifest does not list (`pipeline.publish`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

from dnr_tf import config_io, config_keys, quiet, tfmd
from dnr_tf import schema as S
from pipeline.config import SOURCES, PipelineConfig, retrained_kind

log = logging.getLogger("pipeline")


class PipelineError(RuntimeError):
    """A run that cannot produce a sound data set; the message says why."""


def parse_args(argv=None) -> tuple[PipelineConfig, str, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.run",
        description="Build candidate-list TFRecords from interactions or logged lists. "
        "Unknown arguments are Apache Beam pipeline options (e.g. --runner, --direct_num_workers).",
    )
    parser.add_argument("--source", choices=SOURCES, help="input kind (default: the config's, else synthetic)")
    parser.add_argument("--input", help="input file, glob or directory (TFDS name for --source tfds)")
    parser.add_argument("--output_dir", required=True, help="where the data set is written")
    parser.add_argument("--config", help="YAML file of PipelineConfig values")
    parser.add_argument("--protocol", choices=("cascade", "paper"), help="list construction (default cascade)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's and Beam's own logs too")
    parser.add_argument(
        "--list_keys",
        action=config_keys.list_keys_action(PipelineConfig),
        help="print every config key (for --set) with its default and meaning, and exit",
    )
    args, beam_args = parser.parse_known_args(argv)
    data = config_io.load_yaml(args.config) if args.config else {}
    for key in ("source", "input", "protocol"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    data = config_io.apply_overrides(data, args.set)
    cfg = config_io.from_dict(PipelineConfig, data)
    return cfg, args.output_dir, beam_args


def check_beam_args(beam_args: list[str] | None) -> None:
    """Refuses, before any work, the Beam options under which this pipeline's data was seen to go wrong.

    The DirectRunner's `multi_threading` mode (Beam 2.77) lost users in the k-core of an ML-1M-size
    input (49,720 lists became 48,730 in one run; 75 of 6,000 users gone, and 9 in another) and
    crashed in others ("Invalid PaneInfoEncoding", "Error decoding input stream"); a pipeline of Beam
    alone (docs/scaling/beam_multi_threading_repro.py) crashed the same way in that mode and not in
    one process (docs/scaling.md). One worker, or `multi_processing`, gives the same records run
    after run.
    """
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

    if PipelineOptions(beam_args or []).view_as(DirectOptions).direct_running_mode == "multi_threading":
        raise PipelineError(
            "--direct_running_mode multi_threading: the DirectRunner in that mode lost or garbled elements of this "
            "pipeline (users missing after the k-core, decoding errors; docs/scaling.md), so it is refused; for two "
            "local workers use --direct_num_workers 2 --direct_running_mode multi_processing"
        )


def check_reject_share(stats: dict, cfg: PipelineConfig, output_dir: str) -> None:
    """Fails the run, removing its TFRecords, when more than `max_reject_share` of the records is rejected."""
    import tensorflow as tf

    rejects = stats.get("rejects", {})
    rejected = sum(rejects.values())
    counts = stats.get("counts", {})
    read = counts.get("interactions_read", counts.get("lists_read", 0))
    total = read + counts.get("rejected_at_read", 0)
    if not rejected or not total or rejected / total <= cfg.max_reject_share:
        return
    for pattern in ("train-*", "valid-*", "test-*"):
        for path in tf.io.gfile.glob(os.path.join(output_dir, pattern)):
            tf.io.gfile.remove(path)
    _write_json(os.path.join(output_dir, "stats.json"), stats)
    _remove_work(output_dir)
    top = ", ".join(f"{key} {n}" for key, n in sorted(rejects.items(), key=lambda kv: -kv[1])[:3])
    raise PipelineError(
        f"{rejected} of {total} input records ({rejected / total:.1%}) were rejected, above "
        f"max_reject_share={cfg.max_reject_share:g}, so no TFRecords were written: the data set would be skewed. "
        f"Most frequent reasons: {top}. Every rejected record is in {output_dir}/rejects-*.jsonl with its file, "
        f"line and reason. Fix the input, or accept the share with --set max_reject_share=..."
    )


def check_splits(stats: dict) -> None:
    """Fails the run when a split has no list: training needs all three, and its vocabulary is train's."""
    splits = stats.get("splits", {})
    empty = [s for s in ("train", "valid", "test") if not splits.get(s, {}).get("lists")]
    if empty:
        sizes = ", ".join(f"{s} {splits.get(s, {}).get('lists', 0)}" for s in ("train", "valid", "test"))
        raise PipelineError(
            f"the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty (lists: {sizes}): "
            "each user's last list goes to test, the one before to valid and the rest to train, so only users "
            "with 3 or more lists reach every split; give users more lists (more requests per user), or more users"
        )


def _read_lines(pattern: str) -> list[str]:
    import tensorflow as tf

    lines = []
    for path in sorted(tf.io.gfile.glob(pattern)):
        with tf.io.gfile.GFile(path) as f:
            lines.extend(line for line in f.read().splitlines() if line.strip())
    return lines


def _interaction_reader(cfg: PipelineConfig):
    """The read step of an interaction source, after checking the input exists and is readable."""
    import apache_beam as beam

    from pipeline.sources import files, interactions

    if cfg.source == "tfds":
        from pipeline.sources.tfds_source import DEFAULT_NAME, prepare, read_tfds

        name = cfg.input or DEFAULT_NAME
        prepare(name, cfg.tfds_data_dir)

        class ReadTfds(beam.PTransform):
            def expand(self, pbegin):
                return (
                    pbegin
                    | "Name" >> beam.Create([name])
                    | "Load"
                    >> beam.ParDo(files.TagRejects(read_tfds, cfg.tfds_data_dir)).with_outputs(
                        files.REJECTS, main="records"
                    )
                )

        return ReadTfds()
    if cfg.source == "movielens":
        path = interactions.resolve_movielens_input(cfg.input)
        paths = files.expand_input(path)
        if cfg.movielens_format == "auto":
            for p in paths:
                interactions.detect_movielens_format(p)
        return files.ReadNumbered(path, interactions.parse_movielens(cfg.movielens_format))
    if cfg.source == "sequences":
        from pipeline.sources.sequences import ReadSequences

        return ReadSequences(cfg.input)
    reader = files.ReadNumbered(cfg.input, interactions.parse_csv)
    for p in files.expand_input(cfg.input):
        _check_csv_header(p)
    return reader


def _check_csv_header(path: str) -> None:
    from pipeline.sources import files, interactions

    for number, text, bad in files.numbered_lines(path):
        if text is None:
            raise PipelineError(f"{path}:{number}: {bad}")
        gen = interactions.parse_csv(path, iter([(number, text, None)]))
        try:
            list(gen)
        except ValueError as e:
            raise PipelineError(str(e)) from None
        return
    raise PipelineError(f"{path} is empty: expected a CSV header naming user_id,item_id,timestamp")


def _lists_reader(cfg: PipelineConfig):
    import apache_beam as beam

    from pipeline.sources import files
    from pipeline.sources.files import REJECTS

    if cfg.source == "logged":
        from pipeline.sources.logged import parse_logged

        return files.ReadNumbered(cfg.input, parse_logged(cfg.list_size))

    from pipeline.sources.synthetic import World, simulate_user

    synthetic, seed, list_size = cfg.synthetic, cfg.seed, cfg.list_size
    retrained_seed = cfg.retrained.seed if cfg.retrained.enabled else None

    class Simulate(beam.DoFn):
        def setup(self):
            self._world = World(synthetic, seed, retrained_seed)

        def process(self, user):
            for rec in simulate_user(self._world, user, list_size):
                yield rec, ("synthetic", 0)

    class ReadSynthetic(beam.PTransform):
        def expand(self, pbegin):
            return (
                pbegin
                | "Users" >> beam.Create(list(range(1, synthetic.num_users + 1)))
                | "Reshuffle" >> beam.Reshuffle()
                | "Simulate" >> beam.ParDo(Simulate()).with_outputs(REJECTS, main="records")
            )

    return ReadSynthetic()


def _run_beam(build, beam_args: list[str], name: str) -> float:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline import beam_speed

    beam_speed.install()
    print(f"[pipeline] {name} ...", flush=True)
    start = time.time()
    options = PipelineOptions(beam_args)
    with beam.Pipeline(options=options) as p:
        build(p)
    seconds = time.time() - start
    print(f"[pipeline] {name}: done in {seconds:.1f}s", flush=True)
    return seconds


def _print_counts(stats: dict) -> None:
    """One progress line with what the stage just counted."""
    counts, rejected = stats.get("counts", {}), sum(stats.get("rejects", {}).values())
    if "interactions_after_kcore" in counts:
        print(
            f"[pipeline]   {counts.get('interactions_read', 0)} interactions read, {rejected} rejected, "
            f"{counts['interactions_after_kcore']} after the k-core filter ({counts.get('users_after_kcore')} users, "
            f"{counts.get('items_after_kcore')} items)",
            flush=True,
        )
    splits = stats.get("splits", {})
    if splits:
        built = ", ".join(f"{s} {splits[s].get('lists', 0)}" for s in ("train", "valid", "test") if s in splits)
        dropped = stats.get("lists", {}).get("dropped_no_positive", 0)
        print(f"[pipeline]   lists: {built}; {dropped} without positive dropped", flush=True)


def run(argv=None) -> dict:
    """Runs the whole pipeline; returns the stats that it also writes to `stats.json`."""
    cfg, output_dir, beam_args = parse_args(argv)
    return run_config(cfg, output_dir, beam_args)


def run_config(cfg: PipelineConfig, output_dir: str, beam_args: list[str] | None = None) -> dict:
    """Runs the pipeline for a resolved config (what `run` does after parsing arguments).

    Under `output_dir`'s lock, builds into a staging directory beside it and publishes only on
    success; a failed run leaves `output_dir` as it was (`pipeline.publish`).
    """
    import shutil

    from pipeline import publish

    config_io.check_output_dir(output_dir, "--output_dir")  # a file, or not writable: one line, before any work
    check_beam_args(beam_args)
    try:
        publish.check_output(output_dir)
        lock = publish.acquire(output_dir)
    except publish.OutputError as e:
        raise PipelineError(str(e)) from None
    staging = publish.staging_path(output_dir)
    try:
        publish.clean_stale(output_dir)
        os.makedirs(staging)
        try:
            stats = _build(cfg, staging, beam_args)
        except BaseException as e:
            kept = publish.keep_for_debugging(staging, output_dir, str(e)) if os.path.isdir(staging) else None
            if isinstance(e, PipelineError):  # its message names the files kept for the user
                raise PipelineError(str(e).replace(staging, kept or output_dir)) from None
            raise
        publish.publish(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        publish.release(lock)
    print_summary(stats, output_dir)
    return stats


def _build(cfg: PipelineConfig, output_dir: str, beam_args: list[str] | None = None) -> dict:
    """The pipeline proper, writing into `output_dir` (the staging directory of `run_config`)."""
    from pipeline import retriever as mf
    from pipeline import stages
    from pipeline import stats as stats_lib

    beam_args = list(beam_args or [])
    config_io.check_output_dir(output_dir, "--output_dir")
    start = time.time()
    interactions = cfg.source in ("movielens", "csv", "tfds", "sequences")
    reader = _interaction_reader(cfg) if interactions else _lists_reader(cfg)
    has_oracle = cfg.source == "synthetic"
    has_retrained = cfg.retrained.enabled
    schema = S.RecordSchema(
        list_size=cfg.list_size, history_len=cfg.history_len, has_oracle=has_oracle, has_retrained=has_retrained
    )
    timings = {}
    print(f"[pipeline] source={cfg.source} protocol={cfg.protocol} -> {output_dir}", flush=True)
    stats: dict = {"config": config_io.to_dict(cfg)}
    if interactions:
        timings["stage1_seconds"] = _run_beam(
            lambda p: stages.interactions_stage(p, reader, cfg, output_dir),
            beam_args,
            "stage 1 (read, validate, k-core)",
        )
        stats_lib.merge_into(stats, _read_lines(stages.work_path(output_dir, "stats-stage1*")))
        _print_counts(stats)
        check_reject_share(stats, cfg, output_dir)
        counts = stats.get("counts", {})
        if not counts.get("interactions_after_kcore"):
            raise PipelineError(
                f"no interaction survives: {counts.get('interactions_read', 0)} read, "
                f"{counts.get('rejected_at_read', 0)} rejected, none left after the {cfg.min_count}-core filter "
                f"(see {output_dir}/rejects-*.jsonl)"
            )
        if stats.get("kcore", {}).get("items_below_min_count_after_last_pass", 0):
            raise PipelineError(
                f"the {cfg.min_count}-core filter did not reach its fixed point in {cfg.kcore_max_iters} passes: "
                f"raise kcore_max_iters (--set kcore_max_iters=...)"
            )
        users = sorted(int(x) for x in _read_lines(stages.work_path(output_dir, "users-*")))
        items = sorted(int(x) for x in _read_lines(stages.work_path(output_dir, "items-*")))
        kind = cfg.retriever.kind
        print(
            f"[pipeline] training the {kind} retriever on {stats['retriever']['window_train_interactions']} "
            f"interactions ({len(users)} users, {len(items)} items)",
            flush=True,
        )
        t0 = time.time()
        window = stages.work_path(output_dir, "window-train-*")
        evals = {name: stages.work_path(output_dir, f"window-{name}-*") for name in ("heldout", "future")}
        retriever_dir = os.path.join(output_dir, "retriever")
        metrics = mf.train_and_save(cfg.retriever, window, evals, users, items, cfg.seed, retriever_dir)
        timings["retriever_seconds"] = time.time() - t0
        stats["retriever"].update(kind=kind, auc_heldout=metrics["auc_heldout"], auc_future=metrics["auc_future"])
        if "candidates" in metrics:  # mf_item2item: the AUCs above are of x (item-to-item), these of MF
            cand = metrics["candidates"]
            stats["retriever"]["candidates"] = {
                "kind": cand["kind"],
                "auc_heldout": cand["auc_heldout"],
                "auc_future": cand["auc_future"],
            }
        print(
            f"[pipeline] retriever AUC: {metrics['auc_heldout']:.4f} on held-out window pairs, "
            f"{metrics['auc_future']:.4f} on the request period",
            flush=True,
        )
        retrained_dir = None
        if cfg.retrained.enabled:
            t0 = time.time()
            retrained_dir = os.path.join(output_dir, "retriever", "retrained")
            keep = (cfg.retrained.seed, cfg.retrained.keep_fraction)
            seed = cfg.retrained.seed
            again_cfg = dataclasses.replace(cfg.retriever, kind=retrained_kind(kind))
            again = mf.train_and_save(again_cfg, window, evals, users, items, seed, retrained_dir, keep)
            timings["retrained_seconds"] = time.time() - t0
            stats["retriever"]["retrained"] = {
                "seed": cfg.retrained.seed,
                "keep_fraction": cfg.retrained.keep_fraction,
                "auc_heldout": again["auc_heldout"],
                "auc_future": again["auc_future"],
            }
        timings["stage2_seconds"] = _run_beam(
            lambda p: stages.lists_stage(p, cfg, output_dir, retriever_dir, schema, retrained_dir),
            beam_args,
            "stage 2 (candidates, labels, split, TFRecords)",
        )
        stats_lib.merge_into(stats, _read_lines(stages.work_path(output_dir, "stats-stage2*")))
        _print_counts({"splits": stats.get("splits", {}), "lists": stats.get("lists", {})})
    else:
        timings["stage_seconds"] = _run_beam(
            lambda p: stages.logged_stage(p, reader, cfg, output_dir, schema, dedupe=cfg.source == "logged"),
            beam_args,
            "lists (read, validate, split, TFRecords)",
        )
        stats_lib.merge_into(stats, _read_lines(stages.work_path(output_dir, "stats*")))
        _print_counts(stats)
        check_reject_share(stats, cfg, output_dir)

    splits = stats.get("splits", {})
    if not any(splits.get(s, {}).get("lists") for s in ("train", "valid", "test")):
        raise PipelineError(f"the run produced no list (see {output_dir}/stats.json and rejects-*.jsonl)")
    check_splits(stats)
    item_vocab = sorted(int(x) for x in _read_lines(stages.work_path(output_dir, "vocab-items*")))
    user_vocab = sorted(int(x) for x in _read_lines(stages.work_path(output_dir, "vocab-users*")))
    _write_lines(os.path.join(output_dir, "item_vocab.txt"), item_vocab)
    _write_lines(os.path.join(output_dir, "user_vocab.txt"), user_vocab)
    schema = S.RecordSchema(
        list_size=cfg.list_size,
        history_len=cfg.history_len,
        has_oracle=has_oracle,
        has_retrained=has_retrained,
        num_items=len(item_vocab),
        num_users=len(user_vocab),
    )
    S.write_schema(schema, output_dir)
    kind = cfg.retriever.kind if interactions else cfg.source
    stats["retrievers"] = stats_lib.retriever_summary(stats, kind, has_retrained)
    tfmd.write_tfmd(schema, output_dir)  # the same contract as a tensorflow_metadata Schema (TFX, TFDV)
    timings["total_seconds"] = time.time() - start
    stats["timings"] = timings
    _write_json(os.path.join(output_dir, "stats.json"), stats)
    _remove_work(output_dir)
    return stats


def _write_lines(path: str, values) -> None:
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "w") as f:
        f.write("".join(f"{v}\n" for v in values))


def _write_json(path: str, obj) -> None:
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")


def _remove_work(output_dir: str) -> None:
    import tensorflow as tf

    from pipeline.stages import WORK

    path = os.path.join(output_dir, WORK)
    if tf.io.gfile.exists(path):
        tf.io.gfile.rmtree(path)


def print_summary(stats: dict, output_dir: str) -> None:
    """A short table of what was built: lists per split and the order baselines on test."""
    k = stats["config"]["k"]
    print(f"[pipeline] wrote {output_dir}/ (stats.json, schema.json, schema.pbtxt, *.tfrecord.gz)")
    counts = stats.get("counts", {})
    if "interactions_after_kcore" in counts:
        print(
            f"  interactions: {counts.get('interactions_read', 0)} read, {counts['interactions_after_kcore']} "
            f"after {stats['config']['min_count']}-core ({counts.get('users_after_kcore')} users, "
            f"{counts.get('items_after_kcore')} items)"
        )
    rejected = sum(v for v in stats.get("rejects", {}).values())
    print(f"  rejected records: {rejected}")
    lists = stats.get("lists", {})
    if lists:
        dropped = lists.get("dropped_no_positive", 0)
        kept = sum(s.get("lists", 0) for s in stats.get("splits", {}).values())
        # Interaction sources count requests; logged and synthetic lists arrive as lists (counts.lists_read).
        requests = lists.get("requests", counts.get("lists_read"))
        made = f"{requests} requests, " if "requests" in lists else f"{requests} lists read, " if requests else ""
        print(f"  lists: {made}{dropped} without positive dropped, {kept} kept")
    ret, rand = f"ret ndcg@{k}", f"rand ndcg@{k}"
    print(f"  {'split':6s} {'lists':>6s} {'pos/list':>8s} {ret:>12s} {rand:>13s} {'score auc':>9s}")
    for split in ("train", "valid", "test"):
        s = stats.get("splits", {}).get(split, {})
        if not s:
            continue
        print(
            f"  {split:6s} {s.get('lists', 0):6d} {s.get('positives_per_list', float('nan')):8.2f} "
            f"{s.get('retriever_order', {}).get(f'ndcg@{k}', float('nan')):12.4f} "
            f"{s.get('random_order', {}).get(f'ndcg@{k}', float('nan')):13.4f} "
            f"{s.get('retriever_score_auc', float('nan')):9.4f}"
        )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = quiet.verbose_flag(argv)
    quiet.configure(verbose)  # before TensorFlow and Beam are imported
    try:
        with quiet.worker_stderr_filtered(verbose):
            run(quiet.beam_args(argv, verbose))
    except (config_io.ConfigError, PipelineError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
