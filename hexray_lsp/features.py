"""A token's top features through the dictionary the ``features.dictionary`` setting names (hover, inlay hint).

The dictionary is loaded once per (reference, file modification time) and its features of a run are computed once
per trace (``run_features`` keeps them with the run). Features at a token are those of the activation at that
position, ranked by activation across the dictionary's layers. A dictionary the trace cannot be read through (another
model, a missing hook, another space) shows its one-line refusal in the hover and no inlay hints.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from hexray_core.errors import HexRayError
from hexray_core.replay.dictionary import DictionarySet, load_dictionary
from hexray_core.replay.features import feature_logits, run_features
from trace_format import TraceFormatError

from .render import code, quote, table

log = logging.getLogger(__name__)
_LOADED: dict[tuple, DictionarySet] = {}


@dataclass(frozen=True)
class TokenFeature:
    layer: int
    feature: int
    activation: float
    explanation: str | None

    @property
    def label(self) -> str:
        return f"L{self.layer}F{self.feature}"


def resolve(ref: str, roots: list[str]) -> str:
    """A relative path is looked up in the workspace folders; references (hexray-demo-sae, sae-lens:...) pass."""
    ref = os.path.expanduser(ref)
    if not os.path.isabs(ref):
        for root in roots:
            if os.path.exists(os.path.join(root, ref)):
                return os.path.join(root, ref)
    return ref


def dictionary(ref: str) -> DictionarySet:
    try:
        stamp = os.stat(ref).st_mtime_ns
    except OSError:
        stamp = None
    key = (ref, stamp)
    if key not in _LOADED:
        _LOADED.clear()  # one dictionary at a time: they can be large
        _LOADED[key] = load_dictionary(ref)
    return _LOADED[key]


def top_features(trace, run: int, position: int, dset: DictionarySet, n: int) -> list[TokenFeature]:
    """The ``n`` strongest features at ``position`` over every layer of ``dset`` (HexRayError if unreadable)."""
    r = trace.run(run)
    out = []
    for layer in sorted(dset.layers):
        idx, val = run_features(r, dset, layer).at(position)
        labels = dset.layers[layer].labels
        out += [TokenFeature(layer, int(f), float(v), labels.get(int(f))) for f, v in zip(idx[:n], val[:n],
                                                                                            strict=True)]
    return sorted(out, key=lambda f: (-f.activation, f.layer, f.feature))[:n]


def hover_lines(trace, run: int, position: int, ref: str, n: int, roots: list[str]) -> list[str]:
    """Markdown lines for the hover: a table of the token's top features, or why there is none."""
    if not ref or n <= 0:
        return []
    try:
        dset = dictionary(resolve(ref, roots))
        feats = top_features(trace, run, position, dset, n)
        promotes = {}
        for layer in {f.layer for f in feats}:
            mine = [f for f in feats if f.layer == layer]
            for f, (top, _) in zip(mine, feature_logits(trace, dset[layer], [f.feature for f in mine], k=3),
                                   strict=True):
                promotes[f.label] = " ".join(code(quote(t)) for _, t, _ in top)
    except (HexRayError, TraceFormatError, OSError, KeyError, ValueError) as e:
        return ["", f"*Features unavailable: {str(e).splitlines()[0] if str(e) else type(e).__name__}*"]
    if not feats:
        return ["", f"**Features** ({dset.name}): none active at this token"]
    rows = [[f.label, f"{f.activation:.3g}", promotes.get(f.label, ""), f.explanation or ""] for f in feats]
    return ["", f"**Top features** at this token ({dset.name}, {dset.kind})", "",
            *table(["feature", "activation", "promotes", "label"], rows, "lrll")]


def top_labels(trace, run: int, positions, ref: str, roots: list[str]) -> list[str | None]:
    """Per position, ``L3F12 4.2`` for its strongest feature (None where none is active or unreadable)."""
    try:
        dset = dictionary(resolve(ref, roots))
        out = []
        for p in positions:
            best = top_features(trace, run, int(p), dset, 1)
            out.append(f"{best[0].label} {best[0].activation:.3g}" if best else None)
        return out
    except (HexRayError, TraceFormatError, OSError, KeyError, ValueError) as e:
        log.warning("inlay feature hints unavailable: %s", e)
        return [None] * len(positions)
