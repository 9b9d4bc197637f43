# ---------------------------------------------------------------------------------------------
# Data: raw dog photos -> one crop per annotated dog -> a compact cache file.
# ---------------------------------------------------------------------------------------------
# Inputs: the Kaggle / Stanford layout (photos in all-dogs/ or Images/<synset>-<breed>/, boxes in
# Annotation/), pre-cropped <synset>-<breed>/ folders, or a flat folder / zip. Crop strategies: box (as
# is, squashed), square (the box's shorter side), aspect (report 001: boxes of aspect 0.8-1.25, squashed),
# pad (grown by a margin to a square, shifted inside the photo, the rest reflect-padded; the default).
import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import stat
import time
import warnings
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageFile, features

STRATEGIES = ("box", "square", "aspect", "pad")
CROP_SIZES = (64, 80, 96, 128)
MAX_MARGIN = 1.0  # 'pad' grows a box by at most its own size
DEFAULT_STRATEGY = "pad"
PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SYNSET = re.compile(r"^(n\d{8})")
CACHE_FORMAT = "dogkit-cache-1"
# Cache codecs: AVIF 4:4:4 quality 91 (default: no chroma subsampling, about 2.5 KB a 64x64 crop,
# 22,000 crops in about 56 MB), WebP quality 92 (4:2:0, about 2.1 KB, for a Pillow without AVIF)
# or lossless WebP (about 6.8 KB). FID of each against the lossless pixels: docs/cleaning.md.
CODEC_SETTINGS = {
    "avif": ("AVIF", dict(quality=91, subsampling="4:4:4", speed=6)),
    "webp": ("WEBP", dict(quality=92, method=6)),
    "webp-lossless": ("WEBP", dict(lossless=True, method=6)),
}
DEFAULT_CODEC = "avif"


class DataError(ValueError):
    """Bad input that --strict (or an unusable source) makes fatal; names file and rule."""


def _number(text):
    """'500', '500.0' or ' 500 ' -> 500; None when missing, not a number or not finite ('inf')."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return int(value) if math.isfinite(value) and abs(value) < 1e9 else None


def parse_annotation(xml_bytes, name="annotation"):
    """Pascal-VOC XML -> (width, height, [(xmin, ymin, xmax, ymax), ...] in pixels, the <filename>
    it names or None).

    The boxes are what matters (the photo's own size is read from the photo): a missing or
    non-numeric <size> gives width/height None and keeps the boxes."""
    try:
        root = ET.fromstring(xml_bytes)
    except ET.ParseError as exc:
        raise DataError(f"{name}: malformed XML ({exc})") from None
    width, height = _number(root.findtext("size/width")), _number(root.findtext("size/height"))
    boxes = []
    for obj in root.iter("object"):
        coords = [_number(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
        if None in coords:
            raise DataError(f"{name}: an <object> lacks a numeric <bndbox>")
        boxes.append(tuple(coords))
    return width, height, boxes, (root.findtext("filename") or "").strip() or None


def clamp_box(box, width, height):
    """Clamp a box to the photo; None when nothing of it is left (zero area)."""
    x0, y0, x1, y1 = box
    x0, y0 = max(0, min(x0, width)), max(0, min(y0, height))
    x1, y1 = max(0, min(x1, width)), max(0, min(y1, height))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def unusable_box(box, width, height):
    """Why a box clamp_box leaves nothing of is unusable, in the summary's words."""
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:
        return "box with min and max swapped"
    if x1 == x0 or y1 == y0:
        return "zero-area box"
    return "box outside the photo"


def crop_region(box, width, height, strategy, margin=0.1, aspect_range=(0.8, 1.25)):
    """The region (left, top, right, bottom) to cut for one dog, or None if the strategy drops it.

    The region may reach outside the photo only with 'pad' (filled by reflection).
    """
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if strategy == "box":
        return box
    if strategy == "aspect":
        return box if aspect_range[0] <= w / h <= aspect_range[1] else None
    if strategy == "square":
        s = min(w, h)
        left = x0 + (w - s) // 2
        top = y0 + (h - s) // 2
        return left, top, left + s, top + s
    if strategy == "pad":
        s = int(round(max(w, h) * (1 + margin)))
        left = x0 + (w - s) // 2
        top = y0 + (h - s) // 2
        # shift inside the photo where it fits; what still falls outside is reflect-padded
        left = min(max(left, 0), width - s) if s <= width else (width - s) // 2
        top = min(max(top, 0), height - s) if s <= height else (height - s) // 2
        return left, top, left + s, top + s
    raise ValueError(f"unknown crop strategy {strategy!r}; choose from {STRATEGIES}")


def cut(pixels, region):
    """Cut region out of an HWC array, reflect-padding what lies outside the photo."""
    left, top, right, bottom = region
    height, width = pixels.shape[:2]
    pad = (max(0, -top), max(0, bottom - height), max(0, -left), max(0, right - width))
    if any(pad):
        mode = "reflect" if min(height, width) > 1 else "edge"
        # reflection of a thin photo may need several passes
        while any(pad):
            step = [min(p, dim - 1) if mode == "reflect" else p
                    for p, dim in zip(pad, (height, height, width, width))]
            pixels = np.pad(pixels, ((step[0], step[1]), (step[2], step[3]), (0, 0)), mode=mode)
            left, right, top, bottom = left + step[2], right + step[2], top + step[0], bottom + step[0]
            height, width = pixels.shape[:2]
            pad = (max(0, -top), max(0, bottom - height), max(0, -left), max(0, right - width))
    return pixels[top:bottom, left:right]


def resize(pixels, size):
    """High-quality square resize (PIL LANCZOS)."""
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.LANCZOS))


