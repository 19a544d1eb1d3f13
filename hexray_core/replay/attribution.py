"""Direct logit attribution from a recording: the primitives every view uses, and the per-position table.

With the final norm's scale frozen at its recorded value, the logit of token t at position p is

    logit_t = sum_c  c · u_t  +  b_U[t],      u_t = centre(W_U[:, t]) / scale[p]

over the residual stream's components c (embeddings, each attention layer or head plus its bias,
each MLP layer or neuron plus its bias). ``centre`` subtracts the mean over d_model for
LayerNorm models (c·centre(u) = centre(c)·u) and is the identity for RMSNorm. Weights are those
of TransformerLens compatibility mode, where the final norm's gain is folded into W_U and b_U.

The primitives, vectorised over positions and tokens, are shared by the CLI tables, CoT, diff, the
language server and the TransformerLens cache methods (cache.py):

    component_stack(trace, run)          the residual stream's components [C, n, d] and what each is
    unembed_columns(trace, ids, run)     W_U columns and b_U entries of many tokens
    logit_directions(trace, run, ...)    u (centred, over the frozen final scale) and bias per position
    final_direction(trace, run, p, t)    the same at one position
    head_results / neuron_results        what each head or neuron writes (z @ W_O, post * W_out)
    next_token_attributions(trace, run)  every actual next token's logit by component, in one einsum
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from hexray_core.errors import HexRayError

BY_CHOICES = ("component", "head", "neuron", "feature")


@dataclass(frozen=True)
class Contribution:
    label: str  # "Embed", "PosEmbed", "Attn L3", "MLP L3", "L3H7", "L3N1021", "Attn L3 bias", "Bias" (unpadded),
    # "L3F1234", "MLP L3 error", "MLP L3 skip", "MLP L3 b_dec" (by feature)
    kind: str  # embed | pos_embed | attn | mlp | head | neuron | attn_bias | mlp_bias | bias | feature | feature_error
    # | feature_skip | feature_bias
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


@dataclass(frozen=True)
class Component:
    """One per-layer component of the residual stream."""

    kind: str  # embed | pos_embed | attn | mlp
    layer: int | None = None

    @property
    def label(self) -> str:
        """HexRay's display label: "Embed", "PosEmbed", "Attn L3", "MLP L3"."""
        return {"embed": "Embed", "pos_embed": "PosEmbed"}.get(self.kind) or \
            f"{'Attn' if self.kind == 'attn' else 'MLP'} L{self.layer}"

    @property
    def tl_label(self) -> str:
        """TransformerLens's label (``decompose_resid``): "embed", "pos_embed", "3_attn_out", "3_mlp_out"."""
        return self.kind if self.layer is None else f"{self.layer}_{self.kind}_out"

    @property
    def hook(self) -> str:
        return {"embed": "hook_embed", "pos_embed": "hook_pos_embed"}.get(self.kind) or \
            f"blocks.{self.layer}.hook_{self.kind}_out"


def components(trace, run: int) -> list[Component]:
    """The run's components in residual-stream order (pos_embed only when the model has one)."""
    out = [Component("embed")]
    if trace.has("hook_pos_embed", run):
        out.append(Component("pos_embed"))
    for layer in range(trace.n_layers):
        out += [Component("attn", layer), Component("mlp", layer)]
    return out


def component_stack(trace, run: int) -> tuple[list[Component], np.ndarray]:
    """The run's components and their [n_components, n, d] stack (kept with the run: attributing another
    position or token costs one matrix-vector product)."""
    r = trace.run(run)

    def build():
        comps = components(trace, r.id)
        return comps, np.stack([trace.tensor(c.hook, r.id) for c in comps])

    return r.memo("component_stack", build)


def _run_unembed(trace, run: int):
    """The run's own unembedding table (the columns of its tokens and top-k predictions) as (row of each id,
    bias), or None. The columns stay in the trace until asked for (`_run_unembed_rows`)."""
    r = trace.run(run)

    def build():
        if not trace.has("hexray.unembed_ids", r.id):
            return None
        ids = trace.tensor("hexray.unembed_ids", r.id)
        return {int(t): i for i, t in enumerate(ids)}, trace.tensor("hexray.unembed_bias", r.id)

    return r.memo("unembed", build)


def _run_unembed_rows(trace, run: int, rows: np.ndarray) -> np.ndarray:
    """Rows of the run's unembedding table; one row is read alone (a cold `hexray replay` needs one column of
    a table of thousands), more come from the table decoded once."""
    if rows.size == 1:
        return trace.tensor_rows("hexray.unembed_cols", run, int(rows[0]), int(rows[0]) + 1)
    return trace.tensor("hexray.unembed_cols", run)[rows]


