# ---------------------------------------------------------------------------------------------
# Model: SAGAN as report 002 used it
# ---------------------------------------------------------------------------------------------
# A DCGAN-shaped generator and discriminator with spectral normalisation on every layer and a
# self-attention layer on the 32x32 feature maps of both; hinge loss; two time-scale learning
# rates (G 1e-4, D 4e-4, Adam betas 0 / 0.9); batch 32. Reports found it stable but slow to
# converge: a short budget favours simpler models.
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from dogkit.core.models.common import SelfAttention, adam, backward_step

SAGAN_SETTINGS = dict(lr_g=1e-4, lr_d=4e-4, beta1=0.0, beta2=0.9, batch_size=32, z_dim=128, width=64,
                      augment="flip")


class SAGANGenerator(nn.Module):
    def __init__(self, z_dim=128, width=64):
        super().__init__()
        w = width

        def up(cin, cout):
            return [spectral_norm(nn.ConvTranspose2d(cin, cout, 4, 2, 1)), nn.BatchNorm2d(cout), nn.ReLU()]

        self.head = nn.Sequential(spectral_norm(nn.ConvTranspose2d(z_dim, 8 * w, 4, 1, 0)), nn.BatchNorm2d(8 * w),
                                  nn.ReLU(), *up(8 * w, 4 * w), *up(4 * w, 2 * w), *up(2 * w, w))
        self.attention = SelfAttention(w)  # 32x32
        self.tail = nn.Sequential(spectral_norm(nn.ConvTranspose2d(w, 3, 4, 2, 1)), nn.Tanh())

    def forward(self, z, labels=None):
        return self.tail(self.attention(self.head(z.view(z.shape[0], -1, 1, 1))))


class SAGANDiscriminator(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        w = width

        def down(cin, cout):
            return [spectral_norm(nn.Conv2d(cin, cout, 4, 2, 1)), nn.LeakyReLU(0.1)]

        self.head = nn.Sequential(*down(3, w))  # 32x32
        self.attention = SelfAttention(w)
        self.tail = nn.Sequential(*down(w, 2 * w), *down(2 * w, 4 * w), *down(4 * w, 8 * w),
                                  spectral_norm(nn.Conv2d(8 * w, 1, 4, 1, 0)))

    def forward(self, x, labels=None):
        return self.tail(self.attention(self.head(x))).view(-1)


class SAGAN:
    name = "sagan"
    conditional = False

    def __init__(self, cfg, n_classes, device):
        self.cfg = cfg
        self.G = SAGANGenerator(cfg.z_dim, cfg.width).to(device)
        self.D = SAGANDiscriminator(cfg.width).to(device)
        self.opt_g = adam(self.G, cfg.lr_g, cfg)
        self.opt_d = adam(self.D, cfg.lr_d, cfg)

    def step(self, batch):
        real, _ = batch()
        z = torch.randn(real.shape[0], self.cfg.z_dim, device=real.device)
        fake = self.G(z)
        self.opt_d.zero_grad(set_to_none=False)
        loss_d = F.relu(1.0 - self.D(real)).mean() + F.relu(1.0 + self.D(fake.detach())).mean()
        backward_step(self.opt_d, loss_d)
        self.opt_g.zero_grad(set_to_none=False)
        loss_g = -self.D(fake).mean()
        backward_step(self.opt_g, loss_g)
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach()}
