"""Rendering of replay results for the terminal (no computation here).

Line views (attribution, chain of thought) print plain text when the output is not a terminal and
import rich only to style a terminal; tables (lens, attention, residual, diff) use rich. So the most
common command, `hexray replay t.hxr` into a pipe, pays for no rich import at all.
"""

from __future__ import annotations

import json
import re
import sys
from typing import TYPE_CHECKING

from hexray_core.replay.jsonable import plain
from hexray_core.replay.tokentext import quote

if TYPE_CHECKING:  # the views' types only: importing a view's module is the replay's job
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
    "feature": ["LxFy: feature y of the dictionary at layer x (its activation times its decoder row)",
                "MLP  Lx error / b_dec / skip: what the transcoder misses, its decoder bias, its skip term "
                "(a residual SAE: Resid Lx ...)",
                "Embed, PosEmbed, Attn Lx, MLP  Lx: components the dictionary does not reconstruct"],
}

Part = str | tuple[str, str]  # text, or (text, rich style)


class Out:
    """Where the views print: styled by rich on a terminal, plain text otherwise."""

    def __init__(self):
        self.tty = sys.stdout.isatty()
        self._console = None

    @property
    def console(self):
        # No markup or emoji codes: token text such as "[bold]", "[/]" or ":fire:" must print literally.
        if self._console is None:
            from rich.console import Console

            opts = dict(highlight=False, soft_wrap=False, markup=False, emoji=False)
            self._console = Console(**opts) if self.tty else Console(**opts, width=PIPE_WIDTH)
        return self._console

    @property
    def width(self) -> int:
        return self.console.width if self.tty else PIPE_WIDTH

    def line(self, *parts: Part) -> None:
        """One line of text; a (text, style) part is styled on a terminal."""
        if not self.tty:
            sys.stdout.write("".join(p if isinstance(p, str) else p[0] for p in parts) + "\n")
            return
        from rich.text import Text

        text = Text()
        for p in parts:
            text.append(p) if isinstance(p, str) else text.append(p[0], style=p[1])
        self.console.print(text)

    def print(self, renderable) -> None:
        """A rich renderable (a table)."""
        sys.stdout.flush()
        if self.tty:
            self.console.print(renderable)
        else:
            print_unpadded(self.console, renderable)


def print_unpadded(console, renderable) -> None:
    """Print through rich without the spaces it pads every line with up to the table's width (a pipe gets
    the text, not 128 columns of blanks)."""
    with console.capture() as cap:
        console.print(renderable)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in cap.get().splitlines()))


def console() -> Out:
    return Out()


def table(con: Out, columns: list[tuple[str, str]], rows: list[list], *, wide: int | None = None):
    """A table that fits the console: cells never wrap; when it is too wide, column `wide` alone shrinks
    and its cells end in an ellipsis. (Piped output has PIPE_WIDTH columns, so nothing shrinks there.)"""
    from rich.cells import cell_len
    from rich.table import Table
    from rich.text import Text

    rows = [[Text(c[0], style=c[1]) if isinstance(c, tuple) else c for c in row] for row in rows]
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
    """A token as a quoted, escaped string (`hexray_core.replay.tokentext.quote`); the byte escapes of a
    token that holds part of a character (Run.labels) print as \\xNN."""
    return quote(token, literal_byte_escapes=True)


def print_json(obj) -> None:
    print(json.dumps(plain(obj), ensure_ascii=False, indent=2, allow_nan=False))


def aligned(label: str) -> str:
    """A component label with its kind padded, so layer numbers line up: "MLP L3" -> "MLP  L3"."""
    kind, sep, rest = label.partition(" ")
    return f"{kind:<4} {rest}" if sep and kind in ("Attn", "MLP") else label


def bar(value: float, scale: float, width: int = BAR_WIDTH) -> tuple[str, str]:
    n = 0 if scale <= 0 else round(width * min(1.0, abs(value) / scale))
    return "█" * n + " " * (width - n), "green" if value >= 0 else "red"


def attribution(con: Out, a: Attribution, top_k: int, *, shares_of_shown: bool = False) -> None:
    """The attribution list. Shares are of the total |attribution| of every part (so a row's figure does not
    change with --top-k); the one-shot seed format (`shares_of_shown`) takes them over the rows shown."""
    con.line(f"Token: {q(a.token)} (index {a.position})")  # the absolute position, as every other view says
    what = f"{q(a.target)} − {q(a.baseline)}" if a.baseline is not None else q(a.target)
    prob = f", p = {a.probability:.1%}" if a.probability is not None else ""
    con.line(f"Target: {what} (id {a.target_id}{prob}, logit {a.logit:+.3f})")
    title = "Top Contributors to Final Logit" if a.baseline is None else "Top Contributors to Logit Difference"
    parts = a.top(top_k)
    if shares_of_shown:
        con.line(f"{title}:")
        shares = a.shares(parts)
    else:
        n = len(a.top(len(a.contributions)))
        con.line(f"{title} (% of the total |attribution| of all {n} parts):")
        denom = a.total_abs() or 1.0
        shares = [abs(c.value) / denom for c in parts]
    for line in ROW_KINDS.get(a.by, []):
        con.line((f"  {line}", "dim"))
    labels = [aligned(c.label) for c in parts]
    width = max([8] + [len(label) for label in labels])
    for c, label, share in zip(parts, labels, shares, strict=True):
        con.line(f"- {label:<{width}}: {c.value:+.2f} ({share:.1%})")
    con.line((f"parts + bias {a.total:+.4f} vs {a.logit_source} logit {a.logit:+.4f}: error {a.error:.1e}", "dim"))


