"""The collectives of parallel.py put every tensor they send on the training device.

NCCL refuses CPU tensors, gloo takes both, and CI has no GPU: so these tests stand in a GPU device
(torch.device("cuda", 1) is only a name here) and record the device each tensor is made on, with the
process group mocked as two processes.
"""

import torch
import torch.distributed as dist

import parallel


def fake_two_processes(monkeypatch):
    """Two processes whose collectives do nothing (the other process contributes zeros); returns the
    devices asked for when tensors are made."""
    requested = []
    real_tensor = torch.tensor

    def tensor(data, *args, device=None, **kwargs):
        requested.append(device)
        return real_tensor(data, *args, **kwargs)  # made on the CPU: there is no GPU here

    monkeypatch.setattr(torch, "tensor", tensor)
    monkeypatch.setattr(parallel, "rank_and_world", lambda: (0, 2))
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: None)
    return requested


def test_collectives_make_their_tensors_on_the_training_device(monkeypatch):
    gpu = torch.device("cuda", 1)
    requested = fake_two_processes(monkeypatch)
    assert parallel.any_rank(gpu, True, False) == [True, False]
    assert parallel.sum_over_processes(gpu, 2, 3) == [2.0, 3.0]
    assert parallel.mean_over_processes(gpu, 4.0) == 2.0  # 4 here + 0 from the mocked other process, over 2
    assert requested == [gpu, gpu, gpu]


def test_gradient_average_stays_on_the_gradients_device(monkeypatch):
    seen = []
    monkeypatch.setattr(parallel, "rank_and_world", lambda: (0, 2))
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: seen.append(t.device))
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 4.0)
    parallel.average_gradients([p])
    assert seen == [p.grad.device] and p.grad.tolist() == [2.0, 2.0, 2.0]  # own 4 + mocked 0, over 2


def test_single_process_needs_no_group():
    assert parallel.rank_and_world() == (0, 1)
    assert parallel.any_rank(torch.device("cpu"), 0, 1) == [False, True]
    assert parallel.gather_to_rank0([1, 2]) == [1, 2]
    assert parallel.mean_over_processes(torch.device("cpu"), 3.5) == 3.5
