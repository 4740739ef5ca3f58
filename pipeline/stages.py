"""The Beam stages of the pipeline, as functions that add labelled steps to a `beam.Pipeline`.

interactions (movielens, csv, tfds):
    stage 1  read -> validate -> per-user timelines (dedupe) -> k-core -> timelines, retriever
             window, vocabularies                                   [then the driver trains MF]
    stage 2  timelines + MF tables -> candidates, scores, labels -> split -> TFRecords
lists (logged, synthetic):
    one stage: read -> validate -> dedupe request ids -> per-user split -> TFRecords
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import pickle
import re
import struct

import apache_beam as beam
from apache_beam.metrics import Metrics

from dnr_tf import schema as S
from pipeline import protocol, sinks, stats
from pipeline.config import MF_CANDIDATES, PipelineConfig, retrained_kind
from pipeline.protocol import Interaction, stable_fraction
from pipeline.sources import files
from pipeline.sources.files import REJECTS, reject

WINDOW_SPLITS = ("train", "heldout", "future")  # the retriever's window files (`write_window`)
RECORD_SPLITS = ("train", "valid", "test")  # the TFRecord splits (`write_lists`), dnr_tf.data.SPLITS

WORK = "_work"
_rejected = Metrics.counter("dnr_tf", "rejected_records")


def work_path(output_dir: str, name: str) -> str:
    return os.path.join(output_dir, WORK, name)


# --- stage 1: interactions -> timelines --------------------------------------------------------


class InteractionCoder(beam.coders.Coder):
    """Encodes an `Interaction` as its five numbers (int64 and float64, little-endian) and its file name.

    Beam's default coder pickles each NamedTuple with its class path: about 4 us an interaction to
    encode and decode, against about 1 us here, paid twice per interaction in stage 1 (the group by
    user, and the timelines that a side input makes the runner materialise). Deterministic: the
    same interaction, the same bytes. A number beyond int64 (no source validates one through) is
    pickled instead, behind its own tag byte.
    """

    _NUMBERS = struct.Struct("<qqqdq")

    def encode(self, r: Interaction) -> bytes:
        try:
            numbers = self._NUMBERS.pack(r.user, r.item, r.timestamp, r.rating, r.line)
        except struct.error:
            return b"\x01" + pickle.dumps(tuple(r), protocol=4)
        return b"\x00" + numbers + str(r.file).encode("utf-8", "surrogatepass")

    def decode(self, encoded: bytes) -> Interaction:
        if encoded[0] == 1:
            return Interaction(*pickle.loads(encoded[1:]))
        user, item, timestamp, rating, line = self._NUMBERS.unpack_from(encoded, 1)
        return Interaction(
            user, item, timestamp, rating, encoded[1 + self._NUMBERS.size :].decode("utf-8", "surrogatepass"), line
        )

    def is_deterministic(self) -> bool:
        return True

    def to_type_hint(self):
        return Interaction


beam.coders.registry.register_coder(Interaction, InteractionCoder)
# Beam's own type hints: a builtin `tuple[...]` hint gets its generic pickling coder.
KeyedInteraction = beam.typehints.Tuple[int, Interaction]
TimelineType = beam.typehints.Tuple[int, beam.typehints.List[Interaction]]


def _timeline_json(user: int, timeline) -> str:
    return json.dumps({"user": user, "items": [r.item for r in timeline], "ts": [r.timestamp for r in timeline]})


def timeline_from_json(line: str) -> tuple[int, list[Interaction]]:
    obj = json.loads(line)
    return obj["user"], [Interaction(obj["user"], i, t, float("nan")) for i, t in zip(obj["items"], obj["ts"])]


class _OrderTimeline(beam.DoFn):
    """Sorts a user's interactions by time; a repeated item is rejected, its first kept."""

    def process(self, kv):
        user, interactions = kv
        kept, dups = protocol.order_timeline(list(interactions))
        first = {}
        for r in kept:
            first[r.item] = r
        for d in dups:
            f = first[d.item]
            yield beam.pvalue.TaggedOutput(
                REJECTS,
                reject(
                    d.file,
                    d.line,
                    f"duplicate interaction of user {user} with item {d.item} (kept the first, {f.file}:{f.line})",
                    f"{d.user}|{d.item}|{d.timestamp}",
                ),
            )
        yield user, kept


