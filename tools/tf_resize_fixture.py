#!/usr/bin/env python
"""The fixture that holds dogkit's legacy bilinear resize to TensorFlow's, without TensorFlow:
TF1's resize_bilinear (align_corners=False, what the FID Inception graph runs) of seeded images,
64 -> 299, sampled at 2,000 seeded positions, with the sums of the whole output.

    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu==2.21.0
    /tmp/tfenv/bin/python tools/tf_resize_fixture.py    # -> tests/metrics/fixtures/tf_resize_bilinear.json

tests/metrics/test_features.py checks dogkit against the committed file on every run (and against
TensorFlow itself where it is installed).
"""
import json
from pathlib import Path

import numpy as np
import tensorflow as tf

OUT = Path(__file__).resolve().parents[1] / "tests" / "metrics" / "fixtures" / "tf_resize_bilinear.json"


def images():
    return np.random.default_rng(0).integers(0, 256, size=(2, 64, 64, 3)).astype(np.float32)


def positions(shape, n=2000):
    rng = np.random.default_rng(1)
    return np.stack([rng.integers(0, s, n) for s in shape], axis=1)


def main():
    ref = tf.compat.v1.image.resize_bilinear(images(), [299, 299], align_corners=False).numpy().astype(np.float64)
    at = positions(ref.shape)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "about": "tf.compat.v1.image.resize_bilinear(align_corners=False) of np.random.default_rng(0).integers(0, 256, "
                 "size=(2, 64, 64, 3)) as float32, to 299x299; values at np.random.default_rng(1) positions (NHWC)",
        "tensorflow": tf.__version__, "command": "python tools/tf_resize_fixture.py",
        "positions": at.tolist(), "values": [round(float(v), 4) for v in ref[tuple(at.T)]],
        "sum": float(ref.sum()), "sum_of_squares": float((ref ** 2).sum())}) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
