"""Attention without ``n × n`` scores: the recorder's one replacement for the bridge's eager attention.

TransformerLens 4.3 reimplements attention itself (scores → soft-cap → mask → ``hook_attn_scores`` →
float32 softmax → ``hook_pattern`` → z) and forces transformers' eager mask, so each layer holds
several ``heads × n × n`` copies (8.7 GB at 16k tokens with one head). A recording does not need
the patterns (it stores q and k), so ``flash_attention(bridge, ...)`` swaps, per attention
component and only while it is active, the part from the scores to z for exact attention in blocks
of queries:

    for each block of queries [q0, q1):   keys [lo, hi) that any of them can see (causal, window)
        scores = (q · kᵀ) · scale     (the model's dtype, as eager)     soft-cap, mask
        lse    = logsumexp(scores)    (float32, per layer, head and query: stored in the trace)
        z      = softmax(scores) · v  (the softmax in the dtype eager uses)

Memory is ``heads × block × keys``: linear in the context for a fixed block budget (``BLOCK_BYTES``).
Every operation on a visible score is the one eager performs, in the same dtype, so z equals
eager's up to the summation order of the matrix products (tests: 1e-5 in float32). A float32 layer
on a CPU with a plain causal mask (no soft-cap, no window, no KV cache) runs PyTorch's fused kernel
instead (``_scaled_dot_product_flash_attention_for_cpu``, the one ``F.scaled_dot_product_attention``
uses, which also returns the LSE): ten times faster at 4k tokens, equal to eager within 1e-6.

Everything before the scores (projections, q/k norms, RoPE, every hook up to ``hook_rot_k``) is
TransformerLens's own code: the wrapped forward runs unchanged and is stopped by a forward hook on
``hook_rot_k`` (registered last, so it sees what every other hook returned). Everything after z
(``hook_z``, the output projection, ``hook_result``, ``hook_out``) is the same calls as TL's forward.

Staying in step with TransformerLens: only the exact classes in ``MIRRORED`` are covered, and only
when the source of the methods HexRay mirrors hashes to what was reviewed (TL 4.3.0). An upgrade that
changes them, a subclass (Bloom's ALiBi, Gemma-3, ...), attention sinks, gated queries, split q/k/v
inputs or QK-norm after RoPE fall back to eager with one stderr line; ``tests/test_flash_attention.py``
checks flash against eager on every covered architecture. A call whose ``hook_pattern`` or
``hook_attn_scores`` has a hook attached (a user asked for patterns) runs eager too.

No ``n × n`` mask either: while active, the wrapped model's ``config._attn_implementation`` names an
implementation transformers has no mask function for, so ``create_causal_mask`` returns None
(transformers' eager mask is 4 GB float32 at 32k tokens); the blocks build their own causal and
sliding-window masks, ``block × keys``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import types

import torch

#: Bytes of float32 scores per block of queries (a few copies live at once: scores, mask, softmax).
BLOCK_BYTES = 64 << 20
#: On a GPU, larger blocks: each block is ~10 kernel launches, and 64 MB would be 8 query rows of
#: Llama-3.1-8B at 64k tokens (untested here: no GPU was available when this was written).
BLOCK_BYTES_GPU = 1 << 30

#: Names transformers' mask dispatch does not know: no mask is built (``masking_utils._preprocess_mask_arguments``).
NO_MASK_IMPLEMENTATION = "hexray_blockwise"


class _Stop(Exception):
    """Raised by the hook on ``hook_rot_k``: TL's forward has computed q and k; the rest is ours."""


def _source_hash(fn) -> str:
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]


def _mirrored():
    """{class: (method name, reviewed source hash)} of the TL components this module covers."""
    from transformer_lens.model_bridge.generalized_components.joint_qkv_attention import JointQKVAttentionBridge
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )

    return {PositionEmbeddingsAttentionBridge: ("forward", "792c3e1b665a0ae2"),
            JointQKVAttentionBridge: ("_reconstruct_attention", "6b9aae7f4356029e")}


