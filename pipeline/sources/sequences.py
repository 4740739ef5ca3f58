"""Sequence files: one user a line, `user item item ...` in time order (the Amazon 5-core sets).

The format of the ICLRec / S3-Rec releases of Amazon Beauty and Sports: whitespace-separated
positive integer ids, the user first, then the user's items oldest first. There is no timestamp:
an item's position in the line is its time (the first item has timestamp 1, the next 2, ...), so
the cascade protocol orders, windows and splits each user's timeline exactly as the line does.

A bad line is rejected whole, never in part: dropping one token would shift the time of every item
after it. A user id on a second line (in the same or another file) rejects that line and keeps the
first one (by file, then line number): a user's history is one line, and merging two lines would
invent an order between them.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import apache_beam as beam

from pipeline.protocol import Interaction
from pipeline.sources.files import REJECTS, ReadNumbered, TagRejects, reject

_INT64_MAX = 2**63 - 1
_DIGITS = re.compile(r"[+-]?[0-9]+")


class Sequence(NamedTuple):
    """One parsed line: a user and its items in time order; `file` and `line` point back at the input."""

    user: int
    items: tuple[int, ...]
    file: str
    line: int


def _positive_id(token: str, field: str) -> tuple[int | None, str | None]:
    if not _DIGITS.fullmatch(token):
        return None, f"{field} {token!r} is not an integer"
    number = int(token)
    if number <= 0:
        return None, f"{field} {number} must be a positive integer (0 is padding)"
    if number > _INT64_MAX:
        return None, f"{field} {token} does not fit in int64"
    return number, None


def parse_sequences(path: str, lines):
    """(path, numbered lines) -> a `Sequence` per good line, a reject dict per bad one.

    A line must hold a user id and at least one item id, all positive integers; the reason of a
    reject names the first bad token and its position (`item 3` is the line's third item).
    """
    for number, text, bad in lines:
        if text is None:
            yield reject(path, number, bad)
            continue
        tokens = text.split()
        user, err = _positive_id(tokens[0], "user id")
        if err is None and len(tokens) < 2:
            err = f"user {user} has no item (expected 'user item item ...')"
        items = []
        for position, token in enumerate(tokens[1:], 1):
            if err is not None:
                break
            item, err = _positive_id(token, f"item {position}")
            items.append(item)
        if err is not None:
            yield reject(path, number, err, text)
            continue
        yield Sequence(user, tuple(items), path, number)


def sequence_interactions(element):
    """A user's lines -> the first line's interactions (position = timestamp); later lines rejected.

    Reject dicts pass through unchanged, so parse rejects and these share one output.
    """
    if isinstance(element, dict):
        yield element
        return
    user, sequences = element
    first, *others = sorted(sequences, key=lambda s: (s.file, s.line))
    for position, item in enumerate(first.items, 1):
        yield Interaction(user, item, position, float("nan"), first.file, first.line)
    for s in others:
        yield reject(
            s.file,
            s.line,
            f"user {user} already has a line ({first.file}:{first.line}); a user's sequence must be on one line "
            f"(kept the first)",
            " ".join(str(v) for v in (s.user, *s.items)),
        )


class ReadSequences(beam.PTransform):
    """Sequence files -> `Interaction`s (main output `records`) and reject dicts (`rejects`).

    Args:
        pattern: a file, glob or directory (checked when the pipeline is built).
    """

    def __init__(self, pattern: str):
        super().__init__()
        self._read = ReadNumbered(pattern, parse_sequences)

    def expand(self, pbegin):
        parsed = pbegin | "ReadLines" >> self._read
        users = (
            parsed.records
            | "KeyLineByUser" >> beam.Map(lambda s: (s.user, s))
            | "GroupLinesByUser" >> beam.GroupByKey()
        )
        return (
            (parsed[REJECTS], users)
            | "MergeLineRejects" >> beam.Flatten()
            | "LinesToInteractions"
            >> beam.ParDo(TagRejects(sequence_interactions)).with_outputs(REJECTS, main="records")
        )
