#!/usr/bin/env python
"""Generative Dog Images: cvae (report 000's convolutional VAE, sampled from K-means clusters with recycling).

On Kaggle: attach the competition data, run all; the kernel cleans the photos (one crop per
annotated dog), trains within Kaggle's limit minus 15 minutes, samples 10,000 dogs from the EMA
generator and writes /kaggle/working/images.zip.

Locally, with any budget (PATH: Kaggle/Stanford layout, breed folders, a flat folder, or a cache
written by `dogkit clean-data`):

    python kernels/cvae.py --data PATH --budget 8m --out submission/

Everything is a function of the wall clock, so the same file adapts to any GPU (or the CPU);
with several GPUs (Kaggle's T4 x2) it trains on all of them, one process each (--gpus 1: one).
Edit it as you like: the settings below (each with its source), the model class CVAE and its
step (loss.backward(); opt.step() written by hand still averages over several GPUs). To bring an
edit back into dogkit, copy the changed code into dogkit/core (the model: dogkit/core/models/) and
run `python tools/build_kernel.py --model cvae`, which wrote this file from dogkit 0.1.0.

Contents (line numbers):
     75  Settings
     94  Model
    193  Model building blocks shared by the models
    218  Augmentation
    248  Recipe
    416  The training loop
    475  MACHINERY (below: nothing to read to change the model)
    482  Data
   1054  Several GPUs
   1232  The machine
   1393  Sampling
   1487  Settings
   1625  Training
   2434  Entry point
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import difflib
import fcntl
import hashlib
import io
import json
import math
import multiprocessing
import os
import platform
import random
import re
import signal
import socket
import stat
import struct
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import PIL
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import features, Image, ImageFile
from torch import nn


# ---------------------------------------------------------------------------------------------
# Settings: the model's hyper-parameters (any setting of SETTINGS below can go here)
# ---------------------------------------------------------------------------------------------
CVAE_SETTINGS = dict(lr_g=1e-3, beta1=0.9, beta2=0.999, batch_size=64, z_dim=128, width=32,
                     augment="flip", kl_weight=1.0, clusters=1000, recycle=3, lr_decay_start=0.3)
# Also read by cvae, at their defaults (add any above, or --lr-final 0.1 style; ranges: SETTINGS):
#   lr_final=0.1      the learning rate at the end, a multiple of the start's
#   ema_start=0.25    p where the EMA of G starts (before: G_ema follows G)
#   ema_decay=0.999   EMA decay per batch_size images (a step of N GPUs decays by its N-th power)
#   ema_fraction=0.0  > 0: the EMA's half-life as this fraction of the images the run will show (set from its pace), instead of ema_decay; from ema_start
#   ema_rampup=0.05   extra EMA copies: a half-life at most this fraction of the images seen
#   truncation=0.0    redraw z values beyond +-T for the final images (0: none, -1: from the passes the run will make)

# Kaggle sessions this run is planned over, each within the time limit. 1: one kernel run, the
# competition's rule. N > 1: each session writes images.zip and checkpoint.pt; the next, run with this
# notebook's output attached (Add Input -> Your Work), continues it; the last anneals the learning rate.
KAGGLE_SESSIONS = 1


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


# ---------------------------------------------------------------------------------------------
# Model building blocks shared by the models
# ---------------------------------------------------------------------------------------------

def adam(module, lr, cfg):
    """Adam over a module's parameters with the settings' betas."""
    return torch.optim.Adam(module.parameters(), lr=lr, betas=(cfg.beta1, cfg.beta2))

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


# ---------------------------------------------------------------------------------------------
# Augmentation: batched on the training device (no per-image Python, no host round trips).
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Recipe: the schedule, the EMA, the settings that follow the plan, one training step, sampling
# ---------------------------------------------------------------------------------------------

def lr_multiplier(p, cfg):
    if p <= cfg.lr_decay_start:
        return 1.0
    t = min(1.0, (p - cfg.lr_decay_start) / max(1e-9, 1.0 - cfg.lr_decay_start))
    return cfg.lr_final + (1.0 - cfg.lr_final) * 0.5 * (1.0 + math.cos(math.pi * t))

def ema_weight(p, cfg, world_size=1):
    """Weight of the new parameters in the EMA update: 1 (a plain copy) until ema_start, then
    1 - ema_decay per batch_size images (a step of N GPUs decays by its N-th power: the average
    spans the same images on one GPU or two)."""
    return 1.0 if p < cfg.ema_start else 1.0 - cfg.ema_decay ** world_size

def half_life_weight(kimg, cfg, images_seen, world_size=1):
    """The extra EMA copies' rule (StyleGAN2-ADA's): the new parameters' weight for a half-life of
    kimg thousand images, at most cfg.ema_rampup of the images seen so far."""
    half_life = min(kimg * 1000.0, cfg.ema_rampup * images_seen)
    return 1.0 - 0.5 ** (cfg.batch_size * world_size / max(half_life, 1e-8))

class Ema:
    """The EMA of G: G_ema (sampled) and extra copies kept for evaluation (ema_extra); their weights."""

    def __init__(self, G, cfg):
        self.G = ema_copy(G)
        self.kimg = parse_ema_extra(cfg.ema_extra)
        self.extra = [ema_copy(G) for _ in self.kimg]
        self.w = [1.0] * (1 + len(self.kimg))

    def copies(self):
        return [self.G] + self.extra

    def set_weights(self, p, cfg, images_seen, world_size=1):
        """Each copy's weight of the new parameters at progress p (G_ema's: ema_weight)."""
        self.w = [ema_weight(p, cfg, world_size)]
        self.w += [half_life_weight(kimg, cfg, images_seen, world_size) for kimg in self.kimg]

    @torch.no_grad()
    def update(self, G):
        """Every copy a step toward G by its weight."""
        for G_ema, w in zip(self.copies(), self.w):
            for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                p_ema.lerp_(p, w)
            for b_ema, b in zip(G_ema.buffers(), G.buffers()):
                b_ema.copy_(b)

    def state(self):
        """The checkpoint's EMA entries."""
        return {"G_ema": self.G.state_dict(), "G_ema_extra": [G.state_dict() for G in self.extra],
                "ema_extra_w": self.w[1:], "ema_w": self.w[0]}

    def load(self, ckpt, log=print):
        """The EMA of a checkpoint; extra copies it does not hold as this run has them start afresh."""
        self.G.load_state_dict(ckpt["G_ema"])
        extra = ckpt.get("G_ema_extra") or []
        if len(extra) == len(self.extra):
            for G, state in zip(self.extra, extra):
                G.load_state_dict(state)
            self.w[1:] = list(ckpt.get("ema_extra_w") or self.w[1:])
        else:
            log(f"extra EMA copies start afresh: the checkpoint has {len(extra)}, this run {len(self.extra)}")
        self.w[0] = ckpt["ema_w"]

# The best truncation measured at a number of passes over the photos (log-linear between, held beyond):
# 75 passes, biggan's 8-minute H100 sweep: 1.5 (MiFID 82.70, 87.36 at 1; the ledger's "sweep" rows);
# 300 passes, the CPU proxies (120 crops; README, Models): 0.8 best or tied with 1 on 8 of 9 arm-seeds
# (1 ahead on one), 1.5 and none behind. The winners' 9-hour runs (~700 passes) sampled at 0.8 and 1.0.
TRUNCATION_BY_PASSES = ((75.0, 1.5), (300.0, 0.8))

def truncation_for_passes(passes, points=TRUNCATION_BY_PASSES):
    """The sampling truncation for `passes` over the photos, from TRUNCATION_BY_PASSES."""
    (x0, t0), (x1, t1) = points[0], points[-1]
    if passes <= x0:
        return t0
    if passes >= x1:
        return t1
    return round(t0 + (t1 - t0) * math.log(passes / x0) / math.log(x1 / x0), 2)

def from_plan(cfg, planned_images, n_photos):
    """The settings a run leaves to its plan, from the images it will show: ema_decay for a half-life
    of ema_fraction of them, truncation from the passes (truncation_for_passes)."""
    out = {}
    if cfg.ema_fraction > 0:
        half_life = max(cfg.ema_fraction * planned_images, float(cfg.batch_size))
        out["ema_decay"] = 0.5 ** (cfg.batch_size / half_life)
    if cfg.truncation == TRUNCATION_FROM_PLAN:
        out["truncation"] = truncation_for_passes(planned_images / max(n_photos, 1))
    return out

def set_schedule(tr, p):
    """The learning rates and the EMA weights at progress p."""
    scale = lr_multiplier(p, tr.cfg) * tr.safety.lr_scale
    for opt, base in ((tr.model.opt_g, tr.cfg.lr_g), (tr.model.opt_d, tr.cfg.lr_d)):
        for group in (opt.param_groups if opt is not None else ()):
            group["lr"] = base * scale
    if tr.given.ema_fraction > 0 and tr.planned is None and p >= tr.cfg.ema_start and tr.images_seen and p > 0:
        follow_plan(tr, tr.images_seen / p, f"estimated at p={p:.2f}, before the pace")  # ema_start before REPLAN_AT
    tr.ema.set_weights(p, tr.cfg, tr.images_seen, tr.world.size)

def draw_batch(tr):
    cfg = tr.cfg
    idx = torch.randint(0, tr.images.shape[0], (cfg.batch_size,), device=tr.device)
    x = to_float(tr.images[idx])
    if "crop" in cfg.augment:
        x = random_resized_crop_flip(x, 64)
    elif "flip" in cfg.augment:
        x = torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
    if x.shape[-1] != 64:
        x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    if tr.cfg.memory_format == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, tr.labels[idx]

def train_step(tr):
    # bf16/fp16 autocast around the whole step (weights, optimiser state and the EMA stay fp32); no
    # weight cache: the step updates D, then uses it for G's loss (a cached copy would be stale).
    with torch.autocast(tr.device.type, dtype=tr.amp_dtype or torch.bfloat16,
                        enabled=tr.amp_dtype is not None, cache_enabled=False):
        drawn = []  # the model draws as many batches as it needs (wgan-gp: one per critic step)
        losses = tr.model.step(lambda: drawn.append(1) or draw_batch(tr))
    tr.batches_per_step = len(drawn)
    tr.ema.update(tr.model.G)  # G_ema (and any extra copies) a step toward G
    with torch.no_grad():
        if tr.loss_sum is None:
            tr.loss_sum = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in losses.items()}
        for k, v in losses.items():
            tr.loss_sum[k] += v.float()
    return losses

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


# ---------------------------------------------------------------------------------------------
# The training loop: one function, top to bottom (nanoGPT's train.py is the model)
# ---------------------------------------------------------------------------------------------

def train_loop(tr):
    """The training loop, top to bottom: the clock (rank 0's) says whether to stop; the schedule for
    progress p; one step (batch, D, G, EMA); then, when due, a log line (a NaN rolls back), a grid,
    a checkpoint and an interim images.zip. Returns None, or why it stopped early."""
    cfg, main = tr.cfg, tr.world.main
    start = tr.plan.t0 - tr.plan.session_start  # elapsed counts every session's time
    now, _ = agree(tr.world, tr.clock())
    last_log = last_grid = last_ckpt = last_zip = now
    steps_at_log = tr.step
    snapshots = [x for x in parse_snapshots(cfg.snapshots) if x > progress(tr)]
    first = budget_start(tr)
    warm = tr.plan.elapsed - first >= REPLAN_AT * (tr.plan.session_end - first)  # past it: resumed
    since = (now - start, tr.images_seen)  # the pace is timed from here
    while True:
        now, failed = agree(tr.world, tr.clock())
        if failed:
            return f"rank {failed - 1} stopped at step {tr.step} (its error is above)"
        tr.plan.tick(now - start)
        if tr.plan.elapsed >= tr.plan.session_end or (cfg.steps and tr.step >= cfg.steps):
            break
        if not warm and tr.plan.elapsed - first >= REPLAN_AT * (tr.plan.session_end - first):
            warm = once_warm(tr, since)  # the end timed again, the pace, the settings that follow it
        p = progress(tr)
        set_schedule(tr, p)  # learning rates and EMA weight at progress p

        train_step(tr)  # a real batch, D's update, G's update, the EMA
        count_step(tr)
        if tr.safety.good is None:
            keep_good_state(tr)  # the first good state: what a rollback returns to

        if now - last_log >= cfg.log_every:
            if log_interval(tr, p, tr.step - steps_at_log, now - last_log):
                keep_good_state(tr)
            elif tr.safety.rollbacks >= cfg.max_rollbacks:
                return f"NaN storm: {tr.safety.rollbacks} rollbacks at step {tr.step}"
            steps_at_log, last_log = tr.step, now
        if main and now - last_grid >= tr.grid_every:
            progress_grid(tr)
            last_grid = now
        if now - last_ckpt >= cfg.checkpoint_every:
            checkpoint_together(tr)
            last_ckpt = now
        if snapshots and p >= snapshots[0]:
            checkpoint_together(tr, f"snapshot-p{snapshots.pop(0):g}.pt")
        if now - last_zip >= cfg.zip_every and tr.plan.session_end - tr.plan.elapsed > cfg.zip_every / 4:
            if main:
                interim_zip(tr)
            last_zip = now
        for hook in tr.hooks:  # last: a rank failing here meets the others at the next agree()
            hook(tr)
    if tr.step > steps_at_log:
        log_interval(tr, progress(tr), tr.step - steps_at_log, now - last_log)
    return None


# =============================================================================================
# MACHINERY. Everything below keeps a 9-hour run alive: data cleaning, the machine checks, several
# GPUs, sampling and the zip, checkpoints, the time plan, the end and the entry point. Nothing below
# needs reading to change the settings, the model or the recipe; its docstrings are in dogkit/core.
# =============================================================================================


# ---------------------------------------------------------------------------------------------
# Data: raw dog photos -> one crop per annotated dog -> a compact cache file.
# ---------------------------------------------------------------------------------------------
# Inputs: the Kaggle / Stanford layout (photos in all-dogs/ or Images/<synset>-<breed>/, boxes in
# Annotation/), pre-cropped <synset>-<breed>/ folders, or a flat folder / zip. Crop strategies: box (as
# is, squashed), square (the box's shorter side), aspect (report 001: boxes of aspect 0.8-1.25, squashed),
# pad (grown by a margin to a square, shifted inside the photo, the rest reflect-padded; the default).

STRATEGIES = ("box", "square", "aspect", "pad")
CROP_SIZES = (64, 80, 96, 128)
MAX_MARGIN = 1.0  # 'pad' grows a box by at most its own size
DEFAULT_STRATEGY = "pad"
PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SYNSET = re.compile(r"^(n\d{8})")
CACHE_FORMAT = "dogkit-cache-1"

class DataError(ValueError):
    """Bad input that --strict (or an unusable source) makes fatal; names file and rule."""

