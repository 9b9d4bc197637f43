"""The training machinery on CPU: budget, simulated clock, resume, NaN rollback, interrupt."""
import dataclasses
import json
import math
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dogkit.core import registry
from dogkit.core.train import (Trainer, ema_weight, load_checkpoint, lr_multiplier, measure_end, pace_line, train,
                               train_step)
from dogkit.core.settings import TrainConfig, parse_budget, with_settings
from dogkit.core.runtime import RunError
from dogkit.metrics.submission import load_submission


def tiny_cfg(tmp_path, model="dcgan", **over):
    entry = registry.get(model)
    cfg = with_settings(TrainConfig(model=model), entry.settings)
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


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("8m", 480), ("9h", 32400), ("1h30m", 5400), (45, 45)])
def test_parse_budget(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("bad", ["", "8 minutes", "m8", "-5m", "45", "9"])
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


def test_a_per_step_decay_averages_over_the_same_images_on_one_gpu_or_two():
    """Two ranks show twice the images a step: two single-GPU steps of decay d are one step of d**2."""
    from dogkit.core.train import ema_line

    cfg = with_settings(TrainConfig(), {"ema_decay": 0.999, "ema_start": 0.2, "batch_size": 64})
    one = 1 - ema_weight(0.5, cfg, world_size=1)
    assert 1 - ema_weight(0.5, cfg, world_size=2) == pytest.approx(one ** 2)
    assert ema_weight(0.1, cfg, world_size=2) == 1.0  # a plain copy until ema_start, as on one GPU
    assert ema_line(cfg) == ("EMA        decay 0.999 per 64 images from p=0.2: a half-life of 44.3k images "
                             "on any number of GPUs")  # log(0.5) / log(0.999) = 692.8 steps of 64
    assert ema_line(with_settings(cfg, {"ema_decay": 0.0})).endswith("G_ema is G")
    with pytest.raises(ValueError, match="unknown setting 'ema_kimg'"):  # retired: ema_fraction or ema_decay
        with_settings(cfg, {"ema_kimg": 10.0})


def test_the_settings_line_names_the_levers_each_model_reads():
    """Batch, learning rates, augmentation and truncation for every model; LeCam only for one that
    reads it (on or off), D's learning rate only for a model with a D; a setting changed by an
    option shows its new value."""
    from dogkit.core.train import settings_line

    biggan, dcgan, cvae = (SimpleNamespace(name=n) for n in ("biggan", "dcgan", "cvae"))
    cfg = with_settings(TrainConfig(), registry.get("biggan").settings)
    assert settings_line(cfg, biggan) == ("settings   batch 64, lr 0.0001 (G) 0.0004 (D), augment flip, LeCam off, "
                                          "truncation from the planned passes")
    on = with_settings(cfg, {"lecam": 0.3, "augment": "flip+diffaug", "truncation": 0.0, "batch_size": 32})
    assert settings_line(on, biggan) == ("settings   batch 32, lr 0.0001 (G) 0.0004 (D), augment flip+diffaug, "
                                         "LeCam 0.3 from D step 1000, no truncation")
    assert "LeCam" not in settings_line(cfg, dcgan) and "LeCam" not in settings_line(cfg, SimpleNamespace())
    assert settings_line(TrainConfig(), cvae).startswith("settings   batch 32, lr 0.0002, augment crop-flip, ")
    built = registry.get("biggan").cls(with_settings(cfg, {"width": 4}), 3, "cpu")  # D twice as wide unless set
    assert settings_line(with_settings(cfg, {"width": 4}), built).startswith("settings   batch 64, width 4 (G) 8 (D), ")


def test_an_extra_copys_half_life_in_images_with_a_ramp_up():
    """StyleGAN2-ADA's rule: beta = 0.5 ** (batch / half-life), half-life = min(kimg, 5 % seen)."""
    from dogkit.core.train import half_life_weight

    cfg = with_settings(TrainConfig(), {"batch_size": 32})
    assert half_life_weight(10.0, cfg, images_seen=0) == 1.0  # nothing seen: a plain copy
    assert half_life_weight(10.0, cfg, images_seen=20_000) == pytest.approx(1 - 0.5 ** (32 / 1_000))
    assert half_life_weight(10.0, cfg, images_seen=10**6) == pytest.approx(1 - 0.5 ** (32 / 10_000))
    assert half_life_weight(10.0, cfg, 10**6, world_size=2) == pytest.approx(1 - 0.5 ** (64 / 10_000))
    half = 10_000 / 32  # steps of one half-life: the old weights' share halves
    assert (1 - half_life_weight(10.0, cfg, images_seen=10**6)) ** half == pytest.approx(0.5)


def test_extra_ema_copies_average_by_their_half_lives_and_travel_in_the_checkpoint(tmp_path, tiny_dataset):
    from dogkit.checkpoints import export_generator, load_generator

    cfg = tiny_cfg(tmp_path, steps=12, ema_extra="0.02,1", ema_rampup=10.0)  # half-lives 20 and 96+ images
    trainer = Trainer(cfg, registry.get("dcgan").cls, data=tiny_dataset, log=lambda m: None)
    trainer.run()
    # set before the last step's images (88 of 96): half-lives min(20, 10 x 88) and min(1,000, 10 x 88) images
    assert trainer.images_seen == 96
    assert trainer.ema.w[1:] == [pytest.approx(1 - 0.5 ** (8 / 20)), pytest.approx(1 - 0.5 ** (8 / 880))]
    first = [p.clone() for p in trainer.ema.extra[0].parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(first, trainer.ema.extra[1].parameters()))
    again = Trainer(dataclasses.replace(cfg, out=str(tmp_path / "b")), registry.get("dcgan").cls, data=tiny_dataset,
                    log=lambda m: None)
    load_checkpoint(again, tmp_path / "checkpoint.pt")
    for a, b in zip(trainer.ema.extra[1].state_dict().values(), again.ema.extra[1].state_dict().values()):
        assert torch.equal(a, b)
    assert again.ema.w[1:] == trainer.ema.w[1:]
    gen = export_generator(tmp_path / "checkpoint.pt", tmp_path / "g.pt", which=1)
    G, _, _ = load_generator(tmp_path / "g.pt", "cpu")
    assert gen["format"] == "dogkit-generator-1" and G(torch.zeros(2, cfg.z_dim), None).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="ema_extra '0,2'"):
        Trainer(tiny_cfg(tmp_path, ema_extra="0,2"), registry.get("dcgan").cls, data=tiny_dataset,
                log=lambda m: None)