def _kcore_pass(kv, rare, min_count):
    """A user's items less the `rare` ones (counted fewer than `min_count` times by the pass), if
    `min_count` remain. Once the passes have converged, `rare` is empty and a user passes as is."""
    user, items = kv
    kept = tuple(i for i in items if i not in rare) if rare else items
    if len(kept) >= min_count:
        yield user, kept


def _rare_items(counts: dict, min_count: int) -> frozenset:
    return frozenset(i for i, n in counts.items() if n < min_count)


def _kcore_keep(kv, final_counts, min_count):
    """A user's timeline restricted to the items of the final pass, if it keeps `min_count` of them.

    The same as running every pass on the whole timeline: an item's count can only fall from one
    pass to the next, so the kept item sets shrink and the last one (its items are those with a
    final count) holds every item a surviving user kept; and a user the passes dropped has fewer
    than `min_count` of them.
    """
    user, timeline = kv
    kept = [r for r in timeline if r.item in final_counts]
    if len(kept) >= min_count:
        yield user, kept


class _ItemCounts(beam.CombineFn):
    """{item: interactions} over (user, items) elements: one Counter a bundle, merged."""

    def create_accumulator(self):
        return collections.Counter()

    def add_input(self, counts, kv):
        counts.update(kv[1])
        return counts

    def merge_accumulators(self, accumulators):
        merged = collections.Counter()
        for counts in accumulators:
            merged.update(counts)
        return merged

    def extract_output(self, counts):
        return dict(counts)


def kcore(timelines, min_count: int, iters: int, stat_parts: list):
    """Users and items with at least `min_count` interactions, iterated `iters` passes.

    The passes run on each user's item ids only, a tuple of ints (Beam encodes it without pickling
    an Interaction per item: on a 1M-interaction input, the passes pickled ~10M of them). Each pass
    counts items (a combiner of per-bundle counters, then a side input of O(items)), drops rare items
    from every user and then users left with too few. The full timelines are then filtered once by
    the last pass's items (`_kcore_keep`). After the last pass, the number of items still below the
    threshold is reported: the driver fails the run if it is not 0 (the fixed point was not
    reached). Returns the timelines and the final (item, count) pairs.
    """
    items = timelines | "KCoreItemIds" >> beam.Map(lambda kv: (kv[0], tuple(r.item for r in kv[1])))
    # The counts have no default element: an empty input reads the side inputs' defaults instead,
    # which saves each global combine the two stages that would inject one.
    for it in range(iters):
        counts = items | f"KCoreCount{it}" >> beam.CombineGlobally(_ItemCounts()).without_defaults()
        rare = counts | f"KCoreRare{it}" >> beam.Map(_rare_items, min_count)
        items = items | f"KCorePass{it}" >> beam.FlatMap(
            _kcore_pass, rare=beam.pvalue.AsSingleton(rare, default_value=frozenset()), min_count=min_count
        )
        stat_parts.append(
            stats.total(items, f"kcore.interactions_after_pass.{it + 1}", f"KCoreSize{it}", lambda kv: len(kv[1]))
        )
    final = items | "FinalCount" >> beam.CombineGlobally(_ItemCounts()).without_defaults()
    unconverged = "kcore.items_below_min_count_after_last_pass"
    stat_parts.append(
        stats.Summed(
            final
            | "Unconverged" >> beam.Map(lambda counts: (unconverged, sum(int(n < min_count) for n in counts.values()))),
            unconverged,
        )
    )
    kept = timelines | "KCoreKeep" >> beam.FlatMap(
        _kcore_keep, final_counts=beam.pvalue.AsSingleton(final, default_value={}), min_count=min_count
    ).with_output_types(TimelineType)
    final_counts = final | "FinalItems" >> beam.FlatMap(lambda counts: sorted(counts.items()))
    return kept, final_counts


