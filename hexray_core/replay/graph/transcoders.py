"""Transcoders as the graph consumes them (numpy, SAELens orientation), and circuit-tracer's folder format.

Branch ``feat`` owns the general dictionary loaders (``hexray_core/replay/dictionary.py``); this module holds
the few fields a graph needs, with the same names, so either object can be handed to ``build_graph``.

Spaces. ``space="compat"``: the transcoder reads the trace's own activations (compatibility mode:
``ln2.hook_normalized`` is centre(x) / scale with the LayerNorm folded away) and writes into its
``hook_mlp_out``. ``space="raw"``: it was trained on the unprocessed model (circuit-tracer, SAELens with
``fold_ln=False``): it reads ``ln2.hook_normalized`` = centre(x) / scale · w + b with the norm's own weight and
bias (the kit's ``raw/ln2.w``, ``raw/ln2.b``), and its decoder writes raw vectors, whose mean over d_model a
LayerNorm downstream removes, so only their centred part has an effect.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from hexray_core.errors import HexRayError

#: The norm's output (weight and bias applied) as TransformerLens names it.
NORM_OUT_HOOKS = ("ln2.hook_out", "mlp.hook_in")
#: Input hooks a graph can rebuild exactly from a trace.
INPUT_HOOKS = ("ln2.hook_normalized", "hook_resid_mid", *NORM_OUT_HOOKS)


@dataclass
class Transcoder:
    """One layer's transcoder: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]`` (cross-layer:
    ``[d_sae, n_out_layers, d_out]``, writing into this layer and the next ``n_out_layers - 1``)."""

    W_enc: np.ndarray
    b_enc: np.ndarray
    W_dec: np.ndarray
    b_dec: np.ndarray
    threshold: np.ndarray | None = None
    W_skip: np.ndarray | None = None  # [d_out, d_in]: skip = input @ W_skip.T (circuit-tracer's orientation)
    hook_in: str = "ln2.hook_normalized"
    hook_out: str = "hook_mlp_out"
    apply_b_dec_to_input: bool = False
    relu_before_threshold: bool = False  # SAELens's JumpReLU: relu(pre) * (pre > t); circuit-tracer's: pre * (pre > t)

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def pre_acts(self, x: np.ndarray) -> np.ndarray:
        if self.apply_b_dec_to_input:
            x = x - self.b_dec if self.b_dec.ndim == 1 else x - self.b_dec[0]
        return x @ self.W_enc + self.b_enc

    def activation(self, pre: np.ndarray) -> np.ndarray:
        """ReLU, or JumpReLU where there is a threshold (as circuit-tracer: ``pre · [pre > threshold]``)."""
        if self.threshold is None:
            return np.maximum(pre, 0)
        keep = pre > self.threshold
        if self.relu_before_threshold:
            keep &= pre > 0
        return np.where(keep, pre, 0).astype(np.float32)


@dataclass
class TranscoderSet:
    layers: dict[int, Transcoder]
    kind: str = "transcoder"  # or "clt"
    space: str = "compat"  # or "raw"
    model_name: str | None = None
    source: str = "memory"

    def check(self, n_layers: int, d_model: int) -> None:
        """Shapes against the trace's model: one line naming what disagrees (transcoders for another model)."""
        if sorted(self.layers) != list(range(n_layers)):
            raise HexRayError(f"transcoders ({self.source}) cover layers {sorted(self.layers)} but the model has "
                              f"{n_layers}: they are for another model")
        if self.space not in ("compat", "raw"):
            raise HexRayError(f"transcoders ({self.source}): unknown space {self.space!r}")
        for layer, tc in self.layers.items():
            n_out = n_layers - layer if self.kind == "clt" else None
            want_dec = (tc.d_sae, n_out, d_model) if n_out else (tc.d_sae, d_model)
            if tc.W_enc.ndim != 2 or tc.W_enc.shape[0] != d_model or tc.W_dec.shape != want_dec \
                    or tc.b_enc.shape != (tc.d_sae,):
                raise HexRayError(f"transcoders ({self.source}) layer {layer}: W_enc {list(tc.W_enc.shape)}, W_dec "
                                  f"{list(tc.W_dec.shape)} do not fit a model with d_model {d_model} and {n_layers} "
                                  "layers: they are for another model")
            if not tc.hook_in.endswith(INPUT_HOOKS):
                raise HexRayError(f"transcoders ({self.source}) layer {layer} read {tc.hook_in}; a graph supports "
                                  f"{' or '.join(INPUT_HOOKS)}")
            if not tc.hook_out.endswith("hook_mlp_out"):
                raise HexRayError(f"transcoders ({self.source}) layer {layer} write {tc.hook_out}; a graph "
                                  "replaces MLPs: hook_mlp_out")
            if tc.W_skip is not None and tc.W_skip.shape != (d_model, d_model):
                raise HexRayError(f"transcoders ({self.source}) layer {layer}: W_skip {list(tc.W_skip.shape)} does "
                                  f"not fit d_model {d_model}")


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def load_circuit_tracer(path: str | os.PathLike, n_layers: int | None = None) -> TranscoderSet:
    """circuit-tracer's folder: ``config.yaml`` + ``layer_{i}.safetensors`` (``W_enc [d_tc, d_model]``, i.e.
    transposed relative to SAELens) or a cross-layer set (``W_enc_{i}.safetensors``, ``W_dec_{i}.safetensors``).
    circuit-tracer's transcoders are trained on the unprocessed model: ``space="raw"``."""
    import yaml
    from safetensors.numpy import load_file

    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise HexRayError(f"{path}: no config.yaml: not a circuit-tracer transcoder folder")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise HexRayError(f"{cfg_path}: cannot read: {e}") from None
    if not isinstance(cfg, dict):
        raise HexRayError(f"{cfg_path}: not a mapping")
    kind = cfg.get("model_kind", "transcoder_set")
    hook_in = str(cfg.get("feature_input_hook", "ln2.hook_normalized"))
    hook_out = str(cfg.get("feature_output_hook", "hook_mlp_out"))
    space = str(cfg.get("hexray_space", "raw"))
    layers: dict[int, Transcoder] = {}

    def load(name):
        p = os.path.join(path, name)
        try:
            return load_file(p)
        except (OSError, ValueError, Exception) as e:  # safetensors raises its own SafetensorError
            raise HexRayError(f"{p}: cannot read transcoder weights: {e}") from None

    i = 0
    while True:
        if kind == "cross_layer_transcoder":
            if not os.path.exists(os.path.join(path, f"W_enc_{i}.safetensors")):
                break
            enc, dec = load(f"W_enc_{i}.safetensors"), load(f"W_dec_{i}.safetensors")
            try:
                layers[i] = Transcoder(_f32(enc[f"W_enc_{i}"]).T.copy(), _f32(enc[f"b_enc_{i}"]),
                                       _f32(dec[f"W_dec_{i}"]), _f32(enc[f"b_dec_{i}"]),
                                       _f32(enc[f"threshold_{i}"]) if f"threshold_{i}" in enc else None,
                                       None, hook_in, hook_out)
            except KeyError as e:
                raise HexRayError(f"{path}: layer {i} lacks {e}") from None
        else:
            if not os.path.exists(os.path.join(path, f"layer_{i}.safetensors")):
                break
            t = load(f"layer_{i}.safetensors")
            try:
                thr = t.get("activation_function.threshold", t.get("threshold"))
                layers[i] = Transcoder(_f32(t["W_enc"]).T.copy(), _f32(t["b_enc"]), _f32(t["W_dec"]),
                                       _f32(t["b_dec"]), None if thr is None else _f32(thr),
                                       None if t.get("W_skip") is None else _f32(t["W_skip"]), hook_in, hook_out)
            except KeyError as e:
                raise HexRayError(f"{path}: layer_{i}.safetensors lacks {e}") from None
        i += 1
        if n_layers is not None and i > n_layers:
            break
    if not layers:
        raise HexRayError(f"{path}: no layer_0.safetensors / W_enc_0.safetensors")
    return TranscoderSet(layers, "clt" if kind == "cross_layer_transcoder" else "transcoder", space,
                         cfg.get("model_name"), path)


