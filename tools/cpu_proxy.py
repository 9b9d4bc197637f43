#!/usr/bin/env python
"""The many-passes regime of a 9-hour Kaggle run, reproduced on the CPU: a model trained with the
kernels' own code on a small class-balanced subset of the photos for hundreds of passes, its
learning curve measured (KID and FID of generated images against the full reference, and d) and
written to the results ledger, one row per point, as the points are reached.

    python tools/cpu_proxy.py queue                       # each entry and seed: done, partial, started or pending
    python tools/cpu_proxy.py run                         # the pending runs, in queue order (resumes)
    python tools/cpu_proxy.py run --only proxy-biggan-flip --max-points 2
    nohup python tools/cpu_proxy.py run > runs/proxy.log 2>&1 &    # in the background
    python tools/cpu_proxy.py sweep --truncations 0,1,2   # the finished runs' final generators, other truncations
    python tools/cpu_proxy.py plot docs/proxy-kid.png     # KID against images shown, per arm
    python tools/ledger.py render                         # the README's CPU-proxy table

The queue (results/cpu-queue.json) has tools/gpu_bench.py's format, with entries of kind "proxy":

    {"id": "proxy-biggan-flip", "kind": "proxy", "question": "...", "model": "biggan",
     "subset": {"size": 120, "breeds": 12, "seed": 0},   # 12 breeds drawn with seed 0, 10 crops each
     "images": 45000, "points": [0.25, 0.5, 0.75, 1], "seeds": [0, 1, 2],
     "options": {"width": 8, "augment": "flip", "ema_extra": "2"}}

A run's schedule (learning-rate decay, EMA start) is a function of the images shown, p = images
shown / images, not of the clock, so a busy machine changes its speed and never its result: the
same entry and seed give the same rows (a test checks a resumed run against an uninterrupted one).
At each point the EMA generator is sampled (--n-images, seed 0, the model's truncation) and scored;
at the last point every extra EMA copy (ema_extra) too. Each point leaves a checkpoint: an
interrupted run (Ctrl-C, SIGTERM, --max-points) resumes there; a point with its rows in the ledger
is never measured twice. These are CPU proxies, labelled so everywhere: a subset's passes stand in
for the 700 passes of a 9-hour run, at a width and batch the CPU can train.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import gpu_bench  # noqa: E402
from gpu_bench import subset_spec, take_subset  # noqa: E402  (the GPU's subset entries share them)
import ledger  # noqa: E402

QUEUE = ROOT / "results" / "cpu-queue.json"
WORK = ROOT / "runs" / "proxy"
POINTS = (1 / 3, 2 / 3, 1.0)  # default learning-curve points, fractions of the entry's images
MIN_EVAL_IMAGES = 2048  # the smallest N a measured row may have (--n-images below it: rehearsals only)
SCORING = ("CPU proxy: {n:,} generated images (seed 0) against {reference} ({rows:,} photos): FID, d, "
           "KID over all pairs with its jackknife standard error; FID by symmetric eigensolves")
FIXED = ("data", "out", "budget", "steps", "device", "seed", "sessions", "snapshots", "reserve")


class Stopped(Exception):
    """--max-points reached: the run's state is saved and it resumes next time."""


# ---- the queue ------------------------------------------------------------------------------
def proxy_config(e, seed=0, out="x"):
    """The TrainConfig of one run of a proxy entry (every option checked; the runner sets FIXED)."""
    from dogkit.core import registry
    from dogkit.core.kernel import with_preset
    from dogkit.core.settings import TrainConfig, with_settings

    options = dict(e.get("options") or {})
    preset = options.pop("preset", None)
    fixed = sorted(set(options) & set(FIXED))
    if fixed:
        raise ValueError(f"options: {', '.join(fixed)} not settable here (the runner sets them; the entry's images "
                         f"and seeds say how long and which)")
    if e["model"] not in registry.MODEL_NAMES:
        raise ValueError(f"model {e['model']!r}: choose from {', '.join(registry.MODEL_NAMES)}")
    entry = registry.get(e["model"])
    cfg = with_settings(with_settings(TrainConfig(), with_preset(entry.settings, entry.presets, preset)), options)
    return dataclasses.replace(cfg, seed=int(seed), device="cpu", out=str(out), reserve=0.0)


