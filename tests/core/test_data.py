"""Cleaning: the real Stanford Dogs XML files with synthesised photos, every strategy, bad input."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dogkit.cli import main
from dogkit.core import data as D

# The cache's default codec; Pillow before 11.3 (older Kaggle images, tools/check_stacks.py) cannot
# write it, and dogkit says so in one line (test_cache_without_avif_support_names_the_fix)
needs_avif = pytest.mark.skipif(not D.codec_available("avif"),
                                reason="this Pillow has no AVIF (Pillow >= 11.3 writes the default cache)")


def xml_files(annotation_dir):
    return sorted(p for p in Path(annotation_dir).rglob("*") if p.is_file())


def coordinate_image(width, height):
    """Pixels that encode their own coordinates: any cut reveals exactly where it came from."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs % 256, ys % 256, (xs // 256) * 16 + ys // 256], axis=-1).astype(np.uint8)


def decode_xy(pixel):
    r, g, b = (int(v) for v in pixel)
    return r + 256 * (b // 16), g + 256 * (b % 16)


def test_parses_every_real_annotation(annotation_dir):
    files = xml_files(annotation_dir)
    counts = [len(D.parse_annotation(p.read_bytes(), p)[2]) for p in files]
    assert len(files) == 712
    assert counts.count(1) == 674 and counts.count(2) == 37 and counts.count(3) == 1


@pytest.mark.parametrize("strategy", D.STRATEGIES)
def test_each_strategy_recovers_each_dog_exactly(annotation_dir, strategy):
    files = xml_files(annotation_dir)
    multi = [p for p in files if len(D.parse_annotation(p.read_bytes())[2]) > 1]
    chosen = multi + files[::40]
    checked = 0
    for path in chosen:
        width, height, boxes, _ = D.parse_annotation(path.read_bytes(), path)
        photo = coordinate_image(width, height)
        for box in boxes:
            clamped = D.clamp_box(box, width, height)
            region = D.crop_region(clamped, width, height, strategy)
            x0, y0, x1, y1 = clamped
            w, h = x1 - x0, y1 - y0
            if strategy == "aspect" and not 0.8 <= w / h <= 1.25:
                assert region is None
                continue
            crop = D.cut(photo, region)
            left, top, right, bottom = region
            assert crop.shape[:2] == (bottom - top, right - left)
            if strategy in ("box", "aspect"):
                assert region == clamped
                assert decode_xy(crop[0, 0]) == (x0, y0)
                assert decode_xy(crop[-1, -1]) == (x1 - 1, y1 - 1)
            elif strategy == "square":
                s = min(w, h)
                assert right - left == bottom - top == s
                assert x0 <= left and right <= x1 and y0 <= top and bottom <= y1
                assert decode_xy(crop[0, 0]) == (left, top)
                assert abs((left + right) - (x0 + x1)) <= 1 and abs((top + bottom) - (y0 + y1)) <= 1
            else:  # pad: a square around the box; inside the photo wherever it fits
                assert right - left == bottom - top >= max(w, h)
                if right - left <= min(width, height):
                    assert 0 <= left and right <= width and 0 <= top and bottom <= height
                    assert left <= x0 and x1 <= right and top <= y0 and y1 <= bottom
                    dx, dy = x0 - left, y0 - top
                    assert decode_xy(crop[dy, dx]) == (x0, y0)
            checked += 1
    assert checked > 40


def test_pad_reflects_what_falls_outside():
    photo = coordinate_image(50, 20)
    region = D.crop_region((0, 0, 50, 20), 50, 20, "pad", margin=0.1)
    crop = D.cut(photo, region)
    assert crop.shape[:2] == (55, 55)
    top = -region[1]
    # reflected rows mirror the rows inside the photo (reflect mode: the edge row is not repeated)
    np.testing.assert_array_equal(crop[top - 1], crop[top + 1])


def make_kaggle_layout(root, annotation_dir, n_per_breed=6):
    """all-dogs/*.jpg + Annotation/<breed>/<id> from real XML, each box filled with a solid colour."""
    photos, ann = root / "all-dogs", root / "Annotation"
    photos.mkdir(parents=True)
    expected = 0
    for breed_dir in sorted(Path(annotation_dir).iterdir()):
        files = sorted(breed_dir.iterdir())
        multi = [f for f in files if len(D.parse_annotation(f.read_bytes())[2]) > 1][:2]
        for f in list(dict.fromkeys(multi + files))[:n_per_breed]:
            width, height, boxes, _ = D.parse_annotation(f.read_bytes())
            img = np.full((height, width, 3), 40, np.uint8)
            for k, (x0, y0, x1, y1) in enumerate(boxes):
                img[y0:y1, x0:x1] = (200, 30 * (k + 1), 90)
            Image.fromarray(img).save(photos / f"{f.name}.jpg", quality=95)
            (ann / breed_dir.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, ann / breed_dir.name / f.name)
            expected += len(boxes)
    return expected


def test_kaggle_layout_one_crop_per_dog_with_breed(tmp_path, annotation_dir):
    expected = make_kaggle_layout(tmp_path / "kaggle", annotation_dir)
    data = D.clean(str(tmp_path / "kaggle"), strategy="box", min_side=1, workers=1, log=lambda m: None)
    assert data["summary"]["layout"].startswith("Kaggle")
    assert len(data["images"]) == expected - data["summary"]["events"].get("exact duplicate removed", 0)
    assert data["breeds"] == sorted(p.name for p in Path(annotation_dir).iterdir())
    for name, label in zip(data["names"], data["labels"]):
        synset = os.path.basename(name).split("_")[0]
        assert data["breeds"][label].startswith(synset)
    # the 'box' strategy on a solid box gives (almost) the box's colour everywhere
    centre = data["images"][:, 24:40, 24:40].reshape(-1, 3).mean(0)
    assert centre[0] > 150


def test_precropped_breed_folders(tmp_path, crops_dir):
    src = tmp_path / "crops"
    for breed in sorted(os.listdir(crops_dir))[:2]:
        (src / breed).mkdir(parents=True)
        for f in sorted(os.listdir(crops_dir / breed))[:5]:
            shutil.copy(crops_dir / breed / f, src / breed / f)
    data = D.clean(str(src), workers=1, log=lambda m: None)
    assert data["summary"]["layout"] == "pre-cropped breed folders"
    assert data["images"].shape == (10, 64, 64, 3)
    assert sorted(set(data["labels"].tolist())) == [0, 1]


def bad_inputs(root):
    root.mkdir()
    (root / "Annotation" / "n02000001-testdog").mkdir(parents=True)
    photos = root / "all-dogs"
    photos.mkdir()
    good = np.full((100, 120, 3), 128, np.uint8)

    def xml(name, boxes, size=(120, 100)):
        objs = "".join(f"<object><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax>"
                       "</bndbox></object>" for a, b, c, d in boxes)
        (root / "Annotation" / "n02000001-testdog" / name).write_text(
            f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
            f"{objs}</annotation>")

    Image.fromarray(good).save(photos / "n02000001_1.jpg")
    xml("n02000001_1", [(10, 10, 90, 90)])
    (photos / "n02000001_2.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    xml("n02000001_2", [(10, 10, 90, 90)])
    Image.fromarray(good).save(photos / "n02000001_3.jpg")
    (photos / "n02000001_3.jpg").write_bytes((photos / "n02000001_3.jpg").read_bytes()[:300])  # truncated
    xml("n02000001_3", [(10, 10, 90, 90)])
    Image.fromarray(good[..., 0] + 1).convert("CMYK").save(photos / "n02000001_4.jpg")
    xml("n02000001_4", [(10, 10, 90, 90)])
    Image.fromarray(good[..., 0] + 2).save(photos / "n02000001_5.jpg")
    xml("n02000001_5", [(10, 10, 90, 90)])
    Image.fromarray(np.dstack([good + 3, np.full((100, 120), 128, np.uint8)])).save(photos / "n02000001_6.png")
    xml("n02000001_6", [(10, 10, 90, 90)])
    Image.fromarray(good + 4).save(photos / "n02000001_7.jpg")  # no annotation
    xml("n02000001_8", [(10, 10, 90, 90)])  # annotation, no photo
    Image.fromarray(good + 5).save(photos / "n02000001_9.jpg")
    (root / "Annotation" / "n02000001-testdog" / "n02000001_9").write_text("<annotation><size>")  # malformed
    Image.fromarray(good + 6).save(photos / "n02000001_10.jpg")
    xml("n02000001_10", [(-20, 50, 200, 140)])  # partly outside: clamped
    Image.fromarray(good + 7).save(photos / "n02000001_11.jpg")
    xml("n02000001_11", [(30, 30, 30, 80), (0, 0, 60, 60)])  # a zero-area box and a good one
    (photos / "second").mkdir()
    Image.fromarray(good + 8).save(photos / "second" / "n02000001_1.jpg")  # same name, other folder
    return root


def test_bad_input_is_counted_not_fatal(tmp_path):
    root = bad_inputs(tmp_path / "bad")
    data = D.clean(str(root), strategy="box", min_side=8, workers=1, log=lambda m: None)
    events = data["summary"]["events"]
    assert events["corrupt or truncated image"] == 2
    assert events["converted from CMYK"] == 1
    assert events["converted from L"] == 1
    assert events["converted from RGBA"] == 1
    assert events["photo without annotation: whole photo used"] == 1
    assert events["annotation without photo"] == 1
    assert events["malformed annotation: whole photo used"] == 1
    assert events["box clamped to the photo"] == 1
    assert events["zero-area box"] == 1
    assert events["same file name in two folders"] == 1
    assert len(data["images"]) == 9  # 11 photos, 2 unreadable; _11 keeps its one real box


@needs_avif
def test_strict_makes_bad_input_fatal_with_the_file_named(tmp_path):
    root = bad_inputs(tmp_path / "bad")
    out = tmp_path / "cache.npz"
    res = CliRunner().invoke(main, ["clean-data", str(root), "-o", str(out), "--strict", "--workers", "1"])
    assert res.exit_code == 1, res.output  # bad input
    assert "n02000001_" in res.output and "(--strict)" in res.output
    assert not out.exists()
    res = CliRunner().invoke(main, ["clean-data", str(root), "-o", str(out), "--workers", "1",
                                    "--preview", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    assert "corrupt or truncated image" in res.output and out.exists() and (tmp_path / "p.png").exists()


def test_exact_duplicates_are_removed(tmp_path):
    (tmp_path / "flat").mkdir()
    img = np.random.default_rng(0).integers(0, 256, (70, 70, 3), dtype=np.uint8)
    for name in ("a.png", "b.png"):
        Image.fromarray(img).save(tmp_path / "flat" / name)
    Image.fromarray(255 - img).save(tmp_path / "flat" / "c.png")
    data = D.clean(str(tmp_path / "flat"), workers=1, log=lambda m: None)
    assert len(data["images"]) == 2
    assert data["summary"]["events"]["exact duplicate removed"] == 1


@pytest.mark.slow
@needs_avif
def test_cache_round_trip(tmp_path, tiny_dataset):
    ds = dict(tiny_dataset, settings={"strategy": "box"}, summary={})
    D.save_cache(tmp_path / "exact.npz", ds, workers=1, codec="webp-lossless")
    back = D.load_cache(str(tmp_path / "exact.npz"))
    np.testing.assert_array_equal(back["images"], ds["images"])
    np.testing.assert_array_equal(back["labels"], ds["labels"])
    assert back["names"] == ds["names"] and back["breeds"] == ds["breeds"]
    for codec in ("avif", "webp"):
        D.save_cache(tmp_path / f"{codec}.npz", ds, workers=1, codec=codec)
        lossy = D.load_cache(str(tmp_path / f"{codec}.npz"))
        np.testing.assert_array_equal(lossy["labels"], ds["labels"])
        assert lossy["names"] == ds["names"] and lossy["meta"]["codec"] == codec
        err = np.abs(lossy["images"].astype(int) - ds["images"]).mean()
        assert 0 < err < 20  # noisy test images are the worst case for a lossy codec


@needs_avif
def test_cache_without_avif_support_names_the_fix(tmp_path, tiny_dataset, monkeypatch):
    ds = dict(tiny_dataset, settings={}, summary={})
    D.save_cache(tmp_path / "c.npz", ds, workers=1, codec="avif")
    monkeypatch.setattr(D, "codec_available", lambda codec: codec != "avif")
    with pytest.raises(D.DataError, match="c.npz: images stored as avif.*--codec webp"):
        D.load_cache(str(tmp_path / "c.npz"))
    with pytest.raises(D.DataError, match="needs Pillow with AVIF"):
        D.save_cache(tmp_path / "d.npz", ds, workers=1, codec="avif")
    assert not (tmp_path / "d.npz").exists()


def test_cache_of_an_older_release_still_loads(tmp_path, tiny_dataset):
    """Caches written before the AVIF default: codec 'webp q92' and names as a unicode array."""
    ds = dict(tiny_dataset, settings={}, summary={})
    D.save_cache(tmp_path / "new.npz", ds, workers=1, codec="webp-lossless")
    with np.load(tmp_path / "new.npz") as z:
        arrays = {k: z[k] for k in z.files if k != "names_utf8"}
    meta = json.loads(str(arrays["meta"]))
    arrays["meta"] = json.dumps(dict(meta, codec="webp q92"))
    np.savez(tmp_path / "old.npz", names=np.asarray(ds["names"]), **arrays)
    back = D.load_cache(str(tmp_path / "old.npz"))
    assert back["names"] == ds["names"]
    np.testing.assert_array_equal(back["images"], ds["images"])


@pytest.mark.slow
@needs_avif
def test_interrupted_cache_write_leaves_nothing_behind(tmp_path, tiny_dataset, monkeypatch):
    ds = dict(tiny_dataset, settings={}, summary={})
    out = tmp_path / "cache.npz"
    D.save_cache(out, ds, workers=1)
    before = out.read_bytes()

    def boom(path, **arrays):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(D.np, "savez", boom)
    with pytest.raises(KeyboardInterrupt):
        D.save_cache(out, ds, workers=1)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["cache.npz"]


def test_not_a_cache(tmp_path):
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"nope")
    with pytest.raises(D.DataError, match="not a dogkit cache"):
        D.load_cache(str(bad))


def test_workers_run_a_function_only_the_parent_can_import():
    """In a Kaggle notebook the cleaning function lives in __main__, which a spawned or
    forkserver worker (Python 3.14's default) cannot import: map_chunks forks whatever the
    default start method."""
    import multiprocessing
    import sys
    import types

    notebook = types.ModuleType("a_notebook_cell")  # in sys.modules only, like a notebook's __main__
    exec("def double(x):\n    return 2 * x\n", notebook.__dict__)
    sys.modules["a_notebook_cell"] = notebook
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    try:
        assert D.map_chunks(notebook.double, [1, 2, 3], workers=2) == [2, 4, 6]
    finally:
        multiprocessing.set_start_method(before, force=True)
        del sys.modules["a_notebook_cell"]


def test_a_16_bit_greyscale_png_keeps_its_grey_rather_than_clipping_to_white():
    """A 16-bit greyscale PNG (PIL opens it as I;16): grey 68 stored as 68 x 257 is grey 68 in RGB,
    with the gradient of its 16 bits kept; PIL's own convert("RGB") clips every value past 255 to
    white (the probe found a crop 96 % white where the photo's mean is 68)."""
    import io

    from PIL import Image

    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16)[None, :].repeat(8, axis=0)  # 0 .. 65535
    for pixels, expected in ((np.full((40, 50), 68 * 257, np.uint16), np.full((40, 50), 68)),
                             (ramp, np.arange(256)[None, :].repeat(8, axis=0))):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        events = []
        rgb = D.decode_rgb(buf.getvalue(), "grey16.png", events)
        assert rgb.dtype == np.uint8 and rgb.shape == expected.shape + (3,)
        assert (rgb == expected[..., None]).all()
        assert events[0][0].startswith("converted from I")


@pytest.mark.parametrize("box,reason", [((30, 30, 30, 80), "zero-area box"), ((60, 10, 20, 50), "box with min and max swapped"),
                                        ((10, 50, 40, 20), "box with min and max swapped"),
                                        ((200, 200, 260, 260), "box outside the photo"),
                                        ((-80, -80, -10, -10), "box outside the photo")])
def test_an_unusable_box_is_counted_under_its_own_reason(box, reason):
    assert D.clamp_box(box, 100, 100) is None and D.unusable_box(box, 100, 100) == reason


def test_real_data_quirks_are_used_or_skipped_with_a_named_reason(tmp_path):
    """As the Stanford Dogs and Kaggle files really come: a PNG named .jpg and a CMYK JPEG are used;
    a JPEG with an EXIF orientation is cropped where its box says on the stored pixels (the boxes
    refer to them); a header claiming 40,000 x 40,000 pixels, and an annotation naming another
    photo (another name, another size), are skipped; 200 boxes on one photo give 64 crops; an
    annotation whose <size> is not the photo's is used and counted. None ends the run."""
    import struct
    import zlib

    synset, breed = "n02000001", "n02000001-dog"
    photos, ann = tmp_path / "Images" / breed, tmp_path / "Annotation" / breed
    photos.mkdir(parents=True)
    ann.mkdir(parents=True)

    def xml(stem, boxes, size=(120, 80), named=None):
        objs = "".join(f"<object><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax></bndbox>"
                       "</object>" for a, b, c, d in boxes)
        (ann / stem).write_text(f"<annotation><filename>{named or stem}</filename><size><width>{size[0]}</width>"
                                f"<height>{size[1]}</height></size>{objs}</annotation>")

    left_red = np.zeros((80, 120, 3), np.uint8)
    left_red[:, :60] = (220, 20, 20)
    left_red[:, 60:] = (20, 20, 220)
    Image.fromarray(left_red).save(photos / f"{synset}_1.jpg", "PNG")  # a PNG named .jpg
    xml(f"{synset}_1", [(0, 0, 60, 80)])
    Image.fromarray(left_red).convert("CMYK").save(photos / f"{synset}_2.jpg")
    xml(f"{synset}_2", [(60, 0, 120, 80)])
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": a viewer shows it upright, the boxes refer to the stored pixels
    Image.fromarray(left_red).save(photos / f"{synset}_3.jpg", exif=exif.tobytes(), quality=95)
    xml(f"{synset}_3", [(60, 0, 120, 80)])
    ihdr = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    (photos / f"{synset}_4.jpg").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    xml(f"{synset}_4", [(0, 0, 10, 10)])
    Image.fromarray(left_red).save(photos / f"{synset}_5.jpg")
    xml(f"{synset}_5", [(0, 0, 60, 80)], size=(500, 375), named=f"{synset}_99")  # another photo's
    Image.fromarray(left_red).save(photos / f"{synset}_6.jpg")
    xml(f"{synset}_6", [(i % 64, 0, i % 64 + 56, 80) for i in range(200)])  # the first 64 all different
    Image.fromarray(left_red).save(photos / f"{synset}_7.jpg")
    xml(f"{synset}_7", [(0, 0, 60, 80)], size=(121, 80))
    data = D.clean(str(tmp_path), strategy="box", margin=0.0, workers=1, log=lambda m: None)
    events, examples = data["summary"]["events"], data["summary"]["examples"]
    names = [os.path.basename(n) for n in data["names"]]
    assert events["annotation names another photo: photo skipped"] == 1
    assert f"{synset}_5.jpg" in examples["annotation names another photo: photo skipped"]
    assert any("decompression bomb" in k for k in events) and not any(f"{synset}_4" in n for n in names)
    assert events["more than 64 boxes: the first 64 used"] == 1
    assert events["annotation's <size> is not the photo's: boxes used as given"] == 1
    assert events["converted from CMYK"] == 1
    by_photo = lambda k: [img for n, img in zip(names, data["images"]) if n.startswith(f"{synset}_{k}")]
    assert len(by_photo(6)) == 64 and len(by_photo(5)) == 0
    red = lambda img: img[..., 0].mean() > 150 > img[..., 2].mean()  # noqa: E731
    blue = lambda img: img[..., 2].mean() > 150 > img[..., 0].mean()  # noqa: E731
    assert red(by_photo(1)[0]) and blue(by_photo(2)[0]) and blue(by_photo(3)[0]) and red(by_photo(7)[0])
