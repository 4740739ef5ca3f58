"""Parsers of interaction files: MovieLens (`u.data`, `ratings.dat`) and named-column CSV.

Each parser takes (path, numbered lines) and yields `Interaction`s or reject dicts, so the same
code runs in a Beam DoFn and in a plain loop.
"""

from __future__ import annotations

import csv
import math
import os
import re

from pipeline.protocol import Interaction
from pipeline.sources.files import reject

MOVIELENS_SEPARATORS = {"100k": "\t", "1m": "::"}


def detect_movielens_format(path: str) -> str:
    """`100k` for `u.data`-style files (tab separated), `1m` for `ratings.dat` (`::`)."""
    name = os.path.basename(path.rstrip("/"))
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(".dat"):
        return "1m"
    if name.startswith("u.") or name.endswith(".data") or name.endswith(".tsv"):
        return "100k"
    raise ValueError(
        f"cannot tell the MovieLens format of {path!r} from its name: pass "
        "--set movielens_format=100k (tab separated, u.data) or 1m (:: separated, ratings.dat)"
    )


def resolve_movielens_input(path: str) -> str:
    """A MovieLens directory resolves to the ratings file inside it."""
    if os.path.isdir(path):
        for name in ("u.data", "ratings.dat"):
            if os.path.exists(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"{path} holds neither u.data (ML-100K) nor ratings.dat (ML-1M)")
    return path


INT64_MAX = 2**63 - 1
_DIGITS = re.compile(r"[+-]?[0-9]+")


def _positive_int(value: str, field: str) -> tuple[int | None, str | None]:
    if value.isascii() and value.isdigit() and len(value) <= 18 and value[0] != "0":
        return int(value), None  # the common case: 1 to 10^18 - 1, written plainly
    value = value.strip()
    if not _DIGITS.fullmatch(value):
        return None, f"{field} {value[:40]!r} is not an integer"
    if len(value.lstrip("+-0")) > 19:  # int() of a few thousand digits raises; int64 has 19
        return None, f"{field} {value[:40]} does not fit in int64"
    number = int(value)
    if number <= 0:
        return None, f"{field} {number} must be a positive integer (0 is padding)"
    if number > INT64_MAX:
        return None, f"{field} {value} does not fit in int64"
    return number, None


def _timestamp(value: str) -> tuple[int | None, str | None]:
    if value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value), None  # the common case: digits only, at most 10^18 - 1
    value = value.strip()
    if not value:
        return None, "timestamp is missing"
    try:
        number = int(value)
    except ValueError:
        try:
            number = float(value)
        except ValueError:
            return None, f"timestamp {value!r} is not a number"
        if not math.isfinite(number):
            return None, f"timestamp {value[:40]!r} is not finite"
        if number < 0:  # before truncation: -0.5 is negative, not 0
            return None, f"timestamp {value} is negative"
        number = int(number)
    if number < 0:
        return None, f"timestamp {number} is negative"
    if number > INT64_MAX:
        return None, f"timestamp {value} does not fit in int64"
    return number, None


def _rating(value: str | None) -> tuple[float, str | None]:
    if value is None or not value.strip():
        return float("nan"), None
    try:
        number = float(value)
    except ValueError:
        return float("nan"), f"rating {value!r} is not a number"
    if not math.isfinite(number):
        return float("nan"), f"rating {value!r} is not finite"
    return number, None


def make_interaction(path, number, user, item, timestamp, rating=None, text=None):
    """Validates the four fields of an interaction; returns an Interaction or a reject dict.

    `text` is the input line as read (for the rejects file); by default the fields joined by `|`.
    """
    if text is None:
        text = "|".join(str(v) for v in (user, item, timestamp, rating) if v is not None)
    u, err = _positive_int(user, "user id")
    if err is None:
        i, err = _positive_int(item, "item id")
    if err is None:
        t, err = _timestamp(timestamp)
    if err is None:
        r, err = _rating(rating)
    if err is not None:
        return reject(path, number, err, text)
    return Interaction(u, i, t, r, path, number)


def parse_movielens(fmt: str):
    """A parser of MovieLens ratings files of format `100k`, `1m` or `auto` (by file name)."""

    def parse(path, lines):
        sep = MOVIELENS_SEPARATORS[detect_movielens_format(path) if fmt == "auto" else fmt]
        for number, text, bad in lines:
            if text is None:
                yield reject(path, number, bad)
                continue
            fields = text.split(sep)
            if len(fields) != 4:
                yield reject(path, number, f"expected 4 fields separated by {sep!r}, got {len(fields)}", text)
                continue
            user, item, rating, timestamp = fields
            yield make_interaction(path, number, user, item, timestamp, rating, text=text)

    return parse


CSV_REQUIRED = ("user_id", "item_id", "timestamp")


def parse_csv(path, lines):
    """Named-column CSV: a header naming `user_id,item_id,timestamp[,rating]` (any order)."""
    header = None
    for number, text, bad in lines:
        if text is None:
            yield reject(path, number, bad)
            continue
        try:
            fields = next(csv.reader([text]))
        except csv.Error as e:  # e.g. a field over csv.field_size_limit(), an unclosed quote
            if header is None:
                raise ValueError(f"{path}:{number}: the CSV header cannot be read: {e}") from None
            yield reject(path, number, f"not a valid CSV line: {e}", text)
            continue
        if header is None:
            header = [h.strip() for h in fields]
            missing = [c for c in CSV_REQUIRED if c not in header]
            if missing:
                raise ValueError(
                    f"{path}:{number}: CSV header must name columns {', '.join(CSV_REQUIRED)} "
                    f"(and optionally rating); missing {', '.join(missing)}; got {header}"
                )
            index = {name: header.index(name) for name in (*CSV_REQUIRED, "rating") if name in header}
            continue
        if len(fields) != len(header):
            yield reject(path, number, f"expected {len(header)} fields, got {len(fields)}", text)
            continue
        yield make_interaction(
            path,
            number,
            fields[index["user_id"]],
            fields[index["item_id"]],
            fields[index["timestamp"]],
            fields[index["rating"]] if "rating" in index else None,
            text=text,
        )
