"""Shared by the Ray tests: a real local Ray cluster whose workers import this checkout."""

from __future__ import annotations

import contextlib
import os

from prereq import require_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def local_ray(num_cpus: int = 2):
    """``ray.init(num_cpus=...)`` for the block, then shut down. Ray's workers inherit this environment: the
    checkout on PYTHONPATH (when hexray is not installed) and the session's HEXRAY_CACHE (conftest), so the kit
    lands in the test's cache. Without Ray: skipped, failed under CI (prereq.py)."""
    ray = require_module("ray", "the [dev] or [ray] extra: pip install 'ray[data]'")

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = REPO + (os.pathsep + old if old else "")
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
