"""Features of a recorded run: a dictionary's input rebuilt in its own activation space, encoded, and explained.

**Spaces.** A HexRay trace is recorded in TransformerLens compatibility mode: LayerNorm folded into the next
layer and, for LayerNorm models, every writing weight centred, so the recorded residual stream is the raw one
minus its mean over d_model at each position. Dictionaries were trained elsewhere (``Dictionary.space``):

    hook                                   TL 3 fold_ln=True            TL 3 fold_ln=False (circuit-tracer, HF)
    hook_resid_pre/mid/post, hook_mlp_in   raw (or centred if the dictionary's model was centred)
    hook_attn_out, hook_mlp_out            raw (or centred)
    lnX.hook_normalized                    (x - mean) / scale (RMS: x / scale), before any weight or bias
    lnX.hook_out, mlp.hook_in              (x - mean) / scale           LN: that * w + b; RMS: x / scale * w

(RMSNorm models are never centred: their residual is recorded raw.) The raw residual before layer L is the
recorded one plus, at each position, the sum of the means centring removed from everything written before L:
``W_E.mean[token] + W_pos.mean[pos] + sum_l (z[l] . W_O.mean[l] + b_O.mean[l] + post[l] . W_out.mean[l] +
b_out.mean[l])``, from the kit's ``raw/`` tensors. What cannot be rebuilt is refused in one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from hexray_core.errors import HexRayError
from hexray_core.stream_order import reaches

from .dictionary import Dictionary, DictionarySet, load_dictionary
from .missing import MissingHook

_HOOK = re.compile(r"blocks\.(\d+)\.(.+)")
_RESID = {"hook_resid_pre": "pre", "hook_resid_mid": "mid", "hook_mlp_in": "mid", "hook_resid_post": "post"}
_WRITES = {"hook_attn_out": "attn", "attn.hook_out": "attn", "hook_mlp_out": "mlp", "mlp.hook_out": "mlp"}
_NORMED = re.compile(r"(ln[12])\.hook_normalized")
_NORM_OUT = {"ln1.hook_out": "ln1", "ln2.hook_out": "ln2", "mlp.hook_in": "ln2", "attn.hook_in": "ln1"}


def trace_centred(trace) -> bool:
    """Whether the trace's residual stream is centred (a LayerNorm model processed with center_writing_weights)."""
    proc = trace.meta.get("model", {}).get("processing") or {}
    return bool(trace.uses_layernorm and proc.get("center_writing_weights", True))


def _raw(trace, name: str, why: str) -> np.ndarray:
    kit = trace.require_kit(why)
    if not kit.has("raw/" + name):
        raise HexRayError(f"{why} needs raw/{name} from the model kit ({kit.source}), which this kit lacks: it was "
                          "made before HexRay kept what compatibility mode removes, or from a model handed over "
                          "already processed; record again with this HexRay (a new kit is built)")
    return np.asarray(kit["raw/" + name], dtype=np.float32)


def _tensor(run, name: str, why: str) -> np.ndarray:
    if not run.trace.has(name, run.id):
        raise MissingHook(run.trace, run.id, name, why)
    return run.trace.tensor(name, run.id)


def layer_means(run, layer: int, kind: str, why: str) -> np.ndarray:
    """[n]: the mean over d_model that centring removed from one layer's write ("attn" or "mlp")."""
    trace = run.trace

    def build():
        if kind == "attn":
            z = _tensor(run, f"blocks.{layer}.attn.hook_z", why)  # [n, H, d_head], value biases folded out
            return np.einsum("nhd,hd->n", z, _raw(trace, "W_O.mean", why)[layer]) + _raw(trace, "b_O.mean", why)[layer]
        post = _tensor(run, f"blocks.{layer}.mlp.hook_post", why)
        return post @ _raw(trace, "W_out.mean", why)[layer] + _raw(trace, "b_out.mean", why)[layer]

    return run.memo(("feature_means", layer, kind), build)


