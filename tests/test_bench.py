"""The benchmark scripts' own logic (their timings are never tested): the ML-1M-size data generator."""

from __future__ import annotations

import collections
import json

import pytest

from bench.pipeline import write_ml1m_like
from pipeline.sources.interactions import parse_movielens


def test_ml1m_like_file_has_the_asked_size_and_parses_as_ratings_dat(tmp_path):
    path = tmp_path / "ratings.dat"
    write_ml1m_like(str(path), users=60, items=120, interactions=3_000, seed=3)
    lines = path.read_text().splitlines()
    assert len(lines) == 3_000
    records = list(parse_movielens("1m")(str(path), [(n, text, None) for n, text in enumerate(lines, 1)]))
    assert not [r for r in records if isinstance(r, dict)], "no line is rejected"
    per_user = collections.defaultdict(list)
    for r in records:
        per_user[r.user].append((r.timestamp, r.item))
    assert len(per_user) == 60 and min(len(v) for v in per_user.values()) >= 20
    for events in per_user.values():
        items = [i for _, i in events]
        times = [t for t, _ in events]
        assert len(set(items)) == len(items), "an item at most once a user"
        assert times == sorted(times) and len(set(times)) == len(times)
        assert all(1 <= i <= 120 for i in items)
    # Deterministic in the seed; another seed, other data.
    again = tmp_path / "again.dat"
    write_ml1m_like(str(again), users=60, items=120, interactions=3_000, seed=3)
    assert again.read_bytes() == path.read_bytes()
    other = tmp_path / "other.dat"
    write_ml1m_like(str(other), users=60, items=120, interactions=3_000, seed=4)
    assert other.read_bytes() != path.read_bytes()


def test_peak_counts_two_n_cubed_and_reports_shares_of_the_measured_peak():
    """The peak's arithmetic and output (its speed is never tested: benchmarks write JSON)."""
    from bench import peak

    assert peak.matmul_flops(3) == 54.0
    measured = peak.measure(n=64, seconds=0.03, warmup=1)
    assert measured["n"] == 64 and set(measured) == {"n", "float32_gflops", "bfloat16_gflops"}
    assert measured["float32_gflops"] > 0 and measured["bfloat16_gflops"] > 0
    got = peak.shares({"a": 50.0}, {"float32_gflops": 200.0, "bfloat16_gflops": 400.0})
    assert got == {"a": {"gflops": 50.0, "share_of_fp32_peak": 0.25, "share_of_bf16_peak": 0.125}}
    assert peak.shares({"a": 1.0}, {})["a"]["share_of_fp32_peak"] is None


