"""Model registry: name -> model class, its settings and its source modules.

The CLI's --model choices and the kernel builder both read this table. Tooling only: a
generated kernel holds exactly one model and never imports the registry.
"""
from dataclasses import dataclass

from dogkit.core.models.biggan import BIGGAN_SETTINGS, BigGAN
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
    modules: tuple  # core modules to inline into its kernel, in dependency order
    summary: str


_CORE = ("dogkit.core.data", "dogkit.core.augment", "dogkit.core.sample", "dogkit.core.models.common")

MODELS = {
    "gan": ModelEntry("gan", GAN, GAN_SETTINGS, _CORE + ("dogkit.core.models.gan", "dogkit.core.train"),
                      "report 003's fully connected GAN, the floor of the table"),
    "dcgan": ModelEntry("dcgan", DCGAN, DCGAN_SETTINGS,
                        _CORE + ("dogkit.core.models.dcgan", "dogkit.core.train"),
                        "report 001's DCGAN: BN, LeakyReLU, BCE with real label 0.8, input noise"),
    "biggan": ModelEntry("biggan", BigGAN, BIGGAN_SETTINGS,
                         _CORE + ("dogkit.core.models.biggan", "dogkit.core.train"),
                         "BigGAN-style: breed-conditional, hierarchical z, projection D, SN, hinge, EMA"),
}
MODELS.update({
    "wgan-gp": ModelEntry("wgan-gp", WGANGP, WGAN_GP_SETTINGS,
                          _CORE + ("dogkit.core.models.wgan_gp", "dogkit.core.train"),
                          "report 000's WGAN-GP: gradient penalty, layer norm in G, upsample+conv, Nadam"),
    "sagan": ModelEntry("sagan", SAGAN, SAGAN_SETTINGS,
                        _CORE + ("dogkit.core.models.sagan", "dogkit.core.train"),
                        "report 002's SAGAN: self-attention at 32x32, spectral norm, hinge, TTUR"),
    "cvae": ModelEntry("cvae", CVAE, CVAE_SETTINGS, _CORE + ("dogkit.core.models.cvae", "dogkit.core.train"),
                       "report 000's convolutional VAE, sampled from K-means clusters with recycling"),
    "ralsgan": ModelEntry("ralsgan", RaLSGAN, RALSGAN_SETTINGS,
                          _CORE + ("dogkit.core.models.ralsgan", "dogkit.core.train"),
                          "the public RaLSGAN dogs kernel (report 004): relativistic average LS loss"),
})
MODEL_NAMES = tuple(MODELS)


def get(name):
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}") from None
