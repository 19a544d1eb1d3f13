"""Push diagnostics for a prompt document.

    code              severity     when
    no-trace          information  no trace beside the document or in the trace folder
    stale-trace       warning      the trace recorded a different text (range: where the text first differs)
    trace-unreadable  warning      the trace file is corrupt, truncated or not a recording
    kit-missing       information  fresh trace, but its model kit is not available (no per-head attribution)
    unusable          information  binary or too large a document: nothing is shown for it
    recording-failed  warning      the last recording of this document failed (cleared by the next one)
    surprising-token  information  (setting surpriseThreshold > 0) tokens the model gave a probability below it

Each has ``source = "hexray"`` and a ``data`` of ``{"command": ...}`` when a command fixes it (the
code action offers it).
"""

from __future__ import annotations

import os

from lsprotocol import types as t

from .documents import Document
from .ids import RECORD, SOURCE  # noqa: F401 (SOURCE re-exported)
from .inlay_hints import _groups, _joint, group_tokens
from .line_index import LineIndex
from .render import bits, pct
from .settings import Settings
from .trace_view import TraceView
from .traces import TraceStatus


def _range(index: LineIndex, start: int, end: int) -> t.Range:
    sl, sc = index.position(start)
    el, ec = index.position(end)
    return t.Range(start=t.Position(line=sl, character=sc), end=t.Position(line=el, character=ec))


def _first_line(index: LineIndex) -> t.Range:
    end = index.ends[0] if index.ends else 0
    return _range(index, 0, end)


def _diag(rng: t.Range, code: str, message: str, severity: t.DiagnosticSeverity, data: dict | None = None):
    return t.Diagnostic(range=rng, message=message, severity=severity, source=SOURCE, code=code, data=data)


def record_hint(doc: Document, settings: Settings) -> str:
    name = doc.name
    out = os.path.splitext(name)[0] + ".hxr"
    return (f"record one with the command \"HexRay: Record trace\" ({RECORD}), the code lens above, or "
            f"`hexray record --model {settings.model} --prompt-file {name} -o {out}`")


def compute(doc: Document, status: TraceStatus, settings: Settings, encoding: str, *,
            unusable: str | None = None, record_error: str | None = None) -> list[t.Diagnostic]:
    index = doc.index(encoding)
    first = _first_line(index)
    out: list[t.Diagnostic] = []
    if unusable:
        return [_diag(first, "unusable", f"HexRay: {unusable}.", t.DiagnosticSeverity.Information)]
    if record_error:
        out.append(_diag(first, "recording-failed", f"HexRay: recording failed: {record_error}",
                         t.DiagnosticSeverity.Warning, {"command": RECORD}))
    if status.state == "none":
        out.append(_diag(first, "no-trace", f"No HexRay trace for this prompt: {record_hint(doc, settings)}.",
                         t.DiagnosticSeverity.Information, {"command": RECORD}))
    elif status.state == "error":
        out.append(_diag(first, "trace-unreadable",
                         f"HexRay trace cannot be read: {status.message}. Record it again ({RECORD}).",
                         t.DiagnosticSeverity.Warning, {"command": RECORD}))
    elif status.state == "stale":
        at = min(status.diff_offset or 0, len(doc.text))
        end = at + 1 if at < len(doc.text) else at
        if at == end and at > 0:
            at -= 1
        out.append(_diag(_range(index, at, end), "stale-trace", status.message + ".",
                         t.DiagnosticSeverity.Warning, {"command": RECORD, "trace": status.path}))
    elif status.state == "fresh" and status.view is not None:
        view = status.view
        if not view.kit_available and view.kit_message:
            out.append(_diag(first, "kit-missing", f"HexRay: {view.kit_message}.", t.DiagnosticSeverity.Information))
        if settings.surprise_threshold > 0 and status.run is not None:
            out.extend(surprising(view, status, index, settings))
    return out


def surprising(view: TraceView, status: TraceStatus, index: LineIndex, settings: Settings) -> list[t.Diagnostic]:
    rv = status.run
    found = []
    for j0, j1, _end in _groups(rv):
        toks = group_tokens(rv, j0, j1)
        p = _joint(rv, toks)
        if p == p and p < settings.surprise_threshold:
            found.append((p, toks))
    found.sort(key=lambda x: x[0])
    found = found[: settings.max_surprise_diagnostics]
    found.sort(key=lambda x: x[1][0])
    out = []
    for p, toks in found:
        start = min(int(rv.starts[i]) for i in toks)
        end = max(int(rv.ends[i]) for i in toks)
        text = rv.text[start:end]
        msg = f"Surprising token {text!r}: p = {pct(p)} ({bits(p)} bits), below {pct(settings.surprise_threshold)}"
        out.append(_diag(_range(index, start, end), "surprising-token", msg, t.DiagnosticSeverity.Information))
    return out