def test_peak_cli_writes_json_and_refuses_bad_sizes(tmp_path, capsys):
    import json

    import pytest

    from bench import peak

    out = tmp_path / "peak.json"
    assert peak.main(["--n", "32", "--seconds", "0.03", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["n"] == 32
    with pytest.raises(SystemExit):
        peak.main(["--n", "0", "--output", str(out)])
    assert "--n must be >= 1" in capsys.readouterr().err


def test_profile_groups_an_op_by_the_two_scopes_under_the_call():
    from bench.profile import _scope

    op = "StatefulPartitionedCall/gradient_tape/reranker_1/block_0_1/dense/MatMul"
    assert _scope(op) == "gradient_tape/reranker_1"
    assert _scope("reranker_1/block_0_1/multi_head_attention_1/softmax_1/Softmax") == "reranker_1/block_0_1"
    assert _scope("StatefulPartitionedCall/UnsortedSegmentSum") == "(top level)"
    assert _scope("Equal_1") == "(top level)"


def test_interleaved_latencies_count_the_spikes_of_each_caller():
    import time

    from bench.serving import interleaved

    n = {"calls": 0}

    def spiky():  # every tenth call 10x slower
        n["calls"] += 1
        time.sleep(0.02 if n["calls"] % 10 == 0 else 0.002)

    out = interleaved({"steady": lambda: time.sleep(0.002), "spiky": spiky}, calls=40, warmup=0)
    row = out["spiky"]
    assert row["over_twice_p50"] >= 4 and row["max"] >= 20 and 2 <= row["p50"] < 10, row
    assert row["p50"] <= row["p90"] <= row["p99"] <= row["p99.9"] <= row["max"], row
    assert out["steady"]["max"] < row["max"] or out["steady"]["over_twice_p50"] < 4, out


def test_the_empty_signature_answers_like_an_export_and_computes_nothing():
    import numpy as np
    import tensorflow as tf

    from bench.serving import empty_signature

    empty = empty_signature(k=4)
    scores = np.random.default_rng(0).random((3, 7)).astype("float32")
    out = empty(
        item_ids=tf.ones([3, 7], tf.int64),
        retriever_scores=tf.constant(scores),
        history=tf.ones([3, 2], tf.int64),
        user_id=tf.ones([3], tf.int64),
    )
    assert sorted(out) == ["scores", "top_k_indices", "top_k_item_ids"]
    np.testing.assert_array_equal(out["scores"].numpy(), scores)
    assert out["top_k_item_ids"].shape == (3, 4) and out["top_k_indices"].dtype == tf.int32


def test_repeated_side_by_side_runs_are_summarised_per_ratio():
    from bench.serving import summarize_repeats

    def speedup(scale):
        return {
            "throughput": {
                "1": {"predict_lists": 2.0 * scale, "serving_default": 1.0},
                "256": {"predict_lists": scale},
            },
            "single_request_p50": {"predict_lists": scale},
            "single_request_p99": {"predict_lists": 3.0 * scale},
        }

    out = summarize_repeats([speedup(1.0), speedup(1.5), speedup(1.1)])
    assert out["runs"] == 3
    assert out["throughput"]["1"]["predict_lists"] == {"min": 2.0, "median": 2.2, "max": 3.0}
    assert out["throughput"]["1"]["serving_default"] == {"min": 1.0, "median": 1.0, "max": 1.0}
    assert out["throughput"]["256"]["predict_lists"]["median"] == 1.1
    assert out["single_request_p99"]["predict_lists"]["max"] == 4.5


def test_repeated_side_by_side_runs_keep_each_exports_latencies():
    from bench.serving import summarize_latencies

    def single(p99_model, p99_compare):
        return {
            sig: {
                "model": {"p50": 1.0, "p99": p99_model},
                "compare_model": {"p50": 0.25, "p99": p99_compare},
            }
            for sig in ("predict_lists", "serving_default")
        }

    out = summarize_latencies([single(1.3, 0.46), single(1.9, 0.41), single(1.5, 0.55)])
    assert sorted(out) == ["predict_lists", "serving_default"]
    assert out["predict_lists"]["compare_model"]["p99"] == {"min": 0.41, "median": 0.46, "max": 0.55}
    assert out["serving_default"]["model"]["p99"] == {"min": 1.3, "median": 1.5, "max": 1.9}
    assert out["predict_lists"]["model"]["p50"] == {"min": 1.0, "median": 1.0, "max": 1.0}


def test_repeated_pipeline_runs_are_summarised_per_data_set_and_workers():
    from bench.pipeline import summarize_runs

    def row(dataset, workers, wall, base):
        timings = {"stage1_seconds": wall / 2, "total_seconds": wall}
        return {
            "dataset": dataset,
            "workers": workers,
            "wall_s": wall,
            "stage_timings_s": timings,
            "baseline": {"wall_s": base},
            "speedup": base / wall,
        }

    runs = [
        row("ml1m", 2, 60.0, 90.0),
        row("ml1m", 2, 80.0, 100.0),
        row("ml1m", 2, 70.0, 70.0),
        row("ml1m", 1, 9.0, 9.0),
    ]
    out = summarize_runs(runs)
    assert sorted(out) == ["ml1m-w1", "ml1m-w2"]
    two = out["ml1m-w2"]
    assert two["wall_s"] == {"min": 60.0, "median": 70.0, "max": 80.0}
    assert two["stage1_seconds"]["median"] == 35.0 and two["baseline_wall_s"]["max"] == 100.0
    assert two["speedup"] == {"min": 1.0, "median": 1.25, "max": 1.5}
    assert out["ml1m-w1"]["wall_s"]["median"] == 9.0


def test_pipeline_bench_refuses_fewer_than_one_repeat(capsys):
    import pytest

    from bench import pipeline

    with pytest.raises(SystemExit):
        pipeline.main(["--repeats", "0", "--datasets", "ml1m"])
    assert "--repeats" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--datasets", "ml2m"], "--datasets: unknown ml2m (known: ml100k, ml1m)"),
        (["--datasets", ","], "--datasets: unknown (none given)"),
        (["--workers", "0"], "--workers: comma-separated worker counts of at least 1, not '0'"),
        (["--workers", "two"], "--workers: comma-separated worker counts of at least 1, not 'two'"),
        (["--doubling", "--interactions", "0"], "--interactions: at least 1"),
        (["--baseline", "/nonexistent/tree"], "--baseline: /nonexistent/tree is not a checkout of this project"),
    ],
)
def test_pipeline_bench_refuses_bad_arguments_before_any_work(tmp_path, capsys, args, message):
    from bench import pipeline

    work = tmp_path / "work"
    with pytest.raises(SystemExit):
        pipeline.main([*args, "--work_dir", str(work), "--output", str(tmp_path / "out.json")])
    assert message in capsys.readouterr().err
    assert not work.exists() and not (tmp_path / "out.json").exists(), "nothing measured, nothing written"


