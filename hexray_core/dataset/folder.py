"""Opening what is inside a dataset folder without ever leaving it.

A dataset folder is as untrusted as a trace: ``shards`` may be a symbolic link to another folder
(then cleaning stale files would delete there, and shards would be written there), ``.lock`` a link
that makes ``open(O_CREAT)`` create the file it points to, ``dataset.json`` a FIFO (``open`` blocks
forever) or a link to ``/dev/zero`` (``read()`` grows until memory runs out). So no link inside the
folder is followed, for reading or writing: every path below the folder is checked component by
component with ``lstat`` and the last one is opened with ``O_NOFOLLOW``; only regular files are
read (opened with ``O_NONBLOCK``, then checked on the descriptor), and no more than a cap of them.
The folder itself is the user's choice, link or not.
"""

from __future__ import annotations

import json
import os
import stat

from hexray_core.errors import HexRayError
from trace_format.fileio import kind_of, shown

MAX_JSON_BYTES = 64 << 20  # dataset.json, a shard's list of rows (16 rows of metadata in practice)
MAX_LINE_BYTES = 16 << 20  # one manifest line
_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def inside(out: str, rel: str) -> str:
    """``out/rel``, refusing a ``rel`` that leaves the folder or passes through a symbolic link."""
    parts = rel.split("/")
    if os.path.isabs(rel) or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise HexRayError(f"{shown(out)}: {shown(rel)!r} is not a path inside the dataset folder")
    path = out
    for p in parts:
        path = os.path.join(path, p)
        if os.path.islink(path):
            raise HexRayError(f"{shown(path)}: is a symbolic link; HexRay never follows a link inside a dataset "
                              "folder (it could lead out of it)")
    return path


def open_read(out: str, rel: str):
    """A binary file object on the regular file ``out/rel`` (no link followed, no FIFO or device opened).

    A missing file raises FileNotFoundError; anything else wrong, one HexRayError.
    """
    path = inside(out, rel)
    try:
        fd = os.open(path, _FLAGS | _NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise HexRayError(f"{shown(path)}: cannot open ({e.strerror or e})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise HexRayError(f"{shown(path)}: is {kind_of(mode)}, not a file HexRay wrote")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def loads(data: bytes, where: str):
    """JSON from bytes; every way it can be wrong is one HexRayError naming ``where``."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise HexRayError(f"{where}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise HexRayError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:
        raise HexRayError(f"{where}: not JSON ({getattr(e, 'msg', e)})") from None


def read_json(out: str, rel: str, limit: int = MAX_JSON_BYTES):
    """The JSON file ``out/rel`` (FileNotFoundError when missing)."""
    with open_read(out, rel) as f:
        data = f.read(limit + 1)
    where = shown(os.path.join(out, rel))
    if len(data) > limit:
        raise HexRayError(f"{where}: over {limit:,} bytes, not a file HexRay wrote")
    return loads(data, where)


def lines(f, where: str, limit: int = MAX_LINE_BYTES):
    """(number, bytes) of each non-blank line of a binary file, refusing a line over ``limit`` bytes."""
    number = 0
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        number += 1
        if len(line) > limit and not line.endswith(b"\n"):
            raise HexRayError(f"{where}:{number}: a line over {limit:,} bytes")
        if line.strip():
            yield number, line
