"""tools/gpu_bench.py: the reference survives the trip in carry-sized parts; the table reads rows."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import gpu_bench  # noqa: E402

from dogkit.metrics import fid as F  # noqa: E402
from dogkit.metrics.reference import load_reference  # noqa: E402


def make_reference(path, n=300, dim=2048):
    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(size=(n, dim))).astype(np.float32)
    mu, sigma = F.stats(feats)
    np.savez(path, mu=mu, sigma=sigma, features=feats, names=np.array([f"p{i}.jpg" for i in range(n)]),
             provenance=json.dumps({"source": "synthetic"}))
    return feats, mu, sigma


def test_pack_and_unpack_round_trip(tmp_path):
    feats, mu, sigma = make_reference(tmp_path / "ref.npz")
    files = gpu_bench.pack_reference(tmp_path / "ref.npz", tmp_path / "parts", part_mib=0.5)
    parts = [f for f in files if f.name.startswith("features_")]
    assert len(parts) == 3 and all(f.stat().st_size <= 0.5 * 2**20 + 256 for f in parts)
    ref = load_reference(gpu_bench.unpack_reference(tmp_path / "parts", tmp_path / "back.npz"))
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)  # float64 upper triangle: FID unchanged
    np.testing.assert_allclose(ref.features, feats, rtol=1e-3, atol=1e-4)  # float16 features for d
    assert ref.names == [f"p{i}.jpg" for i in range(300)]
    gen = feats[:50] * 1.01 + 0.01
    assert F.memorization_distance(gen, ref.features) == pytest.approx(F.memorization_distance(gen, feats), abs=1e-5)


def test_unpack_names_the_missing_part(tmp_path):
    make_reference(tmp_path / "ref.npz")
    gpu_bench.pack_reference(tmp_path / "ref.npz", tmp_path / "parts", part_mib=0.5)
    (tmp_path / "parts" / "features_1.npy").unlink()
    with pytest.raises(SystemExit, match="features_1.npy"):
        gpu_bench.unpack_reference(tmp_path / "parts", tmp_path / "back.npz")
    assert not (tmp_path / "back.npz").exists()


def test_table_prints_one_row_per_scored_run(tmp_path, capsys):
    row = {"model": "dcgan", "tag": "dcgan", "what": "kernel images.zip", "truncation": None, "steps": 143479,
           "steps_per_s": 342.5, "batch_size": 32, "images_seen": 4591328, "fid": 116.598, "distance": 0.2666,
           "mifid": 116.598}
    (tmp_path / "r.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({"what": "timing"}) + "\n")
    gpu_bench.main(["table", str(tmp_path / "r.jsonl")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert "| dcgan | dcgan | kernel images.zip | none | 143,479 | 342.5 | 32 | 4.59 M | 116.60 | 0.267 | 116.60 |" in lines


def test_run_summary_takes_the_images_seen_from_the_checkpoint(tmp_path, tiny_dataset):
    """No per-model rule: wgan-gp's 5 real batches per step are counted by the trainer."""
    from dogkit.core import registry
    from dogkit.core.train import TrainConfig, train, with_settings

    entry = registry.get("wgan-gp")
    cfg = with_settings(TrainConfig(), dict(entry.settings, width=4, batch_size=8, steps=2, out=str(tmp_path),
                                            device="cpu", budget=1e6, reserve=0.0, log_every=0.0, n_samples=64))
    train(cfg, entry.cls, data=tiny_dataset, log=lambda m: None)
    summary = gpu_bench.run_summary(tmp_path)
    assert summary["steps"] == 2 and summary["images_seen"] == 2 * cfg.d_steps * 8