def _check_no_residual_edit(trace, hook: str, why: str) -> None:
    """The raw residual is rebuilt from the means of what each layer wrote (from hook_z / hook_post): a recording
    that edited a whole write or the stream before ``hook`` (``--intervene L0.mlp=0``, a transcoder feature's write,
    whose removed mean went unrecorded) has no defined raw-space value there."""
    for iv in trace.meta.get("interventions") or []:
        edit = iv.get("hook") if isinstance(iv, dict) else None
        if isinstance(edit, str) and reaches(edit, hook):
            raise HexRayError(f"{why}: the trace was recorded with --intervene {str(iv.get('spec'))[:80]!r} (an edit "
                              f"of {edit[:80]}), so the uncentred residual this dictionary reads is not defined for "
                              "it; use a dictionary of the centred space, or a recording without that edit")


def check_defined(trace, d: Dictionary) -> None:
    """Refuse in one line a dictionary whose input this trace cannot give exactly (see ``activations``)."""
    m = _HOOK.fullmatch(d.hook_in or "")
    if m and (m.group(2) in _RESID or m.group(2) in _WRITES) and trace_centred(trace) \
            and not d.space.center_writing_weights:
        _check_no_residual_edit(trace, d.hook_in, f"the dictionary at {d.hook_in}")


def resid_offset(run, layer: int, where: str, why: str) -> np.ndarray:
    """[n]: raw minus recorded residual at ``blocks.layer.hook_resid_{where}`` (a multiple of the ones vector)."""
    trace = run.trace

    def build():
        off = _raw(trace, "W_E.mean", why)[np.asarray(run.tokens, dtype=np.int64)]
        if trace.has("hook_pos_embed", run.id):
            w_pos = _raw(trace, "W_pos.mean", why)
            if run.n_tokens > w_pos.shape[0]:
                raise HexRayError(f"{why}: run {run.id} is longer than the kit's W_pos.mean")
            off = off + w_pos[: run.n_tokens]
        return off

    off = run.memo(("feature_offset0",), build)
    last = layer + (where == "post")
    for lay in range(last):
        off = off + layer_means(run, lay, "attn", why) + layer_means(run, lay, "mlp", why)
    if where == "mid":
        off = off + layer_means(run, layer, "attn", why)
    return off.astype(np.float32)


def _resid(run, layer: int, where: str, why: str) -> np.ndarray:
    """The recorded residual at blocks.layer.hook_resid_{where}, summed from recorded writes when not stored."""
    trace = run.trace
    names = {"pre": f"blocks.{layer}.hook_resid_pre", "mid": f"blocks.{layer}.hook_resid_mid",
             "post": f"blocks.{layer}.hook_resid_post"}
    if trace.has(names[where], run.id):
        return trace.tensor(names[where], run.id)
    if where == "mid":
        return _resid(run, layer, "pre", why) + _tensor(run, f"blocks.{layer}.hook_attn_out", why)
    if where == "post" and layer + 1 < trace.n_layers and trace.has(f"blocks.{layer + 1}.hook_resid_pre", run.id):
        return trace.tensor(f"blocks.{layer + 1}.hook_resid_pre", run.id)
    return _tensor(run, names[where], why)


def _normalized(run, layer: int, ln: str, why: str) -> np.ndarray:
    """(x - mean) / scale (LayerNorm) or x / scale (RMSNorm): what the trace's folded norm outputs."""
    trace = run.trace
    name = f"blocks.{layer}.{ln}.hook_normalized"
    if trace.has(name, run.id):
        return trace.tensor(name, run.id)
    x = _resid(run, layer, "pre" if ln == "ln1" else "mid", why)
    if trace.uses_layernorm:
        x = x - x.mean(-1, keepdims=True)
    return x / _tensor(run, f"blocks.{layer}.{ln}.hook_scale", why)


_REBUILT = ("blocks.L.hook_resid_pre/mid/post, hook_attn_out, hook_mlp_out, attn.hook_z, lnX.hook_normalized, "
            "ln2.hook_out, mlp.hook_in")


def trace_folds_value_biases(trace) -> bool:
    return bool((trace.meta.get("model", {}).get("processing") or {}).get("fold_value_biases", True))


