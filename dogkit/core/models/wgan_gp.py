# ---------------------------------------------------------------------------------------------
# Model: WGAN-GP as report 000 finalised it
# ---------------------------------------------------------------------------------------------
# Wasserstein loss with gradient penalty (lambda 10); layer normalisation in G and none in D;
# nearest-neighbour upsampling + convolution instead of transposed convolutions, with an extra
# stride-1 convolution block after each upsampling block; He initialisation; Nadam (2e-4,
# betas 0.5 / 0.9); truncated-normal z at sampling (cut at 2 sigma, like TF's truncated_normal).
# Several critic steps per G step (d_steps, 5), the textbook WGAN-GP schedule. Report 000 says it
# trained G 5 steps per D step instead; set d_steps=1, g_steps=5 to follow it literally.
import torch
from torch import nn

from dogkit.core.models.common import backward_step, nadam

WGAN_GP_SETTINGS = dict(lr_g=2e-4, lr_d=2e-4, beta1=0.5, beta2=0.9, batch_size=32, z_dim=128, width=64,
                        d_steps=5, g_steps=1, gp_weight=10.0, augment="flip", truncation=2.0)


def conv_ln(cin, cout):
    """3x3 stride-1 convolution, layer norm (over C, H, W), LeakyReLU."""
    return [nn.Conv2d(cin, cout, 3, 1, 1), nn.GroupNorm(1, cout), nn.LeakyReLU(0.2)]


class WGANGenerator(nn.Module):
    def __init__(self, z_dim=128, width=64):
        super().__init__()
        w = width
        self.fc = nn.Linear(z_dim, 4 * 4 * 8 * w)
        self.norm = nn.LayerNorm(4 * 4 * 8 * w)
        layers = []
        for cin, cout in ((8 * w, 4 * w), (4 * w, 2 * w), (2 * w, w), (w, w)):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), *conv_ln(cin, cout), *conv_ln(cout, cout)]
        self.net = nn.Sequential(*layers, nn.Conv2d(w, 3, 3, 1, 1), nn.Tanh())
        self.w = w
        he_init(self)

    def forward(self, z, labels=None):
        h = torch.nn.functional.leaky_relu(self.norm(self.fc(z)), 0.2)
        return self.net(h.view(-1, 8 * self.w, 4, 4))


class WGANCritic(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 8 * w, 4, 2, 1), nn.LeakyReLU(0.2),
        )
        self.fc = nn.Linear(8 * w * 4 * 4, 1)
        he_init(self)

    def forward(self, x, labels=None):
        return self.fc(self.net(x).flatten(1)).view(-1)


def he_init(module):
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity="leaky_relu")
            nn.init.zeros_(m.bias)


class WGANGP:
    name = "wgan-gp"
    conditional = False

    def __init__(self, cfg, n_classes, device):
        self.cfg = cfg
        self.G = WGANGenerator(cfg.z_dim, cfg.width).to(device)
        self.D = WGANCritic(cfg.width).to(device)
        self.opt_g = nadam(self.G, cfg.lr_g, cfg)
        self.opt_d = nadam(self.D, cfg.lr_d, cfg)

    def gradient_penalty(self, real, fake):
        eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
        mix = (eps * real + (1 - eps) * fake).requires_grad_(True)
        grad, = torch.autograd.grad(self.D(mix).sum(), mix, create_graph=True)
        return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()

    def step(self, batch):
        cfg = self.cfg
        for _ in range(cfg.d_steps):
            real, _ = batch()
            z = torch.randn(real.shape[0], cfg.z_dim, device=real.device)
            fake = self.G(z).detach()
            self.opt_d.zero_grad(set_to_none=False)
            wasserstein = self.D(fake).mean() - self.D(real).mean()
            loss_d = wasserstein + cfg.gp_weight * self.gradient_penalty(real, fake)
            backward_step(self.opt_d, loss_d)
        for _ in range(cfg.g_steps):
            z = torch.randn(cfg.batch_size, cfg.z_dim, device=real.device)
            self.opt_g.zero_grad(set_to_none=False)
            loss_g = -self.D(self.G(z)).mean()
            backward_step(self.opt_g, loss_g)
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), "wasserstein": -wasserstein.detach()}
