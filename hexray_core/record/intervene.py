"""Interventions while recording: parsed specs (``intervene_spec.py``) bound to a model as TransformerLens
forward hooks on the bridge's hook points.

``bind(bridge, specs)`` checks every spec against the model (layer, head, neuron, hook name, vector
sizes, the patch trace's hook and shape) and returns ``Interventions``; ``check_run(n_prompt, n_total)``
checks positions against one run; ``with interventions.applied(bridge):`` adds the hooks through the
bridge's own ``hooks()`` context (TransformerLens resolves aliases and removes exactly these hooks on
exit). The same hooks act during ``--generate`` (cached steps see one new position; ``window(start)``
tells the hooks where that position is) and during the recording forward, so a steered continuation
is what the recorded run shows.

Each hook returns a modified copy of its activation. An act on TARGET (a head's slice of ``hook_z``,
a neuron of ``mlp.hook_post``, or a whole hook) at the chosen positions:
``set``/``add``/``scale`` the value; ``mean``: the value's mean over the prompt's positions in this
run (computed in the pass that sees the prompt, kept for cached generation steps); ``add_vector``: +
X·v; ``patch``: the value recorded at the same hook and positions in another trace. With a direction
u (unit), the act is on the coefficient c = x·u only: x + (c' − c)·u.

A feature (``L3F120``, ``intervene_features.py``) has a read hook where its dictionary reads and a write hook
where it writes, with the dictionary's activation space rebuilt live.

HexRay writes these hooks itself because TransformerLens offers hooks and patching sweeps but no
spec language or ablation helpers for single forward passes; the hook functions are a few lines each.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from hexray_core.errors import HexRayError
from hexray_core.stream_order import reaches
from trace_format import TraceReader

from .hooks import canonical_names
from .intervene_features import FeatureAct, RawMeans, bind_feature
from .intervene_spec import Intervention, parse_interventions

_QUERY_AXIS_HOOKS = ("hook_pattern", "hook_attn_scores")  # [batch, head, query, key]: positions are queries


MAX_VECTOR_FILE = 64 << 20  # a vector of any model's width is far smaller; refuse before reading a huge file


def _load_vector(path: str, what: str, spec: str) -> np.ndarray:
    try:
        if os.path.getsize(path) > MAX_VECTOR_FILE:
            raise HexRayError(f"--intervene {spec!r}: {what} file {path} is over {MAX_VECTOR_FILE >> 20} MB")
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise HexRayError(f"--intervene {spec!r}: {what} file {path} not found") from None
    except (OSError, ValueError) as e:
        raise HexRayError(f"--intervene {spec!r}: {what} file {path} is not a .npy array ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        raise HexRayError(f"--intervene {spec!r}: {what} file {path} does not hold numbers")
    arr = np.asarray(arr, dtype=np.float64).reshape(-1) if arr.ndim <= 1 or arr.shape[0] == 1 else arr
    if arr.ndim != 1:
        raise HexRayError(f"--intervene {spec!r}: {what} file {path} holds shape {list(arr.shape)}, not a vector")
    if not np.isfinite(arr).all():
        raise HexRayError(f"--intervene {spec!r}: {what} file {path} holds NaN or infinity")
    return arr


class _Act:
    """One bound intervention: the hook function and what it needs."""

    def __init__(self, iv: Intervention, hook: str, state: dict):
        self.iv, self.hook, self.state = iv, hook, state
        self.query_axis = hook.endswith(_QUERY_AXIS_HOOKS)
        self.direction: torch.Tensor | None = None
        self.vector: torch.Tensor | None = None
        self.source: torch.Tensor | None = None  # patch: the recorded activation, [1, n, ...]
        self.mean: torch.Tensor | None = None
        self.fired = 0  # calls since the last reset: a hook that never fires would be a silent no-op

    def hooks(self) -> list:
        return [(self.hook, self)]

    def describe(self) -> dict:
        return self.iv.describe() | {"hook": self.hook}

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        """The target as a view into x: [batch, pos, ...]."""
        if self.query_axis:
            x = x.transpose(1, 2)
        if self.iv.kind == "head":
            return x[:, :, self.iv.index]
        if self.iv.kind == "neuron":
            return x[..., self.iv.index]
        return x

    def _coef(self, v: torch.Tensor) -> torch.Tensor:
        """The value acted on: the target, or its coefficient along the direction."""
        return v if self.direction is None else v @ self.direction.to(device=v.device, dtype=v.dtype)

    def __call__(self, x: torch.Tensor, hook=None):
        if not isinstance(x, torch.Tensor):
            return None
        self.fired += 1
        start, n_prompt = self.state["start"], self.state["n_prompt"]
        y = x.clone()
        v = self._view(y)
        m = v.shape[1]
        if self.iv.op == "mean" and start == 0 and m >= n_prompt:
            self.mean = self._coef(v[:, :n_prompt]).mean(dim=1, keepdim=True)
        pos = self.iv.positions
        if pos is None:
            local = torch.arange(m, device=x.device)
        else:
            local = torch.tensor([p - start for p in pos if start <= p < start + m], dtype=torch.long,
                                 device=x.device)
            if local.numel() == 0:
                return None
        sel = v[:, local]
        c = self._coef(sel)
        op, val = self.iv.op, self.iv.value
        if op == "set":
            new = torch.full_like(c, val)
        elif op == "add":
            new = c + val
        elif op == "scale":
            new = c * val
        elif op == "mean":
            if self.mean is None:
                raise HexRayError(f"--intervene {self.iv.spec!r}: the mean needs a pass over the whole prompt")
            new = self.mean.to(c.dtype).expand_as(c)
        elif op == "add_vector":
            new = c + val * self.vector.to(device=c.device, dtype=c.dtype)
        else:  # patch
            src = self._view(self.source.to(device=x.device, dtype=x.dtype))
            new = self._coef(src[:, local + start])
        if self.direction is None:
            v[:, local] = new
        else:
            v[:, local] = sel + (new - c).unsqueeze(-1) * self.direction.to(device=sel.device, dtype=sel.dtype)
        return y


class Interventions:
    """Interventions bound to one model: hooks to add, metadata to record, per-run checks."""

    def __init__(self, acts: list, state: dict, raw: RawMeans | None = None):
        self.acts, self.state, self.raw = acts, state, raw

    def __bool__(self) -> bool:
        return bool(self.acts)

    def describe(self) -> list[dict]:
        return [a.describe() for a in self.acts]

    def check_run(self, n_prompt: int, n_total: int, generate: int = 0) -> None:
        """Positions inside the run; a patch trace's token count equal to the run's."""
        for a in self.acts:
            iv = a.iv
            if iv.positions is not None and iv.positions[-1] >= n_total:
                raise HexRayError(f"--intervene {iv.spec!r}: position {iv.positions[-1]} is past the run's "
                                  f"{n_total} tokens (positions count from 0)")
            if iv.op == "patch":
                if generate:
                    raise HexRayError(f"--intervene {iv.spec!r}: patching from a trace cannot be combined with "
                                      "--generate (the generated tokens are not in that trace)")
                n_src = a.source.shape[1]
                if n_src != n_prompt:
                    raise HexRayError(f"--intervene {iv.spec!r}: {iv.file} run {iv.run} has {n_src} tokens, this "
                                      f"prompt {n_prompt}: token counts must agree to patch")

    def reset(self) -> None:
        """Before a run: forget the previous run's means and call counts."""
        for a in self.acts:
            a.mean, a.fired = None, 0
            if isinstance(a, FeatureAct):
                a.act = None
        self.window(0, 0)

    def check_fired(self) -> None:
        for a in self.acts:
            if a.fired == 0:
                raise HexRayError(f"--intervene {a.iv.spec!r}: hook {a.hook} never fired in the forward pass, so "
                                  "the intervention could not be applied")

    def window(self, start: int, n_prompt: int) -> None:
        """The next forward pass covers positions start, start+1, ... of a run whose prompt has n_prompt tokens."""
        self.state["start"], self.state["n_prompt"] = int(start), int(n_prompt)

    @contextlib.contextmanager
    def applied(self, bridge):
        if not self.acts:
            yield
            return
        hooks = []
        for a in self.acts:
            hooks += a.hooks()
        # the raw-space tracker last: on a hook it shares with an edit (L0N5*20 on mlp.hook_post, L1H2=0 on
        # attn.hook_z) it must see the edited value, the one the residual stream gets. Its hooks (embed.hook_in,
        # hook_z, hook_post) are none a feature reads at, so every read still comes after what it needs.
        if self.raw is not None:
            hooks += self.raw.hooks()
        with bridge.hooks(fwd_hooks=hooks):
            yield


