#!/usr/bin/env python
"""How much does the lossy cache move FID? Cache images vs the same photos losslessly.

    python tools/cache_fidelity.py --cache data/dogs64.npz --reference data/ref.npz

The reference built from the same photos holds their lossless 64x64 LANCZOS features (for a
pre-cropped source, `clean-data --strategy box|pad` gives exactly those pixels before encoding).
This extracts the features of the decoded cache images, matches them to the reference rows by
name and prints FID(cache, lossless) over the matched photos. Takes about 25 minutes for 12,000
images on 2 CPU cores; seconds on a GPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dogkit.core.data import load_cache  # noqa: E402
from dogkit.metrics.features import extract, pick_device  # noqa: E402
from dogkit.metrics.fid import frechet_distance, stats  # noqa: E402
from dogkit.metrics.inception import load_inception  # noqa: E402
from dogkit.metrics.reference import load_reference  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--limit", type=int, default=None, help="only the first N matched photos")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    cache = load_cache(args.cache)
    ref = load_reference(args.reference)
    row = {name: i for i, name in enumerate(ref.names)}
    pairs = [(i, row[n]) for i, n in enumerate(cache["names"]) if n in row]
    if args.limit:
        pairs = pairs[:args.limit]
    if len(pairs) < 2:
        raise SystemExit("cache and reference share fewer than 2 photo names")
    ci, ri = (np.array(x) for x in zip(*pairs))
    model, _ = load_inception(None)
    t0 = time.time()
    device = pick_device(args.device)
    feats = extract(model, cache["images"][ci], device, batch_size=50, progress=True, desc="cache")
    fid = frechet_distance(*stats(feats), *stats(ref.features[ri]))
    print("| cache | codec | photos | FID(cache, lossless) | seconds |")
    print("|---|---|---|---|---|")
    print(f"| {args.cache} | {cache['meta']['codec']} | {len(pairs)} | {fid:.4f} | {time.time() - t0:.0f} |")


if __name__ == "__main__":
    main()
