"""Inlay hints: one short figure after each token, and a tooltip filled in by ``inlayHint/resolve``.

Modes (setting ``inlayHints``): ``probability`` (``42%``), ``surprisal`` in bits (``3.1b``),
``contributor`` (the component with the largest share of the token's direct logit attribution,
``MLP L1 38%``), ``feature`` (the strongest feature of the ``features.dictionary`` setting at the token,
``L2F17 4.2``), ``off``.

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

from .features import top_labels
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


_FRAGMENT = '{"position":{"line":%d,"character":%d},"label":%s,"paddingLeft":true,"data":[%d,%d,%d,%d,%d]}'


def build_hints(view: TraceView, rv: RunView, index: LineIndex, mode: str, doc_id: int, dictionary: str = "",
                roots: list[str] | None = None) -> HintSet:
    """All hints of a run, as JSON fragments in position order (vectorised: 6,000 tokens in ~20 ms)."""
    text = rv.text
    ends = np.asarray(rv.shown_ends, dtype=np.int64)
    if ends.size == 0:
        return HintSet([], [])
    # groups: runs of shown tokens that end at the same offset (tokens splitting one character)
    first = np.flatnonzero(np.r_[True, ends[1:] != ends[:-1]])
    last = np.r_[first[1:] - 1, ends.size - 1]
    tok_first = rv.shown[first]
    if mode == "contributor":
        labels = [label_for(rv, [int(i)], mode) for i in tok_first]
    elif mode == "feature":
        labels = top_labels(view.trace, rv.index, tok_first, dictionary, roots or []) if dictionary else \
            [None] * len(tok_first)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            logp = np.log(rv.prob[rv.shown])
        joint = np.exp(np.add.reduceat(logp, first))
        if mode == "surprisal":
            labels = [(f"{-math.log2(p):.1f}b" if p > 0 else "∞b") if p == p else None for p in joint.tolist()]
        else:
            labels = [pct(p) if p == p else None for p in joint.tolist()]
    at = ends[first].copy()
    # a token ending with a line break: its hint goes at the end of its line, marked ↵
    for k in np.flatnonzero([text[e - 1] in "\r\n" if e > 0 else False for e in at.tolist()]):
        e = int(at[k]) - 1
        if text[e] == "\n" and e > 0 and text[e - 1] == "\r":
            e -= 1
        at[k] = e
        if labels[k] is not None:
            labels[k] = "↵" + labels[k]
    keep = [k for k, lbl in enumerate(labels) if lbl is not None]
    lines, cols = index.positions(at[keep])
    quoted: dict[str, str] = {}
    frags = []
    gen, run = view.generation, rv.index
    for k, line, col in zip(keep, lines.tolist(), cols.tolist(), strict=True):
        lbl = labels[k]
        q = quoted.get(lbl)
        if q is None:
            q = quoted[lbl] = json.dumps(lbl)
        frags.append(_FRAGMENT % (line, col, q, doc_id, gen, run, int(first[k]), int(last[k])))
    return HintSet(at[keep].tolist(), frags)


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
    dictionary = ls.settings.features_dictionary if mode == "feature" else ""
    key = (uri, view.generation, rv.index, mode, enc, dictionary)
    hs = ls.hint_cache.get(key)
    if hs is None:
        hs = ls.hint_cache[key] = build_hints(view, rv, index, mode, ls.doc_id(uri), dictionary, ls.roots())
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

