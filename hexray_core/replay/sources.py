"""Source attribution (one hop): which earlier tokens each head carried into a prediction.

For a query position q, the target direction u (``final_direction``: the unembedding column, centred
for LayerNorm, over the final norm's recorded scale) and head h of layer l,

    head(l, h) = Σ_{s ≤ q} A[l, h, q, s] · (v[l, s, kv(h)] · W_O[l, h]) · u

each term is the part of the head's direct logit attribution that source token s supplied, and the
terms sum to the head's entry of ``stack_head_results`` (the bias b_O stays with the layer). It says
what a head read from each token's residual stream, not how that stream was built (one hop).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hexray_core.errors import HexRayError

from .attention import attention_blocks, attention_row
from .attribution import final_direction, logit_directions, resolve_target


@dataclass
class SourceAttribution:
    """``values[layer, head, s]``: source token s's share of head (layer, head)'s attribution at ``position``."""

    run: int
    position: int
    target_id: int
    target: str
    baseline_id: int | None
    values: np.ndarray  # [n_layers, n_heads, position + 1]

    @property
    def per_source(self) -> np.ndarray:
        """[position + 1]: each source token's total through all heads."""
        return self.values.sum((0, 1))

    @property
    def per_head(self) -> np.ndarray:
        """[n_layers, n_heads]: each head's direct logit attribution (Σ over sources)."""
        return self.values.sum(-1)

    def top_sources(self, k: int = 10, heads: int = 3) -> list[tuple[int, float, list[tuple[str, float]]]]:
        """(source position, total, [(head label, value), ...strongest heads]) by |total|, largest first."""
        totals = self.per_source
        order = np.argsort(-np.abs(totals), kind="stable")[:k]
        out = []
        n_heads = self.values.shape[1]
        for s in order:
            flat = self.values[:, :, s].reshape(-1)
            best = np.argsort(-np.abs(flat), kind="stable")[:heads]
            out.append((int(s), float(totals[s]), [(f"L{i // n_heads}H{i % n_heads}", float(flat[i])) for i in best]))
        return out


def source_attribution(trace, *, position: int = -1, run: int = 0, target: str | int | None = None,
                       baseline: str | int | None = None) -> SourceAttribution:
    """Split every head's direct logit attribution at ``position`` over the source tokens it attended to."""
    r = trace.run(run)
    q = r.position(position)
    tid = resolve_target(trace, r.id, q, target)
    bid = None if baseline is None else resolve_target(trace, r.id, q, baseline)
    u, _ = final_direction(trace, r.id, q, tid, bid)
    kit = trace.require_kit("source attribution (W_O)")
    W_O = kit["W_O"]  # [layers, heads, d_head, d_model]
    u32 = u.astype(np.float32)  # the activations are float32: a float64 u would convert W_O on every call
    out = None
    for layer in range(trace.n_layers):
        v = _values(trace, r.id, layer)[:, : q + 1]  # [kv_heads, sources, d_head]
        A = attention_row(trace, r.id, layer, q)[:, : q + 1]  # [heads, sources]
        n_heads = A.shape[0]
        _check_heads(trace, layer, v, n_heads)
        w = W_O[layer] @ u32  # [heads, d_head]: what one unit of each head's value direction adds to the logit
        rep = n_heads // v.shape[0]
        through = np.empty((n_heads, q + 1), dtype=np.float32)  # [heads, sources]
        for g in range(v.shape[0]):  # per key/value group
            through[g * rep:(g + 1) * rep] = w[g * rep:(g + 1) * rep] @ v[g].T
        if out is None:
            out = np.empty((trace.n_layers, n_heads, q + 1))
        out[layer] = A * through
    return SourceAttribution(r.id, q, tid, trace.token_str(tid, r.id), bid, out)


def _values(trace, run: int, layer: int) -> np.ndarray:
    """``[kv_heads, n, d_head]``: the layer's value vectors, each head's contiguous."""
    name = f"blocks.{layer}.attn.hook_v"
    if not trace.has(name, run):
        raise HexRayError(f"source attribution needs {name}, which this trace did not record; "
                          f"record with --hooks default (or --hooks default,blocks.*.attn.hook_v)")
    return trace.tensor_by_head(name, run)


def _check_heads(trace, layer: int, v: np.ndarray, n_heads: int) -> None:
    if v.ndim != 3 or v.shape[0] < 1 or n_heads % v.shape[0]:
        raise HexRayError(f"{trace.path}: blocks.{layer}.attn.hook_v has {v.shape[0]} heads, which does not "
                          f"fit {n_heads} query heads")


def step_sources(trace, run: int, steps_of: np.ndarray, n_steps: int) -> np.ndarray:
    """``[n_steps, n_tokens]``: what each source token supplied, through all heads, to the logits of every
    step's tokens (each token's logit at the position before it, as in the CoT breakdown).

    Row i summed over sources is the heads' part of step i's attention attribution (the layers' ``b_O``
    excluded). Computed block by block over the attention (``attention_blocks``): memory stays bounded,
    time grows as the attention itself (n² per layer and head).
    """
    r = trace.run(run)
    n = r.n_tokens
    out = np.zeros((n_steps, n))
    if n < 2:
        return out
    W_O = trace.require_kit("source attribution (W_O)")["W_O"]
    u, _ = logit_directions(trace, r.id, np.arange(n - 1), np.asarray(r.tokens[1:]))  # [n-1, d]
    produced = np.asarray(steps_of[1:])  # the step of the token each position predicts
    for layer in range(trace.n_layers):
        v = _values(trace, r.id, layer)
        for q0, q1, rows in attention_blocks(trace, r.id, layer):  # rows [heads, q1 - q0, q1]
            q1p = min(q1, n - 1)  # the last position predicts nothing
            if q1p <= q0:
                continue
            A = rows[:, : q1p - q0]
            _check_heads(trace, layer, v, A.shape[0])
            rep = A.shape[0] // v.shape[0]
            w = np.einsum("hkd,bd->hbk", W_O[layer], u[q0:q1p])  # [heads, b, d_head]
            contrib = np.zeros((q1p - q0, q1))
            for h in range(A.shape[0]):
                contrib += A[h] * (w[h] @ v[h // rep, :q1].T)  # [b, sources]
            sid = produced[q0:q1p]
            keep = sid >= 0
            np.add.at(out[:, :q1], sid[keep], contrib[keep])
    return out
