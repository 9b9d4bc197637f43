# ---------------------------------------------------------------------------------------------
# Settings: every training setting, declared once
# ---------------------------------------------------------------------------------------------
# One row per setting: (name, default, values: (low, high), Choices(...) or None for any text; the
# models that read it, None for all; help). TrainConfig, its checks, the command-line options and
# the queues derive from it; a setting the model does not read is refused (unread_settings).
import dataclasses
import math
import re

from dogkit.core.data import CROP_SIZES, STRATEGIES
from dogkit.core.runtime import PRECISIONS
from dogkit.core.sample import TRUNCATION_MAX, truncation_problem

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
    """'30s', '8m', '9h', '1h30m' -> seconds (a number, not text, is taken as seconds). A bare
    number as text is refused: '--budget 9' could mean 9 hours as easily as 9 seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smh])", str(text).strip().lower())
    if not parts or "".join(a + b for a, b in parts) != str(text).strip().lower():
        raise ValueError(f"budget {text!r}: give a number with its unit, e.g. 30s, 8m, 9h or 1h30m")
    return sum(float(a) * {"s": 1, "m": 60, "h": 3600}[b] for a, b in parts)


def setting_problem(name, value):
    """Why value cannot be setting name (its type, choices or range), or None; value as given."""
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
    """A copy of cfg with settings applied, every wrong one refused.

    A copy of cfg with settings applied; an unknown name, a wrong type or a value outside its
    choices or range is an error listing every such setting, not a no-op."""
    problems = [f"unknown setting {k!r}" for k in sorted(set(settings) - set(SETTING))]
    problems += [p for p in (setting_problem(k, v) for k, v in settings.items() if k in SETTING) if p]
    if problems:
        raise ValueError("; ".join(problems))
    if "ema_fraction" not in settings and "ema_decay" in settings:
        settings = {**settings, "ema_fraction": 0.0}  # an EMA decay given explicitly wins over one left to the plan
    floats = {k: float(v) for k, v in settings.items() if isinstance(SETTING[k][1], float)}
    return dataclasses.replace(cfg, **{**settings, **floats})


def reads(model_name, name):
    """Whether model model_name reads setting name (SETTINGS' models column)."""
    models = SETTING[name][3]
    return models is None or model_name in models


def unread_settings(cfg, model_name):
    """The settings cfg gives that model model_name does not read, each in words.

    The settings cfg gives (values other than their defaults) that model model_name does not
    read, each in words naming the models that do: [] when none."""
    out = [f"{n}={getattr(cfg, n)!r}: model {model_name} does not read it ({', '.join(models)} "
           f"{'does' if len(models) == 1 else 'do'})" for n, default, _, models, _ in SETTINGS
           if not reads(model_name, n) and getattr(cfg, n) != default]
    if "diffaug" in cfg.augment and model_name not in DIFFAUG_MODELS:
        out.append(f"augment={cfg.augment!r}: model {model_name} does not apply DiffAugment "
                   f"({' and '.join(DIFFAUG_MODELS)} do)")
    return out


def model_settings(model_name):
    """The settings model model_name reads that are its own or shape its recipe (the kernel's
    settings block lists them): the model, optimiser, augmentation, schedule and sampling rows."""
    first, last = [row[0] for row in SETTINGS].index("batch_size"), [row[0] for row in SETTINGS].index("ema_rampup")
    return [row for row in SETTINGS[first:last + 1] + (SETTING["truncation"],) if reads(model_name, row[0])]
