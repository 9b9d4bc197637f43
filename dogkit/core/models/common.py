# ---------------------------------------------------------------------------------------------
# Model building blocks shared by the models
# ---------------------------------------------------------------------------------------------
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class ModelContract:
    """What a model class gives the trainer, checkpoints and tools, and nothing else is assumed.
    A model need not inherit from this class; the registry checks the contract when it registers
    a class (contract_problems) and a test builds every registered model (instance_problems).

    Class attributes:
        name: the registry name, written into checkpoints ("dcgan").
        conditional: True when G and D take breed labels (G(z, labels)); the trainer then passes
            the data's breeds and samples them class-balanced.
    The settings a model reads beyond every model's are named in settings.SETTINGS (its models
    column; DIFFAUG_MODELS for "+diffaug"); setting one for a model not named there is an error.
    __init__(cfg, n_classes, device): builds everything on device from a TrainConfig.
    Instance attributes after __init__:
        G: the generator, an nn.Module called as G(z, labels) (labels None when unconditional),
            returning images in [-1, 1], NCHW, 64x64; its EMA copy is what is sampled.
        D: the discriminator (nn.Module), or None for a model without an adversary.
        opt_g, opt_d: their optimisers (opt_d None exactly when D is None); the trainer sets their
            learning rates every step (the schedule).
    step(batch): one training step; batch() returns (images in [-1, 1], labels) and may be called
        more than once; updates go through backward_step(opt, loss) (fp16 loss scaling) or call
        loss.backward(); opt.step() (several GPUs average either way: the trainer's opt.step); returns
        a dict of detached 0-d tensors to log, the losses named loss_* (read at log lines only:
        no host sync per step).
    Optional: before_sampling(G, images): what sampling needs beyond the weights, run on the
        generator to be sampled (cvae fits its K-means clusters of the training latents).
    """


def contract_problems(cls):
    """The ways a model class breaks ModelContract (checked on the class, without building it)."""
    import inspect

    problems = []
    if not isinstance(getattr(cls, "name", None), str):
        problems.append("class attribute `name` (str) missing")
    if not isinstance(getattr(cls, "conditional", None), bool):
        problems.append("class attribute `conditional` (bool) missing")
    if not callable(getattr(cls, "step", None)):
        problems.append("method step(batch) missing")
    elif list(inspect.signature(cls.step).parameters) != ["self", "batch"]:
        problems.append("step must take exactly (self, batch)")
    if list(inspect.signature(cls.__init__).parameters) != ["self", "cfg", "n_classes", "device"]:
        problems.append("__init__ must take exactly (self, cfg, n_classes, device)")
    if hasattr(cls, "before_sampling") and list(inspect.signature(cls.before_sampling).parameters) != [
            "self", "G", "images"]:
        problems.append("before_sampling must take exactly (self, G, images)")
    return problems


def instance_problems(model):
    """The ways a built model breaks ModelContract."""
    problems = []
    if not isinstance(getattr(model, "G", None), nn.Module):
        problems.append("G is not an nn.Module")
    if getattr(model, "D", None) is not None and not isinstance(model.D, nn.Module):
        problems.append("D is neither an nn.Module nor None")
    if not isinstance(getattr(model, "opt_g", None), torch.optim.Optimizer):
        problems.append("opt_g is not a torch optimiser")
    opt_d = getattr(model, "opt_d", None)
    if (opt_d is None) != (getattr(model, "D", None) is None):
        problems.append("opt_d must be None exactly when D is None")
    elif opt_d is not None and not isinstance(opt_d, torch.optim.Optimizer):
        problems.append("opt_d is not a torch optimiser")
    return problems


def adam(module, lr, cfg):
    """Adam over a module's parameters with the settings' betas."""
    return torch.optim.Adam(module.parameters(), lr=lr, betas=(cfg.beta1, cfg.beta2))


def nadam(module, lr, cfg):
    """NAdam (Adam with Nesterov momentum) with the settings' betas."""
    return torch.optim.NAdam(module.parameters(), lr=lr, betas=(cfg.beta1, cfg.beta2))


def backward_step(opt, loss):
    """loss.backward() then opt.step(), which a step may as well call itself (with several GPUs
    opt.step averages the gradients first). Under fp16 through opt.grad_scaler: the gradients are
    averaged before it looks for an inf, so every rank skips the same steps."""
    scaler = getattr(opt, "grad_scaler", None)
    if scaler is None:
        loss.backward()
        opt.step()
        return
    scaler.scale(loss).backward()
    forget = opt.average_now() if hasattr(opt, "average_now") else None  # several ranks
    scaler.step(opt)  # skipped on an inf: then the next step must average its own gradients
    scaler.update()
    if forget:
        forget()


def lecam_penalty(state, d_real, d_fake, decay=0.99, start=1000):
    """LeCam regularisation as published (Tseng et al. 2021; their ema_losses): relu(D(real) -
    ema_fake)^2 + relu(ema_real - D(fake))^2. `state` [ema_real, ema_fake, updates] is updated in
    place; for the first `start` updates the penalty is 0 (StudioGAN's lecam_ema_start_iter)."""
    with torch.no_grad():
        state[2] += 1
        on = (state[2] > start).float()
        d = on * decay
        state[:2].mul_(d).add_(torch.stack([d_real.mean(), d_fake.mean()]).float() * (1 - d))
    return on * (F.relu(d_real - state[1]).pow(2).mean() + F.relu(state[0] - d_fake).pow(2).mean())


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
        self.k, self.v = max(1, ch // 8), max(1, ch // 2)  # at least one channel: tiny test widths
        self.theta = sn_conv(ch, self.k, 1)
        self.phi = sn_conv(ch, self.k, 1)
        self.g = sn_conv(ch, self.v, 1)
        self.out = sn_conv(self.v, ch, 1)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        n, c, h, w = x.shape
        theta = self.theta(x).view(n, self.k, h * w)
        phi = F.max_pool2d(self.phi(x), 2).view(n, self.k, h * w // 4)
        g = F.max_pool2d(self.g(x), 2).view(n, self.v, h * w // 4)
        attn = torch.softmax(torch.bmm(theta.transpose(1, 2), phi), dim=-1)
        o = torch.bmm(g, attn.transpose(1, 2)).view(n, self.v, h, w)
        return x + self.gamma * self.out(o)
