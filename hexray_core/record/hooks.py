"""Which hooks a recording captures, and under which names.

TransformerLens 4's bridge exposes each hook point under several names (``blocks.0.hook_in`` and
``blocks.0.hook_resid_pre`` are one hook point). A recording names every tensor by its
*canonical legacy name*: among the names of one hook point, the HookedTransformer-style one
(``hook_resid_pre`` over ``hook_in``, ``hook_attn_out`` over ``attn.hook_out``, ``hook_z`` over
``o.hook_in``).

A hook spec is a comma-separated list of terms:

    default   the set in docs/ARCHITECTURE.md ("What a recording contains"); always exact
    full      every hook point that fires, each distinct tensor once (see capture.py), except the
              logits (``hook_unembed``: the run stores top-k and next-token logits instead), token
              ids, and gated hooks TransformerLens leaves off by default
    NAME      one hook, by any of its names (``blocks.3.hook_resid_pre``); gated hooks such as
              ``blocks.0.attn.hook_result`` are switched on for the recording
    GLOB      shell-style pattern over all names (``blocks.*.attn.hook_q``, ``*ln1*``)

Terms combine: ``default,blocks.*.attn.hook_q``. Names from ``default`` and explicit NAMEs are
always written under their own name; names reached only through ``full`` or a GLOB are written
once per distinct tensor (an alias map in the run says which names share a tensor).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from hexray_core.errors import HexRayError

DEFAULT_HOOKS: tuple[str, ...] = (
    "hook_embed",
    "hook_pos_embed",
    "blocks.*.hook_resid_pre",
    "blocks.*.hook_attn_out",
    "blocks.*.hook_mlp_out",
    "blocks.*.hook_resid_post",
    "blocks.*.attn.hook_z",
    "blocks.*.attn.hook_v",
    "blocks.*.mlp.hook_post",
    "blocks.*.ln1.hook_scale",
    "blocks.*.ln2.hook_scale",
    "ln_final.hook_scale",
)

#: Attention in the default set: the query and key vectors the attention uses (``attention.py``), or the
#: patterns themselves for a model whose attention HexRay cannot recompute.
PATTERN_HOOKS = ("blocks.*.attn.hook_pattern",)

#: Never part of ``full`` or a glob: the logits (``[n, d_vocab]``; recorded as top-k instead).
LOGIT_HOOKS = frozenset({"hook_unembed"})

_GLOB_CHARS = set("*?[")


def is_glob(term: str) -> bool:
    return bool(_GLOB_CHARS & set(term))


def _name_rank(name: str) -> tuple:
    """Sort key: the best (most HookedTransformer-like) name of a hook point comes first."""
    parts = name.split(".")
    generic = parts[-1] in ("hook_in", "hook_out")
    depth = len(parts) - (2 if parts[0] == "blocks" and len(parts) > 2 and parts[1].isdigit() else 0)
    return (generic, depth, len(name), name)


def canonical_names(hook_dict: dict) -> dict[str, str]:
    """Map every hook name to the canonical legacy name of its hook point."""
    groups: dict[int, list[str]] = {}
    for name, hp in hook_dict.items():
        groups.setdefault(id(hp), []).append(name)
    out: dict[str, str] = {}
    for names in groups.values():
        best = min(names, key=_name_rank)
        for n in names:
            out[n] = best
    return out


def _layer_key(name: str) -> tuple:
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
        return (1, int(parts[1]), name)
    return (0 if not name.startswith("ln_final") else 2, 0, name)


@dataclass
class HookPlan:
    """The resolved hook selection for one model."""

    label: str  # "default" | "full" | "custom"
    requested: list[str]  # the terms as the user gave them
    names: list[str]  # canonical names to hook, in model order
    protected: set[str] = field(default_factory=set)  # always written under their own name
    gated: dict[str, str] = field(default_factory=dict)  # canonical name -> bridge flag to switch on
    canon: dict[str, str] = field(default_factory=dict)  # any hook name -> canonical name

    def wants(self, name: str) -> bool:
        return self.canon.get(name, name) in self._set

    def __post_init__(self):
        self._set = set(self.names)


def parse_spec(spec: str | list[str] | tuple[str, ...] | None) -> list[str]:
    if spec is None:
        return ["default"]
    terms = spec.split(",") if isinstance(spec, str) else list(spec)
    terms = [t.strip() for t in terms if t and t.strip()]
    if not terms:
        raise HexRayError("--hooks is empty: give 'default', 'full', or hook names/globs separated by commas")
    return terms


def default_attention_hooks(attention: dict | None) -> tuple[str, ...]:
    """The attention globs of ``default``: q and k when replay can recompute patterns, else the patterns."""
    if attention is None:
        return PATTERN_HOOKS
    return tuple(attention[w].replace("{layer}", "*") for w in ("q", "k"))


def plan_hooks(bridge, spec=None, attention: dict | None = None) -> HookPlan:
    """Resolve a hook spec against a bridge's hook points. Unknown names are a HexRayError.

    ``attention``: the model's ``attention_spec`` (q/k recomputation), or None to store patterns.
    """
    terms = parse_spec(spec)
    hook_dict = dict(bridge.hook_dict)
    canon = canonical_names(hook_dict)
    all_names = sorted(hook_dict)
    gated_reason = getattr(bridge, "_gated_hook_reason", lambda n: None)

    def reason(name: str) -> str | None:
        hp = hook_dict[name]
        return gated_reason(getattr(hp, "name", None) or name)

    chosen: dict[str, None] = {}
    protected: set[str] = set()
    gated: dict[str, str] = {}

    def add_patterns(patterns, *, protect: bool, strict: bool):
        for pat in patterns:
            hits = [n for n in all_names if fnmatch.fnmatchcase(n, pat)]
            if not hits and strict:
                raise HexRayError(f"--hooks: {pat!r} matches no hook of this model "
                                  "(list them with: hexray record --list-hooks --model ...)")
            for n in hits:
                c = canon[n]
                if reason(n) is not None or c in LOGIT_HOOKS:
                    continue
                chosen[c] = None
                if protect:
                    protected.add(c)

    for term in terms:
        if term == "default":
            add_patterns(DEFAULT_HOOKS + default_attention_hooks(attention), protect=True, strict=False)
        elif term == "full":
            add_patterns(["*"], protect=False, strict=False)
        elif is_glob(term):
            add_patterns([term], protect=False, strict=True)
        else:
            if term not in hook_dict:
                raise HexRayError(f"--hooks: no hook named {term!r} on this model "
                                  "(list them with: hexray record --list-hooks --model ...)")
            c = canon[term]
            r = reason(term)
            if r is not None:
                gated[c] = r
            chosen[c] = None
            protected.add(c)
    if "full" in terms:
        add_patterns(DEFAULT_HOOKS + default_attention_hooks(attention), protect=True, strict=False)  # ⊇ default
    label = "default" if terms == ["default"] else "full" if terms == ["full"] else "custom"
    names = sorted(chosen, key=_layer_key)
    return HookPlan(label=label, requested=terms, names=names, protected=protected, gated=gated, canon=canon)


def list_hooks(bridge) -> list[tuple[str, list[str]]]:
    """(canonical name, its other names) for every hook point, in model order."""
    canon = canonical_names(dict(bridge.hook_dict))
    groups: dict[str, list[str]] = {}
    for name, c in canon.items():
        groups.setdefault(c, [])
        if name != c:
            groups[c].append(name)
    return [(c, sorted(groups[c])) for c in sorted(groups, key=_layer_key)]