def _window_pairs(kv, cfg: PipelineConfig):
    """The retriever's training interactions of one user, tagged train / heldout by a stable hash.

    Each `user<TAB>item` line goes to the window file its stable hash picks (`write_window`); one
    element, `((split, shard), lines)`, is emitted per (split, file) and user, holding that user's
    lines, not one per line.
    """
    user, timeline = kv
    if cfg.protocol == "cascade":
        w = protocol.retriever_window_size(len(timeline), cfg.retriever_fraction)
        window, future = timeline[:w], timeline[w:]
    else:
        inside = [stable_fraction(cfg.seed, "paper", user, r.item) < cfg.paper_retriever_fraction for r in timeline]
        window = [r for r, i in zip(timeline, inside) if i]
        future = [r for r, i in zip(timeline, inside) if not i]
    shards, seed = cfg.retriever.window_shards, cfg.seed
    groups: dict[tuple[str, int], list[str]] = {}
    for r in window:
        held = stable_fraction(cfg.seed, "heldout", user, r.item) < cfg.retriever.holdout_fraction
        line = f"{user}\t{r.item}"
        groups.setdefault(("heldout" if held else "train", _window_shard(seed, shards, line)), []).append(line)
    # Interactions the retriever never saw (the request period): its AUC where it is used.
    for r in future:
        line = f"{user}\t{r.item}"
        groups.setdefault(("future", _window_shard(seed, shards, line)), []).append(line)
    yield from groups.items()


def _window_shard(seed: int, shards: int, line: str) -> int:
    return int(stable_fraction(seed, "shard", line) * shards)


class _WriteSortedShard(beam.DoFn):
    """Writes one shard of window pairs, in a stable pseudo-random order, as a gzip TSV file.

    The content of every file depends only on the pairs and the seed, not on which worker wrote
    which line, so the retriever that streams the files in name order is the same on every runner
    and worker count. A retried bundle rewrites the same bytes.
    """

    def __init__(self, prefix: str, shards: int, seed: int):
        self._prefix, self._shards, self._seed = prefix, shards, seed

    def process(self, kv):
        from apache_beam.io.filesystem import CompressionTypes
        from apache_beam.io.filesystems import FileSystems

        (split, shard), groups = kv
        lines = sorted(
            (line for lines in groups for line in lines),
            key=lambda line: (stable_fraction(self._seed, "order", line), line),
        )
        path = f"{self._prefix}-{split}-{shard:05d}-of-{self._shards:05d}.tsv.gz"
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            # Level 1: as small as level 9 on these lines of ids (measured), and about 15x faster.
            f.write(gzip.compress(("\n".join(lines) + "\n").encode(), compresslevel=1, mtime=0))
        yield len(lines)


def write_window(pcoll, cfg: PipelineConfig, prefix: str):
    """((split, file), lines) groups (`_window_pairs`) into `window_shards` files a split of
    `user<TAB>item` lines, `<prefix>-<split>-SSSSS-of-NNNNN.tsv.gz`: one GroupByKey for the three."""
    shards, seed = cfg.retriever.window_shards, cfg.seed
    return (
        pcoll
        | "GroupWindowShard" >> beam.GroupByKey()
        | "WriteWindowShard" >> beam.ParDo(_WriteSortedShard(prefix, shards, seed))
    )


