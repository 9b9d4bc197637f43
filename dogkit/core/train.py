# ---------------------------------------------------------------------------------------------
# Training: a wall-clock schedule, EMA, checkpoints, NaN rollback and the final images.zip
# ---------------------------------------------------------------------------------------------
# Everything follows progress p = elapsed / training time, so the same file adapts to any GPU;
# training stops early enough for the end (sampling, the zip) to fit the budget. Nothing that goes
# wrong after the first good step loses the run: it rolls back to the last good state, writes
# images.zip from it and only then reports the failure (RunFailed).
import copy
import dataclasses
import json
import math
import os
import random
import re
import tempfile
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F

from dogkit.core.augment import random_resized_crop_flip, to_float
from dogkit.core.data import WriteError, atomic_path, load_dataset, remove_stale_temps
from dogkit.core.distributed import (ALONE, RankStopped, agree, all_mean, all_objects, average_in_step, broadcast_state,
                                     gather_objects, on_main)
from dogkit.core.runtime import RunError, make_grad_scaler, pick_device, resolve_precision
from dogkit.core.settings import SETTING, TRUNCATION_FROM_PLAN, TrainConfig, reads, unread_settings
from dogkit.core.sample import (OutOfTime, encode_pngs, generate, save_grid, show_png, to_uint8, verify_zip,
                                write_zip)


# The best truncation measured at a number of passes over the photos (log-linear between, held beyond):
# 75 passes, biggan's 8-minute H100 sweep: 1.5 (MiFID 82.70, 87.36 at 1; the ledger's "sweep" rows);
# 300 passes, the CPU proxies (120 crops; README, Models): 0.8 best or tied with 1 on 8 of 9 arm-seeds
# (1 ahead on one), 1.5 and none behind. The winners' 9-hour runs (~700 passes) sampled at 0.8 and 1.0.
TRUNCATION_BY_PASSES = ((75.0, 1.5), (300.0, 0.8))


class RunFailed(RuntimeError):
    """Training stopped on an error, a NaN storm or the clock; zip_path: the zip still written.

    Training stopped on an error, a NaN storm or the clock; `zip_path` is the images.zip the
    run still wrote (from the last good generator), or None."""

    def __init__(self, cause, zip_path=None):
        super().__init__(cause)
        self.cause, self.zip_path = cause, zip_path

    def line(self):
        """The one line every command and kernel ends a failed run with (after 'error: ')."""
        kept = f"{self.zip_path} was still written from the last good generator" if self.zip_path else \
            "no images.zip from this run"
        return f"training failed ({self.cause}); {kept}"


def parse_snapshots(text):
    """'0.25,0.5' -> [0.25, 0.5]: progress points in (0, 1) where a run keeps a checkpoint copy."""
    points = sorted(float(t) for t in str(text).replace(" ", "").split(",") if t)
    if any(not 0.0 < x < 1.0 for x in points):
        raise ValueError(f"snapshots {text!r}: progress points must lie strictly between 0 and 1")
    return points


def lr_multiplier(p, cfg):
    if p <= cfg.lr_decay_start:
        return 1.0
    t = min(1.0, (p - cfg.lr_decay_start) / max(1e-9, 1.0 - cfg.lr_decay_start))
    return cfg.lr_final + (1.0 - cfg.lr_final) * 0.5 * (1.0 + math.cos(math.pi * t))


def half_life_weight(kimg, cfg, images_seen, world_size=1):
    """The extra EMA copies' rule (StyleGAN2-ADA's): the new parameters' weight for a half-life of
    kimg thousand images, at most cfg.ema_rampup of the images seen so far."""
    half_life = min(kimg * 1000.0, cfg.ema_rampup * images_seen)
    return 1.0 - 0.5 ** (cfg.batch_size * world_size / max(half_life, 1e-8))


def ema_weight(p, cfg, world_size=1):
    """Weight of the new parameters in the EMA update: 1 (a plain copy) until ema_start, then
    1 - ema_decay per batch_size images (a step of N GPUs decays by its N-th power: the average
    spans the same images on one GPU or two)."""
    return 1.0 if p < cfg.ema_start else 1.0 - cfg.ema_decay ** world_size


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


