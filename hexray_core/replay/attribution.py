"""Direct logit attribution from a recording.

With the final norm's scale frozen at its recorded value, the logit of token t at position p is

    logit_t = sum_c  c · u_t  +  b_U[t],      u_t = centre(W_U[:, t]) / scale[p]

over the residual stream's components c (embeddings, each attention layer or head plus its bias,
each MLP layer or neuron plus its bias). ``centre`` subtracts the mean over d_model for
LayerNorm models (c·centre(u) = centre(c)·u) and is the identity for RMSNorm. Weights are those
of TransformerLens compatibility mode, where the final norm's gain is folded into W_U and b_U.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from hexray_core.errors import HexRayError

BY_CHOICES = ("component", "head", "neuron")


@dataclass(frozen=True)
class Contribution:
    label: str  # "Embed", "PosEmbed", "Attn L3", "MLP  L3", "L3H7", "L3N1021", "Attn L3 bias", "Bias"
    kind: str  # embed | pos_embed | attn | mlp | head | neuron | attn_bias | mlp_bias | bias
    layer: int | None
    index: int | None  # head or neuron number
    value: float


@dataclass
class Attribution:
    """The decomposition of one logit (or logit difference) into residual-stream components."""

    run: int
    position: int
    token: str  # the token at `position`
    target_id: int
    target: str
    baseline_id: int | None
    baseline: str | None
    by: str
    logit: float  # the recorded logit (or logit difference) being explained
    logit_source: str  # "recorded" or "final residual" when the trace holds no logit for the target
    total: float  # sum of all contributions, bias included
    probability: float | None  # softmax probability of the target, when the trace has the normaliser
    contributions: list[Contribution] = field(default_factory=list)

    @property
    def error(self) -> float:
        """Completeness residual: |sum of parts + bias - logit|."""
        return abs(self.total - self.logit)

    def top(self, k: int = 10, *, include_bias: bool = False) -> list[Contribution]:
        """The k largest contributions by absolute value."""
        parts = [c for c in self.contributions if include_bias or c.kind != "bias"]
        return sorted(parts, key=lambda c: -abs(c.value))[:k]

    @staticmethod
    def shares(parts: list[Contribution]) -> list[float]:
        """|value| / sum |value| over the given parts (what the tables print as a percentage)."""
        denom = sum(abs(c.value) for c in parts) or 1.0
        return [abs(c.value) / denom for c in parts]

    def total_abs(self) -> float:
        """Σ|value| over every component but the constant bias: what a part's share is taken of."""
        return sum(abs(c.value) for c in self.contributions if c.kind != "bias")

    def by_label(self) -> dict[str, float]:
        return {c.label: c.value for c in self.contributions}

    def to_dict(self, top: int | None = None) -> dict:
        d = asdict(self)
        d["error"] = self.error
        if top is not None:
            denom = self.total_abs() or 1.0  # share of the whole, so it does not change with `top`
            d["top"] = [{**asdict(c), "share": abs(c.value) / denom} for c in self.top(top)]
        return d


def _unembed(trace, run: int, token_id: int) -> tuple[np.ndarray, float]:
    """The (processed) unembedding column and bias of one token: from the run, else the kit."""
    cols = _run_unembed(trace, run)
    if cols is not None and token_id in cols[0]:
        i = cols[0][token_id]
        return cols[1][i], float(cols[2][i])
    kit = trace.require_kit(f"attribution to token {trace.token_str(token_id, run)!r} (id {token_id})")
    W_U, b_U = kit["W_U"], kit["b_U"]
    if not 0 <= token_id < W_U.shape[1]:
        raise HexRayError(f"token id {token_id} is outside the vocabulary (0..{W_U.shape[1] - 1})")
    return W_U[:, token_id], float(b_U[token_id])


def _run_unembed(trace, run: int):
    cache = trace._unembed
    rid = trace.run(run).id
    if rid not in cache:
        if trace.has("hexray.unembed_ids", rid):
            ids = trace.tensor("hexray.unembed_ids", rid)
            cache[rid] = ({int(t): i for i, t in enumerate(ids)}, trace.tensor("hexray.unembed_cols", rid),
                          trace.tensor("hexray.unembed_bias", rid))
        else:
            cache[rid] = None
    return cache[rid]


def recorded_logit(trace, run: int, position: int, token_id: int) -> float | None:
    """The logit the model produced for token_id at position, if the trace recorded it."""
    r = trace.run(run)
    if trace.has("hexray.topk_ids", r.id):
        ids = trace.tensor("hexray.topk_ids", r.id)[position]
        hit = np.nonzero(ids == token_id)[0]
        if hit.size:
            return float(trace.tensor("hexray.topk_logits", r.id)[position, hit[0]])
    if position + 1 < r.n_tokens and r.tokens[position + 1] == token_id and trace.has("hexray.next_logit", r.id):
        return float(trace.tensor("hexray.next_logit", r.id)[position])
    return None


def resolve_target(trace, run: int, position: int, target: str | int | None) -> int:
    """'top' (default): the model's top prediction; 'next': the actual next token; else a token text or id."""
    r = trace.run(run)
    if target is None or target == "top":
        return int(trace.tensor("hexray.topk_ids", r.id)[position, 0])
    if target == "next":
        if position + 1 >= r.n_tokens:
            raise HexRayError(f"position {position} is the last token: there is no actual next token "
                              "(use --target top or a token)")
        return r.tokens[position + 1]
    return trace.token_id(target, r.id)