def _number(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return int(value) if math.isfinite(value) and abs(value) < 1e9 else None

def parse_annotation(xml_bytes, name="annotation"):
    try:
        root = ET.fromstring(xml_bytes)
    except ET.ParseError as exc:
        raise DataError(f"{name}: malformed XML ({exc})") from None
    width, height = _number(root.findtext("size/width")), _number(root.findtext("size/height"))
    boxes = []
    for obj in root.iter("object"):
        coords = [_number(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
        if None in coords:
            raise DataError(f"{name}: an <object> lacks a numeric <bndbox>")
        boxes.append(tuple(coords))
    return width, height, boxes, (root.findtext("filename") or "").strip() or None

def clamp_box(box, width, height):
    x0, y0, x1, y1 = box
    x0, y0 = max(0, min(x0, width)), max(0, min(y0, height))
    x1, y1 = max(0, min(x1, width)), max(0, min(y1, height))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1

def unusable_box(box, width, height):
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:
        return "box with min and max swapped"
    if x1 == x0 or y1 == y0:
        return "zero-area box"
    return "box outside the photo"

def crop_region(box, width, height, strategy, margin=0.1, aspect_range=(0.8, 1.25)):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if strategy == "box":
        return box
    if strategy == "aspect":
        return box if aspect_range[0] <= w / h <= aspect_range[1] else None
    if strategy == "square":
        s = min(w, h)
        left = x0 + (w - s) // 2
        top = y0 + (h - s) // 2
        return left, top, left + s, top + s
    if strategy == "pad":
        s = int(round(max(w, h) * (1 + margin)))
        left = x0 + (w - s) // 2
        top = y0 + (h - s) // 2
        # shift inside the photo where it fits; what still falls outside is reflect-padded
        left = min(max(left, 0), width - s) if s <= width else (width - s) // 2
        top = min(max(top, 0), height - s) if s <= height else (height - s) // 2
        return left, top, left + s, top + s
    raise ValueError(f"unknown crop strategy {strategy!r}; choose from {STRATEGIES}")

def cut(pixels, region):
    left, top, right, bottom = region
    height, width = pixels.shape[:2]
    pad = (max(0, -top), max(0, bottom - height), max(0, -left), max(0, right - width))
    if any(pad):
        mode = "reflect" if min(height, width) > 1 else "edge"
        # reflection of a thin photo may need several passes
        while any(pad):
            step = [min(p, dim - 1) if mode == "reflect" else p
                    for p, dim in zip(pad, (height, height, width, width))]
            pixels = np.pad(pixels, ((step[0], step[1]), (step[2], step[3]), (0, 0)), mode=mode)
            left, right, top, bottom = left + step[2], right + step[2], top + step[0], bottom + step[0]
            height, width = pixels.shape[:2]
            pad = (max(0, -top), max(0, bottom - height), max(0, -left), max(0, right - width))
    return pixels[top:bottom, left:right]

def resize(pixels, size):
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.LANCZOS))

# ---- reading files: one way in ----------------------------------------------------------------

def shown_name(name):
    text = os.fsencode(name).decode("utf-8", "backslashreplace") if isinstance(name, str) else str(name)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)

def read_file(path, cap, name=None):
    name = shown_name(name or path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens without waiting
    except OSError as exc:
        raise DataError(f"{name}: cannot be opened ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > cap:
            raise DataError(f"{name}: " + (f"{info.st_size} bytes (limit {cap})" if stat.S_ISREG(info.st_mode)
                                           else "not a regular file (a FIFO, device or socket is never read)"))
        data = fh.read(cap + 1)
    if len(data) > cap:
        raise DataError(f"{name}: grew past {cap} bytes while read")
    return data

_OPEN_ZIPS = {}

def open_zip(path):
    try:
        st = os.stat(path)
        key = (os.getpid(), os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in _OPEN_ZIPS:
            if len(_OPEN_ZIPS) >= 4:
                _OPEN_ZIPS.clear()
            _OPEN_ZIPS[key] = zipfile.ZipFile(path)
        return _OPEN_ZIPS[key]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DataError(f"{shown_name(path)}: not a readable zip ({exc})") from None

# ---- writing files: one way out ---------------------------------------------------------------

TEMP_MARK = ".dogkit-tmp"  # in the name of every file being written, until it is renamed into place

class WriteError(OSError):
    """An output the disk would not take (full, read-only), in one line naming the path."""

@contextlib.contextmanager
def atomic_path(path):
    folder, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{stem}{TEMP_MARK}{os.getpid()}{ext}")
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_temps(folder, name)
        yield tmp
        os.replace(tmp, path)
    except WriteError:  # said already (a nested write)
        raise
    except OSError as exc:
        raise WriteError(f"{path}: {(exc.strerror or str(exc)).lower()} (nothing written: the earlier file, if any, "
                         f"is as it was)") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)

def remove_stale_temps(folder, of=None):
    gone = []
    stem, ext = os.path.splitext(of or "")
    pattern = (re.escape(f".{stem}{TEMP_MARK}") + r"(\d+)" + re.escape(ext) if of else
               r".*" + re.escape(TEMP_MARK) + r"(\d+).*")
    for name in (os.listdir(folder) if os.path.isdir(folder) else ()):
        pid = re.fullmatch(pattern, name)
        if pid and not process_alive(int(pid.group(1))):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
                gone.append(name)
    return gone

def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: alive
        return True
    return True

# ---- finding the inputs ----------------------------------------------------------------------

def breed_of(folder_name):
    m = re.match(r"^(n\d{8})-(.+)$", folder_name)
    return (m.group(1), m.group(2)) if m else None

def _find_dir(root, name):
    for dirpath, dirnames, _ in os.walk(root):
        if name in dirnames:
            return os.path.join(dirpath, name)
    return None

def _zip_items(source):
    members = sorted(n for n in open_zip(source).namelist()
                     if n.lower().endswith(PHOTO_EXTS) and not n.startswith("__MACOSX"))
    return [{"name": shown_name(m), "zip": source, "member": m, "synset": _synset(m), "xml": None} for m in members]

def _folder_items(source, ann_dir):
    photos = []
    for dirpath, _, files in os.walk(source):
        if ann_dir and os.path.abspath(dirpath).startswith(os.path.abspath(ann_dir)):
            continue
        photos += [os.path.join(dirpath, f) for f in files if f.lower().endswith(PHOTO_EXTS)]
    photos.sort()
    folders = {breed_of(os.path.basename(os.path.dirname(p))) for p in photos}
    if ann_dir:
        layout = "Kaggle/Stanford layout with annotations"
    elif photos and None not in folders:
        layout = "pre-cropped breed folders"
    else:
        layout = "flat folder of images"
    items = []
    for p in photos:
        folder = breed_of(os.path.basename(os.path.dirname(p)))
        items.append({"name": shown_name(os.path.relpath(p, source)), "path": p,
                      "synset": folder[0] if folder else _synset(os.path.basename(p)), "xml": None})
    return layout, items

def _annotation_index(ann):
    if os.path.isfile(ann) and zipfile.is_zipfile(ann):
        return {os.path.splitext(os.path.basename(m))[0]: (ann, m) for m in open_zip(ann).namelist()
                if not m.endswith("/") and not m.startswith("__MACOSX")}
    return {os.path.splitext(f)[0]: os.path.join(dirpath, f) for dirpath, _, files in os.walk(ann) for f in files}

def _xml_folder(xml):
    return os.path.basename(os.path.dirname(xml[1] if isinstance(xml, tuple) else xml))

def _xml_name(xml):
    return shown_name(f"{xml[0]}:{xml[1]}" if isinstance(xml, tuple) else xml)

def _attach_annotations(items, index):
    used = set()
    for it in items:
        stem = os.path.splitext(os.path.basename(it.get("path") or it["member"]))[0]
        it["xml"] = index.get(stem)
        if it["xml"]:
            used.add(stem)
            folder = breed_of(_xml_folder(it["xml"]))
            if folder:
                it["synset"] = folder[0]
    return len(set(index) - used)

def discover(source, annotations=None):
    notes, index = Counter(), {}
    if os.path.isfile(source) and zipfile.is_zipfile(source):
        layout, items = "zip of images", _zip_items(source)
    elif os.path.isdir(source):
        annotations = annotations or _find_dir(source, "Annotation")
        layout, items = _folder_items(source, annotations if annotations and os.path.isdir(annotations) else None)
    elif not os.path.lexists(source):
        raise DataError(f"{source}: does not exist")
    else:
        raise DataError(f"{source}: not a folder or a zip of images")
    if not items:
        raise DataError(f"{source}: no photos found ({', '.join(PHOTO_EXTS)})")
    if annotations:  # a folder or a zip (the competition's Annotation.zip), read in place
        index = _annotation_index(annotations)
        layout = "Kaggle/Stanford layout with annotations"
        notes["annotation without photo"] = _attach_annotations(items, index)
    base = Counter(os.path.basename(it["name"]) for it in items)
    notes["same file name in two folders"] = sum(c - 1 for c in base.values() if c > 1)
    names = {}
    for xml in index.values():
        b = breed_of(_xml_folder(xml))
        if b:
            names[b[0]] = b[1]
    for it in items:
        b = breed_of(os.path.basename(os.path.dirname(it["path"]))) if it.get("path") else None
        if b:
            names[b[0]] = b[1]
    synsets = sorted({it["synset"] for it in items if it["synset"]})
    breeds = [f"{s}-{names.get(s, s)}" for s in synsets] or ["unknown"]
    index = {s: i for i, s in enumerate(synsets)}
    for it in items:
        it["label"] = index.get(it["synset"], 0)
    return layout, items, breeds, notes

def _synset(name):
    m = SYNSET.match(os.path.basename(name))
    return m.group(1) if m else None

# ---- cleaning ----------------------------------------------------------------------------------

# Zips from anywhere: stored and deflated entries only (others may inflate without bound), no encryption,
# never more than a cap per entry whatever the header claims. The scorer reads submissions the same way.
ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
MAX_PHOTO_BYTES = 64 << 20  # a photo file larger than this is refused (Stanford Dogs' largest: ~2 MB)

def zip_entry_problem(info, cap):
    if info.flag_bits & 0x1:
        return "encrypted entry (cannot be read)"
    if info.compress_type not in ZIP_METHODS:
        return f"compression method {info.compress_type} (only stored and deflated entries are read)"
    if info.file_size > cap:
        return f"claims {info.file_size} bytes uncompressed (limit {cap})"
    return None

def read_zip_entry(zf, info, cap):
    problem = zip_entry_problem(info, cap)
    if problem:
        raise DataError(f"{shown_name(info.filename)}: {problem}")
    try:
        with zf.open(info) as fh:
            data = fh.read(cap + 1)
    except zipfile.BadZipFile as exc:  # a CRC error, a bad local header
        raise DataError(f"{shown_name(info.filename)}: corrupt entry ({exc})") from None
    except Exception as exc:  # a truncated or damaged stream (EOFError, zlib.error, OSError, ...)
        raise DataError(f"{shown_name(info.filename)}: unreadable entry ({type(exc).__name__}: {exc})") from None
    if len(data) > cap:
        raise DataError(f"{shown_name(info.filename)}: inflates past {cap} bytes (its header says {info.file_size})")
    return data

MAX_XML_BYTES = 1 << 20  # an annotation file larger than this is refused (Stanford's: under 1 KB)

def _read_xml(xml):
    if isinstance(xml, tuple):
        zf = open_zip(xml[0])
        return read_zip_entry(zf, zf.getinfo(xml[1]), MAX_XML_BYTES)
    return read_file(xml, MAX_XML_BYTES)

def _read_photo(item):
    if item.get("zip"):
        zf = open_zip(item["zip"])
        return read_zip_entry(zf, zf.getinfo(item["member"]), MAX_PHOTO_BYTES)
    return read_file(item["path"], MAX_PHOTO_BYTES, item["name"])

def decode_rgb(data, name, events):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # past MAX_IMAGE_PIXELS: refused
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode != "RGB":
                events.append((f"converted from {img.mode}", name))
                if img.mode.startswith("I"):  # 16-bit greyscale (I;16, or I as PNGs open): PIL's RGB would clip
                    grey = np.asarray(img).astype(np.float64) * (255.0 / 65535.0)  # at 255: rescale the 16 bits
                    return np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    img = img.convert("RGBA")
                    background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                    img = Image.alpha_composite(background, img)
                img = img.convert("RGB")
            return np.asarray(img)

def process_photo(item, strategy, size, min_side, margin):
    events = []
    name = item["name"]
    try:
        data = _read_photo(item)
    except DataError as exc:  # a FIFO, a device, a broken link, an oversized file or zip entry
        return [], [("unreadable file or zip entry", str(exc))], 0
    try:
        pixels = decode_rgb(data, name, events)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return [], [(f"image over PIL's {Image.MAX_IMAGE_PIXELS} pixel limit (decompression bomb)",
                     f"{name} ({exc})")], 0
    except Exception as exc:
        return [], [("corrupt or truncated image", f"{name} ({type(exc).__name__})")], 0
    height, width = pixels.shape[:2]
    boxes, n_boxes = [(0, 0, width, height)], 0
    if item["xml"]:
        try:
            *size_given, found, named = parse_annotation(_read_xml(item["xml"]), _xml_name(item["xml"]))
        except Exception as exc:  # any bad XML costs this photo its boxes, never the run
            size_given, found, named = None, [], None
            events.append(("malformed annotation: whole photo used", f"{name} ({exc})"))
        other = annotation_problem(name, named, size_given, (width, height))
        if other:  # its boxes are another photo's: no crop of this one can be trusted
            return [], events + [(other, f"{name} (its annotation: {named}, {size_given})")], 0
        if size_given and None not in size_given and tuple(size_given) != (width, height):
            events.append(("annotation's <size> is not the photo's: boxes used as given", name))
        if len(found) > MAX_BOXES:
            events.append((f"more than {MAX_BOXES} boxes: the first {MAX_BOXES} used", name))
        boxes, n_boxes = (found[:MAX_BOXES], len(found)) if found else (boxes, 0)
        if not found and size_given is not None:
            events.append(("annotation without box: whole photo used", name))
    elif "annotations" in item:
        events.append(("photo without annotation: whole photo used", name))
    crops = []
    for k, box in enumerate(boxes):
        clamped = clamp_box(box, width, height)
        if clamped is None:
            events.append((unusable_box(box, width, height), f"{name} #{k}"))
            continue
        if clamped != tuple(box):
            events.append(("box clamped to the photo", f"{name} #{k}"))
        if min(clamped[2] - clamped[0], clamped[3] - clamped[1]) < min_side:
            events.append((f"box smaller than {min_side} px", f"{name} #{k}"))
            continue
        # a photo without boxes (pre-cropped, or unannotated) is used whole, as it is
        region = crop_region(clamped, width, height, strategy if item["xml"] else "box", margin)
        if region is None:
            events.append(("aspect ratio outside [0.8, 1.25]", f"{name} #{k}"))
            continue
        crops.append((resize(np.ascontiguousarray(cut(pixels, region)), size), k))
    return crops, events, n_boxes

MAX_BOXES = 64  # boxes used of one photo (Stanford's most: a handful): one photo never floods the data

def annotation_problem(name, named, size_given, size):
    if not named or os.path.splitext(os.path.basename(named))[0] == os.path.splitext(os.path.basename(name))[0]:
        return None
    if not size_given or None in size_given or tuple(size_given) == tuple(size):
        return None
    return "annotation names another photo: photo skipped"

def map_chunks(fn, jobs, workers, done=lambda result: None):
    results = []
    if workers > 1 and len(jobs) > 1:
        fork = "fork" in multiprocessing.get_all_start_methods()
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork") if fork else None) as pool:
            for r in pool.map(fn, jobs):
                results.append(r)
                done(r)
    else:
        for job in jobs:
            results.append(fn(job))
            done(results[-1])
    return results

def _process_chunk(args):
    chunk, strategy, size, min_side, margin = args
    return [process_photo(it, strategy, size, min_side, margin) for it in chunk]

def clean(source, annotations=None, size=64, strategy=DEFAULT_STRATEGY, min_side=32, margin=0.1,
          workers=None, progress=False, log=print):
    problems = [f"unknown crop strategy {strategy!r}; choose from {STRATEGIES}"] if strategy not in STRATEGIES else []
    problems += [f"size {size}: choose from {CROP_SIZES}"] if size not in CROP_SIZES else []
    problems += [f"margin {margin}: give a fraction from 0 to {MAX_MARGIN}"] if not 0 <= margin <= MAX_MARGIN else []
    problems += [f"min_side {min_side}: give 1 or more pixels"] if not 1 <= min_side < 1 << 20 else []
    if problems:
        raise DataError("; ".join(problems))
    t0 = time.time()
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    layout, items, breeds, notes = discover(source, annotations)
    has_annotations = any(it["xml"] for it in items)
    if has_annotations:
        for it in items:
            it["annotations"] = True
    log(f"found: {layout}, {len(items)} photos, {len(breeds)} breeds")
    workers = workers or os.cpu_count() or 1
    chunks = [items[i:i + 64] for i in range(0, len(items), 64)]
    jobs = [(c, strategy, size, min_side, margin) for c in chunks]
    bar = _progress(len(items), progress)
    results = [r for part in map_chunks(_process_chunk, jobs, workers, lambda part: bar(len(part))) for r in part]
    images, labels, names, seen = [], [], [], set()
    events = []
    n_boxes = 0
    for it, (crops, evs, boxes) in zip(items, results):
        events += evs
        n_boxes += boxes
        for pixels, k in crops:
            digest = hashlib.sha1(pixels.tobytes()).digest()
            if digest in seen:
                events.append(("exact duplicate removed", f"{it['name']} #{k}"))
                continue
            seen.add(digest)
            images.append(pixels)
            labels.append(it["label"])
            names.append(f"{it['name']}#{k}" if k else it["name"])
    counts = Counter(reason for reason, _ in events)
    for reason, n in notes.items():
        if n:
            counts[reason] += n
    examples = {}
    for reason, what in events:
        examples.setdefault(reason, what)
    summary = {"layout": layout, "photos": len(items), "boxes": n_boxes, "crops": len(images),
               "breeds": len(breeds),
               "events": dict(counts), "examples": examples, "seconds": round(time.time() - t0, 1)}
    settings = {"source": os.path.abspath(source), "strategy": strategy, "size": size,
                "min_side": min_side, "margin": margin}
    if not images:
        raise DataError(f"{source}: no usable crops ({dict(counts)})")
    return {"images": np.stack(images), "labels": np.asarray(labels, dtype=np.int16),
            "names": names, "breeds": breeds, "summary": summary, "settings": settings,
            "events": events}

def summary_lines(summary):
    if not summary:
        return []
    lines = [f"input      {summary.get('layout')}",
             f"photos     {summary.get('photos')}" + (f"  ({summary['boxes']} annotated boxes)" if summary.get("boxes") else ""),
             f"crops      {summary.get('crops')}  ({summary.get('breeds')} breeds)"]
    for reason, n in sorted(summary.get("events", {}).items()):
        lines.append(f"  {reason:45s} {n:6d}   e.g. {summary['examples'].get(reason, '')}")
    return lines

def _progress(total, enabled, every=0.1):
    state = {"done": 0, "shown": 0.0, "t0": time.time()}

    def update(n):
        state["done"] += n
        frac = state["done"] / max(total, 1)
        if enabled and (frac - state["shown"] >= every or state["done"] == total):
            state["shown"] = frac
            print(f"  cleaned {state['done']}/{total} photos ({time.time() - state['t0']:.0f} s)", flush=True)
    return update

def codec_available(codec):
    # Pillow before 11.3 does not know the feature and warns; a Pillow that knows it says yes or no
    return codec != "avif" or "avif" in features.get_supported_modules() and features.check_module("avif")

def is_cache(path):
    return os.path.isfile(path) and path.endswith(".npz")

def cache_problems(z, meta):
    offsets, labels, breeds, shape = z["offsets"], z["labels"], meta.get("breeds"), meta.get("shape")
    ok_breeds = isinstance(breeds, list) and breeds and all(isinstance(b, str) for b in breeds)
    ok_offsets = offsets.ndim == 1 and offsets.dtype.kind in "iu" and len(offsets) >= 2
    checks = [(ok_breeds, "breeds must be a non-empty list of names"),
              (shape in [[n, n, 3] for n in CROP_SIZES], f"image shape {shape!r}: must be [S, S, 3], S in {CROP_SIZES}"),
              (ok_offsets, "offsets must be at least 2 integers (one image or more)"),
              (not ok_offsets or offsets[0] == 0 and (np.diff(offsets) > 0).all() and offsets[-1] == z["blob"].size,
               "offsets must rise from 0 to the blob's length"),
              (labels.ndim == 1 and labels.dtype.kind in "iu" and len(labels) == len(offsets) - 1,
               "labels must be one integer per image"),
              (not ok_breeds or not len(labels) or 0 <= labels.min() and labels.max() < len(breeds),
               "labels must each name a breed")]
    return [message for ok, message in checks if not ok]

def load_cache(path):
    name = shown_name(path)
    try:
        z = np.load(path)
        meta = json.loads(str(z["meta"]))
        arrays = {k: z[k] for k in ("blob", "offsets", "labels")}
        names = (z["names_utf8"].tobytes().decode("utf-8", "replace").split("\n") if "names_utf8" in z.files
                 else [str(n) for n in z["names"]] if "names" in z.files else [])
    except Exception as exc:
        raise DataError(f"{name}: not a dogkit cache file ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise DataError(f"{name}: cache format {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                        f"expected {CACHE_FORMAT}")
    problems = cache_problems(arrays, meta)
    if problems:
        raise DataError(f"{name}: not a valid dogkit cache: " + "; ".join(problems))
    codec = str(meta.get("codec", "webp")).split()[0]
    if not codec_available(codec):
        raise DataError(f"{name}: images stored as {codec}, which this Pillow cannot decode "
                        "(Pillow >= 11.3 reads AVIF; or rebuild the cache with --codec webp)")
    blob, offsets, shape = arrays["blob"].tobytes(), arrays["offsets"], tuple(meta["shape"])
    images = np.empty((len(offsets) - 1, *shape), dtype=np.uint8)

    def decode(i):
        try:
            with Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]])) as img:
                if img.size != shape[:2][::-1]:
                    raise ValueError(f"{img.size[0]}x{img.size[1]}, the cache says {shape[1]}x{shape[0]}")
                images[i] = np.asarray(img.convert("RGB"))
        except Exception as exc:
            raise DataError(f"{name}: image {i} of the cache is corrupt ({type(exc).__name__}: {exc})") from None

    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:  # decoders release the GIL
        list(pool.map(decode, range(len(images))))
    if len(names) != len(images):  # names are never needed to train: a mismatch forgets them
        names = [f"#{i}" for i in range(len(images))]
    return {"images": images, "labels": arrays["labels"].astype(np.int64), "names": names,
            "breeds": meta["breeds"], "meta": meta}