def ema_line(cfg):
    """The start block's line on the EMA: its half-life in images, whatever the number of GPUs."""
    if cfg.ema_fraction > 0:
        return (f"EMA        half-life {cfg.ema_fraction:.0%} of the images the run will show (set from the pace), "
                f"from p={cfg.ema_start:g}, on any number of GPUs")
    start = f"decay {cfg.ema_decay:g} per {cfg.batch_size} images from p={cfg.ema_start:g}"
    if not 0 < cfg.ema_decay < 1:
        return f"EMA        {start}: " + ("G_ema is G" if cfg.ema_decay == 0 else "G_ema stays as G was then")
    half = math.log(0.5) / math.log(cfg.ema_decay) * cfg.batch_size
    return f"EMA        {start}: a half-life of {half / 1000:,.1f}k images on any number of GPUs"


def settings_line(cfg, model):
    """The start block's line on what shapes the samples.

    Batch, learning rates, augmentation, LeCam (for a model that reads it) and the sampling
    truncation, whichever cell or option set them."""
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
    """300, or 2.7 for fewer than 10 passes (one decimal; 3, not 3.0): the regime at a glance."""
    return f"{passes:,.0f}" if passes >= 10 else f"{passes:.1f}".removesuffix(".0")


def passes_words(passes):
    """'1 pass', '0.4 passes', '300 passes'."""
    text = passes_text(passes)
    return f"{text} pass" if text == "1" else f"{text} passes"


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


def plan_line(cfg, values, planned_images, n_photos, source):
    """The log line of the settings that follow the plan: each with the plan figure it came from."""
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
    """Set the settings the run leaves to its plan from the images it will show, and log them.

    Set the settings the run leaves to its plan (from_plan) from the images it will show, log
    them with that figure and keep them for the checkpoint; the settings as given stay in
    options.json. Nothing when the run sets them all itself."""
    values = from_plan(tr.given, planned_images, len(tr.images))
    if values:
        tr.planned = {"images": float(planned_images), "source": source, **values}
        tr.cfg = dataclasses.replace(tr.cfg, **values)
        tr.log(plan_line(tr.given, values, planned_images, len(tr.images), source))


def plan_pending(cfg):
    """In words, what the run leaves to its plan (for the start block), or ''."""
    parts = [f"EMA half-life {cfg.ema_fraction:.0%} of the images the run will show"] if cfg.ema_fraction > 0 else []
    parts += ["truncation from the passes it will make"] if cfg.truncation == TRUNCATION_FROM_PLAN else []
    return ("from plan  " + " and ".join(parts) + ": set from the pace, a tenth into training") if parts else ""


def parse_ema_extra(text):
    """'2,10,50' -> [2.0, 10.0, 50.0]: the half-lives (kimg) of the extra EMA copies."""
    values = [float(t) for t in str(text).replace(" ", "").split(",") if t]
    if any(v <= 0 for v in values):
        raise ValueError(f"ema_extra {text!r}: half-lives in thousands of images, each above 0")
    return values


REFRESH_BATCHES = 64


