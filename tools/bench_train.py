#!/usr/bin/env python
"""Training throughput of the real kernel loop (data, augmentation, D and G steps, EMA).

    python tools/bench_train.py --data data/dogs64.npz --seconds 30              # GPU if present
    python tools/bench_train.py --data data/dogs64.npz --model dcgan --modes eager,graph
    python tools/bench_train.py --data data/dogs64.npz --model biggan --modes graph --precision fp32,bf16 --batch-size 32,64

Prints one table row per mode: steady-state steps/s (first log interval dropped) and images/s.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dogkit.core import registry  # noqa: E402
from dogkit.core.data import load_dataset  # noqa: E402
from dogkit.core.train import Trainer, TrainConfig, with_settings  # noqa: E402


def measure(entry, data, mode, seconds, batch_size, device, precision=None, memory_format=None):
    """Steady-state (steps/s, images/s, batch size, the precision that ran, peak GPU memory in GiB
    or None) of `seconds` of the model's real training loop; the first log interval (CUDA graph
    capture, cuDNN autotuning) is left out."""
    import torch

    with tempfile.TemporaryDirectory() as out:
        cfg = with_settings(TrainConfig(model=entry.name), entry.settings)
        overrides = {"out": out, "budget": seconds, "reserve": 0.0, "n_samples": 64, "log_every": seconds / 6,
                     "graph": "auto" if mode == "graph" else "off", "device": device,
                     "grid_every": 1e9, "checkpoint_every": 1e9}
        overrides.update({k: v for k, v in (("batch_size", batch_size), ("precision", precision),
                                            ("memory_format", memory_format)) if v})
        cfg = with_settings(cfg, overrides)
        cuda = torch.cuda.is_available() and device != "cpu"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(cfg, entry.cls, data=data, log=lambda m: None)
        trainer.t0 = trainer.clock()  # the clock starts with the loop: building the model is not measured
        trainer.train_seconds = seconds
        trainer.train_loop()  # the loop alone: no end (sampling, zip) to wait for
        rows = [json.loads(line) for line in open(Path(out) / "log.jsonl")]
    steady = rows[1:] or rows
    steps = sum(r["steps_per_s"] for r in steady) / len(steady)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return steps, steps * cfg.batch_size, cfg.batch_size, trainer.precision, peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="dcgan", choices=registry.MODEL_NAMES)
    parser.add_argument("--modes", default="eager,graph")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--batch-size", default=None, help="one or more, e.g. 32,64 (default: the model's)")
    parser.add_argument("--precision", default=None, help="one or more of fp32,bf16 (default: the model's)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    import torch

    data = load_dataset(args.data, log=lambda m: None)
    entry = registry.get(args.model)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    print("| model | mode | precision | device | batch | steps/s | images/s |")
    print("|---|---|---|---|---|---|---|")
    batches = [int(b) for b in args.batch_size.split(",")] if args.batch_size else [None]
    precisions = args.precision.split(",") if args.precision else [None]
    for mode in args.modes.split(","):
        for precision in precisions:
            for batch in batches:
                steps, imgs, bs, prec, _ = measure(entry, data, mode, args.seconds, batch, args.device, precision)
                print(f"| {args.model} | {mode} | {prec} | {dev} | {bs} | {steps:.1f} | {imgs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
