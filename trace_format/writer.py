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
from .dtypes import DTYPES, FLOAT_TAGS, f32_to_bf16, tag_of
from .errors import TraceFormatError, TraceLimitError
from .fileio import check_output_path, open_regular, shown
from .layout import KIND_CHUNK, KIND_INDEX, KIND_META, WEIGHTS_RUN, RecordHeader, Trailer, padded, rows_of
from .limits import DEFAULT_LIMITS, Limits
from .reader import TraceReader

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock
    fcntl = None

DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_LEVEL = 1  # measured: level 1 compresses as well as 3 on activations, at twice the speed


__all__ = ["DEFAULT_CHUNK_BYTES", "DEFAULT_LEVEL", "WEIGHTS_RUN", "TraceWriter", "rows_of"]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _check_packable(obj, what: str) -> None:
    """Fail at the call that brought a value msgpack cannot store, not at close() (which would lose the file)."""
    try:
        pack_obj(obj)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"{what} cannot be stored in a trace ({e}); use str, int, float, bool, bytes, None, "
                        "lists and str-keyed dicts") from None


class TraceWriter:
    """Write a trace. Use as a context manager, or call ``close()`` (or ``abort()``).

    >>> with TraceWriter("t.hxr", meta={"model": {"name": "gpt2"}}) as w:
    ...     run = w.begin_run(prompt="Hello")
    ...     w.write("blocks.0.hook_resid_post", resid)
    ...     w.end_run()

    ``level``: zstd level (default 1), or None to store chunks uncompressed. ``shuffle``: byte-shuffle
    float chunks before zstd. ``chunk_bytes``: target decoded size of one chunk (whole rows; at least
    one row). ``threads``: compression threads. ``max_inflight``: chunks queued or compressed but not
    yet written (bounds memory). ``append=True`` adds runs to an existing trace; ``meta`` is then merged
    over the file's metadata. Exiting the ``with`` block by an exception (KeyboardInterrupt included)
    calls ``abort()``. ``limits``: a reader with these limits reads back every tensor written
    (a tensor it would refuse is refused here, before anything is written; SPEC.md 10.1).
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
        limits: Limits = DEFAULT_LIMITS,
    ):
        self.path = os.fspath(path)
        self.limits = limits
        self.level, self.shuffle, self.chunk_bytes, self.fsync = level, shuffle, chunk_bytes, fsync
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be positive")
        if level is not None and not -7 <= level <= 22:
            raise ValueError("level must be a zstd level (-7..22) or None")
        self._closed = True  # until the file is open: abort() and __del__ have nothing to do
        _check_packable(meta or {}, "meta")
        threads = threads or max(1, min(8, os.cpu_count() or 1))
        self._max_inflight = max_inflight or 4 * threads
        self._pending: collections.deque[tuple[Future, int, int, int, list]] = collections.deque()
        self._tensors: list[dict] = []
        self._names: set[tuple[int, str]] = set()
        self._runs: list[dict] = []
        self._current_run: int | None = None
        self._prev_trailer = 0
        self._tmp: str | None = None
        self._f = None
        self._rollback_size: int | None = None
        self.meta = dict(meta or {})
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="hxr-compress")
        self._closed = False
        try:
            if append:
                self._open_for_append()
            else:
                self._open_new()
        except BaseException:
            self.abort()
            raise

    # -- opening ---------------------------------------------------------------------------

    def _open_new(self) -> None:
        check_output_path(self.path)  # renaming over /dev/null (as root) would replace the device node
        folder = os.path.dirname(os.path.abspath(self.path))
        self._tmp = os.path.join(folder, f".{os.path.basename(self.path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        self._f = open(self._tmp, "xb")
        self.file_uuid = uuid.uuid4().bytes
        self.meta.setdefault("created", _now())
        self._f.write(layout.pack_preamble(self.file_uuid))
        self._pos = layout.PREAMBLE_SIZE
        self._write_record(KIND_META, pack_obj(self.meta), ident=0, chunk=0, first_row=0)

    def _open_for_append(self) -> None:
        fd = open_regular(self.path, write=True)  # regular files only, never a blocking open
        f = self._f = os.fdopen(fd, "r+b")
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise TraceFormatError(f"{shown(self.path)}: another writer is appending to this file") from None
        with TraceReader(self.path) as old:
            index = old.index
            self.file_uuid = old.file_uuid
            trailer_at = old.trailer.data_end
        f.seek(0, os.SEEK_END)
        self._pos = f.tell()
        if self._pos != trailer_at + layout.TRAILER_SIZE:
            raise TraceFormatError(f"{shown(self.path)}: changed while opening for append")
        self._rollback_size = self._pos
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
        _check_packable(info, "run info")
        run_id = len(self._runs)
        info.pop("id", None)
        self._runs.append({"id": run_id, **info, "status": "recording"})
        self._current_run = run_id
        return run_id

    def end_run(self, **info) -> None:
        """Finish the current run, merging ``info`` into its record."""
        if self._current_run is None:
            raise ValueError("no run in progress")
        _check_packable(info, "run info")
        info.pop("id", None)
        self._runs[self._current_run].update(info, status="complete")
        self._current_run = None

    def update_run(self, **info) -> None:
        """Merge ``info`` into the current run's record."""
        if self._current_run is None:
            raise ValueError("no run in progress")
        _check_packable(info, "run info")
        info.pop("id", None)
        self._runs[self._current_run].update(info)

    # -- tensors ---------------------------------------------------------------------------

    def write(
        self, name: str, array, *, run: int | None = None, dtype: str | None = None, attrs: dict | None = None
    ) -> None:
        """Queue one tensor. ``run`` defaults to the current run; ``WEIGHTS_RUN`` for file-level weights.

        ``dtype`` is the stored tag (f32 f16 bf16 f64 i64 i32 i16 i8 u8 bool); by default the array's own.
        ``dtype="bf16"`` takes raw bfloat16 words as a uint16 array, or converts a float array
        (round to nearest even). Narrowing floats to ``"f16"`` refuses values that would overflow to inf.
        Non-contiguous arrays are copied; a C-contiguous array is NOT copied: it is read by the
        compression threads later, so do not modify it until ``flush()`` or ``close()`` returns.
        """
        self._check_open()
        if not isinstance(name, str) or not 0 < len(name) <= DEFAULT_LIMITS.max_name_len:
            raise ValueError(f"tensor name must be a non-empty str of at most {DEFAULT_LIMITS.max_name_len} characters")
        if run is None:
            if self._current_run is None:
                raise ValueError("write() outside a run: call begin_run() or pass run=WEIGHTS_RUN")
            run = self._current_run
        if run != WEIGHTS_RUN and not 0 <= run < len(self._runs):
            raise ValueError(f"unknown run {run}")
        if (run, name) in self._names:
            raise ValueError(f"tensor {name!r} already written in run {run}")
        if attrs:
            _check_packable(attrs, f"attrs of {name!r}")
        arr = _as_stored(np.asarray(array), dtype, name)
        tag = "bf16" if dtype == "bf16" else tag_of(arr.dtype)
        # (not np.ascontiguousarray: it turns a 0-d array into shape (1,))
        arr = arr.astype(DTYPES[tag], order="C", copy=False)
        itemsize = arr.dtype.itemsize
        shape = tuple(int(d) for d in arr.shape)
        if len(shape) > DEFAULT_LIMITS.max_ndim:
            raise ValueError(f"tensor {name!r} has {len(shape)} axes; a trace holds at most {DEFAULT_LIMITS.max_ndim}")
        rows, row_elems = rows_of(shape)
        row_bytes = row_elems * itemsize
        if row_bytes > DEFAULT_LIMITS.max_chunk_bytes:
            raise ValueError(f"tensor {name!r}: one row is {row_bytes} bytes, over the 64 MiB chunk limit")
        chunk_rows = max(1, self.chunk_bytes // max(1, row_bytes))
        self._check_readable(name, arr, tag, rows, row_bytes, chunk_rows)
        entry = {
            "id": len(self._tensors), "run": run, "name": name, "dtype": tag, "shape": list(shape),
            "chunk_rows": chunk_rows, "chunks": [], "attrs": dict(attrs or {}),
        }
        self._tensors.append(entry)
        self._names.add((run, name))
        if row_bytes == 0 or rows == 0:
            return
        flat = arr.reshape(-1).view(np.uint8)
        use_shuffle = self.shuffle and tag in FLOAT_TAGS
        for c, r0 in enumerate(range(0, rows, chunk_rows)):
            r1 = min(rows, r0 + chunk_rows)
            piece = memoryview(flat[r0 * row_bytes: r1 * row_bytes])
            fut = self._pool.submit(encode, piece, level=self.level, itemsize=itemsize, use_shuffle=use_shuffle)
            self._pending.append((fut, entry["id"], c, r0, entry["chunks"]))
            self._drain(block=True)

    def _check_readable(self, name: str, arr: np.ndarray, tag: str, rows: int, row_bytes: int, chunk_rows: int):
        """Refuse a tensor that a reader with ``self.limits`` would refuse to return in full.

        A read may return max(read_budget_bytes, result_slack_bytes + result_per_file_byte x file
        size). Under the budget nothing needs knowing; over it, the file must be large enough, and
        the file will hold at least what is written so far plus this tensor's compressed chunks: for
        such (multi-GiB) tensors those are sized first, in a dry pass, so nothing is written unless
        it reads back.
        """
        lim, itemsize = self.limits, DTYPES[tag].itemsize
        out_bytes = rows * (row_bytes // max(1, itemsize)) * max(itemsize, 4 if tag in FLOAT_TAGS else itemsize)
        out_bytes += min(rows, chunk_rows) * row_bytes  # a read's cost: the result and the chunk being decoded
        if out_bytes > lim.max_tensor_bytes:
            raise TraceLimitError(f"tensor {name!r}: {out_bytes:,} bytes, over the reader's max_tensor_bytes of "
                                  f"{lim.max_tensor_bytes:,}")
        if out_bytes <= lim.read_budget_bytes:
            return
        need = -(-(out_bytes - lim.result_slack_bytes) // lim.result_per_file_byte)
        if self._pos >= need:
            return
        flat = arr.reshape(-1).view(np.uint8)
        use_shuffle = self.shuffle and tag in FLOAT_TAGS
        pieces = [memoryview(flat[r0 * row_bytes:min(rows, r0 + chunk_rows) * row_bytes])
                  for r0 in range(0, rows, chunk_rows)]
        sizes = self._pool.map(lambda p: len(encode(p, level=self.level, itemsize=itemsize,
                                                    use_shuffle=use_shuffle)[2]), pieces)
        stored = sum(padded(layout.HEADER_SIZE + n) for n in sizes)
        if self._pos + stored < need:
            raise TraceLimitError(f"tensor {name!r}: a read of it returns {out_bytes:,} bytes, over the memory "
                                  f"budget of {lim.read_budget_bytes:,} and it compresses to {stored:,} (a reader "
                                  f"allows {lim.result_per_file_byte}x the file's size beyond the budget); pass "
                                  "limits=Limits(read_budget_bytes=...) to the writer and the reader")

    def flush(self) -> None:
        """Wait until every queued chunk is compressed and handed to the OS (arrays passed to write() are then free)."""
        self._check_open()
        self._drain(wait_all=True)
        self._f.flush()

    def _drain(self, block: bool = False, *, wait_all: bool = False) -> None:
        """Write finished chunks in submission order.

        Waits for the oldest chunk while more than ``max_inflight`` are pending (``block``), or
        until none is pending (``wait_all``); otherwise writes only those already done.
        """
        while self._pending:
            over_cap = len(self._pending) > self._max_inflight
            if not (wait_all or (block and over_cap) or self._pending[0][0].done()):
                break
            fut, tid, c, r0, chunks = self._pending.popleft()
            codec, filt, payload, crc = fut.result()
            raw_len = self._raw_len(tid, c)
            offset = self._write_record(KIND_CHUNK, payload, ident=tid, chunk=c, first_row=r0, codec=codec,
                                        filt=filt, crc=crc, raw_len=raw_len)
            chunks.append((offset, len(payload), raw_len, crc))

    def _raw_len(self, tid: int, c: int) -> int:
        t = self._tensors[tid]
        rows, row_elems = rows_of(tuple(t["shape"]))
        r0 = c * t["chunk_rows"]
        return (min(rows, r0 + t["chunk_rows"]) - r0) * row_elems * DTYPES[t["dtype"]].itemsize

    def _write_record(self, kind, payload, *, ident, chunk, first_row, codec=0, filt=0, crc=None, raw_len=None):
        if crc is None:
            crc = layout.crc32(payload)
        header = RecordHeader(kind, codec, filt, 0, ident, chunk, len(payload),
                              len(payload) if raw_len is None else raw_len, first_row, crc)
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
            self._drain(wait_all=True)
            if self._current_run is not None:
                self.end_run()
            for t in self._tensors:
                if isinstance(t["chunks"], list):
                    rows, row_elems = rows_of(t["shape"])
                    n = 0 if rows == 0 or row_elems == 0 else -(-rows // t["chunk_rows"])
                    if len(t["chunks"]) != n:  # pragma: no cover - would be a writer bug
                        raise RuntimeError(f"tensor {t['name']!r}: {len(t['chunks'])} of {n} chunks written")
            self.meta["closed"] = _now()
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
            index_at = self._write_record(KIND_INDEX, payload, ident=0, chunk=0, first_row=0, codec=codec,
                                          crc=crc, raw_len=len(raw))
            trailer = Trailer(index_at, layout.HEADER_SIZE + len(payload), self._pos, self._prev_trailer, crc)
            self._f.write(trailer.pack())
            self._f.flush()
            if self.fsync:
                os.fsync(self._f.fileno())
            self._f.close()
            if self._tmp is not None:
                check_output_path(self.path)
                os.replace(self._tmp, self.path)
                self._tmp = None
                if self.fsync:
                    _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._pool.shutdown()
        return self.path

    def abort(self) -> None:
        """Give up: remove the temporary file (or roll an append back to the original bytes). Never raises."""
        if self._closed:
            return
        self._closed = True
        for fut, *_ in self._pending:
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
        f = self._f
        if f is not None:
            # An append is rolled back by truncating to the old length, after closing the buffered
            # file (whose close may flush, or fail to): through a dup of its descriptor, so that
            # the advisory lock is held until the file is whole again.
            keep = None
            if self._rollback_size is not None and not f.closed:
                try:
                    keep = os.dup(f.fileno())
                except OSError:
                    keep = None
            try:
                f.close()
            except (OSError, ValueError):
                pass
            if self._rollback_size is not None:
                try:
                    if keep is not None:
                        os.ftruncate(keep, self._rollback_size)
                    else:
                        os.truncate(self.path, self._rollback_size)
                except OSError:
                    pass
                finally:
                    if keep is not None:
                        os.close(keep)
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except OSError:
                pass
            self._tmp = None

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


def _as_stored(arr: np.ndarray, dtype: str | None, name: str) -> np.ndarray:
    """Convert an array to the requested stored tag, refusing lossy surprises."""
    if dtype is None:
        return arr
    if dtype not in DTYPES:
        raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r} (allowed: {', '.join(DTYPES)})")
    if dtype == "bf16":
        if arr.dtype == np.uint16:
            return arr
        if arr.dtype.kind != "f":
            raise TypeError(f"tensor {name!r}: dtype='bf16' takes raw uint16 words or a float array, not {arr.dtype}")
        return f32_to_bf16(arr.astype(np.float32, copy=False))
    target = DTYPES[dtype]
    if arr.dtype == target:
        return arr
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(target)
    if dtype == "f16" and arr.dtype.kind == "f":
        overflow = np.isinf(out) & ~np.isinf(arr)
        if overflow.any():
            raise ValueError(f"tensor {name!r}: values up to {float(np.nanmax(np.abs(arr))):g} overflow float16 "
                             "(max 65504); store it as bf16 or f32")
    return out


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
