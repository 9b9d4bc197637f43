"""Every input a user or a disk can hand dogkit (issue 30): special files, hostile names, hostile
arrays and option values. Each ends in one line naming the file and the rule, with its exit code,
bounded in time; a number that cannot be computed is an error, never a printed NaN; nothing
already there is changed. The hypothesis suites at the end generate hostile files per format."""
import io
import json
import os
import struct
import zipfile
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import png_bytes
from dogkit import cli
from dogkit.core import data as D
from dogkit.core.distributed import RankStopped
from dogkit.core.runtime import RunError, output_problem
from dogkit.core.train import RunFailed
from dogkit.core.sample import truncated_normal
from dogkit.core.settings import TrainConfig, parse_budget, with_settings
from dogkit.metrics import reference as R
from dogkit.metrics.fid import frechet_distance
from dogkit.metrics.report import read_log
from dogkit.metrics.submission import SubmissionError, check_png, decode_any, load_submission

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
RNG = np.random.default_rng(0)


def photo(size=80, seed=0):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def xml(*boxes, size=(80, 80)):
    objs = "".join(f"<object><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>"
                   for a, b, c, d in boxes)
    return f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height></size>{objs}</annotation>"


def invoke(args):
    """A dogkit command in-process: (exit code, stderr lines)."""
    res = CliRunner().invoke(cli.main, args)
    assert "Traceback" not in res.output, res.output
    return res.exit_code, [ln for ln in res.stderr.splitlines() if ln.strip()]


def one_line_error(args, code=1, match=None):
    exit_code, lines = invoke(args)
    assert exit_code in ((code,) if isinstance(code, int) else code), (exit_code, lines)
    errors = [ln for ln in lines if "Error" in ln]
    assert len(errors) == 1, lines
    if match:
        assert match in errors[0], errors[0]
    return errors[0]


# ---- special files and hostile names in a photo folder ------------------------------------------

@pytest.fixture()
def hostile_folder(tmp_path):
    root = tmp_path / "photos" / "n02085620-Chihuahua"
    root.mkdir(parents=True)
    for i in range(6):
        (root / f"n02085620_{i}.jpg").write_bytes(photo(seed=i))
    os.mkfifo(root / "n02085620_fifo.jpg")
    os.symlink("/dev/zero", root / "n02085620_zero.jpg")
    os.symlink(root / "missing.jpg", root / "n02085620_dangling.jpg")
    os.symlink(root / "n02085620_loop.jpg", root / "n02085620_loop.jpg")
    (root / os.fsdecode(b"n02085620_\xff\xfe.jpg")).write_bytes(photo(seed=10))
    (root / "n02085620_new\nline.jpg").write_bytes(photo(seed=11))
    return tmp_path / "photos"


def test_special_files_are_skipped_and_odd_names_survive_the_cache(hostile_folder, tmp_path):
    data = D.clean(str(hostile_folder), workers=1, log=lambda m: None)
    events = data["summary"]["events"]
    assert events["unreadable file or zip entry"] == 4  # FIFO, /dev/zero, dangling, loop: skipped, no hang
    assert len(data["images"]) == 8
    for odd in ("\\xff\\xfe", "new\\nline"):
        assert [n for n in data["names"] if odd in n], (odd, data["names"])
    D.save_cache(str(tmp_path / "c.npz"), data, workers=1, codec="webp")
    back = D.load_cache(str(tmp_path / "c.npz"))
    assert back["names"] == data["names"]  # one name per crop: a newline shifts nothing


def test_clean_data_cli_on_the_hostile_folder_is_one_run(hostile_folder, tmp_path):
    code, lines = invoke(["clean-data", str(hostile_folder), "-o", str(tmp_path / "c.npz"), "--workers", "1",
                          "--codec", "webp"])
    assert code == 0 and (tmp_path / "c.npz").exists(), lines