def load_dataset(path, size=64, strategy=DEFAULT_STRATEGY, annotations=None, log=print, progress=False):
    if is_cache(path):
        data = load_cache(path)
        data["summary"] = data["meta"].get("summary") or {}
        log(f"data: {path} ({len(data['images'])} crops, {len(data['breeds'])} breeds, cache)")
        return data
    data = clean(path, annotations=annotations, size=size, strategy=strategy, log=log, progress=progress)
    log(f"data: {path} cleaned to {len(data['images'])} crops in {data['summary']['seconds']} s")
    return data


# ---------------------------------------------------------------------------------------------
# Several GPUs: one process per GPU, torch.distributed (NCCL between GPUs, gloo on the CPU)
# ---------------------------------------------------------------------------------------------
# The kernel forks one process per GPU (a notebook's functions cannot be imported by a spawned one;
# GPUs are counted through NVML, as CUDA would not survive a fork); `dogkit train` runs under
# torchrun. Each optimiser's step averages the gradients first (average_in_step), however a model's
# step calls it, so every rank's G, D and EMA stay identical; each rank draws its own batches (the
# global batch: per-GPU batch x ranks). A gloo group carries rank 0's clock, which decides every
# stop, log line and checkpoint, and any rank's failure. Rank 0 writes every file. torch <= 2.2 APIs.

STEP_TIMEOUT = datetime.timedelta(minutes=5)  # a collective of the training step: a lost rank
CONTROL_TIMEOUT = datetime.timedelta(minutes=60)  # rank 0 alone: cleaning, interim zips, the end

class World:
    def __init__(self, rank=0, size=1, control=None):
        self.rank, self.size, self.control = rank, size, control

    @property
    def main(self):
        return self.rank == 0

ALONE = World()

def visible_gpus():
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    return torch.cuda.device_count() if torch.cuda.is_available() else 0

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def join_world(rank, size, device, port=None):
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # a collective that times out (a lost peer) aborts this process instead of hanging it:
        # the parent then samples the last checkpoint
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    init = f"tcp://127.0.0.1:{port}" if port else "env://"
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init, rank=rank,
                            world_size=size, timeout=STEP_TIMEOUT)
    return World(rank, size, dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT))

def leave_world(world):
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()

def agree(world, now, failed=False):
    if world.size == 1:
        return now, int(failed)
    msg = torch.tensor([now if world.main else -1e300, world.rank + 1.0 if failed else 0.0], dtype=torch.float64)
    dist.all_reduce(msg, op=dist.ReduceOp.MAX, group=world.control)
    return float(msg[0]), int(msg[1])

def average_gradients(params, world):
    grads = [p.grad for p in params if p.grad is not None]
    if world.size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()

def average_in_step(opt, world):
    params = [p for group in opt.param_groups for p in group["params"]]
    step, done = opt.step, [False]

    def average_now():
        average_gradients(params, world)
        done[0] = True
        return lambda: done.__setitem__(0, False)

    def averaged_step(*args, **kwargs):
        if not done[0]:
            average_gradients(params, world)
        done[0] = False
        return step(*args, **kwargs)

    opt.step, opt.average_now = averaged_step, average_now

def all_mean(tensors, world):
    if world.size == 1 or not tensors:
        return tensors
    flat = torch.stack([t.float() for t in tensors])
    dist.all_reduce(flat)
    return list(flat / world.size)

def broadcast_state(modules, world):
    if world.size == 1:
        return
    with torch.no_grad():
        for module in modules:
            for t in module.state_dict().values():
                dist.broadcast(t, 0)

def share_object(obj, world):
    if world.size == 1:
        return obj
    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0, group=world.control)
    return box[0]

def on_main(fn, world):
    if world.size == 1:
        return fn()
    result = failed = None
    if world.main:
        try:
            result = fn()
        except BaseException as exc:
            failed = exc
    ok, result = share_object((failed is None, result), world)
    if failed is not None:
        raise failed
    if not ok:
        raise RankStopped("rank 0 stopped")
    return result

def gather_objects(obj, world):
    if world.size == 1:
        return [obj]
    out = [None] * world.size if world.main else None
    dist.gather_object(obj, out, dst=0, group=world.control)
    return out

def all_objects(obj, world):
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj, group=world.control)
    return out

class RankStopped(RuntimeError):
    """This rank stops because another one failed (that rank reports why)."""

def launch(target, size, device_type, args):
    ctx = torch.multiprocessing.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(target, rank, size, port, device_type, args))
             for rank in range(size)]
    for p in procs:
        p.start()
    try:
        procs[0].join()
        for p in procs[1:]:
            p.join(60)
    finally:
        stop_processes(procs)
    return [p.exitcode for p in procs]

def plain_streams():
    for name, fd in (("stdout", 1), ("stderr", 2)):
        if not isinstance(getattr(sys, name), io.TextIOWrapper):
            setattr(sys, name, os.fdopen(fd, "w", buffering=1, closefd=False))

def stop_processes(procs, grace=60):
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.terminate()
    for p in alive:
        p.join(grace)
        if p.is_alive():
            p.kill()
            p.join()

def _rank_main(target, rank, size, port, device_type, args):
    plain_streams()
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    world = join_world(rank, size, device, port)
    code = target(world, device, *args)
    if code == 0:  # after a failure a peer may be gone: no teardown handshake, just exit
        leave_world(world)
    raise SystemExit(code)


# ---------------------------------------------------------------------------------------------
# The machine: which device and precision really run, a start-of-run report, scratch space
# ---------------------------------------------------------------------------------------------
# Checked in the first seconds, before the data is cleaned (nobody watches a 9-hour run): a GPU this
# torch cannot run stops the run with one line naming it and the fix. torch <= 2.2 APIs only.

PRECISIONS = ("fp32", "bf16", "fp16")

class RunError(RuntimeError):
    """A run that cannot start or go on; str() is one line naming the cause and the fix."""

def arch_supported(capability, arch_list):
    major, minor = capability
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit():
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False

def pick_device(name="auto", require_gpu=False):
    if name in ("", "auto", None):
        if not torch.cuda.is_available():
            if require_gpu:
                raise RunError("no GPU: this notebook runs without an accelerator. In the notebook's Settings, "
                               "Accelerator: pick 'GPU T4 x2' (not 'GPU P100': today's image cannot run it), then "
                               "run all again; --device cpu trains on the CPU anyway (far too slow to be worth a "
                               "submission)")
            return torch.device("cpu")
        name = "cuda"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise RunError(f"--device {name}: torch {torch.__version__} sees no CUDA GPU here; use --device cpu")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gpu = torch.cuda.get_device_name(device)
    cap = torch.cuda.get_device_capability(device)
    archs = torch.cuda.get_arch_list()
    if archs and not arch_supported(cap, archs):
        raise RunError(f"{gpu} (sm_{cap[0]}{cap[1]}) cannot run torch {torch.__version__}, which is built for "
                       f"{' '.join(archs)}: pick another accelerator ('GPU T4 x2' on Kaggle) or install a "
                       f"torch build that lists sm_{cap[0]}{cap[1]}")
    try:
        x = torch.arange(16, dtype=torch.float32, device=device)
        ok = float((x * 2).sum()) == 240.0
    except Exception as exc:  # "no kernel image is available", a broken driver, a busy GPU
        first = (str(exc).strip().splitlines() or [""])[0]
        raise RunError(f"{gpu} (sm_{cap[0]}{cap[1]}): a first CUDA operation failed with torch "
                       f"{torch.__version__} ({type(exc).__name__}: {first}); pick another accelerator "
                       "('GPU T4 x2' on Kaggle) or restart the session") from None
    if not ok:
        raise RunError(f"{gpu} (sm_{cap[0]}{cap[1]}): a first CUDA operation gave a wrong result with torch "
                       f"{torch.__version__}; pick another accelerator or restart the session")
    return device