def save_circuit_tracer(tset: TranscoderSet, path: str | os.PathLike) -> None:
    """Write a set in circuit-tracer's folder format (what ``load_circuit_tracer`` reads; tests and benches)."""
    import yaml
    from safetensors.numpy import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    clt = tset.kind == "clt"
    any_tc = next(iter(tset.layers.values()))
    cfg = {"model_kind": "cross_layer_transcoder" if clt else "transcoder_set", "feature_input_hook": any_tc.hook_in,
           "feature_output_hook": any_tc.hook_out, "scan": tset.model_name or "hexray", "hexray_space": tset.space}
    if tset.model_name:
        cfg["model_name"] = tset.model_name
    if not clt:
        cfg["transcoders"] = [f"layer_{i}.safetensors" for i in sorted(tset.layers)]
    for i, tc in tset.layers.items():
        if clt:
            enc = {f"W_enc_{i}": tc.W_enc.T.copy(), f"b_enc_{i}": tc.b_enc, f"b_dec_{i}": tc.b_dec}
            if tc.threshold is not None:
                enc[f"threshold_{i}"] = tc.threshold
            save_file(enc, os.path.join(path, f"W_enc_{i}.safetensors"))
            save_file({f"W_dec_{i}": tc.W_dec}, os.path.join(path, f"W_dec_{i}.safetensors"))
        else:
            t = {"W_enc": tc.W_enc.T.copy(), "b_enc": tc.b_enc, "W_dec": tc.W_dec, "b_dec": tc.b_dec}
            if tc.threshold is not None:
                t["activation_function.threshold"] = tc.threshold
            save_file(t, os.path.join(path, f"layer_{i}.safetensors"))
    with open(os.path.join(path, "config.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f)


def random_transcoders(n_layers: int, d_model: int, d_sae: int, *, kind: str = "transcoder", seed: int = 0,
                       space: str = "compat", density: float = 0.05, hook_in: str = "ln2.hook_normalized",
                       skip: bool = False) -> TranscoderSet:
    """Random transcoders (tests, benches): encoder biases set so that roughly ``density`` of the features fire
    on unit-scale inputs, and a positive JumpReLU threshold on half the layers."""
    rng = np.random.default_rng(seed)
    layers = {}
    for i in range(n_layers):
        w_enc = rng.standard_normal((d_model, d_sae)).astype(np.float32) / np.sqrt(d_model)
        b_enc = np.full(d_sae, -1.6 * (0.05 / max(density, 1e-3)) ** 0.25, np.float32)
        shape = (d_sae, n_layers - i, d_model) if kind == "clt" else (d_sae, d_model)
        w_dec = rng.standard_normal(shape).astype(np.float32) / np.sqrt(d_sae * density + 1)
        b_dec = (0.1 * rng.standard_normal(d_model)).astype(np.float32)
        thr = np.full(d_sae, 0.05, np.float32) if i % 2 else None
        w_skip = (0.1 * rng.standard_normal((d_model, d_model)) / np.sqrt(d_model)).astype(np.float32) if skip else None
        layers[i] = Transcoder(w_enc, b_enc, w_dec, b_dec, thr, w_skip, hook_in)
    return TranscoderSet(layers, kind, space)


def as_transcoder_set(obj, n_layers: int | None = None) -> TranscoderSet:
    """A ``TranscoderSet`` from one, from a ``hexray_core.replay.dictionary.DictionarySet`` (features branch: SAELens
    transcoders, circuit-tracer sets, Gemma Scope...), or from a path (circuit-tracer's folder, else
    ``load_dictionary``). What a graph cannot linearise exactly (TopK, gated, normalised inputs) is one line."""
    if isinstance(obj, TranscoderSet):
        return obj
    if isinstance(obj, str | os.PathLike):
        if os.path.isfile(os.path.join(os.fspath(obj), "config.yaml")):
            return load_circuit_tracer(obj, n_layers)
        from hexray_core.replay.dictionary import load_dictionary

        obj = load_dictionary(obj)
    if getattr(obj, "kind", None) not in ("transcoder", "clt"):
        raise HexRayError(f"{getattr(obj, 'path', obj)}: an attribution graph needs transcoders (per-layer or "
                          f"cross-layer), not {getattr(obj, 'kind', type(obj).__name__)}")
    space = obj.space
    layers = {}
    for layer, d in obj.layers.items():
        arch = str(d.architecture)
        if d.k is not None or d.b_gate is not None or d.normalize_activations != "none" or "topk" in arch:
            raise HexRayError(f"{obj.path}: layer {layer} is a {arch} dictionary (normalize_activations "
                              f"{d.normalize_activations}); an attribution graph supports ReLU and JumpReLU "
                              "transcoders")
        layers[layer] = Transcoder(d.W_enc, d.b_enc, d.W_dec, d.b_dec, d.threshold,
                                   None if d.W_skip is None else np.ascontiguousarray(d.W_skip.T), d.hook_in,
                                   d.hook_out, d.apply_b_dec_to_input, d.relu_before_threshold)
    # "raw" applies the norm's weight and bias to a norm-output input, "compat" does not: the flags must agree
    reads_norm_out = any(t.hook_in.endswith(NORM_OUT_HOOKS) for t in layers.values())
    if reads_norm_out and space.fold_ln != space.center_writing_weights:
        raise HexRayError(f"{obj.path}: transcoders reading the norm's output of a model processed with {space} are "
                          "not supported by graphs")
    return TranscoderSet(layers, obj.kind, "compat" if space.center_writing_weights else "raw", None, str(obj.path))