def test_three_kinds_of_batch_norm_statistics_to_sample_with(tmp_path, tiny_dataset):
    """standing (re-estimated after training: the kernels' end), running (training's averages,
    G's buffers: eval mode) and batch (each batch's own): each the one it says, and a generator
    file keeps the kind it was exported with."""
    import copy

    from dogkit.checkpoints import export_generator, load_generator, sample_images

    cfg = tiny_cfg(tmp_path, steps=6)
    Trainer(cfg, registry.get("dcgan").cls, data=tiny_dataset, log=lambda m: None).run()
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    standing, running, batch = (load_generator(path, "cpu", bn=bn) for bn in ("standing", "running", "batch"))
    names = [n for n, _ in standing[0].named_buffers() if n.endswith("running_mean")]
    assert names and any(not torch.equal(ckpt["G_ema"][n], ckpt["G"][n]) for n in names)  # the end refreshed them
    assert all(torch.equal(b, ckpt["G_ema"][n]) for n, b in standing[0].named_buffers())
    assert all(torch.equal(b, ckpt["G"][n]) for n, b in running[0].named_buffers())
    z = torch.randn(16, cfg.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # eval mode, yet each batch normalised with its own statistics
        torch.testing.assert_close(batch[0](z, None), copy.deepcopy(running[0]).train()(z, None))
        assert not torch.allclose(batch[0](z, None), running[0](z, None))
    assert batch[0].bn_stats == "batch" and not batch[0].training
    export_generator(path, tmp_path / "g.pt", bn="batch")
    again = load_generator(tmp_path / "g.pt", "cpu")
    assert again[0].bn_stats == "batch"
    assert sample_images(again, n=20).shape == (20, 64, 64, 3)
    with pytest.raises(ValueError, match="bn 'eval': choose from standing, running, batch"):
        load_generator(path, "cpu", bn="eval")


def test_d_width_and_d_steps_reach_the_discriminator(tmp_path, tiny_dataset):
    entry = registry.get("biggan")
    cfg = with_settings(with_settings(TrainConfig(), entry.settings),  # ema_decay given: it wins over ema_fraction
                        dict(width=4, d_width=8, d_steps=2, batch_size=4, steps=2, out=str(tmp_path), device="cpu",
                             budget=1e6, reserve=0.0, n_samples=8, log_every=0.0, ema_decay=0.99))
    assert (cfg.ema_decay, cfg.ema_fraction) == (0.99, 0.0)
    trainer = Trainer(cfg, entry.cls, data=tiny_dataset, log=lambda m: None)
    trainer.run()
    assert trainer.model.D.linear.weight.shape[1] == 16 * 8 and trainer.model.G.blocks[-1].conv2.weight.shape[0] == 8
    assert trainer.images_seen == 2 * 2 * 4  # two real batches a step
    with pytest.raises(ValueError, match=r"d_width=8: model dcgan does not read it \(biggan does\)"):
        Trainer(tiny_cfg(tmp_path, d_width=8), registry.get("dcgan").cls, data=tiny_dataset, log=lambda m: None)


def test_unknown_setting_is_an_error():
    with pytest.raises(ValueError, match="lr_gg"):
        with_settings(TrainConfig(), {"lr_gg": 1.0})


@pytest.mark.slow
def test_tiny_end_to_end_run_writes_a_valid_submission(tmp_path, tiny_dataset):
    cfg = tiny_cfg(tmp_path, budget=600.0, reserve=-1.0, n_samples=10_000, log_every=2.0, steps=150)
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
    assert trainer.plan.train_seconds == 20.0
    assert trainer.step == 20  # one simulated second per step, 30 s budget - 10 s reserve
    assert clock.t <= cfg.budget


def run_steps(tmp_path, data, steps, resume=None, out="run", stop_at=None):
    """A 12-step dcgan run (its schedule in steps: --steps), or one stopped at step stop_at (Ctrl-C)."""
    clock = FakeClock(dt=1.0)
    cfg = tiny_cfg(tmp_path / out, steps=steps, budget=40.0, reserve=0.0, lr_decay_start=0.2, ema_start=0.1)

    def interrupt(tr):
        if tr.step == stop_at:
            raise KeyboardInterrupt

    trainer = Trainer(cfg, registry.get("dcgan").cls, data=data, clock=clock, log=lambda m: None,
                      hooks=[clock.hook, interrupt])
    if resume:
        load_checkpoint(trainer, resume)
    if stop_at:
        with pytest.raises(KeyboardInterrupt):
            trainer.run()
    else:
        trainer.run()
    return trainer


def test_a_run_that_steps_end_has_its_schedule_end_with_it(tmp_path, tiny_dataset):
    trainer = run_steps(tmp_path, tiny_dataset, 12)  # 12 steps of a 40 s budget, one simulated second each
    log = [json.loads(x) for x in open(tmp_path / "run" / "log.jsonl")]
    assert [r["p"] for r in log] == [pytest.approx(k / 12, abs=1e-5) for k in range(12)]  # by steps, not 12/40
    cfg, t = trainer.cfg, (11 / 12 - 0.2) / 0.8  # the last step's place in the cosine from lr_decay_start 0.2
    cosine = cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * t))
    assert log[-1]["lr_g"] == pytest.approx(cfg.lr_g * cosine)