def test_an_annotation_with_an_infinite_coordinate_costs_one_photo_its_boxes(tmp_path):
    images, ann = tmp_path / "Images" / "n02085620-Chihuahua", tmp_path / "Annotation" / "n02085620-Chihuahua"
    images.mkdir(parents=True)
    ann.mkdir(parents=True)
    box = "<object><bndbox><xmin>{}</xmin><ymin>0</ymin><xmax>70</xmax><ymax>70</ymax></bndbox></object>"
    for i, xmin in enumerate(["inf", "nan", "1e400", "5"]):
        (images / f"n02085620_{i}.jpg").write_bytes(photo(seed=i))
        (ann / f"n02085620_{i}").write_text(f"<annotation>{box.format(xmin)}</annotation>")
    data = D.clean(str(tmp_path), workers=1, log=lambda m: None)
    assert data["summary"]["events"]["malformed annotation: whole photo used"] == 3
    assert len(data["images"]) == 4
    with pytest.raises(D.DataError, match="lacks a numeric"):
        D.parse_annotation(b"<a><object><bndbox><xmin>inf</xmin><ymin>1</ymin><xmax>3</xmax><ymax>4</ymax>"
                           b"</bndbox></object></a>")


def test_a_zip_of_photos_is_opened_once_per_process(tmp_path, monkeypatch):
    path = tmp_path / "all-dogs.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(40):
            zf.writestr(f"all-dogs/n02085620_{i}.jpg", photo(seed=i))
    opened = []
    real = zipfile.ZipFile
    monkeypatch.setattr(D.zipfile, "ZipFile", lambda *a, **k: opened.append(a) or real(*a, **k))
    data = D.clean(str(path), workers=1, log=lambda m: None)
    assert len(data["images"]) == 40 and len(opened) == 1  # was: once per photo (20,579 directory reads)


@pytest.mark.parametrize("margin, code", [(-1.5, 2), (300, 2), (float("nan"), 1)])  # click's range; NaN passes it
def test_margins_that_mean_nothing_are_refused(tmp_path, margin, code):
    with pytest.raises(D.DataError, match="margin"):
        D.clean(str(tmp_path), margin=margin, log=lambda m: None)
    args = ["clean-data", str(tmp_path), "-o", str(tmp_path / "c.npz"), "--margin", str(margin)]
    one_line_error(args, code, "margin")


# ---- output paths, checked before the work -------------------------------------------------------

def test_output_paths_are_checked_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "folder.npz").mkdir()
    assert "is a folder" in output_problem(tmp_path / "folder.npz")
    assert "a file, not a folder" in output_problem(tmp_path / "a-file" / "c.npz")
    assert "is a file" in output_problem(tmp_path / "a-file", folder=True)
    assert output_problem(tmp_path / "new" / "deeper" / "c.npz") is None
    src = str(tmp_path / "a-file")
    one_line_error(["clean-data", str(tmp_path), "-o", str(tmp_path / "folder.npz")], 1, "is a folder")
    one_line_error(["clean-data", str(tmp_path), "-o", str(tmp_path / "a-file" / "c.npz")], 1, "not a folder")
    one_line_error(["report", src, "--reference", src, "-o", src], 1, "is a file")
    assert (tmp_path / "a-file").read_text() == "x"  # nothing already there changed
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        assert "not writable" in output_problem(tmp_path / "ro" / "c.npz")


def test_the_kernel_refuses_an_out_that_is_a_file_before_cleaning(tmp_path, tiny_dataset):
    from dogkit.core import registry
    from dogkit.core.kernel import config_from_options, parse_args

    (tmp_path / "out").write_text("precious")
    opts = vars(parse_args(["--data", "x.npz", "--out", str(tmp_path / "out")]))
    with pytest.raises(RunError, match="is a file"):
        config_from_options(registry.get("dcgan").settings, opts)
    assert (tmp_path / "out").read_text() == "precious"


# ---- numbers where they enter --------------------------------------------------------------------

@pytest.mark.parametrize("setting, value", [("truncation", 1e-9), ("seed", 2 ** 80), ("seed", -1), ("batch_size", 0),
                                            ("budget", float("inf")), ("n_samples", -5), ("width", 0),
                                            ("lecam", float("nan"))])
def test_settings_out_of_their_range_are_refused(setting, value):
    with pytest.raises(ValueError, match=setting):
        with_settings(TrainConfig(), {setting: value})


