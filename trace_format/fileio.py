"""Opening files that may be anything: only regular files are opened, and never by a blocking open.

A FIFO named ``t.hxr`` blocks ``open()`` until a writer appears; a device node can have side
effects on open; a directory opens fine and then fails oddly. So a path is ``stat``-ed first and
refused unless it is a regular file, then opened with ``O_NONBLOCK`` (a FIFO swapped in between
the two calls does not block either) and checked again on the descriptor.
"""

from __future__ import annotations

import os
import stat

from .errors import TraceFormatError

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_NOCTTY = getattr(os, "O_NOCTTY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

_KINDS = (
    (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
)


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words ("a FIFO (named pipe)")."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def shown(path: str) -> str:
    """A path for a one-line message: control characters (a newline in a file name) escaped."""
    if path.isprintable():
        return path
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in path)


def open_regular(path: str, *, write: bool = False, what: str = "a trace") -> int:
    """A descriptor on ``path`` opened read-only (or read-write), refusing anything but a regular file.

    Raises TraceFormatError with one line naming the path and what it is instead.
    """
    name = shown(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TraceFormatError(f"{name}: no such file") from None
    except OSError as e:
        raise TraceFormatError(f"{name}: cannot open ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise TraceFormatError(f"{name}: is {kind_of(st.st_mode)}, not {what}")
    flags = (os.O_RDWR if write else os.O_RDONLY) | _NONBLOCK | _NOCTTY | _CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise TraceFormatError(f"{name}: no such file") from None
    except OSError as e:
        raise TraceFormatError(f"{name}: cannot open ({e.strerror or e})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # replaced between stat and open
            raise TraceFormatError(f"{name}: is {kind_of(mode)}, not {what}")
        if _NONBLOCK:  # regular files ignore it, but a caller's later reads should not see it
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_output_path(path: str) -> None:
    """Refuse to write over something that exists and is not a regular file (``-o /dev/null`` as root
    would replace the device node with a file); a missing path or a regular file is fine."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise TraceFormatError(f"{shown(path)}: cannot write there ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise TraceFormatError(f"{shown(path)}: is {kind_of(st.st_mode)}; the output must be a regular file "
                               "(or a new path)")
