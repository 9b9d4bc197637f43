"""Submission rules and image loading for `dogkit score`.

Strict rules (the competition's): one flat images.zip holding exactly 10,000 PNG files (PNG by
content, not by name), each 64x64 RGB 8-bit, and nothing else. Every violation is reported with
the file name and the rule, before any expensive work.
"""
from __future__ import annotations

import io
import os
import stat
import struct
import zipfile
import zlib
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageFile

from dogkit.core.data import DataError, read_file, read_zip_entry, shown_name, zip_entry_problem  # clean-data reads zips the same way
from dogkit.core.sample import PNG_SIGNATURE, png_header  # the kernel's self-check reads the same header

N_IMAGES = 10_000
IMAGE_SIZE = 64
# The largest honest 64x64 RGB 8-bit PNG: the image data stored with no compression at all is
# 64 rows x (1 filter byte + 192) = 12,352 bytes, about 12.4 KB with the PNG and zlib framing;
# 64 KiB leaves room for metadata chunks (an ICC profile, text) and for IDAT split into many
# chunks. No entry is read past this, whatever its header claims (zip bombs), and the whole
# submission past MAX_TOTAL_BYTES (10,000 uncompressed PNGs are 124 MB).
MAX_ENTRY_BYTES = 64 << 10
MAX_TOTAL_BYTES = 256 << 20
MAX_PIXELS = 4096 * 4096  # --no-strict: larger images are refused before they are decoded
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


CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_data_problem(data: bytes) -> str | None:
    """Why a PNG's image data is not whole, or None: its IDAT chunks must inflate to exactly the
    rows its IHDR declares, in one complete zlib stream (a PNG holding fewer rows than it says
    decodes in PIL with the rest black; Kaggle's decoder refuses it)."""
    chunks, pos, idat = {}, 8, []
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if len(body) < length or data[pos + 8 + length:pos + 12 + length] != struct.pack(">I", zlib.crc32(kind + body)):
            return f"chunk {kind!r} is cut short or fails its CRC"
        (idat.append(body) if kind == b"IDAT" else chunks.setdefault(kind, body))
        pos += 12 + length
        if kind == b"IEND":
            break
    if b"IHDR" not in chunks or len(chunks[b"IHDR"]) != 13 or b"IEND" not in chunks or not idat:
        return "IHDR, IDAT or IEND missing"
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    if color not in CHANNELS or width * height > 1 << 26:
        return f"colour type {color} or {width}x{height} pixels not readable"
    bits = CHANNELS[color] * depth
    passes = ADAM7 if interlace else ((0, 0, 1, 1),)
    sizes = [(-(-(width - x0) // dx), -(-(height - y0) // dy)) for x0, y0, dx, dy in passes]
    expected = sum(h * (1 + -(-w * bits // 8)) for w, h in sizes if w > 0 and h > 0)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(b"".join(idat), expected + 1)
    except zlib.error as exc:
        return f"image data does not inflate ({exc})"
    if len(raw) != expected or not inflater.eof:
        return f"image data holds {len(raw)} bytes, its header declares {expected}"
    return None


def check_png(name: str, data: bytes) -> tuple[list[str], np.ndarray | None, bool]:
    """(rule violations, decoded pixels, False: never resized) of one strict-mode entry; decoded
    once, used for scoring."""
    header = png_header(data)
    if header is None:
        kind = "a JPEG" if data[:3] == b"\xff\xd8\xff" else "not a PNG"
        return [f"{name}: not a PNG by content ({kind})"], None, False
    width, height, depth, color = header
    problems = []
    if (width, height) != (IMAGE_SIZE, IMAGE_SIZE):
        problems.append(f"{name}: size {width}x{height}, must be {IMAGE_SIZE}x{IMAGE_SIZE}")
    if color != 2:
        problems.append(f"{name}: colour type {COLOR_TYPES.get(color, color)}, must be RGB")
    if depth != 8:
        problems.append(f"{name}: {depth}-bit channels, must be 8-bit")
    incomplete = None if problems else png_data_problem(data)
    if problems or incomplete:
        return problems or [f"{name}: corrupt PNG ({incomplete})"], None, False
    try:
        return [], decode(data), False
    except Exception as exc:
        return [f"{name}: corrupt PNG ({exc})"], None, False


def decode(data: bytes, convert: bool = False) -> np.ndarray:
    """Decode image bytes fully to an HWC uint8 array (RGB if convert; --no-strict: resized to
    64x64 as it is read, so what is held is 12 KB an image whatever its size). An image that does
    not decode whole is an error, never padded."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if convert:
            img = img.convert("RGB")
            if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)
        arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"decoded to shape {arr.shape}, expected HxWx3")
    return arr


def _entry_problems(info: zipfile.ZipInfo, strict: bool = True) -> str | None:
    name = shown_name(info.filename)
    parts = PurePosixPath(info.filename).parts
    if info.filename.startswith("/") or ".." in parts or "\\" in info.filename:
        return f"{name}: unsafe path (absolute, '..' or backslash)"
    if not strict:
        return None
    if parts and parts[0] == "__MACOSX":
        return f"{name}: __MACOSX/ entries are not allowed (zip made by macOS Finder)"
    if info.is_dir():
        return f"{name}: folders are not allowed (the zip must be flat)"
    if len(parts) != 1:
        return f"{name}: nested path (images must sit at the top of the zip)"
    if not name.lower().endswith(".png"):
        return f"{name}: not a .png file"
    return None


def _duplicates(names: list[str]) -> list[str]:
    counts = Counter(names)
    return [f"{n}: {c} entries share this name (Kaggle keeps one; every image needs its own name)"
            for n, c in counts.items() if c > 1]


def _is_image(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return bool(parts) and parts[0] != "__MACOSX" and PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def _zip_entries(path: Path, strict: bool, n_images: int):
    """(name, bytes or None, problem or None) for each image entry of a zip, read one at a time with
    the caps; listing-level rules (count, names, paths, methods, sizes) are checked first."""
    if path.stat().st_size > MAX_TOTAL_BYTES + (64 << 20):
        raise SubmissionError(str(path), [f"{path}: {path.stat().st_size} bytes, larger than any honest "
                                          f"submission (limit {MAX_TOTAL_BYTES} bytes of images)"])
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise SubmissionError(str(path), [f"{path}: not a zip file ({exc})"]) from None
    with zf:
        infos = zf.infolist()
        if not infos:
            raise SubmissionError(str(path), [f"{path}: empty zip"])
        if not strict:
            infos = [i for i in infos if not i.is_dir() and _is_image(i.filename) or _entry_problems(i, False)]
        problems = [p for p in (_entry_problems(i, strict) for i in infos) if p]
        problems += _duplicates([shown_name(i.filename) for i in infos])
        problems += [f"{shown_name(i.filename)}: {p}" for i in infos for p in [zip_entry_problem(i, MAX_ENTRY_BYTES)] if p]
        if strict and len(infos) != n_images:
            problems.insert(0, f"{path}: {len(infos)} entries, must be exactly {n_images}")
        if sum(i.file_size for i in infos) > MAX_TOTAL_BYTES:
            problems.append(f"{path}: entries claim {sum(i.file_size for i in infos)} bytes in all "
                            f"(limit {MAX_TOTAL_BYTES})")
        if problems:
            raise SubmissionError(str(path), problems)
        total = 0
        for info in infos:
            try:
                data = read_zip_entry(zf, info, MAX_ENTRY_BYTES)
            except DataError as exc:
                yield shown_name(info.filename), None, str(exc)
                continue
            total += len(data)
            if total > MAX_TOTAL_BYTES:
                raise SubmissionError(str(path), [f"{path}: entries inflate past {MAX_TOTAL_BYTES} bytes in all"])
            yield shown_name(info.filename), data, None


def _folder_entries(path: Path, strict: bool, n_images: int):
    """The same for a folder: symlinks are never followed, the same caps apply."""
    files, links = [], []
    for dirpath, dirnames, filenames in os.walk(path):  # os.walk does not descend into linked folders
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                links.append(os.path.join(dirpath, d))
        for f in filenames:
            full = os.path.join(dirpath, f)
            (links if os.path.islink(full) else files).append(full)
    rel = lambda p: Path(p).relative_to(path).as_posix()  # noqa: E731
    files = sorted(files, key=rel)
    if not strict:
        files = [f for f in files if _is_image(rel(f))]
    problems = [f"{rel(p)}: a symbolic link (not followed)" for p in sorted(links)] if strict else []
    if strict:
        for p in files:
            if "/" in rel(p):
                problems.append(f"{rel(p)}: nested path (images must sit at the top)")
            elif not p.lower().endswith(".png"):
                problems.append(f"{rel(p)}: not a .png file")
        if len(files) != n_images:
            problems.insert(0, f"{path}: {len(files)} files, must be exactly {n_images}")
    sizes = {p: os.lstat(p) for p in files}
    problems += [f"{shown_name(rel(p))}: not a regular file (a FIFO, device or socket is never read)"
                 for p in files if not stat.S_ISREG(sizes[p].st_mode)]
    problems += [f"{shown_name(rel(p))}: {sizes[p].st_size} bytes (limit {MAX_ENTRY_BYTES})" for p in files
                 if stat.S_ISREG(sizes[p].st_mode) and sizes[p].st_size > MAX_ENTRY_BYTES]
    if problems:
        raise SubmissionError(str(path), problems)
    for p in files:
        try:
            yield shown_name(rel(p)), read_file(p, MAX_ENTRY_BYTES, rel(p)), None
        except DataError as exc:  # changed since it was listed
            yield shown_name(rel(p)), None, str(exc)


def decode_any(name: str, data: bytes) -> tuple[list[str], np.ndarray | None, bool]:
    """--no-strict: (problems, pixels, resized) of any image PIL reads whole, converted to RGB and
    resized to 64x64, refused past MAX_PIXELS before it is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                return [f"{name}: {img.width}x{img.height} pixels (limit {MAX_PIXELS})"], None, False
            resized = img.size != (IMAGE_SIZE, IMAGE_SIZE)
        incomplete = png_data_problem(data) if data[:8] == PNG_SIGNATURE else None
        if incomplete:
            return [f"{name}: corrupt PNG ({incomplete})"], None, False
        return [], decode(data, convert=True), resized
    except Exception as exc:
        return [f"{name}: unreadable image ({exc})"], None, False


def load_submission(source: str | Path, strict: bool = True, workers: int | None = None,
                    n_images: int = N_IMAGES) -> Images:
    """Check the rules and decode every image. Raises SubmissionError listing all violations.

    Memory stays bounded whatever the input claims: no entry is read past MAX_ENTRY_BYTES (zip
    headers are not trusted), at most MAX_TOTAL_BYTES in all, only stored and deflated entries,
    and each image is decoded as it is read (at most 4 per thread in flight), so what is held is
    the decoded pixels (12 KB an image), not the raw files. PNG decoding runs in `workers` threads
    (zlib releases the GIL; default: one per core, max 16). n_images: the count strict mode
    demands (the competition's 10,000; smaller in tests)."""
    workers = workers or min(16, os.cpu_count() or 1)
    source = Path(source)
    if source.is_dir():
        notes = ["a folder is not a submission; Kaggle needs images.zip"] if strict else []
        entries = _folder_entries(source, strict, n_images)
    elif source.is_file():
        notes = []
        entries = _zip_entries(source, strict, n_images)
    elif source.exists():
        raise SubmissionError(str(source), [f"{source}: not a regular file or folder (a FIFO or device is never read)"])
    else:
        raise SubmissionError(str(source), [f"{source}: no such file or folder"])
    check = check_png if strict else decode_any
    names, arrays, problems, resized = [], [], [], 0

    def take(i, future):
        nonlocal problems, resized
        found, arrays[i], was_resized = future.result()
        problems += found
        resized += was_resized

    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for name, data, problem in entries:
            names.append(name)
            arrays.append(None)
            if problem:
                problems.append(problem)
                continue
            pending.append((len(arrays) - 1, pool.submit(check, name, data)))
            del data
            while len(pending) > 4 * workers or (pending and pending[0][1].done()):
                take(*pending.popleft())
        for i, future in pending:
            take(i, future)
    if problems:
        raise SubmissionError(str(source), problems)
    if not strict and len(names) < 2:
        raise SubmissionError(str(source), [f"{source}: {len(names)} image(s), at least 2 needed"])
    if resized:  # --no-strict: every image that is not 64x64 was resized as it was read, the same way
        notes.append(f"{resized} image(s) not {IMAGE_SIZE}x{IMAGE_SIZE}: each resized to "
                     f"{IMAGE_SIZE}x{IMAGE_SIZE} with PIL LANCZOS")
    return Images(names=names, pixels=np.stack(arrays), source=str(source), notes=notes)
