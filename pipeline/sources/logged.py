"""Candidate lists logged by a production cascade, one JSON object a line.

```json
{"request_id": "r1", "user_id": 7, "timestamp": 1700000000, "history": [3, 9],
 "candidates": [{"item_id": 12, "retriever_score": 0.83, "label": 1}, ...]}
```
A candidate may also carry `oracle_score` (the simulator writes it). This is how a company feeds
its own retriever's scores: the retriever stage is skipped.
"""

from __future__ import annotations

import json
import math

from dnr_tf import schema as S
from pipeline.sources.files import reject

REQUIRED = ("request_id", "user_id", "timestamp", "history", "candidates")
CANDIDATE_REQUIRED = ("item_id", "retriever_score", "label")


INT64_MAX = 2**63 - 1


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -INT64_MAX - 1 <= v <= INT64_MAX


def validate_list(obj, max_list_size: int) -> str | None:
    """The reason a logged list is bad, or None when it is good."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    for field in REQUIRED:
        if field not in obj:
            return f"missing field {field!r}"
    if not isinstance(obj["request_id"], (str, int)) or isinstance(obj["request_id"], bool) or obj["request_id"] == "":
        return "request_id must be a non-empty string or an integer"
    if not _is_int(obj["user_id"]) or obj["user_id"] <= 0:
        return f"user_id {obj['user_id']!r} must be a positive integer"
    if not _is_int(obj["timestamp"]) or obj["timestamp"] < 0:
        return f"timestamp {obj['timestamp']!r} must be a non-negative integer"
    history = obj["history"]
    if not isinstance(history, list) or not all(_is_int(h) and h > 0 for h in history):
        return "history must be a list of positive integer item ids"
    cands = obj["candidates"]
    if not isinstance(cands, list):
        return "candidates must be a list"
    if not cands:
        return "list has no candidates"
    if len(cands) > max_list_size:
        return f"list has {len(cands)} candidates, above the maximum of {max_list_size}"
    seen = set()
    for j, c in enumerate(cands):
        where = f"candidates[{j}]"
        if not isinstance(c, dict):
            return f"{where} must be an object"
        for field in CANDIDATE_REQUIRED:
            if field not in c:
                return f"{where} is missing field {field!r}"
        if not _is_int(c["item_id"]) or c["item_id"] <= 0:
            return f"{where}.item_id {c['item_id']!r} must be a positive integer"
        if c["item_id"] in seen:
            return f"{where}.item_id {c['item_id']} appears twice in the list"
        seen.add(c["item_id"])
        score = c["retriever_score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            return f"{where}.retriever_score {score!r} is not a finite number"
        if not 0.0 <= score <= 1.0:
            return f"{where}.retriever_score {score!r} is outside [0, 1]"
        if isinstance(c["label"], bool) or c["label"] not in (0, 1) or isinstance(c["label"], float):
            return f"{where}.label {c['label']!r} must be 0 or 1"
        if "oracle_score" in c:
            o = c["oracle_score"]
            if isinstance(o, bool) or not isinstance(o, (int, float)) or not math.isfinite(o) or not 0.0 <= o <= 1.0:
                return f"{where}.oracle_score {o!r} must be a number in [0, 1]"
    return None


def to_record(obj) -> dict:
    """A validated logged list as a record dict of the schema."""
    cands = obj["candidates"]
    rec = {
        S.REQUEST_ID: str(obj["request_id"]),
        S.USER_ID: obj["user_id"],
        S.TIMESTAMP: obj["timestamp"],
        S.HISTORY: list(obj["history"]),
        S.ITEM_IDS: [c["item_id"] for c in cands],
        S.RETRIEVER_SCORES: [float(c["retriever_score"]) for c in cands],
        S.LABELS: [int(c["label"]) for c in cands],
    }
    if all("oracle_score" in c for c in cands):
        rec[S.ORACLE_SCORES] = [float(c["oracle_score"]) for c in cands]
    return rec


def parse_logged(max_list_size: int):
    """A parser of JSONL logged lists; yields (record, (file, line)) or reject dicts."""

    def parse(path, lines):
        for number, text, bad in lines:
            if text is None:
                yield reject(path, number, bad)
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield reject(path, number, f"not valid JSON: {e.msg} at column {e.colno}", text)
                continue
            except RecursionError:
                yield reject(path, number, "not valid JSON here: nested too deeply", text)
                continue
            except ValueError as e:  # e.g. an integer of more digits than Python converts
                yield reject(path, number, f"not valid JSON here: {str(e).splitlines()[0]}", text)
                continue
            reason = validate_list(obj, max_list_size)
            if reason is not None:
                yield reject(path, number, reason, text)
                continue
            yield (to_record(obj), (path, number))

    return parse
