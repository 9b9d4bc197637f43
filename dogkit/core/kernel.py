# ---------------------------------------------------------------------------------------------
# Entry point: Kaggle with no arguments, or locally with --data PATH --budget 8m --out DIR
# ---------------------------------------------------------------------------------------------
import argparse
import glob
import os
import zipfile

from dogkit.core.train import AUGMENTS, PRECISIONS, TrainConfig, parse_budget, train, with_settings

KAGGLE_INPUT = "/kaggle/input"
KAGGLE_WORKING = "/kaggle/working"
KAGGLE_BUDGET = "8h45m"  # Kaggle stops a kernel at 9 h: keep 15 minutes to spare


def kaggle_data(root=KAGGLE_INPUT, scratch="/kaggle/tmp/dogs"):
    """The competition's photos and Annotation on Kaggle (extracting the zips if only zips exist)."""
    if not os.path.isdir(root):
        return None
    zips = glob.glob(os.path.join(root, "**", "all-dogs.zip"), recursive=True)
    photos = glob.glob(os.path.join(root, "**", "all-dogs", "*.jpg"), recursive=True) or \
        glob.glob(os.path.join(root, "**", "all-dogs", "all-dogs", "*.jpg"), recursive=True)
    if photos or not zips:
        return root
    os.makedirs(scratch, exist_ok=True)
    for z in zips + glob.glob(os.path.join(root, "**", "Annotation.zip"), recursive=True):
        with zipfile.ZipFile(z) as zf:
            zf.extractall(scratch)
    return scratch


def main(model_cls, settings, argv=None):
    parser = argparse.ArgumentParser(description="Train a dog generator and write images.zip.")
    parser.add_argument("--data", default=None, help="photos (any layout clean-data reads) or a cache .npz")
    parser.add_argument("--budget", default=None, help="wall clock for the whole run: 30s, 8m, 9h")
    parser.add_argument("--out", default=None, help="output folder (images.zip, checkpoint, grids)")
    parser.add_argument("--resume", default=None, help="checkpoint.pt to continue from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=0, help="also stop after this many steps")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--truncation", type=float, default=None)
    parser.add_argument("--n-samples", type=int, default=10_000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--log-every", type=float, default=None, help="seconds between log lines")
    parser.add_argument("--graph", default="auto", choices=["auto", "off"], help="CUDA graph capture")
    parser.add_argument("--augment", default=None, choices=AUGMENTS, help="override the model's augmentation")
    parser.add_argument("--precision", default=None, choices=PRECISIONS, help="bf16 autocast where the GPU has it (A100, H100)")
    parser.add_argument("--snapshots", default="", help="progress points that keep a checkpoint, e.g. 0.25,0.5")
    args, _ = parser.parse_known_args(argv)  # tolerate a notebook's own arguments

    on_kaggle = args.data is None and os.path.isdir(KAGGLE_INPUT)
    if args.data is None and not on_kaggle:
        parser.error("--data is required outside Kaggle")
    cfg = with_settings(TrainConfig(), settings)
    cfg = with_settings(cfg, {
        "data": kaggle_data() if on_kaggle else args.data,
        "out": args.out or (KAGGLE_WORKING if on_kaggle else "submission"),
        "budget": parse_budget(args.budget or (KAGGLE_BUDGET if on_kaggle else "8m")),
        "seed": args.seed, "steps": args.steps, "n_samples": args.n_samples, "device": args.device,
        "graph": args.graph, "snapshots": args.snapshots,
        "log_every": args.log_every if args.log_every is not None else (300.0 if on_kaggle else 30.0),
    })
    for name in ("width", "batch_size", "truncation", "augment", "precision"):
        if getattr(args, name) is not None:
            cfg = with_settings(cfg, {name: getattr(args, name)})
    return train(cfg, model_cls, resume=args.resume)
