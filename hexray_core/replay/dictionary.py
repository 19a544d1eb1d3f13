"""Dictionaries of features (sparse autoencoders, transcoders, cross-layer transcoders) read from disk, numpy only.

Formats (``load_dictionary(path)``; a folder or a file):

    SAELens folder        cfg.json + sae_weights.safetensors; architectures standard, gated, topk, jumprelu,
                          transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder; pre-6.0
                          keys (hook_point, activation_fn topk); a folder of such folders is one set (per layer)
    circuit-tracer        config.yaml + layer_i.safetensors (W_enc [d_sae, d_in], activation_function.threshold,
                          W_skip [d_out, d_in]); cross-layer: W_enc_i.safetensors + W_dec_i.safetensors
    Gemma Scope           params.npz (W_enc, W_dec, b_enc, b_dec, threshold); the hook from the path (layer_N, res/mlp)
    Gemma Scope 2         params.safetensors (w_enc, w_dec, b_enc, b_dec, threshold, affine_skip_connection)
    Llama Scope           hyperparams.json + checkpoints/final.safetensors (encoder.weight, decoder.weight, ...)
    hub references        sae-lens:RELEASE/SAE_ID, hf://owner/repo/path (downloaded where the hub is reachable)
    embedded              hexray-demo-sae, hexray-demo-transcoders (for the embedded model hexray-demo)

Every array is float32 in SAELens orientation: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]`` (cross-layer:
``[d_sae, n_out_layers, d_out]``, output layers ``layer, layer + 1, ...``), ``W_skip [d_in, d_out]`` (skip = x @
W_skip). ``space`` says which model processing the dictionary was trained under (TransformerLens 3's
``fold_ln`` / ``center_writing_weights``): ``features.dictionary_input`` rebuilds that space from a trace.
Every file is untrusted: sizes are checked against the file before anything is allocated, non-finite weights
and shapes that disagree are one ``HexRayError``.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from dataclasses import dataclass, field

import numpy as np

from hexray_core.errors import HexRayError, json_problem

EMBEDDED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
EMBEDDED_NAMES = ("hexray-demo-sae", "hexray-demo-transcoders")  # shipped with HexRay, for hexray-demo
MAX_CONFIG_BYTES = 1 << 20
MAX_ELEMENTS = 1 << 33  # per dictionary set: 32 GiB of float32, far beyond any published set's layer
_LAYER_RE = re.compile(r"blocks\.(\d+)\.")


@dataclass
class Space:
    """The activation space a dictionary reads: TransformerLens 3 processing flags of the model it was trained on."""

    fold_ln: bool
    center_writing_weights: bool
    source: str  # where the flags came from
    # Only attention-output (hook_z) dictionaries see it: fold_value_biases moves each head's value bias out of
    # hook_z (into b_O), as TransformerLens's from_pretrained does by default; an unprocessed model keeps it.
    fold_value_biases: bool = False

    def __str__(self) -> str:
        vb = ", fold_value_biases=True" if self.fold_value_biases else ""
        return f"fold_ln={self.fold_ln}, center_writing_weights={self.center_writing_weights}{vb}: {self.source}"


@dataclass
class Dictionary:
    """One layer's dictionary: ``encode(x) -> f``, ``decode(f) -> x_hat`` (without the skip term), ``skip(x)``."""

    W_enc: np.ndarray
    b_enc: np.ndarray
    W_dec: np.ndarray
    b_dec: np.ndarray
    hook_in: str
    hook_out: str
    architecture: str
    layer: int
    threshold: np.ndarray | None = None
    W_skip: np.ndarray | None = None
    apply_b_dec_to_input: bool = False
    normalize_activations: str = "none"  # applied at run time: none | layer_norm | constant_norm_rescale
    k: int | None = None  # topk
    rescale_acts_by_decoder_norm: bool = False
    relu_before_threshold: bool = True  # SAELens's JumpReLU: relu(pre) * (pre > t); circuit-tracer: pre * (pre > t)
    b_gate: np.ndarray | None = None  # gated: the gate's bias is b_gate, the magnitude path W_enc * exp(r_mag) + b_mag
    r_mag: np.ndarray | None = None
    b_mag: np.ndarray | None = None
    labels: dict[int, str] = field(default_factory=dict)
    space: Space | None = None  # set by the DictionarySet that holds it

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.W_dec.shape[-1])

    @property
    def cross_layer(self) -> bool:
        return self.W_dec.ndim == 3

    def _norm_in(self, x: np.ndarray) -> tuple[np.ndarray, tuple | None]:
        if self.normalize_activations == "layer_norm":
            mu = x.mean(-1, keepdims=True)
            c = x - mu
            std = c.std(-1, keepdims=True, ddof=1)  # torch's std is unbiased
            return c / (std + 1e-5), (mu, std)
        if self.normalize_activations == "constant_norm_rescale":
            coeff = math.sqrt(self.d_in) / np.linalg.norm(x, axis=-1, keepdims=True)
            return x * coeff, (coeff,)
        return x, None

    def pre_acts(self, x: np.ndarray) -> np.ndarray:
        """Encoder pre-activations ``[..., d_sae]`` (gated: the magnitude path's)."""
        x = np.asarray(x, dtype=np.float32)
        x, _ = self._norm_in(x)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        if self.r_mag is not None:
            return x @ (self.W_enc * np.exp(self.r_mag)) + self.b_mag
        pre = x @ self.W_enc + self.b_enc
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self._dec_norm()
        return pre

    def _dec_norm(self) -> np.ndarray:
        return np.linalg.norm(self.W_dec.reshape(self.d_sae, -1), axis=-1)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Feature activations ``[..., d_sae]``, as the dictionary's own library computes them."""
        x = np.asarray(x, dtype=np.float32)
        pre = self.pre_acts(x)
        if self.r_mag is not None:  # gated
            xin, _ = self._norm_in(x)
            if self.apply_b_dec_to_input:
                xin = xin - self.b_dec
            gate = (xin @ self.W_enc + self.b_gate) > 0
            return np.where(gate, np.maximum(pre, 0), 0).astype(np.float32)
        if self.k is not None:
            k = min(self.k, pre.shape[-1])
            idx = np.argpartition(-pre, k - 1, axis=-1)[..., :k]
            out = np.zeros_like(pre)
            np.put_along_axis(out, idx, np.maximum(np.take_along_axis(pre, idx, axis=-1), 0), axis=-1)
            return out
        if self.threshold is not None:
            active = pre > self.threshold
            kept = np.maximum(pre, 0) if self.relu_before_threshold else pre
            return np.where(active, kept, 0).astype(np.float32)
        return np.maximum(pre, 0)

    def decode(self, f: np.ndarray, *, x: np.ndarray | None = None) -> np.ndarray:
        """``f @ W_dec + b_dec``, undoing a run-time normalisation of ``x`` when there is one. Cross-layer: what
        these features write into every output layer, ``[..., n_out, d_out]``, without bias (output layer L's
        bias is the ``b_dec`` of layer L's dictionary)."""
        f = np.asarray(f, dtype=np.float32)
        if self.rescale_acts_by_decoder_norm:
            f = f / self._dec_norm()
        if self.cross_layer:  # each output layer adds its own b_dec (the dictionary of that layer)
            return np.einsum("...s,sld->...ld", f, self.W_dec)
        out = f @ self.W_dec + self.b_dec
        if self.normalize_activations != "none":
            if x is None:
                raise HexRayError(f"decoding a {self.normalize_activations}-normalised dictionary needs its input x")
            _, stats = self._norm_in(np.asarray(x, dtype=np.float32))
            out = out * stats[1] + stats[0] if self.normalize_activations == "layer_norm" else out / stats[0]
        return out

    def skip(self, x: np.ndarray) -> np.ndarray | None:
        return None if self.W_skip is None else np.asarray(x, dtype=np.float32) @ self.W_skip

    def forward(self, x: np.ndarray) -> np.ndarray:
        out = self.decode(self.encode(x), x=x)
        s = self.skip(x)
        return out if s is None else out + s


