"""MovieLens from tensorflow-datasets (`movielens/100k-ratings`, `movielens/1m-ratings`).

Users with network get ML-1M with `--source tfds --input movielens/1m-ratings`. `prepare` checks
the name and has TFDS download and prepare the data set once, in the driver, before the pipeline
starts (TFDS caches it under `tfds_data_dir`), so that a name or download that fails is one line
before any work. The data set is then read inside a Beam worker (one that does not see the driver's
`tfds_data_dir` prepares its own copy, as before); each example's index stands in for the line number
of rejects.
"""

from __future__ import annotations

from pipeline.sources.interactions import make_interaction

DEFAULT_NAME = "movielens/100k-ratings"
SUPPORTED = (
    "movielens/100k-ratings",
    "movielens/1m-ratings",
    "movielens/20m-ratings",
    "movielens/25m-ratings",
    "movielens/latest-small-ratings",
)


def prepare(name: str, data_dir: str | None = None, progress=print) -> None:
    """Refuses a name outside `SUPPORTED`; downloads and prepares the data set unless TFDS has it.

    Raises:
        ValueError: one line naming the data set and why it could not be prepared.
    """
    if name not in SUPPORTED:
        raise ValueError(f"--input {name}: not a TFDS MovieLens ratings data set (supported: {', '.join(SUPPORTED)})")
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return
    progress(f"[pipeline] TFDS {name}: downloading and preparing it into {builder.data_dir} (once) ...")
    try:
        builder.download_and_prepare()
    except Exception as e:  # network, disk or TFDS errors: each would otherwise surface inside Beam
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(
            f"TFDS {name} could not be downloaded and prepared into {builder.data_dir} ({type(e).__name__}: "
            f"{first}); without network, copy a prepared TFDS folder there, or name another with "
            "--set tfds_data_dir=DIR"
        ) from None


def read_tfds(name: str, data_dir: str | None = None, download: bool = True):
    """Yields Interactions or reject dicts of a TFDS MovieLens ratings data set."""
    import tensorflow_datasets as tfds

    ds = tfds.load(name, split="train", data_dir=data_dir, download=download, shuffle_files=False)
    where = f"tfds:{name}"
    for index, ex in enumerate(tfds.as_numpy(ds)):

        def text(v):
            return v.decode("utf-8") if isinstance(v, bytes) else str(v)

        yield make_interaction(
            where,
            index,
            text(ex["user_id"]),
            text(ex["movie_id"]),
            str(int(ex["timestamp"])),
            str(float(ex["user_rating"])),
        )
