"""Attention rows: the one way replay reads attention, whatever the trace stores.

A trace holds, per layer, either the query and key vectors the attention used (``meta["attention"]``,
the default: linear in the context) or the full ``hook_pattern`` (older traces, ``--hooks`` asking for
it, and layers the recorder could not reproduce from q and k). Every consumer (the ``--attention``
view, CoT step-to-step attention, the Python API, the language server) goes through:

    attention_rows(trace, run, layer, queries)    [heads, len(queries), n] weights of some queries
    attention_row(trace, run, layer, query)       [heads, n] weights of one query
    attention_blocks(trace, run, layer)           (q0, q1, [heads, q1 - q0, q1]) blocks of bounded size

Recomputation is softmax(softcap(scale · q · kᵀ) + causal / sliding-window mask), per head, with the
head's key/value group under grouped-query attention. A trace recorded with blockwise attention
(``meta["attention"]["lse"]``) also holds each row's log-sum-exp as the model computed it, so a row is
exp(score - LSE) with no normalisation pass; see ``hexray_core/record/attention.py`` for the
record-time check that makes it faithful and the bound its rounding implies (``rounding_bound``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from hexray_core.errors import HexRayError

#: Scores computed at once when iterating blocks (heads × queries × keys float32): bounds memory.
BLOCK_ELEMENTS = 1 << 23



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
    out = AttentionSummary(r.id, q, r.labels[q])
    for layer in range(trace.n_layers):
        for head, weights in enumerate(attention_row(trace, r.id, layer, q)):
            keys = np.argsort(-weights[: q + 1], kind="stable")[:top_keys]
            focus = float(weights[1: q + 1].max()) if q >= 1 else float(weights[0])
            out.heads.append(HeadFocus(layer, head, f"L{layer}H{head}",
                                       [(int(k), r.labels[k], float(weights[k])) for k in keys], focus))
    out.heads.sort(key=lambda h: -h.focus)
    del out.heads[top_heads:]
    return out


# -- where a layer's attention comes from ------------------------------------------------------

def _pattern_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


def _lse_name(trace, layer: int) -> str | None:
    spec = trace.meta.get("attention")
    template = spec.get("lse") if isinstance(spec, dict) else None
    if not isinstance(template, str):
        return None
    try:
        return template.format(layer=layer)
    except (AttributeError, KeyError, IndexError, ValueError):
        return None


def _qk_names(trace, layer: int) -> tuple[str, str] | None:
    spec = trace.meta.get("attention")
    if not isinstance(spec, dict) or spec.get("store") != "qk":
        return None
    try:
        return spec["q"].format(layer=layer), spec["k"].format(layer=layer)
    except (AttributeError, KeyError, IndexError, ValueError):
        return None


def _layer_params(trace, layer: int) -> dict:
    layers = trace.meta["attention"].get("layers")
    if not isinstance(layers, list) or not 0 <= layer < len(layers) or not isinstance(layers[layer], dict):
        raise HexRayError(f"{trace.path}: meta.attention.layers has no entry for layer {layer}")
    p = layers[layer]
    scale, softcap, window = p.get("scale"), p.get("softcap"), p.get("window")
    if not isinstance(scale, int | float) or not np.isfinite(scale):
        raise HexRayError(f"{trace.path}: meta.attention.layers[{layer}].scale is not a number")
    if softcap is not None and (not isinstance(softcap, int | float) or not softcap > 0):
        raise HexRayError(f"{trace.path}: meta.attention.layers[{layer}].softcap must be a positive number or null")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise HexRayError(f"{trace.path}: meta.attention.layers[{layer}].window must be a positive integer or null")
    return {"scale": float(scale), "softcap": float(softcap) if softcap else None, "window": window}


def attention_source(trace, run: int, layer: int) -> str:
    """``"pattern"`` (stored), ``"qk"`` (recomputed), or a HexRayError naming what to record."""
    if trace.has(_pattern_name(layer), run):
        return "pattern"
    names = _qk_names(trace, layer)
    if names is not None and all(trace.has(n, run) for n in names):
        return "qk"
    want = " and ".join(names) if names else _pattern_name(layer)
    raise HexRayError(f"attention views need {want} (or {_pattern_name(layer)}), which this trace did not record; "
                      "record with --hooks default (or add --hooks default,blocks.*.attn.hook_pattern)")


class _QK:
    """One layer's queries and keys as the trace holds them; rows are products per key/value group."""

    #: Up to this many consecutive query rows are read as a row range, not the whole q tensor.
    ROW_READ = 256

    def __init__(self, trace, run: int, layer: int):
        self.trace, self.run = trace, run
        self.q_name, k_name = _qk_names(trace, layer)
        q_shape = trace.reader.info(trace.stored_name(self.q_name, run), run).shape
        k_shape = trace.reader.info(trace.stored_name(k_name, run), run).shape
        if len(q_shape) != 3 or len(k_shape) != 3 or k_shape[0] != q_shape[0] or k_shape[2] != q_shape[2] \
                or k_shape[1] < 1 or q_shape[1] % k_shape[1]:
            raise HexRayError(f"{trace.path}: {self.q_name} {list(q_shape)} and {k_name} {list(k_shape)} do not "
                              "fit together as queries [n, heads, d] and keys [n, kv_heads, d]")
        self.k = trace.tensor_by_head(k_name, run)  # [kv_heads, n, d]: each head's keys contiguous
        self.n, self.n_heads = int(q_shape[0]), int(q_shape[1])
        self.rep = self.n_heads // int(k_shape[1])
        self.params = _layer_params(trace, layer)
        self.lse = None  # [heads, n] float32: the softmax's normaliser per row, as the model computed it
        lse_name = _lse_name(trace, layer)
        if lse_name is not None and trace.has(lse_name, run):
            lse = trace.tensor(lse_name, run)
            if lse.shape != (self.n_heads, self.n):
                raise HexRayError(f"{trace.path}: {lse_name} is {list(lse.shape)}, expected [{self.n_heads}, {self.n}] "
                                  "(heads, tokens)")
            self.lse = lse.astype(np.float32, copy=False)

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        lo, hi = int(queries.min()), int(queries.max()) + 1
        if hi - lo <= self.ROW_READ:  # a hover or a click: a few rows, not the layer's whole q
            return self.trace.tensor_rows(self.q_name, self.run, lo, hi)[queries - lo]
        return self.trace.tensor(self.q_name, self.run)[queries]

    def rows(self, queries: np.ndarray, n_keys: int) -> np.ndarray:
        """[heads, len(queries), n_keys] softmax weights (keys at or before each query, within its window)."""
        b = len(queries)
        out = np.empty((self.n_heads, b, n_keys), dtype=np.float32)
        qs = self._queries(queries) * np.float32(self.params["scale"])  # [b, heads, d], scaled
        for g in range(self.k.shape[0]):  # the heads sharing key/value head g: one matrix product
            heads = slice(g * self.rep, (g + 1) * self.rep)
            scores = qs[:, heads, :].reshape(b * self.rep, -1) @ self.k[g, :n_keys].T  # [b * rep, n_keys]
            out[heads] = scores.reshape(b, self.rep, n_keys).transpose(1, 0, 2)
        return softmax_rows(out, queries, self.params, None if self.lse is None else self.lse[:, queries])


