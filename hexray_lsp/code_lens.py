"""Code lens on the first line: record the trace (with the trace's state), or cancel a recording."""

from __future__ import annotations

from lsprotocol import types as t

from .ids import CANCEL, RECORD

_STATE = {"fresh": "trace up to date", "stale": "trace stale", "none": "no trace", "error": "trace unreadable",
          "loading": "loading trace…"}


def lenses(ls, uri: str) -> list[t.CodeLens]:
    doc = ls.served(uri)
    if doc is None:
        return []
    top = t.Range(start=t.Position(line=0, character=0), end=t.Position(line=0, character=0))
    rec = ls.recordings.get(uri)
    if rec is not None:
        done = f" {rec.percentage}%" if rec.percentage else ""
        return [t.CodeLens(range=top, command=t.Command(title=f"■ HexRay: recording…{done} (cancel)", command=CANCEL,
                                                        arguments=[uri]))]
    state = ls.status_now(doc).state
    model = ls.settings.model_factory or ls.settings.model
    verb = "record again" if state == "fresh" else "record trace"
    return [t.CodeLens(range=top, command=t.Command(title=f"▶ HexRay: {verb} ({_STATE.get(state, state)} · {model})",
                                                    command=RECORD, arguments=[uri]))]

