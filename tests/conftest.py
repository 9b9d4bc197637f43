"""Shared fixtures. Real data is read from ../shared/data and skipped with a reason when absent."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DOGKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
CROPS = SHARED / "stanford-dogs-crops"
ANNOTATIONS = SHARED / "stanford-dogs-annotation-sample" / "Annotation"

torch.set_num_threads(2)


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not present (the shared Stanford Dogs data is read from ../shared/data)")
    return path


@pytest.fixture(scope="session")
def annotation_dir() -> Path:
    return need(ANNOTATIONS)


@pytest.fixture(scope="session")
def crops_dir() -> Path:
    return need(CROPS)


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def inception():
    """The real FID network (CPU); skips when no offline weights can be found."""
    from dogkit.metrics.inception import InceptionWeightsError, load_inception

    try:
        return load_inception(None)
    except InceptionWeightsError as exc:
        pytest.skip(f"no FID Inception weights offline: {exc}")


@pytest.fixture(scope="session")
def tiny_dataset():
    """300 random-but-structured 64x64 images in 3 'breeds' (no real data needed)."""
    rng = np.random.default_rng(0)
    n = 300
    base = rng.integers(0, 256, size=(3, 1, 1, 3))
    labels = np.arange(n) % 3
    noise = rng.integers(-40, 40, size=(n, 64, 64, 3))
    images = np.clip(base[labels] + noise, 0, 255).astype(np.uint8)
    return {"images": images, "labels": labels, "names": [f"img{i}" for i in range(n)],
            "breeds": ["n0-a", "n1-b", "n2-c"]}
