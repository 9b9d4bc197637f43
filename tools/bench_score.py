#!/usr/bin/env python
"""Feature-extraction speed of the scorer (the part that dominates `dogkit score`).

    python tools/bench_score.py --n 200                 # CPU here: seconds per image
    python tools/bench_score.py --n 10000 --device cuda  # on a GPU

Random 64x64 images go through the exact pipeline (legacy resize to 299, Inception, pool_3)
after one warm-up batch. Prints a table row per batch size.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dogkit.metrics.features import extract, pick_device  # noqa: E402
from dogkit.metrics.inception import load_inception  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch-sizes", default="50")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    device = pick_device(args.device)
    model, info = load_inception(None)
    model = model.to(device)
    images = np.random.default_rng(0).integers(0, 256, size=(args.n, 64, 64, 3), dtype=np.uint8)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print("| device | batch | images | seconds | s/image | images/s |")
    print("|---|---|---|---|---|---|")
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        extract(model, images[:bs], device, batch_size=bs)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        extract(model, images, device, batch_size=bs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"| {name} | {bs} | {args.n} | {dt:.1f} | {dt / args.n:.4f} | {args.n / dt:.1f} |", flush=True)


if __name__ == "__main__":
    main()
