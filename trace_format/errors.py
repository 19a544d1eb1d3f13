"""The one exception type the trace reader and writer raise for a bad file."""

from __future__ import annotations


class TraceFormatError(Exception):
    """A trace is not readable as `.hxr`: wrong magic, truncated, corrupt, over a limit...

    The message names what is wrong; `offset` (when known) is the byte offset of the damaged
    record and `what` names the record or tensor.
    """

    def __init__(self, message: str, *, offset: int | None = None, what: str | None = None):
        self.offset = offset
        self.what = what
        if offset is not None:
            message = f"{message} (at byte {offset})"
        super().__init__(message)


class TraceLimitError(TraceFormatError, ValueError):
    """The writer refuses a tensor that a reader with the same limits would refuse to return (SPEC.md
    10.1). A ValueError like the writer's other refusals, and a TraceFormatError so that the command
    line reports it in one line."""