def _value_bias_folded(run, layer: int, fold_ln: bool, fold_value_biases: bool, why: str):
    """[n_heads, d_head] (or 0): what processing with these flags subtracts from hook_z.

    fold_value_biases moves each head's value bias into b_O (a pattern row sums to one), and with fold_ln that
    bias already holds ln1's bias through W_V. Centring changes no value."""
    if not fold_value_biases:
        return 0
    out = _raw(run.trace, "b_V", why)[layer]
    if fold_ln and run.trace.uses_layernorm:
        out = out + _raw(run.trace, "ln1.b.W_V", why)[layer]
    return out


def _hook_z(run, layer: int, space, why: str) -> np.ndarray:
    """[n, n_heads * d_head]: the heads' outputs before W_O, concatenated (a hook_z dictionary's input)."""
    z = np.asarray(_tensor(run, f"blocks.{layer}.attn.hook_z", why), dtype=np.float32)
    proc = run.trace.meta.get("model", {}).get("processing") or {}
    trace_flags = (bool(proc.get("fold_ln", True)), trace_folds_value_biases(run.trace))
    dict_flags = (space.fold_ln, space.fold_value_biases)
    if trace_flags != dict_flags:
        z = z + _value_bias_folded(run, layer, *trace_flags, why) - _value_bias_folded(run, layer, *dict_flags, why)
    return z.reshape(z.shape[0], -1)


def activations(run, hook: str, space, why: str | None = None) -> np.ndarray:
    """[n, d]: the activations at TransformerLens hook ``hook`` of a model processed as ``space`` says (d_model
    wide, or n_heads * d_head for ``attn.hook_z``)."""
    why = why or f"reading {hook}"
    trace = run.trace
    m = _HOOK.fullmatch(hook or "")
    if m is None:
        raise HexRayError(f"{why}: hook {hook!r} is not one HexRay can rebuild (it reads {_REBUILT})")
    layer, rest = int(m.group(1)), m.group(2)
    if layer >= trace.n_layers:
        raise HexRayError(f"{why}: hook {hook!r} names layer {layer}, but {trace.model_name} has {trace.n_layers} "
                          "layers (a dictionary for another model?)")
    if rest == "attn.hook_z":
        return _hook_z(run, layer, space, why)
    shift = trace_centred(trace) and not space.center_writing_weights
    unshift = not trace_centred(trace) and space.center_writing_weights and trace.uses_layernorm
    if rest in _RESID or rest in _WRITES:
        if shift:
            _check_no_residual_edit(trace, hook, why)
        if rest in _RESID:
            where = _RESID[rest]
            x = _resid(run, layer, where, why)
            off = resid_offset(run, layer, where, why) if shift else None
        else:
            kind = _WRITES[rest]
            x = _tensor(run, f"blocks.{layer}.hook_{kind}_out", why)
            off = layer_means(run, layer, kind, why) if shift else None
        if off is not None:
            return (x + off[:, None]).astype(np.float32)
        if unshift:
            return (x - x.mean(-1, keepdims=True)).astype(np.float32)
        return np.asarray(x, dtype=np.float32)
    nm = _NORMED.fullmatch(rest)
    ln = nm.group(1) if nm else _NORM_OUT.get(rest)
    if ln is None:
        raise HexRayError(f"{why}: hook {hook!r} is not one HexRay can rebuild (it reads {_REBUILT})")
    x = np.asarray(_normalized(run, layer, ln, why), dtype=np.float32)
    if space.fold_ln or nm:
        return x  # TL 3's norms fire hook_normalized before their weight and bias; LNPre / RMSPre have none
    if trace.uses_layernorm:
        return x * _raw(trace, f"{ln}.w", why)[layer] + _raw(trace, f"{ln}.b", why)[layer]
    return x * _raw(trace, f"{ln}.w", why)[layer]


def reads_hook_z(d: Dictionary) -> bool:
    return d.hook_in.endswith("attn.hook_z")


