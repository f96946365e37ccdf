"""The collectives of parallel.py put every tensor they send on the training device.

NCCL refuses CPU tensors, gloo takes both, and CI has no GPU: so these tests stand in a GPU device
(torch.device("cuda", 1) is only a name here) and record the device each tensor is made on, with the
process group mocked as two processes.
"""

import pytest
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

    def all_reduce(t, op=None):  # the other process holds the same tensor: the sum doubles it
        seen.append(t.device)
        t.mul_(2)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([4.0, 2.0, 0.0])
    parallel.average_gradients([p])
    # First which parameters have gradients (the same on both), then the gradients: both on the gradients' device.
    assert seen == [p.grad.device, p.grad.device] and p.grad.tolist() == [4.0, 2.0, 0.0]


def test_gradients_for_different_parameters_stop_every_process(monkeypatch):
    monkeypatch.setattr(parallel, "rank_and_world", lambda: (0, 2))
    reduced = []

    def all_reduce(t, op=None):  # the other process has a gradient for b, not for a
        reduced.append(t.clone())
        t.add_(torch.tensor([0.0, 1.0]))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    a.grad = torch.ones(2)
    with pytest.raises(parallel.ProcessFailure, match="different parameters"):
        parallel.average_gradients([a, b])
    assert len(reduced) == 1  # stopped before all-reducing gradient buffers of different sizes


def test_a_failure_on_one_process_is_raised_on_every_process_with_its_message(monkeypatch):
    monkeypatch.setattr(parallel, "rank_and_world", lambda: (0, 2))
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: t.fill_(1.0))  # rank 1 says it failed
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj, "planted"]))
    with pytest.raises(parallel.ProcessFailure, match="step 3: rank 1 failed: planted"):
        parallel.raise_if_any_failed(torch.device("cpu"), None, "step 3")
    with pytest.raises(parallel.ProcessFailure, match="rank 1 failed: planted"):  # rank 0 ran its block fine
        with parallel.shared_failures(torch.device("cpu")):
            pass
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: None)  # nobody failed
    parallel.raise_if_any_failed(torch.device("cpu"), None)
    oom = parallel.describe_failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried"), "lower --batch_size")
    assert oom == "out of GPU memory; lower --batch_size"


def test_nccl_group_is_bound_to_the_process_gpu(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    parallel.init_distributed("auto")
    parallel.init_distributed("cpu")
    assert calls == [("nccl", {"device_id": torch.device("cuda", 1)}), ("gloo", {})]


def test_each_process_resumes_its_own_rng_state():
    import random

    import numpy as np

    cpu = torch.device("cpu")
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    saved = parallel.rng_state(cpu)
    expected = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    parallel.set_rng_state(torch.load(save_to_bytes(saved), weights_only=True), cpu)  # through the checkpoint format
    assert torch.equal(torch.rand(2), expected[0])
    assert np.array_equal(np.random.rand(2), expected[1]) and random.random() == expected[2]


def save_to_bytes(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_single_process_needs_no_group():
    assert parallel.rank_and_world() == (0, 1)
    assert parallel.any_rank(torch.device("cpu"), 0, 1) == [False, True]
    assert parallel.gather_to_rank0([1, 2]) == [1, 2]
    assert parallel.mean_over_processes(torch.device("cpu"), 3.5) == 3.5
