"""Record a dataset of prompts into ``OUT/`` shards plus a manifest, in this process or on Ray.

    from hexray_core.dataset.writer import record_dataset
    record_dataset(rows, "out/", model="hexray-demo")                # one process, shard after shard
    record_dataset(rows, "out/", model="gpt2", ray="auto")           # a Ray Data actor pool, one model each

The layout and its guarantees (atomic shards, fixed shard names, a manifest) are described in
``hexray_core/dataset/layout.py``. Rerunning the same call skips every prompt already recorded.

On Ray, the shards are the rows of a Ray Data dataset mapped by an actor class (``ShardWorker``):
Ray starts ``workers`` actors, each loads the model once (``num_gpus=1`` per actor when the cluster
has GPUs), and each call records one shard with the ordinary ``Recorder``. Ray Data restarts an
actor that dies and retries its shard (``max_restarts=-1``, ``max_task_retries=-1`` are its defaults
for actor pools); the retry writes the same shard name, so nothing is lost or recorded twice.
This module imports neither torch nor ray at module level: the driver of a Ray job needs neither.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass

from hexray_core.dataset import layout as store
from hexray_core.errors import HexRayError
from hexray_core.record.spec import classify, human_bytes

DEFAULT_SHARD_SIZE = 16
MODEL_OPTIONS = ("device", "dtype", "n_devices", "device_map", "trust_remote_code", "revision")
# Recorder.record's defaults, so that dataset.json compares what was recorded, however it was asked for.
RECORD_DEFAULTS = {"hooks": "default", "act_dtype": "auto", "overflow": "f32", "top_k": 20, "generate": 0,
                   "temperature": 0.0, "seed": None, "prepend_bos": None, "bundle": False, "lens": "auto",
                   "attention": "auto", "dicts": []}
# Options added after datasets were first written: a folder whose dataset.json lacks one was recorded the
# way its default records now (it can be resumed without naming it).
LATER_OPTIONS = {k: RECORD_DEFAULTS[k] for k in ("attention", "dicts")}


@dataclass
class DatasetResult:
    out: str
    prompts: int  # rows given
    skipped: int  # already recorded by an earlier run
    recorded: int  # recorded by this call
    shards: int  # shards written by this call
    tokens: int
    bytes: int
    seconds: float
    workers: int
    engine: str  # "process" or "ray"
    manifest: int  # prompts listed in the manifest now

    def summary(self) -> str:
        skipped = f", {self.skipped} already recorded" if self.skipped else ""
        where = f"{self.workers} Ray worker{'s' if self.workers != 1 else ''}" if self.engine == "ray" else "1 process"
        where = f" on {where}" if self.recorded else ""
        return (f"recorded {self.recorded} prompt{'s' if self.recorded != 1 else ''} in {self.shards} "
                f"shard{'s' if self.shards != 1 else ''}{skipped}, {self.tokens} tokens, {human_bytes(self.bytes)} "
                f"in {self.seconds:.1f} s{where} -> {self.out} (manifest: {self.manifest} of {self.prompts} "
                "prompts)")


def model_key(model: str) -> str:
    """What dataset.json remembers of --model: local paths made absolute (Ray workers have another cwd)."""
    source, location = classify(model)
    return location if source in ("local", "gguf") else model


def record_shard(recorder, out: str, name: str, rows: list[store.Row], options: dict,
                 cache_dir: str | None = None, progress=None, extra=None) -> dict:
    """Record one shard: its sidecar first, then its trace (renamed into place when complete).

    ``extra``: the ``RunExtra`` of the options' dictionaries (``shard_extra``), built once per recorder."""
    t0 = time.perf_counter()
    check_rows(recorder, rows, options)
    store.write_sidecar(out, name, rows)
    opts = {k: v for k, v in options.items() if k != "dicts"}
    result = recorder.record([r.prompt for r in rows], os.path.join(store.shards_dir(out), name + ".hxr"),
                             cache_dir=cache_dir, progress=progress, extra=extra, **opts)
    return {"shard": name, "prompts": len(rows), "tokens": result.tokens, "bytes": result.bytes,
            "seconds": time.perf_counter() - t0, "pid": os.getpid(), "host": socket.gethostname()}


def check_rows(recorder, rows: list[store.Row], options: dict) -> None:
    """Each row fits the model's context: a bad row is named by its id and line, not its place in a shard."""
    n_ctx = int(recorder.loaded.n_ctx)
    extra = int(options.get("generate") or 0)
    for r in rows:
        n, exact = count_tokens(recorder, r.prompt, options.get("prepend_bos"), n_ctx)
        if n == 0:
            raise HexRayError(f"prompt id {r.key} (line {r.line}) has no tokens")
        if n + extra > n_ctx:
            more = f" + {extra} to generate" if extra else ""
            cut = PREFIX_CHARS_PER_TOKEN * (n_ctx + 1)
            size = f"{n} tokens" if exact else f"over {n - 1} tokens (its first {cut:,} of {len(r.prompt):,} " \
                                               "characters alone)"
            raise HexRayError(f"prompt id {r.key} (line {r.line}) is {size}{more}, over the model's context of "
                              f"{n_ctx} tokens")