@pytest.mark.parametrize("flag", ["--rounds", "--steps", "--batches"])
def test_training_bench_refuses_no_rounds_steps_or_batches_before_any_work(synthetic_data, tmp_path, capsys, flag):
    from bench import train_cost

    out = tmp_path / "out.json"
    with pytest.raises(SystemExit):
        train_cost.main(["--data_dir", str(synthetic_data[0]), "--output", str(out), flag, "0"])
    assert f"{flag}: at least 1" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "bench, args",
    [
        ("profile", ["--calls", "0"]),
        ("profile", ["--serving_batch", "0"]),
        ("bf16_export", ["--rounds", "0"]),
        ("distributed_train", ["--epochs", "0"]),
        ("serving_c_api", ["--block", "0"]),
    ],
)
def test_benches_refuse_a_count_below_one_before_any_work(synthetic_data, tmp_path, capsys, bench, args):
    import importlib

    data_dir = str(synthetic_data[0])
    paths = {
        "profile": ["--data_dir", data_dir, "--run_dir", str(tmp_path)],
        "bf16_export": ["--data_dir", data_dir, "--run_dir", str(tmp_path)],
        "distributed_train": ["--data_dir", data_dir, "--work_dir", str(tmp_path / "work")],
        "serving_c_api": ["--data_dir", data_dir, "--model", str(tmp_path)],
    }[bench]
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit):
        importlib.import_module(f"bench.{bench}").main([*paths, *args, "--output", str(out)])
    assert f"{args[0]}: at least 1" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "work").exists()


def test_serving_refuses_repeats_without_a_second_export(tmp_path, capsys):
    import pytest

    from bench import serving

    for bad in (["--repeats", "3"], ["--repeats", "0", "--compare_model", str(tmp_path)]):
        with pytest.raises(SystemExit):
            serving.main(["--model", str(tmp_path), "--data_dir", str(tmp_path), *bad])
        assert "--repeats" in capsys.readouterr().err


def test_profile_refuses_an_unknown_case_before_any_work(tmp_path, capsys):
    import pytest

    from bench import profile

    (tmp_path / "schema.json").write_text("{}")
    with pytest.raises(SystemExit):
        profile.main(["--data_dir", str(tmp_path), "--run_dir", str(tmp_path), "--cases", "serving,bogus"])
    assert "--cases: unknown bogus (known: serving, direct, heuristic, model_based)" in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()


def test_precision_rows_summary_pairs_seeds_and_lists():
    import numpy as np

    from bench.precision_rows import summarize

    rng = np.random.default_rng(0)
    study = {("a", s): {"per_list_test_ndcg": rng.random(40).tolist()} for s in (0, 1, 2)}
    per_list = {}
    for s in (0, 1, 2):
        values = rng.random(40)
        per_list[f"fp32_a_s{s}"] = values.tolist()
        per_list[f"bf16_a_s{s}"] = (values + 0.05).tolist()
    out = summarize(per_list, study, ["a"], [0, 1, 2], resamples=200)["a"]
    d = out["mixed_minus_float32"]
    assert abs(d["mean"] - 0.05) < 1e-12 and abs(d["low"] - 0.05) < 1e-12 and d["p_holm"] < 0.05
    assert np.allclose(out["per_seed"]["mixed_bfloat16"], np.array(out["per_seed"]["float32"]) + 0.05)
    study_mean = np.mean([study["a", s]["per_list_test_ndcg"] for s in (0, 1, 2)])
    assert abs(out["study"]["mean"] - study_mean) < 1e-12
    assert abs(out["float32_minus_study"]["mean"] - (out["float32"]["mean"] - study_mean)) < 1e-12


def test_precision_rows_refuses_a_missing_run_and_other_records_before_any_work(synthetic_data, tmp_path, capsys):
    from bench.precision_rows import main

    data = str(synthetic_data[0])
    args = ["--study", str(tmp_path / "study"), "--dataset", "syn", "--rows", "r", "--seeds", "0", "--data_dir", data]
    args += ["--work_dir", str(tmp_path / "work"), "--output", str(tmp_path / "out.json")]
    (tmp_path / "study" / "runs").mkdir(parents=True)
    with pytest.raises(SystemExit):
        main(args)
    assert "r__syn__s0/result.json not found" in capsys.readouterr().err
    run = tmp_path / "study" / "runs" / "r__syn__s0"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"records": "000000000000", "config": {}}))
    with pytest.raises(SystemExit):
        main(args)
    assert "are not the study's (000000000000)" in capsys.readouterr().err
    assert not (tmp_path / "work").exists() and not (tmp_path / "out.json").exists()


