"""`HexRayServer`: the language server, and `create_server()` which wires the feature modules.

One model under every feature: `DocumentStore` (what the editor has open) and `TraceStore`
(traces on disk, loaded off the event loop), joined by `HexRayServer.status(doc)`. The feature
modules (`hover`, `inlay_hints`, `diagnostics`, `code_lens`, `commands`) hold the logic; this
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
import gc
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from lsprotocol import types as t
from pygls.lsp.server import LanguageServer

from hexray_core import __version__

from . import settings as settings_mod
from .documents import Document, DocumentStore, fs_path, is_served, unusable_reason
from .protocol import HexRayProtocol
from .settings import Settings
from .worker import WorkerClient

log = logging.getLogger("hexray_lsp")

POLL_SECONDS = 1.0
RECORD = "hexray.recordTrace"
CANCEL = "hexray.cancelRecording"
RESTART = "hexray.restartWorker"
STATUS = "hexray.status"


class HexRayServer(LanguageServer):
    def __init__(self):
        # Full sync: pygls' incremental sync splits lines with str.splitlines (see line_index).
        super().__init__("hexray-lsp", __version__, text_document_sync_kind=t.TextDocumentSyncKind.Full,
                         protocol_cls=HexRayProtocol)
        self.settings = Settings()
        self.docs = DocumentStore()
        self.trace_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hexray-trace")
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

            self._traces = TraceStore(self.trace_executor, on_change=self._trace_changed)
        return self._traces

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
    from . import code_lens, commands, diagnostics, hover, inlay_hints, line_index, traces  # noqa: F401

    gc.collect()
    gc.freeze()


# ==========================================================================================
# wiring
# ==========================================================================================


def create_server() -> HexRayServer:
    server = HexRayServer()

    @server.feature(t.INITIALIZE)
    def on_initialize(ls: HexRayServer, params: t.InitializeParams):
        opts = params.initialization_options
        if opts is not None:
            ls.apply_settings(opts)

    @server.feature(t.INITIALIZED)
    async def on_initialized(ls: HexRayServer, params: t.InitializedParams):
        log.info("initialized: position encoding %s, roots %s", ls.encoding, ls.roots())
        ls.trace_executor.submit(_warm_imports)
        ls.worker.cwd = (ls.roots() or [None])[0]
        ls._poll_task = asyncio.ensure_future(ls.poll())
        asyncio.ensure_future(ls.watch_trace_files())
        await ls.pull_settings()
        if ls.settings.record_on_save:
            asyncio.ensure_future(ls.preload_worker())

    @server.feature(t.WORKSPACE_DID_CHANGE_CONFIGURATION)
    async def on_config(ls: HexRayServer, params: t.DidChangeConfigurationParams):
        raw = params.settings
        if isinstance(raw, dict) and (settings_mod.SECTION in raw or "settings" in raw):
            ls.apply_settings(raw)
        else:
            await ls.pull_settings()

    @server.feature(t.TEXT_DOCUMENT_DID_OPEN)
    async def did_open(ls: HexRayServer, params: t.DidOpenTextDocumentParams):
        item = params.text_document
        ls.docs.open(item.uri, item.text, item.version, item.language_id)
        await ls.publish_after_check(item.uri)

    @server.feature(t.TEXT_DOCUMENT_DID_CHANGE)
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

    @server.feature(t.TEXT_DOCUMENT_DID_SAVE)
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

    @server.feature(t.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: HexRayServer, params: t.DidCloseTextDocumentParams):
        uri = params.text_document.uri
        ls.docs.close(uri)
        timer = ls.save_timers.pop(uri, None)
        if timer is not None:
            timer.cancel()
        ls.record_errors.pop(uri, None)
        if ls._published.pop(uri, None) is not None:
            ls._send_diagnostics(uri, None, [])

    @server.feature(t.WORKSPACE_DID_CHANGE_WATCHED_FILES)
    def watched(ls: HexRayServer, params: t.DidChangeWatchedFilesParams):
        for ev in params.changes:
            p = fs_path(ev.uri)
            if p:
                ls.traces.check(p)

    @server.feature(t.SHUTDOWN)
    async def on_shutdown(ls: HexRayServer, params):
        if ls._poll_task is not None:
            ls._poll_task.cancel()
        for rec in list(ls.recordings.values()):
            rec.cancel()
        await ls.worker.stop("the language server is shutting down")
        ls.trace_executor.shutdown(wait=False, cancel_futures=True)
        if ls._traces is not None:
            ls._traces.close()

    # -- features (modules imported on first use) -------------------------------------------------

    @server.feature(t.TEXT_DOCUMENT_HOVER)
    async def on_hover(ls: HexRayServer, params: t.HoverParams):
        from .hover import hover

        t0 = time.perf_counter()
        try:
            return await hover(ls, params)
        except Exception:  # a hover is never worth an error popup
            log.exception("hover failed")
            return None
        finally:
            _slow("hover", t0)

    @server.feature(t.TEXT_DOCUMENT_INLAY_HINT, t.InlayHintOptions(resolve_provider=True))
    async def on_inlay_hints(ls: HexRayServer, params: t.InlayHintParams):
        from .inlay_hints import inlay_hints

        t0 = time.perf_counter()
        try:
            return await inlay_hints(ls, params)
        except Exception:
            log.exception("inlay hints failed")
            return []
        finally:
            _slow("inlay hints", t0)

    @server.feature(t.INLAY_HINT_RESOLVE)
    def on_inlay_hint_resolve(ls: HexRayServer, hint: t.InlayHint):
        from .inlay_hints import resolve

        try:
            return resolve(ls, hint)
        except Exception:
            log.exception("inlay hint resolve failed")
            return hint

    @server.feature(t.TEXT_DOCUMENT_CODE_LENS)
    def on_code_lens(ls: HexRayServer, params: t.CodeLensParams):
        from .code_lens import lenses

        try:
            return lenses(ls, params.text_document.uri)
        except Exception:
            log.exception("code lens failed")
            return []

    @server.feature(t.TEXT_DOCUMENT_CODE_ACTION, t.CodeActionOptions(code_action_kinds=[t.CodeActionKind.QuickFix]))
    def on_code_action(ls: HexRayServer, params: t.CodeActionParams):
        from .commands import code_actions

        try:
            return code_actions(ls, params)
        except Exception:
            log.exception("code actions failed")
            return None

    @server.command(RECORD)
    async def record_cmd(ls: HexRayServer, *args):
        from .commands import record_command

        return await record_command(ls, args)

    @server.command(CANCEL)
    def cancel_cmd(ls: HexRayServer, *args):
        from .commands import cancel_command

        return cancel_command(ls, args)

    @server.command(RESTART)
    async def restart_cmd(ls: HexRayServer, *args):
        from .commands import restart_command

        return await restart_command(ls, args)

    @server.command(STATUS)
    def status_cmd(ls: HexRayServer, *args):
        from .commands import status_report

        return status_report(ls)

    return server
