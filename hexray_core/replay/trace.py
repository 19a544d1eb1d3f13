"""`Trace`: a recording opened for analysis (numpy only).

A `Trace` wraps a `TraceReader` with what the analyses need: runs with their tokens, tensors by
hook name as float32 arrays (decoded once, kept in a bounded cache), the model's shape, token
strings, and the model kit when it can be found.
"""

from __future__ import annotations

import collections
import os
import re
import warnings
from collections.abc import Mapping
from functools import cached_property

import numpy as np

from hexray_core.errors import HexRayError
from hexray_core.kit.reader import Kit, find_kit
from hexray_core.kit.store import kit_folder
from trace_format import TraceReader

from . import display
from .cache import CacheMethods, ModelMethods, get_act_name
from .missing import MissingHook, hook_set
from .tokenizer import TokenizerMethods
from .validate import MAX_VOCAB, check_kit, check_recording

# Decoded tensors kept per trace (HEXRAY_TRACE_CACHE_MB changes it). A short trace never fills it; a 16k-token
# GPT-2-small trace needs ~1.2 GB to keep every layer's k and v, so that a hover's source attribution costs
# ~85 ms instead of ~4.5 s of decoding (bench/sources_bench.py).
_CACHE_BYTES = 2048 << 20


def _cache_budget() -> int:
    """The decode cache's size: a 16k-token GPT-2-small trace needs ~1.2 GB to keep every layer's k and v."""
    value = os.environ.get("HEXRAY_TRACE_CACHE_MB", "").strip()
    if not value:
        return _CACHE_BYTES
    try:
        mb = int(value)
    except ValueError:
        raise HexRayError(f"HEXRAY_TRACE_CACHE_MB must be a whole number of megabytes, not {value!r}") from None
    if mb < 0:
        raise HexRayError(f"HEXRAY_TRACE_CACHE_MB must be 0 or more, not {mb}")
    return mb << 20
_WHOLE_READ_BYTES = 64 << 10  # tensor_rows decodes a smaller tensor whole (and caches it): twice costs nothing