def unembed_columns(trace, ids, run: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """W_U columns [*ids.shape, d_model] and b_U entries [*ids.shape] (float32) of token ids.

    From the run's own table when it holds every id (a trace replays its tokens and predictions
    without the kit), else from the kit, else from any run's table.
    """
    ids = np.asarray(ids, dtype=np.int64)
    flat = ids.reshape(-1)
    tables = ([run] if run is not None else []) + ["kit"] + [r.id for r in trace.runs if r.id != run]
    for source in tables:
        if source == "kit":
            kit = trace.kit
            if kit is None:
                continue
            W_U, b_U = kit["W_U"], kit["b_U"]
            bad = flat[(flat < 0) | (flat >= W_U.shape[1])]
            if bad.size:
                raise HexRayError(f"token id {int(bad[0])} is outside the vocabulary (0..{W_U.shape[1] - 1})")
            return (np.ascontiguousarray(W_U[:, flat].T).reshape(*ids.shape, -1),
                    np.asarray(b_U[flat], dtype=np.float32).reshape(ids.shape))
        table = _run_unembed(trace, source)
        if table is None:
            continue
        row_of, bias = table
        if all(int(t) in row_of for t in flat):
            rows = np.fromiter((row_of[int(t)] for t in flat), dtype=np.int64, count=flat.size)
            return _run_unembed_rows(trace, source, rows).reshape(*ids.shape, -1), bias[rows].reshape(ids.shape)
    own = _run_unembed(trace, run if run is not None else 0)
    missing = next((int(t) for t in flat if own is None or int(t) not in own[0]), 0)
    trace.require_kit(f"the unembedding of token {trace.token_str(missing, run or 0)!r} (id {missing})")
    raise AssertionError("unreachable: require_kit raises")


def final_scale(trace, run: int) -> np.ndarray:
    """[n]: the final norm's recorded scale at every position."""
    r = trace.run(run)
    return trace.tensor("ln_final.hook_scale", r.id).reshape(r.n_tokens, -1)[:, 0]


def logit_directions(trace, run: int, positions, target_ids, baseline_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """u [P, d] (float64) and the constant bias [P] of each (position, target[, baseline]) logit.

    logit = resid[p] · u[p] + bias[p], with u the unembedding column (minus the baseline's), centred for
    LayerNorm, over the final norm's frozen scale at p.
    """
    positions = np.asarray(positions, dtype=np.int64)
    u, bias = unembed_columns(trace, target_ids, run)
    u, bias = u.astype(np.float64), bias.astype(np.float64)
    if baseline_ids is not None:
        ub, bb = unembed_columns(trace, baseline_ids, run)
        u, bias = u - ub, bias - bb
    if trace.uses_layernorm:
        u = u - u.mean(-1, keepdims=True)
    return u / final_scale(trace, run)[positions].astype(np.float64)[:, None], bias


def final_direction(trace, run: int, position: int, target_id: int, baseline_id: int | None):
    """`logit_directions` at one position: u [d] and the bias (a float)."""
    u, bias = logit_directions(trace, run, [position], [target_id], None if baseline_id is None else [baseline_id])
    return u[0], float(bias[0])


def _at(trace, name: str, run: int, pos):
    """``tensor[pos]``; one position is read as one row (long traces are not decoded whole for a hover)."""
    if isinstance(pos, int | np.integer):
        p = trace.run(run).position(int(pos))
        return trace.tensor_rows(name, run, p, p + 1)[0]
    return trace.tensor(name, run)[pos]


def head_results(trace, run: int, layer: int, pos=slice(None)) -> np.ndarray:
    """What each head writes into the residual stream, [*pos, n_heads, d_model]: the recorded
    ``attn.hook_result``, else ``attn.hook_z`` @ W_O (the kit). ``pos`` indexes positions first."""
    name = f"blocks.{layer}.attn.hook_result"
    if trace.has(name, run):
        return _at(trace, name, run, pos)
    z = _at(trace, f"blocks.{layer}.attn.hook_z", run, pos)  # [*pos, heads, d_head]
    W_O = trace.require_kit("per-head results (W_O)")["W_O"][layer]  # [heads, d_head, d_model]
    return np.einsum("...hk,hkd->...hd", z, W_O)


def neuron_results(trace, run: int, layer: int, pos=slice(None), neurons=slice(None), project=None) -> np.ndarray:
    """What each MLP neuron writes, [*pos, n_neurons, d_model] (post * W_out), or with ``project``
    ([d_model] or [d_model, k]) that write projected on it without the [.., d_mlp, d_model] intermediate."""
    post = _at(trace, f"blocks.{layer}.mlp.hook_post", run, pos)[..., neurons]
    W_out = trace.require_kit("per-neuron results (W_out)")["W_out"][layer][neurons]  # [neurons, d_model]
    if project is None:
        return post[..., None] * W_out
    projected = W_out @ project
    return post * projected if np.ndim(project) == 1 else post[..., None] * projected


def attention_bias(trace, layer: int) -> np.ndarray:
    return trace.require_kit("attention biases (b_O)")["b_O"][layer]


def mlp_bias(trace, layer: int) -> np.ndarray:
    return trace.require_kit("MLP biases (b_out)")["b_out"][layer]


def next_token_attributions(trace, run: int) -> tuple[list[str], np.ndarray]:
    """Labels and [n_components + 1, n_tokens - 1] contributions to each actual next token's logit.

    Column p explains the logit of token p+1 at position p; the last row is the bias term. One einsum
    over all positions.
    """
    r = trace.run(run)
    comps, stack = component_stack(trace, r.id)
    n = r.n_tokens
    labels = [c.label for c in comps] + ["Bias"]
    if n < 2:
        return labels, np.zeros((len(labels), 0))
    u, bias = logit_directions(trace, r.id, np.arange(n - 1), np.asarray(r.tokens[1:]))
    values = np.einsum("cpd,pd->cp", stack[:, :-1, :], u.astype(np.float32), dtype=np.float64)
    return labels, np.concatenate([values, bias[None, :]])


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
            raise HexRayError(f"position={position} is the last token: there is no actual next token "
                              "(use target='top' or a token)")
        return r.tokens[position + 1]
    return trace.token_id(target, r.id)


def target_logit(trace, run: int, p: int, tid: int, bid: int | None, u: np.ndarray, bias: float):
    """(logit, where it came from, probability or None) of the target (minus the baseline) at position p: the
    recorded logit when the trace holds it, else the final residual through u (the direction of final_direction)."""
    logit, source = recorded_logit(trace, run, p, tid), "recorded"
    if logit is not None and bid is not None:
        base = recorded_logit(trace, run, p, bid)
        logit = None if base is None else logit - base
    if logit is None:
        last = f"blocks.{trace.n_layers - 1}.hook_resid_post"
        logit, source = float(trace.tensor_rows(last, run, p, p + 1)[0] @ u) + bias, "final residual"
    prob = None
    if bid is None and source == "recorded" and trace.has("hexray.logsumexp", run):
        prob = float(np.exp(logit - trace.tensor("hexray.logsumexp", run)[p]))
    return logit, source, prob


def direct_logit_attribution(trace, *, position: int = -1, run: int = 0, target: str | int | None = None,
                             baseline: str | int | None = None, by: str = "component", dictionary=None,
                             layer: int | None = None) -> Attribution:
    """Decompose the target's logit at `position` of `run` by component, head, neuron or feature (``by="feature"``
    with ``dictionary=``: a path or a loaded DictionarySet; ``layer=`` picks a residual SAE's layer)."""
    if by not in BY_CHOICES:
        raise HexRayError(f"by= must be one of {', '.join(BY_CHOICES)}, not {by!r}")
    if by == "feature":
        if dictionary is None:
            raise HexRayError("by='feature' needs a dictionary (--dict DIR)")
        from .dictionary import load_dictionary

        dictionary = load_dictionary(dictionary)
    r = trace.run(run)
    p = r.position(position)
    tid = resolve_target(trace, r.id, p, target)
    bid = None if baseline is None else resolve_target(trace, r.id, p, baseline)
    u, bias = final_direction(trace, r.id, p, tid, bid)
    if by == "feature":
        from .feature_attribution import feature_rows

        comps, rows = component_rows(trace, r.id, p)
        parts = [Contribution(*row) for row in feature_rows(trace, r.id, p, u, comps, rows @ u, dictionary, layer)]
    else:
        parts = _contributions(trace, r.id, p, u, by)
    parts.append(Contribution("Bias", "bias", None, None, bias))
    total = float(sum(c.value for c in parts))

    logit, source, prob = target_logit(trace, r.id, p, tid, bid, u, bias)
    return Attribution(r.id, p, r.labels[p], tid, trace.token_str(tid, r.id), bid,
                       None if bid is None else trace.token_str(bid, r.id), by, logit, source, total, prob, parts)


def component_rows(trace, run: int, p: int) -> tuple[list[Component], np.ndarray]:
    """The components at one position, [C, d]: from the run's stack when it is built, else one row of each
    tensor (cold attribution at one position of a long trace reads a few chunks, not the whole run)."""
    r = trace.run(run)
    if "component_stack" in r._memo:
        comps, stack = component_stack(trace, r.id)
        return comps, stack[:, p, :]
    comps = components(trace, r.id)
    return comps, np.stack([trace.tensor_rows(c.hook, r.id, p, p + 1)[0] for c in comps])


def _contributions(trace, run: int, p: int, u: np.ndarray, by: str) -> list[Contribution]:
    comps, rows = component_rows(trace, run, p)
    values = rows @ u
    out = []
    for c, v in zip(comps, values, strict=True):
        if by == "head" and c.kind == "attn":
            per_head = head_results(trace, run, c.layer, p) @ u  # [heads]
            out += [Contribution(f"L{c.layer}H{h}", "head", c.layer, h, float(x)) for h, x in enumerate(per_head)]
            out.append(Contribution(f"Attn L{c.layer} bias", "attn_bias", c.layer, None,
                                    float(attention_bias(trace, c.layer) @ u)))
        elif by == "neuron" and c.kind == "mlp":
            per_neuron = neuron_results(trace, run, c.layer, p, project=u)  # [d_mlp]
            out += [Contribution(f"L{c.layer}N{n}", "neuron", c.layer, n, float(x)) for n, x in enumerate(per_neuron)]
            out.append(Contribution(f"MLP L{c.layer} bias", "mlp_bias", c.layer, None,
                                    float(mlp_bias(trace, c.layer) @ u)))
        else:
            out.append(Contribution(c.label, c.kind, c.layer, None, float(v)))
    return out
