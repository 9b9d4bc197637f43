"""The one rule for outputs (README, Commands): nothing is replaced without a word. A command whose
output exists refuses in one line unless --force (and then says what it replaced); clean-data and
reference say "up to date" and stop when the file already holds what they would make; a training
run says which earlier run's files in its folder it replaces."""
import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import ROOT
from dogkit import cli
from dogkit.core import registry
from dogkit.core.kernel import earlier_run_line
from dogkit.core.settings import TrainConfig, with_settings
from dogkit.core.train import train
from dogkit.metrics.submission import load_submission


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def photos(folder, n=6, seed=0):
    rng = np.random.default_rng(seed)
    for breed in ("n02085620-Chihuahua", "n02110958-pug"):
        (folder / breed).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / breed / f"{breed[:9]}_{i}.jpg")
    return folder


def test_clean_data_again_is_up_to_date_and_another_input_is_refused(tmp_path):
    src, out = photos(tmp_path / "dogs"), tmp_path / "c.npz"
    assert invoke("clean-data", src, "-o", out, "--codec", "webp").exit_code == 0
    before = digest(out)
    res = invoke("clean-data", src, "-o", out, "--codec", "webp", "--preview", tmp_path / "p.png")
    assert res.exit_code == 0 and f"up to date {out}: 2 breeds cleaned from the same 12 photos" in res.output
    assert digest(out) == before and (tmp_path / "p.png").exists()  # the preview made from the cache
    res = invoke("clean-data", src, "-o", out, "--codec", "webp", "--size", "96")  # other settings
    assert res.exit_code == 1 and res.stderr.strip() == (f"Error: {out}: exists (an earlier output); give another -o, "
                                                         "or --force to replace it")
    photos(tmp_path / "dogs", n=7)  # another photo: another input
    assert invoke("clean-data", src, "-o", out, "--codec", "webp").exit_code == 1 and digest(out) == before
    res = invoke("clean-data", src, "-o", out, "--codec", "webp", "--force")
    assert res.exit_code == 0 and f"replacing  {out} (--force)" in res.stderr and digest(out) != before


class MeanNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2048)

    def forward(self, x):
        return [torch.relu(self.proj(x.mean(dim=(2, 3)))).view(len(x), 2048, 1, 1)]


