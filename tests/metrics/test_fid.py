import numpy as np
import pytest

from dogkit.metrics import fid as F


def test_equal_covariances_give_squared_mean_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    sigma = a @ a.T + np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    assert F.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-8)


def test_diagonal_covariances_closed_form():
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 16.0])
    expected = np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = F.frechet_distance(np.zeros(3), np.diag(s1), np.zeros(3), np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-8)


def test_identical_sets_score_zero_and_different_sets_do_not():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 8))
    mu, sigma = F.stats(x)
    assert F.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    mu2, sigma2 = F.stats(x + 1.0)
    assert F.frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(8.0, rel=1e-6)


def test_singular_covariances_give_the_closed_form():
    """Singular covariances (a dimension with no spread) still give the closed form
    ||mu1 - mu2||^2 + Tr S1 + Tr S2 - 2 Tr sqrt(S1 S2); for diagonal S, sqrt(S1 S2) is elementwise."""
    zero = np.zeros((4, 4))
    assert F.frechet_distance(np.zeros(4), zero, np.ones(4), zero) == 4.0
    s1, s2 = np.diag([1.0, 0, 0, 4.0]), np.diag([0, 1.0, 0, 9.0])  # S1 S2 = diag(0, 0, 0, 36)
    assert F.frechet_distance(np.zeros(4), s1, np.ones(4), s2) == pytest.approx(4 + 5 + 10 - 2 * 6)


def test_a_square_root_that_fails_retries_with_an_offset(monkeypatch):
    """TTUR's recipe: when sqrtm(S1 S2) is not finite, sqrt((S1 + eps I)(S2 + eps I)) instead; for
    diagonal S that is elementwise, so the retried distance has a closed form."""
    real, calls = F.linalg.sqrtm, []

    def first_fails(m):
        calls.append(m.copy())
        return np.full_like(m, np.inf) if len(calls) == 1 else real(m)

    monkeypatch.setattr(F.linalg, "sqrtm", first_fails)
    e = 1e-6
    s1, s2 = np.diag([1.0, 0.0]), np.diag([0.0, 1.0])
    fid = F.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=e)
    assert len(calls) == 2 and np.allclose(calls[1], np.diag([(1 + e) * e, e * (1 + e)]))
    assert fid == pytest.approx(2 - 2 * 2 * np.sqrt(e * (1 + e)), rel=1e-9)


@pytest.mark.parametrize("n", [40, 400])  # rank-deficient (40 rows, 64 dims) and full rank
def test_eigh_square_root_matches_scipy(n):
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64))
    b = rng.normal(size=(n, 64)) * np.linspace(0.1, 3.0, 64) + 0.5
    s1, s2 = F.stats(a), F.stats(b)
    literal = F.frechet_distance(*s1, *s2, method="scipy")
    fast = F.frechet_distance(*s1, *s2, method="eigh")
    assert fast == pytest.approx(literal, rel=1e-7)  # far below the 1e-4 device tolerance
    assert F.frechet_distance(*s1, *s1, method="eigh") == pytest.approx(0.0, abs=1e-6 * np.trace(s1[1]))
    # a reference's square root computed once gives the same distance (FID is symmetric)
    root = F.psd_sqrt(s2[1])
    assert F.frechet_distance(*s2, *s1, method="eigh", root1=root) == pytest.approx(literal, rel=1e-7)


def test_closed_forms_hold_for_both_square_roots():
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 16.0])
    for method in ("scipy", "eigh", "auto"):
        got = F.frechet_distance(np.zeros(3), np.diag(s1), np.ones(3), np.diag(s2), method=method)
        assert got == pytest.approx(3.0 + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2), rel=1e-10)
    with pytest.raises(ValueError, match="sqrtm method"):
        F.frechet_distance(np.zeros(3), np.diag(s1), np.zeros(3), np.diag(s2), method="newton")


def test_stats_uses_sample_covariance():
    x = np.array([[0.0, 0.0], [2.0, 2.0]])
    mu, sigma = F.stats(x)
    np.testing.assert_allclose(mu, [1, 1])
    np.testing.assert_allclose(sigma, [[2, 2], [2, 2]])  # np.cov divides by N - 1


def test_copies_of_reference_drive_distance_to_zero_and_mifid_up():
    rng = np.random.default_rng(2)
    ref = np.abs(rng.normal(size=(200, 32)))
    gen = np.abs(rng.normal(size=(100, 32)))
    fresh = F.score_features(gen, *F.stats(ref), ref)
    copies = F.score_features(ref[:100], *F.stats(ref), ref)
    assert copies["distance"] == pytest.approx(0.0, abs=1e-12)
    assert fresh["distance"] > 0.05
    assert copies["mifid"] > 1e6 * copies["fid"]
    assert set(fresh) == set(F.RESULT_KEYS)


def test_absolute_cosine_counts_opposite_vectors_as_copies():
    ref = np.array([[1.0, 2.0, 3.0]])
    assert F.memorization_distance(-ref, ref) == pytest.approx(0.0, abs=1e-12)
    orth = np.array([[3.0, 0.0, -1.0]])  # orthogonal to ref
    assert F.memorization_distance(orth, ref) == pytest.approx(1.0)


def test_zero_rows_are_dropped_on_both_sides():
    ref = np.array([[1.0, 0.0], [0.0, 0.0]])
    gen = np.array([[1.0, 1.0], [0.0, 0.0]])
    # only (1,1) vs (1,0) remains: 1 - cos45
    assert F.memorization_distance(gen, ref) == pytest.approx(1 - np.sqrt(0.5))


def test_direction_is_mean_over_generated_of_min_over_reference():
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    gen = np.array([[1.0, 0.0], [1.0, 0.05], [1.0, 0.1]])
    per_gen = [1 - abs(g @ r) / np.linalg.norm(g) / np.linalg.norm(r) for g in gen for r in ref[:1]]
    assert F.memorization_distance(gen, ref) == pytest.approx(np.mean(per_gen))
    swapped = F.memorization_distance(ref, gen)  # torchmetrics' direction would give this
    assert swapped != pytest.approx(np.mean(per_gen))


def test_threshold_edge_is_strict():
    assert F.threshold_distance(0.1) == 1.0
    assert F.threshold_distance(np.nextafter(0.1, 0)) == np.nextafter(0.1, 0)
    assert F.threshold_distance(0.2) == 1.0
    assert F.mifid(50.0, 0.1) == pytest.approx(50.0)
    assert F.mifid(50.0, 0.05) == pytest.approx(1000.0)


def test_chunking_does_not_change_distances():
    rng = np.random.default_rng(3)
    gen, ref = np.abs(rng.normal(size=(37, 16))), np.abs(rng.normal(size=(53, 16)))
    np.testing.assert_allclose(F.nearest_distances(gen, ref, chunk=5), F.nearest_distances(gen, ref, chunk=1000))


def test_nearest_neighbour_indices_refer_to_the_original_reference_rows():
    ref = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # row 0 is dropped (all zeros)
    dist, index = F.nearest_neighbours(np.array([[0.1, 2.0], [3.0, 0.2]]), ref)
    assert index.tolist() == [2, 1]
    np.testing.assert_allclose(dist, F.nearest_distances(np.array([[0.1, 2.0], [3.0, 0.2]]), ref))
