"""The README and docs/ as a newcomer meets them. Every command in their bash blocks parses with
the options the code has today (dogkit's click commands, file existence not checked; the kernels'
argparse; each tool's argparse), and every command that needs neither a GPU nor Kaggle RUNS, in
PAGES order, in a temporary folder laid out as the README assumes (../shared/data/stanford-dogs-crops
beside it), on tiny data, models and budgets: so an example cannot drift from the code unnoticed.
A block a page marks `<!-- not run by the README test: WHY -->`, and a command on a /kaggle/
path, is only parsed."""
import argparse
import importlib
import re
import shlex
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
OURS = re.compile(r"(dogkit |python (kernels|tools)/\S+\.py|torchrun .*-m dogkit )")


# The order a reader takes: the README, then the pages that make the files the later ones use
# (the cache, the reference, checkpoints). Every page in docs/ is in it (a test checks).
PAGES = ("README.md", "docs/cleaning.md", "docs/scoring.md", "docs/training.md", "docs/kaggle.md", "docs/results.md",
         "docs/gpu-research.md", "docs/developing.md")


def readme_commands(runnable_only=False):
    """The commands of the README and docs/ in PAGES order; runnable_only: those the walkthrough runs."""
    text = "\n".join((ROOT / page).read_text() for page in PAGES)
    out = []
    for match in re.finditer(r"(<!-- not run by the README test: .+? -->\n)?```bash\n(.*?)```", text, re.S):
        if runnable_only and match.group(1):
            continue
        for line in match.group(2).replace("\\\n", " ").splitlines():
            for part in line.split("  #")[0].split("&&"):
                part = part.strip()
                if OURS.match(part) and not (runnable_only and "/kaggle/" in part):
                    out.append(part)
    return out


class Parsed(Exception):
    pass


def test_the_readme_has_commands_to_check():
    assert len(readme_commands()) >= 25
    assert sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")) == sorted(PAGES[1:])


def test_the_readme_is_a_front_page_and_every_page_starts_with_what_it_is_for():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in PAGES[1:]:
        head = (ROOT / page).read_text().split("\n## ")[0]
        assert head.startswith("# ") and "What this page is for:" in head and "```bash" in head, page
        assert f"]({page}" in readme, f"the README does not link {page}"
    # nothing that only this project's own research conditions explain
    for page in PAGES:
        text = (ROOT / page).read_text().lower()
        for word in ("borrow", "gpu machine", "gpu-machine", "minutes of machine time", "lent to us", "64 mib"):
            assert word not in text, f"{page}: {word!r}"


@pytest.mark.parametrize("command", readme_commands())
def test_a_readme_command_parses(command, monkeypatch):
    words = shlex.split(command)
    if words[0] == "torchrun":
        words = ["dogkit"] + words[words.index("dogkit") + 1:]
    if words[0] == "dogkit":
        from dogkit.cli import Existing, main

        for path_type in (click.Path, Existing):  # the files a page names need not be here: parse only
            monkeypatch.setattr(path_type, "convert", lambda self, value, param, ctx: value)
        ctx = main.make_context("dogkit", words[1:2])
        sub = main.get_command(ctx, words[1])
        assert sub is not None, f"no dogkit command {words[1]!r}"
        sub.make_context(words[1], words[2:])  # raises on an unknown option or a bad value
        return
    path = words[1]
    if path.startswith("kernels/"):
        from dogkit.core import kernel

        assert (ROOT / path).exists(), path
        kernel.parse_args(words[2:])
        return
    tool = importlib.import_module(Path(path).stem)
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    with pytest.raises(Parsed):
        tool.main(words[2:])


# Appended to a README command (the last value of an option wins): tiny models, budgets and
# samples, so the walkthrough takes minutes on 2 CPU cores. The README's own words stay as they are.
TINY_TRAINING = ["--steps", "3", "--width", "4", "--batch-size", "8", "--log-every", "0"]
TINY = (("--snapshots", TINY_TRAINING[2:] + ["--n-samples", "64", "--steps", "8"]),  # progress follows --steps:
        # the points are reached at steps 2 and 4 whatever the machine's speed
        ("python kernels/biggan.py", TINY_TRAINING + ["--n-samples", "500"]),  # the dcgan's zip is the scored one
        ("python kernels/", TINY_TRAINING),
        ("dogkit train", TINY_TRAINING + ["--n-samples", "500"]),  # their zips are never scored
        ("dogkit sample runs/", ["-n", "500"]),
        ("python tools/truncation_sweep.py", ["--n-images", "300"]))