# ---- reading files: one way in ----------------------------------------------------------------

def shown_name(name):
    """A file name that prints and stores one per line whatever its bytes (\\xNN, control escapes)."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace") if isinstance(name, str) else str(name)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def read_file(path, cap, name=None):
    """The bytes of a regular file of at most cap bytes, or a DataError naming it.

    The bytes of a regular file of at most cap bytes; a FIFO, a device, a broken or looping link
    or a larger file is a DataError naming it (never a hang, never unbounded memory)."""
    name = shown_name(name or path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens without waiting
    except OSError as exc:
        raise DataError(f"{name}: cannot be opened ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > cap:
            raise DataError(f"{name}: " + (f"{info.st_size} bytes (limit {cap})" if stat.S_ISREG(info.st_mode)
                                           else "not a regular file (a FIFO, device or socket is never read)"))
        data = fh.read(cap + 1)
    if len(data) > cap:
        raise DataError(f"{name}: grew past {cap} bytes while read")
    return data


_OPEN_ZIPS = {}


def open_zip(path):
    """The zip at path, opened once per process and version of the file.

    A 20,579-entry zip's directory is read once, not per photo; forked workers never share a file
    offset."""
    try:
        st = os.stat(path)
        key = (os.getpid(), os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in _OPEN_ZIPS:
            if len(_OPEN_ZIPS) >= 4:
                _OPEN_ZIPS.clear()
            _OPEN_ZIPS[key] = zipfile.ZipFile(path)
        return _OPEN_ZIPS[key]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DataError(f"{shown_name(path)}: not a readable zip ({exc})") from None


# ---- writing files: one way out ---------------------------------------------------------------

TEMP_MARK = ".dogkit-tmp"  # in the name of every file being written, until it is renamed into place


class WriteError(OSError):
    """An output the disk would not take (full, read-only), in one line naming the path.

    An output the disk would not take (full, read-only): one line naming the path; the earlier
    file, if any, is as it was."""


@contextlib.contextmanager
def atomic_path(path):
    """The one way every output is written: to a temporary name, renamed into place when whole.

    The one way every output is written: a temporary name beside `path` (its extension kept, so
    np.savez and PIL write exactly there), renamed onto `path` when the block succeeds, removed
    when it fails or is interrupted, so the earlier file stays whole until the new one is (a kill -9
    leaves the temporary: the next write of `path` removes it, remove_stale_temps). A write that
    fails on the disk (full, read-only) is one OSError naming the path."""
    folder, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{stem}{TEMP_MARK}{os.getpid()}{ext}")
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_temps(folder, name)
        yield tmp
        os.replace(tmp, path)
    except WriteError:  # said already (a nested write)
        raise
    except OSError as exc:
        raise WriteError(f"{path}: {(exc.strerror or str(exc)).lower()} (nothing written: the earlier file, if any, "
                         f"is as it was)") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def remove_stale_temps(folder, of=None):
    """Remove the temporaries a killed writer left in folder; returns the names removed.

    Remove what a killed writer left half-written in folder (only the temporaries of file `of`,
    when given; a process that is still running keeps its own); returns the names removed."""
    gone = []
    stem, ext = os.path.splitext(of or "")
    pattern = (re.escape(f".{stem}{TEMP_MARK}") + r"(\d+)" + re.escape(ext) if of else
               r".*" + re.escape(TEMP_MARK) + r"(\d+).*")
    for name in (os.listdir(folder) if os.path.isdir(folder) else ()):
        pid = re.fullmatch(pattern, name)
        if pid and not process_alive(int(pid.group(1))):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
                gone.append(name)
    return gone


def process_alive(pid):
    """Whether a process pid runs on this machine (this one included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: alive
        return True
    return True


# ---- finding the inputs ----------------------------------------------------------------------

def breed_of(folder_name):
    """'n02085620-Chihuahua' -> ('n02085620', 'Chihuahua'); None when not a synset folder."""
    m = re.match(r"^(n\d{8})-(.+)$", folder_name)
    return (m.group(1), m.group(2)) if m else None


def _find_dir(root, name):
    for dirpath, dirnames, _ in os.walk(root):
        if name in dirnames:
            return os.path.join(dirpath, name)
    return None


def _zip_items(source):
    members = sorted(n for n in open_zip(source).namelist()
                     if n.lower().endswith(PHOTO_EXTS) and not n.startswith("__MACOSX"))
    return [{"name": shown_name(m), "zip": source, "member": m, "synset": _synset(m), "xml": None} for m in members]


def _folder_items(source, ann_dir):
    """(layout, items) of a folder's photos (the Annotation folder itself skipped)."""
    photos = []
    for dirpath, _, files in os.walk(source):
        if ann_dir and os.path.abspath(dirpath).startswith(os.path.abspath(ann_dir)):
            continue
        photos += [os.path.join(dirpath, f) for f in files if f.lower().endswith(PHOTO_EXTS)]
    photos.sort()
    folders = {breed_of(os.path.basename(os.path.dirname(p))) for p in photos}
    if ann_dir:
        layout = "Kaggle/Stanford layout with annotations"
    elif photos and None not in folders:
        layout = "pre-cropped breed folders"
    else:
        layout = "flat folder of images"
    items = []
    for p in photos:
        folder = breed_of(os.path.basename(os.path.dirname(p)))
        items.append({"name": shown_name(os.path.relpath(p, source)), "path": p,
                      "synset": folder[0] if folder else _synset(os.path.basename(p)), "xml": None})
    return layout, items


def _annotation_index(ann):
    """{photo stem: its XML} of an Annotation folder or zip, read in place.

    An XML is a path, or (zip, member)."""
    if os.path.isfile(ann) and zipfile.is_zipfile(ann):
        return {os.path.splitext(os.path.basename(m))[0]: (ann, m) for m in open_zip(ann).namelist()
                if not m.endswith("/") and not m.startswith("__MACOSX")}
    return {os.path.splitext(f)[0]: os.path.join(dirpath, f) for dirpath, _, files in os.walk(ann) for f in files}


def _xml_folder(xml):
    """The name of the folder an XML (a path, or (zip, member)) sits in: its breed's."""
    return os.path.basename(os.path.dirname(xml[1] if isinstance(xml, tuple) else xml))


def _xml_name(xml):
    return shown_name(f"{xml[0]}:{xml[1]}" if isinstance(xml, tuple) else xml)


def _attach_annotations(items, index):
    """Point each photo at its XML; returns how many annotations have no photo.

    By file stem; the XML's breed folder gives the photo's synset."""
    used = set()
    for it in items:
        stem = os.path.splitext(os.path.basename(it.get("path") or it["member"]))[0]
        it["xml"] = index.get(stem)
        if it["xml"]:
            used.add(stem)
            folder = breed_of(_xml_folder(it["xml"]))
            if folder:
                it["synset"] = folder[0]
    return len(set(index) - used)


def discover(source, annotations=None):
    """Find photos, boxes and breeds. Returns (layout, items, breeds, notes).

    items: list of dicts {name, path (or zip member), label, xml}; breeds: sorted synset-breed names.
    """
    notes, index = Counter(), {}
    if os.path.isfile(source) and zipfile.is_zipfile(source):
        layout, items = "zip of images", _zip_items(source)
    elif os.path.isdir(source):
        annotations = annotations or _find_dir(source, "Annotation")
        layout, items = _folder_items(source, annotations if annotations and os.path.isdir(annotations) else None)
    elif not os.path.lexists(source):
        raise DataError(f"{source}: does not exist")
    else:
        raise DataError(f"{source}: not a folder or a zip of images")
    if not items:
        raise DataError(f"{source}: no photos found ({', '.join(PHOTO_EXTS)})")
    if annotations:  # a folder or a zip (the competition's Annotation.zip), read in place
        index = _annotation_index(annotations)
        layout = "Kaggle/Stanford layout with annotations"
        notes["annotation without photo"] = _attach_annotations(items, index)
    base = Counter(os.path.basename(it["name"]) for it in items)
    notes["same file name in two folders"] = sum(c - 1 for c in base.values() if c > 1)
    names = {}
    for xml in index.values():
        b = breed_of(_xml_folder(xml))
        if b:
            names[b[0]] = b[1]
    for it in items:
        b = breed_of(os.path.basename(os.path.dirname(it["path"]))) if it.get("path") else None
        if b:
            names[b[0]] = b[1]
    synsets = sorted({it["synset"] for it in items if it["synset"]})
    breeds = [f"{s}-{names.get(s, s)}" for s in synsets] or ["unknown"]
    index = {s: i for i, s in enumerate(synsets)}
    for it in items:
        it["label"] = index.get(it["synset"], 0)
    return layout, items, breeds, notes


def _synset(name):
    m = SYNSET.match(os.path.basename(name))
    return m.group(1) if m else None


# ---- cleaning ----------------------------------------------------------------------------------

# Zips from anywhere: stored and deflated entries only (others may inflate without bound), no encryption,
# never more than a cap per entry whatever the header claims. The scorer reads submissions the same way.
ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
MAX_PHOTO_BYTES = 64 << 20  # a photo file larger than this is refused (Stanford Dogs' largest: ~2 MB)


def zip_entry_problem(info, cap):
    """Why a zip entry cannot be read safely, or None.

    Why a zip entry cannot be read safely (encrypted, another compression method, a claimed
    size past cap), or None."""
    if info.flag_bits & 0x1:
        return "encrypted entry (cannot be read)"
    if info.compress_type not in ZIP_METHODS:
        return f"compression method {info.compress_type} (only stored and deflated entries are read)"
    if info.file_size > cap:
        return f"claims {info.file_size} bytes uncompressed (limit {cap})"
    return None


def read_zip_entry(zf, info, cap):
    """The bytes of one zip entry, never more than cap, or a DataError naming the entry and the rule.

    The bytes of one entry, reading at most cap + 1 bytes whatever its header says; DataError
    naming the entry and the rule for an unsafe, corrupt (CRC) or truncated entry."""
    problem = zip_entry_problem(info, cap)
    if problem:
        raise DataError(f"{shown_name(info.filename)}: {problem}")
    try:
        with zf.open(info) as fh:
            data = fh.read(cap + 1)
    except zipfile.BadZipFile as exc:  # a CRC error, a bad local header
        raise DataError(f"{shown_name(info.filename)}: corrupt entry ({exc})") from None
    except Exception as exc:  # a truncated or damaged stream (EOFError, zlib.error, OSError, ...)
        raise DataError(f"{shown_name(info.filename)}: unreadable entry ({type(exc).__name__}: {exc})") from None
    if len(data) > cap:
        raise DataError(f"{shown_name(info.filename)}: inflates past {cap} bytes (its header says {info.file_size})")
    return data


MAX_XML_BYTES = 1 << 20  # an annotation file larger than this is refused (Stanford's: under 1 KB)


def _read_xml(xml):
    if isinstance(xml, tuple):
        zf = open_zip(xml[0])
        return read_zip_entry(zf, zf.getinfo(xml[1]), MAX_XML_BYTES)
    return read_file(xml, MAX_XML_BYTES)


def _read_photo(item):
    if item.get("zip"):
        zf = open_zip(item["zip"])
        return read_zip_entry(zf, zf.getinfo(item["member"]), MAX_PHOTO_BYTES)
    return read_file(item["path"], MAX_PHOTO_BYTES, item["name"])


def decode_rgb(data, name, events):
    """A photo's bytes as HWC uint8 RGB pixels (transparency over white).

    A photo's bytes -> HWC uint8 RGB pixels (transparency over white); a conversion from another
    mode is noted in events. Raises on a corrupt image, or one past PIL's pixel limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # past MAX_IMAGE_PIXELS: refused
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode != "RGB":
                events.append((f"converted from {img.mode}", name))
                if img.mode.startswith("I"):  # 16-bit greyscale (I;16, or I as PNGs open): PIL's RGB would clip
                    grey = np.asarray(img).astype(np.float64) * (255.0 / 65535.0)  # at 255: rescale the 16 bits
                    return np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    img = img.convert("RGBA")
                    background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                    img = Image.alpha_composite(background, img)
                img = img.convert("RGB")
            return np.asarray(img)


def process_photo(item, strategy, size, min_side, margin):
    """One photo -> (crops [(HWC uint8, box index)], events [(reason, name)], annotated boxes).
    Never raises on bad input."""
    events = []
    name = item["name"]
    try:
        data = _read_photo(item)
    except DataError as exc:  # a FIFO, a device, a broken link, an oversized file or zip entry
        return [], [("unreadable file or zip entry", str(exc))], 0
    try:
        pixels = decode_rgb(data, name, events)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return [], [(f"image over PIL's {Image.MAX_IMAGE_PIXELS} pixel limit (decompression bomb)",
                     f"{name} ({exc})")], 0
    except Exception as exc:
        return [], [("corrupt or truncated image", f"{name} ({type(exc).__name__})")], 0
    height, width = pixels.shape[:2]
    boxes, n_boxes = [(0, 0, width, height)], 0
    if item["xml"]:
        try:
            *size_given, found, named = parse_annotation(_read_xml(item["xml"]), _xml_name(item["xml"]))
        except Exception as exc:  # any bad XML costs this photo its boxes, never the run
            size_given, found, named = None, [], None
            events.append(("malformed annotation: whole photo used", f"{name} ({exc})"))
        other = annotation_problem(name, named, size_given, (width, height))
        if other:  # its boxes are another photo's: no crop of this one can be trusted
            return [], events + [(other, f"{name} (its annotation: {named}, {size_given})")], 0
        if size_given and None not in size_given and tuple(size_given) != (width, height):
            events.append(("annotation's <size> is not the photo's: boxes used as given", name))
        if len(found) > MAX_BOXES:
            events.append((f"more than {MAX_BOXES} boxes: the first {MAX_BOXES} used", name))
        boxes, n_boxes = (found[:MAX_BOXES], len(found)) if found else (boxes, 0)
        if not found and size_given is not None:
            events.append(("annotation without box: whole photo used", name))
    elif "annotations" in item:
        events.append(("photo without annotation: whole photo used", name))
    crops = []
    for k, box in enumerate(boxes):
        clamped = clamp_box(box, width, height)
        if clamped is None:
            events.append((unusable_box(box, width, height), f"{name} #{k}"))
            continue
        if clamped != tuple(box):
            events.append(("box clamped to the photo", f"{name} #{k}"))
        if min(clamped[2] - clamped[0], clamped[3] - clamped[1]) < min_side:
            events.append((f"box smaller than {min_side} px", f"{name} #{k}"))
            continue
        # a photo without boxes (pre-cropped, or unannotated) is used whole, as it is
        region = crop_region(clamped, width, height, strategy if item["xml"] else "box", margin)
        if region is None:
            events.append(("aspect ratio outside [0.8, 1.25]", f"{name} #{k}"))
            continue
        crops.append((resize(np.ascontiguousarray(cut(pixels, region)), size), k))
    return crops, events, n_boxes


MAX_BOXES = 64  # boxes used of one photo (Stanford's most: a handful): one photo never floods the data


def annotation_problem(name, named, size_given, size):
    """Why a photo's annotation is another photo's, or None.

    Its <filename> names another file and its <size> is not this photo's either (one of the two
    alone: a renamed copy, or a size written oddly; its boxes are used)."""
    if not named or os.path.splitext(os.path.basename(named))[0] == os.path.splitext(os.path.basename(name))[0]:
        return None
    if not size_given or None in size_given or tuple(size_given) == tuple(size):
        return None
    return "annotation names another photo: photo skipped"


def map_chunks(fn, jobs, workers, done=lambda result: None):
    """[fn(job) for job in jobs], in forked worker processes when there are several of both.

    [fn(job) for job in jobs], in worker processes when there are several of both; done(result)
    as each arrives (in order). Where the system has fork the workers are forked, whatever Python's
    default start method (forkserver from 3.14): a kernel's fn lives in a notebook's __main__,
    which a fresh interpreter could not import."""
    results = []
    if workers > 1 and len(jobs) > 1:
        fork = "fork" in multiprocessing.get_all_start_methods()
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork") if fork else None) as pool:
            for r in pool.map(fn, jobs):
                results.append(r)
                done(r)
    else:
        for job in jobs:
            results.append(fn(job))
            done(results[-1])
    return results


def _process_chunk(args):
    chunk, strategy, size, min_side, margin = args
    return [process_photo(it, strategy, size, min_side, margin) for it in chunk]


def clean(source, annotations=None, size=64, strategy=DEFAULT_STRATEGY, min_side=32, margin=0.1,
          workers=None, progress=False, log=print):
    """Clean a source into a dataset dict {images, labels, names, breeds, summary, settings}."""
    problems = [f"unknown crop strategy {strategy!r}; choose from {STRATEGIES}"] if strategy not in STRATEGIES else []
    problems += [f"size {size}: choose from {CROP_SIZES}"] if size not in CROP_SIZES else []
    problems += [f"margin {margin}: give a fraction from 0 to {MAX_MARGIN}"] if not 0 <= margin <= MAX_MARGIN else []
    problems += [f"min_side {min_side}: give 1 or more pixels"] if not 1 <= min_side < 1 << 20 else []
    if problems:
        raise DataError("; ".join(problems))
    t0 = time.time()
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    layout, items, breeds, notes = discover(source, annotations)
    has_annotations = any(it["xml"] for it in items)
    if has_annotations:
        for it in items:
            it["annotations"] = True
    log(f"found: {layout}, {len(items)} photos, {len(breeds)} breeds")
    workers = workers or os.cpu_count() or 1
    chunks = [items[i:i + 64] for i in range(0, len(items), 64)]
    jobs = [(c, strategy, size, min_side, margin) for c in chunks]
    bar = _progress(len(items), progress)
    results = [r for part in map_chunks(_process_chunk, jobs, workers, lambda part: bar(len(part))) for r in part]
    images, labels, names, seen = [], [], [], set()
    events = []
    n_boxes = 0
    for it, (crops, evs, boxes) in zip(items, results):
        events += evs
        n_boxes += boxes
        for pixels, k in crops:
            digest = hashlib.sha1(pixels.tobytes()).digest()
            if digest in seen:
                events.append(("exact duplicate removed", f"{it['name']} #{k}"))
                continue
            seen.add(digest)
            images.append(pixels)
            labels.append(it["label"])
            names.append(f"{it['name']}#{k}" if k else it["name"])
    counts = Counter(reason for reason, _ in events)
    for reason, n in notes.items():
        if n:
            counts[reason] += n
    examples = {}
    for reason, what in events:
        examples.setdefault(reason, what)
    summary = {"layout": layout, "photos": len(items), "boxes": n_boxes, "crops": len(images),
               "breeds": len(breeds),
               "events": dict(counts), "examples": examples, "seconds": round(time.time() - t0, 1)}
    settings = {"source": os.path.abspath(source), "strategy": strategy, "size": size,
                "min_side": min_side, "margin": margin}
    if not images:
        raise DataError(f"{source}: no usable crops ({dict(counts)})")
    return {"images": np.stack(images), "labels": np.asarray(labels, dtype=np.int16),
            "names": names, "breeds": breeds, "summary": summary, "settings": settings,
            "events": events}


def summary_lines(summary):
    """The cleaning summary as aligned lines, every drop or fix by reason with an example.

    The cleaning summary as aligned lines: input, counts, every drop or fix by reason with an
    example (printed by `dogkit clean-data` and in a kernel's start block)."""
    if not summary:
        return []
    lines = [f"input      {summary.get('layout')}",
             f"photos     {summary.get('photos')}" + (f"  ({summary['boxes']} annotated boxes)" if summary.get("boxes") else ""),
             f"crops      {summary.get('crops')}  ({summary.get('breeds')} breeds)"]
    for reason, n in sorted(summary.get("events", {}).items()):
        lines.append(f"  {reason:45s} {n:6d}   e.g. {summary['examples'].get(reason, '')}")
    return lines


def fingerprint(items):
    """Input fingerprint: names and sizes of every photo (fast, no hashing of contents)."""
    h = hashlib.sha256()
    for it in items:
        try:
            size = os.stat(it["path"]).st_size if it.get("path") else 0
        except OSError:  # a broken link: skipped by cleaning, counted here as size -1
            size = -1
        h.update(f"{it['name']}:{size};".encode())
    return h.hexdigest()[:16]


def _progress(total, enabled, every=0.1):
    """A tiny progress printer (the kernel may not import tqdm): one line per 10 %."""
    state = {"done": 0, "shown": 0.0, "t0": time.time()}

    def update(n):
        state["done"] += n
        frac = state["done"] / max(total, 1)
        if enabled and (frac - state["shown"] >= every or state["done"] == total):
            state["shown"] = frac
            print(f"  cleaned {state['done']}/{total} photos ({time.time() - state['t0']:.0f} s)", flush=True)
    return update


# ---- the cache file ----------------------------------------------------------------------------

CODECS = tuple(CODEC_SETTINGS)


def _encode_many(args):
    chunk, codec = args
    fmt, options = CODEC_SETTINGS[codec]
    out = []
    for pixels in chunk:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, fmt, **options)
        out.append(buf.getvalue())
    return out


