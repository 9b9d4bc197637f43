# ---------------------------------------------------------------------------------------------
# Augmentation: batched on the training device (no per-image Python, no host round trips).
# ---------------------------------------------------------------------------------------------
import math

import torch
import torch.nn.functional as F


def to_float(batch_uint8):
    """NCHW uint8 on the device -> float in [-1, 1]."""
    return batch_uint8.float().div_(127.5).sub_(1.0)


def random_resized_crop_flip(x, out_size, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3), flip=True):
    """torchvision's RandomResizedCrop + RandomHorizontalFlip for a whole batch, one grid_sample
    (the crop clamped into the image where torchvision would retry)."""
    n = x.shape[0]
    dev = x.device
    area = torch.empty(n, device=dev).uniform_(*scale)
    log_r = torch.empty(n, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # fraction of the width
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, device=dev) * 2 - 1) * (1 - w)  # centre in [-1, 1] keeping the crop inside
    cy = (torch.rand(n, device=dev) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0) if flip else torch.ones(n, device=dev)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, (n, x.shape[1], out_size, out_size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


DIFFAUG_POLICIES = {"diffaug": "color,translation,cutout", "diffaug-tc": "translation,cutout",
                    "diffaug-t": "translation"}  # the augment setting's DiffAugment part -> its policy


def diffaug_policy(augment):
    """The DiffAugment policy of an augment setting: "flip+diffaug-tc" -> "translation,cutout"; "" for none."""
    return DIFFAUG_POLICIES.get(augment.split("+")[-1], "")


def diff_augment(x, policy="color,translation,cutout"):
    """DiffAugment (Zhao et al. 2020): differentiable, on real and fake alike; "" leaves x as it is."""
    for p in policy.split(","):
        if p == "color":
            n = x.shape[0]
            x = x + (torch.rand(n, 1, 1, 1, device=x.device) - 0.5)
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device) * 2) + mean
            mean = x.mean(dim=[1, 2, 3], keepdim=True)
            x = (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device) + 0.5) + mean
        elif p == "translation":
            x = _translate(x, 0.125)
        elif p == "cutout":
            x = _cutout(x, 0.5)
        elif p:
            raise ValueError(f"unknown DiffAugment policy {p!r}")
    return x


def _translate(x, ratio):
    n, _, h, w = x.shape
    sx, sy = int(w * ratio + 0.5), int(h * ratio + 0.5)
    tx = torch.randint(-sx, sx + 1, (n, 1, 1), device=x.device)
    ty = torch.randint(-sy, sy + 1, (n, 1, 1), device=x.device)
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    gx = torch.clamp(gx.unsqueeze(0) + tx + 1, 0, w + 1)
    gy = torch.clamp(gy.unsqueeze(0) + ty + 1, 0, h + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    idx = (gy * (w + 2) + gx).view(n, 1, h * w).expand(-1, x.shape[1], -1)
    return padded.flatten(2).gather(2, idx).view_as(x)


def _cutout(x, ratio):
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=x.device)
    ox = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=x.device)
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    gy, gx = gy.unsqueeze(0), gx.unsqueeze(0)
    hole = ((gy >= oy - ch // 2) & (gy < oy - ch // 2 + ch) &
            (gx >= ox - cw // 2) & (gx < ox - cw // 2 + cw))
    return x * (~hole).unsqueeze(1).to(x.dtype)