def check_proxy(e):
    from dogkit.core import registry
    from dogkit.core.train import check_model_options

    problems = []
    try:
        cfg = proxy_config(e)
        check_model_options(cfg, registry.get(e["model"]).cls(cfg, 1, "cpu"))  # diffaug, lecam: where they apply
    except ValueError as exc:
        problems.append(str(exc))
    try:
        subset_spec(e)
    except ValueError as exc:
        problems.append(str(exc))
    if not (isinstance(e["images"], int) and e["images"] > 0):
        problems.append(f"images {e['images']!r}: a count of images to show, above 0")
    seeds = e["seeds"]
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and s >= 0 for s in seeds)
            and len(set(seeds)) == len(seeds)):
        problems.append(f"seeds {seeds!r}: a list of distinct integers >= 0")
    points = e.get("points", list(POINTS))
    if not (isinstance(points, list) and points and all(isinstance(p, (int, float)) and 0 < p <= 1 for p in points)
            and points == sorted(set(points)) and points[-1] == 1):
        problems.append(f"points {points!r}: increasing fractions of the images in (0, 1], the last one 1")
    if problems:
        raise ValueError("; ".join(problems))


PROXY_KINDS = {"proxy": ({"model", "subset", "images", "points", "seeds", "options"}, {"points", "options"},
                         check_proxy)}


def load_queue(path=QUEUE):
    return gpu_bench.load_queue(path, PROXY_KINDS)


def point_images(e):
    """The images shown at each of the entry's points (whole batches: the step that crosses it)."""
    return [int(round(p * e["images"])) for p in e.get("points", list(POINTS))]


# ---- scoring ---------------------------------------------------------------------------------
class Scorer:
    """The Inception, the reference and KID's reference term, loaded once per process."""

    def __init__(self, reference, weights=None, n_images=MIN_EVAL_IMAGES):
        from dogkit.metrics.fid import psd_sqrt
        from dogkit.metrics.fidelity import kid_real_term
        from dogkit.metrics.inception import load_inception
        from dogkit.metrics.reference import load_reference

        self.path, self.n = str(reference), n_images
        self.ref = load_reference(reference)
        self.model, _ = load_inception(weights)
        self.real_term = kid_real_term(self.ref.features)
        self.root = psd_sqrt(self.ref.sigma)
        self.scoring = SCORING.format(n=n_images, reference=Path(reference).name, rows=len(self.ref.features))

    def __call__(self, images):
        from dogkit.metrics import features as feat
        from dogkit.metrics.fid import frechet_distance, memorization_distance, stats
        from dogkit.metrics.fidelity import kid_all_pairs

        feats = feat.extract(self.model, images, "cpu", batch_size=50)
        mu, sigma = stats(feats)
        fid = frechet_distance(self.ref.mu, self.ref.sigma, mu, sigma, method="eigh", root1=self.root)
        d = memorization_distance(feats, self.ref.features)
        if not (np.isfinite(fid) and np.isfinite(d)):
            raise ValueError(f"the score is not a number (FID {fid}, d {d}): the features are degenerate")
        return {"fid": fid, "distance": d, **kid_all_pairs(self.ref.features, feats, self.real_term)}


def evaluate(tr, G, scorer, truncation=None):
    """G sampled as the kernel samples it (standing batch-norm statistics, the model's truncation
    unless another is given; 0: none), scorer.n images of seed 0, scored."""
    from dogkit.core.sample import generate
    from dogkit.core.train import prepare_for_sampling

    t = tr.cfg.truncation if truncation is None else truncation
    prepare_for_sampling(tr, G)
    images = generate(G, scorer.n, tr.cfg.z_dim, t or None, tr.n_classes, seed=0, device=tr.device)
    return scorer(images)


# ---- one run -----------------------------------------------------------------------------------
def run_key(row):
    return row["entry"], row["seed"], row["images_seen"], row["note"]


def settings_text(e):
    return ", ".join(f"{k} {v}" for k, v in (e.get("options") or {}).items()) or "defaults"


def variants(tr, last):
    """(note, generator) to score at a point: G_ema always, each extra EMA copy at the last point."""
    cfg = tr.given
    how = (f"half-life {cfg.ema_fraction:.0%} of the run from p={cfg.ema_start:g}" if cfg.ema_fraction > 0 else
           f"decay {cfg.ema_decay:g} per step from p={cfg.ema_start:g}")
    out = [(f"G_ema ({how})", tr.ema.G)]
    if last:
        out += [(f"extra EMA copy: half-life {k:g}k images", G) for k, G in zip(tr.ema.kimg, tr.ema.extra)]
    return out


