#!/usr/bin/env python
"""The results ledger: every measured run is one row of results/ledger.jsonl, and the results
tables of the README and docs/ are generated from it (never typed by hand).

    python tools/gpu_bench.py ingest RETURNED_DIR          # the rows of a GPU session (the bench appends them)
    python tools/ledger.py add --kind run --model biggan --settings "flip+diffaug" --budget 8m \\
        --steps 10941 --fid 80.1 --distance 0.22 --mifid 80.1 --device "NVIDIA H100 80GB HBM3" \\
        --command "python kernels/biggan.py --data data/dogs64.npz --budget 8m --augment flip+diffaug"
    python tools/ledger.py render            # rewrite the generated tables (README.md, docs/*.md)
    python tools/ledger.py render --check    # exit 1 if a table is stale (a test runs this)
    python tools/ledger.py plot-scaling docs/scaling.png   # MiFID against the budget, per model

A row has exactly the keys in KEYS; `kind` is one of KINDS. Exactly one page holds each table
between `<!-- ledger:NAME -->` and `<!-- /ledger:NAME -->`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dogkit.core.train import passes_text  # noqa: E402  (the log lines' own: one way to write passes)

LEDGER = ROOT / "results" / "ledger.jsonl"
README = ROOT / "README.md"


def PAGES():  # noqa: N802 (the pages the tables may live in, read when called)
    return [README] + sorted((ROOT / "docs").glob("*.md"))
KEYS = ("kind", "model", "settings", "budget", "steps", "images_seen", "steps_per_s", "batch_size", "truncation",
        "seed", "fid", "distance", "mifid", "device", "torch", "commit", "date", "command", "note", "entry",
        "scoring", "seconds", "subset", "passes", "kid", "kid_se")
KINDS = ("run", "sweep", "throughput", "timing", "proxy")
REQUIRED = {"run": ("model", "budget", "fid", "distance", "mifid", "device", "command"),
            "sweep": ("model", "truncation", "fid", "distance", "mifid", "command"),
            "throughput": ("model", "steps_per_s", "batch_size", "device", "command"),
            "timing": ("settings", "seconds", "device", "command"),  # a tool's wall clock, e.g. dogkit score
            # a CPU proxy of the many-passes regime (tools/cpu_proxy.py): a point of one run's learning curve
            "proxy": ("model", "entry", "seed", "subset", "images_seen", "passes", "fid", "distance", "kid", "kid_se",
                      "device", "command", "scoring")}
# `scoring` says how a row's FID was computed. One computed on the GPU with the carried int8
# Inception against the reference's mean and covariance (no memorization term) starts with FID_ONLY:
# its distance and MiFID stay empty until the exact score on the CPU adds its own row.
FID_ONLY = "fid only"


class LedgerError(ValueError):
    pass


FLOATS = ("fid", "distance", "mifid", "steps_per_s", "truncation", "seconds", "passes", "kid", "kid_se")
INTS = ("steps", "images_seen", "batch_size", "seed", "subset")


def check_row(row: dict, where: str = "row") -> dict:
    """The row with every key present (missing optional ones as None); LedgerError listing every
    problem: unknown keys, an unknown kind, a missing required value, a number that is not one."""
    problems = [f"unknown key {k!r}" for k in row if k not in KEYS]
    problems += [f"{k} {row[k]!r}: must be a number" for k in FLOATS + INTS if row.get(k) is not None
                 and (isinstance(row[k], bool) or not isinstance(row[k], (int, float) if k in FLOATS else int)
                      or not math.isfinite(row[k]))]
    kind = row.get("kind")
    if kind not in KINDS:
        problems.append(f"kind {kind!r}: choose from {', '.join(KINDS)}")
    else:
        fid_only = str(row.get("scoring") or "").startswith(FID_ONLY)
        problems += [f"{k} is required for kind {kind}" for k in REQUIRED[kind] if row.get(k) in (None, "")
                     and not (fid_only and k in ("distance", "mifid"))]
    if problems:
        raise LedgerError(f"{where}: " + "; ".join(problems))
    return {k: row.get(k) for k in KEYS}


def load(path: Path = LEDGER) -> list[dict]:
    rows = []
    for i, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise LedgerError(f"{path}:{i}: not a JSON line ({exc})") from None
        if not isinstance(row, dict):
            raise LedgerError(f"{path}:{i}: a row must be a JSON object, not {type(row).__name__}")
        rows.append(check_row(row, f"{path}:{i}"))
    return rows


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def append(row: dict, path: Path = LEDGER) -> dict:
    """Check and append one row (commit, date and torch filled in when absent)."""
    row = dict(row)
    row.setdefault("commit", git_commit())
    row.setdefault("date", datetime.date.today().isoformat())
    if not row.get("torch"):
        import torch

        row["torch"] = torch.__version__.split("+")[0]
    row = check_row(row)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:  # the whole line in one write: a process killed here leaves the row whole or absent
        os.write(fd, (json.dumps(row, allow_nan=False) + "\n").encode())
    finally:
        os.close(fd)
    return row


# ---- the generated tables ---------------------------------------------------------------------
def _num(v, fmt="{:,}"):
    return "" if v is None else fmt.format(v)


def _trunc(t):
    return "none" if not t else f"{t:g}"  # 0 or None: plain normal z


def table_runs(rows):
    out = ["| model | settings | budget | steps | images seen | truncation | FID | d | MiFID | device | scored | "
           "commit |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "run":
            seen = "" if r["images_seen"] is None else f"{r['images_seen'] / 1e6:.2f} M"
            out.append(f"| {r['model']} | {r['settings']} | {r['budget']} | {_num(r['steps'])} | {seen} | "
                       f"{_trunc(r['truncation'])} | {r['fid']:.2f} | {_num(r['distance'], '{:.3f}')} | "
                       f"{_num(r['mifid'], '{:.2f}')} | {r['device']} | {r['scoring'] or ''} | {r['commit']} |")
    return out


def table_best(rows, top=5):
    """The exact scores (runs and sweep points with a MiFID), best first, one row per generator
    (its best truncation: a run and its sweep share model, steps and images seen), at most `top`."""
    best = {}
    for r in rows:
        if r["kind"] in ("run", "sweep") and r["mifid"] is not None:
            key = (r["model"], r["steps"], r["images_seen"], r["budget"])
            if key not in best or r["mifid"] < best[key]["mifid"]:
                best[key] = r
    scored = sorted(best.values(), key=lambda r: r["mifid"])[:top]
    out = ["| MiFID | FID | d | model | training | truncation | device | date |", "|---|---|---|---|---|---|---|---|"]
    for r in scored:
        what = f"{r['budget'] or ''}, {r['settings']}".strip(", ")
        out.append(f"| **{r['mifid']:.2f}** | {r['fid']:.2f} | {r['distance']:.3f} | {r['model']} | {what} | "
                   f"{_trunc(r['truncation'])} | {r['device']} | {r['date']} |")
    return out


def table_sweep(rows):
    out = ["| model | steps | truncation | seed | FID | d | MiFID |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "sweep":
            out.append(f"| {r['model']} | {_num(r['steps'])} | {_trunc(r['truncation'])} | {r['seed']} | "
                       f"{r['fid']:.2f} | {r['distance']:.3f} | {r['mifid']:.2f} |")
    return out


def table_throughput(rows):
    out = ["| model | mode | batch | steps/s | images/s | device | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "throughput":
            out.append(f"| {r['model']} | {r['settings']} | {r['batch_size']} | {r['steps_per_s']:.1f} | "
                       f"{r['steps_per_s'] * r['batch_size']:,.0f} | {r['device']} | {r['note'] or ''} |")
    return out


CLEANING = "clean-data's cleaning"  # timing rows of tools/bench_clean.py: their own table


def _timings(rows, cleaning):
    out = ["| what | seconds | device | date | commit |", "|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "timing" and r["settings"].startswith(CLEANING) == cleaning:
            out.append(f"| {r['settings']} | {r['seconds']:.1f} | {r['device']} | {r['date']} | {r['commit']} |")
    return out


def table_cleaning(rows):
    return _timings(rows, cleaning=True)


def table_timing(rows):
    return _timings(rows, cleaning=False)


def proxy_arms(rows):
    """The CPU proxies' arms at their last point: {(model, subset, images shown): [arm, ...]}, an arm
    a dict of its entry, settings, the EMA copy scored (note), passes, seeds and KID/FID/d means
    with standard errors over seeds (one seed: its KID's own jackknife error, FID's unknown). Only
    seeds that reached the arm's last point count, so every arm compares like with like."""
    last = {}
    for r in rows:
        if r["kind"] == "proxy":
            key = (r["entry"], r["note"])
            last[key] = max(last.get(key, 0), r["images_seen"])
    groups = {}
    for (entry, note), seen in last.items():
        pts = [r for r in rows if r["kind"] == "proxy" and (r["entry"], r["note"], r["images_seen"]) == (entry, note, seen)]
        arm = {"entry": entry, "note": note, "settings": pts[0]["settings"], "passes": pts[0]["passes"],
               "seeds": len(pts), "by_seed": {r["seed"]: r["kid"] for r in pts}}
        for k in ("kid", "fid", "distance"):
            values = [r[k] for r in pts]
            arm[k] = sum(values) / len(values)
            arm[k + "_err"] = (math.sqrt(sum((v - arm[k]) ** 2 for v in values) / (len(values) - 1) / len(values))
                               if len(values) > 1 else (pts[0]["kid_se"] if k == "kid" else None))
        groups.setdefault((pts[0]["model"], pts[0]["subset"], seen), []).append(arm)
    return groups


