import numpy as np
import pytest
import torch

from dogkit.metrics import features as feat


def test_legacy_bilinear_hand_computed_upsampling():
    # 2 -> 4: source = dst * 0.5 -> 0, 0.5, 1, 1.5 (clamped to the last pixel)
    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    out = feat.legacy_resize(x, 4)[0, 0]
    expected = torch.tensor([
        [0.0, 5.0, 10.0, 10.0],
        [10.0, 15.0, 20.0, 20.0],
        [20.0, 25.0, 30.0, 30.0],
        [20.0, 25.0, 30.0, 30.0],
    ])
    torch.testing.assert_close(out, expected)


def test_legacy_bilinear_has_no_half_pixel_offset():
    # 3 -> 2: source = dst * 1.5 -> 0 and 1.5: TF1 legacy, not the half-pixel centre 0.25 / 1.75
    x = torch.tensor([[[[0.0, 100.0, 200.0]]]])
    out = feat.legacy_resize(x.expand(1, 1, 3, 3).contiguous(), 2)[0, 0, 0]
    torch.testing.assert_close(out, torch.tensor([0.0, 150.0]))


def test_preprocess_scales_to_tf_range():
    img = np.full((1, 64, 64, 3), 255, dtype=np.uint8)
    x = feat.preprocess(img)
    assert x.shape == (1, 3, 299, 299)
    assert torch.allclose(x, torch.full_like(x, 127 / 128))
    with pytest.raises(ValueError):
        feat.preprocess(np.zeros((1, 64, 64, 4), dtype=np.uint8))


def test_matches_tensorflows_resize_bilinear_as_recorded():
    """TF1's resize_bilinear of seeded images, recorded with TensorFlow by tools/tf_resize_fixture.py
    (2,000 sampled values and the sums of the whole 2x299x299x3 output): dogkit's resize agrees
    without TensorFlow installed."""
    import json
    from pathlib import Path

    fixture = json.loads((Path(__file__).parent / "fixtures" / "tf_resize_bilinear.json").read_text())
    img = np.random.default_rng(0).integers(0, 256, size=(2, 64, 64, 3)).astype(np.float32)
    ours = feat.legacy_resize(torch.from_numpy(img).permute(0, 3, 1, 2), 299).permute(0, 2, 3, 1).double().numpy()
    at = tuple(np.array(fixture["positions"]).T)
    np.testing.assert_allclose(ours[at], fixture["values"], atol=1e-3)
    assert ours.sum() == pytest.approx(fixture["sum"], rel=1e-7)
    assert (ours ** 2).sum() == pytest.approx(fixture["sum_of_squares"], rel=1e-7)


def test_matches_tensorflow_resize_bilinear_when_installed():
    tf = pytest.importorskip("tensorflow", reason="tensorflow not installed: optional cross-check")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(2, 64, 64, 3)).astype(np.float32)
    ref = tf.compat.v1.image.resize_bilinear(img, [299, 299], align_corners=False).numpy()
    ours = feat.legacy_resize(torch.from_numpy(img).permute(0, 3, 1, 2), 299).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-3)


@pytest.mark.slow
def test_features_independent_of_batch_size(inception):
    from dogkit.metrics.fid import frechet_distance, stats

    model, _ = inception
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(12, 64, 64, 3), dtype=np.uint8)
    a = feat.extract(model, imgs, "cpu", batch_size=12)
    b = feat.extract(model, imgs, "cpu", batch_size=5)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    other = feat.extract(model, rng.integers(0, 256, size=(12, 64, 64, 3), dtype=np.uint8), "cpu", batch_size=4)
    fa = frechet_distance(*stats(a), *stats(other))
    fb = frechet_distance(*stats(b), *stats(other))
    assert fa == pytest.approx(fb, rel=1e-4)
