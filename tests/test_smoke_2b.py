"""The prepared GPU check (make gpu-check): it stops cleanly without a GPU, names missing packages, and its
measurements run end to end (on the tiny model and the CPU, with --no-require_gpu)."""

import json
import os

import pytest
import torch
from conftest import TINY_PIXELS

import smoke_2b


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_check_stops_with_a_message_without_a_gpu(tmp_path, capsys):
    model_dir = tmp_path / "model"
    assert smoke_2b.main(["--gpu_check", "--model_dir", str(model_dir), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "the GPU check needs a CUDA GPU" in err and "Traceback" not in err
    assert not model_dir.exists() and not (tmp_path / "out" / "gpu.json").exists()  # stopped before building anything


def test_missing_packages_are_named_and_installed_from_wheels_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(smoke_2b, "REQUIRED", {**smoke_2b.REQUIRED, "not_a_module_here": "not-a-package-here"})
    assert smoke_2b.main(["--gpu_check", "--output_dir", str(tmp_path)]) == 2
    assert "missing packages: not-a-package-here" in capsys.readouterr().err
    wheels = tmp_path / "wheels"
    wheels.mkdir()  # no wheel of it there: pip (offline) fails, and says so
    assert smoke_2b.main(["--gpu_check", "--wheels", str(wheels), "--output_dir", str(tmp_path)]) == 2
    assert "installing not-a-package-here from" in capsys.readouterr().err


def test_gpu_check_measurements_run_on_the_tiny_model(tmp_path, tiny_model_dir):
    out = tmp_path / "check"
    assert smoke_2b.main(["--gpu_check", "--no-require_gpu", "--device", "cpu", "--model_dir", tiny_model_dir,
                          "--output_dir", str(out), "--image_height", "112", "--image_width", "140", "--steps", "1",
                          "--count_steps", "2", *TINY_PIXELS]) == 0
    result = json.load(open(out / "gpu.json"))
    for setting in ("no_checkpointing", "gradient_checkpointing"):
        r = result[setting]
        assert r["train_step_s"] > 0 and r["bare_forward_backward_s"] > 0
        assert r["step_over_bare"] == pytest.approx(r["train_step_s"] / r["bare_forward_backward_s"])
    assert result["count_batch_1"]["images_per_s"] > 0 and result["count_batch_8"]["forwards_per_s"] > 0
    dtypes = result["compute_dtypes"]  # fp32 on the CPU; bf16 on a GPU
    assert dtypes["vision_qkv"] == dtypes["language_model_q_proj"] == dtypes["done_logit"] == "torch.float32"
    assert len(result["goals"]) == 2 and os.path.exists(out / "gpu.json")
