"""Attention in linear space: what replay needs to recompute any pattern row from q and k.

A stored pattern is ``n_heads × n × n`` per layer (Llama-3.1-8B: 8.6 GB at 2k tokens); the query
and key vectors as the attention uses them (after rotary embeddings, per key/value head) are
``n × heads × d_head``. So a recording stores q and k, and replay recomputes

    pattern[h, q, s] = softmax_s( softcap(scale · q[q, h] · k[s, kv(h)]) + mask[q, s] )

with ``kv(h) = h // (n_heads / n_kv_heads)``, the causal mask, and a sliding window where the
layer has one (key s is visible from query q when ``q - window < s <= q``).

Faithful by construction: while the model runs, ``AttentionCheck`` recomputes sampled rows of every
layer from q and k *rounded to the storage dtype* (what replay will read) and compares them with the
model's own ``hook_pattern``, within the bound that rounding implies (see ``row_bound``). A layer
that fails gets its full pattern stored, as before, and the run says so (``run["attention"]``).
"""

from __future__ import annotations

import math

import torch

from .rotary import rotary_spec

#: Rows checked per layer and run: the first, the last (the longest, where a sliding window bites)
#: and evenly spaced ones between.
CHECK_ROWS = 8

#: Unit roundoff of each storage dtype (q and k are rounded once each).
UNIT_ROUNDOFF = {"f32": 2.0 ** -24, "f16": 2.0 ** -11, "bf16": 2.0 ** -8}

#: Slack for the model's own arithmetic in its dtype (accumulation order, fused kernels).
MODEL_SLACK = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _hf_config(bridge):
    return getattr(getattr(bridge, "original_model", None), "config", None)


def attention_spec(bridge) -> tuple[dict | None, str | None]:
    """(``meta["attention"]``, None) when q/k recomputation applies to this model, else (None, why not)."""
    cfg = bridge.cfg
    hook_dict = dict(bridge.hook_dict)
    n_layers = int(cfg.n_layers)
    rotary = "blocks.0.attn.hook_rot_q" in hook_dict and "blocks.0.attn.hook_rot_k" in hook_dict
    q_name = "blocks.{layer}.attn.hook_rot_q" if rotary else "blocks.{layer}.attn.hook_q"
    k_name = "blocks.{layer}.attn.hook_rot_k" if rotary else "blocks.{layer}.attn.hook_k"
    for layer in range(n_layers):
        for name in (q_name, k_name, "blocks.{layer}.attn.hook_pattern"):
            if name.format(layer=layer) not in hook_dict:
                return None, f"the model has no hook {name.format(layer=layer)}"
    hf = _hf_config(bridge)
    if str(getattr(cfg, "attention_dir", "causal")) != "causal":
        return None, "its attention is not causal"
    if getattr(hf, "alibi", False) or str(getattr(cfg, "positional_embedding_type", "")) == "alibi":
        return None, "it uses ALiBi position biases"
    layer_types = getattr(hf, "layer_types", None)
    window = getattr(hf, "sliding_window", None)
    softcap = getattr(hf, "attn_logit_softcapping", None)
    layers = []
    for layer in range(n_layers):
        attn = bridge.blocks[layer].attn
        orig = getattr(attn, "original_component", None)
        if orig is not None and getattr(orig, "sinks", None) is not None:
            return None, "it uses attention sinks"
        d_head = int(cfg.d_head)
        scale = getattr(orig, "scaling", None)
        if scale is None:
            scale = d_head ** -0.5 if getattr(hf, "scale_attn_weights", True) else 1.0
            if getattr(hf, "scale_attn_by_inverse_layer_idx", False):
                scale /= float(layer + 1)
        if layer_types is not None:
            w = window if layer < len(layer_types) and layer_types[layer] == "sliding_attention" else None
        else:
            w = window if window and getattr(hf, "use_sliding_window", True) else None
        layers.append({"scale": float(scale), "softcap": float(softcap) if softcap else None,
                       "window": int(w) if w else None})
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    spec = {"store": "qk", "q": q_name, "k": k_name, "n_heads": int(cfg.n_heads), "n_kv_heads": n_kv,
            "layers": layers}
    if rotary:  # the rotation replay's QK tracing applies to each node's contribution (rotary.py)
        spec["rotary"] = rotary_spec(bridge)
    return spec, None


