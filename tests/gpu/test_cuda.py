"""GPU-only checks, run first by `tools/gpu_bench.py run` on the GPU (well under a minute)
so that a failure only a GPU can show is in the log before any training starts. Skipped without
CUDA (CI, the developers' machines)."""
import dataclasses

import pytest
import torch

from dogkit.core import registry
from dogkit.core.train import Trainer, load_checkpoint, save_checkpoint
from dogkit.core.settings import TrainConfig, with_settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by tools/gpu_bench.py run)")


def tiny(model, tmp_path, **over):
    entry = registry.get(model)
    return with_settings(TrainConfig(), dict(entry.settings, model=model, width=8, batch_size=16, out=str(tmp_path),
                                             device="cuda", budget=1e6, reserve=0.0, log_every=0.0, n_samples=64,
                                             **over))


def trainer_of(cfg, data):
    return Trainer(cfg, registry.get(cfg.model).cls, data=data, log=lambda m: None)


@pytest.mark.parametrize("model", ["biggan", "dcgan"])
def test_the_models_step_runs_as_written_every_step_on_cuda(model, tmp_path, tiny_dataset):
    # an edited step's Python (a counter, a branch) runs at every step: nothing replays a frozen copy of it
    cfg = tiny(model, tmp_path, steps=6)
    trainer = Trainer(cfg, registry.get(model).cls, data=tiny_dataset, log=lambda m: None)
    step, calls = trainer.model.step, []
    trainer.model.step = lambda batch: calls.append(1) or step(batch)
    trainer.run()
    assert trainer.step == 6 and len(calls) == 6


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("model", ["biggan", "dcgan"])
def test_low_precision_steps_stay_finite(model, precision, tmp_path, tiny_dataset):
    if precision == "bf16" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 runs natively from sm_80 on")
    cfg = tiny(model, tmp_path, steps=8, precision=precision, memory_format="channels_last")
    trainer = trainer_of(cfg, tiny_dataset)
    trainer.run()
    assert trainer.precision == precision
    # every step's losses finite by themselves (log_every 0: each one checked), none rescued by a rollback
    assert trainer.safety.rollbacks == 0 and trainer.safety.lr_scale == 1.0 and trainer.step == 8


def test_a_checkpoint_round_trip_on_cuda(tmp_path, tiny_dataset):
    cfg = tiny("biggan", tmp_path, steps=4)
    first = trainer_of(cfg, tiny_dataset)
    first.run()
    path = save_checkpoint(first, "again.pt")
    second = trainer_of(dataclasses.replace(cfg, out=str(tmp_path / "b")), tiny_dataset)
    load_checkpoint(second, path)
    assert second.step == first.step
    for a, b in zip(first.ema.G.state_dict().values(), second.ema.G.state_dict().values()):
        assert a.device.type == "cuda" and torch.equal(a, b)
