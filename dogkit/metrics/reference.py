"""Reference statistics of real photos: `dogkit reference SOURCE -o ref.npz`.

Each photo: PIL open -> RGB -> LANCZOS to 64x64 whatever its aspect ratio (what the
competition's metric code did with the real dogs) -> the feature pipeline. The file holds
mu, sigma, every pool_3 feature row (for the memorization term), the photo names and a JSON
provenance record. Work is checkpointed to ``<out>.partial.npz`` so an interrupted run resumes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dogkit.core.data import MAX_PHOTO_BYTES, read_zip_entry
from dogkit.metrics import features as feat
from dogkit.metrics.fid import stats

PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
REFERENCE_SIZE = 64


@dataclass
class Reference:
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray
    names: list[str]
    provenance: dict


def list_photos(source: Path) -> list[str]:
    """Sorted relative names of the photos in a folder (recursive) or a zip."""
    if source.is_dir():
        return sorted(p.relative_to(source).as_posix() for p in source.rglob("*")
                      if p.is_file() and p.suffix.lower() in PHOTO_EXTENSIONS)
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            return sorted(n for n in zf.namelist()
                          if n.lower().endswith(PHOTO_EXTENSIONS) and not n.startswith("__MACOSX"))
    raise ValueError(f"{source}: not a folder or zip of photos")


def to_reference_pixels(img: Image.Image) -> np.ndarray:
    """The competition's treatment of a real photo: RGB, LANCZOS to 64x64."""
    return np.asarray(img.convert("RGB").resize((REFERENCE_SIZE, REFERENCE_SIZE), Image.LANCZOS))


def load_photos(source: Path, names: list[str]) -> tuple[np.ndarray, list[int]]:
    """(pixels, indices of the photos that could not be read: their rows are left zero)."""
    out = np.zeros((len(names), REFERENCE_SIZE, REFERENCE_SIZE, 3), dtype=np.uint8)
    bad = []
    zf = None if source.is_dir() else zipfile.ZipFile(source)
    try:
        for i, n in enumerate(names):
            try:
                if zf is None:
                    with Image.open(source / n) as img:
                        out[i] = to_reference_pixels(img)
                else:
                    data = read_zip_entry(zf, zf.getinfo(n), MAX_PHOTO_BYTES)
                    with Image.open(io.BytesIO(data)) as img:
                        out[i] = to_reference_pixels(img)
            except Exception:  # unreadable, truncated, a bomb: counted and named, never a crash
                bad.append(i)
    finally:
        if zf is not None:
            zf.close()
    return out, bad


def _fingerprint(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def _atomic_savez(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def build_reference(source: str | Path, out: str | Path, model, model_info: dict, device,
                    batch_size: int = 50, checkpoint_every: int = 500, progress: bool = True,
                    limit: int | None = None, log=print) -> Reference:
    """Compute and write the reference file; resumes from ``<out>.partial.npz`` if present."""
    from tqdm import tqdm

    source, out = Path(source), Path(out)
    names = list_photos(source)
    if limit:
        names = names[:limit]
    if len(names) < 2:
        raise ValueError(f"{source}: {len(names)} photo(s) found, at least 2 needed")
    fingerprint = _fingerprint(names)
    partial = out.with_name(out.name + ".partial.npz")
    feats = np.zeros((len(names), feat.FEATURE_DIM), dtype=np.float32)
    bad = np.zeros(len(names), dtype=bool)  # photos that could not be read: dropped at the end
    done = 0
    if partial.exists():
        with np.load(partial) as p:
            if str(p["fingerprint"]) == fingerprint and str(p["digest"]) == model_info["digest"]:
                done = int(p["done"])
                feats[:done] = p["features"][:done]
                if "bad" in p.files:
                    bad[:done] = p["bad"][:done]
                log(f"resuming {out}: {done}/{len(names)} photos already done")
            else:
                log(f"ignoring {partial}: made from other photos or weights")
    t0 = time.time()
    model = feat.to_device(model, device)
    bar = tqdm(total=len(names), initial=done, desc="reference", unit="img", disable=not progress)
    last_saved = done
    while done < len(names):
        chunk = names[done:done + batch_size]
        pixels, unreadable = load_photos(source, chunk)
        feats[done:done + len(chunk)] = feat.pool3(model, pixels, device)
        bad[[done + i for i in unreadable]] = True
        done += len(chunk)
        bar.update(len(chunk))
        if done - last_saved >= checkpoint_every and done < len(names):
            _atomic_savez(partial, features=feats[:done], bad=bad[:done], done=done, fingerprint=fingerprint,
                          digest=model_info["digest"])
            last_saved = done
    bar.close()
    skipped = [n for n, b in zip(names, bad) if b]
    if skipped:
        log(f"{len(skipped)} unreadable photo(s) skipped (not in the reference), e.g. {', '.join(skipped[:5])}")
        feats, names = feats[~bad], [n for n, b in zip(names, bad) if not b]
    if len(names) < 2:
        raise ValueError(f"{source}: {len(names)} readable photo(s), at least 2 needed")
    mu, sigma = stats(feats)
    provenance = {
        "source": str(source), "count": len(names), "fingerprint": fingerprint,
        "weights": model_info, "resize": "PIL RGB, LANCZOS to 64x64",
        "pipeline": "uint8 -> float32 -> TF1 legacy bilinear 299 -> (x-128)/128 -> pool_3",
        "seconds_this_run": round(time.time() - t0, 1),
        "skipped": {"count": len(skipped), "first": skipped[:20]},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_savez(out, mu=mu, sigma=sigma, features=feats, names=np.array(names),
                  provenance=json.dumps(provenance))
    if partial.exists():
        partial.unlink()
    return Reference(mu, sigma, feats, names, provenance)


def load_reference(path: str | Path) -> Reference:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: reference file not found (make one with `dogkit reference`)")
    try:
        with np.load(path) as z:  # allow_pickle stays off: arrays only
            missing = {"mu", "sigma", "features"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: not a dogkit reference (missing {sorted(missing)})")
            names = [str(n) for n in z["names"]] if "names" in z.files else []
            prov = json.loads(str(z["provenance"])) if "provenance" in z.files else {}
            return Reference(z["mu"], z["sigma"], z["features"].astype(np.float32), names, prov)
    except ValueError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable reference file ({exc}); make it again with "
                         "`dogkit reference`") from None
    except Exception as exc:  # truncated (an interrupted copy or download), corrupted, not a zip
        raise ValueError(f"{path}: not a readable reference file ({type(exc).__name__}: {exc}); make it again "
                         "with `dogkit reference`") from None
