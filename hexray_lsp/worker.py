"""The record worker: a subprocess that keeps the model loaded and records traces on request.

The language server never imports torch and never runs the model: it starts this module as
``python -m hexray_lsp.worker`` (with the ``python`` setting's interpreter, which may be another
environment, e.g. one with a GPU) and talks to it in JSON lines over the worker's stdin/stdout.
The worker loads the model once (a name or path through `hexray_core.record.Recorder`, or the
object a ``modelFactory`` returns) and keeps it, so recording again after a save costs about one
forward pass.

Protocol (one JSON object per line):

    server -> worker   {"id": 1, "op": "load",   "config": {...}}
                       {"id": 2, "op": "record", "config": {...}, "text": "...", "output": "/x/name.hxr",
                        "options": {...}}
                       {"op": "cancel", "id": 2}           cancel a queued or running request
                       {"op": "exit"}
    worker -> server   {"id": 2, "event": "progress", "message": "layer 3/12", "percentage": 40}
                       {"id": 2, "ok": true,  "result": {"path": ..., "tokens": ..., "seconds": ...}}
                       {"id": 2, "ok": false, "kind": "cancelled" | "user" | "internal", "error": "..."}

``config`` is ``{"model", "factory", "device", "extra_paths"}``: a request with another config loads
that model first. Requests run one at a time in arrival order. A cancelled request stops at the
next layer boundary of the forward pass (a torch hook raises), or before writing; the trace it
was writing is discarded, so the previous trace stays. The worker exits when its stdin closes,
so it never outlives the server. It runs at a lower CPU priority (``workerNice``, default 10) so
that a forward pass does not slow the server's answers down. Everything the model's libraries
print goes to stderr: stdout carries only the protocol.

`WorkerClient` is the server's side: it starts the process on first use, restarts it when it
has died or when the configuration changes, and turns a crash into an error for the requests
that were waiting, never into a crash of the server.
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import json
import logging
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ==========================================================================================
# server side
# ==========================================================================================


class WorkerError(Exception):
    """A request the worker could not complete."""

    kind = "internal"

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        if kind:
            self.kind = kind


class WorkerCancelled(WorkerError):
    kind = "cancelled"


class WorkerCrashed(WorkerError):
    kind = "crashed"


@dataclass
class _Pending:
    future: asyncio.Future
    on_event: Callable[[dict], None] | None


class WorkerClient:
    """Owns the worker process; `request` sends one request and waits for its answer."""

    def __init__(self, python: str = "", cwd: str | None = None, env: dict | None = None, nice: int = 10,
                 threads: int = 0):
        self.python = python or sys.executable
        self.nice = nice
        self.threads = threads
        self.cwd = cwd
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self._pending: dict[int, _Pending] = {}
        self._next = 0
        self._tasks: list[asyncio.Task] = []
        self._start_lock: asyncio.Lock | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=60)
        self.starts = 0
        self.loaded: dict | None = None  # what the worker said it loaded last

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.alive else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    async def _ensure_started(self) -> None:
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.alive:
                return
            env = dict(os.environ if self.env is None else self.env)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
            env.setdefault("PYTHONUNBUFFERED", "1")
            env["HEXRAY_LSP_WORKER"] = "1"
            env["HEXRAY_WORKER_NICE"] = str(self.nice)
            env["HEXRAY_WORKER_THREADS"] = str(self.threads)
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    self.python, "-m", "hexray_lsp.worker",
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    cwd=self.cwd if self.cwd and os.path.isdir(self.cwd) else None, env=env, limit=1 << 24)
            except OSError as e:
                raise WorkerError(f"cannot start the record worker with {self.python!r}: {e.strerror or e}; "
                                  "set hexray.python to an interpreter with hexray and torch installed",
                                  "user") from None
            self.starts += 1
            self.loaded = None
            self.stderr_tail.clear()
            log.info("record worker started: pid %s (%s)", self.proc.pid, self.python)
            proc = self.proc
            self._tasks = [asyncio.ensure_future(self._read_stdout(proc)),
                           asyncio.ensure_future(self._read_stderr(proc))]

    async def _read_stderr(self, proc) -> None:
        while True:
            try:
                line = await proc.stderr.readline()
            except (ValueError, OSError):
                continue
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            self.stderr_tail.append(text)
            log.debug("worker: %s", text)

    async def _read_stdout(self, proc) -> None:
        while True:
            try:
                line = await proc.stdout.readline()
            except (ValueError, OSError) as e:  # an over-long line: skip it
                log.warning("worker output unreadable: %s", e)
                continue
            if not line:
                break
            try:
                msg = json.loads(line)
            except ValueError:
                log.info("worker said: %s", line[:200])
                continue
            if isinstance(msg, dict):
                self._dispatch(msg)
        rc = await proc.wait()
        if proc is self.proc:
            self.proc = None
        tail = [s for s in self.stderr_tail if s.strip()][-6:]
        why = f"the record worker exited unexpectedly (exit code {rc})"
        if tail:
            why += ": " + " | ".join(tail)[-600:]
        for req_id in list(self._pending):
            p = self._pending.pop(req_id)
            if not p.future.done():
                p.future.set_exception(WorkerCrashed(why))
        if rc not in (0, None):
            log.warning(why)

    def _dispatch(self, msg: dict) -> None:
        req_id = msg.get("id")
        p = self._pending.get(req_id)
        if p is None:
            return
        if msg.get("event") is not None:
            if p.on_event is not None:
                try:
                    p.on_event(msg)
                except Exception:  # a progress callback must not break the protocol
                    log.exception("progress callback failed")
            return
        self._pending.pop(req_id, None)
        if p.future.done():
            return
        if msg.get("ok"):
            result = msg.get("result") or {}
            if isinstance(result, dict) and result.get("model") is not None:
                self.loaded = {"model": result.get("model"), "config": result.get("config")}
            p.future.set_result(result)
        elif msg.get("kind") == "cancelled":
            p.future.set_exception(WorkerCancelled(str(msg.get("error") or "cancelled")))
        else:
            p.future.set_exception(WorkerError(str(msg.get("error") or "the worker failed"), msg.get("kind")))

    def _send(self, obj: dict) -> None:
        if not self.alive or self.proc.stdin is None:
            raise WorkerCrashed("the record worker is not running")
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode("utf-8"))
        except (BrokenPipeError, ConnectionResetError, RuntimeError) as e:
            raise WorkerCrashed(f"the record worker is not running ({e})") from None

    async def submit(self, op: str, params: dict, on_event: Callable[[dict], None] | None = None
                     ) -> tuple[int, asyncio.Future]:
        """Send a request; returns its id (for `cancel`) and a future for its result."""
        await self._ensure_started()
        self._next += 1
        req_id = self._next
        fut = asyncio.get_running_loop().create_future()
        self._pending[req_id] = _Pending(fut, on_event)
        try:
            self._send({"id": req_id, "op": op, **params})
        except WorkerError as e:
            self._pending.pop(req_id, None)
            fut.set_exception(e)
        return req_id, fut

    async def request(self, op: str, params: dict, on_event=None) -> dict:
        _, fut = await self.submit(op, params, on_event)
        return await fut

    def cancel(self, req_id: int) -> None:
        """Cancel a request: its future fails with WorkerCancelled now; the worker stops it soon."""
        p = self._pending.pop(req_id, None)
        if p is not None and not p.future.done():
            p.future.set_exception(WorkerCancelled("cancelled"))
        if self.alive:
            try:
                self._send({"op": "cancel", "id": req_id})
            except WorkerError:
                pass

    async def stop(self, reason: str = "the record worker was stopped") -> None:
        proc = self.proc
        self.proc = None
        for req_id in list(self._pending):
            p = self._pending.pop(req_id)
            if not p.future.done():
                p.future.set_exception(WorkerCancelled(reason))
        if proc is None or proc.returncode is not None:
            return
        try:
            proc.stdin.write(b'{"op": "exit"}\n')
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError, RuntimeError, OSError):
            pass
        try:
            await asyncio.wait_for(proc.wait(), 1.0)
        except asyncio.TimeoutError:
            try:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 2.0)
            except (asyncio.TimeoutError, ProcessLookupError):
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass

    def kill_now(self) -> None:
        """Synchronous last resort (interpreter exit)."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            try:
                proc.kill()
            except (ProcessLookupError, OSError):
                pass


