# ---------------------------------------------------------------------------------------------
# Entry point: Kaggle with no arguments, or locally with --data PATH --budget 8m --out DIR
# ---------------------------------------------------------------------------------------------
# On Kaggle the kernel trains only on the competition's photos and boxes (all-dogs.zip +
# Annotation.zip, unzipped, or Stanford Dogs' Images/ + Annotation/); other datasets are ignored.
import argparse
import difflib
import os
import signal
import sys
import time

from dogkit.core.data import DataError, PHOTO_EXTS, breed_of, load_dataset, summary_lines
from dogkit.core.distributed import ALONE, RankStopped, all_objects, launch, on_main, visible_gpus
from dogkit.core.runtime import (BUG_EXIT, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_RANK_STOPPED, EXIT_TRAINING_FAILED,
                                 EXIT_USAGE, RunError, claim_folder, machine_lines, output_problem, pick_device,
                                 release_folder, save_traceback)
from dogkit.core.sample import notebook_shell, show_png
from dogkit.core.settings import (SETTING, SETTINGS, Choices, TrainConfig, parse_budget, unread_settings,
                                  with_settings)
from dogkit.core.train import (RunFailed, check_continuation, parse_ema_extra, parse_snapshots, read_checkpoint, train,
                               zip_from_checkpoint)

KAGGLE_INPUT = "/kaggle/input"
KAGGLE_WORKING = "/kaggle/working"
KAGGLE_BUDGET = "8h45m"  # Kaggle stops a kernel at 9 h: keep 15 minutes to spare
KAGGLE_MARGIN = 15 * 60.0  # those 15 minutes: the wall is a kernel's budget plus these
NOTEBOOK_ARGS = ("-f",)  # what Jupyter adds to sys.argv (-f kernel.json): tolerated, nothing else is


def kaggle_paths():
    """Kaggle's input and working folders (DOGKIT_KAGGLE_* override them, for tests)."""
    env = os.environ.get
    return env("DOGKIT_KAGGLE_INPUT", KAGGLE_INPUT), env("DOGKIT_KAGGLE_WORKING", KAGGLE_WORKING)


def _entries(path):
    try:
        return sorted(os.scandir(path), key=lambda e: e.name)
    except OSError:
        return []


def _has_photos(path):
    return any(e.is_file() and e.name.lower().endswith(PHOTO_EXTS) for e in _entries(path))


def _walk(root, depth=5):
    """(folder, its entries) breadth-first down to depth levels (attached datasets are shallow)."""
    level = [root]
    for _ in range(depth):
        below = []
        for folder in level:
            entries = _entries(folder)
            yield folder, entries
            below += [e.path for e in entries if e.is_dir(follow_symlinks=False)]
        level = below


def find_competition_data(root):
    """The competition's photos and boxes under Kaggle's input root, or None.

    The competition's photos and boxes under Kaggle's input root, in any layout it was published
    in: {dataset, photos (folder or zip), annotations (folder, zip or None), layout}; None if absent.
    Checked in order: all-dogs.zip / all-dogs/ (the competition), then Images/<synset>-<breed>/
    (the Stanford Dogs dataset)."""
    photos = layout = None
    for folder, entries in _walk(root):
        names = {e.name: e for e in entries}
        if "all-dogs" in names and names["all-dogs"].is_dir():
            inner = os.path.join(folder, "all-dogs", "all-dogs")
            photos = inner if _has_photos(inner) else names["all-dogs"].path
            layout = "competition files (all-dogs/)"
        elif "all-dogs.zip" in names:
            photos, layout = names["all-dogs.zip"].path, "competition files (all-dogs.zip)"
        elif "Images" in names and any(breed_of(e.name) for e in _entries(names["Images"].path)):
            photos, layout = names["Images"].path, "Stanford Dogs (Images/<synset>-<breed>/)"
        if photos:
            break
    if not photos:
        return None
    rel = os.path.relpath(photos, root).split(os.sep)
    dataset = os.path.join(root, rel[0])  # the attached dataset holding the photos
    annotations = None
    for folder, entries in _walk(dataset):
        names = {e.name: e for e in entries}
        if "Annotation" in names and names["Annotation"].is_dir():
            annotations = names["Annotation"].path
        elif "Annotation.zip" in names:
            annotations = names["Annotation.zip"].path
        if annotations:
            break
    return {"dataset": dataset, "photos": photos, "annotations": annotations, "layout": layout}


