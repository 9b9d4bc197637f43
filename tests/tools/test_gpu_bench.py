"""tools/gpu_bench.py: the queue is checked, and a whole GPU session is rehearsed on the CPU
(pack, run with a tiny queue and budgets of seconds, ingest, the exact score), ending in rows of a
temporary ledger, so that no GPU minute is lost to a bug a CPU could have found."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import gpu_bench  # noqa: E402
import ledger  # noqa: E402

from dogkit.metrics import fid as F  # noqa: E402


def make_reference(path, n=300, dim=2048):
    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(size=(n, dim))).astype(np.float32) * 0.3
    mu, sigma = F.stats(feats)
    np.savez(path, mu=mu, sigma=sigma, features=feats, names=np.array([f"p{i}.jpg" for i in range(n)]),
             provenance=json.dumps({"source": "synthetic"}))
    return mu, sigma


def write_queue(path, entries):
    path.write_text(json.dumps({"format": "dogkit-queue-1", "entries": entries}))
    return path


def test_the_committed_queue_is_valid():
    entries = gpu_bench.load_queue(gpu_bench.QUEUE)
    cap = 570.0  # a 10-minute command with 30 s kept, the GPU tests (< 40 s) run first
    cost = lambda e: gpu_bench.estimate(e, gpu_bench.SCORE_S_PER_IMAGE["cuda"], 10_000)  # noqa: E731
    confirm = entries[:4]  # issue 44: biggan's recipe confirmed first, one change at a time against the old default
    assert [e["id"] for e in confirm] == ["biggan-8m-recipe-before", "biggan-8m-d64", "biggan-8m-ema-rule",
                                          "biggan-8m-recipe"]
    before = gpu_bench.train_config(confirm[0], "x", "x")
    assert (before.d_width, before.ema_fraction, before.ema_decay, before.truncation) == (32, 0.0, 0.999, 1.5)
    now = [gpu_bench.train_config(e, "x", "x") for e in confirm[1:]]
    assert [(c.d_width or 2 * c.width, c.ema_fraction) for c in now] == [(64, 0.0), (32, 0.1), (64, 0.1)]
    assert now[-1].truncation == -1.0 and all(c.seed == before.seed for c in now)  # today's default, same seed
    assert all(e["budget"] == "8m" and sorted(e["truncations"]) == [0, 0.8, 1] for e in confirm)
    assert all(cost(e) < cap - 40 for e in confirm)  # each fits one 10-minute command beside the GPU tests
    assert entries[4]["options"] == {"preset": "fifth-place"}
    entries = entries[5:]
    confirm = entries[:2]  # the CPU proxies' many-passes regime at full width: both arms in one command
    assert [e.get("options", {}).get("augment", "flip") for e in confirm] == ["flip", "flip+diffaug"]
    assert confirm[0]["subset"] == confirm[1]["subset"] and confirm[0]["budget"] == confirm[1]["budget"]
    assert sum(map(cost, confirm)) + 30 < cap - 40  # 30 s: the two subsets decoded and written
    assert [e["kind"] for e in entries[2:5]] == ["throughput", "score-timing", "train"]
    assert entries[4]["model"] == "biggan" and entries[4]["budget"] == "8m"
    assert cost(entries[4]) < cap - 40  # an 8-minute entry with its three points fits beside the GPU tests


def test_a_bad_queue_lists_every_problem(tmp_path):
    q = write_queue(tmp_path / "q.json", [
        {"id": "a", "kind": "train", "model": "biggan", "budget": "8m", "question": "?",
         "options": {"precison": "bf16"}},
        {"id": "b", "kind": "train", "model": "bigan", "budget": "8m", "question": "?"},
        {"id": "a", "kind": "throughput", "question": "?", "models": ["dcgan"], "batch_sizes": [64],
         "precisions": ["fp8"], "memory_formats": ["contiguous"], "seconds": 4, "colour": 1},
        {"id": "c", "kind": "sweep", "question": "?"},
        {"id": "d", "kind": "train", "model": "biggan", "budget": "8m", "question": "?", "options": {"sessions": 2},
         "bn": ["eval"]},
        {"id": "e", "kind": "throughput", "question": "?", "models": ["dcgan"], "batch_sizes": [64],
         "precisions": ["fp32"], "memory_formats": ["contiguous"], "seconds": 4, "profile": ["bigan"]},
        {"id": "f", "kind": "train", "model": "biggan", "budget": "8m", "question": "?",
         "subset": {"size": 100, "breeds": 3}},
    ])
    with pytest.raises(gpu_bench.BenchError) as err:
        gpu_bench.load_queue(q)
    text = str(err.value)
    for needle in ("precison", "bigan", "unknown key 'colour'", "id used twice", "kind 'sweep'",
                   "entry 4 (d): options: sessions not settable here", "bn 'eval': choose from running, batch",
                   "entry 5 (e): not a model, precision, memory format or batch size: bigan",
                   "entry 6 (f): subset {'size': 100, 'breeds': 3}: size >= 1, breeds >= 0 dividing it"):
        assert needle in text, text


def test_pack_refuses_a_carry_over_the_limit(tmp_path, monkeypatch, inception, capsys):
    make_reference(tmp_path / "ref.npz")
    (tmp_path / "data.npz").write_bytes(b"x" * 1000)
    rc = gpu_bench.main(["pack", "--data", str(tmp_path / "data.npz"), "--reference", str(tmp_path / "ref.npz"),
                         "--out", str(tmp_path / "pack"), "--carry-limit", "1"])
    assert rc == 2 and "over --carry-limit 1 MiB" in capsys.readouterr().err
    assert (tmp_path / "pack" / gpu_bench.WEIGHTS_FILE).stat().st_size < 24e6  # int8: a quarter of fp32


def test_the_packed_covariance_moves_the_fid_by_less_than_a_thousandth(tmp_path, inception):
    mu, sigma = make_reference(tmp_path / "ref.npz", n=3000, dim=256)
    gpu_bench.pack(tmp_path / "ref.npz", tmp_path / "pack")
    p_mu, p_sigma, rows = gpu_bench.packed_stats(tmp_path / "pack" / gpu_bench.STATS_FILE)
    assert rows == 3000 and np.array_equal(p_mu, mu) and np.array_equal(p_sigma, p_sigma.T)
    assert np.abs(p_sigma - sigma).max() <= np.abs(sigma).max() * 2**-11  # float16's rounding, no more
    rng = np.random.default_rng(1)
    for scale in (1.0, 1.5, 3.0):  # from near the reference to far from it
        g_mu, g_sigma = F.stats(np.abs(rng.normal(size=(3000, 256))).astype(np.float32) * 0.3 * scale)
        exact = F.frechet_distance(g_mu, g_sigma, mu, sigma)
        assert abs(F.frechet_distance(g_mu, g_sigma, p_mu, p_sigma) - exact) < 1e-3, (scale, exact)


@pytest.mark.slow
def test_rehearsal_of_a_gpu_session_on_the_cpu(tmp_path, tiny_dataset, inception, capsys, monkeypatch):
    from dogkit.core.data import save_cache

    real_fid = F.frechet_distance

    def leading_features(mu1, sigma1, mu2, sigma2, **kw):  # the real computation on the first 64 features:
        # the rehearsal checks the session, not the values, and a 2048-d root costs ~40 s on 2 busy cores
        return real_fid(mu1[:64], sigma1[:64, :64], mu2[:64], sigma2[:64, :64], **kw)

    monkeypatch.setattr(F, "frechet_distance", leading_features)

    data = tmp_path / "dogs.npz"
    save_cache(str(data), dict(tiny_dataset, settings={}, summary={}), codec="webp")
    make_reference(tmp_path / "ref.npz")
    gpu_bench.pack(tmp_path / "ref.npz", tmp_path / "pack")
    # reserve: the end kept as given, not timed (a busy machine times it slower and re-plans a short budget)
    # steps: the runs' length (progress follows them), whatever the machine's speed; the budgets only above them
    tiny = {"width": 8, "batch_size": 8, "n_samples": 64, "ema_extra": "0.5", "reserve": 8, "steps": 10}
    queue = write_queue(tmp_path / "queue.json", [
        {"id": "probe", "kind": "throughput", "question": "speed?", "models": ["dcgan"], "batch_sizes": [8],
         "precisions": ["fp32"], "memory_formats": ["contiguous", "channels_last"], "seconds": 1.5,
         "profile": ["dcgan"]},
        {"id": "too-long", "kind": "train", "model": "dcgan", "budget": "2h", "question": "never started"},
        {"id": "timing", "kind": "score-timing", "question": "how fast is dogkit score?"},
        {"id": "tiny-run", "kind": "train", "model": "dcgan", "budget": "5m", "snapshots": [0.5], "options": tiny,
         "bn": ["batch"], "question": "does the loop work?"},
        {"id": "tiny-subset", "kind": "train", "model": "dcgan", "budget": "5m", "question": "many passes?",
         "subset": {"size": 12, "breeds": 2, "seed": 1},
         "options": {"width": 8, "batch_size": 8, "n_samples": 64, "reserve": 5, "steps": 6}},
    ])
    book = tmp_path / "ledger.jsonl"
    book.write_text("")
    out = tmp_path / "OUT"
    base = ["--ledger", str(book), "--queue", str(queue)]
    assert gpu_bench.main(base + ["run", "--data", str(data), "--pack", str(tmp_path / "pack"), "--out", str(out),
                                  "--device", "cpu", "--cap", "1800", "--n-images", "40", "--part-mib", "0.25",
                                  "--work", str(tmp_path / "work")]) == 0
    log = (out / "run.log").read_text()
    assert "GPU-only tests (exit" in log and "skipped" in log  # run first, skipped without CUDA
    assert "too-long: not started" in log
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["entry"]) for r in rows] == ([("throughput", "probe")] * 2 + [("timing", "timing")]
                                                       + [("run", "tiny-run")] * 4 + [("run", "tiny-subset")])
    sub = rows.pop()  # the kernel trained on the entry's 12 crops: its row says so, with the passes over them
    assert sub["subset"] == 12 and sub["passes"] == pytest.approx(sub["images_seen"] / 12, abs=0.01)
    assert sub["passes"] > 1
    assert sub["settings"].endswith("on 12 crops (2 breeds, subset seed 1)")
    assert "tiny-subset: 12 crops of 2 breeds (subset seed 1)" in log
    assert rows[2]["seconds"] > 0 and "dogkit score of 300 images" in rows[2]["settings"]
    rows = [r for r in rows if r["kind"] != "timing"]
    assert rows[1]["settings"].endswith("channels_last") and all(r["steps_per_s"] > 0 for r in rows)
    snap, final, extra, batch_bn = rows[2], rows[3], rows[4], rows[5]
    assert extra["settings"].endswith("extra EMA copy: half-life 0.5k images")
    assert batch_bn["settings"].endswith("batch-norm statistics: batch") and batch_bn["fid"] != final["fid"]
    assert extra["steps"] == final["steps"] == batch_bn["steps"]
    assert "probe: profiled dcgan" in log, log
    assert "snapshot at p=0.5" in snap["settings"] and snap["steps"] < final["steps"]
    assert final["scoring"].startswith(ledger.FID_ONLY) and final["distance"] is None
    parts = sorted(out.glob("returned.tar.*"))
    assert len(parts) >= 2 and all(p.stat().st_size <= 0.25 * 2**20 for p in parts)  # ingest joins them

    assert gpu_bench.main(base + ["ingest", str(out), "--runs", str(tmp_path / "runs"), "--name", "b1"]) == 0
    assert gpu_bench.main(base + ["ingest", str(out), "--runs", str(tmp_path / "runs"), "--name", "b1"]) == 0
    assert len(ledger.load(book)) == 8  # ingesting twice adds nothing
    back = tmp_path / "runs" / "b1"
    assert {p.name for p in back.glob("*.pt")} == {"tiny-run-final.pt", "tiny-run-p0.5.pt", "tiny-subset-final.pt",
                                                   "tiny-run-final-ema0.5k.pt", "tiny-run-final-bnbatch.pt"}
    assert (back / "tiny-run-log.jsonl").exists()
    assert "Self CPU" in (back / "probe-profile-dcgan.txt").read_text()  # torch.profiler's table

    assert gpu_bench.main(base + ["score", str(back), "--reference", str(tmp_path / "ref.npz"),
                                  "--n-images", "40", "--only", "tiny-run-final,tiny-run-p0.5"]) == 0
    exact = [r for r in ledger.load(book) if (r["scoring"] or "").startswith("exact")]
    assert len(exact) == 2 and all(r["distance"] is not None and r["mifid"] is not None for r in exact)
    by_gen = {r["note"].split(";")[0]: r for r in exact}
    gpu = {r["note"]: r for r in ledger.load(book) if (r["scoring"] or "").startswith(ledger.FID_ONLY)}
    for note, r in by_gen.items():  # same images, int8 against fp32 weights (40 images, a synthetic
        # reference: a few % apart; on real data the error is measured in the README)
        assert r["fid"] == pytest.approx(gpu[note]["fid"], rel=0.1), (r, gpu[note])
        assert "off by" in r["note"]
    assert gpu_bench.main(base + ["score", str(back), "--reference", str(tmp_path / "ref.npz"),
                                  "--n-images", "40"]) == 0
    assert len(ledger.load(book)) == 13  # resumable: the two scored are skipped; the extra copy, batch BN, subset now

    capsys.readouterr()
    assert gpu_bench.main(base + ["queue"]) == 0
    table = capsys.readouterr().out
    assert "| probe | throughput | speed? | measured:" in table
    assert "| too-long | train | never started | pending" in table


def test_every_queued_kernel_command_parses_as_the_kernel_reads_it():
    """The flags the bench passes (--memory-format, --ema-extra, --d-width ...) are the kernel's own."""
    from dogkit.core import kernel, registry
    from dogkit.core.settings import TrainConfig, parse_budget, with_settings

    for e in gpu_bench.load_queue(gpu_bench.QUEUE):
        if e["kind"] != "train":
            continue
        cmd = gpu_bench.kernel_command(e, "data/dogs64.npz", ".devwork/x", "auto")
        assert cmd[:2] == ["python", f"kernels/{e['model']}.py"] and (ROOT / cmd[1]).exists()
        args = kernel.parse_args(cmd[2:])
        entry = registry.get(e["model"])
        cfg = kernel.config_from_options(entry.settings, vars(args), presets=entry.presets)
        for k, v in (e.get("options") or {}).items():
            if k == "preset":
                assert with_settings(TrainConfig(), kernel.with_preset(entry.settings, entry.presets, v)).d_width \
                    == cfg.d_width, e["id"]
                continue
            assert getattr(cfg, k) == v, (e["id"], k)
        assert cfg.budget == parse_budget(e["budget"]) and cfg.budget in (210.0, 480.0) and args.gpus == 1
