import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dogkit.cli import main
from dogkit.metrics import reference as R


def write_photos(folder, n, seed=0, size=(80, 60)):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"p{i:03d}.jpg", quality=95)


class MeanNet(torch.nn.Module):
    """A stand-in for Inception: 2048 features from channel means (fast, deterministic)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2048)
        torch.nn.init.uniform_(self.proj.weight, 0, 1)

    def forward(self, x):
        return [torch.relu(self.proj(x.mean(dim=(2, 3)))).view(len(x), 2048, 1, 1)]


def test_reference_resumes_after_an_interruption(tmp_path, monkeypatch):
    write_photos(tmp_path / "photos", 12)
    model, info = MeanNet(), {"digest": "fake", "source": "test"}
    full = R.build_reference(tmp_path / "photos", tmp_path / "full.npz", model, info, "cpu",
                             batch_size=3, checkpoint_every=3, progress=False)

    calls = {"n": 0}
    real_pool3 = R.feat.pool3

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_pool3(*args)

    monkeypatch.setattr(R.feat, "pool3", flaky)
    with pytest.raises(KeyboardInterrupt):
        R.build_reference(tmp_path / "photos", tmp_path / "ref.npz", model, info, "cpu",
                          batch_size=3, checkpoint_every=3, progress=False)
    assert not (tmp_path / "ref.npz").exists()
    assert (tmp_path / "ref.npz.partial.npz").exists()
    monkeypatch.setattr(R.feat, "pool3", real_pool3)
    logs = []
    resumed = R.build_reference(tmp_path / "photos", tmp_path / "ref.npz", model, info, "cpu",
                                batch_size=3, checkpoint_every=3, progress=False, log=logs.append)
    assert any("resuming" in m and "6/12" in m for m in logs)
    np.testing.assert_array_equal(resumed.features, full.features)
    assert not (tmp_path / "ref.npz.partial.npz").exists()


def test_reference_squashes_a_wide_photo_to_64_with_lanczos(tmp_path):
    """A 120x50 photo, grey 64 on its left half and 192 on its right: squashed (not cropped or
    padded) the edge stays at the middle column, every row alike, the far columns exactly their
    grey; Lanczos rings at the edge (a value below 64 and one above 192), which a bilinear or box
    filter never does."""
    (tmp_path / "p").mkdir()
    photo = np.full((50, 120, 3), 64, np.uint8)
    photo[:, 60:] = 192
    Image.fromarray(photo).save(tmp_path / "p" / "wide.png")
    got = R.load_photos(tmp_path / "p", ["wide.png"])[0][0].astype(int)
    assert got.shape == (64, 64, 3) and (got == got[:1]).all() and (got == got[..., :1]).all()
    row = got[0, :, 0]
    assert (row[:24] == 64).all() and (row[40:] == 192).all()
    assert row[31] < 128 < row[32]  # the edge at 60 of 120 is at 32 of 64
    assert row[24:32].min() < 64 and row[32:40].max() > 192  # Lanczos' ringing


@pytest.mark.slow
def test_score_cli_end_to_end(tmp_path, inception):
    write_photos(tmp_path / "real", 8)
    runner = CliRunner()
    res = runner.invoke(main, ["reference", str(tmp_path / "real"), "-o", str(tmp_path / "ref.npz")])
    assert res.exit_code == 0, res.output
    # score copies of the reference photos (as 64x64 PNGs): d ~ 0, MiFID >> FID
    sub = tmp_path / "sub"
    sub.mkdir()
    ref_pixels, _ = R.load_photos(tmp_path / "real", R.list_photos(tmp_path / "real"))
    for i, px in enumerate(ref_pixels[:4]):
        Image.fromarray(px).save(sub / f"{i}.png")
    res = runner.invoke(main, ["score", str(sub), "--reference", str(tmp_path / "ref.npz"), "--no-strict", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(result) >= {"fid", "distance", "distance_thresholded", "mifid", "n_images"}
    assert result["n_images"] == 4
    assert 0.0 <= result["distance"] < 1e-5  # never -0.0000: |cos| > 1 by rounding counts as 0
    assert "fewer than the 2048 feature dimensions" in res.output  # the notes, on stderr
    assert "sit on the reference photos" in res.output
    assert result["mifid"] > 1e3 * result["fid"]


def test_score_cli_rejects_bad_submission_before_any_network(tmp_path, monkeypatch):
    import dogkit.metrics.inception as inc

    monkeypatch.setattr(inc, "load_inception", lambda *a: pytest.fail("network loaded before the rules"))
    sub = tmp_path / "images.zip"
    sub.write_bytes(b"nope")
    (tmp_path / "none.npz").write_bytes(b"never read: the submission's rules come first")
    res = CliRunner().invoke(main, ["score", str(sub), "--reference", str(tmp_path / "none.npz")])
    assert res.exit_code == 1  # bad input (docs/cleaning.md: exit codes of every dogkit command)
    assert "not a zip file" in res.output


def test_a_folder_refused_in_strict_mode_points_to_images_zip(tmp_path):
    sub = tmp_path / "pngs"
    sub.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(sub / "a.png")
    (tmp_path / "none.npz").write_bytes(b"never read: the submission's rules come first")
    res = CliRunner().invoke(main, ["score", str(sub), "--reference", str(tmp_path / "none.npz")])
    assert res.exit_code == 1 and "Kaggle takes images.zip" in res.output and "--no-strict" in res.output


def test_limit_picks_photos_spread_over_the_breeds_and_says_so(tmp_path):
    """--limit 12 of 5 breeds (the first 12 sorted would be 2 breeds): every breed gets 2 or 3,
    the pick is seeded (the same twice) and the provenance records it with the breed count."""
    for b, n in enumerate((6, 6, 6, 2, 6)):
        write_photos(tmp_path / "photos" / f"n0000000{b}-breed{b}", n, seed=b)
    names = R.list_photos(tmp_path / "photos")
    picked = R.balanced_pick(names, 12)
    counts = sorted(sum(R.breed_of(n) == f"n0000000{b}-breed{b}" for n in picked) for b in range(5))
    assert len(picked) == 12 and counts == [2, 2, 2, 3, 3] and picked == R.balanced_pick(names, 12)
    assert R.breed_of("n02085620_10074.jpg") == "n02085620" and R.balanced_pick(names, 99) == sorted(names)
    ref = R.build_reference(tmp_path / "photos", tmp_path / "ref.npz", MeanNet(), {"digest": "fake", "source": "t"},
                            "cpu", progress=False, limit=12)
    assert ref.provenance["breeds"] == 5 and ref.provenance["limit"]["photos"] == 12 and list(ref.names) == picked


def test_the_partial_reference_is_saved_every_minute_and_an_interrupt_says_how_to_resume(tmp_path, monkeypatch):
    """Saved by the clock as well as the count (a minute's work at most is lost); Ctrl-C says what
    was kept and the command that resumes, exit 130."""
    import time

    write_photos(tmp_path / "photos", 9)
    now = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    real_pool3, calls = R.feat.pool3, {"n": 0}

    def slow(*args):  # each batch of 3 takes 40 s; the third is interrupted
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        now[0] += 40.0
        return real_pool3(*args)

    monkeypatch.setattr(R.feat, "pool3", slow)
    monkeypatch.setattr("dogkit.cli._load_network", lambda weights: (MeanNet(), {"digest": "fake", "source": "t"}))
    out = tmp_path / "ref.npz"
    res = CliRunner().invoke(main, ["reference", str(tmp_path / "photos"), "-o", str(out), "--batch-size", "3"])
    assert res.exit_code == 130, res.output
    with np.load(tmp_path / "ref.npz.partial.npz") as p:
        assert int(p["done"]) == 6  # 80 s after the start: saved past the minute, not at 500 photos
    assert (f"Error: interrupted: the photos done up to the last minute are kept in {out}.partial.npz; the same "
            f"command resumes there: dogkit reference {tmp_path / 'photos'} -o {out}") in res.output


@pytest.mark.slow  # three FIDs of 2,048 features: ~40 s on 2 cores
def test_a_sampled_score_and_the_feature_cache(tmp_path, monkeypatch):
    """--sample scores a seeded sample (the rules still read every image) and says so; a full score
    keeps its features in the cache, which a later sample, score or report of the same images reads
    instead of computing; one changed pixel misses. A fake feature network: what is tested is the
    path, not Inception's values."""
    from dogkit import cli
    from dogkit.metrics import features as feat
    from dogkit.metrics.score import submission_features
    from dogkit.metrics.submission import load_submission

    monkeypatch.setenv("DOGKIT_CACHE", str(tmp_path / "cache"))
    model, info = MeanNet(), {"digest": "fake-net", "source": "test"}
    monkeypatch.setattr(cli, "_load_network", lambda weights: (model, info))
    write_photos(tmp_path / "real", 12)
    R.build_reference(tmp_path / "real", tmp_path / "ref.npz", model, info, "cpu", batch_size=4, progress=False)
    sub = tmp_path / "sub"
    write_photos(sub, 40, seed=1, size=(64, 64))
    for jpg in sorted(sub.glob("*.jpg")):
        Image.open(jpg).save(jpg.with_suffix(".png"))
        jpg.unlink()
    rows, real_extract = [], feat.extract
    monkeypatch.setattr(feat, "extract", lambda m, pixels, *a, **k: rows.append(len(pixels)) or real_extract(
        m, pixels, *a, **k))
    score = ["score", str(sub), "--reference", str(tmp_path / "ref.npz"), "--no-strict", "--sqrtm", "eigh"]

    res = CliRunner().invoke(main, score + ["--sample", "10"])
    assert res.exit_code == 0 and rows == [10], res.output
    assert "images     10 of 40 (a seeded sample: not comparable with a full score)" in res.output
    assert "(a sample of 10)" in res.output and "a seeded sample of 10 of the 40 images" in res.output
    assert not (tmp_path / "cache").exists()  # a sample's features are not kept
    sampled = submission_features(load_submission(sub, strict=False), model, "cpu", sample=10)[0]
    res = CliRunner().invoke(main, score + ["--json"])
    full = json.loads(res.stdout)
    assert (full["n_images"], full["sampled_from"], rows) == (40, 40, [10, 10, 40])
    assert len(list((tmp_path / "cache" / "features").glob("*.npy"))) == 1
    images = load_submission(sub, strict=False)
    cached, notes = submission_features(images, model, "cpu", sample=10, network_digest="fake-net")
    assert rows == [10, 10, 40] and "read from the cache" in notes[-1]
    np.testing.assert_allclose(cached, sampled, rtol=1e-5, atol=1e-6)  # the same 10 rows
    res = CliRunner().invoke(main, ["report", str(sub), "--reference", str(tmp_path / "ref.npz"), "-o",
                                    str(tmp_path / "report")])
    assert res.exit_code == 0 and rows == [10, 10, 40] and "read from the cache" in res.output, res.output
    reported = json.loads((tmp_path / "report" / "report.json").read_text())["mifid"]
    assert reported == pytest.approx(full["mifid"], rel=1e-5)  # scipy's sqrtm there, eigh here
    images.pixels[3, 0, 0, 0] ^= 1
    submission_features(images, model, "cpu", network_digest="fake-net")
    assert rows == [10, 10, 40, 40]  # one pixel changed: computed again
