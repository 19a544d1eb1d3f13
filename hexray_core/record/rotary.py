"""The rotary embedding a model applies to q and k, written down for replay (``meta["attention"]["rotary"]``).

A trace of a rotary model stores q and k after the rotation (``hook_rot_q``, ``hook_rot_k``). Replay's QK tracing
splits a score into the contributions of the nodes upstream of each side; a node's contribution reaches the score
through the same rotation, a linear map R_p of the position (``hexray_core/replay/rotary.py``). R_p is rebuilt
from what is written here:

    {"style": "half" | "adjacent",   # pairs (i, i + dim/2) (Llama, NeoX) or (2i, 2i + 1) (GLM, Cohere)
     "dim": int,                     # rotated dimensions (the first ``dim`` of d_head; the rest pass)
     "inv_freq": [dim/2 floats],     # pair i turns by p * inv_freq[i] at position p (float32 product)
     "scale": float,                 # cos and sin are multiplied by it (YaRN's attention scaling)
     "dtype": "f32" | "f16" | "bf16"}  # cos and sin are rounded to it (the model's dtype)

or ``{"refused": "why"}`` where HexRay cannot rebuild it exactly. What is written is checked first: the model's own
rotary module is evaluated at 64 positions and must give the cos and sin the formula gives.
"""

from __future__ import annotations

import torch

#: Frequencies that change with the context length: one table per trace would not hold for every run.
LENGTH_DEPENDENT = ("dynamic", "longrope")
CHECK_POSITIONS = 64
_TAG = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _refused(why: str) -> dict:
    return {"refused": why}


def _rotary_modules(hf) -> list:
    """The Hugging Face rotary modules (not TransformerLens's wrappers of them), one per distinct table."""
    seen, out = set(), []
    for _, m in hf.named_modules():
        inv = getattr(m, "inv_freq", None)
        if not isinstance(inv, torch.Tensor) or getattr(m, "_original_component", None) is not None:
            continue
        key = (tuple(inv.detach().float().cpu().tolist()), float(getattr(m, "attention_scaling", 1.0) or 1.0))
        if key not in seen:
            seen.add(key)
            out.append(m)
    return out


def rotary_spec(bridge) -> dict | None:
    """``meta["attention"]["rotary"]`` of a rotary model, or None for a model without rotary embeddings."""
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge as PEAB,
    )
    from transformer_lens.utilities.hf_utils import get_rotary_pct_from_config

    cfg = bridge.cfg
    if "blocks.0.attn.hook_rot_q" not in dict(bridge.hook_dict):
        return None
    for layer, block in enumerate(bridge.blocks):
        attn = block.attn
        # only TransformerLens's own rotary attention, unchanged by a subclass: its RoPE is what is rebuilt here
        if type(attn).forward is not PEAB.forward:
            return _refused(f"layer {layer}'s attention ({type(attn).__name__}) applies rotary embeddings its own way")
        subs = getattr(attn, "submodules", {}) or {}
        if "q_norm" in subs or "k_norm" in subs:
            return _refused("its queries and keys are normalised per position before the rotation (a q/k norm)")
    hf = getattr(bridge, "original_model", None)
    hf_cfg = getattr(hf, "config", None)
    rope = getattr(hf_cfg, "rope_parameters", None) or getattr(hf_cfg, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("llama_4_scaling_beta") is not None:
        return _refused("its queries are scaled per position after the rotation (llama-4 scaling)")
    if getattr(hf_cfg, "clip_qkv", None) is not None:
        return _refused("its queries and keys are clipped before the rotation (clip_qkv)")
    mods = _rotary_modules(hf) if hf is not None else []
    if len(mods) != 1:
        return _refused("it has no rotary module with inv_freq" if not mods else
                        "its rotary frequencies differ between layers")
    mod = mods[0]
    rope_type = str(getattr(mod, "rope_type", "default"))
    if rope_type in LENGTH_DEPENDENT:
        return _refused(f"its rotary frequencies depend on the context length (rope_type {rope_type})")
    inv = mod.inv_freq.detach().float().cpu()
    scale = float(getattr(mod, "attention_scaling", 1.0) or 1.0)
    d_head = int(cfg.d_head)
    adjacent = bool(getattr(cfg, "rotary_interleaved_cos_sin", False) or getattr(cfg, "rotary_adjacent_pairs", False))
    half = inv.shape[0]
    if 2 * half > d_head:
        return _refused(f"its rotary embedding has {half} frequencies for a head of {d_head}")
    # the tables the module hands the attention, against the formula replay uses
    pos = torch.arange(CHECK_POSITIONS)
    try:
        with torch.no_grad():
            dev = mod.inv_freq.device
            cos, sin = mod(torch.zeros(1, dtype=torch.float32, device=dev), pos[None].to(dev))
    except Exception as e:  # a module with another calling convention
        return _refused(f"its rotary module ({type(mod).__name__}) could not be evaluated: {type(e).__name__}")
    cos, sin = cos.detach().float().cpu().reshape(CHECK_POSITIONS, -1), sin.detach().float().cpu().reshape(
        CHECK_POSITIONS, -1)
    ang = pos.float()[:, None] * inv[None]
    c, s = ang.cos() * scale, ang.sin() * scale
    if cos.shape[1] == half:  # GPT-OSS: half-width tables, duplicated by the bridge over the full head
        if 2 * half != d_head or get_rotary_pct_from_config(cfg) != 1.0 or adjacent:
            return _refused("its rotary tables are half-width where the bridge would not duplicate them")
        want_c, want_s = c, s
    elif bool(getattr(cfg, "rotary_interleaved_cos_sin", False)):
        want_c, want_s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
    else:
        want_c, want_s = torch.cat([c, c], -1), torch.cat([s, s], -1)
    if cos.shape != want_c.shape or not (torch.allclose(cos, want_c, atol=1e-5, rtol=0)
                                         and torch.allclose(sin, want_s, atol=1e-5, rtol=0)):
        return _refused(f"its rotary module ({type(mod).__name__}) does not give scale · cos/sin(p · inv_freq)")
    dtype = next((p.dtype for p in hf.parameters() if p.is_floating_point()), torch.float32)
    return {"style": "adjacent" if adjacent else "half", "dim": 2 * half, "inv_freq": [float(x) for x in inv],
            "scale": scale, "dtype": _TAG.get(dtype, "f32")}
