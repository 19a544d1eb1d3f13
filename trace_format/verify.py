"""Check a whole trace, like ``gzip -t``: every record, every checksum, every byte accounted for."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import layout
from .codec import decode, unpack_obj
from .errors import TraceFormatError
from .layout import CRITICAL, KIND_CHUNK, KIND_INDEX, KIND_META, KIND_NAMES, RecordHeader, Trailer, padded
from .reader import TraceReader


@dataclass
class VerifyReport:
    path: str
    size: int
    records: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    raw_bytes: int = 0  # decoded size of every chunk
    superseded_bytes: int = 0  # old indexes and trailers left behind by appends


def verify(path: str | os.PathLike, *, reader: TraceReader | None = None) -> VerifyReport:
    """Read every record of the file and check it; raise TraceFormatError at the first damage."""
    path = os.fspath(path)
    own = reader is None
    r = reader or TraceReader(path)
    try:
        return _verify(r)
    finally:
        if own:
            r.close()


def _verify(r: TraceReader) -> VerifyReport:
    path, final = r.path, r._trailer
    report = VerifyReport(path, r.size)
    chunks = {}
    for info in r.tensors():
        for c, row in enumerate(info.chunks):
            chunks[int(row[0])] = (info, c)
    # Trailers superseded by appends: follow the chain back from the final trailer.
    old_trailers, link = set(), final.prev_trailer
    while link:
        if link in old_trailers or link % layout.ALIGN or link >= final.index_offset:
            raise TraceFormatError(f"{path}: broken chain of previous trailers", offset=link)
        old_trailers.add(link)
        link = Trailer.unpack(r._pread(link, layout.TRAILER_SIZE), link, path).prev_trailer

    pos, seen_chunks = layout.PREAMBLE_SIZE, 0
    while pos < final.index_offset:
        if pos in old_trailers:
            Trailer.unpack(r._pread(pos, layout.TRAILER_SIZE), pos, path)
            report.superseded_bytes += layout.TRAILER_SIZE
            pos += layout.TRAILER_SIZE
            continue
        header = RecordHeader.unpack(r._pread(pos, layout.HEADER_SIZE), pos, path)
        end = pos + layout.HEADER_SIZE + header.payload_len
        stop = padded(end)
        if stop > final.index_offset:
            raise TraceFormatError(f"{path}: record runs past the index", offset=pos)
        payload = r._pread(pos + layout.HEADER_SIZE, header.payload_len)
        if layout.crc32(payload) != header.payload_crc:
            raise TraceFormatError(f"{path}: checksum mismatch in {_kind(header.kind)} record", offset=pos)
        if any(r._pread(end, stop - end)):
            raise TraceFormatError(f"{path}: padding after {_kind(header.kind)} record is not zero", offset=end)
        name = _kind(header.kind)
        report.records[name] = report.records.get(name, 0) + 1
        if header.kind == KIND_CHUNK:
            if pos not in chunks:
                raise TraceFormatError(f"{path}: chunk record not in the index", offset=pos)
            info, c = chunks[pos]
            data = r._read_chunk(info, c)  # header/index agreement, CRC, zstd content checksum
            report.chunks += 1
            report.raw_bytes += len(data)
            seen_chunks += 1
        elif header.kind in (KIND_META, KIND_INDEX):
            cap = r.limits.max_meta_bytes if header.kind == KIND_META else r.limits.max_index_bytes
            if header.raw_len > cap:
                raise TraceFormatError(f"{path}: {name} record over the size limit", offset=pos)
            raw = decode(payload, codec=header.codec, filt=header.filter, raw_len=header.raw_len, itemsize=1,
                         where=f"{path}: {name} record at byte {pos}")
            unpack_obj(bytes(raw), f"{path}: {name} record at byte {pos}")
            if header.kind == KIND_INDEX:
                report.superseded_bytes += stop - pos
        elif header.kind & CRITICAL:
            raise TraceFormatError(f"{path}: unknown critical record kind {header.kind:#x}; upgrade hexray", offset=pos)
        pos = stop
    if pos != final.index_offset:
        raise TraceFormatError(f"{path}: records do not end where the index starts", offset=pos)
    if seen_chunks != len(chunks):
        raise TraceFormatError(f"{path}: {len(chunks) - seen_chunks} indexed chunk(s) not found in the record stream")
    index_end = final.index_offset + final.index_len
    if any(r._pread(index_end, final.data_end - index_end)):
        raise TraceFormatError(f"{path}: padding after the index is not zero", offset=index_end)
    report.records["INDEX"] = report.records.get("INDEX", 0) + 1
    return report


def _kind(kind: int) -> str:
    return KIND_NAMES.get(kind, f"kind {kind:#x}")