def interactions_stage(p, read, cfg: PipelineConfig, output_dir: str) -> None:
    """Stage 1. `read` is a PTransform giving Interactions and a `rejects` output."""
    parsed = p | "ReadInteractions" >> read
    stat_parts = [
        stats.count(parsed.records, "counts.interactions_read", "Read"),
        stats.count(parsed[REJECTS], "counts.rejected_at_read", "RejectedRead"),
    ]
    ordered = (
        parsed.records
        | "KeyByUser" >> beam.Map(lambda r: (r.user, r)).with_output_types(KeyedInteraction)
        | "GroupByUser" >> beam.GroupByKey()
        | "OrderTimeline" >> beam.ParDo(_OrderTimeline()).with_outputs(REJECTS, main="timelines")
    )
    stat_parts.append(stats.count(ordered[REJECTS], "counts.rejected_duplicates", "RejectedDup"))
    stat_parts.append(stats.count(ordered.timelines, "counts.users_read", "UsersRead"))
    typed = ordered.timelines | "TimelineType" >> beam.Map(lambda kv: kv).with_output_types(TimelineType)
    timelines, item_counts = kcore(typed, cfg.min_count, cfg.kcore_max_iters, stat_parts)
    stat_parts += [
        stats.total(timelines, "counts.interactions_after_kcore", "Kept", lambda kv: len(kv[1])),
        stats.count(timelines, "counts.users_after_kcore", "UsersKept"),
        stats.count(item_counts, "counts.items_after_kcore", "ItemsKept"),
    ]
    _ = (
        timelines
        | "TimelineJson" >> beam.MapTuple(_timeline_json)
        | "WriteTimelines" >> beam.io.WriteToText(work_path(output_dir, "timelines"), file_name_suffix=".jsonl.gz")
    )
    # The retriever's vocabularies, one file each: the driver reads them whole.
    users = timelines | "UserIds" >> beam.Map(lambda kv: str(kv[0]))
    sinks.write_one_file(users, work_path(output_dir, "users"), "WriteUsers", suffix=".txt")
    items = item_counts | "ItemIds" >> beam.Map(lambda kv: str(kv[0]))
    sinks.write_one_file(items, work_path(output_dir, "items"), "WriteItems", suffix=".txt")
    window = timelines | "RetrieverWindow" >> beam.FlatMap(_window_pairs, cfg)
    write_window(window, cfg, work_path(output_dir, "window"))
    sizes = window | "WindowSizes" >> beam.Map(lambda kv: (f"retriever.window_{kv[0][0]}_interactions", len(kv[1])))
    stat_parts.append(stats.Summed(sizes, *(f"retriever.window_{split}_interactions" for split in WINDOW_SPLITS)))
    rejects = (parsed[REJECTS], ordered[REJECTS]) | "AllRejects" >> beam.Flatten()
    write_rejects(rejects, output_dir, "interactions", stat_parts)
    stats.write_stats(stat_parts, work_path(output_dir, "stats-stage1"))


# --- stage 2: timelines -> lists ---------------------------------------------------------------


class _BuildLists(beam.DoFn):
    """Candidates, scores and labels of one user's requests, under the configured protocol."""

    def __init__(self, cfg: PipelineConfig, retriever_dir: str, retrained_dir: str | None = None):
        self._cfg = cfg
        self._dir = retriever_dir
        self._retrained_dir = retrained_dir

    def setup(self):
        from pipeline import retriever as mf

        # The item table (MF), the neighbour table (item2item) or both (mf_item2item); MF's user rows
        # come joined by key.
        kind = self._cfg.retriever.kind
        self._retriever = mf.load_kind(kind, self._dir)
        again = retrained_kind(kind)
        self._retrained = mf.load_kind(again, self._retrained_dir) if self._retrained_dir else None

    def process(self, kv):
        # A generator only (no bare `return`): Beam warns about DoFns that mix yield and return.
        records, counts = self._build(*kv)
        for name, n in counts.items():
            yield beam.pvalue.TaggedOutput("counts", (f"lists.{name}", n))
        yield from records

    def _build(self, user, joined) -> tuple[list, dict]:
        """(records, counts) of one user's requests."""
        cfg = self._cfg
        kind = cfg.retriever.kind
        lines = list(joined["timeline"])
        rows = list(joined["user"]) if kind in MF_CANDIDATES else [(None, None)]
        if not lines:
            return [], {}  # a user of the retriever's window without a timeline (cannot happen: both come from stage 1)
        if len(lines) != 1 or len(rows) != 1:
            raise ValueError(f"user {user}: {len(lines)} timelines and {len(rows)} retriever rows (expected 1 and 1)")
        _, timeline = timeline_from_json(lines[0])
        vec, bias = rows[0]
        retriever, scorer = self._retriever, None
        if kind == "item2item":
            retriever, scorer = None, self._retriever
        elif kind == "mf_item2item":
            retriever, i2i = self._retriever
            scorer = protocol.RescoredScorer(protocol.MFScorer(retriever, vec, bias), i2i)
        retrained = None
        if self._retrained is not None:
            if retrained_kind(kind) == "mf":
                again = list(joined["retrained"])
                if len(again) != 1:
                    raise ValueError(f"user {user}: {len(again)} retrained retriever rows (expected 1)")
                retrained = protocol.MFScorer(self._retrained, *again[0])
            else:
                retrained = self._retrained
        if cfg.protocol == "cascade":
            records, counts = protocol.cascade_lists(
                user,
                timeline,
                vec,
                bias,
                retriever,
                retriever_fraction=cfg.retriever_fraction,
                stride=cfg.stride,
                history_len=cfg.history_len,
                list_size=cfg.list_size,
                horizon=cfg.horizon,
                scorer=scorer,
                retrained=retrained,
            )
        else:
            records, counts = protocol.paper_lists(
                user,
                timeline,
                vec,
                bias,
                self._retriever,
                chunk=cfg.horizon,
                history_len=cfg.history_len,
                list_size=cfg.list_size,
            )
        return records, counts


