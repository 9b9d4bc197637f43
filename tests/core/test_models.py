"""One CPU training step and sampling for every registered model (mimicry-style)."""
import importlib
import pytest
import torch

from dogkit.core import registry
from dogkit.core.sample import generate, truncated_normal
from dogkit.core.settings import DIFFAUG_MODELS
from dogkit.core.settings import TrainConfig, with_settings


@pytest.mark.parametrize("name", registry.MODEL_NAMES)
def test_one_step_and_sampling(name, tiny_dataset):
    entry = registry.get(name)
    cfg = with_settings(with_settings(TrainConfig(), entry.settings), {"width": 8, "batch_size": 4})
    model = entry.cls(cfg, n_classes=3, device="cpu")
    real = torch.rand(4, 3, 64, 64) * 2 - 1
    before = [p.detach().clone() for p in model.G.parameters()]
    losses = model.step(lambda: (real, torch.tensor([0, 1, 2, 0])))
    assert losses and all(torch.isfinite(v) for v in losses.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.G.parameters()))
    imgs = generate(model.G, 6, cfg.z_dim, truncation=1.0, n_classes=3 if entry.cls.conditional else 0)
    assert imgs.shape == (6, 64, 64, 3) and imgs.dtype.name == "uint8"


def test_truncated_normal_resamples_beyond_the_threshold():
    z = truncated_normal((20000,), 0.5, torch.Generator().manual_seed(0))
    assert z.abs().max() <= 0.5
    assert z.std() > 0.25  # resampled, not clipped: no pile-up at the edges
    assert (z.abs() > 0.49).float().mean() < 0.05
    plain = torch.randn(3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(truncated_normal((3,), 0.0, torch.Generator().manual_seed(1)), plain)  # 0: none
    with pytest.raises(ValueError):
        truncated_normal((3,), 0.01)


def test_sampling_does_not_depend_on_the_batch_size():
    entry = registry.get("biggan")
    cfg = with_settings(with_settings(TrainConfig(), entry.settings), {"width": 4})
    G = entry.cls(cfg, n_classes=3, device="cpu").G
    a = generate(G, 10, cfg.z_dim, truncation=0.8, n_classes=3, batch_size=3, seed=5)
    b = generate(G, 10, cfg.z_dim, truncation=0.8, n_classes=3, batch_size=10, seed=5)
    c = generate(G, 10, cfg.z_dim, truncation=0.8, n_classes=3, batch_size=10, seed=6)
    assert abs(a.astype(int) - b.astype(int)).max() <= 1  # same z and labels; float rounding at most
    assert (a != c).mean() > 0.1  # another seed, other images


def test_lecam_penalty_closed_form_gated_until_its_start_step():
    from dogkit.core.models.common import lecam_penalty

    state = torch.zeros(3)
    d_real, d_fake = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 1.0])
    # before `start`: the averages are the batch means, 1 (real) and 0 (fake), and no penalty
    assert float(lecam_penalty(state, d_real, d_fake, decay=0.99, start=2)) == 0.0
    assert state.tolist() == pytest.approx([1.0, 0.0, 1.0])
    assert float(lecam_penalty(state, torch.tensor([3.0]), torch.tensor([-3.0]), decay=0.99, start=2)) == 0.0
    assert state.tolist() == pytest.approx([3.0, -3.0, 2.0])  # still the batch's own means
    # from the start step on: the EMA, and the penalty against it
    got = lecam_penalty(state, d_real, d_fake, decay=0.99, start=2)
    real_avg, fake_avg = 0.99 * 3 + 0.01 * 1.0, -0.99 * 3 + 0.01 * 0.0
    assert state.tolist() == pytest.approx([real_avg, fake_avg, 3.0])
    expected = ((2.0 - fake_avg) ** 2 + (0.0 - fake_avg) ** 2) / 2 + ((real_avg + 1.0) ** 2 + (real_avg - 1.0) ** 2) / 2
    assert float(got) == pytest.approx(expected)
    # D outputs on the right side of the other side's average: no penalty
    state = torch.tensor([1.0, -1.0, 5.0])
    penalty = lecam_penalty(state, torch.tensor([-2.0]), torch.tensor([2.0]), decay=0.99, start=2)
    assert float(penalty) == 0.0  # D(real) -2 is below the fake average, D(fake) 2 above the real one


