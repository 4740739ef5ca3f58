"""The report and the headline on a small results.json written here (no training)."""

import json

import numpy as np
import pytest

from dnr_tf import headline as hl
from dnr_tf import report
from dnr_tf.stats import holm

LISTS = 20


def _run(row, dataset, seed, per_list, valid, arm=None, epochs=10, best=5, retrained=None, dnr=False, **extra):
    per_list = [float(v) for v in per_list]
    test = float(np.mean(per_list))
    run = {
        "run": f"{row}__{dataset}__s{seed}",
        "row": row,
        "dataset": dataset,
        "seed": seed,
        "tables": [],
        "config": {"dnr": {"enabled": dnr}, "train": {"epochs": epochs}},
        "best_epoch": best,
        "valid": {"ndcg@6": valid},
        "test": {m: test for m in report.METRICS},
        "robustness": {"clean": {"ndcg@6": test}},
        "per_list_test_ndcg": per_list,
        "per_list_test_ids": [f"{dataset}:{j}" for j in range(len(per_list))],
        **extra,
    }
    if retrained is not None:
        run["robustness"]["retrained"] = {"ndcg@6": test - retrained}
    if arm is not None:
        run["arm"] = arm
    return run


def _summary():
    rng = np.random.default_rng(0)
    base = rng.random(LISTS) * 0.5
    runs = []
    for s in range(4):
        # best by validation, worse on test
        runs.append(_run("direct_a", "ml", s, base + 0.01 * s, valid=0.30, arm="direct", retrained=0.02, best=10))
        # best on test, worse on validation: must not be the reference
        runs.append(_run("direct_b", "ml", s, base + 0.2, valid=0.20, arm="direct"))
        runs.append(_run("dnr_g", "ml", s, base - 0.03 + rng.normal(0, 0.01, LISTS), 0.25, arm="dnr_g", dnr=True))
    for s in range(3):  # DNR-B lacks seed 3
        runs.append(_run("dnr_b", "ml", s, base + 0.01 * s - 0.05, valid=0.28, arm="dnr_b", dnr=True, retrained=0.1))
        runs.append(_run("cal", "ml", s, base + rng.normal(0, 0.05, LISTS), valid=0.27, arm="calibrated", dnr=True))
        runs.append(
            _run(
                "warm", "ml", s, base - 0.03, 0.2, arm="warm", dnr=True, question="Does a warm-started generator help?"
            )
        )
        runs.append(
            _run("eq8", "ml", s, base - 0.02, 0.2, arm="eq8", dnr=True, question="Eq. 8 as printed?", reference="dnr_g")
        )
        runs.append(_run("p_concat", "paper", s, base + 0.4, valid=0.5, arm="direct"))
        runs.append(_run("p_none", "paper", s, base + 0.3, valid=0.4, arm="direct"))
        runs.append(_run("p_dnr_b", "paper", s, base + 0.45, valid=0.55, arm="dnr_b", dnr=True))
    return {
        "plan": "tiny",
        "plan_path": "configs/study/tiny.yaml",
        "datasets": {
            "ml": {"dir": "data/ml", "label": "ML, MF (weak)", "leaky": False},
            "paper": {"dir": "data/paper", "label": "ML, paper", "leaky": True},
        },
        "baselines": {},
        "runs": runs,
    }


def test_compare_uses_only_the_shared_seeds():
    groups = report.group(_summary()["runs"])
    a, b = groups[("ml", "dnr_b")], groups[("ml", "direct_a")]
    assert report.shared_seeds(a, b) == [0, 1, 2]
    c = report.compare(a, b, resamples=200)
    # dnr_b - direct_a = -0.05 on every list of the shared seeds; seed 3 of direct_a (+0.03) would move it
    assert c.seeds == 3 and c.lists == LISTS
    assert c.mean == pytest.approx(-0.05) and c.high == pytest.approx(-0.05)
    assert report.compare(a, [dict(r, seed=r["seed"] + 10) for r in b]) is None
    with pytest.raises(ValueError, match="per_list_test_ndcg lengths"):
        report.compare(a, [dict(r, per_list_test_ndcg=[0.0]) for r in b])
    # Runs without list ids (before 2026-12-05) cannot be paired list by list: the same mean, drawn
    # per run, so a wider interval that still holds it.
    bare = [{k: v for k, v in r.items() if k != "per_list_test_ids"} for r in b]
    u = report.compare(a, bare, resamples=200)
    assert u.mean == pytest.approx(c.mean) and u.low < c.low - 0.01 and u.high > c.high + 0.01


