"""tools/truncation_sweep.py: one scored row per truncation, resumable, a table and a plot."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import truncation_sweep  # noqa: E402

from dogkit.core import registry  # noqa: E402
from dogkit.core.train import train  # noqa: E402
from dogkit.core.settings import TrainConfig, with_settings
from dogkit.metrics import fid as F  # noqa: E402


@pytest.fixture
def checkpoint(tmp_path, tiny_dataset):
    cfg = with_settings(with_settings(TrainConfig(), registry.get("dcgan").settings),
                        dict(out=str(tmp_path / "run"), width=4, batch_size=8, n_samples=16, reserve=0.0,
                             steps=2, budget=1e6, device="cpu", grid_every=1e9, checkpoint_every=1e9))
    train(cfg, registry.get("dcgan").cls, data=tiny_dataset, log=lambda m: None)
    return str(tmp_path / "run" / "checkpoint.pt")


@pytest.mark.slow
def test_sweep_scores_each_truncation_once_and_resumes(tmp_path, checkpoint, inception, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(size=(100, 2048))).astype(np.float32)
    mu, sigma = F.stats(feats)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma, features=feats, names=np.array([f"r{i}" for i in range(100)]),
             provenance=json.dumps({"source": "synthetic"}))
    args = [checkpoint, "--reference", str(tmp_path / "ref.npz"), "--truncations", "1,0", "--n-images", "12",
            "--batch-size", "6", "--out", str(tmp_path / "sweep.jsonl"), "--plot", str(tmp_path / "sweep.png"),
            "--device", "cpu"]
    truncation_sweep.main(args)
    rows = [json.loads(line) for line in (tmp_path / "sweep.jsonl").read_text().splitlines()]
    assert [r["truncation"] for r in rows] == [1.0, None]
    assert all(r["n_images"] == 12 and r["fid"] > 0 for r in rows)
    assert all(r["mifid"] == pytest.approx(r["fid"] / r["distance_thresholded"]) for r in rows)
    assert rows[0]["fid"] != rows[1]["fid"]  # different z, different images
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "| 1 |" in table and "| none |" in table

    # a rerun scores only what is missing: 1 and none are done, 0.5 is new
    calls = []

    def fake_point(ckpt, generator, t, *rest):
        calls.append(t)
        return {**rows[0], "truncation": t, "seed": rest[4]}  # rest: ref, model, device, batch, seed, n

    monkeypatch.setattr(truncation_sweep, "score_point", fake_point)
    truncation_sweep.main([*args[:4], "0.5,1,0", *args[5:]])
    assert calls == [0.5]
    assert len((tmp_path / "sweep.jsonl").read_text().splitlines()) == 3
    # another seed is another set of rows: nothing of seed 0 is reused
    calls.clear()
    truncation_sweep.main([*args[:4], "1,0", *args[5:], "--seed", "1"])
    assert calls == [1.0, 0]
    assert len((tmp_path / "sweep.jsonl").read_text().splitlines()) == 5


@pytest.mark.parametrize("bad,why", [("", "give one or more"), ("-1", "truncation -1.0: give 0 (none) or a number"),
                                     ("0.5,0.01,x", "truncation 0.01: give 0 (none) or a number from 0.04 to 100 (a "
                                                    "smaller one keeps almost no z value and would never finish "
                                                    "redrawing); 'x' is not a number")])
def test_truncations_are_checked_by_the_one_rule(bad, why):
    with pytest.raises(ValueError) as err:
        truncation_sweep.parse_truncations(bad)
    assert why in str(err.value)
