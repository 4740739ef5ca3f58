"""The study runner on a tiny plan: runs, resume without redoing, the report."""

import json
import os
import sys

import pytest
import yaml

from dnr_tf import config_io, experiments, tuning
from dnr_tf.experiments import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_plan_runs_resumes_and_reports(synthetic_data, tmp_path, capsys):
    data_dir, _ = synthetic_data
    plan = {
        "name": "tiny",
        "seeds": [0],
        "tune_trials": 1,  # one real trial a row; its seed-0 run reuses it
        "set": {"train.epochs": 1, "model.hidden_dim": 16, "model.embedding_dim": 16},
        "datasets": {"synthetic": {"dir": str(data_dir)}},
        "robustness": ["shuffle", "gauss_0.1"],
        "rows": [
            {
                "name": "prm_concat",
                "config": os.path.join(ROOT, "configs/ml100k_prm_concat.yaml"),
                "tables": ["t1"],
                "datasets": ["synthetic"],
                "arm": "direct",
                "tune": {"space": {"train.learning_rate": {"loguniform": [1e-3, 3e-3]}}},
            },
            {
                "name": "w_c",
                "config": os.path.join(ROOT, "configs/ml100k_w_b.yaml"),
                "set": {"dnr.heuristic": "calibrated"},
                "tables": ["t1"],
                "datasets": ["synthetic"],
                "arm": "calibrated",
                "reference": "prm_concat",
                "tune": {"space": {"dnr.lambda_m": {"uniform": [0.3, 0.7]}}},
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
        ids = r["per_list_test_ids"]
        assert len(ids) == len(set(ids)) == len(r["per_list_test_ndcg"]) and len(r["records"]) == 12
        assert r["config"]["train"]["seed"] == 0 and r["wall_seconds"] > 0
        assert r["reused_trial"] == r["run"].replace("__s0", "__t0") and r["tuning"]["budget"] == 1
        ((key, value),) = r["tuning"]["chosen"].items()
        section, name = key.split(".")
        assert r["config"][section][name] == value and r["arm"] in ("direct", "calibrated")
        assert (out / "runs" / r["run"] / "best.weights.h5").exists()  # the trial's model, copied
    assert [t["run"] for t in results["trials"]] == ["prm_concat__synthetic__t0", "w_c__synthetic__t0"]
    assert "oracle_order" in results["baselines"]["synthetic"]["metrics"]
    text = md.read_text()
    # prm_concat is the only non-DNR row: the bold reference that w_c is tested against.
    assert "| **prm_concat** | 1 |" in text and "| w_c | 1 |" in text
    assert "oracle" in text and "drop, shuffle" in text

    # Resume: finished runs are not redone; a missing result is (a trial, and the seed run after it).
    first = out / "runs" / "prm_concat__synthetic__s0" / "result.json"
    second = out / "runs" / "w_c__synthetic__s0" / "result.json"
    trial = out / "runs" / "w_c__synthetic__t0" / "result.json"
    stamp = first.stat().st_mtime_ns
    second.unlink()
    trial.unlink()
    assert main(args) == 0
    assert first.stat().st_mtime_ns == stamp
    assert second.exists() and trial.exists()
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 2

    # Every run records what it ran on; a run of another code version is never collected with them.
    from dnr_tf import provenance

    for r in json.loads((out / "results.json").read_text())["runs"]:
        assert r["code"] == provenance.code_fingerprint() and len(r["data"]) == 12
    old = json.loads(second.read_text())
    second.write_text(json.dumps({**old, "code": "0123456789ab"}))
    assert main(args) == 2
    assert "different versions" in capsys.readouterr().err


# Tuning: the runner's logic with training stubbed out (fast); the real tiny run is above.

PRM = os.path.join(ROOT, "configs/ml100k_prm_concat.yaml")
DNR_B = os.path.join(ROOT, "configs/ml100k_dnr_b.yaml")
SPACE = {
    "train.learning_rate": {"loguniform": [1e-4, 1e-2]},
    "model.hidden_dim": {"choice": [16, 32, 64]},
    "train.weight_decay": {"uniform": [0.0, 0.1]},
    "dnr.lambda_e": {"int": [1, 4]},
}


def fake_train(calls):
    """Validation rises with the learning rate, test falls with it: selection must read validation."""

    def train_and_evaluate(cfg, data_dir, model_dir, robustness, seed):
        calls.append(os.path.basename(model_dir))
        os.makedirs(model_dir, exist_ok=True)
        valid = cfg.train.learning_rate * 10 + seed * 1e-6
        return {
            "best_epoch": 1,
            "valid": {"ndcg@6": valid},
            "test": {"ndcg@6": 1 - valid},
            "robustness": {},
            "per_list_test_ndcg": [],
            "per_list_test_ids": [],
            "seconds_per_epoch": [0.0],
        }

    return train_and_evaluate


@pytest.fixture
def stubbed(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(experiments, "train_and_evaluate", fake_train(calls))
    monkeypatch.setattr(experiments, "baselines", lambda plan, out, build=True: {})
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "schema.json").write_text("{}")
        (tmp_path / name / "stats.json").write_text("{}")
    return calls


def write_plan(tmp_path, rows, **extra):
    plan = {
        "name": "tuned",
        "seeds": [0, 1],
        "tune_trials": 3,
        "tune_seed": 0,
        "datasets": {
            "a": {"dir": str(tmp_path / "a"), "label": "A, weak"},
            "b": {"dir": str(tmp_path / "b"), "label": "B, leaky", "leaky": True},
        },
        "rows": rows,
        **extra,
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return str(path)


def tuned_row(name, config=PRM, **extra):
    row = {"name": name, "config": config, "tables": ["headline"], "datasets": ["a"], "arm": "direct"}
    row["tune"] = {"space": {"train.learning_rate": SPACE["train.learning_rate"]}}
    return {**row, **extra}


def test_draws_reproduce_and_lie_in_their_spaces():
    draws = [tuning.draw(SPACE, 0, "dnr_b", "cascade", k) for k in range(40)]
    assert draws == [tuning.draw(SPACE, 0, "dnr_b", "cascade", k) for k in range(40)]
    assert draws[0] != tuning.draw(SPACE, 0, "dnr_b", "beauty", 0) != tuning.draw(SPACE, 1, "dnr_b", "cascade", 0)
    for d in draws:
        assert 1e-4 <= d["train.learning_rate"] <= 1e-2 and 0.0 <= d["train.weight_decay"] <= 0.1
        assert d["model.hidden_dim"] in (16, 32, 64)
        assert isinstance(d["dnr.lambda_e"], int) and 1 <= d["dnr.lambda_e"] <= 4
    # every choice and both int ends are drawn; loguniform spreads over the decades
    assert {d["model.hidden_dim"] for d in draws} == {16, 32, 64} and {d["dnr.lambda_e"] for d in draws} == {1, 2, 3, 4}
    assert sum(d["train.learning_rate"] < 1e-3 for d in draws) >= 10
    with pytest.raises(config_io.ConfigError, match="row x: tune.space.train.learning_rate: loguniform needs lo > 0"):
        tuning.check_space({"train.learning_rate": {"loguniform": [0, 1]}}, "row x: tune")


def test_chosen_trial_is_best_on_validation_and_seeds_use_it(stubbed, tmp_path):
    row = tuned_row("prm", question="Which lr?", reference="prm", tune={"trials": 5, "space": SPACE})
    row["datasets"] = ["a", "b"]
    out = tmp_path / "out"
    assert main(["--plan", write_plan(tmp_path, [row]), "--out", str(out)]) == 0
    # 5 trials on each data set; seed 0 reuses the chosen trial, seed 1 is trained: 12 runs
    assert sorted(stubbed) == sorted([f"prm__{d}__t{k}" for d in "ab" for k in range(5)] + ["prm__a__s1", "prm__b__s1"])
    results = json.loads((out / "results.json").read_text())
    assert results["datasets"]["b"]["label"] == "B, leaky" and results["datasets"]["b"]["leaky"] is True
    assert results["datasets"]["a"]["leaky"] is False and len(results["trials"]) == 10
    for r in results["runs"]:
        on_disk = json.loads((out / "runs" / r["run"] / "result.json").read_text())
        assert on_disk == r
        assert (r["arm"], r["question"], r["reference"]) == ("direct", "Which lr?", "prm")
        t = r["tuning"]
        assert t["budget"] == 5 and t["tuned_on"] == r["dataset"] and t["monitor"] == "ndcg@6" and len(t["trials"]) == 5
        lrs = [x["setting"]["train.learning_rate"] for x in t["trials"]]
        assert t["chosen"]["train.learning_rate"] == max(lrs)  # best on validation, worst on test
        assert t["chosen_trial"] == f"prm__{r['dataset']}__t{lrs.index(max(lrs))}"
        for key, value in t["chosen"].items():
            section, name = key.split(".")
            assert r["config"][section][name] == pytest.approx(value)
        assert r["config"]["train"]["seed"] == r["seed"]
        assert ("reused_trial" in r) == (r["seed"] == 0)
    trial = json.loads((out / "runs" / "prm__a__t0" / "result.json").read_text())
    assert trial["trial"] == 0 and trial["phase"] == "tune" and trial["config"]["train"]["seed"] == 0
    assert trial["setting"] == tuning.draw(SPACE, 0, "prm", "a", 0) and trial["arm"] == "direct"


def test_resume_after_partial_tuning(stubbed, monkeypatch, tmp_path):
    plan = write_plan(tmp_path, [tuned_row("prm")])
    out = tmp_path / "out"
    real = experiments.train_and_evaluate

    def crash_on_third(cfg, data_dir, model_dir, robustness, seed):
        if len(stubbed) == 2:
            raise KeyboardInterrupt
        return real(cfg, data_dir, model_dir, robustness, seed)

    monkeypatch.setattr(experiments, "train_and_evaluate", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        main(["--plan", plan, "--out", str(out)])
    assert stubbed == ["prm__a__t0", "prm__a__t1"]
    monkeypatch.setattr(experiments, "train_and_evaluate", real)
    assert main(["--plan", plan, "--out", str(out)]) == 0
    assert stubbed == ["prm__a__t0", "prm__a__t1", "prm__a__t2", "prm__a__s1"]
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 2


def test_seed_runs_go_data_set_by_data_set_and_seed_by_seed(tmp_path):
    # a study stopped partway has every arm of its first data sets at the same seeds
    rows = [tuned_row("prm"), tuned_row("dnr_b", config=DNR_B, arm="dnr_b")]
    for row in rows:
        row["datasets"] = ["b", "a"]
    plan = experiments.load_plan(write_plan(tmp_path, rows))
    finals = [w.run for w in experiments.works_of(plan, "final")]
    assert finals == [f"{r}__{d}__s{s}" for d in "ab" for s in (0, 1) for r in ("prm", "dnr_b")]
    assert experiments.works_of(plan)[: -len(finals)] == experiments.works_of(plan, "tune")


def test_a_chosen_trial_without_list_ids_is_trained_again(stubbed, tmp_path):
    # trials from before per_list_test_ids (2026-12-05): their lists pair with other seeds' by
    # position only, so the tune seed is trained again rather than copied
    plan = write_plan(tmp_path, [tuned_row("prm")])
    out = tmp_path / "out"
    assert main(["--plan", plan, "--out", str(out), "--phase", "tune"]) == 0
    for k in range(3):
        path = out / "runs" / f"prm__a__t{k}" / "result.json"
        old = json.loads(path.read_text())
        del old["per_list_test_ids"]
        path.write_text(json.dumps(old))
    stubbed.clear()
    assert main(["--plan", plan, "--out", str(out)]) == 0
    assert sorted(stubbed) == ["prm__a__s0", "prm__a__s1"]
    runs = {r["run"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert "reused_trial" not in runs["prm__a__s0"] and "per_list_test_ids" in runs["prm__a__s0"]
    tuned = runs["prm__a__s0"]["tuning"]
    best = max(tuned["trials"], key=lambda t: t["valid"])
    assert tuned["chosen_trial"] == best["run"]  # still chosen on validation
    lr = runs["prm__a__s0"]["config"]["train"]["learning_rate"]
    assert lr == pytest.approx(best["setting"]["train.learning_rate"])


def test_two_shards_give_the_results_of_one(stubbed, tmp_path, capsys):
    rows = [tuned_row("prm"), tuned_row("dnr_b", config=DNR_B, arm="dnr_b"), tuned_row("w_b", arm="x", tune=None)]
    rows[2]["tables"] = ["other"]
    plan = write_plan(tmp_path, rows)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["--plan", plan, "--out", str(one)]) == 0
    single = sorted(stubbed)
    stubbed.clear()
    assert main(["--plan", plan, "--out", str(two), "--shard", "0/2"]) == 0
    assert "wait for trials of other shards" in capsys.readouterr().out
    assert not (two / "results.json").exists()
    assert main(["--plan", plan, "--out", str(two), "--shard", "1/2"]) == 0
    assert main(["--plan", plan, "--out", str(two)]) == 0
    assert sorted(stubbed) == single  # every run trained once, none twice

    def essentials(path):
        data = json.loads((path / "results.json").read_text())
        drop = ("wall_seconds",)
        return [{k: v for k, v in r.items() if k not in drop} for r in data["runs"] + data["trials"]]

    assert essentials(one) == essentials(two)


def test_phases(stubbed, tmp_path, capsys):
    plan = write_plan(tmp_path, [tuned_row("prm")])
    out = tmp_path / "out"
    assert main(["--plan", plan, "--out", str(out), "--dry_run"]) == 0
    assert "runs to train: 3 trials + 1 seed runs (1 reuse a trial)" in capsys.readouterr().out
    assert stubbed == [] and not out.exists()
    assert main(["--plan", plan, "--out", str(out), "--phase", "final"]) == 0
    assert stubbed == []  # the seed runs wait for the trials
    assert main(["--plan", plan, "--out", str(out), "--phase", "tune"]) == 0
    assert stubbed == ["prm__a__t0", "prm__a__t1", "prm__a__t2"]
    assert main(["--plan", plan, "--out", str(out), "--phase", "final"]) == 0
    assert stubbed[3:] == ["prm__a__s1"] and (out / "runs" / "prm__a__s0" / "result.json").exists()


def test_finished_only_collects_a_partial_study_and_says_so(stubbed, tmp_path, capsys):
    plan = write_plan(tmp_path, [tuned_row("prm"), tuned_row("dnr_b", config=DNR_B, arm="dnr_b")])
    out = tmp_path / "out"
    assert main(["--plan", plan, "--out", str(out), "--phase", "tune"]) == 0
    trained = list(stubbed)
    assert main(["--plan", plan, "--out", str(out), "--finished_only", "--shard", "0/2"]) == 2
    assert "--finished_only collects the whole plan" in capsys.readouterr().err
    assert main(["--plan", plan, "--out", str(out), "--finished_only"]) == 0
    assert stubbed == trained, "nothing trained"
    assert "partial: 4 runs of the plan not finished" in capsys.readouterr().out
    summary = json.loads((out / "results.json").read_text())
    assert summary["missing"] == ["prm__a__s0", "dnr_b__a__s0", "prm__a__s1", "dnr_b__a__s1"]
    assert sorted(r["run"] for r in summary["trials"]) == sorted(trained) and summary["runs"] == []

    # Half of the seed runs finish: they are collected, the rest named.
    assert main(["--plan", plan, "--out", str(out), "--phase", "final", "--shard", "0/2"]) == 0
    assert main(["--plan", plan, "--out", str(out), "--finished_only"]) == 0
    summary = json.loads((out / "results.json").read_text())
    done = sorted(r["run"] for r in summary["runs"])
    assert done and sorted(done + summary["missing"]) == sorted(
        ["prm__a__s0", "dnr_b__a__s0", "prm__a__s1", "dnr_b__a__s1"]
    )
    report = (out / "results.md").read_text()
    assert f"**Partial study** (`--finished_only`): {len(summary['missing'])} runs" in report

    from dnr_tf.headline import load_summaries, partial_notice

    (notice, _) = partial_notice(load_summaries([str(out / "results.json")]))
    assert (
        "**Partial study.**" in notice and f"{len(summary['missing'])} runs missing ({summary['missing'][0]}" in notice
    )

    # Once every run has finished, a plain collection has no `missing`.
    assert main(["--plan", plan, "--out", str(out)]) == 0
    assert "missing" not in json.loads((out / "results.json").read_text())


def test_unequal_budgets_refused(stubbed, tmp_path, capsys):
    rows = [tuned_row("prm"), tuned_row("dnr_b", config=DNR_B, arm="dnr_b")]
    rows[1]["tune"] = {**rows[1]["tune"], "trials": 5}
    out = tmp_path / "out"
    assert main(["--plan", write_plan(tmp_path, rows), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: unequal tuning budgets in table headline on data set a: prm 3 trials on a, dnr_b 5 trials on a "
        "(every row of one table gets the same budget)"
    )
    rows[1]["tune"] = None  # an untuned arm beside a tuned one
    assert main(["--plan", write_plan(tmp_path, rows), "--out", str(out)]) == 2
    assert "prm 3 trials on a, dnr_b untuned" in capsys.readouterr().err
    assert stubbed == [] and not out.exists()


def test_from_reuses_another_datasets_setting(stubbed, tmp_path, capsys):
    rows = [tuned_row("prm", datasets=["a", "b"]), tuned_row("dnr_b", config=DNR_B, datasets=["a", "b"])]
    rows[1]["tune"] = {**rows[1]["tune"], "datasets": {"b": {"trials": 1}}}
    plan = write_plan(tmp_path, rows)
    data = yaml.safe_load(open(plan))
    data["datasets"]["b"]["tune"] = {"from": "a"}
    open(plan, "w").write(yaml.safe_dump(data))
    # dnr_b re-tunes on b with 1 trial while prm reuses a's 3: unequal in table headline on b
    assert main(["--plan", plan, "--out", str(tmp_path / "out")]) == 2
    assert "on data set b: prm 3 trials on a, dnr_b 1 trials on b" in capsys.readouterr().err
    del rows[1]["tune"]["datasets"]
    data["rows"] = rows
    data["datasets"]["b"]["seeds"] = [0]  # a data set's own seeds
    open(plan, "w").write(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["--plan", plan, "--out", str(out)]) == 0
    assert not any("__b__t" in c for c in stubbed)  # no trials on b
    results = json.loads((out / "results.json").read_text())
    by_run = {r["run"]: r for r in results["runs"]}
    assert sorted(by_run) == sorted(f"{n}__{d}" for n in ("prm", "dnr_b") for d in ("a__s0", "a__s1", "b__s0"))
    for name in ("prm", "dnr_b"):
        a, b = by_run[f"{name}__a__s0"]["tuning"], by_run[f"{name}__b__s0"]["tuning"]
        assert b["tuned_on"] == "a" and b["chosen"] == a["chosen"] and "reused_trial" not in by_run[f"{name}__b__s0"]
        lr = by_run[f"{name}__b__s0"]["config"]["train"]["learning_rate"]
        assert lr == pytest.approx(a["chosen"]["train.learning_rate"])
    data["datasets"]["a"]["tune"] = {"from": "b"}  # a chain (or a cycle) of reuse
    open(plan, "w").write(yaml.safe_dump(data))
    assert main(["--plan", plan, "--out", str(out)]) == 2
    assert "no row can take it `from` there" in capsys.readouterr().err


def test_light_retune_starts_from_the_other_datasets_choice(stubbed, tmp_path):
    plan = write_plan(tmp_path, [tuned_row("prm", datasets=["a", "b"])], seeds=[0])
    data = yaml.safe_load(open(plan))
    data["datasets"]["b"]["tune"] = {"trials": 2, "from": "a"}
    open(plan, "w").write(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["--plan", plan, "--out", str(out), "--shard", "1/2"]) == 0
    assert main(["--plan", plan, "--out", str(out)]) == 0
    assert sorted(stubbed) == ["prm__a__t0", "prm__a__t1", "prm__a__t2", "prm__b__t0", "prm__b__t1"]
    by_run = {r["run"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    a, b = by_run["prm__a__s0"]["tuning"], by_run["prm__b__s0"]["tuning"]
    assert b["budget"] == 2 and b["tuned_on"] == "b" and b["warm_from"] == "a"
    assert b["described"] == "2 trials on b (trial 0: the choice of 3 trials on a)"
    assert b["trials"][0]["setting"] == a["chosen"]
    assert b["trials"][1]["setting"] == tuning.draw(
        {"train.learning_rate": SPACE["train.learning_rate"]}, 0, "prm", "b", 1
    )
    best = max(b["trials"], key=lambda t: t["valid"])
    assert b["chosen"] == best["setting"] and by_run["prm__b__s0"]["reused_trial"] == best["run"]


class NonFiniteLoss(RuntimeError):
    """Named like dnr_tf.callbacks' error: the runner matches the name."""


def test_a_diverged_trial_is_kept_but_never_chosen(stubbed, monkeypatch, tmp_path):
    plan = write_plan(tmp_path, [tuned_row("prm")], seeds=[0])
    real = experiments.train_and_evaluate
    lrs = [tuning.draw({"train.learning_rate": SPACE["train.learning_rate"]}, 0, "prm", "a", k) for k in range(3)]
    top = max(d["train.learning_rate"] for d in lrs)

    def diverge_at_the_top(cfg, data_dir, model_dir, robustness, seed):
        if cfg.train.learning_rate == pytest.approx(top):
            raise NonFiniteLoss("l_direct is not finite in epoch 1")
        return real(cfg, data_dir, model_dir, robustness, seed)

    monkeypatch.setattr(experiments, "train_and_evaluate", diverge_at_the_top)
    out = tmp_path / "out"
    assert main(["--plan", plan, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    failed = [t for t in results["trials"] if "failed" in t]
    assert len(failed) == 1 and failed[0]["setting"]["train.learning_rate"] == top
    chosen = results["runs"][0]["tuning"]["chosen"]["train.learning_rate"]
    assert chosen == sorted(d["train.learning_rate"] for d in lrs)[1]  # the best that did not diverge


def test_study_plan_loads_with_equal_budgets_and_its_inputs_exist():
    from dnr_tf.experiments import budget_table, load_plan, works_of

    cwd = os.getcwd()
    os.chdir(ROOT)  # the plan's paths are relative to the project root
    try:
        plan = load_plan("configs/study/study.yaml")  # refuses unequal budgets
        for name, ds in plan.datasets.items():
            assert ds.label and (ds.input is None or os.path.exists(ds.input)), name
        assert sorted(n for n, ds in plan.datasets.items() if ds.leaky) == ["beauty_paper", "paper", "sports_paper"]
        arms = {row.arm for row in plan.rows if "headline" in row.tables}
        assert arms == {"direct", "no_score", "dnr_b", "dnr_g", "calibrated"}
        for row in plan.rows:
            if "ablation" in row.tables and row.name != "dnr_b":
                assert row.question and row.reference == "dnr_b" and row.datasets == ("cascade",)
        works = works_of(plan)
        assert sum(w.k is not None for w in works) == 110 and len(works) == 368
        assert budget_table(plan)[-1] == "runs to train: 110 trials + 223 seed runs (35 reuse a trial)"
    finally:
        os.chdir(cwd)


def test_a_shard_waits_for_the_data_set_another_shard_builds(tmp_path):
    """Two shards need one data set: the second waits on the first's pipeline lock, never fails on it."""
    import subprocess
    import threading

    from pipeline import publish

    data = tmp_path / "data"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with open(publish.lock_path(str(data)), "w") as f:
            json.dump({"pid": holder.pid, "host": "h", "started": "now"}, f)

        def other_shard_publishes():
            data.mkdir()
            (data / "schema.json").write_text("{}")

        threading.Timer(0.5, other_shard_publishes).start()
        ds = experiments.Dataset(dir=str(data))  # no pipeline config: building it here would raise
        experiments.ensure_dataset("d", ds, poll_s=0.05)
        assert (data / "schema.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone and nothing was published: the shard builds it itself (here: cannot, and says so).
    with pytest.raises(FileNotFoundError, match="holds no pipeline output"):
        experiments.ensure_dataset("e", experiments.Dataset(dir=str(tmp_path / "other")), poll_s=0.05)


def test_a_shard_that_loses_the_race_for_the_lock_waits_too(tmp_path, monkeypatch):
    """The other shard takes the lock between this one's check and its own pipeline start: the pipeline
    refuses (naming the holder), and the shard waits for that build instead of failing."""
    import subprocess
    import threading

    from pipeline import publish

    data = tmp_path / "data"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    calls = []

    def racing_pipeline(argv):
        calls.append(argv)
        with open(publish.lock_path(str(data)), "w") as f:
            json.dump({"pid": holder.pid, "host": "h", "started": "now"}, f)

        def other_shard_publishes():
            data.mkdir()
            (data / "schema.json").write_text("{}")
            os.remove(publish.lock_path(str(data)))

        threading.Timer(0.5, other_shard_publishes).start()
        raise experiments.BuildError(f"{data} is being written by another run (pid {holder.pid})")

    monkeypatch.setattr(experiments, "_build_data_set", racing_pipeline)
    monkeypatch.setattr(experiments, "check_built_config", lambda name, ds: None)
    try:
        ds = experiments.Dataset(dir=str(data), pipeline="configs/pipeline/synthetic.yaml")
        experiments.ensure_dataset("d", ds, poll_s=0.05)
        assert (data / "schema.json").exists() and len(calls) == 1
    finally:
        holder.kill()
        holder.wait()


def test_fingerprints_follow_training_code_and_data_only(tmp_path):
    import shutil

    from dnr_tf import provenance

    package = tmp_path / "dnr_tf"
    shutil.copytree(provenance.PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    base = provenance.code_fingerprint(str(package))
    assert base == provenance.code_fingerprint(str(package)) and len(base) == 12
    (package / "report.py").write_text((package / "report.py").read_text() + "\n# a table printed otherwise\n")
    assert provenance.code_fingerprint(str(package)) == base, "report-only modules are not training code"
    (package / "model.py").write_text((package / "model.py").read_text() + "\n# any change\n")
    assert provenance.code_fingerprint(str(package)) != base

    same = [{"run": f"r{i}", "dataset": "d", "code": "a", "data": "x"} for i in range(3)]
    provenance.check_one_version(same)
    with pytest.raises(ValueError, match=r"code a: 2 runs \(e.g. r0\), b: 1 runs \(e.g. r9\)"):
        provenance.check_one_version(same[:2] + [{"run": "r9", "dataset": "d", "code": "b", "data": "x"}])
    with pytest.raises(ValueError, match="data set d: data x: 2 runs"):
        provenance.check_one_version(same[:2] + [{"run": "r9", "dataset": "d", "code": "a", "data": "y"}])
    with pytest.raises(ValueError, match="unrecorded: 1 runs"):
        provenance.check_one_version(same + [{"run": "old", "dataset": "d"}])


def test_data_fingerprint_ignores_timings_and_the_input_path_only(tmp_path):
    from dnr_tf import provenance

    stats = {"config": {"input": "/a/u.data", "seed": 0}, "timings": {"total_seconds": 51.4}, "lists": {"kept": 7}}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    base = provenance.data_fingerprint(str(tmp_path))
    rebuilt = {**stats, "config": {"input": "/b/u.data", "seed": 0}, "timings": {"total_seconds": 12.0}}
    (tmp_path / "stats.json").write_text(json.dumps(rebuilt, indent=2))
    assert provenance.data_fingerprint(str(tmp_path)) == base, "the same data, built again elsewhere"
    # Beam sums a mean's parts in the order bundles finish: the last bits of a float may differ.
    stats["splits"] = {"test": {"auc": 0.5411838009772476}}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    base = provenance.data_fingerprint(str(tmp_path))
    summed_otherwise = {**stats, "splits": {"test": {"auc": 0.5411838009772475}}}
    (tmp_path / "stats.json").write_text(json.dumps(summed_otherwise))
    assert provenance.data_fingerprint(str(tmp_path)) == base
    for changed in (
        {**stats, "lists": {"kept": 8}},
        {**stats, "config": {"input": "/a/u.data", "seed": 1}},
        {**stats, "splits": {"test": {"auc": 0.5411838}}},
    ):
        (tmp_path / "stats.json").write_text(json.dumps(changed))
        assert provenance.data_fingerprint(str(tmp_path)) != base


def test_records_fingerprint_sees_order_and_content_not_serialisation(tmp_path):
    """Two builds whose stats agree can still feed training other records, or the same in another
    order (the shuffle is seeded over file order): `records` tells them apart. Protobuf writes a
    record's feature map in a per-process order, so the same records in other bytes hash the same."""
    import tensorflow as tf
    from tensorflow.core.example import example_pb2

    from dnr_tf import provenance

    def example(user, items, keys_order):
        ex = example_pb2.Example()
        for key in keys_order:  # insertion order: what varies between processes
            if key == "user_id":
                ex.features.feature[key].int64_list.value.append(user)
            elif key == "item_ids":
                ex.features.feature[key].int64_list.value.extend(items)
            else:
                ex.features.feature[key].float_list.value.extend([0.5] * len(items))
        return ex.SerializeToString()

    def build(name, rows, keys_order=("user_id", "item_ids", "retriever_scores")):
        d = tmp_path / name
        d.mkdir()
        for split in ("train", "valid", "test"):
            with tf.io.TFRecordWriter(str(d / f"{split}-00000-of-00001.tfrecord.gz"), options="GZIP") as w:
                for user, items in rows[split]:
                    w.write(example(user, items, keys_order))
        return str(d)

    rows = {"train": [(1, [3, 4]), (2, [5, 6])], "valid": [(1, [7])], "test": [(2, [8])]}
    base = provenance.records_fingerprint(build("a", rows))
    assert len(base) == 12
    other_bytes = build("b", rows, keys_order=("retriever_scores", "item_ids", "user_id"))
    assert provenance.records_fingerprint(other_bytes) == base
    reordered = {**rows, "train": rows["train"][::-1]}
    assert provenance.records_fingerprint(build("c", reordered)) != base
    changed = {**rows, "test": [(2, [9])]}
    assert provenance.records_fingerprint(build("d", changed)) != base

    # Collecting: runs that recorded `records` must agree per data set; runs from before it are not compared.
    runs = [{"run": f"r{i}", "dataset": "d", "code": "a", "data": "x", "records": "p"} for i in range(2)]
    provenance.check_one_version(runs + [{"run": "old", "dataset": "d", "code": "a", "data": "x"}])
    with pytest.raises(ValueError, match="data set d: records p: 2 runs"):
        provenance.check_one_version(runs + [{"run": "r9", "dataset": "d", "code": "a", "data": "x", "records": "q"}])


def test_a_missing_input_is_one_line_before_any_run(tmp_path, capsys):
    plan = {
        "name": "p",
        "seeds": [0],
        "datasets": {
            "d": {
                "dir": str(tmp_path / "data"),
                "pipeline": os.path.join(ROOT, "configs/pipeline/ml100k.yaml"),
                "input": str(tmp_path / "missing" / "u.data"),
            }
        },
        "rows": [{"name": "prm", "config": PRM, "datasets": ["d"]}],
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    assert main(["--plan", str(tmp_path / "plan.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data set d: input" in err and "missing/u.data not found" in err, err
    assert not (tmp_path / "data").exists() and not os.listdir(tmp_path / "out" / "runs")


def test_a_failed_build_is_one_line_naming_the_data_set(tmp_path, monkeypatch):
    """Also: the build runs in a process of its own (stage 2's record order depends on the runner's
    state in the process that runs it, `experiments._build_data_set`), never in the shard's."""
    import pipeline.run

    def in_this_process(argv):
        raise AssertionError("a study data set was built in the shard's own process")

    monkeypatch.setattr(pipeline.run, "run", in_this_process)
    bad = tmp_path / "u.data"
    bad.write_text("")  # an empty file: the pipeline refuses it
    ds = experiments.Dataset(
        dir=str(tmp_path / "data"), pipeline=os.path.join(ROOT, "configs/pipeline/ml100k.yaml"), input=str(bad)
    )
    with pytest.raises(ValueError, match=r"^data set d: no interaction survives") as raised:
        experiments.ensure_dataset("d", ds)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "data").exists()


def test_a_data_set_built_with_another_config_is_refused_before_any_run(tmp_path, capsys):
    """A directory the plan names but that holds another build (another retriever, say) is never
    trained on in silence: the keys that differ are named, nothing runs."""
    from pipeline.config import PipelineConfig

    data = tmp_path / "data"
    data.mkdir()
    (data / "schema.json").write_text("{}")
    yaml_cfg = config_io.load_yaml(os.path.join(ROOT, "configs/pipeline/ml100k.yaml"))
    # Built from another input path (not compared) with the YAML as it is.
    built = config_io.to_dict(config_io.from_dict(PipelineConfig, {**yaml_cfg, "input": "elsewhere/u.data"}))
    (data / "stats.json").write_text(json.dumps({"config": built}))
    plan = {
        "name": "p",
        "seeds": [0],
        "datasets": {
            "d": {
                "dir": str(data),
                "pipeline": os.path.join(ROOT, "configs/pipeline/ml100k.yaml"),
                "input": "u.data",
                "pipeline_set": {"retriever.kind": "item2item"},
            }
        },
        "rows": [{"name": "prm", "config": PRM, "datasets": ["d"]}],
    }
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    assert main(["--plan", str(tmp_path / "plan.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "data set d:" in err and "retriever.kind ('mf' built, 'item2item' planned)" in err, err
    assert not os.listdir(tmp_path / "out" / "runs")
    # The plan's own config (here: without the override) passes.
    ds = experiments.Dataset(dir=str(data), pipeline=os.path.join(ROOT, "configs/pipeline/ml100k.yaml"), input="u.data")
    experiments.check_built_config("d", ds)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--shard", "x"], "--shard x: give I/N, two integers (e.g. 0/2)"),
        (["--shard", "1/2/3"], "--shard 1/2/3: give I/N, two integers (e.g. 0/2)"),
        (["--out", "{file}", "--finished_only"], "is a file, not a directory"),
    ],
)
def test_a_bad_shard_or_an_out_that_is_a_file_is_one_line_before_any_work(
    tmp_path, capsys, monkeypatch, extra, message
):
    a_file = tmp_path / "a_file"
    a_file.write_text("a user's file\n")
    monkeypatch.setattr(experiments, "load_plan", lambda *a: pytest.fail("the plan was read before the check"))
    args = ["--plan", write_plan(tmp_path, [tuned_row("prm")]), "--out", str(tmp_path / "out")]
    assert main([*args, *[a.format(file=a_file) for a in extra]]) == 2
    assert message in capsys.readouterr().err
    assert a_file.read_text() == "a user's file\n" and not (tmp_path / "out").exists()
