"""`Trace`: a recording opened for analysis (numpy only).

A `Trace` wraps a `TraceReader` with what the analyses need: runs with their tokens, tensors by
hook name as float32 arrays (decoded once, kept in a bounded cache), the model's shape, token
strings, and the model kit when it can be found.
"""

from __future__ import annotations

import collections
import os
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from hexray_core.errors import HexRayError
from trace_format import TraceReader

from .kit import Kit, find_kit
from .validate import check_kit, check_recording

_CACHE_BYTES = 512 << 20


@dataclass(frozen=True)
class Run:  # frozen, yet `labels` is a cached_property: dataclass(frozen) leaves __dict__ writable
    """One recorded prompt: its text and tokens."""

    id: int
    prompt: str
    tokens: list[int]
    token_strs: list[str]
    char_spans: list[tuple[int, int]]
    n_prompt_tokens: int
    info: dict

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

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

    def position(self, pos: int) -> int:
        """Resolve a possibly negative position; out of range is a user error."""
        n = len(self.tokens)
        if not -n <= pos < n:
            raise HexRayError(f"position {pos} is out of range: run {self.id} has {n} tokens (0..{n - 1}, or -1..-{n})")
        return pos % n


class Trace:
    """An opened `.hxr` recording.

    >>> t = hexray.open("trace.hxr")
    >>> t.runs[0].token_strs
    >>> t.tensor("blocks.0.hook_resid_post")          # float32 [n_tokens, d_model]
    >>> t.attribution(position=-1).top(10)
    """

    def __init__(self, path: str | os.PathLike, *, kit: Kit | None = None):
        self.path = os.fspath(path)
        self.reader = TraceReader(self.path)  # a missing, special or damaged file: TraceFormatError
        try:  # what the recording says, against the contract (metadata and index only; validate.py)
            self.contract = check_recording(self.reader)
        except BaseException:
            self.reader.close()
            raise
        self._cache: collections.OrderedDict[tuple[int, str], np.ndarray] = collections.OrderedDict()
        self._cache_bytes = 0
        self._kit = kit
        # Per-run results derived from tensors, kept for the life of the trace (hovers reuse them):
        self._strs: dict[int, dict[int, str]] = {}  # token id -> text known to a run
        self._unembed: dict[int, tuple | None] = {}  # the run's unembedding columns (attribution.py)
        self._stacks: dict[int, tuple] = {}  # the run's component stack (attribution.py)
        self.runs = [self._make_run(r) for r in self.reader.runs]
        if not self.runs:
            raise HexRayError(f"{self.path}: the trace holds no runs (is it a model kit?)")

    def _make_run(self, info: dict) -> Run:
        tokens = [int(t) for t in info.get("tokens", [])]
        strs = list(info.get("token_strs") or [f"#{t}" for t in tokens])
        spans = [tuple(s) for s in info.get("char_spans") or [(-1, -1)] * len(tokens)]
        return Run(int(info["id"]), str(info.get("prompt", "")), tokens, strs, spans,
                   int(info.get("n_prompt_tokens", len(tokens))), info)

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
        run_id = self.run(run).id
        stored = self.stored_name(name, run_id)
        key = (run_id, stored)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        if not self.reader.has(stored, run_id):
            hooks = self.meta.get("hooks") if isinstance(self.meta.get("hooks"), dict) else {}
            raise HexRayError(f"{self.path}: run {run_id} has no tensor {name!r} (recorded hooks: "
                              f"{hooks.get('set', 'unknown')}); record it with --hooks default,{name}")
        arr = self.reader.read(stored, run_id)
        arr.setflags(write=False)
        self._cache[key] = arr
        self._cache_bytes += arr.nbytes
        while self._cache_bytes > _CACHE_BYTES and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes
        return arr

    # -- tokens ----------------------------------------------------------------------------

    def token_str(self, token_id: int, run: int = 0) -> str:
        """Text of a token id, from the run, the run's unembedding table or the kit's vocabulary."""
        r = self.run(run)
        strs = self._known_strs(r.id)
        if token_id in strs:
            return strs[token_id]
        vocab = self.vocab
        if vocab is not None and 0 <= token_id < len(vocab):
            return vocab[token_id]
        return f"#{token_id}"

    def _known_strs(self, run_id: int) -> dict[int, str]:
        if run_id not in self._strs:
            run = self.runs[run_id]
            known = dict(zip(run.tokens, run.token_strs, strict=False))
            strs = run.info.get("unembed_strs")
            if strs is not None and self.reader.has("hexray.unembed_ids", run_id):
                ids = self.tensor("hexray.unembed_ids", run_id)
                known.update(zip((int(i) for i in ids), strs, strict=False))
            self._strs[run_id] = known
        return self._strs[run_id]

    @cached_property
    def vocab(self) -> list[str] | None:
        kit = self.kit
        return kit.vocab if kit is not None else None

    def token_id(self, text_or_id: str | int, run: int = 0, *, literal: bool = False) -> int:
        """Resolve a target given as an id, '#id', or the exact text of one token.

        literal=True: the string is only ever a token's text (a token spelt "#5" or "5" stays itself).
        """
        if isinstance(text_or_id, int):
            return text_or_id
        s = str(text_or_id)
        if not literal and re.fullmatch(r"#\d+", s):
            return int(s[1:])
        for tid, text in self._known_strs(self.run(run).id).items():
            if text == s:
                return tid
        vocab = self.vocab
        if vocab is not None:
            try:
                return vocab.index(s)
            except ValueError:
                pass
        if s.isdigit() and not literal:
            return int(s)
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
                "once on this machine, or copy the kit file into ~/.cache/hexray/kits/"
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

    def __repr__(self) -> str:
        return f"<Trace {self.path}: {self.model_name}, {len(self.runs)} run(s)>"


def open_trace(path: str | os.PathLike) -> Trace:
    """Open a `.hxr` recording for analysis."""
    return Trace(path)
