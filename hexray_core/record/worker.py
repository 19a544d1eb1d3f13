"""The record worker process: keeps the model loaded and records traces on request.

Started by `hexray_lsp.worker.WorkerClient` as ``python -m hexray.record_worker`` (this module's ``main`` with the
dictionary loader plugged in by the composition root; ``python -m hexray_core.record.worker`` runs it without
dictionaries); the protocol is
described in `hexray_lsp.worker`. It belongs to the recorder (it loads the model and imports torch), so the
language server reaches the recorder only through this process and never imports torch itself.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import queue
import sys
import threading
import time
import traceback

log = logging.getLogger(__name__)



class _Cancelled(Exception):
    pass


class _Job:
    def __init__(self, msg: dict):
        self.msg = msg
        self.id = msg.get("id")
        self.cancelled = threading.Event()


def dict_path(base: str, p: str) -> str:
    """A ``dict`` option's path as the worker loads it: ``~`` expanded, a relative folder from the document's
    (``base``) where it is there, anything else (a reference such as hf://...) as given."""
    q = os.path.join(base, os.path.expanduser(p))  # (the expanded path itself when absolute)
    return q if os.path.exists(q) else p


class _Worker:
    def __init__(self, out, dictionaries=None):
        self.out = out
        # dictionaries(recorder, paths) -> recorder.record keywords (features=, extra=): dictionaries are read by
        # the replay side, which this package never imports; `python -m hexray.record_worker` plugs it in
        self.dictionaries = dictionaries
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
        if options.get("interventions"):  # relative file names in specs: from the document's folder
            from .intervene_spec import parse_interventions

            base = msg.get("base_dir")
            options["interventions"] = parse_interventions(options["interventions"],
                                                           base if isinstance(base, str) else None)
        dicts = options.pop("dict", None)
        if dicts:  # --dict: the dictionaries' features stored, and the ones feature interventions name
            if self.dictionaries is None:
                raise _UserError("dictionaries (dict) need the worker started as python -m hexray.record_worker")
            base = msg.get("base_dir")
            paths = [dicts] if isinstance(dicts, str) else list(dicts)
            if not all(isinstance(p, str) for p in paths):
                raise _UserError("dict must be a dictionary path or a list of them")
            if isinstance(base, str):
                paths = [dict_path(base, p) for p in paths]
            options.update(self.dictionaries(self.recorder, paths))  # a bad dictionary: a HexRayError, one line
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


def main(dictionaries=None) -> None:
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
    _Worker(proto, dictionaries).run()


if __name__ == "__main__":
    main()
