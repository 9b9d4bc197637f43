# ---------------------------------------------------------------------------------------------
# The machine: which device and precision really run, a start-of-run report, scratch space
# ---------------------------------------------------------------------------------------------
# Checked in the first seconds, before the data is cleaned (nobody watches a 9-hour run): a GPU this
# torch cannot run stops the run with one line naming it and the fix. torch <= 2.2 APIs only.
import contextlib
import fcntl
import os
import platform
import sys
import tempfile
import traceback

import numpy as np
import PIL
import torch


PRECISIONS = ("fp32", "bf16", "fp16")


class RunError(RuntimeError):
    """A run that cannot start or go on; str() is one line naming the cause and the fix."""


def arch_supported(capability, arch_list):
    """Whether a torch build for arch_list runs on a GPU of this compute capability.

    A cubin for the same major version and an equal or lower minor (sm_80 runs on sm_86), or PTX
    (compute_XY) for an equal or lower capability, which the driver compiles at load time."""
    major, minor = capability
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit():
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def pick_device(name="auto", require_gpu=False):
    """The device to run on, checked before any real work. 'auto' takes CUDA when there is one.

    Raises RunError (one line, with the fix) when the GPU cannot run this torch build (its
    compute capability is not in torch.cuda.get_arch_list(), or a first tiny CUDA op fails), or
    when require_gpu (a Kaggle run) finds no GPU. An explicit 'cpu' always runs."""
    if name in ("", "auto", None):
        if not torch.cuda.is_available():
            if require_gpu:
                raise RunError("no GPU: this notebook runs without an accelerator. In the notebook's Settings, "
                               "Accelerator: pick 'GPU T4 x2' (not 'GPU P100': today's image cannot run it), then "
                               "run all again; --device cpu trains on the CPU anyway (far too slow to be worth a "
                               "submission)")
            return torch.device("cpu")
        name = "cuda"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise RunError(f"--device {name}: torch {torch.__version__} sees no CUDA GPU here; use --device cpu")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gpu = torch.cuda.get_device_name(device)
    cap = torch.cuda.get_device_capability(device)
    archs = torch.cuda.get_arch_list()
    if archs and not arch_supported(cap, archs):
        raise RunError(f"{gpu} (sm_{cap[0]}{cap[1]}) cannot run torch {torch.__version__}, which is built for "
                       f"{' '.join(archs)}: pick another accelerator ('GPU T4 x2' on Kaggle) or install a "
                       f"torch build that lists sm_{cap[0]}{cap[1]}")
    try:
        x = torch.arange(16, dtype=torch.float32, device=device)
        ok = float((x * 2).sum()) == 240.0
    except Exception as exc:  # "no kernel image is available", a broken driver, a busy GPU
        first = (str(exc).strip().splitlines() or [""])[0]
        raise RunError(f"{gpu} (sm_{cap[0]}{cap[1]}): a first CUDA operation failed with torch "
                       f"{torch.__version__} ({type(exc).__name__}: {first}); pick another accelerator "
                       "('GPU T4 x2' on Kaggle) or restart the session") from None
    if not ok:
        raise RunError(f"{gpu} (sm_{cap[0]}{cap[1]}): a first CUDA operation gave a wrong result with torch "
                       f"{torch.__version__}; pick another accelerator or restart the session")
    return device


