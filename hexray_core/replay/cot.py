"""Chain-of-thought breakdown: split a recorded text into steps and explain how each was produced.

For every token of a step, the attribution of its logit at the position before it (the model
producing that token) is computed by component; a step's figure for a component is the sum over
its tokens. Each step also gets the attention mass its tokens put on every earlier step
(averaged over layers, heads and the step's tokens; the first token is left out as a sink).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np

from hexray_core.errors import HexRayError

from .attention import attention_blocks
from .attribution import next_token_attributions
from .sources import step_sources

SPLIT_MODES = ("auto", "lines", "sentences", "regex")


@dataclass
class CotStep:
    index: int
    text: str
    char_range: tuple[int, int]
    tokens: tuple[int, int]  # token positions [start, end) of the step
    total: float  # summed logit of the step's tokens
    mean_logprob: float | None  # average log-probability the model gave the step's tokens
    components: list[tuple[str, float]]  # every component, largest |value| first
    attends_to: list[tuple[int, float]] = field(default_factory=list)  # (earlier step, attention mass)
    # with sources=True: (token position, text, value) of the earlier tokens the step's logits drew on most,
    # through all heads (source attribution), largest |value| first
    sources: list[tuple[int, str, float]] = field(default_factory=list)

    def top(self, k: int) -> list[tuple[str, float]]:
        return self.components[:k]


@dataclass
class CotBreakdown:
    run: int
    mode: str
    steps: list[CotStep]
    attention: list[list[float]]  # [step, step] mean attention mass from row step to column step

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_mode(text: str, mode: str = "auto", step_regex: str | None = None) -> str:
    """The split a text gets: regex when a regex is given; auto is lines if several, else sentences."""
    if step_regex:
        mode = "regex"
    if mode not in SPLIT_MODES:
        raise HexRayError(f"mode= (the step split) must be one of {', '.join(SPLIT_MODES)}, not {mode!r}")
    if mode == "auto":
        mode = "lines" if len([ln for ln in text.splitlines() if ln.strip()]) >= 2 else "sentences"
    return mode


def _shown(regex: str) -> str:
    """A regex as typed (repr would double its backslashes, as in 'Step \\\\d+:')."""
    return f"'{regex}'" if "'" not in regex else f'"{regex}"'


def split_steps(text: str, mode: str = "auto", step_regex: str | None = None) -> list[tuple[int, int]]:
    """Character ranges of the steps of a text (whitespace-only steps are dropped)."""
    mode = resolve_mode(text, mode, step_regex)
    if mode == "regex":
        if not step_regex:
            raise HexRayError("step_regex= is required for regex step splitting")
        try:
            starts = [m.start() for m in re.finditer(step_regex, text)]
        except re.error as e:
            raise HexRayError(f"bad step_regex={_shown(step_regex)}: {e}") from None
        if not starts:
            raise HexRayError(f"step_regex={_shown(step_regex)} matches nowhere in the text")
        bounds = sorted({0, *starts})
    elif mode == "lines":
        bounds = [0] + [m.end() for m in re.finditer(r"\n", text)]
    else:  # sentences: a break after . ! ? (and closing quotes/brackets) followed by space, or a newline
        bounds = [0] + [m.end() for m in re.finditer(r"(?<=[.!?])[\"')\]]*\s+|\n+", text)]
    bounds = sorted(set(b for b in bounds if b < len(text))) + [len(text)]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if text[a:b].strip()]


def _token_steps(run, ranges: list[tuple[int, int]]) -> np.ndarray:
    """Step index of each token (-1 for special tokens and whitespace between steps)."""
    ends = np.array([b for _, b in ranges])
    out = np.full(run.n_tokens, -1)
    for i, (s, e) in enumerate(run.char_spans):
        if s < 0 or e <= s:
            continue
        step = int(np.searchsorted(ends, e - 1, side="right"))  # a token belongs where its last character is
        if step < len(ranges) and ranges[step][0] <= e - 1:
            out[i] = step
    return out


def step_attention(trace, run: int, steps_of: np.ndarray, n_steps: int) -> np.ndarray:
    """[n_steps, n_steps]: mean over layers, heads and query tokens of the attention mass on each step.

    Reads attention block by block (``attention_blocks``), so memory stays bounded at any context length.
    """
    mass = np.zeros((n_steps, n_steps))
    onehot = np.zeros((len(steps_of), n_steps), dtype=np.float32)
    valid = steps_of >= 0
    onehot[np.nonzero(valid)[0], steps_of[valid]] = 1.0
    onehot[0] = 0.0  # the first token: an attention sink, not content
    per_query = np.zeros((len(steps_of), n_steps))  # summed over layers
    for layer in range(trace.n_layers):
        for q0, q1, rows in attention_blocks(trace, run, layer):
            h, b, k = rows.shape  # mean over heads after the product: the rows are large, the steps few
            per_query[q0:q1] += (rows.reshape(h * b, k) @ onehot[:k]).reshape(h, b, -1).mean(0)
    for s in range(n_steps):
        rows = np.nonzero(steps_of == s)[0]
        if rows.size:
            mass[s] = per_query[rows].mean(0)
    return mass / max(trace.n_layers, 1)


def cot_breakdown(trace, *, run: int = 0, mode: str = "auto", step_regex: str | None = None, sources: bool = False,
                  top_sources: int = 5) -> CotBreakdown:
    """Steps with their per-component sums and step-to-step attention; ``sources=True`` also names the
    earlier tokens each step drew on (source attribution, as costly as reading the whole attention)."""
    r = trace.run(run)
    ranges = split_steps(r.prompt, mode, step_regex)
    if not ranges:
        raise HexRayError(f"run {r.id} has no text to split into steps")
    steps_of = _token_steps(r, ranges)
    labels, values = next_token_attributions(trace, r.id)
    logprobs = None
    if trace.has("hexray.next_logit", r.id) and trace.has("hexray.logsumexp", r.id):
        logprobs = trace.tensor("hexray.next_logit", r.id) - trace.tensor("hexray.logsumexp", r.id)
    attention = step_attention(trace, r.id, steps_of, len(ranges))
    drawn = step_sources(trace, r.id, steps_of, len(ranges)) if sources else None
    steps = []
    for i, (a, b) in enumerate(ranges):
        toks = np.nonzero(steps_of == i)[0]
        produced = toks[toks >= 1] - 1  # positions whose prediction is one of the step's tokens
        per_comp = values[:, produced].sum(1) if produced.size else np.zeros(len(labels))
        order = np.argsort(-np.abs(per_comp[:-1]), kind="stable")
        comps = [(labels[j], float(per_comp[j])) for j in order]
        mean_lp = float(logprobs[produced].mean()) if logprobs is not None and produced.size else None
        span = (int(toks.min()), int(toks.max()) + 1) if toks.size else (0, 0)
        attends = [(j, float(attention[i, j])) for j in range(i)]
        attends.sort(key=lambda x: -x[1])
        step = CotStep(i, r.prompt[a:b].strip(), (a, b), span, float(per_comp.sum()), mean_lp, comps, attends)
        if drawn is not None and span[0] > 1:
            earlier = drawn[i, 1: span[0]]  # tokens before the step, the first (a sink) left out
            best = np.argsort(-np.abs(earlier), kind="stable")[:top_sources] + 1
            step.sources = [(int(s), r.labels[s], float(drawn[i, s])) for s in best]
        steps.append(step)
    return CotBreakdown(r.id, resolve_mode(r.prompt, mode, step_regex), steps, attention.tolist())
