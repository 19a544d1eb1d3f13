"""TransformerLens's ``ActivationCache`` methods on a recorded run, with no model (numpy only).

TransformerLens 4.3's cache methods call the live model (``cache.model``: W_U, W_O, W_out, biases,
``cfg``, ``ln_final``). Here the recording and its model kit stand in for it: every method keeps
TransformerLens's name, arguments, return shape and labels, for a cache of
``run_with_cache(..., remove_batch_dim=True)`` of a model in compatibility mode (the recorder's),
where every norm's gain and bias are folded into the next weights, so "apply the final norm" is
"centre (LayerNorm) and divide by the recomputed scale".

`CacheMethods` is mixed into `Run` (``run.decompose_resid(...)``); `ModelMethods` into `Trace`,
for the few model calls a notebook makes next to its cache (``model.cfg``, ``model.W_U``,
``model.to_single_token``, ``model.tokens_to_residual_directions``), so that code written against
``(model, cache)`` runs on ``(trace, run)``. The math is attribution.py's primitives; results come
back as numpy arrays, or torch tensors when the trace was opened with ``framework="pt"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from types import SimpleNamespace

import numpy as np

from hexray_core.errors import HexRayError

from . import attribution as prim
from .missing import MissingHook

_NORMS = ("LN", "LNPre", "RMS", "RMSPre")


# -- TransformerLens's shorthand and slices ------------------------------------------------------------


def get_act_name(name: str, layer: int | str | None = None, layer_type: str | None = None) -> str:
    """TransformerLens's ``utils.get_act_name``: shorthand to a hook name.

    ``("resid_post", 3)`` -> ``blocks.3.hook_resid_post``; ``("pattern", 0)`` -> ``blocks.0.attn.hook_pattern``;
    ``("scale", 4, "ln1")`` -> ``blocks.4.ln1.hook_scale``; ``"k6"`` -> ``blocks.6.attn.hook_k``;
    ``"scale"`` -> ``ln_final.hook_scale``; a full name stays itself.
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    match = re.match(r"([a-z]+)(\d+)([a-z]?.*)", name)
    if match is not None:
        name, layer, layer_type = match.groups(0)
    layer_type_alias = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}
    act_name_alias = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
                      "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post"}
    name = act_name_alias.get(name, name)
    full = f"blocks.{layer}." if layer is not None else ""
    if name in ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores"):
        layer_type = "attn"
    elif name in ("pre", "post", "mid", "pre_linear"):
        layer_type = "mlp"
    elif layer_type in layer_type_alias:
        layer_type = layer_type_alias[layer_type]
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full


class Slice:
    """TransformerLens's ``utils.Slice`` over numpy: None keeps an axis, an int indexes it (dropping it),
    a tuple is ``slice(*t)``, a list/array/tensor picks those indices. A TransformerLens ``Slice`` is accepted."""

    def __init__(self, value=None):
        if isinstance(value, Slice):
            self.slice, self.mode = value.slice, value.mode
            return
        if hasattr(value, "mode") and hasattr(value, "slice"):  # transformer_lens.utils.Slice
            value = value.slice if value.mode != "identity" else None
        if _is_int(value):
            self.slice, self.mode = int(value), "int"
        elif isinstance(value, tuple):
            self.slice, self.mode = slice(*value), "slice"
        elif isinstance(value, slice):
            self.slice, self.mode = value, "slice"
        elif value is None:
            self.slice, self.mode = slice(None), "identity"
        elif isinstance(value, list | np.ndarray) or hasattr(value, "numpy"):
            self.slice, self.mode = _np(value).astype(np.int64), "array"
        else:
            raise HexRayError(f"pos_slice= must be None, an int, a tuple, a slice or a list of positions, "
                              f"not {value!r}")

    def apply(self, arr: np.ndarray, dim: int = 0) -> np.ndarray:
        index = [slice(None)] * arr.ndim
        index[dim] = self.slice
        return arr[tuple(index)]

    @classmethod
    def unwrap(cls, value) -> Slice:
        """As TransformerLens: an int becomes [int], so the axis is kept."""
        if not isinstance(value, Slice) and _is_int(value):
            value = [int(value)]
        return cls(value)