def test_every_bad_setting_is_listed_at_once():
    with pytest.raises(ValueError) as info:
        with_settings(TrainConfig(), {"seed": -1, "batch_size": 0, "truncation": 1e-9})
    assert all(k in str(info.value) for k in ("seed", "batch_size", "truncation"))


def test_a_budget_that_parses_to_infinity_is_refused():
    assert parse_budget("9" * 400 + "h") == float("inf")
    with pytest.raises(ValueError, match="budget"):
        with_settings(TrainConfig(), {"budget": parse_budget("9" * 400 + "h")})


def test_a_tiny_truncation_is_refused_not_redrawn_forever():
    with pytest.raises(ValueError, match="0.04"):
        truncated_normal((10, 8), 1e-9)
    with pytest.raises(ValueError, match="0.04"):
        truncated_normal((10, 8), float("nan"))
    assert truncated_normal((100, 8), 0.04).abs().max() <= 0.04


@pytest.mark.parametrize("args", [["score", ".", "--reference", ".", "--batch-size", "-1"],  # paths that exist:
                                  ["score", ".", "--reference", ".", "--batch-size", "0"],  # the range is what fails
                                  ["reference", ".", "-o", "r.npz", "--batch-size", "0"],
                                  ["sample", ".", "-n", "-5"], ["sample", ".", "--seed", str(2 ** 80)],
                                  ["clean-data", ".", "-o", "c.npz", "--workers", "0"],
                                  ["clean-data", ".", "-o", "c.npz", "--min-side", "0"]])
def test_cli_options_out_of_range_are_one_usage_line(args):
    one_line_error(args, 2)


@pytest.mark.parametrize("t", ["1e-9", "-1", "nan", "101"])
def test_sample_refuses_a_truncation_sampling_cannot_take_before_loading_anything(tmp_path, t):
    """The one truncation rule (sample.truncation_problem): a value outside it is bad input, exit 1."""
    one_line_error(["sample", str(tmp_path), "--truncation", t], 1, "give 0 (none) or a number from 0.04 to 100")


def test_frechet_distance_of_non_finite_statistics_is_an_error_not_a_hang():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="not finite"):
        frechet_distance(mu, sigma * np.nan, mu, sigma)


# ---- the reference file --------------------------------------------------------------------------

def write_reference(path, features=None, **override):
    features = RNG.standard_normal((20, 2048)).astype(np.float32) if features is None else features
    arrays = dict(mu=features.mean(0).astype(np.float64), sigma=np.cov(features, rowvar=False),
                  features=features, names=np.array([f"p{i}.jpg" for i in range(len(features))]),
                  provenance=json.dumps({"count": len(features)}))
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


