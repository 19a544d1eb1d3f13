"""Finding and reading the model kit: the weights replay needs beyond the trace itself.

A kit is bundled in the trace (tensors ``kit/<name>`` at WEIGHTS_RUN) or cached per user as
``$HEXRAY_CACHE/kits/<sha256>.hxr`` (tensors ``<name>`` at WEIGHTS_RUN, vocabulary in its meta).

A large weight (the unembedding, the embedding: 154 MB each for GPT-2) costs ~0.4 s to decompress, every time a
process needs it, which is most of a cold `hexray features` (the top logits of a feature read all of W_U). The
first read of such a tensor therefore also leaves it, decoded, beside the cached kit as
``<sha256>.<name>.f32.npy`` (written atomically; the user's own cache, like the kit), and later processes map
that file instead: the page cache serves it with no decoding. A sidecar whose header does not match the kit's
tensor (shape, float32, size) is ignored and rewritten.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from hexray_core.errors import HexRayError
from hexray_core.kit.store import BUNDLE_PREFIX, cache_dir, kit_path  # noqa: F401 (cache_dir re-exported)
from trace_format import WEIGHTS_RUN, TraceFormatError, TraceReader

MAP_MIN_BYTES = 16 << 20  # weights at least this large (as float32) are kept decoded beside the cached kit


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
            arr = self._mapped(name)
            if arr is None:
                arr = self.reader.read(self.prefix + name, WEIGHTS_RUN)
                self._leave_mapped(name, arr)
            arr.setflags(write=False)
            self._weights[name] = arr
        return self._weights[name]

    def _sidecar(self, name: str) -> str | None:
        """Where a decoded copy of a large weight lives, or None (small, not float, or a kit without an id)."""
        if not isinstance(self.sha256, str) or not self.sha256.isalnum() or not name.replace("_", "").isalnum():
            return None
        info = self.reader.info(self.prefix + name, WEIGHTS_RUN)
        if info.dtype not in ("f32", "f16", "bf16") or np.prod(info.shape, dtype=np.int64) * 4 < MAP_MIN_BYTES:
            return None
        return os.path.join(os.path.dirname(kit_path(self.sha256)), f"{self.sha256}.{name}.f32.npy")

    def _mapped(self, name: str) -> np.ndarray | None:
        path = self._sidecar(name)
        if path is None or not os.path.isfile(path) or os.path.islink(path):
            return None
        shape = tuple(self.reader.info(self.prefix + name, WEIGHTS_RUN).shape)
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            return None
        if arr.dtype != np.float32 or arr.shape != shape or not arr.flags.c_contiguous:
            return None
        return arr

    def _leave_mapped(self, name: str, arr: np.ndarray) -> None:
        """Best effort: a cache that cannot be written only means the next process decodes again."""
        path = self._sidecar(name)
        if path is None:
            return
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npy")
            try:
                with os.fdopen(fd, "wb") as f:
                    np.save(f, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError:
            pass

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