def lists_stage(
    p,
    cfg: PipelineConfig,
    output_dir: str,
    retriever_dir: str,
    schema: S.RecordSchema,
    retrained_dir: str | None = None,
) -> None:
    """Stage 2 of the interaction sources (`retrained_dir`: the retrained retriever, if any)."""
    from pipeline import retriever as mf

    timelines = (
        p
        | "ReadTimelines" >> beam.io.ReadFromText(work_path(output_dir, "timelines-*.jsonl.gz"))
        | "KeyTimelines" >> beam.Map(lambda line: (json.loads(line)["user"], line))
    )
    joined = {"timeline": timelines}
    if cfg.retriever.kind in MF_CANDIDATES:  # item2item has no user table: it scores the user's history
        joined["user"] = (
            p
            | "ReadUserRows" >> beam.io.ReadFromText(os.path.join(retriever_dir, f"{mf.USER_ROWS}-*.jsonl.gz"))
            | "ParseUserRows" >> beam.Map(mf.parse_user_row)
        )
        if retrained_dir is not None and retrained_kind(cfg.retriever.kind) == "mf":
            joined["retrained"] = (
                p
                | "ReadRetrainedRows" >> beam.io.ReadFromText(os.path.join(retrained_dir, f"{mf.USER_ROWS}-*.jsonl.gz"))
                | "ParseRetrainedRows" >> beam.Map(mf.parse_user_row)
            )
    # Each worker holds one user's timeline and row at a time, never the user table.
    built = (
        joined
        | "JoinUsers" >> beam.CoGroupByKey()
        | "BuildLists"
        >> beam.ParDo(_BuildLists(cfg, retriever_dir, retrained_dir)).with_outputs("counts", main="records")
    )
    write_lists(built.records, cfg, output_dir, schema, [stats.Summed(built.counts)], "stats-stage2")


# --- lists sources (logged, synthetic) ---------------------------------------------------------


class _FirstRequest(beam.DoFn):
    """Keeps the first occurrence (by file, line) of a request id; the others are rejected."""

    def process(self, kv):
        request_id, items = kv
        items = sorted(items, key=lambda rec_where: rec_where[1])
        first_where = items[0][1]
        yield items[0][0]
        for _, where in items[1:]:
            yield beam.pvalue.TaggedOutput(
                REJECTS,
                reject(
                    where[0],
                    where[1],
                    f"duplicate request_id {request_id!r} (kept the first, {first_where[0]}:{first_where[1]})",
                ),
            )


def _split_user(kv):
    _, lists = kv
    yield from protocol.split_logged_lists(list(lists))