def ignored_inputs(root, dataset):
    """The other attached datasets (never trained on)."""
    return [e.path for e in _entries(root) if os.path.abspath(e.path) != os.path.abspath(dataset)]


def kaggle_data(root, log=print):
    """(photos, annotations or None) of the competition on Kaggle, each a folder or a zip.

    Zips are read in place (nothing extracted: no scratch space, no minute spent copying 0.8 GB);
    everything else attached is ignored, with a line saying so."""
    found = find_competition_data(root)
    if found is None:
        raise RunError(f"no competition data under {root}: attach 'Generative Dog Images' (Add data -> "
                       "Competitions), or the Stanford Dogs dataset, to this notebook")
    log(f"data       {found['layout']} in {found['dataset']}")
    for folder in ignored_inputs(root, found["dataset"]):
        log(f"ignored    {folder}: not the competition's data, never trained on")
    photos, annotations = found["photos"], found["annotations"]
    if annotations is None:
        log("WARNING    no Annotation/ found: whole photos are used, not the dogs' boxes "
            "(attach the competition's Annotation.zip for far better crops)")
    return photos, annotations


# The command line of the kernel and `dogkit train`: every setting of SETTINGS as --name-with-dashes
# but NOT_OPTIONS, and these (flag, type, help): not settings, or their default depends on the place.
RUN_OPTIONS = (
    ("--data", str, "photos (any layout clean-data reads) or a cache .npz (Kaggle: found under /kaggle/input)"),
    ("--budget", str, f"wall clock for the whole run, the zip included: 30s, 8m, 9h (Kaggle: {KAGGLE_BUDGET}; 8m)"),
    ("--out", str, "output folder: images.zip, checkpoint.pt, log.jsonl, grids (Kaggle: its working; submission)"),
    ("--log-every", float, "seconds between log lines (default: 300 on Kaggle, else 30)"),
    ("--sessions", int, "sessions the run is planned over, --budget each, each continuing the last (--resume; on "
                        "Kaggle its output attached); default 1 (Kaggle: the kernel's KAGGLE_SESSIONS)"),
    ("--resume", str, "checkpoint.pt to continue from (same model and settings; a new --budget re-plans the end)"),
    ("--preset", str, "a published recipe over the model's settings, e.g. fifth-place (biggan); options still win"),
    ("--gpus", int, "GPUs to train on, one process each (default: every visible GPU; under torchrun: its own)"),
)
NOT_OPTIONS = ("model", "hard_limit")  # the model the kernel holds; Kaggle's wall, set by the kernel alone


def train_options():
    """Every option of the command line: (flag, type, choices or None, help), RUN_OPTIONS first."""
    taken = {flag[2:].replace("-", "_") for flag, *_ in RUN_OPTIONS}
    out = [(flag, kind, None, text) for flag, kind, text in RUN_OPTIONS]
    for name, default, values, models, text in SETTINGS:
        if name not in taken and name not in NOT_OPTIONS:
            only = f"; read by {', '.join(models)}" if models else ""
            out.append(("--" + name.replace("_", "-"), type(default), values if isinstance(values, Choices) else None,
                        f"{text} (default: the model's{only})"))
    return out


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Train a dog generator and write images.zip. Any setting of the "
                                     "settings cell can be given as --name-with-dashes: it wins over the cell.")
    parser.error = lambda message: stop(EXIT_USAGE, f"error: {message} (--help lists the options)")  # one line
    options = train_options()
    for flag, kind, choices, text in options:
        parser.add_argument(flag, type=kind, choices=choices, help=text)
    args, unknown = parser.parse_known_args(argv)
    stray = [a for a in unknown if a.startswith("-") and a not in NOTEBOOK_ARGS and not a.endswith(".json")]
    if stray:
        flags = [option[0] for option in options]
        hints = [a + "".join(f" (did you mean {m}?)" for m in difflib.get_close_matches(a.split("=")[0], flags, 1))
                 for a in stray]
        parser.error(f"unrecognized arguments: {' '.join(hints)}")
    return args