def test_lists_are_paired_by_request_id_not_by_position():
    """Two builds of one data set can hold the same test lists in another order: runs that record
    `per_list_test_ids` are matched list by list; the position would pair different lists."""
    ids = [f"u{j}:0" for j in range(6)]
    a = [{"run": "a", "seed": 0, "per_list_test_ndcg": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "per_list_test_ids": ids}]
    # b: a - 0.1 on every list, written in reverse order
    b = [{"run": "b", "seed": 0, "per_list_test_ndcg": [0.5, 0.4, 0.3, 0.2, 0.1, 0.0], "per_list_test_ids": ids[::-1]}]
    c = report.compare(a, b, resamples=200)
    assert c.mean == pytest.approx(0.1) and c.low == pytest.approx(0.1) and c.high == pytest.approx(0.1)
    by_position = report.compare(
        [{k: v for k, v in a[0].items() if k != "per_list_test_ids"}],
        [{k: v for k, v in b[0].items() if k != "per_list_test_ids"}],
        resamples=200,
    )
    assert by_position.high - by_position.low > 0.1, "what the ids prevent: lists paired with others"
    other = [dict(b[0], per_list_test_ids=[f"v{j}:0" for j in range(6)])]
    with pytest.raises(ValueError, match="its test lists are not those of a"):
        report.compare(a, other)


def test_headline_best_direct_by_validation_holm_and_leaky_apart():
    summaries = [("reports/tiny/results.json", _summary())]
    lines, data = hl.headline(summaries, resamples=300)
    rows = [(d["label"], d["arm"], d["row"], d["reference"]) for d in data["headline"]]
    assert rows == [
        ("ML, MF (weak)", "direct", "direct_a", "direct_a"),
        ("ML, MF (weak)", "dnr_b", "dnr_b", "direct_a"),
        ("ML, MF (weak)", "dnr_g", "dnr_g", "direct_a"),
        ("ML, MF (weak)", "calibrated", "cal", "direct_a"),
    ]
    by_row = {d["row"]: d for d in data["headline"]}
    assert by_row["dnr_b"]["seeds_shared"] == 3 and by_row["dnr_g"]["seeds_shared"] == 4
    assert by_row["dnr_b"]["diff"] == pytest.approx(-0.05)
    compared = [by_row[r] for r in ("dnr_b", "dnr_g", "cal")]
    np.testing.assert_allclose([d["p_holm"] for d in compared], holm([d["p_bootstrap"] for d in compared]))
    assert all(d["ci95"][0] <= d["diff"] <= d["ci95"][1] for d in compared)

    # the paper's construction: its own table, every direct row, labelled leaky, its own Holm family
    assert {d["label"] for d in data["leaky"]} == {"ML, paper"} and all(d["leaky"] for d in data["leaky"])
    assert [d["row"] for d in data["leaky"]] == ["p_concat", "p_none", "p_dnr_b"]
    leaky_cmp = [d for d in data["leaky"] if "p_holm" in d]
    np.testing.assert_allclose([d["p_holm"] for d in leaky_cmp], holm([d["p_bootstrap"] for d in leaky_cmp]))
    text = "\n".join(lines)
    main_table = text[: text.index("## The paper's construction")]
    assert "p_concat" not in main_table and "ML, paper" not in main_table
    assert "| ML, paper (leaky) | best direct | `p_concat` |" in text
    assert "| ML, MF (weak) | best direct | `direct_a` |" in text
    # drop under the retrained retriever and the best-epoch distribution
    assert "| 0.0200 ± 0.0000 |" in text and "| n/a |" in text
    assert "10/10/10 (4 of 4 at last)" in text and "5/5/5 (0 of 3 at last)" in text

    ablations = {d["row"]: d for d in data["ablations"]}
    # warm - dnr_b = -0.03 - (0.01 s - 0.05) over seeds 0-2: 0.02 - 0.01 = +0.01
    assert ablations["warm"]["reference"] == "dnr_b" and ablations["warm"]["diff"] == pytest.approx(0.01)
    assert ablations["eq8"]["reference"] == "dnr_g"
    assert "Does a warm-started generator help?" in text


