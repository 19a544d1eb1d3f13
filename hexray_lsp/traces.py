"""Finding a document's trace, loading it off the event loop, and deciding whether it is current.

Where a trace for ``dir/name.prompt`` can be:

    beside   dir/name.hxr
    cache    <workspace folder>/<traceFolder>/<path relative to the workspace folder, suffix .hxr>
             (an absolute traceFolder is used as is; a document outside every workspace folder, or an
             untitled one, goes to $HEXRAY_CACHE/lsp-traces/ under a name derived from its path or URI)

A trace is *fresh* for a document when one of its runs recorded exactly the document's current
text (the prompt part of the run, without any generated continuation), and *stale* otherwise.
A stale trace is never shown as if it were current: hovers and hints come only from a fresh one.

Files are watched by their (mtime, size, inode) signature, checked on every request and by a
periodic poll: a trace rewritten, replaced, corrupted or deleted under an open document is
reloaded or dropped, and the server is told so it can refresh diagnostics and hints.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from hexray_core.kit.store import cache_dir

from .documents import Document
from .settings import Settings
from .trace_view import RunView, TraceUnreadable, TraceView, build_view, common_prefix, file_signature

log = logging.getLogger(__name__)

TRACE_SUFFIX = ".hxr"


def _root_of(path: str, roots: list[str]) -> str | None:
    best = None
    for root in roots:
        r = os.path.normpath(root)
        if path == r or path.startswith(r.rstrip(os.sep) + os.sep):
            if best is None or len(r) > len(best):
                best = r
    return best


def beside_path(doc: Document) -> str | None:
    if not doc.path:
        return None
    return os.path.splitext(doc.path)[0] + TRACE_SUFFIX


def cache_path(doc: Document, settings: Settings, roots: list[str]) -> str:
    folder = os.path.expanduser(settings.trace_folder)
    if doc.path:
        root = _root_of(os.path.normpath(doc.path), roots)
        if root is not None:
            base = folder if os.path.isabs(folder) else os.path.join(root, folder)
            rel = os.path.relpath(doc.path, root)
            return os.path.normpath(os.path.join(base, os.path.splitext(rel)[0] + TRACE_SUFFIX))
        key = hashlib.sha1(doc.path.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        stem = os.path.splitext(os.path.basename(doc.path))[0]
    else:
        key = hashlib.sha1(doc.uri.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        stem = "untitled"
    base = folder if os.path.isabs(folder) else str(cache_dir() / "lsp-traces")
    return os.path.join(base, f"{stem}-{key}{TRACE_SUFFIX}")


def candidate_paths(doc: Document, settings: Settings, roots: list[str]) -> list[str]:
    """Where to look for the document's trace, in order of preference."""
    out = []
    b = beside_path(doc)
    if b:
        out.append(b)
    c = cache_path(doc, settings, roots)
    if c not in out:
        out.append(c)
    return out


def record_path(doc: Document, settings: Settings, roots: list[str]) -> str:
    """Where a new recording of the document goes."""
    if settings.record_to == "beside" and doc.path:
        return beside_path(doc)
    return cache_path(doc, settings, roots)


@dataclass
class TraceStatus:
    state: str  # none | loading | fresh | stale | error
    path: str | None = None
    view: TraceView | None = None
    run: RunView | None = None
    message: str = ""
    diff_offset: int | None = None  # stale: where the document first differs from the recorded text

    @property
    def fresh(self) -> bool:
        return self.state == "fresh"


class _Slot:
    __slots__ = ("path", "signature", "view", "error", "task", "loaded_once")

    def __init__(self, path: str):
        self.path = path
        self.signature: tuple | None = None
        self.view: TraceView | None = None
        self.error: str | None = None
        self.task: asyncio.Future | None = None
        self.loaded_once = False


LOAD_TIMEOUT = 20.0  # seconds before a load that has not finished is reported as an error