def test_a_finished_reference_is_up_to_date(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_load_network", lambda weights: (MeanNet(), {"digest": "fake", "source": "test"}))
    src, out = photos(tmp_path / "dogs"), tmp_path / "ref.npz"
    assert invoke("reference", src, "-o", out, "--batch-size", "4").exit_code == 0
    before = digest(out)
    res = invoke("reference", src, "-o", out)
    assert res.exit_code == 0 and f"up to date {out}: 12 photos of the same 12, the same network" in res.output
    res = invoke("reference", src, "-o", out, "--limit", "4")  # another pick: another reference
    assert res.exit_code == 1 and "exists (an earlier output)" in res.stderr and digest(out) == before
    assert invoke("reference", src, "-o", out, "--limit", "4", "--force").exit_code == 0
    assert json.loads(str(np.load(out)["provenance"]))["count"] == 4


def test_sample_never_replaces_a_zip_without_force(tmp_path, tiny_dataset):
    entry = registry.get("dcgan")
    cfg = with_settings(TrainConfig(model="dcgan"), dict(entry.settings, width=4, batch_size=8, steps=2, device="cpu",
                                                         out=str(tmp_path / "run"), budget=1e6, reserve=0.0,
                                                         n_samples=16))
    train(cfg, entry.cls, data=tiny_dataset, log=lambda m: None)
    kernels_zip = tmp_path / "run" / "images.zip"
    before = digest(kernels_zip)
    res = invoke("sample", tmp_path / "run" / "checkpoint.pt", "-o", kernels_zip, "-n", "8")
    assert res.exit_code == 1 and "exists (an earlier output)" in res.stderr and digest(kernels_zip) == before
    res = invoke("sample", tmp_path / "run" / "checkpoint.pt", "-o", kernels_zip, "-n", "8", "--force")
    assert res.exit_code == 0 and "replacing" in res.stderr and digest(kernels_zip) != before
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.html").write_text("an earlier report")
    res = invoke("report", kernels_zip, "--reference", kernels_zip, "-o", report)
    assert res.exit_code == 1 and "report.html: exists" in res.stderr
    assert (report / "report.html").read_text() == "an earlier report"


def test_a_new_run_names_the_earlier_run_it_replaces(tmp_path):
    assert earlier_run_line(str(tmp_path)) == ""
    (tmp_path / "images.zip").write_bytes(b"PK")
    line = earlier_run_line(str(tmp_path))
    assert line.startswith(f"replaces   images.zip in {tmp_path}, an earlier run's") and "--resume" in line


def full_disk(monkeypatch, module, name):
    """Make module.name (np.savez, torch.save, ...) write half its file and then fail as a full disk does."""
    def write_half(path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, name, write_half)


def test_a_full_disk_is_one_line_naming_the_file_and_the_earlier_one_stays_whole(tmp_path, monkeypatch, tiny_dataset):
    """clean-data, reference and sample on a disk that fills up mid-write: exit 1, one line with the
    path and 'no space left on device', the earlier output byte for byte, no temporary file left.
    The fault is injected at the write (np.savez, torch.save / zipfile): the layer under every
    output is the one atomic write (dogkit.core.sample.atomic_path)."""
    import zipfile

    import dogkit.core.data as D
    import dogkit.core.sample as S
    import dogkit.metrics.reference as R

    src = photos(tmp_path / "dogs")
    out = tmp_path / "out"
    out.mkdir()
    cache, ref, zip_path = out / "c.npz", out / "ref.npz", out / "images.zip"
    for path in (cache, ref, zip_path):
        path.write_bytes(b"the earlier output")
    monkeypatch.setattr(cli, "_load_network", lambda weights: (MeanNet(), {"digest": "fake", "source": "test"}))
    full_disk(monkeypatch, D.np, "savez")
    res = invoke("clean-data", src, "-o", cache, "--codec", "webp", "--force")
    assert res.exit_code == 1 and res.stderr.strip().splitlines()[-1] == (
        f"Error: {cache}: no space left on device (nothing written: the earlier file, if any, is as it was)")
    monkeypatch.setattr(R.np, "savez", D.np.savez)  # the same numpy: reference's final write fails too
    res = invoke("reference", src, "-o", ref, "--force")
    assert res.exit_code == 1 and f"Error: {ref}: no space left on device" in res.stderr
    monkeypatch.undo()
    entry = registry.get("dcgan")
    cfg = with_settings(TrainConfig(model="dcgan"), dict(entry.settings, width=4, batch_size=8, steps=1, device="cpu",
                                                         out=str(tmp_path / "run"), budget=1e6, reserve=0.0,
                                                         n_samples=8))
    train(cfg, entry.cls, data=tiny_dataset, log=lambda m: None)
    monkeypatch.setattr(S.zipfile, "ZipFile", lambda path, *a, **k: full_disk_zip(path))
    res = invoke("sample", tmp_path / "run" / "checkpoint.pt", "-o", zip_path, "-n", "8", "--force")
    assert res.exit_code == 1 and f"Error: {zip_path}: no space left on device" in res.stderr, res.output
    monkeypatch.setattr(S.zipfile, "ZipFile", zipfile.ZipFile)
    for path in (cache, ref, zip_path):
        assert path.read_bytes() == b"the earlier output", path
    assert sorted(p.name for p in out.iterdir()) == ["c.npz", "images.zip", "ref.npz"]  # no temporary left


def full_disk_zip(path):
    with open(path, "wb") as fh:
        fh.write(b"PK half")
    raise OSError(28, "No space left on device")


def test_a_dangling_link_as_an_output_is_refused_before_any_work(tmp_path):
    link = tmp_path / "c.npz"
    link.symlink_to(tmp_path / "nowhere" / "c.npz")
    res = invoke("clean-data", photos(tmp_path / "dogs"), "-o", link)
    assert res.exit_code == 1 and res.stderr.strip() == (
        f"Error: {link}: a symbolic link to {tmp_path / 'nowhere' / 'c.npz'}, which does not exist (remove the link or "
        "give another path)")
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_a_killed_writers_temporary_is_removed_and_a_running_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    from dogkit.core.data import TEMP_MARK, remove_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".ref.partial{TEMP_MARK}{int(dead.stdout)}.npz").write_bytes(b"torn")
    (tmp_path / f".ref{TEMP_MARK}{os.getpid()}.npz").write_bytes(b"being written")
    assert remove_stale_temps(tmp_path) == [f".ref.partial{TEMP_MARK}{int(dead.stdout)}.npz"]
    assert [p.name for p in tmp_path.iterdir()] == [f".ref{TEMP_MARK}{os.getpid()}.npz"]


