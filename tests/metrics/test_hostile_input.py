"""Hostile input: zips that lie in their headers, bombs, encryption, duplicates. Every one ends in
a named rule violation (SubmissionError / a counted clean-data event), never a traceback, and
memory stays bounded whatever the zip claims."""
import io
import struct
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import png_bytes
from dogkit.core import data as D
from dogkit.metrics.submission import MAX_ENTRY_BYTES, MAX_TOTAL_BYTES, N_IMAGES, SubmissionError, load_submission

GOOD = png_bytes(np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
# local header: flag +6, method +8, crc +14, compressed size +18, size +22
# central directory entry: flag +8, method +10, crc +16, compressed size +20, size +24, name +46
LOCAL = {"flag": (6, "<H"), "method": (8, "<H"), "crc": (14, "<I"), "csize": (18, "<I"), "size": (22, "<I")}
CENTRAL = {"flag": (8, "<H"), "method": (10, "<H"), "crc": (16, "<I"), "csize": (20, "<I"), "size": (24, "<I")}


def write_zip(path, entries, method=zipfile.ZIP_STORED):
    """entries: [(name, bytes)] in order (duplicates allowed: zipfile only warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(path, "w", method) as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return path


def lie(path, name, **fields):
    """Rewrite header fields of entry `name` in its local header and the central directory: a raw
    zip writer that lets a test lie in any field."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        local = zf.getinfo(name).header_offset
    central = raw.find(b"PK\x01\x02", 0)
    while central >= 0:
        nlen = struct.unpack_from("<H", raw, central + 28)[0]
        if raw[central + 46:central + 46 + nlen] == name.encode():
            break
        central = raw.find(b"PK\x01\x02", central + 46)
    for key, value in fields.items():
        for base, table in ((local, LOCAL), (central, CENTRAL)):
            offset, fmt = table[key]
            struct.pack_into(fmt, raw, base + offset, value)
    path.write_bytes(bytes(raw))
    return path


PIXELS = N_IMAGES * 64 * 64 * 3  # the decoded submission, 123 MB


SMALL = 40  # entries in a zip whose count is not what is tested (load_submission's n_images)


def full(extra=(), n=N_IMAGES):
    return [(f"{i:05d}.png", GOOD) for i in range(n - len(extra))] + list(extra)


def violations(path, **kw):
    with pytest.raises(SubmissionError) as err:
        load_submission(path, **kw)
    return "\n".join(err.value.violations)


def test_duplicate_names_are_a_violation(tmp_path):
    path = write_zip(tmp_path / "dup.zip", full([("00005.png", GOOD)], n=SMALL))
    assert "00005.png: 2 entries share this name" in violations(path, n_images=SMALL)


@pytest.mark.slow
def test_padded_entries_are_refused_from_the_listing_with_bounded_memory(tmp_path):
    """Each entry a valid PNG followed by 200 KB of zeros: 4 MB on disk, 2 GB inflated."""
    path = write_zip(tmp_path / "pad.zip", [(f"{i:05d}.png", GOOD + bytes(200_000)) for i in range(N_IMAGES)],
                     zipfile.ZIP_DEFLATED)
    tracemalloc.start()
    out = violations(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert f"00000.png: claims {len(GOOD) + 200_000} bytes uncompressed (limit {MAX_ENTRY_BYTES})" in out
    assert peak < 64 << 20


def test_an_encrypted_entry_is_named(tmp_path):
    path = lie(write_zip(tmp_path / "enc.zip", full(n=SMALL)), "00003.png", flag=0x1)
    assert "00003.png: encrypted entry" in violations(path, n_images=SMALL)


def test_a_wrong_crc_is_named(tmp_path):
    path = lie(write_zip(tmp_path / "crc.zip", full(n=SMALL)), "00004.png", crc=0x12345678)
    assert "00004.png: corrupt entry (Bad CRC-32" in violations(path, n_images=SMALL)


def test_deflate64_is_named(tmp_path):
    path = lie(write_zip(tmp_path / "d64.zip", full(n=SMALL), zipfile.ZIP_DEFLATED), "00006.png", method=9)
    assert "00006.png: compression method 9 (only stored and deflated entries are read)" in violations(
        path, n_images=SMALL)


def test_a_bzip2_bomb_lying_about_its_size_is_refused_unread(tmp_path):
    path = write_zip(tmp_path / "bz.zip", full(n=SMALL - 1))
    with zipfile.ZipFile(path, "a", zipfile.ZIP_BZIP2) as zf:
        zf.writestr("bomb.png", bytes(200 << 20))  # 200 MB of zeros: a few hundred bytes compressed
    lie(path, "bomb.png", size=12_000)
    tracemalloc.start()
    out = violations(path, n_images=SMALL)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "bomb.png: compression method 12" in out
    assert peak < 32 << 20


@pytest.mark.slow
def test_a_deflated_entry_inflating_past_its_declared_size_is_cut_and_named(tmp_path):
    path = write_zip(tmp_path / "big.zip", full(n=N_IMAGES - 1))
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("liar.png", GOOD + bytes(50 << 20))
    lie(path, "liar.png", size=len(GOOD))
    tracemalloc.start()
    out = violations(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "liar.png: corrupt entry" in out
    assert peak < PIXELS + (16 << 20)  # the other 9,999 images decoded; the 50 MB never held


def test_a_truncated_entry_is_named(tmp_path):
    path = write_zip(tmp_path / "cut.zip", full(n=SMALL), zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(path) as zf:
        csize = zf.getinfo("00007.png").compress_size
    lie(path, "00007.png", csize=csize // 2)
    assert "00007.png: " in violations(path, n_images=SMALL)


def test_entries_claiming_more_than_the_total_cap_are_refused_from_the_listing(tmp_path):
    path = write_zip(tmp_path / "total.zip", [(f"{i:05d}.png", GOOD + bytes(20_000)) for i in range(N_IMAGES)],
                     zipfile.ZIP_DEFLATED)
    assert f"entries claim {N_IMAGES * (len(GOOD) + 20_000)} bytes in all (limit {MAX_TOTAL_BYTES})" in violations(path)


@pytest.mark.slow
def test_a_total_size_bomb_stays_under_the_stated_bound(tmp_path):
    """10,000 entries under the per-entry cap, each padded with 8 KB (200 MB inflated, under the
    total cap): accepted, and the peak is the decoded pixels (123 MB, twice while stacking) plus
    what is in flight (at most 4 entries per thread), never the 200 MB of raw entries."""
    path = write_zip(tmp_path / "total.zip", [(f"{i:05d}.png", GOOD + bytes(8_000)) for i in range(N_IMAGES)],
                     zipfile.ZIP_DEFLATED)
    tracemalloc.start()
    images = load_submission(path, workers=2)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert images.pixels.shape == (N_IMAGES, 64, 64, 3)
    assert peak < 2 * PIXELS + (16 << 20)


def test_no_strict_resizes_every_off_size_image_the_same_way(tmp_path):
    from conftest import png_bytes as enc

    rng = np.random.default_rng(1)
    big = [(f"{i}.png", enc(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))) for i in range(3)]
    path = write_zip(tmp_path / "big.zip", big)
    images = load_submission(path, strict=False)
    assert images.pixels.shape == (3, 64, 64, 3)  # all 128x128: still resized, not scored at 128
    assert any("3 image(s) not 64x64" in n for n in images.notes)


def test_folders_do_not_follow_symlinks_out(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for i in range(3):
        (outside / f"{i}.png").write_bytes(GOOD)
    folder = tmp_path / "sub"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.png").write_bytes(GOOD)
    (folder / "link").symlink_to(outside)
    (folder / "x.png").symlink_to(outside / "0.png")
    assert load_submission(folder, strict=False).pixels.shape == (2, 64, 64, 3)
    out = violations(folder, strict=True, n_images=2)
    assert "link: a symbolic link (not followed)" in out and "x.png: a symbolic link" in out


def small_zip(tmp_path):
    return write_zip(tmp_path / "small.zip", [(f"{i:05d}.png", GOOD) for i in range(4)], zipfile.ZIP_DEFLATED)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_zips_give_a_score_or_a_submission_error(tmp_path, data):
    raw = bytearray(small_zip(tmp_path).read_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        if data.draw(st.booleans()):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        else:  # a header field: sizes, CRCs, methods, flags
            table = data.draw(st.sampled_from([LOCAL, CENTRAL]))
            sig = b"PK\x03\x04" if table is LOCAL else b"PK\x01\x02"
            starts = [k for k in range(len(raw) - 4) if raw[k:k + 4] == sig]
            if not starts:
                continue
            base = data.draw(st.sampled_from(starts))
            offset, fmt = table[data.draw(st.sampled_from(sorted(table)))]
            value = data.draw(st.integers(0, 0xFFFF if fmt == "<H" else 0xFFFFFFFF))
            if base + offset + struct.calcsize(fmt) <= len(raw):
                struct.pack_into(fmt, raw, base + offset, value)
    path = tmp_path / "mutant.zip"
    path.write_bytes(bytes(raw))
    original = np.asarray(Image.open(io.BytesIO(GOOD)))
    for strict in (True, False):
        try:
            got = load_submission(path, strict=strict, n_images=4)
        except SubmissionError:
            continue
        # what scores is the photos as written: the CRCs let no changed byte of an image through
        assert got.pixels.dtype == np.uint8 and got.pixels.shape[1:] == (64, 64, 3) and len(got.names) == len(got.pixels)
        assert all(np.array_equal(px, original) for px in got.pixels), (strict, got.names)
        assert len(got.pixels) == 4 if strict else 1 <= len(got.pixels) <= 4


def hostile_photo_zip(tmp_path):
    rng = np.random.default_rng(2)
    photo = png_bytes(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8))
    path = write_zip(tmp_path / "photos.zip", [(f"p{i}.png", photo) for i in range(5)] + [("secret.png", photo)])
    lie(path, "secret.png", flag=0x1)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_BZIP2) as zf:
        zf.writestr("bomb.png", bytes(100 << 20))
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("huge.png", bytes(D.MAX_PHOTO_BYTES + 1))
        zf.writestr("pixels.png", png_bytes(np.zeros((100, 100, 3), np.uint8)))
    return path


def test_clean_data_counts_hostile_zip_entries(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 90 * 90)  # so a 100x100 test image is a pixel bomb
    data = D.clean(str(hostile_photo_zip(tmp_path)), workers=1, log=lambda m: None)
    events, examples = data["summary"]["events"], data["summary"]["examples"]
    assert events["unreadable file or zip entry"] == 3  # encrypted, bzip2, over the size cap
    assert events["image over PIL's 8100 pixel limit (decompression bomb)"] == 1
    assert examples["image over PIL's 8100 pixel limit (decompression bomb)"].startswith("pixels.png")
    assert data["summary"]["crops"] == 1 and events["exact duplicate removed"] == 4  # the 5 readable copies


def test_clean_data_strict_names_the_hostile_entry(tmp_path):
    from click.testing import CliRunner

    from dogkit.cli import main

    res = CliRunner().invoke(main, ["clean-data", str(hostile_photo_zip(tmp_path)), "-o", str(tmp_path / "c.npz"),
                                    "--strict", "--workers", "1"])
    assert res.exit_code == 1
    assert "(--strict)" in res.output and ("encrypted entry" in res.output or "compression method 12" in res.output
                                           or "claims" in res.output)
    assert not (tmp_path / "c.npz").exists()


def test_reference_skips_unreadable_photos_with_a_named_count_and_still_resumes(tmp_path, monkeypatch):
    from test_reference_and_score import MeanNet

    from dogkit.metrics import reference as R

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(6):
        (folder / f"{i}.png").write_bytes(png_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    (folder / "2b.png").write_bytes(b"not an image")
    model, info = MeanNet(), {"digest": "fake", "source": "test"}
    real_pool3, calls = R.feat.pool3, {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_pool3(*args)

    monkeypatch.setattr(R.feat, "pool3", flaky)
    with pytest.raises(KeyboardInterrupt):  # after the batch holding the unreadable photo
        R.build_reference(folder, tmp_path / "ref.npz", model, info, "cpu", batch_size=4, checkpoint_every=1,
                          progress=False)
    monkeypatch.setattr(R.feat, "pool3", real_pool3)
    logs = []
    ref = R.build_reference(folder, tmp_path / "ref.npz", model, info, "cpu", batch_size=4, checkpoint_every=1,
                            progress=False, log=logs.append)
    assert any("resuming" in m for m in logs)
    assert len(ref.names) == 6 and "2b.png" not in ref.names and len(ref.features) == 6
    assert ref.provenance["skipped"] == {"count": 1, "first": ["2b.png"]}
    assert any("1 unreadable photo(s) skipped" in m and "2b.png" in m for m in logs)
