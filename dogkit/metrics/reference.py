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
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dogkit.core.data import (MAX_PHOTO_BYTES, DataError, atomic_path, open_zip, read_file, read_zip_entry,
                              remove_stale_temps, shown_name)
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
    if source.is_dir():  # regular files only (is_file: no FIFO, device, broken or looping link)
        return sorted(p.relative_to(source).as_posix() for p in source.rglob("*")
                      if p.suffix.lower() in PHOTO_EXTENSIONS and p.is_file())
    if source.is_file() and zipfile.is_zipfile(source):
        try:
            return sorted(n for n in open_zip(source).namelist()
                          if n.lower().endswith(PHOTO_EXTENSIONS) and not n.startswith("__MACOSX"))
        except DataError as exc:
            raise ValueError(str(exc)) from None
    raise ValueError(f"{source}: not a folder or zip of photos")


def to_reference_pixels(img: Image.Image) -> np.ndarray:
    """The competition's treatment of a real photo: RGB, LANCZOS to 64x64."""
    return np.asarray(img.convert("RGB").resize((REFERENCE_SIZE, REFERENCE_SIZE), Image.LANCZOS))


def load_photos(source: Path, names: list[str]) -> tuple[np.ndarray, list[int]]:
    """(pixels, indices of the photos that could not be read: their rows are left zero)."""
    out = np.zeros((len(names), REFERENCE_SIZE, REFERENCE_SIZE, 3), dtype=np.uint8)
    bad = []
    zf = None if source.is_dir() else open_zip(source)  # opened once per process, not per batch
    for i, n in enumerate(names):
        try:
            data = (read_file(source / n, MAX_PHOTO_BYTES, n) if zf is None
                    else read_zip_entry(zf, zf.getinfo(n), MAX_PHOTO_BYTES))
            with Image.open(io.BytesIO(data)) as img:
                out[i] = to_reference_pixels(img)
        except Exception:  # unreadable, truncated, a bomb, a FIFO: counted and named, never a crash
            bad.append(i)
    return out, bad


def _fingerprint(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def _atomic_savez(path: Path, **arrays) -> None:
    """np.savez through the one atomic write (dogkit.core.sample.atomic_path): an interrupt, a kill
    or a full disk never leaves a half file, and the earlier one stays whole."""
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def _resume_point(partial: Path, fingerprint: str, digest: str, n: int, log) -> tuple[int, np.ndarray, np.ndarray]:
    """(photos done, their features, their unreadable flags) from a partial file of the same photos
    and weights; (0, ...) for another one, or for one that is unreadable or inconsistent (named)."""
    try:
        with np.load(partial) as p:
            if str(p["fingerprint"]) != fingerprint or str(p["digest"]) != digest:
                log(f"ignoring {partial}: made from other photos or weights")
                return 0, None, None
            done, feats = int(p["done"]), p["features"]
            bad = p["bad"] if "bad" in p.files else np.zeros(done, dtype=bool)
            if (not 0 < done <= n or feats.shape != (done, feat.FEATURE_DIM) or bad.shape != (done,)
                    or not np.isfinite(feats).all()):
                raise ValueError("its arrays disagree with its count")
            return done, feats.astype(np.float32), bad.astype(bool)
    except Exception as exc:
        log(f"ignoring {partial}: unreadable ({type(exc).__name__}: {exc}); starting over")
        return 0, None, None


def breed_of(name: str) -> str:
    """A photo's breed: its folder (<synset>-<breed>/...), else its file name's synset (n02085620_10074.jpg)."""
    parts = name.replace("\\", "/").split("/")
    return parts[-2] if len(parts) > 1 else parts[-1].split("_")[0]


def balanced_pick(names: list[str], n: int, seed: int = 0) -> list[str]:
    """n photos spread over the breeds: each breed's photos in a seeded order, taken one breed after
    another (a breed with fewer photos simply runs out); returned sorted. The first n sorted photos
    would be 5 breeds of Stanford Dogs' 120."""
    rng = np.random.default_rng(seed)
    by_breed: dict[str, list[str]] = {}
    for name in names:
        by_breed.setdefault(breed_of(name), []).append(name)
    queues = [list(rng.permutation(sorted(v))) for _, v in sorted(by_breed.items())]
    picked: list[str] = []
    while len(picked) < min(n, len(names)):
        for q in queues:
            if q and len(picked) < n:
                picked.append(str(q.pop()))
    return sorted(picked)


def build_reference(source: str | Path, out: str | Path, model, model_info: dict, device,
                    batch_size: int = 50, checkpoint_every: int = 500, progress: bool = True,
                    limit: int | None = None, log=print, checkpoint_seconds: float = 60.0) -> Reference:
    """Compute and write the reference file; resumes from ``<out>.partial.npz`` if present, which is
    saved every checkpoint_every photos or checkpoint_seconds, whichever comes first (an interrupt
    loses at most a minute of work). limit: a seeded, class-balanced pick of that many photos."""
    from tqdm import tqdm

    source, out = Path(source), Path(out)
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size}: give 1 or more")
    names = list_photos(source)
    if limit:
        names = balanced_pick(names, limit)
    if len(names) < 2:
        raise ValueError(f"{source}: {len(names)} photo(s) found, at least 2 needed")
    fingerprint = _fingerprint(names)
    partial = out.with_name(out.name + ".partial.npz")
    remove_stale_temps(out.parent)  # what a killed run left half-written beside it
    feats = np.zeros((len(names), feat.FEATURE_DIM), dtype=np.float32)
    bad = np.zeros(len(names), dtype=bool)  # photos that could not be read: dropped at the end
    done = 0
    if partial.is_file():
        done, old_feats, old_bad = _resume_point(partial, fingerprint, model_info["digest"], len(names), log)
        if done:
            feats[:done], bad[:done] = old_feats, old_bad
            log(f"resuming {out}: {done}/{len(names)} photos already done")
    t0 = time.time()
    model = feat.to_device(model, device)
    bar = tqdm(total=len(names), initial=done, desc="reference", unit="img", disable=not progress)
    last_saved, saved_at = done, time.monotonic()
    while done < len(names):
        chunk = names[done:done + batch_size]
        pixels, unreadable = load_photos(source, chunk)
        feats[done:done + len(chunk)] = feat.pool3(model, pixels, device)
        bad[[done + i for i in unreadable]] = True
        done += len(chunk)
        bar.update(len(chunk))
        if (done - last_saved >= checkpoint_every or time.monotonic() - saved_at >= checkpoint_seconds) \
                and done < len(names):
            _atomic_savez(partial, features=feats[:done], bad=bad[:done], done=done, fingerprint=fingerprint,
                          digest=model_info["digest"])
            last_saved, saved_at = done, time.monotonic()
    bar.close()
    skipped = [n for n, b in zip(names, bad) if b]
    if skipped:
        log(f"{len(skipped)} unreadable photo(s) skipped (not in the reference), e.g. {', '.join(map(shown_name, skipped[:5]))}")
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
        "breeds": len({breed_of(n) for n in names}),
        **({"limit": {"photos": limit, "pick": "class-balanced over the breeds, seed 0 (balanced_pick)"}}
           if limit else {}),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_savez(out, mu=mu, sigma=sigma, features=feats, names=np.array(names),
                  provenance=json.dumps(provenance))
    partial.unlink(missing_ok=True)  # (a second build of the same file at once may have removed it)
    return Reference(mu, sigma, feats, names, provenance)


