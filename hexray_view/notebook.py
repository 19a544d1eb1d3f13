"""Notebook rendering: the viewer inline in Jupyter (or VS Code notebooks), without a server.

The page is the report's (data embedded, no network) inside an iframe's `srcdoc`, so its script and
styles run isolated from the notebook's own page and work in any front end that shows HTML output.
"""

from __future__ import annotations

import html
import os

from . import page, report

NOTEBOOK_DETAIL = 24


def trace_html(trace, *, run: int = 0, position: int | None = None, detail: int = NOTEBOOK_DETAIL,
               height: int = 640) -> str:
    """HTML of the viewer for one open trace, opened on `run` and `position` (default: its last token)."""
    r = trace.run(run)
    p = r.n_tokens - 1 if position is None else r.position(position)
    name = os.path.basename(trace.path)
    index = next(i for i, x in enumerate(trace.runs) if x is r)
    payload = report.build([trace], [name], detail=detail, positions=(p,), runs={index})
    payload["start"] = {"trace": 0, "run": index, "position": p}
    doc = page.render(name, payload)
    return (f'<iframe class="hexray-view" srcdoc="{html.escape(doc, quote=True)}" '
            f'style="width:100%;height:{int(height)}px;border:1px solid #d9dee5;border-radius:6px" '
            'sandbox="allow-scripts"></iframe>')


class Shown:
    """What `show()` returns: displays itself in a notebook; `.html` is the markup."""

    def __init__(self, markup: str):
        self.html = markup

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return f"<HexRay view: {len(self.html):,} bytes of HTML; display it in a notebook>"


def show(trace, run: int = 0, position: int | None = None, *, detail: int = NOTEBOOK_DETAIL,
         height: int = 640) -> Shown:
    """The viewer inline, opened on `run` and `position`; `detail` positions per run carry every panel."""
    return Shown(trace_html(trace, run=run, position=position, detail=detail, height=height))
