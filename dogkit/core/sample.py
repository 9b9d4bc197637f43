# ---------------------------------------------------------------------------------------------
# Sampling: truncated z, PNGs written straight into images.zip, sample grids
# ---------------------------------------------------------------------------------------------
import io
import math
import os
import struct
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from dogkit.core.data import atomic_path

N_SUBMISSION = 10_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRUNCATION_MIN = 0.04  # the smallest truncation BigGAN's sweep used; redrawing for a smaller one would not end
TRUNCATION_MAX = 100.0  # z beyond +-100 never occurs: any larger one is the plain normal by another name


class OutOfTime(RuntimeError):
    """Work that would pass its deadline stops at the next batch instead."""


def check_deadline(deadline, clock, what):
    if deadline is not None and clock() > deadline:
        raise OutOfTime(f"{what} passed the run's deadline")


def truncation_problem(truncation):
    """Why a value cannot be a sampling truncation, or None.

    0 or None (none: the plain normal), or a number from TRUNCATION_MIN to TRUNCATION_MAX. The one
    check of every sampling path (the kernel's settings and end, dogkit sample, the sweep, the GPU
    queue)."""
    t = truncation
    if t is None or (not isinstance(t, bool) and isinstance(t, (int, float)) and (
            t == 0 or (math.isfinite(t) and TRUNCATION_MIN <= t <= TRUNCATION_MAX))):
        return None
    return (f"truncation {t!r}: give 0 (none) or a number from {TRUNCATION_MIN} to {TRUNCATION_MAX:g} (a smaller "
            f"one keeps almost no z value and would never finish redrawing)")


def parse_truncations(text):
    """'0.8,1,0' -> [0.8, 1.0, 0.0] (0: none), each checked by truncation_problem; every value
    that is not one is listed in one ValueError."""
    values, problems = [], []
    for part in filter(None, str(text).replace(" ", "").split(",")):
        try:
            values.append(float(part))
        except ValueError:
            problems.append(f"{part!r} is not a number")
            continue
        problems += [truncation_problem(values[-1])] if truncation_problem(values[-1]) else []
    if problems or not values:
        raise ValueError(f"truncations {text!r}: " + ("; ".join(problems) or "give one or more, e.g. 0.8,1,0 (0: none)"))
    return values


def truncated_normal(shape, threshold=None, generator=None, device="cpu"):
    """z ~ N(0, 1) with every value beyond +-threshold redrawn until none is (the 'truncation
    trick' of BigGAN: resampling, not clipping). threshold None or 0: the plain normal."""
    z = torch.randn(shape, generator=generator)
    if truncation_problem(threshold):
        raise ValueError(truncation_problem(threshold))
    if threshold:
        bad = z.abs() > threshold
        while bad.any():
            z[bad] = torch.randn(int(bad.sum()), generator=generator)
            bad = z.abs() > threshold
    return z.to(device)


def balanced_labels(n, n_classes, generator=None):
    """n labels covering every class equally (shuffled): class-balanced conditional sampling."""
    labels = torch.arange(n) % max(n_classes, 1)
    return labels[torch.randperm(n, generator=generator)]


def to_uint8(images):
    """Generator output in [-1, 1], NCHW -> NHWC uint8 numpy."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate(G, n, z_dim, truncation=None, n_classes=0, batch_size=None, seed=0, device="cpu",
             deadline=None, clock=time.monotonic, part=(0, 1)):
    """n uint8 images from G (eval mode), truncated z, class-balanced breeds. z is drawn up front:
    the same seed gives the same images whatever the batch size; part=(k, m), the k-th of m slices
    (one per rank); past the deadline, OutOfTime between batches."""
    gen = torch.Generator().manual_seed(seed)
    labels = balanced_labels(n, n_classes, gen) if n_classes else None
    z_all = truncated_normal((n, z_dim), truncation, gen)
    batch_size = batch_size or (500 if torch.device(device).type == "cuda" else 50)
    was_training = G.training
    G.eval()
    lo, hi = part[0] * n // part[1], (part[0] + 1) * n // part[1]
    out = []
    for start in range(lo, hi, batch_size):
        check_deadline(deadline, clock, "sampling")
        stop = min(start + batch_size, hi)
        z = z_all[start:stop].to(device)
        y = labels[start:stop].to(device) if labels is not None else None
        out.append(to_uint8(G(z, y)))
    G.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 64, 64, 3), np.uint8)


def encode_png(pixels):
    """PNG bytes of one HWC uint8 RGB image.

    PNG bytes of one HWC uint8 image (RGB: Pillow reads the mode off the array; naming it is
    deprecated from Pillow 11.3)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def encode_pngs(images, workers=8, deadline=None, clock=time.monotonic):
    """PNG bytes of HWC uint8 images, encoded in threads.

    PNG bytes of HWC uint8 images (zlib releases the GIL: threads), in chunks of 1,000 with a
    deadline check between them."""
    blobs = []
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(images), 1000):
            check_deadline(deadline, clock, "PNG encoding")
            blobs += pool.map(encode_png, images[start:start + 1000])
    return blobs


def write_zip(images, path, workers=8, deadline=None, clock=time.monotonic):
    """Write HWC uint8 images as 00000.png ... into one flat zip, atomically.

    Nothing is replaced and nothing half-written is left when it fails or runs out of time."""
    path = str(path)
    blobs = encode_pngs(images, workers, deadline, clock)
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for i, blob in enumerate(blobs):
                zf.writestr(f"{i:05d}.png", blob)
    return path


def png_header(data):
    """(width, height, bit depth, colour type) from a PNG's IHDR, or None if not a PNG."""
    if len(data) < 33 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">IIBB", data[16:26])


def verify_zip(path, n=N_SUBMISSION, size=64):
    """Quick self-check of a written images.zip: count, flat names, 64x64 RGB 8-bit PNG headers."""
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if len(infos) != n:
            raise RuntimeError(f"{path}: {len(infos)} entries, expected {n}")
        for info in infos:
            head = zf.open(info).read(33)
            if "/" in info.filename or png_header(head) != (size, size, 8, 2):
                raise RuntimeError(f"{path}: {info.filename} is not a flat {size}x{size} RGB 8-bit PNG")
    return True


NOTEBOOK_PID = os.getpid()  # the process that ran this code: in a notebook, the Jupyter kernel itself


def notebook_shell():
    """The Jupyter kernel's IPython shell when this process is the notebook's own, else None.

    The Jupyter kernel's IPython shell when this process is the notebook's own (Kaggle runs
    kernels so), else None: a script, a terminal IPython or a forked rank (whose messages would
    corrupt the kernel's channel) shows no pictures."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and os.getpid() == NOTEBOOK_PID else None
    return shell if getattr(shell, "kernel", None) is not None else None


def show_png(png):
    """Show a PNG (bytes or a file) in the notebook's output; a script run does nothing and never
    imports IPython."""
    if notebook_shell() is not None:
        from IPython.display import Image as Picture, display
        display(Picture(data=png) if isinstance(png, bytes) else Picture(filename=png))


def save_grid(images, path, nrow=8):
    """A grid PNG of NHWC uint8 images (2 px gaps)."""
    n, h, w, c = images.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    grid = np.full((rows * (h + 2) + 2, ncol * (w + 2) + 2, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + k * (w + 2):2 + k * (w + 2) + w] = images[i]
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, "PNG")