def bind(bridge, specs, base_dir: str | None = None, features=None) -> Interventions:
    """Parse (if needed) and check every spec against the bridge's model. ``features``: the dictionaries
    (``feature_weights.FeatureDictionary``) that ``L<l>F<f>`` specs name (``--dict``)."""
    ivs = parse_interventions(specs, base_dir)
    state = {"start": 0, "n_prompt": 0}
    if not ivs:
        return Interventions([], state)
    cfg = bridge.cfg
    n_layers, n_heads = int(cfg.n_layers), int(cfg.n_heads)
    d_mlp = int(getattr(cfg, "d_mlp", 0) or 0)
    canon = canonical_names(dict(bridge.hook_dict))
    acts = []
    tracker: list[RawMeans] = []

    def raw_means() -> RawMeans:
        if not tracker:
            tracker.append(RawMeans(bridge, state))
        return tracker[0]

    for iv in ivs:
        where = f"--intervene {iv.spec!r}"
        if iv.layer is not None and not 0 <= iv.layer < n_layers:
            raise HexRayError(f"{where}: layer {iv.layer} does not exist (the model has layers 0-{n_layers - 1})")
        if iv.kind == "feature":
            acts.append(bind_feature(bridge, iv, list(features or []), canon, state, raw_means))
            continue
        if iv.kind == "head" and not 0 <= iv.index < n_heads:
            raise HexRayError(f"{where}: head {iv.index} does not exist (layer {iv.layer} has heads 0-{n_heads - 1})")
        if iv.kind == "neuron" and not 0 <= iv.index < d_mlp:
            raise HexRayError(f"{where}: neuron {iv.index} does not exist (layer {iv.layer} has neurons "
                              f"0-{d_mlp - 1})")
        if iv.hook not in canon:
            raise HexRayError(f"{where}: the model has no hook {iv.hook!r} (hexray record --list-hooks lists them)")
        hook = canon[iv.hook]
        if hook.endswith("hook_resid_mid"):
            # Measured on TransformerLens 4.3's GPT-2 bridge: an edited resid_mid reaches only ln2's input, the
            # residual addition uses the unedited tensor, so the edit would be (almost) silently lost.
            raise HexRayError(f"{where}: an edit of {hook} does not reach the residual stream on TransformerLens "
                              "4.3's bridge; edit the attention output (L<l>.attn) or the next resid_pre instead")
        if hook == "hook_unembed":
            raise HexRayError(f"{where}: hook {hook!r} (the logits) cannot be intervened on")
        gated = getattr(bridge, "_gated_hook_reason", lambda _n: None)(hook)
        if gated is not None:  # TransformerLens#1688: such a hook silently never fires
            raise HexRayError(f"{where}: hook {hook!r} does not fire on this model as loaded ({gated})")
        act = _Act(iv, hook, state)
        width = _width(bridge, hook, iv) if iv.direction is not None or iv.op == "add_vector" else None
        if iv.direction is not None:
            u = _load_vector(iv.direction, "direction", iv.spec)
            if u.shape[0] != width:
                raise HexRayError(f"{where}: direction has {u.shape[0]} entries, the target {width}")
            norm = float(np.linalg.norm(u))
            if norm == 0:
                raise HexRayError(f"{where}: direction is the zero vector")
            act.direction = torch.tensor(u / norm, dtype=torch.float32)
        if iv.op == "add_vector":
            vec = _load_vector(iv.file, "vector", iv.spec)
            if vec.shape[0] != width:
                raise HexRayError(f"{where}: vector has {vec.shape[0]} entries, the target {width}")
            act.vector = torch.tensor(vec, dtype=torch.float32)
        if iv.op == "patch":
            act.source = _patch_source(iv, hook)
            if not act.query_axis:
                want = _probe_shape(bridge, hook)[2:]
                if tuple(act.source.shape[2:]) != want:
                    raise HexRayError(f"{where}: {iv.file} holds {hook} of shape {list(act.source.shape[1:])}, "
                                      f"this model's is [n, {', '.join(map(str, want))}]")
        acts.append(act)
    raw = tracker[0] if tracker else None
    readers = [a for a in acts if isinstance(a, FeatureAct) and "offset" in a.convert]  # raw-space reads
    for r in readers:
        for a in acts:
            if not isinstance(a, FeatureAct) and reaches(a.hook, r.fl.hook_in):
                # The tracker rebuilds the raw (uncentred) residual from the means of what each layer writes; an
                # edit of a whole write or of the residual itself has no defined raw-space mean (zeroing the
                # centred MLP output says nothing of its mean), so the feature would be read off by an unknown amount.
                raise HexRayError(f"--intervene {a.iv.spec!r}: it edits {a.hook}, before {r.iv.spec!r} reads "
                                  f"{r.fl.hook_in} in the uncentred space; their raw-space residual is not defined "
                                  "there: edit heads (L1H2) or neurons (L2N17) instead, or record separately")
    for a in acts:  # every centred feature write counts its removed mean where a raw-space read needs it
        if isinstance(a, FeatureAct):
            a.raw = raw
    return Interventions(acts, state, raw)


