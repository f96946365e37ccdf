"""Run reports: the loss trend printed at the end of training."""

import json

import numpy as np

from run_logging import loss_trend


def test_loss_trend_reads_first_and_last_fifth(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        for step in range(1, 21):
            mode = "cls" if step % 2 else "reg"
            f.write(json.dumps({"step": step, f"loss_{mode}": float(20 - step)}) + "\n")
        f.write(json.dumps({"step": 20, "event": "eval", "loss_cls": 100.0}) + "\n")
    trend = loss_trend(str(path))
    assert trend["cls"] == (np.mean([19, 17]), np.mean([3, 1]))
    assert trend["reg"][0] > trend["reg"][1]