def resolve_precision(requested, device):
    if requested not in PRECISIONS:
        raise RunError(f"precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    if requested == "fp32":
        return "fp32", "fp32" + (" (TF32 matmuls where the GPU has them)" if device.type == "cuda" else "")
    if device.type != "cuda":
        if requested == "fp16" and not hasattr(torch.amp, "GradScaler"):
            return "fp32", f"fp32 (fp16 on the CPU needs torch 2.3+, this is {torch.__version__})"
        return requested, f"{requested} autocast on the CPU (a test path: fp32 is faster on most CPUs)"
    cap = torch.cuda.get_device_capability(device)
    if requested == "bf16" and cap < (8, 0):
        return "fp32", (f"fp32 (bf16 asked, but {torch.cuda.get_device_name(device)} is sm_{cap[0]}{cap[1]}: "
                        "native bf16 needs sm_80+; --precision fp16 uses its fp16 units)")
    if requested == "bf16":
        return "bf16", "bf16 autocast (weights, optimiser state and the EMA in fp32)"
    return "fp16", "fp16 autocast with a loss scaler per optimiser (weights and the EMA in fp32)"

def make_grad_scaler(device, init_scale=2.0 ** 12):
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, init_scale=init_scale)
    return torch.cuda.amp.GradScaler(init_scale=init_scale)

def memory_gib():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError, AttributeError):
        return 0.0

def machine_lines(device, precision_line=""):
    lines = [f"python     {platform.python_version()} | torch {torch.__version__} | numpy {np.__version__} "
             f"| Pillow {PIL.__version__}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"device     {device}: {props.name}, compute capability {props.major}.{props.minor}, "
                     f"{props.total_memory / 2 ** 30:.1f} GiB; {torch.cuda.device_count()} GPU(s) visible; "
                     f"CUDA {torch.version.cuda}")
    else:
        lines.append("device     cpu (no GPU in use)")
    lines.append(f"host       {os.cpu_count()} CPU cores, {memory_gib():.1f} GiB RAM, {sys.platform}")
    if precision_line:
        lines.append(f"precision  {precision_line}")
    return lines

RUN_LOCK = ".dogkit-run.lock"  # in a run folder while a run writes there: its process id

def claim_folder(folder):
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, RUN_LOCK)
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        pid = (fh.read().split() or ["?"])[0]
        fh.close()
        raise RunError(f"{folder}: another run (process {pid}) is writing there, its lock {path}; give another --out, "
                       f"or wait for it") from None
    fh.truncate(0)
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh, created

def release_folder(lock):
    fh, created = lock
    with contextlib.suppress(OSError):
        os.remove(fh.name)
        if created and not os.listdir(os.path.dirname(fh.name)):
            os.rmdir(os.path.dirname(fh.name))
    fh.close()

def output_problem(path, folder=False):
    if os.path.islink(path) and not os.path.exists(path):
        return (f"{path}: a symbolic link to {os.readlink(path)}, which does not exist (remove the link or give "
                "another path)")
    path = os.path.abspath(path)
    if os.path.exists(path) and os.path.isdir(path) != folder:
        return f"{path}: is a {'file (give a folder)' if folder else 'folder (give a file name)'}"
    above = path if folder and os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above) or not os.access(above, os.W_OK | os.X_OK):
        return f"{path}: {above} is {'not writable' if os.path.isdir(above) else 'a file, not a folder'}"
    return None

# Exit codes, one table for every dogkit command and every kernel (README, "Exit codes"):
EXIT_BAD_INPUT = 1  # a path, file, setting or device that cannot be used: one line naming it and the rule
EXIT_USAGE = 2  # an unknown option, or a value its parser cannot read: the parser's line
EXIT_RANK_STOPPED = 3  # a rank of a multi-GPU run stopped because another failed (that one says why)
EXIT_TRAINING_FAILED = 4  # training broke off (NaN storm, clock, lost GPU): images.zip still written if it could be
BUG_EXIT = 70  # an exception nobody expected: a bug, its traceback in TRACEBACK_FILE
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: temporary files removed, a training run's checkpoint saved
TRACEBACK_FILE = os.path.join(tempfile.gettempdir(), "dogkit-traceback.txt")

def save_traceback(path=TRACEBACK_FILE):
    with open(path, "w") as fh:
        traceback.print_exc(file=fh)
    return path


# ---------------------------------------------------------------------------------------------
# Sampling: truncated z, PNGs written straight into images.zip, sample grids
# ---------------------------------------------------------------------------------------------

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
    t = truncation
    if t is None or (not isinstance(t, bool) and isinstance(t, (int, float)) and (
            t == 0 or (math.isfinite(t) and TRUNCATION_MIN <= t <= TRUNCATION_MAX))):
        return None
    return (f"truncation {t!r}: give 0 (none) or a number from {TRUNCATION_MIN} to {TRUNCATION_MAX:g} (a smaller "
            f"one keeps almost no z value and would never finish redrawing)")

def balanced_labels(n, n_classes, generator=None):
    labels = torch.arange(n) % max(n_classes, 1)
    return labels[torch.randperm(n, generator=generator)]

def to_uint8(images):
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

def encode_png(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()

def encode_pngs(images, workers=8, deadline=None, clock=time.monotonic):
    blobs = []
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(images), 1000):
            check_deadline(deadline, clock, "PNG encoding")
            blobs += pool.map(encode_png, images[start:start + 1000])
    return blobs

def write_zip(images, path, workers=8, deadline=None, clock=time.monotonic):
    path = str(path)
    blobs = encode_pngs(images, workers, deadline, clock)
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for i, blob in enumerate(blobs):
                zf.writestr(f"{i:05d}.png", blob)
    return path

def png_header(data):
    if len(data) < 33 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">IIBB", data[16:26])

def verify_zip(path, n=N_SUBMISSION, size=64):
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
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and os.getpid() == NOTEBOOK_PID else None
    return shell if getattr(shell, "kernel", None) is not None else None

def show_png(png):
    if notebook_shell() is not None:
        from IPython.display import Image as Picture, display
        display(Picture(data=png) if isinstance(png, bytes) else Picture(filename=png))

def save_grid(images, path, nrow=8):
    n, h, w, c = images.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    grid = np.full((rows * (h + 2) + 2, ncol * (w + 2) + 2, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + k * (w + 2):2 + k * (w + 2) + w] = images[i]
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, "PNG")


# ---------------------------------------------------------------------------------------------
# Settings: every training setting, declared once
# ---------------------------------------------------------------------------------------------
# One row per setting: (name, default, values: (low, high), Choices(...) or None for any text; the
# models that read it, None for all; help). TrainConfig, its checks, the command-line options and
# the queues derive from it; a setting the model does not read is refused (unread_settings).

AUGMENTS = ("none", "flip", "crop-flip", "diffaug", "flip+diffaug", "crop-flip+diffaug", "flip+diffaug-t",
            "flip+diffaug-tc")  # DiffAugment: -t translation, -tc translation + cutout, plain: colour too
DIFFAUG_MODELS = ("biggan", "dcgan")  # the models whose step applies DiffAugment (an augment with "diffaug")
MEMORY_FORMATS = ("contiguous", "channels_last")
TRUNCATION_FROM_PLAN = -1.0  # truncation setting: the sampling truncation follows the planned passes
UNIT = (0.0, 1.0)

class Choices(tuple):
    """The values a setting may take, as opposed to a (low, high) range of numbers."""

SETTINGS = (
    # the run
    ("data", "", None, None, "photos (any layout clean-data reads) or a cache .npz"),
    ("out", "runs/run", None, None, "output folder: images.zip, checkpoint.pt, log.jsonl, grids"),
    ("budget", 9 * 3600.0 - 15 * 60, (1.0, 30 * 24 * 3600.0), None,
     "seconds for the whole run, sampling and zip included: the plan"),
    ("hard_limit", 0.0, (0.0, None), None, "seconds the platform lets this process run (a Kaggle kernel: 9 h), "
                                           "the wall a run with no images.zip yet may run up to; 0: none"),
    ("seed", 0, (0, 2 ** 63 - 1), None, "random seed"),
    ("device", "auto", None, None, "auto (the GPU if any), cuda, cuda:1, cpu"),
    ("steps", 0, (0, None), None, "also stop after this many steps, the schedule (progress p) ending with them "
                                  "(0: the budget alone decides)"),
    ("sessions", 1, (1, 1000), None, "sessions the run is planned over, `budget` each, each continuing the last"),
    # the model and its optimiser (each model's settings override these)
    ("model", "dcgan", None, None, "the registered model this configuration trains"),
    ("batch_size", 32, (1, 1 << 16), None, "images per step on each GPU"),
    ("z_dim", 128, (1, 1 << 12), None, "latent size"),
    ("width", 64, (1, 1 << 12), None, "channel width (of G, and of D unless d_width says otherwise)"),
    ("d_width", 0, (0, 1 << 12), ("biggan",), "the discriminator's channel width (0: twice width)"),
    ("lr_g", 2e-4, UNIT, None, "the generator's learning rate (the VAE's, for cvae)"),
    ("lr_d", 2e-4, UNIT, ("gan", "dcgan", "biggan", "wgan-gp", "sagan", "ralsgan"), "D's learning rate"),
    ("beta1", 0.5, (0.0, 0.9999), None, "Adam's beta1"),
    ("beta2", 0.999, (0.0, 0.9999), None, "Adam's beta2"),
    ("loss", "bce", Choices(("bce", "hinge")), ("biggan",), "the adversarial loss"),
    ("real_label", 1.0, UNIT, ("dcgan",), "the target of real images in D's loss (one-sided label smoothing)"),
    ("input_noise", 0.0, (0.0, 10.0), ("dcgan",), "std of the noise added to D's inputs"),
    ("d_steps", 1, (1, 100), ("biggan", "wgan-gp"), "discriminator steps per generator step"),
    ("g_steps", 1, (1, 100), ("wgan-gp",), "generator steps per call"),
    ("gp_weight", 10.0, (0.0, 1000.0), ("wgan-gp",), "the gradient penalty's weight"),
    ("kl_weight", 1.0, (0.0, 1000.0), ("cvae",), "the KL term's weight in the VAE loss"),
    ("clusters", 1000, (1, 100_000), ("cvae",), "K-means clusters of training latents, sampled from"),
    ("recycle", 3, (0, 100), ("cvae",), "passes of each sample back through the VAE"),
    ("lecam", 0.0, (0.0, 100.0), ("biggan",), "LeCam regularisation weight (0: off; Tseng et al.: 0.3)"),
    ("lecam_decay", 0.99, UNIT, ("biggan",), "decay of LeCam's moving averages of D's outputs"),
    ("lecam_start", 1000, (0, None), ("biggan",), "D steps before those averages start"),
    ("augment", "crop-flip", Choices(AUGMENTS), None, "augmentation of the real photos (+diffaug: biggan and dcgan)"),
    # the schedule, as functions of progress p (0 to 1 over the training time)
    ("lr_decay_start", 0.5, UNIT, None, "p where the learning rate's cosine decay starts"),
    ("lr_final", 0.1, (0.0, 10.0), None, "the learning rate at the end, a multiple of the start's"),
    ("ema_start", 0.25, UNIT, None, "p where the EMA of G starts (before: G_ema follows G)"),
    ("ema_decay", 0.999, UNIT, None, "EMA decay per batch_size images (a step of N GPUs decays by its N-th power)"),
    ("ema_fraction", 0.0, UNIT, None, "> 0: the EMA's half-life as this fraction of the images the run will show "
                                      "(set from its pace), instead of ema_decay; from ema_start"),
    ("ema_rampup", 0.05, (0.0, 1000.0), None, "extra EMA copies: a half-life at most this fraction of the images seen"),
    ("ema_extra", "", None, None, "half-lives (kimg) of extra EMA copies kept for evaluation, e.g. 2,10,50"),
    # the data (when data is not a cache file) and the samples
    ("strategy", "pad", Choices(STRATEGIES), None, "how a dog's box becomes a square crop"),
    ("image_size", 64, Choices(CROP_SIZES), None, "the crops' side in pixels (the models make 64)"),
    ("n_samples", 10_000, (1, 1_000_000), None, "images in the zip (Kaggle takes 10,000)"),
    ("truncation", 0.0, (0.0, TRUNCATION_MAX), None, f"redraw z values beyond +-T for the final images (0: none, "
                                            f"{TRUNCATION_FROM_PLAN:g}: from the passes the run will make)"),
    # the machinery
    ("log_every", 30.0, (0.0, None), None, "seconds between log lines"),
    ("grid_every", 300.0, (0.0, None), None, "seconds between progress grids"),
    ("checkpoint_every", 300.0, (0.0, None), None, "seconds between checkpoints"),
    ("snapshots", "", None, None, "progress points that keep a checkpoint copy, e.g. 0.25,0.5"),
    ("keep_grids", 8, (0, 10_000), None, "progress grids kept in the run folder (Kaggle keeps 500 files)"),
    ("zip_every", 3600.0, (0.0, None), None, "seconds between interim images.zip from the EMA (insurance)"),
    ("max_rollbacks", 8, (0, 1000), None, "a NaN storm: stop training after this many rollbacks, write the zip"),
    ("reserve", -1.0, (-1.0, None), None, "seconds kept for sampling and the zip (-1: measured at the start)"),
    ("precision", "fp32", Choices(PRECISIONS), None,
     "fp32 (TF32 where the GPU has it), bf16 (sm_80+), fp16 (autocast + loss scaling: T4)"),
    ("memory_format", "contiguous", Choices(MEMORY_FORMATS), None, "channels_last: NHWC weights and batches"),
)
SETTING = {row[0]: row for row in SETTINGS}
TrainConfig = dataclasses.make_dataclass("TrainConfig", [(n, type(d), dataclasses.field(default=d))
                                                         for n, d, *_ in SETTINGS])

def parse_budget(text):
    if isinstance(text, (int, float)):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smh])", str(text).strip().lower())
    if not parts or "".join(a + b for a, b in parts) != str(text).strip().lower():
        raise ValueError(f"budget {text!r}: give a number with its unit, e.g. 30s, 8m, 9h or 1h30m")
    return sum(float(a) * {"s": 1, "m": 60, "h": 3600}[b] for a, b in parts)

def setting_problem(name, value):
    _, default, values, _, _ = SETTING[name]
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        return f"{name}={value!r}: must be {kind.__name__}"
    if isinstance(values, Choices):
        return None if value in values else f"{name}={value!r}: choose from {', '.join(map(str, values))}"
    if name == "truncation":  # sampling's own check (sample.truncation_problem), or left to the plan
        wrong = value != TRUNCATION_FROM_PLAN and truncation_problem(value)
        return f"{name}={value!r}: {wrong.split(': ', 1)[1]}, or {TRUNCATION_FROM_PLAN:g}: from the planned passes" \
            if wrong else None
    if kind is str:
        return None
    low, high = values
    if (kind is int or math.isfinite(value)) and (low is None or value >= low) and (high is None or value <= high):
        return None
    bounds = (f" from {low}" if low is not None else "") + (f" to {high}" if high is not None else "")
    return f"{name}={value!r}: must be a finite number{bounds}"

def with_settings(cfg, settings):
    problems = [f"unknown setting {k!r}" for k in sorted(set(settings) - set(SETTING))]
    problems += [p for p in (setting_problem(k, v) for k, v in settings.items() if k in SETTING) if p]
    if problems:
        raise ValueError("; ".join(problems))
    if "ema_fraction" not in settings and "ema_decay" in settings:
        settings = {**settings, "ema_fraction": 0.0}  # an EMA decay given explicitly wins over one left to the plan
    floats = {k: float(v) for k, v in settings.items() if isinstance(SETTING[k][1], float)}
    return dataclasses.replace(cfg, **{**settings, **floats})

def reads(model_name, name):
    models = SETTING[name][3]
    return models is None or model_name in models