def _is_int(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | np.integer):
        return True
    return getattr(value, "ndim", None) == 0 and "int" in str(getattr(value, "dtype", ""))


def _np(x) -> np.ndarray:
    """numpy view of an array-like (a torch tensor included, without importing torch)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if "bfloat16" in str(x.dtype):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


# -- the model stand-in ------------------------------------------------------------------------------


class ModelMethods:
    """What a notebook asks of the model beside its cache, answered from the trace and its kit."""

    @cached_property
    def cfg(self) -> SimpleNamespace:
        """The model's config (TransformerLens field names: n_layers, d_model, n_heads, d_head, d_mlp, ...)."""
        c = dict(self.config)
        c.setdefault("n_layers", self.n_layers)
        # sizes the config lacks, as the tensors showed them (validate.py bound them at open)
        for name, (value, _source) in getattr(getattr(self, "contract", None), "sizes", {}).items():
            if name in ("d_model", "n_heads", "d_head", "d_mlp", "d_vocab"):
                c.setdefault(name, value)
        c.setdefault("normalization_type", "LN")
        c.setdefault("attn_only", False)
        c.setdefault("model_name", self.model_name)
        return SimpleNamespace(**c)

    def _weight(self, name: str):
        kit = self.require_kit(f"model.{name}")
        if not kit.has(name):
            why = {"W_pos": "this model has no learned positions (its positional embedding is "
                            f"{self.cfg.__dict__.get('positional_embedding_type', 'not learned')})",
                   "W_gate": "this model's MLP is not gated"}.get(name)
            if why is None or (name == "W_gate" and self.cfg.__dict__.get("gated_mlp")) or \
                    (name == "W_pos" and self.cfg.__dict__.get("positional_embedding_type") == "standard"):
                why = f"its model kit ({kit.source}) lacks it: a kit from an older HexRay; record again to rebuild it"
            raise HexRayError(f"model.{name} is not available: {why}")
        return self.output(kit[name])

    # As the compatibility-mode model has them (TransformerLens's names and shapes; the final norm and ln1/ln2
    # folded into W_U, W_Q/W_K/W_V and W_in, writing weights centred); GQA keys and values per kv head.
    W_U = property(lambda self: self._weight("W_U"), doc="[d_model, d_vocab] unembedding (final norm folded in)")
    b_U = property(lambda self: self._weight("b_U"), doc="[d_vocab]")
    W_E = property(lambda self: self._weight("W_E"), doc="[d_vocab, d_model] token embedding")
    W_pos = property(lambda self: self._weight("W_pos"), doc="[n_ctx, d_model] learned positions (absent: rotary)")
    W_Q = property(lambda self: self._weight("W_Q"), doc="[n_layers, n_heads, d_model, d_head]")
    b_Q = property(lambda self: self._weight("b_Q"), doc="[n_layers, n_heads, d_head]")
    W_K = property(lambda self: self._weight("W_K"), doc="[n_layers, n_kv_heads, d_model, d_head]")
    b_K = property(lambda self: self._weight("b_K"), doc="[n_layers, n_kv_heads, d_head]")
    W_V = property(lambda self: self._weight("W_V"), doc="[n_layers, n_kv_heads, d_model, d_head]")
    b_V = property(lambda self: self._weight("b_V"), doc="[n_layers, n_kv_heads, d_head]")
    W_O = property(lambda self: self._weight("W_O"), doc="[n_layers, n_heads, d_head, d_model]")
    b_O = property(lambda self: self._weight("b_O"), doc="[n_layers, d_model]")
    W_in = property(lambda self: self._weight("W_in"), doc="[n_layers, d_model, d_mlp]")
    b_in = property(lambda self: self._weight("b_in"), doc="[n_layers, d_mlp]")
    W_gate = property(lambda self: self._weight("W_gate"), doc="[n_layers, d_model, d_mlp] (gated MLPs only)")
    W_out = property(lambda self: self._weight("W_out"), doc="[n_layers, d_mlp, d_model]")
    b_out = property(lambda self: self._weight("b_out"), doc="[n_layers, d_model]")

    def to_single_token(self, string: str) -> int:
        """The id of the token whose text is exactly ``string`` (an error if it is not one token)."""
        return self.token_id(string, literal=True)

    def tokens_to_residual_directions(self, tokens, run: int | None = None):
        """W_U columns of tokens (a text, an id, or an array of ids): [d_model], or [*tokens.shape, d_model]."""
        ids = _token_ids(self, tokens, run)
        return self.output(prim.unembed_columns(self, ids, run)[0])


