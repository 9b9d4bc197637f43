"""Model registry: name -> model class, its settings and a one-line summary.

The CLI's --model choices and the kernel builder both read this table; the builder finds a
model's code by following its module's imports. Adding a model = one new file in
dogkit/core/models (a class that meets dogkit.core.models.common.ModelContract) plus one line
here. `register` checks the contract. Tooling only: a generated kernel holds exactly one model
and never imports the registry.
"""
from dataclasses import dataclass

from dogkit.core.models.biggan import BIGGAN_PRESETS, BIGGAN_SETTINGS, BigGAN
from dogkit.core.models.common import contract_problems
from dogkit.core.models.cvae import CVAE, CVAE_SETTINGS
from dogkit.core.models.dcgan import DCGAN, DCGAN_SETTINGS
from dogkit.core.models.gan import GAN, GAN_SETTINGS
from dogkit.core.models.ralsgan import RALSGAN_SETTINGS, RaLSGAN
from dogkit.core.models.sagan import SAGAN, SAGAN_SETTINGS
from dogkit.core.models.wgan_gp import WGAN_GP_SETTINGS, WGANGP


@dataclass(frozen=True)
class ModelEntry:
    name: str
    cls: type
    settings: dict
    summary: str
    presets: dict  # name -> settings over the model's own: a published recipe in full (--preset NAME)


MODELS = {}


def register(cls, settings, summary, presets=None):
    """Add a model under its class's `name`; refuses a class that breaks the model contract, a
    setting TrainConfig does not know or the model does not read (in its settings or a preset), or a
    name taken twice."""
    from dogkit.core.settings import TrainConfig, unread_settings, with_settings

    problems = contract_problems(cls)
    presets = presets or {}
    for name, values in {"settings": {}, **{f"preset {p!r}": v for p, v in presets.items()}}.items():
        try:
            cfg = with_settings(with_settings(TrainConfig(), settings), values)
            problems += [f"{name}: {p}" for p in unread_settings(cfg, getattr(cls, "name", ""))]
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
    if getattr(cls, "name", None) in MODELS:
        problems.append(f"name {cls.name!r} is registered twice")
    if problems:
        raise TypeError(f"model {cls.__name__}: " + "; ".join(problems))
    MODELS[cls.name] = ModelEntry(cls.name, cls, settings, summary, presets)


register(GAN, GAN_SETTINGS, "report 003's fully connected GAN, the floor of the table")
register(DCGAN, DCGAN_SETTINGS, "report 001's DCGAN: BN, LeakyReLU, BCE with real label 0.8, input noise")
register(BigGAN, BIGGAN_SETTINGS, "BigGAN-style: breed-conditional, hierarchical z, projection D, SN, hinge, EMA",
         BIGGAN_PRESETS)
register(WGANGP, WGAN_GP_SETTINGS, "report 000's WGAN-GP: gradient penalty, layer norm in G, upsample+conv, Nadam")
register(SAGAN, SAGAN_SETTINGS, "report 002's SAGAN: self-attention at 32x32, spectral norm, hinge, TTUR")
register(CVAE, CVAE_SETTINGS, "report 000's convolutional VAE, sampled from K-means clusters with recycling")
register(RaLSGAN, RALSGAN_SETTINGS, "the public RaLSGAN dogs kernel (report 004): relativistic average LS loss")
MODEL_NAMES = tuple(MODELS)


def get(name):
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}") from None
