#!/usr/bin/env python
"""An experiment queue for a short-lived GPU (a rented hour, a notebook session): the committed
queue (results/queue.json) trained with the kernels' own code on the GPU, an FID for every run
computed there, the exact score at home on the CPU where a result decides something. Every
figure becomes a ledger row. Three steps:

  at home, before:  python tools/gpu_bench.py pack --data data/dogs64.npz --reference data/ref.npz
                      .devpack/: the FID Inception in int8 (22 MB), the reference's mean and covariance
                      (float64 / float16 upper triangle, 4.2 MB; FID moves by < 0.001), the commit;
                      with --carry-limit MiB, checks that what goes to the GPU fits.
  on the GPU:       python tools/gpu_bench.py run --data data/dogs64.npz --out OUT [--cap SECONDS]
                      GPU-only tests first (tests/gpu, < 1 minute), then the queue's next entries that
                      fit in --cap seconds (its own start-up included; an entry that cannot finish in
                      time is not started; no cap: every pending entry). Each train entry runs the
                      generated kernel (kernels/MODEL.py) with snapshots; every point's EMA generator
                      is exported in fp16, sampled (10,000 images) and scored (FID against the carried
                      mean and covariance; d is left to the CPU). OUT gets results.jsonl (ledger rows),
                      run.log and returned.tar.NNN (generators, logs, grids; --part-mib, --return-mib).
  at home, after:   python tools/gpu_bench.py ingest RETURNED_DIR
                      the rows into results/ledger.jsonl, the files into runs/gpu/STAMP/
                    python tools/gpu_bench.py score runs/gpu/STAMP --reference data/ref.npz
                      the exact `dogkit score` of each returned generator (10,000 images, full
                      reference: FID, d, MiFID), a ledger row each, with the GPU FID's error beside it;
                      resumable (a generator already scored is skipped)
                    python tools/gpu_bench.py queue
                      each entry: pending with its estimate, or the ledger rows that measured it
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import ledger  # noqa: E402

QUEUE = ROOT / "results" / "queue.json"
PACK = ROOT / ".devpack"
WORK = ROOT / ".devwork"
RUNS = ROOT / "runs" / "gpu"
MIB = 2**20
WEIGHTS_FILE, STATS_FILE, PACK_FILE = "inception-int8.pth", "reference-stats.npz", "pack.json"
# Seconds, for planning what fits: a kernel's start before its own clock (imports; data decoding is
# inside its budget), a throughput configuration's overhead (model, warm-up, capture), the end of
# the command (tar, copy), the score timing. Scoring a point (export, sample, features) per image,
# until this run has measured it: the H100 computed features at 2,370 images/s.
KERNEL_START_S, PROBE_OVERHEAD_S, RETURN_S, TIMING_S, PROFILE_S = 10.0, 6.0, 10.0, 60.0, 20.0
SCORE_S_PER_IMAGE = {"cuda": 0.001, "cpu": 0.25}  # sampling + features, until one is measured
FID_ONLY = ledger.FID_ONLY + ": int8 Inception on {device}, {n:,} images, reference mean/covariance (d on the CPU)"
EXACT = "exact: dogkit score on the CPU, {n:,} images, {reference} ({rows:,} photos)"


class BenchError(RuntimeError):
    """One line for the user: what is wrong and what to do."""


# ---- the queue ------------------------------------------------------------------------------
# A queue file holds entries of the kinds its tool runs; each kind: (allowed keys, optional keys,
# a check that raises ValueError/KeyError/TypeError naming what is wrong). tools/cpu_proxy.py
# reads the same format with its own kind (PROXY_KINDS there).
COMMON = {"id", "kind", "question"}
TOP_KEYS = {"format", "about", "entries"}


def check_train(e):
    from dogkit.checkpoints import BN_STATS

    from dogkit.core.sample import truncation_problem

    problems = [f"bn {b!r}: choose from {', '.join(BN_STATS[1:])} (standing is always scored)"
                for b in e.get("bn", []) if b not in BN_STATS[1:]]
    problems += [f"truncations: {truncation_problem(t) or 'null: write 0 for none'}"
                 for t in e.get("truncations", []) if t is None or truncation_problem(t)]
    try:
        train_config(e, data="x", out="x")
    except (ValueError, KeyError, TypeError) as exc:
        problems.insert(0, str(exc).strip("'\""))
    if "subset" in e:
        try:
            subset_spec(e)
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))


KINDS = {"throughput": ({"models", "batch_sizes", "precisions", "memory_formats", "seconds", "profile"}, {"profile"},
                        lambda e: probe_configs(e)),
         "train": ({"model", "budget", "snapshots", "options", "bn", "subset", "truncations"},  # bn, truncations:
                   {"snapshots", "options", "bn", "subset", "truncations"}, check_train),  # the final point also
         # with these batch-norm statistics, at these truncations (its own is always scored); subset: of the photos
         "score-timing": (set(), set(), lambda e: None)}


def load_queue(path=QUEUE, kinds=None) -> list[dict]:
    """The queue's entries, in order; BenchError listing every problem (unknown keys, a kind, a
    model or an option that does not exist, a duplicate id). kinds: the kinds this tool runs
    (default KINDS, the GPU's)."""
    kinds = KINDS if kinds is None else kinds
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"{path}: not a readable queue ({exc})") from None
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or doc.get("format") != "dogkit-queue-1" or not isinstance(entries, list) \
            or set(doc) - TOP_KEYS:
        raise BenchError(f"{path}: expected {{\"format\": \"dogkit-queue-1\", \"about\": ..., \"entries\": [...]}}")
    problems, seen = [], set()
    for i, e in enumerate(entries):
        where = f"entry {i} ({e.get('id', '?')})" if isinstance(e, dict) else f"entry {i}"
        problems += [f"{where}: {p}" for p in entry_problems(e, kinds)]
        if isinstance(e, dict) and e.get("id") in seen:
            problems.append(f"{where}: id used twice")
        seen.add(e.get("id") if isinstance(e, dict) else None)
    if problems:
        raise BenchError(f"{path}: " + "; ".join(problems))
    return entries


