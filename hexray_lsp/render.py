"""Small text helpers for hovers and tooltips: quoting tokens, aligned Markdown tables, numbers.

Hovers are Markdown that must read well rendered (VS Code) and as plain monospace text
(Neovim's float and Emacs' eldoc show the source with light highlighting), so tables are padded
to line up in a monospace font, counting wide (CJK, emoji) characters as two columns.
"""

from __future__ import annotations

import math
import unicodedata

from hexray_core.replay.tokentext import KEEP_FORMAT, bytes_text, quote  # noqa: F401 (re-exported for hovers)


def code(s: str) -> str:
    """An inline code span that survives backticks in ``s``."""
    fence = "`"
    while fence in s:
        fence += "`"
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def width(s: str) -> int:
    w = 0
    for ch in s:
        if unicodedata.combining(ch) or ch in KEEP_FORMAT:
            continue
        w += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return w


def table(headers: list[str], rows: list[list[str]], align: str) -> list[str]:
    """A GitHub-flavoured Markdown table, padded so it also lines up as plain text.

    ``align``: one of ``l``/``r`` per column. Cells may contain ``|``; it is escaped.
    """
    cells = [[c.replace("|", "\\|") for c in row] for row in [headers, *rows]]
    widths = [max(3, *(width(r[i]) for r in cells)) for i in range(len(headers))]

    def fmt(row):
        parts = []
        for c, w, a in zip(row, widths, align, strict=True):
            pad = " " * (w - width(c))
            parts.append(pad + c if a == "r" else c + pad)
        return "| " + " | ".join(parts) + " |"

    rule = [("-" * (w - 1) + ":") if a == "r" else "-" * w for w, a in zip(widths, align, strict=True)]
    sep = "| " + " | ".join(rule) + " |"
    return [fmt(cells[0]), sep, *(fmt(r) for r in cells[1:])]


def pct(p: float | None) -> str:
    """A probability as a short percentage: 42%, 3.1%, 0.04%, <0.01%."""
    if p is None or not math.isfinite(p):
        return "–"
    v = 100.0 * p
    if v >= 99.95:
        return f"{v:.0f}%" if v >= 99.995 else f"{v:.2f}%"
    if v >= 10:
        return f"{v:.0f}%"
    if v >= 1:
        return f"{v:.1f}%"
    if v >= 0.01:
        return f"{v:.2f}%"
    return "<0.01%"


def bits(p: float | None) -> str:
    if p is None or not math.isfinite(p) or p <= 0:
        return "–"
    return f"{-math.log2(p):.2f}"


def signed(v: float) -> str:
    return f"{v:+.2f}"


def to_plaintext(md: str) -> str:
    """The Markdown hover for a client that only takes plain text."""
    lines = []
    for line in md.splitlines():
        if line.startswith("| ") and set(line.replace("|", "").replace(" ", "")) <= set("-:"):
            continue
        lines.append(line.replace("**", "").replace("\\|", "|").replace("`", ""))
    return "\n".join(lines)
