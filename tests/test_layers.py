"""The layers hold (import-linter, contracts in pyproject.toml): hexray (the composition root, the CLI) >
hexray_lsp | hexray_view | hexray_core.dataset > hexray_core.record | hexray_core.replay > hexray_core.kit >
trace_format; the replay side never imports the recorder, torch, TransformerLens or transformers, not even inside
a function."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import importlinter  # noqa: F401 (the [dev] extra; missing, the test fails rather than skips)
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("trace_format", "hexray_core", "hexray_lsp", "hexray_view", "hexray")
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(no_cache=True, no_logo=True))")


def lint(root: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": root}
    return subprocess.run([sys.executable, "-c", LINT], capture_output=True, text=True, cwd=root, env=env,
                          timeout=300)


def test_the_layering_contracts_are_kept():
    out = lint(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 kept, 0 broken" in out.stdout


REPLAY_SIDE = "replay side: no recorder, no torch & co"
LAYERS = "layers: hexray > lsp | view | dataset > record | replay > kit > trace_format"


@pytest.mark.parametrize("module, line, contract", [
    ("hexray_core/replay/lens.py", "    import torch", REPLAY_SIDE),
    ("hexray_lsp/hover.py", "    import transformer_lens", REPLAY_SIDE),
    ("hexray_core/replay/lens.py", "    from hexray_core.record import tokens", REPLAY_SIDE),
    ("trace_format/reader.py", "    from hexray_core import errors", "trace_format stands alone"),
    ("hexray_core/replay/trace.py", "    from hexray.cli import render", LAYERS),
    ("hexray_core/replay/trace.py", "    from hexray_view.notebook import show", LAYERS),  # display.py plugs it in
    ("hexray_lsp/hover.py", "    from hexray.cli import render", LAYERS),
    ("hexray_lsp/hover.py", "    from hexray_view import data", LAYERS),  # the two front ends are independent
    ("hexray_core/replay/lens.py", "    from hexray_core.record import spec", LAYERS),  # so are record and replay
    ("hexray_core/record/recorder.py", "    from hexray_core.replay import trace", LAYERS),
    ("hexray_core/record/recorder.py", "    from hexray_lsp import server", LAYERS),  # the engine, no front end
    ("hexray_core/kit/reader.py", "    from hexray_core.replay import trace", LAYERS),
    ("hexray_core/kit/reader.py", "    from hexray_core.kit import builder", REPLAY_SIDE),
])
def test_a_back_edge_breaks_a_contract(tmp_path, module, line, contract):
    """The check can fail: a copy of the packages with one forbidden import, inside a function, is refused."""
    for pkg in PACKAGES:
        shutil.copytree(os.path.join(REPO, pkg), tmp_path / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "models", "static"))
    shutil.copy(os.path.join(REPO, "pyproject.toml"), tmp_path)
    with open(tmp_path / module, "a", encoding="utf-8") as f:
        f.write(f"\n\ndef _back_edge():\n{line}\n")
    out = lint(str(tmp_path))
    assert out.returncode != 0
    assert f"{contract} BROKEN" in out.stdout, out.stdout
