"""Several processes (`accelerate launch` / torchrun): joining the group, the few collectives training needs,
and the stop signals each process catches.

Every function is a no-op (or the identity) in a single process, so the training loop calls them
unconditionally. Every tensor a collective sends lives on `device`, the process's training device:
NCCL (GPUs) refuses CPU tensors ("No backend type associated with device type cpu"), gloo (CPU)
takes either, so a CPU-only test would not notice a CPU tensor; `tests/test_parallel.py` records the
device of each tensor sent.
"""

from __future__ import annotations

import os

import torch


def init_distributed(device: str) -> tuple[int, int]:
    """Join the process group that `accelerate launch` (or torchrun) describes in the environment.

    `device` is the config's --device. Returns (rank, world size); (0, 1) when started as a single process.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        gpu = device != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if gpu else "gloo")
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
    methods. The processes run the same step mode, so the same parameters have gradients everywhere.
    """
    _, world = rank_and_world()
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    import torch.distributed as dist

    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


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
