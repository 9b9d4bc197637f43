"""Fidelity and diversity on pool_3 features (pure functions, numpy in, floats out).

- precision / recall: Kynkäänniemi et al. 2019 (k-NN balls around each set, k = 3);
- density / coverage: Naeem et al. 2020 (k-NN balls around the real set only, k = 3);
- KID: unbiased MMD^2 with the cubic polynomial kernel, mean and standard deviation over subsets.
"""
from __future__ import annotations

import numpy as np
import torch


def _dist(a: np.ndarray, b: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Euclidean distances (len(a), len(b)) in float64, chunked over a."""
    ta, tb = torch.from_numpy(np.asarray(a, np.float64)), torch.from_numpy(np.asarray(b, np.float64))
    return torch.cat([torch.cdist(ta[i:i + chunk], tb) for i in range(0, len(ta), chunk)]).numpy()


def knn_radii(x: np.ndarray, k: int = 3) -> np.ndarray:
    """Distance from each row to its k-th nearest other row."""
    d = _dist(x, x)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def manifold_metrics(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict:
    """Precision, recall, density and coverage from one set of k-NN radii and one distance matrix."""
    r_real, r_fake = knn_radii(real, k), knn_radii(fake, k)
    d = _dist(fake, real)  # (fake, real)
    inside_real = d <= r_real[None, :]  # fake j inside the ball of real i
    return {
        "precision": float(inside_real.any(axis=1).mean()),
        "recall": float((d.T <= r_fake[None, :]).any(axis=1).mean()),
        "density": float(inside_real.sum() / (k * len(fake))),
        "coverage": float(inside_real.any(axis=0).mean()),
    }


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict:
    """Precision: share of fakes inside the real manifold; recall: share of reals inside the fake one."""
    m = manifold_metrics(real, fake, k)
    return {"precision": m["precision"], "recall": m["recall"]}


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict:
    """Density: how many real balls hold each fake (1 on average when distributions match);
    coverage: share of real balls that hold at least one fake."""
    m = manifold_metrics(real, fake, k)
    return {"density": m["density"], "coverage": m["coverage"]}


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> dict:
    """Kernel Inception Distance: unbiased MMD^2, kernel (x.y / d + 1)^3; mean and std over subsets."""
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(real), len(fake))
    dim = real.shape[1]
    values = []
    for _ in range(subsets):
        x = np.asarray(real[rng.choice(len(real), m, replace=False)], np.float64)
        y = np.asarray(fake[rng.choice(len(fake), m, replace=False)], np.float64)
        kxx, kyy, kxy = ((x @ x.T) / dim + 1) ** 3, ((y @ y.T) / dim + 1) ** 3, ((x @ y.T) / dim + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        values.append(mmd)
    return {"kid": float(np.mean(values)), "kid_std": float(np.std(values))}
