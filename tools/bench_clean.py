#!/usr/bin/env python
"""Cleaning speed of a photo folder against the same photos as one zip (Kaggle ships all-dogs.zip).

    python tools/bench_clean.py ../shared/data/stanford-dogs-crops
    python tools/bench_clean.py ../shared/data/stanford-dogs-crops --limit 2000 --ledger

The zip is written to a temporary folder in the competition's layout (all-dogs/<photo>, stored),
then `dogkit.core.data.clean` runs on the folder and on the zip with the same settings; one line
each (photos, seconds, photos a second). --ledger appends both as timing rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dogkit.core.data import PHOTO_EXTS, clean  # noqa: E402


def competition_zip(folder: Path, out: Path, limit: int | None) -> Path:
    photos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PHOTO_EXTS and p.is_file())[:limit]
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for p in photos:
            zf.write(p, f"all-dogs/{p.name}")
    return out


def timed(source: str, workers: int | None) -> dict:
    t = time.monotonic()
    data = clean(source, workers=workers, log=lambda m: None)
    seconds = time.monotonic() - t
    return {"photos": data["summary"]["photos"], "seconds": round(seconds, 1),
            "per_s": round(data["summary"]["photos"] / seconds)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--limit", type=int, default=None, help="only the first N photos (sorted)")
    parser.add_argument("--workers", type=int, default=None, help="cleaning processes (default: all cores)")
    parser.add_argument("--ledger", action="store_true", help="append both rows to results/ledger.jsonl")
    parser.add_argument("--device", default=None, help="the machine, for the ledger rows")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if args.limit:  # the same photos in both: a folder of links to the first N
            folder = Path(tmp) / "photos"
            folder.mkdir()
            for p in sorted(q for q in args.folder.rglob("*") if q.suffix.lower() in PHOTO_EXTS)[:args.limit]:
                os.symlink(p.resolve(), folder / p.name)
        zipped = competition_zip(args.folder, Path(tmp) / "all-dogs.zip", args.limit)
        rows = {"folder": timed(str(folder), args.workers), "zip": timed(str(zipped), args.workers)}
    for kind, r in rows.items():
        print(json.dumps(dict(source=kind, **r)))
    if args.ledger:
        sys.path.insert(0, str(ROOT / "tools"))
        import ledger

        for kind, r in rows.items():
            ledger.append({"kind": "timing", "seconds": r["seconds"], "device": args.device or "unknown",
                           "settings": f"clean-data's cleaning of {r['photos']:,} photos as a {kind}: "
                                       f"{r['per_s']:,} photos/s",
                           "command": "python tools/bench_clean.py " + " ".join(argv or sys.argv[1:])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
