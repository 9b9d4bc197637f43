"""The training machinery on CPU: budget, simulated clock, resume, NaN rollback, interrupt."""
import json
import math

import numpy as np
import pytest
import torch

from dogkit.core import registry
from dogkit.core.train import (TrainConfig, Trainer, ema_weight, lr_multiplier, parse_budget, train,
                               with_settings)
from dogkit.metrics.submission import load_submission


def tiny_cfg(tmp_path, **over):
    entry = registry.get("dcgan")
    cfg = with_settings(TrainConfig(), entry.settings)
    base = dict(out=str(tmp_path), width=4, batch_size=8, n_samples=64, reserve=0.0, log_every=0.0,
                grid_every=1e9, checkpoint_every=1e9, device="cpu", budget=1e6)
    base.update(over)
    return with_settings(cfg, base)


class FakeClock:
    """Advances only when a step is taken: the schedule becomes a pure function of the step."""

    def __init__(self, dt=1.0):
        self.t, self.dt = 0.0, dt

    def __call__(self):
        return self.t

    def hook(self, trainer):
        self.t += self.dt


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("8m", 480), ("9h", 32400), ("1h30m", 5400), ("45", 45)])
def test_parse_budget(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("bad", ["", "8 minutes", "m8", "-5m"])
def test_parse_budget_rejects(bad):
    with pytest.raises(ValueError):
        parse_budget(bad)


def test_schedule_is_a_function_of_progress():
    cfg = TrainConfig(lr_decay_start=0.5, lr_final=0.1, ema_start=0.25, ema_decay=0.999)
    assert lr_multiplier(0.0, cfg) == 1.0 and lr_multiplier(0.5, cfg) == 1.0
    assert lr_multiplier(0.75, cfg) == pytest.approx(0.55)
    assert lr_multiplier(1.0, cfg) == pytest.approx(0.1)
    assert ema_weight(0.2, cfg) == 1.0
    assert ema_weight(0.3, cfg) == pytest.approx(0.001)


def test_unknown_setting_is_an_error():
    with pytest.raises(ValueError, match="lr_gg"):
        with_settings(TrainConfig(), {"lr_gg": 1.0})


def test_tiny_end_to_end_run_writes_a_valid_submission(tmp_path, tiny_dataset):
    cfg = tiny_cfg(tmp_path, budget=45.0, reserve=-1.0, n_samples=10_000, log_every=2.0, steps=150)
    path = train(cfg, registry.get("dcgan").cls, data=tiny_dataset, log=lambda m: None)
    images = load_submission(path, strict=True)
    assert images.pixels.shape == (10_000, 64, 64, 3)
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert log and log[-1]["step"] > 0 and all(math.isfinite(r["loss_d"]) for r in log)
    for name in ("options.json", "checkpoint.pt", "samples.png"):
        assert (tmp_path / name).exists()


def test_time_guard_under_a_simulated_clock(tmp_path, tiny_dataset):
    clock = FakeClock(dt=1.0)
    cfg = tiny_cfg(tmp_path, budget=30.0, reserve=10.0, log_every=5.0)
    trainer = Trainer(cfg, registry.get("dcgan").cls, data=tiny_dataset, clock=clock, log=lambda m: None,
                      hooks=[clock.hook])
    trainer.run()
    assert trainer.train_seconds == 20.0
    assert trainer.step == 20  # one simulated second per step, 30 s budget - 10 s reserve
    assert clock.t <= cfg.budget


def run_steps(tmp_path, data, steps, resume=None, out="run"):
    clock = FakeClock(dt=1.0)
    cfg = tiny_cfg(tmp_path / out, steps=steps, budget=40.0, reserve=0.0, lr_decay_start=0.2, ema_start=0.1)
    trainer = Trainer(cfg, registry.get("dcgan").cls, data=data, clock=clock, log=lambda m: None, hooks=[clock.hook])
    if resume:
        trainer.restore(resume)
    trainer.run()
    return trainer


def test_resume_continues_exactly(tmp_path, tiny_dataset):
    straight = run_steps(tmp_path, tiny_dataset, 12, out="straight")
    run_steps(tmp_path, tiny_dataset, 6, out="half")
    resumed = run_steps(tmp_path, tiny_dataset, 12, resume=tmp_path / "half" / "checkpoint.pt", out="half")
    assert resumed.step == straight.step == 12
    for a, b in zip(straight.model.G.state_dict().values(), resumed.model.G.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(straight.G_ema.parameters(), resumed.G_ema.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    la = [json.loads(x)["loss_d"] for x in open(tmp_path / "straight" / "log.jsonl")]
    lb = [json.loads(x)["loss_d"] for x in open(tmp_path / "half" / "log.jsonl")]
    assert la == lb


def test_nan_rolls_back_and_still_writes_the_zip(tmp_path, tiny_dataset):
    def poison(trainer):
        if trainer.step == 5:
            with torch.no_grad():
                next(trainer.model.G.parameters()).fill_(float("nan"))

    logs = []
    cfg = tiny_cfg(tmp_path, steps=10)
    trainer = Trainer(cfg, registry.get("dcgan").cls, data=tiny_dataset, log=logs.append, hooks=[poison])
    path = trainer.run()
    assert trainer.rollbacks >= 1
    assert any("rollback" in m for m in logs)
    assert all(torch.isfinite(p).all() for p in trainer.G_ema.parameters())
    assert trainer.lr_scale < 1.0
    assert (tmp_path / "images.zip").exists() and path.endswith("images.zip")


def test_interrupt_saves_a_resumable_checkpoint(tmp_path, tiny_dataset):
    def stop(trainer):
        if trainer.step == 3:
            raise KeyboardInterrupt

    cfg = tiny_cfg(tmp_path, steps=10)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, registry.get("dcgan").cls, data=tiny_dataset, log=lambda m: None, hooks=[stop])
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 3
    assert {"G", "D", "G_ema", "opt_g", "opt_d", "rng", "config", "elapsed"} <= set(ckpt)


def test_models_without_an_adversary_train_and_sample(tmp_path, tiny_dataset):
    # the VAE has no D; its K-means clusters are fitted on the EMA copy before sampling
    entry = registry.get("cvae")
    cfg = with_settings(with_settings(TrainConfig(), entry.settings),
                        dict(out=str(tmp_path), width=8, batch_size=8, n_samples=64, reserve=0.0, log_every=0.0,
                             device="cpu", steps=4, clusters=10, checkpoint_every=1e9, grid_every=1e9))
    trainer = Trainer(cfg, entry.cls, data=tiny_dataset, log=lambda m: None)
    trainer.run()
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["D"] is None and int(ckpt["G_ema"]["n_fitted"]) == 10
    assert (tmp_path / "images.zip").exists()
    resumed = Trainer(with_settings(cfg, {"steps": 6}), entry.cls, data=tiny_dataset, log=lambda m: None)
    resumed.restore(tmp_path / "checkpoint.pt")
    assert resumed.step == 4


def test_snapshots_keep_checkpoints_at_progress_points(tmp_path, tiny_dataset):
    from dogkit.checkpoints import load_generator

    clock = FakeClock(dt=1.0)
    cfg = tiny_cfg(tmp_path, budget=20.0, reserve=0.0, snapshots="0.25,0.5")
    trainer = Trainer(cfg, registry.get("dcgan").cls, data=tiny_dataset, clock=clock, log=lambda m: None,
                      hooks=[clock.hook])
    trainer.run()
    quarter = torch.load(tmp_path / "snapshot-p0.25.pt", weights_only=False)
    half = torch.load(tmp_path / "snapshot-p0.5.pt", weights_only=False)
    final = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    # one simulated second per step: the step that starts at p = 0.25 (t = 5 s) is the 6th
    assert quarter["step"] == 6 and half["step"] == 11 and final["step"] == 20
    assert not quarter["bn_refreshed"] and final["bn_refreshed"]
    # a mid-run checkpoint gets standing batch-norm statistics when loaded for sampling
    G, _, _ = load_generator(tmp_path / "snapshot-p0.5.pt", "cpu")
    bn = next(m for m in G.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stored = half["G_ema"][[k for k in half["G_ema"] if k.endswith("running_mean")][0]]
    assert not torch.equal(bn.running_mean, stored)
    G_final, _, _ = load_generator(tmp_path / "checkpoint.pt", "cpu")
    for k, v in G_final.state_dict().items():
        torch.testing.assert_close(v, final["G_ema"][k], rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["0", "1", "0.5,1.2", "-0.1"])
def test_snapshot_points_must_lie_inside_the_run(bad):
    from dogkit.core.train import parse_snapshots

    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        parse_snapshots(bad)
    assert parse_snapshots("0.5, 0.25") == [0.25, 0.5]


def test_augment_is_checked(tmp_path, tiny_dataset):
    with pytest.raises(ValueError, match="use one of"):
        Trainer(tiny_cfg(tmp_path, augment="flipp"), registry.get("dcgan").cls, data=tiny_dataset, log=lambda m: None)
    with pytest.raises(ValueError, match="does not apply DiffAugment"):
        Trainer(tiny_cfg(tmp_path, augment="flip+diffaug"), registry.get("dcgan").cls, data=tiny_dataset,
                log=lambda m: None)


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_sets_the_compute_dtype_and_keeps_fp32_weights(tmp_path, tiny_dataset, precision, dtype):
    trainer = Trainer(tiny_cfg(tmp_path, precision=precision), registry.get("dcgan").cls, data=tiny_dataset,
                      log=lambda m: None)
    conv = next(m for m in trainer.model.G.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)))
    seen = []
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = [p.detach().clone() for p in trainer.model.G.parameters()]
    losses = trainer.train_step()
    assert seen and set(seen) == {dtype}
    assert all(p.dtype == torch.float32 for p in trainer.model.G.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.G_ema.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.G.parameters()))
    assert all(torch.isfinite(v) for v in losses.values())


