"""The JSON-RPC message loop, hardened against what a client (or anything on stdin) may send.

pygls' own loop (``pygls.io_.run_async``) trusts the framing: a ``Content-Length`` of 2**62 makes
it allocate until a ``MemoryError`` kills the server, and a request whose params do not
deserialize (a hover at line -1, null params, ``"jsonrpc": "1.0"``) is logged and never answered,
so the client waits forever. This loop:

* bounds every message (``max_bytes``, 64 MB by default, ``hexray lsp --max-message-bytes``) and
  header line; an oversized message is answered with an ``InvalidRequest`` error at once (its id
  is taken from its first bytes when they show it) and its body is skipped in pieces, never held.
  When the body never comes (the length was a lie), the loop finds the next message by its
  ``Content-Length:`` header, which valid JSON cannot contain at the start of a line;
* answers a body that is not JSON with ``ParseError``, a message that is not a JSON-RPC 2.0
  request with ``InvalidRequest``, and a request whose params do not deserialize with
  ``InvalidParams``, each with the request's id, then keeps serving.

Everything that is a valid message goes to pygls' ``protocol.handle_message`` unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from typing import Any

log = logging.getLogger(__name__)


class _NoDeserializeTraceback(logging.Filter):
    """pygls logs a multi-part traceback for every message whose params do not deserialize; the
    transport answers InvalidParams and logs one line itself (a client sending bad params in a loop
    must not fill the log with tracebacks)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unable to deserialize message")


logging.getLogger("pygls.protocol.json_rpc").addFilter(_NoDeserializeTraceback())

DEFAULT_MAX_BYTES = 64 * 1000 * 1000
MAX_HEADER_LINE = 8192
PIECE = 1 << 20
PARSE_ERROR, INVALID_REQUEST, INVALID_PARAMS = -32700, -32600, -32602

_CONTENT_LENGTH = re.compile(rb"content-length:[ \t]*(\d+)[ \t]*\r?\n?", re.IGNORECASE)
_NEXT_HEADER = re.compile(rb"(?:^|\n)(content-length:)", re.IGNORECASE)
_ID = re.compile(rb'"id"\s*:\s*(-?\d{1,18}|"(?:[^"\\]|\\.){0,256}")')


class StdinReader:
    """Bounded reads of a binary stream (stdin) off the event loop, in a dedicated thread."""

    def __init__(self, stream):
        self.stream = stream
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hexray-stdin")

    def _run(self, fn, *args):
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def readline(self, limit: int):
        return self._run(self.stream.readline, limit)

    def read_some(self, n: int):
        """At least one byte (b"" at the end of the stream), at most n: whatever has arrived."""
        read1 = getattr(self.stream, "read1", None)
        return self._run(read1 if read1 is not None else self.stream.read, n)


class StreamReaderAdapter:
    """The same interface over an asyncio StreamReader (TCP)."""

    def __init__(self, reader: asyncio.StreamReader):
        self.reader = reader

    async def readline(self, limit: int) -> bytes:
        try:
            return await self.reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            return e.partial
        except asyncio.LimitOverrunError as e:
            return await self.reader.read(min(limit, e.consumed or limit))

    async def read_some(self, n: int) -> bytes:
        return await self.reader.read(n)


