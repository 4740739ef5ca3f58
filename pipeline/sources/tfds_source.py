"""MovieLens from tensorflow-datasets (`movielens/100k-ratings`, `movielens/1m-ratings`).

Users with network get ML-1M with `--source tfds --input movielens/1m-ratings`. The data set is
read inside a Beam worker (TFDS caches it under `tfds_data_dir`); each example's index stands in
for the line number of rejects.
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
