"""Run reports: the loss trend printed at the end of training."""

import json

import numpy as np

from run_logging import grad_norms, loss_trend


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


def test_grad_norms_read_back_once_by_hand(monkeypatch):
    import torch

    class Groups(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(1, 1)

        def module_groups(self):
            return {"a": list(self.a.parameters()), "b": list(self.b.parameters()), "c": list(self.c.parameters())}

    model = Groups()
    model.a.weight.grad = torch.tensor([[3.0, 4.0]])
    model.b.weight.grad = torch.tensor([[1.0, 0.0]])  # c gets no gradient
    reads = []
    for name in ("__float__", "item", "tolist", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _n=name, **k: reads.append(_n) or _real(self, *a, **k))
    norms = grad_norms(model)
    monkeypatch.undo()
    assert norms == {"a": 5.0, "b": 1.0, "c": 0.0}
    assert reads == ["tolist"]  # one host sync for every group (on a GPU each read waits for the device)
