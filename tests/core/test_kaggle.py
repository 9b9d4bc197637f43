"""The kernel where users run it: a simulated /kaggle/input with the competition's data and
an unrelated dataset beside it, no arguments but the CPU switch, nobody watching."""
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dogkit.core import kernel as K
from dogkit.core import registry
from dogkit.core import runtime
from dogkit.metrics.submission import load_submission

ROOT = Path(__file__).resolve().parents[2]
BREEDS = ["n02085620-Chihuahua", "n02099601-golden_retriever"]


def jpeg(rng, width, height):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def voc(name, width, height, boxes, size_text=None):
    size = "" if size_text == "missing" else (
        f"<size><width>{size_text or width}</width><height>{size_text or height}</height><depth>3</depth></size>")
    objs = "".join(f"<object><name>dog</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
                   f"<ymax>{d}</ymax></bndbox></object>" for a, b, c, d in boxes)
    return f"<annotation><filename>{name}</filename>{size}{objs}</annotation>".encode()  # its own, as Stanford's


def competition_zips(folder, n=24, seed=0):
    """all-dogs.zip and Annotation.zip as the competition shipped them; returns the box count.
    Two annotations have a <size> that is missing or written '500.0' (not the photo's): their boxes
    still count."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    boxes = 0
    with zipfile.ZipFile(folder / "all-dogs.zip", "w") as photos, \
            zipfile.ZipFile(folder / "Annotation.zip", "w") as notes:
        for i in range(n):
            synset, breed = BREEDS[i % 2].split("-", 1)
            stem = f"{synset}_{1000 + i}"
            photos.writestr(f"all-dogs/{stem}.jpg", jpeg(rng, 160, 120))
            dogs = [(10, 10, 90, 100)] + ([(80, 20, 150, 110)] if i % 3 == 0 else [])
            size_text = {0: "missing", 1: "500.0"}.get(i)
            notes.writestr(f"Annotation/{BREEDS[i % 2]}/{stem}", voc(stem, 160, 120, dogs, size_text))
            boxes += len(dogs)
    return boxes


def cats(folder, n=20):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"cat{i}.jpg").write_bytes(jpeg(rng, 64, 64))


@pytest.fixture
def fake_kaggle(tmp_path):
    root = tmp_path / "input"
    boxes = competition_zips(root / "generative-dog-images")
    cats(root / "someones-cats" / "cats")
    working = tmp_path / "working"
    working.mkdir()
    (tmp_path / "scratch").mkdir()
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
           "DOGKIT_KAGGLE_INPUT": str(root), "DOGKIT_KAGGLE_WORKING": str(working),
           "TMPDIR": str(tmp_path / "scratch")}  # the zips are read in place: nothing is ever extracted here
    return {"root": root, "working": working, "boxes": boxes, "env": env, "tmp": tmp_path}


def run_kernel(env, *args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "kernels" / "dcgan.py"), *args], capture_output=True,
                          text=True, env=env, cwd=env["DOGKIT_KAGGLE_WORKING"], timeout=timeout)


@pytest.mark.slow
def test_the_kernel_on_a_simulated_kaggle(fake_kaggle):
    """No --data: the kernel finds the competition zips and reads them in place (nothing extracted),
    ignores the cats, prints the start block, and leaves a valid zip and a handful of files."""
    proc = run_kernel(fake_kaggle["env"], "--device", "cpu", "--budget", "1h", "--steps", "8", "--width", "4",
                      "--batch-size", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout
    for start in ("python     ", "device     cpu", "host       ", "precision  fp32", "budget     1h00m",
                  "settings   batch 8, lr 0.0005 (G) 0.0005 (D), augment crop-flip, no truncation\n"):
        assert start in log, start
    for line in ("data       competition files (all-dogs.zip)",
                 "someones-cats: not the competition's data, never trained on",
                 "input      Kaggle/Stanford layout with annotations"):
        assert line in log, (line, log)
    copied = [p for p in (fake_kaggle["tmp"] / "scratch").rglob("*") if p.suffix == ".jpg" or "dogs" in p.name
              or "Annotation" in p.name]
    assert copied == [] and "extract" not in log, (copied, log)  # read in place
    boxes = fake_kaggle["boxes"]
    assert f"photos     24  ({boxes} annotated boxes)" in log, log
    assert f"crops      {boxes}  (2 breeds)" in log, log  # one crop per box, no cat, no box lost to <size>
    files = set(os.listdir(fake_kaggle["working"]))
    assert files - {f for f in files if f.startswith("grid-")} == {
        "images.zip", "checkpoint.pt", "log.jsonl", "options.json", "samples.png"}, files
    assert len(files) <= 13, sorted(files)
    images = load_submission(fake_kaggle["working"] / "images.zip", strict=True)
    assert images.pixels.shape == (10_000, 64, 64, 3)
    ckpt = torch.load(fake_kaggle["working"] / "checkpoint.pt", weights_only=True)
    assert (ckpt["step"], ckpt["breeds"]) == (8, BREEDS)


@pytest.mark.slow
def test_a_run_continues_in_the_next_kaggle_session_from_its_attached_output(fake_kaggle):
    """--sessions 2 (KAGGLE_SESSIONS in the kernel): the first session finds nothing to continue
    and says so; the second, with the first one's output attached under /kaggle/input and a fresh
    /kaggle/working, continues its checkpoint (steps, log) and says from where; a third, and a
    checkpoint of other settings, are refused with one line before any cleaning."""
    import shutil

    env, working, root = fake_kaggle["env"], fake_kaggle["working"], fake_kaggle["root"]
    args = ("--device", "cpu", "--budget", "10m", "--width", "4", "--batch-size", "8", "--n-samples", "100",
            "--log-every", "0", "--sessions", "2")
    first = run_kernel(env, *args, "--steps", "6")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "continues  nothing yet: no checkpoint.pt under" in first.stdout, first.stdout
    assert "session 1 of 2 ends at step 6" in first.stdout, first.stdout
    shutil.copytree(working, root / "dogkit-dcgan")  # Add Input -> Your Work: this notebook's output
    shutil.rmtree(working)
    working.mkdir()
    second = run_kernel(env, *args, "--steps", "10")
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.startswith(f"continues  session 2 of 2, from {root / 'dogkit-dcgan' / 'checkpoint.pt'}: "
                                    f"step 6, "), second.stdout[:2000]
    ckpt = torch.load(working / "checkpoint.pt", weights_only=True)
    assert (ckpt["step"], ckpt["session"]) == (10, 2)
    log = [json.loads(line) for line in (working / "log.jsonl").read_text().splitlines()]
    assert [(r["session"], r["step"]) for r in log] == [(1 + (s > 6), s) for s in range(1, 11)]
    assert load_submission(working / "images.zip", strict=False).pixels.shape[0] == 100
    shutil.rmtree(root / "dogkit-dcgan")
    shutil.copytree(working, root / "dogkit-dcgan")
    for extra, message in ((("--steps", "12"), "that run has already trained its 2 sessions (step 10)"),
                           (("--width", "8"), "trained with other settings: width 4 (this run: 8)")):
        refused = run_kernel(env, *args, *extra)
        assert refused.returncode == 1 and message in refused.stderr, refused.stderr[-2000:]
        assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert "found:" not in refused.stdout, refused.stdout  # refused before any cleaning


def test_no_gpu_on_kaggle_stops_at_once_before_cleaning(fake_kaggle):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_kernel(fake_kaggle["env"], timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.startswith("error: no GPU: this notebook runs without an accelerator"), proc.stderr
    assert "GPU T4 x2" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "found:" not in proc.stdout, proc.stdout  # nothing was cleaned
    assert os.listdir(fake_kaggle["working"]) == []


def fake_gpu(monkeypatch, capability, archs, name="Tesla P100-PCIE-16GB", op_fails=False):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: archs)
    if op_fails:
        def arange(*a, **k):
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        monkeypatch.setattr(runtime.torch, "arange", arange)


def test_a_gpu_this_torch_cannot_run_stops_before_cleaning(fake_kaggle, monkeypatch, capsys):
    fake_gpu(monkeypatch, (6, 0), ["sm_75", "sm_80", "sm_86", "sm_90", "compute_90"])
    for key, value in fake_kaggle["env"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(K, "kaggle_data", lambda *a, **k: pytest.fail("cleaning started"))
    with pytest.raises(SystemExit) as exit_:
        K.main(registry.get("dcgan").cls, {}, argv=[])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: Tesla P100-PCIE-16GB (sm_60) cannot run torch "), err
    assert "sm_75 sm_80" in err and "GPU T4 x2" in err, err


def test_a_failing_first_cuda_op_is_named(monkeypatch):
    fake_gpu(monkeypatch, (7, 5), ["sm_75"], name="Tesla T4", op_fails=True)
    with pytest.raises(runtime.RunError, match=r"Tesla T4 \(sm_75\): a first CUDA operation failed .*no kernel image"):
        runtime.pick_device("auto")


@pytest.mark.parametrize("cap,archs,ok", [
    ((6, 0), ["sm_70", "sm_75", "sm_80"], False),
    ((6, 0), ["sm_60", "sm_70"], True),
    ((8, 6), ["sm_80"], True),          # same major, higher minor: binary compatible
    ((8, 0), ["sm_86"], False),
    ((9, 0), ["sm_80", "compute_80"], True),  # PTX compiled at load time for newer GPUs
    ((7, 5), ["sm_80", "compute_80"], False),
])
def test_arch_support_rule(cap, archs, ok):
    assert runtime.arch_supported(cap, archs) is ok


def test_bf16_only_where_the_gpu_has_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what T4s answer
    cuda = torch.device("cuda", 0)
    assert runtime.resolve_precision("bf16", cuda)[0] == "fp32"
    assert "sm_75" in runtime.resolve_precision("bf16", cuda)[1]
    assert runtime.resolve_precision("fp16", cuda)[0] == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert runtime.resolve_precision("bf16", cuda)[0] == "bf16"


def make_tree(root, files):
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


@pytest.mark.parametrize("layout,files,photos,annotations", [
    ("competition files (all-dogs/)",
     {"generative-dog-images/all-dogs/all-dogs/a.jpg": b"x",
      "generative-dog-images/Annotation/Annotation/n02085620-Chihuahua/a": b"x"},
     "generative-dog-images/all-dogs/all-dogs", "generative-dog-images/Annotation"),
    ("competition files (all-dogs/)",
     {"dogs/all-dogs/a.jpg": b"x", "dogs/Annotation/n02085620-Chihuahua/a": b"x"},
     "dogs/all-dogs", "dogs/Annotation"),
    ("competition files (all-dogs.zip)",
     {"competitions/generative-dog-images/all-dogs.zip": b"x",
      "competitions/generative-dog-images/Annotation.zip": b"x"},
     "competitions/generative-dog-images/all-dogs.zip", "competitions/generative-dog-images/Annotation.zip"),
    ("Stanford Dogs (Images/<synset>-<breed>/)",
     {"stanford-dogs-dataset/images/Images/n02085620-Chihuahua/a.jpg": b"x",
      "stanford-dogs-dataset/annotations/Annotation/n02085620-Chihuahua/a": b"x"},
     "stanford-dogs-dataset/images/Images", "stanford-dogs-dataset/annotations/Annotation"),
])
def test_the_competition_data_is_found_in_every_layout(tmp_path, layout, files, photos, annotations):
    make_tree(tmp_path, {**files, "aaa-other/pics/x.jpg": b"x", "my-run-output/images.zip": b"x"})
    found = K.find_competition_data(str(tmp_path))
    assert found["layout"] == layout
    assert found["photos"] == str(tmp_path / photos)
    assert found["annotations"] == str(tmp_path / annotations)
    assert K.ignored_inputs(str(tmp_path), found["dataset"]) == [str(tmp_path / "aaa-other"),
                                                                 str(tmp_path / "my-run-output")]


def test_missing_annotation_is_a_loud_warning_and_missing_data_an_error(tmp_path):
    make_tree(tmp_path, {"dogs/all-dogs/a.jpg": b"x"})
    logs = []
    photos, annotations = K.kaggle_data(str(tmp_path), log=logs.append)
    assert annotations is None, annotations
    assert [m for m in logs if m.startswith("WARNING    no Annotation/")], logs
    with pytest.raises(runtime.RunError, match="no competition data under .*attach 'Generative Dog Images'"):
        K.kaggle_data(str(tmp_path / "dogs" / "all-dogs"))


def test_unknown_kernel_flags_are_errors_but_notebook_arguments_pass(capsys):
    assert K.parse_args(["-f", "/root/.local/share/jupyter/runtime/kernel-1.json"]).data is None
    with pytest.raises(SystemExit):
        K.parse_args(["--budjet", "8m"])
    assert "unrecognized arguments: --budjet" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint_and_leaves_no_temp_file(tmp_path, tiny_dataset):
    """Kaggle (or a device command's time limit) stops a kernel with SIGTERM: it must save
    checkpoint.pt, exit 130 with one line, and leave nothing half-written."""
    import signal
    import time

    from dogkit.core.data import save_cache

    cache = tmp_path / "tiny.npz"
    save_cache(cache, dict(tiny_dataset, settings={}, summary={}), workers=1, codec="webp-lossless")
    out = tmp_path / "run"
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "DOGKIT_KAGGLE_INPUT": str(tmp_path / "none")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "kernels" / "dcgan.py"), "--data", str(cache), "--device",
                             "cpu", "--budget", "30m", "--width", "4", "--batch-size", "8", "--n-samples", "64",
                             "--log-every", "0", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "error: interrupted; resume with --resume CHECKPOINT"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] > 0
    assert not [f for f in os.listdir(out) if "tmp" in f]


def test_the_checkpoint_furthest_on_is_continued_and_the_others_named(tmp_path, capsys):
    from dogkit.core.train import CHECKPOINT_FORMAT

    working, inputs = tmp_path / "working", tmp_path / "input"
    places = {working: (1, 900), inputs / "run-a": (2, 300), inputs / "deep" / "run-b" / "output": (2, 500)}
    for folder, (session, step) in places.items():
        folder.mkdir(parents=True)
        torch.save({"format": CHECKPOINT_FORMAT, "session": session, "step": step}, folder / "checkpoint.pt")
    path, ckpt = K.earlier_session(str(inputs), str(working))
    assert path == str(inputs / "deep" / "run-b" / "output" / "checkpoint.pt") and ckpt["step"] == 500
    out = capsys.readouterr().out
    assert f"ignored    {working / 'checkpoint.pt'} (session 1, step 900)" in out
    assert f"ignored    {inputs / 'run-a' / 'checkpoint.pt'} (session 2, step 300)" in out
    assert K.earlier_session(str(tmp_path / "empty"), str(tmp_path / "none")) == (None, None)
