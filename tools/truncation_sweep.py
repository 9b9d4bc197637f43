#!/usr/bin/env python
"""MiFID of one checkpoint's EMA generator at several truncations, on whatever device is here.

    python tools/truncation_sweep.py runs/big/checkpoint.pt --reference data/ref.npz \\
        --truncations 0.8,1,1.5,0 --out runs/big/sweep.jsonl --plot runs/big/sweep.png

Each point samples 10,000 images (seed 0, class-balanced breeds for a conditional model),
writes them as a submission zip and scores it exactly as `dogkit score` does. Rows are appended
to --out as they finish; a rerun skips the truncations already there (interrupt and resume
freely: on 2 CPU cores a point takes about 20 minutes). 0 means no truncation. Prints the table
and, with --plot, draws MiFID and d against truncation (PNG).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dogkit.core.sample import parse_truncations  # noqa: E402


def done_rows(path: Path, checkpoint: str, n_images: int = 10_000, seed: int = 0) -> dict[float, dict]:
    """Rows already in the results file for this checkpoint, image count and seed, by truncation (0: none)."""
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {float(r["truncation"] or 0): r for r in rows
            if r.get("checkpoint") == checkpoint and r.get("n_images") == n_images and r.get("seed", 0) == seed}


def score_point(checkpoint: str, generator, truncation: float, ref, model, device, batch_size: int, seed: int,
                n_images: int = 10_000) -> dict:
    """One row: `generator` is load_generator(checkpoint)'s (G, config, n_classes), loaded once per sweep."""
    from dogkit.checkpoints import sample_to_zip
    from dogkit.metrics.fid import RESULT_KEYS
    from dogkit.metrics.score import score

    with tempfile.TemporaryDirectory() as tmp:
        zip_path = sample_to_zip(generator, Path(tmp) / "images.zip", truncation, seed=seed, n=n_images)
        result = score(zip_path, ref, model, device, strict=n_images == 10_000, batch_size=batch_size,
                       progress=True)
    return {"checkpoint": checkpoint, "model": generator[1]["model"], "truncation": truncation or None,
            "seed": seed, **{k: result[k] for k in RESULT_KEYS + ("seconds",)}}


def print_table(rows: list[dict]) -> None:
    print("| truncation | FID | d | MiFID |\n|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["truncation"] or 1e9):
        t = "none" if not r["truncation"] else f"{r['truncation']:g}"
        print(f"| {t} | {r['fid']:.2f} | {r['distance']:.3f} | {r['mifid']:.2f} |")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted((r for r in rows if r["truncation"]), key=lambda r: r["truncation"])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([r["truncation"] for r in finite], [r["mifid"] for r in finite], "o-", label="MiFID")
    for r in rows:
        if not r["truncation"]:
            ax.axhline(r["mifid"], color="grey", ls="--", label="MiFID, no truncation")
    ax.set_xlabel("truncation (z redrawn beyond ±T)")
    ax.set_ylabel("MiFID (lower is better)")
    ax.set_title(title)
    d = ax.twinx()
    d.plot([r["truncation"] for r in finite], [r["distance"] for r in finite], "s:", color="tab:red", label="d")
    d.set_ylabel("memorization distance d", color="tab:red")
    handles = ax.get_legend_handles_labels()[0] + d.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper center")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--reference", required=True)
    parser.add_argument("--truncations", default="0.5,0.8,1,1.5,2,0")
    parser.add_argument("--out", required=True, help="results file (JSON lines; appended, resumable)")
    parser.add_argument("--plot", default=None, help="PNG of MiFID and d against truncation")
    parser.add_argument("--inception-weights", default=None)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="another seed: a second set of rows (sampling noise)")
    parser.add_argument("--n-images", type=int, default=10_000, help="fewer: a quick, non-comparable check")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        truncations = parse_truncations(args.truncations)
    except ValueError as exc:
        parser.error(str(exc))

    import torch

    from dogkit.checkpoints import load_generator
    from dogkit.core.train import pick_device
    from dogkit.metrics.inception import load_inception
    from dogkit.metrics.reference import load_reference

    device = pick_device(args.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_rows(out, args.checkpoint, args.n_images, args.seed)
    todo = [t for t in truncations if t not in done]
    if todo:
        ref = load_reference(args.reference)
        model, _ = load_inception(args.inception_weights)
        model = model.to(device)
        generator = load_generator(args.checkpoint, device)
        for t in todo:
            t0 = time.time()
            row = score_point(args.checkpoint, generator, t, ref, model, device, args.batch_size, args.seed,
                              args.n_images)
            row["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
            with open(out, "a") as fh:  # one whole line per point: an interrupt loses only the point in flight
                fh.write(json.dumps(row) + "\n")
            done[t] = row
            print(f"truncation {t or 'none'}: MiFID {row['mifid']:.2f} (d {row['distance']:.3f}), "
                  f"{time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    rows = [done[t] for t in truncations]
    print_table(rows)
    if args.plot:
        plot(rows, Path(args.plot), f"{rows[0]['model']}: {Path(args.checkpoint).name}, {args.n_images:,} images")


if __name__ == "__main__":
    main()