def _probe_shape(bridge, hook: str) -> tuple[int, ...]:
    """The shape of a hook's activation on a one-token input (one forward pass, only when needed)."""
    seen = {}

    def grab(x, hook=None):
        seen["shape"] = tuple(x.shape)

    device = next(bridge.parameters()).device
    with torch.no_grad(), bridge.hooks(fwd_hooks=[(hook, grab)]):
        bridge(torch.zeros((1, 1), dtype=torch.long, device=device), return_type=None)
    if "shape" not in seen:
        raise HexRayError(f"hook {hook!r} does not fire in a forward pass")
    return seen["shape"]


def _width(bridge, hook: str, iv: Intervention) -> int:
    """Entries of one position's target (what a direction or an added vector must match)."""
    if iv.kind == "head":
        return int(bridge.cfg.d_head)
    if iv.kind == "neuron":
        return 1
    return _probe_shape(bridge, hook)[-1]


def _patch_source(iv: Intervention, hook: str) -> torch.Tensor:
    where = f"--intervene {iv.spec!r}"
    if not os.path.isfile(iv.file):
        raise HexRayError(f"{where}: trace {iv.file} not found")
    with TraceReader(iv.file) as r:
        if not 0 <= iv.run < len(r.runs):
            raise HexRayError(f"{where}: {iv.file} has runs 0-{len(r.runs) - 1}, not run {iv.run}")
        name = r.runs[iv.run].get("aliases", {}).get(hook, hook)
        if not r.has(name, iv.run):
            raise HexRayError(f"{where}: {iv.file} did not record {hook} (record it with --hooks default,{hook})")
        arr = r.read(name, iv.run)
    return torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(0)
