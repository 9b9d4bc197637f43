# ---------------------------------------------------------------------------------------------
# Model building blocks shared by the models
# ---------------------------------------------------------------------------------------------
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def adam(module, lr, cfg, device):
    """Adam whose learning rate is a tensor on CUDA, so a captured CUDA graph sees schedule changes."""
    on_cuda = torch.device(device).type == "cuda"
    lr = torch.tensor(lr, device=device) if on_cuda else lr
    return torch.optim.Adam(module.parameters(), lr=lr, betas=(cfg.beta1, cfg.beta2), capturable=on_cuda)


def nadam(module, lr, cfg, device):
    """NAdam (Adam with Nesterov momentum), tensor learning rate on CUDA like `adam`."""
    on_cuda = torch.device(device).type == "cuda"
    lr = torch.tensor(lr, device=device) if on_cuda else lr
    return torch.optim.NAdam(module.parameters(), lr=lr, betas=(cfg.beta1, cfg.beta2), capturable=on_cuda)


def dcgan_init(m):
    """DCGAN's initialisation: N(0, 0.02) convolutions, N(1, 0.02) batch-norm scales."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def sn_conv(cin, cout, k=3):
    return spectral_norm(nn.Conv2d(cin, cout, k, 1, k // 2))


def sn_linear(cin, cout, bias=True):
    return spectral_norm(nn.Linear(cin, cout, bias=bias))


class SelfAttention(nn.Module):
    """SAGAN's self-attention (keys and values pooled 2x), gated by gamma that starts at 0."""

    def __init__(self, ch):
        super().__init__()
        self.theta = sn_conv(ch, ch // 8, 1)
        self.phi = sn_conv(ch, ch // 8, 1)
        self.g = sn_conv(ch, ch // 2, 1)
        self.out = sn_conv(ch // 2, ch, 1)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        n, c, h, w = x.shape
        theta = self.theta(x).view(n, c // 8, h * w)
        phi = F.max_pool2d(self.phi(x), 2).view(n, c // 8, h * w // 4)
        g = F.max_pool2d(self.g(x), 2).view(n, c // 2, h * w // 4)
        attn = torch.softmax(torch.bmm(theta.transpose(1, 2), phi), dim=-1)
        o = torch.bmm(g, attn.transpose(1, 2)).view(n, c // 2, h, w)
        return x + self.gamma * self.out(o)