FAKE_DIM = 64  # features of fake_pool3: FID's matrix square root in milliseconds instead of seconds
BREEDS = ("n02085620-Chihuahua", "n02099601-golden_retriever", "n02110958-pug")


def tiny(command):
    words = shlex.split(command)
    for marker, extra in TINY:
        if marker in command:
            return words + extra
    return words


def fake_pool3(model, batch_uint8, device):
    """FAKE_DIM features from an 8x8 colour thumbnail through a fixed projection: the scoring path
    without the Inception network's minutes (the network is tested in tests/metrics)."""
    import numpy as np
    import torch

    x = torch.as_tensor(np.asarray(batch_uint8)).permute(0, 3, 1, 2).float() / 255.0
    small = torch.nn.functional.adaptive_avg_pool2d(x, 8).reshape(len(x), -1)
    proj = torch.randn(192, FAKE_DIM, generator=torch.Generator().manual_seed(0)) / 8.0
    return torch.tanh(small @ proj).numpy()


def synthetic_photos(folder, n, rng, size=224):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = rng.integers(0, 256, 3)
        px = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(folder / f"{folder.name.split('-')[0]}_{i}.jpg", quality=90)


@pytest.mark.slow
def test_the_readme_runs_as_a_newcomer_meets_it(tmp_path, monkeypatch):
    import shutil
    import subprocess
    import time
    import zipfile

    from click.testing import CliRunner

    from dogkit.cli import main as dogkit
    from dogkit.metrics import features, inception

    rng = np.random.default_rng(0)
    for breed in BREEDS:  # ../shared/data/stanford-dogs-crops as the README reads it
        synthetic_photos(tmp_path / "shared" / "data" / "stanford-dogs-crops" / breed, 14, rng)
    work = tmp_path / "work"
    (work / "kernels").mkdir(parents=True)
    for kernel in (ROOT / "kernels").glob("*.py"):
        shutil.copy(kernel, work / "kernels" / kernel.name)
    synthetic_photos(tmp_path / "flat", 6, rng, size=120)
    with zipfile.ZipFile(work / "photos.zip", "w") as zf:  # "photos.zip": a flat zip of photos
        for photo in sorted((tmp_path / "flat").iterdir()):
            zf.write(photo, photo.name)
    monkeypatch.chdir(work)
    monkeypatch.setattr(features, "pool3", fake_pool3)
    monkeypatch.setattr(features, "FEATURE_DIM", FAKE_DIM)
    monkeypatch.setattr(inception, "load_inception", 
                        lambda path=None: (torch.nn.Identity(), {"source": "fake", "digest": "fake"}))
    import build_kernel

    monkeypatch.setattr(build_kernel, "ROOT", work)  # `build_kernel.py --model biggan` writes work/kernels/
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2", "PYTHONHASHSEED": "0"}
    ran = []
    for command in readme_commands(runnable_only=True):
        started = time.monotonic()
        words = tiny(command)
        if words[0] == "dogkit":
            result = CliRunner().invoke(dogkit, words[1:], catch_exceptions=False)
            assert result.exit_code == 0, f"{command}\n{result.output[-3000:]}"
        elif words[1].startswith("kernels/"):
            proc = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True, env=env, timeout=600)
            assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
        else:
            tool = importlib.import_module(Path(words[1]).stem)
            assert tool.main(words[2:]) in (0, None), command
        ran.append(command)
        print(f"{time.monotonic() - started:6.1f} s  {command}")  # pytest -s: where the minutes go
    assert len(ran) >= 15, ran
    for made in ("data/dogs64.npz", "data/preview.png", "data/flat.npz", "data/ref.npz", "submission/images.zip",
                 "submission/quick.zip", "report/report.html", "runs/dcgan/checkpoint.pt", "runs/big/snapshot-p0.25.pt",
                 "submission/quarter.zip", "kernels/biggan.py", "runs/big/sweep.png"):
        assert (work / made).exists(), made
