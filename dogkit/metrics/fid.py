"""FID and the memorization term of MiFID, as the competition computed them (pure numpy).

features -> stats -> frechet_distance; features -> memorization_distance; both -> mifid.
"""
from __future__ import annotations

import numpy as np
from scipy import linalg

MEMORIZATION_THRESHOLD = 0.1
MIFID_EPS = 1e-14
RESULT_KEYS = ("fid", "distance", "distance_thresholded", "mifid", "n_images")


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (np.cov, rowvar=False) in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), TTUR's recipe (retry with eps*I, real part)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: {mu1.shape} vs {mu2.shape}, {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = np.real(covmean)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def normalize_rows(features: np.ndarray) -> np.ndarray:
    """Drop rows that sum to 0, then L2-normalise each row (float64)."""
    f = np.asarray(features, dtype=np.float64)
    f = f[f.sum(axis=1) != 0]
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def nearest_neighbours(generated: np.ndarray, reference: np.ndarray, chunk: int = 1024):
    """For each non-zero generated row: (1 - |cos| to the nearest non-zero reference row, the
    index of that row in `reference`). Chunked: 10k x 12k never holds more than chunk x 12k doubles."""
    ref_rows = np.flatnonzero(np.asarray(reference).sum(axis=1) != 0)
    g = normalize_rows(generated)
    r = normalize_rows(reference)
    if len(g) == 0 or len(r) == 0:
        raise ValueError("no non-zero feature rows to compare")
    dist = np.empty(len(g), dtype=np.float64)
    index = np.empty(len(g), dtype=np.int64)
    for start in range(0, len(g), chunk):
        sim = np.abs(g[start:start + chunk] @ r.T)
        index[start:start + chunk] = sim.argmax(axis=1)
        dist[start:start + chunk] = 1.0 - sim.max(axis=1)
    return dist, ref_rows[index]


def nearest_distances(generated: np.ndarray, reference: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """For each generated row: min over reference rows of 1 - |cos| (zero rows dropped first)."""
    return nearest_neighbours(generated, reference, chunk)[0]


def memorization_distance(generated: np.ndarray, reference: np.ndarray, chunk: int = 1024) -> float:
    """d = mean over GENERATED images of the min over reference images of 1 - |cos|."""
    return float(nearest_distances(generated, reference, chunk).mean())


def threshold_distance(d: float, threshold: float = MEMORIZATION_THRESHOLD) -> float:
    """d_thr = d if d < threshold else 1 (so the term only bites on near-copies)."""
    return d if d < threshold else 1.0


def mifid(fid: float, d: float, threshold: float = MEMORIZATION_THRESHOLD) -> float:
    return fid / (threshold_distance(d, threshold) + MIFID_EPS)


def score_features(generated: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray,
                   ref_features: np.ndarray) -> dict:
    """All MiFID numbers for generated features against a reference; keys in RESULT_KEYS."""
    mu, sigma = stats(generated)
    fid = frechet_distance(mu, sigma, ref_mu, ref_sigma)
    d = memorization_distance(generated, ref_features)
    d_thr = threshold_distance(d)
    return {
        "fid": fid,
        "distance": d,
        "distance_thresholded": d_thr,
        "mifid": fid / (d_thr + MIFID_EPS),
        "n_images": int(len(generated)),
    }
