"""TraceWriter: stream tensors into an `.hxr` file as they arrive.

Chunks are compressed on a thread pool and written in submission order; at most
``max_inflight`` chunks are held in memory. A new file is written under a temporary name in
the target's folder and renamed into place by ``close()``: a crash, a kill or Ctrl-C never
leaves a file at the target path. Appending writes after the existing trailer and rolls back
(truncates to the old length) on any exception; an append killed outright leaves a file that
every reader refuses as unfinished, with the old state intact before it.
"""

from __future__ import annotations

import collections
import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from . import layout
from .codec import encode, pack_obj
from .dtypes import DTYPES, FLOAT_TAGS, tag_of
from .errors import TraceFormatError
from .layout import KIND_CHUNK, KIND_INDEX, KIND_META, RecordHeader, Trailer, padded
from .limits import DEFAULT_LIMITS

DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_LEVEL = 1  # measured: level 1 compresses as well as 3 on activations, at twice the speed
WEIGHTS_RUN = -1  # run id of file-level tensors (model kit weights)


def rows_of(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, elements per row) of a tensor viewed as 2-D along its last axis."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], 1
    return int(np.prod(shape[:-1], dtype=np.int64)), shape[-1]


class TraceWriter:
    """Write a trace. Use as a context manager, or call ``close()`` (or ``abort()``).

    >>> with TraceWriter("t.hxr", meta={"model": {"name": "gpt2"}}) as w:
    ...     run = w.begin_run(prompt="Hello")
    ...     w.write("blocks.0.hook_resid_post", resid)
    ...     w.end_run()
    """

    def __init__(
        self,
        path: str | os.PathLike,
        meta: dict | None = None,
        *,
        append: bool = False,
        level: int | None = DEFAULT_LEVEL,
        shuffle: bool = True,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        threads: int | None = None,
        max_inflight: int | None = None,
        fsync: bool = False,
    ):
        self.path = os.fspath(path)
        self.level, self.shuffle, self.chunk_bytes, self.fsync = level, shuffle, chunk_bytes, fsync
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be positive")
        threads = threads or max(1, min(8, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="hxr-compress")
        self._max_inflight = max_inflight or 4 * threads
        self._pending: collections.deque[tuple[Future, int, int, int, list]] = collections.deque()
        self._tensors: list[dict] = []
        self._names: set[tuple[int, str]] = set()
        self._runs: list[dict] = []
        self._current_run: int | None = None
        self._closed = False
        self._prev_trailer = 0
        self.meta = dict(meta or {})
        if append:
            self._open_for_append()
        else:
            self._open_new()

    # -- opening ---------------------------------------------------------------------------

    def _open_new(self) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        self._tmp = os.path.join(folder, f".{os.path.basename(self.path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        self._f = open(self._tmp, "xb")
        self._rollback_size = None
        self.file_uuid = uuid.uuid4().bytes
        self.meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self._f.write(layout.pack_preamble(self.file_uuid))
        self._pos = layout.PREAMBLE_SIZE
        self._write_record(KIND_META, pack_obj(self.meta), ident=0, chunk=0, elem_offset=0)

    def _open_for_append(self) -> None:
        from .reader import TraceReader

        with TraceReader(self.path) as old:
            index = old._index
            self.file_uuid = old.file_uuid
            trailer_at = old._trailer.data_end
        self._tmp = None
        self._f = open(self.path, "r+b")
        self._f.seek(0, os.SEEK_END)
        self._rollback_size = self._pos = self._f.tell()
        if self._pos != trailer_at + layout.TRAILER_SIZE:
            raise TraceFormatError(f"{self.path}: changed while opening for append")
        self._prev_trailer = trailer_at
        self.meta = {**index["meta"], **self.meta}
        self._runs = [dict(r) for r in index["runs"]]
        self._tensors = [dict(t) for t in index["tensors"]]
        self._names = {(t["run"], t["name"]) for t in self._tensors}

    # -- runs ------------------------------------------------------------------------------

    def begin_run(self, **info) -> int:
        """Start a run (one prompt's forward pass); later ``write`` calls go to it. Returns its id."""
        self._check_open()
        if self._current_run is not None:
            self.end_run()
        run_id = len(self._runs)
        self._runs.append({"id": run_id, **info, "status": "recording"})
        self._current_run = run_id
        return run_id

    def end_run(self, **info) -> None:
        """Finish the current run, merging ``info`` into its record."""
        if self._current_run is None:
            raise ValueError("no run in progress")
        self._runs[self._current_run].update(info, status="complete")
        self._current_run = None

    def update_run(self, **info) -> None:
        """Merge ``info`` into the current run's record."""
        if self._current_run is None:
            raise ValueError("no run in progress")
        self._runs[self._current_run].update(info)

    # -- tensors ---------------------------------------------------------------------------

    def write(self, name: str, array, *, run: int | None = None, dtype: str | None = None, attrs: dict | None = None) -> None:
        """Queue one tensor. ``run`` defaults to the current run; ``WEIGHTS_RUN`` for file-level weights.

        ``dtype="bf16"`` marks a uint16 array as raw bfloat16 words. Non-contiguous arrays are copied.
        """
        self._check_open()
        if run is None:
            if self._current_run is None:
                raise ValueError("write() outside a run: call begin_run() or pass run=WEIGHTS_RUN")
            run = self._current_run
        if run != WEIGHTS_RUN and not 0 <= run < len(self._runs):
            raise ValueError(f"unknown run {run}")
        if (run, name) in self._names:
            raise ValueError(f"tensor {name!r} already written in run {run}")
        arr = np.asarray(array)
        if dtype == "bf16":
            if arr.dtype != np.uint16:
                raise TypeError("dtype='bf16' needs the raw words as a uint16 array")
            tag = "bf16"
        elif dtype is not None:
            tag = dtype
            arr = arr.astype(DTYPES[tag])
        else:
            tag = tag_of(arr.dtype)
        arr = np.ascontiguousarray(arr, dtype=DTYPES[tag])
        itemsize = arr.dtype.itemsize
        shape = tuple(int(d) for d in arr.shape)
        rows, row_elems = rows_of(shape)
        row_bytes = row_elems * itemsize
        if row_bytes > DEFAULT_LIMITS.max_chunk_bytes:
            raise ValueError(f"tensor {name!r}: one row is {row_bytes} bytes, over the 64 MiB chunk limit")
        chunk_rows = max(1, self.chunk_bytes // max(1, row_bytes))
        entry = {
            "id": len(self._tensors), "run": run, "name": name, "dtype": tag, "shape": list(shape),
            "chunk_rows": chunk_rows, "chunks": [], "attrs": dict(attrs or {}),
        }
        self._tensors.append(entry)
        self._names.add((run, name))
        flat = arr.reshape(-1).view(np.uint8) if arr.size else arr.reshape(-1)
        use_shuffle = self.shuffle and tag in FLOAT_TAGS
        if row_bytes == 0:
            return
        for c, r0 in enumerate(range(0, rows, chunk_rows)):
            r1 = min(rows, r0 + chunk_rows)
            piece = memoryview(flat[r0 * row_bytes: r1 * row_bytes])
            fut = self._pool.submit(encode, piece, level=self.level, itemsize=itemsize, use_shuffle=use_shuffle)
            self._pending.append((fut, entry["id"], c, r0, entry["chunks"]))
            self._drain(block=len(self._pending) > self._max_inflight)

    def _drain(self, block: bool) -> None:
        """Write finished chunks in submission order; wait for the oldest while over the in-flight cap."""
        while self._pending and (block or self._pending[0][0].done()):
            fut, tid, c, r0, chunks = self._pending.popleft()
            codec, filt, payload, crc = fut.result()
            raw_len = self._raw_len(tid, c)
            offset = self._write_record(KIND_CHUNK, payload, ident=tid, chunk=c, elem_offset=r0, codec=codec,
                                        filt=filt, crc=crc, raw_len=raw_len)
            chunks.append((offset, len(payload), raw_len, crc))
            block = len(self._pending) > self._max_inflight

    def _raw_len(self, tid: int, c: int) -> int:
        t = self._tensors[tid]
        rows, row_elems = rows_of(tuple(t["shape"]))
        r0 = c * t["chunk_rows"]
        return (min(rows, r0 + t["chunk_rows"]) - r0) * row_elems * DTYPES[t["dtype"]].itemsize

    def _write_record(self, kind, payload, *, ident, chunk, elem_offset, codec=0, filt=0, crc=None, raw_len=None):
        if crc is None:
            crc = layout.crc32(payload)
        header = RecordHeader(kind, codec, filt, 0, ident, chunk, len(payload),
                              len(payload) if raw_len is None else raw_len, elem_offset, crc)
        pad = padded(layout.HEADER_SIZE + len(payload)) - layout.HEADER_SIZE - len(payload)
        self._f.write(header.pack())
        self._f.write(payload)
        if pad:
            self._f.write(bytes(pad))
        start = self._pos
        self._pos += layout.HEADER_SIZE + len(payload) + pad
        return start

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> str:
        """Finish the file: write the index and trailer, then move it into place. Returns the path."""
        if self._closed:
            return self.path
        try:
            self._drain(block=True)
            if self._current_run is not None:
                self.end_run()
            self.meta["closed"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            index = {
                "hxr": [layout.MAJOR, layout.MINOR],
                "features": [],
                "meta": self.meta,
                "runs": self._runs,
                "tensors": [
                    {**t, "chunks": np.asarray(t["chunks"], dtype="<u8").reshape(-1, 4).tobytes()}
                    if isinstance(t["chunks"], list) else t
                    for t in self._tensors
                ],
            }
            raw = pack_obj(index)
            codec, _, payload, crc = encode(raw, level=3, itemsize=1, use_shuffle=False)
            index_at = self._write_record(KIND_INDEX, payload, ident=0, chunk=0, elem_offset=0, codec=codec,
                                          crc=crc, raw_len=len(raw))
            trailer = Trailer(index_at, layout.HEADER_SIZE + len(payload), self._pos, self._prev_trailer, crc)
            self._f.write(trailer.pack())
            self._f.flush()
            if self.fsync:
                os.fsync(self._f.fileno())
            self._f.close()
            if self._tmp is not None:
                os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._pool.shutdown()
        return self.path

    def abort(self) -> None:
        """Give up: remove the temporary file (or roll an append back). Never raises."""
        if self._closed:
            return
        self._closed = True
        for fut, *_ in self._pending:
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
        try:
            if self._rollback_size is not None and not self._f.closed:
                self._f.truncate(self._rollback_size)
            self._f.close()
        except OSError:
            pass
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except OSError:
                pass

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("trace writer is closed")

    @property
    def bytes_written(self) -> int:
        return self._pos

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self):  # an abandoned writer must not leave its temporary file behind
        if not getattr(self, "_closed", True):
            self.abort()

