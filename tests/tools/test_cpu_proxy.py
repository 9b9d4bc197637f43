"""tools/cpu_proxy.py: the queue's entries are checked, the subset is class-balanced, and a tiny
entry is rehearsed end to end: rows in a temporary ledger, a run stopped after its first point
resumes to exactly the rows of an uninterrupted one, nothing is measured twice."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import cpu_proxy  # noqa: E402
import gpu_bench  # noqa: E402
import ledger  # noqa: E402

from dogkit.core.data import save_cache  # noqa: E402
from dogkit.metrics import fid as F  # noqa: E402


def entry(**over):
    e = {"id": "t", "kind": "proxy", "question": "q", "model": "dcgan", "subset": {"size": 24, "breeds": 3, "seed": 0},
         "images": 64, "points": [0.5, 1], "seeds": [0], "options": {"width": 4, "batch_size": 8, "ema_extra": "0.1"}}
    return {**e, **over}


def write_queue(path, entries):
    path.write_text(json.dumps({"format": "dogkit-queue-1", "about": "test", "entries": entries}))
    return path


def test_the_committed_queue_is_valid():
    entries = cpu_proxy.load_queue(cpu_proxy.QUEUE)
    assert entries and all(e["kind"] == "proxy" and len(e["seeds"]) >= 1 for e in entries)
    for e in entries:  # the regime the proxy stands for: hundreds of passes over at least 100 crops
        size = cpu_proxy.subset_spec(e)[0]
        assert size >= 100 and (e["images"] / size >= 300 or size == 12_000), e["id"]


def test_bad_entries_are_refused_with_every_problem(tmp_path):
    bad = entry(id="b", model="nope", subset={"size": 10, "breeds": 3}, points=[0.5], seeds=[1, 1],
                options={"budget": "8m"}, extra=1)
    worse = entry(id="c", model="gan", options={"augment": "flip+diffaug", "lecam": 0.3}, images=0)
    with pytest.raises(gpu_bench.BenchError) as err:
        cpu_proxy.load_queue(write_queue(tmp_path / "q.json", [bad, entry(id="b"), worse]))
    text = str(err.value)
    for needle in ("unknown key 'extra'", "id used twice", "does not apply DiffAugment", "lecam=0.3: model gan does not read it",
                   "images 0"):
        assert needle in text, needle
    with pytest.raises(gpu_bench.BenchError) as err:
        cpu_proxy.load_queue(write_queue(tmp_path / "q.json", [entry(id="b", model="nope"),
                                                               entry(id="d", subset={"size": 10, "breeds": 3},
                                                                     points=[0.5], seeds=[1, 1],
                                                                     options={"budget": "8m"})]))
    text = str(err.value)
    for needle in ("model 'nope'", "options: budget", "breeds >= 0 dividing it", "the last one 1", "distinct"):
        assert needle in text, needle
    # the GPU's tool refuses a proxy entry in its own queue, and the proxy tool a GPU entry
    with pytest.raises(gpu_bench.BenchError, match="kind 'proxy'"):
        gpu_bench.load_queue(write_queue(tmp_path / "g.json", [entry()]))
    with pytest.raises(gpu_bench.BenchError, match="kind 'score-timing'"):
        cpu_proxy.load_queue(write_queue(tmp_path / "g.json", [{"id": "s", "kind": "score-timing", "question": "q"}]))


def test_the_subset_is_class_balanced_and_fixed_by_its_seed(tiny_dataset):
    a = cpu_proxy.take_subset(tiny_dataset, 12, breeds=2, seed=5)
    b = cpu_proxy.take_subset(tiny_dataset, 12, breeds=2, seed=5)
    c = cpu_proxy.take_subset(tiny_dataset, 12, breeds=2, seed=6)
    assert np.bincount(a["labels"]).tolist() == [6, 6] and len(a["breeds"]) == 2
    assert a["names"] == b["names"] and a["names"] != c["names"]
    for img, label, name in zip(a["images"], a["labels"], a["names"]):  # each crop keeps its own breed
        i = tiny_dataset["names"].index(name)
        assert (img == tiny_dataset["images"][i]).all()
        assert a["breeds"][label] == tiny_dataset["breeds"][tiny_dataset["labels"][i]]
    every = cpu_proxy.take_subset(tiny_dataset, 30, breeds=0, seed=0)
    assert np.bincount(every["labels"]).tolist() == [10, 10, 10]
    with pytest.raises(gpu_bench.BenchError, match="do not split evenly"):
        cpu_proxy.take_subset(tiny_dataset, 10, breeds=3)
    with pytest.raises(gpu_bench.BenchError, match="has 100 crops, 101 asked"):
        cpu_proxy.take_subset(tiny_dataset, 303, breeds=3)


@pytest.fixture(scope="module")
def rehearsal_inputs(tmp_path_factory, tiny_dataset):
    folder = tmp_path_factory.mktemp("proxy")
    save_cache(folder / "tiny.npz", dict(tiny_dataset, settings={}, summary={}), workers=1, codec="webp-lossless")
    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(size=(60, 2048))).astype(np.float32) * 0.3
    mu, sigma = F.stats(feats)
    np.savez(folder / "ref.npz", mu=mu, sigma=sigma, features=feats, names=np.array([f"p{i}.jpg" for i in range(60)]),
             provenance=json.dumps({"source": "synthetic"}))
    return folder


def rehearse(folder, name, *extra):
    argv = ["--ledger", str(folder / f"{name}.jsonl"), "--queue", str(folder / "queue.json"), "run",
            "--data", str(folder / "tiny.npz"), "--reference", str(folder / "ref.npz"), "--n-images", "6",
            "--work", str(folder / name), "--device-name", "test CPU", "--log-every", "0", *extra]
    return cpu_proxy.main(argv)


@pytest.mark.slow
def test_a_tiny_entry_end_to_end_and_a_stopped_run_resumes_to_the_same_rows(rehearsal_inputs, inception, capsys):
    folder = rehearsal_inputs
    write_queue(folder / "queue.json", [entry()])
    assert rehearse(folder, "whole") == 0
    whole = ledger.load(folder / "whole.jsonl")
    # two points of G_ema, then the extra EMA copy at the last one
    assert [(r["images_seen"], r["note"].split(" (")[0]) for r in whole] == [
        (32, "G_ema"), (64, "G_ema"), (64, "extra EMA copy: half-life 0.1k images")]
    for r in whole:
        assert r["kind"] == "proxy" and r["subset"] == 24 and r["passes"] == round(r["images_seen"] / 24, 2)
        assert r["kid_se"] > 0 and np.isfinite(r["kid"]) and r["fid"] > 0 and 0 <= r["distance"] <= 1
        assert r["command"] == "python tools/cpu_proxy.py run --only t --seeds 0"
        assert r["scoring"].startswith("CPU proxy: 6 generated images") and r["device"] == "test CPU"
    assert (folder / "whole" / "t-s0" / "final-grid.png").is_file()
    out = capsys.readouterr().out
    assert "32/64 images" in out and "KID" in out

    assert rehearse(folder, "parts", "--max-points", "1") == 0
    assert len(ledger.load(folder / "parts.jsonl")) == 1
    assert "--max-points reached" in capsys.readouterr().out
    queue = ["--ledger", str(folder / "parts.jsonl"), "--queue", str(folder / "queue.json"), "queue"]
    assert cpu_proxy.main(queue + ["--work", str(folder / "parts")]) == 0
    assert "| t | 0 | dcgan | 24 | 64 | 3 | 1 of 3 rows, checkpoint at 32 images" in capsys.readouterr().out
    assert rehearse(folder, "parts") == 0
    assert "resumed at 32 images" in capsys.readouterr().out
    parts = ledger.load(folder / "parts.jsonl")
    measured = ("images_seen", "steps", "note", "fid", "distance", "kid", "kid_se")
    assert [{k: r[k] for k in measured} for r in parts] == [{k: r[k] for k in measured} for r in whole]

    assert rehearse(folder, "parts") == 0  # nothing is measured twice
    assert "nothing pending" in capsys.readouterr().out and len(ledger.load(folder / "parts.jsonl")) == 3
    assert cpu_proxy.main(queue) == 0
    assert "| t | 0 | dcgan | 24 | 64 | 3 | done |" in capsys.readouterr().out
    table = ledger.table_proxy(parts)
    assert len(table) == 2 + 2 and "| dcgan | 24 | 64 (2.7) | t |" in table[2]
    assert cpu_proxy.main(["--ledger", str(folder / "parts.jsonl"), "plot", str(folder / "kid.png")]) == 0
    assert (folder / "kid.png").stat().st_size > 1000

    # a checkpoint that is not one (another program's file) is refused in one line, and left there
    junk = folder / "junk" / "t-s0" / "checkpoint.pt"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert rehearse(folder, "junk") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not readable as a dogkit checkpoint" in err and "move the folder" in err
    assert junk.read_bytes() == b"not a checkpoint"
    assert cpu_proxy.main(["--ledger", str(folder / "junk.jsonl"), "--queue", str(folder / "queue.json"), "queue",
                           "--work", str(folder / "junk")]) == 0
    assert "| 3 | started, checkpoint unreadable (`run` says why) |" in capsys.readouterr().out

    # the final generator at other truncations: dcgan's own (none) is measured already, 1 is added once
    sweep = ["--ledger", str(folder / "parts.jsonl"), "--queue", str(folder / "queue.json"), "sweep",
             "--truncations", "0,1", "--data", str(folder / "tiny.npz"), "--reference", str(folder / "ref.npz"),
             "--n-images", "6", "--work", str(folder / "parts"), "--device-name", "test CPU"]
    assert cpu_proxy.main(sweep) == 0 and cpu_proxy.main(sweep) == 0
    swept = ledger.load(folder / "parts.jsonl")[3:]
    assert [(r["truncation"], r["images_seen"]) for r in swept] == [(1.0, 64)]
    assert swept[0]["note"].endswith(", truncation 1") and swept[0]["kid"] != parts[1]["kid"]


def test_the_ledger_refuses_an_eval_below_the_stated_n(rehearsal_inputs, capsys):
    folder = rehearsal_inputs
    write_queue(folder / "queue.json", [entry()])
    argv = ["--queue", str(folder / "queue.json"), "run", "--data", str(folder / "tiny.npz"), "--n-images", "100"]
    assert cpu_proxy.main(argv) == 2
    assert "--n-images 100: the results ledger takes rows of 2,048" in capsys.readouterr().err


def test_proxy_verdicts_compare_over_seeds_and_name_ties():
    def arm(*kids, seeds=None):
        seeds = seeds or range(len(kids))
        mean = sum(kids) / len(kids)
        err = (sum((k - mean) ** 2 for k in kids) / (len(kids) - 1) / len(kids)) ** 0.5 if len(kids) > 1 else 0.001
        return {"kid": mean, "kid_err": err, "seeds": len(kids), "by_seed": dict(zip(seeds, kids))}

    best = arm(0.20, 0.18, 0.22)
    assert ledger.verdict(best, best) == "best"
    # the same seeds' offsets: paired, the seed spread cancels (differences 0.010, 0.012, 0.011)
    assert ledger.verdict(arm(0.210, 0.192, 0.231), best) == "worse by 19.1 SE (paired over 3 seeds, worse on 3)"
    # unpaired (other seeds): the means' errors over seeds, a tie
    assert ledger.verdict(arm(0.21, 0.19, 0.23, seeds=[5, 6, 7]), best) == "tie with best (0.6 SE, over seeds)"
    assert ledger.verdict(arm(0.210, 0.192), arm(0.20, 0.18)) == "worse by 11.0 SE (paired over 2 seeds, worse on 2: a hint)"
    # a tie that one seed turns: the count says so beside the error
    assert ledger.verdict(arm(0.21, 0.17, 0.23), best) == "tie with best (0.5 SE, paired over 3 seeds, worse on 2)"
    lucky = arm(0.15)  # one seed, better than any mean: neither best nor judged
    assert ledger.verdict(lucky, best) == "one seed: no verdict"
    assert ledger.best_arm([lucky, best]) is best and ledger.best_arm([lucky]) is lucky
    assert ledger.verdict(lucky, lucky) == "lowest, one seed: no verdict"  # a group of single seeds


def test_the_readme_table_names_each_generator_and_judges_it_over_seeds():
    def row(entry, seed, kid, note="G_ema (decay 0.999 per step from p=0.2)"):
        return {"kind": "proxy", "model": "biggan", "subset": 120, "entry": entry, "seed": seed, "note": note,
                "images_seen": 36000, "passes": 300.0, "settings": "augment flip", "kid": kid, "kid_se": 0.001,
                "fid": 200.0, "distance": 0.4}

    rows = [row("proxy-a", s, k) for s, k in enumerate([0.20, 0.18, 0.22])]
    rows += [row("proxy-a", s, k + 0.01, "extra EMA copy: half-life 10k images") for s, k in enumerate([0.20, 0.18, 0.22])]
    rows += [row("proxy-a", s, k - 0.001, "G_ema (decay 0.999 per step from p=0.2), truncation 0 (none)")
             for s, k in enumerate([0.20, 0.19, 0.21])]
    table = ledger.table_proxy_short(rows)
    assert table[2:] == [  # the truncation's own label survives; the EMA's settings are the page's to say
        "| biggan, 120 crops, 300 passes | a | G_ema, truncation 0 (none) | 3 | 199.0 ± 5.8 | best |",
        "| biggan, 120 crops, 300 passes | a | G_ema | 3 | 200.0 ± 11.5 | "
        "tie with best (0.2 SE, paired over 3 seeds, worse on 2) |",
        "| biggan, 120 crops, 300 passes | a | extra EMA copy (10k) | 3 | 210.0 ± 11.5 | "
        "tie with best (1.9 SE, paired over 3 seeds, worse on 3) |"]


def test_a_curve_means_only_the_seeds_that_reached_its_last_point():
    def row(seed, passes, kid):
        return {"model": "dcgan", "subset": 120, "entry": "proxy-a", "settings": "augment flip", "seed": seed,
                "passes": passes, "kid": kid}

    rows = [row(0, 150, 0.20), row(0, 300, 0.18), row(1, 150, 0.22), row(1, 300, 0.20), row(2, 150, 0.30)]
    rows.append(dict(row(0, 300, 0.5), model="biggan"))  # another group: not in this one
    (arm, (xs, means, ses, done, seeds)), = cpu_proxy.mean_curves(rows, "dcgan", 120).items()
    assert arm == ("proxy-a", "augment flip") and xs == [150, 300] and done == 2
    assert means == pytest.approx([210.0, 190.0]) and ses == pytest.approx([10.0, 10.0])  # seed 2 is not in them
    assert seeds[2] == {150: pytest.approx(300.0)}  # it still has its own faint curve


def test_a_comparison_runs_seed_by_seed():
    a, b = entry(id="a", seeds=[0, 1]), entry(id="b", seeds=[0, 1, 2])
    other = entry(id="c", model="biggan", seeds=[0])
    order = [(e["id"], seed) for e, seed, _, _ in cpu_proxy.runs_of([a, b, other], [])]
    assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("b", 2), ("c", 0)]
