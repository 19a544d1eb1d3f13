"""Inlay hints: one short figure after each token, and a tooltip filled in by ``inlayHint/resolve``.

Modes (setting ``inlayHints``): ``probability`` (``42%``), ``surprisal`` in bits (``3.1b``),
``contributor`` (the component with the largest share of the token's direct logit attribution,
``MLP L1 38%``), ``off``.

Tokens that split one character end at the same place: they get one hint, with their joint
probability (summed surprisal). A token that ends with a line break gets its hint at the end of
its line, marked ``↵``, rather than at the start of the next.

The hints of a fresh trace are built once per (trace, run, mode, encoding) as JSON fragments; a
request for a range joins the fragments whose positions fall in it (see `protocol.RawJSON`).
"""

from __future__ import annotations

import bisect
import json
import logging
import math
from dataclasses import dataclass

import numpy as np
from lsprotocol import types as t

from .hover import token_label
from .line_index import LineIndex
from .protocol import RawJSON
from .render import bits, pct
from .trace_view import RunView, TraceView

log = logging.getLogger(__name__)


@dataclass
class HintSet:
    offsets: list[int]  # code point offset of each hint's position, sorted
    fragments: list[str]  # JSON of each hint


def _groups(rv: RunView) -> list[tuple[int, int, int]]:
    """(j0, j1, end): slices shown[j0:j1+1] of tokens ending at the same offset ``end``."""
    out: list[tuple[int, int, int]] = []
    for j, end in enumerate(rv.shown_ends):
        if out and out[-1][2] == end:
            out[-1] = (out[-1][0], j, end)
        else:
            out.append((j, j, end))
    return out


def group_tokens(rv: RunView, j0: int, j1: int) -> list[int]:
    return [int(i) for i in rv.shown[j0:j1 + 1]]


def _joint(rv: RunView, toks: list[int]) -> float:
    p = rv.prob[toks]
    return float(np.prod(p)) if len(toks) and np.all(np.isfinite(p)) else math.nan


def label_for(rv: RunView, toks: list[int], mode: str) -> str | None:
    if mode == "contributor":
        lbl = rv.top_label[toks[0]]
        if lbl is None:
            return None
        share = rv.top_share[toks[0]]
        return f"{lbl} {share:.0%}" if math.isfinite(share) else lbl
    p = _joint(rv, toks)
    if not math.isfinite(p):
        return None
    if mode == "surprisal":
        return f"{-math.log2(p):.1f}b" if p > 0 else "∞b"
    return pct(p)


def build_hints(view: TraceView, rv: RunView, index: LineIndex, mode: str, doc_id: int) -> HintSet:
    text = rv.text
    offsets, labels, groups = [], [], []
    for j0, j1, end in _groups(rv):
        label = label_for(rv, group_tokens(rv, j0, j1), mode)
        if label is None:
            continue
        at = end
        if end > 0 and text[end - 1] in "\r\n":
            at = end - 1
            if text[at] == "\n" and at > 0 and text[at - 1] == "\r":
                at -= 1
            label = "↵" + label
        offsets.append(at)
        labels.append(label)
        groups.append((j0, j1))
    lines, cols = index.positions(offsets) if offsets else ([], [])
    frags = []
    for label, line, col, (j0, j1) in zip(labels, lines, cols, groups, strict=True):
        frags.append(json.dumps({"position": {"line": int(line), "character": int(col)}, "label": label,
                                 "paddingLeft": True, "data": [doc_id, view.generation, rv.index, j0, j1]},
                                separators=(",", ":")))
    return HintSet(offsets, frags)


def hints_in(hs: HintSet, lo: int, hi: int) -> RawJSON:
    a = bisect.bisect_left(hs.offsets, lo)
    b = bisect.bisect_right(hs.offsets, hi)
    return RawJSON("[" + ",".join(hs.fragments[a:b]) + "]")


def tooltip(view: TraceView, rv: RunView, j0: int, j1: int, text: str) -> str:
    """Markdown for a hint's tooltip (resolve)."""
    toks = group_tokens(rv, j0, j1)
    shown = " ".join(f"`{token_label(rv, i, text)}`" for i in toks)
    p = _joint(rv, toks)
    head = f"**{shown}** · p **{pct(p)}** · {bits(p)} bits"
    if len(toks) == 1 and rv.rank[toks[0]]:
        head += f" · rank {int(rv.rank[toks[0]])}"
    lines = [head]
    if rv.top_label[toks[0]] is not None:
        share = rv.top_share[toks[0]]
        lines.append(f"Top contributor: {rv.top_label[toks[0]]}" + (f" ({share:.0%})" if math.isfinite(share) else ""))
    lines.append("*Hover the token for predictions and contributors.*")
    return "\n\n".join(lines)


async def inlay_hints(ls, params: t.InlayHintParams):
    mode = ls.settings.inlay_hints
    if mode == "off":
        return []
    uri = params.text_document.uri
    doc = ls.served(uri)
    if doc is None:
        return []
    status = await ls.status(doc)
    if not status.fresh:
        return []
    enc = ls.encoding
    index = doc.index(enc)
    view, rv = status.view, status.run
    key = (uri, view.generation, rv.index, mode, enc)
    hs = ls.hint_cache.get(key)
    if hs is None:
        hs = ls.hint_cache[key] = build_hints(view, rv, index, mode, ls.doc_id(uri))
    r = params.range
    return hints_in(hs, index.offset(r.start.line, r.start.character), index.offset_ceil(r.end.line, r.end.character))


def resolve(ls, hint: t.InlayHint) -> t.InlayHint:
    data = hint.data
    if not (isinstance(data, list) and len(data) == 5 and all(isinstance(x, int) for x in data)):
        return hint
    doc_id, generation, run, j0, j1 = data
    uri = ls.uri_of(doc_id)
    doc = ls.served(uri) if uri else None
    if doc is None:
        return hint
    status = ls.status_now(doc)
    if not status.fresh or status.view.generation != generation or status.run.index != run:
        return hint
    rv = status.run
    if not 0 <= j0 <= j1 < len(rv.shown):
        return hint
    hint.tooltip = t.MarkupContent(kind=t.MarkupKind.Markdown, value=tooltip(status.view, rv, j0, j1, doc.text))
    return hint