def _check_model(run, d: Dictionary, why: str) -> None:
    cfg = run.trace.config
    if reads_hook_z(d):
        width, what = int(cfg.get("n_heads") or 0) * int(cfg.get("d_head") or 0), "n_heads x d_head"
    else:
        width, what = int(cfg.get("d_model") or 0), "d_model"
    if width and d.d_in != width:
        raise HexRayError(f"{why}: the dictionary reads {d.d_in}-dimensional activations, but {run.trace.model_name} "
                          f"has {what} {width} (a dictionary for another model?)")
    if not run.trace.uses_layernorm and str(run.trace.config.get("normalization_type", "")).upper() not in ("RMS",):
        raise HexRayError(f"{why}: {run.trace.model_name}'s normalisation "
                          f"({run.trace.config.get('normalization_type')}) is neither LayerNorm nor RMSNorm")


def dictionary_input(run, dictionary: Dictionary) -> np.ndarray:
    """[n, d_in]: what ``dictionary`` reads at every position of ``run``, in the dictionary's own space."""
    why = f"the dictionary at {dictionary.hook_in}"
    _check_model(run, dictionary, why)
    if dictionary.space is None:
        raise HexRayError(f"{why}: the dictionary does not say which model processing it was trained under")
    return activations(run, dictionary.hook_in, dictionary.space, why)


def dictionary_target(run, dictionary: Dictionary, out_layer: int | None = None) -> np.ndarray:
    """[n, d_out]: what the dictionary reconstructs (its output hook), in its own space."""
    hook = dictionary.hook_out
    if out_layer is not None and out_layer != dictionary.layer:
        hook = re.sub(r"^blocks\.\d+\.", f"blocks.{out_layer}.", hook)
    return activations(run, hook, dictionary.space, f"the dictionary's output {hook}")


