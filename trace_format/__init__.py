"""The `.hxr` trace container: streaming writer, random-access reader, integrity checks.

Imports numpy, msgpack and zstandard only. The byte layout is specified in SPEC.md.

    TraceWriter   stream tensors (grouped into runs) to a new or existing trace
    TraceReader   open a trace and read tensors or row ranges of them
    TensorInfo    what the index says about one tensor
    TraceFormatError   the one error for a file that is not a whole, valid trace
    Limits        caps applied to every number read from a file
    verify        read and check every record and byte of a trace (returns a VerifyReport)
    WEIGHTS_RUN   run id of file-level tensors (model weights)
"""

from .errors import TraceFormatError
from .limits import DEFAULT_LIMITS, Limits
from .reader import TensorInfo, TraceReader
from .verify import VerifyReport, verify
from .writer import WEIGHTS_RUN, TraceWriter

FORMAT_VERSION = (1, 0)  # (major, minor) this package writes; it reads every minor of major 1

__all__ = [
    "DEFAULT_LIMITS", "FORMAT_VERSION", "Limits", "TensorInfo", "TraceFormatError", "TraceReader", "TraceWriter",
    "VerifyReport", "WEIGHTS_RUN", "verify",
]
