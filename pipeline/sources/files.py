"""Reading input files line by line with their file name and line number, on any Beam runner."""

from __future__ import annotations

import gzip
import os

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

REJECTS = "rejects"
_MAX_TEXT = 200


def reject(file: str, line: int, reason: str, text: str = "") -> dict:
    """A rejected input record: where it was, why, and (the start of) what it said."""
    return {"file": file, "line": line, "reason": reason, "text": text[:_MAX_TEXT]}


def expand_input(pattern: str) -> list[str]:
    """Files matching `pattern`: a file, a glob, or a directory (the files directly inside it).

    Raises:
        FileNotFoundError: naming the pattern when nothing matches.
    """
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "*")
    paths = []
    for result in FileSystems.match([pattern]):
        paths.extend(m.path for m in result.metadata_list)
    paths = [p for p in paths if not os.path.isdir(p)]
    if not paths:
        raise FileNotFoundError(f"input {pattern!r} matches no file")
    return sorted(paths)


def _open_bytes(path: str):
    raw = FileSystems.open(path, compression_type="uncompressed")
    head = raw.read(2)
    raw.close()
    raw = FileSystems.open(path, compression_type="uncompressed")
    # Gzip by content, not by name: a `.gz` users forgot to name so still reads.
    if head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw)
    return raw


def numbered_lines(path: str):
    """Yields (line_number, text) of a text file, or (line_number, None, reason) for a bad line.

    Handles gzip (by magic bytes), a UTF-8 byte-order mark, and Windows line endings. Blank lines
    are skipped. A line that is not UTF-8 or holds NUL bytes is reported, not decoded.
    """
    with _open_bytes(path) as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            if b"\x00" in raw:
                yield number, None, "binary data (NUL byte): not a text file"
                continue
            try:
                yield number, raw.decode("utf-8"), None
            except UnicodeDecodeError:
                yield number, None, "not UTF-8 text"


class ReadNumbered(beam.PTransform):
    """Parses files line by line with their numbers; records out, rejects to the `rejects` output.

    Files are read whole by one worker each (line numbers need a sequential read); inputs meant
    for many workers come as many files (shards), which are read in parallel.

    Args:
        pattern: a file, glob or directory (expanded with `expand_input` when the pipeline is
            built, so a missing input fails before the run).
        parse_file: (path, numbered lines) -> records or reject dicts.
    """

    def __init__(self, pattern: str, parse_file):
        super().__init__()
        self._paths = expand_input(pattern)
        self._parse_file = parse_file

    def expand(self, pbegin):
        return (
            pbegin
            | "Paths" >> beam.Create(self._paths)
            | "Match" >> fileio.MatchAll()
            | "Open" >> fileio.ReadMatches()
            | "Parse" >> beam.ParDo(TagRejects(_parse_readable, self._parse_file)).with_outputs(REJECTS, main="records")
        )


class TagRejects(beam.DoFn):
    """Runs a generator function on each element; reject dicts go to the `rejects` output.

    Args:
        fn: element, *args -> iterable of records and reject dicts (dicts with a `reason`).
    """

    def __init__(self, fn, *args):
        self._fn = fn
        self._args = args

    def process(self, element):
        for out in self._fn(element, *self._args):
            if isinstance(out, dict) and "reason" in out:
                yield beam.pvalue.TaggedOutput(REJECTS, out)
            else:
                yield out


def _parse_readable(readable_file, parse_file):
    path = readable_file.metadata.path
    return parse_file(path, numbered_lines(path))