@dataclass
class Features:
    """Sparse feature activations of one run at one layer: row p holds ``indices[indptr[p]:indptr[p+1]]`` (int32)
    and ``values`` at those positions, strongest first; ``dense()`` is ``[n, d_sae]`` (SAELens's ``encode``)."""

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    d_sae: int
    layer: int
    source: str  # "computed" or "stored"

    @classmethod
    def from_dense(cls, acts: np.ndarray, layer: int, source: str = "computed") -> Features:
        indptr, indices, values = [0], [], []
        for row in acts:
            nz = np.flatnonzero(row)
            order = nz[np.argsort(-row[nz], kind="stable")]
            indices.append(order.astype(np.int32))
            values.append(row[order].astype(np.float32))
            indptr.append(indptr[-1] + len(order))
        return cls(np.asarray(indptr, dtype=np.int64), np.concatenate(indices) if indices else np.zeros(0, np.int32),
                   np.concatenate(values) if values else np.zeros(0, np.float32), int(acts.shape[-1]), layer, source)

    @property
    def n(self) -> int:
        return len(self.indptr) - 1

    def at(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """(feature ids, activations) at one position, strongest first."""
        a, b = int(self.indptr[position]), int(self.indptr[position + 1])
        return self.indices[a:b], self.values[a:b]

    def l0(self) -> np.ndarray:
        return np.diff(self.indptr)

    def dense(self) -> np.ndarray:
        out = np.zeros((self.n, self.d_sae), dtype=np.float32)
        rows = np.repeat(np.arange(self.n), np.diff(self.indptr))
        out[rows, self.indices] = self.values
        return out


STORED = "hexray.features"  # run tensors hexray.features.{slot}.L{layer}.indptr|indices|values


def stored_slot(trace, dset: DictionarySet) -> int | None:
    """Which of the trace's stored feature sets (meta["features"]) was made by this dictionary, if any."""
    entries = trace.meta.get("features")
    if not isinstance(entries, list):
        return None
    for slot, e in enumerate(entries):
        if isinstance(e, dict) and e.get("fingerprint") == dset.fingerprint:
            return slot
    return None


def run_features(run, dictionary, layer: int | None = None) -> Features:
    """The run's features at ``layer`` (stored by ``hexray record --dict`` when the trace has them, else computed)."""
    dset = dictionary if isinstance(dictionary, DictionarySet) else load_dictionary(dictionary)
    if layer is None:
        layer = max(dset.layers)
    layer = layer + run.trace.n_layers if layer < 0 else layer
    d = dset[layer]

    def build():
        slot = stored_slot(run.trace, dset)
        if slot is not None:
            base = f"{STORED}.{slot}.L{layer}"
            if run.trace.has(base + ".indptr", run.id):
                return _read_stored(run, base, d, layer)
        return Features.from_dense(d.encode(dictionary_input(run, d)), layer)

    return run.memo(("features", dset.fingerprint, layer), build)


def features_at(run, dictionary: DictionarySet, layer: int, position: int) -> tuple[np.ndarray, np.ndarray]:
    """(feature ids, activations) at one position, strongest first: stored, already computed, or encoded for that
    row only (a cold `hexray features` encodes one row, not the run)."""
    key = ("features", dictionary.fingerprint, layer)
    if key in run._memo or stored_slot(run.trace, dictionary) is not None:
        return run_features(run, dictionary, layer).at(position)
    d = dictionary[layer]
    row = d.encode(dictionary_input(run, d)[position:position + 1])
    return Features.from_dense(row, layer).at(0)


def _read_stored(run, base: str, d: Dictionary, layer: int) -> Features:
    t = run.trace
    indptr = np.asarray(t.tensor(base + ".indptr", run.id)).astype(np.int64)
    indices = np.asarray(t.tensor(base + ".indices", run.id)).astype(np.int32)
    values = np.asarray(t.tensor(base + ".values", run.id), dtype=np.float32)
    n = run.n_tokens
    ok = (indptr.shape == (n + 1,) and indptr[0] == 0 and np.all(np.diff(indptr) >= 0) and indptr[-1] == len(indices)
          == len(values) and (len(indices) == 0 or (indices.min() >= 0 and indices.max() < d.d_sae)))
    if not ok:
        raise HexRayError(f"{t.path}: stored features {base} are malformed (offsets, lengths or feature ids out of "
                          "range)")
    return Features(indptr, indices, values, d.d_sae, layer, "stored")


def sparse_arrays(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr int32 [n + 1], indices int32, values) of dense feature activations, strongest first per row."""
    f = Features.from_dense(acts, 0)
    return f.indptr.astype(np.int32), f.indices, f.values


def feature_logits(trace, d: Dictionary, features, k: int = 5) -> list[tuple[list, list]]:
    """Per feature, (top, bottom) logits of its decoder direction through the unembedding: [(id, text, value)].

    A cross-layer feature's direction is the sum of what it writes into every layer (all of it reaches the
    residual stream). The final LayerNorm centres whatever is written, so LayerNorm models centre the direction."""
    features = [int(f) for f in features]
    if not features:
        return []
    w = d.W_dec[features]
    if w.ndim == 3:
        w = w.sum(1)
    if reads_hook_z(d) and trace.config.get("post_norms", "Gemma" in str(trace.meta.get("model", {}).get("class"))):
        # a norm after attention (its weight is not in the kit) turns W_O's output before the residual: no exact
        # direction to rank logits by (traces before the flag: Gemma classes are taken to have one)
        return [([], []) for _ in features]
    if reads_hook_z(d) and d.hook_out == d.hook_in:  # a direction of the heads' outputs reaches the residual via W_O
        kit = trace.require_kit("top logits of an attention-output feature")
        w_o = np.asarray(kit["W_O"], dtype=np.float32)[d.layer]  # [n_heads, d_head, d_model]
        if w.shape[-1] != w_o.shape[0] * w_o.shape[1]:
            return [([], []) for _ in features]
        w = np.einsum("fhd,hdm->fm", w.reshape(len(features), w_o.shape[0], w_o.shape[1]), w_o)
    if w.shape[-1] != int(trace.config.get("d_model") or w.shape[-1]):
        return [([], []) for _ in features]
    if trace.uses_layernorm:
        w = w - w.mean(-1, keepdims=True)
    kit = trace.require_kit("top logits of a feature")
    logits = w @ np.asarray(kit["W_U"], dtype=np.float32)  # [features, d_vocab]
    k = min(k, logits.shape[-1])
    out = []
    for row in logits:
        top = np.argpartition(-row, k - 1)[:k]
        top = top[np.argsort(-row[top], kind="stable")]
        bot = np.argpartition(row, k - 1)[:k]
        bot = bot[np.argsort(row[bot], kind="stable")]
        out.append(([[int(i), trace.token_str(int(i)), float(row[i])] for i in top],
                    [[int(i), trace.token_str(int(i)), float(row[i])] for i in bot]))
    return out


def reconstruction_error(run, dset: DictionarySet, layer: int, position: int) -> float:
    """|| what the dictionary reconstructs - its reconstruction || at one position, in the dictionary's space."""
    d = dset[layer]
    target = dictionary_target(run, d)[position]
    if d.cross_layer:
        recon = d.b_dec.astype(np.float64)
        for i in sorted(dset.layers):
            if i > layer:
                break
            idx, val = run_features(run, dset, i).at(position)
            recon = recon + val @ dset.layers[i].W_dec[idx, layer - i]
    else:
        x = dictionary_input(run, d)[position]
        recon = d.forward(x[None])[0]
    return float(np.linalg.norm(target - recon))


