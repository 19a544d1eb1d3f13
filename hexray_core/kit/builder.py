"""The model kit: the weights replay needs beyond the trace, written once per model.

A kit is an ``.hxr`` file with no runs; its tensors sit at ``WEIGHTS_RUN``:

    W_U    [d_model, d_vocab]                  unembedding (ln_final folded in)
    b_U    [d_vocab]
    W_O    [n_layers, n_heads, d_head, d_model]
    b_O    [n_layers, d_model]                 (value biases folded in)
    W_out  [n_layers, d_mlp, d_model]
    b_out  [n_layers, d_model]

all after TransformerLens compatibility-mode processing, in the model's dtype (bfloat16 as raw
words tagged ``bf16``). Its metadata holds ``vocab``: the decoded string of every token id (so replay
can name any prediction). Its id is a sha256 over the tensors in name order; for each tensor::

    name  NUL  dtype tag  NUL  comma-separated shape  NUL  raw little-endian bytes

Kits live in ``$HEXRAY_CACHE`` (default ``~/.cache/hexray``) under ``kits/<sha256>.hxr``. A trace
names its kit in ``meta["kit"]``; ``--bundle`` also writes the kit's tensors into the trace as
``kit/<name>`` at ``WEIGHTS_RUN``.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from hexray_core.kit.store import BUNDLE_PREFIX, KIT_TENSORS, cache_dir, kit_path  # noqa: F401 (re-exported)
from trace_format import WEIGHTS_RUN, TraceFormatError, TraceReader, TraceWriter


def _host(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """(array, stored dtype tag) of a weight, in the model's own dtype."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.contiguous().cpu().view(torch.int16).numpy().view(np.uint16), "bf16"
    if t.dtype == torch.float16:
        return t.contiguous().cpu().numpy(), "f16"
    return t.to(torch.float32).contiguous().cpu().numpy(), "f32"


def kit_arrays(bridge) -> dict[str, tuple[np.ndarray, str]]:
    """The kit's tensors, on the host, keyed by name."""
    out = {}
    with torch.no_grad():
        for name in KIT_TENSORS:
            value = getattr(bridge, name, None)
            if value is None:
                continue
            out[name] = _host(value)
    return out


def kit_sha256(arrays: dict[str, tuple[np.ndarray, str]]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        arr, tag = arrays[name]
        arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
        h.update(f"{name}\0{tag}\0{','.join(str(int(d)) for d in arr.shape)}\0".encode())
        h.update(arr.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


class Kit:
    """A model's kit in memory: arrays, id, and where it is cached."""

    def __init__(self, arrays: dict[str, tuple[np.ndarray, str]], model_meta: dict, vocab: list[str] | None = None):
        self.arrays = arrays
        self.sha256 = kit_sha256(arrays)
        self.model_meta = model_meta
        self.vocab = vocab
        self.path: str | None = None
        self.written = False  # True when this process wrote the cache file

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a, _ in self.arrays.values())

    def ensure_cached(self, root: str | None = None) -> str:
        """Write the kit to the cache unless a readable copy is already there. Returns its path."""
        path = kit_path(self.sha256, root)
        if path == self.path and os.path.isfile(path):
            return path  # checked (or written) earlier in this process
        if _valid_kit(path, self.sha256, self.arrays):
            self.path = path
            return path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        meta = {"hexray": {"version": _version(), "trace": "kit"}, "model": self.model_meta,
                "kit": {"sha256": self.sha256, "tensors": sorted(self.arrays)}}
        if self.vocab is not None:
            meta["vocab"] = self.vocab
        writer = TraceWriter(path, meta=meta, level=1)
        try:
            self.write_into(writer, prefix="")
            writer.close()
        except BaseException:
            writer.abort()
            raise
        self.path = path
        self.written = True
        return path

    def write_into(self, writer: TraceWriter, *, prefix: str = BUNDLE_PREFIX) -> None:
        for name in sorted(self.arrays):
            arr, tag = self.arrays[name]
            writer.write(prefix + name, arr, run=WEIGHTS_RUN, dtype="bf16" if tag == "bf16" else None,
                         attrs={"kit": self.sha256} if prefix else None)


def _valid_kit(path: str, sha256: str, arrays) -> bool:
    if not os.path.isfile(path):
        return False
    try:
        with TraceReader(path) as r:
            if (r.meta.get("kit") or {}).get("sha256") != sha256:
                return False
            for name, (arr, tag) in arrays.items():
                info = r.info(name, WEIGHTS_RUN)
                if info.shape != tuple(arr.shape) or info.dtype != tag:
                    return False
        return True
    except (TraceFormatError, KeyError, OSError):
        return False


def _version() -> str:
    from hexray_core import __version__

    return __version__