def test_two_runs_on_one_folder_the_second_refuses_naming_the_first(tmp_path):
    """A run folder is claimed before any work: a second run there while the first one's process
    runs is refused in one line naming that process and its lock; a lock a killed run left is
    taken over; the claim is given back."""
    import os
    import subprocess
    import sys

    from dogkit.core.runtime import RUN_LOCK, RunError, claim_folder, release_folder

    holder = ("import sys, time; from dogkit.core.runtime import claim_folder; lock = claim_folder(sys.argv[1]); "
              "print('held', flush=True); time.sleep(60)")
    other = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "held\n"
        with pytest.raises(RunError) as err:
            claim_folder(str(tmp_path))
        assert str(err.value) == (f"{tmp_path}: another run (process {other.pid}) is writing there, its lock "
                                  f"{tmp_path / RUN_LOCK}; give another --out, or wait for it")
        args = ["--data", str(tmp_path / "x.npz"), "--out", str(tmp_path), "--device", "cpu"]
        kernel = subprocess.run([sys.executable, str(ROOT / "kernels" / "dcgan.py"), *args], capture_output=True,
                                text=True, timeout=120)
        assert kernel.returncode == 1 and kernel.stderr.strip() == f"error: {err.value}", kernel.stderr
        assert (tmp_path / RUN_LOCK).read_text() == f"{other.pid}\n"  # the other run's lock, untouched
    finally:
        other.kill()
        other.wait()
    lock = claim_folder(str(tmp_path))  # its process is gone (killed, its lock file left): taken over
    assert (tmp_path / RUN_LOCK).read_text() == f"{os.getpid()}\n"
    release_folder(lock)
    assert not (tmp_path / RUN_LOCK).exists() and tmp_path.is_dir()
    release_folder(claim_folder(str(tmp_path / "new")))  # made by the claim, left empty: removed
    assert not (tmp_path / "new").exists()


KILLED_REFERENCE = """
import sys, time, numpy as np, torch
sys.path[:0] = [{tests!r}, {tests!r} + "/tools"]
from test_outputs import MeanNet
from dogkit.metrics import features as feat, reference as R
torch.manual_seed(0)
real = feat.pool3
def slow(*args):
    time.sleep(0.05)  # time for the test to kill it anywhere
    return real(*args)
feat.pool3 = slow
np_savez = np.savez
def slow_savez(path, **arrays):
    np_savez(path, **arrays)
    time.sleep(0.3)  # a partial's temporary stays in place a while: a kill may land in it
R.np.savez = slow_savez
R.build_reference({src!r}, {out!r}, MeanNet(), {{"digest": "fake", "source": "test"}}, "cpu", batch_size=1,
                  checkpoint_every=2, progress=False)
"""


