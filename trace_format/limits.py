"""Caps a reader applies before trusting any number it reads from a file.

Two kinds: absolute caps (no real trace comes near them), and caps relative to the file's size,
which keep a small file from costing much: a few hundred kilobytes of zstd can claim a gigabyte
of zeros, and a megabyte of msgpack can be a million empty maps. Real traces are dominated by
tensor data, so their metadata and index are a small fraction of the file, and their tensors
compress by well under 4x; the relative caps sit far above what any real trace needs.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    max_index_bytes: int = 256 * MiB  # decoded INDEX payload
    max_meta_bytes: int = 16 * MiB  # decoded META payload
    max_chunk_bytes: int = 64 * MiB  # decoded size of one chunk
    max_tensor_bytes: int = 64 * GiB  # decoded size of one tensor read in full
    max_tensors: int = 1_000_000
    max_runs: int = 100_000
    max_ndim: int = 8
    max_dim: int = 1 << 40
    max_name_len: int = 1024
    # Relative to the file's size (SPEC.md 10.1):
    index_slack_bytes: int = 1 * MiB  # decoded INDEX / META <= slack + index_per_byte x file size
    index_per_byte: float = 1.0
    items_slack: int = 65_536  # elements of all msgpack arrays and maps of one INDEX / META
    items_per_byte: float = 1 / 32
    decode_slack_bytes: int = 8 * MiB  # one read decodes <= slack + decode_per_stored_byte x the stored
    decode_per_stored_byte: int = 8  # bytes of its chunks (activations compress < 2x, attention patterns < 4x)
    result_slack_bytes: int = 16 * MiB  # one read returns (float32 included) <= slack + result_per_file_byte
    result_per_file_byte: int = 4  # x the file size

    def decoded_cap(self, file_size: int, absolute: int) -> int:
        """Most bytes an INDEX or META record of a file this size may decode to."""
        return min(absolute, self.index_slack_bytes + int(self.index_per_byte * file_size))

    def items_cap(self, file_size: int) -> int:
        """Most msgpack array/map elements an INDEX or META record of a file this size may hold."""
        return self.items_slack + int(self.items_per_byte * file_size)

    def decode_cap(self, stored_bytes: int) -> int:
        """Most bytes one read may decode when the chunks it decodes are stored in ``stored_bytes``."""
        return min(self.max_tensor_bytes, self.decode_slack_bytes + self.decode_per_stored_byte * stored_bytes)

    def result_cap(self, file_size: int) -> int:
        """Most bytes one read of a file this size may return."""
        return min(self.max_tensor_bytes, self.result_slack_bytes + self.result_per_file_byte * file_size)


DEFAULT_LIMITS = Limits()
