"""Direct logit attribution by feature (``--by feature``): a dictionary's features take the place of what it
reconstructs, and the rest (reconstruction error, skip term, decoder bias) stays as rows, so the rows still sum
to the logit.

Transcoders (per layer or cross-layer) split each MLP output they reconstruct; a residual-stream SAE splits the
residual at its hook (every component written before it). The logit direction ``u`` is centred for LayerNorm
models, so the constant by which a dictionary's raw space differs from the recorded one adds nothing to any row.
"""

from __future__ import annotations

import re

import numpy as np

from hexray_core.errors import HexRayError

from .dictionary import DictionarySet
from .features import dictionary_input, run_features

_MLP_OUT = re.compile(r"blocks\.(\d+)\.(hook_mlp_out|mlp\.hook_out)")
_RESID_IN = re.compile(r"blocks\.(\d+)\.(hook_resid_pre|hook_resid_mid|hook_resid_post)")


def _check_linear(d, what: str) -> None:
    if d.normalize_activations != "none":
        raise HexRayError(f"--by feature: {what} normalises its input at run time ({d.normalize_activations}), so "
                          "its decoder is not linear in the features; attribution by feature is not exact")


def feature_rows(trace, run: int, p: int, u: np.ndarray, comps, values, dset: DictionarySet,
                 layer: int | None = None) -> list[tuple]:
    """Rows (label, kind, layer, index, value) replacing the components the dictionary reconstructs."""
    r = trace.run(run)
    if dset.kind in ("transcoder", "clt"):
        return _transcoder_rows(trace, r, p, u, comps, values, dset)
    return _sae_rows(trace, r, p, u, comps, values, dset, layer)


def _transcoder_rows(trace, r, p, u, comps, values, dset) -> list[tuple]:
    outputs = {}
    for L, d in dset.layers.items():
        m = _MLP_OUT.fullmatch(d.hook_out)
        if not m or int(m.group(1)) != L:
            raise HexRayError(f"--by feature splits MLP outputs: the layer-{L} dictionary writes {d.hook_out}")
        _check_linear(d, f"the layer-{L} dictionary")
        outputs[L] = d
    feats = {L: run_features(r, dset, L).at(p) for L in dset.layers}
    out = []
    for c, v in zip(comps, values, strict=True):
        if c.kind != "mlp" or c.layer not in outputs:
            out.append((c.label, c.kind, c.layer, None, float(v)))
            continue
        L, d = c.layer, outputs[c.layer]
        parts = []
        sources = [i for i in feats if i <= L] if dset.kind == "clt" else [L]
        for i in sources:
            idx, act = feats[i]
            if not len(idx):
                continue
            w = dset.layers[i].W_dec[idx]
            if w.ndim == 3:
                w = w[:, L - i]
            for j, x in zip(idx, act * (w @ u), strict=True):
                parts.append((f"L{i}F{int(j)}", "feature", i, int(j), float(x)))
        skip = d.skip(dictionary_input(r, d)[p]) if d.W_skip is not None else None
        if skip is not None:
            parts.append((f"MLP L{L} skip", "feature_skip", L, None, float(skip @ u)))
        parts.append((f"MLP L{L} b_dec", "feature_bias", L, None, float(d.b_dec @ u)))
        explained = sum(x[-1] for x in parts)
        parts.append((f"MLP L{L} error", "feature_error", L, None, float(v) - explained))
        out += parts
    return _merge(out)


def _sae_rows(trace, r, p, u, comps, values, dset, layer) -> list[tuple]:
    L = max(dset.layers) if layer is None else (layer + trace.n_layers if layer < 0 else layer)
    d = dset[L]
    m = _RESID_IN.fullmatch(d.hook_in)
    if not m:
        raise HexRayError(f"--by feature with a sparse autoencoder splits the residual stream: this one reads "
                          f"{d.hook_in} (use a residual-stream SAE, or transcoders)")
    _check_linear(d, "the dictionary")
    where = m.group(2)

    def inside(c) -> bool:  # written into the residual before the SAE's hook
        if c.layer is None:
            return True
        return c.layer < L or (c.layer == L and (where == "hook_resid_post" or (where == "hook_resid_mid"
                                                                                  and c.kind == "attn")))
    idx, act = run_features(r, dset, L).at(p)
    parts = [(f"L{L}F{int(j)}", "feature", L, int(j), float(x)) for j, x in zip(idx, act * (d.W_dec[idx] @ u),
                                                                               strict=True)]
    parts.append((f"Resid L{L} b_dec", "feature_bias", L, None, float(d.b_dec @ u)))
    resid = float(sum(float(v) for c, v in zip(comps, values, strict=True) if inside(c)))
    parts.append((f"Resid L{L} error", "feature_error", L, None, resid - sum(x[-1] for x in parts)))
    rest = [(c.label, c.kind, c.layer, None, float(v)) for c, v in zip(comps, values, strict=True) if not inside(c)]
    return parts + rest


def _merge(rows: list[tuple]) -> list[tuple]:
    """One row per feature (a cross-layer feature writes into several MLP outputs)."""
    seen: dict[str, int] = {}
    out: list[tuple] = []
    for row in rows:
        if row[1] == "feature" and row[0] in seen:
            k = seen[row[0]]
            out[k] = (*out[k][:-1], out[k][-1] + row[-1])
            continue
        if row[1] == "feature":
            seen[row[0]] = len(out)
        out.append(row)
    return out