@pytest.mark.parametrize("override, rule", [
    (dict(features=np.full((20, 2048), np.nan, np.float32)), "not finite"),
    (dict(mu=np.full(2048, np.nan)), "not finite"),
    (dict(sigma=np.eye(3)), "sigma has shape"),
    (dict(features=np.zeros((1, 2048), np.float32)), "features have shape"),
    (dict(names=np.array(["a", "b"])), "2 names for 20"),
    (dict(provenance=json.dumps([1, 2])), "provenance"),
    (dict(mu=np.array(["x"] * 2048)), "not a float array"),
])
def test_a_reference_that_breaks_its_rules_is_refused_naming_the_rule(tmp_path, override, rule):
    path = write_reference(tmp_path / "ref.npz", **override)
    with pytest.raises(ValueError, match=rule):
        R.load_reference(path)
    (tmp_path / "s").mkdir()
    for i in range(2):
        (tmp_path / "s" / f"{i}.png").write_bytes(png_bytes(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    one_line_error(["score", str(tmp_path / "s"), "--reference", str(path), "--no-strict"], 1, rule)


def test_a_hostile_or_stale_partial_file_never_blocks_the_next_reference(tmp_path):
    logs = []
    (tmp_path / "p.npz").write_bytes(b"PK\x03\x04 not really a zip")
    assert R._resume_point(tmp_path / "p.npz", "f", "d", 10, logs.append)[0] == 0
    np.savez(tmp_path / "q.npz", fingerprint="f", digest="d", done=5, features=np.zeros((3, 2048), np.float32))
    assert R._resume_point(tmp_path / "q.npz", "f", "d", 10, logs.append)[0] == 0
    np.savez(tmp_path / "r.npz", fingerprint="f", digest="d", done=3, features=np.ones((3, 2048), np.float32),
             bad=np.zeros(3, bool))
    assert R._resume_point(tmp_path / "r.npz", "f", "d", 10, logs.append)[0] == 3
    assert sum("starting over" in m for m in logs) == 2


def test_an_interrupted_reference_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def killed(path, **arrays):
        open(path, "wb").close()
        raise KeyboardInterrupt

    monkeypatch.setattr(R.np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        R._atomic_savez(tmp_path / "ref.npz", mu=np.zeros(3))
    assert os.listdir(tmp_path) == []


# ---- submissions ---------------------------------------------------------------------------------

def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def short_png(rows=10, declared=64):
    """A PNG whose IHDR says 64x64 but whose image data holds only `rows` rows."""
    img = RNG.integers(0, 256, (declared, declared, 3), dtype=np.uint8)
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(rows))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", declared, declared, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_a_png_holding_fewer_rows_than_it_declares_is_refused_in_both_modes():
    problems, pixels, _ = check_png("a.png", short_png())
    assert pixels is None and "10 rows" not in problems[0] and "declares" in problems[0]
    problems, pixels, _ = decode_any("a.png", short_png())
    assert pixels is None and "corrupt PNG" in problems[0]
    assert check_png("b.png", short_png(rows=64))[0] == []  # the same writer, whole: accepted


def test_interlaced_and_palette_pngs_pass_the_completeness_check():
    from dogkit.metrics.submission import png_data_problem

    img = Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for kwargs, mode in (({"interlace": 1}, "RGB"), ({}, "P"), ({}, "L"), ({}, "1"), ({}, "RGBA")):
        buf = io.BytesIO()
        img.convert(mode).save(buf, "PNG", **kwargs)
        assert png_data_problem(buf.getvalue()) is None, (kwargs, mode)


def test_a_fifo_in_a_submission_folder_is_named_not_waited_on(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    os.mkfifo(tmp_path / "3.png")
    with pytest.raises(SubmissionError, match="3.png: not a regular file"):
        load_submission(tmp_path, strict=False)
    with pytest.raises(SubmissionError, match="not a regular file"):
        load_submission(tmp_path / "3.png")


def test_no_strict_resizes_as_it_reads_so_large_images_are_never_held(tmp_path):
    big = io.BytesIO()
    Image.new("1", (4000, 4000)).save(big, "PNG")  # 1-bit: a few KB on disk, 48 MB as RGB
    problems, pixels, resized = decode_any("big.png", big.getvalue())
    assert problems == [] and pixels.shape == (64, 64, 3) and resized
    with zipfile.ZipFile(tmp_path / "s.zip", "w") as zf:
        for i in range(6):
            zf.writestr(f"{i}.png", big.getvalue())
    images = load_submission(tmp_path / "s.zip", strict=False)
    assert images.pixels.shape == (6, 64, 64, 3) and "6 image(s) not 64x64" in images.notes[0]


# ---- logs, ledgers, caches, checkpoints ----------------------------------------------------------

def test_a_log_with_lists_for_numbers_is_read_down_to_its_plain_values(tmp_path):
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "loss_g": [1, 2]}, {"step": [3]}, {"step": 2, "loss_g": 0.5, "loss_d": {"a": 1}},
        [1, 2], "text", {"step": float("nan")}]) + "\n" + "[" * 100_000 + "\n")
    assert read_log(tmp_path) == [{"step": 1}, {"step": 2, "loss_g": 0.5}]


def test_a_log_that_is_a_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "log.jsonl")
    with pytest.raises(D.DataError, match="not a regular file"):
        read_log(tmp_path)


