"""dnr-tf: the Denoising Neural Reranker on TensorFlow 2 / Keras 3, with a Beam pipeline."""

from setuptools import find_packages, setup

setup(
    name="dnr-tf",
    version="0.1.0",
    description="Denoising Neural Reranker (DNR) for multi-stage recommenders: Keras 3 models, "
    "an Apache Beam data pipeline and TF Serving export.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["dnr_tf", "dnr_tf.*", "pipeline", "pipeline.*"]),
    install_requires=[
        "tensorflow-cpu==2.21.0",
        "keras==3.15.1",
        "keras-rs==0.4.0",
        "apache-beam==2.77.0",
        "google-crc32c",  # TFRecord checksums (pipeline.stages._tfrecord)
        "tensorflow-datasets",
        # tensorflow-datasets 4.9.10 imports it to download a data set (etils' `epath` extra no longer
        # pulls it): without it, `--source tfds` failed with ModuleNotFoundError before any download.
        "importlib_resources",
        "tensorboard",
        "numpy",
        "pyyaml",
        "scipy",  # the study's paired t-tests
        "matplotlib",  # the study's figures
    ],
    extras_require={
        # pytest < 9: pytest 9 derives a node id from `Item._id`, so xdist 3.8's `--dist loadgroup`
        # (which rewrites `Item._nodeid`) silently schedules every test alone and the suite's shared
        # fixtures are built on both workers (tests/test_suite_setup.py checks it).
        "test": ["pytest>=8,<9", "pytest-xdist", "ruff"],
    },
    license="Apache-2.0",
)