def unread_settings(cfg, model_name):
    out = [f"{n}={getattr(cfg, n)!r}: model {model_name} does not read it ({', '.join(models)} "
           f"{'does' if len(models) == 1 else 'do'})" for n, default, _, models, _ in SETTINGS
           if not reads(model_name, n) and getattr(cfg, n) != default]
    if "diffaug" in cfg.augment and model_name not in DIFFAUG_MODELS:
        out.append(f"augment={cfg.augment!r}: model {model_name} does not apply DiffAugment "
                   f"({' and '.join(DIFFAUG_MODELS)} do)")
    return out


# ---------------------------------------------------------------------------------------------
# Training: a wall-clock schedule, EMA, checkpoints, NaN rollback and the final images.zip
# ---------------------------------------------------------------------------------------------
# Everything follows progress p = elapsed / training time, so the same file adapts to any GPU;
# training stops early enough for the end (sampling, the zip) to fit the budget. Nothing that goes
# wrong after the first good step loses the run: it rolls back to the last good state, writes
# images.zip from it and only then reports the failure (RunFailed).

class RunFailed(RuntimeError):
    def __init__(self, cause, zip_path=None):
        super().__init__(cause)
        self.cause, self.zip_path = cause, zip_path

    def line(self):
        kept = f"{self.zip_path} was still written from the last good generator" if self.zip_path else \
            "no images.zip from this run"
        return f"training failed ({self.cause}); {kept}"

def parse_snapshots(text):
    points = sorted(float(t) for t in str(text).replace(" ", "").split(",") if t)
    if any(not 0.0 < x < 1.0 for x in points):
        raise ValueError(f"snapshots {text!r}: progress points must lie strictly between 0 and 1")
    return points

def ema_line(cfg):
    if cfg.ema_fraction > 0:
        return (f"EMA        half-life {cfg.ema_fraction:.0%} of the images the run will show (set from the pace), "
                f"from p={cfg.ema_start:g}, on any number of GPUs")
    start = f"decay {cfg.ema_decay:g} per {cfg.batch_size} images from p={cfg.ema_start:g}"
    if not 0 < cfg.ema_decay < 1:
        return f"EMA        {start}: " + ("G_ema is G" if cfg.ema_decay == 0 else "G_ema stays as G was then")
    half = math.log(0.5) / math.log(cfg.ema_decay) * cfg.batch_size
    return f"EMA        {start}: a half-life of {half / 1000:,.1f}k images on any number of GPUs"

def settings_line(cfg, model):
    name = getattr(model, "name", "")
    lr = f"lr {cfg.lr_g:g} (G) {cfg.lr_d:g} (D)" if reads(name, "lr_d") else f"lr {cfg.lr_g:g}"
    parts = [f"batch {cfg.batch_size}", lr, f"augment {cfg.augment}"]
    if getattr(model, "d_width", None):
        parts.insert(1, f"width {cfg.width} (G) {model.d_width} (D)")
    if reads(name, "lecam"):
        parts.append(f"LeCam {cfg.lecam:g} from D step {cfg.lecam_start}" if cfg.lecam else "LeCam off")
    parts.append("truncation from the planned passes" if cfg.truncation == TRUNCATION_FROM_PLAN
                 else f"truncation {cfg.truncation:g}" if cfg.truncation else "no truncation")
    return "settings   " + ", ".join(parts)

def passes_text(passes):
    return f"{passes:,.0f}" if passes >= 10 else f"{passes:.1f}".removesuffix(".0")

def passes_words(passes):
    text = passes_text(passes)
    return f"{text} pass" if text == "1" else f"{text} passes"

def plan_line(cfg, values, planned_images, n_photos, source):
    parts = []
    if "ema_decay" in values:
        parts.append(f"EMA half-life {cfg.ema_fraction:.0%} of {planned_images:,.0f} images = "
                     f"{cfg.ema_fraction * planned_images / 1000:,.1f}k images (decay {values['ema_decay']:.6f} per "
                     f"{cfg.batch_size} images from p={cfg.ema_start:g})")
    if "truncation" in values:
        (x0, t0), (x1, t1) = TRUNCATION_BY_PASSES[0], TRUNCATION_BY_PASSES[-1]
        parts.append(f"truncation {values['truncation']:g} for {passes_words(planned_images / max(n_photos, 1))} over "
                     f"the {n_photos:,} photos ({t0:g} at {x0:g} passes or fewer, {t1:g} at {x1:g} or more)")
    return f"from plan  {source}: " + "; ".join(parts)

def follow_plan(tr, planned_images, source):
    values = from_plan(tr.given, planned_images, len(tr.images))
    if values:
        tr.planned = {"images": float(planned_images), "source": source, **values}
        tr.cfg = dataclasses.replace(tr.cfg, **values)
        tr.log(plan_line(tr.given, values, planned_images, len(tr.images), source))

def plan_pending(cfg):
    parts = [f"EMA half-life {cfg.ema_fraction:.0%} of the images the run will show"] if cfg.ema_fraction > 0 else []
    parts += ["truncation from the passes it will make"] if cfg.truncation == TRUNCATION_FROM_PLAN else []
    return ("from plan  " + " and ".join(parts) + ": set from the pace, a tenth into training") if parts else ""

def parse_ema_extra(text):
    values = [float(t) for t in str(text).replace(" ", "").split(",") if t]
    if any(v <= 0 for v in values):
        raise ValueError(f"ema_extra {text!r}: half-lives in thousands of images, each above 0")
    return values

REFRESH_BATCHES = 64

def batchnorms(G):
    return [m for m in G.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

def refresh_images(G, cfg):
    return REFRESH_BATCHES * 4 * cfg.batch_size if batchnorms(G) else 0

@torch.no_grad()
def refresh_batchnorm(G, cfg, n_classes, device):
    bns = batchnorms(G)
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    G.train()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    for _ in range(REFRESH_BATCHES):
        z = torch.randn(cfg.batch_size * 4, cfg.z_dim, generator=gen).to(device)
        y = torch.randint(0, max(n_classes, 1), (len(z),), generator=gen).to(device) if n_classes else None
        G(z, y)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    G.eval()

def resident(data, device):
    images = torch.from_numpy(np.ascontiguousarray(data["images"])).permute(0, 3, 1, 2).contiguous()
    return images.to(device), torch.as_tensor(np.asarray(data["labels"]), dtype=torch.long).to(device)

def progress(tr):
    p = tr.plan.elapsed / max(tr.plan.train_seconds, 1e-9)
    return max(p, tr.step / tr.cfg.steps) if tr.cfg.steps else p

def count_step(tr):
    tr.step += 1
    tr.images_seen += tr.batches_per_step * tr.cfg.batch_size * tr.world.size

class Plan:
    def __init__(self, t0):
        self.t0 = t0
        self.elapsed = self.resumed_elapsed = 0.0  # the run so far; what a resumed checkpoint had done
        self.train_seconds = None  # the whole run's training (every session's)
        self.session, self.session_start = 1, 0.0  # this session (cfg.sessions), the elapsed it started at
        self.session_end = self.per_session = None  # the elapsed at which it stops training; a session's share

    def fix(self, session_end, train_seconds, per_session=0.0):
        self.session_end, self.train_seconds, self.per_session = session_end, train_seconds, per_session

    def tick(self, elapsed):
        self.elapsed = elapsed

    def state(self):
        return {"elapsed": self.elapsed, "train_seconds": self.train_seconds, "session": self.session,
                "session_start": self.session_start, "session_end": self.session_end,
                "per_session": self.per_session}

    def resume(self, ckpt, cfg, same_session=False):
        self.elapsed = self.resumed_elapsed = ckpt["elapsed"]
        self.session, self.session_start = ckpt.get("session", 1), self.elapsed
        if same_session:
            self.session_start = ckpt.get("session_start", 0.0)
            self.fix(ckpt.get("session_end") or ckpt["train_seconds"], ckpt["train_seconds"],
                     ckpt.get("per_session") or 0.0)
        elif cfg.sessions > 1:
            self.session += 1
        elif ckpt["config"]["budget"] == cfg.budget:
            self.fix(ckpt["train_seconds"], ckpt["train_seconds"], ckpt.get("per_session") or 0.0)

# ---- the safety net: the last good state, rollback --------------------------------------

def state_tensors(tr):
    out = list(tr.model.G.state_dict(keep_vars=True).values())
    if tr.model.D is not None:
        out += list(tr.model.D.state_dict(keep_vars=True).values())
    for G_ema in tr.ema.copies():
        out += list(G_ema.state_dict(keep_vars=True).values())
    for opt in tr.optimizers:
        for state in opt.state.values():
            out += [v for v in state.values() if torch.is_tensor(v)]
    return [t.data if isinstance(t, torch.nn.Parameter) else t for t in out]

class SafetyNet:
    def __init__(self):
        self.good = None  # an in-memory copy of the last good training state: what a rollback returns to
        self.rollbacks, self.lr_scale = 0, 1.0

    def keep(self, tensors):
        self.good = [t.detach().clone() for t in tensors]

    @torch.no_grad()
    def restore(self, tensors):
        for t, saved in zip(tensors, self.good):
            t.copy_(saved)

    def roll_back(self, tensors):
        self.restore(tensors)
        self.rollbacks += 1
        self.lr_scale *= 0.5

    def state(self):
        return {"lr_scale": self.lr_scale, "rollbacks": self.rollbacks}

    def load(self, ckpt):
        self.lr_scale, self.rollbacks = ckpt["lr_scale"], ckpt["rollbacks"]

def keep_good_state(tr):
    tr.safety.keep(state_tensors(tr))

def restore_good_state(tr):
    tr.safety.restore(state_tensors(tr))

def tell_others(tr):
    try:
        agree(tr.world, tr.clock(), failed=True)
    except Exception:  # the group itself broke: the peers see the lost connection
        pass

def rollback(tr, reason):
    tr.safety.roll_back(state_tensors(tr))
    tr.log(f"rollback #{tr.safety.rollbacks} to the last good state ({reason}); lr x{tr.safety.lr_scale:g}")

def stopped_by(tr, exc):
    if tr.world.size > 1:
        tell_others(tr)
    if tr.safety.good is None:
        raise exc
    failure = (f"{type(exc).__name__} at step {tr.step}" + (f" on rank {tr.world.rank}" if tr.world.size > 1 else "")
               + f": {exc}")
    tr.log("training stopped: " + traceback.format_exc().rstrip())
    if not tr.world.main:  # rank 0 writes the zip; this rank says why it stopped
        raise RunFailed(failure) from None
    try:
        restore_good_state(tr)
    except Exception as again:  # a dead CUDA context: finish() falls back to the CPU
        tr.log(f"the last good state could not be restored ({type(again).__name__}: {again})")
    return failure

# ---- checkpoints: everything needed to resume exactly, written atomically ---------------

CHECKPOINT_FORMAT = "dogkit-checkpoint-2"  # -1 kept numpy's random state as an array (a pickle)

def rng_state(tr):
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(tr.device) if tr.device.type == "cuda" else None}

def set_rng_state(tr, rng):
    torch.set_rng_state(rng["torch"].cpu())
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(rng["python"])
    if rng["cuda"] is not None and tr.device.type == "cuda" and torch.is_tensor(rng["cuda"]):
        torch.cuda.set_rng_state(rng["cuda"].cpu(), tr.device)  # (an old checkpoint's list of devices: not restored)

def seed_rank(cfg, world, step=0):
    torch.manual_seed(cfg.seed + 100_003 * (world.rank + 1) + 7 * step)

def checkpoint_together(tr, name="checkpoint.pt"):
    states = gather_objects(rng_state(tr), tr.world)
    return save_checkpoint(tr, name, states) if tr.world.main else None

def save_checkpoint(tr, name="checkpoint.pt", rank_rngs=None, folder=None):
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "config": {**dataclasses.asdict(tr.given),  # as given, the truncation as it samples (every reader's)
                   "truncation": sampling_truncation(tr.cfg, tr.images_seen, len(tr.images))},
        "planned": tr.planned,  # the settings that follow the plan (follow_plan), or None
        "model": tr.cfg.model, "step": tr.step, "images_seen": tr.images_seen,  # real images, all ranks together
        **tr.plan.state(), **tr.safety.state(),  # elapsed, the sessions and their plan; lr_scale, rollbacks
        "breeds": tr.breeds, "n_classes": tr.n_classes,
        "G": tr.model.G.state_dict(), "D": tr.model.D.state_dict() if tr.model.D is not None else None,
        **tr.ema.state(),  # G_ema, its weight, and the ema_extra copies in their order
        "opt_g": tr.model.opt_g.state_dict(),
        "opt_d": tr.model.opt_d.state_dict() if tr.model.opt_d is not None else None,
        "scalers": [opt.grad_scaler.state_dict() if opt.grad_scaler else None for opt in tr.optimizers],
        "grid_every": tr.grid_every, "bn_refreshed": bool(tr.bn_refreshed),  # standing stats in G_ema (the end's)
        "rng": rng_state(tr), "world_size": tr.world.size,
        "rank_rngs": rank_rngs,  # every rank's random state (multi-GPU, saved together), else None
    }
    path = os.path.join(folder or tr.cfg.out, name)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    if name == "checkpoint.pt" and folder is None:
        tr.written.checkpoint(tr.step)  # the checkpoint.pt there is this run's from here on
    return path