def check_rows(n: int, count: int = CHECK_ROWS) -> list[int]:
    """Query positions checked in an ``n``-token run: first, last, and evenly spaced between."""
    if n <= count:
        return list(range(n))
    return sorted({round(i * (n - 1) / (count - 1)) for i in range(count)})


def _scores(q: torch.Tensor, k: torch.Tensor, queries: list[int], layer: dict):
    """(scores ``[heads, len(queries), n]`` after scale and soft-cap, the keys each query sees, the query index)
    from ``q`` ``[n, heads, d]`` and ``k`` ``[n, kv_heads, d]``, in float32."""
    q, k = q.float(), k.float()
    rep = q.shape[1] // k.shape[1]
    qi = torch.as_tensor(queries, device=q.device)
    kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k
    scores = torch.einsum("qhd,khd->hqk", q[qi], kk) * layer["scale"]
    if layer.get("softcap"):
        scores = torch.tanh(scores / layer["softcap"]) * layer["softcap"]
    keys = torch.arange(k.shape[0], device=q.device)[None, :]
    visible = keys <= qi[:, None]
    if layer.get("window"):
        visible &= keys > qi[:, None] - layer["window"]
    return scores, visible, qi


def recompute_rows(q: torch.Tensor, k: torch.Tensor, queries: list[int], layer: dict) -> torch.Tensor:
    """``[heads, len(queries), n]`` pattern rows from ``q`` ``[n, heads, d]`` and ``k`` ``[n, kv_heads, d]``."""
    scores, visible, _ = _scores(q, k, queries, layer)
    return scores.masked_fill(~visible, float("-inf")).softmax(-1)


def row_bound(q: torch.Tensor, k: torch.Tensor, queries: list[int], layer: dict, u: float) -> torch.Tensor:
    """Largest score error ``[heads, len(queries)]`` from rounding q and k with unit roundoff ``u``.

    Each score is scale · Σ_i q_i k_i; rounding q_i and k_i (relative error ≤ u each) moves it by at most
    Δ = scale · Σ_i |q_i k_i| · (2u + u²) (soft-capping only shrinks differences). A softmax whose
    inputs move by at most Δ changes each weight p by a factor within [e^(-2Δ), e^(2Δ)], so
    |p̂ - p| ≤ max(p, p̂) · (e^(2Δ) - 1). Replay's numpy module uses the same bound.
    """
    q, k = q.float().abs(), k.float().abs()
    rep = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k
    qi = torch.as_tensor(queries, device=q.device)
    mag = torch.einsum("qhd,khd->hqk", q[qi], kk) * abs(layer["scale"]) * (2 * u + u * u)
    keys = torch.arange(k.shape[0], device=q.device)[None, :]
    return mag.masked_fill(keys > qi[:, None], 0.0).amax(-1)