def batchnorms(G):
    return [m for m in G.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def refresh_images(G, cfg):
    """How many images refresh_batchnorm generates (0 for a generator without batch norm)."""
    return REFRESH_BATCHES * 4 * cfg.batch_size if batchnorms(G) else 0


@torch.no_grad()
def refresh_batchnorm(G, cfg, n_classes, device):
    """Re-estimate the batch-norm statistics of G from fresh samples (standing statistics).

    Standing statistics: batch-norm running stats of the EMA generator re-estimated from
    fresh samples (cumulative average), since averaged weights do not match G's own stats."""
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
    """The training photos as one NCHW uint8 tensor on the device, and their labels.

    The training photos as one NCHW uint8 tensor on the device (and their labels), for the
    whole run: batches are drawn there with no host round trip."""
    images = torch.from_numpy(np.ascontiguousarray(data["images"])).permute(0, 3, 1, 2).contiguous()
    return images.to(device), torch.as_tensor(np.asarray(data["labels"]), dtype=torch.long).to(device)


# ---- the step: a batch from the resident data, the model's update, the EMA (eager or captured) ---

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


def progress(tr):
    """p from 0 to 1: the share of the run's training time spent, or of cfg.steps done when further.

    A run that --steps ends has its schedule (learning-rate decay, EMA start, snapshots) end with
    it, not wherever the clock had got to."""
    p = tr.plan.elapsed / max(tr.plan.train_seconds, 1e-9)
    return max(p, tr.step / tr.cfg.steps) if tr.cfg.steps else p


def count_step(tr):
    """One more step done: the step counter and the real images seen (every rank's)."""
    tr.step += 1
    tr.images_seen += tr.batches_per_step * tr.cfg.batch_size * tr.world.size


def set_schedule(tr, p):
    """The learning rates and the EMA weights at progress p."""
    scale = lr_multiplier(p, tr.cfg) * tr.safety.lr_scale
    for opt, base in ((tr.model.opt_g, tr.cfg.lr_g), (tr.model.opt_d, tr.cfg.lr_d)):
        for group in (opt.param_groups if opt is not None else ()):
            group["lr"] = base * scale
    if tr.given.ema_fraction > 0 and tr.planned is None and p >= tr.cfg.ema_start and tr.images_seen and p > 0:
        follow_plan(tr, tr.images_seen / p, f"estimated at p={p:.2f}, before the pace")  # ema_start before REPLAN_AT
    tr.ema.set_weights(p, tr.cfg, tr.images_seen, tr.world.size)


class Plan:
    """The time plan: how far the run is, when this session's training stops, the sessions.

    The part that owns the clock readings every decision reads: elapsed counts the whole run's
    time (a resumed run's earlier sessions included), p = elapsed / train_seconds, and this
    session trains until elapsed reaches session_end. t0 is the clock reading the budget counts
    from (data cleaning included)."""

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
        """The checkpoint's entries."""
        return {"elapsed": self.elapsed, "train_seconds": self.train_seconds, "session": self.session,
                "session_start": self.session_start, "session_end": self.session_end,
                "per_session": self.per_session}

    def resume(self, ckpt, cfg, same_session=False):
        """The plan of a checkpoint's run, going on.

        In the same session (same_session: one process going on after rank 0 died), in the next
        one (cfg.sessions > 1: re-timed), or alone (the same budget keeps the same schedule; a new
        --budget re-plans the end)."""
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
    """Every tensor that defines the training state, for in-place copies."""
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
    """The last good training state and the rollbacks to it.

    The part that owns them: a rollback restores the state kept last and halves the learning rate
    from there on (lr_scale); after max_rollbacks the run stops training and writes its zip."""

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
        """Restore the last good state and halve the learning rate."""
        self.restore(tensors)
        self.rollbacks += 1
        self.lr_scale *= 0.5

    def state(self):
        """The checkpoint's entries."""
        return {"lr_scale": self.lr_scale, "rollbacks": self.rollbacks}

    def load(self, ckpt):
        self.lr_scale, self.rollbacks = ckpt["lr_scale"], ckpt["rollbacks"]


def keep_good_state(tr):
    tr.safety.keep(state_tensors(tr))


def restore_good_state(tr):
    tr.safety.restore(state_tensors(tr))


def tell_others(tr):
    """A rank that failed tells the others (they stop at their next step's agree)."""
    try:
        agree(tr.world, tr.clock(), failed=True)
    except Exception:  # the group itself broke: the peers see the lost connection
        pass


def rollback(tr, reason):
    tr.safety.roll_back(state_tensors(tr))
    tr.log(f"rollback #{tr.safety.rollbacks} to the last good state ({reason}); lr x{tr.safety.lr_scale:g}")


def stopped_by(tr, exc):
    """The cause of an error in the loop, with the last good state restored for the end.

    An error in the loop: the cause, with the last good state restored for the end (rank 0);
    raised again when there is no good state yet, RunFailed on the other ranks."""
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
    """Every random stream's state as tensors, numbers, strings and lists (readable as data)."""
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
    """Each rank's own random stream (its real batches and noise) in a multi-GPU run."""
    torch.manual_seed(cfg.seed + 100_003 * (world.rank + 1) + 7 * step)


def checkpoint_together(tr, name="checkpoint.pt"):
    """save_checkpoint at a point every rank reaches together, every rank's random state in it.

    save_checkpoint at a point every rank reaches together: every rank's random state goes in
    (rank 0 writes), so a resume at the same world size continues exactly."""
    states = gather_objects(rng_state(tr), tr.world)
    return save_checkpoint(tr, name, states) if tr.world.main else None


def save_checkpoint(tr, name="checkpoint.pt", rank_rngs=None, folder=None):
    """Write the whole training state atomically to folder/name (folder: the run's output)."""
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
    """A checkpoint file read as data only, checked.

    A checkpoint file read as data only (torch.load with weights_only: tensors, numbers,
    strings, lists, dicts; a pickle that would run code is refused, never executed). RunError,
    one line naming the file, for anything else: missing, truncated, another format."""
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
    """The training settings in which cfg differs from a checkpoint's, in words.

    The training settings (all but the model and RUN_SETTINGS) in which cfg differs from a
    checkpoint's saved config, as 'name saved (this run: value)'."""
    defaults = dataclasses.asdict(TrainConfig())
    return [f"{k} {saved.get(k, v0)!r} (this run: {getattr(cfg, k)!r})" for k, v0 in defaults.items()
            if k not in RUN_SETTINGS and k != "model" and saved.get(k, v0) != getattr(cfg, k)]


def check_continuation(ckpt, path, cfg, model_name, next_session=True):
    """A RunError naming the difference unless checkpoint ckpt can be continued under cfg.

    A RunError, one line naming the difference, unless checkpoint ckpt (read from path) can be
    continued by a run of model_name under cfg: the same model, the same training settings and,
    when the run is planned over sessions, a session still to come. Returns what it continues,
    for the start block."""
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
    """Load the whole training state. With cfg.sessions > 1 the checkpoint's run goes on in the
    next session (this process's clock, the plan re-timed), unless same_session (a multi-GPU run
    going on in one process after rank 0 died); with one session, --budget counts the previous
    runs' time too."""
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
    """Copy the earlier run's log.jsonl into the output folder when that is another one.

    The earlier run's log.jsonl (beside the checkpoint a run continues) copied into the output
    folder when that is another one (a new Kaggle session writes to an empty /kaggle/working), so
    the log holds the whole run; an output folder that already has a log keeps its own."""
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
    """What this run has written to its output folder: the end keeps or replaces by it.

    The part that owns it: the step of this run's last checkpoint.pt and interim images.zip there
    (None: none yet; an earlier run's files there are not this run's), and the folder of the
    checkpoint it continues."""

    def __init__(self):
        self.checkpoint_step = self.zip_step = self.continues = None

    def checkpoint(self, step):
        self.checkpoint_step = step

    def zip(self, step):
        self.zip_step = step

    def resumed(self, path, out, step):
        """A run resumed from checkpoint `path`: in its own folder, that checkpoint is this run's."""
        self.continues = os.path.dirname(os.path.abspath(path))
        if self.continues == os.path.abspath(out):
            self.checkpoint_step = step


# ---- the plan: how long the end takes, how long training gets ---------------------------

def measure_end(tr):
    """Seconds the end of the run takes on this device, timed on its real path, and the parts.

    Seconds the end of the run takes on this device, timed on its real path: the model's
    preparation for sampling (cvae: K-means of the training latents; timed on a subset and
    scaled), the batch-norm refresh and n_samples images in the sampling batch shape (second
    pass: the first pays cuDNN's autotuning), PNG encoding of real training photos (more
    detail than an untrained generator's flat images, so an upper bound) and a checkpoint
    (written to a scratch folder: a start refused for a short budget leaves the output folder,
    and any trained checkpoint.pt in it, as they were).
    Returns (seconds x1.25 + 3 s, the parts)."""
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
    """The elapsed time from which this process's --budget counts.

    Its session's start when the run is planned over sessions, else 0 (a resumed run's budget
    includes the earlier runs)."""
    return tr.plan.session_start if tr.cfg.sessions > 1 else 0.0


def sessions_plan(tr, reserve):
    """(session_end, train_seconds, per_session) for an end that needs `reserve` seconds.

    This session trains until its budget's end minus the reserve; the run's training time counts the
    sessions still to come as long as this one's training."""
    session_end = budget_start(tr) + tr.cfg.budget - reserve
    per_session = session_end - (tr.clock() - tr.plan.t0 + tr.plan.session_start)  # from now: data loading is spent
    return session_end, session_end + max(0, tr.cfg.sessions - tr.plan.session) * per_session, per_session


def plan(tr):
    """Fix the plan, timed on rank 0 and the same on every rank.

    Fix the plan (sessions_plan: the budget minus the end's reserve), timed on rank 0 (sampling
    all alone: an upper bound when the ranks share it) and the same on every rank."""
    tr.plan.fix(*on_main(lambda: planned_seconds(tr), tr.world))


def planned_seconds(tr):
    """sessions_plan with the end timed on this device; a budget too short is refused."""
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
    """The images the run will have shown by the end of training at the pace since `since`.

    `since`: (elapsed, images_seen) when this process's training began; at_most: what --steps
    lets it show."""
    rate = (images_seen - since[1]) / max(elapsed - since[0], 1e-9)
    return min(at_most, images_seen + rate * max(train_seconds - elapsed, 0.0))


def pace_line(images_seen, since, elapsed, train_seconds, n_photos, at_most=math.inf):
    """What the run will show at this pace, in words.

    What the run will show at this pace (planned_images); the passes over the photos name the
    regime (a 9-hour T4 x2 run: hundreds)."""
    rate = (images_seen - since[1]) / max(elapsed - since[0], 1e-9)
    total = planned_images(images_seen, since, elapsed, train_seconds, at_most)
    return (f"at {rate:,.0f} images/s, about {total:,.0f} images by the end of training: "
            f"{passes_words(total / max(n_photos, 1))} over the {n_photos:,} photos")


def replan(tr):
    """Time the end again once training is warm and move the end of training to fit it.

    Later when the first timing took too much (at start-up a fresh machine's cold caches can make
    the end look several times longer than it is: a CPU run measured 200 s for 30 s of sampling, and
    every second kept for nothing is a second not trained), earlier when the machine got busier and
    the end is now slower, but never before now. Rank 0 times it; every rank gets the same plan."""
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
    """At a tenth of the session's training: time the end again, log the pace, follow the plan.

    At a tenth of the session's training: the end timed again (a measured reserve) and the pace
    (pace_line, timed from `since`) logged. True."""
    if tr.cfg.reserve < 0:
        replan(tr)
    cap = tr.images_seen / max(tr.step, 1) * tr.cfg.steps if tr.cfg.steps else math.inf  # --steps: no more
    pace = (tr.images_seen, since, tr.plan.elapsed, tr.plan.train_seconds)
    tr.log("pace       " + pace_line(*pace, len(tr.images), at_most=cap))
    follow_plan(tr, planned_images(*pace, at_most=cap), "the pace")
    return True


# ---- logs, pictures and interim zips -----------------------------------------------------

def log_interval(tr, p, steps, seconds):
    """Write a log line and a log.jsonl record; False (after a rollback) on a NaN or diverged loss.

    Read the accumulated losses (the only host sync), write a log line and a log.jsonl record;
    False (after a rollback) on NaN or a diverged loss."""
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
    """Write grid-STEP.png, thinning older grids so a long run keeps a few.

    grid-STEP.png; past keep_grids files every other older one goes and the interval doubles,
    so a 9-hour run keeps a few evenly spaced grids, never hundreds. In a notebook it shows in the
    cell's output too."""
    save_fixed_grid(tr, f"grid-{tr.step:07d}.png")
    show_png(os.path.join(tr.cfg.out, f"grid-{tr.step:07d}.png"))
    grids = sorted(f for f in os.listdir(tr.cfg.out) if re.fullmatch(r"grid-\d{7}\.png", f))
    if len(grids) > max(2, tr.cfg.keep_grids):
        for name in grids[1:-1:2]:
            os.remove(os.path.join(tr.cfg.out, name))
        tr.grid_every *= 2


def prepare_for_sampling(tr, G):
    """Prepare G for sampling: the model's own step, then standing batch-norm statistics.

    What sampling needs beyond the weights: the model's own step (cvae: clusters of the
    training latents) and standing batch-norm statistics."""
    if hasattr(tr.model, "before_sampling"):
        tr.model.before_sampling(G, to_float(tr.images))
    refresh_batchnorm(G, tr.cfg, tr.n_classes, tr.device)


def sample_zip(tr, G, deadline=None, world=ALONE):
    """images.zip from G. With several ranks each samples its slice (rank 0 samples a slice
    another rank could not), rank 0 gathers them and writes the zip; the others return None."""
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
    """The truncation to sample with (0: none).

    The setting, or, left to the plan and no plan made yet (a run that ended before its pace), the
    one for the passes it made."""
    t = cfg.truncation
    return truncation_for_passes(images_seen / max(n_photos, 1)) if t == TRUNCATION_FROM_PLAN else t


def zip_images(images, cfg, deadline=None, clock=time.monotonic):
    path = write_zip(images, os.path.join(cfg.out, "images.zip"), deadline=deadline, clock=clock)
    verify_zip(path, n=cfg.n_samples)  # Kaggle's 10,000, or the count a shorter run asked for
    return path


def interim_zip(tr):
    """Write images.zip from a copy of the EMA generator now (insurance); a failure is logged.

    images.zip from a copy of the EMA generator now: a valid submission exists from the first
    hour on, whatever happens later. A failure here is logged, not fatal."""
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
    """The EMA generator finite (else the last good state) with what sampling needs."""
    if not all(torch.isfinite(v).all() for v in tr.ema.G.state_dict().values() if v.is_floating_point()):
        tr.log("EMA generator is not finite: using the last good state")
        rollback(tr, "non-finite weights at the end")
    prepare_for_sampling(tr, tr.ema.G)
    tr.bn_refreshed = True


def kept_zip(tr):
    """In words, the images.zip in the output folder when it is this run's, else None.

    In words, the images.zip in the output folder when it is this run's (an interim one, or one
    written before this run was resumed there), else None (none, or an earlier run's: replaced)."""
    if not os.path.exists(os.path.join(tr.cfg.out, "images.zip")):
        return None
    if tr.written.zip_step is not None:
        return f"the interim images.zip of step {tr.written.zip_step} is kept"
    if tr.written.continues and os.path.abspath(tr.written.continues) == os.path.abspath(tr.cfg.out):
        return "the images.zip written before this run was resumed is kept"
    return None


def end_deadline(tr):
    """(the clock reading the end must finish by, the budget's own end). The budget is a plan:
    with an images.zip of this run in the output folder (kept_zip), sampling stops at its end rather
    than overrun and that zip is kept; with none, a good generator is never thrown away for want of
    time, and the end runs on up to the platform's own wall (hard_limit from this process's start:
    a Kaggle kernel's 9 hours), with no wall at all for a local run."""
    end = tr.plan.t0 - tr.plan.session_start + budget_start(tr) + tr.cfg.budget  # on tr.clock, the zip included
    if kept_zip(tr):
        return end, end
    return (tr.plan.t0 + tr.cfg.hard_limit if tr.cfg.hard_limit > 0 else math.inf), end


def finish(tr, failure=None):
    """The end: the final checkpoint, a grid and images.zip, all before the deadline.

    Standing BN stats for the EMA, the final checkpoint, a grid and images.zip, all before the
    deadline (end_deadline): sampling stops (keeping any earlier images.zip) rather than overrun.
    Several ranks share the sampling when none failed; after a failure rank 0 ends alone."""
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
    """finish() on a rank other than 0: its random state and its slice of the images to rank 0.

    finish() on a rank other than 0: its random state into the checkpoint, its slice of the
    images to rank 0 (or the error, and rank 0 samples that slice)."""
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
    """The end could not write an output (WriteError): sampling again would meet the same disk."""
    path, ours = os.path.join(tr.cfg.out, "images.zip"), kept_zip(tr)
    kept = ours or ("the images.zip there is an earlier run's, not this one's" if os.path.exists(path) else
                    "no images.zip written")
    return RunFailed(f"{failure + '; ' if failure else ''}{exc} ({kept})", path if ours else None)


def zip_from_checkpoint(path, model_cls, deadline=None, clock=time.monotonic, device="cpu"):
    """Write images.zip beside checkpoint `path` from its EMA generator; returns (zip, step).

    images.zip beside checkpoint `path`, from its EMA generator rebuilt on `device`, before the
    deadline: the last resort when the training device (or a rank) died. Returns (zip, step)."""
    device = torch.device(device)
    ckpt = read_checkpoint(path, device)
    G, cfg = ema_generator(ckpt, model_cls, device)
    cfg = dataclasses.replace(cfg, out=os.path.dirname(os.path.abspath(path)))
    truncation = sampling_truncation(cfg, ckpt["images_seen"], 1)  # a checkpoint's is the one it samples with
    images = generate(G, cfg.n_samples, cfg.z_dim, truncation, ckpt["n_classes"], device=device, seed=cfg.seed,
                      deadline=deadline, clock=clock)
    return zip_images(images, cfg, deadline, clock), ckpt["step"]


def ema_generator(ckpt, model_cls, device, which=None):
    """(the EMA generator of a loaded checkpoint, rebuilt on device in eval mode, its TrainConfig).

    which: the index of an extra EMA copy (ema_extra) instead. One written mid-run (periodic,
    snapshot, interrupt), and every extra copy, gets its batch-norm statistics re-estimated
    first, as the run's end does for G_ema."""
    given = {k: v for k, v in ckpt["config"].items() if k in SETTING}  # a retired setting (graph) is passed over
    cfg = dataclasses.replace(TrainConfig(**given), device=str(device))
    G = model_cls(cfg, ckpt["n_classes"], device).G
    G.load_state_dict(ckpt["G_ema"] if which is None else ckpt["G_ema_extra"][which])
    if which is not None or not ckpt.get("bn_refreshed", True):
        refresh_batchnorm(G, cfg, ckpt["n_classes"], device)
    return G.eval(), cfg


def seed_and_tune(cfg, device):
    """The run's seeds, and TF32 and cuDNN's autotuner on CUDA (fp32 matmuls in TF32)."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def check_model_options(cfg, model, n_classes=None, device="cpu"):
    """Refuse the settings the model does not read, and a model that breaks its contract.

    Settings the model does not read (unread_settings), and (given n_classes) the built model's
    own contract (generator_problem): an error listing each problem, rather than silently nothing or
    a traceback mid-run."""
    problems = unread_settings(cfg, model.name)
    broken = generator_problem(model, cfg, n_classes, device) if n_classes is not None else None
    if problems or broken:
        raise ValueError("; ".join(problems + ([f"model check: {broken}"] if broken else [])))


@torch.no_grad()
def generator_problem(model, cfg, n_classes, device):
    """Why the model's G breaks the contract a run relies on, or None.

    Why the model's G breaks the contract a run relies on (G(z, labels) -> N x 3 x 64 x 64 images),
    tried on 2 images of the last breed before any training, in one line naming the call; or None.
    An edited model fails here in a second, not after the data is cleaned or at the end."""
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
    """The EMA generator: a frozen copy of G in eval mode."""
    G_ema = copy.deepcopy(G).eval()
    for p in G_ema.parameters():
        p.requires_grad_(False)
    return G_ema


def fixed_noise(cfg, n_classes, device):
    """The z (seed 1234) and breeds of the 64 progress-grid images: the same in every grid of a run."""
    z = torch.randn(64, cfg.z_dim, generator=torch.Generator().manual_seed(1234)).to(device)
    return z, ((torch.arange(64) % max(n_classes, 1)).to(device) if n_classes else None)


class Trainer:
    """Holds the models, the resident data and the schedule; `run()` trains and writes images.zip."""

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
        """Train until the budget's training time (or cfg.steps), then finish. Returns the zip path;
        raises RunFailed, after writing the zip, when training stopped on an error or a NaN storm."""
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


def world_line(world, device, cfg):
    """The start block's line on the ranks: each one's device, the global batch."""
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
    """Train model_cls under cfg (resuming from a checkpoint if given); returns the images.zip path.

    Train model_cls under cfg (resuming from a checkpoint if given: load_checkpoint); returns the
    zip path (None on ranks other than 0). Raises RunFailed (after writing the zip from the last
    good state) when training broke off. world: this process's rank (distributed.join_world);
    data is only needed on rank 0."""
    trainer = Trainer(cfg, model_cls, data=data, clock=clock, log=log, hooks=hooks, t0=t0, world=world)
    if resume:
        load_checkpoint(trainer, resume, same_session)
    return trainer.run()

