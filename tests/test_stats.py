"""The study's statistics: Holm's correction and the crossed seed x list bootstrap, on hand-computed cases."""

import numpy as np
import pytest

from dnr_tf.stats import bootstrap_mean, holm, paired_difference


def test_holm_by_hand():
    # sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> max(0.06, 0.04) = 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    # capped at 1 and monotone: 0.2 * 3 = 0.6, 0.4 * 2 = 0.8, 0.5 * 1 = 0.5 -> 0.8
    np.testing.assert_allclose(holm([0.4, 0.5, 0.2]), [0.8, 0.8, 0.6])
    np.testing.assert_allclose(holm([0.6, 0.7, 0.9]), [1.0, 1.0, 1.0])
    # one comparison: unchanged; ties share their value
    np.testing.assert_allclose(holm([0.03]), [0.03])
    np.testing.assert_allclose(holm([0.01, 0.01]), [0.02, 0.02])
    # NaN (no comparison made) stays NaN and does not count in m = 2
    np.testing.assert_allclose(holm([np.nan, 0.02, 0.04]), [np.nan, 0.04, 0.04])
    assert holm([]).shape == (0,)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.5, 1.5])


def test_identical_arms_give_zero_interval_and_p_one():
    rng = np.random.default_rng(1)
    a = rng.random((3, 40))
    r = paired_difference(a, a.copy(), resamples=500)
    assert (r.mean, r.low, r.high, r.p) == (0.0, 0.0, 0.0, 1.0)
    assert (r.seeds, r.lists) == (3, 40)
    # one seed (a 1-D row) as well
    r = paired_difference(a[0], a[0], resamples=500)
    assert (r.mean, r.low, r.high, r.p, r.seeds) == (0.0, 0.0, 0.0, 1.0, 1)


def test_constant_difference_is_exact_and_p_at_its_floor():
    rng = np.random.default_rng(2)
    b = rng.random((4, 30))
    r = paired_difference(b + 0.05, b, resamples=999)
    assert r.mean == pytest.approx(0.05) and r.low == pytest.approx(0.05) and r.high == pytest.approx(0.05)
    assert r.p == pytest.approx(2 / 1000)  # no replicate <= 0: p = 2 (0 + 1) / (B + 1)
    r = paired_difference(b - 0.05, b, resamples=999)
    assert r.high == pytest.approx(-0.05) and r.p == pytest.approx(2 / 1000)


def test_only_seeds_vary():
    # d is constant within each seed (0.1, 0.2, 0.3): resampling lists changes nothing, and the replicate is
    # the mean of 3 seeds drawn with replacement. Its smallest value 0.1 has probability 1/27 = 0.037 > 0.025,
    # its largest 0.3 likewise: the 95% interval is exactly [0.1, 0.3].
    d = np.repeat([[0.1], [0.2], [0.3]], 25, axis=1)
    r = paired_difference(d, np.zeros_like(d), resamples=4000)
    assert r.mean == pytest.approx(0.2)
    assert r.low == pytest.approx(0.1) and r.high == pytest.approx(0.3)
    assert r.p == pytest.approx(2 / 4001)
    # seeds 0 and 1: the replicate is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so P(D* <= 0) = 1/4 and p = 1/2
    d = np.repeat([[0.0], [1.0]], 10, axis=1)
    r = paired_difference(d, np.zeros_like(d), resamples=4000)
    assert (r.mean, r.low, r.high) == (0.5, 0.0, 1.0)
    assert r.p == pytest.approx(0.5, abs=0.05)


def test_only_lists_vary_with_one_seed():
    # one seed, lists 0 and 1: the same three values as above, now from the list draw
    r = paired_difference([[1.0, 0.0]], [[0.0, 0.0]], resamples=4000)
    assert (r.mean, r.low, r.high) == (0.5, 0.0, 1.0)
    assert r.p == pytest.approx(0.5, abs=0.05)


def _rows(seeds, lists, rng):
    """Two rows whose difference has a seed effect (sd 0.02) and a list effect (sd 0.3), true mean 0.01."""
    base = rng.random((seeds, lists))
    diff = 0.01 + rng.normal(0, 0.02, (seeds, 1)) + rng.normal(0, 0.3, (1, lists))
    return base + diff, base


def test_more_seeds_and_more_lists_narrow_the_interval():
    rng = np.random.default_rng(3)

    def width(seeds, lists):
        r = paired_difference(*_rows(seeds, lists, rng), resamples=1000)
        assert r.low <= r.mean <= r.high
        return r.high - r.low

    small, more_lists, more_seeds = width(3, 100), width(3, 1600), width(12, 100)
    assert more_lists < 0.6 * small and more_seeds < small
    assert width(12, 1600) < more_lists


def test_seed_variance_counts():
    # Lists all alike, seeds spread: a bootstrap over lists alone would give a zero-width interval.
    d = np.array([[-0.02], [0.03], [0.01], [0.04]]) + np.zeros((4, 50))
    r = paired_difference(d, np.zeros_like(d), resamples=2000)
    assert r.high - r.low > 0.03 and r.low < 0 < r.high and r.p > 0.05


def test_bootstrap_mean_of_one_row():
    r = bootstrap_mean(np.full((2, 10), 0.25), resamples=200)
    assert (r.mean, r.low, r.high) == pytest.approx((0.25, 0.25, 0.25))
    rng = np.random.default_rng(4)
    v = rng.random((5, 200))
    r = bootstrap_mean(v, resamples=500)
    assert r.mean == pytest.approx(v.mean()) and r.low < r.mean < r.high and np.isnan(r.p)
    assert bootstrap_mean(v, resamples=500) == r  # deterministic given the seed


def test_refusals():
    with pytest.raises(ValueError, match="share seeds and lists"):
        paired_difference(np.zeros((2, 5)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="finite"):
        paired_difference([[np.nan, 1.0]], [[0.0, 0.0]])
    with pytest.raises(ValueError, match="shape"):
        bootstrap_mean(np.zeros((0, 3)))


def test_unpaired_difference_draws_each_runs_lists_on_their_own():
    """For runs whose j-th values need not be the same list: the mean of each run's mean, rows may
    differ in length, constant rows give a point interval, and pairing does not narrow it."""
    import numpy as np

    from dnr_tf import stats

    c = stats.unpaired_difference([[0.3, 0.3, 0.3], [0.5, 0.5]], [[0.1, 0.1], [0.2, 0.2, 0.2, 0.2]], resamples=300)
    assert c.mean == pytest.approx(0.4 - 0.15) and c.low == pytest.approx(0.2) and c.high == pytest.approx(0.3)
    point = stats.unpaired_difference([[0.3, 0.3, 0.3], [0.3, 0.3]], [[0.1, 0.1], [0.1] * 4], resamples=300)
    assert point.low == pytest.approx(0.2) and point.high == pytest.approx(0.2)
    rng = np.random.default_rng(1)
    difficulty = rng.random((3, 200))
    a, b = difficulty + 0.02, difficulty  # the same lists, a better by 0.02 on each
    paired = stats.paired_difference(a, b, resamples=500)
    unpaired = stats.unpaired_difference(a, b, resamples=500)
    assert paired.mean == pytest.approx(unpaired.mean)
    assert unpaired.high - unpaired.low > 5 * (paired.high - paired.low)
    assert unpaired.low < 0.02 < unpaired.high
    m = stats.bootstrap_mean_unpaired([[0.2, 0.4], [0.6]], resamples=200)
    assert m.mean == pytest.approx(0.45) and m.low <= m.mean <= m.high
