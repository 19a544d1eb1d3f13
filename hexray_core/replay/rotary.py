"""Rotary embeddings as linear maps: R_p, the rotation a rotary model applies to q and k at position p.

The trace of a rotary model stores q and k after the rotation; QK tracing needs R_p itself, to carry each node's
contribution to the pre-rotation q (or k) into the space where the score is a dot product: score(p, s) =
scale · (R_p q_p) · (R_s k_s), and since R_p is linear, R_p q_p = Σ_i R_p q_i exactly. R_p is rebuilt from
``meta["attention"]["rotary"]`` (written by ``hexray_core/record/rotary.py``, which checked it against the model's
own rotary module): pair i of the first ``dim`` dimensions turns by the angle p · inv_freq[i] (a float32 product, as
Hugging Face computes it), cos and sin scaled by ``scale`` and rounded to the model's dtype, as the model used them.
"""

from __future__ import annotations

import math

import numpy as np

from hexray_core.errors import HexRayError

STYLES = ("half", "adjacent")


def _round(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``x`` rounded to ``dtype`` (bf16: round to nearest even on the top 16 bits), as float64."""
    x = np.asarray(x, np.float32)
    if dtype == "f16":
        return x.astype(np.float16).astype(np.float64)
    if dtype == "bf16":
        b = x.view(np.uint32).astype(np.uint64)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        return b.astype(np.uint32).view(np.float32).astype(np.float64)
    return x.astype(np.float64)


def rotary_params(trace) -> dict | None:
    """The trace's rotary embedding (None: the model has none), or a HexRayError saying why it cannot be rebuilt."""
    spec = trace.meta.get("attention")
    rot = spec.get("rotary") if isinstance(spec, dict) else None
    if rot is None:
        if str(trace.config.get("positional_embedding_type", "")) == "rotary":
            raise HexRayError("this trace of a rotary-embedding model does not say how its rotation is computed "
                              "(meta.attention.rotary, written since QK tracing of rotary models): record it again")
        return None
    if "refused" in rot:
        raise HexRayError(f"the rotary embedding of this model cannot be rebuilt exactly: {rot['refused']}")
    return rot


def rotation(rot: dict, pos: int, d_head: int) -> np.ndarray:
    """R_pos ``[d_head, d_head]`` (float64): rotated = R_pos @ vector, for one head's q or k at position ``pos``."""
    dim, inv = int(rot["dim"]), np.asarray(rot["inv_freq"], np.float32)
    if rot.get("style") not in STYLES or dim != 2 * len(inv) or dim > d_head:
        raise HexRayError(f"meta.attention.rotary is not a rotation HexRay knows (style {rot.get('style')!r}, "
                          f"dim {dim}, {len(inv)} frequencies, d_head {d_head})")
    ang = np.float32(pos) * inv  # float32, as the model multiplies them
    scale = float(rot.get("scale", 1.0))
    dtype = str(rot.get("dtype", "f32"))
    c = _round(np.cos(ang.astype(np.float64)).astype(np.float32) * np.float32(scale), dtype)
    s = _round(np.sin(ang.astype(np.float64)).astype(np.float32) * np.float32(scale), dtype)
    half = dim // 2
    i = np.arange(half)
    a, b = (i, i + half) if rot["style"] == "half" else (2 * i, 2 * i + 1)
    R = np.eye(d_head)
    # out_a = x_a c - x_b s, out_b = x_b c + x_a s (HF's rotate_half; TL's adjacent-pair _rotate)
    R[a, a], R[a, b], R[b, b], R[b, a] = c, -s, c, s
    return R


def check_params(rot) -> str | None:
    """What is wrong with a ``meta.attention.rotary`` value (for the trace validator), or None."""
    if not isinstance(rot, dict):
        return "a map"
    if set(rot) == {"refused"}:
        return None if isinstance(rot["refused"], str) else "{refused: a string}"
    want = ('{style: "half" or "adjacent", dim: even integer, inv_freq: dim/2 finite numbers, scale: finite number, '
            'dtype: "f32", "f16" or "bf16"} or {refused: a string}')
    inv, dim = rot.get("inv_freq"), rot.get("dim")
    ok = rot.get("style") in STYLES and type(dim) is int and 0 < dim <= 1 << 16 and isinstance(inv, list) \
        and len(inv) * 2 == dim and all(type(x) in (int, float) and math.isfinite(x) for x in inv) \
        and type(rot.get("scale")) in (int, float) and math.isfinite(rot["scale"]) \
        and rot.get("dtype") in ("f32", "f16", "bf16")
    return None if ok else want