def test_precision_is_checked(tmp_path, tiny_dataset):
    with pytest.raises(ValueError, match="precision 'fp16'"):
        Trainer(tiny_cfg(tmp_path, precision="fp16"), registry.get("dcgan").cls, data=tiny_dataset, log=lambda m: None)


def test_reserve_is_timed_after_a_warm_up_of_the_same_shape(tmp_path, tiny_dataset, monkeypatch):
    """A one-off cost on the first generation (cuDNN autotuning a new batch shape on a GPU) must
    not be extrapolated to 10,000 images: it would take minutes off an 8-minute run."""
    import dogkit.core.train as T
    from dogkit.core.train import refresh_images

    now = [0.0]
    calls = []

    def fake_generate(G, n, *args, **kwargs):
        calls.append(n)
        now[0] += 10.0 if len(calls) == 1 else 0.001 * n  # first pass: autotuning; then 1 ms an image
        return np.zeros((n, 64, 64, 3), np.uint8)

    def fake_write_zip(images, path):
        now[0] += 0.002 * len(images)  # 2 ms an image to encode
        open(path, "wb").close()

    monkeypatch.setattr(T, "generate", fake_generate)
    monkeypatch.setattr(T, "write_zip", fake_write_zip)
    monkeypatch.setattr(T.time, "monotonic", lambda: now[0])
    trainer = Trainer(tiny_cfg(tmp_path, reserve=-1.0, n_samples=10_000), registry.get("dcgan").cls,
                      data=tiny_dataset, log=lambda m: None)
    reserve = trainer.measure_reserve()
    assert calls == [512, 512]
    refresh = refresh_images(trainer.G_ema, trainer.cfg)
    assert refresh > 0
    assert reserve == pytest.approx(1.25 * (0.001 * (10_000 + refresh) + 0.002 * 10_000) + 3.0)