def device_name():
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model or platform.processor() or 'CPU'}, {os.cpu_count()} cores"


def open_run(e, seed, args, data, say):
    """(trainer, its folder, the last point passed) for one run of e: fresh, or resumed from the
    folder's checkpoint."""
    from dogkit.core import registry
    from dogkit.core.runtime import RunError
    from dogkit.core.train import Trainer, follow_plan, load_checkpoint

    folder = Path(args.work) / f"{e['id']}-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = proxy_config(e, seed, folder)
    size, breeds, subset_seed = subset_spec(e)
    sub = take_subset(data, size, breeds, subset_seed)
    log = open(folder / "run.log", "a")
    tr = Trainer(cfg, registry.get(e["model"]).cls, data=sub, log=lambda m: log.write(m + "\n") or log.flush())
    tr.plan.fix(float(e["images"]), float(e["images"]))  # never read by this loop: the schedule is p below
    ckpt, points_file = folder / "checkpoint.pt", folder / "points.json"
    passed = -1  # the last point whose rows and checkpoint are written
    if ckpt.exists():
        try:
            load_checkpoint(tr, str(ckpt), same_session=True)
        except RunError as exc:  # another program's file, a hand edit: never a traceback, never overwritten
            raise gpu_bench.BenchError(f"{exc}; move the folder {folder} away to start this run afresh") from None
        passed = json.loads(points_file.read_text())["passed"] if points_file.exists() else -1
        say(f"{e['id']} seed {seed}: resumed at {tr.images_seen:,} images")
    follow_plan(tr, e["images"], f"the entry's {e['images']:,} images")  # ema_fraction, truncation -1
    with open(folder / "options.json", "w") as fh:
        json.dump({"entry": e, "seed": seed, "config": dataclasses.asdict(cfg)}, fh, indent=1)
    return tr, folder, passed


def row_common(e, seed, cfg, args, scorer):
    return {"kind": "proxy", "model": e["model"], "entry": e["id"], "seed": seed, "subset": subset_spec(e)[0],
            "settings": settings_text(e), "batch_size": cfg.batch_size, "truncation": cfg.truncation or None,
            "device": args.device_name, "scoring": scorer.scoring, "commit": args.commit,
            "command": f"python tools/cpu_proxy.py run --only {e['id']} --seeds {seed}"}


def measured(row, tr, result):
    """A point's row: where the run is (steps, passes, training seconds) and what scored it."""
    return {**row, "steps": tr.step, "passes": round(tr.images_seen / row["subset"], 2),
            "seconds": round(tr.plan.elapsed, 1), "fid": round(result["fid"], 3),
            "distance": round(result["distance"], 4), "kid": round(result["kid"], 6),
            "kid_se": round(result["kid_se"], 6)}