def verdict(arm, best):
    """The arm against its group's best. Seeds move KID far more than its sampling error (two
    seeds of one arm: 0.212 and 0.187, each +- 0.0014), so arms are compared over seeds only:
    paired by seed where they share two or more (the mean and standard error of the per-seed
    differences, and on how many seeds the arm is worse), else by the two means' standard errors
    over seeds; an arm with one seed gets no verdict (the lowest of a group of single seeds is only
    the lowest), and one over two seeds (an error from one degree of freedom) is called a hint.
    Under two standard errors: a tie."""
    if arm is best:
        return "best" if arm["seeds"] >= 2 else "lowest, one seed: no verdict"
    shared = sorted(set(arm["by_seed"]) & set(best["by_seed"]))
    if len(shared) >= 2:
        diffs = [arm["by_seed"][s] - best["by_seed"][s] for s in shared]
        worse = sum(d > 0 for d in diffs)  # how many seeds agree, beside the error (two seeds' error has 1 dof)
        gap, how = sum(diffs) / len(diffs), (f"paired over {len(shared)} seeds, worse on {worse}"
                                             + (": a hint" if len(shared) < 3 else ""))
        err = math.sqrt(sum((d - gap) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
    elif arm["seeds"] >= 2 and best["seeds"] >= 2:
        gap, how = arm["kid"] - best["kid"], "over seeds" + (": a hint" if min(arm["seeds"], best["seeds"]) < 3 else "")
        err = math.sqrt(arm["kid_err"] ** 2 + best["kid_err"] ** 2)
    else:
        return "one seed: no verdict"
    if err == 0:
        return f"worse by {1e3 * gap:.2f} x1e-3 ({how}, no spread)" if gap > 0 else f"tie with best ({how})"
    return (f"tie with best ({gap / err:.1f} SE, {how})" if gap < 2 * err else
            f"worse by {gap / err:.1f} SE ({how})")


def best_arm(arms):
    """The lowest mean KID among the arms measured over two seeds or more (any arm when none is)."""
    pool = [a for a in arms if a["seeds"] >= 2] or arms
    return min(pool, key=lambda a: a["kid"])


def judged_arms(rows):
    """(model, subset, images shown, arm, its verdict) for every proxy arm, each group by KID."""
    for (model, subset, seen), arms in sorted(proxy_arms(rows).items()):
        best = best_arm(arms)
        for a in sorted(arms, key=lambda a: a["kid"]):
            yield model, subset, seen, a, verdict(a, best)


def table_proxy(rows):
    out = ["| model | crops | images shown (passes) | arm | settings | EMA scored | seeds | KID x1e3 | FID | d | "
           "against the group's best |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, subset, seen, a, judged in judged_arms(rows):
        fid = f"{a['fid']:.1f}" + (f" ± {a['fid_err']:.1f}" if a["fid_err"] is not None else "")
        out.append(f"| {model} | {subset:,} | {seen:,} ({passes_text(a['passes'])}) | {a['entry']} | {a['settings']} | "
                   f"{a['note']} | {a['seeds']} | {1e3 * a['kid']:.2f} ± {1e3 * a['kid_err']:.2f} | {fid} | "
                   f"{a['distance']:.3f} | {judged} |")
    return out


PROXY_SHORT_ROWS = 12  # the README's view stays a front page: the best rows, the rest in docs/results.md


def table_proxy_short(rows):
    """The README's view of table_proxy: each arm's generator, seeds, KID and verdict, the best
    PROXY_SHORT_ROWS of them and a line saying how many more the full table holds."""
    out = ["| CPU proxy | arm | generator | seeds | KID x1e3 | against the group's best |", "|---|---|---|---|---|---|"]
    arms = list(judged_arms(rows))
    if len(arms) > PROXY_SHORT_ROWS:
        more = len(arms) - PROXY_SHORT_ROWS
        arms = arms[:PROXY_SHORT_ROWS]
    else:
        more = 0
    for model, subset, _, a, judged in arms:
        generator = re.sub(r" \((decay|half-life) [^)]*\)", "", a["note"])  # "G_ema (decay ...)": G_ema
        generator = re.sub(r": half-life ([\d.]+k) images", r" (\1)", generator)  # several copies: their half-lives
        out.append(f"| {model}, {subset:,} crops, {passes_text(a['passes'])} passes | {a['entry'].removeprefix('proxy-')} | "
                   f"{generator} | {a['seeds']} | {1e3 * a['kid']:.1f} ± {1e3 * a['kid_err']:.1f} | {judged} |")
    if more:
        out.append(f"| ... | {more} more | | | | [the full table](docs/results.md#cpu-proxies-the-many-passes-regime) |")
    return out


TABLES = {"best": table_best, "runs": table_runs, "sweep": table_sweep, "throughput": table_throughput, "timing": table_timing,
          "cleaning": table_cleaning, "proxy": table_proxy, "proxy-short": table_proxy_short}


def block(name):
    return re.compile(rf"(<!-- ledger:{name} -->\n).*?(<!-- /ledger:{name} -->)", re.S)


def render(text: str, rows: list[dict]) -> str:
    """The text with every ledger block it holds regenerated."""
    for name, make in TABLES.items():
        text = block(name).sub(lambda m: m.group(1) + "\n".join(make(rows)) + "\n" + m.group(2), text)
    return text


def render_pages(rows: list[dict], pages=None) -> dict:
    """{page: its text regenerated} for the README and docs/*.md; LedgerError unless every table
    has exactly one block across them."""
    pages = PAGES() if pages is None else pages
    texts = {p: Path(p).read_text() for p in pages}
    problems = []
    for name in TABLES:
        where = [p for p, t in texts.items() if block(name).search(t)]
        if len(where) != 1:
            problems.append(f"<!-- ledger:{name} --> is in {len(where)} pages ({', '.join(map(str, where)) or 'none'})"
                            ", not one")
    if problems:
        raise LedgerError("; ".join(problems))
    return {p: render(t, rows) for p, t in texts.items()}


def plot_scaling(rows, out: Path):
    """MiFID against the training budget in minutes, one line per model (runs only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dogkit.core.settings import parse_budget

    fig, ax = plt.subplots(figsize=(6, 4))
    exact = [r for r in rows if r["kind"] == "run" and r["mifid"] is not None]
    for model in sorted({r["model"] for r in exact}):
        pts = sorted((parse_budget(r["budget"]) / 60, r["mifid"]) for r in exact if r["model"] == model)
        ax.plot(*zip(*pts), "o-", label=model)
    ax.set_xlabel("training budget (minutes, whole run)")
    ax.set_ylabel("MiFID (lower is better)")
    ax.set_title("What more time buys (results/ledger.jsonl)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add", help="append one measured row")
    for k in KEYS:
        if k not in ("commit", "date"):
            kind = float if k in FLOATS else int if k in INTS else str
            a.add_argument(f"--{k.replace('_', '-')}", type=kind)
    r = sub.add_parser("render", help="regenerate the tables of README.md and docs/*.md from the ledger")
    r.add_argument("--check", action="store_true", help="only check: exit 1 when a table is stale")
    p = sub.add_parser("plot-scaling", help="MiFID against the budget (PNG)")
    p.add_argument("out")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "add":
            print(json.dumps(append({k: getattr(args, k) for k in KEYS if getattr(args, k, None) is not None})))
        elif args.cmd == "render":
            new = render_pages(load())
            stale = [p for p, t in new.items() if Path(p).read_text() != t]
            if args.check:
                if stale:
                    print(f"stale results tables in {', '.join(map(str, stale))}: python tools/ledger.py render",
                          file=sys.stderr)
                    return 1
                return 0
            for p in stale:
                Path(p).write_text(new[p])
            print(f"tables regenerated from results/ledger.jsonl ({len(stale)} pages changed)")
        else:
            plot_scaling(load(), Path(args.out))
    except LedgerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
