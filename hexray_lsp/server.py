"""`HexRayServer`: the language server, and `create_server()` which wires the feature modules.

One model under every feature: `DocumentStore` (what the editor has open) and `TraceStore`
(traces on disk, loaded off the event loop), joined by `HexRayServer.status(doc)`. The feature
modules (`hover`, `sources`, `inlay_hints`, `diagnostics`, `code_lens`, `commands`) hold the logic; this
module handles the document lifecycle and settings and routes requests to them.

Start-up: only pygls, lsprotocol and the light modules are imported before the ``initialize``
answer; the feature modules (numpy, the replay engine) are imported on first use, and warmed
in a background thread right after ``initialized``.

Concurrency: handlers run on the asyncio loop and never block on the model. Traces load in one
dedicated thread (`hexray-trace`), never pygls' shared pool (it also reads stdin). The model
runs in the record worker process (`worker.py`).
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import gc
import logging
import sys
import threading
import time

from lsprotocol import types as t
from pygls.lsp.server import LanguageServer

from hexray_core import __version__

from . import ids
from . import settings as settings_mod
from .documents import Document, DocumentStore, fs_path, is_served, unusable_reason
from .protocol import HexRayProtocol
from .settings import Settings
from .transport import DEFAULT_MAX_BYTES, MessageLoop, StdinReader, StreamReaderAdapter
from .worker import WorkerClient

log = logging.getLogger("hexray_lsp")

POLL_SECONDS = 1.0
RECORD, CANCEL, RESTART, STATUS = ids.RECORD, ids.CANCEL, ids.RESTART, ids.STATUS  # (kept for importers)


class HexRayServer(LanguageServer):
    def __init__(self, *, max_message_bytes: int = DEFAULT_MAX_BYTES):
        # Full sync: pygls' incremental sync splits lines with str.splitlines (see line_index).
        super().__init__("hexray-lsp", __version__, text_document_sync_kind=t.TextDocumentSyncKind.Full,
                         protocol_cls=HexRayProtocol)
        self.settings = Settings()
        self.docs = DocumentStore()
        self.max_message_bytes = max_message_bytes
        self._traces = None
        self.worker = WorkerClient()
        self.recordings: dict = {}  # uri -> commands.Recording
        self.record_errors: dict[str, str] = {}  # uri -> message of the last failed recording
        self.save_timers: dict[str, asyncio.TimerHandle] = {}
        self.hint_cache: dict = {}
        self._doc_ids: dict[str, int] = {}
        self._uri_of: dict[int, str] = {}
        self._poll_task: asyncio.Task | None = None
        self._refresh_handle: asyncio.Handle | None = None
        self._published: dict[str, tuple] = {}
        atexit.register(self.worker.kill_now)

    @property
    def traces(self):
        if self._traces is None:
            from .traces import TraceStore

            self._traces = TraceStore(on_change=self._trace_changed)
        return self._traces

    # -- transport: pygls' protocol, behind a message loop that bounds and answers everything ---------

    def start_io(self, stdin=None, stdout=None) -> None:
        from pygls.io_ import StdoutWriter

        self._stop_event = threading.Event()
        self.protocol.set_writer(StdoutWriter(stdout or sys.stdout.buffer))
        loop = MessageLoop(StdinReader(stdin or sys.stdin.buffer), self.protocol, max_bytes=self.max_message_bytes)
        try:
            asyncio.run(loop.run(self._stop_event))
        except BrokenPipeError:
            log.error("the connection to the client is lost; shutting down")
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            self.shutdown()

    def start_tcp(self, host: str, port: int) -> None:
        self._stop_event = stop_event = threading.Event()

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
            self.protocol.set_writer(writer)
            loop = MessageLoop(StreamReaderAdapter(reader), self.protocol, max_bytes=self.max_message_bytes)
            await loop.run(stop_event)
            self.shutdown()

        async def serve():
            self._server = await asyncio.start_server(connection, host, port)
            async with self._server:
                await self._server.serve_forever()

        try:
            asyncio.run(serve())
        except (KeyboardInterrupt, SystemExit, asyncio.CancelledError):
            pass
        finally:
            self.shutdown()

    # -- identity ------------------------------------------------------------------------------

    @property
    def encoding(self) -> str:
        try:
            enc = self.workspace.position_encoding
        except RuntimeError:
            return "utf-16"
        enc = getattr(enc, "value", enc)
        return enc if enc in ("utf-8", "utf-16", "utf-32") else "utf-16"

    def doc_id(self, uri: str) -> int:
        i = self._doc_ids.get(uri)
        if i is None:
            i = self._doc_ids[uri] = len(self._doc_ids) + 1
            self._uri_of[i] = uri
        return i

    def uri_of(self, doc_id) -> str | None:
        return self._uri_of.get(doc_id) if isinstance(doc_id, int) else None

    def roots(self) -> list[str]:
        out = []
        try:
            ws = self.workspace
        except RuntimeError:
            return out
        for folder in ws.folders.values():
            p = fs_path(folder.uri)
            if p:
                out.append(p)
        if ws.root_path and ws.root_path not in out:
            out.append(ws.root_path)
        return out

    # -- the model under every feature -----------------------------------------------------------

    def served(self, uri: str) -> Document | None:
        """The open document at ``uri`` if HexRay serves it and can show something for it."""
        doc = self.docs.get(uri)
        if doc is None or not is_served(doc, self.settings) or unusable_reason(doc, self.settings):
            return None
        return doc

    def paths_for(self, doc: Document) -> list[str]:
        from .traces import candidate_paths

        return candidate_paths(doc, self.settings, self.roots())

    async def status(self, doc: Document):
        """The document's trace as of now: checks the files, waits for a (re)load it starts."""
        paths = self.paths_for(doc)
        await self.traces.ensure(paths)
        return self.traces.status(doc, paths)

    def status_now(self, doc: Document):
        return self.traces.status(doc, self.paths_for(doc))

    # -- diagnostics and refreshes ---------------------------------------------------------------

    def publish(self, uri: str) -> None:
        doc = self.docs.get(uri)
        if doc is None:
            return
        if not is_served(doc, self.settings):
            if self._published.pop(uri, None) is not None:
                self._send_diagnostics(uri, doc.version, [])
            return
        from .diagnostics import compute as compute_diagnostics
        from .traces import TraceStatus

        unusable = unusable_reason(doc, self.settings)
        status = TraceStatus("none") if unusable else self.status_now(doc)
        if status.state == "loading":
            return  # published again when the load finishes
        try:
            diags = compute_diagnostics(doc, status, self.settings, self.encoding, unusable=unusable,
                                        record_error=self.record_errors.get(uri))
        except Exception:  # diagnostics must never take the server down
            log.exception("computing diagnostics for %s failed", uri)
            diags = []
        self._published[uri] = (doc.version, len(diags))
        self._send_diagnostics(uri, doc.version, diags)

    def _send_diagnostics(self, uri: str, version, diags) -> None:
        self.text_document_publish_diagnostics(t.PublishDiagnosticsParams(uri=uri, version=version, diagnostics=diags))

    async def publish_after_check(self, uri: str) -> None:
        doc = self.docs.get(uri)
        if doc is None:
            return
        if is_served(doc, self.settings) and not unusable_reason(doc, self.settings):
            await self.traces.ensure(self.paths_for(doc))
        self.publish(uri)

    def request_refresh(self) -> None:
        """Ask the client to pull inlay hints and code lenses again (coalesced)."""
        if self._refresh_handle is not None:
            return
        loop = asyncio.get_running_loop()
        self._refresh_handle = loop.call_soon(self._refresh)

    def _refresh(self) -> None:
        self._refresh_handle = None
        ws = getattr(self.client_capabilities, "workspace", None)
        if ws is None:
            return
        for cap, send in ((ws.inlay_hint, self.workspace_inlay_hint_refresh),
                          (ws.code_lens, self.workspace_code_lens_refresh)):
            if cap is not None and cap.refresh_support:
                try:
                    fut = send(None)
                    if hasattr(fut, "add_done_callback"):
                        fut.add_done_callback(_ignore_result)
                except Exception:  # the client went away; nothing to refresh
                    log.debug("refresh request failed", exc_info=True)

    def _trace_changed(self, path: str) -> None:
        """A trace file was (re)loaded, became unreadable or disappeared."""
        self.hint_cache.clear()
        touched = False
        for doc in self.docs:
            if is_served(doc, self.settings) and path in self.paths_for(doc):
                self.publish(doc.uri)
                touched = True
        if touched:
            self.request_refresh()

    async def poll(self) -> None:
        """Watch the trace files of open documents (written by the worker, the CLI or anyone)."""
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                keep = set()
                for doc in self.docs:
                    if is_served(doc, self.settings) and not unusable_reason(doc, self.settings):
                        for p in self.paths_for(doc):
                            keep.add(p)
                            self.traces.check(p)
                self.traces.forget_except(keep)
            except Exception:  # polling is best effort
                log.exception("trace poll failed")

    # -- settings ------------------------------------------------------------------------------

    def apply_settings(self, raw) -> None:
        new, problems = settings_mod.parse(raw)
        for msg in problems:
            log.warning(msg)
        if problems:
            self.window_show_message(t.ShowMessageParams(type=t.MessageType.Warning,
                                                         message="HexRay settings: " + "; ".join(problems)))
        old = self.settings
        self.settings = new
        if new.worker_key() != old.worker_key():
            self.worker.python = new.python or sys.executable
            self.worker.nice = new.worker_nice
            self.worker.threads = new.worker_threads
            if self.worker.alive:
                asyncio.ensure_future(self.worker.stop("the worker restarts because its settings changed"))
        if new != old:
            self.hint_cache.clear()
            for doc in self.docs:
                self.publish(doc.uri)
            self.request_refresh()
        model_changed = (new.model, new.model_factory, new.device) != (old.model, old.model_factory, old.device)
        started = self._poll_task is not None  # after `initialized`
        if started and new.record_on_save and (not old.record_on_save or model_changed
                                               or new.worker_key() != old.worker_key()):
            asyncio.ensure_future(self.preload_worker())

    async def preload_worker(self) -> None:
        """Start the worker and load the model ahead of the first save."""
        from .commands import worker_config

        try:
            await self.worker.request("load", {"config": worker_config(self.settings)})
        except Exception as e:  # reported again, with context, when a recording needs it
            log.info("preloading the model failed: %s", e)

    async def watch_trace_files(self) -> None:
        """Ask the client to report changes of *.hxr files (the periodic poll stays as a fallback)."""
        ws = getattr(self.client_capabilities, "workspace", None)
        cap = getattr(ws, "did_change_watched_files", None) if ws is not None else None
        if cap is None or not cap.dynamic_registration:
            return
        opts = t.DidChangeWatchedFilesRegistrationOptions(watchers=[t.FileSystemWatcher(glob_pattern="**/*.hxr")])
        try:
            await asyncio.wait_for(self.client_register_capability_async(t.RegistrationParams(registrations=[
                t.Registration(id="hexray-traces", method=t.WORKSPACE_DID_CHANGE_WATCHED_FILES,
                               register_options=opts)])), 10.0)
        except Exception as e:  # polling still notices changes within a second
            log.info("could not register a file watcher: %s", e)

    async def pull_settings(self) -> None:
        ws = getattr(self.client_capabilities, "workspace", None)
        if ws is None or not ws.configuration:
            return
        try:
            res = await asyncio.wait_for(self.workspace_configuration_async(
                t.ConfigurationParams(items=[t.ConfigurationItem(section=settings_mod.SECTION)])), 5.0)
        except Exception as e:  # a client that does not answer keeps the settings it sent at initialize
            log.info("workspace/configuration failed: %s", e)
            return
        if res and isinstance(res[0], dict) and res[0]:
            self.apply_settings(res[0])


