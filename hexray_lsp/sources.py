"""Where a token's prediction came from: source attribution for hovers and document highlights.

For the hovered token i (its prediction is made at position i - 1, as the hover's attribution),
replay's `source_attribution` splits every head's direct logit attribution to token i over the
earlier tokens it attended to. The hover lists the strongest sources
(``from " Paris"@5 via L3H2 +1.20``); ``textDocument/documentHighlight`` marks them in the
document, strongest first, those whose |total| is at least ``highlights.threshold`` of the
largest among the document's tokens (``Write`` for the ones at half the largest or more, ``Read``
for the rest), at most ``highlights.max``.

One result per (view, run, token) is kept in a small LRU: the hover and the highlight an
editor asks for at the same place compute it once. Without the model kit (W_O) or ``hook_v`` in
the trace there are no sources: the hover says why in one line, highlights are empty.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from lsprotocol import types as t

from hexray_core.errors import HexRayError
from hexray_core.replay.sources import source_attribution
from trace_format import TraceFormatError

from .render import code, signed
from .trace_view import RunView, TraceView, token_label

CACHE_SIZE = 64
STRONG = 0.5  # a source at this share of the largest |total| or more is highlighted as Write
TOP = 50  # the most sources a hover lists (hover.sources' maximum)


@dataclass(frozen=True)
class Sources:
    """What the hover and the highlights need of one `SourceAttribution`: O(position) floats, not the
    [layers, heads, position + 1] array (18 MB at 16k tokens in GPT-2-small's shape), so the cache stays small."""

    position: int
    per_source: np.ndarray  # [position + 1] each source's total through all heads
    top: list  # SourceAttribution.top_sources(TOP, heads=1)


_cache: OrderedDict[tuple, Sources | str] = OrderedDict()


def sources_of(view: TraceView, rv: RunView, i: int) -> Sources | str:
    """The source attribution of token ``i``'s logit at position ``i - 1``, or why there is none."""
    key = (view.generation, rv.index, i)
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    if i < 1 or i >= len(rv.tokens):
        result: Sources | str = "no earlier position predicted this token"
    elif not view.kit_available:
        result = "sources need the model kit (W_O), which is not available for this trace"
    else:
        try:
            sa = source_attribution(view.trace, position=i - 1, run=rv.index, target=int(rv.tokens[i]))
            result = Sources(sa.position, sa.per_source, sa.top_sources(TOP, heads=1))
        except (HexRayError, TraceFormatError, KeyError, ValueError, IndexError, TypeError, OSError) as e:
            result = str(e)
    _cache[key] = result
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return result


def ranked(sa: Sources, rv: RunView, threshold: float, limit: int) -> list[tuple[int, float]]:
    """(source position, total) of the sources shown in the document whose |total| is at least
    ``threshold`` × the largest |total| among them, strongest first, at most ``limit``.

    Tokens the document does not show (BOS, often the heads' resting place) are left out before the
    largest is taken: relative to an attention sink nothing in the text would pass the threshold.
    """
    if limit <= 0 or len(rv.shown) == 0:
        return []
    shown = rv.shown[rv.shown <= sa.position]
    totals = sa.per_source[shown]
    if totals.size == 0:
        return []
    mag = np.abs(totals)
    top = float(mag.max())
    if not np.isfinite(top) or top <= 0:
        return []
    order = np.argsort(-mag, kind="stable")[:limit]
    return [(int(shown[j]), float(totals[j])) for j in order if mag[j] >= threshold * top]


def hover_lines(view: TraceView, rv: RunView, i: int, n: int, text: str) -> list[str]:
    """The hover's "Sources" paragraph: ``from " Paris"@5 via L3H2 +1.20`` per source."""
    if n <= 0 or i < 1:
        return []

    sa = sources_of(view, rv, i)
    if isinstance(sa, str):
        return ["", f"*Sources unavailable: {sa}*"]
    lines = ["", f"**Sources** of its logit (which earlier tokens the heads carried it from, Σ "
             f"{signed(float(sa.per_source.sum()))})", ""]
    for s, total, heads in sa.top[:n]:
        via = f" via {heads[0][0]} {signed(heads[0][1])}" if heads else ""
        lines.append(f"- from {code(token_label(rv, s, text))}@{s}{via} (total {signed(total)})")
    return lines


def highlights(view: TraceView, rv: RunView, i: int, index, threshold: float,
               limit: int) -> list[t.DocumentHighlight]:
    sa = sources_of(view, rv, i)
    if isinstance(sa, str):
        return []
    ranks = ranked(sa, rv, threshold, limit)
    if not ranks:
        return []
    top = abs(ranks[0][1])
    out = []
    for s, v in ranks:
        (sl, sc), (el, ec) = index.position(int(rv.starts[s])), index.position(int(rv.ends[s]))
        kind = t.DocumentHighlightKind.Write if abs(v) >= STRONG * top else t.DocumentHighlightKind.Read
        out.append(t.DocumentHighlight(range=t.Range(start=t.Position(line=sl, character=sc),
                                                     end=t.Position(line=el, character=ec)), kind=kind))
    return out


async def document_highlight(ls, params: t.DocumentHighlightParams) -> list[t.DocumentHighlight]:
    doc = ls.served(params.text_document.uri)
    if doc is None:
        return []
    status = await ls.status(doc)
    if status.state != "fresh":
        return []
    index = doc.index(ls.encoding)
    rv = status.run
    group = rv.tokens_at(index.offset(params.position.line, params.position.character))
    if not group:
        return []
    return highlights(status.view, rv, group[0], index, ls.settings.highlight_threshold, ls.settings.max_highlights)
