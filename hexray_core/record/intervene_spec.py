"""The ``--intervene SPEC`` grammar (torch-free: a bad spec fails before torch is imported).

    SPEC      := TARGET [~DIRFILE] [@POSITIONS] ACTION
    TARGET    := L<l>H<h>          head h of layer l: blocks.<l>.attn.hook_z[:, h, :] (its output before W_O)
               | L<l>N<n>          neuron n of layer l: blocks.<l>.mlp.hook_post[:, n]
               | L<l>F<f>          feature f of the --dict dictionary's layer l (intervene_features.py: its
                                   activation a becomes a', and (a' - a) * its decoder row is written)
               | L<l>.attn | L<l>.mlp | L<l>.resid_pre | L<l>.resid_mid | L<l>.resid_post
                                   blocks.<l>.hook_attn_out, hook_mlp_out, hook_resid_pre, ...
               | HOOK              any hook name, e.g. blocks.2.hook_resid_pre
    ~DIRFILE  := the component of TARGET along a direction: a .npy vector (normalised to unit length)
    POSITIONS := P[,P...]          P := an index, or A:B (A up to B-1); default: every position
    ACTION    := =0 | =mean        zero- or mean-ablate (mean over the prompt's positions)
               | =X                set to the number X (a neuron, feature or direction)
               | =+X | =-X         add X (a neuron, feature or direction: X times the unit direction)
               | *X                scale by X
               | +=VECFILE[*X]     add the .npy vector (times X) at each position (steering)
               | <-TRACE[#RUN]     patch: the activation recorded at the same hook in TRACE (run 0 by default)

Examples: ``L1H2=0``, ``L1H2@3=0``, ``L2N17=mean``, ``L1.attn=0``, ``blocks.2.hook_resid_pre@5<-clean.hxr``,
``blocks.1.hook_resid_post~refusal.npy=0``, ``blocks.1.hook_resid_post@4:9+=steer.npy*4``.

Every error is one line naming the part that is wrong. Model-dependent checks (layer, head, neuron,
hook names, vector sizes, positions against the prompt, the patch trace) happen when the recorder
binds the specs to a model (``intervene.py``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from hexray_core.errors import HexRayError

LAYER_PARTS = {"attn": "hook_attn_out", "mlp": "hook_mlp_out", "resid_pre": "hook_resid_pre",
               "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post"}
MAX_POSITIONS = 1 << 20

_SHORT = re.compile(r"L(\d+)([HNF])(\d+)$")
_PART = re.compile(r"L(\d+)\.(\w+)$")
_HOOK = re.compile(r"[A-Za-z_][\w.]*$")
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"


@dataclass(frozen=True)
class Intervention:
    """One parsed spec. ``hook``: the hook it acts on; ``head``/``neuron``/``feature``: the index within it."""

    spec: str
    kind: str                 # "head" | "neuron" | "feature" | "hook"
    hook: str                 # hook name as written or expanded (the recorder resolves aliases)
    layer: int | None
    index: int | None         # head, neuron or feature index
    direction: str | None     # .npy path: act on the component along this direction
    positions: tuple[int, ...] | None  # None: every position
    op: str                   # "set" | "mean" | "add" | "scale" | "add_vector" | "patch"
    value: float | None       # set / add / scale amount; add_vector's factor
    file: str | None          # add_vector's .npy, or patch's trace
    run: int = 0              # patch: run of the trace

    def describe(self) -> dict:
        """What the trace's metadata records (``meta["interventions"]``)."""
        d = {"spec": self.spec, "kind": self.kind, "hook": self.hook, "op": self.op}
        for key in ("layer", "index", "direction", "value", "file"):
            v = getattr(self, key)
            if v is not None:
                d[key] = v
        d["positions"] = list(self.positions) if self.positions is not None else None
        if self.op == "patch":
            d["run"] = self.run
        return d


def _err(spec: str, what: str) -> HexRayError:
    return HexRayError(f"--intervene {spec!r}: {what}")


def _number(spec: str, text: str, what: str) -> float:
    if not re.fullmatch(_NUMBER, text):
        raise _err(spec, f"{what} {text!r} is not a number")
    x = float(text)
    if not math.isfinite(x):
        raise _err(spec, f"{what} {text!r} is not finite")
    return x


def _positions(spec: str, text: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?::(\d+))?", part)
        if not m:
            raise _err(spec, f"position {part!r} is not an index or a range A:B (indices count from 0)")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a + 1
        if b <= a:
            raise _err(spec, f"position range {part!r} is empty")
        if b - a + len(out) > MAX_POSITIONS or a >= MAX_POSITIONS:
            raise _err(spec, f"position {part!r} is too large")
        out.extend(range(a, b))
    return tuple(sorted(set(out)))


def _path(base_dir: str | None, p: str) -> str:
    p = os.path.expanduser(p)
    return p if os.path.isabs(p) or base_dir is None else os.path.join(base_dir, p)