def with_preset(settings, presets, name):
    """The model's settings with preset `name` over them.

    None or '': as they are; an unknown name is an error listing the model's presets."""
    if not name:
        return settings
    if name not in (presets or {}):
        raise ValueError(f"preset {name!r}: " + (f"choose from {', '.join(presets)}" if presets else
                                                  "this model has no presets"))
    return {**settings, **presets[name]}


def config_from_options(settings, opts, on_kaggle=False, working=KAGGLE_WORKING, kaggle_budget=KAGGLE_BUDGET,
                        kaggle_sessions=1, presets=None, model=None):
    """TrainConfig from a model's settings, a preset and the command-line options, checked.

    TrainConfig from a model's settings, the preset opts['preset'] names (with_preset) and the
    command-line options (train_options, a dict by dest name; None: not given), checked; the
    defaults that depend on where the run starts are filled in here, once. model: its name, whose
    unread settings are refused here, before any work (unread_settings)."""
    cfg = with_settings(TrainConfig(**({"model": model} if model else {})),
                        with_preset(settings, presets, opts.get("preset")))
    sessions = opts.get("sessions") or (kaggle_sessions if on_kaggle else 1)
    if sessions < 1:
        raise ValueError(f"sessions {sessions}: give 1 or more")
    overrides = {k: v for k, v in opts.items() if k in SETTING and k not in NOT_OPTIONS and v is not None}
    overrides.update({"data": opts.get("data") or "", "sessions": sessions,
                      "out": opts.get("out") or (working if on_kaggle else "submission"),
                      "budget": parse_budget(opts.get("budget") or (kaggle_budget if on_kaggle else "8m")),
                      # Kaggle's wall: its 9 hours, the kernel's budget and the builder's 15 minutes, less one
                      "hard_limit": parse_budget(kaggle_budget) + KAGGLE_MARGIN - 60.0 if on_kaggle else 0.0,
                      "log_every": opts["log_every"] if opts.get("log_every") is not None else
                      (300.0 if on_kaggle else 30.0)})
    cfg = with_settings(cfg, overrides)
    if output_problem(cfg.out, folder=True):
        raise RunError(f"--out {output_problem(cfg.out, folder=True)}")
    parse_snapshots(cfg.snapshots)
    parse_ema_extra(cfg.ema_extra)
    if model and unread_settings(cfg, model):
        raise ValueError("; ".join(unread_settings(cfg, model)))
    return cfg


def main(model_cls, settings, argv=None, kaggle_budget=KAGGLE_BUDGET, kaggle_sessions=1, presets=None, preset=None):
    """Run the kernel; exits non-zero (after writing images.zip when it can) on any failure.

    kaggle_budget: a session's wall clock on Kaggle (no --budget there); kaggle_sessions: the
    sessions a run on Kaggle is planned over (no --sessions there); presets: the model's published
    recipes, preset: the one the settings cell names (--preset wins). In a notebook, sys.argv is the
    Jupyter kernel's own (-f kernel.json ...): no arguments, unless a cell set sys.argv."""
    t0 = time.monotonic()
    if argv is None:
        argv = [] if os.path.basename(sys.argv[0]).startswith("ipykernel") else sys.argv[1:]
    args = exit_on_error(lambda: parse_args(argv))
    args.kaggle_budget, args.kaggle_sessions, args.presets = kaggle_budget, kaggle_sessions, presets
    args.preset = args.preset or preset
    try:
        signal.signal(signal.SIGTERM, _interrupt)  # a stop from outside saves a checkpoint, like Ctrl-C
    except ValueError:  # not the main thread (some notebook runners): keep the default
        pass
    path = exit_on_error(lambda: run(model_cls, settings, args, t0))
    if path:  # rank 0 of a finished run: what to do with it
        show_results(os.path.dirname(path))
        print(f"next       score it with the competition's metric (dogkit's docs/scoring.md): dogkit score {path} "
              f"--reference data/ref.npz (made once by: dogkit reference PHOTOS -o data/ref.npz)", flush=True)
    return path


