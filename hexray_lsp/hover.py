"""Hover on a token: what the model made of it, from a fresh trace.

For the token under the cursor (or the tokens, when a tokenizer split one character into several):

    the token as text and id; its probability, rank and surprisal when the model predicted it;
    the top predictions at the previous position; the components (and, with the model kit,
    heads) that contributed most to its logit, with shares of sum |contribution|; with the kit and
    ``hook_v``, the earlier tokens those heads carried it from (`sources`); and what the model
    predicts after it.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
from lsprotocol import types as t

from hexray_core.errors import HexRayError
from trace_format import TraceFormatError

from .features import hover_lines as feature_lines
from .render import bits, code, pct, quote, signed, table, to_plaintext
from .sources import hover_lines as source_lines
from .trace_view import RunView, TraceView, token_label

log = logging.getLogger(__name__)


def _probs_at(view: TraceView, rv: RunView, pos: int, k: int) -> list[tuple[int, str, float]]:
    tr, run = view.trace, rv.index
    if k <= 0 or not (tr.has("hexray.topk_ids", run) and tr.has("hexray.logsumexp", run)):
        return []
    ids = tr.tensor("hexray.topk_ids", run)[pos][:k]
    logits = tr.tensor("hexray.topk_logits", run)[pos][:k].astype(np.float64)
    lse = float(tr.tensor("hexray.logsumexp", run)[pos])
    return [(int(t), tr.token_str(int(t), run), float(math.exp(lg - lse))) for t, lg in zip(ids, logits, strict=True)]


def _top_k(view: TraceView, rv: RunView) -> int:
    tr = view.trace
    if tr.has("hexray.topk_ids", rv.index):
        return int(tr.reader.info("hexray.topk_ids", tr.run(rv.index).id).shape[-1])
    return 0


def _first_line(rv: RunView, group: list[int], text: str) -> list[str]:
    first, last = group[0], group[-1]
    if len(group) == 1:
        tid = int(rv.tokens[first])
        return [f"**{code(token_label(rv, first, text))}** · token {first} · id {tid}"]
    char = text[int(rv.starts[first]):int(rv.ends[last])]
    rows = [[str(i), code(token_label(rv, i, text)), str(int(rv.tokens[i])), pct(rv.prob[i])] for i in group]
    joint = float(np.prod(rv.prob[group])) if np.all(np.isfinite(rv.prob[group])) else None
    out = [f"**{code(quote(char))}** · {len(group)} tokens ({first}–{last}) share this text"
           + (f" · joint p **{pct(joint)}**, {bits(joint)} bits" if joint is not None else ""), ""]
    out += table(["#", "token", "id", "p"], rows, "rlrr")
    return out


def _prob_line(view: TraceView, rv: RunView, i: int, k: int) -> str:
    p = rv.prob[i]
    prev = i - 1
    if prev < 0:
        return "The first token: no earlier position predicted it."
    if not math.isfinite(p):
        return "The trace holds no prediction for this token."
    rank = int(rv.rank[i])
    rank_s = f"rank **{rank}**" if rank else (f"rank > {k} (outside the recorded top {k})" if k else "rank unknown")
    return f"p = **{pct(p)}** · {rank_s} · surprisal **{bits(p)}** bits"


def _predictions(view: TraceView, rv: RunView, i: int, n: int, text: str) -> list[str]:
    prev = i - 1
    preds = _probs_at(view, rv, prev, n)
    if not preds:
        return []
    actual = int(rv.tokens[i])
    rows = []
    for r, (tid, s, p) in enumerate(preds, 1):
        mark = " ◀" if tid == actual else ""
        rows.append([str(r), code(quote(s)) + mark, pct(p)])
    after = token_label(rv, prev, text) if rv.starts[prev] >= 0 else "the start (BOS)"
    return ["", f"**Predicted after {code(after) if rv.starts[prev] >= 0 else after}** (position {prev})", "",
            *table(["#", "token", "p"], rows, "rlr")]


def _contributors(view: TraceView, rv: RunView, i: int, n: int) -> list[str]:
    if n <= 0:
        return []
    tr = view.trace
    tid = int(rv.tokens[i])
    try:
        a = tr.attribution(position=i - 1, run=rv.index, target=tid, by="component")
    except (HexRayError, TraceFormatError, KeyError, ValueError, IndexError) as e:
        return ["", f"*Attribution unavailable: {e}*"]
    parts = [c for c in a.contributions if c.kind != "bias"]
    denom = sum(abs(c.value) for c in parts) or 1.0
    top = sorted(parts, key=lambda c: -abs(c.value))[:n]
    rows = [[c.label.replace("  ", " "), signed(c.value), f"{abs(c.value) / denom:.0%}"] for c in top]
    out = ["", f"**Top contributors** to its logit {a.logit:+.2f} (direct logit attribution)", "",
           *table(["component", "logit", "share"], rows, "lrr")]
    if view.kit_available:
        try:
            h = tr.attribution(position=i - 1, run=rv.index, target=tid, by="head")
            heads = [c for c in h.contributions if c.kind == "head"]
            hden = sum(abs(c.value) for c in h.contributions if c.kind != "bias") or 1.0
            heads = sorted(heads, key=lambda c: -abs(c.value))[:n]
            if heads:
                out += ["", "Top heads: " + ", ".join(f"{c.label} {signed(c.value)} ({abs(c.value) / hden:.0%})"
                                                      for c in heads)]
        except (HexRayError, TraceFormatError, KeyError, ValueError, IndexError) as e:
            out += ["", f"*Per-head attribution unavailable: {e}*"]
    else:
        out += ["", "*Top heads need the model kit, which is not available for this trace.*"]
    return out


def _next(view: TraceView, rv: RunView, last: int, n: int) -> list[str]:
    preds = _probs_at(view, rv, last, n)
    if not preds:
        return []
    items = " · ".join(f"{code(quote(s))} {pct(p)}" for _, s, p in preds)
    return ["", f"**Next** → {items}"]


def hover_markdown(view: TraceView, rv: RunView, group: list[int], text: str, *, predictions: int = 5,
                   contributors: int = 5, sources: int = 5, dictionary: str = "", features: int = 5,
                   roots: list[str] | None = None) -> str:
    """The hover for a group of tokens sharing the text under the cursor (usually one token)."""
    k = _top_k(view, rv)
    first, last = group[0], group[-1]
    lines = _first_line(rv, group, text)
    if len(group) > 1:
        lines += ["", f"Token {first} {token_label(rv, first, text)}:"]
    lines += ["", _prob_line(view, rv, first, k)]
    if first > 0:
        lines += _predictions(view, rv, first, predictions, text)
        lines += _contributors(view, rv, first, contributors)
        lines += source_lines(view, rv, first, sources, text)
    lines += _next(view, rv, last, predictions)
    lines += feature_lines(view.trace, rv.index, first, dictionary, features, roots or [])
    footer = f"*{view.model_name} · {os.path.basename(view.path)}"
    if len(view.runs) > 1:
        footer += f" · run {rv.index}"
    lines += ["", footer + "*"]
    return "\n".join(lines)


def stale_markdown(message: str) -> str:
    return f"**HexRay:** {message}"


def _markup_kind(ls) -> str:
    td = getattr(ls.client_capabilities, "text_document", None)
    hov = getattr(td, "hover", None) if td is not None else None
    formats = getattr(hov, "content_format", None) if hov is not None else None
    if formats and t.MarkupKind.Markdown not in formats:
        return t.MarkupKind.PlainText
    return t.MarkupKind.Markdown


async def hover(ls, params: t.HoverParams) -> t.Hover | None:
    uri = params.text_document.uri
    doc = ls.served(uri)
    if doc is None:
        return None
    status = await ls.status(doc)
    if status.state == "stale":
        note = " A recording is in progress." if uri in ls.recordings else ""
        value = stale_markdown(status.message + "." + note)
    elif status.state != "fresh":
        return None
    else:
        index = doc.index(ls.encoding)
        offset = index.offset(params.position.line, params.position.character)
        rv = status.run
        group = rv.tokens_at(offset)
        if not group:
            return None
        value = hover_markdown(status.view, rv, group, doc.text, predictions=ls.settings.hover_predictions,
                               contributors=ls.settings.hover_contributors, sources=ls.settings.hover_sources,
                               dictionary=ls.settings.features_dictionary, features=ls.settings.hover_features,
                               roots=ls.roots())
        start = min(int(rv.starts[i]) for i in group)
        end = max(int(rv.ends[i]) for i in group)
        (sl, sc), (el, ec) = index.position(start), index.position(end)
        rng = t.Range(start=t.Position(line=sl, character=sc), end=t.Position(line=el, character=ec))
    kind = _markup_kind(ls)
    if kind == t.MarkupKind.PlainText:
        value = to_plaintext(value)
    return t.Hover(contents=t.MarkupContent(kind=kind, value=value),
                   range=rng if status.state == "fresh" else None)

