"""Several processes: `accelerate launch` with 2 CPU processes (gloo) on the tiny model."""

import dataclasses
import glob
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_PIXELS

import checkpoints
import train_sequential_attention as train_mod
from dataset_fsc147 import FSC147Dataset, prepare_batch
from model_loading import HEADS_FILE
from test_bad_data import corpus_root  # noqa: F401,F811 (a fixture)


def test_ranks_load_disjoint_slices_of_each_global_batch(train_config):
    ds = FSC147Dataset(train_config.data_root, "train")
    cfg2 = dataclasses.replace(train_config, batch_size=2)
    cfg4 = dataclasses.replace(train_config, batch_size=4)
    ids = lambda cfg, rank, world, start=0: [[s.id for s in b] for b in train_mod.build_loader(cfg, ds, 1, start, rank, world)]
    rank0, rank1, single = ids(cfg2, 0, 2), ids(cfg2, 1, 2), ids(cfg4, 0, 1)
    assert len(rank0) == len(rank1) == len(single) == len(ds) // 4
    for a, b, whole in zip(rank0, rank1, single):
        assert not set(a) & set(b)  # the two processes see different images
        assert a + b == whole  # and together the global batch of one process with batch 4
    assert ids(cfg2, 1, 2, start=2) == rank1[2:]  # resume mid-epoch keeps the partition


def test_prepare_batch_slices_equal_the_global_batch(synth_root):
    ds = FSC147Dataset(synth_root, "train")
    samples = [ds[i] for i in range(6)]
    for mode in ("cls", "reg"):
        for strategy in ("reading_order", "nearest"):
            whole = prepare_batch(samples, mode, np.random.default_rng(7), strategy)
            parts = [prepare_batch(samples[o:o + 3], mode, np.random.default_rng(7), strategy, offset=o, global_size=6)
                     for o in (0, 3)]
            assert torch.equal(whole.done, torch.cat([p.done for p in parts]))
            assert [len(c) for c in whole.counted] == [len(c) for p in parts for c in p.counted]
            for a, b in zip(whole.counted, [c for p in parts for c in p.counted]):
                np.testing.assert_array_equal(a, b)
            for i, p in enumerate(parts):
                m = p.targets.shape[1]
                assert torch.equal(whole.targets[3 * i:3 * i + 3, :m], p.targets)
    with pytest.raises(ValueError, match="do not fit"):
        prepare_batch(samples, "cls", np.random.default_rng(0), offset=2, global_size=6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args(synth_root, tiny_model_dir, out, batch_size):
    # lr 1e-3: a wrong data partition moves the weights by ~1e-3 per step, far above float noise. Regression
    # pointing: its loss is a mean over states, so the mean of two processes' halves is the global batch's loss
    # exactly; token pointing's dense terms average over the image tokens of each process's images, whose number
    # differs between halves (as with any per-process mean under data parallelism).
    return ["--pointing", "regress", "--data_root", synth_root, "--model_name_or_path", tiny_model_dir,
            "--batch_size", str(batch_size),
            "--max_steps", "4", "--lr", "1e-3", "--lora_dropout", "0", "--eval_every", "0", "--eval_images", "0",
            "--eval_states", "2", "--save_every", "2", "--num_workers", "0", "--device", "cpu",
            "--wandb_mode", "offline", "--output_dir", str(out), *TINY_PIXELS]


def weights(checkpoint):
    from safetensors.torch import load_file

    return {**load_file(os.path.join(checkpoint, "adapter_model.safetensors")),
            **load_file(os.path.join(checkpoint, HEADS_FILE))}


def distance(a, b) -> float:
    """L2 distance between two sets of weights, over all tensors."""
    assert a.keys() == b.keys()
    return sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a) ** 0.5


def launch_two_processes(train_args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), os.path.join(ROOT, "train_sequential_attention.py"), *train_args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_processes_share_the_counting_evaluation_and_sum_their_skips(tmp_path, corpus_root, tiny_model_dir):
    root, _ = corpus_root
    out = tmp_path / "bad"
    # One epoch of the 32 usable training entries (global batch 8, workers decoding): the 6 unusable images are
    # met once each, by one process or the other; the counting evaluation's 3 images are split 2 + 1.
    proc = launch_two_processes(["--data_root", root, "--model_name_or_path", tiny_model_dir, "--batch_size", "4",
                                 "--max_steps", "4", "--eval_every", "0", "--eval_images", "3", "--max_count", "2",
                                 "--eval_states", "2", "--num_workers", "2", "--device", "cpu", "--wandb_mode",
                                 "disabled", "--output_dir", str(out), *TINY_PIXELS])
    assert "Done: 4 steps (6 images skipped" in proc.stdout
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    end = [r for r in records if r.get("event") == "end"][0]
    assert end["skipped_images"] == 6 and end["val/count_n_images"] == 3


