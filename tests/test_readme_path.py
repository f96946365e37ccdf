"""The README's FSC-147 path, command by command, on a tiny FSC-147-layout folder with the tiny Qwen2-VL standing in
for the weights: the README cannot drift from the code. The commands are read from the README itself; only the
paths are swapped for the stand-ins and each script gets a few flags that make it quick."""

import json
import os
import re
import subprocess
import sys

from PIL import Image

from conftest import ROOT

QUICK = {  # appended per script: tiny budgets and the tiny model's pixel bounds
    "run_sequential_attention.sh": ["--max_steps", "4", "--eval_every", "2", "--eval_images", "2", "--max_count", "3",
                                    "--save_every", "2", "--num_workers", "0", "--min_pixels", "3136",
                                    "--max_pixels", "50176"],
    "evaluate_counting.py": ["--max_count", "3"],
    "count_objects.py": ["--max_count", "3"],
}


def readme_path_commands() -> list[str]:
    """The lines of the bash block under "## From FSC-147 on disk", trailing comments removed."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("## From FSC-147 on disk"):]
    start = section.index("```bash") + len("```bash")
    block = section[start:section.index("```", start)]
    return [re.sub(r"\s+#\s.*$", "", line).strip() for line in block.strip().splitlines()]


def test_the_readme_fsc147_path_runs_on_a_tiny_stand_in(tmp_path, synth_root, tiny_model_dir):
    commands = readme_path_commands()
    assert len(commands) >= 5 and commands[0] == "make venv"  # the environment; `make -n venv` is tested elsewhere
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (160, 120), (90, 120, 60)).save(photo)
    swaps = {"/data/FSC147": synth_root, "/models/Qwen2-VL-2B-Instruct": tiny_model_dir,
             "runs/sequential": str(tmp_path / "runs"), "photo.jpg": str(photo), "--out_dir counted":
             f"--out_dir {tmp_path / 'counted'}", ".venv/bin/python": sys.executable}
    env = {**os.environ, "PYTHON": sys.executable, "OUTPUT_DIR": str(tmp_path / "runs"), "WANDB_MODE": "offline"}
    for command in commands[1:]:
        for old, new in swaps.items():
            command = command.replace(old, new)
        script = next((s for s in QUICK if s in command), None)
        extra = QUICK.get(script, [])
        if "--resume latest" in command:
            extra = [*extra, "--max_steps", "6"]  # goes on past the first run's 4 steps
        proc = subprocess.run(f"{command} {' '.join(extra)}", shell=True, cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    run = tmp_path / "runs"
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl") if '"mode"' in line]
    assert steps == list(range(1, 7))  # 4 steps, then 2 more after the resume, none twice
    results = json.load(open(run / "eval-test" / "results.json"))["summary"]
    assert results["split"] == "test" and results["protocol"] == "text" and results["complete"] is True
    assert results["threshold_tuning"]["split"] == "val" and results["done_threshold"] == results["threshold_tuning"]["chosen"]
    points = json.load(open(tmp_path / "counted" / "photo_points.json"))
    assert points["class_name"] == "sea shells" and points["count"] == len(points["points"]) <= 3
    assert os.path.exists(tmp_path / "counted" / "photo_counted.png")


def test_the_launcher_needs_an_fsc147_data_root(tmp_path):
    script = os.path.join(ROOT, "run_sequential_attention.sh")
    env = {k: v for k, v in os.environ.items() if k != "DATA_ROOT"}
    unset = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert unset.returncode == 2 and "set DATA_ROOT" in unset.stderr
    wrong = subprocess.run(["bash", script], env={**env, "DATA_ROOT": str(tmp_path)}, capture_output=True, text=True,
                           timeout=60)
    assert wrong.returncode == 2 and "is not an FSC-147 folder" in wrong.stderr and "images_384_VarV2" in wrong.stderr
    helped = subprocess.run(["bash", script, "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0
    for variable in ("DATA_ROOT", "MODEL", "PYTHON", "OUTPUT_DIR", "LR", "BATCH_SIZE", "NUM_GPUS"):
        assert f"  {variable} " in helped.stdout