def test_resume_continues_exactly(tmp_path, tiny_dataset):
    straight = run_steps(tmp_path, tiny_dataset, 12, out="straight")
    run_steps(tmp_path, tiny_dataset, 12, out="half", stop_at=6)
    resumed = run_steps(tmp_path, tiny_dataset, 12, resume=tmp_path / "half" / "checkpoint.pt", out="half")
    assert resumed.step == straight.step == 12
    for a, b in zip(straight.model.G.state_dict().values(), resumed.model.G.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(straight.ema.G.parameters(), resumed.ema.G.parameters()):
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
    assert trainer.safety.rollbacks >= 1
    assert any("rollback" in m for m in logs)
    assert all(torch.isfinite(p).all() for p in trainer.ema.G.parameters())
    assert trainer.safety.lr_scale < 1.0
    assert (tmp_path / "images.zip").exists() and path.endswith("images.zip")


def test_interrupt_saves_a_resumable_checkpoint(tmp_path, tiny_dataset):
    def stop(trainer):
        if trainer.step == 3:
            raise KeyboardInterrupt

    cfg = tiny_cfg(tmp_path, steps=10)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, registry.get("dcgan").cls, data=tiny_dataset, log=lambda m: None, hooks=[stop])
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
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
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["D"] is None and int(ckpt["G_ema"]["n_fitted"]) == 10
    assert (tmp_path / "images.zip").exists()
    resumed = Trainer(with_settings(cfg, {"steps": 6}), entry.cls, data=tiny_dataset, log=lambda m: None)
    load_checkpoint(resumed, tmp_path / "checkpoint.pt")
    assert resumed.step == 4


def test_snapshots_keep_checkpoints_at_progress_points(tmp_path, tiny_dataset):
    from dogkit.checkpoints import load_generator

    clock = FakeClock(dt=1.0)
    cfg = tiny_cfg(tmp_path, budget=20.0, reserve=0.0, snapshots="0.25,0.5")
    trainer = Trainer(cfg, registry.get("dcgan").cls, data=tiny_dataset, clock=clock, log=lambda m: None,
                      hooks=[clock.hook])
    trainer.run()
    quarter = torch.load(tmp_path / "snapshot-p0.25.pt", weights_only=True)
    half = torch.load(tmp_path / "snapshot-p0.5.pt", weights_only=True)
    final = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
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
    with pytest.raises(ValueError, match="choose from"):
        Trainer(tiny_cfg(tmp_path, augment="flipp"), registry.get("dcgan").cls, data=tiny_dataset, log=lambda m: None)
    with pytest.raises(ValueError, match="does not apply DiffAugment"):
        Trainer(tiny_cfg(tmp_path, "gan", augment="flip+diffaug"), registry.get("gan").cls, data=tiny_dataset,
                log=lambda m: None)


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                             ("fp16", torch.float16)])
def test_precision_sets_the_compute_dtype_and_keeps_fp32_weights(tmp_path, tiny_dataset, precision, dtype):
    trainer = Trainer(tiny_cfg(tmp_path, precision=precision), registry.get("dcgan").cls, data=tiny_dataset,
                      log=lambda m: None)
    conv = next(m for m in trainer.model.G.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)))
    seen = []
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = [p.detach().clone() for p in trainer.model.G.parameters()]
    for _ in range(8):  # fp16: the loss scaler skips the steps whose gradients overflow
        losses = train_step(trainer)
        if any(not torch.equal(a, b) for a, b in zip(before, trainer.model.G.parameters())):
            break
    assert seen and set(seen) == {dtype}
    assert all(p.dtype == torch.float32 for p in trainer.model.G.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.ema.G.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.G.parameters()))
    assert all(torch.isfinite(v) for v in losses.values())


def test_precision_is_checked(tmp_path, tiny_dataset):
    with pytest.raises(ValueError, match="precision='fp8': choose from fp32, bf16, fp16"):
        Trainer(tiny_cfg(tmp_path, precision="fp8"), registry.get("dcgan").cls, data=tiny_dataset, log=lambda m: None)


def fake_end(monkeypatch, calls):
    """generate: 10 s for the first pass (autotuning), then 1 ms an image; PNG encoding 2 ms an
    image; all on a fake time.monotonic."""
    import dogkit.core.train as T

    now = [0.0]

    def fake_generate(G, n, *args, **kwargs):
        calls.append(("generate", n, int(getattr(G, "n_fitted", 0))))
        now[0] += 10.0 if len(calls) == 1 else 0.001 * n
        return np.zeros((n, 64, 64, 3), np.uint8)

    def fake_encode(images, *args, **kwargs):
        calls.append(("encode", images))
        now[0] += 0.002 * len(images)
        return [b""] * len(images)

    monkeypatch.setattr(T, "generate", fake_generate)
    monkeypatch.setattr(T, "encode_pngs", fake_encode)
    monkeypatch.setattr(T.time, "monotonic", lambda: now[0])


def test_reserve_is_timed_after_a_warm_up_of_the_same_shape(tmp_path, tiny_dataset, monkeypatch):
    """A one-off cost on the first generation (cuDNN autotuning a new batch shape on a GPU) must
    not be extrapolated to 10,000 images: it would take minutes off an 8-minute run. PNG encoding
    is timed on real training photos (an untrained generator's flat images encode too fast)."""
    from dogkit.core.train import refresh_images

    calls = []
    fake_end(monkeypatch, calls)
    trainer = Trainer(tiny_cfg(tmp_path, reserve=-1.0, n_samples=10_000), registry.get("dcgan").cls,
                      data=tiny_dataset, log=lambda m: None)
    reserve, parts = measure_end(trainer)
    assert [c[:2] for c in calls[:2]] == [("generate", 32), ("generate", 32)]  # the CPU probe
    encoded = calls[2][1]
    np.testing.assert_array_equal(encoded, tiny_dataset["images"][:32])
    refresh = refresh_images(trainer.ema.G, trainer.cfg)
    assert refresh > 0
    assert parts["generate"] == pytest.approx(0.001 * (10_000 + refresh))
    assert parts["png"] == pytest.approx(0.002 * 10_000)
    assert reserve == pytest.approx(1.25 * (0.001 * (10_000 + refresh) + 0.002 * 10_000) + 3.0)
    assert not (tmp_path / "checkpoint.pt").exists()  # timed in a scratch folder


