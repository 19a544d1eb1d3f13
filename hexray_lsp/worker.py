"""The record worker: a subprocess that keeps the model loaded and records traces on request.

The language server never imports torch and never runs the model: it starts
``python -m hexray.record_worker`` (``hexray_core.record.worker`` with the dictionary loader plugged in; with the
``python`` setting's interpreter, which may be another environment, e.g. one with a GPU) and talks to it in JSON
lines over the worker's stdin/stdout.
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

This module is the server's side, `WorkerClient`: it starts the process on first use, restarts it when it
has died or when the configuration changes, and turns a crash into an error for the requests
that were waiting, never into a crash of the server.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
                    self.python, "-m", "hexray.record_worker",
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