def test_a_ledger_line_that_is_not_an_object_is_named(tmp_path):
    import sys

    sys.path.insert(0, str(os.path.join(os.path.dirname(__file__), "..", "..", "tools")))
    import ledger

    for line in ("[1, 2]", "not json", '{"kind": "run", "fid": NaN}'):
        (tmp_path / "l.jsonl").write_text(line + "\n")
        with pytest.raises(ledger.LedgerError, match="l.jsonl:1"):
            ledger.load(tmp_path / "l.jsonl")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_dataset):
    path = tmp_path_factory.mktemp("cache") / "c.npz"
    D.save_cache(str(path), dict(tiny_dataset, images=tiny_dataset["images"][:20], labels=tiny_dataset["labels"][:20],
                                 names=tiny_dataset["names"][:20], settings={}, summary={}), workers=1, codec="webp")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def rewrite(tmp_path, arrays, **changes):
    meta = json.loads(str(arrays["meta"]))
    meta.update(changes.pop("meta", {}))
    path = tmp_path / "hostile.npz"
    np.savez(path, **dict(arrays, meta=json.dumps(meta), **changes))
    return str(path)


@pytest.mark.parametrize("changes, rule", [
    (lambda a: {"offsets": a["offsets"][::-1].copy()}, "offsets must rise"),
    (lambda a: {"offsets": np.array([0]), "labels": np.array([], np.int16)}, "at least 2"),
    (lambda a: {"meta": {"shape": [100000, 100000, 3]}}, "image shape"),
    (lambda a: {"meta": {"breeds": "n0-a"}}, "breeds"),
    (lambda a: {"labels": a["labels"][:3]}, "one integer per image"),
    (lambda a: {"labels": a["labels"] + 50}, "name a breed"),
    (lambda a: {"blob": np.zeros_like(a["blob"])}, "corrupt"),
    (lambda a: {"meta": {"format": ["x"]}}, "cache format"),
])
def test_a_hostile_cache_is_one_line_naming_the_rule(tmp_path, cache, changes, rule):
    path = rewrite(tmp_path, cache, **changes(cache))
    with pytest.raises(D.DataError, match=rule):
        D.load_cache(path)
    code = CliRunner().invoke(cli.main, ["train", "--model", "dcgan", "--data", path, "--budget", "1m", "--device",
                                         "cpu", "--out", str(tmp_path / "run")])
    assert code.exit_code == 1 and rule.split()[0] in code.stderr and "Traceback" not in code.output


def test_a_checkpoint_whose_contents_do_not_fit_its_model_is_one_line(tmp_path):
    import torch

    from dogkit.core.train import CHECKPOINT_FORMAT

    torch.save({"format": CHECKPOINT_FORMAT, "model": "dcgan", "config": {"width": 4}, "G_ema": {"x": torch.zeros(1)},
                "n_classes": 0}, tmp_path / "checkpoint.pt")
    one_line_error(["sample", str(tmp_path / "checkpoint.pt"), "-o", str(tmp_path / "s.zip"), "-n", "4"], 1,
                   "do not fit its model")


# ---- the error boundary --------------------------------------------------------------------------

def test_an_unexpected_exception_is_one_line_saying_bug_with_the_traceback_in_a_file(tmp_path, monkeypatch):
    from dogkit.metrics import score, submission  # score imported first: its own load_submission stays real

    assert score.load_submission is submission.load_submission

    def bug(*a, **k):
        raise TypeError("something nobody expected")

    monkeypatch.setattr(submission, "load_submission", bug)
    monkeypatch.setattr(cli, "TRACEBACK_FILE", str(tmp_path / "tb.txt"))
    line = one_line_error(["score", ".", "--reference", "."], cli.BUG_EXIT, "a bug in dogkit")
    assert str(tmp_path / "tb.txt") in line and "TypeError" in (tmp_path / "tb.txt").read_text()
    res = CliRunner().invoke(cli.main, ["--debug", "score", ".", "--reference", "."])
    assert isinstance(res.exception, TypeError)  # --debug: the real exception, whole


