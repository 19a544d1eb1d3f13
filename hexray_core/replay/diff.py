"""Compare the attribution of two runs (two prompts, or the same prompt under two models)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hexray_core.errors import HexRayError

from .attribution import Attribution, direct_logit_attribution


@dataclass
class DiffRow:
    label: str
    a: float | None  # None: the component does not exist on that side (e.g. a deeper model)
    b: float | None

    @property
    def delta(self) -> float:
        return (self.b or 0.0) - (self.a or 0.0)


@dataclass
class AttributionDiff:
    a: Attribution
    b: Attribution
    rows: list[DiffRow] = field(default_factory=list)  # largest |delta| first

    def to_dict(self, top: int | None = None) -> dict:
        rows = self.rows if top is None else self.rows[:top]
        return {"a": self.a.to_dict(), "b": self.b.to_dict(),
                "rows": [{**asdict(r), "delta": r.delta} for r in rows]}


def attribution_diff(trace_a, trace_b, *, run_a: int = 0, run_b: int = 0, position_a: int = -1,
                     position_b: int = -1, target: str | int | None = None, baseline: str | int | None = None,
                     by: str = "component") -> AttributionDiff:
    """Attribute the same target token on both sides and line the components up.

    The default target is side A's top prediction: the same id when both sides share a tokenizer, else
    looked up by its text on side B (so two models with different tokenizers can still be compared
    when the token exists in both).
    """
    a = direct_logit_attribution(trace_a, position=position_a, run=run_a, target=target, baseline=baseline, by=by)
    target_b = target
    try:
        if (target is None or target == "top") and (trace_a is trace_b or _same_tokenizer(trace_a, trace_b)):
            target_b = a.target_id
        elif target is None or target == "top":
            trace_b.run(run_b)
            try:  # A's token by its exact text: a token spelt "top", "#5" or "5" is not a keyword or an id
                target_b = trace_b.token_id(a.target, run_b, literal=True)
            except HexRayError as e:
                raise HexRayError(f"{e} (pick a target both sides know with --target)") from None
        b = direct_logit_attribution(trace_b, position=position_b, run=run_b, target=target_b, baseline=baseline,
                                     by=by)
    except HexRayError as e:
        raise HexRayError(f"side B: {e}") from None
    va, vb = a.by_label(), b.by_label()
    labels = list(va) + [k for k in vb if k not in va]
    rows = [DiffRow(k, va.get(k), vb.get(k)) for k in labels]
    rows.sort(key=lambda r: -abs(r.delta))
    return AttributionDiff(a, b, rows)


def _same_tokenizer(trace_a, trace_b) -> bool:
    sha_a = (trace_a.meta.get("tokenizer") or {}).get("sha256")
    return bool(sha_a) and sha_a == (trace_b.meta.get("tokenizer") or {}).get("sha256")