def flash_support(bridge, spec: dict | None) -> str | None:
    """None when every layer can run blockwise, else why not (one phrase)."""
    if spec is None:
        return "replay cannot recompute this model's attention from q and k"
    mirrored = _mirrored()
    for layer, block in enumerate(bridge.blocks):
        attn = block.attn
        cls = type(attn)
        if cls not in mirrored:
            return f"its attention component {cls.__name__} is not one HexRay mirrors"
        method, reviewed = mirrored[cls]
        if _source_hash(getattr(cls, method)) != reviewed:
            return (f"this TransformerLens's {cls.__name__}.{method} differs from the one HexRay mirrors "
                    "(TransformerLens 4.3.0)")
        hf = attn.original_component
        cfg = attn.config
        if getattr(hf, "sinks", None) is not None:
            return "it uses attention sinks"
        if getattr(cfg, "gated_q_proj", False) or "gate" in attn.submodules:
            return "its attention output is gated"
        if getattr(cfg, "qk_norm_after_rope", False):
            return "it normalises q and k after RoPE"
        if getattr(getattr(hf, "config", None), "clip_qkv", None) is not None:
            return "it clamps q, k and v"
        if method == "forward" and not all(hasattr(attn, n) for n in ("hook_rot_q", "hook_rot_k", "v")):
            return "its attention has no hook_rot_q/hook_rot_k to stop at"
        if cls.__name__ == "JointQKVAttentionBridge" and getattr(attn, "_layer_idx", layer) != layer:
            return "its layer indices do not match its blocks"
    return None


