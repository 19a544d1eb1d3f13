"""The one check of what a recording *says*: metadata, run info, tensor shapes and dtypes.

`trace_format` guarantees a trace's bytes are intact; this module checks that its content follows
the contract in docs/ARCHITECTURE.md ("What a recording contains"), so the views never meet a
`n_layers` that is a string or 2**64 - 1, tokens that are not integers, or a top-k table that is
1-D. It reads the metadata and the index only (no tensor data), when a trace is opened; the model
kit's tensors are checked when the kit is found. Every violation is one `TraceContentError` (both a
`TraceFormatError` and a `HexRayError`) naming the field or tensor and what was expected.

Every key stays optional (a trace written by `trace_format` alone is still opened), but a key
that is present must have its documented type and range, and sizes must agree with each other:
each tensor's shape is matched against a table of name patterns whose axes are named sizes
(``n`` = the run's token count, ``d_model``... from `model.config`, or bound by the first tensor
that shows them), so a size that drives an allocation is bounded by what the index holds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from hexray_core.errors import HexRayError
from hexray_core.replay.rotary import check_params as check_rotary
from trace_format import WEIGHTS_RUN, TensorInfo, TraceFormatError, TraceReader
from trace_format.fileio import shown

FLOAT = frozenset({"f32", "f16", "bf16", "f64"})
INT = frozenset({"i64", "i32", "i16", "i8", "u8"})

# Absolute ceilings, far above any released model; the tensors then bound what is really used.
MAX_LAYERS = 4096
MAX_WIDTH = 1 << 20  # d_model, d_head, d_mlp
MAX_HEADS = 4096
MAX_VOCAB = 1 << 24
KIT_PREFIX = "kit/"


class TraceContentError(TraceFormatError, HexRayError):
    """A trace whose container is intact but whose content breaks the recording contract."""


# -- field checks: value -> None, or a string saying what was expected ---------------------------

Check = Callable[[object], "str | None"]


def integer(lo: int, hi: int, *, none: bool = False) -> Check:
    def check(v):
        if v is None and none:
            return None
        if type(v) is not int or not lo <= v <= hi:
            return f"an integer from {lo} to {hi:,}" + (" or null" if none else "")
        return None
    return check


def number(lo: float, hi: float) -> Check:
    def check(v):
        if type(v) not in (int, float) or not math.isfinite(v) or not lo <= v <= hi:
            return f"a finite number from {lo:g} to {hi:g}"
        return None
    return check


def text(*, none: bool = False) -> Check:
    def check(v):
        return None if isinstance(v, str) or (none and v is None) else "a string" + (" or null" if none else "")
    return check


def boolean(v) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def str_list(v) -> str | None:
    return None if isinstance(v, list) and all(isinstance(s, str) for s in v) else "a list of strings"


def mapping(v) -> str | None:
    return None if isinstance(v, dict) else "a map"


def str_map(v) -> str | None:
    ok = isinstance(v, dict) and all(isinstance(x, str) for x in v.values())
    return None if ok else "a map of strings to strings"


def hexdigest(v) -> str | None:
    return None if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{1,128}", v) else "a lowercase hex string"


# meta fields the replay side reads, declared once: (path of keys, check)
META_FIELDS: list[tuple[tuple[str, ...], Check]] = [
    (("hexray",), mapping),
    (("model",), mapping),
    (("model", "name"), text()),
    (("model", "config"), mapping),
    (("model", "config", "n_layers"), integer(0, MAX_LAYERS)),
    (("model", "config", "d_model"), integer(1, MAX_WIDTH)),
    (("model", "config", "n_heads"), integer(1, MAX_HEADS)),
    (("model", "config", "d_head"), integer(1, MAX_WIDTH)),
    (("model", "config", "d_mlp"), integer(0, MAX_WIDTH, none=True)),
    (("model", "config", "d_vocab"), integer(1, MAX_VOCAB)),
    (("model", "config", "n_ctx"), integer(1, 1 << 40)),
    (("model", "config", "n_key_value_heads"), integer(1, MAX_HEADS, none=True)),
    (("model", "config", "eps"), number(0.0, 1.0)),
    (("model", "config", "normalization_type"), text(none=True)),
    (("model", "config", "act_fn"), text(none=True)),
    (("model", "config", "positional_embedding_type"), text(none=True)),
    (("model", "config", "gated_mlp"), boolean),
    (("tokenizer",), mapping),
    (("kit",), mapping),
    (("kit", "sha256"), hexdigest),
    (("kit", "bundled"), boolean),
    (("kit", "vocab"), str_list),
    (("hooks",), mapping),
    (("hooks", "set"), text()),
    (("storage",), mapping),
    (("storage", "lens"), boolean),
    (("vocab",), str_list),
    (("attention",), mapping),  # attention stored as q/k (docs/ARCHITECTURE.md, "Attention is stored in linear space")
    (("attention", "store"), text()),
    (("attention", "q"), lambda v: _layer_template(v)),
    (("attention", "k"), lambda v: _layer_template(v)),
    (("attention", "n_heads"), integer(1, MAX_HEADS)),
    (("attention", "n_kv_heads"), integer(1, MAX_HEADS)),
    (("attention", "layers"), lambda v: _attention_layers(v)),
    (("attention", "lse"), lambda v: _layer_template(v)),
    (("attention", "rotary"), lambda v: check_rotary(v)),  # rotary.py: R_p for QK tracing
    (("forward",), mapping),  # how the recorder ran attention: flash (blockwise) or eager
    (("forward", "attention"), text()),
]


def _layer_template(v) -> str | None:
    """A tensor name with one ``{layer}`` field and nothing else str.format could act on
    (``{layer:>999999999}`` would build a gigabyte string)."""
    ok = isinstance(v, str) and len(v) <= 256 and re.fullmatch(r"[\w.]*\{layer\}[\w.]*", v)
    return None if ok else 'a tensor name holding "{layer}" once (e.g. "blocks.{layer}.attn.hook_q")'


def _attention_layers(v) -> str | None:
    want = ("a list of maps {scale: finite number, softcap: positive number or null, window: positive integer "
            "or null}, one per layer")
    if not isinstance(v, list) or len(v) > MAX_LAYERS:
        return want
    for p in v:
        if not isinstance(p, dict):
            return want
        scale, softcap, window = p.get("scale"), p.get("softcap"), p.get("window")
        if type(scale) not in (int, float) or not math.isfinite(scale):
            return want
        if softcap is not None and (type(softcap) not in (int, float) or not math.isfinite(softcap) or softcap <= 0):
            return want
        if window is not None and (type(window) is not int or window < 1):
            return want
    return None


def _span_list(n: int) -> Check:
    def check(v):
        if not (isinstance(v, list) and len(v) == n and all(
                isinstance(s, list) and len(s) == 2 and all(type(x) is int for x in s) for s in v)):
            return f"a list of {n} [start, end] integer pairs (one per token)"
        return None
    return check


def _token_list(vocab: int | None) -> Check:
    hi = (vocab or MAX_VOCAB) - 1

    def check(v):
        if not isinstance(v, list) or not all(type(t) is int and 0 <= t <= hi for t in v):
            return f"a list of token ids from 0 to {hi:,}"
        return None
    return check


def _run_fields(n: int, vocab: int | None) -> list[tuple[str, Check]]:
    return [
        ("prompt", text()),
        ("tokens", _token_list(vocab)),
        ("token_strs", lambda v: None if str_list(v) is None and len(v) == n else f"a list of {n} strings"),
        ("char_spans", _span_list(n)),
        ("byte_spans", _span_list(n)),
        ("n_prompt_tokens", integer(0, n)),
        ("prepend_bos", boolean),
        ("aliases", str_map),
        ("unembed_strs", str_list),
        ("generated", mapping),
    ]


# -- the tensor contract: name pattern -> named axes and dtype kind --------------------------------

@dataclass(frozen=True)
class Shape:
    """Axes of a tensor by name; an axis given as a tuple may be any of those sizes (GQA: n_heads or
    n_kv_heads). ``n`` is the run's token count; ``L1`` is n_layers + 1."""

    axes: tuple
    kind: frozenset = FLOAT


