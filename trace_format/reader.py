"""TraceReader: random access to an `.hxr` file with every number checked before it is trusted.

Opening costs one read of the file's tail (trailer and, usually, the index). Reading a tensor,
or a row range of it, reads and decodes only the chunks that hold those rows. Nothing a file
claims is allocated before it has been checked against the index and the limits; every
failure is a ``TraceFormatError`` naming what is wrong and where.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import struct
from dataclasses import dataclass

import numpy as np

from . import layout
from .codec import check, decode, unpack_obj
from .dtypes import DTYPES, FLOAT_TAGS, to_float32
from .errors import TraceFormatError
from .fileio import open_regular, shown
from .layout import KIND_CHUNK, KIND_INDEX, RecordHeader, Trailer, padded, rows_of
from .limits import DEFAULT_LIMITS, Limits

KNOWN_FEATURES: frozenset[str] = frozenset()


@dataclass(frozen=True)
class TensorInfo:
    """What the index says about one stored tensor."""

    id: int
    run: int
    name: str
    dtype: str  # stored tag: f32 f16 bf16 f64 i64 i32 i16 i8 u8 bool
    shape: tuple[int, ...]
    chunk_rows: int
    chunks: np.ndarray  # [n, 4] uint64: offset, payload_len, raw_len, crc
    attrs: dict

    @property
    def nbytes(self) -> int:
        """Decoded size in bytes (at the stored dtype)."""
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    @property
    def stored_bytes(self) -> int:
        return int(self.chunks[:, 1].sum()) if len(self.chunks) else 0


def _guarded(method):
    """No exception but TraceFormatError may escape the reader for a malformed file."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (TraceFormatError, KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
            if isinstance(e, TraceFormatError) or not getattr(e, "_hexray_user_error", False):
                if isinstance(e, TraceFormatError):
                    raise
                raise TraceFormatError(f"{self.name}: malformed trace ({type(e).__name__}: {e})") from None
            raise
        except (OverflowError, MemoryError, RecursionError, UnicodeError, struct.error) as e:
            raise TraceFormatError(f"{self.name}: malformed trace ({type(e).__name__}: {e})") from None

    return wrapper


def _user_error(exc: Exception) -> Exception:
    """Mark a KeyError/ValueError as the caller's mistake (unknown name...), not a corrupt file."""
    exc._hexray_user_error = True
    return exc


