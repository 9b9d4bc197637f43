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


def _poly_kernel(a: np.ndarray, b: np.ndarray, dim: int) -> np.ndarray:
    return (np.asarray(a, np.float64) @ np.asarray(b, np.float64).T / dim + 1) ** 3


def kid_real_term(real: np.ndarray, chunk: int = 2048) -> float:
    """The real set's own part of KID, mean of k(x_i, x_j) over i != j: the same for every
    generator scored against one reference, so computed once (chunked: 12,000 rows in seconds)."""
    n, dim = real.shape
    total = 0.0
    for i in range(0, n, chunk):
        k = _poly_kernel(real[i:i + chunk], real, dim)
        total += k.sum() - np.trace(k[:, i:i + chunk])
    return float(total / (n * (n - 1)))


def kid_all_pairs(real: np.ndarray, fake: np.ndarray, real_term: float | None = None) -> dict:
    """KID over all pairs: the unbiased MMD^2 estimate (cubic polynomial kernel, as `kid`) of the
    whole fake set against the whole real set (sizes may differ), and its standard error over the
    fake samples by the jackknife (leave one fake out, in closed form from the kernel's row sums).
    real_term: kid_real_term(real), when already known."""
    m, dim = fake.shape
    if m < 3:
        raise ValueError(f"KID needs at least 3 generated images, got {m}")
    kyy = _poly_kernel(fake, fake, dim)
    np.fill_diagonal(kyy, 0.0)
    rows_yy = kyy.sum(axis=1)  # each fake's kernel sum with the other fakes
    rows_xy = np.zeros(m)
    for i in range(0, len(real), 4096):
        rows_xy += _poly_kernel(fake, real[i:i + 4096], dim).sum(axis=1)
    rt = kid_real_term(real) if real_term is None else real_term
    n = len(real)
    value = rt + rows_yy.sum() / (m * (m - 1)) - 2 * rows_xy.sum() / (m * n)
    # leave fake l out: its row and column leave the fake-fake sum, its row the fake-real sum
    loo = rt + (rows_yy.sum() - 2 * rows_yy) / ((m - 1) * (m - 2)) - 2 * (rows_xy.sum() - rows_xy) / ((m - 1) * n)
    se = np.sqrt((m - 1) / m * ((loo - loo.mean()) ** 2).sum())
    if not (np.isfinite(value) and np.isfinite(se)):
        raise ValueError("KID is not finite: the features hold NaN or inf")
    return {"kid": float(value), "kid_se": float(se)}