def _in_thread(fn, *args) -> asyncio.Future:
    """Run ``fn`` in a thread of its own (daemon): one file that never finishes loading (a hung
    network mount, a hostile trace) cannot hold up the loads of other documents' traces."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(result, exc):
        if fut.done():  # given up on (timeout) or cancelled: nobody will use what it built
            close = getattr(result, "close", None)
            if close is not None:
                close()
        elif exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)

    def work():
        try:
            result, exc = fn(*args), None
        except BaseException as e:  # handed to the loop, which decides what it means
            result, exc = None, e
        try:
            loop.call_soon_threadsafe(settle, result, exc)
        except RuntimeError:  # the loop closed while this load ran
            pass

    threading.Thread(target=work, name=f"hexray-trace-load {os.path.basename(str(args[0]))}", daemon=True).start()
    return fut


class TraceStore:
    """Trace files by path: loaded views, errors, and background (re)loading, each load in its own
    thread and given up after ``load_timeout`` seconds (reported as an error on the document)."""

    def __init__(self, executor: Executor | None = None, on_change: Callable[[str], None] | None = None, *,
                 load_timeout: float = LOAD_TIMEOUT):
        self.on_change = on_change
        self.load_timeout = load_timeout
        self._slots: dict[str, _Slot] = {}

    def _slot(self, path: str) -> _Slot:
        s = self._slots.get(path)
        if s is None:
            s = self._slots[path] = _Slot(path)
        return s

    def check(self, path: str) -> asyncio.Future | None:
        """Compare the file with what is loaded; start a reload when it changed. Returns the load task, if any."""
        s = self._slot(path)
        sig = file_signature(path)
        if s.task is not None and not s.task.done():
            return s.task
        if sig == s.signature and s.loaded_once:
            return None
        if sig is None:  # deleted (or never there)
            changed = s.view is not None or s.error is not None
            self._drop(s)
            s.signature, s.loaded_once = None, True
            if changed and self.on_change:
                self.on_change(path)
            return None
        s.task = task = _in_thread(build_view, path)
        task.add_done_callback(lambda fut, s=s, sig=sig: self._loaded(s, sig, fut))
        asyncio.get_running_loop().call_later(self.load_timeout, self._give_up, task, path)
        return task

    def _give_up(self, task: asyncio.Future, path: str) -> None:
        if not task.done():  # the thread may still finish; its result is then dropped
            task.set_exception(TraceUnreadable(f"{path}: still loading after {self.load_timeout:g} s (a hung file "
                                               "system, or a file that is not a plain trace); gave up"))

    def _drop(self, s: _Slot) -> None:
        if s.view is not None:
            s.view.close()
        s.view, s.error = None, None

    def _loaded(self, s: _Slot, sig: tuple, fut: asyncio.Future) -> None:
        if s.task is fut:
            s.task = None
        if fut.cancelled() or s.task not in (None, fut):
            return
        self._drop(s)
        exc = fut.exception()
        if exc is None:
            view = fut.result()
            s.view = view
            s.signature = view.signature
        elif isinstance(exc, TraceUnreadable):
            s.error = str(exc)
            s.signature = sig
        else:
            log.error("loading %s failed", s.path, exc_info=exc)
            s.error = f"{s.path}: could not be loaded ({type(exc).__name__}: {exc})"
            s.signature = sig
        s.loaded_once = True
        if self.on_change:
            self.on_change(s.path)

    async def ensure(self, paths: list[str], timeout: float = 30.0) -> None:
        """Make sure what is loaded for these paths matches the files (waits for loads it starts)."""
        tasks = [t for t in (self.check(p) for p in paths) if t is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    def is_loading(self, paths: list[str]) -> bool:
        return any((s := self._slots.get(p)) is not None and s.task is not None and not s.task.done() for p in paths)

    def status(self, doc: Document, paths: list[str]) -> TraceStatus:
        """What the document's trace is, from what is loaded now (no I/O)."""
        text = doc.text
        stale: list[_Slot] = []
        errors: list[_Slot] = []
        for p in paths:
            s = self._slots.get(p)
            if s is None:
                continue
            if s.view is not None:
                rv = s.view.run_for(text)
                if rv is not None:
                    return TraceStatus("fresh", p, s.view, rv)
                stale.append(s)
            elif s.error is not None:
                errors.append(s)
        if stale:
            s = max(stale, key=lambda s: (s.signature or (0,))[0])
            rv, n = s.view.closest_run(text)
            return TraceStatus("stale", s.path, s.view, None, diff_offset=n,
                               message=_stale_message(s.path, rv.text, text, n))
        if self.is_loading(paths):
            return TraceStatus("loading", paths[0] if paths else None)
        if errors:
            s = errors[0]
            return TraceStatus("error", s.path, message=s.error or "")
        return TraceStatus("none", paths[0] if paths else None)

    def forget_except(self, keep: set[str]) -> None:
        """Drop the slots (and close the files) of traces no open document looks at."""
        for path in list(self._slots):
            s = self._slots[path]
            if path not in keep and (s.task is None or s.task.done()):
                self._drop(s)
                del self._slots[path]

    def paths(self) -> list[str]:
        return list(self._slots)

    def close(self) -> None:
        for s in self._slots.values():
            self._drop(s)
        self._slots.clear()


def _stale_message(path: str, recorded: str, text: str, n: int) -> str:
    name = os.path.basename(path)
    if n == len(recorded) and n < len(text):
        what = "text was added after the recorded prompt"
    elif n == len(text) and n < len(recorded):
        what = "text was removed from the end of the recorded prompt"
    else:
        what = "the text differs from the recorded prompt"
    return (f"HexRay trace {name} is stale: {what}, so hovers and hints are off until it is recorded again "
            "(command \"HexRay: Record trace\", hexray.recordTrace)")


__all__ = ["TraceStatus", "TraceStore", "beside_path", "cache_path", "candidate_paths", "common_prefix", "record_path"]
