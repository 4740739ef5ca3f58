"""Benchmarks that write JSON (`python -m bench.<name>`); helpers they share."""

from __future__ import annotations

import json
import os
import statistics


def require_paths(parser, pairs) -> None:
    """`parser.error` (one line, before any work) for the first (path, flag) whose path is missing."""
    for path, flag in pairs:
        if not os.path.exists(path):
            parser.error(f"{flag}: {path} not found")


def require_at_least_one(parser, args, *flags) -> None:
    """`parser.error` (one line, before any work) for the first of `flags` (argparse dests) set below 1;
    one left unset (None) takes its default."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag}: at least 1")


def spread(values) -> dict:
    """min, median and max of repeated measurements (the VM's speed moves from one run to the next)."""
    values = [float(v) for v in values]
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def write_json(path: str, result: dict) -> None:
    """Writes `result` to `path` (its folder made), through a temporary file: an interrupted write
    leaves an earlier result whole."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)