class Run(CacheMethods, Mapping):
    """One recorded prompt, and a TransformerLens ``ActivationCache`` of its forward pass (no batch dim).

    A ``Mapping`` from hook name to tensor, read lazily from the trace: ``run["blocks.0.hook_resid_post"]``,
    TransformerLens shorthand ``run["resid_post", 3]``, ``run["pattern", 0]``, ``run["z", 2, "attn"]``;
    ``keys()`` are the recorded hooks (and names that share a recorded tensor). The cache methods
    (``decompose_resid``, ``logit_attrs``, ...) come from `CacheMethods`. Also the run's text and tokens.
    """

    has_batch_dim = False  # as run_with_cache(..., remove_batch_dim=True)

    def __init__(self, trace: Trace, id: int, prompt: str, tokens: list[int], token_strs: list[str],
                 char_spans: list[tuple[int, int]], n_prompt_tokens: int, info: dict):
        self.trace, self.id, self.prompt, self.tokens, self.token_strs = trace, id, prompt, tokens, token_strs
        self.char_spans, self.n_prompt_tokens, self.info = char_spans, n_prompt_tokens, info
        self._memo: dict = {}

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def str_tokens(self) -> list[str]:
        """The token texts (TransformerLens's ``to_str_tokens`` of the run)."""
        return self.token_strs

    @cached_property
    def labels(self) -> list[str]:
        """Token texts for display: a token that holds only part of a UTF-8 character (decoded as
        U+FFFD) shows its bytes instead, e.g. '\\xe8\\x8b' for the first two bytes of '苹'."""
        spans = self.info.get("byte_spans")
        if not spans or len(spans) != len(self.tokens):
            return self.token_strs
        raw = self.prompt.encode("utf-8")
        out = []
        for text, span in zip(self.token_strs, spans, strict=True):
            start, end = (int(v) for v in span)
            if "\ufffd" in text and 0 <= start < end <= len(raw):
                text = raw[start:end].decode("utf-8", errors="backslashreplace")
            out.append(text)
        return out

    def show(self, position: int | None = None, **kw):
        """The viewer inline in a notebook, opened on this run (the viewer `hexray` plugs in, no server)."""
        return display.show(self.trace, next(i for i, r in enumerate(self.trace.runs) if r is self), position, **kw)

    def _repr_html_(self) -> str | None:
        return self.show()._repr_html_() if display.has_viewer() else None  # None: the notebook shows repr()

    def position(self, pos: int) -> int:
        """Resolve a possibly negative position; out of range is a user error."""
        n = len(self.tokens)
        if not -n <= pos < n:
            raise HexRayError(f"position={pos} is out of range: run {self.id} has {n} tokens (0..{n - 1}, or -1..-{n})")
        return pos % n

    def memo(self, key, build):
        """A value derived from this run's tensors, built once and kept with the run (stacks, tables)."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def forget(self) -> None:
        """Drop what the run derived (``memo``) and its decoded tensors: memory back to what opening costs."""
        self._memo.clear()
        self.trace.forget_tensors(self.id)

    # -- the Mapping over recorded tensors --------------------------------------------------------

    @cached_property
    def _names(self) -> list[str]:
        stored = [n for n in self.trace.reader.names(self.id) if not n.startswith(_NOT_ACTIVATIONS)]
        aliases = self.info.get("aliases")
        aliases = aliases if isinstance(aliases, dict) else {}
        extra = [a for a, t in aliases.items() if isinstance(t, str) and t in stored]
        derived = [n for n in _derivable(self.trace, self.id) if n not in stored]
        computed = [n for n in self._memo.get("computed", ()) if n not in stored]  # compute_head_results()
        return stored + [a for a in extra if a not in stored] + derived + computed

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, key) -> bool:
        try:
            return self.resolve(key) in self._name_set
        except (KeyError, TypeError, ValueError):
            return False

    @cached_property
    def _name_set(self) -> frozenset[str]:
        return frozenset(self._names)

    def resolve(self, key) -> str:
        """The full hook name of a key: a full name, or shorthand as TransformerLens's ``get_act_name``."""
        if isinstance(key, str):
            return key if key in self._name_set else get_act_name(key)
        if isinstance(key, tuple) and key:
            if len(key) > 1 and key[1] is not None and int(key[1]) < 0:  # negative layers count from the end
                key = (key[0], self.trace.n_layers + int(key[1]), *key[2:])
            return get_act_name(*key)
        raise TypeError(f"a run is indexed by a hook name or (name, layer[, layer_type]), not {key!r}")

    def __getitem__(self, key):
        return self.trace.output(self.array(key))

    def array(self, key) -> np.ndarray:
        """A tensor by hook name or shorthand, always as a numpy array (read-only, cached by the trace)."""
        name = self.resolve(key)
        if self.trace.has(name, self.id):
            return self.trace.tensor(name, self.id)
        computed = self._memo.get("computed")
        if computed and name in computed:
            return computed[name]
        derived = _derive(self.trace, self.id, name)
        if derived is not None:
            return derived
        raise MissingHook(self.trace, self.id, name)

    def __eq__(self, other) -> bool:  # a Mapping compares items; two runs are equal only when they are the same
        return self is other

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"<Run {self.id} of {self.trace.path}: {self.n_tokens} tokens, {len(self)} tensors>"

    # -- analyses of this run ---------------------------------------------------------------------

    def attribution(self, position: int = -1, **kw):
        """Direct logit attribution at a position (see `Trace.attribution`)."""
        return self.trace.attribution(position, self.id, **kw)

    def features(self, dictionary, layer: int | None = None):
        """This run's features at ``layer`` (default: the dictionary's last), as sparse rows (``.at(p)``,
        ``.indices``, ``.values``, ``.dense()``): stored by ``hexray record --dict`` or computed from the trace.
        ``dictionary``: a path, hub reference or ``hexray.load_dictionary(...)``."""
        from .features import run_features

        return run_features(self, dictionary, layer)

    def source_attribution(self, pos: int = -1, tokens=None, incorrect_tokens=None):
        """``[n_layers, n_heads, pos + 1]``: how much each source token supplied, through each head, to the
        logit of ``tokens`` at ``pos`` (default: the top prediction; an id or a token's text), minus
        ``incorrect_tokens``'s (a logit difference). Summed over sources: each head's entry of
        ``stack_head_results`` + ``logit_attrs``. See `hexray_core.replay.sources`."""
        from .sources import source_attribution

        def target(tok):  # as logit_attrs: a token's text is literal, never an id
            if tok is None or tok in ("top", "next"):
                return tok
            return self.trace.token_id(tok, self.id, literal=True) if isinstance(tok, str) else int(tok)

        sa = source_attribution(self.trace, position=pos, run=self.id, target=target(tokens),
                                baseline=None if incorrect_tokens is None else target(incorrect_tokens))
        return self._out(sa.values)


