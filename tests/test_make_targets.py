"""Every `make TARGET` that README.md or the Makefile's comments name has a rule that runs commands: a target
whose rule was deleted makes `make` print "Nothing to be done" and exit 0, which a user reads as success."""

import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT

MAKE_WORD = re.compile(r"\bmake ([a-z][a-z0-9-]+)")


def named_targets(root: str = ROOT) -> set[str]:
    """Targets written as `make NAME` in README.md and in the Makefile's comment lines, plus .PHONY's."""
    names = set(MAKE_WORD.findall(open(os.path.join(root, "README.md"), encoding="utf-8").read()))
    makefile = open(os.path.join(root, "Makefile"), encoding="utf-8").read()
    for line in makefile.splitlines():
        if line.lstrip().startswith("#"):
            names.update(MAKE_WORD.findall(line))
    phony = re.search(r"^\.PHONY:((?:.*\\\n)*.*)$", makefile, re.M)
    if phony:
        names.update(phony.group(1).replace("\\\n", " ").split())
    return names


def dry_run(target: str, root: str = ROOT) -> tuple[int, str]:
    """`make -n TARGET`'s exit code and output (the recipe it would run), without running anything."""
    proc = subprocess.run(["make", "-n", "-C", root, target], capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def runs_commands(target: str, root: str = ROOT) -> bool:
    code, out = dry_run(target, root)
    commands = [line for line in out.splitlines() if line.strip() and not line.startswith("make")]
    return code == 0 and bool(commands) and "Nothing to be done" not in out


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@needs_make
def test_every_named_target_has_a_recipe():
    names = named_targets()
    assert {"demo", "test", "gpu-check", "smoke-2b", "bench-dense"} <= names  # the reader finds the targets
    empty = sorted(t for t in names if not runs_commands(t))
    assert not empty, f"make targets named in README.md or the Makefile that run nothing (make -n): {empty}"


@needs_make
def test_a_target_without_a_rule_is_caught(tmp_path):
    """The check itself: a Makefile naming a target in .PHONY and a comment, with its rule deleted, fails it."""
    (tmp_path / "README.md").write_text("Run `make hello` and `make gone`.\n")
    (tmp_path / "Makefile").write_text("# make gone: was deleted\n.PHONY: hello gone\n\nhello:\n\techo hello\n")
    assert named_targets(str(tmp_path)) == {"hello", "gone"}
    assert runs_commands("hello", str(tmp_path))
    assert not runs_commands("gone", str(tmp_path))


@needs_make
def test_gpu_check_without_a_gpu_stops_with_a_message(tmp_path):
    """`make gpu-check` on a machine without CUDA exits non-zero and says why (on the venv's Python, which has
    every package, the reason is the missing GPU); it writes no gpu.json."""
    python = os.path.join(ROOT, ".venv", "bin", "python")
    if not os.path.exists(python):
        pytest.skip("no .venv (make test creates it)")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    proc = subprocess.run(["make", "-s", "-C", ROOT, "gpu-check", f"PYTHON={python}"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "needs a CUDA GPU" in proc.stderr
    assert "Wrote" not in proc.stdout