@pytest.mark.slow
def test_a_reference_killed_anywhere_resumes_from_its_last_whole_state(tmp_path):
    """kill -9 a reference build at several moments (inside a partial's write, between batches):
    the next run never meets a torn file, resumes from the last whole partial, removes the dead
    writer's temporaries, and ends with the features of an uninterrupted build."""
    import signal
    import subprocess
    import sys
    import time

    from dogkit.core.data import TEMP_MARK
    from dogkit.metrics import reference as R

    src, out = photos(tmp_path / "dogs"), tmp_path / "ref.npz"
    script = KILLED_REFERENCE.format(tests=str(ROOT / "tests"), src=str(src), out=str(out))
    partial = out.with_name(out.name + ".partial.npz")
    temp = lambda: [p.name for p in tmp_path.iterdir() if TEMP_MARK in p.name]  # noqa: E731
    done = []
    for moment in ("between batches", "in a write", "in a write"):
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and not (
                partial.exists() and (temp() if moment == "in a write" else not temp())):
            time.sleep(0.005)
        assert proc.poll() is None, "the build ended before it was killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not out.exists()
        with np.load(partial) as p:  # whole, never torn: the last complete state
            assert p["features"].shape == (int(p["done"]), 2048)
            done.append(int(p["done"]))
    assert done == sorted(done) and 0 < done[-1] < 12, done  # each run went on from the last
    logs = []
    torch.manual_seed(0)  # the network the killed runs had
    ref = R.build_reference(src, out, MeanNet(), {"digest": "fake", "source": "test"}, "cpu", batch_size=1,
                            checkpoint_every=2, progress=False, log=logs.append)
    assert any(f"resuming {out}: {done[-1]}/12" in m for m in logs), logs
    assert temp() == [] and not partial.exists()
    torch.manual_seed(0)
    fresh = R.build_reference(src, tmp_path / "fresh.npz", MeanNet(), {"digest": "fake", "source": "test"}, "cpu",
                              batch_size=4, progress=False)
    np.testing.assert_allclose(ref.features, fresh.features, rtol=1e-5, atol=1e-6)