class _ArrayKit:
    def __init__(self, arrays: dict):
        self.arrays, self.source = arrays, "the model being recorded"

    def has(self, name: str) -> bool:
        return name in self.arrays

    def __getitem__(self, name: str) -> np.ndarray:
        return np.asarray(self.arrays[name], dtype=np.float32)


class _ArrayTrace:
    """What ``activations`` reads from a trace, over arrays in memory (the recorder's live activations)."""

    def __init__(self, arrays: dict, meta: dict, kit: dict, path: str):
        self.arrays, self.meta, self.path = arrays, meta, path
        self.config = dict(meta.get("model", {}).get("config", {}))
        self.n_layers = int(self.config.get("n_layers", 0))
        self.uses_layernorm = str(self.config.get("normalization_type", "LN")).upper().startswith("LN")
        self.model_name = str(meta.get("model", {}).get("name", "the model"))
        self._kit = _ArrayKit(kit)

    def has(self, name: str, run: int = 0) -> bool:
        return name in self.arrays

    def tensor(self, name: str, run: int = 0) -> np.ndarray:
        return self.arrays[name]

    def require_kit(self, what: str):
        return self._kit


class ArrayRun:
    """A run held in memory (float32 arrays by hook name, batch removed): ``dictionary_input`` works on it as on
    a recorded run. ``kit``: name -> float32 array (the kit's raw/ tensors)."""

    def __init__(self, arrays: dict, tokens: list[int], meta: dict, kit: dict, path: str = "<recording>"):
        self.trace = _ArrayTrace(arrays, meta, kit, path)
        self.id, self.tokens, self.n_tokens = 0, list(tokens), len(tokens)
        self._memo: dict = {}

    def memo(self, key, build):
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]


def needed_hooks(n_layers: int, upto: int) -> tuple[str, ...]:
    """Every hook ``activations`` may read for dictionaries up to layer ``upto``."""
    names = ["hook_embed", "hook_pos_embed"]
    for layer in range(min(n_layers, upto + 2)):
        names += [f"blocks.{layer}.{h}" for h in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post",
                                                   "hook_attn_out", "hook_mlp_out", "attn.hook_z", "mlp.hook_post",
                                                   "ln1.hook_scale", "ln2.hook_scale")]
    return tuple(names)


def stored_tensors(run, dsets: list[DictionarySet], skip=frozenset()) -> dict[str, tuple[np.ndarray, str]]:
    """The sparse features ``hexray record --dict`` stores for one run: name -> (array, "act" | "raw"), but for the
    (slot, layer) pairs in ``skip``."""
    out = {}
    for slot, dset in enumerate(dsets):
        for layer, d in sorted(dset.layers.items()):
            if (slot, layer) in skip:
                continue
            f = Features.from_dense(d.encode(dictionary_input(run, d)), layer)
            base = f"{STORED}.{slot}.L{layer}"
            out[base + ".indptr"] = (f.indptr.astype(np.int64), "raw")
            out[base + ".indices"] = (f.indices.astype(np.int32), "raw")
            out[base + ".values"] = (f.values.astype(np.float32), "act")
    return out


def stored_meta(dsets: list[DictionarySet]) -> dict:
    return {"features": [{"fingerprint": d.fingerprint, "name": d.name, "path": str(d.path), "kind": d.kind,
                          "layers": sorted(d.layers), "space": str(d.space)} for d in dsets]}