@pytest.mark.slow
def test_a_cold_first_timing_of_the_end_is_corrected_once_warm(tmp_path, tiny_dataset, monkeypatch):
    """The first timing of the end pays a fresh machine's cold caches (here: 2 s a pass, under a
    fake clock); at p = 0.1 the end is timed again, warm, and training gets the difference."""
    import dogkit.core.train as T

    now, cold = [0.0], [True]

    def fake_generate(G, n, *args, **kwargs):
        now[0] += 2.0 if cold[0] else 0.0001 * n
        return np.zeros((n, 64, 64, 3), np.uint8)

    def fake_encode(images, *args, **kwargs):
        now[0] += 0.0001 * len(images)
        return [b""] * len(images)

    def tick(trainer):  # a step takes 2 s; the machine is warm once training runs
        cold[0] = False
        now[0] += 2.0

    monkeypatch.setattr(T, "generate", fake_generate)
    monkeypatch.setattr(T, "encode_pngs", fake_encode)
    monkeypatch.setattr(T.time, "monotonic", lambda: now[0])
    logs = []
    cfg = tiny_cfg(tmp_path, reserve=-1.0, budget=600.0, n_samples=64, log_every=60.0)
    trainer = Trainer(cfg, registry.get("dcgan").cls, data=tiny_dataset, log=logs.append, clock=lambda: now[0],
                      hooks=[tick])
    trainer.run()
    first = next(m for m in logs if m.startswith("budget"))
    assert "training until 7m" in first  # the cold timing kept ~150 s of 600 for the end
    assert any(m.startswith("re-planned once warm") for m in logs)
    assert trainer.plan.train_seconds > 590 and trainer.plan.elapsed > 590 and now[0] <= 600.0
    assert "trained 9m5" in logs[-1] and "of this run's 10m00s" in logs[-1]
    # the pace, timed after the re-plan at a constant 2 s a step, foretells the images the run showed
    pace = next(m for m in logs if m.startswith("pace"))
    forecast = int(re.search(r"about ([\d,]+) images", pace)[1].replace(",", ""))
    per_step = trainer.batches_per_step * cfg.batch_size
    assert abs(forecast - trainer.images_seen) <= per_step and f"{per_step / 2:,.0f} images/s" in pace
    n = len(tiny_dataset["images"])
    passes = re.search(rf"{trainer.images_seen:,} images = (\d+\.\d) passes over the {n:,} photos", logs[-1])
    assert passes and float(passes[1]) == pytest.approx(trainer.images_seen / n, abs=0.05), logs[-1]  # under 10


def test_the_pace_line_is_the_run_so_far_extended_to_the_end_of_training():
    line = pace_line(images_seen=1_500, since=(5.0, 500), elapsed=15.0, train_seconds=105.0, n_photos=50)
    assert line == "at 100 images/s, about 10,500 images by the end of training: 210 passes over the 50 photos"
    done = pace_line(images_seen=1_500, since=(5.0, 500), elapsed=200.0, train_seconds=105.0, n_photos=50)
    assert "about 1,500 images" in done and "30 passes" in done  # past the end: nothing more to come
    few = pace_line(images_seen=1_500, since=(5.0, 500), elapsed=15.0, train_seconds=105.0, n_photos=4_000)
    assert few.endswith("2.6 passes over the 4,000 photos")  # 10,500 / 4,000: one decimal under 10


@pytest.mark.parametrize("passes,words", [(0.04, "0 passes"), (0.45, "0.5 passes"), (1.0, "1 pass"),
                                          (1.04, "1 pass"), (3.0, "3 passes"), (9.96, "10 passes"),
                                          (212.4, "212 passes"), (1234.0, "1,234 passes")])
def test_passes_read_at_a_glance(passes, words):
    from dogkit.core.train import passes_words

    assert passes_words(passes) == words


@pytest.mark.parametrize("passes,truncation", [(1, 1.5), (75, 1.5), (300, 0.8), (700, 0.8),
                                               (150, 1.15),  # log-linear: 150 is halfway between 75 and 300
                                               (100, round(1.5 - 0.7 * math.log(100 / 75) / math.log(4), 2))])
def test_truncation_follows_the_passes_between_the_measured_points(passes, truncation):
    from dogkit.core.train import truncation_for_passes

    assert truncation_for_passes(passes) == pytest.approx(truncation)


def test_settings_left_to_the_plan_are_set_from_the_planned_images():
    """A half-life of ema_fraction of the planned images is decay 0.5 ** (batch / half-life) per
    batch; a setting given explicitly is never planned."""
    from dogkit.core.train import from_plan, plan_line

    cfg = with_settings(TrainConfig(), {"ema_fraction": 0.1, "truncation": -1.0, "batch_size": 64})
    values = from_plan(cfg, 6_400_000, 20_000)  # 320 passes
    assert values == {"ema_decay": pytest.approx(0.5 ** (64 / 640_000)), "truncation": 0.8}
    assert values["ema_decay"] ** (640_000 / 64) == pytest.approx(0.5)  # a half-life of 640k images
    assert plan_line(cfg, values, 6_400_000, 20_000, "the pace") == (
        "from plan  the pace: EMA half-life 10% of 6,400,000 images = 640.0k images (decay 0.999931 per 64 images "
        "from p=0.25); truncation 0.8 for 320 passes over the 20,000 photos (1.5 at 75 passes or fewer, 0.8 at "
        "300 or more)")
    assert from_plan(with_settings(cfg, {"ema_fraction": 0.0, "truncation": 1.5}), 6_400_000, 20_000) == {}
    assert from_plan(cfg, 10, 20_000)["ema_decay"] == 0.5  # never shorter than one batch


@pytest.mark.parametrize("bad,why", [({"truncation": -2.0}, "or -1: from the planned passes"),
                                     ({"ema_fraction": 1.5}, "ema_fraction=1.5"),
                                     ({"ema_fraction": 0.1, "ema_kimg": 10.0}, "unknown setting 'ema_kimg'")])