def test_a_reference_on_a_disk_that_fills_up_resumes_once_space_is_freed(tmp_path, monkeypatch):
    """The disk fills up at the second partial save: the build stops with the one line naming the
    partial and 'no space left on device', the first partial stays whole; once space is freed the
    same command resumes from it and ends with the features of an uninterrupted build."""
    from dogkit.core.data import WriteError
    from dogkit.metrics import reference as R

    src, out = photos(tmp_path / "dogs"), tmp_path / "ref.npz"
    partial = out.with_name(out.name + ".partial.npz")
    real, calls = R.np.savez, []

    def fills_up(path, **arrays):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as fh:
                fh.write(b"PK half")
            raise OSError(28, "No space left on device")
        return real(path, **arrays)

    monkeypatch.setattr(R.np, "savez", fills_up)
    torch.manual_seed(0)
    with pytest.raises(WriteError) as err:
        R.build_reference(src, out, MeanNet(), {"digest": "fake", "source": "test"}, "cpu", batch_size=2,
                          checkpoint_every=2, progress=False)
    assert str(err.value) == (f"{partial}: no space left on device (nothing written: the earlier file, if any, is "
                              f"as it was)")
    with np.load(partial) as p:
        assert int(p["done"]) == 2
    monkeypatch.setattr(R.np, "savez", real)  # space freed
    logs = []
    torch.manual_seed(0)
    ref = R.build_reference(src, out, MeanNet(), {"digest": "fake", "source": "test"}, "cpu", batch_size=2,
                            checkpoint_every=2, progress=False, log=logs.append)
    assert f"resuming {out}: 2/12 photos already done" in logs, logs
    torch.manual_seed(0)
    fresh = R.build_reference(src, tmp_path / "fresh.npz", MeanNet(), {"digest": "fake", "source": "test"}, "cpu",
                              batch_size=4, progress=False)
    np.testing.assert_allclose(ref.features, fresh.features, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dogs", "fresh.npz", "ref.npz"]


KILLED_TRAINING = """
import sys, time, torch
from dogkit.core import registry
from dogkit.core.settings import TrainConfig, with_settings
from dogkit.core.train import train
save = torch.save
def slow_save(obj, path, *a, **k):
    save(obj, path, *a, **k)
    time.sleep(0.3)  # the whole checkpoint in its temporary a while, before the rename: a kill may land there
torch.save = slow_save
entry = registry.get("dcgan")
cfg = with_settings(TrainConfig(model="dcgan"), dict(entry.settings, width=4, batch_size=8, device="cpu", budget=1e6,
                    reserve=0.0, n_samples=16, log_every=0.0, grid_every=1e9, checkpoint_every=0.0, data={data!r},
                    out={out!r}, steps=int(sys.argv[2])))
train(cfg, entry.cls, resume=sys.argv[1] or None)
"""


@pytest.mark.slow
def test_a_training_run_killed_in_a_checkpoint_save_resumes_from_the_last_whole_one(tmp_path, tiny_dataset):
    """kill -9 a run while it writes checkpoint.pt (the new one whole in its temporary, not yet
    renamed) and between two saves: checkpoint.pt is always a whole checkpoint of a later step,
    and the next run resumes from it, removes the dead writer's temporary and finishes its zip."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from dogkit.core.data import TEMP_MARK, save_cache
    from dogkit.core.train import read_checkpoint

    cache, out = tmp_path / "tiny.npz", tmp_path / "run"
    save_cache(cache, dict(tiny_dataset, settings={}, summary={}), workers=1, codec="webp-lossless")
    script = KILLED_TRAINING.format(data=str(cache), out=str(out))
    ckpt = out / "checkpoint.pt"
    temp = lambda: [p.name for p in out.iterdir() if TEMP_MARK in p.name] if out.exists() else []  # noqa: E731
    env = dict(os.environ, OMP_NUM_THREADS="1")
    steps = []
    for moment in ("in a write", "between writes", "in a write"):
        resume = str(ckpt) if ckpt.exists() else ""
        proc = subprocess.Popen([sys.executable, "-c", script, resume, "1000000"], cwd=ROOT, env=env)
        deadline, last = time.monotonic() + 120, steps[-1] if steps else -1
        while proc.poll() is None and time.monotonic() < deadline and not (
                ckpt.exists() and read_step(ckpt) > last + 1 and (temp() if moment == "in a write" else not temp())):
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it was killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        steps.append(read_checkpoint(str(ckpt))["step"])  # whole, never torn
    assert steps == sorted(steps) and len(set(steps)) == 3, steps  # each run went on from the last
    assert temp(), "the last kill landed outside a write"
    done = subprocess.run([sys.executable, "-c", script, str(ckpt), str(steps[-1] + 2)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed {ckpt}: step {steps[-1]}" in done.stdout and "left half-written" in done.stdout, done.stdout
    assert read_checkpoint(str(ckpt))["step"] == steps[-1] + 2 and temp() == []
    assert len(load_submission(out / "images.zip", strict=False, n_images=16).names) == 16


def read_step(path):
    from dogkit.core.runtime import RunError
    from dogkit.core.train import read_checkpoint

    try:
        return read_checkpoint(str(path))["step"]
    except RunError:  # replaced this very instant: looked at again
        return -1


KILLED_CLEANING = """
import sys, time
import numpy as np
from dogkit import cli
savez = np.savez
def slow_savez(path, **arrays):
    savez(path, **arrays)
    time.sleep(30)  # the new cache whole in its temporary, not yet renamed: the test kills it here
np.savez = slow_savez
cli.main(["clean-data", {src!r}, "-o", {out!r}, "--codec", "webp", "--workers", "1", "--force"])
"""


def test_clean_data_killed_in_its_write_leaves_the_earlier_cache_and_a_rerun_removes_the_temporary(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from dogkit.core.data import TEMP_MARK, load_cache

    src, out = photos(tmp_path / "dogs"), tmp_path / "out" / "c.npz"
    out.parent.mkdir()
    out.write_bytes(b"the earlier cache")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLEANING.format(src=str(src), out=str(out))], cwd=ROOT)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not any(
            TEMP_MARK in p.name for p in out.parent.iterdir()):
        time.sleep(0.01)
    time.sleep(0.5)  # inside the write (its temporary whole, 30 s before the rename)
    assert proc.poll() is None, "clean-data ended before it was killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert out.read_bytes() == b"the earlier cache"
    assert [p.name for p in out.parent.iterdir() if TEMP_MARK in p.name]  # what a kill leaves, until...
    res = invoke("clean-data", src, "-o", out, "--codec", "webp", "--workers", "1", "--force")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["c.npz"]  # ...the next write of that file
    assert len(load_cache(str(out))["images"]) == 12


def test_two_clean_data_runs_at_once_on_one_output_leave_one_whole_cache(tmp_path):
    """The same command twice at once on the same -o: each writes its own temporary and renames it
    whole, so the file is one run's result, never an interleaving of both, and no temporary stays."""
    import subprocess
    import sys

    from dogkit.core.data import load_cache

    src, out = photos(tmp_path / "dogs", n=20), tmp_path / "c.npz"
    command = [sys.executable, "-m", "dogkit", "clean-data", str(src), "-o", str(out), "--codec", "webp",
               "--workers", "1"]
    procs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    assert [code for code, _, _ in results] == [0, 0], results
    data = load_cache(str(out))
    assert len(data["images"]) == 40 and data["breeds"] == ["n02085620-Chihuahua", "n02110958-pug"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "dogs"]


@pytest.mark.slow
def test_a_kernel_stalled_mid_run_past_its_budget_still_writes_its_zip_and_says_how_late(tmp_path, tiny_dataset):
    """A real process slowed mid-run (stopped with SIGSTOP, the machine's other jobs at their
    worst, for longer than the whole budget): with no images.zip yet and no platform wall (a local
    run) it finishes its zip from the trained generator and says how late, against the plan."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    from dogkit.core.data import save_cache

    cache, out = tmp_path / "tiny.npz", tmp_path / "run"
    save_cache(cache, dict(tiny_dataset, settings={}, summary={}), workers=1, codec="webp-lossless")
    proc = subprocess.Popen([sys.executable, str(ROOT / "kernels" / "dcgan.py"), "--data", str(cache), "--out",
                             str(out), "--device", "cpu", "--budget", "30s", "--reserve", "5", "--width", "4",
                             "--batch-size", "8", "--n-samples", "64", "--log-every", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", DOGKIT_KAGGLE_INPUT=str(tmp_path / "none")))
    deadline = time.monotonic() + 120
    while not (out / "log.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGSTOP)
    time.sleep(35)  # longer than the whole budget
    proc.send_signal(signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert len(load_submission(out / "images.zip", strict=False, n_images=64).names) == 64
    warning = next((m for m in stdout.splitlines() if m.startswith("WARNING    the end took ")), stdout)
    late = int(re.search(r": (\d+) s past the budget", warning).group(1))
    assert late >= 5 and warning.endswith("it was let run over (no wall: a local run)"), warning


TWIN_REFERENCE = """
import sys, torch
sys.path[:0] = [{tests!r}, {tests!r} + "/tools"]
from test_outputs import MeanNet
from dogkit.metrics import reference as R
torch.manual_seed(0)
R.build_reference({src!r}, {out!r}, MeanNet(), {{"digest": "fake", "source": "test"}}, "cpu", batch_size=1,
                  checkpoint_every=1, progress=False)
"""


@pytest.mark.slow
def test_two_reference_builds_at_once_on_one_output_leave_one_whole_reference(tmp_path):
    """Two builds of the same reference at once (each saving its partial after every photo, so they
    meet in the partial and at its removal): both finish, the file is whole and holds the features
    of one build, and neither a partial nor a temporary stays."""
    import subprocess
    import sys

    from dogkit.metrics import reference as R

    src, out = photos(tmp_path / "dogs", n=10), tmp_path / "ref.npz"
    script = TWIN_REFERENCE.format(tests=str(ROOT / "tests"), src=str(src), out=str(out))
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errors = [(p.wait(timeout=300), p.stderr.read()[-2000:]) for p in procs]
    assert [code for code, _ in errors] == [0, 0], errors
    torch.manual_seed(0)
    fresh = R.build_reference(src, tmp_path / "fresh.npz", MeanNet(), {"digest": "fake", "source": "test"}, "cpu",
                              batch_size=4, progress=False)
    np.testing.assert_allclose(R.load_reference(out).features, fresh.features, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dogs", "fresh.npz", "ref.npz"]