def _block_rows(heads: int, keys: int, budget: int) -> int:
    return max(1, budget // (4 * max(heads, 1) * max(keys, 1)))


def attend(q, k, v, *, scale: float, softcap: float | None, window: int | None, softmax_dtype,
           budget: int | None = None):
    """Exact causal attention in blocks of queries: ``(z [b, h, sq, d], lse [b, h, sq] float32)``.

    ``q`` ``[b, h, sq, d]``, ``k``/``v`` ``[b, kv_heads, sk, d]``, queries being the last ``sq`` of the
    ``sk`` positions (a KV cache before them). ``softmax_dtype``: float32 (eager's upcast) or None
    (the scores' dtype).
    """
    b, h, sq, _ = q.shape
    hk, sk = k.shape[1], k.shape[2]
    rep = h // hk
    off = sk - sq
    if _fused_applies(q, sk, softcap, window, softmax_dtype):
        return _fused(q, k, v, rep, scale)
    z = torch.empty((b, h, sq, v.shape[-1]), dtype=v.dtype, device=q.device)
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    if budget is None:
        budget = BLOCK_BYTES if q.device.type == "cpu" else BLOCK_BYTES_GPU
    rows = _block_rows(b * h, sk if not window else min(sk, window + _block_rows(b * h, sk, budget)), budget)
    q0 = 0
    while q0 < sq:
        q1 = min(sq, q0 + rows)
        hi = off + q1
        lo = max(0, off + q0 - window + 1) if window else 0
        kb, vb = k[:, :, lo:hi], v[:, :, lo:hi]
        if rep > 1:  # transformers' repeat_kv: head h reads key/value head h // rep
            kb, vb = kb.repeat_interleave(rep, dim=1), vb.repeat_interleave(rep, dim=1)
        s = torch.matmul(q[:, :, q0:q1], kb.transpose(-2, -1)) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        pos_q = torch.arange(off + q0, off + q1, device=q.device)[:, None]
        pos_k = torch.arange(lo, hi, device=q.device)[None, :]
        hidden = pos_k > pos_q
        if window:
            hidden |= pos_k <= pos_q - window
        s = s.masked_fill(hidden, float("-inf"))
        lse[:, :, q0:q1] = torch.logsumexp(s.float(), dim=-1)
        p = torch.softmax(s, dim=-1, dtype=softmax_dtype).to(v.dtype)
        z[:, :, q0:q1] = torch.matmul(p, vb)
        del s, p, kb, vb
        q0 = q1
    return z, lse


def _fused_applies(q, sk: int, softcap, window, softmax_dtype) -> bool:
    """PyTorch's fused CPU kernel (what F.scaled_dot_product_attention runs on a CPU) returns the LSE too.
    It computes in float32 with an online softmax, so only a float32 model uses it (a 16-bit model's eager
    scores are rounded to its dtype: the blocks reproduce that); it knows only a plain causal mask (query i
    sees keys up to i), so no soft-cap, no window shorter than the sequence and no KV cache."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and softcap is None and (not window or window >= sk)
            and q.shape[2] == sk and softmax_dtype in (None, torch.float32)
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"))


def _fused(q, k, v, rep: int, scale: float):
    if rep > 1:  # the kernel wants one key/value head per query head (linear memory: n × heads × d)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    z, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, attn_mask=None,
                                                                        scale=float(scale))
    return z.to(v.dtype), lse.float()


class FlashState:
    """What one ``flash_attention`` context holds: per-layer parameters and where LSEs go."""

    def __init__(self, spec: dict, on_lse=None):
        self.layers = spec["layers"]
        # on_lse(layer, lse [batch, heads, sq], {scale, softcap, window} as used) for each attention call
        self.on_lse = on_lse
        self.calls = 0  # attention calls that ran blockwise
        self.eager_calls = 0  # calls that ran TL's eager forward (patterns hooked, split inputs)


def _patterns_hooked(attn) -> bool:
    return any(len(getattr(attn, name).fwd_hooks) or len(getattr(attn, name)._forward_hooks)
               for name in ("hook_pattern", "hook_attn_scores") if hasattr(attn, name))


def _split_inputs(attn) -> bool:
    cfg = attn.config
    return bool(getattr(cfg, "use_split_qkv_input", False) or getattr(cfg, "use_attn_in", False))


def _eager_mask(state: FlashState, layer: int, args, kwargs) -> dict:
    """kwargs for TL's eager forward inside the context, where transformers built no mask: TL applies the
    causal mask itself, so only a sliding window needs one (this call is eager anyway: n × n)."""
    window = state.layers[layer].get("window")
    if not window or kwargs.get("attention_mask") is not None:
        return kwargs
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    sq = hidden.shape[-2]
    cache = kwargs.get("past_key_values")
    past = int(cache.get_seq_length(layer)) if cache is not None and hasattr(cache, "get_seq_length") else 0
    pos_q = torch.arange(past, past + sq, device=hidden.device)[:, None]
    pos_k = torch.arange(past + sq, device=hidden.device)[None, :]
    visible = (pos_k <= pos_q) & (pos_k > pos_q - window)
    return {**kwargs, "attention_mask": visible[None, None]}


def _finish(attn, attn_output, input_shape, n_heads: int, head_dim: int, *, joint: bool):
    """TL's tail after z, the same calls in the same order (hook_z is o.hook_in)."""
    if not joint:
        attn_output = attn._pre_output_projection(attn_output)
        o_weight = getattr(getattr(getattr(attn, "o", None), "original_component", None), "weight", None)
        if isinstance(o_weight, torch.Tensor) and o_weight.dtype.is_floating_point \
                and attn_output.is_floating_point() and attn_output.dtype != o_weight.dtype:
            attn_output = attn_output.to(dtype=o_weight.dtype)
    if bool(getattr(attn.config, "use_attn_result", False)) and hasattr(attn, "o") \
            and attn.o.original_component is not None:
        attn_output = attn.o.hook_in(attn_output)
        z_4d = attn_output.view(*input_shape, n_heads, head_dim)
        attn_output = attn._compute_per_head_result(z_4d, n_heads, head_dim)
        return attn.hook_out(attn_output) if not joint else attn_output
    if joint:
        return attn._apply_output_projection(attn_output)
    return attn.hook_out(attn.o(attn_output))


def _rotary_forward(state: FlashState, layer: int, original):
    """Instance forward for ``PositionEmbeddingsAttentionBridge``: TL's forward up to ``hook_rot_k``."""

    def forward(self, *args, **kwargs):
        if _patterns_hooked(self) or _split_inputs(self):
            state.eager_calls += 1
            return original(*args, **_eager_mask(state, layer, args, kwargs))
        got: dict = {}

        def keep(key):
            def hook(module, inputs, output):
                got[key] = output
            return hook

        def stop(module, inputs, output):
            got["k"] = output
            raise _Stop

        handles = [self.hook_rot_q.register_forward_hook(keep("q")), self.v.register_forward_hook(keep("v")),
                   self.hook_rot_k.register_forward_hook(stop)]
        try:
            original(*args, **kwargs)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if "k" not in got:  # TL's forward finished without reaching hook_rot_k: no blockwise run is possible
            raise RuntimeError(f"{self.name}: hook_rot_k did not fire")
        hf = self.original_component
        head_dim = hf.head_dim
        q, k = got["q"], got["k"]
        bsz, _, sq, _ = q.shape
        v = got["v"].view(bsz, sq, -1, head_dim).transpose(1, 2)
        k, v = self._update_kv_cache(k, v, **kwargs)
        used = {"scale": float(getattr(hf, "scaling", head_dim ** -0.5)),
                "softcap": getattr(hf, "attn_logit_softcapping", None), "window": state.layers[layer].get("window")}
        z, lse = attend(q, k, v, **used, softmax_dtype=torch.float32)
        _hand_over(state, layer, lse, used)
        out = z.transpose(1, 2).contiguous().reshape(bsz, sq, -1)
        return _finish(self, out, (bsz, sq), q.shape[1], head_dim, joint=False), None

    return forward


def _joint_reconstruct(state: FlashState, layer: int, original):
    """Instance ``_reconstruct_attention`` for ``JointQKVAttentionBridge`` (GPT-2): q, k, v come in."""

    def reconstruct(self, q, k, v, **kwargs):
        if _patterns_hooked(self):
            state.eager_calls += 1
            return original(q, k, v, **kwargs)
        n_heads = self.config.n_heads
        n_kv = getattr(self.config, "n_key_value_heads", None) or n_heads
        q, k, v, bsz, sq, head_dim = self._reshape_qkv_to_heads(q, k, v, n_heads, n_kv)
        k, v = self._update_kv_cache(k, v, **kwargs)
        scale = head_dim ** (-0.5)
        if getattr(self.config, "scale_attn_by_inverse_layer_idx", False) and self._layer_idx is not None:
            scale /= float(self._layer_idx + 1)
        qs, ks = q, k
        upcast = getattr(self, "_reorder_and_upcast_attn", False)
        if upcast:
            qs, ks = q.to(torch.float32), k.to(torch.float32)
        used = {"scale": float(scale), "softcap": None, "window": state.layers[layer].get("window")}
        z, lse = attend(qs, ks, v, **used, softmax_dtype=None)
        _hand_over(state, layer, lse, used)
        out = self._reshape_attn_output(z, bsz, sq, n_heads, head_dim)
        return _finish(self, out, (bsz, sq), n_heads, head_dim, joint=True), None

    return reconstruct


def _hand_over(state: FlashState, layer: int, lse: torch.Tensor, used: dict) -> None:
    state.calls += 1
    if state.on_lse is not None:
        state.on_lse(layer, lse, used)


@contextlib.contextmanager
def flash_attention(bridge, spec: dict, on_lse=None):
    """While active, every covered attention component runs blockwise (check ``flash_support`` first)."""
    from transformer_lens.model_bridge.generalized_components.joint_qkv_attention import JointQKVAttentionBridge

    state = FlashState(spec, on_lse)
    patched = []
    for layer, block in enumerate(bridge.blocks):
        attn = block.attn
        if isinstance(attn, JointQKVAttentionBridge):
            name, make = "_reconstruct_attention", _joint_reconstruct
        else:
            name, make = "forward", _rotary_forward
        original = getattr(attn, name)  # the bound method
        # Into the instance's __dict__: the bridge's __setattr__ would pass "forward" to the wrapped HF module.
        previous = attn.__dict__.get(name)
        attn.__dict__[name] = types.MethodType(make(state, layer, original), attn)
        patched.append((attn, name, previous))
    hf_cfg = getattr(getattr(bridge, "original_model", None), "config", None)
    saved = getattr(hf_cfg, "_attn_implementation", None) if hf_cfg is not None else None
    if hf_cfg is not None:
        hf_cfg._attn_implementation = NO_MASK_IMPLEMENTATION
    try:
        yield state
    finally:
        if hf_cfg is not None:
            hf_cfg._attn_implementation = saved
        for attn, name, previous in patched:
            if previous is None:
                attn.__dict__.pop(name, None)
            else:
                attn.__dict__[name] = previous
