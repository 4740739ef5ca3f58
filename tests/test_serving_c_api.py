"""bench.serving_c_api: one request through TensorFlow's C API, as a C++ server calls the SavedModel."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    from bench.serving_c_api import build

    return build(str(tmp_path_factory.mktemp("c_api")))


def test_the_c_api_serves_what_python_does_and_times_every_case(smoke_run, binary):
    from bench.serving_c_api import run

    export = str(smoke_run["export"])
    result = run(
        export, str(smoke_run["data_dir"]), 40, 5, compare_model=export, peak_size=(256, 0.05), block=10, binary=binary
    )
    cases = [f"{m}-{s}" for m in ("model", "compare_model") for s in ("predict_lists", "serving_default")]
    cases.append("empty_signature-predict_lists")
    assert list(result["outputs_match_python"]) == cases
    for check in result["outputs_match_python"].values():
        assert check["max_abs_score_diff"] <= 1e-5 and check["same_top_k_item_ids"]
    assert result["calls"] == 40 and result["block"] == 10 and result["block_warmup"] == 5
    (row_set,) = result["runs_ms"]
    for name in cases:
        row = row_set[name]
        assert math.isfinite(row["max"]) and 0 < row["p50"] <= row["p99"] <= row["max"]
    # The same export on both sides: the ratios are of like with like.
    for sig in ("predict_lists", "serving_default"):
        assert 0.2 < result["ratio_model_over_compare_model"][sig]["p50"]["median"] < 5


def test_the_output_check_fails_when_the_c_process_computed_something_else(smoke_run, binary, tmp_path):
    from bench.serving_c_api import cases, check_outputs, requests, run_c, write_manifest

    export, data_dir = str(smoke_run["export"]), str(smoke_run["data_dir"])
    request = requests(data_dir)
    case_list = [c for c in cases({"model": export}, "unused") if c[0].startswith("model-")]
    # The C process is given the request with its retriever scores reversed; Python the real one.
    dense = dict(request["predict_lists"])
    dense["retriever_scores"] = tf.reverse(dense["retriever_scores"], axis=[1])
    outputs = write_manifest(str(tmp_path), case_list, {**request, "predict_lists": dense})
    times = run_c(binary, str(tmp_path), len(case_list), 3, 1, 3)
    assert times.shape == (2, 3) and np.all(times > 0)
    with pytest.raises(RuntimeError, match="model-predict_lists: the C API's outputs differ from Python's"):
        check_outputs(str(tmp_path), case_list, outputs, request)
    # With the real request on both sides the same check passes.
    outputs = write_manifest(str(tmp_path), case_list, request)
    run_c(binary, str(tmp_path), len(case_list), 3, 1, 3)
    assert set(check_outputs(str(tmp_path), case_list, outputs, request)) == {c[0] for c in case_list}


def test_the_c_api_bench_refuses_bad_arguments_before_any_work(tmp_path, capsys):
    from bench import serving, serving_c_api

    with pytest.raises(SystemExit):
        serving_c_api.main(["--model", str(tmp_path / "missing"), "--data_dir", str(tmp_path)])
    assert "--model: no saved_model.pb in" in capsys.readouterr().err
    (tmp_path / "saved_model.pb").write_bytes(b"")
    for main in (serving_c_api.main, serving.main):  # a folder without test records: both benchmarks
        with pytest.raises(SystemExit):
            main(["--model", str(tmp_path), "--data_dir", str(tmp_path)])
        assert "--data_dir: no test-*.tfrecord.gz in" in capsys.readouterr().err
    for flag, value in (("--block", "0"), ("--repeats", "0"), ("--calls", "0"), ("--block_warmup", "-1")):
        with pytest.raises(SystemExit):
            serving_c_api.main(["--model", str(tmp_path), "--data_dir", str(tmp_path), flag, value])
        assert flag in capsys.readouterr().err