class AttentionCheck:
    """Checks, layer by layer while the model runs, that replay's recomputation reproduces the model."""

    def __init__(self, spec: dict, store_tag: str, model_dtype: torch.dtype):
        self.spec = spec
        self.store = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[store_tag]
        self.u = UNIT_ROUNDOFF[store_tag]
        self.slack = MODEL_SLACK.get(model_dtype, 3e-2)
        self.q_names = {spec["q"].format(layer=i): i for i in range(len(spec["layers"]))}
        self.k_names = {spec["k"].format(layer=i): i for i in range(len(spec["layers"]))}
        self.pattern_names = {f"blocks.{i}.attn.hook_pattern": i for i in range(len(spec["layers"]))}
        self.reset()

    def reset(self) -> None:
        self._qk: dict[tuple[int, str], torch.Tensor] = {}
        self.failed: list[int] = []
        self.max_excess = -math.inf  # max over checked weights of error - bound (negative: inside)
        self.max_error = 0.0

    def watches(self, name: str) -> bool:
        return name in self.q_names or name in self.k_names or name in self.pattern_names

    def see(self, name: str, tensor: torch.Tensor) -> bool | None:
        """Feed one hooked tensor. For a pattern, returns whether the layer is reproduced (False: store it)."""
        t = tensor.detach()
        if t.dim() == 4:  # batch of one
            t = t[0]
        if name in self.q_names:
            self._qk[(self.q_names[name], "q")] = t
            return None
        if name in self.k_names:
            self._qk[(self.k_names[name], "k")] = t
            return None
        layer = self.pattern_names[name]
        q, k = self._qk.pop((layer, "q"), None), self._qk.pop((layer, "k"), None)
        ok = q is not None and k is not None and self._check(layer, q, k, t)
        if not ok:
            self.failed.append(layer)
        return ok

    def _check(self, layer: int, q: torch.Tensor, k: torch.Tensor, pattern: torch.Tensor) -> bool:
        n = pattern.shape[-1]
        if q.shape[0] != n or k.shape[0] != n or q.shape[1] != pattern.shape[0]:
            return False
        rows = check_rows(n)
        params = self.spec["layers"][layer]
        with torch.no_grad():
            q_st, k_st = q.to(self.store), k.to(self.store)  # exactly what the trace will hold
            got = recompute_rows(q_st, k_st, rows, params)
            want = pattern[:, rows, :].float()
            delta = row_bound(q_st, k_st, rows, params, self.u)[..., None]
            bound = torch.maximum(got, want) * torch.expm1(2 * delta) + self.slack
            err = (got - want).abs()
            self.max_error = max(self.max_error, float(err.max()))
            self.max_excess = max(self.max_excess, float((err - bound).max()))
            return bool((err <= bound).all())

    def run_info(self) -> dict:
        return {"recomputed": "qk", "stored_patterns": sorted(self.failed), "checked_rows": CHECK_ROWS,
                "max_error": self.max_error}


def lse_rows(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, queries: list[int], layer: dict) -> torch.Tensor:
    """``[heads, len(queries), n]`` pattern rows as exp(score - LSE): no normalisation pass (what replay does)."""
    scores, visible, qi = _scores(q, k, queries, layer)
    return torch.exp(scores - lse[:, qi, None].float()).masked_fill(~visible, 0.0)


