"""Reading checkpoints back (tooling layer: uses the registry, which kernels never import).

Two kinds of file hold a generator:
- a run's `checkpoint.pt` / `snapshot-p*.pt` (dogkit-checkpoint-2): the whole training state;
- a generator file (dogkit-generator-1, `export_generator`): the EMA generator alone in fp16 with
  standing batch-norm statistics, its config and where in the run it was taken. A biggan G is
  17 MB in it (a checkpoint: 40+ MB), what the GPU bench brings back.
Both hold only tensors, numbers, strings, lists and dicts and are read as data only
(torch.load(weights_only=True)): a file from elsewhere never runs code here.

Batch-norm statistics to sample with (BN_STATS; biggan and dcgan's generators have batch norm):
"standing" (the default, what the kernels do: re-estimated from fresh samples once training is
over), "running" (the running averages training kept: BigGAN-PyTorch's "eval mode") or "batch"
(each sampling batch's own statistics, batches of the training batch size: the images then
depend on that batch size). BigGAN-PyTorch reported, on ImageNet, EMA with batch statistics
18.8 against eval mode 20.9: which is best for our short runs is a measurement (the GPU queue).
"""
import os

import torch

from dogkit.core.registry import get
from dogkit.core.data import atomic_path
from dogkit.core.sample import generate, save_grid, write_zip
from dogkit.core.runtime import RunError
from dogkit.core.train import CHECKPOINT_FORMAT, batchnorms, ema_generator, pick_device, read_checkpoint

GENERATOR_FORMAT = "dogkit-generator-1"
BN_STATS = ("standing", "running", "batch")
READABLE = (CHECKPOINT_FORMAT, GENERATOR_FORMAT)  # what load_generator and export_generator take
RUN_FIELDS = ("step", "images_seen", "elapsed", "train_seconds")


def load_generator(path, device="auto", bn="standing"):
    """The EMA generator of a checkpoint or generator file, ready to sample: (G, config dict,
    n_classes). bn: the batch-norm statistics (BN_STATS; a generator file has those it was
    exported with). With "standing", a checkpoint written mid-run (periodic, snapshot, interrupt)
    gets them re-estimated first, as the run's end would have done (the VAE's sampling clusters
    need the data: final only)."""
    device = pick_device(device)
    ckpt = read_checkpoint(path, device, READABLE)
    try:  # a file in the format whose contents do not fit its model: one line naming it
        if ckpt["format"] == GENERATOR_FORMAT:
            G, _ = ema_generator(ckpt, get(ckpt["model"]).cls, device)
            G = with_bn_stats(G, ckpt.get("bn_stats", "standing"))
        else:
            G = checkpoint_generator(ckpt, device, bn=bn)
        config, n_classes = dict(ckpt["config"]), int(ckpt["n_classes"])
    except (KeyError, TypeError, RuntimeError, AttributeError, IndexError) as exc:  # a bad bn stays a ValueError
        raise RunError(f"{path}: a {ckpt['format']} file whose contents do not fit its model "
                       f"({type(exc).__name__}: {str(exc).strip()[:160]})") from None
    if device.type == "cpu":  # oneDNN's NHWC convolutions: biggan samples 1.8x faster on 2 cores
        G = G.to(memory_format=torch.channels_last)
    return G, config, n_classes


def checkpoint_generator(ckpt, device, which=None, bn="standing"):
    """The EMA generator of a loaded checkpoint (or its extra EMA copy `which`) with the batch-norm
    statistics bn (BN_STATS): "standing" as the kernel's end makes them; "running" and "batch"
    with the running averages of training (G's buffers: G_ema's copy G's at every step)."""
    cls = get(ckpt["model"]).cls
    if bn == "standing":
        G, _ = ema_generator(ckpt, cls, device, which)
    else:
        weights = ckpt["G_ema"] if which is None else ckpt["G_ema_extra"][which]
        G, _ = ema_generator(dict(ckpt, G_ema=weights, bn_refreshed=True), cls, device)  # as trained: no refresh
        G.load_state_dict({**G.state_dict(), **{name: ckpt["G"][name] for name, _ in G.named_buffers()}})
    return with_bn_stats(G, bn)  # checks bn


def with_bn_stats(G, bn):
    """G marked with its batch-norm statistics (G.bn_stats, read by sample_images); "batch": its
    batch norms lose their running averages, so that even in eval mode they normalise with the
    batch's own statistics (torch's rule for a batch norm without running statistics)."""
    if bn not in BN_STATS:
        raise ValueError(f"bn {bn!r}: choose from {', '.join(BN_STATS)}")
    if bn == "batch":
        for m in batchnorms(G):
            m.running_mean = m.running_var = m.num_batches_tracked = None
            m.track_running_stats = False
    G.bn_stats = bn
    return G


def export_generator(checkpoint, out, device="cpu", which=None, bn="standing", **extra):
    """Write the sampled generator of `checkpoint` (its EMA G, or with `which` its extra EMA copy
    of that index) with the batch-norm statistics bn (checkpoint_generator) as a
    dogkit-generator-1 file in fp16; `extra` (strings and numbers) is stored beside it. Returns
    the dict written."""
    device = pick_device(device)
    ckpt = read_checkpoint(checkpoint, device, (CHECKPOINT_FORMAT,))
    G = checkpoint_generator(ckpt, device, which, "running" if bn == "batch" else bn)  # batch: stripped on loading
    state = {k: (v.detach().half() if v.is_floating_point() else v.detach()).cpu().contiguous()
             for k, v in G.state_dict().items()}
    gen = {"format": GENERATOR_FORMAT, "model": ckpt["model"], "config": ckpt["config"],
           "n_classes": ckpt["n_classes"], "breeds": list(ckpt.get("breeds") or []), "G_ema": state,
           "bn_refreshed": True, "bn_stats": bn, **{k: ckpt.get(k) for k in RUN_FIELDS}, **extra}
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
    """The images sample_to_zip writes, as an (n, 64, 64, 3) uint8 array (a generator with batch
    statistics samples in batches of its training batch size, on any device)."""
    G, cfg, n_classes = generator
    batch = cfg["batch_size"] if getattr(G, "bn_stats", "standing") == "batch" else None
    return generate(G, n, cfg["z_dim"], truncation, n_classes, batch_size=batch, seed=seed,
                    device=next(G.parameters()).device)