def logged_stage(p, read, cfg: PipelineConfig, output_dir: str, schema: S.RecordSchema, dedupe: bool) -> None:
    """Logged lists (or simulated ones) -> split -> TFRecords."""
    parsed = p | "ReadLists" >> read
    stat_parts = [
        stats.count(parsed.records, "counts.lists_read", "Read"),
        stats.count(parsed[REJECTS], "counts.rejected_at_read", "RejectedRead"),
    ]
    rejects = [parsed[REJECTS]]
    records = parsed.records
    if dedupe:
        unique = (
            records
            | "KeyByRequest" >> beam.Map(lambda rw: (rw[0][S.REQUEST_ID], rw))
            | "GroupByRequest" >> beam.GroupByKey()
            | "FirstRequest" >> beam.ParDo(_FirstRequest()).with_outputs(REJECTS, main="records")
        )
        rejects.append(unique[REJECTS])
        stat_parts.append(stats.count(unique[REJECTS], "counts.rejected_duplicate_request_ids", "RejectedDup"))
        records = unique.records
    else:
        records = records | "DropWhere" >> beam.Map(lambda rw: rw[0])
    with_pos = records | "HasPositive" >> beam.Partition(lambda r, _: 0 if 1 in r[S.LABELS] else 1, 2)
    stat_parts.append(stats.count(with_pos[1], "lists.dropped_no_positive", "NoPositive"))
    split = (
        with_pos[0]
        | "KeyByUser" >> beam.Map(lambda r: (r[S.USER_ID], r))
        | "GroupByUser" >> beam.GroupByKey()
        | "SplitByTimeline" >> beam.FlatMap(_split_user)
    )
    write_rejects(tuple(rejects) | "AllRejects" >> beam.Flatten(), output_dir, "lists", stat_parts)
    write_lists(split, cfg, output_dir, schema, stat_parts, "stats")


# --- common tail ---------------------------------------------------------------------------------


def write_rejects(rejects, output_dir: str, name: str, stat_parts: list) -> None:
    def counted(r):
        _rejected.inc()
        return json.dumps(r, sort_keys=True)

    lines = rejects | "RejectsJson" >> beam.Map(counted)
    sinks.write_one_file(lines, os.path.join(output_dir, f"rejects-{name}"), "WriteRejects", suffix=".jsonl")
    reasons = rejects | "RejectReason" >> beam.Map(lambda r: (f"rejects.{_reason_kind(r['reason'])}", 1))
    stat_parts.append(stats.Summed(reasons))


def _reason_kind(reason: str) -> str:
    """A short, key-safe category of a reject reason (the full text stays in the rejects file).

    Quoted values, parenthesised details and numbers are dropped, so "user id 'x7' is not an
    integer" and "user id 'b' is not an integer" count together.
    """
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\([^)]*\)|\[[^\]]*\]|[-+\d.:,]+", " ", reason)
    words = [w for w in text.lower().split() if w.isalpha() or "_" in w]
    return "_".join(words[:6]) or "other"


class _DistinctInBundle(beam.DoFn):
    """The distinct values of `fn(element)` over each bundle, emitted when the bundle ends.

    For a `Distinct` over many values an element (70 item ids a list): it then takes the few
    thousand distinct ids of each bundle, not every id of every list (2.6M on ML-1M's train split).
    """

    def __init__(self, fn):
        self._fn = fn
        self._seen: set = set()

    def start_bundle(self):
        self._seen = set()

    def process(self, element):
        self._seen.update(self._fn(element))
        return ()

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.timestamp import MIN_TIMESTAMP
        from apache_beam.utils.windowed_value import WindowedValue

        for value in self._seen:
            yield WindowedValue(value, MIN_TIMESTAMP, [GlobalWindow()])
        self._seen = set()


