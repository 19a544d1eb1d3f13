"""Finding and reading the model kit: the weights replay needs beyond the trace itself.

A kit is bundled in the trace (tensors ``kit/<name>`` at WEIGHTS_RUN) or cached per user as
``$HEXRAY_CACHE/kits/<sha256>.hxr`` (tensors ``<name>`` at WEIGHTS_RUN, vocabulary in its meta).
"""

from __future__ import annotations

import os

import numpy as np

from hexray_core.errors import HexRayError
from hexray_core.kit.store import BUNDLE_PREFIX, cache_dir, kit_path  # noqa: F401 (cache_dir re-exported)
from trace_format import WEIGHTS_RUN, TraceFormatError, TraceReader


class Kit:
    """Model weights read lazily (float32) from a trace's bundle or a cached kit file."""

    def __init__(self, reader: TraceReader, prefix: str, sha256: str | None, vocab: list[str] | None):
        self.reader, self.prefix, self.sha256 = reader, prefix, sha256
        self.vocab = vocab
        self._weights: dict[str, np.ndarray] = {}

    def has(self, name: str) -> bool:
        return self.reader.has(self.prefix + name, WEIGHTS_RUN)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._weights:
            if not self.has(name):
                raise HexRayError(f"the model kit ({self.source}) has no {name}: it is incomplete or from another "
                                  "HexRay version; record again to rebuild it")
            arr = self.reader.read(self.prefix + name, WEIGHTS_RUN)
            arr.setflags(write=False)
            self._weights[name] = arr
        return self._weights[name]

    @property
    def source(self) -> str:
        return "bundled in the trace" if self.prefix else self.reader.path


def find_kit(trace_reader: TraceReader) -> Kit | None:
    """The kit a trace refers to: bundled first, then the user cache. None when not found."""
    ref = trace_reader.meta.get("kit") or {}
    sha = ref.get("sha256")
    vocab = ref.get("vocab")
    if trace_reader.has(BUNDLE_PREFIX + "W_U", WEIGHTS_RUN):
        return Kit(trace_reader, BUNDLE_PREFIX, sha, vocab or trace_reader.meta.get("vocab"))
    if not isinstance(sha, str) or not sha.isalnum():
        return None
    path = kit_path(sha)
    if not os.path.exists(path):
        return None
    try:
        reader = TraceReader(path)
    except TraceFormatError:
        return None
    return Kit(reader, "", sha, vocab or reader.meta.get("vocab"))
