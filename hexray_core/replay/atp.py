"""Attribution patching (AtP) from two traces, numpy only: ``hexray patch --estimate clean.hxr corrupt.hxr``.

The corrupt trace must hold gradients (``hexray record --grad METRIC``: ``grad.<hook>``); the clean trace
holds the activations to patch in. As TransformerLens's ``attribution_patch`` (denoising convention:
the gradient of the corrupt run, the estimate pointing toward the clean activation), the effect of
patching node a is estimated as (a_clean − a_corrupt) · ∂metric/∂a|corrupt, summed over the node's
own axes:

    resid_pre, attn_out, mlp_out   [n_layers, n]          Σ over d_model
    heads-by-pos                   [n_layers, n, n_heads]  Σ over d_head of hook_z
    heads                          [n_layers, n_heads]     the same summed over positions (patching every position)
    neurons                        [n_layers, n, d_mlp]    mlp.hook_post, one neuron at one position
    embed                          [n]
    pattern                        [n_layers, n_heads]     Σ over the whole pattern (ΔA · ∂metric/∂A)

AtP* (Kramár et al. 2024) for queries and keys: linearising through the softmax underestimates
saturated attention, so for a patched query (one head, one position) or key (one key/value head, one
position) the attention rows are recomputed exactly from the recorded q and k of both runs, and only
the step from the pattern to the metric is linear: Σ (A' − A) · ∂metric/∂A.

    q (AtP*)                       [n_layers, n, n_heads]
    k (AtP*)                       [n_layers, n, n_kv_heads]
"""

from __future__ import annotations

import numpy as np

from hexray_core.errors import HexRayError

from .attention import _layer_params, _qk_names, attention_pattern

NODE_HOOKS = {"resid_pre": "blocks.{l}.hook_resid_pre", "attn_out": "blocks.{l}.hook_attn_out",
              "mlp_out": "blocks.{l}.hook_mlp_out", "heads-by-pos": "blocks.{l}.attn.hook_z",
              "neurons": "blocks.{l}.mlp.hook_post"}


def _pair(clean, corrupt, rc: int, rx: int, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clean activation, corrupt activation, corrupt gradient) of one hook, as float64."""
    for t, r, what in ((clean, rc, "clean"), (corrupt, rx, "corrupt")):
        if not t.has(name, r):
            raise HexRayError(f"the {what} trace {t.path} did not record {name}")
    if not corrupt.has(f"grad.{name}", rx):
        raise HexRayError(f"the corrupt trace {corrupt.path} holds no gradient of {name}: record it with "
                          "hexray record --grad METRIC")
    a = clean.tensor(name, rc).astype(np.float64)
    b = corrupt.tensor(name, rx).astype(np.float64)
    g = corrupt.tensor(f"grad.{name}", rx).astype(np.float64)
    if a.shape != b.shape or g.shape != b.shape:
        raise HexRayError(f"{name}: clean {list(a.shape)}, corrupt {list(b.shape)}, gradient {list(g.shape)} differ")
    return a, b, g


def check_pair(clean, corrupt, run_clean: int = 0, run_corrupt: int = 0) -> dict:
    """The corrupt trace's ``meta["grad"]``, once it is known to hold gradients and both runs to be as long."""
    grad = corrupt.meta.get("grad")
    if not isinstance(grad, dict):
        raise HexRayError(f"{corrupt.path} holds no gradients: record the corrupt prompt with hexray record --grad "
                          "METRIC (e.g. --grad 'logit-diff:\" Mary\",\" John\"')")
    kit_c, kit_x = (t.meta.get("kit") or {} for t in (clean, corrupt))
    if isinstance(kit_c, dict) and isinstance(kit_x, dict) and kit_c.get("sha256") != kit_x.get("sha256"):
        raise HexRayError(f"{clean.path} and {corrupt.path} were recorded from different models (their kits "
                          f"{str(kit_c.get('sha256'))[:12]} and {str(kit_x.get('sha256'))[:12]} differ)")
    nc, nx = clean.run(run_clean).n_tokens, corrupt.run(run_corrupt).n_tokens
    if nc != nx:
        raise HexRayError(f"clean and corrupt runs must have the same token count: clean is {nc} tokens, "
                          f"corrupt {nx}")
    return grad


