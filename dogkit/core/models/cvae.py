# ---------------------------------------------------------------------------------------------
# Model: report 000's convolutional variational autoencoder, sampled from K-means clusters
# ---------------------------------------------------------------------------------------------
# Encoder (strided convolutions) -> mu, log-variance of a 128-d latent; decoder (transposed
# convolutions) -> image; loss = L2 reconstruction + KL. For sampling, report 000 clustered the
# training images' latents with K-means (k = 1000), drew latents around a random cluster's centre
# with that cluster's spread, decoded them, and "recycled" each output back through encoder and
# decoder (3 passes). We do the same after training, on the EMA copy; the clusters travel in the
# checkpoint. Report 000's other mode, transforming an existing training image, is left out on
# purpose: the competition forbids submitting altered training images.
import torch
import torch.nn.functional as F
from torch import nn

from dogkit.core.models.common import adam, backward_step

CVAE_SETTINGS = dict(lr_g=1e-3, beta1=0.9, beta2=0.999, batch_size=64, z_dim=128, width=32,
                     augment="flip", kl_weight=1.0, clusters=1000, recycle=3, lr_decay_start=0.3)


class ConvVAE(nn.Module):
    """Encoder + decoder; forward(z) samples: z picks a cluster (via its first value) and the
    offset from the cluster's centre, then the output is recycled through the VAE."""

    def __init__(self, z_dim=128, width=32, clusters=1000, recycle=3):
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            nn.Conv2d(3, w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 8 * w, 4, 2, 1), nn.LeakyReLU(0.2), nn.Flatten(),
        )
        self.to_stats = nn.Linear(8 * w * 16, 2 * z_dim)
        self.from_z = nn.Linear(z_dim, 8 * w * 16)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(8 * w, 4 * w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(w, 3, 4, 2, 1), nn.Tanh(),
        )
        self.w, self.recycle = w, recycle
        # until fit_clusters runs: one cluster at 0 with unit spread, i.e. the plain prior
        self.register_buffer("centers", torch.zeros(clusters, z_dim))
        self.register_buffer("spreads", torch.ones(clusters, z_dim))
        self.register_buffer("n_fitted", torch.zeros((), dtype=torch.long))

    def encode(self, x):
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z):
        return self.decoder(self.from_z(z).view(-1, 8 * self.w, 4, 4))

    def forward(self, z, labels=None):
        k = max(int(self.n_fitted), 1)
        u = 0.5 * (1 + torch.erf(z[:, 0] / 2 ** 0.5))  # N(0, 1) -> U(0, 1): which cluster
        idx = (u * k).long().clamp(max=k - 1)
        x = self.decode(self.centers[idx] + self.spreads[idx] * z)
        for _ in range(self.recycle if int(self.n_fitted) else 0):
            x = self.decode(self.encode(x)[0])
        return x

    @torch.no_grad()
    def fit_clusters(self, images, batch=500, iters=20, seed=0):
        """K-means (Lloyd) on the latent means of the training images; per-cluster spread."""
        mus = torch.cat([self.encode(images[i:i + batch])[0] for i in range(0, len(images), batch)])
        k = min(self.centers.shape[0], len(mus))
        gen = torch.Generator().manual_seed(seed)
        centers = mus[torch.randperm(len(mus), generator=gen)[:k].to(mus.device)].clone()
        for _ in range(iters):
            assign = torch.cdist(mus, centers).argmin(dim=1)
            counts = torch.bincount(assign, minlength=k).clamp(min=1).unsqueeze(1).to(mus.dtype)
            centers = torch.zeros_like(centers).index_add_(0, assign, mus) / counts
        sq = torch.zeros_like(centers).index_add_(0, assign, (mus - centers[assign]) ** 2) / counts
        self.centers[:k] = centers
        self.spreads[:k] = sq.sqrt().clamp(min=1e-3)
        self.n_fitted.fill_(k)
        return k


class CVAE:
    name = "cvae"
    conditional = False

    def __init__(self, cfg, n_classes, device):
        self.cfg = cfg
        self.G = ConvVAE(cfg.z_dim, cfg.width, cfg.clusters, cfg.recycle).to(device)
        self.D = None  # no adversary
        self.opt_g = adam(self.G, cfg.lr_g, cfg)
        self.opt_d = None

    def step(self, batch):
        real, _ = batch()
        mu, logvar = self.G.encode(real)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = self.G.decode(z)
        loss_rec = F.mse_loss(recon, real, reduction="sum") / len(real)
        loss_kl = -0.5 * torch.sum(1 + logvar - mu ** 2 - logvar.exp()) / len(real)
        loss = loss_rec + self.cfg.kl_weight * loss_kl
        self.opt_g.zero_grad(set_to_none=False)
        backward_step(self.opt_g, loss)
        return {"loss_rec": loss_rec.detach(), "loss_kl": loss_kl.detach()}

    def before_sampling(self, G, images):
        """Fit the K-means clusters of the training latents on the generator used for sampling."""
        G.fit_clusters(images)