def sigterm_while_writing(script, folder, **popen):
    """Run `script` in a real Python process, wait until a temporary file appears in folder (the
    write is under way), then SIGTERM it; the process."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", script], **popen)
    deadline = time.monotonic() + 120
    from dogkit.core.data import TEMP_MARK

    while not any(TEMP_MARK in n for n in os.listdir(folder)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(TEMP_MARK in n for n in os.listdir(folder)), "the write never started"
    proc.send_signal(signal.SIGTERM)
    return proc


def test_a_dogkit_command_stopped_by_sigterm_says_so_in_one_line_exits_130_and_leaves_no_temporary_file(tmp_path):
    """A real `dogkit clean-data` process (the command's own error boundary installs the handler),
    SIGTERMed while its cache's temporary file is being written."""
    import subprocess

    photos = tmp_path / "photos" / "n02000001-dog"
    photos.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((80, 80, 3), 40 * i, np.uint8)).save(photos / f"n02000001_{i}.jpg")
    out = tmp_path / "out"
    out.mkdir()
    script = f"""
import sys, time
from dogkit import cli
from dogkit.core import data as D
def slow(path, **arrays):
    open(path, "wb").write(b"half")
    time.sleep(60)
D.np.savez = slow
sys.argv = ["dogkit", "clean-data", {str(tmp_path / 'photos')!r}, "-o", {str(out / 'c.npz')!r}, "--codec", "webp",
            "--workers", "1"]
cli.main()
"""
    proc = sigterm_while_writing(script, out, stderr=subprocess.PIPE, text=True)
    assert proc.wait(60) == 130
    err = proc.stderr.read().strip().splitlines()
    assert err[-1].startswith("Error: interrupted") and "Traceback" not in "\n".join(err), err
    assert os.listdir(out) == []


# ---- generated hostile files, per format ---------------------------------------------------------

@FUZZ
@given(st.binary(max_size=400) | st.builds(lambda a, b: f"<annotation><object><bndbox><xmin>{a}</xmin><ymin>0"
                                           f"</ymin><xmax>{b}</xmax><ymax>9</ymax></bndbox></object></annotation>"
                                           .encode(), st.text(max_size=12), st.text(max_size=12)))
def test_fuzz_annotations_parse_or_raise_a_data_error(xml):
    try:
        _, _, boxes, _ = D.parse_annotation(xml)
    except D.DataError:
        return
    assert [c for b in boxes for c in b if not (isinstance(c, int) and abs(c) < 1e9)] == [], boxes


GOOD_PNG = png_bytes(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(GOOD_PNG) - 1), st.integers(0, 255)), max_size=6),
       st.integers(20, len(GOOD_PNG)))
def test_fuzz_pngs_decode_whole_or_are_named(flips, keep):
    data = bytearray(GOOD_PNG[:keep])
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    for check in (check_png, decode_any):
        problems, pixels, _ = check("f.png", bytes(data))
        assert (pixels is None) == bool(problems)
        if pixels is not None:
            assert pixels.shape == (64, 64, 3)


@FUZZ
@given(st.sampled_from(["offsets", "labels", "blob"]), st.integers(0, 3), st.integers(-5, 10 ** 6))
def test_fuzz_caches_load_or_raise_a_data_error(tmp_path_factory, cache, key, where, value):
    arrays = dict(cache)
    arr = arrays[key].copy()
    arr[min(where, len(arr) - 1)] = value % (256 if key == "blob" else 2 ** 31)
    path = rewrite(tmp_path_factory.mktemp("f"), arrays, **{key: arr})
    try:
        out = D.load_cache(path)
    except D.DataError:
        return
    assert out["images"].shape[1:] == (64, 64, 3) and len(out["names"]) == len(out["images"])


@FUZZ
@given(st.sampled_from(["mu", "sigma", "features"]), st.sampled_from([np.nan, np.inf, 1e300, 0.0]),
       st.integers(0, 10))
@pytest.mark.slow
def test_fuzz_references_load_finite_or_raise(tmp_path_factory, key, value, where):
    path = write_reference(tmp_path_factory.mktemp("r") / "ref.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays[key].reshape(-1)[where] = value
    np.savez(path, **arrays)
    try:
        ref = R.load_reference(path)
    except ValueError:
        return
    assert [k for k in ("mu", "sigma", "features") if not np.isfinite(getattr(ref, k)).all()] == []


@FUZZ
@given(st.binary(min_size=0, max_size=300))
def test_fuzz_checkpoints_are_refused_in_one_line(tmp_path_factory, blob):
    from dogkit.core.train import read_checkpoint

    path = tmp_path_factory.mktemp("c") / "checkpoint.pt"
    path.write_bytes(b"PK\x03\x04" + blob if blob[:1] == b"P" else blob)
    with pytest.raises(RunError, match="checkpoint.pt"):
        read_checkpoint(str(path))


@FUZZ
@given(st.lists(st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
                             lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids,
                                                                                       max_size=3)), max_size=8))