class FlashCheck:
    """The record-time check when attention ran blockwise (``flash.py``): there is no ``hook_pattern``.

    For sampled rows of every layer, replay's rows p̂ = exp(ŝ - LSE) are rebuilt from q and k rounded to
    the storage dtype and the LSE the model computed, and compared with what the model computed:

    * the row sums to 1: |Σ p̂ - 1| ≤ Σ p̂ · (e^(2Δ) - 1) + slack
    * p̂ · v reproduces the model's z (``hook_z``): |p̂ · v - z| ≤ (e^(2Δ) - 1) · Σ p̂ |v| + slack · (Σ p̂ |v| + ε)

    Δ is ``row_bound``'s score error from rounding q and k. The model's p is exp(s - LSE) with |ŝ - s| ≤ Δ,
    so p̂ = p · e^(±Δ) and |p̂ - p| ≤ p̂ (e^(2Δ) - 1) (p ≤ p̂ e^Δ); Σ p = 1 and z = Σ p v give both bounds.
    ``slack`` (``MODEL_SLACK``) covers the model's own arithmetic (its dtype's scores, softmax and
    products). A layer that fails has its pattern computed from the model's q and k and stored, as on
    the eager path.
    """

    def __init__(self, spec: dict, store_tag: str, model_dtype: torch.dtype):
        self.spec = spec
        self.store = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[store_tag]
        self.u = UNIT_ROUNDOFF[store_tag]
        self.slack = MODEL_SLACK.get(model_dtype, 3e-2)
        n = len(spec["layers"])
        self.q_names = {spec["q"].format(layer=i): i for i in range(n)}
        self.k_names = {spec["k"].format(layer=i): i for i in range(n)}
        self.v_names = {f"blocks.{i}.attn.hook_v": i for i in range(n)}
        self.z_names = {f"blocks.{i}.attn.hook_z": i for i in range(n)}
        self.reset()

    def reset(self) -> None:
        self._held: dict[tuple[int, str], torch.Tensor] = {}
        self._used: dict[int, dict] = {}
        self._failed_inputs = None
        self.failed: list[int] = []
        self.max_excess = -math.inf
        self.max_error = 0.0

    def watches(self, name: str) -> bool:
        return name in self.q_names or name in self.k_names or name in self.v_names or name in self.z_names

    def see_lse(self, layer: int, lse: torch.Tensor, used: dict) -> None:
        """The layer's LSE ``[1, heads, n]`` and the scale, soft-cap and window the model's attention used."""
        self._held[(layer, "lse")] = lse.detach()[0]
        self._used[layer] = used

    def see(self, name: str, tensor: torch.Tensor) -> bool | None:
        """Feed one hooked tensor. For ``hook_z``, returns whether the layer is reproduced (False: store it)."""
        t = tensor.detach()
        if t.dim() == 4:  # batch of one
            t = t[0]
        for names, key in ((self.q_names, "q"), (self.k_names, "k"), (self.v_names, "v")):
            if name in names:
                self._held[(names[name], key)] = t
                return None
        layer = self.z_names[name]
        held = {key: self._held.pop((layer, key), None) for key in ("q", "k", "v", "lse")}
        ok = all(x is not None for x in held.values()) and self._check(layer, t, **held)
        if not ok:
            self.failed.append(layer)
            self._failed_inputs = (layer, held["q"], held["k"], held["lse"])
        return ok

    def failed_pattern(self, layer: int) -> torch.Tensor | None:
        """The full ``[heads, n, n]`` pattern of a failed layer as the model computed it: exp(score - LSE) from
        its own q and k at full precision, with the scale, soft-cap and window its attention used."""
        held, used = self._failed_inputs, self._used.get(layer)
        if held is None or held[0] != layer or any(x is None for x in held[1:]) or used is None:
            return None
        _, q, k, lse = held
        self._failed_inputs = None
        return lse_rows(q, k, lse, list(range(q.shape[0])), used)

    def _check(self, layer: int, z: torch.Tensor, *, q, k, v, lse) -> bool:
        n = q.shape[0]
        if k.shape[0] != n or v.shape[0] != n or lse.shape != (q.shape[1], n) or z.shape[:2] != q.shape[:2]:
            return False
        rows = check_rows(n)
        params = self.spec["layers"][layer]
        with torch.no_grad():
            q_st, k_st = q.to(self.store), k.to(self.store)  # exactly what the trace will hold
            p = lse_rows(q_st, k_st, lse, rows, params)  # [heads, rows, n]
            grow = torch.expm1(2 * row_bound(q_st, k_st, rows, params, self.u))  # [heads, rows]
            rep = q.shape[1] // v.shape[1]
            vv = v.float().repeat_interleave(rep, dim=1) if rep > 1 else v.float()  # [n, heads, d]
            got_z = torch.einsum("hqk,khd->qhd", p, vv)
            mass = torch.einsum("hqk,khd->qhd", p, vv.abs())  # Σ p̂ |v|
            want_z = z.reshape(n, q.shape[1], -1)[rows].float()
            z_err = (got_z - want_z).abs()
            z_bound = grow.T[..., None] * mass + self.slack * (mass + 1e-6)
            total = p.sum(-1)
            sum_err = (total - 1).abs()
            sum_bound = total * grow + self.slack
            self.max_error = max(self.max_error, float(sum_err.max()), float(z_err.max()))
            self.max_excess = max(self.max_excess, float((z_err - z_bound).max()), float((sum_err - sum_bound).max()))
            return bool((z_err <= z_bound).all() and (sum_err <= sum_bound).all())

    def run_info(self) -> dict:
        return {"recomputed": "qk", "stored_patterns": sorted(self.failed), "checked_rows": CHECK_ROWS,
                "max_error": self.max_error, "checked_against": "hook_z and lse"}
