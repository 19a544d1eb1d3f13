"""Rich rendering of replay results for the terminal (no computation here)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
from rich.cells import cell_len
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
PIPE_WIDTH = 10_000  # output that is not a terminal: lines as long as they are, never wrapped at 80 columns

# What the rows of a finer attribution are (printed under its header, lines within 80 columns; the README
# says the same).
ROW_KINDS = {
    "head": ["LxHy: head y of attention layer x (its z · W_O)",
             "Attn Lx bias: layer x's attention output bias b_O, which belongs to no head",
             "Embed, PosEmbed, MLP  Lx: whole components"],
    "neuron": ["LxNy: neuron y of MLP layer x (its activation times its row of W_out)",
               "MLP  Lx bias: layer x's MLP output bias b_out, which belongs to no neuron",
               "Embed, PosEmbed, Attn Lx: whole components"],
}


def console() -> Console:
    # No markup or emoji codes: token text such as "[bold]", "[/]" or ":fire:" must print literally.
    con = Console(highlight=False, soft_wrap=False, markup=False, emoji=False)
    if not con.is_terminal:
        con = Console(highlight=False, soft_wrap=False, markup=False, emoji=False, width=PIPE_WIDTH)
    return con


def table(con: Console, columns: list[tuple[str, str]], rows: list[list], *, wide: int | None = None) -> Table:
    """A table that fits the console: cells never wrap; when it is too wide, column `wide` alone shrinks
    and its cells end in an ellipsis. (Piped output has PIPE_WIDTH columns, so nothing shrinks there.)"""
    widths = [max([cell_len(name)] + [cell_len(str(row[i])) for row in rows]) for i, (name, _) in enumerate(columns)]
    t = Table()
    for i, (name, justify) in enumerate(columns):
        max_width = None
        if i == wide:  # a cell takes its width plus two of padding and one border; one more closes the table
            max_width = max(8, con.width - 1 - sum(w + 3 for j, w in enumerate(widths) if j != i) - 3)
        t.add_column(name, justify=justify, no_wrap=True, overflow="ellipsis", max_width=max_width)
    for row in rows:
        t.add_row(*row)
    return t


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


def bar(value: float, scale: float, width: int = BAR_WIDTH) -> Text:
    n = 0 if scale <= 0 else round(width * min(1.0, abs(value) / scale))
    return Text("█" * n + " " * (width - n), style="green" if value >= 0 else "red")


def attribution(con: Console, a: Attribution, top_k: int, *, position_label: int | None = None,
                shares_of_shown: bool = False) -> None:
    """The attribution list. Shares are of the total |attribution| of every part (so a row's figure does not
    change with --top-k); the one-shot seed format (`shares_of_shown`) takes them over the rows shown."""
    index = a.position if position_label is None else position_label
    con.print(f"Token: {q(a.token)} (index {index})")
    what = f"{q(a.target)} − {q(a.baseline)}" if a.baseline is not None else q(a.target)
    prob = f", p = {a.probability:.1%}" if a.probability is not None else ""
    con.print(f"Target: {what} (id {a.target_id}{prob}, logit {a.logit:+.3f})")
    title = "Top Contributors to Final Logit" if a.baseline is None else "Top Contributors to Logit Difference"
    parts = a.top(top_k)
    if shares_of_shown:
        con.print(f"{title}:")
        shares = a.shares(parts)
    else:
        n = len(a.top(len(a.contributions)))
        con.print(f"{title} (% of the total |attribution| of all {n} parts):")
        denom = a.total_abs() or 1.0
        shares = [abs(c.value) / denom for c in parts]
    for line in ROW_KINDS.get(a.by, []):
        con.print(Text(f"  {line}", style="dim"))
    width = max([8] + [len(c.label) for c in parts])
    for c, share in zip(parts, shares, strict=True):
        con.print(f"- {c.label:<{width}}: {c.value:+.2f} ({share:.1%})")
    con.print(Text(f"parts + bias {a.total:+.4f} vs {a.logit_source} logit {a.logit:+.4f}: error {a.error:.1e}",
                   style="dim"))


def lens(con: Console, lens_: LogitLens, top_k: int) -> None:
    shown = max((len(layer.top) for layer in lens_.layers), default=0)
    con.print(f"Logit lens at {q(lens_.token)} (index {lens_.position}), target {q(lens_.target)}")
    if shown < top_k:
        con.print(Text(f"(top {shown}, not {top_k}: the trace holds the top {shown} of each layer and the model kit, "
                       "which has the full unembedding, is not available)", style="dim"))
    rows = [[layer.label, "  ".join(f"{q(s)} {p:.0%}" for _, s, p in layer.top[:top_k]), str(layer.target_rank),
             f"{layer.target_prob:.2%}"] for layer in lens_.layers]
    columns = [("layer", "left"), (f"top {shown}", "left"), ("target rank", "right"), ("target p", "right")]
    con.print(table(con, columns, rows, wide=1))


def residual(con: Console, rt: ResidualTrace, position: int) -> None:
    con.print(f"Residual stream at {q(rt.tokens[position])} (index {position})")
    columns = [(col, "right" if col.startswith("|") else "left")
               for col in ("layer", "|resid|", "|attn write|", "|mlp write|", "")]
    top = float(rt.resid_norm[:, position].max()) or 1.0
    rows = [["embed", f"{rt.embed_norm[position]:.2f}", "", "", bar(float(rt.embed_norm[position]), top)]]
    for i, label in enumerate(rt.layers):
        r = float(rt.resid_norm[i, position])
        rows.append([label, f"{r:.2f}", f"{rt.attn_norm[i, position]:.2f}", f"{rt.mlp_norm[i, position]:.2f}",
                     bar(r, top)])
    con.print(table(con, columns, rows))


def attention(con: Console, att: AttentionSummary) -> None:
    con.print(f"Attention from {q(att.token)} (index {att.position})")
    rows = [[h.label, f"{h.focus:.0%}", "  ".join(f"{q(s)}@{k} {w:.0%}" for k, s, w in h.keys)] for h in att.heads]
    con.print(table(con, [("head", "left"), ("focus", "right"), ("attends to", "left")], rows, wide=2))


def _step_heading(number: int, text: str) -> str:
    """'Step 2: ...', once: a step whose own text starts with its label (--step-regex 'Step \\d+:') keeps it."""
    if re.match(rf"step\s*{number}\b", text, re.IGNORECASE):
        return text
    return f"Step {number}: {text}"


def cot(con: Console, cb: CotBreakdown, top_k: int) -> None:
    con.print("Chain of Thought Attribution Trace")
    con.print(Text(f"(steps split by {cb.mode}; each step's figures sum the logit attribution of its tokens)",
                   style="dim"))
    for step in cb.steps:
        text = step.text if len(step.text) <= 72 else step.text[:69] + "..."
        con.print()
        lp = f", mean log-prob {step.mean_logprob:.2f}" if step.mean_logprob is not None else ""
        con.print(Text(_step_heading(step.index + 1, text), style="bold"))
        con.print(Text(f"  tokens {step.tokens[0]}..{step.tokens[1] - 1}{lp}", style="dim"))
        top = step.top(top_k)
        scale = max((abs(v) for _, v in top), default=1.0)
        width = max([8] + [len(label) for label, _ in top])
        for label, value in top:
            line = Text(f"  {label:<{width}} ")
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
    con.print("Largest changes in attribution (B − A)")

    def fmt(v):
        return "—" if v is None else f"{v:+.2f}"

    rows = [[row.label, fmt(row.a), fmt(row.b), f"{row.delta:+.2f}"] for row in d.rows[:top_k]]
    con.print(table(con, [("component", "left"), ("A", "right"), ("B", "right"), ("Δ", "right")], rows))
