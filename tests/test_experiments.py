"""The study runner on a tiny plan: runs, resume without redoing, the report."""

import json
import os

import yaml

from dnr_tf.experiments import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_plan_runs_resumes_and_reports(synthetic_data, tmp_path):
    data_dir, _ = synthetic_data
    plan = {
        "name": "tiny",
        "seeds": [0],
        "set": {"train.epochs": 1, "model.hidden_dim": 16, "model.embedding_dim": 16},
        "datasets": {"synthetic": {"dir": str(data_dir)}},
        "robustness": ["shuffle", "gauss_0.1"],
        "rows": [
            {
                "name": "prm_concat",
                "config": os.path.join(ROOT, "configs/ml100k_prm_concat.yaml"),
                "tables": ["t1"],
                "datasets": ["synthetic"],
            },
            {
                "name": "w_c",
                "config": os.path.join(ROOT, "configs/ml100k_w_b.yaml"),
                "set": {"dnr.heuristic": "calibrated"},
                "tables": ["t1"],
                "datasets": ["synthetic"],
            },
        ],
    }
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(yaml.safe_dump(plan))
    out = tmp_path / "out"
    md = tmp_path / "docs" / "results.md"
    args = ["--plan", str(plan_path), "--out", str(out), "--results_md", str(md)]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert sorted(r["run"] for r in results["runs"]) == ["prm_concat__synthetic__s0", "w_c__synthetic__s0"]
    for r in results["runs"]:
        assert r["best_epoch"] == 1 and 0 < r["test"]["ndcg@6"] <= 1
        assert (r["epochs_run"], r["max_epochs"], r["stopped_early"]) == (1, 1, False)
        assert set(r["robustness"]) == {"clean", "shuffle", "gauss_0.1"}
        assert len(r["per_list_test_ndcg"]) == results["baselines"]["synthetic"]["lists"]
        assert r["config"]["train"]["seed"] == 0 and r["wall_seconds"] > 0
    assert "oracle_order" in results["baselines"]["synthetic"]["metrics"]
    text = md.read_text()
    # prm_concat is the only non-DNR row: the bold reference that w_c is tested against.
    assert "| **prm_concat** | 1 |" in text and "| w_c | 1 |" in text
    assert "oracle" in text and "drop, shuffle" in text

    # Resume: finished runs are not redone; a missing result is.
    first = out / "runs" / "prm_concat__synthetic__s0" / "result.json"
    second = out / "runs" / "w_c__synthetic__s0" / "result.json"
    stamp = first.stat().st_mtime_ns
    second.unlink()
    assert main(args) == 0
    assert first.stat().st_mtime_ns == stamp
    assert second.exists()
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 2