def _token_ids(trace, tokens, run: int | None) -> np.ndarray:
    if isinstance(tokens, str):
        return np.asarray(trace.token_id(tokens, run or 0, literal=True))
    if _is_int(tokens):
        return np.asarray(int(tokens))
    ids = _np(tokens)
    if ids.dtype.kind not in "iu":
        raise HexRayError(f"tokens= must be a token's text, an id or an array of ids, not {ids.dtype} values")
    return ids.reshape(()) if ids.size == 1 else ids


@dataclass
class LogitReadout:
    """As TransformerLens's ``LogitReadout``: ``values`` [layers, *pos, selected], ``entropy`` [layers, *pos]."""

    values: object
    return_type: str
    entropy: object
    top_ids: object = None
    vocab_ids: object = None
    target_ids: object = None
    target_ranks: object = None
    per_row_targets: bool = False
    applied_ln: bool = True


@dataclass
class LogitLensResult:
    """As TransformerLens's ``LogitLensResult``: the readout and the stack labels ("0_pre", ..., "final_post")."""

    readout: LogitReadout
    labels: list[str]
    has_batch_dim: bool
    target_names: list | None = None

    @property
    def values(self):
        return self.readout.values

    def rank_trajectory(self, target: str | int | None = None):
        """The full-vocabulary rank of one target at every stack entry."""
        ids, ranks = self.readout.target_ids, self.readout.target_ranks
        if ids is None:
            raise HexRayError("rank_trajectory needs a lens run with targets=")
        ids = [int(i) for i in ids]
        if target is None:
            if len(ids) != 1:
                raise HexRayError("pass target= when more than one target was requested")
            return ranks[..., 0]
        if isinstance(target, str):
            if target not in (self.target_names or []):
                raise HexRayError(f"unknown target {target!r}: pass it as it was given to targets=, or its id")
            return ranks[..., self.target_names.index(target)]
        if int(target) not in ids:
            raise HexRayError(f"token id {target} was not among the requested targets")
        return ranks[..., ids.index(int(target))]


# -- the cache methods -------------------------------------------------------------------------------


