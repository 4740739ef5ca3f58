"""Beam alone: the DirectRunner's `multi_threading` mode garbles a typed group by key with a struct coder.

    python docs/scaling/beam_multi_threading_repro.py multi_threading   # crashed in each of 3 runs
    python docs/scaling/beam_multi_threading_repro.py in_memory         # prints 1000000

The shape of the pipeline's stage 1 without any of its code (docs/scaling.md, "The DirectRunner's
multi_threading mode"): 1,000,000 random `user::item::rating::time` lines, parsed into a NamedTuple
with a registered struct coder, grouped by user, and the timelines read both directly and beside a
side input (which makes the runner materialise them). Beam 2.77 on a 2-vCPU VM, 2026-12-07: with
`--direct_running_mode multi_threading --direct_num_workers 2` each of three runs failed with
"Invalid PaneInfoEncoding: 3"; in one process it printed 1000000. Without the registered coder the
mode also failed (one crash, one run out of memory at 24 GB).
"""

import os
import random
import struct
import sys
import tempfile
import typing

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions


class R(typing.NamedTuple):
    user: int
    item: int
    ts: int


class RCoder(beam.coders.Coder):
    def encode(self, r):
        return struct.pack("<qqq", r.user, r.item, r.ts)

    def decode(self, b):
        return R(*struct.unpack("<qqq", b))

    def is_deterministic(self):
        return True

    def to_type_hint(self):
        return R


beam.coders.registry.register_coder(R, RCoder)


def parse(line):
    u, i, _, t = line.split("::")
    return int(u), R(int(u), int(i), int(t))


def main(mode: str) -> None:
    rng = random.Random(0)
    path = os.path.join(tempfile.mkdtemp(), "ratings.dat")
    with open(path, "w") as f:
        for n in range(1_000_000):
            f.write(f"{rng.randrange(6000)}::{int(3700 * rng.random() ** 2)}::4::{n}\n")
    workers = ["--direct_num_workers", "1"] if mode == "in_memory" else ["--direct_num_workers", "2"]
    options = PipelineOptions([*workers, "--direct_running_mode", mode])
    with beam.Pipeline(options=options) as p:
        timelines = (
            p
            | beam.io.ReadFromText(path)
            | beam.Map(parse).with_output_types(beam.typehints.Tuple[int, R])
            | beam.GroupByKey()
            | beam.MapTuple(lambda u, rs: (u, sorted(rs, key=lambda r: r.ts))).with_output_types(
                beam.typehints.Tuple[int, beam.typehints.List[R]]
            )
        )
        total = timelines | "Len" >> beam.Map(lambda kv: len(kv[1])) | "Sum" >> beam.CombineGlobally(sum)
        _ = (
            timelines
            | "Beside" >> beam.Map(lambda kv, total: len(kv[1]), total=beam.pvalue.AsSingleton(total))
            | "Sum2" >> beam.CombineGlobally(sum)
            | beam.Map(print)
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "multi_threading")