def test_accelerate_launch_two_cpu_processes_equals_one_process_with_the_global_batch(tmp_path, synth_root,
                                                                                       tiny_model_dir):
    proc = launch_two_processes(args(synth_root, tiny_model_dir, tmp_path / "ddp", 2))
    assert "2 processes, global batch 4" in proc.stdout
    assert proc.stdout.count("Done: 4 steps") == 1  # rank 0 reports, rank 1 stays quiet

    assert train_mod.main(args(synth_root, tiny_model_dir, tmp_path / "single", 4)) == 0
    assert train_mod.main(args(synth_root, tiny_model_dir, tmp_path / "half", 2)) == 0  # a different global batch

    ddp, single = weights(tmp_path / "ddp" / "checkpoint-last"), weights(tmp_path / "single" / "checkpoint-last")
    control = weights(tmp_path / "half" / "checkpoint-last")
    # Not bit-equal: batch size changes the CPU matmul blocking (~1e-7 in the loss), and Adam's first
    # update of a weight is lr * sign(gradient), so a near-zero gradient element can flip by 2 lr. Measured:
    # distance to the single process 0.011, the control's 0.70.
    assert distance(ddp, single) < 0.05 * distance(control, single)

    # Rank 0 alone writes: one metrics line per step, one W&B run, the checkpoints of one run.
    records = [json.loads(line) for line in open(tmp_path / "ddp" / "metrics.jsonl")]
    assert sorted(r["step"] for r in records if "mode" in r) == [1, 2, 3, 4]
    single_records = [json.loads(line) for line in open(tmp_path / "single" / "metrics.jsonl")]
    loss = lambda rs: [r.get("loss_cls", r.get("loss_reg")) for r in rs if "mode" in r]
    np.testing.assert_allclose(loss(records), loss(single_records), rtol=1e-2)  # the mean over both processes
    assert all(r["samples_per_s"] > 0 for r in records if "mode" in r)
    assert len(glob.glob(str(tmp_path / "ddp" / "wandb" / "offline-run-*"))) == 1
    assert sorted(os.listdir(tmp_path / "ddp")) == sorted(os.listdir(tmp_path / "single"))


def test_every_process_resumes_from_its_own_rng_states():
    saved = {"rng": {"torch": "rank 0"}, "rng_per_rank": [{"torch": "rank 0"}, {"torch": "rank 1"}]}
    assert checkpoints.rng_for_rank(saved, 1, 2) == {"torch": "rank 1"}
    assert checkpoints.rng_for_rank(saved, 0, 3) == {"torch": "rank 0"}  # another process count: rank 0's
    assert checkpoints.rng_for_rank({"rng": {"torch": "old"}}, 0, 1) == {"torch": "old"}  # a checkpoint from before


PLANTED = """
import os, sys, torch
sys.path.insert(0, {root!r})
import train_sequential_attention as t

real = t.batch_loss
def batch_loss(model, batch, device, *args, **kwargs):
    # rank 1 fails at its second step; rank 0 goes on to the gradient all-reduce
    if int(os.environ.get("RANK", "0")) == 1 and getattr(batch_loss, "calls", 0) >= 1:
        raise {error}
    batch_loss.calls = getattr(batch_loss, "calls", 0) + 1
    return real(model, batch, device, *args, **kwargs)
t.batch_loss = batch_loss
sys.exit(t.main(sys.argv[1:]))
"""


def launch(script, train_args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(script), *train_args]
    # The timeout guards against the hang this is about (NCCL waits 30 minutes for a dead peer); both processes
    # start, load the tiny model and fail in well under a minute of it.
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("error, message", [
    ('RuntimeError("planted failure")', "rank 1 failed: RuntimeError: planted failure"),
    ('torch.cuda.OutOfMemoryError("CUDA out of memory")', "rank 1 failed: out of GPU memory; batch 2: lower --max_pixels"),
])
def test_a_failure_on_one_process_stops_both_with_its_message(tmp_path, synth_root, tiny_model_dir, error, message):
    script = tmp_path / "planted.py"
    script.write_text(PLANTED.format(root=ROOT, error=error))
    proc = launch(script, args(synth_root, tiny_model_dir, tmp_path / "run", 2))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    # Both processes stop at step 2 with rank 1's message; rank 0 does not die in the collective.
    assert len(errors) == 2 and all(f"step 2: forward and backward: {message}" in e for e in errors), proc.stderr[-3000:]
    assert "Connection closed by peer" not in proc.stderr and "Done:" not in proc.stdout


def test_a_split_smaller_than_one_global_batch_is_refused_by_every_process(tmp_path, synth_root, tiny_model_dir):
    # 18 training images, 2 processes x 16: one process would get none.
    proc = launch(os.path.join(ROOT, "train_sequential_attention.py"), args(synth_root, tiny_model_dir, tmp_path / "r", 16))
    assert proc.returncode != 0 and "Done:" not in proc.stdout
    assert proc.stderr.count("fewer than one global batch (16 x 2 processes)") == 2, proc.stderr[-3000:]
