"""debug_training.py: the PASS/FAIL diagnostic."""

import dataclasses

import pytest

import debug_training


@pytest.mark.parametrize("extra", [[], ["--pointing", "token"]], ids=["regress", "token"])
def test_debug_tiny_passes(capsys, extra):
    assert debug_training.main(["--tiny", *extra]) == 0
    out = capsys.readouterr().out
    for check in ("normalisation round trip", "gradient x_head", "gradient done_head", "gradient lora",
                  "gradient token_embeddings", "loss direction", "done signal varies", "predictions not stuck"):
        assert check in out
    assert "0 failed" in out


def test_debug_fails_when_a_module_is_disconnected(train_config, monkeypatch, capsys):
    real_build = debug_training.build_model

    def build_with_frozen_done_head(cfg):
        model = real_build(cfg)
        for p in model.done_head.parameters():  # cut done_head off: its gradient is exactly 0
            p.requires_grad_(False)
        return model

    monkeypatch.setattr(debug_training, "build_model", build_with_frozen_done_head)
    cfg = debug_training.DebugConfig(**dataclasses.asdict(train_config))
    report = debug_training.run_checks(cfg)
    report.print()
    assert not report.ok
    assert "gradient done_head" in [name for name, ok, _ in report.rows if not ok]
    assert "DISCONNECTED" in capsys.readouterr().out


def test_debug_needs_data_root_without_tiny(capsys):
    with pytest.raises(SystemExit):
        debug_training.main([])
    assert "--tiny" in capsys.readouterr().err


def test_debug_checks_the_loss_that_training_optimises(train_config, monkeypatch):
    """--object_map_focal and --class_loss reach the diagnostic's loss (training's `loss_weights`), and the class
    head gets the training split's classes, as in training."""
    seen = []
    real = debug_training.state_loss

    def spy(outputs, batch, device, parts=None, weights=None, vocabulary=()):
        seen.append((weights, list(vocabulary), "class_logits" in outputs))
        return real(outputs, batch, device, parts, weights, vocabulary)

    monkeypatch.setattr(debug_training, "state_loss", spy)
    cfg = debug_training.DebugConfig(**{**dataclasses.asdict(train_config), "pointing": "token", "class_loss": 0.5,
                                        "object_map_focal": 2.0})
    debug_training.run_checks(cfg)
    assert seen and all(w is not None and w.classes == 0.5 and w.object_map_focal == 2.0 for w, _, _ in seen)
    assert all(vocab and has_class_head for _, vocab, has_class_head in seen)
