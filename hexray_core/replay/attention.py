"""Attention at one query position: which heads attend most, and to which tokens."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class HeadFocus:
    layer: int
    head: int
    label: str  # "L3H7"
    keys: list[tuple[int, str, float]]  # (key position, token text, weight), heaviest first
    focus: float  # weight on the heaviest key, first token excluded


@dataclass
class AttentionSummary:
    run: int
    position: int
    token: str
    heads: list[HeadFocus] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def attention_summary(trace, *, position: int = -1, run: int = 0, top_heads: int = 10,
                      top_keys: int = 3) -> AttentionSummary:
    """Rank heads by the weight they put on a single key other than the first token.

    The first token is excluded from the ranking because many heads park their attention there
    (an "attention sink") without reading anything from it; its weight is still reported.
    """
    r = trace.run(run)
    q = r.position(position)
    rows = []
    for layer in range(trace.n_layers):
        rows.append(attention_row(trace, r.id, layer, q))
    out = AttentionSummary(r.id, q, r.labels[q])
    for layer, row in enumerate(rows):
        for head, weights in enumerate(row):
            keys = np.argsort(-weights[: q + 1], kind="stable")[:top_keys]
            focus = float(weights[1: q + 1].max()) if q >= 1 else float(weights[0])
            out.heads.append(HeadFocus(layer, head, f"L{layer}H{head}",
                                       [(int(k), r.labels[k], float(weights[k])) for k in keys], focus))
    out.heads.sort(key=lambda h: -h.focus)
    del out.heads[top_heads:]
    return out


def attention_row(trace, run: int, layer: int, query: int) -> np.ndarray:
    """[heads, n_keys] attention weights of one query; a large pattern is read only where it holds them."""
    name = f"blocks.{layer}.attn.hook_pattern"
    if not trace.has(name, run):
        from hexray_core.errors import HexRayError

        raise HexRayError(f"attention views need {name}, which this trace did not record")
    info = trace.reader.info(trace.stored_name(name, run), run)
    if info.nbytes <= 16 << 20:  # small: decode once, keep in the trace's cache
        return trace.tensor(name, run)[:, query, :]
    return np.stack([trace.reader.read(info.name, run, index=(h, slice(query, query + 1)))[0]
                     for h in range(info.shape[0])])
