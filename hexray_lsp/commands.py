"""Commands: record a document's trace in the worker (with progress and cancellation), and friends.

    hexray.recordTrace      [uri]   record the document's current text; returns {"status": "recorded", ...}
                            [uri, {"interventions": ["L1H2=0", ...]}]   the same with --intervene specs
                            [uri, {"interventions": ["L1F3*8"], "dict": "sae/"}]   feature interventions (--dict)
                            (file names in them relative to the document's folder)
    hexray.cancelRecording  [uri]   cancel the document's recording (all recordings without a uri)
    hexray.restartWorker            stop the worker; the next recording starts a fresh one
    hexray.status                   what the server knows: settings, worker, documents and their traces

A recording snapshots the text, sends it to the worker, reports ``$/progress`` (server-initiated,
cancellable) and, when the trace is written, loads it and refreshes diagnostics, inlay hints and
code lenses. It can be cancelled from the progress UI, by ``$/cancelRequest`` on the command, by
``hexray.cancelRecording``, or by a newer recording of the same document (record on save). A
failure is a message and a diagnostic, never an exception out of the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import sys
import uuid

from lsprotocol import types as t

from .documents import Document, fs_path
from .ids import CANCEL, RECORD, RESTART, SOURCE, STATUS  # noqa: F401 (ids re-exported)
from .traces import record_path
from .worker import WorkerCancelled, WorkerError

log = logging.getLogger(__name__)



def worker_config(settings) -> dict:
    return {"model": settings.model, "factory": settings.model_factory, "device": settings.device,
            "extra_paths": list(settings.extra_paths)}


class Recording:
    """One recording in flight."""

    def __init__(self, ls, uri: str, reason: str):
        self.ls = ls
        self.uri = uri
        self.reason = reason
        self.req_id: int | None = None
        self.cancelled = False
        self.why = "cancelled"
        self.percentage = 0
        self.message = ""
        self.done = asyncio.get_running_loop().create_future()

    def cancel(self, why: str = "cancelled") -> None:
        if self.cancelled:
            return
        self.cancelled = True
        self.why = why
        if self.req_id is not None:
            self.ls.worker.cancel(self.req_id)
        if not self.done.done():
            self.done.set_result(None)


class _Progress:
    """Server-initiated work-done progress, when the client supports it."""

    def __init__(self, ls):
        self.ls = ls
        self.token: str | None = None
        self.last: tuple | None = None

    async def begin(self, title: str, message: str, on_cancel) -> None:
        window = getattr(self.ls.client_capabilities, "window", None)
        if window is None or not window.work_done_progress:
            return
        token = f"hexray-record-{uuid.uuid4().hex[:12]}"
        try:
            await asyncio.wait_for(self.ls.work_done_progress.create_async(token), 5.0)
        except Exception as e:  # no progress UI: record anyway
            log.info("window/workDoneProgress/create failed: %s", e)
            return
        self.token = token
        fut = self.ls.work_done_progress.tokens.get(token)
        if fut is not None:
            fut.add_done_callback(lambda f: f.cancelled() and on_cancel())
        self.ls.work_done_progress.begin(token, t.WorkDoneProgressBegin(title=title, message=message, percentage=0,
                                                                        cancellable=True))

    def report(self, message: str, percentage: int | None) -> None:
        if self.token is None or (message, percentage) == self.last:
            return
        self.last = (message, percentage)
        self.ls.work_done_progress.report(self.token, t.WorkDoneProgressReport(message=message, percentage=percentage,
                                                                               cancellable=True))

    def end(self, message: str) -> None:
        if self.token is None:
            return
        self.ls.work_done_progress.end(self.token, t.WorkDoneProgressEnd(message=message))
        self.ls.work_done_progress.tokens.pop(self.token, None)
        self.token = None


PREFIX_BYTES = 64 << 10  # read first, to refuse a binary file before reading all of it


def _document(ls, uri: str) -> tuple[Document | None, str | None]:
    """The document to record: one the client opened, else a file inside a workspace folder read from
    disk (a regular file, no larger than hexray.maxDocumentBytes, text). (document, None) or (None, why)."""
    doc = ls.docs.get(uri)
    if doc is not None:
        return doc, None
    path = fs_path(uri)  # (decodes %2e%2e: the containment check below is on the resolved path)
    if not path:
        return None, f"{uri} is not open and is not a file"
    real = os.path.realpath(path)
    roots = [os.path.realpath(r) for r in ls.roots()]
    if not any(os.path.commonpath([real, r]) == r for r in roots):
        return None, (f"{uri} is not open and is not inside a workspace folder: HexRay records only documents "
                      "the editor opened or files of the workspace")
    limit = ls.settings.max_document_bytes
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        return None, f"{uri} is not open and cannot be read ({e.strerror or e})"
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, f"{uri} is not open and is not a regular file"
        if st.st_size > limit:
            return None, (f"{uri} is {st.st_size:,} bytes, over hexray.maxDocumentBytes ({limit:,}): HexRay shows "
                          "nothing for it")
        os.set_blocking(fd, True)
        head = f.read(PREFIX_BYTES)
        if b"\0" in head:
            return None, f"{uri} looks binary (it contains NUL bytes): HexRay shows nothing for it"
        data = head + f.read(limit + 1 - len(head))
    if len(data) > limit:  # (grew since fstat)
        return None, f"{uri} is over hexray.maxDocumentBytes ({limit:,})"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, f"{uri} is not open and is not UTF-8 text"
    return Document(uri=uri, text=text, version=None, path=path), None


def _outer_request_future(ls):
    """The future pygls cancels on $/cancelRequest for the executeCommand being handled (if any)."""
    proto = ls.protocol
    try:
        return proto._request_futures.get(proto.msg_id)
    except AttributeError:
        return None


async def record_document(ls, uri: str, reason: str = "command", request_future=None,
                          interventions: list[str] | None = None, dicts: list[str] | None = None) -> dict:
    doc, why = _document(ls, uri)
    if doc is None:
        return _fail(ls, uri, why, reason, diagnostic=False)
    text = doc.text
    if not text.strip():
        return _fail(ls, uri, "the document is empty: there is nothing to record", reason)
    from .documents import unusable_reason

    why_not = unusable_reason(doc, ls.settings)
    if why_not:
        return _fail(ls, uri, why_not, reason)
    output = record_path(doc, ls.settings, ls.roots())
    prev = ls.recordings.get(uri)
    if prev is not None:
        prev.cancel("superseded by a newer recording")
    rec = Recording(ls, uri, reason)
    ls.recordings[uri] = rec
    if request_future is not None:
        request_future.add_done_callback(lambda f: f.cancelled() and rec.cancel())
    progress = _Progress(ls)
    ls.request_refresh()  # code lens: "recording…"
    settings = ls.settings
    try:
        await progress.begin(f"HexRay: recording {doc.name}", f"{settings.model_factory or settings.model}",
                             rec.cancel)
        if rec.cancelled:
            raise WorkerCancelled(rec.why)

        def on_event(msg: dict) -> None:
            rec.message = str(msg.get("message") or "")
            pct = msg.get("percentage")
            if isinstance(pct, (int, float)):
                rec.percentage = int(pct)
            progress.report(rec.message, rec.percentage)

        options = dict(settings.record_options)
        if interventions:
            options["interventions"] = list(interventions)
        if dicts:  # relative to the document's folder, as intervention files are (the worker resolves them)
            options["dict"] = list(dicts)
        path = fs_path(uri)
        req_id, fut = await ls.worker.submit("record", {"config": worker_config(settings), "text": text,
                                                        "output": output, "options": options,
                                                        "base_dir": os.path.dirname(path) if path else None},
                                             on_event)
        rec.req_id = req_id
        if rec.cancelled:
            ls.worker.cancel(req_id)
        await asyncio.wait([fut, rec.done], return_when=asyncio.FIRST_COMPLETED)
        if rec.cancelled and not fut.done():
            ls.worker.cancel(req_id)
        result = await fut
    except WorkerCancelled as e:
        progress.end("cancelled")
        return {"status": "superseded" if "superseded" in rec.why else "cancelled", "message": str(e)}
    except WorkerError as e:
        progress.end("failed")
        return _fail(ls, uri, str(e), reason)
    except Exception as e:  # anything else is a bug, but still only a message
        log.exception("recording %s failed", uri)
        progress.end("failed")
        return _fail(ls, uri, f"{type(e).__name__}: {e}", reason)
    finally:
        if ls.recordings.get(uri) is rec:
            del ls.recordings[uri]
        ls.request_refresh()
    ls.record_errors.pop(uri, None)
    path = result.get("path", output)
    await ls.traces.ensure([path])
    fresh = False
    current = ls.docs.get(uri)
    if current is not None:
        status = ls.status_now(current)
        fresh = status.fresh
        ls.publish(uri)
    ls.hint_cache.clear()
    ls.request_refresh()
    progress.end(f"{result.get('tokens', '?')} tokens in {float(result.get('seconds') or 0):.2f} s")
    return {"status": "recorded", "path": path, "tokens": result.get("tokens"), "seconds": result.get("seconds"),
            "model": result.get("model"), "fresh": fresh}


def _fail(ls, uri: str, message: str, reason: str, diagnostic: bool = True) -> dict:
    log.warning("recording %s failed: %s", uri, message)
    if diagnostic and ls.docs.get(uri) is not None:
        ls.record_errors[uri] = message
        ls.publish(uri)
    if reason == "command":
        ls.window_show_message(t.ShowMessageParams(type=t.MessageType.Error,
                                                   message=f"HexRay: recording failed: {message}"))
    return {"status": "error", "message": message}


def schedule_record(ls, uri: str, delay: float) -> None:
    """Record ``uri`` after ``delay`` seconds, unless another save comes first (debounce)."""
    old = ls.save_timers.pop(uri, None)
    if old is not None:
        old.cancel()
    loop = asyncio.get_running_loop()

    def fire():
        ls.save_timers.pop(uri, None)
        asyncio.ensure_future(record_document(ls, uri, reason="save"))

    ls.save_timers[uri] = loop.call_later(max(0.0, delay), fire)


def status_report(ls) -> dict:
    docs = {}
    for doc in ls.docs:
        st = ls.status_now(doc)
        docs[doc.uri] = {"state": st.state, "trace": st.path, "version": doc.version,
                         "recording": doc.uri in ls.recordings}
    w = ls.worker
    return {
        "server": {"pid": os.getpid(), "python": sys.executable, "torch_imported": "torch" in sys.modules,
                   "position_encoding": ls.encoding},
        "worker": {"pid": w.pid, "alive": w.alive, "starts": w.starts, "python": w.python, "loaded": w.loaded},
        "settings": ls.settings.to_json(),
        "documents": docs,
    }


async def record_command(ls, args) -> dict:
    uri = args[0] if args and isinstance(args[0], str) else None
    if uri is None:
        ls.window_show_message(t.ShowMessageParams(type=t.MessageType.Error,
                                                   message="HexRay: record which document? (pass its URI)"))
        return {"status": "error", "message": "no document URI given"}
    extra = args[1] if len(args) > 1 and isinstance(args[1], dict) else {}
    interventions = extra.get("interventions")
    if interventions is not None and (not isinstance(interventions, list)
                                      or not all(isinstance(s, str) for s in interventions)):
        return _fail(ls, uri, "interventions must be a list of spec strings (e.g. [\"L1H2=0\"])", "command",
                     diagnostic=False)
    dicts = extra.get("dict")
    if isinstance(dicts, str):
        dicts = [dicts]
    if dicts is not None and (not isinstance(dicts, list) or not all(isinstance(s, str) for s in dicts)):
        return _fail(ls, uri, "dict must be a dictionary path or a list of them (e.g. \"sae/\")", "command",
                     diagnostic=False)
    return await record_document(ls, uri, "command", _outer_request_future(ls), interventions=interventions,
                                 dicts=dicts)


def cancel_command(ls, args) -> dict:
    uri = args[0] if args and isinstance(args[0], str) else None
    n = 0
    for u, rec in list(ls.recordings.items()):
        if uri is None or u == uri:
            rec.cancel()
            n += 1
    return {"cancelled": n}


async def restart_command(ls, args) -> dict:
    for rec in list(ls.recordings.values()):
        rec.cancel("the worker restarted")
    await ls.worker.stop("the worker restarted")
    return {"status": "stopped"}


def code_actions(ls, params: t.CodeActionParams):
    uri = params.text_document.uri
    if ls.served(uri) is None:
        return None
    fixable = ("no-trace", "stale-trace", "trace-unreadable", "recording-failed")
    wanted = [d for d in params.context.diagnostics if d.source == SOURCE and d.code in fixable]
    if not wanted:
        return None
    command = t.Command(title="Record trace", command=RECORD, arguments=[uri])
    return [t.CodeAction(title="HexRay: record trace", kind=t.CodeActionKind.QuickFix, diagnostics=wanted,
                         is_preferred=True, command=command)]