def test_old_results_without_arms_still_load():
    summary = _summary()
    for r in summary["runs"]:
        r.pop("arm")
    summary["datasets"] = {"ml": {"dir": "data/ml"}, "paper": {"dir": "data/paper"}}
    lines, data = hl.headline([("old.json", summary)], resamples=100)
    assert "predate the run field `arm`" in "\n".join(lines)
    # non-DNR rows count as direct; a DNR row's arm is its name: `dnr_b` and `dnr_g` are headline arms, `cal` not
    assert [d["row"] for d in data["headline"]] == ["direct_a", "dnr_b", "dnr_g"]
    assert {d["label"] for d in data["headline"]} == {"tiny / ml"}
    assert [d["row"] for d in data["leaky"]] == ["p_concat", "p_none"]  # a data set named `paper` is leaky


def test_cli_writes_the_headline_first_and_refuses_a_missing_file(tmp_path, capsys):
    path = tmp_path / "tiny" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(_summary()))
    md = tmp_path / "docs" / "results.md"
    md.parent.mkdir()
    assert report.main(["--headline", str(path), "--out", str(md)]) == 0
    text = md.read_text()
    assert text.startswith("# Results")
    first = text.index("## ")
    assert text[first:].startswith("## Headline")
    assert text.index("## The paper's construction") < text.index("## Ablations") < text.index("## Study `tiny`")
    missing = tmp_path / "nope" / "results.json"
    assert report.main(["--headline", str(path), str(missing), "--out", str(md)]) == 2
    assert f"{missing}: no such results.json" in capsys.readouterr().err


def test_study_tables_holm_within_each_table():
    summary = _summary()
    for r in summary["runs"]:
        r["tables"] = ["t1"] if r["dataset"] == "ml" else []
    groups = report.group(summary["runs"])
    _, data = report.table(groups, {}, "ml", "t1")
    assert {d["reference"] for d in data} == {"direct_a"}  # best non-DNR row by validation, not by test
    dnr = [d for d in data if d["dnr"]]
    assert len(dnr) == 5 and all("p_holm" in d for d in dnr)
    np.testing.assert_allclose([d["p_holm"] for d in dnr], holm([d["p_bootstrap"] for d in dnr]))
    assert next(d for d in dnr if d["row"] == "dnr_b")["seeds_shared"] == 3

    # DNR-B against the same reranker trained directly: its own family of pairs
    runs = [dict(r, row="x_concat") for r in groups[("ml", "direct_a")]]
    runs += [dict(r, row="x_dnr_b") for r in groups[("ml", "dnr_b")]]
    runs += [dict(r, row="y_concat") for r in groups[("ml", "direct_b")]]
    runs += [dict(r, row="y_dnr_b") for r in groups[("ml", "dnr_g")]]
    lines, pairs = report.own_backbone_lines(report.group(runs), "ml")
    assert [(p["reranker"], p["seeds"]) for p in pairs] == [("x", 3), ("y", 4)]
    assert pairs[0]["diff"] == pytest.approx(-0.05)
    np.testing.assert_allclose([p["p_holm"] for p in pairs], holm([p["p_bootstrap"] for p in pairs]))
    assert "| x | 3 |" in "\n".join(lines)


def test_a_run_folder_with_only_its_result_has_no_model(tmp_path):
    """A fresh clone holds only each run's result.json: the report must not try to load a model there."""
    from dnr_tf.report import has_model

    folder = tmp_path / "runs" / "dnr_b__cascade__s0"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text("{}")
    assert not has_model({"_model_dir": str(folder)})
    assert not has_model({})
    (folder / "config.yaml").write_text("")
    (folder / "best.weights.h5").write_bytes(b"")
    assert has_model({"_model_dir": str(folder)})


def test_a_leaky_label_is_marked_leaky_once():
    from dnr_tf.headline import DataSet

    for label, shown in (("ML, paper", "ML, paper (leaky)"), ("ML, paper (leaky)", "ML, paper (leaky)")):
        summary = {"datasets": {"p": {"label": label, "leaky": True}}, "runs": []}
        assert DataSet(summary, "p").display() == shown
    assert DataSet({"datasets": {"c": {"label": "ML"}}, "runs": []}, "c").display() == "ML"