def codec_available(codec):
    # Pillow before 11.3 does not know the feature and warns; a Pillow that knows it says yes or no
    return codec != "avif" or "avif" in features.get_supported_modules() and features.check_module("avif")


def save_cache(path, dataset, workers=None, codec=DEFAULT_CODEC):
    """Write the dataset as one .npz of compressed images (CODEC_SETTINGS); temp file + rename."""
    if codec not in CODECS:
        raise DataError(f"unknown cache codec {codec!r}; choose from {CODECS}")
    if not codec_available(codec):
        raise DataError(f"cache codec {codec!r} needs Pillow with AVIF support (Pillow >= 11.3); "
                        "use --codec webp")
    images = dataset["images"]
    workers = workers or os.cpu_count() or 1
    jobs = [(images[i:i + 256], codec) for i in range(0, len(images), 256)]
    blobs = [b for part in map_chunks(_encode_many, jobs, workers) for b in part]
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    fmt, options = CODEC_SETTINGS[codec]
    meta = {"format": CACHE_FORMAT, "codec": codec, "codec_options": options,
            "shape": list(images.shape[1:]), "breeds": dataset["breeds"], "settings": dataset["settings"],
            "summary": dataset["summary"]}
    with atomic_path(path) as tmp:
        np.savez(tmp, blob=np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets=offsets,
                 labels=dataset["labels"], meta=json.dumps(meta),
                 names_utf8=np.frombuffer("\n".join(map(shown_name, dataset["names"])).encode(), dtype=np.uint8))
    return os.path.getsize(path)


