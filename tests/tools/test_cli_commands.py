"""`dogkit sample` and `dogkit export-inception`, end to end through the CLI."""
import pytest
import torch
from click.testing import CliRunner

from dogkit.cli import main
from dogkit.core import registry
from dogkit.core.train import train
from dogkit.core.settings import TrainConfig, with_settings
from dogkit.metrics.submission import load_submission


@pytest.mark.slow
def test_sample_writes_a_checked_submission_and_the_seed_decides(tmp_path, tiny_dataset):
    cfg = with_settings(with_settings(TrainConfig(), registry.get("dcgan").settings),
                        dict(out=str(tmp_path / "run"), width=4, batch_size=8, n_samples=64, reserve=0.0,
                             log_every=0.0, device="cpu", steps=3, budget=1e6))
    train(cfg, registry.get("dcgan").cls, data=tiny_dataset, log=lambda m: None)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    runner = CliRunner()
    res = runner.invoke(main, ["sample", str(ckpt), "-o", str(tmp_path / "a.zip"), "--device", "cpu",
                               "--grid", str(tmp_path / "grid.png")])
    assert res.exit_code == 0, res.output
    assert "10000 images, valid submission" in res.output and (tmp_path / "grid.png").exists()
    a = load_submission(tmp_path / "a.zip").pixels
    res = runner.invoke(main, ["sample", str(ckpt), "-o", str(tmp_path / "b.zip"), "-n", "100", "--seed", "1",
                               "--device", "cpu"])
    assert res.exit_code == 0 and "not a submission" in res.output
    b = load_submission(tmp_path / "b.zip", strict=False).pixels
    assert b.shape == (100, 64, 64, 3) and (a[:100] != b).mean() > 0.1


def test_export_inception_writes_loadable_fp16_weights(tmp_path, inception):
    from dogkit.metrics.inception import load_inception

    out = tmp_path / "inception-fp16.pth"
    res = CliRunner().invoke(main, ["export-inception", "--format", "fp16", "-o", str(out)])
    assert res.exit_code == 0, res.output
    state = torch.load(out, weights_only=True)
    tensors = [v for v in (state.values() if isinstance(state, dict) else []) if torch.is_tensor(v)]
    assert tensors and any(v.dtype == torch.float16 for v in tensors)
    import numpy as np

    from dogkit.metrics.features import pool3

    model, _ = load_inception(str(out))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(pool3(model, pixels, "cpu"), pool3(inception[0], pixels, "cpu"), rtol=0.02, atol=0.02)
