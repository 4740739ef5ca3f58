"""Reading input files line by line with their file name and line number, on any Beam runner."""

from __future__ import annotations

import gzip
import os
import zlib

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


class InputFileError(OSError):
    """A whole input file cannot be read (truncated or corrupt compression); the message names it."""


MAX_LINE_BYTES = 1 << 20  # a longer line is a rejected record, never read whole into memory
_CHUNK = 1 << 16


class _OwningGzipFile(gzip.GzipFile):
    """A GzipFile that closes the file it reads from when it is closed (GzipFile leaves a `fileobj` open)."""

    def close(self) -> None:
        raw = self.fileobj
        try:
            super().close()
        finally:
            if raw is not None:
                raw.close()


def _open_bytes(path: str):
    raw = FileSystems.open(path, compression_type="uncompressed")
    head = raw.read(2)
    raw.close()
    raw = FileSystems.open(path, compression_type="uncompressed")
    # Gzip by content, not by name: a `.gz` users forgot to name so still reads.
    if head == b"\x1f\x8b":
        return _OwningGzipFile(fileobj=raw)
    return raw


def _raw_lines(f, max_bytes: int):
    """Yields lines (bytes); a line over `max_bytes` is yielded as None and skipped to its end."""
    while True:
        line = f.readline(max_bytes + 1)
        if not line:
            return
        if len(line) <= max_bytes or line.endswith(b"\n"):
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = f.readline(_CHUNK)
        yield None


def check_readable(path: str) -> None:
    """Reads a gzip input to its end before the run, so a truncated or corrupt one fails first.

    Raises:
        InputFileError: one line naming the file and what is wrong with it.
    """
    with FileSystems.open(path, compression_type="uncompressed") as raw:
        if raw.read(2) != b"\x1f\x8b":
            return
    try:
        with _open_bytes(path) as f:
            while f.read(_CHUNK):
                pass
    except (EOFError, OSError, zlib.error) as e:
        raise InputFileError(f"{path}: not a readable gzip file ({_one_line(e)}); it is truncated or corrupt") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def numbered_lines(path: str, max_line_bytes: int = MAX_LINE_BYTES):
    """Yields (line_number, text, None) of a text file, or (line_number, None, reason) for a bad line.

    Handles gzip (by magic bytes), a UTF-8 byte-order mark, and Windows line endings. Blank lines
    are skipped. A line that is not UTF-8, holds NUL bytes or is longer than `max_line_bytes` is
    reported, not decoded.

    Raises:
        InputFileError: naming the file and the last line read, when its gzip stream is truncated
            or corrupt (`check_readable` finds this before a run).
    """
    number = 0
    try:
        with _open_bytes(path) as f:
            for number, raw in enumerate(_raw_lines(f, max_line_bytes), 1):
                if raw is None:
                    yield number, None, f"line longer than {max_line_bytes} bytes"
                    continue
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
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise InputFileError(f"{path}: gzip stream truncated or corrupt after line {number} ({_one_line(e)})") from None


class ReadNumbered(beam.PTransform):
    """Parses files line by line with their numbers; records out, rejects to the `rejects` output.

    Files are read whole by one worker each (line numbers need a sequential read); inputs meant
    for many workers come as many files (shards), which are read in parallel.

    Args:
        pattern: a file, glob or directory (expanded with `expand_input` when the pipeline is
            built, so a missing input fails before the run, and so does a truncated gzip).
        parse_file: (path, numbered lines) -> records or reject dicts.
    """

    def __init__(self, pattern: str, parse_file):
        super().__init__()
        self._paths = expand_input(pattern)
        for path in self._paths:
            check_readable(path)
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