def lens(con: Out, lens_: LogitLens, top_k: int) -> None:
    shown = max((len(layer.top) for layer in lens_.layers), default=0)
    con.line(f"Logit lens at {q(lens_.token)} (index {lens_.position}), target {q(lens_.target)}")
    if shown < top_k:
        con.line((f"(top {shown}, not {top_k}: the trace holds the top {shown} of each layer and the model kit, "
                  "which has the full unembedding, is not available)", "dim"))
    rows = [[layer.label, "  ".join(f"{q(s)} {p:.0%}" for _, s, p in layer.top[:top_k]), str(layer.target_rank),
             f"{layer.target_prob:.2%}"] for layer in lens_.layers]
    columns = [("layer", "left"), (f"top {shown}", "left"), ("target rank", "right"), ("target p", "right")]
    con.print(table(con, columns, rows, wide=1))


def residual(con: Out, rt: ResidualTrace, position: int) -> None:
    con.line(f"Residual stream at {q(rt.tokens[position])} (index {position})")
    columns = [(col, "right" if col.startswith("|") else "left")
               for col in ("layer", "|resid|", "|attn write|", "|mlp write|", "")]
    top = float(rt.resid_norm[:, position].max()) or 1.0
    rows = [["embed", f"{rt.embed_norm[position]:.2f}", "", "", bar(float(rt.embed_norm[position]), top)]]
    for i, label in enumerate(rt.layers):
        r = float(rt.resid_norm[i, position])
        rows.append([label, f"{r:.2f}", f"{rt.attn_norm[i, position]:.2f}", f"{rt.mlp_norm[i, position]:.2f}",
                     bar(r, top)])
    con.print(table(con, columns, rows))


def attention(con: Out, att: AttentionSummary) -> None:
    con.line(f"Attention from {q(att.token)} (index {att.position})")
    rows = [[h.label, f"{h.focus:.0%}", "  ".join(f"{q(s)}@{k} {w:.0%}" for k, s, w in h.keys)] for h in att.heads]
    con.print(table(con, [("head", "left"), ("focus", "right"), ("attends to", "left")], rows, wide=2))


def _step_heading(number: int, text: str) -> str:
    """'Step 2: ...', once: a step whose own text starts with its label (--step-regex 'Step \\d+:') keeps it."""
    if re.match(rf"step\s*{number}\b", text, re.IGNORECASE):
        return text
    return f"Step {number}: {text}"


def cot(con: Out, cb: CotBreakdown, top_k: int) -> None:
    con.line("Chain of Thought Attribution Trace")
    con.line((f"(steps split by {cb.mode}; each step's figures sum the logit attribution of its tokens)", "dim"))
    for step in cb.steps:
        text = step.text if len(step.text) <= 72 else step.text[:69] + "..."
        con.line()
        lp = f", mean log-prob {step.mean_logprob:.2f}" if step.mean_logprob is not None else ""
        con.line((_step_heading(step.index + 1, text), "bold"))
        con.line((f"  tokens {step.tokens[0]}..{step.tokens[1] - 1}{lp}", "dim"))
        top = step.top(top_k)
        scale = max((abs(v) for _, v in top), default=1.0)
        width = max([8] + [len(aligned(label)) for label, _ in top])
        for label, value in top:
            con.line(f"  {aligned(label):<{width}} ", bar(value, scale), f" {value:+.2f}")
        if step.attends_to:
            refs = ", ".join(f"step {j + 1} ({m:.0%})" for j, m in step.attends_to[:3])
            con.line(f"  attends to: {refs}")
        if step.sources:
            refs = ", ".join(f"{q(text)}@{s} {v:+.2f}" for s, text, v in step.sources[:top_k])
            con.line(f"  draws on: {refs}")