def estimate(clean, corrupt, *, run_clean: int = 0, run_corrupt: int = 0, star: bool = True) -> dict:
    """Every AtP estimate the two traces allow: ``{name: array}`` in the layouts above, plus ``"metric"``."""
    grad = check_pair(clean, corrupt, run_clean, run_corrupt)
    n_layers = corrupt.n_layers
    out: dict = {"metric": grad, "metric_value": corrupt.run(run_corrupt).info.get("grad", {}).get("metric_value")
                 if isinstance(corrupt.run(run_corrupt).info.get("grad"), dict) else None}
    for key, pattern in NODE_HOOKS.items():
        names = [pattern.format(l=layer) for layer in range(n_layers)]
        if not all(clean.has(n, run_clean) and corrupt.has(n, run_corrupt) and corrupt.has(f"grad.{n}", run_corrupt)
                   for n in names):
            continue
        rows = []
        for n in names:
            a, b, g = _pair(clean, corrupt, run_clean, run_corrupt, n)
            rows.append(((a - b) * g).sum(-1))
        out[key] = np.stack(rows)
    if "heads-by-pos" in out:
        out["heads"] = out["heads-by-pos"].sum(1)
    if corrupt.has("grad.hook_embed", run_corrupt) and clean.has("hook_embed", run_clean):
        a, b, g = _pair(clean, corrupt, run_clean, run_corrupt, "hook_embed")
        out["embed"] = ((a - b) * g).sum(-1)
    pats = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    if all(corrupt.has(f"grad.{p}", run_corrupt) for p in pats):
        rows, qs, ks = [], [], []
        for layer, p in enumerate(pats):
            ga = corrupt.tensor(f"grad.{p}", run_corrupt).astype(np.float64)
            ac = attention_pattern(clean, run_clean, layer).astype(np.float64)
            ax = attention_pattern(corrupt, run_corrupt, layer).astype(np.float64)
            rows.append(((ac - ax) * ga).sum((1, 2)))
            if star and _qk_names(corrupt, layer) and _qk_names(clean, layer):
                q, k = _atp_star(clean, corrupt, run_clean, run_corrupt, layer, ga)
                qs.append(q)
                ks.append(k)
        out["pattern"] = np.stack(rows)
        if qs and len(qs) == n_layers:
            out["q"], out["k"] = np.stack(qs), np.stack(ks)
    return out


def _scores(q: np.ndarray, k: np.ndarray, params: dict, rep: int) -> np.ndarray:
    """Masked, soft-capped scores [heads, n_q, n_k] of queries q [n, heads, d] and keys k [n, kv, d] (float64)."""
    kk = np.repeat(k, rep, axis=1)  # [n, heads, d]
    s = np.einsum("qhd,khd->hqk", q, kk) * params["scale"]
    if params.get("softcap"):
        s = params["softcap"] * np.tanh(s / params["softcap"])
    n = q.shape[0]
    qi, ki = np.arange(n)[:, None], np.arange(n)[None, :]
    masked = ki > qi
    if params.get("window"):
        masked |= ki <= qi - params["window"]
    return np.where(masked[None], -np.inf, s)


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _atp_star(clean, corrupt, rc: int, rx: int, layer: int, ga: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AtP* for one layer: ([n, heads] query effects, [n, kv_heads] key effects), exact softmax per patch."""
    qn, kn = _qk_names(corrupt, layer)
    params = _layer_params(corrupt, layer)
    qx, kx = corrupt.tensor(qn, rx).astype(np.float64), corrupt.tensor(kn, rx).astype(np.float64)
    qc, kc = clean.tensor(qn, rc).astype(np.float64), clean.tensor(kn, rc).astype(np.float64)
    n, n_heads, n_kv = qx.shape[0], qx.shape[1], kx.shape[1]
    rep = n_heads // n_kv
    sx = _scores(qx, kx, params, rep)            # [h, q, k] corrupt scores
    ax = _softmax(sx)
    base = (ax * ga).sum(-1)                     # [h, q]: Σ_s A·g per row
    # Queries: patching q at (h, pos) changes row pos of head h only.
    sq = _scores(qc, kx, params, rep)            # row q of head h = clean query against corrupt keys
    q_eff = ((_softmax(sq) * ga).sum(-1) - base).T   # [n, heads]
    # Keys: patching k at (g, s) changes column s of every row of the heads in group g. With c the new
    # score, the row's weights become softmax of the row with column s replaced: closed form per (q, s).
    kk_c = np.repeat(kc, rep, axis=1)
    c = np.einsum("qhd,khd->hqk", qx, kk_c) * params["scale"]   # c[h, q, s]: query q against clean key s
    if params.get("softcap"):
        c = params["softcap"] * np.tanh(c / params["softcap"])
    valid = np.isfinite(sx)                      # the key s is visible from q
    m = np.maximum(np.where(valid, sx, -np.inf).max(-1, keepdims=True),
                   np.where(valid, c, -np.inf).max(-1, keepdims=True))
    e = np.where(valid, np.exp(sx - m), 0.0)     # [h, q, k]
    z = e.sum(-1, keepdims=True)
    p = (e * ga).sum(-1, keepdims=True)
    ec = np.where(valid, np.exp(c - m), 0.0)
    z2 = z - e + ec
    p2 = p - e * ga + ec * ga
    k_eff_h = np.where(valid, p2 / z2 - p / z, 0.0).sum(1)   # [h, s]: summed over the query rows
    k_eff = k_eff_h.reshape(n_kv, rep, n).sum(1).T          # [n, kv]
    return q_eff, k_eff