_RESID = Shape(("n", "d_model"))
_Q = Shape(("n", "n_heads", "d_head"))
_KV = Shape(("n", ("n_kv_heads", "n_heads"), "d_head"))
_LENS = Shape(("L1", "n"))

# Run tensors (docs/ARCHITECTURE.md tables). A name not listed here is not checked (--hooks full).
RUN_TENSORS: list[tuple[str, Shape]] = [
    (r"hook_embed|hook_pos_embed", _RESID),
    (r"blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)", _RESID),
    (r"blocks\.(\d+)\.attn\.hook_(z|q|rot_q)", _Q),
    (r"blocks\.(\d+)\.attn\.hook_(k|v|rot_k)", _KV),
    (r"blocks\.(\d+)\.attn\.hook_(pattern|attn_scores)", Shape(("n_heads", "n", "n"))),
    (r"blocks\.(\d+)\.mlp\.hook_(pre|post|pre_linear)", Shape(("n", "d_mlp"))),
    (r"(blocks\.(\d+)\.ln[12]|ln_final)\.hook_scale", Shape(("n", 1))),
    (r"hexray\.topk_ids", Shape(("n", "k"), INT)),
    (r"hexray\.topk_logits", Shape(("n", "k"))),
    (r"hexray\.(next_logit|logsumexp)", Shape(("n",))),
    (r"hexray\.unembed_ids", Shape(("m",), INT)),
    (r"hexray\.unembed_cols", Shape(("m", "d_model"))),
    (r"hexray\.unembed_bias", Shape(("m",))),
    (r"hexray\.lens_topk_ids", Shape(("L1", "n", "k_lens"), INT)),
    (r"hexray\.lens_topk_logits", Shape(("L1", "n", "k_lens"))),
    (r"hexray\.lens_(logsumexp|top_logit|next_logit)", _LENS),
    (r"hexray\.lens_(top_rank|next_rank)", Shape(("L1", "n"), INT)),
]
# Model kit tensors (bundled under kit/ at WEIGHTS_RUN, or in a cached kit file).
KIT_TENSORS: list[tuple[str, Shape]] = [
    (r"W_U", Shape(("d_model", "d_vocab"))),
    (r"b_U", Shape(("d_vocab",))),
    (r"W_O", Shape(("n_layers", "n_heads", "d_head", "d_model"))),
    (r"b_O|b_out", Shape(("n_layers", "d_model"))),
    (r"W_out", Shape(("n_layers", "d_mlp", "d_model"))),
    (r"W_E", Shape(("d_vocab", "d_model"))),
    (r"W_pos", Shape(("n_ctx", "d_model"))),
    (r"W_Q", Shape(("n_layers", "n_heads", "d_model", "d_head"))),
    (r"W_K|W_V", Shape(("n_layers", ("n_kv_heads", "n_heads"), "d_model", "d_head"))),
    (r"b_Q", Shape(("n_layers", "n_heads", "d_head"))),
    (r"b_K|b_V", Shape(("n_layers", ("n_kv_heads", "n_heads"), "d_head"))),
    (r"W_in|W_gate", Shape(("n_layers", "d_model", "d_mlp"))),
    (r"b_in", Shape(("n_layers", "d_mlp"))),
    (r"raw/ln[12]\.[wb]", Shape(("n_layers", "d_model"))),
    (r"raw/ln_final\.[wb]", Shape(("d_model",))),
    (r"raw/W_E\.mean", Shape(("d_vocab",))),
    (r"raw/W_pos\.mean", Shape(("n_ctx",))),
    (r"raw/W_O\.mean", Shape(("n_layers", "n_heads", "d_head"))),
    (r"raw/b_V|raw/ln1\.b\.W_V", Shape(("n_layers", "n_heads", "d_head"))),  # per query head (GQA repeated)
    (r"raw/b_O\.mean|raw/b_out\.mean", Shape(("n_layers",))),
    (r"raw/W_out\.mean", Shape(("n_layers", "d_mlp"))),
    (r"tokenizer\.json", Shape(("tokenizer_bytes",), frozenset({"u8"}))),
]
_AT_LEAST_ONE = {"k", "k_lens"}  # views index [..., 0] of these axes
_PER_RUN = {"n", "k", "k_lens", "m"}
_CONFIG_SIZES = {"n_layers": "n_layers", "d_model": "d_model", "n_heads": "n_heads", "d_head": "d_head",
                 "d_mlp": "d_mlp", "d_vocab": "d_vocab", "n_kv_heads": "n_key_value_heads", "n_ctx": "n_ctx"}