def _ignore_result(fut) -> None:
    if not fut.cancelled():
        fut.exception()


def _slow(what: str, t0: float, limit_ms: float = 50.0) -> None:
    ms = (time.perf_counter() - t0) * 1000
    if ms > limit_ms:
        log.info("%s took %.0f ms", what, ms)


def _warm_imports() -> None:
    """Import the feature modules (numpy, replay) in the background right after the handshake.

    Then freeze what exists (modules, classes, functions: ~70,000 objects) out of the cyclic
    garbage collector's view: a full collection over them took ~100 ms on a busy machine, a
    pause a hover would otherwise hit now and then.
    """
    from . import code_lens, commands, diagnostics, hover, inlay_hints, line_index, sources, traces  # noqa: F401

    gc.collect()
    gc.freeze()


# ==========================================================================================
# handlers: module-level functions, registered by create_server
# ==========================================================================================

_FEATURES: list[tuple[str, object, object]] = []  # (LSP method, options, handler)
_COMMANDS: list[tuple[str, object]] = []  # (command id, handler)


def feature(method: str, options=None):
    def register(fn):
        _FEATURES.append((method, options, fn))
        return fn
    return register


def command(name: str):
    def register(fn):
        _COMMANDS.append((name, fn))
        return fn
    return register


def _failed(what: str, e: Exception) -> None:
    """One line per failure (bad params sent in a loop must not fill the log); the traceback at debug level."""
    log.warning("%s failed: %s: %s", what, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
    log.debug("%s failed", what, exc_info=True)


def guarded(what: str, default=None):
    """A feature that must never take the server down or pop up an error: an exception is logged and
    answered with ``default()`` (or ``default``); a slow answer is logged."""
    def wrap(fn):
        fallback = default if callable(default) else (lambda _params: default)

        if asyncio.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def run_async(ls: HexRayServer, params):
                t0 = time.perf_counter()
                try:
                    return await fn(ls, params)
                except Exception as e:
                    _failed(what, e)
                    return fallback(params)
                finally:
                    _slow(what, t0)
            return run_async

        @functools.wraps(fn)
        def run(ls: HexRayServer, params):
            t0 = time.perf_counter()
            try:
                return fn(ls, params)
            except Exception as e:
                _failed(what, e)
                return fallback(params)
            finally:
                _slow(what, t0)
        return run
    return wrap


@feature(t.INITIALIZE)
def on_initialize(ls: HexRayServer, params: t.InitializeParams):
    opts = params.initialization_options
    if opts is not None:
        ls.apply_settings(opts)


@feature(t.INITIALIZED)
async def on_initialized(ls: HexRayServer, params: t.InitializedParams):
    log.info("initialized: position encoding %s, roots %s", ls.encoding, ls.roots())
    threading.Thread(target=_warm_imports, name="hexray-warm", daemon=True).start()
    ls.worker.cwd = (ls.roots() or [None])[0]
    ls._poll_task = asyncio.ensure_future(ls.poll())
    asyncio.ensure_future(ls.watch_trace_files())
    await ls.pull_settings()
    if ls.settings.record_on_save:
        asyncio.ensure_future(ls.preload_worker())


@feature(t.WORKSPACE_DID_CHANGE_CONFIGURATION)
async def on_config(ls: HexRayServer, params: t.DidChangeConfigurationParams):
    raw = params.settings
    if isinstance(raw, dict) and (settings_mod.SECTION in raw or "settings" in raw):
        ls.apply_settings(raw)
    else:
        await ls.pull_settings()


@feature(t.TEXT_DOCUMENT_DID_OPEN)
async def did_open(ls: HexRayServer, params: t.DidOpenTextDocumentParams):
    item = params.text_document
    ls.docs.open(item.uri, item.text, item.version, item.language_id)
    await ls.publish_after_check(item.uri)


@feature(t.TEXT_DOCUMENT_DID_CHANGE)
def did_change(ls: HexRayServer, params: t.DidChangeTextDocumentParams):
    uri = params.text_document.uri
    changes = params.content_changes
    if len(changes) == 1 and isinstance(changes[0], t.TextDocumentContentChangeWholeDocument):
        text = changes[0].text
    else:  # a client that sends ranges anyway: take pygls' copy of the document
        try:
            text = ls.workspace.get_text_document(uri).source
        except Exception:
            return
    if ls.docs.update(uri, text, params.text_document.version) is None:
        return
    ls.record_errors.pop(uri, None)
    ls.publish(uri)


@feature(t.TEXT_DOCUMENT_DID_SAVE)
async def did_save(ls: HexRayServer, params: t.DidSaveTextDocumentParams):
    uri = params.text_document.uri
    doc = ls.docs.get(uri)
    if doc is None:
        return
    if params.text is not None and params.text != doc.text:
        ls.docs.update(uri, params.text, doc.version)
    await ls.publish_after_check(uri)
    if ls.settings.record_on_save and ls.served(uri) is not None:
        from .commands import schedule_record

        schedule_record(ls, uri, ls.settings.record_on_save_delay_ms / 1000.0)


@feature(t.TEXT_DOCUMENT_DID_CLOSE)
def did_close(ls: HexRayServer, params: t.DidCloseTextDocumentParams):
    uri = params.text_document.uri
    ls.docs.close(uri)
    timer = ls.save_timers.pop(uri, None)
    if timer is not None:
        timer.cancel()
    ls.record_errors.pop(uri, None)
    if ls._published.pop(uri, None) is not None:
        ls._send_diagnostics(uri, None, [])


@feature(t.WORKSPACE_DID_CHANGE_WATCHED_FILES)
def watched(ls: HexRayServer, params: t.DidChangeWatchedFilesParams):
    for ev in params.changes:
        p = fs_path(ev.uri)
        if p:
            ls.traces.check(p)


@feature(t.SHUTDOWN)
async def on_shutdown(ls: HexRayServer, params):
    if ls._poll_task is not None:
        ls._poll_task.cancel()
    for rec in list(ls.recordings.values()):
        rec.cancel()
    await ls.worker.stop("the language server is shutting down")
    if ls._traces is not None:
        ls._traces.close()


# -- features (modules imported on first use) ---------------------------------------------------

@feature(t.TEXT_DOCUMENT_HOVER)
@guarded("hover")  # a hover is never worth an error popup
async def on_hover(ls: HexRayServer, params: t.HoverParams):
    from .hover import hover

    return await hover(ls, params)


@feature(t.TEXT_DOCUMENT_DOCUMENT_HIGHLIGHT)
@guarded("document highlight", default=lambda _params: [])
async def on_document_highlight(ls: HexRayServer, params: t.DocumentHighlightParams):
    from .sources import document_highlight

    return await document_highlight(ls, params)


@feature(t.TEXT_DOCUMENT_INLAY_HINT, t.InlayHintOptions(resolve_provider=True))
@guarded("inlay hints", default=lambda _params: [])
async def on_inlay_hints(ls: HexRayServer, params: t.InlayHintParams):
    from .inlay_hints import inlay_hints

    return await inlay_hints(ls, params)


@feature(t.INLAY_HINT_RESOLVE)
@guarded("inlay hint resolve", default=lambda hint: hint)
def on_inlay_hint_resolve(ls: HexRayServer, hint: t.InlayHint):
    from .inlay_hints import resolve

    return resolve(ls, hint)


@feature(t.TEXT_DOCUMENT_CODE_LENS)
@guarded("code lens", default=lambda _params: [])
def on_code_lens(ls: HexRayServer, params: t.CodeLensParams):
    from .code_lens import lenses

    return lenses(ls, params.text_document.uri)


@feature(t.TEXT_DOCUMENT_CODE_ACTION, t.CodeActionOptions(code_action_kinds=[t.CodeActionKind.QuickFix]))
@guarded("code actions")
def on_code_action(ls: HexRayServer, params: t.CodeActionParams):
    from .commands import code_actions

    return code_actions(ls, params)


@command(ids.RECORD)
async def record_cmd(ls: HexRayServer, *args):
    from .commands import record_command

    return await record_command(ls, args)


@command(ids.CANCEL)
def cancel_cmd(ls: HexRayServer, *args):
    from .commands import cancel_command

    return cancel_command(ls, args)


@command(ids.RESTART)
async def restart_cmd(ls: HexRayServer, *args):
    from .commands import restart_command

    return await restart_command(ls, args)


@command(ids.STATUS)
def status_cmd(ls: HexRayServer, *args):
    from .commands import status_report

    return status_report(ls)


def create_server(*, max_message_bytes: int = DEFAULT_MAX_BYTES) -> HexRayServer:
    server = HexRayServer(max_message_bytes=max_message_bytes)
    for method, options, fn in _FEATURES:
        server.feature(method, options)(fn)
    for name, fn in _COMMANDS:
        server.command(name)(fn)
    return server