def show_results(out):
    """In a notebook: the final samples under the cell (the loss curves: `dogkit report --run OUT`)."""
    if notebook_shell() is not None and os.path.exists(os.path.join(out, "samples.png")):
        show_png(os.path.join(out, "samples.png"))


class KernelStopped(Exception):
    """The run stopping in a notebook: the cell's error is its one line, nothing more."""


def _one_line(shell, etype, value, tb, tb_offset=None):
    shell._showtraceback(etype, value, [str(value)])  # the error IPython shows: the line alone


def stop(code, message=None):
    """End the run with an exit code and its one line. A script (or a forked rank): the line on
    stderr and sys.exit. In the notebook: an error whose text is the line alone (a SystemExit
    would add IPython's 'An exception has occurred' and a warning); the cell still fails."""
    shell = notebook_shell()
    if shell is None:
        if message:
            print(message, file=sys.stderr, flush=True)
        sys.exit(code)
    shell.set_custom_exc((KernelStopped,), _one_line)
    raise KernelStopped(message or f"stopped with exit code {code} (the line above says why)")


def exit_on_error(fn, rank=None):
    """fn()'s result, or one line on stderr and its exit code from the one table.

    The table is runtime.EXIT_*, the same as every dogkit command's. rank: a forked rank's number
    (its parent says the interrupt and the zip)."""
    who = f"rank {rank}: " if rank else ""
    try:
        return fn()
    except KernelStopped:  # stopped already, with its line
        raise
    except RankStopped:
        stop(EXIT_RANK_STOPPED)
    except SystemExit as exc:  # argparse's usage error, a rank's exit code passed on: said already
        if exc.code:
            stop(exc.code if isinstance(exc.code, int) else EXIT_USAGE)
        raise
    except (RunError, DataError, ValueError) as exc:
        stop(EXIT_BAD_INPUT, f"{who}error: {exc}")
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the trainer saved checkpoint.pt and said how to resume
        stop(EXIT_INTERRUPTED, None if rank else "error: interrupted; resume with --resume CHECKPOINT")
    except RunFailed as exc:
        stop(EXIT_TRAINING_FAILED, f"{who}error: " + (f"training failed ({exc.cause})" if rank else exc.line()))
    except (OSError, MemoryError) as exc:  # a disk, a file, the machine: one line
        stop(EXIT_BAD_INPUT, f"{who}error: {type(exc).__name__}: {exc}")
    except Exception as exc:  # nobody expected it: a bug, said in one line, the traceback kept in a file
        stop(BUG_EXIT, f"{who}error: internal error, a bug in dogkit ({type(exc).__name__}: {exc}); traceback in "
                       f"{save_traceback()}")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def world_size(gpus, device):
    """(ranks, their device type) for --gpus and --device.

    (ranks, their device type): with --device auto or cuda every visible GPU (or --gpus of
    them), one process each; else one. Counted without starting CUDA, so workers can be forked.
    DOGKIT_CPU_RANKS=N with --device cpu: N ranks on the CPU over gloo (a test path)."""
    if gpus is not None and gpus < 1:
        raise RunError(f"--gpus {gpus}: give 1 or more")
    cpu_ranks = int(os.environ.get("DOGKIT_CPU_RANKS") or 0)
    if device == "cpu" and cpu_ranks > 1:
        return cpu_ranks, "cpu"
    if device not in ("auto", "cuda") or gpus == 1:
        return 1, None
    n = visible_gpus()
    if gpus is not None and gpus > n:
        raise RunError(f"--gpus {gpus}: only {n} GPU(s) visible here")
    size = gpus or n
    return (size, "cuda") if size > 1 else (1, None)