def run_one(e, seed, args, scorer, data, done, say):
    """Train (or resume) one run of entry e and write its missing rows; raises Stopped at --max-points."""
    from dogkit.core.train import (count_step, keep_good_state, log_interval, save_checkpoint, save_fixed_grid,
                                   set_schedule, train_step)

    tr, folder, passed = open_run(e, seed, args, data, say)
    points_file = folder / "points.json"
    cfg, size, targets = tr.cfg, subset_spec(e)[0], point_images(e)
    common = row_common(e, seed, cfg, args, scorer)
    t_last, last_log, steps_at_log, seen_at_log = time.monotonic(), time.monotonic(), tr.step, tr.images_seen
    try:
        for k, target in enumerate(targets):
            last = k == len(targets) - 1
            if k <= passed:
                continue  # measured before this process: the checkpoint is past it
            while tr.images_seen < target:
                set_schedule(tr, tr.images_seen / e["images"])
                train_step(tr)
                count_step(tr)
                if tr.safety.good is None:
                    keep_good_state(tr)
                now = time.monotonic()
                tr.plan.tick(tr.plan.elapsed + now - t_last)
                t_last = now
                if now - last_log >= args.log_every:
                    if log_interval(tr, tr.images_seen / e["images"], tr.step - steps_at_log, now - last_log):
                        keep_good_state(tr)
                    elif tr.safety.rollbacks >= cfg.max_rollbacks:
                        raise gpu_bench.BenchError(f"{e['id']} seed {seed}: NaN storm at step {tr.step}")
                    rate = (tr.images_seen - seen_at_log) / (now - last_log)
                    left = (e["images"] - tr.images_seen) / max(rate, 1e-9)
                    say(f"{e['id']} seed {seed}: {tr.images_seen:,}/{e['images']:,} images "
                        f"({ledger.passes_text(tr.images_seen / size)} passes), {rate:.1f} images/s, "
                        f"training ends in ~{left / 60:.0f} min")
                    last_log, steps_at_log, seen_at_log = now, tr.step, tr.images_seen
            for note, G in variants(tr, last):
                row = {**common, "images_seen": tr.images_seen, "note": note}
                if run_key(row) in done:
                    continue
                t = time.monotonic()
                result = evaluate(tr, G, scorer)
                row = ledger.append(measured(row, tr, result), args.ledger)
                done.add(run_key(row))
                say(f"{e['id']} seed {seed}: {tr.images_seen:,} images ({row['passes']:g} passes), {note}: KID "
                    f"{1e3 * row['kid']:.2f} +- {1e3 * row['kid_se']:.2f} (x1e-3), FID {row['fid']:.1f}, "
                    f"d {row['distance']:.3f} ({time.monotonic() - t:.0f} s to score)")
                t_last = last_log = time.monotonic()  # scoring is neither training time nor its speed
                steps_at_log, seen_at_log = tr.step, tr.images_seen
            save_checkpoint(tr, "checkpoint.pt")
            points_file.write_text(json.dumps({"passed": k, "images_seen": tr.images_seen}))
            if last:
                save_fixed_grid(tr, "final-grid.png")
            if args.points_left is not None:
                args.points_left -= 1
                if args.points_left <= 0:
                    raise Stopped()
    except KeyboardInterrupt:
        save_checkpoint(tr, "checkpoint.pt")
        say(f"{e['id']} seed {seed}: interrupted at {tr.images_seen:,} images; state saved, `run` resumes it")
        raise


def runs_of(entries, rows):
    """[(entry, seed, rows measured, rows wanted)] in the order they run: consecutive entries of the
    same model and subset are one comparison, run seed by seed (every arm's first seed, then every
    arm's second), so that a queue stopped half-way has compared the arms on as many seeds as it could."""
    done = {run_key(r) for r in rows if r["kind"] == "proxy"}
    groups = []
    for e in entries:
        if groups and (groups[-1][0]["model"], groups[-1][0]["subset"]) == (e["model"], e["subset"]):
            groups[-1].append(e)
        else:
            groups.append([e])
    out = []
    for group in groups:
        for k in range(max(len(e["seeds"]) for e in group)):
            for e in group:
                if k < len(e["seeds"]):
                    seed = e["seeds"][k]
                    have = {key for key in done if key[0] == e["id"] and key[1] == seed}
                    out.append((e, seed, len(have), len(point_images(e)) + len(parse_extra(e))))
    return out


def parse_extra(e):
    from dogkit.core.train import parse_ema_extra

    return parse_ema_extra((e.get("options") or {}).get("ema_extra", ""))


def started_at(folder):
    """Where a run's checkpoint is (an interrupted run resumes there), in words; None without one."""
    from dogkit.core.runtime import RunError
    from dogkit.core.train import read_checkpoint

    path = folder / "checkpoint.pt"
    try:
        return f"checkpoint at {read_checkpoint(str(path))['images_seen']:,} images" if path.exists() else None
    except (RunError, KeyError):
        return "checkpoint unreadable (`run` says why)"


# ---- commands ----------------------------------------------------------------------------------
def cmd_queue(args):
    entries = load_queue(args.queue)
    rows = ledger.load(args.ledger) if Path(args.ledger).exists() else []
    rates = {}
    for r in rows:
        if r["kind"] == "proxy" and r["seconds"]:
            rates.setdefault(r["entry"], []).append(r["images_seen"] / r["seconds"])
    print("| entry | seed | model | subset | images | passes | state |\n|---|---|---|---|---|---|---|")
    for e, seed, have, want in runs_of(entries, rows):
        size = subset_spec(e)[0]
        rate = statistics.median(rates[e["id"]]) if e["id"] in rates else None
        at = started_at(Path(args.work) / f"{e['id']}-s{seed}") if have < want else None
        state = ("done" if have >= want else f"{have} of {want} rows" if have else "started" if at else "pending") + (
            f", {at}" if at else "") + (
            f" (~{e['images'] / rate / 60:.0f} min of training at {rate:.0f} images/s)" if rate and have < want else "")
        print(f"| {e['id']} | {seed} | {e['model']} | {size} | {e['images']:,} | {e['images'] / size:.0f} | {state} |")


