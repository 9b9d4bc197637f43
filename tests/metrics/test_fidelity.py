import numpy as np
import pytest

from dogkit.metrics import fidelity


@pytest.fixture(scope="module")
def clouds():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 16))
    b = rng.normal(size=(300, 16)) + 50.0  # far away from a
    return a, b


def test_identical_sets_have_full_precision_recall_and_coverage(clouds):
    a, _ = clouds
    pr = fidelity.precision_recall(a, a.copy())
    assert pr == {"precision": 1.0, "recall": 1.0}
    dc = fidelity.density_coverage(a, a.copy())
    assert dc["coverage"] == 1.0
    assert dc["density"] == pytest.approx(4 / 3)  # each ball holds its centre and its 3 neighbours


def test_disjoint_clusters_score_zero(clouds):
    a, b = clouds
    assert fidelity.precision_recall(a, b) == {"precision": 0.0, "recall": 0.0}
    assert fidelity.density_coverage(a, b) == {"density": 0.0, "coverage": 0.0}


def test_half_the_modes_keeps_precision_and_halves_recall():
    rng = np.random.default_rng(1)
    centres = np.array([[0.0] * 8, [100.0] * 8])
    real = np.concatenate([c + rng.normal(size=(200, 8)) for c in centres])
    fake = centres[0] + rng.normal(size=(400, 8))
    pr = fidelity.precision_recall(real, fake)
    assert pr["precision"] > 0.8  # k-NN balls miss some of the tails, even for the right mode
    assert 0.4 < pr["recall"] < 0.6


def test_kid_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(2)
    x, y = np.abs(rng.normal(size=(600, 32))), np.abs(rng.normal(size=(600, 32)))
    same = fidelity.kid(x, y, subsets=20, subset_size=200)
    itself = fidelity.kid(x, x, subsets=20, subset_size=200)
    shifted = fidelity.kid(x, x + 0.5, subsets=20, subset_size=200)
    assert abs(same["kid"]) < 3 * same["kid_std"] + 1e-3
    assert abs(itself["kid"]) < 0.05 * shifted["kid"]
    assert shifted["kid"] > 10 * (abs(same["kid"]) + same["kid_std"])


def test_kid_all_pairs_equals_the_subset_estimate_on_whole_sets_and_its_jackknife_by_brute_force():
    rng = np.random.default_rng(3)
    real, fake = np.abs(rng.normal(size=(40, 6))), np.abs(rng.normal(size=(40, 6))) + 0.2
    whole = fidelity.kid(real, fake, subsets=1, subset_size=40)  # one subset = all of both sets
    got = fidelity.kid_all_pairs(real, fake)
    assert got["kid"] == pytest.approx(whole["kid"], rel=1e-12)
    assert fidelity.kid_all_pairs(real, fake, fidelity.kid_real_term(real))["kid"] == pytest.approx(got["kid"])
    # the closed-form jackknife against leaving each fake out by hand (sizes may differ: 40 real, 15 fake)
    fake = fake[:15]
    loo = np.array([fidelity.kid_all_pairs(real, np.delete(fake, i, axis=0))["kid"] for i in range(15)])
    expected = np.sqrt(14 / 15 * ((loo - loo.mean()) ** 2).sum())
    assert fidelity.kid_all_pairs(real, fake)["kid_se"] == pytest.approx(expected, rel=1e-9)


def test_kid_all_pairs_refuses_what_it_cannot_compute():
    real = np.ones((10, 4))
    with pytest.raises(ValueError, match="at least 3"):
        fidelity.kid_all_pairs(real, np.ones((2, 4)))
    bad = np.ones((5, 4))
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        fidelity.kid_all_pairs(real, bad)