@dataclass
class DictionarySet:
    """Dictionaries by layer: ``kind`` is "sae", "transcoder" or "clt"; ``space`` what they read."""

    layers: dict[int, Dictionary]
    kind: str
    space: Space
    name: str
    path: str

    def __post_init__(self):
        for d in self.layers.values():
            d.space = self.space

    @property
    def fingerprint(self) -> str:
        """A short id of the weights (biases, thresholds, a few encoder rows): stored features name it."""
        import hashlib

        h = hashlib.sha256(self.kind.encode())
        for layer in sorted(self.layers):
            d = self.layers[layer]
            h.update(f"{layer}:{d.hook_in}:{d.hook_out}:{d.architecture}:{d.W_enc.shape}:{d.W_dec.shape}".encode())
            for arr in (d.b_enc, d.b_dec, d.threshold, d.W_enc[:4]):
                if arr is not None:
                    h.update(np.ascontiguousarray(arr, dtype="<f4").tobytes())
        return h.hexdigest()[:16]

    def __getitem__(self, layer: int) -> Dictionary:
        try:
            return self.layers[layer]
        except KeyError:
            raise HexRayError(f"{self.name} has no dictionary for layer {layer} (it has layers "
                              f"{sorted(self.layers)})") from None

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "layers": sorted(self.layers), "space": str(self.space)}


# -- reading files safely ------------------------------------------------------------------------------------------

def _fail(path, msg: str) -> HexRayError:
    return HexRayError(f"--dict {path}: {msg}")


def _open(path: str):
    """A binary file object on a regular file only (never a blocking open of a FIFO or a device)."""
    from trace_format import TraceFormatError, open_regular

    try:
        return os.fdopen(open_regular(path, what="a dictionary file"), "rb")
    except TraceFormatError as e:
        raise HexRayError(f"--dict {e}") from None


