"""Submission rules and image loading for `dogkit score`.

Strict rules (the competition's): one flat images.zip holding exactly 10,000 PNG files (PNG by
content, not by name), each 64x64 RGB 8-bit, and nothing else. Every violation is reported with
the file name and the rule, before any expensive work.
"""
from __future__ import annotations

import io
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from dogkit.core.sample import png_header  # the kernel's self-check reads the same header

N_IMAGES = 10_000
IMAGE_SIZE = 64
# A 64x64 RGB PNG stored with no compression at all is about 12.4 KB; anything claiming
# more than this is refused before it is decompressed (zip bombs).
MAX_ENTRY_BYTES = 1 << 20
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
COLOR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}


class SubmissionError(ValueError):
    """The submission breaks a rule; str() lists every violation, one per line."""

    def __init__(self, source: str, violations: list[str]):
        self.source = source
        self.violations = violations
        shown = violations[:20]
        more = f"\n... and {len(violations) - 20} more" if len(violations) > 20 else ""
        super().__init__(f"{source}: {len(violations)} rule violation(s)\n" + "\n".join(shown) + more)


@dataclass
class Images:
    """Decoded submission: names and an (N, H, W, 3) uint8 array (H, W = 64 in strict mode)."""

    names: list[str]
    pixels: np.ndarray
    source: str
    notes: list[str] = field(default_factory=list)


def check_png(name: str, data: bytes) -> tuple[list[str], np.ndarray | None]:
    """(rule violations, decoded pixels) of one strict-mode entry; decoded once, used for scoring."""
    header = png_header(data)
    if header is None:
        kind = "a JPEG" if data[:3] == b"\xff\xd8\xff" else "not a PNG"
        return [f"{name}: not a PNG by content ({kind})"], None
    width, height, depth, color = header
    problems = []
    if (width, height) != (IMAGE_SIZE, IMAGE_SIZE):
        problems.append(f"{name}: size {width}x{height}, must be {IMAGE_SIZE}x{IMAGE_SIZE}")
    if color != 2:
        problems.append(f"{name}: colour type {COLOR_TYPES.get(color, color)}, must be RGB")
    if depth != 8:
        problems.append(f"{name}: {depth}-bit channels, must be 8-bit")
    if problems:
        return problems, None
    try:
        return [], decode(data)
    except Exception as exc:
        return [f"{name}: corrupt PNG ({exc})"], None


def decode(data: bytes, convert: bool = False) -> np.ndarray:
    """Decode image bytes fully to an HWC uint8 array (RGB if convert)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if convert:
            img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"decoded to shape {arr.shape}, expected HxWx3")
    return arr


def _entry_problems(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    parts = PurePosixPath(name).parts
    if name.startswith("/") or ".." in parts or "\\" in name:
        return f"{name}: unsafe path (absolute, '..' or backslash)"
    if parts and parts[0] == "__MACOSX":
        return f"{name}: __MACOSX/ entries are not allowed (zip made by macOS Finder)"
    if info.is_dir():
        return f"{name}: folders are not allowed (the zip must be flat)"
    if len(parts) != 1:
        return f"{name}: nested path (images must sit at the top of the zip)"
    if info.file_size > MAX_ENTRY_BYTES:
        return f"{name}: claims {info.file_size} bytes uncompressed (limit {MAX_ENTRY_BYTES})"
    if not name.lower().endswith(".png"):
        return f"{name}: not a .png file"
    return None


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not zipfile.is_zipfile(path):
        raise SubmissionError(str(path), [f"{path}: not a zip file"])
    return zipfile.ZipFile(path)


def read_entries(path: Path, strict: bool) -> tuple[list[str], list[bytes]]:
    """Names and raw bytes of the image entries of a zip, rules checked on the listing first."""
    with _open_zip(path) as zf:
        infos = zf.infolist()
        if not infos:
            raise SubmissionError(str(path), [f"{path}: empty zip"])
        if strict:
            problems = [p for p in map(_entry_problems, infos) if p]
            if len(infos) != N_IMAGES:
                problems.insert(0, f"{path}: {len(infos)} entries, must be exactly {N_IMAGES}")
            if problems:
                raise SubmissionError(str(path), problems)
        else:
            bad = [p for p in map(_entry_problems, infos)
                   if p and ("unsafe" in p or "claims" in p)]
            if bad:
                raise SubmissionError(str(path), bad)
            infos = [i for i in infos if not i.is_dir() and not i.filename.startswith("__MACOSX")
                     and PurePosixPath(i.filename).suffix.lower() in IMAGE_EXTENSIONS]
        names = [i.filename for i in infos]
        blobs = [zf.read(i) for i in infos]
    return names, blobs


def read_folder(path: Path, strict: bool) -> tuple[list[str], list[bytes]]:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if strict:
        problems = []
        for p in files:
            rel = p.relative_to(path).as_posix()
            if "/" in rel:
                problems.append(f"{rel}: nested path (images must sit at the top)")
            elif p.suffix.lower() != ".png":
                problems.append(f"{rel}: not a .png file")
        if len(files) != N_IMAGES:
            problems.insert(0, f"{path}: {len(files)} files, must be exactly {N_IMAGES}")
        if problems:
            raise SubmissionError(str(path), problems)
    else:
        files = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    return [p.relative_to(path).as_posix() for p in files], [p.read_bytes() for p in files]


def load_submission(source: str | Path, strict: bool = True, workers: int | None = None) -> Images:
    """Check the rules and decode every image. Raises SubmissionError listing all violations.
    PNG decoding runs in `workers` threads (zlib releases the GIL; default: one per core, max 16)."""
    workers = workers or min(16, os.cpu_count() or 1)
    source = Path(source)
    if source.is_dir():
        if strict:
            notes = ["a folder is not a submission; Kaggle needs images.zip"]
        else:
            notes = []
        names, blobs = read_folder(source, strict)
    elif source.is_file():
        notes = []
        names, blobs = read_entries(source, strict)
    else:
        raise SubmissionError(str(source), [f"{source}: no such file or folder"])

    if strict:
        with ThreadPoolExecutor(workers) as pool:
            checked = list(pool.map(check_png, names, blobs))
        problems = [p for ps, _ in checked for p in ps]
        if problems:
            raise SubmissionError(str(source), problems)
        return Images(names=names, pixels=np.stack([px for _, px in checked]), source=str(source), notes=notes)
    if len(names) < 2:
        raise SubmissionError(str(source), [f"{source}: {len(names)} image(s), at least 2 needed"])

    def safe_decode(name_blob):
        name, blob = name_blob
        try:
            return decode(blob, convert=True), None
        except Exception as exc:
            return None, f"{name}: unreadable image ({exc})"

    with ThreadPoolExecutor(workers) as pool:
        decoded = list(pool.map(safe_decode, zip(names, blobs)))
    errors = [e for _, e in decoded if e]
    if errors:
        raise SubmissionError(str(source), errors)
    arrays = [a for a, _ in decoded]
    shapes = {a.shape for a in arrays}
    if len(shapes) == 1:
        pixels = np.stack(arrays)
    else:  # --no-strict with mixed sizes: bring all to 64x64 as the competition would see them
        notes.append(f"mixed image sizes {sorted(shapes)[:3]}...: resized to 64x64 with LANCZOS")
        pixels = np.stack([np.asarray(Image.fromarray(a).resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS))
                           for a in arrays])
    return Images(names=names, pixels=pixels, source=str(source), notes=notes)