def test_fuzz_log_lines_never_break_the_report(tmp_path_factory, records):
    run = tmp_path_factory.mktemp("run")
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    for row in read_log(run):
        assert [v for v in row.values() if not (isinstance(v, str) or np.isfinite(v))] == [], row


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["--batch-size", "-n", "--seed", "--truncation", "--margin", "--min-side", "--workers"]),
       st.one_of(st.integers(-10 ** 30, 10 ** 30).map(str), st.floats().map(str),
                 st.sampled_from(["", "nan", "inf", "-inf", "1e999", "0x10", "１"])))
def test_fuzz_option_values_are_one_line_or_accepted(tmp_path_factory, flag, value):
    tmp = tmp_path_factory.mktemp("o")
    command = {"--batch-size": ["score", str(tmp / "x.zip"), "--reference", str(tmp / "r.npz")],
               "-n": ["sample", str(tmp)], "--seed": ["sample", str(tmp)], "--truncation": ["sample", str(tmp)],
               "--margin": ["clean-data", str(tmp), "-o", str(tmp / "c.npz")],
               "--min-side": ["clean-data", str(tmp), "-o", str(tmp / "c.npz")],
               "--workers": ["clean-data", str(tmp), "-o", str(tmp / "c.npz")]}[flag]
    code, lines = invoke(command + [flag, value])
    assert code in (1, 2) and sum("Error" in ln for ln in lines) == 1, (flag, value, code, lines)


