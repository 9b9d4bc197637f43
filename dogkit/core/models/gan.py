# ---------------------------------------------------------------------------------------------
# Model: the plain fully connected GAN (report 003's first model), the floor of the table
# ---------------------------------------------------------------------------------------------
# G: z -> 256 -> 512 -> 1024 -> 64x64x3 (LeakyReLU 0.2, tanh); D: the mirror image with
# dropout 0.3, BCE loss, Adam 2e-4 (0.5, 0.999). No convolutions: it sees pixels, not shapes,
# so expect blurry colour blobs; report 003 ran it on MNIST, where it did well enough.
import torch
import torch.nn.functional as F
from torch import nn

from dogkit.core.models.common import adam, backward_step

GAN_SETTINGS = dict(lr_g=2e-4, lr_d=2e-4, beta1=0.5, beta2=0.999, batch_size=64, z_dim=100,
                    width=256, augment="flip")


class MLPGenerator(nn.Module):
    def __init__(self, z_dim=100, width=256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(z_dim, width), nn.LeakyReLU(0.2),
            nn.Linear(width, 2 * width), nn.LeakyReLU(0.2),
            nn.Linear(2 * width, 4 * width), nn.LeakyReLU(0.2),
            nn.Linear(4 * width, 64 * 64 * 3), nn.Tanh(),
        )

    def forward(self, z, labels=None):
        return self.net(z).view(-1, 3, 64, 64)


class MLPDiscriminator(nn.Module):
    def __init__(self, width=256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64 * 64 * 3, 4 * width), nn.LeakyReLU(0.2), nn.Dropout(0.3),
            nn.Linear(4 * width, 2 * width), nn.LeakyReLU(0.2), nn.Dropout(0.3),
            nn.Linear(2 * width, width), nn.LeakyReLU(0.2), nn.Dropout(0.3),
            nn.Linear(width, 1),
        )

    def forward(self, x, labels=None):
        return self.net(x.flatten(1)).view(-1)


class GAN:
    name = "gan"
    conditional = False

    def __init__(self, cfg, n_classes, device):
        self.cfg = cfg
        self.G = MLPGenerator(cfg.z_dim, cfg.width).to(device)
        self.D = MLPDiscriminator(cfg.width).to(device)
        self.opt_g = adam(self.G, cfg.lr_g, cfg)
        self.opt_d = adam(self.D, cfg.lr_d, cfg)

    def step(self, batch):
        real, _ = batch()
        z = torch.randn(real.shape[0], self.cfg.z_dim, device=real.device)
        fake = self.G(z)
        self.opt_d.zero_grad(set_to_none=False)
        d_real, d_fake = self.D(real), self.D(fake.detach())
        loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real)) +
                  F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        backward_step(self.opt_d, loss_d)
        self.opt_g.zero_grad(set_to_none=False)
        d_gen = self.D(fake)
        loss_g = F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
        backward_step(self.opt_g, loss_g)
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach()}
