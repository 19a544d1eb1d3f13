"""The viewer's HTML page: the built front end (static/viewer.js, viewer.css) inlined into one document.

The same page serves `hexray view` (data fetched from the API beside it), `hexray report`, the
notebook and the VS Code webview (data embedded as JSON). A Content-Security-Policy in the page
itself forbids every network request an embedded page could make, and lets a served page reach
only its own server.
"""

from __future__ import annotations

import html
import json
from functools import cache
from importlib import resources

from .data import plain

CSP_EMBEDDED = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:"
CSP_SERVED = CSP_EMBEDDED + "; connect-src 'self'"


@cache
def asset(name: str) -> str:
    """A built front-end file shipped inside the package (rebuild: `npm run build` in viewer/)."""
    return resources.files("hexray_view").joinpath("static", name).read_text(encoding="utf-8")


def _script_json(obj) -> str:
    """JSON safe inside <script>: no '</' (would close the element) and no '<!--'."""
    text = json.dumps(plain(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def render(title: str, data: dict | None = None) -> str:
    """The page; with `data` (see source.ts `Embedded`) it is self-contained, without it it calls api/."""
    csp = CSP_SERVED if data is None else CSP_EMBEDDED
    embedded = "" if data is None else \
        f'<script type="application/json" id="hexray-data">{_script_json(data)}</script>\n'
    # The script is inlined verbatim: it is our own build and holds no "</script" (checked in tests).
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)} · HexRay</title>\n"
        f"<style>{asset('viewer.css')}</style>\n</head><body>\n"
        '<div id="hexray-app">loading…</div>\n'
        f"{embedded}<script>{asset('viewer.js')}</script>\n</body></html>\n"
    )
