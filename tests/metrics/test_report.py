import json
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dogkit.cli import main
from dogkit.metrics.report import breed_analysis, breed_labels

SECTIONS = ("Numbers", "Samples", "Memorization audit", "Closest pairs", "Breeds", "Training curves")


def test_breed_labels_come_from_synset_folders():
    labels, breeds = breed_labels(["n1-a/x.jpg", "n2-b/y.jpg", "n1-a/z.jpg", "flat.jpg"])
    assert breeds == ["n1-a", "n2-b"] and labels.tolist() == [0, 1, 0, -1]


def test_breed_classifier_recovers_separable_breeds():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 64)) * 5
    ref = np.abs(np.concatenate([c + rng.normal(size=(40, 64)) for c in centres]))
    names = [f"n{i // 40}-breed{i // 40}/p{i}.jpg" for i in range(120)]
    gen = np.abs(centres[1] + rng.normal(size=(30, 64)))
    out = breed_analysis(ref, names, gen)
    assert out["breed_accuracy"] > 0.9
    assert out["top5"][0]["breed"] == "n1-breed1" and out["top5"][0]["share"] > 0.9
    assert out["breed_entropy"] < 0.5


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, inception):
    tmp = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    for b, colour in enumerate(((200, 60, 40), (40, 90, 200))):
        folder = tmp / "real" / f"n0000000{b}-breed{b}"
        folder.mkdir(parents=True)
        for i in range(12):
            px = np.clip(np.array(colour) + rng.normal(0, 30, size=(80, 80, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(folder / f"p{i}.jpg")
    sub = tmp / "sub"
    sub.mkdir()
    for i in range(10):
        px = np.clip(np.array((180, 80, 60)) + rng.normal(0, 30, size=(64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(sub / f"{i}.png")
    run = tmp / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("\n".join(json.dumps({"step": s, "session": 1 + (s > 3), "loss_d": 1.0 / s,
                                                         "loss_g": s / 10})  # continued in a second session
                                             for s in range(1, 6)) + '\n{"step": 6, "loss_')  # killed mid-line
    (run / "dogkit-dcgan.log").write_text('[{"stream_name": "stdout", "time": 1.0, "data": "step 1"}]')  # Kaggle's
    runner = CliRunner()
    res = runner.invoke(main, ["reference", str(tmp / "real"), "-o", str(tmp / "ref.npz")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["report", str(sub), "--reference", str(tmp / "ref.npz"), "--run", str(run),
                               "-o", str(tmp / "report")])
    assert res.exit_code == 0, res.output
    return tmp / "report"


@pytest.mark.slow
def test_report_holds_every_section_and_the_numbers(report_dir):
    page = (report_dir / "report.html").read_text()
    assert "One run over 2 sessions, continued at step 4 (session 2)." in page
    for section in SECTIONS:
        assert f"<h2>{section}</h2>" in page, section
    assert page.count("data:image/png;base64,") == 5  # images are embedded: the page opens offline
    numbers = json.loads((report_dir / "report.json").read_text())
    for key in ("fid", "mifid", "precision", "recall", "density", "coverage", "kid", "kid_std", "breed_accuracy",
                "breed_entropy", "mean_top1_confidence", "top5"):
        assert key in numbers, key
    for png in ("grid.png", "memorization.png", "closest_pairs.png", "breeds.png", "curves.png"):
        assert (report_dir / png).stat().st_size > 0
    n = numbers["reference_breeds"]  # the entropy's ceiling is that of the breeds the reference knows, not 120
    assert n == 2 and "log2(2) = 1.0 is all 2 breeds the reference knows equally." in page


def test_report_renders_in_a_headless_browser(request, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:  # before the report is built: its real Inception is not run for nothing
        pytest.skip("chromium not installed (Debian package 'chromium'): optional rendering check")
    report_dir = request.getfixturevalue("report_dir")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    f"--screenshot={shot}", "--window-size=1000,1400", (report_dir / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10  # not a blank page


@pytest.mark.slow
def test_report_numbers_are_the_scorers(report_dir):
    """The report's FID, d and MiFID are what `dogkit score` prints for the same images."""
    tmp = report_dir.parent
    res = CliRunner().invoke(main, ["score", str(tmp / "sub"), "--reference", str(tmp / "ref.npz"), "--no-strict",
                                    "--json"])
    assert res.exit_code == 0, res.output
    scored = json.loads(res.stdout.strip().splitlines()[-1])
    numbers = json.loads((report_dir / "report.json").read_text())
    for key in ("fid", "distance", "mifid", "n_images"):
        assert numbers[key] == pytest.approx(scored[key], rel=1e-6), key
    assert numbers["n_images"] == 10 and 0 < numbers["distance"] < 1 and numbers["fid"] > 0
    assert 0 <= numbers["precision"] <= 1 and 0 <= numbers["breed_accuracy"] <= 1
    assert numbers["top5"][0]["breed"] == "n00000000-breed0"  # the submission is reddish, like breed 0


@pytest.mark.slow
def test_a_report_without_breed_folders_says_why_and_how(report_dir, tmp_path):
    tmp = report_dir.parent
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted((tmp / "real").rglob("*.jpg"))[:10]:
        shutil.copy(p, flat / f"{p.parent.name}-{p.name}")
    runner = CliRunner()
    assert runner.invoke(main, ["reference", str(flat), "-o", str(tmp_path / "ref.npz")]).exit_code == 0
    res = runner.invoke(main, ["report", str(tmp / "sub"), "--reference", str(tmp_path / "ref.npz"), "-o",
                               str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<h2>Breeds</h2><p>Not drawn: the reference holds 0 photos in 0 breed folder(s)" in page
    assert "dogkit reference ../shared/data/stanford-dogs-crops" in page


def test_session_starts_are_where_the_session_changes():
    from dogkit.metrics.report import session_starts

    assert session_starts([{"step": 1}, {"step": 2}]) == []  # logs from before sessions: one
    rows = [{"step": s, "session": k} for s, k in ((10, 1), (20, 1), (30, 2), (40, 2), (50, 3))]
    assert session_starts(rows) == [(2, 30), (3, 50)]
