"""Check a whole trace, like ``gzip -t``: every record, every checksum, every byte accounted for."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from . import layout
from .codec import decode, unpack_obj
from .errors import TraceFormatError
from .fileio import shown
from .layout import CRITICAL, KIND_CHUNK, KIND_INDEX, KIND_META, KIND_NAMES, RecordHeader, Trailer, padded
from .limits import DEFAULT_LIMITS, Limits
from .reader import TraceReader

_PIECE = 4 << 20  # unknown records are checksummed in pieces of this size, never read whole


@dataclass
class VerifyReport:
    """What ``verify`` walked: every record of the file, all of it checked."""

    path: str
    size: int  # file size in bytes
    records: dict[str, int] = field(default_factory=dict)  # count per record kind (INDEX includes superseded ones)
    chunks: int = 0  # CHUNK records, each decoded and checked
    raw_bytes: int = 0  # decoded size of every chunk
    stored_bytes: int = 0  # stored (compressed) payload bytes of every chunk
    superseded_bytes: int = 0  # old indexes and trailers left behind by appends
    runs: int = 0
    tensors: int = 0
    appends: int = 0

    @property
    def n_records(self) -> int:
        """Records walked, the final INDEX included (superseded trailers are not records)."""
        return sum(self.records.values())


def verify(
    path: str | os.PathLike, *, reader: TraceReader | None = None, limits: Limits = DEFAULT_LIMITS
) -> VerifyReport:
    """Read every record of the file and check it; raise TraceFormatError at the first damage.

    The error's ``offset`` is the byte offset of the first damaged record (or structure) and its
    message names it. No other exception escapes for a malformed file.
    """
    path = os.fspath(path)
    own = reader is None
    r = reader or TraceReader(path, limits=limits)
    try:
        return _verify(r)
    except TraceFormatError:
        raise
    except (KeyError, IndexError, ValueError, TypeError, AttributeError, OverflowError, MemoryError, RecursionError,
            UnicodeError, struct.error) as e:
        raise TraceFormatError(f"{shown(path)}: malformed trace ({type(e).__name__}: {e})") from None
    finally:
        if own:
            r.close()


def _verify(r: TraceReader) -> VerifyReport:
    path, final, lim = r.name, r.trailer, r.limits
    report = VerifyReport(path, r.size, runs=len(r.runs), tensors=len(r.tensors()))
    chunks = {}
    for info in r.tensors():
        for c, row in enumerate(info.chunks):
            chunks[int(row[0])] = (info, c)
    # Trailers superseded by appends, and the INDEX record each of them closed.
    chain = r.trailer_chain()
    report.appends = len(chain) - 1
    old_trailers = set(chain[1:])
    old_indexes = {Trailer.unpack(r.read_at(at, layout.TRAILER_SIZE), at, path).index_offset for at in chain[1:]}

    pos, seen_chunks, seen_indexes = layout.PREAMBLE_SIZE, 0, set()
    while pos < final.index_offset:
        if pos in old_trailers:
            Trailer.unpack(r.read_at(pos, layout.TRAILER_SIZE), pos, path)
            report.superseded_bytes += layout.TRAILER_SIZE
            pos += layout.TRAILER_SIZE
            continue
        header = RecordHeader.unpack(r.read_at(pos, layout.HEADER_SIZE), pos, path)
        name = _kind(header.kind)
        if pos == layout.PREAMBLE_SIZE and header.kind != KIND_META:
            raise TraceFormatError(f"{path}: first record is {name}, not META", offset=pos)
        end = pos + layout.HEADER_SIZE + header.payload_len
        stop = padded(end)
        if stop > final.index_offset:
            raise TraceFormatError(f"{path}: {name} record runs past the index", offset=pos)
        if header.kind == KIND_CHUNK:
            if pos not in chunks:
                raise TraceFormatError(f"{path}: CHUNK record (tensor id {header.ident}, chunk {header.chunk}) "
                                       "is not in the index", offset=pos)
            info, c = chunks.pop(pos)
            raw_len = r.check_chunk(info, c)  # header/index agreement, CRC, frame size, zstd content checksum
            report.chunks += 1
            report.raw_bytes += raw_len
            report.stored_bytes += header.payload_len
            seen_chunks += 1
        elif header.kind in (KIND_META, KIND_INDEX):
            if header.kind == KIND_META and pos != layout.PREAMBLE_SIZE:
                raise TraceFormatError(f"{path}: META record after the first record", offset=pos)
            if header.kind == KIND_INDEX:
                if pos not in old_indexes:
                    raise TraceFormatError(f"{path}: INDEX record that no trailer points to", offset=pos)
                seen_indexes.add(pos)
            cap = lim.decoded_cap(r.size, lim.max_meta_bytes if header.kind == KIND_META else lim.max_index_bytes)
            if header.raw_len > cap or header.payload_len > cap:
                raise TraceFormatError(f"{path}: {name} record over the size limit of {cap} bytes", offset=pos)
            payload = r.read_at(pos + layout.HEADER_SIZE, header.payload_len)
            if layout.crc32(payload) != header.payload_crc:
                raise TraceFormatError(f"{path}: checksum mismatch in {name} record", offset=pos)
            raw = decode(payload, codec=header.codec, filt=header.filter, raw_len=header.raw_len, itemsize=1,
                         where=f"{path}: {name} record at byte {pos}")
            obj = unpack_obj(bytes(raw), f"{path}: {name} record at byte {pos}", max_items=lim.items_cap(r.size))
            if not isinstance(obj, dict):
                raise TraceFormatError(f"{path}: {name} record is not a map", offset=pos)
            if header.kind == KIND_INDEX:
                report.superseded_bytes += stop - pos
        elif header.kind & CRITICAL:
            raise TraceFormatError(f"{path}: unknown critical record kind {header.kind:#04x}; upgrade hexray",
                                   offset=pos)
        else:  # unknown ancillary kind: skipped by readers, but its bytes must still be intact
            crc, at = 0, pos + layout.HEADER_SIZE
            while at < end:
                n = min(_PIECE, end - at)
                crc = layout.zlib.crc32(r.read_at(at, n), crc)
                at += n
            if crc & 0xFFFFFFFF != header.payload_crc:
                raise TraceFormatError(f"{path}: checksum mismatch in {name} record", offset=pos)
        if any(r.read_at(end, stop - end)):
            raise TraceFormatError(f"{path}: padding after {name} record is not zero", offset=end)
        report.records[name] = report.records.get(name, 0) + 1
        pos = stop
    if pos != final.index_offset:
        raise TraceFormatError(f"{path}: records do not end where the index starts", offset=pos)
    if chunks:
        first = min(chunks)
        info, c = chunks[first]
        raise TraceFormatError(f"{path}: {len(chunks)} indexed chunk(s) not found in the record stream, first: "
                               f"chunk {c} of {info.name!r}", offset=first)
    if seen_indexes != old_indexes:
        raise TraceFormatError(f"{path}: a superseded INDEX record is missing", offset=min(old_indexes - seen_indexes))
    index_end = final.index_offset + final.index_len
    if any(r.read_at(index_end, final.data_end - index_end)):
        raise TraceFormatError(f"{path}: padding after the index is not zero", offset=index_end)
    report.records["INDEX"] = report.records.get("INDEX", 0) + 1
    return report


def _kind(kind: int) -> str:
    return KIND_NAMES.get(kind, f"kind {kind:#04x}")
