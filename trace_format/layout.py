"""Fixed binary structures of the `.hxr` container: preamble, record header, trailer.

Everything is little-endian. SPEC.md is the normative description; this module is its code.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

from .errors import TraceFormatError

MAGIC = b"\x89HXR\r\n\x1a\n"  # PNG-style: catches text-mode and 7-bit mangling
RECORD_MAGIC = b"HXRr"
TRAILER_MAGIC = b"HXRTRAIL"
END_MAGIC = b"HXR-END\n"

MAJOR, MINOR = 1, 0
ALIGN = 64
WEIGHTS_RUN = -1  # run id of file-level tensors (model kit weights)
TAIL_READ = 64 * 1024  # opening reads this much of the file's end: the trailer and, usually, the index
MAX_ZSTD_RATIO = 32768  # no zstd frame decodes to more than this many times its own size (4 B per 128 KiB block)
PREAMBLE_SIZE = HEADER_SIZE = TRAILER_SIZE = 64

# Record kinds. Bit 7 marks a kind as critical: a reader that does not know it must stop; a kind
# without bit 7 may be skipped by its length. All kinds of v1.0 are critical.
CRITICAL = 0x80
KIND_META = 0x81
KIND_CHUNK = 0x82
KIND_INDEX = 0x83
KIND_NAMES = {KIND_META: "META", KIND_CHUNK: "CHUNK", KIND_INDEX: "INDEX"}

CODEC_NONE, CODEC_ZSTD = 0, 1
FILTER_NONE, FILTER_SHUFFLE = 0, 1

_PREAMBLE = struct.Struct("<8sHHI16s28s")  # + 4-byte preamble CRC
_HEADER = struct.Struct("<4sBBBBIIQQQI16s")  # + 4-byte header CRC
_TRAILER = struct.Struct("<8sHHIQQQQI")  # + trailer CRC + END_MAGIC


def crc32(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def rows_of(shape) -> tuple[int, int]:
    """(rows, elements per row) of a tensor viewed as 2-D along its last axis (exact Python ints).

    0-d: (1, 1); 1-d ``[n]``: (n, 1); otherwise (product of all axes but the last, last axis).
    """
    shape = tuple(shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return int(shape[0]), 1
    return math.prod(int(d) for d in shape[:-1]), int(shape[-1])


def padded(n: int) -> int:
    """Bytes from a record's start to the next 64-byte boundary after n bytes."""
    return -(-n // ALIGN) * ALIGN


def pack_preamble(file_uuid: bytes) -> bytes:
    body = _PREAMBLE.pack(MAGIC, MAJOR, MINOR, 0, file_uuid, bytes(28))
    return body + struct.pack("<I", crc32(body))


def check_preamble(raw: bytes, path: str) -> bytes:
    """Validate the 64-byte preamble; return the file uuid."""
    if len(raw) < PREAMBLE_SIZE:
        if len(raw) and MAGIC.startswith(raw[:8]):
            raise TraceFormatError(f"{path}: truncated ({len(raw)} bytes, not even a whole preamble)", offset=0)
        raise TraceFormatError(f"{path}: not an .hxr trace (file is {len(raw)} bytes)", offset=0)
    magic, major, _minor, flags, file_uuid, reserved = _PREAMBLE.unpack(raw[:60])
    if magic != MAGIC:
        raise TraceFormatError(f"{path}: not an .hxr trace (bad magic)", offset=0)
    check_version(major, path)
    if crc32(raw[:60]) != struct.unpack("<I", raw[60:64])[0]:
        raise TraceFormatError(f"{path}: preamble checksum mismatch", offset=0)
    if flags or any(reserved):
        raise TraceFormatError(f"{path}: preamble has reserved bits set", offset=0)
    return file_uuid


def check_version(major: int, path: str) -> None:
    if major != MAJOR:
        raise TraceFormatError(
            f"{path}: file is .hxr v{major}, this HexRay reads v{MAJOR}; upgrade hexray", offset=0
        )


@dataclass(frozen=True)
class RecordHeader:
    kind: int
    codec: int
    filter: int
    flags: int
    ident: int  # tensor id for CHUNK records, else 0
    chunk: int  # chunk number within the tensor, else 0
    payload_len: int  # stored bytes after the header (padding not included)
    raw_len: int  # bytes after decoding
    first_row: int  # first row of this chunk in its tensor (lets a scan place it without the index), else 0
    payload_crc: int

    def pack(self) -> bytes:
        body = _HEADER.pack(
            RECORD_MAGIC, self.kind, self.codec, self.filter, self.flags, self.ident, self.chunk,
            self.payload_len, self.raw_len, self.first_row, self.payload_crc, bytes(16),
        )
        return body + struct.pack("<I", crc32(body))

    @classmethod
    def unpack(cls, raw: bytes, offset: int, path: str) -> RecordHeader:
        if len(raw) < HEADER_SIZE:
            raise TraceFormatError(f"{path}: truncated record header", offset=offset)
        body, (crc,) = raw[:60], struct.unpack("<I", raw[60:64])
        fields = _HEADER.unpack(body)
        if fields[0] != RECORD_MAGIC:
            raise TraceFormatError(f"{path}: bad record header magic (no record starts here)", offset=offset)
        if crc32(body) != crc:
            raise TraceFormatError(f"{path}: record header checksum mismatch", offset=offset)
        if fields[4] or any(fields[11]):
            raise TraceFormatError(f"{path}: record header has reserved flags or bytes set", offset=offset)
        return cls(*fields[1:11])


@dataclass(frozen=True)
class Trailer:
    index_offset: int
    index_len: int  # header + payload, without padding
    data_end: int  # offset of this trailer
    prev_trailer: int  # offset of the trailer this one supersedes after an append, 0 if none
    index_crc: int

    def pack(self) -> bytes:
        body = _TRAILER.pack(
            TRAILER_MAGIC, MAJOR, MINOR, 0, self.index_offset, self.index_len, self.data_end,
            self.prev_trailer, self.index_crc,
        )
        return body + struct.pack("<I", crc32(body)) + END_MAGIC

    @classmethod
    def unpack(cls, raw: bytes, offset: int, path: str) -> Trailer:
        if len(raw) != TRAILER_SIZE or raw[56:] != END_MAGIC or raw[:8] != TRAILER_MAGIC:
            raise TraceFormatError(
                f"{path}: no trailer at end of file (truncated, or a write did not finish)", offset=offset
            )
        body, (crc,) = raw[:52], struct.unpack("<I", raw[52:56])
        if crc32(body) != crc:
            raise TraceFormatError(f"{path}: trailer checksum mismatch", offset=offset)
        _magic, major, _minor, flags, *rest = _TRAILER.unpack(body)
        check_version(major, path)
        if flags:
            raise TraceFormatError(f"{path}: trailer has reserved flags set", offset=offset)
        return cls(*rest)
