"""Several processes (`accelerate launch` / torchrun): joining the group, the few collectives training needs,
the stop signals each process catches, and DataLoader workers that die with their run.

Every function is a no-op (or the identity) in a single process, so the training loop calls them
unconditionally. Every tensor a collective sends lives on `device`, the process's training device:
NCCL (GPUs) refuses CPU tensors ("No backend type associated with device type cpu"), gloo (CPU)
takes either, so a CPU-only test would not notice a CPU tensor; `tests/test_parallel.py` records the
device of each tensor sent.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch

logger = logging.getLogger(__name__)


class ProcessFailure(Exception):
    """A process failed; every process raises this, with every failing process's message, at the same point."""


def init_distributed(device: str) -> tuple[int, int]:
    """Join the process group that `accelerate launch` (or torchrun) describes in the environment.

    `device` is the config's --device. Returns (rank, world size); (0, 1) when started as a single process.
    With NCCL the group is bound to this process's GPU (device_id), so it knows its device from the start
    instead of guessing it at the first collective.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device != "cpu" and torch.cuda.is_available():
            dist.init_process_group("nccl", device_id=torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
        else:
            dist.init_process_group("gloo")
    return rank_and_world()


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def any_rank(device: torch.device, *flags: bool) -> list[bool]:
    """Each flag, true when it is true on any process (so every process takes the same branch)."""
    if rank_and_world()[1] == 1:
        return [bool(f) for f in flags]
    import torch.distributed as dist

    t = torch.tensor([float(bool(f)) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def sum_over_processes(device: torch.device, *values: float) -> list[float]:
    """Each number summed over processes (e.g. images each process skipped)."""
    if rank_and_world()[1] == 1:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def mean_over_processes(device: torch.device, value: float) -> float:
    """The mean of a number over processes (the loss each process computed on its slice)."""
    world = rank_and_world()[1]
    return value if world == 1 else sum_over_processes(device, value)[0] / world


def gather_to_rank0(items: list) -> list:
    """Concatenate every process's list of picklable items on rank 0 (other ranks get []).

    all_gather_object pickles through tensors on the current CUDA device under NCCL, which
    `model_loading.resolve_device` sets for each process.
    """
    rank, world = rank_and_world()
    if world == 1:
        return list(items)
    import torch.distributed as dist

    gathered = [None] * world
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part] if rank == 0 else []


def describe_failure(error: BaseException, oom_hint: str = "") -> str:
    """One line for an exception: an out-of-memory error with what to change, anything else by type and text."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "out of GPU memory" + (f"; {oom_hint}" if oom_hint else "")
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")


def raise_if_any_failed(device: torch.device, failure: str | None, where: str = "") -> None:
    """A collective: every process calls it with its own failure (or None). When any process failed, every
    process raises ProcessFailure naming each failing rank and its message; else it returns.

    Without it a process that fails leaves the others waiting in their next collective until the timeout
    (NCCL: 30 minutes by default), with the reason only in the failed process's log.
    """
    rank, world = rank_and_world()
    prefix = f"{where}: " if where else ""
    if world == 1:
        if failure is not None:
            raise ProcessFailure(prefix + failure)
        return
    if not any_rank(device, failure is not None)[0]:
        return
    import torch.distributed as dist

    messages = [None] * world
    dist.all_gather_object(messages, failure)
    raise ProcessFailure(prefix + "; ".join(f"rank {r} failed: {m}" for r, m in enumerate(messages) if m is not None))


@contextmanager
def shared_failures(device: torch.device, where: str = "", oom_hint: str = ""):
    """Run a block on every process; if it raises on any of them, every process raises ProcessFailure when the
    block ends (the others after finishing theirs), so all stop together with the message. The exception's
    traceback is logged on the process where it happened."""
    failure = None
    try:
        yield
    except Exception as e:  # KeyboardInterrupt and SystemExit are not failures to share
        logger.exception("rank %d: %s failed", rank_and_world()[0], where or "a step")
        failure = describe_failure(e, oom_hint)
    raise_if_any_failed(device, failure, where)


def barrier() -> None:
    if rank_and_world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def sync_parameters(model) -> None:
    """Every process starts from rank 0's trainable weights (they are seeded alike; this makes it certain)."""
    if rank_and_world()[1] == 1:
        return
    import torch.distributed as dist

    for p in model.parameters():
        if p.requires_grad:
            dist.broadcast(p.data, src=0)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """The mean gradient over processes, in one all_reduce (what DDP does); the gradients' own device.

    Not DistributedDataParallel's wrapper: a cls step leaves the x/y heads without gradient and a reg
    step the done_head (DDP would need find_unused_parameters), and the wrapper hides the model's own
    methods. The processes run the same step mode, so the same parameters should have gradients
    everywhere; a first all_reduce checks it, since all-reducing buffers of different sizes would hang or
    mix unrelated gradients.
    """
    _, world = rank_and_world()
    if world == 1:
        return
    import torch.distributed as dist

    device = next((p.grad.device for p in params if p.grad is not None), params[0].device if params else "cpu")
    has = torch.tensor([float(p.grad is not None) for p in params], device=device)
    dist.all_reduce(has)
    uneven = [i for i, n in enumerate(has.tolist()) if n not in (0.0, float(world))]
    if uneven:
        raise ProcessFailure(f"the processes have gradients for different parameters ({len(uneven)} of {len(params)}, "
                             f"e.g. parameter #{uneven[0]}): they did not run the same step")
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return

    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def rng_state(device: torch.device) -> dict:
    """This process's RNG states (torch, this GPU's CUDA generator, numpy's and Python's global ones) as
    tensors and numbers, which `torch.load(weights_only=True)` reads back."""
    import random

    import numpy as np

    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "gauss": float(gauss)},
             "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what `rng_state` saved (an older checkpoint's torch/CUDA states only)."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if isinstance(state.get("numpy"), dict):
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if isinstance(state.get("python"), dict):
        py = state["python"]
        random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))


PR_SET_PDEATHSIG = 1  # prctl(2) option (Linux): the signal a process gets when its parent dies


def exit_with_parent(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: the kernel kills this worker when the process that started it dies.

    PyTorch's workers notice a dead parent only between items (every 5 s in their queue loop); one blocked in
    an item or in handing a batch to a parent that is gone (a full pipe) outlives a SIGKILLed run as an idle
    orphan. Linux only; elsewhere a no-op."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the death signal was set
        os._exit(1)


def install_stop_handlers() -> tuple[dict, dict]:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the end of the step and returns.

    Each process sees its own signal; the loop shares it with `any_rank` so all processes stop at the same step.
    """
    import signal

    flag = {"signal": None}
    previous = {}

    def handler(signum, frame):
        flag["signal"] = signal.Signals(signum).name

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: no handlers, Ctrl-C behaves as usual
            pass
    return flag, previous