# ==========================================================================================
# worker side (runs in the subprocess; imports torch only through hexray_core.record)
# ==========================================================================================


class _Cancelled(Exception):
    pass


class _Job:
    def __init__(self, msg: dict):
        self.msg = msg
        self.id = msg.get("id")
        self.cancelled = threading.Event()


class _Worker:
    def __init__(self, out):
        self.out = out
        self.lock = threading.Lock()
        self.jobs: queue.Queue = queue.Queue()
        self.cancelled_ids: set = set()
        self.current: _Job | None = None
        self.recorder = None
        self.config_key = None
        self.model_label = None
        self.n_layers = 0
        self._hooks = []

    # -- io --------------------------------------------------------------------------------

    def send(self, obj: dict) -> None:
        line = json.dumps(obj, default=str) + "\n"
        with self.lock:
            self.out.write(line)
            self.out.flush()

    def progress(self, job: _Job, message: str, percentage: int | None = None) -> None:
        msg = {"id": job.id, "event": "progress", "message": message}
        if percentage is not None:
            msg["percentage"] = max(0, min(100, int(percentage)))
        self.send(msg)

    def read_stdin(self) -> None:
        for raw in sys.stdin:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(msg, dict):
                continue
            op = msg.get("op")
            if op == "exit":
                break
            if op == "cancel":
                cid = msg.get("id")
                self.cancelled_ids.add(cid)
                cur = self.current
                if cur is not None and cur.id == cid:
                    cur.cancelled.set()
                continue
            self.jobs.put(_Job(msg))
        # stdin closed (the server is gone) or exit: leave at once, even in the middle of a forward pass
        os._exit(0)

    # -- model -----------------------------------------------------------------------------

    def ensure_model(self, config: dict, job: _Job) -> None:
        key = json.dumps(config, sort_keys=True)
        if self.recorder is not None and key == self.config_key:
            return
        if self.recorder is not None:
            self.recorder = None
            self._remove_hooks()
            import gc

            gc.collect()
        for p in reversed(config.get("extra_paths") or []):
            if p not in sys.path:
                sys.path.insert(0, p)
        model = config.get("model") or "hexray-demo"
        factory = config.get("factory") or ""
        device = config.get("device") or "cpu"
        from hexray_core.record.recorder import Recorder

        _set_threads()

        def say(event, **info):
            if event == "status" and info.get("message"):
                self.progress(job, str(info["message"]), 5)

        t0 = time.perf_counter()
        if factory:
            self.progress(job, f"building the model with {factory}", 2)
            mod_name, _, fn_name = factory.partition(":")
            try:
                fn = getattr(importlib.import_module(mod_name), fn_name)
            except (ImportError, AttributeError) as e:
                raise _UserError(f"hexray.modelFactory {factory!r}: {e}") from None
            obj = fn()
            tokenizer = None
            if isinstance(obj, dict):
                obj, tokenizer = obj.get("model"), obj.get("tokenizer")
            elif isinstance(obj, (tuple, list)) and len(obj) == 2:
                obj, tokenizer = obj
            self.recorder = Recorder(obj, tokenizer=tokenizer)
            self.model_label = factory
        else:
            self.progress(job, f"loading {model} on {device}", 2)
            self.recorder = Recorder(model, device=device, progress=say)
            self.model_label = model
        self.config_key = key
        self._install_hooks()
        sys.stderr.write(f"hexray worker: loaded {self.model_label} in {time.perf_counter() - t0:.1f} s\n")

    def _install_hooks(self) -> None:
        """Per-layer progress and cancellation points: a forward hook on each transformer block."""
        try:
            blocks = list(self.recorder.bridge.blocks)
        except (AttributeError, TypeError):
            return
        self.n_layers = len(blocks)

        def make(i):
            def hook(_module, _inputs, _output):
                job = self.current
                if job is None:
                    return None
                if job.cancelled.is_set():
                    raise _Cancelled()
                self.progress(job, f"layer {i + 1}/{self.n_layers}", 10 + 85 * (i + 1) / max(1, self.n_layers))
                return None
            return hook

        for i, blk in enumerate(blocks):
            try:
                self._hooks.append(blk.register_forward_hook(make(i)))
            except (AttributeError, RuntimeError):
                return

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            try:
                h.remove()
            except Exception:  # a stale handle: nothing to undo
                pass
        self._hooks = []

    # -- requests --------------------------------------------------------------------------

    def result_base(self) -> dict:
        return {"model": self.model_label, "config": self.config_key}

    def do_load(self, job: _Job) -> dict:
        self.ensure_model(job.msg.get("config") or {}, job)
        return {**self.result_base(), "layers": self.n_layers}

    def do_record(self, job: _Job) -> dict:
        msg = job.msg
        text = msg.get("text")
        output = msg.get("output")
        if not isinstance(text, str) or not isinstance(output, str):
            raise _UserError("record needs text and output")
        self.ensure_model(msg.get("config") or {}, job)
        if job.cancelled.is_set():
            raise _Cancelled()
        options = dict(msg.get("options") or {})
        for k in ("progress", "output", "prompts"):
            options.pop(k, None)
        folder = os.path.dirname(os.path.abspath(output))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(output)}.{os.getpid()}-{job.id}.recording.hxr")

        def on_event(event, **info):
            if job.cancelled.is_set():
                raise _Cancelled()
            if event == "run_start":
                self.progress(job, "forward pass", 10)
            elif event == "run_done":
                self.progress(job, f"{info.get('tokens', '?')} tokens recorded", 96)
            elif event == "status" and info.get("message"):
                self.progress(job, str(info["message"]), None)

        self.progress(job, "recording", 8)
        t0 = time.perf_counter()
        try:
            res = self.recorder.record(text, tmp, progress=on_event, **options)
        except TypeError as e:
            if "unexpected keyword" in str(e):
                raise _UserError(f"hexray.recordOptions: {e}") from None
            raise
        try:
            if job.cancelled.is_set():
                raise _Cancelled()
            os.replace(res.path, output)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return {**self.result_base(), "path": output, "tokens": res.tokens, "bytes": res.bytes,
                "seconds": time.perf_counter() - t0}

    def run(self) -> None:
        threading.Thread(target=self.read_stdin, name="hexray-worker-stdin", daemon=True).start()
        while True:
            job = self.jobs.get()
            if job.id in self.cancelled_ids:
                self.send({"id": job.id, "ok": False, "kind": "cancelled", "error": "cancelled"})
                continue
            self.current = job
            try:
                op = job.msg.get("op")
                if op == "load":
                    result = self.do_load(job)
                elif op == "record":
                    result = self.do_record(job)
                elif op == "ping":
                    result = {"pid": os.getpid(), **self.result_base()}
                else:
                    raise _UserError(f"unknown op {op!r}")
                self.send({"id": job.id, "ok": True, "result": result})
            except _Cancelled:
                self.send({"id": job.id, "ok": False, "kind": "cancelled", "error": "cancelled"})
            except _UserError as e:
                self.send({"id": job.id, "ok": False, "kind": "user", "error": str(e)})
            except Exception as e:
                user = type(e).__name__ in ("HexRayError", "TraceFormatError")
                if not user:
                    traceback.print_exc()
                self.send({"id": job.id, "ok": False, "kind": "user" if user else "internal",
                           "error": str(e) if user else f"{type(e).__name__}: {e}"})
            finally:
                self.current = None
                self.cancelled_ids.discard(job.id)


class _UserError(Exception):
    pass


def _set_threads() -> None:
    """torch's CPU threads: ``workerThreads``, or half the cores (at least one) by default.

    On a busy two-core machine two OpenMP threads made a 230-token forward of the demo model take
    0.4-1.2 s instead of 0.08 s with one: the threads spin-wait for a core the server, or anyone
    else, is using.
    """
    import torch

    try:
        n = int(os.environ.get("HEXRAY_WORKER_THREADS", "0"))
    except ValueError:
        n = 0
    if n <= 0:
        n = max(1, (os.cpu_count() or 2) // 2)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def main() -> None:
    # Below the server in CPU priority: a forward pass must not make the editor's hovers wait.
    try:
        os.nice(max(0, min(19, int(os.environ.get("HEXRAY_WORKER_NICE", "10")))))
    except (OSError, ValueError, AttributeError):
        pass
    # The protocol gets a private copy of stdout; fd 1 then points at stderr, so whatever torch,
    # transformers or a model factory prints cannot corrupt it.
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _Worker(proto).run()


if __name__ == "__main__":
    main()
