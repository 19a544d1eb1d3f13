"""Caps a reader applies before trusting any number it reads from a file.

Three kinds: absolute caps (no real trace comes near them); caps relative to the file's size on
its metadata and index, which real traces keep a small fraction of the file (a megabyte of msgpack
can be a million empty maps); and, for tensor data, the caller's memory budget. Tensor data is
NOT bounded by a compression ratio: real activations (ReLU outputs, float16 attention patterns,
masks, constants) compress 10-1000x, and a trace the writer wrote must read back (SPEC.md 10.1).
A read returns at most max(the budget, a few times the file's size), so a small file costs at most
the budget; the writer refuses a tensor that a reader with the same limits would refuse.
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
    # One read returns (float32 included) at most max(read_budget_bytes, result_slack_bytes +
    # result_per_file_byte x the file size): the budget is what a caller lets any file cost; the
    # relative term lets a large file return what it really holds (f16 upcast to f32 is 2x).
    read_budget_bytes: int = 4 * GiB
    result_slack_bytes: int = 16 * MiB
    result_per_file_byte: int = 4

    def decoded_cap(self, file_size: int, absolute: int) -> int:
        """Most bytes an INDEX or META record of a file this size may decode to."""
        return min(absolute, self.index_slack_bytes + int(self.index_per_byte * file_size))

    def items_cap(self, file_size: int) -> int:
        """Most msgpack array/map elements an INDEX or META record of a file this size may hold."""
        return self.items_slack + int(self.items_per_byte * file_size)

    def result_cap(self, file_size: int) -> int:
        """Most bytes one read of a file this size may return."""
        relative = self.result_slack_bytes + self.result_per_file_byte * file_size
        return min(self.max_tensor_bytes, max(self.read_budget_bytes, relative))


DEFAULT_LIMITS = Limits()
