"""The `.hxr` trace container: streaming writer, random-access reader, integrity checks.

Imports numpy, msgpack and zstandard only. The byte layout is specified in SPEC.md (shipped with
the package).

    TraceWriter   stream tensors (grouped into runs) to a new trace, or append runs to one:
                  begin_run / write / update_run / end_run / flush / close / abort; a context
                  manager (an exception or Ctrl-C inside the block aborts: no file, or the
                  original bytes after a failed append)
    TraceReader   open a trace and read tensors or row ranges of them: meta, runs, names(run),
                  tensors(run), info(name, run), has / ``in``, read(name, run, index=, dtype=),
                  version, features, minor, file_uuid, appends, trailer_chain()
    TensorInfo    what the index says about one tensor (dtype, shape, chunks, nbytes, stored_bytes)
    open_regular, check_output_path   open only regular files, never blocking (FIFOs, devices); refuse to
                  write over a non-regular file
    TraceFormatError   the one error for a file that is not a whole, valid trace (``.offset``:
                  byte offset of the damaged structure, when known)
    Limits        caps applied to every number read from a file (DEFAULT_LIMITS)
    verify        read and check every record and byte of a trace (returns a VerifyReport)
    WEIGHTS_RUN   run id of file-level tensors (model weights), -1
    FORMAT_VERSION  (major, minor) written by this package
"""

from .errors import TraceFormatError, TraceLimitError
from .fileio import check_output_path, open_regular
from .layout import WEIGHTS_RUN
from .limits import DEFAULT_LIMITS, Limits
from .reader import TensorInfo, TraceReader
from .verify import VerifyReport, verify


def __getattr__(name: str):
    # The writer (threads, file locks, a logger) loads on first use: a replay only reads, and its cold start
    # is measured (bench/replay_bench.py).
    if name == "TraceWriter":
        from .writer import TraceWriter

        globals()["TraceWriter"] = TraceWriter
        return TraceWriter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


FORMAT_VERSION = (1, 0)  # (major, minor) this package writes; it reads every minor of major 1

__all__ = [
    "DEFAULT_LIMITS", "FORMAT_VERSION", "Limits", "TensorInfo", "TraceFormatError", "TraceLimitError", "TraceReader",
    "TraceWriter", "VerifyReport", "WEIGHTS_RUN", "check_output_path", "open_regular", "verify",
]
