"""Caps a reader applies before trusting any number it reads from a file."""

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


DEFAULT_LIMITS = Limits()