def _compile(table):
    return [(re.compile(p), s) for p, s in table]


_RUN_RE = _compile(RUN_TENSORS)
_KIT_RE = _compile(KIT_TENSORS)
_LAYER = re.compile(r"blocks\.(\d+)\.")


@dataclass
class Contract:
    """Sizes of one recording as established so far: name -> (value, where it came from)."""

    path: str
    sizes: dict[str, tuple[int, str]] = field(default_factory=dict)

    def fail(self, msg: str) -> TraceContentError:
        return TraceContentError(f"{shown(self.path)}: {msg}")

    def bind(self, sizes: dict, axis, got: int, who: str) -> str | None:
        """Match one axis against the sizes known; bind it when unknown. None, or what was expected."""
        options = axis if isinstance(axis, tuple) else (axis,)
        if isinstance(axis, int):
            return None if got == axis else str(axis)
        known = [(o, sizes[o]) for o in options if o in sizes]
        if known:
            if any(v == got for _, (v, _) in known):
                return None
            return " or ".join(f"{o} = {v} ({src})" for o, (v, src) in known)
        name = options[-1] if len(options) > 1 else options[0]
        if name in _AT_LEAST_ONE and got < 1:
            return f"{name} >= 1"
        sizes[name] = (got, f"from {who}")
        if name == "n_layers":
            sizes.setdefault("L1", (got + 1, f"n_layers + 1, from {who}"))
        elif name == "L1":
            sizes.setdefault("n_layers", (got - 1, f"rows - 1 of {who}"))
        return None

    def check_tensor(self, info: TensorInfo, shape: Shape, sizes: dict, who: str) -> None:
        kind = "a float" if shape.kind is FLOAT else "an integer"
        if info.dtype not in shape.kind:
            raise self.fail(f"{who} is stored as {info.dtype}, expected {kind} dtype")
        names = ", ".join(a if isinstance(a, str) else ("|".join(a) if isinstance(a, tuple) else str(a))
                          for a in shape.axes)
        if len(info.shape) != len(shape.axes):
            raise self.fail(f"{who} has shape {list(info.shape)}, expected [{names}]")
        for axis, got in zip(shape.axes, info.shape, strict=True):
            wanted = self.bind(sizes, axis, got, who)
            if wanted is not None:
                raise self.fail(f"{who} has shape {list(info.shape)}, expected [{names}] with {wanted}")