def test_plan_settings_out_of_range_are_refused(bad, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        with_settings(TrainConfig(), bad)


def test_a_run_sets_its_ema_and_truncation_from_its_pace_and_a_resume_keeps_them(tmp_path, tiny_dataset):
    """On a fake clock (one step a second, 8 images a step, 100 s of training) the pace at a tenth
    foretells 800 images: the EMA's half-life is 10 % of them from there on, the truncation that
    of 800 / 300 photos, both in the log with that figure, in the checkpoint (the config's
    truncation is the one it samples with, for every reader) and back after a resume; the settings
    as given stay in options.json."""
    from dogkit.core.train import read_checkpoint, truncation_for_passes

    clock, logs = FakeClock(), []
    cfg = tiny_cfg(tmp_path, budget=100.0, ema_fraction=0.1, ema_start=0.2, truncation=-1.0, log_every=1e9)
    trainer = Trainer(cfg, registry.get("dcgan").cls, data=tiny_dataset, clock=clock, log=logs.append,
                      hooks=[clock.hook])
    trainer.run()
    planned = [m for m in logs if m.startswith("from plan  the pace")]
    assert len(planned) == 1 and "10% of 800 images = 0.1k images" in planned[0], logs
    assert trainer.cfg.ema_decay == pytest.approx(0.5 ** (8 / 80))
    assert trainer.cfg.truncation == truncation_for_passes(800 / 300) == 1.5
    ckpt = read_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert ckpt["config"]["truncation"] == 1.5 and ckpt["config"]["ema_decay"] == cfg.ema_decay  # as given
    assert ckpt["planned"]["images"] == pytest.approx(800)
    assert json.loads((tmp_path / "options.json").read_text())["truncation"] == -1.0
    again = Trainer(dataclasses.replace(cfg, out=str(tmp_path / "b")), registry.get("dcgan").cls, data=tiny_dataset,
                    log=logs.append)
    load_checkpoint(again, tmp_path / "checkpoint.pt")
    assert again.cfg.ema_decay == trainer.cfg.ema_decay and again.cfg.truncation == 1.5


def test_a_run_that_ends_before_its_pace_samples_at_the_truncation_of_the_passes_it_made(tmp_path, tiny_dataset):
    from dogkit.core.train import read_checkpoint

    cfg = tiny_cfg(tmp_path, steps=3, truncation=-1.0)  # 24 images of 300 photos: 0.08 passes
    trainer = Trainer(cfg, registry.get("dcgan").cls, data=tiny_dataset, log=lambda m: None)
    trainer.run()
    assert trainer.planned is None
    assert read_checkpoint(str(tmp_path / "checkpoint.pt"))["config"]["truncation"] == 1.5


@pytest.mark.slow
def test_an_end_timed_slower_once_warm_moves_the_end_of_training_earlier(tmp_path, tiny_dataset, monkeypatch):
    """The machine got busier after the start: the warm timing at p = 0.1 finds the end slower
    than planned, and training stops earlier so that the whole run still ends within the budget."""
    import dogkit.core.train as T

    now, busy = [0.0], [False]

    def fake_generate(G, n, *args, **kwargs):
        now[0] += (0.004 if busy[0] else 0.001) * n
        return np.zeros((n, 64, 64, 3), np.uint8)

    def tick(trainer):  # a step takes 5 s; other jobs arrive once training runs
        busy[0] = True
        now[0] += 5.0

    monkeypatch.setattr(T, "generate", fake_generate)
    monkeypatch.setattr(T, "encode_pngs", lambda images, *a, **k: [b""] * len(images))
    monkeypatch.setattr(T.time, "monotonic", lambda: now[0])
    logs = []
    cfg = tiny_cfg(tmp_path, reserve=-1.0, budget=600.0, n_samples=10_000, log_every=60.0)
    trainer = Trainer(cfg, registry.get("dcgan").cls, data=tiny_dataset, log=logs.append, clock=lambda: now[0],
                      hooks=[tick])
    trainer.run()
    replanned = next(m for m in logs if m.startswith("re-planned once warm"))
    m = re.search(r"training until (\d+)m(\d+)s \(was (\d+)m(\d+)s\)", replanned)
    after, before = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
    assert after < before  # training stops earlier than first planned
    assert now[0] <= 600.0  # the whole run, the slower end included, within its budget


def test_reserve_of_the_vae_times_its_real_sampling_path(tmp_path, tiny_dataset, monkeypatch):
    """cvae samples through K-means clusters and recycling passes: the probe must run them."""
    entry = registry.get("cvae")
    cfg = with_settings(with_settings(TrainConfig(), entry.settings),
                        dict(out=str(tmp_path), width=8, batch_size=8, n_samples=10_000, reserve=-1.0,
                             device="cpu", clusters=10))
    calls = []
    fake_end(monkeypatch, calls)
    trainer = Trainer(cfg, entry.cls, data=tiny_dataset, log=lambda m: None)
    reserve, parts = measure_end(trainer)
    assert all(c[2] == 10 for c in calls if c[0] == "generate")  # clusters fitted: recycling runs
    assert "prepare" in parts and int(trainer.ema.G.n_fitted) == 0  # on a copy, not the EMA itself


def test_a_budget_too_short_for_the_end_is_refused_at_start(tmp_path, tiny_dataset):
    from dogkit.core.runtime import RunError

    cfg = tiny_cfg(tmp_path, budget=60.0, reserve=58.0)
    trainer = Trainer(cfg, registry.get("dcgan").cls, data=tiny_dataset, log=lambda m: None)
    with pytest.raises(RunError, match=r"budget 1m00s is too short on this device.*needs 58 s.*--budget 2m"):
        trainer.run()
    assert trainer.step == 0 and not (tmp_path / "images.zip").exists()


def test_a_refused_start_destroys_nothing_and_leaves_nothing(tmp_path, tiny_dataset, monkeypatch):
    """`dogkit train` into a folder holding a trained run, with a budget too short for the end:
    exit 2 and one line; checkpoint.pt byte-identical; an empty folder stays empty."""
    from click.testing import CliRunner

    from dogkit.cli import main
    from dogkit.core.data import save_cache

    data = tmp_path / "d.npz"
    save_cache(str(data), dict(tiny_dataset, settings={}, summary={}), codec="webp")
    fake_end(monkeypatch, [])  # the end takes ~45 s on the fake clock: a 20 s budget is refused
    trained, empty = tmp_path / "trained", tmp_path / "empty"
    trained.mkdir()
    empty.mkdir()
    (trained / "checkpoint.pt").write_bytes(b"a trained checkpoint")
    for out in (trained, empty):
        res = CliRunner().invoke(main, ["train", "--model", "dcgan", "--data", str(data), "--budget", "20s",
                                        "--out", str(out), "--width", "4", "--device", "cpu"])
        assert res.exit_code == 1, res.output  # bad input (README, exit codes)
        assert "is too short on this device" in res.output and "Traceback" not in res.output
    assert (trained / "checkpoint.pt").read_bytes() == b"a trained checkpoint"
    assert sorted(p.name for p in trained.iterdir()) == ["checkpoint.pt"]
    assert list(empty.iterdir()) == []


@pytest.mark.slow
def test_an_error_mid_run_still_writes_a_valid_zip_then_fails(tmp_path, tiny_dataset):
    from dogkit.core.train import RunFailed

    def crash(trainer):
        if trainer.step == 5:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    logs = []
    cfg = tiny_cfg(tmp_path, steps=50, n_samples=64)
    with pytest.raises(RunFailed, match="RuntimeError at step 5: CUDA error") as info:
        train(cfg, registry.get("dcgan").cls, data=tiny_dataset, log=logs.append, hooks=[crash])
    assert info.value.zip_path == str(tmp_path / "images.zip")
    assert load_submission(info.value.zip_path, strict=True, n_images=64).pixels.shape == (64, 64, 64, 3)
    assert any("Traceback" in m for m in logs)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 5


def test_an_error_before_the_first_step_is_not_hidden(tmp_path, tiny_dataset, monkeypatch):
    import dogkit.core.train as T

    def crash(trainer):
        raise RuntimeError("boom")

    trainer = Trainer(tiny_cfg(tmp_path, steps=5), registry.get("dcgan").cls, data=tiny_dataset,
                      log=lambda m: None, hooks=[crash])
    monkeypatch.setattr(T, "keep_good_state", lambda tr: None)  # no good state is ever taken
    with pytest.raises(RuntimeError, match="boom"):
        trainer.run()


def test_a_nan_storm_stops_training_and_keeps_the_last_good_generator(tmp_path, tiny_dataset):
    from dogkit.core.train import RunFailed

    def poison(trainer):
        if trainer.step >= 3:
            with torch.no_grad():
                next(trainer.model.G.parameters()).fill_(float("nan"))

    cfg = tiny_cfg(tmp_path, steps=1000, max_rollbacks=3)
    with pytest.raises(RunFailed, match="NaN storm: 3 rollbacks") as info:
        train(cfg, registry.get("dcgan").cls, data=tiny_dataset, log=lambda m: None, hooks=[poison])
    assert os.path.exists(info.value.zip_path)
    G_ema = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["G_ema"]
    assert all(torch.isfinite(v).all() for v in G_ema.values() if v.is_floating_point())


class TickingClock:
    """Every reading advances time by dt: work that reads the clock costs time."""

    def __init__(self, dt):
        self.t, self.dt = 0.0, dt

    def __call__(self):
        self.t += self.dt
        return self.t


@pytest.mark.slow
def test_the_end_never_runs_past_the_platforms_wall(tmp_path, tiny_dataset):
    """A reserve far too small on a platform with a wall (hard_limit: a Kaggle kernel's 9 hours):
    sampling stops at the wall, keeping no half-written zip."""
    from dogkit.core.train import RunFailed

    clock = TickingClock(dt=0.5)
    cfg = tiny_cfg(tmp_path, budget=100.0, hard_limit=130.0, reserve=2.0, n_samples=10_000)
    trainer = Trainer(cfg, registry.get("dcgan").cls, data=tiny_dataset, clock=clock, log=lambda m: None)
    with pytest.raises(RunFailed, match="out of time.*no images.zip written"):
        trainer.run()
    assert trainer.plan.t0 + cfg.budget < clock.t <= trainer.plan.t0 + cfg.hard_limit + clock.dt
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]