def run(model_cls, settings, args, t0):
    input_root, working = kaggle_paths()
    on_kaggle = args.data is None and os.path.isdir(input_root)
    if args.data is None and not on_kaggle:
        raise RunError("--data is required outside Kaggle (a cache from `dogkit clean-data`, or photos)")
    cfg = config_from_options(settings, vars(args), on_kaggle, working, args.kaggle_budget, args.kaggle_sessions,
                              args.presets, model_cls.name)
    if args.preset:
        print(f"preset     {args.preset}: its settings over the model's (each cited to its source in the "
              f"settings), the options given here over both", flush=True)
    lock = claim_folder(cfg.out)  # before any work: two runs on one --out would interleave their files
    try:
        size, device_type = world_size(args.gpus, cfg.device)
        resume, ckpt = args.resume, None
        if on_kaggle and cfg.sessions > 1 and resume is None:
            resume, ckpt = earlier_session(input_root, cfg.out)
        if resume:  # refused in seconds, before any cleaning, when it cannot be continued
            ckpt = read_checkpoint(resume) if ckpt is None else ckpt
            print(f"continues  {check_continuation(ckpt, resume, cfg, model_cls.name)}", flush=True)
            del ckpt  # training loads it again, onto its device
        elif replaced := earlier_run_line(cfg.out):
            print(replaced, flush=True)
        if size == 1:
            device = pick_device(cfg.device, require_gpu=on_kaggle)  # seconds, before any cleaning
            return run_rank(ALONE, device, model_cls, cfg, resume, t0, on_kaggle)
        started = time.time()
        codes = launch(rank_main, size, device_type, (model_cls, cfg, resume, t0, on_kaggle))
        return after_ranks(codes, model_cls, cfg, t0, device_type, on_kaggle, resume, started)
    finally:
        release_folder(lock)


RUN_FILES = ("images.zip", "checkpoint.pt")  # what a run folder holds that a new run replaces


def earlier_run_line(out):
    """The start block's line naming an earlier run's files this run will replace, or ''.

    The start block's line when out holds an earlier run's files that this new run will replace
    (the rule for outputs: never replaced without a word), or ''."""
    found = [name for name in RUN_FILES if os.path.lexists(os.path.join(out, name))]
    if not found:
        return ""
    return (f"replaces   {', '.join(found)} in {out}, an earlier run's, as this run writes its own (--resume "
            f"{os.path.join(out, 'checkpoint.pt')} continues that run instead; another --out keeps it)")


def earlier_session(input_root, working):
    """The checkpoint.pt a run planned over several Kaggle sessions continues from.

    This notebook's earlier output attached under input_root (any depth up to 4), or left in the
    working folder by Kaggle's "Files only" persistence; the one furthest on when there are several,
    as (path, the checkpoint read); (None, None) for the first session. A file that is not a
    readable checkpoint is an error, not a fresh start."""
    found = [os.path.join(working, "checkpoint.pt")] if os.path.isfile(os.path.join(working, "checkpoint.pt")) else []
    found += [e.path for _, entries in _walk(input_root, depth=4) for e in entries
              if e.name == "checkpoint.pt" and e.is_file()]
    if not found:
        print(f"continues  nothing yet: no checkpoint.pt under {input_root} or in {working}, so this is the first "
              f"session (from the next one on, attach this notebook's output: Add Input -> Your Work)", flush=True)
        return None, None
    progress, best, kept = {}, None, None
    for path in found:  # each read once; only the furthest on is kept in memory
        ckpt = read_checkpoint(path)
        progress[path] = (ckpt.get("session", 1), ckpt["step"])
        if best is None or progress[path] > progress[best]:
            best, kept = path, ckpt
    for path in found:
        if path != best:
            print(f"ignored    {path} (session {progress[path][0]}, step {progress[path][1]}): {best} is further "
                  f"on", flush=True)
    return best, kept


def rank_main(world, device, model_cls, cfg, resume, t0, on_kaggle):
    """One forked rank of a multi-GPU kernel: exit code 0 when it finished."""
    exit_on_error(lambda: run_rank(world, device, model_cls, cfg, resume, t0, on_kaggle), world.rank)
    return 0


