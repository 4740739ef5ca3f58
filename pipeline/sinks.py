"""A text file of one shard, written without `beam.io.WriteToText`'s machinery.

`WriteToText(prefix, file_name_suffix=suffix, num_shards=1)` writes its one file through a
composite of about a dozen transforms (a `Create` and side inputs to initialise and finalise the
write, a temporary directory, a rename), each a stage of its own on the DirectRunner: about 0.1 s a
file on a 2-core machine, which the pipeline's small files (statistics, vocabularies, rejects: seven
a cascade run) paid on every run, a small data set's run about 2.5 s in all. `write_one_file`
writes the same file, `<prefix>-00000-of-00001<suffix>` with one line an element (an empty
PCollection gives an empty file), from one `GroupByKey`. It writes in place: the pipeline's output
directory is a staging directory that a failed run never publishes (`pipeline/publish.py`), and a
retried bundle writes the same file again.
"""

from __future__ import annotations

import apache_beam as beam


def one_file_path(prefix: str, suffix: str = "") -> str:
    """The name `WriteToText(prefix, file_name_suffix=suffix, num_shards=1)` gives its file."""
    return f"{prefix}-00000-of-00001{suffix}"


class _WriteLines(beam.DoFn):
    def __init__(self, path: str):
        self._path = path

    def process(self, kv):
        from apache_beam.io.filesystem import CompressionTypes
        from apache_beam.io.filesystems import FileSystems

        _, lines = kv
        with FileSystems.create(self._path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            for line in lines:
                if line is not None:  # the marker that makes an empty PCollection write its file
                    f.write(line.encode("utf-8") + b"\n")
        yield self._path


def write_one_file(lines, prefix: str, label: str, suffix: str = ""):
    """Writes the strings of `lines`, one a line, into `one_file_path(prefix, suffix)`."""
    keyed = lines | f"{label}Key" >> beam.Map(lambda line: (0, line))
    marker = lines.pipeline | f"{label}Marker" >> beam.Create([(0, None)])
    return (
        (keyed, marker)
        | f"{label}All" >> beam.Flatten()
        | f"{label}Group" >> beam.GroupByKey()
        | f"{label}Write" >> beam.ParDo(_WriteLines(one_file_path(prefix, suffix)))
    )
