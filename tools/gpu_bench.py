#!/usr/bin/env python
"""Train registered models on a lent GPU for the same budget, score them, and print one table.

The GPU machine takes at most 64 MiB per command: the training cache (28 MB), the FID weights
(44 MB in fp16) and the reference (12,000 x 2048 features, 98 MB) never fit together. The tool
splits the work so that every figure is still computed on the GPU, against the real reference:

  here, once:   python tools/gpu_bench.py pack --reference data/ref-crops.npz --out .devref
                    splits the reference into parts under 25 MiB (features in float16, the mean
                    and the upper triangle of the covariance in float64: FID stays exact) and
                    prints which paths to carry in which device command.
  GPU, each:    python tools/gpu_bench.py train dcgan --data data/dogs64.npz --budget 8m
                    runs the generated kernel (kernels/dcgan.py, what a user submits) into
                    .devwork/dcgan and keeps it there between commands of a warm machine.
  GPU, last:    python tools/gpu_bench.py score --weights .devpack/inception-fp16.pth --out $OUT \\
                    [--truncations 0.5,0.8,1,1.5,2,0] [--timing]
                    rebuilds the reference file from its parts, scores each run's images.zip, its
                    snapshots and a truncation sweep of the final EMA generator, and writes
                    results.jsonl and one grid per run into OUT (small files: they come back).
  here:         python tools/gpu_bench.py table runs/gpu/results.jsonl
                    the markdown table of the README.

d is computed from float16 reference features (measured here: |delta d| < 1e-5 against float32).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PART_MIB = 24.0
WORK = ROOT / ".devwork"


# ---- pack: the reference in carry-sized parts ------------------------------------------------
def pack_reference(reference: Path, out: Path, part_mib: float = PART_MIB) -> list[Path]:
    from dogkit.metrics.reference import load_reference

    ref = load_reference(reference)
    out.mkdir(parents=True, exist_ok=True)
    n = ref.mu.shape[0]
    iu = np.triu_indices(n)
    files = []
    np.save(out / "sigma_triu.npy", ref.sigma[iu].astype(np.float64))
    files.append(out / "sigma_triu.npy")
    feats = ref.features.astype(np.float16)
    rows = max(1, int(part_mib * 2**20 // (feats.shape[1] * 2)))
    for k, start in enumerate(range(0, len(feats), rows)):
        np.save(out / f"features_{k}.npy", feats[start:start + rows])
        files.append(out / f"features_{k}.npy")
    meta = {"source": str(reference), "n": int(len(feats)), "parts": len(files) - 1, "mu": ref.mu.tolist(),
            "names": list(ref.names), "provenance": ref.provenance}
    (out / "meta.json").write_text(json.dumps(meta))
    return files


def unpack_reference(folder: Path, out_path: Path) -> Path:
    """The parts back into a reference file `dogkit score` reads (float32 features)."""
    meta = json.loads((folder / "meta.json").read_text())
    missing = [f"features_{k}.npy" for k in range(meta["parts"]) if not (folder / f"features_{k}.npy").exists()]
    if missing or not (folder / "sigma_triu.npy").exists():
        raise SystemExit(f"{folder}: reference parts missing ({', '.join(missing) or 'sigma_triu.npy'}); "
                         "carry them in earlier commands of the same warm machine")
    mu = np.asarray(meta["mu"], dtype=np.float64)
    n = mu.shape[0]
    sigma = np.zeros((n, n))
    sigma[np.triu_indices(n)] = np.load(folder / "sigma_triu.npy")
    sigma = sigma + np.triu(sigma, 1).T
    feats = np.concatenate([np.load(folder / f"features_{k}.npy") for k in range(meta["parts"])]).astype(np.float32)
    tmp = out_path.with_suffix(".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, features=feats, names=np.array(meta["names"]),
             provenance=json.dumps({**meta["provenance"], "packed_from": meta["source"], "features": "float16"}))
    os.replace(tmp, out_path)
    return out_path


def cmd_pack(args):
    files = pack_reference(Path(args.reference), Path(args.out), args.part_mib)
    mib = {f: f.stat().st_size / 2**20 for f in files}
    print("| file | MiB |\n|---|---|")
    for f, m in mib.items():
        print(f"| {f} | {m:.1f} |")
    print(f"\ncarry these with the training commands (<= 64 MiB per command with the 28 MB cache), and "
          f"{args.out}/meta.json with the first; the FID weights go with the score command.")


# ---- train: the generated kernel, as a user runs it ------------------------------------------
def cmd_train(args):
    tag = args.tag or args.model
    out = WORK / tag
    kernel = ROOT / "kernels" / f"{args.model}.py"
    if not kernel.exists():
        raise SystemExit(f"{kernel}: no generated kernel (python tools/build_kernel.py --model {args.model})")
    cmd = [sys.executable, str(kernel), "--data", args.data, "--budget", args.budget, "--out", str(out)]
    if args.snapshots:
        cmd += ["--snapshots", args.snapshots]
    if args.augment:
        cmd += ["--augment", args.augment]
    if args.precision:
        cmd += ["--precision", args.precision]
    if args.lecam is not None:
        cmd += ["--lecam", str(args.lecam)]
    cmd += ["--seed", str(args.seed)]
    if args.resume:
        cmd += ["--resume", str(out / "checkpoint.pt")]
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    try:
        proc.wait(timeout=args.stop_after)
    except subprocess.TimeoutExpired:  # a run longer than one device command: stop it resumably
        proc.send_signal(signal.SIGTERM)  # the kernel saves checkpoint.pt on SIGTERM
        proc.wait()
        print(f"stopped after {args.stop_after} s; continue with the same command and --resume", flush=True)
        return
    if proc.returncode:
        raise SystemExit(f"kernel exited with code {proc.returncode}")
    info = {"tag": tag, "model": args.model, "budget": args.budget, "augment": args.augment, "precision": args.precision,
            "lecam": args.lecam,
            "seed": args.seed, "command": " ".join(["python", f"kernels/{kernel.name}"] + cmd[2:]), "wall_s": round(time.time() - t0, 1)}
    (out / "bench.json").write_text(json.dumps(info, indent=2))
    if args.copy_to:
        dest = Path(args.copy_to)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("log.jsonl", "samples.png", "bench.json"):
            if (out / name).exists():
                (dest / f"{tag}_{name}").write_bytes((out / name).read_bytes())


# ---- score: every run folder against the rebuilt reference -----------------------------------
def run_summary(folder: Path) -> dict:
    """Steps, steps/s and images seen from a run's checkpoint and log."""
    import torch

    ckpt = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=False)
    cfg = ckpt["config"]
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["steps_per_s"] for r in log[1:]] or [r["steps_per_s"] for r in log]
    seen = ckpt["images_seen"]  # counted by the trainer: wgan-gp draws a batch per critic step
    return {"model": cfg["model"], "steps": ckpt["step"], "steps_per_s": round(float(np.median(rates)), 1),
            "batch_size": cfg["batch_size"], "images_seen": int(seen), "train_seconds": round(ckpt["train_seconds"], 1),
            "truncation_default": cfg["truncation"] or None}