def run_rank(world, device, model_cls, cfg, resume, t0, on_kaggle, same_session=False):
    """One rank's run: check the device, print the start block, clean the data, train, zip.

    Check the device(s), print the start block, clean the data (rank 0), train, zip (same_session:
    train.load_checkpoint)."""
    if world.size > 1:
        device = check_devices(world, device, on_kaggle)
    if world.main:
        print("\n".join(machine_lines(device)), flush=True)
    cfg = with_settings(cfg, {"device": str(device)})

    def load():
        photos, annotations = (kaggle_data(kaggle_paths()[0]) if on_kaggle
                               else (cfg.data, None))
        data = load_dataset(photos, cfg.image_size, cfg.strategy, annotations=annotations, progress=True,
                            log=lambda m: print(m, flush=True))
        for line in summary_lines(data["summary"]):
            print(line, flush=True)
        return dict(data, source=photos)

    data = on_main(load, world)  # cleaning runs once; every rank gets the result
    cfg = with_settings(cfg, {"data": data.pop("source")})
    return train(cfg, model_cls, resume=resume, data=data, t0=t0, world=world, same_session=same_session)


def check_devices(world, device, on_kaggle):
    """Every rank checks its GPU; rank 0 names the first that cannot run and all stop."""
    try:
        device, problem = pick_device(str(device), require_gpu=on_kaggle), None
    except RunError as exc:
        problem = str(exc)
    for rank, problem in enumerate(all_objects(problem, world)):
        if problem:
            raise RunError(f"rank {rank}: {problem}") if world.main else RankStopped(problem)
    return device


def after_ranks(codes, model_cls, cfg, t0, device_type, on_kaggle, resume=None, started=0.0):
    """The parent of a multi-GPU run, once its ranks have exited: rank 0's result, or go on alone.

    The parent of a multi-GPU run, once its ranks have exited: rank 0's own exit code when it
    ended (it wrote images.zip whenever it could). When rank 0 itself died (a lost GPU, an NCCL
    timeout) the run goes on here, on one device, from this run's last checkpoint (written after
    `started`, a time.time()) or the start, until the same deadline; when too little time is left
    for that, images.zip is sampled from the checkpoint."""
    if codes[0] == EXIT_INTERRUPTED:
        raise KeyboardInterrupt  # rank 0 saved checkpoint.pt
    if codes[0] in (EXIT_BAD_INPUT, EXIT_USAGE, EXIT_TRAINING_FAILED):  # rank 0 said why (and wrote the zip)
        sys.exit(codes[0])
    if codes[0] == 0:
        return os.path.join(cfg.out, "images.zip")
    checkpoint = os.path.join(cfg.out, "checkpoint.pt")
    ours = os.path.exists(checkpoint) and os.path.getmtime(checkpoint) >= started
    resume = checkpoint if ours else resume
    device = "cuda:0" if device_type == "cuda" else "cpu"
    left = t0 + cfg.budget - time.monotonic()
    cause = f"rank 0 exited with code {codes[0]} (ranks: {codes})"
    print(f"error: {cause}; going on in one process on {device} from {resume or 'the start'} for the "
          f"{left:.0f} s left", file=sys.stderr, flush=True)
    if cfg.sessions > 1:  # this session's clock and plan go on (or it starts again from the last session's)
        clock, cfg_left = t0, cfg
    else:  # one session: the budget counts the checkpoint's time
        done = read_checkpoint(resume)["elapsed"] if resume else 0.0
        clock, cfg_left = time.monotonic(), with_settings(cfg, {"budget": done + left})
    try:
        return run_rank(ALONE, pick_device(device), model_cls, cfg_left, resume, clock, on_kaggle,
                        same_session=ours and cfg.sessions > 1)
    except RunError as exc:  # too little time left to train, or the device cannot run
        if resume is None:
            raise
        print(f"error: {exc}; sampling {resume} instead", file=sys.stderr, flush=True)
    path, step = zip_from_checkpoint(resume, model_cls, t0 + cfg.budget, device="cpu")
    raise RunFailed(f"{cause}; images.zip sampled on the CPU from {resume} (step {step})", path)
