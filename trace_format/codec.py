"""Encoding and safe decoding of record payloads (zstd frames, byte-shuffle, msgpack)."""

from __future__ import annotations

import threading

import msgpack
import numpy as np
import zstandard

from .dtypes import shuffle, unshuffle, unshuffle_span
from .errors import TraceFormatError
from .layout import CODEC_NONE, CODEC_ZSTD, FILTER_NONE, FILTER_SHUFFLE, crc32

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # ZstdCompressor is not thread-safe: one per thread and level.
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def _scratch(n: int):
    """A per-thread reusable buffer of at least n bytes (fresh 1 MiB buffers cost page faults per chunk)."""
    buf = getattr(_local, "scratch", None)
    if buf is None or buf.size < n:
        buf = _local.scratch = np.empty(max(n, 1 << 20), dtype=np.uint8)
    return buf


def encode(data, *, level: int | None, itemsize: int, use_shuffle: bool) -> tuple[int, int, bytes, int]:
    """Encode one payload. Returns (codec, filter, payload, crc of payload).

    level None stores the bytes as they are. A chunk that zstd cannot shrink is stored raw too; the
    payload is then a memoryview of ``data`` (which must stay unchanged until it is written).
    """
    raw = memoryview(data).cast("B")
    if level is None or len(raw) == 0:  # stored as is: the caller's buffer, no copy
        return CODEC_NONE, FILTER_NONE, raw, crc32(raw)
    filt = FILTER_SHUFFLE if use_shuffle and itemsize > 1 else FILTER_NONE
    src = shuffle(raw, itemsize, out=_scratch(len(raw))).data if filt == FILTER_SHUFFLE else raw
    payload = _compressor(level).compress(src)
    if len(payload) >= len(raw):
        payload, codec, filt = raw, CODEC_NONE, FILTER_NONE
    else:
        codec = CODEC_ZSTD
    return codec, filt, payload, crc32(payload)


def _check_frame(payload, *, filt: int, raw_len: int, itemsize: int, where: str) -> None:
    """The checks made before a zstd payload is decompressed."""
    if filt not in (FILTER_NONE, FILTER_SHUFFLE):
        raise TraceFormatError(f"{where}: unknown filter {filt}")
    if filt == FILTER_SHUFFLE and (itemsize <= 1 or raw_len % itemsize):
        raise TraceFormatError(f"{where}: shuffle filter with element size {itemsize} on {raw_len} bytes")
    try:
        # python-zstandard allocates whatever the frame header claims and ignores max_output_size
        # when the frame declares its size: check the claim against the index first.
        params = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError as e:
        raise TraceFormatError(f"{where}: not a zstd frame ({e})") from None
    if params.content_size != raw_len:
        claimed = "no size" if params.content_size == zstandard.CONTENTSIZE_UNKNOWN else f"{params.content_size} bytes"
        raise TraceFormatError(f"{where}: zstd frame claims {claimed}, index says {raw_len}")
    if not params.has_checksum or params.dict_id:
        raise TraceFormatError(f"{where}: zstd frame without content checksum or with a dictionary")