def cmd_run(args):
    import torch

    entries = load_queue(args.queue)
    wanted = set(filter(None, args.only.split(",")))
    unknown = wanted - {e["id"] for e in entries}
    if unknown:
        raise gpu_bench.BenchError(f"--only: no entry {', '.join(sorted(unknown))} in {args.queue}")
    seeds = {int(s) for s in args.seeds.split(",")} if args.seeds else None
    check_n_images(args)
    rows = ledger.load(args.ledger) if Path(args.ledger).exists() else []
    todo = [(e, s) for e, s, have, want in runs_of(entries, rows)
            if have < want and (not wanted or e["id"] in wanted) and (seeds is None or s in seeds)]
    if not todo:
        print("nothing pending")
        return
    torch.set_num_threads(args.threads or os.cpu_count())
    args.commit = gpu_bench.git_state()  # the code this process runs, whatever is committed while it does
    from dogkit.core.data import load_dataset

    data = load_dataset(args.data, log=lambda m: None)
    scorer = Scorer(args.reference, args.inception_weights, args.n_images)
    done = {run_key(r) for r in rows if r["kind"] == "proxy"}
    args.points_left = args.max_points or None
    say = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    say(f"{len(todo)} runs pending: " + ", ".join(f"{e['id']} seed {s}" for e, s in todo))
    for e, seed in todo:
        run_one(e, seed, args, scorer, data, done, say)


def sweep_note(tr, truncation):
    return f"{variants(tr, False)[0][0]}, truncation {truncation:g}" + (" (none)" if not truncation else "")


def check_n_images(args):
    if args.n_images < MIN_EVAL_IMAGES and Path(args.ledger).resolve() == ledger.LEDGER.resolve():
        raise gpu_bench.BenchError(f"--n-images {args.n_images}: the results ledger takes rows of {MIN_EVAL_IMAGES:,} "
                                   f"images or more (a rehearsal: --ledger elsewhere)")


def cmd_sweep(args):
    """The finished runs' final EMA generators at other truncations (the default one is measured)."""
    import torch

    from dogkit.core.sample import parse_truncations

    check_n_images(args)
    entries = load_queue(args.queue)
    truncations = parse_truncations(args.truncations)  # checked before any generator is loaded
    rows = ledger.load(args.ledger) if Path(args.ledger).exists() else []
    wanted = set(filter(None, args.only.split(",")))
    seeds = {int(s) for s in args.seeds.split(",")} if args.seeds else None
    runs = [(e, s) for e, s, have, want in runs_of(entries, rows) if have >= want
            and (not wanted or e["id"] in wanted) and (seeds is None or s in seeds)
            and (Path(args.work) / f"{e['id']}-s{s}" / "checkpoint.pt").exists()]
    if not runs:
        print("no finished run with its checkpoint to sweep")
        return
    torch.set_num_threads(args.threads or os.cpu_count())
    args.commit = gpu_bench.git_state()
    from dogkit.core.data import load_dataset

    data = load_dataset(args.data, log=lambda m: None)
    scorer = Scorer(args.reference, args.inception_weights, args.n_images)
    done = {run_key(r) for r in rows if r["kind"] == "proxy"}
    say = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    for e, seed in runs:
        tr, _, _ = open_run(e, seed, args, data, say)
        for t in truncations:
            row = {**row_common(e, seed, tr.cfg, args, scorer), "truncation": t or None, "images_seen": tr.images_seen,
                   "note": sweep_note(tr, t),
                   "command": f"python tools/cpu_proxy.py sweep --only {e['id']} --seeds {seed} --truncations {t:g}"}
            if t == (tr.cfg.truncation or 0) or run_key(row) in done:
                continue
            r = evaluate(tr, tr.ema.G, scorer, t)
            row = ledger.append(measured(row, tr, r), args.ledger)
            done.add(run_key(row))
            say(f"{e['id']} seed {seed}: truncation {t:g}: KID {1e3 * row['kid']:.2f} +- {1e3 * row['kid_se']:.2f} "
                f"(x1e-3), FID {row['fid']:.1f}, d {row['distance']:.3f}")


