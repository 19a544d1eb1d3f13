"""Logit lens: read the residual stream after each layer through the final norm and unembedding.

As in TransformerLens's ``logit_lens``: the stream before each block and after the last one,
normalised with statistics recomputed from that stream (the final norm's gain and bias are
already folded into W_U and b_U in compatibility mode), times W_U, plus b_U.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from hexray_core.errors import HexRayError

from .attribution import resolve_target


@dataclass(frozen=True)
class LensLayer:
    label: str  # "L0 pre" ... "final"
    top: list[tuple[int, str, float]]  # (token id, text, probability)
    top_logits: list[float]
    target_rank: int  # 1 = top
    target_prob: float
    target_logit: float


@dataclass
class LogitLens:
    run: int
    position: int
    token: str
    target_id: int
    target: str
    layers: list[LensLayer] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def residual_stack(trace, run: int, position: int) -> tuple[list[str], np.ndarray]:
    """[n_layers + 1, d_model]: the stream entering each block, then the final stream."""
    labels, rows = [], []
    for layer in range(trace.n_layers):
        labels.append(f"L{layer} pre")
        name = f"blocks.{layer}.hook_resid_pre"
        if not trace.has(name, run):
            raise HexRayError(f"the logit lens needs {name}, which this trace did not record "
                              "(record with --hooks default)")
        rows.append(trace.tensor(name, run)[position])
    labels.append("final")
    rows.append(trace.tensor(f"blocks.{trace.n_layers - 1}.hook_resid_post", run)[position])
    return labels, np.stack(rows).astype(np.float64)


def normalise(trace, x: np.ndarray) -> np.ndarray:
    """The final norm without its (folded) gain: centre for LayerNorm, divide by the recomputed scale."""
    if trace.uses_layernorm:
        x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + trace.eps)


def logit_lens(trace, *, position: int = -1, run: int = 0, target: str | int | None = None,
               top_k: int = 10) -> LogitLens:
    r = trace.run(run)
    p = r.position(position)
    tid = resolve_target(trace, r.id, p, target)
    recorded = _recorded_lens(trace, r, p, tid, top_k)
    if recorded is not None:
        return recorded
    kit = trace.require_kit("the logit lens (full W_U)")
    W_U, b_U = kit["W_U"], kit["b_U"]
    if not 0 <= tid < W_U.shape[1]:
        raise HexRayError(f"token id {tid} is outside the vocabulary (0..{W_U.shape[1] - 1})")
    labels, resid = residual_stack(trace, r.id, p)
    logits = normalise(trace, resid).astype(np.float32) @ W_U + b_U  # [layers + 1, vocab]
    out = LogitLens(r.id, p, r.labels[p], tid, trace.token_str(tid, r.id))
    k = max(1, min(top_k, logits.shape[1]))
    # Whole-matrix numpy operations: one pass each over [layers + 1, vocab] (a hover pays for this).
    peak = logits.max(1, keepdims=True)
    lse = (np.log(np.exp(logits - peak).sum(1, keepdims=True, dtype=np.float64)) + peak)[:, 0]
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    target_logits = logits[:, tid]
    ranks = (logits > target_logits[:, None]).sum(1) + 1
    for i, label in enumerate(labels):
        ids = top[i][np.argsort(-logits[i, top[i]], kind="stable")]
        out.layers.append(LensLayer(
            label,
            [(int(t), trace.token_str(int(t), r.id), float(np.exp(logits[i, t] - lse[i]))) for t in ids],
            [float(logits[i, t]) for t in ids],
            int(ranks[i]),
            float(np.exp(target_logits[i] - lse[i])),
            float(target_logits[i]),
        ))
    return out


def _recorded_lens(trace, r, p: int, tid: int, top_k: int) -> LogitLens | None:
    """The lens the recorder precomputed (hexray.lens_*), when it covers this request: a few row reads.

    It covers the model's top prediction and the actual next token, however the target was spelt;
    asked for more rows than it holds, it still answers (with its rows) when there is no kit.
    """
    if not trace.has("hexray.lens_topk_ids", r.id):
        return None
    if tid == int(trace.tensor("hexray.topk_ids", r.id)[p, 0]):
        which = "top"
    elif p + 1 < r.n_tokens and tid == r.tokens[p + 1]:
        which = "next"
    else:
        return None
    ids = trace.tensor("hexray.lens_topk_ids", r.id)[:, p]  # [layers + 1, k]
    if top_k > ids.shape[1] and trace.kit is not None:
        return None
    logits = trace.tensor("hexray.lens_topk_logits", r.id)[:, p]
    lse = trace.tensor("hexray.lens_logsumexp", r.id)[:, p]
    t_logit = trace.tensor(f"hexray.lens_{which}_logit", r.id)[:, p]
    t_rank = trace.tensor(f"hexray.lens_{which}_rank", r.id)[:, p]
    labels = [f"L{i} pre" for i in range(len(ids) - 1)] + ["final"]
    out = LogitLens(r.id, p, r.labels[p], tid, trace.token_str(tid, r.id))
    for i, label in enumerate(labels):
        top = [(int(t), trace.token_str(int(t), r.id), float(np.exp(v - lse[i])))
               for t, v in zip(ids[i, :top_k], logits[i, :top_k], strict=True)]
        out.layers.append(LensLayer(label, top, [float(v) for v in logits[i, :top_k]], int(t_rank[i]),
                                    float(np.exp(t_logit[i] - lse[i])), float(t_logit[i])))
    return out