def test_phase_switch_figures_split_the_first_and_the_switch_epoch_from_the_others():
    from bench.phase_switch import epoch_figures

    got = epoch_figures([3.0, 1.0, 1.2, 4.0, 1.5, 1.3, 1.4], [0, 0, 0, 1, 1, 1, 1])
    assert got["first_epoch_s"] == 3.0 and got["switch_epoch_s"] == 4.0
    assert got["heuristic_epoch_s"] == pytest.approx(1.1) and got["model_based_epoch_s"] == pytest.approx(1.4)
    assert got["first_extra_s"] == pytest.approx(1.9) and got["switch_extra_s"] == pytest.approx(2.6)
    # Model-based from the first epoch: no switch; the first epoch's extra is over the model-based ones.
    got = epoch_figures([3.0, 1.5, 1.7], [1, 1, 1])
    assert got["switch_epoch_s"] is None and got["switch_extra_s"] is None and got["heuristic_epoch_s"] is None
    assert got["first_extra_s"] == pytest.approx(1.4)
    got = epoch_figures([3.0, 1.0], [0, 0])  # never switches
    assert got["switch_epoch_s"] is None and got["model_based_epoch_s"] is None and got["first_extra_s"] == 2.0
    with pytest.raises(ValueError, match="3 epoch times for 2 epoch phases"):
        epoch_figures([1.0, 1.0, 1.0], [0, 1])


def test_phase_switch_summary_and_fingerprint_tell_a_changed_run(tmp_path):
    import h5py
    import numpy as np

    from bench.phase_switch import run_fingerprint, summarize

    def write_run(path, weight, history):
        path.mkdir()
        metrics = {"history": history, "valid": {"ndcg@6": 0.1}, "test": {}, "best_epoch": 1, "train_seconds": 9.0}
        (path / "metrics.json").write_text(json.dumps(metrics))
        with h5py.File(path / "best.weights.h5", "w") as f:
            f["layers/dense/vars/0"] = np.array([1.0, weight], dtype="float32")

    write_run(tmp_path / "a", 2.0, {"loss": [0.5]})
    write_run(tmp_path / "b", 2.0, {"loss": [0.5]})
    write_run(tmp_path / "c", np.nextafter(np.float32(2.0), np.float32(3.0)), {"loss": [0.5]})
    write_run(tmp_path / "d", 2.0, {"loss": [0.5000001]})
    prints = {name: run_fingerprint(str(tmp_path / name)) for name in "abcd"}
    assert prints["a"] == prints["b"], "timings aside, the same run"
    assert len(set(prints.values())) == 3, "one bit of a weight, or a history value, changes it"

    rows = [
        {"train_s": 10.0, "switch_extra_s": 0.1, "train_speedup": 1.2, "same_run": True},
        {"train_s": 11.0, "switch_extra_s": None, "train_speedup": 1.1, "same_run": False},
    ]
    rows[0]["baseline"], rows[1]["baseline"] = {"train_s": 12.0}, {"train_s": 12.1}
    summary = summarize(rows)
    assert summary["train_s"] == {"min": 10.0, "median": 10.5, "max": 11.0}
    assert summary["switch_extra_s"] == {"min": 0.1, "median": 0.1, "max": 0.1}
    assert summary["baseline_train_s"]["max"] == 12.1 and summary["train_speedup"]["min"] == 1.1
    assert summary["same_run"] is False


@pytest.mark.parametrize(
    "args, message",
    [
        (["--repeats", "0"], "--repeats: at least 1"),
        (["--baseline", "/nonexistent/tree"], "--baseline: /nonexistent/tree is not a checkout of this project"),
        (["--config", "/nonexistent.yaml"], "--config: /nonexistent.yaml not found"),
    ],
)
def test_phase_switch_bench_refuses_bad_arguments_before_any_work(synthetic_data, tmp_path, capsys, args, message):
    from bench import phase_switch

    work, out = tmp_path / "work", tmp_path / "out.json"
    with pytest.raises(SystemExit):
        phase_switch.main(["--data_dir", str(synthetic_data[0]), *args, "--work_dir", str(work), "--output", str(out)])
    assert message in capsys.readouterr().err
    assert not work.exists() and not out.exists()


def test_phase_switch_bench_refuses_a_folder_without_the_pipelines_output(tmp_path, capsys):
    from bench import phase_switch

    with pytest.raises(SystemExit):
        phase_switch.main(["--data_dir", str(tmp_path), "--output", str(tmp_path / "out.json")])
    assert f"--data_dir: {tmp_path}/schema.json not found" in capsys.readouterr().err