def read_checkpoint(path, device="cpu", formats=(CHECKPOINT_FORMAT,)):
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{path}: no such checkpoint") from None
    except Exception as exc:  # truncated, corrupted, or a pickle holding more than data
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise RunError(f"{path}: not readable as a dogkit checkpoint (read as data only: {first}); an "
                       f"interrupted download, another program's file, or one written by dogkit before "
                       f"{CHECKPOINT_FORMAT}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in formats:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise RunError(f"{path}: format {found!r}, expected {' or '.join(formats)}")
    return ckpt

RUN_SETTINGS = ("data", "out", "budget", "hard_limit", "sessions", "device", "steps", "n_samples", "truncation", "log_every",
                "grid_every", "checkpoint_every", "snapshots", "keep_grids", "zip_every", "reserve",
                "memory_format", "ema_extra")  # where and how long a run goes: a continued run may change them

def settings_differences(saved, cfg):
    defaults = dataclasses.asdict(TrainConfig())
    return [f"{k} {saved.get(k, v0)!r} (this run: {getattr(cfg, k)!r})" for k, v0 in defaults.items()
            if k not in RUN_SETTINGS and k != "model" and saved.get(k, v0) != getattr(cfg, k)]

def check_continuation(ckpt, path, cfg, model_name, next_session=True):
    if ckpt.get("model") != model_name:
        raise RunError(f"{path}: a checkpoint of model {ckpt.get('model')!r}; this run trains {model_name!r}")
    differences = settings_differences(ckpt["config"], cfg)
    if differences:
        raise RunError(f"{path}: trained with other settings: {'; '.join(differences)}; continue with the "
                       f"checkpoint's settings, or start afresh without it")
    done = ckpt.get("session", 1)
    if cfg.sessions > 1 and next_session and done >= cfg.sessions:
        raise RunError(f"{path}: that run has already trained its {done} sessions (step {ckpt['step']}); raise "
                       f"sessions above {done} to train it longer, or start afresh without it")
    if cfg.sessions == 1:
        return f"{path}: step {ckpt['step']}, {fmt_time(ckpt['elapsed'])} done"
    return (f"session {done + next_session} of {cfg.sessions}, from {path}: step {ckpt['step']}, "
            f"{fmt_time(ckpt['elapsed'])} done in {done} session{'s' * (done > 1)}")

def load_checkpoint(tr, path, same_session=False):
    ckpt = read_checkpoint(path, tr.device)
    check_continuation(ckpt, path, tr.cfg, tr.cfg.model, next_session=not same_session)
    tr.model.G.load_state_dict(ckpt["G"])
    if tr.model.D is not None:
        tr.model.D.load_state_dict(ckpt["D"])
    tr.ema.load(ckpt, tr.log)
    tr.model.opt_g.load_state_dict(ckpt["opt_g"])
    if tr.model.opt_d is not None:
        tr.model.opt_d.load_state_dict(ckpt["opt_d"])
    for opt, state in zip(tr.optimizers, ckpt.get("scalers") or ()):
        if opt.grad_scaler is not None and state:
            opt.grad_scaler.load_state_dict(state)
    tr.step, tr.images_seen = ckpt["step"], ckpt.get("images_seen", 0)
    tr.plan.resume(ckpt, tr.cfg, same_session)
    if ckpt.get("planned"):  # until this session's pace plans them again
        follow_plan(tr, ckpt["planned"]["images"], ckpt["planned"]["source"] + " (of the checkpoint's run)")
    tr.safety.load(ckpt)
    tr.grid_every = ckpt.get("grid_every", tr.grid_every)
    tr.written.resumed(path, tr.cfg.out, tr.step)  # its log is carried once the plan holds
    size = ckpt.get("world_size", 1)
    if size == tr.world.size and (size == 1 or ckpt.get("rank_rngs")):
        set_rng_state(tr, ckpt["rank_rngs"][tr.world.rank] if size > 1 else ckpt["rng"])
    else:  # another world size, or saved by rank 0 alone (an interrupt): fresh streams per rank
        seed_rank(tr.cfg, tr.world, tr.step)
        tr.log(f"random streams start afresh: checkpoint of {size} rank(s), run of {tr.world.size}")
    tr.log(f"resumed {path}: step {tr.step}, {tr.plan.elapsed:.0f} s done"
           + (f"; session {tr.plan.session} of {tr.cfg.sessions}" if tr.cfg.sessions > 1 else ""))

def carry_log(folder, out, log=print):
    source, target = os.path.join(folder, "log.jsonl"), os.path.join(out, "log.jsonl")
    if not os.path.isfile(source) or os.path.abspath(folder) == os.path.abspath(out):
        return
    if os.path.exists(target):
        log(f"{target} already exists: the earlier log ({source}) is not copied into it")
        return
    with open(source, errors="replace") as fh:
        lines = [line for line in fh.read().splitlines(keepends=True) if line.endswith("\n")]  # whole lines
    with atomic_path(target) as tmp, open(tmp, "w") as fh:
        fh.writelines(lines)
    log(f"copied the earlier log ({len(lines)} records) from {source}")

class Written:
    def __init__(self):
        self.checkpoint_step = self.zip_step = self.continues = None

    def checkpoint(self, step):
        self.checkpoint_step = step

    def zip(self, step):
        self.zip_step = step

    def resumed(self, path, out, step):
        self.continues = os.path.dirname(os.path.abspath(path))
        if self.continues == os.path.abspath(out):
            self.checkpoint_step = step

# ---- the plan: how long the end takes, how long training gets ---------------------------

def measure_end(tr):
    cfg, cuda = tr.cfg, tr.device.type == "cuda"
    G = copy.deepcopy(tr.ema.G)
    parts = {"prepare": 0.0}
    if hasattr(tr.model, "before_sampling"):
        n = min(len(tr.images), 4000 if cuda else 1000)
        t = time.monotonic()
        tr.model.before_sampling(G, to_float(tr.images[:n]))
        parts["prepare"] = (time.monotonic() - t) * len(tr.images) / n
    probe = 512 if cuda else 32
    for _ in range(2):
        t = time.monotonic()
        generate(G, probe, cfg.z_dim, None, tr.n_classes, probe, device=tr.device)
        per_image = (time.monotonic() - t) / probe
    parts["generate"] = per_image * (cfg.n_samples + refresh_images(G, cfg))
    photos = tr.images[:probe].permute(0, 2, 3, 1).cpu().numpy()
    t = time.monotonic()
    encode_pngs(photos)
    parts["png"] = (time.monotonic() - t) / len(photos) * cfg.n_samples
    with tempfile.TemporaryDirectory() as scratch:  # the output folder stays untouched until the plan holds
        t = time.monotonic()
        save_checkpoint(tr, folder=scratch)
        parts["checkpoint"] = time.monotonic() - t
    return 1.25 * sum(parts.values()) + 3.0, parts

def budget_start(tr):
    return tr.plan.session_start if tr.cfg.sessions > 1 else 0.0

def sessions_plan(tr, reserve):
    session_end = budget_start(tr) + tr.cfg.budget - reserve
    per_session = session_end - (tr.clock() - tr.plan.t0 + tr.plan.session_start)  # from now: data loading is spent
    return session_end, session_end + max(0, tr.cfg.sessions - tr.plan.session) * per_session, per_session

def plan(tr):
    tr.plan.fix(*on_main(lambda: planned_seconds(tr), tr.world))

def planned_seconds(tr):
    cfg = tr.cfg
    if cfg.reserve >= 0:
        reserve, how = cfg.reserve, "as configured"
    else:
        reserve, parts = measure_end(tr)
        how = "measured: " + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()) + ", x1.25 + 3 s"
    session_end, train_seconds, per_session = sessions_plan(tr, reserve)
    if per_session < 0.1 * cfg.budget:
        used = tr.clock() - tr.plan.t0 + tr.plan.session_start - budget_start(tr)  # earlier runs (resume), data loading
        need = math.ceil(1.5 * (used + reserve) / 0.9 / 60)  # half again: a busy machine times its end slower
        raise RunError(f"budget {fmt_time(cfg.budget)} is too short on this device: {used:.0f} s already "
                       f"spent and the end (sampling {cfg.n_samples} images, the zip) needs {reserve:.0f} s "
                       f"({how}); give --budget {need}m or more (half again as margin: a busy machine is "
                       f"slower when it times the end)")
    if cfg.sessions > 1:
        tr.log(f"budget     {fmt_time(cfg.budget)} a session, session {tr.plan.session} of {cfg.sessions}: training "
               f"until {fmt_time(session_end)} of the run's {fmt_time(train_seconds)} (the sessions to come "
               f"as long as this one), {reserve:.0f} s kept for the end ({how})")
    else:
        tr.log(f"budget     {fmt_time(cfg.budget)}: training until {fmt_time(train_seconds)}, "
               f"{reserve:.0f} s kept for the end ({how})")
    return session_end, train_seconds, per_session

REPLAN_AT = 0.1  # progress at which a measured reserve is timed again, warm

def planned_images(images_seen, since, elapsed, train_seconds, at_most=math.inf):
    rate = (images_seen - since[1]) / max(elapsed - since[0], 1e-9)
    return min(at_most, images_seen + rate * max(train_seconds - elapsed, 0.0))

def pace_line(images_seen, since, elapsed, train_seconds, n_photos, at_most=math.inf):
    rate = (images_seen - since[1]) / max(elapsed - since[0], 1e-9)
    total = planned_images(images_seen, since, elapsed, train_seconds, at_most)
    return (f"at {rate:,.0f} images/s, about {total:,.0f} images by the end of training: "
            f"{passes_words(total / max(n_photos, 1))} over the {n_photos:,} photos")

def replan(tr):
    def warm():
        _, parts = measure_end(tr)  # the parts as timed, warm
        reserve = 2.0 * sum(parts.values()) + 3.0  # kept: what a machine twice as slow would still fit
        end = max(tr.plan.elapsed, budget_start(tr) + tr.cfg.budget - reserve)
        gain = end - tr.plan.session_end
        per_session = tr.plan.per_session + gain
        return end, end + max(0, tr.cfg.sessions - tr.plan.session) * per_session, per_session, reserve

    before = tr.plan.session_end
    *fixed, reserve = on_main(warm, tr.world)
    tr.plan.fix(*fixed)
    left = budget_start(tr) + tr.cfg.budget - tr.plan.elapsed
    why = (f"; it needs more than the {left:.0f} s left, so training stops now and the end may run over"
           if reserve > left else "")
    tr.log(f"re-planned once warm: {reserve:.0f} s kept for the end (twice its warm timing: a machine twice as "
           f"slow still fits); training until {fmt_time(tr.plan.session_end)} (was {fmt_time(before)}){why}")

def once_warm(tr, since):
    if tr.cfg.reserve < 0:
        replan(tr)
    cap = tr.images_seen / max(tr.step, 1) * tr.cfg.steps if tr.cfg.steps else math.inf  # --steps: no more
    pace = (tr.images_seen, since, tr.plan.elapsed, tr.plan.train_seconds)
    tr.log("pace       " + pace_line(*pace, len(tr.images), at_most=cap))
    follow_plan(tr, planned_images(*pace, at_most=cap), "the pace")
    return True

# ---- logs, pictures and interim zips -----------------------------------------------------

def log_interval(tr, p, steps, seconds):
    sums = tr.loss_sum or {}
    means = {k: float(v) / max(steps, 1) for k, v in zip(sums, all_mean(list(sums.values()), tr.world))}
    for v in sums.values():
        v.zero_()
    finite = all(math.isfinite(v) and abs(v) < 1e4 for v in means.values())
    record = {"step": tr.step, "session": tr.plan.session, "elapsed": round(tr.plan.elapsed, 3), "p": round(p, 5),
              "lr_g": tr.cfg.lr_g * lr_multiplier(p, tr.cfg) * tr.safety.lr_scale,
              "steps_per_s": round(steps / max(seconds, 1e-9), 2), **means}
    if tr.world.main:
        with open(os.path.join(tr.cfg.out, "log.jsonl"), "a") as fh:
            fh.write(json.dumps(record) + "\n")
    losses = " ".join(f"{k[5:] if k.startswith('loss_') else k} {v:.3f}" for k, v in means.items())
    tr.log(f"step {tr.step:7d} | {fmt_time(tr.plan.elapsed)}/{fmt_time(tr.plan.train_seconds)} "
           f"({100 * p:3.0f}%) | {record['steps_per_s']:7.1f} it/s | {losses}")
    if not finite:
        rollback(tr, "loss is NaN or diverged")
    return finite

@torch.no_grad()
def save_fixed_grid(tr, name):
    was = tr.ema.G.training
    tr.ema.G.eval()
    imgs = tr.ema.G(tr.fixed_z, tr.fixed_y)
    tr.ema.G.train(was)
    save_grid(to_uint8(imgs), os.path.join(tr.cfg.out, name))

def progress_grid(tr):
    save_fixed_grid(tr, f"grid-{tr.step:07d}.png")
    show_png(os.path.join(tr.cfg.out, f"grid-{tr.step:07d}.png"))
    grids = sorted(f for f in os.listdir(tr.cfg.out) if re.fullmatch(r"grid-\d{7}\.png", f))
    if len(grids) > max(2, tr.cfg.keep_grids):
        for name in grids[1:-1:2]:
            os.remove(os.path.join(tr.cfg.out, name))
        tr.grid_every *= 2

def prepare_for_sampling(tr, G):
    if hasattr(tr.model, "before_sampling"):
        tr.model.before_sampling(G, to_float(tr.images))
    refresh_batchnorm(G, tr.cfg, tr.n_classes, tr.device)

def sample_zip(tr, G, deadline=None, world=ALONE):
    cfg = tr.cfg
    truncation = sampling_truncation(cfg, tr.images_seen, len(tr.images))

    def part(k):
        return generate(G, cfg.n_samples, cfg.z_dim, truncation, tr.n_classes, device=tr.device, seed=cfg.seed,
                        deadline=deadline, clock=tr.clock, part=(k, world.size))

    try:
        mine = part(world.rank)
    except Exception as exc:
        if world.main:
            raise
        mine = exc  # rank 0 samples this slice itself
    parts = gather_objects(mine, world)
    if not world.main:
        return None
    for k, got in enumerate(parts):
        if isinstance(got, BaseException):
            tr.log(f"rank {k} could not sample its share ({type(got).__name__}: {got}); rank 0 samples it")
            parts[k] = part(k)
    return zip_images(np.concatenate(parts), cfg, deadline, tr.clock)

def sampling_truncation(cfg, images_seen, n_photos):
    t = cfg.truncation
    return truncation_for_passes(images_seen / max(n_photos, 1)) if t == TRUNCATION_FROM_PLAN else t

def zip_images(images, cfg, deadline=None, clock=time.monotonic):
    path = write_zip(images, os.path.join(cfg.out, "images.zip"), deadline=deadline, clock=clock)
    verify_zip(path, n=cfg.n_samples)  # Kaggle's 10,000, or the count a shorter run asked for
    return path

def interim_zip(tr):
    t = time.monotonic()
    try:
        G = copy.deepcopy(tr.ema.G)
        prepare_for_sampling(tr, G)
        sample_zip(tr, G)
        tr.written.zip(tr.step)
        tr.log(f"interim images.zip at step {tr.step} ({time.monotonic() - t:.0f} s)")
    except Exception as exc:
        tr.log(f"interim images.zip failed ({type(exc).__name__}: {exc}); training goes on")

# ---- the end: images.zip before the deadline, whatever happened -------------------------

def ready_to_sample(tr):
    if not all(torch.isfinite(v).all() for v in tr.ema.G.state_dict().values() if v.is_floating_point()):
        tr.log("EMA generator is not finite: using the last good state")
        rollback(tr, "non-finite weights at the end")
    prepare_for_sampling(tr, tr.ema.G)
    tr.bn_refreshed = True

def kept_zip(tr):
    if not os.path.exists(os.path.join(tr.cfg.out, "images.zip")):
        return None
    if tr.written.zip_step is not None:
        return f"the interim images.zip of step {tr.written.zip_step} is kept"
    if tr.written.continues and os.path.abspath(tr.written.continues) == os.path.abspath(tr.cfg.out):
        return "the images.zip written before this run was resumed is kept"
    return None

def end_deadline(tr):
    end = tr.plan.t0 - tr.plan.session_start + budget_start(tr) + tr.cfg.budget  # on tr.clock, the zip included
    if kept_zip(tr):
        return end, end
    return (tr.plan.t0 + tr.cfg.hard_limit if tr.cfg.hard_limit > 0 else math.inf), end