def final_direction(trace, run: int, position: int, target_id: int, baseline_id: int | None):
    """u (the vector every component is dotted with) and the constant bias term."""
    u, bias = _unembed(trace, run, target_id)
    if baseline_id is not None:
        ub, bb = _unembed(trace, run, baseline_id)
        u, bias = u - ub, bias - bb
    u = np.asarray(u, dtype=np.float64)
    if trace.uses_layernorm:
        u = u - u.mean()
    scale = float(trace.tensor("ln_final.hook_scale", run)[position].reshape(-1)[0])
    return u / scale, bias


def direct_logit_attribution(trace, *, position: int = -1, run: int = 0, target: str | int | None = None,
                             baseline: str | int | None = None, by: str = "component") -> Attribution:
    """Decompose the target's logit at `position` of `run` by component, head or neuron."""
    if by not in BY_CHOICES:
        raise HexRayError(f"--by must be one of {', '.join(BY_CHOICES)}, not {by!r}")
    r = trace.run(run)
    p = r.position(position)
    tid = resolve_target(trace, r.id, p, target)
    bid = None if baseline is None else resolve_target(trace, r.id, p, baseline)
    u, bias = final_direction(trace, r.id, p, tid, bid)
    parts = _components(trace, r.id, p, u, by)
    parts.append(Contribution("Bias", "bias", None, None, bias))
    total = float(sum(c.value for c in parts))

    logit, source = recorded_logit(trace, r.id, p, tid), "recorded"
    if logit is not None and bid is not None:
        base = recorded_logit(trace, r.id, p, bid)
        logit = None if base is None else logit - base
    if logit is None:
        last = f"blocks.{trace.n_layers - 1}.hook_resid_post"
        logit, source = float(trace.tensor(last, r.id)[p] @ u) + bias, "final residual"
    prob = None
    if bid is None and source == "recorded" and trace.has("hexray.logsumexp", r.id):
        prob = float(np.exp(logit - trace.tensor("hexray.logsumexp", r.id)[p]))
    return Attribution(r.id, p, r.labels[p], tid, trace.token_str(tid, r.id), bid,
                       None if bid is None else trace.token_str(bid, r.id), by, logit, source, total, prob, parts)


def component_stack(trace, run: int) -> tuple[list[tuple[str, str, int | None]], np.ndarray]:
    """Per-layer components of the residual stream of a run: labels and a [n_components, n, d] stack.

    Cached per run, so attributing another position or token costs one matrix-vector product.
    """
    cache = trace._stacks
    if run not in cache:
        labels, arrays = [("Embed", "embed", None)], [trace.tensor("hook_embed", run)]
        if trace.has("hook_pos_embed", run):
            labels.append(("PosEmbed", "pos_embed", None))
            arrays.append(trace.tensor("hook_pos_embed", run))
        for layer in range(trace.n_layers):
            labels.append((f"Attn L{layer}", "attn", layer))
            arrays.append(trace.tensor(f"blocks.{layer}.hook_attn_out", run))
            labels.append((f"MLP  L{layer}", "mlp", layer))
            arrays.append(trace.tensor(f"blocks.{layer}.hook_mlp_out", run))
        cache[run] = (labels, np.stack(arrays))
    return cache[run]


def _components(trace, run: int, p: int, u: np.ndarray, by: str) -> list[Contribution]:
    labels, stack = component_stack(trace, run)
    values = stack[:, p, :] @ u
    out = []
    for (label, kind, layer), v in zip(labels, values, strict=True):
        if by == "head" and kind == "attn":
            out.extend(_heads(trace, run, p, layer, u))
        elif by == "neuron" and kind == "mlp":
            out.extend(_neurons(trace, run, p, layer, u))
        else:
            out.append(Contribution(label, kind, layer, None, float(v)))
    return out


def _heads(trace, run: int, p: int, layer: int, u: np.ndarray) -> list[Contribution]:
    kit = trace.require_kit("per-head attribution (W_O)")
    z = trace.tensor(f"blocks.{layer}.attn.hook_z", run)[p]  # [heads, d_head]
    per_head = np.einsum("hk,hk->h", z, kit["W_O"][layer] @ u)  # head h writes z_h @ W_O[h]
    out = [Contribution(f"L{layer}H{h}", "head", layer, h, float(v)) for h, v in enumerate(per_head)]
    out.append(Contribution(f"Attn L{layer} bias", "attn_bias", layer, None, float(kit["b_O"][layer] @ u)))
    return out


def _neurons(trace, run: int, p: int, layer: int, u: np.ndarray) -> list[Contribution]:
    kit = trace.require_kit("per-neuron attribution (W_out)")
    post = trace.tensor(f"blocks.{layer}.mlp.hook_post", run)[p]  # [d_mlp]
    per_neuron = post * (kit["W_out"][layer] @ u)
    out = [Contribution(f"L{layer}N{n}", "neuron", layer, n, float(v)) for n, v in enumerate(per_neuron)]
    out.append(Contribution(f"MLP  L{layer} bias", "mlp_bias", layer, None, float(kit["b_out"][layer] @ u)))
    return out
