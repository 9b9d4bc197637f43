"""Several ranks on the CPU (gloo, 2 forked processes): the same parameters everywhere, each rank
its own batches, one zip and one checkpoint that resumes exactly, a failing or dying rank."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dogkit.core.train as T
from dogkit.core import registry
from dogkit.core.distributed import launch
from dogkit.core.kernel import after_ranks
from dogkit.core.sample import generate
from dogkit.core.settings import with_settings
from dogkit.core.train import RunFailed, Trainer, load_checkpoint
from dogkit.metrics.submission import load_submission

from test_kaggle import ROOT, fake_kaggle, run_kernel  # noqa: F401  (fixture)
from test_train import FakeClock, tiny_cfg

DCGAN = registry.get("dcgan").cls
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def two_ranks(target, *args):
    """Run target(world, device, *args) on 2 forked CPU ranks; their exit codes."""
    return launch(target, 2, "cpu", args)


def train_ranks(world, device, tmp_path, data, steps, resume, out, hooks_for_rank):
    """One rank's tiny dcgan run under a clock that ticks per step; writes rank{r}.pt with what
    the test compares and exits 0, or 1 with the RunFailed cause in rank{r}.json."""
    torch.set_num_threads(1)
    drawn = []
    draw = T.draw_batch
    T.draw_batch = lambda tr: drawn.append(draw(tr)) or drawn[-1]
    clock = FakeClock(dt=1.0)
    cfg = tiny_cfg(tmp_path / out, steps=steps, budget=40.0, lr_decay_start=0.2, ema_start=0.1)
    tr = Trainer(cfg, DCGAN, data=data, clock=clock, log=lambda m: None, world=world,
                 hooks=[clock.hook, *hooks_for_rank(world.rank)])
    if resume:
        load_checkpoint(tr, tmp_path / resume)
    result = {"rank": world.rank}
    try:
        tr.run()
    except RunFailed as exc:
        result.update(cause=exc.cause, zip=exc.zip_path)
    except T.RankStopped as exc:
        result.update(stopped=str(exc))
    params = {f"{part}.{k}": v.detach() for part, m in (("G", tr.model.G), ("D", tr.model.D))
              for k, v in m.named_parameters()}
    torch.save({"params": params, "G": tr.model.G.state_dict(), "G_ema": tr.ema.G.state_dict(), "step": tr.step,
                "first_batch": drawn[0][0] if drawn else None}, tmp_path / f"rank{world.rank}.pt")
    (tmp_path / f"rank{world.rank}.json").write_text(json.dumps(result))
    return 0


def no_hooks(rank):
    return []


@pytest.mark.slow
def test_ranks_keep_identical_parameters_and_draw_their_own_batches(tmp_path, tiny_dataset):
    assert two_ranks(train_ranks, tmp_path, tiny_dataset, 6, None, "run", no_hooks) == [0, 0]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["step"] == r1["step"] == 6
    for name, a in r0["params"].items():  # batch-norm running statistics are each rank's own
        torch.testing.assert_close(a, r1["params"][name], rtol=0, atol=0, msg=name)
    for name, a in r0["G_ema"].items():  # what the ranks sample from: the same, statistics included
        torch.testing.assert_close(a, r1["G_ema"][name], rtol=0, atol=0, msg=name)
    assert not torch.equal(r0["first_batch"], r1["first_batch"])  # each rank its own real photos
    init = DCGAN(tiny_cfg(tmp_path), 0, torch.device("cpu")).G.state_dict()
    assert [k for k, v in r0["G"].items() if not torch.equal(init[k], v)], "no weight of G changed: it never trained"
    assert len(load_submission(tmp_path / "run" / "images.zip", strict=False).pixels) == 64
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rank_rngs"]) == 2
    assert ckpt["images_seen"] == 6 * 8 * 2  # every rank's batches
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint.pt", "images.zip", "log.jsonl", "options.json",
                                                    "samples.png"]


def checkpoint_at_step_4(rank):
    """Every rank writes step4.pt together at step 4, as a periodic checkpoint does (each rank's random state)."""
    return [lambda tr: T.checkpoint_together(tr, "step4.pt") if tr.step == 4 else None]


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_exactly(tmp_path, tiny_dataset):
    assert two_ranks(train_ranks, tmp_path, tiny_dataset, 8, None, "straight", checkpoint_at_step_4) == [0, 0]
    straight = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert two_ranks(train_ranks, tmp_path, tiny_dataset, 8, "straight/step4.pt", "half", no_hooks) == [0, 0]
    resumed = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert resumed["step"] == 8
    for name, a in straight["G"].items():
        torch.testing.assert_close(a, resumed["G"][name], rtol=0, atol=0, msg=name)
    la = [json.loads(x)["loss_d"] for x in open(tmp_path / "straight" / "log.jsonl")]
    lb = [json.loads(x)["loss_d"] for x in open(tmp_path / "half" / "log.jsonl")]  # the straight run's log carried
    assert len(la) == 8 and len(lb) == 12 and lb[-4:] == la[-4:]  # steps 5-8's logged losses (means over the ranks) too


def crash_rank_1(rank):
    def crash(tr):
        if tr.step == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return [crash] if rank == 1 else []


def kill_rank_1(rank):
    def die(tr):
        if tr.step == 3:
            os._exit(9)
    return [die] if rank == 1 else []


@pytest.mark.parametrize("hooks,code1", [(crash_rank_1, 0), (kill_rank_1, 9)])
def test_a_rank_that_fails_or_dies_stops_the_run_and_rank_0_writes_the_zip(tmp_path, tiny_dataset, hooks, code1):
    codes = two_ranks(train_ranks, tmp_path, tiny_dataset, 50, None, "run", hooks)
    assert codes == [0, code1]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    assert r0["zip"] == str(tmp_path / "run" / "images.zip")
    assert "step 3" in r0["cause"] or "step 4" in r0["cause"]
    assert len(load_submission(r0["zip"], strict=False).pixels) == 64
    assert torch.load(tmp_path / "rank0.pt", weights_only=True)["step"] <= 4
    if code1 == 0:  # a Python error: rank 1 says what, rank 0 that rank 1 stopped
        assert "rank 1 stopped" in r0["cause"]
        assert "RuntimeError at step 3 on rank 1: CUDA error" in json.loads((tmp_path / "rank1.json").read_text())["cause"]


@pytest.mark.slow
def test_when_rank_0_dies_the_run_goes_on_in_the_parent_from_the_last_checkpoint(tmp_path, tiny_dataset, capsys):
    import time

    from dogkit.core.data import save_cache

    cache = tmp_path / "tiny.npz"
    save_cache(cache, dict(tiny_dataset, settings={}, summary={}), workers=1, codec="webp-lossless")
    cfg = tiny_cfg(tmp_path / "run", steps=4, data=str(cache), budget=600.0)
    T.train(cfg, DCGAN, data=tiny_dataset, log=lambda m: None)  # what the ranks had done
    os.remove(tmp_path / "run" / "images.zip")
    cfg = with_settings(cfg, {"steps": 8})
    path = after_ranks([-6, 3], DCGAN, cfg, time.monotonic(), "cpu", on_kaggle=False, started=0.0)
    assert "rank 0 exited with code -6 (ranks: [-6, 3]); going on in one process on cpu from" in capsys.readouterr().err
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 8  # resumed at 4
    assert len(load_submission(path, strict=False).pixels) == 64
    with pytest.raises(SystemExit) as exit_:  # rank 0 ended on its own: its code, nothing redone
        after_ranks([1, 3], DCGAN, cfg, t0=0.0, device_type="cpu", on_kaggle=False)
    assert exit_.value.code == 1


@pytest.mark.slow
def test_when_rank_0_dies_in_a_session_the_parent_goes_on_in_the_same_session(tmp_path, tiny_dataset):
    """A run over sessions: the parent continues this session's own checkpoint with its clock and
    plan (the same session number, the same start), not as the next session."""
    import time

    from dogkit.core.data import save_cache

    cache = tmp_path / "tiny.npz"
    save_cache(cache, dict(tiny_dataset, settings={}, summary={}), workers=1, codec="webp-lossless")
    cfg = tiny_cfg(tmp_path / "run", steps=4, data=str(cache), budget=600.0, sessions=2)
    t0 = time.monotonic()
    T.train(cfg, DCGAN, data=tiny_dataset, log=lambda m: None, t0=t0)  # what the ranks had done
    planned = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    os.remove(tmp_path / "run" / "images.zip")
    after_ranks([-6, 3], DCGAN, with_settings(cfg, {"steps": 8}), t0, "cpu", on_kaggle=False, started=0.0)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (ckpt["step"], ckpt["session"], ckpt["session_start"]) == (8, 1, 0.0)
    assert (ckpt["train_seconds"], ckpt["session_end"]) == (planned["train_seconds"], planned["session_end"])


@pytest.mark.slow
def test_with_too_little_time_left_the_parent_samples_the_checkpoint(tmp_path, tiny_dataset):
    import time

    from dogkit.core.data import save_cache

    cache = tmp_path / "tiny.npz"
    save_cache(cache, dict(tiny_dataset, settings={}, summary={}), workers=1, codec="webp-lossless")
    cfg = tiny_cfg(tmp_path, steps=4, data=str(cache))
    T.train(cfg, DCGAN, data=tiny_dataset, log=lambda m: None)
    os.remove(tmp_path / "images.zip")
    # 60 s to the deadline of which the end keeps 55: 5 s of training is under the 10 % a run needs
    cfg = with_settings(cfg, {"budget": 60.0, "reserve": 55.0})
    with pytest.raises(RunFailed, match=r"rank 0 exited with code -9 .*sampled on the CPU from .*\(step 4\)") as info:
        after_ranks([-9, 3], DCGAN, cfg, time.monotonic(), "cpu", on_kaggle=False, started=0.0)
    assert len(load_submission(info.value.zip_path, strict=False).pixels) == 64


def test_the_ranks_slices_of_the_samples_are_the_whole_sample(tmp_path):
    G = DCGAN(tiny_cfg(tmp_path), 0, torch.device("cpu")).G.eval()
    whole = generate(G, 50, 128, 1.0, 3, batch_size=7, seed=5)
    parts = [generate(G, 50, 128, 1.0, 3, batch_size=7, seed=5, part=(k, 3)) for k in range(3)]
    assert [len(p) for p in parts] == [16, 17, 17]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


@pytest.mark.slow
def test_the_kernel_forks_two_ranks_on_a_simulated_kaggle(fake_kaggle):  # noqa: F811
    """Kaggle's T4 x2 as two CPU ranks; the run planned over two sessions, the second one
    continuing the first's output with every rank's own random stream."""
    import shutil

    env = dict(fake_kaggle["env"], DOGKIT_CPU_RANKS="2")
    args = ("--device", "cpu", "--budget", "10m", "--width", "4", "--batch-size", "8", "--sessions", "2")
    proc = run_kernel(env, *args, "--steps", "6", "--n-samples", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout
    assert "world      2 ranks (gloo), one process each: rank 0 cpu, rank 1 cpu; global batch 2 x 8 = 16" in log
    assert log.count("photos     24") == 1  # cleaned once, by rank 0
    assert log.count("wrote ") == 1 and "2 ranks)" in log
    assert load_submission(fake_kaggle["working"] / "images.zip", strict=True, n_images=64).pixels.shape == (
        64, 64, 64, 3)
    ckpt = torch.load(fake_kaggle["working"] / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["world_size"] == 2 and ckpt["session"] == 1 and len(ckpt["rank_rngs"]) == 2
    shutil.copytree(fake_kaggle["working"], fake_kaggle["root"] / "dogkit-dcgan")  # the output, attached
    shutil.rmtree(fake_kaggle["working"])
    fake_kaggle["working"].mkdir()
    proc = run_kernel(env, *args, "--steps", "9", "--log-every", "0", "--n-samples", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("continues  session 2 of 2, from ") and "random streams start afresh" not in proc.stdout
    ckpt = torch.load(fake_kaggle["working"] / "checkpoint.pt", weights_only=True)
    assert (ckpt["step"], ckpt["session"], ckpt["world_size"]) == (9, 2, 2)


@pytest.mark.slow
def test_dogkit_train_runs_under_torchrun(tmp_path, tiny_dataset):
    from dogkit.core.data import save_cache

    cache = tmp_path / "tiny.npz"
    save_cache(cache, dict(tiny_dataset, settings={}, summary={}), workers=1, codec="webp-lossless")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dogkit",
                           "train", "--data", str(cache), "--device", "cpu", "--budget", "1h", "--steps", "4",
                           "--width", "4", "--batch-size", "8", "--n-samples", "64", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world      2 ranks (gloo)" in proc.stderr
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["world_size"] == 2
    assert len(load_submission(tmp_path / "run" / "images.zip", strict=False).pixels) == 64


def test_a_forked_rank_in_a_notebook_writes_to_the_file_descriptors(monkeypatch):
    import io

    from dogkit.core.distributed import plain_streams

    monkeypatch.setattr(sys, "stdout", io.StringIO())  # like ipykernel's stream: no file descriptor
    real_err = sys.stderr
    plain_streams()
    assert sys.stdout.fileno() == 1
    assert sys.stderr is real_err  # a plain text stream (a file, a terminal) is kept


def plain_kernel_ranks(world, device, kernel_path, tmp_path, data):
    """One rank of a kernel whose dcgan step calls loss.backward(); opt.step() itself: a tiny run of
    4 steps, its parameters saved for the test to compare."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plain_dcgan_kernel", kernel_path)
    kernel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel)
    torch.set_num_threads(1)
    clock = FakeClock(dt=1.0)
    cfg = kernel.with_settings(kernel.TrainConfig(), kernel.DCGAN_SETTINGS)
    cfg = kernel.with_settings(cfg, dict(out=str(tmp_path / "run"), width=4, batch_size=8, n_samples=64, reserve=0.0,
                                         log_every=1e9, grid_every=1e9, checkpoint_every=1e9, device="cpu",
                                         budget=40.0, steps=4))
    tr = kernel.Trainer(cfg, kernel.DCGAN, data=data, clock=clock, log=lambda m: None, world=world, hooks=[clock.hook])
    tr.run()
    torch.save({f"{part}.{k}": v.detach() for part, m in (("G", tr.model.G), ("D", tr.model.D))
                for k, v in m.named_parameters()}, tmp_path / f"plain{world.rank}.pt")
    return 0


def test_a_step_edited_to_call_backward_and_step_itself_still_averages_over_the_ranks(tmp_path, tiny_dataset):
    """A Kaggle user rewrites the model's step the plain way (loss.backward(); opt.step()) in a copy of
    the kernel: on two ranks the weights stay identical, since the optimiser's step averages the
    gradients over the ranks whoever calls it."""
    text = (ROOT / "kernels" / "dcgan.py").read_text()
    plain = text.replace("backward_step(self.opt_d, loss_d)", "loss_d.backward(); self.opt_d.step()").replace(
        "backward_step(self.opt_g, loss_g)", "loss_g.backward(); self.opt_g.step()")
    assert plain.count("loss_d.backward(); self.opt_d.step()") == 1 and plain.count(".opt_g.step()") == 1
    (tmp_path / "plain_dcgan.py").write_text(plain)
    assert two_ranks(plain_kernel_ranks, tmp_path / "plain_dcgan.py", tmp_path, tiny_dataset) == [0, 0]
    r0, r1 = (torch.load(tmp_path / f"plain{r}.pt", weights_only=True) for r in (0, 1))
    init = DCGAN(tiny_cfg(tmp_path), 0, torch.device("cpu"))
    assert [k for k, v in init.G.named_parameters() if not torch.equal(v, r0[f"G.{k}"])], "G never trained"
    for name, a in r0.items():
        torch.testing.assert_close(a, r1[name], rtol=0, atol=0, msg=name)


def test_an_optimiser_step_averages_once_whoever_asks_and_again_after_a_skipped_step(monkeypatch):
    """average_in_step: opt.step() averages the gradients; after average_now() (fp16: before the loss
    scaler's inf check) the step does not average twice; when the scaler skipped the step, the
    next step averages its own gradients again."""
    import dogkit.core.distributed as dd

    calls = []
    monkeypatch.setattr(dd, "average_gradients", lambda params, world: calls.append(len(params)))
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([w], lr=0.1)
    dd.average_in_step(opt, dd.World(rank=0, size=2))
    w.grad = torch.ones(3)
    opt.step()
    assert calls == [1] and torch.equal(w.detach(), torch.full((3,), -0.1))
    forget = opt.average_now()
    opt.step()
    assert calls == [1, 1]  # averaged ahead, not again in the step
    forget = opt.average_now()
    forget()  # the scaler skipped that step (an inf)
    opt.step()
    assert calls == [1, 1, 1, 1]  # the next step averaged its own gradients
