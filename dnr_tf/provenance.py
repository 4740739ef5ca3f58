"""What a study run ran on: fingerprints of the training code and of the data set.

A study's tables must not mix code versions (issue 14): every `result.json` records `code`, a hash
of the package's training code, and `data`, a hash of its data set's `stats.json` (the counts, the
retrievers' AUCs and the per-split figures that the pipeline derives from every record), and, since
2026-12-05, `records`, a hash of the records themselves in the order a run reads them. Collecting
a plan refuses runs whose fingerprints differ (`check_one_version`), naming them, so a table is
either one version throughout or not written.

The modules that only orchestrate or report (`REPORT_ONLY`) are left out of `code`: changing how a
plan is scheduled or a table printed does not change what a run computes.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os

PACKAGE = os.path.dirname(os.path.abspath(__file__))
REPORT_ONLY = frozenset({"experiments.py", "report.py", "headline.py", "stats.py", "provenance.py"})


def cpu_id() -> tuple[str, str, str]:
    """(vendor, family, model) of this CPU from /proc/cpuinfo, "?" where not known (not Linux).

    The bits of a float32 training can depend on it: MF's tables, and so the ML-100K records, differ
    between the Intel Xeon and the AMD EPYC VMs seen (README, "Records across CPUs")."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields.get("vendor_id", "?"), fields.get("cpu family", "?"), fields.get("model", "?")


def code_fingerprint(package: str = PACKAGE) -> str:
    """12 hex digits of a SHA-256 over every training module of `package` (paths and bytes)."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), package)
            if not name.endswith(".py") or rel in REPORT_ONLY:
                continue
            digest.update(rel.encode() + b"\0")
            with open(os.path.join(root, name), "rb") as f:
                digest.update(f.read() + b"\0")
    return digest.hexdigest()[:12]


def data_fingerprint(data_dir: str) -> str:
    """12 hex digits of a SHA-256 of the data set's stats.json, less what varies between identical builds.

    Left out: `timings` (wall-clock seconds of the stages) and `config.input` (where the input was
    read from: the same file elsewhere is the same data). Everything else the pipeline counted and
    measured from the records stays in, floats rounded to 9 significant digits: Beam sums a
    statistic's parts in the order its bundles finish, so two builds of the same records can differ
    in the last bits of a mean (seen: 0.5411838009772476 and ...475). So a rebuild in another
    session fingerprints the same.
    """
    with open(os.path.join(data_dir, "stats.json")) as f:
        stats = json.load(f)
    stats.pop("timings", None)
    if isinstance(stats.get("config"), dict):
        stats["config"] = {k: v for k, v in stats["config"].items() if k != "input"}
    canonical = json.dumps(_rounded(stats), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def records_fingerprint(data_dir: str) -> str:
    """12 hex digits of a SHA-256 of every record of every split, parsed, in file order.

    `data` (from stats.json) does not see the order of the records, nor a change in them that leaves
    every statistic equal to 9 digits; training does (the shuffle is seeded over the file order). This
    hashes what a run reads: each split's files in name order, each record's features sorted by
    name with their values. Parsed, not the bytes: builds before 2026-12-07 wrote a record's feature
    map in protobuf's default order, which varies from one process to the next (`schema.to_example`
    now writes it in name order), so identical builds of then differ in their bytes.
    """
    import glob

    from tensorflow.core.example import example_pb2

    from dnr_tf import data as data_lib

    digest = hashlib.sha256()
    for split in data_lib.SPLITS:
        digest.update(split.encode() + b"\0")
        for path in sorted(glob.glob(data_lib.split_pattern(data_dir, split))):
            for raw in _tfrecords(path):
                example = example_pb2.Example.FromString(raw)
                for name in sorted(example.features.feature):
                    feature = example.features.feature[name]
                    kind = feature.WhichOneof("kind")
                    values = list(getattr(feature, kind).value) if kind else []
                    digest.update(f"{name}:{kind}:{values!r};".encode())
                digest.update(b"\n")
    return digest.hexdigest()[:12]


def _tfrecords(path: str):
    import tensorflow as tf

    for record in tf.data.TFRecordDataset(path, compression_type="GZIP" if path.endswith(".gz") else ""):
        yield bytes(record.numpy())


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.9g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def check_one_version(results: list[dict]) -> None:
    """Raises ValueError unless all `results` share one `code` and, per data set, one `data` (and one
    `records`, among the runs that recorded it).

    A result without a fingerprint counts as its own version ("unrecorded").
    """
    problems = []
    by_code = collections.defaultdict(list)
    for r in results:
        by_code[r.get("code", "unrecorded")].append(r.get("run", "?"))
    if len(by_code) > 1:
        problems.append("code " + _versions(by_code))
    by_data = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in results:
        by_data[r.get("dataset", "?")][r.get("data", "unrecorded")].append(r.get("run", "?"))
    for dataset, versions in sorted(by_data.items()):
        if len(versions) > 1:
            problems.append(f"data set {dataset}: data " + _versions(versions))
    # `records` is recorded from 2026-12-05 on: runs before it have none and are not compared.
    by_records = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in results:
        if "records" in r:
            by_records[r.get("dataset", "?")][r["records"]].append(r.get("run", "?"))
    for dataset, versions in sorted(by_records.items()):
        if len(versions) > 1:
            problems.append(f"data set {dataset}: records " + _versions(versions))
    if problems:
        raise ValueError(
            "the runs of this plan ran on different versions, so no table mixes them: "
            + "; ".join(problems)
            + " (remove the runs of the old version from <out>/runs/ to train them again)"
        )


def _versions(groups: dict) -> str:
    parts = []
    for version, runs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        parts.append(f"{version}: {len(runs)} runs (e.g. {runs[0]})")
    return ", ".join(parts)
