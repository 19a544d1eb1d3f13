"""One recorded run of a trace, seen from a document: tokens, spans and per-token figures.

A `TraceView` is built off the event loop (``build_view``: open the trace, pick the runs,
precompute every token's probability, rank, surprisal and top contributor, warm the tensors a
hover reads, source attribution's included) and is then used only from the event loop, so the
replay `Trace` it wraps is never touched by two threads at once.

Token ``i`` is "predicted" at position ``i - 1``: its probability is
``exp(next_logit[i-1] - logsumexp[i-1])`` and its rank is its place in that position's recorded
top-k. Its top contributor is the component with the largest |direct logit attribution| to its
logit at position ``i - 1``, computed for all tokens at once by replay's `next_token_attributions`
(the primitive the CLI, CoT and diff use too).
"""

from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass, field

import numpy as np

from hexray_core.errors import HexRayError
from hexray_core.replay import Trace
from hexray_core.replay.attribution import next_token_attributions
from hexray_core.replay.sources import source_attribution
from hexray_core.replay.tokentext import bytes_text, quote
from trace_format import TraceFormatError

LN2 = math.log(2.0)


class TraceUnreadable(Exception):
    """The file is not a trace this server can show (corrupt, truncated, unsupported, not a recording)."""


def file_signature(path: str) -> tuple[int, int, int] | None:
    """(mtime_ns, size, inode) of a file, None when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@dataclass
class RunView:
    """One run: its prompt as the document should read, tokens with spans, per-token figures."""

    index: int  # run index in the trace
    text: str  # the prompt text (without any generated continuation)
    tokens: np.ndarray  # int64 [n] all tokens of the run (BOS included)
    token_strs: list[str]
    starts: np.ndarray  # int64 [n] code point span start, -1 for special tokens
    ends: np.ndarray
    byte_spans: list | None
    shown: np.ndarray  # indices of the tokens shown in the document, in order (real spans in the prompt)
    prob: np.ndarray  # float64 [n] probability the model gave token i at i-1; NaN when nothing predicted it
    rank: np.ndarray  # int64 [n] 1-based rank in the recorded top-k, 0 when outside it (or unknown)
    top_label: list[str | None]  # top contributor of token i
    top_share: np.ndarray  # its share of sum |contributions|
    # derived for lookups, over `shown`
    shown_starts: list[int] = field(default_factory=list)
    shown_ends: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.shown_starts = [int(self.starts[i]) for i in self.shown]
        self.shown_ends = [int(self.ends[i]) for i in self.shown]

    @property
    def surprisal(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.log2(self.prob)

    def tokens_at(self, offset: int) -> list[int]:
        """Token indices whose span contains ``offset`` (several when tokens split one character)."""
        lo = bisect.bisect_right(self.shown_ends, offset)
        hi = bisect.bisect_right(self.shown_starts, offset)
        return [int(self.shown[j]) for j in range(lo, hi) if self.shown_starts[j] <= offset < self.shown_ends[j]]

    def tokens_in(self, lo: int, hi: int) -> tuple[int, int]:
        """Slice [a, b) of `shown` whose token ends fall in [lo, hi]."""
        return bisect.bisect_left(self.shown_ends, lo), bisect.bisect_right(self.shown_ends, hi)


@dataclass
class TraceView:
    path: str
    signature: tuple | None
    trace: Trace
    runs: list[RunView]
    by_text: dict[str, int]  # prompt text -> index into runs
    model_name: str
    created: str
    kit_available: bool
    kit_message: str | None
    contributors_available: bool
    generation: int  # bumps every time a view is built, so cached results can tell views apart

    def run_for(self, text: str) -> RunView | None:
        i = self.by_text.get(text)
        return None if i is None else self.runs[i]

    def closest_run(self, text: str) -> tuple[RunView, int]:
        """The run whose prompt shares the longest prefix with ``text``, and that prefix's length."""
        best, best_n = self.runs[0], -1
        for rv in self.runs:
            n = common_prefix(rv.text, text)
            if n > best_n:
                best, best_n = rv, n
        return best, best_n

    def close(self) -> None:
        try:
            self.trace.close()
        except Exception:  # closing never matters more than what the user is doing
            pass


