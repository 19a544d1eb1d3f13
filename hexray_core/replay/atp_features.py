"""Feature-level attribution patching from two traces (``hexray patch --estimate clean.hxr corrupt.hxr --dict D``).

In the convention of ``atp.py`` (TransformerLens's ``attribution_patch``, denoising: the corrupt run's gradient),
patching feature f of a dictionary layer at position p from the clean run into the corrupt one changes what the
dictionary writes there by (f_clean − f_corrupt) · W_dec[f] (as a feature intervention does), so its estimate is

    (f_clean[p, f] − f_corrupt[p, f]) · (W_dec[f] · ∂metric/∂(output hook)[p] | corrupt)

with the features read from the traces (stored by ``record --dict`` or computed from the recorded hooks, in the
dictionary's space) and the gradient recorded by ``record --grad`` at the dictionary's output hook (or a hook with
the same gradient: ``hook_mlp_out`` = ``hook_resid_post`` = the next ``hook_resid_pre``; ``hook_attn_out`` =
``hook_resid_mid``; an attention-output dictionary's ``attn.hook_z``, heads concatenated: the value-bias spaces
differ by a constant there, so the gradient is the same in each). The trace is centred for LayerNorm models
and a raw-space write v acts as centre(v) there, so a residual decoder row is centred before the product. A
cross-layer transcoder's feature sums its rows over the layers it writes. Result: ``{layer: [n, d_sae]}``
(float64), zero wherever the feature is off in both runs.
"""

from __future__ import annotations

import re

import numpy as np

from hexray_core.errors import HexRayError

from .atp import check_pair
from .dictionary import DictionarySet
from .features import run_features, trace_centred

_SAME_GRAD = {"hook_mlp_out": ("hook_resid_post", "+1:hook_resid_pre"), "hook_resid_post": ("hook_mlp_out",
              "+1:hook_resid_pre"), "hook_attn_out": ("hook_resid_mid",), "hook_resid_mid": ("hook_attn_out",)}
_RESIDUAL = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


def _grad_at(trace, run: int, hook: str) -> np.ndarray:
    """[n, d]: the recorded gradient at ``hook``, or at a hook whose gradient is the same tensor's."""
    if trace.has(f"grad.{hook}", run):
        return trace.tensor(f"grad.{hook}", run).astype(np.float64)
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        for alt in _SAME_GRAD.get(rest, ()):
            name = f"blocks.{layer + 1}.{alt[3:]}" if alt.startswith("+1:") else f"blocks.{layer}.{alt}"
            if trace.has(f"grad.{name}", run):
                return trace.tensor(f"grad.{name}", run).astype(np.float64)
    raise HexRayError(f"the corrupt trace {trace.path} holds no gradient at {hook} (the dictionary writes there): "
                      f"record it with hexray record --grad METRIC --hooks default,{hook}")


def feature_estimates(clean, corrupt, dset: DictionarySet, *, run_clean: int = 0, run_corrupt: int = 0) -> dict:
    """``{layer: [n, d_sae]}``: the AtP estimate of patching each feature at each position (see the module)."""
    check_pair(clean, corrupt, run_clean, run_corrupt)
    nx = corrupt.run(run_corrupt).n_tokens
    centred = trace_centred(corrupt)
    out = {}
    for layer in sorted(dset.layers):
        d = dset[layer]
        if d.normalize_activations != "none":
            raise HexRayError(f"{dset.name} normalises its input ({d.normalize_activations}) at run time: its "
                              "features' writes are not linear in the activation, so AtP is not offered for it")
        w = d.W_dec.astype(np.float64)
        if d.rescale_acts_by_decoder_norm:
            w = w / np.linalg.norm(w.reshape(d.d_sae, -1), axis=-1).reshape((-1,) + (1,) * (w.ndim - 1))
        rows = [(layer, w)] if not d.cross_layer else [(layer + j, w[:, j]) for j in range(w.shape[1])]
        effect = np.zeros((nx, d.d_sae))
        for out_layer, wl in rows:
            hook = re.sub(r"^blocks\.\d+\.", f"blocks.{out_layer}.", d.hook_out)
            if out_layer >= corrupt.n_layers:
                raise HexRayError(f"{dset.name} writes into layer {out_layer}; {corrupt.model_name} has "
                                  f"{corrupt.n_layers} layers")
            if centred and hook.endswith(_RESIDUAL):
                wl = wl - wl.mean(-1, keepdims=True)
            g = _grad_at(corrupt, run_corrupt, hook)
            g = g.reshape(g.shape[0], -1)  # hook_z [n, n_heads, d_head]: the heads concatenated, as the dictionary
            if g.shape[1] != wl.shape[-1]:
                raise HexRayError(f"{dset.name} writes {wl.shape[-1]} dimensions at {hook}; the corrupt trace's "
                                  f"gradient there has {g.shape[1]} (a dictionary for another model?)")
            effect += g @ wl.T  # [n, d_sae]: W_dec[f] · gradient at each position
        fc = run_features(clean.run(run_clean), dset, layer).dense().astype(np.float64)
        fx = run_features(corrupt.run(run_corrupt), dset, layer).dense().astype(np.float64)
        out[layer] = (fc - fx) * effect
    return out


def top_features(est: dict, k: int = 20) -> list[tuple[int, int, int, float]]:
    """The k (layer, position, feature, estimate) of largest |estimate|, largest first."""
    flat = []
    for layer, arr in est.items():
        idx = np.flatnonzero(arr)
        if len(idx) > k:
            idx = idx[np.argpartition(-np.abs(arr.reshape(-1)[idx]), k - 1)[:k]]
        for i in idx:
            p, f = divmod(int(i), arr.shape[1])
            flat.append((layer, p, f, float(arr[p, f])))
    flat.sort(key=lambda t: (-abs(t[3]), t[0], t[1], t[2]))
    return flat[:k]
