"""Files that come back from elsewhere (a Kaggle output, a download, someone's run) are data,
never code: checkpoints are read with torch.load(weights_only=True), and a truncated checkpoint,
reference or cache is one line naming the file, never a traceback."""
import os

import pytest
import torch
from click.testing import CliRunner

from dogkit.cli import main
from dogkit.core import registry
from dogkit.core.data import save_cache
from dogkit.core.train import train
from dogkit.core.settings import TrainConfig, with_settings


class Payload:
    """Unpickling this runs open(marker, "w"): what a planted checkpoint.pt could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dataset):
    out = tmp_path_factory.mktemp("run")
    entry = registry.get("dcgan")
    cfg = with_settings(TrainConfig(), dict(entry.settings, width=4, batch_size=8, steps=3, out=str(out), device="cpu",
                                            budget=1e6, reserve=0.0, log_every=0.0, n_samples=64))
    train(cfg, entry.cls, data=tiny_dataset, log=lambda m: None)
    data = out / "data.npz"
    save_cache(str(data), dict(tiny_dataset, settings={}, summary={}), codec="webp")
    return out, data


def truncated(src, dest, keep=0.5):
    dest.write_bytes(src.read_bytes()[:int(src.stat().st_size * keep)])
    return dest


def test_a_checkpoint_is_plain_data(trained):
    ckpt = torch.load(trained[0] / "checkpoint.pt", weights_only=True)  # raises if it held more than data
    assert ckpt["format"] == "dogkit-checkpoint-2"


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path, trained):
    marker = tmp_path / "pwned"
    evil = tmp_path / "checkpoint.pt"
    torch.save({"format": "dogkit-checkpoint-2", "model": "dcgan", "x": Payload(str(marker))}, evil)
    res = CliRunner().invoke(main, ["sample", str(evil), "-o", str(tmp_path / "s.zip"), "-n", "8"])
    assert res.exit_code == 1 and "read as data only" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["train", "--model", "dcgan", "--data", str(trained[1]), "--budget", "5m",
                                    "--out", str(tmp_path / "run"), "--resume", str(evil), "--device", "cpu"])
    assert res.exit_code == 1 and "read as data only" in res.output, res.output
    assert not marker.exists()


@pytest.mark.parametrize("command", ["sample", "resume"])
def test_a_truncated_checkpoint_is_one_line(tmp_path, trained, command):
    bad = truncated(trained[0] / "checkpoint.pt", tmp_path / "checkpoint.pt")
    if command == "sample":
        args = ["sample", str(bad), "-o", str(tmp_path / "s.zip"), "-n", "8"]
    else:
        args = ["train", "--model", "dcgan", "--data", str(trained[1]), "--budget", "5m", "--out",
                str(tmp_path / "run"), "--resume", str(bad), "--device", "cpu"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output  # bad input, in every command (README, exit codes)
    assert str(bad) in res.output and "not readable as a dogkit checkpoint" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) <= 12


def test_a_truncated_reference_or_cache_is_one_line(tmp_path, trained):
    import json

    import numpy as np

    from dogkit.core.data import DataError, load_cache
    from dogkit.metrics.reference import load_reference

    ref = tmp_path / "ref.npz"
    feats = np.random.default_rng(0).random((50, 2048), dtype=np.float32)
    np.savez(ref, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), features=feats,
             provenance=json.dumps({}))
    with pytest.raises(ValueError, match="ref-cut.npz: not a readable reference file"):
        load_reference(truncated(ref, tmp_path / "ref-cut.npz"))
    with pytest.raises(DataError, match="data-cut.npz: not a dogkit cache file"):
        load_cache(str(truncated(trained[1], tmp_path / "data-cut.npz")))
    os.remove(tmp_path / "ref-cut.npz")