def common_prefix(a: str, b: str) -> int:
    """Length of the common prefix of two strings (binary search over C-level slice compares)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


_generation = 0


def build_view(path: str) -> TraceView:
    """Open a trace and precompute what hovers and hints show. Runs in a worker thread.

    Raises `TraceUnreadable` with a message fit for a diagnostic.
    """
    global _generation
    sig = file_signature(path)
    try:
        trace = Trace(path)
    except (TraceFormatError, HexRayError, OSError, ValueError, KeyError, TypeError) as e:
        raise TraceUnreadable(str(e)) from e
    try:
        runs = [_build_run(trace, i) for i in range(len(trace.runs))]
        kit = None
        kit_message = None
        try:
            kit = trace.kit
        except (TraceFormatError, OSError, ValueError) as e:  # a broken kit file must not hide the trace
            kit_message = f"the model kit could not be read: {e}"
        if kit is None and kit_message is None:
            sha = str((trace.meta.get("kit") or {}).get("sha256", ""))[:16]
            kit_message = (f"the model kit{' ' + sha if sha else ''} of {trace.model_name} is neither bundled in the "
                           "trace nor in the kit cache: per-head attribution and exact ranks outside the recorded "
                           "top-k are not available (record with the option bundle, or once on this machine)")
        if kit is not None:
            _warm_kit(kit)
            for rv in runs:
                _warm_sources(trace, rv)
    except TraceUnreadable:
        trace.close()
        raise
    except (TraceFormatError, HexRayError, OSError, ValueError, KeyError, TypeError, IndexError) as e:
        trace.close()
        raise TraceUnreadable(f"{path}: {e}") from e
    _generation += 1
    meta = trace.meta
    return TraceView(
        path=path, signature=sig, trace=trace, runs=runs,
        by_text={rv.text: i for i, rv in reversed(list(enumerate(runs)))},
        model_name=trace.model_name, created=str(meta.get("closed") or meta.get("created") or ""),
        kit_available=kit is not None, kit_message=kit_message,
        contributors_available=all(any(lbl is not None for lbl in rv.top_label) or len(rv.shown) < 2 for rv in runs),
        generation=_generation,
    )


def _warm_kit(kit) -> None:
    for name in ("W_O", "b_O"):
        try:
            if kit.has(name):
                kit[name]
        except (TraceFormatError, OSError, ValueError):
            pass


def _warm_sources(trace: Trace, rv: RunView) -> None:
    """Read (and keep in the decode cache) what a hover's source attribution reads: hook_v and q/k."""
    if len(rv.tokens) < 2:
        return
    try:
        source_attribution(trace, position=len(rv.tokens) - 2, run=rv.index, target=int(rv.tokens[-1]))
    except (HexRayError, TraceFormatError, KeyError, ValueError, IndexError):
        pass  # no hook_v (an older trace): hovers say so, highlights are empty


