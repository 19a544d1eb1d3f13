"""Rich rendering of replay results for the terminal (no computation here)."""

from __future__ import annotations

import json
import math

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hexray_core.replay.attention import AttentionSummary
from hexray_core.replay.attribution import Attribution
from hexray_core.replay.cot import CotBreakdown
from hexray_core.replay.diff import AttributionDiff
from hexray_core.replay.lens import LogitLens
from hexray_core.replay.residual import ResidualTrace

BAR_WIDTH = 24


def console() -> Console:
    # No markup or emoji codes: token text such as "[bold]", "[/]" or ":fire:" must print literally.
    return Console(highlight=False, soft_wrap=False, markup=False, emoji=False)


def q(token: str) -> str:
    """A token as a quoted, escaped string: spaces and newlines stay visible, and the byte escapes
    of a token that holds part of a character (Run.labels) print as \\xNN, not \\\\xNN."""
    return json.dumps(token, ensure_ascii=False).replace("\\\\x", "\\x")


def _plain(obj):
    """JSON-ready copy: numpy values as Python numbers, NaN and ±inf as null (JSON has no such numbers)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def print_json(obj) -> None:
    print(json.dumps(_plain(obj), ensure_ascii=False, indent=2, allow_nan=False))


def aligned(label: str) -> str:
    """A component label with its kind padded, so layer numbers line up: "MLP L3" -> "MLP  L3"."""
    kind, sep, rest = label.partition(" ")
    return f"{kind:<4} {rest}" if sep and kind in ("Attn", "MLP") else label


def bar(value: float, scale: float, width: int = BAR_WIDTH) -> Text:
    n = 0 if scale <= 0 else round(width * min(1.0, abs(value) / scale))
    return Text("█" * n + " " * (width - n), style="green" if value >= 0 else "red")


def attribution(con: Console, a: Attribution, top_k: int, *, position_label: int | None = None) -> None:
    index = a.position if position_label is None else position_label
    con.print(f"Token: {q(a.token)} (index {index})")
    what = f"{q(a.target)} − {q(a.baseline)}" if a.baseline is not None else q(a.target)
    prob = f", p = {a.probability:.1%}" if a.probability is not None else ""
    con.print(f"Target: {what} (id {a.target_id}{prob}, logit {a.logit:+.3f})")
    con.print("Top Contributors to Final Logit:" if a.baseline is None else "Top Contributors to Logit Difference:")
    parts = a.top(top_k)
    for c, share in zip(parts, a.shares(parts), strict=True):
        con.print(f"- {aligned(c.label):<8}: {c.value:+.2f} ({share:.1%})")
    con.print(Text(f"parts + bias {a.total:+.4f} vs {a.logit_source} logit {a.logit:+.4f}: error {a.error:.1e}",
                   style="dim"))


def lens(con: Console, lens_: LogitLens, top_k: int) -> None:
    table = Table(title=f"Logit lens at {q(lens_.token)} (index {lens_.position}), target {q(lens_.target)}",
                  title_justify="left")
    table.add_column("layer")
    table.add_column(f"top {top_k}")
    table.add_column("target rank", justify="right")
    table.add_column("target p", justify="right")
    for layer in lens_.layers:
        tops = "  ".join(f"{q(s)} {p:.0%}" for _, s, p in layer.top[:top_k])
        table.add_row(layer.label, tops, str(layer.target_rank), f"{layer.target_prob:.2%}")
    con.print(table)


def residual(con: Console, rt: ResidualTrace, position: int) -> None:
    table = Table(title=f"Residual stream at {q(rt.tokens[position])} (index {position})", title_justify="left")
    for col in ("layer", "|resid|", "|attn write|", "|mlp write|", ""):
        table.add_column(col, justify="right" if col.startswith("|") else "left")
    top = float(rt.resid_norm[:, position].max()) or 1.0
    table.add_row("embed", f"{rt.embed_norm[position]:.2f}", "", "", bar(float(rt.embed_norm[position]), top))
    for i, label in enumerate(rt.layers):
        r = float(rt.resid_norm[i, position])
        table.add_row(label, f"{r:.2f}", f"{rt.attn_norm[i, position]:.2f}", f"{rt.mlp_norm[i, position]:.2f}",
                      bar(r, top))
    con.print(table)


def attention(con: Console, att: AttentionSummary) -> None:
    table = Table(title=f"Attention from {q(att.token)} (index {att.position})", title_justify="left")
    table.add_column("head")
    table.add_column("focus", justify="right")
    table.add_column("attends to")
    for h in att.heads:
        keys = "  ".join(f"{q(s)}@{k} {w:.0%}" for k, s, w in h.keys)
        table.add_row(h.label, f"{h.focus:.0%}", keys)
    con.print(table)


def cot(con: Console, cb: CotBreakdown, top_k: int) -> None:
    con.print("Chain of Thought Attribution Trace")
    con.print(Text(f"(steps split by {cb.mode}; each step's figures sum the logit attribution of its tokens)",
                   style="dim"))
    for step in cb.steps:
        text = step.text if len(step.text) <= 72 else step.text[:69] + "..."
        con.print()
        lp = f", mean log-prob {step.mean_logprob:.2f}" if step.mean_logprob is not None else ""
        con.print(Text(f"Step {step.index + 1}: {text}", style="bold"))
        con.print(Text(f"  tokens {step.tokens[0]}..{step.tokens[1] - 1}{lp}", style="dim"))
        top = step.top(top_k)
        scale = max((abs(v) for _, v in top), default=1.0)
        for label, value in top:
            line = Text(f"  {aligned(label):<8} ")
            line.append_text(bar(value, scale))
            line.append(f" {value:+.2f}")
            con.print(line)
        if step.attends_to:
            refs = ", ".join(f"step {j + 1} ({m:.0%})" for j, m in step.attends_to[:3])
            con.print(f"  attends to: {refs}")


def diff(con: Console, d: AttributionDiff, top_k: int) -> None:
    con.print(f"A: {q(d.a.token)} (run {d.a.run}, index {d.a.position}) → target {q(d.a.target)}, "
              f"logit {d.a.logit:+.3f}")
    con.print(f"B: {q(d.b.token)} (run {d.b.run}, index {d.b.position}) → target {q(d.b.target)}, "
              f"logit {d.b.logit:+.3f}")
    table = Table(title="Largest changes in attribution (B − A)", title_justify="left")
    for col in ("component", "A", "B", "Δ"):
        table.add_column(col, justify="left" if col == "component" else "right")

    def fmt(v):
        return "—" if v is None else f"{v:+.2f}"

    for row in d.rows[:top_k]:
        table.add_row(aligned(row.label), fmt(row.a), fmt(row.b), f"{row.delta:+.2f}")
    con.print(table)
