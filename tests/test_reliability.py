"""Resume after an interruption, skipping non-finite steps, checkpoint pruning, no secrets in run files."""

import json
import os
import signal

import pytest
import torch
from conftest import TINY_PIXELS

import train_sequential_attention as train_mod
from cli import config_from_dict
from model_loading import build_model


def run_args(synth_root, tiny_model_dir, out, *extra):
    return ["--data_root", synth_root, "--model_name_or_path", tiny_model_dir, "--batch_size", "2",
            "--lr", "3e-4", "--eval_every", "0", "--eval_images", "0", "--eval_states", "2", "--num_workers", "0",
            "--wandb_mode", "offline", "--output_dir", str(out), *TINY_PIXELS, *extra]


def step_losses(run_dir):
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r.get("loss_cls", r.get("loss_reg")) for r in records if "mode" in r}


def test_sigterm_saves_and_resume_reproduces_the_uninterrupted_losses(tmp_path, synth_root, tiny_model_dir,
                                                                      monkeypatch, capsys):
    # max_steps 12 over 9 batches per epoch: the interruption at step 5 is mid-epoch, the resume crosses an epoch.
    common = ["--max_steps", "12", "--save_every", "4"]
    assert train_mod.main(run_args(synth_root, tiny_model_dir, tmp_path / "a", *common)) == 0
    reference = step_losses(tmp_path / "a")

    real_step = train_mod.train_step
    calls = {"n": 0}

    def step_then_sigterm(*args, **kwargs):
        result = real_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # as a cluster scheduler would
        return result

    monkeypatch.setattr(train_mod, "train_step", step_then_sigterm)
    assert train_mod.main(run_args(synth_root, tiny_model_dir, tmp_path / "b", *common)) == 0
    out = capsys.readouterr().out
    assert "Interrupted by SIGTERM at step 5" in out and "--resume latest" in out
    assert os.path.isdir(tmp_path / "b" / "checkpoint-5")
    monkeypatch.setattr(train_mod, "train_step", real_step)

    assert train_mod.main(run_args(synth_root, tiny_model_dir, tmp_path / "b", *common, "--resume", "latest")) == 0
    resumed = step_losses(tmp_path / "b")
    assert sorted(resumed) == list(range(1, 13))  # steps logged after the checkpoint are not duplicated
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    state = torch.load(tmp_path / "b" / "checkpoint-last" / "training_state.pt", weights_only=True)
    state_a = torch.load(tmp_path / "a" / "checkpoint-last" / "training_state.pt", weights_only=True)
    assert state["step"] == 12 and state["wandb_run_id"]
    assert (state["epoch"], state["batch_in_epoch"]) == (state_a["epoch"], state_a["batch_in_epoch"])


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, synth_root, tiny_model_dir, capsys):
    code = train_mod.main(run_args(synth_root, tiny_model_dir, tmp_path / "c", "--max_steps", "2", "--resume", "latest"))
    assert code == 2
    assert "training_state.pt" in capsys.readouterr().err


def test_non_finite_steps_are_skipped_then_the_run_stops_with_a_checkpoint(tmp_path, synth_root, tiny_model_dir,
                                                                           monkeypatch, capsys):
    real_loss = train_mod.compute_loss
    monkeypatch.setattr(train_mod, "compute_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    out = tmp_path / "nan"
    code = train_mod.main(run_args(synth_root, tiny_model_dir, out, "--max_steps", "10", "--max_bad_steps", "3"))
    assert code == 1
    assert "3 consecutive steps had a non-finite loss" in capsys.readouterr().err
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    bad = [r for r in records if r.get("event") == "bad_step"]
    assert [r["step"] for r in bad] == [1, 2, 3] and all(len(r["image_ids"]) == 2 for r in bad)
    # No update was applied: the saved heads equal a freshly built model's.
    from safetensors.torch import load_file

    saved = load_file(out / "checkpoint-3" / "heads.safetensors")
    cfg = config_from_dict(train_mod.TrainConfig, json.load(open(out / "config.json")))
    fresh = build_model(cfg).head_state_dict()
    assert all(torch.equal(saved[k], fresh[k]) for k in fresh)


def test_save_total_limit_keeps_the_newest(tmp_path, synth_root, tiny_model_dir):
    out = tmp_path / "limit"
    assert train_mod.main(run_args(synth_root, tiny_model_dir, out, "--max_steps", "5", "--save_every", "1",
                                   "--save_total_limit", "2")) == 0
    kept = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-"))
    assert kept == ["checkpoint-4", "checkpoint-5", "checkpoint-last"]


def test_api_keys_never_reach_run_files(tmp_path, synth_root, tiny_model_dir, monkeypatch):
    secret = "0123456789abcdef-not-a-real-key-42"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", secret)
    out = tmp_path / "secret"
    assert train_mod.main(run_args(synth_root, tiny_model_dir, out, "--max_steps", "2")) == 0
    assert os.path.isdir(out / "wandb")
    for folder, _, files in os.walk(out):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                assert secret.encode() not in f.read(), os.path.join(folder, name)


STUCK_LOADER = """
import os, sys, time
sys.path.insert(0, {root!r})
import torch
from train_sequential_attention import TrainConfig, build_loader

class Stuck(torch.utils.data.Dataset):  # every item blocks: a worker busy when its run is killed
    def __len__(self):
        return 64

    def __getitem__(self, index):
        print("worker", os.getpid(), flush=True)
        time.sleep(3600)

next(iter(build_loader(TrainConfig(data_root="-", batch_size=2, num_workers=2), Stuck(), epoch=0)))
"""


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a dead child that its new parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc (Linux)")
def test_a_killed_run_leaves_no_dataloader_worker_behind():
    """SIGKILL the training loader's process while both workers are inside an item: the workers die with it
    (PyTorch's own check runs only between items, so without exit_with_parent they sleep on as orphans)."""
    import subprocess
    import sys
    import time

    from conftest import ROOT

    proc = subprocess.Popen([sys.executable, "-c", STUCK_LOADER.format(root=ROOT)], stdout=subprocess.PIPE, text=True)
    try:
        workers = {int(proc.stdout.readline().split()[1]) for _ in range(2)}  # both workers are in an item
        assert all(alive(pid) for pid in workers)
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in workers if alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)  # do not leave them behind the test either
        assert not left, f"DataLoader workers {left} outlived their killed parent"
    finally:
        proc.kill()