def parse_intervention(spec: str, base_dir: str | None = None) -> Intervention:
    """Parse one spec; relative file names are taken relative to ``base_dir`` (default: as given)."""
    if not isinstance(spec, str):
        raise HexRayError(f"--intervene: expected a text spec, not {type(spec).__name__}")
    text = spec.strip()
    if not text:
        raise HexRayError("--intervene: empty spec (e.g. L1H2=0)")
    if len(text) > 4096:
        raise HexRayError("--intervene: spec longer than 4096 characters")
    # The action: the first operator after the target (file names may not hold these characters).
    m = re.search(r"<-|\+=|=|\*", text)
    if m is None:
        raise _err(spec, "no action: end with =0, =mean, =X, =+X, *X, +=VECTOR.npy or <-TRACE.hxr")
    lhs, op, rhs = text[:m.start()].strip(), m.group(0), text[m.end():].strip()
    positions = None
    if "@" in lhs:
        lhs, pos_text = (s.strip() for s in lhs.split("@", 1))
        positions = _positions(spec, pos_text)
    direction = None
    if "~" in lhs:
        lhs, dir_text = (s.strip() for s in lhs.split("~", 1))
        if not dir_text:
            raise _err(spec, "~ needs a direction file (.npy)")
        direction = _path(base_dir, dir_text)
    kind, hook, layer, index = _target(spec, lhs)
    value, file, run = None, None, 0
    if op == "<-":
        if not rhs:
            raise _err(spec, "<- needs a trace file to patch from")
        mrun = re.fullmatch(r"(.+?)#(\d+)", rhs)
        if mrun:
            rhs, run = mrun.group(1).strip(), int(mrun.group(2))
        action, file = "patch", _path(base_dir, rhs)
    elif op == "+=":
        if direction is not None:
            raise _err(spec, "+= adds a whole vector; for a direction use ~FILE=+X")
        if kind in ("neuron", "feature"):
            raise _err(spec, f"+= adds a vector; a {kind} takes =+X")
        vec, _, factor = rhs.partition("*")
        if not vec.strip():
            raise _err(spec, "+= needs a vector file (.npy)")
        action, file = "add_vector", _path(base_dir, vec.strip())
        value = _number(spec, factor.strip(), "factor") if factor else 1.0
    elif op == "*":
        action, value = "scale", _number(spec, rhs, "scale")
    elif rhs == "mean":
        action = "mean"
    elif rhs[:1] in "+-" and rhs[1:2] != "":
        action, value = "add", _number(spec, rhs, "amount")
        if kind in ("head", "hook") and direction is None:
            raise _err(spec, f"=+X adds to one number; a {'head' if kind == 'head' else 'hook'} is a vector: "
                             "add along a direction (~FILE=+X) or add a vector (+=FILE)")
    else:
        if not rhs:
            raise _err(spec, "= needs 0, mean, a number X or +X")
        action, value = "set", _number(spec, rhs, "value")
        if value != 0 and kind in ("head", "hook") and direction is None:
            raise _err(spec, f"={rhs} sets one number; a {'head' if kind == 'head' else 'hook'} is a vector: "
                             "use =0, =mean, *X, or a direction (~FILE=X)")
    return Intervention(spec=text, kind=kind, hook=hook, layer=layer, index=index, direction=direction,
                        positions=positions, op=action, value=value, file=file, run=run)


def _target(spec: str, lhs: str) -> tuple[str, str, int | None, int | None]:
    if not lhs:
        raise _err(spec, "no target before the action (e.g. L1H2, L2N17, L1.attn, blocks.2.hook_resid_pre)")
    m = _SHORT.match(lhs)
    if m:
        layer, letter, index = int(m.group(1)), m.group(2), int(m.group(3))
        if letter == "H":
            return "head", f"blocks.{layer}.attn.hook_z", layer, index
        if letter == "N":
            return "neuron", f"blocks.{layer}.mlp.hook_post", layer, index
        return "feature", f"blocks.{layer}.hook_resid_post", layer, index
    m = _PART.match(lhs)
    if m:
        part = m.group(2)
        if part not in LAYER_PARTS:
            raise _err(spec, f"unknown layer part {part!r} in {lhs!r} (one of {', '.join(LAYER_PARTS)})")
        return "hook", f"blocks.{int(m.group(1))}.{LAYER_PARTS[part]}", int(m.group(1)), None
    if re.match(r"L\d", lhs):
        raise _err(spec, f"target {lhs!r} is not L<layer>H<head>, L<layer>N<neuron>, L<layer>F<feature> "
                         "or L<layer>.attn/.mlp/.resid_pre/.resid_mid/.resid_post")
    if not _HOOK.match(lhs):
        raise _err(spec, f"target {lhs!r} is not a hook name (e.g. blocks.2.hook_resid_pre) or L1H2-style name")
    mlayer = re.match(r"blocks\.(\d+)\.", lhs)
    return "hook", lhs, int(mlayer.group(1)) if mlayer else None, None


def parse_interventions(specs, base_dir: str | None = None) -> list[Intervention]:
    """Parse a list of specs (an Intervention passes through)."""
    if specs is None:
        return []
    if isinstance(specs, str | Intervention):
        specs = [specs]
    out = []
    for s in specs:
        out.append(s if isinstance(s, Intervention) else parse_intervention(s, base_dir))
    if len(out) > 256:
        raise HexRayError(f"--intervene: {len(out)} interventions, at most 256")
    return out
