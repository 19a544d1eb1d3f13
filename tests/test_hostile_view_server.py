"""`hexray view` against hostile clients over real sockets (issue 23, part 4): clients that close
early, clients that go silent, and a request body that spells another request. The server stays
quiet (no traceback on its terminal), drops silent connections, and never reads a body as a request.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest
from viewer_support import Served, record_demo


@pytest.fixture(scope="module")
def demo_trace(tmp_path_factory):
    return record_demo(tmp_path_factory.mktemp("hostile-view"))


@pytest.fixture
def served(demo_trace):
    s = Served(demo_trace, extra=("--idle-timeout", "1"))
    yield s
    s.close()


def _connect(s: Served) -> socket.socket:
    return socket.create_connection(("127.0.0.1", s.port), timeout=20)


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _get(s: Served, path: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\n\r\n").encode()


@pytest.mark.slow  # 150 connections, ~25 s: the slow tier
def test_clients_that_close_early_leave_no_traceback(served):
    for i in range(150):  # half with the token (the page: large), half without
        sock = _connect(served)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        sock.sendall(_get(served, f"/{served.token}/" if i % 2 else "/nope/"))
        sock.close()
    sock = _connect(served)  # still serving
    sock.sendall(_get(served, f"/{served.token}/api/overview").replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert _read_all(sock).startswith(b"HTTP/1.1 200")
    served.close()
    err = served.proc.stderr.read()
    assert "Traceback" not in err and "BrokenPipe" not in err and "ConnectionReset" not in err, err[-3000:]


def test_silent_connections_are_dropped(served):
    s = served
    try:
        silent = [_connect(s) for _ in range(8)]  # connected, never a byte sent (or half a request line)
        silent[0].sendall(b"GET /")
        t0 = time.monotonic()
        for sock in silent:
            assert sock.recv(100) == b""  # closed by the server, not by our 20 s timeout
        assert time.monotonic() - t0 < 15
        sock = _connect(s)
        sock.sendall(_get(s, f"/{s.token}/").replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        assert _read_all(sock).startswith(b"HTTP/1.1 200")
    finally:
        s.close()
    assert "Traceback" not in s.proc.stderr.read()


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_a_body_is_never_read_as_a_request(served, method):
    inner = _get(served, f"/{served.token}/api/overview")
    head = (f"{method} /{served.token}/ HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\n"
            f"Content-Length: {len(inner)}\r\n\r\n").encode()
    sock = _connect(served)
    sock.sendall(head + inner)
    data = _read_all(sock)  # the server closes after its one answer
    assert data.count(b"HTTP/1.1 ") == 1, data[:500]
    assert b"Connection: close" in data
    assert data.startswith(b"HTTP/1.1 405" if method == "POST" else b"HTTP/1.1 200")
