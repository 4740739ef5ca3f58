"""The calibrated sampler's moment fit and the test-time score perturbations."""

import keras
import numpy as np
import pytest

from dnr_tf.noise import HeuristicSampler, fit_beta
from dnr_tf.robustness import perturb


def test_fit_beta_recovers_parameters():
    rng = np.random.default_rng(0)
    for a, b in ((0.5, 0.5), (6.0, 7.5), (2.0, 9.0)):
        x = rng.beta(a, b, 200_000)
        fa, fb = fit_beta(x.mean(), x.var())
        assert fa == pytest.approx(a, rel=0.05) and fb == pytest.approx(b, rel=0.05)
    with pytest.raises(ValueError):
        fit_beta(0.5, 0.3)  # a variance no Beta has


def test_calibrated_sampler_draws_each_label_from_its_beta():
    z = np.zeros((400, 50), "float32")
    z[:, :10] = 1.0
    sampler = HeuristicSampler("calibrated", 0.5, calibration=((2.0, 8.0), (8.0, 2.0)))
    x = np.asarray(sampler(keras.ops.convert_to_tensor(z), keras.random.SeedGenerator(0)))
    assert x[z == 1].mean() == pytest.approx(0.8, abs=0.01) and x[z == 0].mean() == pytest.approx(0.2, abs=0.01)
    assert x[z == 0].var() == pytest.approx(2 * 8 / (10**2 * 11), rel=0.1)
    with pytest.raises(ValueError):
        HeuristicSampler("calibrated", 0.5)


def test_perturbations():
    rng = np.random.default_rng(0)
    x = rng.random((20, 8)).astype("float32")
    mask = np.ones_like(x, bool)
    mask[:, 6:] = False
    x[~mask] = 0.0
    shuffled = perturb(x, mask, "shuffle", np.random.default_rng(1))
    assert not np.array_equal(shuffled, x)
    for b in range(20):
        assert sorted(shuffled[b, :6]) == sorted(x[b, :6])
    np.testing.assert_array_equal(shuffled[~mask], 0.0)
    noisy = perturb(x, mask, "gauss_0.2", np.random.default_rng(1))
    assert noisy.min() >= 0.0 and noisy.max() <= 1.0 and np.abs(noisy - x)[mask].mean() > 0.05
    np.testing.assert_allclose(perturb(x, mask, "square", rng)[mask], x[mask] ** 2)
    np.testing.assert_allclose(perturb(x, mask, "sqrt", rng)[mask], np.sqrt(x[mask]))
    np.testing.assert_array_equal(perturb(x, mask, "clean", rng), x)
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb(x, mask, "flip", rng)