def test_lecam_is_applied_by_biggan_only(tmp_path, tiny_dataset):
    from dogkit.core.train import Trainer, train_step

    cfg = with_settings(with_settings(TrainConfig(), registry.get("biggan").settings),
                        dict(width=4, batch_size=8, device="cpu", out=str(tmp_path), lecam=0.3))
    trainer = Trainer(cfg, registry.get("biggan").cls, data=tiny_dataset, log=lambda m: None)
    losses = train_step(trainer)
    assert "loss_lecam" in losses and torch.isfinite(losses["loss_lecam"])
    assert float(trainer.model.D.lecam_ema[2]) == 1.0
    with pytest.raises(ValueError, match=r"lecam=0.3: model dcgan does not read it \(biggan does\)"):
        Trainer(with_settings(with_settings(TrainConfig(), registry.get("dcgan").settings),
                              dict(device="cpu", out=str(tmp_path), lecam=0.3)),
                registry.get("dcgan").cls, data=tiny_dataset, log=lambda m: None)


@pytest.mark.parametrize("name", registry.MODEL_NAMES)
def test_every_registered_model_meets_the_contract(name, tiny_dataset):
    from dogkit.core.models.common import contract_problems, instance_problems

    entry = registry.get(name)
    assert contract_problems(entry.cls) == []
    cfg = with_settings(with_settings(TrainConfig(), entry.settings), {"width": 8, "batch_size": 4})
    model = entry.cls(cfg, 3 if entry.cls.conditional else 0, "cpu")
    assert instance_problems(model) == []
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    losses = model.step(lambda: (images, torch.arange(4) % 3))
    assert any(k.startswith("loss_") for k in losses)
    assert all(v.dim() == 0 and not v.requires_grad for v in losses.values())


def test_the_registry_refuses_a_model_that_breaks_the_contract():
    class Broken:
        name = "broken"

        def __init__(self, cfg, device):
            pass

    with pytest.raises(TypeError, match=r"conditional.*step\(batch\) missing.*__init__ must take"):
        registry.register(Broken, {}, "")
    assert "broken" not in registry.MODELS

    class Typo:
        name = "typo"
        conditional = False

        def __init__(self, cfg, n_classes, device):
            pass

        def step(self, batch):
            return {}

    with pytest.raises(TypeError, match="unknown setting 'lr_gg'"):
        registry.register(Typo, {"lr_gg": 1.0}, "")
    with pytest.raises(TypeError, match="registered twice"):
        registry.register(registry.get("dcgan").cls, {}, "")


def test_diffaugment_policies_do_what_they_say():
    from dogkit.core.augment import diff_augment

    torch.manual_seed(0)
    ones = torch.ones(16, 3, 64, 64)
    moved = diff_augment(ones, "translation")  # shifted by up to 8 px, zeros come in at the edges
    assert set(moved.unique().tolist()) <= {0.0, 1.0}
    assert bool((moved.mean(dim=(1, 2, 3)) >= (56 / 64) ** 2 - 1e-6).all())
    holes = (diff_augment(ones, "cutout") == 0).all(dim=1).sum(dim=(1, 2))  # one square of half the side
    assert bool((holes > 0).all()) and bool((holes <= 32 * 32).all())
    assert not torch.equal(diff_augment(ones * 0.5, "color"), ones * 0.5)


@pytest.mark.parametrize("name", ["biggan", "dcgan"])
@pytest.mark.parametrize("augment, policy", [("flip+diffaug-t", "translation"),
                                             ("flip+diffaug-tc", "translation,cutout"),
                                             ("flip+diffaug", "color,translation,cutout"),
                                             ("crop-flip+diffaug", "color,translation,cutout"), ("flip", "")])
def test_a_diffaugment_model_shows_d_what_its_augment_setting_says(name, augment, policy, monkeypatch):
    entry = registry.get(name)
    model = entry.cls(with_settings(with_settings(TrainConfig(), entry.settings),
                                    dict(width=4, device="cpu", augment=augment, batch_size=4)), 3, torch.device("cpu"))
    assert model.policy == policy and name in DIFFAUG_MODELS
    module = importlib.import_module(type(model).__module__)
    calls = []
    monkeypatch.setattr(module, "diff_augment", lambda x, p: calls.append(p) or x)
    real = torch.rand(4, 3, 64, 64) * 2 - 1
    model.step(lambda: (real, torch.zeros(4, dtype=torch.long)))
    assert calls == [policy] * 3  # D's real, fake and generator passes, each through the policy


# ---- presets: a published recipe in full -------------------------------------------------------

