"""One DNR train step on one process and on two mirrored CPU replicas, compared (run by test_distribute).

    python tests/distributed_step.py DATA_DIR MODEL_BASED(0|1) [MODEL_BASED ...]

Splits the CPU into two logical devices before TensorFlow starts, builds the smoke model twice from
the same seed (once plainly, once under a 2-replica MirroredStrategy), and prints one JSON line per
MODEL_BASED given (one TensorFlow start-up for both): the largest differences, over one batch, of x'
(the noise), the losses, and the gradient summed over the replicas (what the optimizer applies)
against the one-process gradient.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dnr_tf import config_io, distribute  # noqa: E402

STRATEGY = distribute.make_strategy("mirrored", cpu_replicas=2)

import tensorflow as tf  # noqa: E402

from dnr_tf import schema as schema_lib  # noqa: E402
from dnr_tf import train as train_lib  # noqa: E402
from dnr_tf.config import ExperimentConfig  # noqa: E402
from dnr_tf.model import targets  # noqa: E402


def main(data_dir: str, model_based: bool) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = config_io.load_yaml(os.path.join(root, "configs", "smoke.yaml"))
    data["model"]["dropout"] = 0.0
    if model_based:  # the generator's gradient from the same step, to compare it too
        data["dnr"]["generator_update"] = "simultaneous"
    cfg = config_io.from_dict(ExperimentConfig, data)
    schema = schema_lib.load_schema(data_dir)
    features, labels = next(iter(train_lib.datasets(data_dir, cfg, schema)[0]))
    vocab = train_lib.read_vocab(data_dir)
    one = train_lib.build_model(cfg, vocab, schema, features)
    with STRATEGY.scope():
        two = train_lib.build_model(cfg, vocab, schema, features)
    one.set_sampler_phase(model_based)
    two.set_sampler_phase(model_based)

    z = targets(labels)[1]
    x_one = one.sample_x(features, z)
    losses_one, grads_one, gen_one = one.compute_step(features, labels)

    batch = next(iter(STRATEGY.experimental_distribute_dataset(tf.data.Dataset.from_tensors((features, labels)))))

    traces = []

    @tf.function
    def replicated(features, labels):
        traces.append(1)

        def step(features, labels):
            ctx = tf.distribute.get_replica_context()
            x = two.sample_x(features, targets(labels)[1])
            losses, grads, gen = two.compute_step(features, labels)
            summed = ctx.all_reduce("sum", [g for g in grads + (gen or [])])
            mean = ctx.all_reduce("mean", [losses["l_direct"], losses["l_z"], losses["l_adv"], losses["l_x"]])
            return x, mean, summed

        return STRATEGY.run(step, args=(features, labels))

    x_two, losses_two, grads_two = replicated(*batch)
    x_two = tf.concat(STRATEGY.experimental_local_results(x_two), axis=0)
    losses_two = [float(v) for v in STRATEGY.experimental_local_results(losses_two)[0]]
    grads_two = STRATEGY.experimental_local_results(grads_two)[0]
    grads_one = list(grads_one) + list(gen_one or [])
    switched = None
    if not model_based:
        # The alternating update reads the phase in the graph on two replicas too: after the switch,
        # the same trace draws the generator's x', as one process does.
        one.set_sampler_phase(True)
        two.set_sampler_phase(True)
        x_switched = tf.concat(STRATEGY.experimental_local_results(replicated(*batch)[0]), axis=0)
        switched = float(tf.reduce_max(tf.abs(one.sample_x(features, z) - x_switched)))
    return {
        "phase_in_graph": bool(two._phase_in_graph),
        "traces": len(traces),
        "switched_noise": switched,
        "replicas": int(STRATEGY.num_replicas_in_sync),
        "generator_grads": len(gen_one or []),
        "noise": float(tf.reduce_max(tf.abs(x_one - x_two))),
        "losses": max(abs(float(losses_one[k]) - v) for k, v in zip(("l_direct", "l_z", "l_adv", "l_x"), losses_two)),
        "l_z": float(losses_one["l_z"]),
        "gradients": max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(grads_one, grads_two)),
        "gradient_scale": max(float(tf.reduce_max(tf.abs(a))) for a in grads_one),
    }


if __name__ == "__main__":
    for mode in sys.argv[2:]:
        print(json.dumps({"model_based": mode == "1", **main(sys.argv[1], mode == "1")}), flush=True)