def write_lists(records, cfg: PipelineConfig, output_dir: str, schema: S.RecordSchema, stat_parts, stats_name) -> None:
    """Per-split serialization and gzip TFRecord shards, plus the split statistics."""
    stat_parts = list(stat_parts)
    stat_parts.append(records | "ListStats" >> stats.SplitListStats(cfg.k, cfg.seed))
    # The model's vocabularies: what the train split shows it (other ids are out of vocabulary).
    train = records | "TrainLists" >> beam.Filter(lambda r: r["split"] == "train")
    items = (
        train
        | "TrainItems" >> beam.ParDo(_DistinctInBundle(lambda r: [*r[S.ITEM_IDS], *r[S.HISTORY]]))
        | "DistinctItems" >> beam.Distinct()
    )
    sinks.write_one_file(
        items | "ItemVocabLines" >> beam.Map(str), work_path(output_dir, "vocab-items"), "WriteItemVocab"
    )
    users = train | "TrainUsers" >> beam.Map(lambda r: r[S.USER_ID]) | "DistinctUsers" >> beam.Distinct()
    sinks.write_one_file(
        users | "UserVocabLines" >> beam.Map(str), work_path(output_dir, "vocab-users"), "WriteUserVocab"
    )
    # Every split's shards from one GroupByKey; each (split, shard) gets a file, empty or not.
    shards = cfg.output_shards
    keyed = records | "Serialize" >> beam.Map(_keyed_example, schema=schema, shards=shards)
    every = records.pipeline | "EveryShard" >> beam.Create(
        [((s, i), None) for s in RECORD_SPLITS for i in range(shards)]
    )
    _ = (
        (keyed, every)
        | "AllShards" >> beam.Flatten()
        | "GroupShard" >> beam.GroupByKey()
        | "WriteShard" >> beam.ParDo(_WriteRecordShard(output_dir, shards))
    )
    stats.write_stats(stat_parts, work_path(output_dir, stats_name))


def record_order(record) -> tuple:
    """Where a record goes in its split's files: by user, then time, then request id (its numbers
    compared as numbers, so request `7:96` comes before `7:102`)."""
    rid = str(record[S.REQUEST_ID])
    parts = tuple((0, int(c), "") if c.isdigit() else (1, 0, c) for c in re.split(r"(\d+)", rid) if c)
    return (int(record[S.USER_ID]), int(record[S.TIMESTAMP]), parts, rid)


def _keyed_example(record, schema: S.RecordSchema, shards: int):
    """((split, shard), (order, serialized example)); the shard is a stable hash of the request id."""
    shard = int(stable_fraction("shard", str(record[S.REQUEST_ID])) * shards)
    return (record["split"], shard), (record_order(record), S.to_example(record, schema))


def _tfrecord(data: bytes) -> bytes:
    """One TFRecord frame: length, masked CRC-32C of the length, data, masked CRC-32C of the data."""
    import struct

    import google_crc32c

    def masked(b: bytes) -> bytes:
        crc = google_crc32c.value(b)
        return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)

    length = struct.pack("<Q", len(data))
    return length + masked(length) + data + masked(data)


class _WriteRecordShard(beam.DoFn):
    """Writes one shard of a split as a gzip TFRecord file, its records in `record_order`.

    Beam's own TFRecord sink writes a shard's records in the order its bundles reach it, which
    depends on the runner and on what ran before in the same process (README "The study": the same
    ML-100K records came out in two orders), and training's seeded shuffle follows file order. Here
    the order is the records' own, so every runner, worker count and process writes the same
    records in the same order. Each shard is sorted in one worker's memory: raise `output_shards`
    for data sets whose split does not fit. A retried bundle rewrites the same file.
    """

    def __init__(self, output_dir: str, shards: int):
        self._output_dir, self._shards = output_dir, shards

    def process(self, kv):
        from apache_beam.io.filesystem import CompressionTypes
        from apache_beam.io.filesystems import FileSystems

        (split, shard), items = kv
        records = sorted((item for item in items if item is not None), key=lambda item: item[0])
        path = os.path.join(self._output_dir, f"{split}-{shard:05d}-of-{self._shards:05d}.tfrecord.gz")
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            # Level 6 (zlib's default): 1% larger than Python's default 9, twice as fast.
            with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=6, mtime=0) as z:
                for _, data in records:
                    z.write(_tfrecord(data))
        yield len(records)


def read_files(pattern: str, parse_file) -> beam.PTransform:
    return files.ReadNumbered(pattern, parse_file)