def test_the_competition_zips_are_read_in_place_hostile_entries_skipped_and_counted(tmp_path):
    """all-dogs.zip and Annotation.zip as Kaggle ships them, cleaned without extracting: each photo
    cropped by its box from the annotation zip, an oversized entry skipped with its reason."""
    photos, notes = tmp_path / "all-dogs.zip", tmp_path / "Annotation.zip"
    with zipfile.ZipFile(photos, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("all-dogs/n02085620_1.jpg", photo())
        zf.writestr("all-dogs/n02085620_2.jpg", photo())
        zf.writestr("all-dogs/big.jpg", b"\0" * (D.MAX_PHOTO_BYTES + 1))  # a 64 MB entry from a small zip
    with zipfile.ZipFile(notes, "w") as zf:
        zf.writestr("Annotation/n02085620-Chihuahua/n02085620_1", xml((2, 2, 60, 70)))
    data = D.clean(str(photos), annotations=str(notes), workers=1, log=lambda message: None)
    events = data["summary"]["events"]
    assert data["breeds"] == ["n02085620-Chihuahua"] and data["summary"]["layout"].startswith("Kaggle/Stanford")
    assert events["photo without annotation: whole photo used"] == 1 and len(data["images"]) == 2, events
    assert events["unreadable file or zip entry"] == 1 and "big.jpg" in data["summary"]["examples"][
        "unreadable file or zip entry"], data["summary"]
    assert sorted(os.listdir(tmp_path)) == ["Annotation.zip", "all-dogs.zip"]  # nothing extracted


@pytest.mark.parametrize("error, code, text", [(TypeError("nobody expected"), 70, "a bug in dogkit"),
                                                (OSError(28, "No space left on device"), 1, "No space left"),
                                                (D.DataError("x.npz: not a cache"), 1, "x.npz"),
                                                (ValueError("width=0: must be"), 1, "width=0"),
                                                (RunFailed("NaN", "out/images.zip"), 4, "out/images.zip was still"),
                                                (RankStopped("rank 1 failed"), 3, None),
                                                (KeyboardInterrupt(), 130, "resume with --resume")])
def test_the_kernels_error_boundary_is_one_line_with_its_exit_code(capsys, error, code, text):
    from dogkit.core.kernel import exit_on_error

    def fail():
        raise error

    with pytest.raises(SystemExit) as info:
        exit_on_error(fail)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == code and len(err) == (1 if text else 0), err
    assert text is None or (text in err[0] and "Traceback" not in err[0])


def test_a_sigterm_during_a_cache_write_leaves_no_temporary_file(tmp_path, tiny_dataset):
    """A real process, killed by SIGTERM while np.savez is writing the cache's temporary file."""
    script = f"""
import signal, time, numpy as np
from dogkit import cli
from dogkit.core import data as D
signal.signal(signal.SIGTERM, cli._terminated)
def slow(path, **arrays):
    open(path, "wb").write(b"half")
    time.sleep(60)
D.np.savez = slow
ds = {{"images": np.zeros((4, 64, 64, 3), np.uint8), "labels": np.zeros(4, np.int16), "names": list("abcd"),
      "breeds": ["n0-a"], "settings": {{}}, "summary": {{}}}}
try:
    D.save_cache({str(tmp_path / 'c.npz')!r}, ds, workers=1, codec="webp")
except KeyboardInterrupt:
    raise SystemExit(130)
"""
    proc = sigterm_while_writing(script, tmp_path)
    assert proc.wait(30) == 130
    assert os.listdir(tmp_path) == []


def test_the_wall_is_kaggles_nine_hours_on_kaggle_and_none_locally(tmp_path):
    """The budget is the plan (8h45m on Kaggle); the wall the end of a run with no zip may run up to
    is Kaggle's own 9 hours less a minute for the output, and a local run has none."""
    from dogkit.core import registry
    from dogkit.core.kernel import config_from_options, parse_args

    opts = vars(parse_args(["--out", str(tmp_path / "out")]))
    on_kaggle = config_from_options(registry.get("dcgan").settings, opts, on_kaggle=True, working=str(tmp_path))
    assert (on_kaggle.budget, on_kaggle.hard_limit) == (8 * 3600 + 45 * 60, 9 * 3600 - 60)
    local = config_from_options(registry.get("dcgan").settings, dict(opts, data="x.npz"))
    assert (local.budget, local.hard_limit) == (8 * 60, 0.0)


@pytest.mark.parametrize("args", [["clean-data", "{missing}", "-o", "{tmp}/c.npz"],
                                  ["reference", "{missing}", "-o", "{tmp}/r.npz"],
                                  ["score", "{missing}", "--reference", "{tmp}/r.npz"],
                                  ["report", "{missing}", "--reference", "{tmp}/r.npz", "-o", "{tmp}/rep"],
                                  ["sample", "{missing}", "-o", "{tmp}/s.zip"]])
def test_a_path_that_does_not_exist_is_called_missing_in_one_line_and_exit_1(tmp_path, args):
    """A misspelt path: `Error: PATH: does not exist`, exit 1 (bad input), no usage text, in every command."""
    from click.testing import CliRunner

    missing = str(tmp_path / "submision" / "images.zip")
    (tmp_path / "r.npz").write_bytes(b"a reference that is there")  # so the missing submission is what is named
    res = CliRunner().invoke(cli.main, [a.format(missing=missing, tmp=tmp_path) for a in args])
    assert res.exit_code == 1, res.output
    assert res.output.strip().splitlines() == [f"Error: {missing}: does not exist"], res.output


def test_a_kernel_given_a_missing_data_path_calls_it_missing(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    missing = tmp_path / "dogs64.npz"
    proc = subprocess.run([sys.executable, str(ROOT / "kernels" / "dcgan.py"), "--data", str(missing), "--out",
                           str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr  # bad input, as in every dogkit command (README, exit codes)
    assert proc.stderr.strip().splitlines()[-1] == f"error: {missing}: does not exist", proc.stderr


def test_click_usage_errors_exit_with_the_tables_usage_code():
    """The one table of exit codes (runtime.EXIT_*): click's own usage line is EXIT_USAGE and the
    CLI's bad input EXIT_BAD_INPUT, as the kernels' are."""
    import click

    from dogkit.core.runtime import EXIT_BAD_INPUT, EXIT_USAGE

    assert click.UsageError.exit_code == EXIT_USAGE and cli.BadInput.exit_code == EXIT_BAD_INPUT
    assert invoke(["score", "--no-such-option"])[0] == EXIT_USAGE