@pytest.mark.slow
def test_a_local_run_with_no_zip_finishes_its_zip_however_late_and_says_by_how_much(tmp_path, tiny_dataset):
    """The budget is a plan: a local run (no wall) whose end takes far longer than the reserve left
    for it still writes its zip from the trained generator, and its log says the end's time against
    the plan's."""
    clock, logs = TickingClock(dt=0.5), []
    cfg = tiny_cfg(tmp_path, budget=100.0, reserve=2.0, n_samples=10_000)
    trainer = Trainer(cfg, registry.get("dcgan").cls, data=tiny_dataset, clock=clock, log=logs.append)
    path = trainer.run()
    assert clock.t > trainer.plan.t0 + cfg.budget + 30  # far past the budget
    assert load_submission(path, strict=True).pixels.shape == (10_000, 64, 64, 3)
    warning = next(m for m in logs if m.startswith("WARNING    the end took "))
    took, left = map(int, re.search(r"the end took (\d+) s where the plan left it (\d+) s", warning).groups())
    assert took > left + 30 and "no wall: a local run" in warning, warning


class SlowEndClock:
    """10 s a training step; once training is over every reading costs 0.1 s: an end slower than
    the one timed at the start (a machine that got busy)."""

    def __init__(self):
        self.t, self.ending = 0.0, False

    def __call__(self):
        self.t += 0.1 if self.ending else 0.0
        return self.t

    def hook(self, trainer):
        self.t += 10.0
        self.ending = self.t >= trainer.plan.session_end


@pytest.mark.slow
@pytest.mark.parametrize("zip_there", ["none", "this run's interim", "an earlier run's"])
def test_a_slow_end_runs_over_only_when_there_is_no_zip_of_this_run_to_keep(tmp_path, tiny_dataset, zip_there):
    """The end needs ~20 s past a 300 s budget: with no images.zip of this run it is let finish (the
    wall, a Kaggle-like hard_limit, is far) and says so, replacing an earlier run's zip; with this
    run's interim zip in the folder it stops on time and that zip is kept."""
    from dogkit.core.train import RunFailed

    if zip_there == "an earlier run's":
        (tmp_path / "images.zip").write_bytes(b"an earlier run's zip")
    clock, logs = SlowEndClock(), []
    cfg = tiny_cfg(tmp_path, budget=300.0, hard_limit=1200.0, reserve=5.0, n_samples=10_000,
                   zip_every=200.0 if zip_there == "this run's interim" else 3600.0)
    trainer = Trainer(cfg, registry.get("dcgan").cls, data=tiny_dataset, clock=clock, log=logs.append,
                      hooks=[clock.hook])
    if zip_there == "this run's interim":
        with pytest.raises(RunFailed, match="out of time.*the interim images.zip of step 2[0-9] is kept") as info:
            trainer.run()
        assert clock.t <= 300.0 + 0.5 and info.value.zip_path == str(tmp_path / "images.zip")
        assert load_submission(info.value.zip_path, strict=True).pixels.shape == (10_000, 64, 64, 3)
        return
    path = trainer.run()
    assert 300.0 < clock.t <= 330.0
    assert load_submission(path, strict=True).pixels.shape == (10_000, 64, 64, 3)
    assert any(m.startswith("WARNING    the end took ") and "it was let run over (the wall, 20m00s, is still" in m
               for m in logs), logs