def test_a_preset_is_applied_over_the_models_settings_and_an_option_wins_over_it():
    """--preset fifth-place gives the 5th place's settings (run_train.sh, run_sample.sh); an option
    given beside it wins; the model's own settings fill the rest."""
    from dogkit.core.kernel import config_from_options, parse_args

    entry = registry.get("biggan")
    cfg = config_from_options(entry.settings, vars(parse_args(["--data", "x.npz", "--preset", "fifth-place"])),
                              presets=entry.presets)
    assert (cfg.width, cfg.d_width, cfg.batch_size, cfg.z_dim, cfg.lr_g, cfg.lr_d, cfg.beta1) == (
        32, 64, 32, 100, 1e-4, 4e-4, 0.0)
    assert (cfg.ema_fraction, cfg.ema_decay, cfg.ema_start, cfg.lr_final, cfg.truncation) == (
        0.0, 0.9999, 0.48, 1.0, 0.0)
    mine = config_from_options(entry.settings, vars(parse_args(["--data", "x.npz", "--preset", "fifth-place",
                                                                "--truncation", "1.0", "--batch-size", "64"])),
                               presets=entry.presets)
    assert (mine.truncation, mine.batch_size, mine.d_width) == (1.0, 64, 64)
    plain = config_from_options(entry.settings, vars(parse_args(["--data", "x.npz"])), presets=entry.presets)
    assert (plain.d_width, plain.ema_fraction, plain.truncation) == (0, 0.1, -1.0)  # biggan's own defaults
    assert entry.cls(with_settings(plain, {"width": 4}), 3, "cpu").d_width == 8  # D twice as wide as G


@pytest.mark.parametrize("model,name,message", [("biggan", "sixth-place", "preset 'sixth-place': choose from fifth-place"),
                                                ("dcgan", "fifth-place", "preset 'fifth-place': this model has no presets")])
def test_an_unknown_preset_is_refused_with_the_models_list(model, name, message):
    from dogkit.core.kernel import config_from_options, parse_args

    entry = registry.get(model)
    with pytest.raises(ValueError) as err:
        config_from_options(entry.settings, vars(parse_args(["--data", "x.npz", "--preset", name])),
                            presets=entry.presets)
    assert str(err.value) == message


def test_the_registry_refuses_a_preset_with_a_setting_that_does_not_exist():
    from dogkit.core.models.biggan import BigGAN

    class Other(BigGAN):
        name = "biggan-other"

    with pytest.raises(TypeError, match=r"preset 'mine': unknown setting 'd_wdith'"):
        registry.register(Other, {}, "a test model", {"mine": {"d_wdith": 64}})
    assert "biggan-other" not in registry.MODELS


def test_the_biggan_kernel_offers_its_presets_in_the_settings_and_refuses_an_unknown_one(tmp_path):
    """The settings cell carries the presets with their sources and PRESET; an unknown name given
    as --preset is one line and exit 2 before any work."""
    import subprocess
    import sys

    from pathlib import Path

    ROOT = Path(__file__).resolve().parents[2]
    text = (ROOT / "kernels" / "biggan.py").read_text()
    front = text[:text.index("\nKAGGLE_SESSIONS = ")]
    assert "BIGGAN_PRESETS = {" in front and "\nPRESET = None" in front and "run_train.sh" in front
    assert "presets=BIGGAN_PRESETS, preset=PRESET)" in text
    assert "\nPRESET = " not in (ROOT / "kernels" / "dcgan.py").read_text()
    proc = subprocess.run([sys.executable, str(ROOT / "kernels" / "biggan.py"), "--data", str(tmp_path / "x.npz"),
                           "--preset", "sixth-place", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # bad input (README, exit codes)
    assert proc.stderr.strip().splitlines() == ["error: preset 'sixth-place': choose from fifth-place"], proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit,message", [
    ("shape", "model check: Edited.G(z) returned (2, 3, 32, 32) for 2 images; the run needs (2, 3, 64, 64)"),
    ("crash", "model check: Edited.G(z) failed on 2 images: RuntimeError: mat1 and mat2 shapes cannot be multiplied")])
def test_an_edit_that_breaks_the_models_contract_is_one_line_naming_the_call_before_training(edit, message, tmp_path,
                                                                                             tiny_dataset):
    """A Kaggle user edits the generator: a wrong output size, or a layer that no longer fits, is one
    line naming G's call before any step (not a traceback mid-run, not a zip of wrong images)."""
    import torch.nn.functional as F

    from dogkit.core.train import Trainer

    entry = registry.get("dcgan")

    class Edited(entry.cls):
        def __init__(self, cfg, n_classes, device):
            super().__init__(cfg, n_classes, device)
            forward = self.G.forward
            if edit == "shape":
                self.G.forward = lambda z, labels=None: F.avg_pool2d(forward(z, labels), 2)
            else:
                self.G.forward = lambda z, labels=None: forward(torch.nn.Linear(7, 7)(z), labels)

    cfg = with_settings(with_settings(TrainConfig(), entry.settings), dict(width=4, batch_size=8, device="cpu",
                                                                           out=str(tmp_path), steps=2))
    with pytest.raises(ValueError) as err:
        Trainer(cfg, Edited, data=tiny_dataset, log=lambda m: None)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "checkpoint.pt").exists()
