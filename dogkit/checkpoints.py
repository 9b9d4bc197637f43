"""Reading checkpoints back (tooling layer: uses the registry, which kernels never import)."""
import torch

from dogkit.core.registry import get
from dogkit.core.train import TrainConfig, pick_device


def load_generator(path, device="auto"):
    """The EMA generator of a checkpoint, ready to sample: (G, config dict, n_classes)."""
    device = pick_device(device)
    ckpt = torch.load(path, map_location=device, weights_only=False)
    entry = get(ckpt["model"])
    cfg = TrainConfig(**ckpt["config"])
    model = entry.cls(cfg, ckpt["n_classes"], device)
    model.G.load_state_dict(ckpt["G_ema"])
    return model.G.eval(), ckpt["config"], ckpt["n_classes"]
