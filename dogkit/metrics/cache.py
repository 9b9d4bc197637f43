"""The features of a submission, computed once: `dogkit score` keeps them and `dogkit report` (or a
second score) of the same images with the same network reads them back instead of computing them
again. Keyed by the content (the decoded pixels and their names, and the network's digest), so a
rebuilt zip with the same images hits and any changed pixel misses; written atomically, at most
KEEP files (the oldest go first). DOGKIT_CACHE names the folder (default ~/.cache/dogkit)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from dogkit.core.data import atomic_path

KEEP = 8  # feature files kept (10,000 images: 80 MB each)


def cache_dir() -> Path:
    base = os.environ.get("DOGKIT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                           os.path.expanduser("~/.cache"), "dogkit")
    return Path(base) / "features"


def features_key(pixels: np.ndarray, names: list[str], network_digest: str) -> str:
    """The content key of a submission's features: its pixels, its names and the network."""
    h = hashlib.sha256()
    h.update(str(pixels.shape).encode() + str(pixels.dtype).encode())
    h.update(np.ascontiguousarray(pixels).data)
    h.update("\n".join(names).encode("utf-8", "surrogateescape"))
    h.update(network_digest.encode())
    return h.hexdigest()[:32]


def load_features(key: str, n_images: int) -> np.ndarray | None:
    """The cached features of key, or None (absent, unreadable, or not one row per image)."""
    path = cache_dir() / f"{key}.npy"
    try:
        features = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if features.ndim != 2 or features.shape[0] != n_images or not np.isfinite(features).all():
        return None
    os.utime(path)  # recently used: kept longest
    return features


def save_features(key: str, features: np.ndarray) -> Path | None:
    """Keep features under key (atomically; the oldest files beyond KEEP removed). A cache that
    cannot be written is no error: the score stands, the next one computes again (None)."""
    folder = cache_dir()
    path = folder / f"{key}.npy"
    try:
        with atomic_path(path) as tmp:
            np.save(tmp, np.asarray(features, dtype=np.float32), allow_pickle=False)
        kept = sorted(folder.glob("[!.]*.npy"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[KEEP:]:
            old.unlink(missing_ok=True)
        return path
    except OSError:
        return None


def sample_rows(n_images: int, n: int, seed: int = 0) -> np.ndarray:
    """The rows of a seeded sample of n of n_images images (sorted; all of them when n >= n_images)."""
    if n >= n_images:
        return np.arange(n_images)
    return np.sort(np.random.default_rng(seed).choice(n_images, n, replace=False))
