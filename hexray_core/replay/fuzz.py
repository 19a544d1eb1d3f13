"""Prompt fuzzing: variants of a recorded prompt, and what each token's perturbation does to a target.

    variants = make_variants(trace, run=0, alternatives=3)      # from the base prompt's recording
    # ... record the variants (hexray fuzz does it as one dataset) ...
    report = fuzz_report(dataset, base_id="base", target_id=tid, variants=variants)

Variants are built in text, from the base run's exact character spans: each prompt token deleted,
and each token replaced by the model's own top predictions at that position (what the model
expected there, other than the token itself), plus any prompts the user gives. A variant is
recorded like any prompt (it is tokenized afresh), so its figures are those of recording its text
directly. Every token is then ranked by the largest change of the target's logit over its variants.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from hexray_core.errors import HexRayError

from .attribution import direct_logit_attribution


@dataclass(frozen=True)
class Variant:
    id: str
    kind: str  # "delete", "replace" or "user"
    prompt: str
    position: int | None = None  # the base token perturbed
    token: str | None = None  # its text
    replacement: str | None = None  # the text put in its place


def make_variants(trace, run: int = 0, *, alternatives: int = 3, extra: list[str] | tuple = ()) -> list[Variant]:
    """Deletions and top-prediction replacements of each prompt token of ``run``, then ``extra`` prompts."""
    if alternatives < 0:
        raise HexRayError(f"--alternatives must be 0 or more, not {alternatives}")
    r = trace.run(run)
    text = r.prompt
    topk = trace.tensor("hexray.topk_ids", r.id) if alternatives and trace.has("hexray.topk_ids", r.id) else None
    seen = {text}
    out: list[Variant] = []

    def add(v: Variant) -> None:
        if v.prompt and v.prompt not in seen:  # an empty prompt cannot be recorded; a repeat adds nothing
            seen.add(v.prompt)
            out.append(v)

    for p in range(min(r.n_prompt_tokens, r.n_tokens)):
        start, end = (int(x) for x in r.char_spans[p])
        if start < 0 or end <= start:  # BOS and other tokens with no text of their own
            continue
        label = r.labels[p]
        add(Variant(f"delete@{p}", "delete", text[:start] + text[end:], p, label, ""))
        if topk is None or p == 0:
            continue
        n = 0
        for alt in topk[p - 1]:  # what the model predicted for this position
            if n >= alternatives:
                break
            alt = int(alt)
            if alt == r.tokens[p]:
                continue
            alt_text = trace.token_str(alt, r.id)
            if not alt_text or (alt_text.startswith("#") and alt_text[1:].isdigit()) or "\ufffd" in alt_text:
                continue  # no usable text for this token (unknown, or part of a character)
            before = len(out)
            add(Variant(f"replace@{p}#{alt}", "replace", text[:start] + alt_text + text[end:], p, label, alt_text))
            n += len(out) > before
    for i, prompt in enumerate(extra):
        if not isinstance(prompt, str) or not prompt:
            raise HexRayError(f"variant {i + 1} is empty")
        add(Variant(f"user@{i + 1}", "user", prompt))
    return out


@dataclass
class FuzzReport:
    prompt: str
    target: str
    target_id: int
    base_logit: float
    base_prob: float
    variants: list[dict] = field(default_factory=list)  # each variant with its delta_logit / delta_prob
    tokens: list[dict] = field(default_factory=list)  # ranked by |delta_logit|
    base_tokens: list[dict] = field(default_factory=list)  # every prompt token in order, with its delta (or None)

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "target": self.target, "target_id": self.target_id,
                "base_logit": self.base_logit, "base_prob": self.base_prob, "tokens": self.tokens,
                "variants": self.variants}


def target_logit(trace, run: int, target_id: int) -> tuple[float, float]:
    """The target's logit and probability at the run's last position."""
    a = direct_logit_attribution(trace, position=-1, run=run, target=f"#{target_id}")
    prob = a.probability
    if prob is None:
        prob = float(np.exp(a.logit - trace.tensor("hexray.logsumexp", run)[a.position]))
    return float(a.logit), float(prob)


def fuzz_report(dataset, *, base_id: str, target_id: int, variants: list[Variant]) -> FuzzReport:
    """Every variant's change of the target's logit and probability against the base prompt."""
    by_id = {v.id: v for v in variants}
    figures: dict[str, tuple[float, float]] = {}
    base = None
    for r in dataset:
        if r.id == base_id:
            base = (r.trace.run(r.run), *target_logit(r.trace, r.run, target_id), r.trace.token_str(target_id, r.run),
                    r.trace.run(r.run).labels)
        elif r.id in by_id:
            figures[r.id] = target_logit(r.trace, r.run, target_id)
    if base is None:
        raise HexRayError(f"{dataset.path}: the base prompt ({base_id}) is not recorded")
    missing = [v.id for v in variants if v.id not in figures]
    if missing:
        raise HexRayError(f"{dataset.path}: {len(missing)} variant(s) are not recorded (first: {missing[0]})")
    base_run, base_logit, base_prob, target, labels = base
    rows = []
    for v in variants:
        lg, pr = figures[v.id]
        rows.append({**asdict(v), "logit": lg, "prob": pr, "delta_logit": lg - base_logit,
                     "delta_prob": pr - base_prob})
    worst: dict[int, dict] = {}
    for row in rows:
        p = row["position"]
        if p is not None and (p not in worst or abs(row["delta_logit"]) > abs(worst[p]["delta_logit"])):
            worst[p] = row
    tokens = [{"position": p, "token": w["token"], "delta_logit": w["delta_logit"], "delta_prob": w["delta_prob"],
               "worst_variant": {k: w[k] for k in ("id", "kind", "replacement", "prompt")}}
              for p, w in worst.items()]
    tokens.sort(key=lambda t: (-abs(t["delta_logit"]), t["position"]))
    strip = [{"position": p, "token": labels[p], "delta_logit": worst[p]["delta_logit"] if p in worst else None}
             for p in range(base_run.n_prompt_tokens)]
    return FuzzReport(base_run.prompt, target, int(target_id), base_logit, base_prob, rows, tokens, strip)