def is_cache(path):
    return os.path.isfile(path) and path.endswith(".npz")


def cache_problems(z, meta):
    """Every way a cache's arrays and metadata break what save_cache writes, before any decoding."""
    offsets, labels, breeds, shape = z["offsets"], z["labels"], meta.get("breeds"), meta.get("shape")
    ok_breeds = isinstance(breeds, list) and breeds and all(isinstance(b, str) for b in breeds)
    ok_offsets = offsets.ndim == 1 and offsets.dtype.kind in "iu" and len(offsets) >= 2
    checks = [(ok_breeds, "breeds must be a non-empty list of names"),
              (shape in [[n, n, 3] for n in CROP_SIZES], f"image shape {shape!r}: must be [S, S, 3], S in {CROP_SIZES}"),
              (ok_offsets, "offsets must be at least 2 integers (one image or more)"),
              (not ok_offsets or offsets[0] == 0 and (np.diff(offsets) > 0).all() and offsets[-1] == z["blob"].size,
               "offsets must rise from 0 to the blob's length"),
              (labels.ndim == 1 and labels.dtype.kind in "iu" and len(labels) == len(offsets) - 1,
               "labels must be one integer per image"),
              (not ok_breeds or not len(labels) or 0 <= labels.min() and labels.max() < len(breeds),
               "labels must each name a breed")]
    return [message for ok, message in checks if not ok]


