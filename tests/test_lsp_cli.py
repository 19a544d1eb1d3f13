"""`hexray lsp` as a command: stdio by default, --tcp HOST:PORT, --log-file, bad arguments."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys

from lsp_support import server_env


def _frame(obj: dict) -> bytes:
    body = json.dumps(obj).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


async def _read(reader: asyncio.StreamReader) -> dict:
    length = 0
    while True:
        line = (await reader.readline()).strip()
        if not line:
            break
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return json.loads(await reader.readexactly(length))


async def _handshake(reader, writer) -> dict:
    writer.write(_frame({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                         "params": {"processId": None, "rootUri": None, "capabilities": {}}}))
    while True:
        msg = await asyncio.wait_for(_read(reader), 30)
        if msg.get("id") == 1:
            break
    writer.write(_frame({"jsonrpc": "2.0", "method": "initialized", "params": {}}))
    writer.write(_frame({"jsonrpc": "2.0", "id": 2, "method": "shutdown", "params": None}))
    while (await asyncio.wait_for(_read(reader), 30)).get("id") != 2:
        pass
    writer.write(_frame({"jsonrpc": "2.0", "method": "exit", "params": None}))
    return msg


def test_tcp_and_log_file(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "lsp.log"
    proc = subprocess.Popen([sys.executable, "-m", "hexray", "lsp", "--tcp", f"127.0.0.1:{port}",
                             "--log-file", str(log), "--log-level", "INFO"], env=server_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    async def go():
        for _ in range(300):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("the server never listened")
        result = await _handshake(reader, writer)
        await writer.drain()
        writer.close()
        return result

    try:
        result = asyncio.run(go())
        assert result["result"]["capabilities"]["hoverProvider"]
        assert result["result"]["serverInfo"]["name"] == "hexray-lsp"
        proc.wait(timeout=20)
    finally:
        proc.kill()
    out, _ = proc.communicate()
    assert out == b""  # nothing on stdout in TCP mode either
    text = log.read_text()
    assert "initialized: position encoding utf-16" in text


def test_stdio_exits_with_its_client():
    proc = subprocess.Popen([sys.executable, "-m", "hexray", "lsp"], env=server_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.close()  # the editor went away without shutdown/exit
    assert proc.wait(timeout=30) is not None


def test_bad_arguments():
    r = subprocess.run([sys.executable, "-m", "hexray", "lsp", "--tcp", "nowhere"], env=server_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "HOST:PORT" in r.stderr
    r = subprocess.run([sys.executable, "-m", "hexray_lsp", "--log-file", "/nonexistent/dir/x.log"],
                       env=server_env(), capture_output=True, text=True, timeout=60, input="")
    assert r.returncode == 1 and "--log-file" in r.stderr