def _get(meta: dict, keys: tuple[str, ...]):
    d = meta
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return _MISSING
        d = d[k]
    return d


_MISSING = object()


def check_meta(meta: dict, contract: Contract) -> None:
    for keys, check in META_FIELDS:
        v = _get(meta, keys)
        if v is _MISSING:
            continue
        wanted = check(v)
        if wanted is not None:
            raise contract.fail(f"meta.{'.'.join(keys)} is {_brief(v)}, expected {wanted}")
    config = _get(meta, ("model", "config"))
    if isinstance(config, dict):
        for size, key in _CONFIG_SIZES.items():
            v = config.get(key)
            if type(v) is int:
                contract.sizes[size] = (v, f"meta.model.config.{key}")
        if "n_layers" in contract.sizes:
            contract.sizes["L1"] = (contract.sizes["n_layers"][0] + 1, "n_layers + 1")
    attention = _get(meta, ("attention",))
    if isinstance(attention, dict):
        for key, size in (("n_heads", "n_heads"), ("n_kv_heads", "n_kv_heads")):
            v = attention.get(key)
            known = contract.sizes.get(size)
            if type(v) is int and known is not None and known[0] != v:
                raise contract.fail(f"meta.attention.{key} is {v}, but {known[1]} says {known[0]}")
            if type(v) is int:
                contract.sizes.setdefault(size, (v, f"meta.attention.{key}"))
        layers, n_layers = attention.get("layers"), contract.sizes.get("n_layers")
        if isinstance(layers, list) and n_layers is not None and len(layers) != n_layers[0]:
            raise contract.fail(f"meta.attention.layers has {len(layers)} entries, expected one per layer "
                                f"({n_layers[0]}, {n_layers[1]})")