class TraceReader:
    """Read a trace.

    >>> with TraceReader("t.hxr") as r:
    ...     r.runs[0]["prompt"], r.names(0)
    ...     resid = r.read("blocks.0.hook_resid_post", run=0)          # float32 ndarray
    ...     row = r.read("blocks.0.attn.hook_pattern", run=0, index=(3, slice(10, 11)))
    """

    def __init__(self, path: str | os.PathLike, *, limits: Limits = DEFAULT_LIMITS):
        self.path = os.fspath(path)
        self.name = shown(self.path)  # the path as messages show it (one line, whatever it holds)
        self.limits = limits
        self._fd = -1
        self._fd = open_regular(self.path)  # regular files only, never a blocking open (FIFOs, devices)
        try:
            self._open()
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    # -- opening ---------------------------------------------------------------------------

    @_guarded
    def _open(self) -> None:
        self.size = os.fstat(self._fd).st_size
        # One read of the tail; for a small file it is the whole file, preamble included.
        tail_start = max(0, self.size - layout.TAIL_READ)
        tail = self._pread(tail_start, self.size - tail_start)
        head = tail[:layout.PREAMBLE_SIZE] if tail_start == 0 else self._pread(0, min(self.size, layout.PREAMBLE_SIZE))
        self.file_uuid = layout.check_preamble(head, self.name)
        self.minor = struct.unpack_from("<H", head, 10)[0]
        min_size = layout.PREAMBLE_SIZE + 2 * layout.HEADER_SIZE + layout.TRAILER_SIZE
        if self.size < min_size:
            raise TraceFormatError(f"{self.name}: truncated ({self.size} bytes; a trace has at least {min_size})")
        trailer_at = self.size - layout.TRAILER_SIZE
        self._trailer = t = Trailer.unpack(tail[-layout.TRAILER_SIZE:], trailer_at, self.name)
        if t.data_end != trailer_at:
            raise TraceFormatError(f"{self.name}: trailer says data ends at {t.data_end}, file is {self.size} bytes "
                                   "(truncated or extended)", offset=trailer_at)
        if (t.index_offset % layout.ALIGN or t.index_offset < layout.PREAMBLE_SIZE + layout.HEADER_SIZE
                or t.index_len < layout.HEADER_SIZE or padded(t.index_offset + t.index_len) != t.data_end):
            raise TraceFormatError(f"{self.name}: trailer points at an impossible index position", offset=trailer_at)
        index_cap = self.limits.decoded_cap(self.size, self.limits.max_index_bytes)
        if t.index_len - layout.HEADER_SIZE > index_cap:
            raise TraceFormatError(f"{self.name}: INDEX record of {t.index_len} bytes is over the limit of "
                                   f"{index_cap}", offset=t.index_offset)
        if t.prev_trailer and (t.prev_trailer % layout.ALIGN or t.prev_trailer >= t.index_offset
                               or t.prev_trailer < layout.PREAMBLE_SIZE + layout.HEADER_SIZE):
            raise TraceFormatError(f"{self.name}: trailer's previous-trailer link is impossible", offset=trailer_at)
        if t.index_offset >= tail_start:
            raw = tail[t.index_offset - tail_start: t.index_offset - tail_start + t.index_len]
        else:
            raw = self._pread(t.index_offset, t.index_len)
        self._index_end = t.index_offset
        index, crc = self._decode_record(raw, t.index_offset, expect_kind=KIND_INDEX,
                                         raw_cap=index_cap, what="INDEX record")
        if crc != t.index_crc:
            raise TraceFormatError(f"{self.name}: INDEX checksum differs from the trailer's", offset=t.index_offset)
        self._index = self._check_index(unpack_obj(bytes(index), f"{self.name}: INDEX record",
                                                   max_items=self.limits.items_cap(self.size)))

    def _decode_record(self, raw: bytes, offset: int, *, expect_kind: int, raw_cap: int, what: str):
        """Check and decode a META or INDEX record held whole in ``raw``. Returns (decoded bytes, payload CRC)."""
        header = RecordHeader.unpack(raw[:layout.HEADER_SIZE], offset, self.name)
        if header.kind != expect_kind:
            raise TraceFormatError(f"{self.name}: expected an {what}, found kind {header.kind:#x}", offset=offset)
        payload = raw[layout.HEADER_SIZE:]
        if header.payload_len != len(payload):
            raise TraceFormatError(f"{self.name}: {what} length disagrees with the trailer", offset=offset)
        if header.raw_len > raw_cap:
            raise TraceFormatError(f"{self.name}: {what} claims {header.raw_len} bytes, over the limit of {raw_cap}",
                                   offset=offset)
        if layout.crc32(payload) != header.payload_crc:
            raise TraceFormatError(f"{self.name}: checksum mismatch in {what}", offset=offset)
        data = decode(payload, codec=header.codec, filt=header.filter, raw_len=header.raw_len, itemsize=1,
                      where=f"{self.name}: {what} at byte {offset}")
        return data, header.payload_crc

    def _check_index(self, index) -> dict:
        """Validate the index's structure and every chunk position before anything uses them."""
        lim, where = self.limits, f"{self.name}: INDEX"

        def need(cond, msg):
            if not cond:
                raise TraceFormatError(f"{where}: {msg}", offset=self._trailer.index_offset)

        need(isinstance(index, dict), "not a map")
        version = index.get("hxr")
        need(isinstance(version, list) and len(version) == 2 and all(type(v) is int for v in version), "no version")
        layout.check_version(version[0], self.name)
        self.version = (version[0], version[1])
        features = index.get("features", [])
        need(isinstance(features, list) and all(isinstance(f, str) for f in features), "bad features list")
        unknown = [f for f in features if f not in KNOWN_FEATURES]
        if unknown:
            raise TraceFormatError(f"{self.name}: needs feature(s) this HexRay does not know: "
                                   f"{', '.join(map(repr, unknown))}; upgrade hexray",
                                   offset=self._trailer.index_offset)
        self.features = list(features)
        need(isinstance(index.get("meta"), dict), "meta is not a map")
        runs = index.get("runs")
        need(isinstance(runs, list) and len(runs) <= lim.max_runs, "bad run list")
        for i, run in enumerate(runs):
            need(isinstance(run, dict) and run.get("id") == i, f"run {i} is malformed")
        tensors = index.get("tensors")
        need(isinstance(tensors, list) and len(tensors) <= lim.max_tensors, "bad tensor list")
        self._by_name: dict[tuple[int, str], TensorInfo] = {}
        # Per tensor: cheap Python checks; the chunk tables are then checked all at once (one numpy
        # pass over every chunk of the file, not a dozen small numpy calls per tensor).
        tables, expect_full, expect_last, counts, pending = [], [], [], [], []
        for i, t in enumerate(tensors):
            need(isinstance(t, dict), f"tensor {i} is not a map")
            name = t.get("name")
            need(isinstance(name, str) and 0 < len(name) <= lim.max_name_len, f"tensor {i} has a bad name")
            run, dtype, shape, chunk_rows = t.get("run"), t.get("dtype"), t.get("shape"), t.get("chunk_rows")
            need(t.get("id", i) == i, f"tensor {name!r}: id {t.get('id')!r} is not its position {i}")
            need(type(run) is int and (run == layout.WEIGHTS_RUN or 0 <= run < len(runs)), f"tensor {name!r}: bad run")
            need(isinstance(dtype, str) and dtype in DTYPES, f"tensor {name!r}: unknown dtype {dtype!r}")
            need(isinstance(shape, list) and len(shape) <= lim.max_ndim
                 and all(type(d) is int and 0 <= d <= lim.max_dim for d in shape), f"tensor {name!r}: bad shape")
            need(type(chunk_rows) is int and chunk_rows >= 1, f"tensor {name!r}: bad chunk_rows")
            attrs = t.get("attrs", {})
            need(isinstance(attrs, dict), f"tensor {name!r}: attrs is not a map")
            table = t.get("chunks")
            need(isinstance(table, bytes) and len(table) % 32 == 0, f"tensor {name!r}: bad chunk table")
            n_chunks = len(table) // 32
            rows, row_elems = rows_of(shape)
            row_bytes = row_elems * DTYPES[dtype].itemsize
            n_expected = 0 if row_bytes == 0 or rows == 0 else -(-rows // chunk_rows)
            need(n_chunks == n_expected, f"tensor {name!r}: {n_chunks} chunks for shape {shape}, expected {n_expected}")
            if n_expected:
                full = min(chunk_rows, rows) * row_bytes
                if full > lim.max_chunk_bytes:
                    need(False, f"tensor {name!r}: shape {shape} claims chunks of {full} bytes, over the limit of "
                                f"{lim.max_chunk_bytes}")
                tables.append(table)
                expect_full.append(full)
                expect_last.append((rows - (n_expected - 1) * chunk_rows) * row_bytes)
                counts.append(n_expected)
            key = (run, name)
            need(key not in self._by_name, f"tensor {name!r} appears twice in run {run}")
            self._by_name[key] = None  # placeholder keeps the write order
            pending.append((key, i, run, name, dtype, tuple(shape), chunk_rows, n_expected, attrs))
        allchunks = np.frombuffer(b"".join(tables), dtype="<u8").reshape(-1, 4)
        if len(allchunks):
            counts_a = np.asarray(counts, dtype=np.int64)
            starts = np.cumsum(counts_a) - counts_a
            expect = np.repeat(np.asarray(expect_full, dtype=np.uint64), counts_a)
            expect[starts + counts_a - 1] = np.asarray(expect_last, dtype=np.uint64)
            offs, plens, raw_lens = allchunks[:, 0], allchunks[:, 1], allchunks[:, 2]
            with_chunks = [p[3] for p in pending if p[7]]

            def owner(mask) -> str:  # name of the tensor holding the first chunk flagged in mask
                return with_chunks[int(np.searchsorted(starts, int(np.argmax(mask)), side="right")) - 1]

            wrong = raw_lens != expect
            if wrong.any():
                need(False, f"tensor {owner(wrong)!r}: chunk lengths disagree with its shape")
            index_end = np.uint64(self._index_end)
            # A stored payload is never longer than zstd's worst case for its decoded size, nor
            # shorter than zstd's best case: every block of <= 128 KiB costs >= 4 bytes.
            ends = offs + np.uint64(layout.HEADER_SIZE) + plens
            bad = ((offs % np.uint64(layout.ALIGN) != 0) | (offs < np.uint64(layout.PREAMBLE_SIZE))
                   | (plens > raw_lens + (raw_lens >> np.uint64(7)) + np.uint64(1024))
                   | (raw_lens > plens * np.uint64(layout.MAX_ZSTD_RATIO))
                   | (offs >= index_end) | (ends > index_end))
            if bad.any():
                need(False, f"tensor {owner(bad)!r}: chunk position or length out of bounds (chunk runs past the "
                            "data or claims an impossible size)")
            order = np.argsort(offs, kind="stable")
            need(bool((offs[order][1:] >= ends[order][:-1]).all()), "two chunks overlap")
        pos = 0
        for key, i, run, name, dtype, shape, chunk_rows, n, attrs in pending:
            self._by_name[key] = TensorInfo(i, run, name, dtype, shape, chunk_rows, allchunks[pos:pos + n], attrs)
            pos += n
        self._runs = runs
        return index

    # -- public API ------------------------------------------------------------------------

    @property
    def meta(self) -> dict:
        """File metadata: model, tokenizer, provenance, storage settings, user attrs."""
        return self._index["meta"]

    @property
    def runs(self) -> list[dict]:
        """One dict per run (prompt): its id, prompt text, tokens and whatever the recorder stored."""
        return self._runs

    @property
    def appends(self) -> int:
        """How many times runs were appended to the file after it was first written."""
        return len(self.trailer_chain()) - 1

    @_guarded
    def trailer_chain(self) -> list[int]:
        """Byte offsets of the final trailer and of each trailer it supersedes (newest first).

        Every earlier trailer is checked (CRC, position, its own index position); offsets strictly
        decrease, so a crafted loop cannot make this run forever.
        """
        chain, t = [self._trailer.data_end], self._trailer
        while t.prev_trailer:
            at = t.prev_trailer
            if at % layout.ALIGN or at >= chain[-1] or at < layout.PREAMBLE_SIZE + layout.HEADER_SIZE:
                raise TraceFormatError(f"{self.name}: broken chain of previous trailers", offset=chain[-1])
            t = Trailer.unpack(self._pread(at, layout.TRAILER_SIZE), at, self.name)
            if (t.data_end != at or t.index_offset % layout.ALIGN or t.index_len < layout.HEADER_SIZE
                    or padded(t.index_offset + t.index_len) != at):
                raise TraceFormatError(f"{self.name}: superseded trailer points at an impossible index", offset=at)
            chain.append(at)
        return chain

    def names(self, run: int = 0) -> list[str]:
        """Names of the tensors stored for a run (``layout.WEIGHTS_RUN`` for file-level weights), in write order."""
        return [name for (r, name) in self._by_name if r == run]

    def tensors(self, run: int | None = None) -> list[TensorInfo]:
        """Every tensor in the file (or of one run), in write order."""
        return [t for t in self._by_name.values() if run is None or t.run == run]

    def has(self, name: str, run: int = 0) -> bool:
        return (run, name) in self._by_name

    def __contains__(self, key) -> bool:
        """``name in reader`` (run 0) or ``(run, name) in reader``."""
        return (key if isinstance(key, tuple) else (0, key)) in self._by_name

    def info(self, name: str, run: int = 0) -> TensorInfo:
        try:
            return self._by_name[(run, name)]
        except (KeyError, TypeError):
            where = "the file's weights" if run == layout.WEIGHTS_RUN else f"run {run}"
            raise _user_error(KeyError(f"no tensor {name!r} in {where} of {self.name}")) from None

    @_guarded
    def read(self, name: str, run: int = 0, *, index=(), dtype: str = "float32") -> np.ndarray:
        """Read a tensor, or part of it, decoding only the chunks needed.

        ``index`` selects along the leading axes (every axis but the last; for a 1-d tensor, its
        only axis): integers, optionally followed by one slice of step 1, e.g. ``(3,)`` or
        ``(3, slice(10, 20))`` on ``[heads, q, k]``; the result has numpy's shape for ``x[index]``.
        ``dtype="float32"`` (default) returns floating tensors as float32 (16-bit floats upcast
        exactly, bf16 words decoded, f64 narrowed) and integer/bool tensors as stored;
        ``"stored"`` returns the stored dtype (bf16 as uint16 words). The result is a new,
        writeable array.
        """
        if dtype not in ("float32", "stored"):
            raise _user_error(ValueError(f"dtype must be 'float32' or 'stored', not {dtype!r}"))
        info = self.info(name, run)
        shape = info.shape
        r0, r1, out_shape = _row_range(shape, index)
        rows, row_elems = rows_of(shape)
        stored = DTYPES[info.dtype]
        row_bytes = row_elems * stored.itemsize
        total = (r1 - r0) * row_bytes
        convert = dtype == "float32" and info.dtype in FLOAT_TAGS
        out_dtype = np.dtype(np.float32) if convert else stored
        first, last = (r0 // info.chunk_rows, (r1 - 1) // info.chunk_rows) if total else (0, -1)
        # What one read may cost is the caller's budget (or a few times the file's size, for large
        # files): not a compression ratio, since real activations compress far past any fixed one.
        # The peak of a read is its result plus the chunk being decoded (at most max_chunk_bytes).
        out_bytes = (r1 - r0) * row_elems * out_dtype.itemsize
        cost = out_bytes + (min(info.chunk_rows, rows) * row_bytes if total else 0)  # + the chunk being decoded
        cap = self.limits.result_cap(self.size)
        if cost > cap:
            raise TraceFormatError(f"{self.name}: tensor {name!r}: a read costing {cost:,} bytes is over the limit of "
                                   f"{cap:,} (the memory budget for a file of {self.size:,} bytes; "
                                   "Limits(read_budget_bytes=...) raises it)")
        if total and first == last:  # one chunk: slice it, allocate nothing the file merely claims
            c0 = first * info.chunk_rows
            span = ((r0 - c0) * row_bytes, (r1 - c0) * row_bytes)
            raw = np.frombuffer(self._read_chunk(info, first, span=span), dtype=np.uint8).view(stored)
            arr = to_float32(raw, info.dtype) if convert else raw
            if not arr.flags.writeable:
                arr = arr.copy()  # a new, writeable array that does not keep the whole chunk alive
            return arr.reshape(out_shape)
        # Several chunks: each is decoded (into the result when no conversion is needed) and copied
        # or converted into its rows of the result, so the peak is the result plus one chunk.
        out = np.empty(out_bytes, dtype=np.uint8)
        out_row = row_elems * out_dtype.itemsize
        for c in range(first, last + 1):
            c0 = c * info.chunk_rows
            lo, hi = max(r0, c0), min(r1, c0 + info.chunk_rows, rows)
            dst = out[(lo - r0) * out_row:(hi - r0) * out_row]
            whole = lo == c0 and hi == min(c0 + info.chunk_rows, rows)
            if whole and not convert:  # decode in place
                self._read_chunk(info, c, out=dst)
                continue
            data = np.frombuffer(self._read_chunk(info, c), dtype=np.uint8)
            piece = data[(lo - c0) * row_bytes:(hi - c0) * row_bytes].view(stored)
            dst.view(out_dtype)[:] = to_float32(piece, info.dtype) if convert else piece
        return out.view(out_dtype).reshape(out_shape)

    # -- the public view of the container (what verify and the writer's append use) ----------

    @property
    def trailer(self) -> Trailer:
        """The final trailer: where the index is, where the data ends, the superseded trailer."""
        return self._trailer

    @property
    def index(self) -> dict:
        """The decoded, checked index map (``hxr``, ``features``, ``meta``, ``runs``, ``tensors``). Do not modify it."""
        return self._index

    def read_at(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` bytes at ``offset``, refusing reads past the end of the file."""
        return self._pread(offset, n)

    def read_chunk(self, info: TensorInfo, c: int) -> bytes:
        """Chunk ``c`` of a tensor read, checked against its header and the index, and decoded."""
        return self._read_chunk(info, c)

    def check_chunk(self, info: TensorInfo, c: int) -> int:
        """Every check ``read_chunk`` makes, decoding a large chunk in pieces; returns its decoded size."""
        return self._read_chunk(info, c, check_only=True)

    def _read_chunk(self, info: TensorInfo, c: int, out: np.ndarray | None = None, span=None, check_only=False):
        """Read, check and decode chunk ``c`` of a tensor. Returns exactly its raw_len bytes (in ``out`` if given),
        or with ``span=(lo, hi)`` bytes lo:hi of them (codec.decode)."""
        offset, plen, raw_len, crc = (int(v) for v in info.chunks[c])
        what = f"chunk {c} of {info.name!r} (run {info.run})"
        raw = self._pread(offset, layout.HEADER_SIZE + plen)
        header = RecordHeader.unpack(raw[:layout.HEADER_SIZE], offset, self.name)
        if (header.kind != KIND_CHUNK or header.ident != info.id or header.chunk != c or header.payload_len != plen
                or header.raw_len != raw_len or header.payload_crc != crc
                or header.first_row != c * info.chunk_rows):
            raise TraceFormatError(f"{self.name}: {what}: record header disagrees with the index", offset=offset,
                                   what=what)
        payload = memoryview(raw)[layout.HEADER_SIZE:]
        if layout.crc32(payload) != crc:
            raise TraceFormatError(f"{self.name}: checksum mismatch in {what}", offset=offset, what=what)
        if check_only:
            check(payload, codec=header.codec, filt=header.filter, raw_len=raw_len,
                  itemsize=DTYPES[info.dtype].itemsize, where=f"{self.name}: {what} at byte {offset}")
            return raw_len
        return decode(payload, codec=header.codec, filt=header.filter, raw_len=raw_len,
                      itemsize=DTYPES[info.dtype].itemsize, where=f"{self.name}: {what} at byte {offset}", out=out,
                      span=span)

    def _pread(self, offset: int, n: int) -> bytes:
        if offset < 0 or n < 0 or offset + n > getattr(self, "size", offset + n):
            raise TraceFormatError(f"{self.name}: read of {n} bytes past the end of the file", offset=offset)
        try:
            data = os.pread(self._fd, n, offset)
        except OSError as e:
            raise TraceFormatError(f"{self.name}: read failed ({e.strerror})", offset=offset) from None
        if len(data) != n:
            raise TraceFormatError(f"{self.name}: file shrank while reading (truncated)", offset=offset)
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __repr__(self) -> str:
        return f"TraceReader({self.path!r}: {len(self._runs)} runs, {len(self._by_name)} tensors)"


def _row_range(shape: tuple[int, ...], index) -> tuple[int, int, tuple[int, ...]]:
    """Flat row range [r0, r1) and result shape for leading-axis integer indices plus one optional slice."""
    if not isinstance(index, tuple):
        index = (index,)
    lead = shape[:-1] if len(shape) >= 2 else shape
    rest = shape[len(lead):]
    if len(index) > len(lead):
        raise _user_error(IndexError(f"index {index} has more leading indices than shape {shape} allows "
                                     "(the last axis cannot be indexed)"))
    strides = [math.prod(lead[i + 1:]) for i in range(len(lead))]
    r0 = 0
    for axis, ix in enumerate(index):
        n = lead[axis]
        if isinstance(ix, slice):
            if axis != len(index) - 1:
                raise _user_error(IndexError("only the last index may be a slice"))
            try:
                start, stop, step = ix.indices(n)
            except TypeError as e:
                raise _user_error(TypeError(f"bad slice {ix}: {e}")) from None
            if step != 1:
                raise _user_error(IndexError("slices must have step 1"))
            stop = max(stop, start)
            r0 += start * strides[axis]
            return r0, r0 + (stop - start) * strides[axis], (stop - start, *lead[axis + 1:], *rest)
        try:
            ix = operator.index(ix)
        except TypeError:
            raise _user_error(TypeError(f"indices must be integers or one final slice, not {type(ix).__name__}")) \
                from None
        if not -n <= ix < n:
            raise _user_error(IndexError(f"index {ix} out of range for axis {axis} of size {n}"))
        r0 += (ix % n) * strides[axis]
    remaining = lead[len(index):]
    count = math.prod(remaining)
    return r0, r0 + count, (*remaining, *rest)