def softmax_rows(scores: np.ndarray, queries: np.ndarray, params: dict, lse: np.ndarray | None = None) -> np.ndarray:
    """Soft-cap, mask and normalise scaled q·k scores ``[heads, len(queries), n_keys]`` in place (the scale is
    applied to q before the product: one pass less over the scores). With the rows' log-sum-exp ``lse``
    ``[heads, len(queries)]`` (recorded), a weight is exp(score - LSE): no max or sum pass."""
    cap = params.get("softcap")
    if cap:
        np.tanh(scores / np.float32(cap), out=scores)
        scores *= np.float32(cap)
    window = params.get("window")
    for j, q in enumerate(queries):  # slices, not a boolean mask: a mask costs a pass over every score
        scores[:, j, q + 1:] = -np.inf
        if window and q - window >= 0:
            scores[:, j, : q - window + 1] = -np.inf
    if lse is not None:
        scores -= lse[..., None]
        return np.exp(scores, out=scores)
    scores -= scores.max(-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(-1, keepdims=True)
    return scores


def rounding_bound(q: np.ndarray, k: np.ndarray, queries, scale: float, u: float) -> np.ndarray:
    """Largest score error ``[heads, len(queries)]`` when q and k were rounded with unit roundoff ``u``:
    Δ = |scale| · max_s Σ_i |q_i k_i| · (2u + u²). A pattern weight p then moves by at most
    max(p, p̂) · (e^(2Δ) - 1) (the record-time check uses the same bound)."""
    queries = np.asarray(queries)
    qa, ka = np.abs(q[queries]).astype(np.float64), np.abs(k).astype(np.float64)
    rep = q.shape[1] // k.shape[1]
    mag = np.einsum("qhd,khd->hqk", qa, np.repeat(ka, rep, axis=1)) * abs(scale) * (2 * u + u * u)
    mag[:, np.arange(k.shape[0])[None, :] > queries[:, None]] = 0.0
    return mag.max(-1)


# -- the row-level interface ---------------------------------------------------------------------

def attention_rows(trace, run: int, layer: int, queries) -> np.ndarray:
    """``[heads, len(queries), n]`` attention weights of the given query positions (zero after each query)."""
    r = trace.run(run)
    queries = np.asarray([r.position(int(q)) for q in np.atleast_1d(queries)], dtype=np.int64)
    if attention_source(trace, r.id, layer) == "pattern":
        return _stored_rows(trace, r.id, layer, queries)
    src = _QK(trace, r.id, layer)
    return src.rows(queries, src.n)


def attention_row(trace, run: int, layer: int, query: int) -> np.ndarray:
    """``[heads, n]`` attention weights of one query."""
    return attention_rows(trace, run, layer, [query])[:, 0, :]


def attention_blocks(trace, run: int, layer: int, *, elements: int = BLOCK_ELEMENTS
                     ) -> Iterator[tuple[int, int, np.ndarray]]:
    """The whole ``[heads, n, n]`` pattern as blocks of consecutive queries: ``(q0, q1, rows)`` with rows
    ``[heads, q1 - q0, q1]`` (causal: no key after ``q1 - 1``), each at most ``elements`` floats."""
    r = trace.run(run)
    n = r.n_tokens
    stored = attention_source(trace, r.id, layer) == "pattern"
    src = None if stored else _QK(trace, r.id, layer)
    heads = _stored_heads(trace, r.id, layer) if stored else src.n_heads
    q0 = 0
    while q0 < n:
        # a block of b queries holds heads · b · q1 scores, q1 ≤ n: size it for the longest rows
        q1 = min(n, q0 + max(1, elements // max(heads * n, 1)))
        queries = np.arange(q0, q1)
        rows = _stored_rows(trace, r.id, layer, queries)[:, :, :q1] if stored else src.rows(queries, q1)
        yield q0, q1, rows
        q0 = q1


def attention_pattern(trace, run: int, layer: int) -> np.ndarray:
    """The full ``[heads, n, n]`` pattern (as ``run_with_cache``'s ``hook_pattern``): quadratic in the context."""
    r = trace.run(run)
    if attention_source(trace, r.id, layer) == "pattern":
        return trace.tensor(_pattern_name(layer), r.id)
    out = None
    for q0, q1, rows in attention_blocks(trace, r.id, layer):
        if out is None:
            out = np.zeros((rows.shape[0], r.n_tokens, r.n_tokens), dtype=np.float32)
        out[:, q0:q1, :q1] = rows
    return out


def _stored_heads(trace, run: int, layer: int) -> int:
    return int(trace.reader.info(trace.stored_name(_pattern_name(layer), run), run).shape[0])


def _stored_rows(trace, run: int, layer: int, queries: np.ndarray) -> np.ndarray:
    """Rows of a stored pattern; a large pattern is read only where it holds them (per head, row ranges)."""
    name = _pattern_name(layer)
    info = trace.reader.info(trace.stored_name(name, run), run)
    if info.nbytes <= 16 << 20:  # small: decode once, keep in the trace's cache
        return trace.tensor(name, run)[:, queries, :]
    lo, hi = int(queries.min()), int(queries.max()) + 1
    block = np.stack([trace.reader.read(info.name, run, index=(h, slice(lo, hi))) for h in range(info.shape[0])])
    return block[:, queries - lo, :]