def finish(tr, failure=None):
    deadline, budget_end = end_deadline(tr)
    world = tr.world if failure is None else ALONE
    if not world.main:
        return help_finish(tr, deadline)  # the same deadline: the same folder, checked before any zip
    path = os.path.join(tr.cfg.out, "images.zip")
    t, began = time.monotonic(), tr.clock()
    try:
        ready_to_sample(tr)
        try:
            checkpoint_together(tr) if world.size > 1 else save_checkpoint(tr)
        except WriteError as exc:  # the zip matters more: it is sampled from the generator in memory
            tr.log(f"WARNING    {exc}: checkpoint.pt not written, images.zip is sampled from the generator in memory")
            failure = f"{failure + '; ' if failure else ''}checkpoint.pt not written ({exc})"
        save_fixed_grid(tr, "samples.png")
        path = sample_zip(tr, tr.ema.G, deadline, world)
    except OutOfTime as exc:
        raise out_of_time(tr, failure, exc) from None
    except WriteError as exc:
        raise disk_full(tr, failure, exc) from None
    except Exception as exc:  # e.g. a CUDA error: the device cannot sample any more
        tr.log("sampling failed: " + traceback.format_exc().rstrip())
        cause = f"{failure + '; ' if failure else ''}the end failed on {tr.device} ({type(exc).__name__}: {exc})"
        if tr.written.checkpoint_step is None:  # the checkpoint.pt there (if any) is not this run's
            raise RunFailed(f"{cause}; no checkpoint of this run to sample instead", None) from None
        try:  # a failed CUDA context cannot be used again: the CPU
            _, step = zip_from_checkpoint(os.path.join(tr.cfg.out, "checkpoint.pt"), type(tr.model), deadline,
                                          tr.clock)
        except OutOfTime as late:
            raise out_of_time(tr, cause, late) from None
        raise RunFailed(f"{cause}; images.zip sampled on the CPU from checkpoint.pt (step {step})", path) from None
    tr.log(f"wrote {path}: {tr.cfg.n_samples} images in {time.monotonic() - t:.1f} s "
           f"(step {tr.step}, {tr.images_seen:,} images = {passes_words(tr.images_seen / len(tr.images))} over the "
           f"{len(tr.images):,} photos, {tr.safety.rollbacks} rollbacks"
           f"{f', {world.size} ranks' if world.size > 1 else ''}); "
           f"trained {fmt_time(tr.plan.elapsed - tr.plan.resumed_elapsed)} of this run's "
           f"{fmt_time(budget_end - tr.plan.t0)}")
    late = tr.clock() - budget_end
    if late > 0:
        wall = (f"the wall, {fmt_time(tr.cfg.hard_limit)}, is still {tr.plan.t0 + tr.cfg.hard_limit - tr.clock():.0f} "
                f"s away" if tr.cfg.hard_limit > 0 else "no wall: a local run")
        tr.log(f"WARNING    the end took {tr.clock() - began:.0f} s where the plan left it {budget_end - began:.0f} s "
               f"(the machine was slower than when the end was timed): {late:.0f} s past the budget; with no earlier "
               f"images.zip to keep, it was let run over ({wall})")
    if tr.plan.session < tr.cfg.sessions:
        tr.log(f"session {tr.plan.session} of {tr.cfg.sessions} ends at step {tr.step} "
               f"({100 * tr.plan.elapsed / max(tr.plan.train_seconds, 1e-9):.0f}% of the run's training): continue it "
               f"in the next session (Kaggle: run this notebook again with this version's output attached; "
               f"locally: --resume {os.path.join(tr.cfg.out, 'checkpoint.pt')} --sessions {tr.cfg.sessions})")
    if failure:
        raise RunFailed(failure, path)
    return path

def help_finish(tr, deadline):
    gather_objects(rng_state(tr), tr.world)  # rank 0's checkpoint_together
    try:
        ready_to_sample(tr)
    except Exception as exc:
        gather_objects(exc, tr.world)
        return None
    return sample_zip(tr, tr.ema.G, deadline, tr.world)

def out_of_time(tr, failure, exc):
    kept = kept_zip(tr)
    return RunFailed(f"{failure + '; ' if failure else ''}out of time: {exc} ({kept or 'no images.zip written'})",
                     os.path.join(tr.cfg.out, "images.zip") if kept else None)

def disk_full(tr, failure, exc):
    path, ours = os.path.join(tr.cfg.out, "images.zip"), kept_zip(tr)
    kept = ours or ("the images.zip there is an earlier run's, not this one's" if os.path.exists(path) else
                    "no images.zip written")
    return RunFailed(f"{failure + '; ' if failure else ''}{exc} ({kept})", path if ours else None)

def zip_from_checkpoint(path, model_cls, deadline=None, clock=time.monotonic, device="cpu"):
    device = torch.device(device)
    ckpt = read_checkpoint(path, device)
    G, cfg = ema_generator(ckpt, model_cls, device)
    cfg = dataclasses.replace(cfg, out=os.path.dirname(os.path.abspath(path)))
    truncation = sampling_truncation(cfg, ckpt["images_seen"], 1)  # a checkpoint's is the one it samples with
    images = generate(G, cfg.n_samples, cfg.z_dim, truncation, ckpt["n_classes"], device=device, seed=cfg.seed,
                      deadline=deadline, clock=clock)
    return zip_images(images, cfg, deadline, clock), ckpt["step"]

def ema_generator(ckpt, model_cls, device, which=None):
    given = {k: v for k, v in ckpt["config"].items() if k in SETTING}  # a retired setting (graph) is passed over
    cfg = dataclasses.replace(TrainConfig(**given), device=str(device))
    G = model_cls(cfg, ckpt["n_classes"], device).G
    G.load_state_dict(ckpt["G_ema"] if which is None else ckpt["G_ema_extra"][which])
    if which is not None or not ckpt.get("bn_refreshed", True):
        refresh_batchnorm(G, cfg, ckpt["n_classes"], device)
    return G.eval(), cfg

def seed_and_tune(cfg, device):
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

def check_model_options(cfg, model, n_classes=None, device="cpu"):
    problems = unread_settings(cfg, model.name)
    broken = generator_problem(model, cfg, n_classes, device) if n_classes is not None else None
    if problems or broken:
        raise ValueError("; ".join(problems + ([f"model check: {broken}"] if broken else [])))

@torch.no_grad()
def generator_problem(model, cfg, n_classes, device):
    z = torch.randn(2, cfg.z_dim, device=device)
    labels = torch.full((2,), n_classes - 1, dtype=torch.long, device=device) if n_classes else None
    call = f"{type(model).__name__}.G(z, labels)" if n_classes else f"{type(model).__name__}.G(z)"
    was = model.G.training
    try:
        out = model.G(z, labels)
    except Exception as exc:  # an edit's shape or index error, named rather than a traceback mid-run
        return f"{call} failed on 2 images{' of breed ' + str(n_classes - 1) if n_classes else ''}: " \
               f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    finally:
        model.G.train(was)
    shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
    if shape != (2, 3, 64, 64):
        return f"{call} returned {shape} for 2 images; the run needs (2, 3, 64, 64): NCHW images in [-1, 1]"
    return None

def ema_copy(G):
    G_ema = copy.deepcopy(G).eval()
    for p in G_ema.parameters():
        p.requires_grad_(False)
    return G_ema

def fixed_noise(cfg, n_classes, device):
    z = torch.randn(64, cfg.z_dim, generator=torch.Generator().manual_seed(1234)).to(device)
    return z, ((torch.arange(64) % max(n_classes, 1)).to(device) if n_classes else None)