_NOT_ACTIVATIONS = ("hexray.", "kit/")  # per-run bookkeeping the recorder adds; not TransformerLens hooks


def _derivable(trace: Trace, run: int) -> list[str]:
    """Hook names a run computes from what it recorded: attention patterns from stored q and k; resid_mid as
    resid_pre + attn_out and resid_post as resid_mid + mlp_out (the sums the block itself computes)."""
    out = [f"blocks.{layer}.attn.hook_pattern" for layer in range(trace.n_layers) if _from_qk(trace, run, layer)]
    for layer in range(trace.n_layers):
        for name in (f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_resid_post"):
            if not trace.has(name, run) and _sum_parts(trace, run, name) is not None:
                out.append(name)
    return out


_RESID_SUM = re.compile(r"blocks\.(\d+)\.hook_resid_(mid|post)")


def _sum_parts(trace: Trace, run: int, name: str) -> tuple[str, str] | None:
    """The two recorded (or derivable) tensors whose sum is ``name``, when there are."""
    m = _RESID_SUM.fullmatch(name)
    if m is None or int(m.group(1)) >= trace.n_layers:
        return None
    layer = int(m.group(1))
    if m.group(2) == "mid":
        parts = (f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_attn_out")
        return parts if all(trace.has(p, run) for p in parts) else None
    mid, mlp = f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_mlp_out"
    if trace.has(mlp, run) and (trace.has(mid, run) or _sum_parts(trace, run, mid) is not None):
        return mid, mlp
    return None


def _from_qk(trace: Trace, run: int, layer: int) -> bool:
    from .attention import attention_source

    try:
        return attention_source(trace, run, layer) == "qk"
    except HexRayError:  # neither a pattern nor q and k: not a key (reading it names what to record)
        return False


def _derive(trace: Trace, run: int, name: str) -> np.ndarray | None:
    parts = _sum_parts(trace, run, name)
    if parts is not None:
        # resid_mid = resid_pre + attn_out, resid_post = resid_mid + mlp_out: the block's own float32 additions,
        # so exact for a float32 trace; from float16 parts within 2^-11 (|a| + |b|) per element (ARCHITECTURE.md)
        r = trace.runs[run]

        def add():
            total = np.add(r.array(parts[0]), r.array(parts[1]), dtype=np.float32)
            total.setflags(write=False)
            return total

        return r.memo(("derived", name), add)
    m = re.fullmatch(r"blocks\.(\d+)\.attn\.hook_pattern", name)
    if m is None or not _from_qk(trace, run, int(m.group(1))):
        return None
    from .attention import attention_pattern

    key = ("pattern", int(m.group(1)))  # quadratic in the context: computed once per run and layer
    arr = trace.runs[run].memo(key, lambda: attention_pattern(trace, run, int(m.group(1))))
    arr.setflags(write=False)
    return arr


class Trace(ModelMethods, TokenizerMethods):
    """An opened `.hxr` recording: a sequence of `Run`s, and a stand-in for the model they came from.

    >>> t = hexray.open("trace.hxr")                  # framework="pt": tensors as torch tensors
    >>> run = t[0]                                    # a Run: a TransformerLens ActivationCache, no model needed
    >>> run["resid_post", 1]                          # float32 [n_tokens, d_model]
    >>> stack, labels = run.decompose_resid(pos_slice=-1, return_labels=True)
    >>> run.logit_attrs(stack, tokens=t.to_single_token(" Paris"))
    >>> t.attribution(position=-1).top(10)            # HexRay's own tables
    """

    def __init__(self, path: str | os.PathLike, *, kit: Kit | None = None, framework: str = "np"):
        if framework not in FRAMEWORKS:
            raise HexRayError(f"framework= must be one of {', '.join(FRAMEWORKS)}, not {framework!r}")
        self.path = os.fspath(path)
        self.framework = framework
        if framework == "pt":
            _torch()  # fail at open, not at the first tensor
        self.reader = TraceReader(self.path)  # a missing, special or damaged file: TraceFormatError
        try:  # what the recording says, against the contract (metadata and index only; validate.py)
            self.contract = check_recording(self.reader)
        except BaseException:
            self.reader.close()
            raise
        self._cache: collections.OrderedDict[tuple[int, str, str | None], np.ndarray] = collections.OrderedDict()
        self._cache_bytes = 0
        self._cache_budget = _cache_budget()
        self._row_reads: set = set()  # tensors tensor_rows has read a row range of once
        self._kit = kit
        self.runs = [self._make_run(r) for r in self.reader.runs]
        if not self.runs:
            raise HexRayError(f"{self.path}: the trace holds no runs (is it a model kit?)")

    def _make_run(self, info: dict) -> Run:
        tokens = [int(t) for t in info.get("tokens", [])]
        strs = list(info.get("token_strs") or [f"#{t}" for t in tokens])
        spans = [tuple(s) for s in info.get("char_spans") or [(-1, -1)] * len(tokens)]
        return Run(self, int(info["id"]), str(info.get("prompt", "")), tokens, strs, spans,
                   int(info.get("n_prompt_tokens", len(tokens))), info)

    def __getitem__(self, i: int) -> Run:
        return self.run(i)

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self):
        return iter(self.runs)

    def output(self, arr: np.ndarray):
        """An array as the trace's framework gives it: numpy, or a torch tensor sharing its memory."""
        if self.framework != "pt" or not isinstance(arr, np.ndarray):
            return arr
        torch = _torch()
        with warnings.catch_warnings():  # cached tensors are read-only views; torch warns it cannot enforce that
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)

    # -- model shape -----------------------------------------------------------------------

    @property
    def meta(self) -> dict:
        return self.reader.meta

    @cached_property
    def config(self) -> dict:
        return dict(self.meta.get("model", {}).get("config", {}))

    @cached_property
    def n_layers(self) -> int:
        if "n_layers" in self.config:
            return int(self.config["n_layers"])
        layers = {int(m.group(1)) for n in self.reader.names(0) if (m := re.match(r"blocks\.(\d+)\.", n))}
        return max(layers) + 1 if layers else 0

    @property
    def model_name(self) -> str:
        return str(self.meta.get("model", {}).get("name", "unknown model"))

    @property
    def uses_layernorm(self) -> bool:
        """LayerNorm centres the residual before scaling; RMSNorm does not."""
        return str(self.config.get("normalization_type", "LN")).upper().startswith("LN")

    @property
    def eps(self) -> float:
        return float(self.config.get("eps", 1e-5))

    # -- runs and tensors ------------------------------------------------------------------

    def run(self, run: int = 0) -> Run:
        if not -len(self.runs) <= run < len(self.runs):
            raise HexRayError(f"{self.path} has {len(self.runs)} run(s); there is no run {run}")
        return self.runs[run]

    def stored_name(self, name: str, run: int = 0) -> str:
        """The name a tensor is stored under: `--hooks full` keeps a hook that carried the very same
        tensor as an earlier one only as an alias (run info "aliases": name -> stored name)."""
        r = self.run(run)
        if self.reader.has(name, r.id):
            return name
        aliases = r.info.get("aliases")
        target = aliases.get(name) if isinstance(aliases, dict) else None
        return target if isinstance(target, str) else name

    def has(self, name: str, run: int = 0) -> bool:
        return self.reader.has(self.stored_name(name, run), self.run(run).id)

    def names(self, run: int = 0) -> list[str]:
        return self.reader.names(self.run(run).id)

    def tensor(self, name: str, run: int = 0) -> np.ndarray:
        """A run's tensor by hook name, as float32 (ints stay ints). Cached; do not modify it."""
        return self._decoded(name, run, layout=None)

    def tensor_by_head(self, name: str, run: int = 0) -> np.ndarray:
        """A ``[n, heads, d]`` tensor (q, k, v, z) as ``[heads, n, d]``, contiguous per head, so that products
        with one head's rows run as matrix products (a strided head of a 16k-token k is ~50x slower).
        Cached instead of the ``[n, heads, d]`` layout; do not modify it."""
        return self._decoded(name, run, layout="by_head")

    def _decoded(self, name: str, run: int, layout: str | None) -> np.ndarray:
        run_id = self.run(run).id
        stored = self.stored_name(name, run_id)
        key = (run_id, stored, layout)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        if not self.reader.has(stored, run_id):
            if not name.startswith(_NOT_ACTIVATIONS):
                raise MissingHook(self, run_id, name)
            raise HexRayError(f"{self.path}: run {run_id} has no tensor {name!r} (recorded hooks: "
                              f"{hook_set(self.meta)})")
        plain = self._cache.get((run_id, stored, None))
        arr = plain if plain is not None else self.reader.read(stored, run_id)
        if layout == "by_head":
            if arr.ndim != 3:
                raise HexRayError(f"{self.path}: {name} has shape {list(arr.shape)}, not [n, heads, d]")
            arr = np.ascontiguousarray(arr.transpose(1, 0, 2))
        arr.setflags(write=False)
        self._cache[key] = arr
        self._cache_bytes += arr.nbytes
        while self._cache_bytes > self._cache_budget and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes
        return arr

    def tensor_rows(self, name: str, run: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a run's tensor: the first time, read from the chunks that hold those rows only
        (one position of a 16k-token trace without decoding it all: a cold `hexray replay`); after that, and
        for small tensors, from the whole tensor decoded once and cached (a hover session)."""
        run_id = self.run(run).id
        stored = self.stored_name(name, run_id)
        key = (run_id, stored, None)
        if key in self._cache or key in self._row_reads or not self.reader.has(stored, run_id) \
                or self.reader.info(stored, run_id).nbytes <= _WHOLE_READ_BYTES:
            return self.tensor(name, run_id)[start:stop]  # the second time: decoded whole, then cached
        self._row_reads.add(key)
        return self.reader.read(stored, run_id, index=slice(start, stop))

    def forget_tensors(self, run: int) -> None:
        """Drop a run's decoded tensors from the cache."""
        for key in [k for k in self._cache if k[0] == run]:
            self._cache_bytes -= self._cache.pop(key).nbytes

    # -- tokens ----------------------------------------------------------------------------

    def token_str(self, token_id: int, run: int = 0) -> str:
        """Text of a token id, from the run, the run's unembedding table or the kit's vocabulary."""
        r = self.run(run)
        strs = self._known_strs(r.id)
        if token_id in strs:
            return strs[token_id]
        extra = self._extra_strs(r.id)
        if token_id in extra:
            return extra[token_id]
        vocab = self.vocab
        if vocab is not None and 0 <= token_id < len(vocab):
            return vocab[token_id]
        return f"#{token_id}"

    def _known_strs(self, run_id: int) -> dict[int, str]:
        run = self.runs[run_id]

        def build() -> dict[int, str]:
            info = run.info
            known: dict[int, str] = {}
            strs = info.get("unembed_strs")
            if isinstance(strs, list) and self.reader.has("hexray.unembed_ids", run_id):
                ids = self.tensor("hexray.unembed_ids", run_id)
                known.update(zip((int(i) for i in ids), map(str, strs), strict=False))
            for item in info.get("partial_token_bytes") or []:  # part of a character: show its bytes
                if isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[1], bytes):
                    known[int(item[0])] = item[1].decode("utf-8", errors="backslashreplace")
            known.update(zip(run.tokens, run.labels, strict=False))
            return known

        return run.memo("token_strs", build)

    def _extra_strs(self, run_id: int) -> dict[int, str]:
        """The logit lens's further token ids and texts (tensors, read on the first miss; recorder.py)."""
        def build() -> dict[int, str]:
            known: dict[int, str] = {}
            if self.reader.has("hexray.extra_token_ids", run_id):
                ids = self.tensor("hexray.extra_token_ids", run_id)
                offsets = self.tensor("hexray.extra_token_offsets", run_id)
                raw = self.reader.read("hexray.extra_token_text", run_id).tobytes()
                if len(offsets) == len(ids) + 1:
                    known = {int(t): raw[int(a):int(b)].decode("utf-8", errors="replace")
                             for t, a, b in zip(ids.tolist(), offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)}
                known.update(self._known_strs(run_id))  # partial characters keep their bytes
            return known

        return self.runs[run_id].memo("extra_token_strs", build)

    @cached_property
    def vocab(self) -> list[str] | None:
        kit = self.kit
        return kit.vocab if kit is not None else None

    def token_id(self, text_or_id: str | int, run: int = 0, *, literal: bool = False) -> int:
        """Resolve a target given as an id, '#id', or the exact text of one token.

        literal=True: the string is only ever a token's text (a token spelt "#5" or "5" stays itself).
        """
        if isinstance(text_or_id, int):
            return _token_in_range(text_or_id, text_or_id)
        s = str(text_or_id)
        if not literal and re.fullmatch(r"#\d+", s):
            return _token_in_range(int(s[1:]) if len(s) < 12 else MAX_VOCAB, s)
        run_id = self.run(run).id
        for tid, text in (*self._known_strs(run_id).items(), *self._extra_strs(run_id).items()):
            if text == s:
                return tid
        vocab = self.vocab
        if vocab is not None:
            try:
                return vocab.index(s)
            except ValueError:
                pass
        if s.isdigit() and not literal:
            return _token_in_range(int(s) if len(s) < 12 else MAX_VOCAB, s)
        hint = "" if vocab is not None else (" (without the model kit only the run's own tokens and predictions "
                                             "are known)")
        raise HexRayError(f"unknown target token {s!r}: it is not a single token of {self.model_name}{hint}")

    # -- model kit -------------------------------------------------------------------------

    @property
    def kit(self) -> Kit | None:
        if self._kit is None:
            kit = find_kit(self.reader)
            if kit is not None and kit.reader is not self.reader:  # a cached kit file: check it first
                check_kit(kit.reader, self.contract)
            self._kit = kit or False
        return self._kit or None

    def require_kit(self, what: str) -> Kit:
        kit = self.kit
        if kit is None:
            ref = self.meta.get("kit", {})
            sha = ref.get("sha256", "unknown")
            raise HexRayError(
                f"{what} needs the model kit {sha[:16]} of {self.model_name}, which is neither bundled in the trace "
                f"nor in the kit cache; record with --bundle, or run `hexray record --model {self.model_name}` "
                f"once on this machine, or copy the kit file into {kit_folder()}"
            )
        return kit

    # -- analyses (thin wrappers so notebooks can discover them) ---------------------------

    def attribution(self, position: int = -1, run: int = 0, **kw):
        from .attribution import direct_logit_attribution

        return direct_logit_attribution(self, position=position, run=run, **kw)

    def logit_lens(self, position: int = -1, run: int = 0, **kw):
        from .lens import logit_lens

        return logit_lens(self, position=position, run=run, **kw)

    def residual(self, run: int = 0):
        from .residual import residual_trace

        return residual_trace(self, run=run)

    def attention(self, position: int = -1, run: int = 0, **kw):
        from .attention import attention_summary

        return attention_summary(self, position=position, run=run, **kw)

    def sources(self, position: int = -1, run: int = 0, **kw):
        """Source attribution at a position: a `SourceAttribution` (values per layer, head and source token)."""
        from .sources import source_attribution

        return source_attribution(self, position=position, run=run, **kw)

    def graph(self, transcoders, position: int = -1, run: int = 0, **kw):
        """The attribution graph of a position (unpruned; ``.prune()``, ``.to_neuronpedia()``, ``.paths()``):
        ``transcoders`` a ``TranscoderSet``, a loaded ``DictionarySet`` or a path (circuit-tracer's folder, or
        anything ``load_dictionary`` reads). See ``replay/graph/``."""
        from .graph import build_graph

        return build_graph(self, transcoders, run=run, position=position, **kw)

    def cot(self, run: int = 0, **kw):
        from .cot import cot_breakdown

        return cot_breakdown(self, run=run, **kw)

    def close(self) -> None:
        self.reader.close()
        self._cache.clear()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def show(self, run: int = 0, position: int | None = None, **kw):
        """The viewer inline in a notebook (tokens, attribution, lens, attention; `display.py`)."""
        return display.show(self, run, position, **kw)

    def _repr_html_(self) -> str | None:
        return self.show()._repr_html_() if display.has_viewer() else None

    def __repr__(self) -> str:
        return f"<Trace {self.path}: {self.model_name}, {len(self.runs)} run(s)>"


FRAMEWORKS = ("np", "pt")


def _torch():
    try:
        import torch
    except ImportError:
        raise HexRayError("framework='pt' needs torch, which is not installed (pip install torch; or open the "
                          "trace with the default framework='np' for numpy arrays)") from None
    return torch


def open_trace(path: str | os.PathLike, framework: str = "np") -> Trace:
    """Open a `.hxr` recording for analysis: numpy arrays, or torch tensors with ``framework="pt"``."""
    return Trace(path, framework=framework)


def _token_in_range(tid: int, given) -> int:
    """A token id no vocabulary can hold ("#99999999999999999999") is refused before it indexes anything."""
    if not 0 <= tid < MAX_VOCAB:
        raise HexRayError(f"target token {given!r} is outside the vocabulary: token ids go from 0 to "
                          f"{MAX_VOCAB - 1:,} at most")
    return tid