def _read_text(path: str, what: str) -> str:
    try:
        with _open(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_CONFIG_BYTES:
                raise _fail(path, f"{what} is {size} bytes, more than a dictionary config can be "
                                  f"({MAX_CONFIG_BYTES})")
            return f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(path, f"cannot read {what} ({type(e).__name__}: {e})") from None


def _read_json(path: str) -> dict:
    try:
        cfg = json.loads(_read_text(path, os.path.basename(path)))
    except json.JSONDecodeError as e:  # in full, with where (not a message cut at a fixed length)
        raise _fail(path, f"is not valid JSON ({json_problem(e)})") from None
    except RecursionError:
        raise _fail(path, "is not valid JSON (nested too deeply)") from None
    if not isinstance(cfg, dict):
        raise _fail(path, "expected a JSON object")
    return cfg


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        cfg = yaml.safe_load(_read_text(path, os.path.basename(path)))
    except (yaml.YAMLError, RecursionError) as e:
        raise _fail(path, f"is not valid YAML ({(str(e).splitlines() or [type(e).__name__])[0][:120]})") from None
    if not isinstance(cfg, dict):
        raise _fail(path, "expected a YAML mapping")
    return cfg


_SAFE_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


def _read_safetensors(path: str, budget: list[int]) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as float32, after checking the header against the file's size."""
    from safetensors import SafetensorError, safe_open

    try:
        with _open(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _fail(path, "is not a safetensors file (shorter than its header)")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, 100 << 20):
                raise _fail(path, f"is not a safetensors file (header claims {n} bytes in a {size}-byte file)")
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape = info.get("dtype"), info.get("shape")
            if dtype not in _SAFE_DTYPES or not isinstance(shape, list):
                raise _fail(path, f"tensor {name!r} has dtype {dtype}: expected a float tensor")
            count = math.prod(int(d) for d in shape)
            if count * _SAFE_DTYPES[dtype] > size:
                raise _fail(path, f"tensor {name!r} claims shape {shape}, larger than the file ({size} bytes)")
            _spend(budget, count, path)
        out = {}
        if any(info.get("dtype") == "BF16" for k, info in header.items() if k != "__metadata__"):
            return _read_bf16(path, header, n)
        with safe_open(path, framework="np") as st:
            for name in st.keys():
                out[name] = np.asarray(st.get_tensor(name), dtype=np.float32)
        return out
    except HexRayError:
        raise
    except (OSError, ValueError, TypeError, SafetensorError, json.JSONDecodeError, AttributeError, RecursionError) as e:
        raise _fail(path, f"cannot read it as safetensors ({type(e).__name__}: {str(e).splitlines()[0][:160]})") \
            from None


def _read_bf16(path: str, header: dict, n: int) -> dict[str, np.ndarray]:
    """numpy has no bfloat16: read the raw words (offsets checked above) and widen them."""
    out = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, stop = (int(v) for v in info["data_offsets"])
            f.seek(8 + n + start)
            raw = f.read(stop - start)
            shape = tuple(int(d) for d in info["shape"])
            count = math.prod(shape)
            width = _SAFE_DTYPES[info["dtype"]]
            if len(raw) != count * width:
                raise _fail(path, f"tensor {name!r} is truncated")
            if info["dtype"] == "BF16":
                arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                arr = np.frombuffer(raw, {"F32": "<f4", "F16": "<f2", "F64": "<f8"}[info["dtype"]]).astype(np.float32)
            out[name] = arr.reshape(shape)
    return out


def _read_npz(path: str, budget: list[int]) -> dict[str, np.ndarray]:
    """A .npz of float arrays, each member's claimed shape checked against its stored size before reading."""
    try:
        with _open(path) as raw, zipfile.ZipFile(raw) as z:
            out = {}
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(f)
                    count = math.prod(shape)
                    if dtype.kind != "f" or count * dtype.itemsize > info.file_size:
                        raise _fail(path, f"{info.filename} claims {dtype} {list(shape)}, not a float array of "
                                          f"its stored size ({info.file_size} bytes)")
                    _spend(budget, count, path)
                    data = f.read(count * dtype.itemsize)
                    arr = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
                out[info.filename[:-4]] = arr.astype(np.float32)
            return out
    except HexRayError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
        raise _fail(path, f"cannot read it as .npz ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


def _spend(budget: list[int], count: int, path) -> None:
    budget[0] -= count
    if budget[0] < 0:
        raise _fail(path, f"the dictionary holds more than {MAX_ELEMENTS} numbers; HexRay refuses to load it")


# -- building and checking one dictionary ----------------------------------------------------------------------------

def _finish(d: Dictionary, path) -> Dictionary:
    """Shapes agree with each other, every number is finite."""
    where = f"layer {d.layer} ({d.architecture})"
    if d.W_enc.ndim != 2:
        raise _fail(path, f"{where}: W_enc has shape {list(d.W_enc.shape)}, expected [d_in, d_sae]")
    d_in, d_sae = d.W_enc.shape
    if d.W_dec.ndim not in (2, 3) or d.W_dec.shape[0] != d_sae:
        raise _fail(path, f"{where}: W_dec has shape {list(d.W_dec.shape)}, expected [d_sae = {d_sae}, d_out]")
    d_out = d.W_dec.shape[-1]
    expect = {"b_enc": (d_sae,), "b_dec": (d_out,), "threshold": (d_sae,), "W_skip": (d_in, d_out),
              "b_gate": (d_sae,), "r_mag": (d_sae,), "b_mag": (d_sae,)}
    for name, shape in expect.items():
        arr = getattr(d, name)
        if arr is None:
            continue
        if name == "threshold" and arr.ndim == 0:
            arr = np.full((d_sae,), float(arr), dtype=np.float32)
            setattr(d, name, arr)
        if tuple(arr.shape) != shape:
            raise _fail(path, f"{where}: {name} has shape {list(arr.shape)}, expected {list(shape)}")
    if d.apply_b_dec_to_input and d_out != d_in:
        raise _fail(path, f"{where}: apply_b_dec_to_input with d_out {d_out} != d_in {d_in}")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip", "b_gate", "r_mag", "b_mag"):
        arr = getattr(d, name)
        if arr is not None:
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            if not np.isfinite(arr).all():
                raise _fail(path, f"{where}: {name} holds NaN or infinite values")
            arr.setflags(write=False)
            setattr(d, name, arr)
    if d.k is not None and not 1 <= d.k <= d_sae:
        raise _fail(path, f"{where}: k = {d.k}, expected 1..{d_sae}")
    if d.normalize_activations not in ("none", "layer_norm", "constant_norm_rescale"):
        raise _fail(path, f"{where}: normalize_activations {d.normalize_activations!r} is not supported")
    return d


def _layer_of(hook: str, path) -> int:
    m = _LAYER_RE.match(hook or "")
    if not m:
        raise _fail(path, f"hook {hook!r} names no layer (expected blocks.L....)")
    return int(m.group(1))


def _labels(folder: str) -> dict[int, str]:
    """explanations.json beside a dictionary: {"123": "text", ...} or [{"index": 123, "description": "text"}]."""
    p = os.path.join(folder, "explanations.json")
    if not os.path.isfile(p):
        return {}
    try:
        raw = json.loads(_read_text(p, "explanations.json"))
    except (json.JSONDecodeError, RecursionError) as e:
        raise _fail(p, f"is not valid JSON ({str(e)[:120]})") from None
    out = {}
    items = raw.items() if isinstance(raw, dict) else (((r.get("index"), r.get("description")) for r in raw
                                                        if isinstance(r, dict)) if isinstance(raw, list) else ())
    for k, v in items:
        try:
            if isinstance(v, str):
                out[int(k)] = v
        except (TypeError, ValueError):
            continue
    return out


# -- SAELens ---------------------------------------------------------------------------------------------------------

_TRANSCODERS = {"transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"}
_SAE_ARCHS = {"standard", "gated", "topk", "jumprelu"} | _TRANSCODERS


def _saelens_space(cfg: dict) -> Space:
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    kwargs = meta.get("model_from_pretrained_kwargs", cfg.get("model_from_pretrained_kwargs"))
    cls = meta.get("model_class_name", cfg.get("model_class_name")) or "HookedTransformer"
    if cls != "HookedTransformer":
        return Space(False, False, f"SAELens, {cls}: unprocessed")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise HexRayError(f"model_from_pretrained_kwargs is {kwargs!r}, expected a map")
    # SAELens runs a dictionary on sae_lens.load_model's model: HookedTransformer.from_pretrained_no_processing,
    # every processing flag off unless the kwargs turn it on.
    return Space(bool(kwargs.get("fold_ln", False)), bool(kwargs.get("center_writing_weights", False)),
                 f"SAELens model_from_pretrained_kwargs {json.dumps(kwargs, sort_keys=True)}",
                 bool(kwargs.get("fold_value_biases", False)))


def _saelens(folder: str, budget) -> tuple[Dictionary, Space]:
    cfg_path = os.path.join(folder, "cfg.json")
    cfg = _read_json(cfg_path)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    version = str(meta.get("sae_lens_version") or cfg.get("sae_lens_version") or "")
    pre6 = not version or version.split(".")[0].isdigit() and int(version.split(".")[0]) < 6
    arch = cfg.get("architecture") or "standard"
    if pre6 and (cfg.get("activation_fn") or cfg.get("activation_fn_str")) == "topk":
        arch = "topk"
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    if not isinstance(hook, str):
        raise _fail(cfg_path, "names no hook (metadata.hook_name, or hook_point before SAELens 6)")
    if arch not in _SAE_ARCHS:
        raise _fail(cfg_path, f"architecture {arch!r} is not supported (HexRay reads {', '.join(sorted(_SAE_ARCHS))})")
    reshape = cfg.get("reshape_activations") or "none"
    # A hook_z dictionary reads the heads' outputs concatenated ([n, n_heads * d_head]): SAELens 6 says so with
    # reshape_activations: hook_z, earlier versions reshaped any hook ending in _z.
    if reshape not in ("none", "hook_z") or (reshape == "hook_z" and not hook.endswith("attn.hook_z")):
        raise _fail(cfg_path, f"hook {hook!r} with reshape_activations {reshape!r}: HexRay reshapes only hook_z "
                              "(heads concatenated)")
    head = meta.get("hook_head_index", cfg.get("hook_head_index", cfg.get("hook_point_head_index")))
    if head is not None:
        raise _fail(cfg_path, f"hook_head_index {head!r}: dictionaries of a single head are not supported")
    hook_out = meta.get("hook_name_out") or cfg.get("hook_name_out") or hook
    norm = cfg.get("normalize_activations") or "none"
    if norm is True:
        norm = "expected_average_only_in"
    elif norm is False:
        norm = "none"
    if norm == "expected_average_only_in":
        # SAELens applies nothing at run time: the scaling factor is folded into the weights when known.
        norm = "none"
    weights = _read_safetensors(os.path.join(folder, "sae_weights.safetensors"), budget)
    for key in ("W_enc", "W_dec", "b_enc" if arch != "gated" else "b_gate", "b_dec"):
        if key not in weights:
            raise _fail(folder, f"sae_weights.safetensors has no {key} (architecture {arch})")
    k = cfg.get("k")
    if arch == "topk" and k is None:
        k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    skip = weights.get("W_skip")
    d = Dictionary(
        W_enc=weights["W_enc"], b_enc=weights.get("b_enc", weights.get("b_gate")), W_dec=weights["W_dec"],
        b_dec=weights["b_dec"], hook_in=hook, hook_out=hook_out, architecture=arch, layer=_layer_of(hook, cfg_path),
        threshold=weights.get("threshold") if "jumprelu" in arch else None,
        W_skip=None if skip is None else skip.T,  # SAELens keeps [d_out, d_in]
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", arch not in _TRANSCODERS)),
        normalize_activations=norm, k=int(k) if arch == "topk" and k is not None else None,
        rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
        b_gate=weights.get("b_gate") if arch == "gated" else None,
        r_mag=weights.get("r_mag") if arch == "gated" else None,
        b_mag=weights.get("b_mag") if arch == "gated" else None,
        labels=_labels(folder))
    if arch == "topk" and d.k is None:
        raise _fail(cfg_path, "a topk dictionary without k")
    if arch == "gated" and (d.r_mag is None or d.b_mag is None):
        raise _fail(folder, "a gated dictionary without r_mag / b_mag")
    if "jumprelu" in arch and d.threshold is None:
        raise _fail(folder, "a jumprelu dictionary without threshold")
    for key, want in (("d_in", d.W_enc.shape[0]), ("d_sae", d.W_enc.shape[1])):
        if key in cfg and cfg[key] != want:
            raise _fail(cfg_path, f"{key} is {cfg[key]!r} but W_enc has shape {list(d.W_enc.shape)}")
    try:
        space = _saelens_space(cfg)
    except HexRayError as e:
        raise _fail(cfg_path, str(e)) from None
    return _finish(d, folder), space


# -- circuit-tracer --------------------------------------------------------------------------------------------------

def _ct_hook(name: str, layer: int) -> str:
    return name if name.startswith("blocks.") else f"blocks.{layer}.{name}"


def _ct_file(folder: str, ref) -> str:
    if not isinstance(ref, str):
        raise _fail(folder, f"config.yaml lists a transcoder path {ref!r}, expected a string")
    if ref.startswith("hf://"):
        return resolve_reference(ref)
    path = ref if os.path.isabs(ref) else os.path.join(folder, ref)
    return path


def _circuit_tracer(folder: str, budget) -> DictionarySet:
    cfg_path = os.path.join(folder, "config.yaml")
    cfg = _read_yaml(cfg_path)
    kind = cfg.get("model_kind", "transcoder_set")
    hin, hout = cfg.get("feature_input_hook", "mlp.hook_in"), cfg.get("feature_output_hook", "mlp.hook_out")
    if not isinstance(hin, str) or not isinstance(hout, str):
        raise _fail(cfg_path, "feature_input_hook / feature_output_hook must be strings")
    refs = cfg.get("transcoders")
    space = Space(False, False, "circuit-tracer (fold_ln, centring and center_unembed off)")
    if cfg.get("hexray_space") == "compat":  # written by hexray's save_circuit_tracer for a compatibility-mode set
        space = Space(True, True, "config.yaml hexray_space: compat (the trace's own processed activations)", True)
    name = os.path.basename(os.path.normpath(folder))
    layers: dict[int, Dictionary] = {}
    if kind == "cross_layer_transcoder":
        n = _clt_layers(folder, refs)
        for i in range(n):
            enc = _read_safetensors(_clt_path(folder, refs, f"W_enc_{i}"), budget)
            dec = _read_safetensors(_clt_path(folder, refs, f"W_dec_{i}"), budget)
            try:
                w_enc, w_dec = enc[f"W_enc_{i}"], dec[f"W_dec_{i}"]
                b_enc, b_dec = enc[f"b_enc_{i}"], enc[f"b_dec_{i}"]
            except KeyError as e:
                raise _fail(folder, f"cross-layer transcoder layer {i} lacks {e.args[0]}") from None
            if w_dec.ndim != 3 or w_dec.shape[1] != n - i:
                raise _fail(folder, f"W_dec_{i} has shape {list(w_dec.shape)}, expected [d_sae, {n - i}, d_model]")
            d = Dictionary(W_enc=_enc_orient(w_enc, w_dec, folder, i), b_enc=b_enc, W_dec=w_dec, b_dec=b_dec,
                           hook_in=_ct_hook(hin, i), hook_out=_ct_hook(hout, i), architecture="clt", layer=i,
                           threshold=enc.get(f"threshold_{i}"), relu_before_threshold=False)
            if d.threshold is None:
                d.relu_before_threshold = True
            layers[i] = _finish(d, folder)
        return DictionarySet(layers, "clt", space, name, folder)
    if kind != "transcoder_set":
        raise _fail(cfg_path, f"model_kind {kind!r}: expected transcoder_set or cross_layer_transcoder")
    if isinstance(refs, list):
        files = {i: _ct_file(folder, r) for i, r in enumerate(refs)}
    elif isinstance(refs, dict):
        files = {int(i): _ct_file(folder, r) for i, r in refs.items()}
    else:
        files = {}
        for f in sorted(os.listdir(folder)):
            m = re.fullmatch(r"layer_(\d+)\.safetensors", f)
            if m:
                files[int(m.group(1))] = os.path.join(folder, f)
    if not files:
        raise _fail(folder, "config.yaml lists no transcoders and the folder holds no layer_i.safetensors")
    for i, path in sorted(files.items()):
        w = _read_safetensors(path, budget)
        for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
            if key not in w:
                raise _fail(path, f"has no {key}")
        thr = w.get("activation_function.threshold", w.get("threshold"))
        skip = w.get("W_skip")
        d = Dictionary(W_enc=_enc_orient(w["W_enc"], w["W_dec"], path, i), b_enc=w["b_enc"], W_dec=w["W_dec"],
                       b_dec=w["b_dec"], hook_in=_ct_hook(hin, i), hook_out=_ct_hook(hout, i),
                       architecture="jumprelu_transcoder" if thr is not None else "transcoder", layer=i,
                       threshold=thr, W_skip=None if skip is None else skip.T, relu_before_threshold=False)
        layers[i] = _finish(d, path)
    return DictionarySet(layers, "transcoder", space, name, folder)


def _enc_orient(w_enc: np.ndarray, w_dec: np.ndarray, path, i: int) -> np.ndarray:
    """circuit-tracer stores W_enc as [d_sae, d_in]; older sets as [d_in, d_sae]."""
    if w_enc.ndim != 2 or w_dec.ndim < 2:
        raise _fail(path, f"layer {i}: W_enc has shape {list(w_enc.shape)}, expected a matrix")
    d_sae = w_dec.shape[0]
    if w_enc.shape[0] == d_sae:
        return w_enc.T
    if w_enc.shape[1] == d_sae:
        return w_enc
    raise _fail(path, f"layer {i}: W_enc has shape {list(w_enc.shape)}, which does not match d_sae = {d_sae} of W_dec")


def _clt_path(folder: str, refs, stem: str) -> str:
    if isinstance(refs, list):
        for r in refs:
            if isinstance(r, str) and os.path.basename(r) == f"{stem}.safetensors":
                return _ct_file(folder, r)
    return os.path.join(folder, f"{stem}.safetensors")


def _clt_layers(folder: str, refs) -> int:
    names = [os.path.basename(r) for r in refs if isinstance(r, str)] if isinstance(refs, list) else os.listdir(folder)
    n = len([f for f in names if re.fullmatch(r"W_enc_\d+\.safetensors", f)])
    if n == 0:
        raise _fail(folder, "a cross-layer transcoder with no W_enc_i.safetensors")
    return n


# -- Gemma Scope, Gemma Scope 2, Llama Scope ---------------------------------------------------------------------------

def _hook_from_path(path: str) -> tuple[str, str, bool]:
    """(hook_in, hook_out, transcoder) from a Gemma Scope path: .../<repo ending -res|-mlp|-transcoders>/layer_N/..."""
    parts = os.path.abspath(path).replace("\\", "/").split("/")
    layer = None
    for p in parts:
        m = re.fullmatch(r"layer_(\d+)", p)
        if m:
            layer = int(m.group(1))
    text = "/".join(parts).lower()
    if layer is None:
        raise _fail(path, "cannot tell which layer this Gemma Scope dictionary reads: its path names no layer_N "
                          "folder (keep the hub's layout: <repo>/layer_N/width_.../params.*)")
    if "transcoder" in text:
        return f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.hook_mlp_out", True  # what the MLP reads
    if re.search(r"(^|[-_/])att([-_/]|$)", text):  # the heads' outputs, concatenated, before W_O
        return f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.attn.hook_z", False
    if re.search(r"(^|[-_/])res([-_/]|$)", text) or "resid" in text:
        return f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.hook_resid_post", False
    if re.search(r"(^|[-_/])mlp([-_/]|$)", text):
        return f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.hook_mlp_out", False
    raise _fail(path, "cannot tell which hook this Gemma Scope dictionary reads: its path says neither res, mlp, "
                      "att nor transcoders")


def _gemma_scope(path: str, budget) -> DictionarySet:
    hin, hout, tc = _hook_from_path(path)
    w = _read_npz(path, budget) if path.endswith(".npz") else _read_safetensors(path, budget)
    low = {k.lower(): v for k, v in w.items()}
    for key in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"):
        if key not in low:
            raise _fail(path, f"has no {key} (Gemma Scope)")
    skip = low.get("affine_skip_connection")
    d = Dictionary(W_enc=low["w_enc"], b_enc=low["b_enc"], W_dec=low["w_dec"], b_dec=low["b_dec"], hook_in=hin,
                   hook_out=hout, architecture="jumprelu_transcoder" if tc else "jumprelu",
                   layer=_layer_of(hin, path), threshold=low["threshold"], W_skip=skip, labels=_labels(
                       os.path.dirname(path)))
    space = Space(False, False, "Gemma Scope (unprocessed model)")
    return DictionarySet({d.layer: _finish(d, path)}, "transcoder" if tc else "sae", space,
                         os.path.basename(os.path.dirname(os.path.abspath(path))), path)


def _llama_scope(folder: str, budget) -> DictionarySet:
    hp = _read_json(os.path.join(folder, "hyperparams.json"))
    weights_path = os.path.join(folder, "checkpoints", "final.safetensors")
    if not os.path.isfile(weights_path):
        weights_path = os.path.join(folder, "final.safetensors")
    w = _read_safetensors(weights_path, budget)
    try:
        hook = hp["hook_point_in"]
        hook_out = hp.get("hook_point_out", hook)
        d_in = int(hp["d_model"])
        thr = float(hp["jump_relu_threshold"])
        avg = float(hp["dataset_average_activation_norm"]["in"])
        enc_w, dec_w = w["encoder.weight"], w["decoder.weight"]
        enc_b, dec_b = w["encoder.bias"], w["decoder.bias"]
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(folder, f"not a Llama Scope dictionary: missing or bad {e}") from None
    if not (avg > 0 and math.isfinite(avg)):
        raise _fail(folder, f"dataset_average_activation_norm.in is {avg}, expected a positive number")
    # As SAELens's loader: the norm scaling factor sqrt(d_in) / average norm is folded into W_enc, W_dec,
    # b_dec and the (scalar) threshold.
    scale = d_in ** 0.5 / avg
    d = Dictionary(W_enc=enc_w.T * scale, b_enc=enc_b, W_dec=dec_w.T / scale, b_dec=dec_b / scale,
                   hook_in=hook, hook_out=hook_out, architecture="jumprelu", layer=_layer_of(hook, folder),
                   threshold=np.float32(thr * scale), labels=_labels(folder))
    space = Space(False, False, "Llama Scope (unprocessed model)")
    return DictionarySet({d.layer: _finish(d, folder)}, "sae" if hook == hook_out else "transcoder", space,
                         os.path.basename(os.path.normpath(folder)), folder)


# -- references and dispatch ------------------------------------------------------------------------------------------

def hub_reference(ref: str) -> tuple[str, str]:
    """(repo_id, path inside the repo) of ``hf://owner/repo/path`` or ``sae-lens:RELEASE/SAE_ID``."""
    if ref.startswith("hf://"):
        parts = ref[len("hf://"):].strip("/").split("/")
        if len(parts) < 2 or not all(parts[:2]) or any(p in ("", ".", "..") for p in parts):
            raise HexRayError(f"--dict {ref}: expected hf://OWNER/REPO[/PATH]")
        return "/".join(parts[:2]), "/".join(parts[2:])
    if ref.startswith("sae-lens:"):
        body = ref[len("sae-lens:"):]
        release, _, sae_id = body.partition("/")
        if not release or not sae_id:
            raise HexRayError(f"--dict {ref}: expected sae-lens:RELEASE/SAE_ID")
        table = _saelens_directory()
        entry = table.get(release) if table is not None else None
        if table is None:
            raise HexRayError(f"--dict {ref}: resolving a SAELens release needs SAELens's pretrained_saes.yaml "
                              "(pip install sae-lens in any environment, or pass hf://REPO/PATH)")
        if not isinstance(entry, dict):
            raise HexRayError(f"--dict {ref}: SAELens knows no release {release!r}")
        repo = entry.get("repo_id")
        for sae in entry.get("saes") or []:
            if isinstance(sae, dict) and sae.get("id") == sae_id and isinstance(repo, str):
                return repo, str(sae.get("path", ""))
        raise HexRayError(f"--dict {ref}: release {release!r} has no SAE {sae_id!r}")
    raise HexRayError(f"--dict {ref}: not a hub reference (hf://... or sae-lens:...)")


def _saelens_directory() -> dict | None:
    """SAELens's release table, read as YAML (the package is never imported: it pins an older TransformerLens)."""
    import importlib.util

    override = os.environ.get("HEXRAY_SAELENS_DIRECTORY")
    candidates = [override] if override else []
    spec = importlib.util.find_spec("sae_lens") if not override else None
    if spec is not None and spec.submodule_search_locations:
        candidates.append(os.path.join(list(spec.submodule_search_locations)[0], "pretrained_saes.yaml"))
    for c in candidates:
        if c and os.path.isfile(c):
            import yaml

            with open(c, encoding="utf-8") as f:
                data = yaml.safe_load(f)
            return data if isinstance(data, dict) else None
    return None


def resolve_reference(ref: str) -> str:
    """A local path for a hub reference: the Hugging Face cache, else a download where the hub is reachable."""
    repo, sub = hub_reference(ref)
    cached = _hf_cached(repo, sub)
    if cached is not None:
        return cached
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise HexRayError(f"--dict {ref}: needs the hub (repository {repo}, path {sub or '/'}), and the hub is "
                          "offline (HF_HUB_OFFLINE); download it elsewhere and pass the folder")
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(repo, allow_patterns=[f"{sub}/*", sub, "*.yaml", "*.json"] if sub else None)
    except Exception as e:  # the hub's errors are many; each is the same answer here
        raise HexRayError(f"--dict {ref}: needs the hub (repository {repo}, path {sub or '/'}), which could not be "
                          f"reached ({type(e).__name__}); download it elsewhere and pass the folder") from None
    return os.path.join(root, sub) if sub else root


def _hf_cached(repo: str, sub: str) -> str | None:
    home = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    snaps = os.path.join(home, "models--" + repo.replace("/", "--"), "snapshots")
    if not os.path.isdir(snaps):
        return None
    for snap in sorted(os.listdir(snaps)):
        p = os.path.join(snaps, snap, sub)
        if os.path.exists(p):
            return p
    return None


def load_dictionary(path_or_ref) -> DictionarySet:
    """Read a dictionary (folder, file or hub reference) into numpy; see the module docstring for formats."""
    if isinstance(path_or_ref, DictionarySet):
        return path_or_ref
    ref = os.fspath(path_or_ref)
    if ref.startswith(("hf://", "sae-lens:")):
        path = resolve_reference(ref)
    elif ref in EMBEDDED_NAMES and not os.path.exists(ref):
        path = os.path.join(EMBEDDED, ref)
    else:
        path = ref
    if not os.path.exists(path):
        raise HexRayError(f"--dict {ref}: no such file or folder")
    budget = [MAX_ELEMENTS]
    if os.path.isfile(path):
        base = os.path.basename(path)
        if base in ("params.npz", "params.safetensors") or base.endswith(".npz"):
            return _gemma_scope(path, budget)
        if base == "final.safetensors":
            folder = os.path.dirname(os.path.dirname(os.path.abspath(path)))
            if not os.path.isfile(os.path.join(folder, "hyperparams.json")):
                folder = os.path.dirname(os.path.abspath(path))
            return _llama_scope(folder, budget)
        if base in ("sae_weights.safetensors", "cfg.json"):
            path = os.path.dirname(os.path.abspath(path))
        elif base == "config.yaml":
            return _circuit_tracer(os.path.dirname(os.path.abspath(path)), budget)
        else:
            raise HexRayError(f"--dict {ref}: not a dictionary file HexRay knows (a SAELens folder, circuit-tracer "
                              "config.yaml, params.npz, params.safetensors or final.safetensors)")
    return _from_folder(path, ref, budget)


def _from_folder(path: str, ref: str, budget) -> DictionarySet:
    def has(f):  # anything by that name: reading it refuses what is not a regular file
        return os.path.exists(os.path.join(path, f))

    name = os.path.basename(os.path.normpath(path))
    if has("cfg.json") and has("sae_weights.safetensors"):
        d, space = _saelens(path, budget)
        return DictionarySet({d.layer: d}, "transcoder" if d.architecture in _TRANSCODERS else "sae", space, name,
                             path)
    if has("config.yaml"):
        return _circuit_tracer(path, budget)
    if has("hyperparams.json"):
        return _llama_scope(path, budget)
    for f in ("params.npz", "params.safetensors"):
        if has(f):
            return _gemma_scope(os.path.join(path, f), budget)
    subs = sorted(s for s in os.listdir(path) if os.path.isfile(os.path.join(path, s, "cfg.json")))
    if subs:  # a folder of SAELens folders: one set, one dictionary per layer
        layers, spaces, kinds = {}, set(), set()
        for s in subs:
            d, space = _saelens(os.path.join(path, s), budget)
            if d.layer in layers:
                raise _fail(path, f"two dictionaries for layer {d.layer} ({s} and another)")
            layers[d.layer] = d
            spaces.add((space.fold_ln, space.center_writing_weights))
            kinds.add("transcoder" if d.architecture in _TRANSCODERS else "sae")
        if len(spaces) > 1 or len(kinds) > 1:
            raise _fail(path, "its dictionaries disagree on kind or on the model processing they were trained under")
        return DictionarySet(layers, kinds.pop(), space, name, path)
    raise HexRayError(f"--dict {ref}: no dictionary here (expected cfg.json + sae_weights.safetensors, config.yaml, "
                      "hyperparams.json, params.npz or params.safetensors)")
