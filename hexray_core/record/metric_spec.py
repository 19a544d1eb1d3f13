"""``--grad METRIC``: the scalar whose gradient ``hexray record --grad`` stores (torch-free parser).

    METRIC := logit-diff:TOKEN,TOKEN[@POS] | logit:TOKEN[@POS] | logprob:TOKEN[@POS]
    TOKEN  := "text" (a JSON string: exactly one token) | #ID

e.g. ``logit-diff:" Mary"," John"`` (at the last position), ``logprob:#42@5``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from hexray_core.errors import HexRayError

KINDS = ("logit-diff", "logit", "logprob")
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|#\d+)\s*')


@dataclass(frozen=True)
class MetricSpec:
    spec: str
    kind: str
    tokens: tuple[str, ...]   # as written: a text, or '#id'
    position: int             # -1: the last position

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "tokens": list(self.tokens), "position": self.position}


def parse_metric(spec: str) -> MetricSpec:
    if not isinstance(spec, str) or not spec.strip():
        raise HexRayError('--grad: empty metric (e.g. logit-diff:" Mary"," John")')
    text = spec.strip()
    kind, sep, rest = text.partition(":")
    if kind not in KINDS:
        raise HexRayError(f"--grad {spec!r}: metric {kind!r} is not one of {', '.join(KINDS)}")
    if not sep:
        raise HexRayError(f"--grad {spec!r}: {kind} needs its token(s) after a colon, e.g. {kind}:\" Mary\"")
    position = -1
    m = re.search(r"@(-?\d+)\s*$", rest)
    if m:
        position, rest = int(m.group(1)), rest[:m.start()]
    tokens, pos = [], 0
    while pos < len(rest):
        mt = _TOKEN.match(rest, pos)
        if not mt:
            raise HexRayError(f"--grad {spec!r}: token {rest[pos:].strip()!r} is not a quoted text or #ID")
        tokens.append(json.loads(mt.group(1)) if mt.group(1).startswith('"') else mt.group(1))
        pos = mt.end()
        if pos < len(rest):
            if rest[pos] != ",":
                raise HexRayError(f"--grad {spec!r}: expected a comma after token {len(tokens)}")
            pos += 1
    want = 2 if kind == "logit-diff" else 1
    if len(tokens) != want:
        raise HexRayError(f"--grad {spec!r}: {kind} takes {want} token{'s' if want > 1 else ''}, not {len(tokens)}")
    return MetricSpec(spec=text, kind=kind, tokens=tuple(tokens), position=position)