def resolve_precision(requested, device):
    """(the precision that will run, one line saying why).

    bf16 only on GPUs that compute in it
    natively (compute capability 8.0+: A100, H100; torch.cuda.is_bf16_supported() also says yes
    where it is emulated, T4 and P100); fp16 (autocast + GradScaler) on any CUDA GPU. On the CPU
    both run as asked (slow there; fp16 needs torch.amp.GradScaler, torch 2.3+), for tests."""
    if requested not in PRECISIONS:
        raise RunError(f"precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    if requested == "fp32":
        return "fp32", "fp32" + (" (TF32 matmuls where the GPU has them)" if device.type == "cuda" else "")
    if device.type != "cuda":
        if requested == "fp16" and not hasattr(torch.amp, "GradScaler"):
            return "fp32", f"fp32 (fp16 on the CPU needs torch 2.3+, this is {torch.__version__})"
        return requested, f"{requested} autocast on the CPU (a test path: fp32 is faster on most CPUs)"
    cap = torch.cuda.get_device_capability(device)
    if requested == "bf16" and cap < (8, 0):
        return "fp32", (f"fp32 (bf16 asked, but {torch.cuda.get_device_name(device)} is sm_{cap[0]}{cap[1]}: "
                        "native bf16 needs sm_80+; --precision fp16 uses its fp16 units)")
    if requested == "bf16":
        return "bf16", "bf16 autocast (weights, optimiser state and the EMA in fp32)"
    return "fp16", "fp16 autocast with a loss scaler per optimiser (weights and the EMA in fp32)"


def make_grad_scaler(device, init_scale=2.0 ** 12):
    """A GradScaler for fp16 training (torch.amp's from 2.3, torch.cuda.amp's before). It starts
    at 2^12 rather than 2^16: fewer skipped steps at the start, and it grows when it can."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, init_scale=init_scale)
    return torch.cuda.amp.GradScaler(init_scale=init_scale)


def memory_gib():
    """Total RAM in GiB (0 when the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError, AttributeError):
        return 0.0


def machine_lines(device, precision_line=""):
    """The start-of-run report: software versions, the device and the host."""
    lines = [f"python     {platform.python_version()} | torch {torch.__version__} | numpy {np.__version__} "
             f"| Pillow {PIL.__version__}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"device     {device}: {props.name}, compute capability {props.major}.{props.minor}, "
                     f"{props.total_memory / 2 ** 30:.1f} GiB; {torch.cuda.device_count()} GPU(s) visible; "
                     f"CUDA {torch.version.cuda}")
    else:
        lines.append("device     cpu (no GPU in use)")
    lines.append(f"host       {os.cpu_count()} CPU cores, {memory_gib():.1f} GiB RAM, {sys.platform}")
    if precision_line:
        lines.append(f"precision  {precision_line}")
    return lines


RUN_LOCK = ".dogkit-run.lock"  # in a run folder while a run writes there: its process id


def claim_folder(folder):
    """Claim a run folder for this process before any work; returns the lock to release.

    Two runs on one --out would interleave their logs and checkpoints: the lock is an flock on a
    file in the folder holding the process id, so a running claimant is a RunError naming it and
    a killed run's lock is free (the system drops it with the process). release_folder() gives it
    back (and the folder, when this claim made it and the run left nothing in it)."""
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, RUN_LOCK)
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        pid = (fh.read().split() or ["?"])[0]
        fh.close()
        raise RunError(f"{folder}: another run (process {pid}) is writing there, its lock {path}; give another --out, "
                       f"or wait for it") from None
    fh.truncate(0)
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh, created


def release_folder(lock):
    """Give back a run folder claimed by claim_folder."""
    fh, created = lock
    with contextlib.suppress(OSError):
        os.remove(fh.name)
        if created and not os.listdir(os.path.dirname(fh.name)):
            os.rmdir(os.path.dirname(fh.name))
    fh.close()


def output_problem(path, folder=False):
    """Why path cannot be written as an output file (folder=True: folder), or None.

    Checked before any work: a folder (file) in its place, a link to nowhere (writing would replace
    the link with a file), a file above it, a folder above it not writable."""
    if os.path.islink(path) and not os.path.exists(path):
        return (f"{path}: a symbolic link to {os.readlink(path)}, which does not exist (remove the link or give "
                "another path)")
    path = os.path.abspath(path)
    if os.path.exists(path) and os.path.isdir(path) != folder:
        return f"{path}: is a {'file (give a folder)' if folder else 'folder (give a file name)'}"
    above = path if folder and os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above) or not os.access(above, os.W_OK | os.X_OK):
        return f"{path}: {above} is {'not writable' if os.path.isdir(above) else 'a file, not a folder'}"
    return None


# Exit codes, one table for every dogkit command and every kernel (README, "Exit codes"):
EXIT_BAD_INPUT = 1  # a path, file, setting or device that cannot be used: one line naming it and the rule
EXIT_USAGE = 2  # an unknown option, or a value its parser cannot read: the parser's line
EXIT_RANK_STOPPED = 3  # a rank of a multi-GPU run stopped because another failed (that one says why)
EXIT_TRAINING_FAILED = 4  # training broke off (NaN storm, clock, lost GPU): images.zip still written if it could be
BUG_EXIT = 70  # an exception nobody expected: a bug, its traceback in TRACEBACK_FILE
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: temporary files removed, a training run's checkpoint saved
TRACEBACK_FILE = os.path.join(tempfile.gettempdir(), "dogkit-traceback.txt")


def save_traceback(path=TRACEBACK_FILE):
    """Write the traceback of the exception being handled to path; returns path.

    The exception being handled, its whole traceback written to path (a bug's, for its report,
    while the user sees one line); returns path."""
    with open(path, "w") as fh:
        traceback.print_exc(file=fh)
    return path