def entry_problems(e, kinds=None) -> list[str]:
    kinds = KINDS if kinds is None else kinds
    if not isinstance(e, dict):
        return ["not an object"]
    kind = e.get("kind")
    if kind not in kinds:
        return [f"kind {kind!r}: choose from {', '.join(kinds)}"]
    keys, optional, check = kinds[kind]
    allowed = COMMON | keys
    problems = [f"unknown key {k!r}" for k in e if k not in allowed]
    problems += [f"{k} is required" for k in sorted(allowed - optional) if k not in e]
    if problems:
        return problems
    try:
        check(e)
    except (ValueError, KeyError, TypeError) as exc:
        problems.append(str(exc).strip("'\""))
    return problems


def kernel_flags(options: dict) -> list[str]:
    """{"batch_size": 128, "precision": "bf16"} -> ["--batch-size", "128", "--precision", "bf16"]."""
    return [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def train_config(e, data, out, device="auto"):
    """The TrainConfig the kernel will run for a train entry (checks every option)."""
    from dogkit.core import kernel, registry

    entry = registry.get(e["model"])
    options = dict(e.get("options") or {})
    defaults = vars(kernel.parse_args([]))
    unknown = sorted(set(options) - set(defaults) - {"budget", "snapshots"})
    fixed = {"data", "out", "budget", "snapshots", "device", "gpus", "resume", "sessions"} & set(options)
    if unknown or fixed:
        raise ValueError(f"options: {', '.join(unknown + sorted(fixed))} not settable here (the bench sets "
                         f"data, out, budget, snapshots, device; one GPU, one session, no resume)")
    opts = dict(defaults, **options, data=data, out=out, budget=e["budget"], device=device,
                snapshots=",".join(f"{p:g}" for p in e.get("snapshots", [])))
    return kernel.config_from_options(entry.settings, opts, presets=entry.presets, model=entry.name)


def probe_configs(e):
    """[(model, batch size, precision, memory format)] of a throughput entry, checked."""
    from dogkit.core import registry
    from dogkit.core.settings import MEMORY_FORMATS, PRECISIONS

    bad = [m for m in e["models"] + e.get("profile", []) if m not in registry.MODEL_NAMES]
    bad += [p for p in e["precisions"] if p not in PRECISIONS]
    bad += [f for f in e["memory_formats"] if f not in MEMORY_FORMATS]
    bad += [str(b) for b in e["batch_sizes"] if not (isinstance(b, int) and b > 0)]
    if bad or not e["seconds"] > 0:
        raise ValueError(f"not a model, precision, memory format or batch size: {', '.join(bad) or 'seconds'}")
    return [(m, b, p, f) for m in e["models"] for p in e["precisions"] for f in e["memory_formats"]
            for b in e["batch_sizes"]]


def estimate(e, score_s_per_image, n_images) -> float:
    """Seconds an entry needs on the GPU, from its budget and the overheads above."""
    from dogkit.core.settings import parse_budget

    if e["kind"] == "throughput":
        return len(probe_configs(e)) * (e["seconds"] + PROBE_OVERHEAD_S) + len(e.get("profile", [])) * PROFILE_S
    if e["kind"] == "score-timing":
        return TIMING_S
    points = len(e.get("snapshots", [])) + 1 + len(extra_emas(e)) + len(e.get("bn", []))  # the last two: at the end
    return parse_budget(e["budget"]) + KERNEL_START_S + points * score_s_per_image * n_images


def extra_emas(e) -> list[float]:
    """The half-lives (kimg) of a train entry's extra EMA copies (its ema_extra option)."""
    from dogkit.core.train import parse_ema_extra

    return parse_ema_extra((e.get("options") or {}).get("ema_extra", ""))


def measured_entries(rows) -> dict:
    """{entry id: [ledger line numbers]} of the rows that measured queue entries."""
    out = {}
    for i, r in enumerate(rows, 1):
        if r.get("entry"):
            out.setdefault(r["entry"], []).append(i)
    return out


def cmd_queue(args):
    entries = load_queue(args.queue)
    done = measured_entries(ledger.load(args.ledger))
    print("| # | entry | kind | question | state |\n|---|---|---|---|---|")
    for i, e in enumerate(entries, 1):
        lines = done.get(e["id"])
        state = (f"measured: {args.ledger.name} lines {', '.join(map(str, lines))}" if lines else
                 f"pending (~{estimate(e, SCORE_S_PER_IMAGE['cuda'], 10_000):.0f} s on a GPU)")
        print(f"| {i} | {e['id']} | {e['kind']} | {e['question']} | {state} |")


# ---- the subset: the many-passes regime in a short run ---------------------------------------
# An entry's "subset" trains on a class-balanced part of the photos (tools/cpu_proxy.py's every
# entry; a GPU train entry's optionally), so that a short run shows each crop as often as a long
# one shows the whole data.
def take_subset(data, size, breeds=0, seed=0):
    """size crops of data, class-balanced: `breeds` breeds drawn with seed (0: every breed), the same
    number of crops from each, drawn with seed; labels renumbered 0..breeds-1 in the breeds' order."""
    labels = np.asarray(data["labels"])
    all_breeds = sorted(set(labels.tolist()))
    k = breeds or len(all_breeds)
    if k > len(all_breeds):
        raise BenchError(f"subset: {k} breeds asked, the data has {len(all_breeds)}")
    if size % k:
        raise BenchError(f"subset: {size} crops do not split evenly over {k} breeds")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(all_breeds, k, replace=False).tolist()) if breeds else all_breeds
    idx, new_labels = [], []
    for j, b in enumerate(chosen):
        pool = np.flatnonzero(labels == b)
        if len(pool) < size // k:
            raise BenchError(f"subset: breed {data['breeds'][b]} has {len(pool)} crops, {size // k} asked")
        idx += sorted(rng.choice(pool, size // k, replace=False).tolist())
        new_labels += [j] * (size // k)
    names = data.get("names")
    return {"images": np.asarray(data["images"])[idx], "labels": np.array(new_labels),
            "breeds": [data["breeds"][b] for b in chosen],
            "names": [names[i] for i in idx] if names is not None else [str(i) for i in idx]}


def subset_spec(e):
    s = e["subset"]
    if not isinstance(s, dict) or set(s) - {"size", "breeds", "seed"} or "size" not in s:
        raise ValueError('subset: {"size": CROPS, "breeds": BREEDS (0: all), "seed": SEED}')
    size, breeds, seed = s["size"], s.get("breeds", 0), s.get("seed", 0)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (size, breeds, seed)) or size < 1 \
            or breeds < 0 or seed < 0 or (breeds and size % breeds):
        raise ValueError(f"subset {s}: size >= 1, breeds >= 0 dividing it, seed >= 0 (integers)")
    return size, breeds, seed


# ---- pack: what goes to the GPU ---------------------------------------------------------------
def tree_bytes() -> int:
    """Bytes of the working tree as a copy to the GPU takes it: tracked files and untracked ones
    git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    return sum((ROOT / n).stat().st_size for n in names if n and (ROOT / n).is_file())


def git_state() -> str:
    commit = ledger.git_commit()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return commit + ("-dirty" if dirty else "")


def pack(reference, out, weights=None):
    """Write the int8 Inception, the reference's mean and covariance and pack.json into out."""
    from dogkit.metrics.inception import resolve_weights, save_state_dict
    from dogkit.metrics.reference import load_reference

    ref = load_reference(reference)
    out.mkdir(parents=True, exist_ok=True)
    state, source = resolve_weights(weights)
    save_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, out / WEIGHTS_FILE, "int8")
    iu = np.triu_indices(ref.mu.shape[0])
    with open(out / (STATS_FILE + ".tmp"), "wb") as fh:
        # float16 halves the carry's largest file but one; its FID error, measured against the float64
        # covariance on five feature sets of FID 1.4 to 71 (README), is below 0.0004
        np.savez(fh, mu=ref.mu.astype(np.float64), sigma_triu=ref.sigma[iu].astype(np.float16),
                 rows=np.int64(len(ref.features)))
    os.replace(out / (STATS_FILE + ".tmp"), out / STATS_FILE)
    meta = {"commit": git_state(), "reference": str(reference), "reference_rows": int(len(ref.features)),
            "weights": source, "date": datetime.date.today().isoformat()}
    (out / PACK_FILE).write_text(json.dumps(meta, indent=1))
    return meta


def cmd_pack(args):
    data = Path(args.data)
    if not data.is_file():
        raise BenchError(f"{data}: no training cache (dogkit clean-data ../shared/data/stanford-dogs-crops -o {data})")
    meta = pack(Path(args.reference), Path(args.out), args.inception_weights)
    sizes = {"working tree": tree_bytes(), str(data): data.stat().st_size,
             **{f"{args.out}/{f.name}": f.stat().st_size for f in sorted(Path(args.out).iterdir())}}
    total = sum(sizes.values())
    limit = f" (limit {args.carry_limit:g})" if args.carry_limit else ""
    print("| goes to the GPU | MiB |\n|---|---|")
    for name, size in sizes.items():
        print(f"| {name} | {size / MIB:.1f} |")
    print(f"| **total**{limit} | **{total / MIB:.1f}** |")
    if args.carry_limit and total > args.carry_limit * MIB:
        raise BenchError(f"what goes to the GPU is {total / MIB:.1f} MiB, over --carry-limit {args.carry_limit:g} MiB")
    if meta["commit"].endswith("-dirty"):
        print("note: the working tree has uncommitted changes; commit first so the ledger rows name the code")
    print(f"\non the GPU, with the working tree, {data} and {args.out}/ copied there:\n"
          f"  python tools/gpu_bench.py run --data {data} --out OUT --cap SECONDS")


# ---- run: on the GPU -------------------------------------------------------------------------------
class Run:
    """The state of one `run`: its clock, its log, the rows so far and the files to bring back."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.t0 = args.t0  # main() was called: torch's import, the tests and the start-up all count
        self.deadline = self.t0 + (args.cap or float("inf"))
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work)
        self.staging = self.work / "returned"
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        self.logfile = open(self.out / "run.log", "a")
        self.rows = []
        self.score_s_per_image = None

    def left(self):
        return self.deadline - time.monotonic()

    def log(self, message):
        line = f"[{time.monotonic() - self.t0:6.1f} s] {message}"
        print(line, flush=True)
        self.logfile.write(line + "\n")
        self.logfile.flush()

    def emit(self, row):
        row = ledger.check_row({**self.common, **row})
        self.rows.append(row)
        with open(self.out / "results.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.log("row: " + json.dumps({k: v for k, v in row.items() if v is not None and k not in self.common}))


def preflight(run):
    """Device, pack and data checks, then the GPU-only tests; what they say goes into run.log."""
    import torch

    from dogkit.core.data import DataError, load_dataset

    args = run.args
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    missing = [f for f in (WEIGHTS_FILE, STATS_FILE, PACK_FILE) if not (Path(args.pack) / f).is_file()]
    if missing:
        raise BenchError(f"{args.pack}: {', '.join(missing)} missing (python tools/gpu_bench.py pack, then carry it)")
    meta = json.loads((Path(args.pack) / PACK_FILE).read_text())
    run.log(f"device {name}; torch {torch.__version__}; python {sys.version.split()[0]}; code {meta['commit']}")
    run.common = {"device": name, "torch": torch.__version__.split("+")[0], "commit": meta["commit"],
                  "date": datetime.date.today().isoformat()}
    run.device = device
    try:
        run.data = load_dataset(args.data, log=run.log)  # the cache decodes here (AVIF needs Pillow >= 11.3)
    except DataError as exc:  # seconds into the run: an AVIF cache this Pillow cannot read
        fix = ("; run again at once carrying a WebP cache (here: dogkit clean-data ../shared/data/stanford-dogs-crops"
               " -o data/dogs64-webp.npz --codec webp)" if "cannot decode" in str(exc) else "")
        raise BenchError(f"{exc}{fix}") from None
    if not args.skip_tests:
        t = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"],
                              cwd=ROOT, capture_output=True, text=True, timeout=max(10.0, min(120.0, run.left())))
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        run.log(f"GPU-only tests (exit {proc.returncode}, {time.monotonic() - t:.0f} s):\n    " + "\n    ".join(tail))
    return device


def run_throughput(run, e):
    import torch

    import bench_train
    from dogkit.core import registry

    for model, batch, precision, fmt in probe_configs(e):
        if run.left() < e["seconds"] + PROBE_OVERHEAD_S + RETURN_S:
            run.log(f"{e['id']}: out of time before {model} batch {batch} {precision} {fmt}")
            return
        try:
            steps, _, bs, ran, peak = bench_train.measure(registry.get(model), run.data, e["seconds"], batch,
                                                          str(run.device), precision, fmt)
        except Exception as exc:  # an out-of-memory batch: a row that says so
            run.log(f"{e['id']}: {model} batch {batch} {precision} {fmt} failed ({type(exc).__name__}: {exc})")
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        mode = "eager" if run.device.type == "cuda" else "eager (no CUDA)"
        run.emit({"kind": "throughput", "model": model, "settings": f"{mode}, {ran}, {fmt}", "batch_size": bs,
                  "steps_per_s": round(steps, 2), "entry": e["id"],
                  "note": f"{e['seconds']:g} s measured" + (f"; peak {peak:.1f} GiB" if peak else ""),
                  "command": f"python tools/gpu_bench.py run (queue entry {e['id']}: "
                             f"bench_train.measure {model} {batch} {precision} {fmt})"})
    for model in e.get("profile", []):  # where a step's time goes: a table among the returned files
        if run.left() < PROFILE_S + RETURN_S:
            run.log(f"{e['id']}: out of time before profiling {model}")
            return
        t = time.monotonic()
        # on the CPU a session is a rehearsal: the table is made, its times mean nothing, so 2 steps after 1
        steps, warmup = (20, 5) if run.device.type == "cuda" else (2, 1)
        table = bench_train.profile(registry.get(model), run.data, str(run.device), steps=steps, warmup=warmup)
        name = f"{e['id']}-profile-{model}.txt"
        (run.staging / name).write_text(f"{model}, its defaults, {steps} eager steps after {warmup}, on "
                                        f"{run.common['device']} (torch.profiler; code {run.common['commit']})\n"
                                        f"{table}\n")
        run.log(f"{e['id']}: profiled {model} in {time.monotonic() - t:.0f} s: {name}")


def kernel_command(e, data, out, device):
    snaps = ",".join(f"{p:g}" for p in e.get("snapshots", []))
    cmd = ["python", f"kernels/{e['model']}.py", "--data", str(data), "--budget", e["budget"], "--out", str(out),
           "--gpus", "1", "--log-every", "10"] + (["--snapshots", snaps] if snaps else [])
    return cmd + kernel_flags(e.get("options") or {}) + (["--device", device] if device != "auto" else [])


def run_train(run, e):
    """The generated kernel, as a user runs it; then every point of the run scored."""
    out = run.work / e["id"]
    shutil.rmtree(out, ignore_errors=True)
    cmd = kernel_command(e, subset_file(run, e) if "subset" in e else run.args.data, out, run.args.device)
    run.log(f"{e['id']}: {' '.join(cmd)}")
    with open(run.out / "run.log", "a") as fh:
        proc = subprocess.Popen([sys.executable] + cmd[1:], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=max(1.0, run.left() - RETURN_S))
        except subprocess.TimeoutExpired:  # never past the cap: stopped with a checkpoint (SIGTERM)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            run.log(f"{e['id']}: stopped at the cap")
    run.log(f"{e['id']}: kernel exit {proc.returncode}")
    points = sorted(out.glob("snapshot-p*.pt"), key=lambda p: float(p.stem.split("-p")[1]))
    if (out / "checkpoint.pt").exists():  # the end's checkpoint, or the last periodic one of a stopped run
        points.append(out / "checkpoint.pt")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] if (
        out / "log.jsonl").exists() else []
    rates = [r["steps_per_s"] for r in log[1:]] or [r["steps_per_s"] for r in log]
    for name in ("log.jsonl", "samples.png"):
        if (out / name).exists():
            shutil.copy(out / name, run.staging / f"{e['id']}-{name}")
    for path in points:
        if run.left() < RETURN_S + (run.score_s_per_image or 0) * run.args.n_images:
            run.log(f"{e['id']}: no time left to score {path.name}")
            break
        rate = statistics.median(rates) if rates else None
        score_point(run, e, path, rate, " ".join(cmd), proc.returncode)
        if path.name != "checkpoint.pt":
            continue
        # at the end only: the extra EMA copies (ema_extra), other batch-norm statistics (bn), other truncations
        variants = ([dict(which=(i, kimg)) for i, kimg in enumerate(extra_emas(e))] + [dict(bn=b) for b in e.get("bn", [])]
                    + [dict(truncation=float(t)) for t in e.get("truncations", [])])
        for variant in variants:
            if run.left() < RETURN_S + (run.score_s_per_image or 0) * run.args.n_images:
                run.log(f"{e['id']}: no time left to score {len(variants)} variants of the end's generator")
                break
            score_point(run, e, path, rate, " ".join(cmd), proc.returncode, **variant)


def subset_file(run, e):
    """The entry's subset of --data as a cache the kernel reads (lossless: the same pixels)."""
    from dogkit.core.data import load_dataset, save_cache

    size, breeds, seed = subset_spec(e)
    sub = take_subset(load_dataset(str(run.args.data), log=lambda m: None), size, breeds, seed)
    path = run.work / f"{e['id']}-subset.npz"
    save_cache(path, dict(sub, settings={"subset": e["subset"], "of": str(run.args.data)}, summary={}),
               codec="webp-lossless")
    run.log(f"{e['id']}: {size:,} crops of {len(sub['breeds'])} breeds (subset seed {seed}) in {path.name}")
    return path


def point_name(path, exit_code):
    if path.name != "checkpoint.pt":
        return path.stem.replace("snapshot-", "")
    return "final" if exit_code == 0 else "stopped"


def score_point(run, e, path, steps_per_s, command, exit_code, which=None, bn="standing", truncation=None):
    """Export the point's EMA generator (fp16), sample it, FID against the carried statistics.
    The end's checkpoint of a kernel that exited non-zero is scored as "stopped", with its exit.
    which=(index, kimg): the checkpoint's extra EMA copy of that index instead; bn: its batch-norm
    statistics (dogkit.checkpoints.BN_STATS); truncation: another than the run's (0: none)."""
    from dogkit.checkpoints import export_generator, load_generator, sample_images
    from dogkit.metrics import features as feat
    from dogkit.metrics.fid import frechet_distance, stats

    t = time.monotonic()
    point = point_name(path, exit_code)
    copy = ("" if which is None else f"-ema{which[1]:g}k") + ("" if bn == "standing" else f"-bn{bn}")
    gen_path = run.staging / f"{e['id']}-{point}{copy}.pt"
    gen = export_generator(path, gen_path, str(run.device), which=None if which is None else which[0], bn=bn,
                           entry=e["id"], point=point)
    cfg = gen["config"]
    generator = load_generator(gen_path, str(run.device))  # what comes back, fp16 weights and all
    t_sample = cfg["truncation"] if truncation is None else truncation
    images = sample_images(generator, t_sample, seed=0, n=run.args.n_images)
    feats = feat.extract(run.inception, images, run.device, batch_size=500 if run.device.type == "cuda" else 50)
    mu, sigma = stats(feats)
    fid = frechet_distance(mu, sigma, run.ref_mu, run.ref_sigma, device=run.device)
    run.score_s_per_image = (time.monotonic() - t) / run.args.n_images
    where = {"final": "", "stopped": f", stopped at {gen['elapsed'] / 60:.1f} min (kernel exit {exit_code})"}.get(
        point, f", snapshot at p={point[1:]} ({gen['elapsed'] / 60:.1f} min)")
    if which is not None:
        where += f", extra EMA copy: half-life {which[1]:g}k images"
    if bn != "standing":
        where += f", batch-norm statistics: {bn}"
    if truncation is not None:
        where += f", sampled at truncation {truncation:g}" + (" (none)" if not truncation else "")
    run.emit({"kind": "run", "model": e["model"], "budget": e["budget"], "entry": e["id"],
              "settings": settings_text(e) + where, "steps": gen["step"], "images_seen": gen["images_seen"],
              "steps_per_s": round(steps_per_s, 2) if steps_per_s else None, "batch_size": cfg["batch_size"],
              "truncation": t_sample or None, "seed": cfg["seed"], "fid": round(float(fid), 3),
              **subset_keys(e, gen["images_seen"]),
              "scoring": FID_ONLY.format(device=run.common["device"], n=run.args.n_images),
              "command": command, "note": f"generator {gen_path.name}"})


def settings_text(e):
    opts = e.get("options") or {}
    text = ", ".join(f"{k} {v}" for k, v in opts.items()) or "defaults"
    if "subset" not in e:
        return text
    size, breeds, seed = subset_spec(e)
    return f"{text}; on {size:,} crops ({breeds or 'all'} breeds, subset seed {seed})"


def subset_keys(e, images_seen):
    """A subset run's ledger keys: its crops and the passes over them."""
    if "subset" not in e:
        return {}
    size = subset_spec(e)[0]
    return {"subset": size, "passes": round(images_seen / size, 2) if images_seen else None}


def run_score_timing(run, e):
    """`dogkit score` of 10,000 images, end to end in a fresh process, on this machine: the
    images are training crops, the reference has the real size (12,000 rows) with the carried
    statistics; only the seconds count."""
    from dogkit.core.sample import write_zip

    n = min(10_000, len(run.data["images"]))
    zip_path = write_zip(run.data["images"][:n], run.work / "timing.zip")
    ref = run.work / "timing-ref.npz"
    rng = np.random.default_rng(0)
    np.savez(ref, mu=run.ref_mu, sigma=run.ref_sigma, features=rng.random((run.ref_rows, 2048), dtype=np.float32),
             names=np.array([f"r{i}" for i in range(run.ref_rows)]), provenance=json.dumps({"source": "timing"}))
    t = time.monotonic()
    cmd = [sys.executable, "-m", "dogkit", "score", str(zip_path), "--reference", str(ref), "--json",
           "--inception-weights", str(Path(run.args.pack) / WEIGHTS_FILE), "--batch-size", "500"]
    if n < 10_000:
        cmd.append("--no-strict")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10.0, run.left() - RETURN_S))
    wall = time.monotonic() - t
    if proc.returncode:
        run.log(f"{e['id']}: dogkit score failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        return
    reported = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
    run.emit({"kind": "timing", "settings": f"dogkit score of {n:,} images, a fresh process (start-up, rules, "
                                            f"decoding, features, FID, d)", "seconds": round(wall, 2),
              "entry": e["id"], "note": f"it reports {reported} s (from its own start); weights int8",
              "command": "python -m dogkit score IMAGES.zip --reference REF --json --inception-weights "
                         ".devpack/inception-int8.pth --batch-size 500"})


def load_scoring(run):
    import torch

    from dogkit.metrics.inception import load_inception

    run.inception, _ = load_inception(Path(run.args.pack) / WEIGHTS_FILE)
    run.ref_mu, run.ref_sigma, run.ref_rows = packed_stats(Path(run.args.pack) / STATS_FILE)
    torch.backends.cuda.matmul.allow_tf32 = False


def packed_stats(path):
    """The reference's mean (float64), full covariance (float64, from its float16 upper triangle)
    and row count, as pack() wrote them."""
    with np.load(path) as z:
        mu = z["mu"]
        n = mu.shape[0]
        sigma = np.zeros((n, n))
        sigma[np.triu_indices(n)] = z["sigma_triu"].astype(np.float64)
        return mu, sigma + np.triu(sigma, 1).T, int(z["rows"])


def return_files(run):
    """The staged files into OUT as returned.tar.NNN parts: logs and grids first, then the
    generators (finals before snapshots) while they fit --return-mib (0: all of them), in parts of
    --part-mib."""
    limit = run.args.return_mib * MIB if run.args.return_mib else float("inf")
    part = int(run.args.part_mib * MIB)
    files = sorted(run.staging.iterdir(), key=lambda f: (f.suffix == ".pt", "-p" in f.name, "-ema" in f.name, f.name))
    buf, kept, dropped = io.BytesIO(), [], []
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in files:
            if buf.tell() + f.stat().st_size + 10_240 > limit:
                dropped.append(f.name)
                continue
            tar.add(f, arcname=f.name)
            kept.append(f.name)
    data = buf.getvalue()
    for k in range(0, len(data), part):
        (run.out / f"returned.tar.{k // part:03d}").write_bytes(data[k:k + part])
    run.log(f"returned: {len(kept)} files in {len(data) / 2**20:.1f} MiB"
            + (f"; left behind for lack of room: {', '.join(dropped)}" if dropped else ""))


def cmd_run(args):
    run = Run(args)
    done = measured_entries(ledger.load(args.ledger))
    wanted = set(args.only.split(",")) if args.only else None  # --only: these, measured or not
    entries = [e for e in load_queue(args.queue) if (e["id"] in wanted if wanted else e["id"] not in done)]
    preflight(run)
    load_scoring(run)
    runners = {"throughput": run_throughput, "train": run_train, "score-timing": run_score_timing}
    for e in entries:
        per_image = run.score_s_per_image or SCORE_S_PER_IMAGE[run.device.type]
        need = estimate(e, per_image, args.n_images)
        if need > run.left() - RETURN_S:
            run.log(f"{e['id']}: not started (needs ~{need:.0f} s, {run.left() - RETURN_S:.0f} s left)")
            continue
        run.log(f"{e['id']}: start ({e['question']}; ~{need:.0f} s)")
        try:
            runners[e["kind"]](run, e)
        except Exception as exc:  # one entry's failure leaves the others their time
            run.log(f"{e['id']}: failed ({type(exc).__name__}: {exc})")
    return_files(run)
    cap = f" of the {args.cap:.0f} s cap" if args.cap else ""
    run.log(f"done: {len(run.rows)} rows, {time.monotonic() - run.t0:.0f} s{cap}")


# ---- here, after: the rows into the ledger, the exact scores ----------------------------------------
def cmd_ingest(args):
    src = Path(args.returned)
    rows = [json.loads(line) for line in (src / "results.jsonl").read_text().splitlines() if line.strip()]
    stamp = args.name or f"{rows[0]['date'] if rows else datetime.date.today()}-{rows[0]['commit'] if rows else 'x'}"
    dest = Path(args.runs) / stamp
    dest.mkdir(parents=True, exist_ok=True)
    parts = sorted(src.glob("returned.tar.*"))
    if parts:
        with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
            for member in tar.getmembers():
                if not member.isfile() or "/" in member.name or member.name.startswith("."):
                    raise BenchError(f"{src}: returned tar holds {member.name!r}, not a plain file name")
                (dest / member.name).write_bytes(tar.extractfile(member).read())
    for name in ("results.jsonl", "run.log"):
        if (src / name).exists():
            shutil.copy(src / name, dest / name)
    have = {json.dumps(r, sort_keys=True) for r in ledger.load(args.ledger)}
    added = 0
    for r in rows:
        r = ledger.check_row(r)
        if json.dumps(r, sort_keys=True) not in have:
            ledger.append(r, args.ledger)
            added += 1
    print(f"{added} rows added to {args.ledger}; files in {dest}\nnext: python tools/gpu_bench.py score {dest} "
          f"--reference data/ref.npz")


def cmd_score(args):
    from dogkit.checkpoints import load_generator, sample_to_zip
    from dogkit.metrics.inception import load_inception
    from dogkit.metrics.reference import load_reference
    from dogkit.metrics.score import score

    folder = Path(args.folder)
    rows = ledger.load(args.ledger)
    fid_rows = {r["note"]: r for r in rows if r["entry"] and r["note"]}
    gens = sorted(folder.glob("*.pt"), key=lambda f: ("-p" in f.name, "-ema" in f.name, f.name))
    if args.only:
        gens = [g for g in gens if g.stem in args.only.split(",")]
    ref = load_reference(args.reference)
    model, _ = load_inception(args.inception_weights)
    scoring = EXACT.format(n=args.n_images, reference=args.reference, rows=len(ref.features))
    done = {(r["entry"], r["settings"]) for r in rows if r["scoring"] == scoring}
    for gen in gens:
        gpu = fid_rows.get(f"generator {gen.name}")
        if gpu is None:
            print(f"{gen.name}: no GPU row in {args.ledger} (ingest first); skipped")
            continue
        if (gpu["entry"], gpu["settings"]) in done:
            print(f"{gen.name}: already scored exactly; skipped")
            continue
        t = time.monotonic()
        generator = load_generator(gen, "cpu")
        zip_path = sample_to_zip(generator, folder / f"{gen.stem}.zip", generator[1]["truncation"] or None, seed=0,
                                 n=args.n_images)
        r = score(zip_path, ref, model, "cpu", strict=args.n_images == 10_000, batch_size=50)
        row = {**gpu, "fid": round(r["fid"], 3), "distance": round(r["distance"], 4), "mifid": round(r["mifid"], 3),
               "scoring": scoring, "date": datetime.date.today().isoformat(), "torch": None,
               "note": f"{gpu['note']}; the GPU's fid-only score {gpu['fid']:.2f} is off by "
                       f"{gpu['fid'] - r['fid']:+.2f} ({time.monotonic() - t:.0f} s here)"}
        print(json.dumps(ledger.append(row, args.ledger)), flush=True)
        Path(zip_path).unlink()


def main(argv=None):
    t0 = time.monotonic()  # before any heavy import (torch is imported by the commands)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ledger", type=Path, default=ledger.LEDGER, help="results ledger (default %(default)s)")
    parser.add_argument("--queue", type=Path, default=QUEUE, help="experiment queue (default %(default)s)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="here: the Inception in int8 and the reference's statistics, carry size checked")
    p.add_argument("--data", default="data/dogs64.npz", help="the training cache the device trains on")
    p.add_argument("--reference", default="data/ref.npz", help="dogkit reference file (default %(default)s)")
    p.add_argument("--inception-weights", default=None, help="FID weights (default: found offline)")
    p.add_argument("--out", default=".devpack")
    p.add_argument("--carry-limit", type=float, default=0.0,
                   help="MiB that may go to the GPU (working tree + data + pack); 0: no check (default)")
    r = sub.add_parser("run", help="on the GPU: GPU-only tests, then the queue's next entries within the cap")
    r.add_argument("--data", default="data/dogs64.npz")
    r.add_argument("--pack", default=str(PACK.relative_to(ROOT)))
    r.add_argument("--out", required=True, help="folder whose files come back home")
    r.add_argument("--cap", type=float, default=0.0,
                   help="seconds for the whole command, start-up included (0, the default: no cap); an 8-minute "
                        "entry with its three scored points and the GPU tests need about 550")
    r.add_argument("--part-mib", type=float, default=100.0, help="size of each returned.tar.NNN part (default 100)")
    r.add_argument("--return-mib", type=float, default=0.0,
                   help="MiB of files to bring back in all; past it the largest are left (0, the default: all)")
    r.add_argument("--device", default="auto", help="auto (the GPU) or cpu (the rehearsal)")
    r.add_argument("--only", default="", help="comma-separated entry ids, measured or not (default: the pending)")
    r.add_argument("--n-images", type=int, default=10_000, help="images sampled per scored point")
    r.add_argument("--skip-tests", action="store_true", help="leave out the GPU-only tests")
    r.add_argument("--work", default=str(WORK), help="scratch folder for the runs (default %(default)s)")
    i = sub.add_parser("ingest", help="here: a returned folder's rows into the ledger, its files into runs/gpu/")
    i.add_argument("returned")
    i.add_argument("--runs", default=str(RUNS))
    i.add_argument("--name", default=None, help="folder name under --runs (default DATE-COMMIT)")
    s = sub.add_parser("score", help="here: the exact dogkit score of each returned generator")
    s.add_argument("folder", help="runs/gpu/STAMP (what ingest wrote)")
    s.add_argument("--reference", default="data/ref.npz")
    s.add_argument("--inception-weights", default=None)
    s.add_argument("--n-images", type=int, default=10_000)
    s.add_argument("--only", default="", help="comma-separated generator names (e.g. biggan-8m-final)")
    sub.add_parser("queue", help="each entry of the queue: pending, or the ledger rows that measured it")
    args = parser.parse_args(argv)
    args.t0 = t0
    try:
        {"pack": cmd_pack, "run": cmd_run, "ingest": cmd_ingest, "score": cmd_score, "queue": cmd_queue}[args.cmd](args)
    except (BenchError, ledger.LedgerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.cmd == "run":  # run.log comes back too: the reason must be in it
            with open(Path(args.out) / "run.log", "a") as fh:
                fh.write(f"error: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