PREFIX_CHARS_PER_TOKEN = 16


def count_tokens(recorder, prompt: str, prepend_bos, n_ctx: int) -> tuple[int, bool]:
    """(tokens, exact): a prompt far longer than the context is judged on a prefix first, since
    tokenizing megabytes of text costs gigabytes (a 10 MB line peaked at 1.8 GB). A cut can change
    at most the tokens at the cut, so a prefix already over the context by two means the whole is over."""
    cut = PREFIX_CHARS_PER_TOKEN * (n_ctx + 1)
    if len(prompt) > cut:
        n = len(recorder.tokenize(prompt[:cut], prepend_bos))
        if n > n_ctx + 1:
            return n, False
    return len(recorder.tokenize(prompt, prepend_bos)), True


def _spec(name: str, rows: list[store.Row]) -> str:
    return json.dumps({"name": name, "rows": [{**r.entry(), "prompt": r.prompt} for r in rows]}, ensure_ascii=False)


def shard_extra(recorder, options: dict):
    """What ``--dict`` adds to each run of every shard (None without dictionaries)."""
    if not options.get("dicts"):
        return None
    from hexray_core.dataset.record_features import run_extra

    return run_extra(recorder, options["dicts"])


def _unspec(spec: str) -> tuple[str, list[store.Row]]:
    d = json.loads(spec)
    return d["name"], [store.Row(r["id"], r["line"], r["prompt"], r["target"], r["baseline"], r["meta"])
                       for r in d["rows"]]


class ShardWorker:
    """A Ray Data actor: loads the model once, then records one shard per call."""

    def __init__(self, model: str, model_opts: dict, options: dict, out: str, cache_dir: str | None,
                 threads: int):
        if model_opts.get("device") in (None, "auto", "cpu"):
            import torch

            torch.set_num_threads(max(1, int(threads)))  # one actor per CPU share, not one per core each
        from hexray_core.record.recorder import Recorder

        self.recorder = Recorder(model, **model_opts)
        self.options, self.out, self.cache_dir = options, out, cache_dir
        self.extra = shard_extra(self.recorder, options)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        results = []
        for spec in batch["spec"]:
            name, rows = _unspec(str(spec))
            try:
                r = record_shard(self.recorder, self.out, name, rows, self.options, self.cache_dir, extra=self.extra)
            except HexRayError as e:  # bad input: the driver reports it in one line (Ray would retry nothing)
                r = {"error": str(e)}
            results.append(json.dumps(r))
        return {"result": np.array(results, dtype=object)}


class _Meter:
    """Counts finished shards into the progress events: prompts/s, ETA, workers."""

    def __init__(self, progress, total: int, skipped: int, workers: int):
        self.progress, self.total, self.skipped, self.workers = progress, total, skipped, workers
        self.done = self.tokens = self.bytes = self.shards = 0
        self.t0 = time.perf_counter()
        self.pids: set[tuple[str, int]] = set()

    def shard_done(self, r: dict) -> None:
        self.done += r["prompts"]
        self.tokens += r["tokens"]
        self.bytes += r["bytes"]
        self.shards += 1
        self.pids.add((r["host"], r["pid"]))
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        _emit(self.progress, "shard_done", done=self.done, total=self.total, skipped=self.skipped, rate=rate,
              eta=eta, workers=self.workers, workers_seen=len(self.pids), shard=r["shard"], pid=r["pid"],
              host=r["host"], tokens=self.tokens, bytes=self.bytes)


def _emit(progress, event: str, **info) -> None:
    if progress is not None:
        progress(event, **info)