class Trainer:
    def __init__(self, cfg, model_cls, data=None, clock=time.monotonic, log=print, hooks=(), t0=None,
                 world=ALONE):
        cfg = dataclasses.replace(cfg, model=model_cls.name)  # what the checkpoint says it holds
        self.cfg, self.clock, self.hooks, self.world = cfg, clock, list(hooks), world
        self.given, self.planned = cfg, None  # the settings as given; those that follow the plan (follow_plan)
        self.log = log if world.main else (lambda message: None)  # rank 0 speaks for all
        self.plan = Plan(clock() if t0 is None else t0)  # the budget counts from t0: data cleaning included
        self.device = pick_device(cfg.device)
        self.precision, why = resolve_precision(cfg.precision, self.device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        seed_and_tune(cfg, self.device)
        if data is None:  # several ranks: rank 0 cleans, every rank gets the result
            data = on_main(lambda: load_dataset(cfg.data, cfg.image_size, cfg.strategy, log=log), world)
        self.breeds = list(data["breeds"])
        self.n_classes = len(self.breeds) if model_cls.conditional else 0
        self.images, self.labels = resident(data, self.device)
        self.model = model_cls(cfg, self.n_classes, self.device)
        check_model_options(cfg, self.model, self.n_classes, self.device)  # and G's contract, before training
        if cfg.memory_format == "channels_last":  # before the optimisers' state and the EMA copy exist
            for net in (self.model.G, self.model.D):
                if net is not None:
                    net.to(memory_format=torch.channels_last)
        self.optimizers = [opt for opt in (self.model.opt_g, self.model.opt_d) if opt is not None]
        for opt in self.optimizers:  # fp16: a loss scaler per optimiser (models/common.backward_step)
            opt.grad_scaler = make_grad_scaler(self.device) if self.precision == "fp16" else None
            if world.size > 1:  # every opt.step averages the gradients over the ranks first
                average_in_step(opt, world)
        self.log(f"precision  {why}")
        for line in filter(None, (settings_line(cfg, self.model), ema_line(cfg), plan_pending(cfg))):
            self.log(line)
        if world.size > 1:
            self.log(world_line(world, self.device, cfg))
        self.ema = Ema(self.model.G, cfg)  # G_ema, and any extra copies kept for evaluation
        if world.size > 1:  # one start for all ranks, then each its own batches and noise
            broadcast_state([m for m in (self.model.G, self.model.D, *self.ema.copies()) if m is not None],
                            world)
            seed_rank(cfg, world)
        self.step, self.images_seen = 0, 0  # steps, and real training images drawn so far (every rank's)
        self.batches_per_step = 1  # real batches one step draws (measured by train_step)
        self.safety = SafetyNet()  # the last good state, rollbacks
        self.loss_sum = None
        self.bn_refreshed = False  # standing batch-norm statistics in G_ema (the end's)
        self.written = Written()  # this run's last checkpoint and interim zip, the folder it continues
        self.grid_every = cfg.grid_every
        self.fixed_z, self.fixed_y = fixed_noise(cfg, self.n_classes, self.device)  # the progress grids'
        if world.main:
            os.makedirs(cfg.out, exist_ok=True)
            for name in remove_stale_temps(cfg.out):
                self.log(f"removed {name}, left half-written by an earlier run that was killed")

    def run(self):
        if self.plan.train_seconds is None:
            plan(self)
        if self.world.main:
            if self.written.continues:
                carry_log(self.written.continues, self.cfg.out, self.log)
            with atomic_path(os.path.join(self.cfg.out, "options.json")) as tmp, open(tmp, "w") as fh:
                json.dump(dict(dataclasses.asdict(self.given), world_size=self.world.size), fh, indent=2)
        try:
            failure = train_loop(self)
        except KeyboardInterrupt:
            if self.world.main:  # alone: the other ranks' random states are not in it
                path = save_checkpoint(self)
                self.log(f"interrupted: state saved to {path}; continue with --resume {path}")
            raise
        except Exception as exc:  # anything else: keep what the run has learnt
            failure = stopped_by(self, exc)
        if failure and not self.world.main:
            raise RankStopped(failure)
        return finish(self, failure)

def world_line(world, device, cfg):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    devices = all_objects(f"{device} {name}".strip(), world)
    backend = "nccl" if device.type == "cuda" else "gloo"
    return (f"world      {world.size} ranks ({backend}), one process each: "
            + ", ".join(f"rank {r} {d}" for r, d in enumerate(devices))
            + f"; global batch {world.size} x {cfg.batch_size} = {world.size * cfg.batch_size}, learning rates as set")

def fmt_time(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"

def train(cfg, model_cls, resume=None, data=None, clock=time.monotonic, log=print, hooks=(), t0=None, world=ALONE,
          same_session=False):
    trainer = Trainer(cfg, model_cls, data=data, clock=clock, log=log, hooks=hooks, t0=t0, world=world)
    if resume:
        load_checkpoint(trainer, resume, same_session)
    return trainer.run()


# ---------------------------------------------------------------------------------------------
# Entry point: Kaggle with no arguments, or locally with --data PATH --budget 8m --out DIR
# ---------------------------------------------------------------------------------------------
# On Kaggle the kernel trains only on the competition's photos and boxes (all-dogs.zip +
# Annotation.zip, unzipped, or Stanford Dogs' Images/ + Annotation/); other datasets are ignored.

KAGGLE_INPUT = "/kaggle/input"
KAGGLE_WORKING = "/kaggle/working"
KAGGLE_BUDGET = "8h45m"  # Kaggle stops a kernel at 9 h: keep 15 minutes to spare
KAGGLE_MARGIN = 15 * 60.0  # those 15 minutes: the wall is a kernel's budget plus these
NOTEBOOK_ARGS = ("-f",)  # what Jupyter adds to sys.argv (-f kernel.json): tolerated, nothing else is

def kaggle_paths():
    env = os.environ.get
    return env("DOGKIT_KAGGLE_INPUT", KAGGLE_INPUT), env("DOGKIT_KAGGLE_WORKING", KAGGLE_WORKING)

def _entries(path):
    try:
        return sorted(os.scandir(path), key=lambda e: e.name)
    except OSError:
        return []

def _has_photos(path):
    return any(e.is_file() and e.name.lower().endswith(PHOTO_EXTS) for e in _entries(path))

def _walk(root, depth=5):
    level = [root]
    for _ in range(depth):
        below = []
        for folder in level:
            entries = _entries(folder)
            yield folder, entries
            below += [e.path for e in entries if e.is_dir(follow_symlinks=False)]
        level = below

def find_competition_data(root):
    photos = layout = None
    for folder, entries in _walk(root):
        names = {e.name: e for e in entries}
        if "all-dogs" in names and names["all-dogs"].is_dir():
            inner = os.path.join(folder, "all-dogs", "all-dogs")
            photos = inner if _has_photos(inner) else names["all-dogs"].path
            layout = "competition files (all-dogs/)"
        elif "all-dogs.zip" in names:
            photos, layout = names["all-dogs.zip"].path, "competition files (all-dogs.zip)"
        elif "Images" in names and any(breed_of(e.name) for e in _entries(names["Images"].path)):
            photos, layout = names["Images"].path, "Stanford Dogs (Images/<synset>-<breed>/)"
        if photos:
            break
    if not photos:
        return None
    rel = os.path.relpath(photos, root).split(os.sep)
    dataset = os.path.join(root, rel[0])  # the attached dataset holding the photos
    annotations = None
    for folder, entries in _walk(dataset):
        names = {e.name: e for e in entries}
        if "Annotation" in names and names["Annotation"].is_dir():
            annotations = names["Annotation"].path
        elif "Annotation.zip" in names:
            annotations = names["Annotation.zip"].path
        if annotations:
            break
    return {"dataset": dataset, "photos": photos, "annotations": annotations, "layout": layout}

def ignored_inputs(root, dataset):
    return [e.path for e in _entries(root) if os.path.abspath(e.path) != os.path.abspath(dataset)]

def kaggle_data(root, log=print):
    found = find_competition_data(root)
    if found is None:
        raise RunError(f"no competition data under {root}: attach 'Generative Dog Images' (Add data -> "
                       "Competitions), or the Stanford Dogs dataset, to this notebook")
    log(f"data       {found['layout']} in {found['dataset']}")
    for folder in ignored_inputs(root, found["dataset"]):
        log(f"ignored    {folder}: not the competition's data, never trained on")
    photos, annotations = found["photos"], found["annotations"]
    if annotations is None:
        log("WARNING    no Annotation/ found: whole photos are used, not the dogs' boxes "
            "(attach the competition's Annotation.zip for far better crops)")
    return photos, annotations

# The command line of the kernel and `dogkit train`: every setting of SETTINGS as --name-with-dashes
# but NOT_OPTIONS, and these (flag, type, help): not settings, or their default depends on the place.
RUN_OPTIONS = (
    ("--data", str, "photos (any layout clean-data reads) or a cache .npz (Kaggle: found under /kaggle/input)"),
    ("--budget", str, f"wall clock for the whole run, the zip included: 30s, 8m, 9h (Kaggle: {KAGGLE_BUDGET}; 8m)"),
    ("--out", str, "output folder: images.zip, checkpoint.pt, log.jsonl, grids (Kaggle: its working; submission)"),
    ("--log-every", float, "seconds between log lines (default: 300 on Kaggle, else 30)"),
    ("--sessions", int, "sessions the run is planned over, --budget each, each continuing the last (--resume; on "
                        "Kaggle its output attached); default 1 (Kaggle: the kernel's KAGGLE_SESSIONS)"),
    ("--resume", str, "checkpoint.pt to continue from (same model and settings; a new --budget re-plans the end)"),
    ("--preset", str, "a published recipe over the model's settings, e.g. fifth-place (biggan); options still win"),
    ("--gpus", int, "GPUs to train on, one process each (default: every visible GPU; under torchrun: its own)"),
)
NOT_OPTIONS = ("model", "hard_limit")  # the model the kernel holds; Kaggle's wall, set by the kernel alone

def train_options():
    taken = {flag[2:].replace("-", "_") for flag, *_ in RUN_OPTIONS}
    out = [(flag, kind, None, text) for flag, kind, text in RUN_OPTIONS]
    for name, default, values, models, text in SETTINGS:
        if name not in taken and name not in NOT_OPTIONS:
            only = f"; read by {', '.join(models)}" if models else ""
            out.append(("--" + name.replace("_", "-"), type(default), values if isinstance(values, Choices) else None,
                        f"{text} (default: the model's{only})"))
    return out

def parse_args(argv):
    parser = argparse.ArgumentParser(description="Train a dog generator and write images.zip. Any setting of the "
                                     "settings cell can be given as --name-with-dashes: it wins over the cell.")
    parser.error = lambda message: stop(EXIT_USAGE, f"error: {message} (--help lists the options)")  # one line
    options = train_options()
    for flag, kind, choices, text in options:
        parser.add_argument(flag, type=kind, choices=choices, help=text)
    args, unknown = parser.parse_known_args(argv)
    stray = [a for a in unknown if a.startswith("-") and a not in NOTEBOOK_ARGS and not a.endswith(".json")]
    if stray:
        flags = [option[0] for option in options]
        hints = [a + "".join(f" (did you mean {m}?)" for m in difflib.get_close_matches(a.split("=")[0], flags, 1))
                 for a in stray]
        parser.error(f"unrecognized arguments: {' '.join(hints)}")
    return args

def with_preset(settings, presets, name):
    if not name:
        return settings
    if name not in (presets or {}):
        raise ValueError(f"preset {name!r}: " + (f"choose from {', '.join(presets)}" if presets else
                                                  "this model has no presets"))
    return {**settings, **presets[name]}

def config_from_options(settings, opts, on_kaggle=False, working=KAGGLE_WORKING, kaggle_budget=KAGGLE_BUDGET,
                        kaggle_sessions=1, presets=None, model=None):
    cfg = with_settings(TrainConfig(**({"model": model} if model else {})),
                        with_preset(settings, presets, opts.get("preset")))
    sessions = opts.get("sessions") or (kaggle_sessions if on_kaggle else 1)
    if sessions < 1:
        raise ValueError(f"sessions {sessions}: give 1 or more")
    overrides = {k: v for k, v in opts.items() if k in SETTING and k not in NOT_OPTIONS and v is not None}
    overrides.update({"data": opts.get("data") or "", "sessions": sessions,
                      "out": opts.get("out") or (working if on_kaggle else "submission"),
                      "budget": parse_budget(opts.get("budget") or (kaggle_budget if on_kaggle else "8m")),
                      # Kaggle's wall: its 9 hours, the kernel's budget and the builder's 15 minutes, less one
                      "hard_limit": parse_budget(kaggle_budget) + KAGGLE_MARGIN - 60.0 if on_kaggle else 0.0,
                      "log_every": opts["log_every"] if opts.get("log_every") is not None else
                      (300.0 if on_kaggle else 30.0)})
    cfg = with_settings(cfg, overrides)
    if output_problem(cfg.out, folder=True):
        raise RunError(f"--out {output_problem(cfg.out, folder=True)}")
    parse_snapshots(cfg.snapshots)
    parse_ema_extra(cfg.ema_extra)
    if model and unread_settings(cfg, model):
        raise ValueError("; ".join(unread_settings(cfg, model)))
    return cfg

def main(model_cls, settings, argv=None, kaggle_budget=KAGGLE_BUDGET, kaggle_sessions=1, presets=None, preset=None):
    t0 = time.monotonic()
    if argv is None:
        argv = [] if os.path.basename(sys.argv[0]).startswith("ipykernel") else sys.argv[1:]
    args = exit_on_error(lambda: parse_args(argv))
    args.kaggle_budget, args.kaggle_sessions, args.presets = kaggle_budget, kaggle_sessions, presets
    args.preset = args.preset or preset
    try:
        signal.signal(signal.SIGTERM, _interrupt)  # a stop from outside saves a checkpoint, like Ctrl-C
    except ValueError:  # not the main thread (some notebook runners): keep the default
        pass
    path = exit_on_error(lambda: run(model_cls, settings, args, t0))
    if path:  # rank 0 of a finished run: what to do with it
        show_results(os.path.dirname(path))
        print(f"next       score it with the competition's metric (dogkit's docs/scoring.md): dogkit score {path} "
              f"--reference data/ref.npz (made once by: dogkit reference PHOTOS -o data/ref.npz)", flush=True)
    return path

def show_results(out):
    if notebook_shell() is not None and os.path.exists(os.path.join(out, "samples.png")):
        show_png(os.path.join(out, "samples.png"))

class KernelStopped(Exception):
    """The run stopping in a notebook: the cell's error is its one line, nothing more."""

def _one_line(shell, etype, value, tb, tb_offset=None):
    shell._showtraceback(etype, value, [str(value)])  # the error IPython shows: the line alone

def stop(code, message=None):
    shell = notebook_shell()
    if shell is None:
        if message:
            print(message, file=sys.stderr, flush=True)
        sys.exit(code)
    shell.set_custom_exc((KernelStopped,), _one_line)
    raise KernelStopped(message or f"stopped with exit code {code} (the line above says why)")

def exit_on_error(fn, rank=None):
    who = f"rank {rank}: " if rank else ""
    try:
        return fn()
    except KernelStopped:  # stopped already, with its line
        raise
    except RankStopped:
        stop(EXIT_RANK_STOPPED)
    except SystemExit as exc:  # argparse's usage error, a rank's exit code passed on: said already
        if exc.code:
            stop(exc.code if isinstance(exc.code, int) else EXIT_USAGE)
        raise
    except (RunError, DataError, ValueError) as exc:
        stop(EXIT_BAD_INPUT, f"{who}error: {exc}")
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the trainer saved checkpoint.pt and said how to resume
        stop(EXIT_INTERRUPTED, None if rank else "error: interrupted; resume with --resume CHECKPOINT")
    except RunFailed as exc:
        stop(EXIT_TRAINING_FAILED, f"{who}error: " + (f"training failed ({exc.cause})" if rank else exc.line()))
    except (OSError, MemoryError) as exc:  # a disk, a file, the machine: one line
        stop(EXIT_BAD_INPUT, f"{who}error: {type(exc).__name__}: {exc}")
    except Exception as exc:  # nobody expected it: a bug, said in one line, the traceback kept in a file
        stop(BUG_EXIT, f"{who}error: internal error, a bug in dogkit ({type(exc).__name__}: {exc}); traceback in "
                       f"{save_traceback()}")

def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")

def world_size(gpus, device):
    if gpus is not None and gpus < 1:
        raise RunError(f"--gpus {gpus}: give 1 or more")
    cpu_ranks = int(os.environ.get("DOGKIT_CPU_RANKS") or 0)
    if device == "cpu" and cpu_ranks > 1:
        return cpu_ranks, "cpu"
    if device not in ("auto", "cuda") or gpus == 1:
        return 1, None
    n = visible_gpus()
    if gpus is not None and gpus > n:
        raise RunError(f"--gpus {gpus}: only {n} GPU(s) visible here")
    size = gpus or n
    return (size, "cuda") if size > 1 else (1, None)

def run(model_cls, settings, args, t0):
    input_root, working = kaggle_paths()
    on_kaggle = args.data is None and os.path.isdir(input_root)
    if args.data is None and not on_kaggle:
        raise RunError("--data is required outside Kaggle (a cache from `dogkit clean-data`, or photos)")
    cfg = config_from_options(settings, vars(args), on_kaggle, working, args.kaggle_budget, args.kaggle_sessions,
                              args.presets, model_cls.name)
    if args.preset:
        print(f"preset     {args.preset}: its settings over the model's (each cited to its source in the "
              f"settings), the options given here over both", flush=True)
    lock = claim_folder(cfg.out)  # before any work: two runs on one --out would interleave their files
    try:
        size, device_type = world_size(args.gpus, cfg.device)
        resume, ckpt = args.resume, None
        if on_kaggle and cfg.sessions > 1 and resume is None:
            resume, ckpt = earlier_session(input_root, cfg.out)
        if resume:  # refused in seconds, before any cleaning, when it cannot be continued
            ckpt = read_checkpoint(resume) if ckpt is None else ckpt
            print(f"continues  {check_continuation(ckpt, resume, cfg, model_cls.name)}", flush=True)
            del ckpt  # training loads it again, onto its device
        elif replaced := earlier_run_line(cfg.out):
            print(replaced, flush=True)
        if size == 1:
            device = pick_device(cfg.device, require_gpu=on_kaggle)  # seconds, before any cleaning
            return run_rank(ALONE, device, model_cls, cfg, resume, t0, on_kaggle)
        started = time.time()
        codes = launch(rank_main, size, device_type, (model_cls, cfg, resume, t0, on_kaggle))
        return after_ranks(codes, model_cls, cfg, t0, device_type, on_kaggle, resume, started)
    finally:
        release_folder(lock)

RUN_FILES = ("images.zip", "checkpoint.pt")  # what a run folder holds that a new run replaces

def earlier_run_line(out):
    found = [name for name in RUN_FILES if os.path.lexists(os.path.join(out, name))]
    if not found:
        return ""
    return (f"replaces   {', '.join(found)} in {out}, an earlier run's, as this run writes its own (--resume "
            f"{os.path.join(out, 'checkpoint.pt')} continues that run instead; another --out keeps it)")

def earlier_session(input_root, working):
    found = [os.path.join(working, "checkpoint.pt")] if os.path.isfile(os.path.join(working, "checkpoint.pt")) else []
    found += [e.path for _, entries in _walk(input_root, depth=4) for e in entries
              if e.name == "checkpoint.pt" and e.is_file()]
    if not found:
        print(f"continues  nothing yet: no checkpoint.pt under {input_root} or in {working}, so this is the first "
              f"session (from the next one on, attach this notebook's output: Add Input -> Your Work)", flush=True)
        return None, None
    progress, best, kept = {}, None, None
    for path in found:  # each read once; only the furthest on is kept in memory
        ckpt = read_checkpoint(path)
        progress[path] = (ckpt.get("session", 1), ckpt["step"])
        if best is None or progress[path] > progress[best]:
            best, kept = path, ckpt
    for path in found:
        if path != best:
            print(f"ignored    {path} (session {progress[path][0]}, step {progress[path][1]}): {best} is further "
                  f"on", flush=True)
    return best, kept

def rank_main(world, device, model_cls, cfg, resume, t0, on_kaggle):
    exit_on_error(lambda: run_rank(world, device, model_cls, cfg, resume, t0, on_kaggle), world.rank)
    return 0

def run_rank(world, device, model_cls, cfg, resume, t0, on_kaggle, same_session=False):
    if world.size > 1:
        device = check_devices(world, device, on_kaggle)
    if world.main:
        print("\n".join(machine_lines(device)), flush=True)
    cfg = with_settings(cfg, {"device": str(device)})

    def load():
        photos, annotations = (kaggle_data(kaggle_paths()[0]) if on_kaggle
                               else (cfg.data, None))
        data = load_dataset(photos, cfg.image_size, cfg.strategy, annotations=annotations, progress=True,
                            log=lambda m: print(m, flush=True))
        for line in summary_lines(data["summary"]):
            print(line, flush=True)
        return dict(data, source=photos)

    data = on_main(load, world)  # cleaning runs once; every rank gets the result
    cfg = with_settings(cfg, {"data": data.pop("source")})
    return train(cfg, model_cls, resume=resume, data=data, t0=t0, world=world, same_session=same_session)

def check_devices(world, device, on_kaggle):
    try:
        device, problem = pick_device(str(device), require_gpu=on_kaggle), None
    except RunError as exc:
        problem = str(exc)
    for rank, problem in enumerate(all_objects(problem, world)):
        if problem:
            raise RunError(f"rank {rank}: {problem}") if world.main else RankStopped(problem)
    return device

def after_ranks(codes, model_cls, cfg, t0, device_type, on_kaggle, resume=None, started=0.0):
    if codes[0] == EXIT_INTERRUPTED:
        raise KeyboardInterrupt  # rank 0 saved checkpoint.pt
    if codes[0] in (EXIT_BAD_INPUT, EXIT_USAGE, EXIT_TRAINING_FAILED):  # rank 0 said why (and wrote the zip)
        sys.exit(codes[0])
    if codes[0] == 0:
        return os.path.join(cfg.out, "images.zip")
    checkpoint = os.path.join(cfg.out, "checkpoint.pt")
    ours = os.path.exists(checkpoint) and os.path.getmtime(checkpoint) >= started
    resume = checkpoint if ours else resume
    device = "cuda:0" if device_type == "cuda" else "cpu"
    left = t0 + cfg.budget - time.monotonic()
    cause = f"rank 0 exited with code {codes[0]} (ranks: {codes})"
    print(f"error: {cause}; going on in one process on {device} from {resume or 'the start'} for the "
          f"{left:.0f} s left", file=sys.stderr, flush=True)
    if cfg.sessions > 1:  # this session's clock and plan go on (or it starts again from the last session's)
        clock, cfg_left = t0, cfg
    else:  # one session: the budget counts the checkpoint's time
        done = read_checkpoint(resume)["elapsed"] if resume else 0.0
        clock, cfg_left = time.monotonic(), with_settings(cfg, {"budget": done + left})
    try:
        return run_rank(ALONE, pick_device(device), model_cls, cfg_left, resume, clock, on_kaggle,
                        same_session=ours and cfg.sessions > 1)
    except RunError as exc:  # too little time left to train, or the device cannot run
        if resume is None:
            raise
        print(f"error: {exc}; sampling {resume} instead", file=sys.stderr, flush=True)
    path, step = zip_from_checkpoint(resume, model_cls, t0 + cfg.budget, device="cpu")
    raise RunFailed(f"{cause}; images.zip sampled on the CPU from {resume} (step {step})", path)


if __name__ == "__main__":
    main(CVAE, CVAE_SETTINGS, kaggle_budget="8h45m", kaggle_sessions=KAGGLE_SESSIONS)  # Kaggle allows 9h a session: 15 minutes to spare
