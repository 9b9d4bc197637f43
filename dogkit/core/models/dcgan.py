# ---------------------------------------------------------------------------------------------
# Model: DCGAN as report 001 describes it
# ---------------------------------------------------------------------------------------------
# Symmetric generator and discriminator (same depth, 4x4 kernels), batch norm, LeakyReLU(0.2)
# in both, tanh output; BCE with the real label softened to 0.8, Gaussian noise (std 0.1) on
# the real images, Adam lr 5e-4 betas (0.5, 0.999), batch 32, z of 128, RandomResizedCrop
# (scale 0.8-1.0, ratio 3/4-4/3) and horizontal flips. Real and fake images go through D in
# separate batches (separate batch-norm statistics), as the report does. dogkit adds an EMA of G
# over about 10,000 steps (decay 0.9999) with re-estimated batch-norm statistics for sampling,
# and DiffAugment on what D sees of real and fake alike as an option (augment "crop-flip+diffaug").
import torch
import torch.nn.functional as F
from torch import nn

from dogkit.core.augment import diff_augment, diffaug_policy
from dogkit.core.models.common import adam, backward_step, dcgan_init

DCGAN_SETTINGS = dict(lr_g=5e-4, lr_d=5e-4, beta1=0.5, beta2=0.999, batch_size=32, z_dim=128,
                      width=64, real_label=0.8, input_noise=0.1, augment="crop-flip", ema_decay=0.9999)


class DCGANGenerator(nn.Module):
    def __init__(self, z_dim=128, width=64):
        super().__init__()
        w = width

        def up(cin, cout):
            return [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]

        self.net = nn.Sequential(
            nn.ConvTranspose2d(z_dim, w * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(w * 8), nn.LeakyReLU(0.2),
            *up(w * 8, w * 4), *up(w * 4, w * 2), *up(w * 2, w),
            nn.ConvTranspose2d(w, 3, 4, 2, 1), nn.Tanh(),
        )

    def forward(self, z, labels=None):
        return self.net(z.view(z.shape[0], -1, 1, 1))


class DCGANDiscriminator(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        w = width

        def down(cin, cout):
            return [nn.Conv2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]

        self.net = nn.Sequential(
            nn.Conv2d(3, w, 4, 2, 1), nn.LeakyReLU(0.2),
            *down(w, w * 2), *down(w * 2, w * 4), *down(w * 4, w * 8),
            nn.Conv2d(w * 8, 1, 4, 1, 0),
        )

    def forward(self, x, labels=None):
        return self.net(x).view(-1)


class DCGAN:
    """Builds G and D and owns one training step (D then G); returns losses as device tensors."""

    name = "dcgan"
    conditional = False

    def __init__(self, cfg, n_classes, device):
        self.cfg = cfg
        self.G = DCGANGenerator(cfg.z_dim, cfg.width).to(device)
        self.D = DCGANDiscriminator(cfg.width).to(device)
        self.G.apply(dcgan_init)
        self.D.apply(dcgan_init)
        self.opt_g = adam(self.G, cfg.lr_g, cfg)
        self.opt_d = adam(self.D, cfg.lr_d, cfg)
        self.policy = diffaug_policy(cfg.augment)  # what D sees of real and fake alike

    def step(self, batch):
        cfg = self.cfg
        real, labels = batch()
        n = real.shape[0]
        if cfg.input_noise > 0:
            real = real + cfg.input_noise * torch.randn_like(real)
        z = torch.randn(n, cfg.z_dim, device=real.device)
        fake = self.G(z)

        self.opt_d.zero_grad(set_to_none=False)
        d_real = self.D(diff_augment(real, self.policy))
        d_fake = self.D(diff_augment(fake.detach(), self.policy))
        loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.full_like(d_real, cfg.real_label)) +
                  F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        backward_step(self.opt_d, loss_d)

        self.opt_g.zero_grad(set_to_none=False)
        d_gen = self.D(diff_augment(fake, self.policy))
        loss_g = F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
        backward_step(self.opt_g, loss_g)
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach()}

