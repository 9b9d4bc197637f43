# ---------------------------------------------------------------------------------------------
# Several GPUs: one process per GPU, torch.distributed (NCCL between GPUs, gloo on the CPU)
# ---------------------------------------------------------------------------------------------
# The kernel forks one process per GPU (a notebook's functions cannot be imported by a spawned one;
# GPUs are counted through NVML, as CUDA would not survive a fork); `dogkit train` runs under
# torchrun. Each optimiser's step averages the gradients first (average_in_step), however a model's
# step calls it, so every rank's G, D and EMA stay identical; each rank draws its own batches (the
# global batch: per-GPU batch x ranks). A gloo group carries rank 0's clock, which decides every
# stop, log line and checkpoint, and any rank's failure. Rank 0 writes every file. torch <= 2.2 APIs.
import datetime
import io
import os
import socket
import sys

import torch
import torch.distributed as dist

STEP_TIMEOUT = datetime.timedelta(minutes=5)  # a collective of the training step: a lost rank
CONTROL_TIMEOUT = datetime.timedelta(minutes=60)  # rank 0 alone: cleaning, interim zips, the end


class World:
    """This process's place in the run: its rank, the number of ranks, the control group.

    This process's place in the run: its rank, how many ranks, and the CPU (gloo) group that
    carries control messages (None when alone)."""

    def __init__(self, rank=0, size=1, control=None):
        self.rank, self.size, self.control = rank, size, control

    @property
    def main(self):
        return self.rank == 0


ALONE = World()


def visible_gpus():
    """GPUs this process could use, counted without starting CUDA (NVML), so it can still fork."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_world(rank, size, device, port=None):
    """Join the process group (NCCL on CUDA, gloo on the CPU) and create the control group.

    port None: torchrun's environment (MASTER_ADDR, MASTER_PORT) says where rank 0 listens."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # a collective that times out (a lost peer) aborts this process instead of hanging it:
        # the parent then samples the last checkpoint
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    init = f"tcp://127.0.0.1:{port}" if port else "env://"
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init, rank=rank,
                            world_size=size, timeout=STEP_TIMEOUT)
    return World(rank, size, dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT))


def leave_world(world):
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def agree(world, now, failed=False):
    """(rank 0's clock reading, 1 + the highest failed rank or 0): what every rank decides by.
    One all_reduce of two numbers on the CPU group: the ranks never disagree on when to log,
    checkpoint or stop, and a rank that failed stops the others at their next step."""
    if world.size == 1:
        return now, int(failed)
    msg = torch.tensor([now if world.main else -1e300, world.rank + 1.0 if failed else 0.0], dtype=torch.float64)
    dist.all_reduce(msg, op=dist.ReduceOp.MAX, group=world.control)
    return float(msg[0]), int(msg[1])


def average_gradients(params, world):
    """Average the gradients over the ranks: one all_reduce of all of them, flattened."""
    grads = [p.grad for p in params if p.grad is not None]
    if world.size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def average_in_step(opt, world):
    """Make opt.step average the gradients over the ranks first, however a model's step calls it.

    Make opt.step average the gradients over the ranks first (one all_reduce), so a model's
    step may call loss.backward(); opt.step() itself and the ranks never drift apart, as
    DistributedDataParallel guarantees. opt.average_now() averages ahead of the step (fp16: before
    the loss scaler looks for an inf) so the step does not average again; it returns the call that
    forgets this when the scaler skipped the step, so the next step averages its own gradients."""
    params = [p for group in opt.param_groups for p in group["params"]]
    step, done = opt.step, [False]

    def average_now():
        average_gradients(params, world)
        done[0] = True
        return lambda: done.__setitem__(0, False)

    def averaged_step(*args, **kwargs):
        if not done[0]:
            average_gradients(params, world)
        done[0] = False
        return step(*args, **kwargs)

    opt.step, opt.average_now = averaged_step, average_now


def all_mean(tensors, world):
    """The mean over the ranks of a list of 0-d tensors (the logged losses), same on every rank."""
    if world.size == 1 or not tensors:
        return tensors
    flat = torch.stack([t.float() for t in tensors])
    dist.all_reduce(flat)
    return list(flat / world.size)


def broadcast_state(modules, world):
    """Rank 0's parameters and buffers to every rank (a common start, and after a resume)."""
    if world.size == 1:
        return
    with torch.no_grad():
        for module in modules:
            for t in module.state_dict().values():
                dist.broadcast(t, 0)


def share_object(obj, world):
    """Rank 0's picklable object on every rank (through the CPU group)."""
    if world.size == 1:
        return obj
    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0, group=world.control)
    return box[0]


def on_main(fn, world):
    """fn() on rank 0 alone (data cleaning, the end's timing), its result on every rank. When it
    raises, rank 0 raises that and the other ranks RankStopped."""
    if world.size == 1:
        return fn()
    result = failed = None
    if world.main:
        try:
            result = fn()
        except BaseException as exc:
            failed = exc
    ok, result = share_object((failed is None, result), world)
    if failed is not None:
        raise failed
    if not ok:
        raise RankStopped("rank 0 stopped")
    return result


def gather_objects(obj, world):
    """Every rank's object, in rank order, on rank 0 (None elsewhere)."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size if world.main else None
    dist.gather_object(obj, out, dst=0, group=world.control)
    return out


def all_objects(obj, world):
    """Every rank's object, in rank order, on every rank."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj, group=world.control)
    return out


class RankStopped(RuntimeError):
    """This rank stops because another one failed (that rank reports why)."""


def launch(target, size, device_type, args):
    """Fork one process per rank and wait for them; returns their exit codes in rank order.

    Fork one process per rank, each running target(world, device, *args) after joining the
    group; returns their exit codes in rank order. Once rank 0 has exited the others get a
    minute to follow, then are stopped; Ctrl-C (or SIGTERM) here stops them all."""
    ctx = torch.multiprocessing.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(target, rank, size, port, device_type, args))
             for rank in range(size)]
    for p in procs:
        p.start()
    try:
        procs[0].join()
        for p in procs[1:]:
            p.join(60)
    finally:
        stop_processes(procs)
    return [p.exitcode for p in procs]


def plain_streams():
    """Point a forked rank's sys.stdout and sys.stderr at the file descriptors 1 and 2.

    In a notebook sys.stdout is the kernel's message channel (ipykernel's OutStream), which a
    forked process must not use, and whose fileno() is a copy of the terminal's, not the cell's:
    write to the file descriptors 1 and 2 instead (ipykernel forwards those to the cell). Not
    open(): in a notebook's namespace it is IPython's, which refuses them."""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        if not isinstance(getattr(sys, name), io.TextIOWrapper):
            setattr(sys, name, os.fdopen(fd, "w", buffering=1, closefd=False))


def stop_processes(procs, grace=60):
    """SIGTERM (each rank saves what it can), then SIGKILL after `grace` seconds."""
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.terminate()
    for p in alive:
        p.join(grace)
        if p.is_alive():
            p.kill()
            p.join()


def _rank_main(target, rank, size, port, device_type, args):
    plain_streams()
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    world = join_world(rank, size, device, port)
    code = target(world, device, *args)
    if code == 0:  # after a failure a peer may be gone: no teardown handshake, just exit
        leave_world(world)
    raise SystemExit(code)