def load_cache(path):
    """Read a cache file back into {images, labels, names, breeds, meta}, checked.

    Read a cache file back into {images, labels, names, breeds, meta}; DataError naming the file
    and every rule a corrupt, truncated or hand-made one breaks."""
    name = shown_name(path)
    try:
        z = np.load(path)
        meta = json.loads(str(z["meta"]))
        arrays = {k: z[k] for k in ("blob", "offsets", "labels")}
        names = (z["names_utf8"].tobytes().decode("utf-8", "replace").split("\n") if "names_utf8" in z.files
                 else [str(n) for n in z["names"]] if "names" in z.files else [])
    except Exception as exc:
        raise DataError(f"{name}: not a dogkit cache file ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise DataError(f"{name}: cache format {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                        f"expected {CACHE_FORMAT}")
    problems = cache_problems(arrays, meta)
    if problems:
        raise DataError(f"{name}: not a valid dogkit cache: " + "; ".join(problems))
    codec = str(meta.get("codec", "webp")).split()[0]
    if not codec_available(codec):
        raise DataError(f"{name}: images stored as {codec}, which this Pillow cannot decode "
                        "(Pillow >= 11.3 reads AVIF; or rebuild the cache with --codec webp)")
    blob, offsets, shape = arrays["blob"].tobytes(), arrays["offsets"], tuple(meta["shape"])
    images = np.empty((len(offsets) - 1, *shape), dtype=np.uint8)

    def decode(i):
        try:
            with Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]])) as img:
                if img.size != shape[:2][::-1]:
                    raise ValueError(f"{img.size[0]}x{img.size[1]}, the cache says {shape[1]}x{shape[0]}")
                images[i] = np.asarray(img.convert("RGB"))
        except Exception as exc:
            raise DataError(f"{name}: image {i} of the cache is corrupt ({type(exc).__name__}: {exc})") from None

    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:  # decoders release the GIL
        list(pool.map(decode, range(len(images))))
    if len(names) != len(images):  # names are never needed to train: a mismatch forgets them
        names = [f"#{i}" for i in range(len(images))]
    return {"images": images, "labels": arrays["labels"].astype(np.int64), "names": names,
            "breeds": meta["breeds"], "meta": meta}


def load_dataset(path, size=64, strategy=DEFAULT_STRATEGY, annotations=None, log=print, progress=False):
    """Anything `dogkit clean-data` accepts, or a cache it wrote -> {images, labels, breeds, summary}."""
    if is_cache(path):
        data = load_cache(path)
        data["summary"] = data["meta"].get("summary") or {}
        log(f"data: {path} ({len(data['images'])} crops, {len(data['breeds'])} breeds, cache)")
        return data
    data = clean(path, annotations=annotations, size=size, strategy=strategy, log=log, progress=progress)
    log(f"data: {path} cleaned to {len(data['images'])} crops in {data['summary']['seconds']} s")
    return data
