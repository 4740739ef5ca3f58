"""The machine's measured matrix-multiply peak, FP32 and bf16, for the benchmarks' ratios (issue 17).

A datasheet peak (clock x FLOP a cycle) is a guess on a shared, turbo-clocked virtual machine; the
benchmarks instead time, in their own process and just before or after their own figures, a large
square matmul in each precision (`measure`), and report every achieved GFLOP/s also as a share of
that measured peak (`shares`). FLOPs of an n x n by n x n product: 2 n^3.

    python -m bench.peak            # prints and writes bench/results/peak.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench import write_json

DTYPES = ("float32", "bfloat16")


def matmul_flops(n: int) -> float:
    return 2.0 * n**3


def measure(n: int = 2048, seconds: float = 2.0, dtypes=DTYPES, warmup: int = 2) -> dict:
    """GFLOP/s of `n` x `n` matmuls in each dtype: the best of rounds of about `seconds` each.

    Returns {"n": n, "<dtype>_gflops": float, ...}; the best round, since on a shared machine a
    slower round measures the neighbours, not the chip.
    """
    import tensorflow as tf

    out = {"n": n}
    rng = np.random.default_rng(0)
    for dtype in dtypes:
        a = tf.constant(rng.standard_normal((n, n)), dtype=dtype)
        b = tf.constant(rng.standard_normal((n, n)), dtype=dtype)
        step = tf.function(lambda a=a, b=b: tf.reduce_sum(tf.linalg.matmul(a, b)))
        for _ in range(warmup):
            step().numpy()
        best = 0.0
        for _ in range(3):
            calls, start = 0, time.perf_counter()
            while True:
                step().numpy()  # the sum forces the product; it costs n^2, not n^3
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= seconds / 3:
                    break
            best = max(best, calls * matmul_flops(n) / elapsed / 1e9)
        out[f"{dtype}_gflops"] = best
    return out


def shares(achieved_gflops: dict, peak: dict) -> dict:
    """Each achieved GFLOP/s and its share of the measured FP32 and bf16 peaks (None where a peak is missing):
    {name: {"gflops": g, "share_of_fp32_peak": s, "share_of_bf16_peak": s}}."""
    result = {}
    for name, gflops in achieved_gflops.items():
        result[name] = {
            "gflops": gflops,
            "share_of_fp32_peak": gflops / peak["float32_gflops"] if peak.get("float32_gflops") else None,
            "share_of_bf16_peak": gflops / peak["bfloat16_gflops"] if peak.get("bfloat16_gflops") else None,
        }
    return result


def main(argv=None) -> int:
    from dnr_tf import quiet

    quiet.configure(quiet.verbose_flag(argv))  # only the benchmark's own output
    parser = argparse.ArgumentParser(prog="python -m bench.peak", description=__doc__.split("\n")[0])
    parser.add_argument("--verbose", action="store_true", help="TensorFlow's and Beam's own log lines too")
    parser.add_argument("--n", type=int, default=2048, help="matrix size")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per dtype")
    parser.add_argument("--output", default="bench/results/peak.json")
    args = parser.parse_args(argv)
    if args.n < 1 or args.seconds <= 0:
        parser.error("--n must be >= 1 and --seconds > 0")
    peak = measure(args.n, args.seconds)
    write_json(args.output, peak)
    fp32, bf16 = peak["float32_gflops"], peak["bfloat16_gflops"]
    print(f"matmul {args.n}x{args.n}: FP32 {fp32:.1f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