class CacheMethods:
    """TransformerLens ``ActivationCache`` methods for a `Run` (``self.trace``, ``self.array(key)``)."""

    @property
    def has_embed(self) -> bool:
        return "hook_embed" in self

    @property
    def has_pos_embed(self) -> bool:
        return "hook_pos_embed" in self

    @property
    def model(self):
        """The trace, standing in for the model (``cache.model.cfg.n_layers`` works)."""
        return self.trace

    def _n_layers(self) -> int:
        return self.trace.n_layers

    def _layer(self, layer) -> int:
        return self._n_layers() if layer is None or layer == -1 else int(layer)

    def _out(self, arr):
        return self.trace.output(arr)

    def _get(self, key, why: str = "") -> np.ndarray:
        try:
            return self.array(key)
        except MissingHook as e:
            if not why:
                raise
            raise MissingHook(self.trace, self.id, self.resolve(key), why) from e

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None):
        """``activation_name`` of every layer before ``layer``, stacked: [layers, ...]."""
        return self._out(np.stack([self._get((activation_name, layer_, sublayer_type))
                                   for layer_ in range(self._layer(layer))]))

    # residual stream ------------------------------------------------------------------------------

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice=None, incl_embeds: bool = True, return_labels: bool = False):
        """The residual stream entering ``layer`` as its components: embed, pos_embed, then each layer's
        attn_out and mlp_out ([components, *pos, d_model]; labels "embed", "pos_embed", "0_attn_out", ...)."""
        if mode not in ("all", "mlp", "attn"):
            raise HexRayError(f"mode= must be 'all', 'mlp' or 'attn', not {mode!r}")
        sl = Slice(pos_slice)
        layer = self._layer(layer)
        incl_attn, incl_mlp = mode != "mlp", mode != "attn" and not self.trace.cfg.attn_only
        names, labels = [], []
        if incl_embeds:
            if self.has_embed:
                names.append("hook_embed")
                labels.append("embed")
            if self.has_pos_embed:
                names.append("hook_pos_embed")
                labels.append("pos_embed")
        for i in range(layer):
            if incl_attn:
                names.append(("attn_out", i))
                labels.append(f"{i}_attn_out")
            if incl_mlp:
                names.append(("mlp_out", i))
                labels.append(f"{i}_mlp_out")
        if mlp_input and incl_attn:
            names.append(("attn_out", layer))
            labels.append(f"{layer}_attn_out")
        stack = np.stack([sl.apply(self._get(n, "decompose_resid"), -2) for n in names])
        if apply_ln:
            stack = self._apply_ln(stack, layer, mlp_input, sl)
        return (self._out(stack), labels) if return_labels else self._out(stack)

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice=None, mlp_input: bool = False, return_labels: bool = False):
        """The residual stream entering each layer up to ``layer`` (and the final stream): labels "0_pre",
        "0_mid" (incl_mid), ..., "final_post". ``apply_ln`` at the final layer normalises each entry with its
        own statistics (the logit lens); before it, with the layer's recorded scale."""
        sl = Slice(pos_slice)
        layer = self._layer(layer)
        n_layers = self._n_layers()
        parts, labels = [], []
        for i in range(layer + 1):
            if i == n_layers:
                parts.append(self._get(("resid_post", n_layers - 1), "accumulated_resid"))
                labels.append("final_post")
                continue
            parts.append(self._get(("resid_pre", i), "accumulated_resid"))
            labels.append(f"{i}_pre")
            if (incl_mid and i < layer) or (mlp_input and i == layer):
                parts.append(self._get(("resid_mid", i), "accumulated_resid(incl_mid=True)"))
                labels.append(f"{i}_mid")
        stack = np.stack([sl.apply(p, -2) for p in parts])
        if apply_ln:
            stack = self._apply_ln(stack, layer, mlp_input, sl, recompute_ln=layer == n_layers)
        return (self._out(stack), labels) if return_labels else self._out(stack)

    def apply_ln_to_stack(self, residual_stack, layer: int | None = None, mlp_input: bool = False, pos_slice=None,
                          batch_slice=None, has_batch_dim: bool = True, recompute_ln: bool = False):
        """Treat each entry of a stack as the input to ``layer``'s norm (``None``/-1: the final norm) and apply
        it with the recorded scale (``recompute_ln`` at the final layer: each entry's own statistics).
        ``pos_slice`` is the slice already applied to the stack's positions."""
        stack = _np(residual_stack)
        if has_batch_dim and batch_slice is not None:
            stack = Slice(batch_slice).apply(stack, 1)
        return self._out(self._apply_ln(stack, self._layer(layer), mlp_input, Slice(pos_slice),
                                        recompute_ln=recompute_ln))

    def _apply_ln(self, stack: np.ndarray, layer: int, mlp_input: bool, sl: Slice, *,
                  recompute_ln: bool = False) -> np.ndarray:
        cfg = self.trace.cfg
        if cfg.normalization_type not in _NORMS:
            return stack
        final = layer == self._n_layers()
        centre = cfg.normalization_type in ("LN", "LNPre") and not (final and getattr(cfg, "final_rms", False))
        stack = stack.astype(np.float32, copy=False)
        if centre:
            stack = stack - stack.mean(-1, keepdims=True)
        if recompute_ln and final:  # the final norm as the model applies it, its gain and bias folded away
            return stack / np.sqrt((stack * stack).mean(-1, keepdims=True) + self.trace.eps)
        if final:
            key = "ln_final.hook_scale"
        else:
            key = f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
        scale = sl.apply(self._get(key, "applying the norm's recorded scale (apply_ln)"), -2)
        return stack / scale

    # heads and neurons ----------------------------------------------------------------------------

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice=None, apply_ln: bool = False):
        """What every head before ``layer`` writes, [layer * n_heads, *pos, d_model], labels "L0H0", ...
        (``attn.hook_result`` when recorded, else ``attn.hook_z`` @ W_O from the model kit)."""
        sl = Slice(pos_slice)
        layer = self._layer(layer)
        n_heads = int(self.trace.cfg.n_heads)
        labels = [f"L{i}H{h}" for i in range(layer) for h in range(n_heads)]
        parts = []
        for i in range(layer):
            self._get(("z", i, "attn") if not self.trace.has(f"blocks.{i}.attn.hook_result", self.id)
                      else ("result", i, "attn"), "stack_head_results")
            parts.append(prim.head_results(self.trace, self.id, i, sl.slice))  # [*pos, heads, d]
        if parts:
            stack = np.moveaxis(np.concatenate(parts, axis=-2), -2, 0)
            if incl_remainder:
                rest = sl.apply(self._get(("resid_post", layer - 1)), -2) - stack.sum(0)
                stack = np.concatenate([stack, rest[None]])
                labels.append("remainder")
        elif incl_remainder:
            stack = sl.apply(self._get(("resid_post", layer - 1)), -2)[None]
            labels.append("remainder")
        else:
            stack = np.zeros((0, *sl.apply(self._get("hook_embed"), -2).shape), dtype=np.float32)
        if apply_ln:
            stack = self._apply_ln(stack, layer, False, sl)
        return (self._out(stack), labels) if return_labels else self._out(stack)

    def compute_head_results(self) -> None:
        """Make ``run["result", L]`` available for every layer (computed from z and W_O, kept with the run)."""
        for i in range(self._n_layers()):
            name = f"blocks.{i}.attn.hook_result"
            if not self.trace.has(name, self.id):
                self._get(("z", i, "attn"), "compute_head_results")
                self._derived_results()[name] = prim.head_results(self.trace, self.id, i)
        for view in ("_names", "_name_set"):  # the new names are keys now, as in TransformerLens
            self.__dict__.pop(view, None)

    def _derived_results(self) -> dict:
        return self.memo("computed", dict)

    def get_neuron_results(self, layer: int, neuron_slice=None, pos_slice=None, project_output_onto=None):
        """What each neuron of ``layer`` writes, [*pos, neurons, d_model] (or projected on ``project_output_onto``)."""
        self._get(("post", layer, "mlp"), "get_neuron_results")
        project = None if project_output_onto is None else _np(project_output_onto).astype(np.float32)
        return self._out(self._neurons(layer, Slice(neuron_slice), Slice(pos_slice), project))

    def _neurons(self, layer: int, neurons: Slice, sl: Slice, project) -> np.ndarray:
        return prim.neuron_results(self.trace, self.id, layer, sl.slice, neurons.slice, project)

    def stack_neuron_results(self, layer: int, pos_slice=None, neuron_slice=None, return_labels: bool = False,
                             incl_remainder: bool = False, apply_ln: bool = False, project_output_onto=None,
                             mlp_input: bool = False):
        """What every MLP neuron before ``layer`` writes, [layer * d_mlp, *pos, d_model], labels "L0N0", ..."""
        layer = self._layer(layer)
        if incl_remainder and layer < 0:
            raise HexRayError(f"layer= must be >= 0 with incl_remainder=True (-1/None mean n_layers); got {layer}")
        neurons = Slice.unwrap(neuron_slice)
        if neurons.mode == "int":
            neurons = Slice([neurons.slice])
        sl = Slice(pos_slice)
        project = None if project_output_onto is None else _np(project_output_onto).astype(np.float32)
        project_2d = None if project is None else (project[:, None] if project.ndim == 1 else project)
        d_mlp = int(self.trace.cfg.d_mlp)
        labels = [f"L{i}N{n}" for i in range(layer) for n in neurons.apply(np.arange(d_mlp))]
        target = ("resid_mid", layer) if mlp_input else ("resid_post", layer - 1)
        for i in range(layer):
            self._get(("post", i, "mlp"), "stack_neuron_results")
        if apply_ln and project_2d is not None:  # fold the norm into the projection: no [.., d_mlp, d_model]
            stack = self._neurons_ln_projected(layer, sl, neurons, project_2d, mlp_input)
            if incl_remainder:
                whole = self._apply_ln(sl.apply(self._get(target), -2)[None], layer, mlp_input, sl)[0] @ project_2d
                stack = np.concatenate([stack, (whole - stack.sum(0) if len(stack) else whole)[None]])
                labels.append("remainder")
        else:
            parts = [self._neurons(i, neurons, sl, project_2d) for i in range(layer)]
            if parts:
                stack = np.moveaxis(np.concatenate(parts, axis=-2), -2, 0)
            if incl_remainder:
                whole = sl.apply(self._get(target), -2)
                if project_2d is not None:
                    whole = whole @ project_2d
                stack = np.concatenate([stack, (whole - stack.sum(0))[None]]) if parts else whole[None]
                labels.append("remainder")
            elif not parts:
                shape = sl.apply(self._get("hook_embed"), -2).shape
                if project_2d is not None:
                    shape = (*shape[:-1], project_2d.shape[-1])
                stack = np.zeros((0, *shape), dtype=np.float32)
            if apply_ln:
                stack = self._apply_ln(stack, layer, mlp_input, sl)
        if project is not None and project.ndim == 1:
            stack = stack[..., 0]
        return (self._out(stack), labels) if return_labels else self._out(stack)

    def _neurons_ln_projected(self, layer: int, sl: Slice, neurons: Slice, project_2d: np.ndarray,
                              mlp_input: bool) -> np.ndarray:
        """LN_s(a_n W_out_n) @ p = (a_n / s) (W_out_n @ p - mean(W_out_n) sum(p)); RMS drops the mean term."""
        cfg = self.trace.cfg
        final = layer == self._n_layers()
        key = "ln_final.hook_scale" if final else f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
        scale = sl.apply(self._get(key, "apply_ln"), -2)
        centre = cfg.normalization_type in ("LN", "LNPre") and not (final and getattr(cfg, "final_rms", False))
        W_out = self.trace.require_kit("per-neuron results (W_out)")["W_out"]
        parts = []
        for i in range(layer):
            w = neurons.apply(W_out[i], 0)
            lin = w @ project_2d
            if centre:
                lin = lin - w.mean(-1)[:, None] * project_2d.sum(0)[None, :]
            a = neurons.apply(sl.apply(self._get(("post", i, "mlp")), -2), -1)
            parts.append((a / scale)[..., None] * lin)
        if not parts:
            shape = sl.apply(self._get("hook_embed"), -2).shape[:-1]
            return np.zeros((0, *shape, project_2d.shape[-1]), dtype=np.float32)
        return np.moveaxis(np.concatenate(parts, axis=-2), -2, 0)

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> np.ndarray:
        """The attention and MLP output biases written before ``layer`` (the model's ``accumulated_bias``)."""
        total = np.zeros(int(self.trace.cfg.d_model), dtype=np.float32)
        for i in range(layer):
            total = total + prim.attention_bias(self.trace, i)
            if include_mlp_biases:
                total = total + prim.mlp_bias(self.trace, i)
        if mlp_input:
            total = total + prim.attention_bias(self.trace, layer)
        return total

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False, pos_slice=None,
                                     return_labels: bool = False, project_output_onto=None):
        """Every head, every neuron (or MLP layer), embed, pos_embed and the summed biases, in that order."""
        layer = self._layer(layer)
        sl = Slice(pos_slice)
        project = None if project_output_onto is None else _np(project_output_onto).astype(np.float32)
        project_2d = None if project is None else (project[:, None] if project.ndim == 1 else project)
        folded = apply_ln and project_2d is not None

        def ln_then_project(stack):
            stack = self._apply_ln(stack, layer, mlp_input, sl)
            return stack @ project_2d if project_2d is not None else stack

        def finish(stack):
            if folded:
                return ln_then_project(stack)
            return stack @ project_2d if project_2d is not None else stack

        heads, labels = self.stack_head_results(layer + (1 if mlp_input else 0), pos_slice=sl, return_labels=True)
        heads = _np(heads)
        parts = [finish(heads)]
        if not self.trace.cfg.attn_only and layer > 0:
            if expand_neurons:
                neurons, nl = self.stack_neuron_results(layer, pos_slice=sl, return_labels=True, apply_ln=folded,
                                                        project_output_onto=project_2d, mlp_input=mlp_input)
                parts.append(_np(neurons))
            else:
                mlps, nl = self.decompose_resid(layer, mlp_input=mlp_input, pos_slice=sl, incl_embeds=False,
                                                mode="mlp", return_labels=True)
                parts.append(finish(_np(mlps)))
            labels = labels + nl
        for key, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
            if key in self:
                parts.append(finish(sl.apply(self._get(key), -2)[None]))
                labels.append(label)
        bias = self.accumulated_bias(layer, mlp_input, include_mlp_biases=expand_neurons)
        if folded:
            parts.append(ln_then_project(np.broadcast_to(bias, (1, *heads.shape[1:-1], bias.shape[0]))))
        else:
            if project_2d is not None:
                bias = bias @ project_2d
            parts.append(np.broadcast_to(bias, (1, *parts[0].shape[1:])))
        labels.append("bias")
        stack = np.concatenate(parts)
        if apply_ln and not folded:
            stack = self._apply_ln(stack, layer, mlp_input, sl)
        if project is not None and project.ndim == 1:
            stack = stack[..., 0]
        return (self._out(stack), labels) if return_labels else self._out(stack)

    # logits ---------------------------------------------------------------------------------------

    def tokens_to_residual_directions(self, tokens):
        """W_U columns of tokens (text, id, or array of ids), from this run's table or the kit."""
        return self.trace.tokens_to_residual_directions(tokens, run=self.id)

    def logit_attrs(self, residual_stack, tokens, incorrect_tokens=None, pos_slice=None, batch_slice=None,
                    has_batch_dim: bool = True):
        """Each stack entry's direct contribution to the logit of ``tokens`` (minus ``incorrect_tokens``):
        the entry through the final norm's recorded scale, dotted with the tokens' W_U columns."""
        ids = _token_ids(self.trace, tokens, self.id)
        directions = prim.unembed_columns(self.trace, ids, self.id)[0]
        if incorrect_tokens is not None:
            wrong = _token_ids(self.trace, incorrect_tokens, self.id)
            if wrong.shape != ids.shape:
                raise HexRayError(f"tokens= and incorrect_tokens= must have the same shape "
                                  f"(tokens.shape={ids.shape}, incorrect_tokens.shape={wrong.shape})")
            directions = directions - prim.unembed_columns(self.trace, wrong, self.id)[0]
        stack = _np(residual_stack)
        bs = Slice(batch_slice)
        if has_batch_dim:
            stack = bs.apply(stack, 1)
        scaled = self._apply_ln(stack, self._n_layers(), False, Slice(pos_slice))
        if (has_batch_dim and bs.mode != "int" and scaled.ndim == 4 and directions.ndim == 2
                and directions.shape[0] == scaled.shape[1]):
            directions = directions[:, None, :]
        return self._out((scaled * directions).sum(-1))

    def logit_lens(self, *, layers=None, incl_mid: bool = False, positions=-1, apply_ln: bool = True, vocab=None,
                   targets=None, return_type: str = "logits", top_k: int | None = None) -> LogitLensResult:
        """TransformerLens's ``cache.logit_lens``: the accumulated residual through the final norm (recomputed
        statistics), W_U and b_U. One of ``targets`` (shared tokens: texts or ids), ``top_k`` or ``vocab``
        picks the trailing axis; ``entropy`` and ``target_ranks`` (0 = the argmax) are over the whole vocabulary.
        Needs the model kit (the full W_U). HexRay's own lens table is ``trace.logit_lens(position, run)``."""
        if return_type not in ("logits", "log_probs", "probs"):
            raise HexRayError(f"return_type= must be 'logits', 'log_probs' or 'probs', not {return_type!r}")
        if sum(x is not None for x in (vocab, targets, top_k)) > 1:
            raise HexRayError("pass at most one of vocab=, targets= and top_k=")
        sl = Slice(positions)
        stack, labels = self.accumulated_resid(incl_mid=incl_mid, pos_slice=sl, return_labels=True)
        stack = _np(stack)
        keep = list(range(len(labels))) if layers is None else [i % len(labels) for i in layers]
        stack, labels = stack[keep], [labels[i] for i in keep]
        if apply_ln:
            stack = self._apply_ln(stack, self._n_layers(), False, sl, recompute_ln=True)
        kit = self.trace.require_kit("the logit lens (the full W_U)")
        logits = stack.astype(np.float32) @ kit["W_U"] + kit["b_U"]  # [layers, *pos, vocab]
        peak = logits.max(-1, keepdims=True)
        log_probs = logits - (np.log(np.exp(logits - peak).sum(-1, keepdims=True)) + peak)
        entropy = -(np.exp(log_probs) * log_probs).sum(-1)
        quantity = {"logits": logits, "log_probs": log_probs, "probs": np.exp(log_probs)}[return_type]
        readout = LogitReadout(quantity, return_type, entropy)
        if targets is not None:
            single = isinstance(targets, str) or _is_int(targets)
            names = [targets] if single else list(targets)
            ids = np.asarray([_token_ids(self.trace, t, self.id) for t in names], dtype=np.int64).reshape(-1)
            readout.target_ids = ids
            readout.target_ranks = (logits[..., None, :] > logits[..., ids][..., None]).sum(-1)
            readout.values = quantity[..., ids]
            target_names = [t if isinstance(t, str) else None for t in names]
        else:
            target_names = None
            if top_k is not None:
                top = np.argsort(-logits, axis=-1, kind="stable")[..., :int(top_k)]
                readout.top_ids, readout.values = top, np.take_along_axis(quantity, top, -1)
            elif vocab is not None:
                readout.vocab_ids = _np(vocab).astype(np.int64)
                readout.values = quantity[..., readout.vocab_ids]
        for field in ("values", "entropy", "top_ids", "vocab_ids", "target_ids", "target_ranks"):
            value = getattr(readout, field)
            if value is not None:
                setattr(readout, field, self._out(np.ascontiguousarray(value)))
        return LogitLensResult(readout, labels, False, target_names)

    # TransformerLens itself -----------------------------------------------------------------------

    def to_activation_cache(self, model):
        """A real ``transformer_lens.ActivationCache`` of this run (no batch dim) on ``model``, for everything
        else TransformerLens does with a cache. Needs torch and TransformerLens."""
        try:
            import torch
            from transformer_lens import ActivationCache
        except ImportError:
            raise HexRayError("to_activation_cache needs torch and transformer-lens "
                              "(pip install 'hexray[record]')") from None
        tensors = {name: torch.from_numpy(np.array(self.array(name))) for name in self}
        return ActivationCache(tensors, model, has_batch_dim=False)
