"""Model registry: name -> model class, its settings and its source modules.

The CLI's --model choices and the kernel builder both read this table. Tooling only: a
generated kernel holds exactly one model and never imports the registry.
"""
from dataclasses import dataclass

from dogkit.core.models.biggan import BIGGAN_SETTINGS, BigGAN
from dogkit.core.models.dcgan import DCGAN, DCGAN_SETTINGS


@dataclass(frozen=True)
class ModelEntry:
    name: str
    cls: type
    settings: dict
    modules: tuple  # core modules to inline into its kernel, in dependency order
    summary: str


_CORE = ("dogkit.core.data", "dogkit.core.augment", "dogkit.core.sample", "dogkit.core.models.common")

MODELS = {
    "dcgan": ModelEntry("dcgan", DCGAN, DCGAN_SETTINGS,
                        _CORE + ("dogkit.core.models.dcgan", "dogkit.core.train"),
                        "report 001's DCGAN: BN, LeakyReLU, BCE with real label 0.8, input noise"),
    "biggan": ModelEntry("biggan", BigGAN, BIGGAN_SETTINGS,
                         _CORE + ("dogkit.core.models.biggan", "dogkit.core.train"),
                         "BigGAN-style: breed-conditional, hierarchical z, projection D, SN, hinge, EMA"),
}
MODEL_NAMES = tuple(MODELS)


def get(name):
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}") from None