def score_zip(zip_path, ref, model, device):
    from dogkit.metrics.score import score

    r = score(zip_path, ref, model, device, batch_size=500)
    return {k: r[k] for k in ("fid", "distance", "distance_thresholded", "mifid", "n_images", "seconds")}


def sample_zip(checkpoint: Path, truncation, path: Path, device, grid: Path | None = None) -> Path:
    from dogkit.checkpoints import load_generator, sample_to_zip

    return sample_to_zip(load_generator(checkpoint, device), path, truncation, seed=0, grid=grid)


def time_cli(zip_path: Path, ref_path: Path, weights: str) -> dict:
    """`dogkit score` end to end in a fresh process: start-up, reference file, rules, decode, FID, d."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "dogkit", "score", str(zip_path), "--reference", str(ref_path),
                           "--json", "--inception-weights", weights, "--batch-size", "500"],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    result = json.loads(proc.stdout)
    return {"cli_wall_s": round(time.time() - t0, 2), "cli_seconds": result["seconds"], "cli_mifid": result["mifid"]}


def cmd_score(args):
    import torch

    from dogkit.metrics.inception import load_inception
    from dogkit.metrics.reference import load_reference

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ref_path = unpack_reference(Path(args.ref), WORK / "reference.npz")
    ref = load_reference(ref_path)
    model, _ = load_inception(args.weights)
    model = model.to(device)
    runs = [WORK / t for t in args.runs.split(",")] if args.runs else sorted(
        p.parent for p in WORK.glob("*/bench.json"))
    truncations = [float(t) for t in args.truncations.split(",")] if args.truncations else []
    results = out / "results.jsonl"

    def emit(row):
        with open(results, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    for run in runs:
        bench = json.loads((run / "bench.json").read_text())
        base = {**bench, **run_summary(run), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
        emit({**base, "what": "kernel images.zip", "truncation": base["truncation_default"],
              **score_zip(run / "images.zip", ref, model, device)})
        if (run / "samples.png").exists():
            (out / f"{bench['tag']}_samples.png").write_bytes((run / "samples.png").read_bytes())
        for snap in sorted(run.glob("snapshot-p*.pt")):
            p = float(snap.stem.split("-p")[1])
            ckpt = torch.load(snap, map_location="cpu", weights_only=False)
            steps, seconds = ckpt["step"], ckpt["elapsed"]
            z = sample_zip(snap, base["truncation_default"], WORK / "snap.zip", device)
            emit({**base, "what": f"snapshot at p={p:g}", "p": p, "steps": steps, "elapsed_s": round(seconds, 1),
                  "images_seen": int(base["images_seen"] * steps / max(base["steps"], 1)),
                  "truncation": base["truncation_default"],
                  **score_zip(z, ref, model, device)})
        for t in truncations if bench["tag"] in (args.sweep or "").split(",") else []:
            z = sample_zip(run / "checkpoint.pt", t, WORK / "sweep.zip", device,
                           grid=out / f"{bench['tag']}_t{t:g}.png" if t in (0.5, 1.0) else None)
            emit({**base, "what": "truncation sweep", "truncation": t or None, **score_zip(z, ref, model, device)})
    if args.timing and runs:
        row = time_cli(runs[0] / "images.zip", ref_path, args.weights)
        emit({"what": "dogkit score timing", "device": str(device), "zip": str(runs[0] / "images.zip"), **row})


# ---- table -------------------------------------------------------------------------------------
def cmd_table(args):
    rows = [json.loads(line) for f in args.results for line in Path(f).read_text().splitlines() if line.strip()]
    print("| model | run | scored | trunc. | steps | steps/s | batch | images seen | FID | d | MiFID |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "fid" not in r:
            continue
        t = "none" if not r.get("truncation") else f"{r['truncation']:g}"
        print(f"| {r['model']} | {r['tag']} | {r['what']} | {t} | {r['steps']:,} | {r['steps_per_s']:.1f} | "
              f"{r['batch_size']} | {r['images_seen'] / 1e6:.2f} M | {r['fid']:.2f} | {r['distance']:.3f} | "
              f"{r['mifid']:.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="split a reference into carry-sized parts")
    p.add_argument("--reference", required=True)
    p.add_argument("--out", default=".devref")
    p.add_argument("--part-mib", type=float, default=PART_MIB)
    t = sub.add_parser("train", help="run a generated kernel into .devwork/TAG")
    t.add_argument("model")
    t.add_argument("--data", required=True)
    t.add_argument("--budget", default="8m")
    t.add_argument("--tag", default=None)
    t.add_argument("--snapshots", default="")
    t.add_argument("--augment", default=None)
    t.add_argument("--precision", default=None)
    t.add_argument("--lecam", type=float, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue .devwork/TAG/checkpoint.pt")
    t.add_argument("--stop-after", type=float, default=None,
                   help="seconds after which the kernel is stopped with a resumable checkpoint (one device command)")
    t.add_argument("--copy-to", default=None, help="also copy the log and grid here (e.g. $OUT)")
    s = sub.add_parser("score", help="score every run in .devwork against the packed reference")
    s.add_argument("--ref", default=".devref")
    s.add_argument("--weights", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--runs", default=None, help="comma-separated tags (default: all)")
    s.add_argument("--sweep", default=None, help="comma-separated tags to sweep truncation on")
    s.add_argument("--truncations", default="0.5,0.8,1,1.5,2,0", help="0 means none")
    s.add_argument("--timing", action="store_true", help="also time `dogkit score` end to end")
    b = sub.add_parser("table", help="markdown table of results.jsonl files")
    b.add_argument("results", nargs="+")
    args = parser.parse_args(argv)
    {"pack": cmd_pack, "train": cmd_train, "score": cmd_score, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
