"""Reading checkpoints back (tooling layer: uses the registry, which kernels never import).

Two kinds of file hold a generator:
- a run's `checkpoint.pt` / `snapshot-p*.pt` (dogkit-checkpoint-2): the whole training state;
- a generator file (dogkit-generator-1, `export_generator`): the EMA generator alone in fp16 with
  standing batch-norm statistics, its config and where in the run it was taken. A biggan G is
  17 MB in it (a checkpoint: 40+ MB), what the GPU bench brings back.
Both hold only tensors, numbers, strings, lists and dicts and are read as data only
(torch.load(weights_only=True)): a file from elsewhere never runs code here.
"""
import os

import torch

from dogkit.core.registry import get
from dogkit.core.sample import atomic_path, generate, save_grid, write_zip
from dogkit.core.train import CHECKPOINT_FORMAT, ema_generator, pick_device, read_checkpoint

GENERATOR_FORMAT = "dogkit-generator-1"
READABLE = (CHECKPOINT_FORMAT, GENERATOR_FORMAT)  # what load_generator and export_generator take
RUN_FIELDS = ("step", "images_seen", "elapsed", "train_seconds")


def load_generator(path, device="auto"):
    """The EMA generator of a checkpoint or generator file, ready to sample: (G, config dict,
    n_classes). A checkpoint written mid-run (periodic, snapshot, interrupt) gets its batch-norm
    statistics re-estimated first, as the run's end would have done (the VAE's sampling clusters
    need the data: final only)."""
    device = pick_device(device)
    ckpt = read_checkpoint(path, device, READABLE)
    G, _ = ema_generator(ckpt, get(ckpt["model"]).cls, device)
    if device.type == "cpu":  # oneDNN's NHWC convolutions: biggan samples 1.8x faster on 2 cores
        G = G.to(memory_format=torch.channels_last)
    return G, ckpt["config"], ckpt["n_classes"]


def export_generator(checkpoint, out, device="cpu", which=None, **extra):
    """Write the sampled generator of `checkpoint` (its EMA G, or with `which` its extra EMA copy
    of that index; batch-norm statistics re-estimated when taken mid-run) as a dogkit-generator-1
    file in fp16; `extra` (strings and numbers) is stored beside it. Returns the dict written."""
    device = pick_device(device)
    ckpt = read_checkpoint(checkpoint, device, READABLE)
    G, _ = ema_generator(ckpt, get(ckpt["model"]).cls, device, which)
    state = {k: (v.detach().half() if v.is_floating_point() else v.detach()).cpu().contiguous()
             for k, v in G.state_dict().items()}
    gen = {"format": GENERATOR_FORMAT, "model": ckpt["model"], "config": ckpt["config"],
           "n_classes": ckpt["n_classes"], "breeds": list(ckpt.get("breeds") or []), "G_ema": state,
           "bn_refreshed": True, **{k: ckpt.get(k) for k in RUN_FIELDS}, **extra}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save(gen, tmp)
    return gen


def sample_to_zip(generator, out, truncation=None, seed=0, n=10_000, grid=None):
    """Sample a loaded generator (load_generator's (G, config, n_classes)) into a zip of PNGs:
    z redrawn beyond +-truncation (0 or None: the plain normal), class-balanced breeds, the same
    images for the same seed whatever the device's batch size; `grid`: also a PNG of the first 64.
    The one sampling path of `dogkit sample`, the truncation sweep and the GPU bench."""
    images = sample_images(generator, truncation, seed, n)
    if grid:
        save_grid(images[:64], grid)
    return write_zip(images, out)


def sample_images(generator, truncation=None, seed=0, n=10_000):
    """The images sample_to_zip writes, as an (n, 64, 64, 3) uint8 array."""
    G, cfg, n_classes = generator
    return generate(G, n, cfg["z_dim"], truncation or None, n_classes, seed=seed,
                    device=next(G.parameters()).device)
