# ---------------------------------------------------------------------------------------------
# Model: RaLSGAN, the relativistic average least-squares GAN of the public "RaLSGAN dogs" kernel
# ---------------------------------------------------------------------------------------------
# Report 004 ended with it. A DCGAN-shaped pair (G: transposed convolutions 1024 -> 64 channels,
# batch norm, ReLU, a final 3x3 convolution and tanh; D: strided convolutions, LeakyReLU, batch
# norm) trained with the relativistic average least-squares loss (Jolicoeur-Martineau 2018):
#   L_D = E[(D(x) - E D(G(z)) - 1)^2] + E[(D(G(z)) - E D(x) + 1)^2]
#   L_G = E[(D(G(z)) - E D(x) - 1)^2] + E[(D(x) - E D(G(z)) + 1)^2]
# Adam 5e-4 (0.5, 0.999), batch 32, flips.
import torch
from torch import nn

from dogkit.core.models.common import adam, backward_step, dcgan_init

RALSGAN_SETTINGS = dict(lr_g=5e-4, lr_d=5e-4, beta1=0.5, beta2=0.999, batch_size=32, z_dim=128, width=64,
                        augment="flip")


class RaLSGANGenerator(nn.Module):
    def __init__(self, z_dim=128, width=64):
        super().__init__()
        w = width

        def up(cin, cout):
            return [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.net = nn.Sequential(
            nn.ConvTranspose2d(z_dim, 16 * w, 4, 1, 0, bias=False), nn.BatchNorm2d(16 * w), nn.ReLU(),
            *up(16 * w, 8 * w), *up(8 * w, 4 * w), *up(4 * w, 2 * w), *up(2 * w, w),
            nn.Conv2d(w, 3, 3, 1, 1), nn.Tanh(),
        )

    def forward(self, z, labels=None):
        return self.net(z.view(z.shape[0], -1, 1, 1))


class RaLSGANDiscriminator(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        w = width // 2

        def down(cin, cout):
            return [nn.Conv2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]

        self.net = nn.Sequential(
            nn.Conv2d(3, w, 4, 2, 1), nn.LeakyReLU(0.2),
            *down(w, 2 * w), *down(2 * w, 4 * w), *down(4 * w, 8 * w),
            nn.Conv2d(8 * w, 1, 4, 1, 0),
        )

    def forward(self, x, labels=None):
        return self.net(x).view(-1)


class RaLSGAN:
    name = "ralsgan"
    conditional = False

    def __init__(self, cfg, n_classes, device):
        self.cfg = cfg
        self.G = RaLSGANGenerator(cfg.z_dim, cfg.width).to(device)
        self.D = RaLSGANDiscriminator(cfg.width).to(device)
        self.G.apply(dcgan_init)
        self.D.apply(dcgan_init)
        self.opt_g = adam(self.G, cfg.lr_g, cfg)
        self.opt_d = adam(self.D, cfg.lr_d, cfg)

    def step(self, batch):
        real, _ = batch()
        z = torch.randn(real.shape[0], self.cfg.z_dim, device=real.device)
        fake = self.G(z)
        self.opt_d.zero_grad(set_to_none=False)
        d_real, d_fake = self.D(real), self.D(fake.detach())
        loss_d = (((d_real - d_fake.mean() - 1) ** 2).mean() + ((d_fake - d_real.mean() + 1) ** 2).mean()) / 2
        backward_step(self.opt_d, loss_d)
        self.opt_g.zero_grad(set_to_none=False)
        d_real, d_gen = self.D(real), self.D(fake)
        loss_g = (((d_gen - d_real.mean() - 1) ** 2).mean() + ((d_real - d_gen.mean() + 1) ** 2).mean()) / 2
        backward_step(self.opt_g, loss_g)
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach()}