@pytest.mark.slow
def test_interim_zips_and_thinned_grids_on_a_long_run(tmp_path, tiny_dataset):
    """A simulated 9-hour run: images.zip exists from the first interim on, and the run folder
    keeps a handful of grids, not hundreds (Kaggle keeps at most 500 output files)."""
    clock = FakeClock(dt=60.0)  # one step = one simulated minute
    seen = []

    def watch(trainer):
        seen.append((tmp_path / "images.zip").exists())

    cfg = tiny_cfg(tmp_path, budget=9 * 3600.0, reserve=60.0, grid_every=300.0, zip_every=3600.0, keep_grids=8,
                   n_samples=64, log_every=600.0)
    trainer = Trainer(cfg, registry.get("dcgan").cls, data=tiny_dataset, clock=clock, log=lambda m: None,
                      hooks=[clock.hook, watch])
    trainer.run()
    assert not seen[0] and seen[-1] and seen.index(True) <= 62  # the first interim zip after an hour
    files = sorted(os.listdir(tmp_path))
    grids = [f for f in files if f.startswith("grid-")]
    assert 2 <= len(grids) <= 8
    assert set(files) - set(grids) == {"images.zip", "checkpoint.pt", "log.jsonl", "options.json", "samples.png"}


def test_a_final_checkpoint_the_disk_refuses_costs_the_checkpoint_not_the_zip(tmp_path, tiny_dataset, monkeypatch):
    """checkpoint.pt cannot be written at the end (a full disk): one warning line, the zip is still
    sampled from the generator in memory (never from an older checkpoint), the earlier
    checkpoint.pt stays byte for byte, and the run reports the failure with its zip."""
    import dogkit.core.train as T
    from dogkit.core.train import RunFailed

    (tmp_path / "checkpoint.pt").write_bytes(b"an earlier run's checkpoint")
    save = torch.save

    def full_disk(obj, path, *a, **k):
        if "checkpoint" in str(path):
            raise OSError(28, "No space left on device")
        return save(obj, path, *a, **k)

    monkeypatch.setattr(T.torch, "save", full_disk)
    logs = []
    with pytest.raises(RunFailed) as info:
        train(tiny_cfg(tmp_path, steps=3), registry.get("dcgan").cls, data=tiny_dataset, log=logs.append)
    assert info.value.line() == (
        f"training failed (checkpoint.pt not written ({tmp_path / 'checkpoint.pt'}: no space left on device (nothing "
        f"written: the earlier file, if any, is as it was))); {tmp_path / 'images.zip'} was still written from the "
        f"last good generator")
    assert load_submission(tmp_path / "images.zip", strict=True, n_images=64).pixels.shape == (64, 64, 64, 3)
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"an earlier run's checkpoint"
    assert [m for m in logs if m.startswith("WARNING    ") and "checkpoint.pt not written" in m], logs
    assert not [m for m in logs if "sampling failed" in m or "Traceback" in m], logs
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]


def test_a_zip_the_disk_refuses_is_said_and_an_earlier_runs_zip_is_not_called_this_ones(tmp_path, tiny_dataset,
                                                                                        monkeypatch):
    """images.zip cannot be written at the end: no second try from a checkpoint (the same disk),
    the earlier run's zip there is named as such and left byte for byte, no temporary stays."""
    import dogkit.core.sample as S
    from dogkit.core.train import RunFailed

    (tmp_path / "images.zip").write_bytes(b"an earlier run's zip")
    real = S.zipfile.ZipFile

    def full_disk(path, mode="r", *a, **k):
        if mode != "w":
            return real(path, mode, *a, **k)
        with open(path, "wb") as fh:
            fh.write(b"PK half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(S.zipfile, "ZipFile", full_disk)
    logs = []
    with pytest.raises(RunFailed) as info:
        train(tiny_cfg(tmp_path, steps=3), registry.get("dcgan").cls, data=tiny_dataset, log=logs.append)
    assert info.value.line() == (
        f"training failed ({tmp_path / 'images.zip'}: no space left on device (nothing written: the earlier file, if "
        f"any, is as it was) (the images.zip there is an earlier run's, not this one's)); no images.zip from this run")
    assert (tmp_path / "images.zip").read_bytes() == b"an earlier run's zip"
    assert not [m for m in logs if "sampling failed" in m], logs
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]


def test_a_killed_runs_half_written_files_are_removed(tmp_path, tiny_dataset):
    (tmp_path / ".images.zip.dogkit-tmp4242").write_bytes(b"half")
    (tmp_path / "keep.txt").write_text("mine")
    logs = []
    Trainer(tiny_cfg(tmp_path), registry.get("dcgan").cls, data=tiny_dataset, log=logs.append)
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]
    assert any(".images.zip.dogkit-tmp4242" in m for m in logs)


@pytest.mark.slow
def test_a_device_that_dies_at_the_end_still_leaves_a_zip_from_the_cpu(tmp_path, tiny_dataset, monkeypatch):
    """A CUDA error poisons the context: nothing more runs on that GPU. The end falls back to the
    last checkpoint, sampled on the CPU, and then reports the failure."""
    from dogkit.core.train import RunFailed

    cfg = tiny_cfg(tmp_path, steps=6, n_samples=64, checkpoint_every=0.0)
    trainer = Trainer(cfg, registry.get("dcgan").cls, data=tiny_dataset, log=lambda m: None)

    def dead(tr, G):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    import dogkit.core.train as T

    monkeypatch.setattr(T, "prepare_for_sampling", dead)
    with pytest.raises(RunFailed, match=r"the end failed on cpu \(RuntimeError: CUDA error.*sampled on the CPU "
                                        r"from checkpoint.pt \(step 6\)") as info:
        trainer.run()
    assert load_submission(info.value.zip_path, strict=True, n_images=64).pixels.shape == (64, 64, 64, 3)