def check_run(info: dict, contract: Contract) -> None:
    rid = info["id"]
    tokens = info.get("tokens", [])
    vocab = contract.sizes.get("d_vocab", (None,))[0]
    n = len(tokens) if isinstance(tokens, list) else 0
    for key, check in _run_fields(n, vocab):
        if key not in info:
            continue
        wanted = check(info[key])
        if wanted is not None:
            raise contract.fail(f"run {rid}: {key} is {_brief(info[key])}, expected {wanted}")


def check_recording(reader: TraceReader) -> Contract:
    """Check a trace's metadata, every run's information and every tensor's shape and dtype (index only)."""
    contract = Contract(reader.path)
    meta = reader.meta
    check_meta(meta, contract)
    n_layers = contract.sizes.get("n_layers", (None,))[0]
    runs = reader.runs
    for info in runs:
        check_run(info, contract)
    by_run: dict[int, list[TensorInfo]] = {}
    for t in reader.tensors():
        by_run.setdefault(t.run, []).append(t)
    # Kit weights first: they fix the model's sizes when the config does not.
    check_kit_tensors(by_run.get(WEIGHTS_RUN, []), KIT_PREFIX, contract, "the bundled kit")
    for info in runs:
        rid = info["id"]
        tokens = info.get("tokens", [])
        sizes = dict(contract.sizes)
        sizes["n"] = (len(tokens), f"run {rid} has {len(tokens)} tokens")
        unembed = info.get("unembed_strs")
        if isinstance(unembed, list):
            sizes["m"] = (len(unembed), f"run {rid} has {len(unembed)} unembed_strs")
        for t in by_run.get(rid, []):
            _check_layer(t.name, n_layers, contract, f"run {rid}: tensor {t.name!r}")
            for pattern, shape in _RUN_RE:
                if pattern.fullmatch(t.name):
                    contract.check_tensor(t, shape, sizes, f"run {rid}: tensor {t.name!r}")
                    break
        # Model sizes learnt from this run hold for every run (the same model recorded them).
        for k, v in sizes.items():
            if k not in _PER_RUN:
                contract.sizes.setdefault(k, v)
    return contract


def check_kit_tensors(infos: list[TensorInfo], prefix: str, contract: Contract, where: str) -> None:
    """The kit's weights (names after ``prefix``) against the contract's sizes."""
    for t in infos:
        if not t.name.startswith(prefix):
            continue
        short = t.name[len(prefix):]
        for pattern, shape in _KIT_RE:
            if pattern.fullmatch(short):
                contract.check_tensor(t, shape, contract.sizes, f"{where}: tensor {short!r}")
                break
    n_layers = contract.sizes.get("n_layers")
    if n_layers is not None:
        contract.sizes.setdefault("L1", (n_layers[0] + 1, "n_layers + 1"))


def check_kit(reader: TraceReader, contract: Contract) -> None:
    """A cached kit file (tensors at WEIGHTS_RUN without prefix, vocabulary in its meta) for this trace."""
    kit = Contract(reader.path, dict(contract.sizes))
    vocab = _get(reader.meta, ("vocab",))
    if vocab is not _MISSING and str_list(vocab) is not None:
        raise kit.fail(f"meta.vocab is {_brief(vocab)}, expected a list of strings")
    ref = _get(reader.meta, ("kit",))
    if ref is not _MISSING and mapping(ref) is not None:
        raise kit.fail(f"meta.kit is {_brief(ref)}, expected a map")
    check_kit_tensors(reader.tensors(WEIGHTS_RUN), "", kit, "the model kit")


def _check_layer(name: str, n_layers: int | None, contract: Contract, who: str) -> None:
    m = _LAYER.match(name)
    if m and n_layers is not None and int(m.group(1)) >= n_layers:
        raise contract.fail(f"{who} names layer {m.group(1)}, but meta.model.config.n_layers is {n_layers}")


def _brief(v) -> str:
    """A value as an error message shows it: type and a short repr."""
    r = repr(v)
    if len(r) > 60:
        r = r[:57] + "..."
    return f"{type(v).__name__} {shown(r)}" if v is not None else "null"
