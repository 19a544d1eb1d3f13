"""Where the package comes from: a clone of this repository is named ``hexray`` by git, and Python run in the
folder above it must still import the installed package, not the clone's folder as a namespace package."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_hexray_from_the_parent_of_a_clone_named_hexray(tmp_path):
    subprocess.run(["git", "clone", "--quiet", "--depth", "1", f"file://{REPO}", str(tmp_path / "hexray")],
                   check=True, timeout=120)
    out = subprocess.run([sys.executable, "-c", "import hexray; print(hexray.open.__module__, hexray.__file__)"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    module, path = out.stdout.split()
    assert module == "hexray"
    assert os.path.dirname(os.path.dirname(path)) == REPO  # the installed (editable) package, not the clone


def test_the_command_runs_as_a_module_of_the_composition_root():
    out = subprocess.run([sys.executable, "-m", "hexray", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("hexray ")
