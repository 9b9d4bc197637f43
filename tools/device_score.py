#!/usr/bin/env python
"""Score a trained generator on a GPU machine whose carry limit (64 MiB) cannot hold the reference.

The FID weights (44 MB in fp16) and a generator travel to the GPU machine; the reference
(12,000 x 2048 features, 98 MB) stays here. So the work is split in two:

  on the GPU machine:  python tools/device_score.py features --generator g_ema.pt \\
                           --weights .devpack/inception-fp16.pth --out $OUT [--truncation 1.0]
      samples 10,000 images into a zip, checks the rules, extracts pool_3 features, and writes
      mu (float64), the upper triangle of sigma (float32) and the features (float16, for the
      memorization term) in files small enough to come back; it also times `dogkit score`
      end to end against a same-sized reference file (--timing).
  here:                python tools/device_score.py finish DIR --reference data/ref.npz
      prints FID, d, d_thr and MiFID as `dogkit score` would.

FID uses the exact mean and a float32 covariance; d uses float16 features.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHUNKS = 4


def pack_features(feats: np.ndarray, out: Path, meta: dict) -> None:
    from dogkit.metrics.fid import stats

    mu, sigma = stats(feats)
    iu = np.triu_indices(sigma.shape[0])
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "mu.npy", mu)
    np.save(out / "sigma_triu.npy", sigma[iu].astype(np.float32))
    for k, part in enumerate(np.array_split(feats.astype(np.float16), CHUNKS)):
        np.save(out / f"features_{k}.npy", part)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))


def unpack_features(folder: Path):
    mu = np.load(folder / "mu.npy")
    tri = np.load(folder / "sigma_triu.npy").astype(np.float64)
    n = mu.shape[0]
    sigma = np.zeros((n, n))
    sigma[np.triu_indices(n)] = tri
    sigma = sigma + np.triu(sigma, 1).T
    feats = np.concatenate([np.load(folder / f"features_{k}.npy") for k in range(CHUNKS)]).astype(np.float32)
    return mu, sigma, feats, json.loads((folder / "meta.json").read_text())


def cmd_features(args):
    import torch

    from dogkit.checkpoints import load_generator
    from dogkit.core.sample import generate, save_grid, write_zip
    from dogkit.metrics.features import extract
    from dogkit.metrics.inception import load_inception
    from dogkit.metrics.submission import load_submission

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    G, cfg, n_classes = load_generator(args.generator, device)
    t = args.truncation if args.truncation and args.truncation > 0 else None
    images = generate(G, 10_000, cfg["z_dim"], t, n_classes, seed=args.seed, device=device)
    zip_path = Path(args.scratch) / "images.zip"
    write_zip(images, zip_path)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_grid(images[:64], out / "grid.png")
    model, info = load_inception(args.weights)
    model = model.to(device)
    t0 = time.time()
    sub = load_submission(zip_path, strict=True)
    feats = extract(model, sub.pixels, device, batch_size=500)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t0
    pack_features(feats, out, {"generator": str(args.generator), "truncation": t, "seed": args.seed,
                               "weights": info, "device": str(device), "zip_to_features_s": round(seconds, 2),
                               "step": cfg.get("steps")})
    print(f"features of 10,000 images in {seconds:.2f} s (zip decoding included)")
    if args.timing:
        time_full_score(model, zip_path, device)


def time_full_score(model, zip_path, device):
    """`dogkit score` end to end against a reference FILE of the real size (random features)."""
    from dogkit.metrics.reference import load_reference
    from dogkit.metrics.score import score

    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(size=(12_000, 2048))).astype(np.float32)
    ref_path = Path("/tmp/synthetic-ref.npz")
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    np.savez(ref_path, mu=mu, sigma=sigma, features=feats)
    t0 = time.time()
    ref = load_reference(ref_path)
    result = score(zip_path, ref, model, device, batch_size=500)
    print(f"| dogkit score, 10,000 images, {device} | {time.time() - t0:.2f} s | reference load + rules + "
          f"decode + features + FID + d (FID {result['fid']:.1f} vs random reference) |")


def cmd_finish(args):
    from dogkit.metrics.fid import frechet_distance, memorization_distance, threshold_distance
    from dogkit.metrics.reference import load_reference

    mu, sigma, feats, meta = unpack_features(Path(args.folder))
    ref = load_reference(args.reference)
    fid = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    d = memorization_distance(feats, ref.features)
    d_thr = threshold_distance(d)
    result = {"fid": fid, "distance": d, "distance_thresholded": d_thr, "mifid": fid / (d_thr + 1e-14),
              "n_images": int(len(feats)), "truncation": meta.get("truncation"), "generator": meta.get("generator")}
    print(json.dumps(result))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("features")
    f.add_argument("--generator", required=True)
    f.add_argument("--weights", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--truncation", type=float, default=0.0)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--scratch", default="/tmp")
    f.add_argument("--timing", action="store_true")
    g = sub.add_parser("finish")
    g.add_argument("folder")
    g.add_argument("--reference", required=True)
    args = parser.parse_args(argv)
    {"features": cmd_features, "finish": cmd_finish}[args.cmd](args)


if __name__ == "__main__":
    main()
