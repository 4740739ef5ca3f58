"""Distribution strategies for `python -m dnr_tf.train --strategy`.

- `default`: one device, no strategy (what runs without the flag).
- `mirrored`: `tf.distribute.MirroredStrategy`, one replica per local GPU. On a machine without a
  GPU there is one CPU device, and so one replica, unless `cpu_replicas` splits the CPU into that
  many logical devices (to exercise the distributed path on a laptop or in CI).
- `multi_worker`: `tf.distribute.MultiWorkerMirroredStrategy` over the cluster that `TF_CONFIG`
  describes, as TensorFlow documents it:
      TF_CONFIG='{"cluster": {"worker": ["host0:port", "host1:port"]}, "task": {"type": "worker", "index": 0}}'
  Every worker runs the same command with its own `task.index`; worker 0 (or a `chief` task, if the
  cluster has one) is the chief.

`train.batch_size` is always the global batch: each of R replicas gets batch_size / R lists of it,
the per-replica losses are scaled by 1/R and the gradients summed across replicas, so a step is the
step one process takes on the whole batch. DNR's noise is drawn for the global batch and each
replica keeps its rows (`noise.draw_for_batch`), so the draws do not depend on R either.
"""

from __future__ import annotations

import json
import os
import socket

from dnr_tf.config_io import ConfigError

STRATEGIES = ("default", "mirrored", "multi_worker")


def cluster_spec() -> tuple[dict, str, int]:
    """(cluster, task type, task index) of the TF_CONFIG environment variable; a clear error when it
    is missing or does not describe a task of its cluster."""
    raw = os.environ.get("TF_CONFIG", "")
    if not raw.strip():
        raise ConfigError(
            "--strategy multi_worker needs the TF_CONFIG environment variable, e.g. "
            '\'{"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 0}}\''
        )
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"TF_CONFIG is not JSON ({e.msg} at character {e.pos})") from None
    cluster = spec.get("cluster") if isinstance(spec, dict) else None
    task = spec.get("task") if isinstance(spec, dict) else None
    if not isinstance(cluster, dict) or not cluster:
        raise ConfigError("TF_CONFIG: `cluster` must map task types to lists of host:port addresses")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ConfigError("TF_CONFIG: `task` must give this process's `type` and `index`")
    kind, index = task["type"], task["index"]
    if kind not in cluster:
        raise ConfigError(f"TF_CONFIG: task.type {kind!r} is not a task type of the cluster {sorted(cluster)}")
    if not isinstance(index, int) or not 0 <= index < len(cluster[kind]):
        raise ConfigError(
            f"TF_CONFIG: task.index {index!r} is not an index of cluster.{kind} ({len(cluster[kind])} addresses)"
        )
    return cluster, kind, index


def make_strategy(name: str, cpu_replicas: int = 0):
    """The `tf.distribute` strategy called `name` (see the module docstring). Call it before any other
    TensorFlow work: a multi-worker strategy and logical devices must be set up first."""
    import tensorflow as tf

    if name not in STRATEGIES:
        raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}, not {name!r}")
    if cpu_replicas and name != "mirrored":
        raise ConfigError("--cpu_replicas applies to --strategy mirrored only")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "multi_worker":
        cluster_spec()  # fail here, with the field, rather than deep inside TensorFlow
        return tf.distribute.MultiWorkerMirroredStrategy()
    if cpu_replicas:
        if cpu_replicas < 1:
            raise ConfigError(f"--cpu_replicas must be at least 1, not {cpu_replicas}")
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        # One CPU's cross-device reduction: the NCCL default is for GPUs.
        return tf.distribute.MirroredStrategy(devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
    if not tf.config.list_physical_devices("GPU"):
        print("note: --strategy mirrored found no GPU; training on one CPU replica (see --cpu_replicas)", flush=True)
    return tf.distribute.MirroredStrategy()


def worker_role(name: str) -> tuple[bool, str]:
    """(is the chief, a name for this worker's own files). Only the chief writes the run's files;
    the other workers of a multi-worker run write theirs under `<model_dir>/workers/<name>/`."""
    if name != "multi_worker":
        return True, "chief"
    cluster, kind, index = cluster_spec()
    chief = kind == "chief" or (kind == "worker" and index == 0 and "chief" not in cluster)
    return chief, f"{kind}-{index}"


def local_cluster(workers: int) -> list[str]:
    """TF_CONFIG values for `workers` processes on this machine, on free ports of 127.0.0.1: start one
    `--strategy multi_worker` process with each (how the tests and `bench/distributed_train.py` do)."""
    sockets = [socket.socket() for _ in range(workers)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    finally:
        for s in sockets:
            s.close()
    cluster = {"worker": addresses}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(workers)]
