"""Where model kits live and what they hold: shared by the recorder and the replay (no torch here)."""

from __future__ import annotations

import os
from pathlib import Path

KIT_TENSORS = ("W_U", "b_U", "W_O", "b_O", "W_out", "b_out")  # after compatibility-mode processing
BUNDLE_PREFIX = "kit/"  # a bundled kit's tensors in a trace: kit/W_U, ... at WEIGHTS_RUN


def cache_dir() -> Path:
    """``$HEXRAY_CACHE``, or ``~/.cache/hexray``."""
    return Path(os.path.expanduser(os.environ.get("HEXRAY_CACHE") or os.path.join("~", ".cache", "hexray")))


def kit_folder() -> str:
    """The folder of cached kits as this process sees it (``$HEXRAY_CACHE`` honoured), for messages."""
    return os.path.join(cache_dir(), "kits") + os.sep


def kit_path(sha256: str, root: str | os.PathLike | None = None) -> str:
    """The cached kit file of a model: ``<cache>/kits/<sha256>.hxr``."""
    return os.path.join(root or cache_dir(), "kits", f"{sha256}.hxr")