class MessageLoop:
    def __init__(self, reader, protocol, *, max_bytes: int = DEFAULT_MAX_BYTES):
        self.reader = reader
        self.protocol = protocol
        self.max_bytes = max_bytes
        self._buf = b""

    # -- bounded reading with push-back ------------------------------------------------------------

    async def _readline(self) -> bytes:
        """One header line (at most MAX_HEADER_LINE bytes, a longer one comes back in pieces)."""
        while True:
            i = self._buf.find(b"\n")
            if i >= 0 or len(self._buf) >= MAX_HEADER_LINE:
                cut = i + 1 if 0 <= i < MAX_HEADER_LINE else MAX_HEADER_LINE
                line, self._buf = self._buf[:cut], self._buf[cut:]
                return line
            more = await self.reader.readline(MAX_HEADER_LINE - len(self._buf))
            if not more:
                line, self._buf = self._buf, b""
                return line
            self._buf += more

    async def _read_some(self, n: int) -> bytes:
        if self._buf:
            piece, self._buf = self._buf[:n], self._buf[n:]
            return piece
        return await self.reader.read_some(n)

    async def _read_exactly(self, n: int) -> bytes | None:
        parts, got = [], 0
        while got < n:
            piece = await self._read_some(min(PIECE, n - got))
            if not piece:
                return None
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)

    # -- the loop ------------------------------------------------------------------------------------

    async def run(self, stop_event: threading.Event) -> None:
        while not stop_event.is_set():
            length = None
            while True:  # headers, up to the empty line
                line = await self._readline()
                if not line:
                    return  # end of input
                if not line.strip():
                    if length is not None:
                        break
                    continue  # stray blank line between messages
                m = _CONTENT_LENGTH.fullmatch(line)
                if m:
                    length = int(m.group(1))
            if length > self.max_bytes:
                await self._skip_oversized(length)
                continue
            body = await self._read_exactly(length)
            if body is None:
                return
            self.dispatch(body)

    async def _skip_oversized(self, length: int) -> None:
        first = await self._read_some(min(PIECE, length))
        m = _ID.search(first[:4096])
        msg_id = json.loads(m.group(1)) if m else None
        log.warning("dropping a message of %d bytes (over the limit of %d bytes)", length, self.max_bytes)
        self.send_error(msg_id, INVALID_REQUEST, f"message of {length:,} bytes is over this server's limit of "
                                                 f"{self.max_bytes:,} (hexray lsp --max-message-bytes); dropped")
        left = length - len(first)
        piece = first
        while True:
            nxt = _NEXT_HEADER.search(piece)
            if nxt:  # the claimed length was a lie: the next message starts here
                self._buf = piece[nxt.start(1):] + self._buf
                return
            if left <= 0 or not piece:
                return
            piece = await self._read_some(min(PIECE, left))
            left -= len(piece)

    # -- one message ---------------------------------------------------------------------------------

    def dispatch(self, body: bytes) -> None:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            self.send_error(None, PARSE_ERROR, "the message is not valid JSON")
            return
        if not isinstance(data, dict):
            self.send_error(None, INVALID_REQUEST, "a JSON-RPC message must be an object")
            return
        msg_id = data.get("id")
        is_request = "method" in data and "id" in data
        if is_request and not (msg_id is None or isinstance(msg_id, (int, str))) or isinstance(msg_id, bool):
            self.send_error(None, INVALID_REQUEST, "the request id must be a number or a string")
            return
        if data.get("jsonrpc") != "2.0":
            if is_request:
                self.send_error(msg_id, INVALID_REQUEST, 'not a JSON-RPC 2.0 request ("jsonrpc" must be "2.0")')
            else:
                log.warning("dropping a message that is not JSON-RPC 2.0")
            return
        if "method" in data and not isinstance(data["method"], str):
            if is_request:
                self.send_error(msg_id, INVALID_REQUEST, "the method must be a string")
            return
        problem = _position_problem(data.get("params"))
        if problem is not None:  # cattrs would truncate 1.5 to 1 and accept an end before the start
            if is_request:
                self.send_error(msg_id, INVALID_PARAMS, f"invalid params for {data.get('method')}: {problem}")
            return
        try:
            message = self.protocol.structure_message(data)
        except Exception as e:  # pygls raises JsonRpcInvalidParams / JsonRpcInternalError (cattrs' errors inside)
            method = data.get("method", "")
            log.warning("params of %r do not deserialize: %s", method, e.__cause__ or e)
            if is_request:
                self.send_error(msg_id, INVALID_PARAMS, f"invalid params for {method}: they do not match the "
                                                        "LSP types (wrong type, negative position, missing field...)")
            return
        try:
            self.protocol.handle_message(message)
        except Exception:  # pygls answers handler failures itself; this is only a last line of defence
            log.exception("handling %r failed", data.get("method"))
            if is_request:
                self.send_error(msg_id, -32603, "internal error")

    def send_error(self, msg_id: Any, code: int, message: str) -> None:
        body = json.dumps({"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}})
        frame = f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        writer = self.protocol.writer
        if writer is None:
            return
        res = writer.write(frame)
        if asyncio.iscoroutine(res):
            asyncio.ensure_future(res)


def _is_position(x) -> bool:
    return isinstance(x, dict) and "line" in x and "character" in x


def _position_problem(params, depth: int = 0) -> str | None:
    """What is wrong with the positions and ranges in ``params`` (LSP: unsigned integers, start <= end)."""
    if depth > 32:
        return None
    if isinstance(params, dict):
        if _is_position(params):
            for key in ("line", "character"):
                v = params[key]
                if type(v) is not int or not 0 <= v < 2**31:
                    return f"position {key} must be an unsigned integer, not {json.dumps(v)[:40]}"
        start, end = params.get("start"), params.get("end")
        if _is_position(start) and _is_position(end):
            for p in (start, end):
                problem = _position_problem(p, depth + 1)
                if problem:
                    return problem
            if (start["line"], start["character"]) > (end["line"], end["character"]):
                return "a range must not end before it starts"
        for v in params.values():
            problem = _position_problem(v, depth + 1)
            if problem:
                return problem
    elif isinstance(params, list):
        for v in params[:10000]:
            problem = _position_problem(v, depth + 1)
            if problem:
                return problem
    return None
