"""The retriever ladder (issue 14): the item-to-item retriever, the retrained retriever's feature,
the `retrained` robustness kind and the simulator's AUC knob, on small data the tests write.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib

import numpy as np
import pytest

from dnr_tf import config_io
from dnr_tf import reference_metrics as M
from dnr_tf import schema as S
from pipeline import item2item, protocol
from pipeline import retriever as mf
from pipeline.config import PipelineConfig, RetrieverConfig
from pipeline.protocol import Interaction

ROOT = pathlib.Path(__file__).resolve().parent.parent


# --- a small world with drifting taste -------------------------------------------------------------


def drifting_timelines(num_users=160, clusters=20, per_cluster=8, length=60, stay=6, seed=0):
    """Users walk between item clusters: about `stay` items of one cluster, then another cluster.

    What a user consumes next is best predicted by what they consumed last (the current cluster),
    which an MF user vector fixed at the end of the retriever window cannot follow.
    """
    rng = np.random.default_rng(seed)
    timelines = {}
    for user in range(1, num_users + 1):
        seen, items = set(), []
        cluster = int(rng.integers(clusters))
        while len(items) < length:
            if rng.random() < 1.0 / stay:
                cluster = int(rng.integers(clusters))
            choices = [cluster * per_cluster + j + 1 for j in range(per_cluster)]
            fresh = [i for i in choices if i not in seen]
            if not fresh:
                cluster = int(rng.integers(clusters))
                continue
            item = int(rng.choice(fresh))
            seen.add(item)
            items.append(item)
        timelines[user] = items
    return timelines


def _write_pairs(path, pairs):
    path.write_bytes(gzip.compress(("".join(f"{u}\t{i}\n" for u, i in pairs)).encode(), mtime=0))


def _ladder(timelines, scorers, list_size=30, horizon=6, stride=6):
    """Mean within-list AUC of x and retriever-order NDCG@6 over all kept lists, per scorer."""
    out = {}
    for name, make in scorers.items():
        aucs, ndcgs = [], []
        for user, items in timelines.items():
            timeline = [Interaction(user, i, t, 1.0) for t, i in enumerate(items)]
            records, _ = protocol.cascade_lists(
                user,
                timeline,
                None,
                None,
                None,
                retriever_fraction=0.5,
                stride=stride,
                history_len=5,
                list_size=list_size,
                horizon=horizon,
                scorer=make(user),
            )
            for rec in records:
                labels = np.asarray(rec[S.LABELS])
                aucs.append(M.pairwise_auc(labels, np.asarray(rec[S.RETRIEVER_SCORES])))
                ndcgs.append(M.list_metrics(labels, M.retriever_order_scores(labels), 6)["ndcg"])
        out[name] = (float(np.nanmean(aucs)), float(np.mean(ndcgs)), len(ndcgs))
    return out


def test_item2item_beats_mf_on_drifting_taste(tmp_path):
    timelines = drifting_timelines()
    users = np.array(sorted(timelines), np.int64)
    items = np.array(sorted({i for v in timelines.values() for i in v}), np.int64)
    window = [(u, i) for u, v in timelines.items() for i in v[: len(v) // 2]]
    _write_pairs(tmp_path / "window-train-00000-of-00001.tsv.gz", window)
    pattern = os.fspath(tmp_path / "window-train-*")
    cfg = RetrieverConfig(dim=16, epochs=6, batch_size=256)
    ret, tables, _ = mf.train_mf(pattern, {}, users, items, cfg, seed=0, progress=lambda line: None)
    rows = {int(u): (tables["user_emb"][j], float(tables["user_bias"][j])) for j, u in enumerate(tables["user_ids"])}
    rows_of = [np.searchsorted(users, [u for u, _ in window]), np.searchsorted(items, [i for _, i in window])]
    pairs = np.stack(rows_of, 1)
    i2i, _ = item2item.train_item2item(pairs, items, RetrieverConfig(kind="item2item"))
    ladder = _ladder(
        timelines,
        {
            "mf": lambda u: protocol.MFScorer(ret, *rows[u]),
            "item2item": lambda u: i2i,
            "mf_item2item": lambda u: protocol.RescoredScorer(protocol.MFScorer(ret, *rows[u]), i2i),
        },
    )
    (mf_auc, mf_ndcg, mf_n), (i2i_auc, i2i_ndcg, i2i_n) = ladder["mf"], ladder["item2item"]
    assert mf_n > 100 and i2i_n > 100
    assert i2i_auc > mf_auc + 0.05, ladder
    assert i2i_ndcg > mf_ndcg + 0.05, ladder
    # MF's lists (the same ones: same count) with item-to-item's x: a stronger x on MF's candidates.
    both_auc, both_ndcg, both_n = ladder["mf_item2item"]
    assert both_n == mf_n
    assert both_auc > mf_auc + 0.05 and both_ndcg > mf_ndcg + 0.05, ladder


def test_mf_item2item_keeps_mf_lists_and_scores_them_item_to_item():
    timelines = drifting_timelines(num_users=30)
    users = sorted(timelines)
    items = np.array(sorted({i for v in timelines.values() for i in v}), np.int64)
    pairs = np.array([(j, np.searchsorted(items, i)) for j, u in enumerate(users) for i in timelines[u][:30]])
    i2i, _ = item2item.train_item2item(pairs, items, RetrieverConfig(kind="item2item"))
    rng = np.random.default_rng(0)
    ret = protocol.Retriever(
        item_ids=items, item_emb=rng.normal(size=(len(items), 4)), item_bias=np.zeros(len(items)), global_bias=0.0
    )
    checked = 0
    for user in users:
        timeline = [Interaction(user, i, t, 1.0) for t, i in enumerate(timelines[user])]
        vec, bias = rng.normal(size=4), 0.0
        lists = {}
        for name, scorer in {
            "mf": protocol.MFScorer(ret, vec, bias),
            "mf_item2item": protocol.RescoredScorer(protocol.MFScorer(ret, vec, bias), i2i),
        }.items():
            records, counts = protocol.cascade_lists(
                user, timeline, None, None, None, retriever_fraction=0.5, stride=3, history_len=5,
                list_size=20, horizon=3, scorer=scorer,
            )  # fmt: skip
            lists[name] = (records, counts)
        (mf_records, mf_counts), (records, counts) = lists["mf"], lists["mf_item2item"]
        assert counts == mf_counts
        assert [r[S.REQUEST_ID] for r in records] == [r[S.REQUEST_ID] for r in mf_records]
        for rec, mf_rec in zip(records, mf_records):
            label_of = dict(zip(mf_rec[S.ITEM_IDS], mf_rec[S.LABELS]))
            assert dict(zip(rec[S.ITEM_IDS], rec[S.LABELS])) == label_of, "same candidates, same labels"
            x = np.asarray(rec[S.RETRIEVER_SCORES])
            r = int(rec[S.REQUEST_ID].split(":")[1])  # the request's position in the timeline
            expected = i2i.scores(timelines[user][:r], rec[S.ITEM_IDS])
            np.testing.assert_allclose(x, expected, atol=1e-6)
            assert np.all(np.diff(x) <= 0), "ordered by the new x"
            checked += 1
    assert checked > 20


def test_item2item_scores_match_top_k_and_lie_in_unit_interval():
    timelines = drifting_timelines(num_users=40)
    items = np.array(sorted({i for v in timelines.values() for i in v}), np.int64)
    users = sorted(timelines)
    pairs = np.array([(j, np.searchsorted(items, i)) for j, u in enumerate(users) for i in timelines[u][:30]])
    ret, _ = item2item.train_item2item(pairs, items, RetrieverConfig(kind="item2item", i2i_neighbors=5))
    assert (ret.neighbors >= 0).sum(axis=1).max() <= 5
    history = timelines[users[0]][:30]
    ids, x = ret.top_k(history, set(history), 25)
    assert len(ids) == 25 and not set(ids.tolist()) & set(history)
    assert np.all(np.diff(x) <= 0) and np.all((x >= 0) & (x < 1))
    np.testing.assert_array_equal(ret.scores(history, ids), x)
    assert ret.scores(history, [10_000])[0] == 0.0  # unknown item


def test_item2item_never_sees_interactions_at_or_after_the_request():
    timelines = drifting_timelines(num_users=60)
    items = np.array(sorted({i for v in timelines.values() for i in v}), np.int64)
    users = sorted(timelines)
    window = [(j, int(np.searchsorted(items, i))) for j, u in enumerate(users) for i in timelines[u][:30]]
    ret, _ = item2item.train_item2item(np.array(window), items, RetrieverConfig(kind="item2item"))
    # The neighbour table links only items that share a user inside the window.
    together = {}
    for u in users:
        for i in timelines[u][:30]:
            together.setdefault(i, set()).update(timelines[u][:30])
    for row, item in enumerate(items):
        linked = {int(items[c]) for c in ret.neighbors[row] if c >= 0}
        assert linked <= together.get(int(item), set()) - {int(item)}
    # A request's candidates and scores depend on the user's past only: rewriting the future keeps them.
    user = users[0]
    past = timelines[user]
    rng = np.random.default_rng(3)
    future = [int(i) for i in rng.permutation([i for i in items.tolist() if i not in past[:42]])[: len(past) - 42]]
    other = past[:42] + future

    def lists(seq):
        tl = [Interaction(user, i, t, 1.0) for t, i in enumerate(seq)]
        recs, _ = protocol.cascade_lists(
            user, tl, None, None, None, retriever_fraction=0.5, stride=6, history_len=5, list_size=160,
            horizon=6, scorer=ret,
        )  # fmt: skip
        return {r[S.REQUEST_ID]: r for r in recs}

    a, b = lists(past), lists(other)
    for rid in (f"{user}:{r}" for r in (30, 36, 42)):
        assert a[rid][S.ITEM_IDS] == b[rid][S.ITEM_IDS]
        assert a[rid][S.RETRIEVER_SCORES] == b[rid][S.RETRIEVER_SCORES]


def test_mf_scorer_scores_equal_its_top_k():
    rng = np.random.default_rng(0)
    ret = protocol.Retriever(
        item_ids=np.arange(1, 31, dtype=np.int64),
        item_emb=rng.normal(size=(30, 4)).astype(np.float32),
        item_bias=rng.normal(size=30).astype(np.float32),
        global_bias=0.1,
    )
    scorer = protocol.MFScorer(ret, rng.normal(size=4).astype(np.float32), 0.2)
    ids, x = scorer.top_k([], {3, 4}, 10)
    np.testing.assert_allclose(scorer.scores([], ids), x, rtol=1e-6)
    assert scorer.scores([], [99])[0] == 0.0


def test_kept_share_is_stable_and_about_the_fraction():
    pairs = np.stack(np.meshgrid(np.arange(100), np.arange(50)), -1).reshape(-1, 2)
    kept = mf.kept_share(pairs, 1, 0.9)
    assert 0.87 < len(kept) / len(pairs) < 0.93
    np.testing.assert_array_equal(mf.kept_share(pairs[::-1], 1, 0.9), kept[::-1])
    assert len(mf.kept_share(pairs, 2, 0.9)) != len(kept) or not np.array_equal(mf.kept_share(pairs, 2, 0.9), kept)


def test_config_refuses_bad_retriever_settings():
    with pytest.raises(config_io.ConfigError, match="retriever.kind"):
        config_io.from_dict(PipelineConfig, {"retriever": {"kind": "bm25"}})
    with pytest.raises(config_io.ConfigError, match="retriever.kind"):
        config_io.from_dict(PipelineConfig, {"protocol": "paper", "retriever": {"kind": "item2item"}})
    with pytest.raises(config_io.ConfigError, match="retrained.seed"):
        config_io.from_dict(PipelineConfig, {"retrained": {"enabled": True, "seed": 0}})
    with pytest.raises(config_io.ConfigError, match="retrained.keep_fraction"):
        config_io.from_dict(
            PipelineConfig, {"retriever": {"kind": "item2item"}, "retrained": {"enabled": True, "keep_fraction": 1.0}}
        )
    with pytest.raises(config_io.ConfigError, match="retrained.enabled"):
        config_io.from_dict(PipelineConfig, {"source": "logged", "input": "x", "retrained": {"enabled": True}})


# --- the pipeline writes the retrained retriever's scores ------------------------------------------


def _write_u_data(path, timelines):
    lines = [f"{u}\t{i}\t4\t{880_000_000 + t}\n" for u, v in timelines.items() for t, i in enumerate(v)]
    path.write_text("".join(lines))
    return path


@pytest.fixture(scope="module", params=["mf", "item2item", "mf_item2item"])
def retrained_run(request, tmp_path_factory):
    from pipeline.run import run

    tmp = tmp_path_factory.mktemp(f"retrained_{request.param}")
    timelines = drifting_timelines(num_users=40, clusters=6, per_cluster=8, length=30)
    u_data = _write_u_data(tmp / "u.data", timelines)
    out = tmp / "out"
    stats = run(
        [
            "--source", "movielens", "--input", os.fspath(u_data), "--output_dir", os.fspath(out),
            "--set", "min_count=2", "--set", "list_size=40", "--set", "history_len=5", "--set", "stride=3",
            "--set", "horizon=3", "--set", "k=3", "--set", "retriever.epochs=2", "--set", "retriever.dim=8",
            "--set", f"retriever.kind={request.param}", "--set", "retrained.enabled=true",
        ]
    )  # fmt: skip
    return request.param, out, stats


def _read_test(out):
    from dnr_tf import data as data_lib

    rows = []
    for batch in data_lib.make_dataset(data_lib.split_pattern(os.fspath(out), "test"), 64):
        for j in range(batch[S.ITEM_IDS].shape[0]):
            rows.append({key: batch[key][j].numpy() for key in batch})
    return rows


def test_retrained_feature_is_written_and_read_back(retrained_run):
    kind, out, stats = retrained_run
    schema = json.loads((out / "schema.json").read_text())
    assert schema["has_retrained"] is True
    assert S.RETRIEVER_SCORES_RETRAINED in schema["features"]
    rows = _read_test(out)
    assert rows
    padded = 0
    for row in rows:
        x, x2, labels = row[S.RETRIEVER_SCORES], row[S.RETRIEVER_SCORES_RETRAINED], row[S.LABELS]
        assert x2.shape == (40,)
        real = labels >= 0
        padded += int((~real).sum())
        assert np.all(x2[~real] == 0.0), "padding of the retrained scores is 0.0"
        assert np.all((x2[real] >= 0) & (x2[real] <= 1))
        assert np.all(np.diff(x[real]) <= 0), "the list keeps the main retriever's order"
    assert padded > 0, "the fixture must have short lists, or padding goes unchecked"
    # A different retriever (another seed, another share of the window), not a copy of the first.
    assert not all(np.array_equal(r[S.RETRIEVER_SCORES], r[S.RETRIEVER_SCORES_RETRAINED]) for r in rows)
    assert (out / "retriever" / "retrained" / "metrics.json").exists()
    assert stats["retriever"]["kind"] == kind
    assert "auc_future" in stats["retriever"]["retrained"]


def test_mf_item2item_scores_mf_candidates_with_both_item_to_item_tables(retrained_run):
    kind, out, stats = retrained_run
    if kind != "mf_item2item":
        assert "candidates" not in stats["retriever"]
        return
    assert stats["retriever"]["candidates"]["kind"] == "mf"
    assert (out / "retriever" / mf.TABLES).exists() and (out / "retriever" / item2item.TABLE).exists()
    main = item2item.load(os.fspath(out / "retriever"))
    again = item2item.load(os.fspath(out / "retriever" / "retrained"))
    timelines = drifting_timelines(num_users=40, clusters=6, per_cluster=8, length=30)
    rows = _read_test(out)
    for row in rows:
        user, r = str(row[S.REQUEST_ID], "utf-8").split(":")
        history, real = timelines[int(user)][: int(r)], row[S.LABELS] >= 0
        ids = row[S.ITEM_IDS][real]
        np.testing.assert_allclose(row[S.RETRIEVER_SCORES][real], main.scores(history, ids), atol=1e-6)
        np.testing.assert_allclose(row[S.RETRIEVER_SCORES_RETRAINED][real], again.scores(history, ids), atol=1e-6)
    assert len(rows) > 10


def test_stats_report_both_retrievers(retrained_run):
    kind, out, stats = retrained_run
    report = stats["retrievers"]
    assert report["main"]["kind"] == kind and report["retrained"]["kind"] == kind
    rows = _read_test(out)
    aucs, corrs = [], []
    for row in rows:
        real = row[S.LABELS] >= 0
        labels = row[S.LABELS][real]
        aucs.append(M.pairwise_auc(labels, row[S.RETRIEVER_SCORES_RETRAINED][real]))
        from pipeline.stats import rank_correlation

        corrs.append(rank_correlation(row[S.RETRIEVER_SCORES][real], row[S.RETRIEVER_SCORES_RETRAINED][real]))
    assert report["retrained"]["auc_in_list"]["test"] == pytest.approx(np.nanmean(aucs), abs=1e-6)
    assert report["retrained"]["rank_corr_with_main"]["test"] == pytest.approx(np.nanmean(corrs), abs=1e-6)
    assert report["main"]["auc_in_list"]["test"] == stats["splits"]["test"]["retriever_score_auc"]
    lists = stats["lists"]
    dropped = lists["dropped_no_positive"] + lists["dropped_truncated"]
    assert report["main"]["dropped_share"] == pytest.approx(dropped / lists["requests"])
    assert report["main"]["positives_per_list"]["test"] == stats["splits"]["test"]["positives_per_list"]


def test_without_retrained_the_schema_says_so(tmp_path):
    schema = S.RecordSchema(list_size=4, history_len=2)
    assert schema.to_json()["has_retrained"] is False
    assert S.RETRIEVER_SCORES_RETRAINED not in schema.feature_spec()
    # schema.json written before the feature existed still reads.
    old = {k: v for k, v in schema.to_json().items() if k != "has_retrained"}
    assert S.RecordSchema.from_json(old).has_retrained is False


# --- the `retrained` robustness kind -----------------------------------------------------------------


class _ScoreIsLogit:
    """A 'model' that ranks by whatever x it is given."""

    def __call__(self, features, training=False):
        return np.asarray(features[S.RETRIEVER_SCORES], np.float32)


def _dataset(with_retrained: bool):
    import tensorflow as tf

    labels = np.array([[1, 0, 0, -1], [0, 0, 1, 1]], np.int64)
    x = np.array([[0.9, 0.5, 0.1, 0.0], [0.8, 0.7, 0.6, 0.5]], np.float32)
    features = {S.RETRIEVER_SCORES: x, S.ITEM_IDS: np.array([[1, 2, 3, 0], [4, 5, 6, 7]], np.int64)}
    if with_retrained:
        features[S.RETRIEVER_SCORES_RETRAINED] = np.array([[0.5, 0.9, 0.1, 0.0], [0.1, 0.2, 0.9, 0.8]], np.float32)
    return tf.data.Dataset.from_tensor_slices((features, labels)).batch(2)


def test_retrained_kind_scores_with_the_retrained_feature():
    from dnr_tf.robustness import evaluate_perturbed

    out = evaluate_perturbed(_ScoreIsLogit(), _dataset(True), ["retrained"], k=2)
    # clean: list 1 ranks its positive first, list 2 ranks both positives last; retrained: the reverse.
    assert out["clean"]["ndcg@2"] == pytest.approx(0.5)
    assert out["retrained"]["ndcg@2"] == pytest.approx(0.5 * (1 / np.log2(3)) / 1.0 + 0.5)


def test_retrained_kind_refuses_data_without_the_feature():
    from dnr_tf.robustness import evaluate_perturbed

    with pytest.raises(ValueError, match="retriever_scores_retrained"):
        evaluate_perturbed(_ScoreIsLogit(), _dataset(False), ["retrained"], k=2)


# --- the simulator's AUC knob -------------------------------------------------------------------------


def _simulated_auc(config_name: str, num_users: int = 150, retrained_seed=None) -> tuple[float, list]:
    from pipeline.sources.synthetic import World, simulate_user

    cfg = config_io.from_dict(PipelineConfig, config_io.load_yaml(os.fspath(ROOT / "configs/pipeline" / config_name)))
    syn = config_io.from_dict(type(cfg.synthetic), {**config_io.to_dict(cfg.synthetic), "num_users": num_users})
    world = World(syn, cfg.seed, retrained_seed)
    aucs, records = [], []
    for user in range(1, num_users + 1):
        for rec in simulate_user(world, user, cfg.list_size):
            records.append(rec)
            labels = np.asarray(rec[S.LABELS])
            if labels.any():
                aucs.append(M.pairwise_auc(labels, np.asarray(rec[S.RETRIEVER_SCORES])))
    return float(np.nanmean(aucs)), records


@pytest.mark.parametrize(
    "name,low,high",
    [("synthetic_auc55.yaml", 0.50, 0.61), ("synthetic_auc70.yaml", 0.64, 0.76), ("synthetic_auc85.yaml", 0.83, 1.0)],
)
def test_simulator_knob_reaches_the_auc_levels(name, low, high):
    auc, _ = _simulated_auc(name)
    assert low <= auc <= high, f"{name}: within-list AUC of x {auc:.3f} outside [{low}, {high}]"


def test_simulator_retrained_view_adds_a_feature_and_changes_nothing_else():
    _, plain = _simulated_auc("synthetic.yaml", num_users=5)
    _, again = _simulated_auc("synthetic.yaml", num_users=5, retrained_seed=1)
    assert len(plain) == len(again)
    for a, b in zip(plain, again):
        x2 = b.pop(S.RETRIEVER_SCORES_RETRAINED)
        assert a == b
        assert len(x2) == len(a[S.ITEM_IDS]) and x2 != a[S.RETRIEVER_SCORES]


def test_a_trained_model_is_evaluated_with_the_retrained_scores(tmp_path):
    """End to end: simulator data with the retrained view -> a tiny PRM run (one epoch) -> the `retrained` kind."""
    from dnr_tf.config import ExperimentConfig
    from dnr_tf.robustness import evaluate_perturbed
    from dnr_tf.runs import load_trained
    from dnr_tf.train import datasets, train
    from pipeline.run import run

    data = tmp_path / "data"
    run(
        ["--config", os.fspath(ROOT / "configs/pipeline/synthetic.yaml"), "--output_dir", os.fspath(data),
         "--set", "synthetic.num_users=60", "--set", "retrained.enabled=true"]
    )  # fmt: skip
    smoke = config_io.load_yaml(os.fspath(ROOT / "configs/smoke.yaml"))
    smoke = config_io.apply_overrides(smoke, ["dnr.enabled=false", "train.epochs=1"])
    cfg = config_io.from_dict(ExperimentConfig, smoke)
    train(cfg, os.fspath(data), os.fspath(tmp_path / "run"), verbose=0)
    model, _, schema = load_trained(os.fspath(tmp_path / "run"))
    assert schema.has_retrained
    _, _, test_ds = datasets(os.fspath(data), cfg, schema)
    out = evaluate_perturbed(model, test_ds, ["retrained", "shuffle"], k=6)
    assert 0.0 < out["retrained"]["ndcg@6"] <= 1.0
    # The model reads x, so other scores give other figures.
    assert out["retrained"]["ndcg@6"] != out["clean"]["ndcg@6"]