def sources(con: Out, st: dict) -> None:
    """`--by source`: source tokens by what they supplied to the prediction through the heads."""
    con.line(f"Token: {q(st['token'])} (index {st['position']})")
    what = f"{q(st['target'])} − {q(st['baseline'])}" if st["baseline"] is not None else q(st["target"])
    prob = f", p = {st['probability']:.1%}" if st["probability"] is not None else ""
    con.line(f"Target: {what} (id {st['target_id']}{prob}, logit {st['logit']:+.3f})")
    through = f"head {st['head']}" if st["head"] else "all heads"
    con.line(f"Source tokens, by what they carried into the logit through {through}:")
    if not st["head"]:
        con.line(("  token@position: total over heads (pattern · v · W_O · u), then the strongest heads", "dim"))
    labels = [f"{q(r['token'])}@{r['position']}" for r in st["rows"]]
    width = max([8] + [len(label) for label in labels])
    for r, label in zip(st["rows"], labels, strict=True):
        via = "  ".join(f"{h['head']} {h['value']:+.2f}" for h in r["heads"])
        con.line(f"- {label:<{width}}: {r['value']:+.2f}" + (f"   via {via}" if via else ""))
    con.line((f"sources {st['total']:+.4f} vs heads' attribution {st['heads_total']:+.4f} "
              f"(the layers' b_O is not from any token): error {st['error']:.1e}", "dim"))


def diff(con: Out, d: AttributionDiff, top_k: int) -> None:
    con.line(f"A: {q(d.a.token)} (run {d.a.run}, index {d.a.position}) → target {q(d.a.target)}, "
              f"logit {d.a.logit:+.3f}")
    con.line(f"B: {q(d.b.token)} (run {d.b.run}, index {d.b.position}) → target {q(d.b.target)}, "
              f"logit {d.b.logit:+.3f}")
    con.line("Largest changes in attribution (B − A)")

    def fmt(v):
        return "—" if v is None else f"{v:+.2f}"

    rows = [[aligned(row.label), fmt(row.a), fmt(row.b), f"{row.delta:+.2f}"] for row in d.rows[:top_k]]
    con.print(table(con, [("component", "left"), ("A", "right"), ("B", "right"), ("Δ", "right")], rows))


def aggregate(con: Out, agg, top_k: int) -> None:
    """`hexray aggregate`: per-label statistics over a dataset's runs (an Aggregate)."""
    from rich.table import Table
    from rich.text import Text

    lg = agg.logit
    con.print(f"Attribution over {agg.n} run{'s' if agg.n != 1 else ''} (by {agg.by}, position {agg.position})")
    con.print(f"Explained logit: mean {lg['mean']:+.3f}, std {_f(lg['std'])}, > 0 in {lg['frac_positive']:.0%}")
    table = Table(title=f"Top {min(top_k, len(agg.labels))} of {len(agg.labels)} by |mean|", title_justify="left")
    for col in ("label", "mean", "std", "95% CI", "> 0", ""):
        table.add_column(col, justify="left" if col in ("label", "") else "right")
    scale = float(abs(agg.mean[0])) if len(agg.mean) else 1.0
    for r in agg.rows[:top_k]:
        lo, hi = r["ci95"]
        ci = "—" if lo != lo else f"[{lo:+.2f}, {hi:+.2f}]"
        table.add_row(aligned(r["label"]), f"{r['mean']:+.3f}", _f(r["std"]), ci, f"{r['frac_positive']:.0%}",
                      Text(*bar(r["mean"], scale)))
    con.print(table)


def _f(v: float) -> str:
    return "—" if v != v else f"{v:.3f}"


def fuzz(con: Out, report, top_k: int) -> None:
    """`hexray fuzz`: the token strip (each prompt token coloured by its effect) and the ranked table."""
    from rich.table import Table
    from rich.text import Text

    con.print(f"Target: {q(report.target)} (id {report.target_id}), logit {report.base_logit:+.3f}, "
              f"p = {report.base_prob:.1%} after {len(report.variants)} variants")
    moved = [abs(t["delta_logit"]) for t in report.base_tokens if t["delta_logit"] is not None]
    scale = max(moved, default=0.0) or 1.0
    strip = Text()
    for t in report.base_tokens:
        d = t["delta_logit"]
        if d is None:
            strip.append(t["token"], style="dim")
            continue
        level = int(55 + 200 * min(1.0, abs(d) / scale))
        # red: perturbing this token lowers the target (the prediction depends on it); blue: raises it
        colour = f"rgb({level},40,40)" if d < 0 else f"rgb(40,40,{level})"
        strip.append(t["token"], style=f"bold white on {colour}")
    con.print(strip)
    con.print(Text("(red: perturbing the token lowers the target's logit, blue: raises it)", style="dim"))
    table = Table(title="Tokens by how much perturbing them moves the target", title_justify="left")
    for col in ("pos", "token", "Δ logit", "Δ p", "worst variant"):
        table.add_column(col, justify="right" if col in ("pos", "Δ logit", "Δ p") else "left")
    for t in report.tokens[:top_k]:
        w = t["worst_variant"]
        what = "delete" if w["kind"] == "delete" else f"→ {q(w['replacement'])}"
        table.add_row(str(t["position"]), q(t["token"]), f"{t['delta_logit']:+.3f}", f"{t['delta_prob']:+.1%}", what)
    con.print(table)
    users = [v for v in report.variants if v["kind"] == "user"]
    for v in users:
        con.print(f"variant {q(v['prompt'])}: Δ logit {v['delta_logit']:+.3f}, Δ p {v['delta_prob']:+.1%}")
