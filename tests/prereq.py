"""A missing prerequisite (a program, a package, a permission) skips a test on a developer's machine, saying what
to install, and fails it under CI (``HEXRAY_CI=1``, set by .ci/run, which installs everything), so a CI run can
never pass with a check left out. The editor tests do the same (tests/test_editors.py)."""

from __future__ import annotations

import importlib
import os

import pytest


def under_ci() -> bool:
    return os.environ.get("HEXRAY_CI") == "1"


def missing(message: str, *, module_level: bool = False):
    """Skip (fail under CI) for want of what ``message`` names."""
    if under_ci():
        pytest.fail(f"{message}; under CI (HEXRAY_CI=1) every prerequisite must be there", pytrace=False)
    pytest.skip(message, allow_module_level=module_level)


def require_module(name: str, install: str, *, module_level: bool = False):
    """``pytest.importorskip``, except that under CI a missing module fails."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"{name} is not installed ({install})", module_level=module_level)
