#!/usr/bin/env python
"""Training throughput of the real kernel loop (data, augmentation, D and G steps, EMA).

    python tools/bench_train.py --data data/dogs64.npz --seconds 30              # GPU if present
    python tools/bench_train.py --data data/dogs64.npz --model biggan --precision fp32,bf16 --batch-size 32,64
    python tools/bench_train.py --data data/dogs64.npz --model biggan --profile 20   # the step's top kernels

Prints one table row per setting: steady-state steps/s (first log interval dropped) and images/s;
with --profile N, torch.profiler's table of N eager training steps instead.
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
from dogkit.core.train import Plan, Trainer, train_loop  # noqa: E402
from dogkit.core.settings import TrainConfig, with_settings


def measure(entry, data, seconds, batch_size, device, precision=None, memory_format=None):
    """Steady-state (steps/s, images/s, batch size, the precision that ran, peak GPU memory in GiB
    or None) of `seconds` of the model's real training loop; the first log interval (cuDNN
    autotuning, warm-up) is left out."""
    import torch

    with tempfile.TemporaryDirectory() as out:
        cfg = bench_config(entry, out, seconds, device, batch_size=batch_size, precision=precision,
                           memory_format=memory_format)
        cuda = torch.cuda.is_available() and device != "cpu"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(cfg, entry.cls, data=data, log=lambda m: None)
        trainer.plan = Plan(trainer.clock())  # the clock starts with the loop: building the model is not measured
        trainer.plan.fix(seconds, seconds)
        train_loop(trainer)  # the loop alone: no end (sampling, zip) to wait for
        rows = [json.loads(line) for line in open(Path(out) / "log.jsonl")]
    steady = rows[1:] or rows
    steps = sum(r["steps_per_s"] for r in steady) / len(steady)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return steps, steps * cfg.batch_size, cfg.batch_size, trainer.precision, peak


def bench_config(entry, out, seconds, device, **overrides):
    """The model's TrainConfig for a measurement: no reserve, no grids or checkpoints, 64 samples."""
    cfg = with_settings(TrainConfig(model=entry.name), entry.settings)
    base = {"out": out, "budget": seconds, "reserve": 0.0, "n_samples": 64, "log_every": seconds / 6,
            "device": device, "grid_every": 1e9, "checkpoint_every": 1e9}
    return with_settings(cfg, dict(base, **{k: v for k, v in overrides.items() if v is not None}))


def profile(entry, data, device, steps=20, warmup=5, rows=15):
    """torch.profiler's table (top `rows` operators and kernels by device time, CPU time on the
    CPU) of `steps` eager training steps of the model's defaults, after `warmup` steps: where a
    step's time goes, kernel by kernel."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = torch.device(device).type == "cuda"
    prof = torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))

    def window(tr):  # runs after each step
        if tr.step in (warmup, warmup + steps) and cuda:
            torch.cuda.synchronize()  # the window holds whole steps
        if tr.step == warmup:
            prof.start()
        elif tr.step == warmup + steps:
            prof.stop()

    with tempfile.TemporaryDirectory() as out:
        cfg = bench_config(entry, out, 1e6, device, steps=warmup + steps, log_every=1e9)
        trainer = Trainer(cfg, entry.cls, data=data, log=lambda m: None, hooks=[window])
        trainer.plan.fix(1e6, 1e6)
        train_loop(trainer)
    return prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="dcgan", choices=registry.MODEL_NAMES)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--batch-size", default=None, help="one or more, e.g. 32,64 (default: the model's)")
    parser.add_argument("--precision", default=None, help="one or more of fp32,bf16 (default: the model's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile N eager steps instead")
    args = parser.parse_args(argv)
    import torch

    data = load_dataset(args.data, log=lambda m: None)
    entry = registry.get(args.model)
    if args.profile:
        print(profile(entry, data, "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu",
                      steps=args.profile))
        return 0
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    print("| model | precision | device | batch | steps/s | images/s |")
    print("|---|---|---|---|---|---|")
    batches = [int(b) for b in args.batch_size.split(",")] if args.batch_size else [None]
    precisions = args.precision.split(",") if args.precision else [None]
    for precision in precisions:
        for batch in batches:
            steps, imgs, bs, prec, _ = measure(entry, data, args.seconds, batch, args.device, precision)
            print(f"| {args.model} | {prec} | {dev} | {bs} | {steps:.1f} | {imgs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