def decode(payload, *, codec: int, filt: int, raw_len: int, itemsize: int, where: str, out=None, span=None):
    """Decode one payload whose decoded length must be exactly raw_len (already checked against limits).

    Returns a bytes-like object of exactly raw_len bytes; with ``out`` (a uint8 array of raw_len
    bytes) the result is written there and ``out`` is returned. With ``span=(lo, hi)`` (byte offsets,
    multiples of itemsize) only bytes lo:hi of the decoded data are returned, as a new uint8 array: the
    whole payload is still decompressed and checked, but a shuffled one is un-shuffled for the span only
    (one row of a chunk, the cold read of one position).
    """
    if span is not None and not (0 <= span[0] <= span[1] <= raw_len and span[0] % itemsize == span[1] % itemsize == 0):
        raise ValueError(f"span {span} is not a range of whole elements within {raw_len} bytes")
    if codec == CODEC_NONE:
        if filt != FILTER_NONE:
            raise TraceFormatError(f"{where}: filter {filt} on an uncompressed payload")
        if len(payload) != raw_len:
            raise TraceFormatError(f"{where}: stored length {len(payload)} != decoded length {raw_len}")
        if span is not None:
            return memoryview(payload).cast("B")[span[0]:span[1]]
        if out is not None:
            out[:] = memoryview(payload).cast("B")
            return out
        return payload
    if codec != CODEC_ZSTD:
        raise TraceFormatError(f"{where}: unknown codec {codec}")
    _check_frame(payload, filt=filt, raw_len=raw_len, itemsize=itemsize, where=where)
    try:
        # One frame, nothing after it: hidden trailing data is refused, not ignored.
        data = _decompressor().decompress(payload, max_output_size=raw_len, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise TraceFormatError(f"{where}: zstd decoding failed ({e})") from None
    if len(data) != raw_len:
        raise TraceFormatError(f"{where}: decoded {len(data)} bytes, expected {raw_len}")
    if span is not None:
        lo, hi = span
        if filt == FILTER_SHUFFLE:
            return unshuffle_span(data, itemsize, lo // itemsize, hi // itemsize)
        return np.frombuffer(data, dtype=np.uint8)[lo:hi].copy()
    if filt == FILTER_SHUFFLE:
        return unshuffle(data, itemsize, out=out)
    if out is not None:
        out[:] = memoryview(data)
        return out
    return data


STREAM_ABOVE = 8 << 20  # check() decodes chunks larger than this in pieces
_FEED = 256  # compressed bytes per step: at most 256 x 32768 = 8 MiB decoded at a time


def check(payload, *, codec: int, filt: int, raw_len: int, itemsize: int, where: str) -> None:
    """Everything decode() checks (frame header, content checksum, exact length, no trailing data),
    without holding the decoded payload: a large chunk is decompressed in pieces and discarded, so
    verifying a file costs a few MiB whatever its chunks claim (`verify` decodes every chunk)."""
    if codec != CODEC_ZSTD or raw_len <= STREAM_ABOVE:
        decode(payload, codec=codec, filt=filt, raw_len=raw_len, itemsize=itemsize, where=where)
        return
    _check_frame(payload, filt=filt, raw_len=raw_len, itemsize=itemsize, where=where)
    dobj, view, n, fed = _decompressor().decompressobj(), memoryview(payload).cast("B"), 0, 0
    try:
        while fed < len(view) and not dobj.eof and n <= raw_len:
            n += len(dobj.decompress(view[fed:fed + _FEED]))
            fed += len(view[fed:fed + _FEED])
    except zstandard.ZstdError as e:
        raise TraceFormatError(f"{where}: zstd decoding failed ({e})") from None
    extra = len(view) - fed + (len(dobj.unused_data) if dobj.eof else 0)
    if not dobj.eof or extra or n != raw_len:
        raise TraceFormatError(f"{where}: decoded {n} bytes of one frame, expected exactly {raw_len} and nothing after")


def _reject_ext(code, data):
    raise ValueError(f"msgpack ext type {code} is not allowed in a trace")


def pack_obj(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


_PLAIN = (str, int, float, bool, bytes, type(None))


class _TooManyItems(Exception):
    pass


def unpack_obj(data: bytes, where: str, *, max_items: int | None = None):
    """Decode a META / INDEX payload. ``max_items`` bounds the elements of all its arrays and maps
    together (each container counts one more): a megabyte of msgpack can otherwise be a million
    empty maps, some 64 MB of Python objects."""
    limit = 2 * len(data) + 2 if max_items is None else max_items  # (None: no limit beyond the bytes)
    budget = [limit]

    def count(x):
        budget[0] -= len(x) + 1
        if budget[0] < 0:
            raise _TooManyItems
        return x

    cap = max(0, budget[0])
    try:
        # unpackb derives its size limits from len(data); ext types are refused by ext_hook...
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_reject_ext, use_list=True,
                              list_hook=count, object_hook=count, max_array_len=cap, max_map_len=cap)
    except _TooManyItems:
        raise TraceFormatError(f"{where}: holds more than {limit:,} msgpack items, over the limit for a file "
                               "of this size") from None
    except ValueError as e:
        if "exceeds max_" in str(e):  # one array or map longer than the whole budget
            raise TraceFormatError(f"{where}: malformed msgpack (an array or map of more than {limit:,} msgpack "
                                   "items, over the limit for a file of this size)") from None
        raise TraceFormatError(f"{where}: malformed msgpack ({type(e).__name__}: {e})") from None
    except Exception as e:  # msgpack raises ValueError, StackError, FormatError, UnicodeDecodeError...
        raise TraceFormatError(f"{where}: malformed msgpack ({type(e).__name__}: {e})") from None
    # ...except the Timestamp ext (-1), which msgpack decodes without asking ext_hook.
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            if not all(type(k) is str for k in x):
                raise TraceFormatError(f"{where}: msgpack map with a key that is not a str")
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
        elif not isinstance(x, _PLAIN):
            raise TraceFormatError(f"{where}: msgpack holds a {type(x).__name__}, which traces never contain")
    return obj