def record_dataset(rows, out: str | os.PathLike, *, model: str = "gpt2", ray: str | None = None,
                   workers: int | None = None, worker_cpus: float = 1, shard_size: int = DEFAULT_SHARD_SIZE,
                   recorder=None, progress=None, model_opts: dict | None = None, **options) -> DatasetResult:
    """Record every row not yet in ``out`` into new shards; rewrite the manifest; return the counts.

    ``rows``: prompt strings, dicts (``prompt`` and optional ``id``, ``target``, ``baseline``, other
    fields kept as metadata) or ``datasetstore.Row``. ``ray``: None (this process; ``recorder`` may
    be a loaded ``Recorder``), ``"auto"`` or an address. ``options``: ``Recorder.record`` options.
    """
    t0 = time.perf_counter()
    unknown = set(options) - set(RECORD_DEFAULTS)
    if unknown:
        raise HexRayError(f"unknown recording option(s): {', '.join(sorted(unknown))}")
    model_opts = {k: v for k, v in (model_opts or {}).items() if v is not None}
    if "overflow" in options:  # the two spellings Recorder.record accepts, compared as one
        options["overflow"] = {"float32": "f32", "bfloat16": "bf16"}.get(options["overflow"], options["overflow"])
    rows = store.normalize_rows(rows)
    out = os.path.abspath(os.path.expanduser(os.fspath(out)))
    if os.path.exists(out) and not os.path.isdir(out):
        raise HexRayError(f"cannot write the dataset into {out}: it is a file (give a folder, e.g. -o out/)")
    if workers is not None and workers < 1:
        raise HexRayError(f"--workers must be at least 1, not {workers}")
    if os.path.isdir(out):
        store.check_folder(out)
    try:
        os.makedirs(store.shards_dir(out), exist_ok=True)
    except OSError as e:
        raise HexRayError(f"cannot create {out}: {e.strerror or e}") from None
    store.check_folder(out)  # no link inside it is followed (folder.py)
    from hexray_core import __version__

    mkey = model if recorder is not None and not isinstance(model, str) else model_key(str(model))
    with store.Lock(out):
        store.check_or_write_info(out, mkey, {**RECORD_DEFAULTS, **options}, __version__, LATER_OPTIONS)
        store.clean_stale(out)
        done = store.done_ids(out)
        pending = [r for r in rows if r.key not in done]
        skipped = len(rows) - len(pending)
        _warn_changed(progress, [r for r in rows if done.get(r.key) not in (None, store.prompt_digest(r.prompt))])
        plan = store.plan_shards(pending, shard_size) if pending else []
        engine = "ray" if ray is not None else "process"
        n_workers = 1
        meter = _Meter(progress, len(pending), skipped, 1)
        try:
            if plan and ray is None:
                rec = recorder or _load(model, model_opts, progress)
                check_rows(rec, pending, options)  # every row before the first shard
                extra = shard_extra(rec, options)
                _emit(progress, "dataset_start", total=len(rows), pending=len(pending), skipped=skipped,
                      shards=len(plan), workers=1, engine=engine)
                meter.t0 = time.perf_counter()
                quiet = _only_warnings(progress)
                for name, shard_rows in plan:
                    meter.shard_done(record_shard(rec, out, name, shard_rows, options, progress=quiet, extra=extra))
            elif plan:
                n_workers = _record_on_ray(ray, plan, out, mkey, model_opts, options, workers, worker_cpus,
                                           meter, progress, len(rows), skipped)
        finally:
            store.clean_stale(out)
            n_manifest, listed = store.build_manifest(out)
            store.update_info(out, last={"prompts": len(rows), "recorded": sum(r.key in listed for r in rows),
                                         "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return DatasetResult(out, len(rows), skipped, meter.done, meter.shards, meter.tokens, meter.bytes,
                         time.perf_counter() - t0, n_workers, engine, n_manifest)


def _warn_changed(progress, changed: list[store.Row]) -> None:
    """An id is recorded once: a rerun whose row has another prompt under that id keeps the old recording."""
    if changed:
        r = changed[0]
        _emit(progress, "warning", message=f"{len(changed)} id(s) already recorded with a different prompt are "
                                           f"skipped, the earlier recording kept (first: id {r.key}, line {r.line}); "
                                           "give them new ids or record into another folder")


def _load(model, model_opts: dict, progress):
    from hexray_core.record.recorder import Recorder

    return Recorder(model, progress=progress, **model_opts)


def _only_warnings(progress):
    if progress is None:
        return None
    return lambda event, **info: progress(event, **info) if event == "warning" else None


def _record_on_ray(address: str, plan, out: str, model: str, model_opts: dict, options: dict,
                   workers: int | None, worker_cpus: float, meter: _Meter, progress, total: int, skipped: int) -> int:
    from hexray_core.dataset import cluster as raycluster

    _emit(progress, "status", message="connecting to Ray")
    ray = raycluster.connect(address)
    res = raycluster.resources()
    device = str(model_opts.get("device") or "auto")
    use_gpu = res.get("GPU", 0) >= 1 and device != "cpu"
    if workers is None:
        workers = int(res.get("GPU", 0)) if use_gpu else max(1, int(res.get("CPU", 1) // max(worker_cpus, 1e-3)))
    workers = max(1, min(workers, len(plan)))
    cache = os.environ.get("HEXRAY_CACHE")
    ds = ray.data.from_items([{"spec": _spec(name, rows)} for name, rows in plan], override_num_blocks=len(plan))
    ds = ds.map_batches(
        ShardWorker, batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
        num_gpus=1 if use_gpu else 0, num_cpus=1 if use_gpu else worker_cpus,
        fn_constructor_kwargs={"model": model, "model_opts": model_opts, "options": options, "out": out,
                               "cache_dir": cache, "threads": max(1, int(worker_cpus))})
    meter.workers = workers
    _emit(progress, "dataset_start", total=total, pending=meter.total, skipped=skipped, shards=len(plan),
          workers=workers, engine="ray", gpus=use_gpu)
    meter.t0 = time.perf_counter()
    rows = ds.iter_rows()
    try:
        for row in rows:
            result = json.loads(row["result"])
            if "error" in result:
                raise HexRayError(result["error"])
            meter.shard_done(result)
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()  # stops the streaming executor (and its actors) on an interrupt
    return workers