def _build_run(trace: Trace, index: int) -> RunView:
    run = trace.runs[index]
    n = run.n_tokens
    tokens = np.asarray(run.tokens, dtype=np.int64)
    spans = np.asarray(run.char_spans if run.char_spans else [(-1, -1)] * n, dtype=np.int64).reshape(-1, 2)
    if spans.shape[0] != n:
        raise TraceUnreadable(f"{trace.path}: run {run.id} has {n} tokens but {spans.shape[0]} character spans")
    starts, ends = spans[:, 0].copy(), spans[:, 1].copy()
    text = run.prompt
    n_prompt = min(run.n_prompt_tokens, n)
    if n_prompt < n:  # a continuation was generated: the document holds the prompt only
        gen_starts = [int(s) for s in starts[n_prompt:] if s >= 0]
        if gen_starts:
            text = text[:min(gen_starts)]
    valid = (starts >= 0) & (ends > starts) & (ends <= len(text))
    valid[n_prompt:] = False
    # A character can only be covered by tokens in order; drop anything that would go backwards.
    shown = []
    last_start = -1
    for i in np.nonzero(valid)[0]:
        if starts[i] >= last_start:
            shown.append(int(i))
            last_start = int(starts[i])
    shown_arr = np.asarray(shown, dtype=np.int64)

    prob = np.full(n, np.nan)
    rank = np.zeros(n, dtype=np.int64)
    rid = index  # replay's tensor lookups take the run's index
    if n > 1:
        lse = trace.tensor("hexray.logsumexp", rid).astype(np.float64) if trace.has("hexray.logsumexp", rid) else None
        nxt = trace.tensor("hexray.next_logit", rid).astype(np.float64) if trace.has("hexray.next_logit", rid) else None
        ids = trace.tensor("hexray.topk_ids", rid) if trace.has("hexray.topk_ids", rid) else None
        if ids is not None:
            trace.tensor("hexray.topk_logits", rid)  # warm: hovers list the top predictions
            hit = ids[:-1] == tokens[1:, None]
            found = hit.any(axis=1)
            rank[1:] = np.where(found, hit.argmax(axis=1) + 1, 0)
        if lse is not None and nxt is not None:
            prob[1:] = np.exp(nxt[:-1] - lse[:-1])
        elif lse is not None and ids is not None:
            logits = trace.tensor("hexray.topk_logits", rid).astype(np.float64)
            hit = ids[:-1] == tokens[1:, None]
            picked = np.where(hit.any(axis=1), (logits[:-1] * hit).sum(axis=1), np.nan)
            prob[1:] = np.exp(picked - lse[:-1])
        # a prediction made at a special token's position (BOS) still counts; one made *for* a special
        # token does not show anywhere, which `shown` already handles.
    top_label: list[str | None] = [None] * n
    top_share = np.full(n, np.nan)
    try:
        labels, values = contributions_to_next(trace, index)
        if values is not None:
            absv = np.abs(values)  # [C, n-1]
            best = absv.argmax(axis=0)
            denom = absv.sum(axis=0)
            for p in range(n - 1):
                top_label[p + 1] = labels[best[p]]
                top_share[p + 1] = absv[best[p], p] / denom[p] if denom[p] > 0 else np.nan
    except (HexRayError, TraceFormatError, KeyError, ValueError, IndexError):
        pass  # a trace recorded without component hooks: hovers say so, hints fall back
    for name in ("ln_final.hook_scale",) + tuple(f"blocks.{layer}.attn.hook_z" for layer in range(trace.n_layers)):
        if trace.has(name, rid):
            trace.tensor(name, rid)
    return RunView(index=index, text=text, tokens=tokens, token_strs=list(run.token_strs), starts=starts, ends=ends,
                   byte_spans=run.info.get("byte_spans"), shown=shown_arr, prob=prob, rank=rank,
                   top_label=top_label, top_share=top_share)


def contributions_to_next(trace: Trace, run: int) -> tuple[list[str], np.ndarray | None]:
    """Direct logit attribution of every actual next token, by component: labels and values [C, n-1].

    values[c, p] is component c's contribution to the logit of token p+1 at position p (replay's
    `next_token_attributions` without its bias row).
    """
    if trace.run(run).n_tokens < 2:
        return [], None
    labels, values = next_token_attributions(trace, run)
    return labels[:-1], values[:-1]


def token_label(rv: RunView, i: int, text: str | None = None) -> str:
    """The token as quoted text; a token holding part of a character is shown by its bytes."""
    s = rv.token_strs[i] if i < len(rv.token_strs) else f"#{int(rv.tokens[i])}"
    if "\ufffd" in s and rv.byte_spans is not None and text is not None:
        try:
            b0, b1 = (int(x) for x in rv.byte_spans[i])
            if 0 <= b0 < b1:
                return quote(bytes_text(text.encode("utf-8", "surrogatepass")[b0:b1]))
        except (ValueError, TypeError, IndexError):
            pass
    return quote(s)
