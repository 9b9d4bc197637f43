"""One test per submission rule: each builds a zip that breaks exactly that rule. The rules of one
entry are checked in zips of SMALL entries (load_submission's n_images: the count strict mode
demands); the count rule and a valid submission at the competition's 10,000."""
import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from conftest import png_bytes
from dogkit.metrics.submission import N_IMAGES, SubmissionError, load_submission

SMALL = 40  # entries in a zip whose count is not what is tested
GOOD = png_bytes(np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8))


def make_zip(path, entries, n=SMALL):
    """n valid entries 00000.png ..., then `entries` (name -> bytes) replacing or adding."""
    names = {f"{i:05d}.png": GOOD for i in range(n)}
    names.update(entries)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in names.items():
            if data is None:
                zf.writestr(zipfile.ZipInfo(name), b"")
            else:
                zf.writestr(name, data)
    return path


def violations(path, strict=True, n_images=SMALL):
    with pytest.raises(SubmissionError) as err:
        load_submission(path, strict=strict, n_images=n_images)
    return "\n".join(err.value.violations)


def encode(pixels, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)  # the mode follows from the array's shape (HW: L, HW4: RGBA)
    return buf.getvalue()


def test_valid_submission_passes(tmp_path):
    images = load_submission(make_zip(tmp_path / "ok.zip", {}, n=N_IMAGES))
    assert images.pixels.shape == (N_IMAGES, 64, 64, 3)


@pytest.mark.parametrize("n", [N_IMAGES - 1, N_IMAGES + 1])
def test_wrong_count(tmp_path, n):
    out = violations(make_zip(tmp_path / "n.zip", {}, n=n), n_images=N_IMAGES)
    assert f"{n} entries, must be exactly 10000" in out


def test_jpeg_named_png(tmp_path):
    jpeg = encode(np.zeros((64, 64, 3), np.uint8), "JPEG")
    assert "00007.png: not a PNG by content (a JPEG)" in violations(make_zip(tmp_path / "j.zip", {"00007.png": jpeg}))


def test_wrong_size(tmp_path):
    small = encode(np.zeros((64, 63, 3), np.uint8))
    assert "00001.png: size 63x64, must be 64x64" in violations(make_zip(tmp_path / "s.zip", {"00001.png": small}))


def test_rgba(tmp_path):
    rgba = encode(np.zeros((64, 64, 4), np.uint8))
    assert "colour type RGBA, must be RGB" in violations(make_zip(tmp_path / "a.zip", {"00002.png": rgba}))


def test_grayscale(tmp_path):
    gray = encode(np.zeros((64, 64), np.uint8))
    assert "colour type grayscale, must be RGB" in violations(make_zip(tmp_path / "g.zip", {"00003.png": gray}))


def test_sixteen_bit(tmp_path):
    # a 16-bit RGB PNG: patch the IHDR of a valid file (bit depth byte) and recompute its CRC
    import struct
    import zlib

    raw = bytearray(GOOD)
    raw[24] = 16
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    assert "16-bit channels, must be 8-bit" in violations(make_zip(tmp_path / "b.zip", {"00004.png": bytes(raw)}))


def test_corrupt_png(tmp_path):
    broken = GOOD[:60] + b"\x00" * 40
    assert "00005.png: corrupt PNG" in violations(make_zip(tmp_path / "c.zip", {"00005.png": broken}))


def test_nested_folder(tmp_path):
    out = violations(make_zip(tmp_path / "d.zip", {"dogs/": None, "dogs/00000.png": GOOD}, n=SMALL - 1))
    assert "dogs/: folders are not allowed" in out
    assert "dogs/00000.png: nested path" in out


def test_macosx_entries(tmp_path):
    out = violations(make_zip(tmp_path / "m.zip", {"__MACOSX/._00000.png": b"junk"}, n=SMALL))
    assert "__MACOSX/._00000.png: __MACOSX/ entries are not allowed" in out


def test_dotdot_path(tmp_path):
    out = violations(make_zip(tmp_path / "p.zip", {"../evil.png": GOOD}, n=SMALL - 1))
    assert "../evil.png: unsafe path" in out


def test_huge_claimed_size_is_refused_before_decompression(tmp_path):
    path = tmp_path / "bomb.zip"
    make_zip(path, {}, n=SMALL - 1)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bomb.png", b"\x00" * (8 << 20))
    assert "bomb.png: claims 8388608 bytes uncompressed" in violations(path)
    assert "claims" in violations(path, strict=False)


def test_not_a_zip(tmp_path):
    path = tmp_path / "images.zip"
    path.write_bytes(b"this is not a zip")
    assert "not a zip file" in violations(path)


def test_empty_zip(tmp_path):
    path = tmp_path / "empty.zip"
    zipfile.ZipFile(path, "w").close()
    assert "empty zip" in violations(path)


def test_every_violation_is_reported(tmp_path):
    jpeg = encode(np.zeros((64, 64, 3), np.uint8), "JPEG")
    out = violations(make_zip(tmp_path / "many.zip", {"00001.png": jpeg, "00002.png": jpeg}))
    assert "00001.png" in out and "00002.png" in out


def test_no_strict_accepts_a_few_images_but_not_unreadable_ones(tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(GOOD)
    assert load_submission(folder, strict=False).pixels.shape == (3, 64, 64, 3)
    (folder / "bad.png").write_bytes(b"garbage")
    assert "bad.png: unreadable image" in violations(folder, strict=False)
    assert "must be exactly 10000" in violations(folder, strict=True, n_images=N_IMAGES)