def test_the_checkpoint_counts_the_real_images_seen(tmp_path, tiny_dataset):
    """wgan-gp draws a real batch per critic step: the trainer counts what the model draws, and
    tools/gpu_bench reads that count (no per-model special case)."""
    entry = registry.get("wgan-gp")
    cfg = tiny_cfg(tmp_path, "wgan-gp", steps=3)
    train(cfg, entry.cls, data=tiny_dataset, log=lambda m: None)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert cfg.d_steps > 1 and ckpt["images_seen"] == 3 * cfg.d_steps * 8


def run_session(tmp_path, data, out, sessions, budget, resume=None):
    clock = FakeClock(dt=1.0)  # every session's clock starts at 0, as a new Kaggle session's does
    cfg = tiny_cfg(tmp_path / out, budget=budget, sessions=sessions, reserve=0.0, lr_decay_start=0.2, ema_start=0.1)
    logs = []
    trainer = Trainer(cfg, registry.get("dcgan").cls, data=data, clock=clock, log=logs.append, hooks=[clock.hook])
    if resume:
        load_checkpoint(trainer, resume)
    trainer.run()
    return trainer, logs


def test_a_run_over_two_sessions_continues_exactly_where_the_first_stopped(tmp_path, tiny_dataset):
    """Two sessions of 12 s planned as one run of 24: the first stops at half the run's training
    with the learning rate not yet annealed, the second (a new clock, another output folder, as
    on Kaggle) picks up its steps, schedule, EMA and random streams: the same weights, bit for
    bit, as one 24 s run, and a log that holds both sessions."""
    straight, _ = run_session(tmp_path, tiny_dataset, "straight", 1, 24.0)
    first, logs = run_session(tmp_path, tiny_dataset, "s1", 2, 12.0)
    assert (first.step, first.plan.session, first.plan.train_seconds) == (12, 1, 24.0)
    assert any("session 1 of 2 ends at step 12 (50% of the run's training)" in m for m in logs)
    assert load_submission(tmp_path / "s1" / "images.zip", strict=False).pixels.shape[0] == 64  # a zip each session
    second, logs = run_session(tmp_path, tiny_dataset, "s2", 2, 12.0, resume=tmp_path / "s1" / "checkpoint.pt")
    assert (second.step, second.plan.session, second.plan.train_seconds) == (straight.step, 2, 24.0) == (24, 2, 24.0)
    assert any("session 2 of 2: training until 0m24s of the run's 0m24s" in m for m in logs)
    assert not any("ends at step" in m for m in logs)
    for a, b in zip(straight.model.G.state_dict().values(), second.model.G.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(straight.ema.G.parameters(), second.ema.G.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    records = [json.loads(x) for x in open(tmp_path / "s2" / "log.jsonl")]
    assert [r["session"] for r in records] == [1] * 12 + [2] * 12
    assert [r["lr_g"] for r in records] == [json.loads(x)["lr_g"] for x in open(tmp_path / "straight" / "log.jsonl")]
    with pytest.raises(RunError, match=r"already trained its 2 sessions \(step 24\); raise sessions above 2"):
        run_session(tmp_path, tiny_dataset, "s3", 2, 12.0, resume=tmp_path / "s2" / "checkpoint.pt")
    assert not (tmp_path / "s3").exists() or os.listdir(tmp_path / "s3") == []


def test_a_checkpoint_of_other_settings_is_refused_naming_each_difference(tmp_path, tiny_dataset):
    run_session(tmp_path, tiny_dataset, "s1", 2, 12.0)
    clock = FakeClock()
    cfg = tiny_cfg(tmp_path / "other", budget=12.0, sessions=2, reserve=0.0, lr_decay_start=0.2, ema_start=0.1,
                   width=8, lr_g=1e-4, out=str(tmp_path / "elsewhere"), n_samples=32)  # where and how many: free
    trainer = Trainer(cfg, registry.get("dcgan").cls, data=tiny_dataset, clock=clock, log=lambda m: None)
    with pytest.raises(RunError) as info:
        load_checkpoint(trainer, tmp_path / "s1" / "checkpoint.pt")
    message = str(info.value)
    assert "trained with other settings: width 4 (this run: 8); lr_g 0.0005 (this run: 0.0001); continue" in message
    assert "\n" not in message


def test_the_warm_re_plan_keeps_twice_the_end_it_times(tmp_path, tiny_dataset, monkeypatch):
    """Once warm the end is timed again; the reserve kept is twice that timing (plus 3 s), so a
    machine twice as slow as at the re-plan still fits, and the line says so."""
    import dogkit.core.train as T

    logs = []
    trainer = Trainer(tiny_cfg(tmp_path, reserve=-1.0, budget=600.0), registry.get("dcgan").cls, data=tiny_dataset,
                      log=logs.append, clock=lambda: 0.0)
    trainer.plan.fix(500.0, 500.0, 500.0)
    trainer.plan.tick(60.0)
    monkeypatch.setattr(T, "measure_end", lambda tr: (1.25 * 40.0 + 3.0, {"generate": 30.0, "png": 10.0}))
    T.replan(trainer)
    assert trainer.plan.session_end == 600.0 - (2 * 40.0 + 3.0)
    assert logs[-1].startswith("re-planned once warm: 83 s kept for the end (twice its warm timing: a machine twice "
                               "as slow still fits); training until 8m37s (was 8m20s)"), logs[-1]


def test_nothing_outside_a_trainer_part_writes_its_fields():
    """The plan, the EMA, the safety net and what the run wrote each own their fields: no code in
    dogkit/core or tools assigns `x.plan.f`, `x.ema.f`, `x.safety.f` or `x.written.f` (only the
    parts' own methods write them, through self)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    parts = {"plan", "ema", "safety", "written"}
    found = []
    for path in sorted((root / "dogkit" / "core").rglob("*.py")) + sorted((root / "tools").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in (e for target in targets for e in ast.walk(target)):
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Attribute) and t.value.attr in parts:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(t)}")
    assert found == [], found
    assert {"Plan", "Ema", "SafetyNet", "Written"} <= set(dir(__import__("dogkit.core.train", fromlist=["x"])))
