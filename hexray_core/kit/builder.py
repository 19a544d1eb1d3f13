"""The model kit: the weights replay needs beyond the trace, written once per model.

A kit is an ``.hxr`` file with no runs; its tensors sit at ``WEIGHTS_RUN``:

    W_U    [d_model, d_vocab]                  unembedding (ln_final folded in)
    b_U    [d_vocab]
    W_O    [n_layers, n_heads, d_head, d_model]
    b_O    [n_layers, d_model]                 (value biases folded in)
    W_out  [n_layers, d_mlp, d_model]
    b_out  [n_layers, d_model]
    W_E [d_vocab, d_model], W_pos [n_ctx, d_model] (learned positions only), W_Q/W_K/W_V [n_layers, heads,
    d_model, d_head] (K, V: n_kv_heads), b_Q/b_K/b_V [n_layers, heads, d_head], W_in [n_layers, d_model, d_mlp],
    b_in [n_layers, d_mlp], W_gate [n_layers, d_model, d_mlp] (gated MLPs)

and, float32, what processing removed (``raw_arrays``, read before compatibility mode)::

    raw/ln1.w raw/ln1.b raw/ln2.w raw/ln2.b  [n_layers, d_model]   (no .b for RMSNorm)
    raw/ln_final.w raw/ln_final.b            [d_model]
    raw/W_E.mean [d_vocab]  raw/W_pos.mean [n_ctx]  raw/W_O.mean [n_layers, n_heads, d_head]
    raw/b_O.mean [n_layers]  raw/W_out.mean [n_layers, d_mlp]  raw/b_out.mean [n_layers]   (LayerNorm models)
    raw/b_V raw/ln1.b.W_V [n_layers, n_heads, d_head]   per query head, the value bias and (LayerNorm models)
                                             ln1's bias through W_V: what fold_value_biases (after fold_ln) moved
                                             out of hook_z into b_O

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

from hexray_core.kit.store import (  # noqa: F401 (re-exported)
    BUNDLE_PREFIX,
    KIT_TENSORS,
    RAW_PREFIX,
    TOKENIZER,
    cache_dir,
    kit_path,
)
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
    """The kit's tensors, on the host, keyed by name (with the raw/ tensors ``raw_arrays`` kept on the bridge)."""
    out = {}
    with torch.no_grad():
        for name in KIT_TENSORS:
            try:
                value = getattr(bridge, name, None)
            except (AttributeError, NotImplementedError, RuntimeError):  # W_pos of a rotary model raises
                value = None
            if value is None:
                continue
            out[name] = _host(value)
    out.update(getattr(bridge, "_hexray_raw", None) or {})
    tokenizer = tokenizer_bytes(getattr(bridge, "tokenizer", None))
    if tokenizer is not None:
        out[TOKENIZER] = (tokenizer, "u8")
    return out


def tokenizer_bytes(tokenizer) -> np.ndarray | None:
    """A fast tokenizer's tokenizer.json as bytes (None for a slow tokenizer, which has no such file)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return np.frombuffer(backend.to_str().encode("utf-8"), np.uint8).copy()


def _norm_weights(norm) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weight, bias) of a bridge's normalisation module, before folding."""
    comp = getattr(norm, "_original_component", norm)
    w = getattr(norm, "w", None)
    if w is None:
        w = getattr(comp, "weight", None)
    b = getattr(comp, "bias", None)
    return w, b


def _value_biases(bridge, ln1_b) -> dict:
    """What hook_z loses to processing, per query head [n_layers, n_heads, d_head] (empty if unreadable).

    ``b_V``: the value bias (zeros without one); ``ln1.b.W_V``: ln1's bias through W_V, which fold_ln moves into
    b_V (LayerNorm models). fold_value_biases then moves b_V into b_O: a pattern row sums to one, so each head's
    z is its unprocessed z minus what was folded. Per key/value head, repeated for the query heads sharing it."""
    try:
        w_v = bridge.W_V.float()  # [L, H_kv, d_model, d_head]
        n_heads = int(bridge.cfg.n_heads)
    except (AttributeError, NotImplementedError, RuntimeError):
        return {}
    if w_v.ndim != 4 or n_heads % w_v.shape[1]:
        return {}
    try:
        b_v = bridge.b_V.float()  # [L, H_kv, d_head]
    except AttributeError:  # a bias-free value projection: TransformerLens exposes no b_V
        b_v = torch.zeros(w_v.shape[0], w_v.shape[1], w_v.shape[-1])
    out = {"b_V": b_v}
    if ln1_b is not None:
        out["ln1.b.W_V"] = torch.einsum("ld,lhde->lhe", ln1_b, w_v)
    return {k: v.repeat_interleave(n_heads // w_v.shape[1], dim=1) for k, v in out.items()}


def raw_arrays(bridge) -> dict[str, tuple[np.ndarray, str]]:
    """What compatibility mode is about to remove, from a bridge NOT yet processed (float32, ``raw/`` names).

    Empty when the model's norms are neither LayerNorm nor RMSNorm (replay then refuses raw-space dictionaries).
    """
    cfg = bridge.cfg
    norm_type = getattr(cfg, "normalization_type", None)
    if norm_type not in ("LN", "RMS"):
        return {}
    f32 = {}
    with torch.no_grad():
        blocks = list(bridge.blocks)
        for ln in ("ln1", "ln2"):
            pairs = [_norm_weights(getattr(b, ln)) for b in blocks]
            if any(w is None for w, _ in pairs):
                return {}
            f32[f"{ln}.w"] = torch.stack([w.float() for w, _ in pairs])
            if norm_type == "LN":
                if any(b is None for _, b in pairs):
                    return {}
                f32[f"{ln}.b"] = torch.stack([b.float() for _, b in pairs])
        w, b = _norm_weights(bridge.ln_final)
        if w is None:
            return {}
        f32["ln_final.w"] = w.float()
        f32.update(_value_biases(bridge, f32.get("ln1.b")))
        if norm_type == "LN":
            if b is None:
                return {}
            f32["ln_final.b"] = b.float()
            # center_writing_weights only touches LayerNorm models: keep each removed row mean.
            f32["W_E.mean"] = bridge.W_E.float().mean(-1)
            try:
                f32["W_pos.mean"] = bridge.W_pos.float().mean(-1)
            except (AttributeError, NotImplementedError, RuntimeError):
                pass
            w_o_mean = bridge.W_O.float().mean(-1)  # [L, H, d_head]
            if "b_V" not in f32 or "ln1.b.W_V" not in f32:  # value weights not in TransformerLens's layout
                return {}
            b_v = f32["b_V"] + f32["ln1.b.W_V"]  # all that fold_ln and fold_value_biases move into b_O
            f32["W_O.mean"] = w_o_mean
            f32["b_O.mean"] = bridge.b_O.float().mean(-1) + (b_v * w_o_mean).sum((-1, -2))
            f32["W_out.mean"] = bridge.W_out.float().mean(-1)
            f32["b_out.mean"] = bridge.b_out.float().mean(-1)
    return {RAW_PREFIX + k: (v.detach().contiguous().cpu().numpy(), "f32") for k, v in f32.items()}


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