def reference_problems(mu, sigma, features, names, provenance) -> list[str]:
    """Every way a reference's arrays break what `dogkit reference` writes: shapes, types, values
    that are not finite (a NaN would print as a score, or hang the matrix square root)."""
    d = features.shape[1] if features.ndim == 2 else feat.FEATURE_DIM  # 2048 from `dogkit reference`
    problems = [f"{what} has shape {a.shape}, must be {want}" for what, a, want in
                (("mu", mu, (d,)), ("sigma", sigma, (d, d))) if a.shape != want]
    if features.ndim != 2 or len(features) < 2 or d < 1:
        problems.append(f"features have shape {features.shape}, must be (N >= 2, {feat.FEATURE_DIM})")
    problems += [f"{what} is not a float array ({a.dtype})" for what, a in
                 (("mu", mu), ("sigma", sigma), ("features", features)) if a.dtype.kind != "f"]
    if not problems:
        problems += [f"{what} holds values that are not finite (NaN or inf)" for what, a in
                     (("mu", mu), ("sigma", sigma), ("features", features)) if not np.isfinite(a).all()]
    if names and len(names) != len(features):
        problems.append(f"{len(names)} names for {len(features)} feature rows")
    if not isinstance(provenance, dict):
        problems.append("provenance is not a JSON object")
    return problems


def reference_up_to_date(out: str | Path, source: str | Path, digest: str, limit: int | None = None) -> str | None:
    """What the reference at out holds, in words, when it is what `dogkit reference` would write now
    (the same photos by name, the same network and --limit); else None (or not a reference)."""
    try:
        prov = load_reference(out).provenance
    except (OSError, ValueError):
        return None
    names = list_photos(Path(source))
    names = balanced_pick(names, limit) if limit else names
    same = (prov.get("source") == str(source) and prov.get("fingerprint") == _fingerprint(names) and
            (prov.get("weights") or {}).get("digest") == digest and (prov.get("limit") or {}).get("photos") == limit)
    return f"{prov.get('count', 0):,} photos of the same {len(names):,}, the same network" if same else None


def load_reference(path: str | Path) -> Reference:
    """A reference file, checked (reference_problems); ValueError naming the file and every rule
    it breaks, or FileNotFoundError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: reference file not found (make one with `dogkit reference`)")
    try:
        with np.load(path) as z:  # allow_pickle stays off: arrays only
            missing = {"mu", "sigma", "features"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: not a dogkit reference (missing {sorted(missing)})")
            names = [str(n) for n in z["names"].reshape(-1)] if "names" in z.files else []
            prov = json.loads(str(z["provenance"])) if "provenance" in z.files else {}
            mu, sigma, features = z["mu"], z["sigma"], z["features"]
    except ValueError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable reference file ({exc}); make it again with "
                         "`dogkit reference`") from None
    except Exception as exc:  # truncated (an interrupted copy or download), corrupted, not a zip
        raise ValueError(f"{path}: not a readable reference file ({type(exc).__name__}: {exc}); make it again "
                         "with `dogkit reference`") from None
    problems = reference_problems(mu, sigma, features, names, prov)
    if problems:
        raise ValueError(f"{path}: not a valid reference ({'; '.join(problems)}); make it again with `dogkit reference`")
    return Reference(mu.astype(np.float64), sigma.astype(np.float64), features.astype(np.float32), names, prov)