def mean_curves(rows, model, subset):
    """Each arm's learning curve: {(entry, settings): (passes, mean KID x1e3, its SE over seeds, seeds
    in the mean, {seed: {passes: KID x1e3}})}. As in the tables, the mean counts only the seeds
    that reached the arm's last point; a seed still running shows in its own curve alone."""
    curves = {}
    for r in rows:
        if (r["model"], r["subset"]) == (model, subset):
            curves.setdefault((r["entry"], r["settings"]), {}).setdefault(r["seed"], {})[r["passes"]] = 1e3 * r["kid"]
    out = {}
    for arm, seeds in curves.items():
        last = max(x for curve in seeds.values() for x in curve)
        done = [curve for curve in seeds.values() if last in curve]
        xs = sorted({x for curve in done for x in curve})
        pts = [[curve[x] for curve in done if x in curve] for x in xs]
        out[arm] = (xs, [statistics.mean(p) for p in pts],
                    [statistics.stdev(p) / math.sqrt(len(p)) if len(p) > 1 else 0.0 for p in pts], len(done), seeds)
    return out


def cmd_plot(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ledger.load(args.ledger) if r["kind"] == "proxy" and r["note"].startswith("G_ema")
            and ", truncation " not in r["note"]]  # the learning curves at the model's own truncation
    if not rows:
        raise gpu_bench.BenchError(f"{args.ledger}: no proxy rows to plot yet")
    groups = sorted({(r["model"], r["subset"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, (model, subset) in zip(axes[0], groups):
        for (entry, _), (xs, means, ses, done, seeds) in sorted(mean_curves(rows, model, subset).items()):
            line = ax.errorbar(xs, means, yerr=ses, marker="o", capsize=3, linewidth=2,
                               label=f"{entry} ({done} seed{'s' if done > 1 else ''})")
            for _, curve in sorted(seeds.items()):  # each seed faint (one still running too): the pairing shows
                ax.plot(*zip(*sorted(curve.items())), color=line[0].get_color(), alpha=0.3, linewidth=0.8, marker=".")
        ax.set_xlabel(f"passes over the {subset:,} crops (images shown / {subset:,})")
        ax.set_ylabel("KID x 1e3 (lower is better)")
        ax.set_title(f"CPU proxy: {model}, {subset:,} crops\nmean +- SE over seeds; faint: each seed", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(f"wrote {args.out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ledger", type=Path, default=ledger.LEDGER, help="results ledger (default %(default)s)")
    parser.add_argument("--queue", type=Path, default=QUEUE, help="proxy queue (default %(default)s)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("queue", help="each entry and seed: done, partial, started (a checkpoint, no row yet) "
                                     "or pending, with its estimate")
    q.add_argument("--work", default=str(WORK), help="run folders: checkpoints, logs (default %(default)s)")
    r = sub.add_parser("run", help="train and score the pending runs in queue order (resumes a half-done run)")
    w = sub.add_parser("sweep", help="the finished runs' final EMA generators at other truncations")
    w.add_argument("--truncations", default="0,1,2", help="comma-separated, 0: none (default %(default)s)")
    for q in (r, w):
        q.add_argument("--data", default="data/dogs64.npz", help="training cache (dogkit clean-data)")
        q.add_argument("--reference", default="data/ref.npz", help="dogkit reference file (default %(default)s)")
        q.add_argument("--inception-weights", default=None)
        q.add_argument("--only", default="", help="comma-separated entry ids (default: every one)")
        q.add_argument("--seeds", default="", help="comma-separated seeds of those entries (default: all)")
        q.add_argument("--n-images", type=int, default=MIN_EVAL_IMAGES,
                       help="images scored per point (default %(default)s)")
        q.add_argument("--threads", type=int, default=0, help="torch threads (default: every core)")
        q.add_argument("--work", default=str(WORK), help="run folders: checkpoints, logs (default %(default)s)")
        q.add_argument("--device-name", default=device_name(), help="the ledger's device (default: this CPU)")
    r.add_argument("--max-points", type=int, default=0, help="stop after this many points (0: run to the end)")
    r.add_argument("--log-every", type=float, default=60.0, help="seconds between progress lines")
    p = sub.add_parser("plot", help="KID against passes, per arm (PNG)")
    p.add_argument("out")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill saves the run like Ctrl-C
    try:
        {"queue": cmd_queue, "run": cmd_run, "sweep": cmd_sweep, "plot": cmd_plot}[args.cmd](args)
    except Stopped:
        print("--max-points reached; `run` again resumes", flush=True)
    except KeyboardInterrupt:
        return 130
    except (gpu_bench.BenchError, ledger.LedgerError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
