"""Reading checkpoints back (tooling layer: uses the registry, which kernels never import)."""
import torch

from dogkit.core.registry import get
from dogkit.core.sample import generate, save_grid, write_zip
from dogkit.core.train import ema_generator, pick_device


def load_generator(path, device="auto"):
    """The EMA generator of a checkpoint, ready to sample: (G, config dict, n_classes). A checkpoint
    written mid-run (periodic, snapshot, interrupt) gets its batch-norm statistics re-estimated
    first, as the run's end would have done (the VAE's sampling clusters need the data: final only)."""
    device = pick_device(device)
    ckpt = torch.load(path, map_location=device, weights_only=False)
    G, _ = ema_generator(ckpt, get(ckpt["model"]).cls, device)
    if device.type == "cpu":  # oneDNN's NHWC convolutions: biggan samples 1.8x faster on 2 cores
        G = G.to(memory_format=torch.channels_last)
    return G, ckpt["config"], ckpt["n_classes"]


def sample_to_zip(generator, out, truncation=None, seed=0, n=10_000, grid=None):
    """Sample a loaded generator (load_generator's (G, config, n_classes)) into a zip of PNGs:
    z redrawn beyond +-truncation (0 or None: the plain normal), class-balanced breeds, the same
    images for the same seed whatever the device's batch size; `grid`: also a PNG of the first 64.
    The one sampling path of `dogkit sample`, the truncation sweep and the GPU bench."""
    G, cfg, n_classes = generator
    images = generate(G, n, cfg["z_dim"], truncation or None, n_classes, seed=seed,
                      device=next(G.parameters()).device)
    if grid:
        save_grid(images[:64], grid)
    return write_zip(images, out)
