"""The language server under protocol abuse and bad trace files: it answers, and it keeps serving.

A raw client over stdio (bytes, not a library: the point is to send what a library would not):
lying and huge ``Content-Length`` headers, messages over the size limit, bodies that are not
JSON or not JSON-RPC 2.0, requests whose params do not deserialize; and prompts whose trace is a
FIFO, a directory, corrupt or hostile, beside a document whose trace is fine.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import time

import pytest
from hostile_support import REPO

INVALID_REQUEST, INVALID_PARAMS, PARSE_ERROR = -32600, -32602, -32700


class RawClient:
    def __init__(self, *args: str, cwd: str | None = None, stderr=subprocess.DEVNULL):
        env = {**os.environ, "PYTHONPATH": REPO}
        self.proc = subprocess.Popen([sys.executable, "-m", "hexray_lsp", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=stderr, cwd=cwd or REPO, env=env)
        self.buf = b""
        self.next_id = 100
        self.notifications: list[dict] = []

    def send_raw(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, obj, *, length: int | None = None) -> None:
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_raw(f"Content-Length: {len(body) if length is None else length}\r\n\r\n".encode() + body)

    def request(self, method: str, params=None) -> int:
        self.next_id += 1
        self.send({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params})
        return self.next_id

    def notify(self, method: str, params) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def _read_message(self, deadline: float) -> dict:
        while True:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if sep:
                length = int([ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")][0]
                             .split(b":")[1])
                if len(rest) >= length:
                    self.buf = rest[length:]
                    return json.loads(rest[:length])
            left = deadline - time.monotonic()
            assert left > 0, "the server did not answer in time"
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                assert chunk, "the server closed its output (it died)"
                self.buf += chunk

    def response(self, msg_id, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read_message(deadline)
            if "method" in msg:
                if "id" in msg:  # a request from the server (registration, configuration): answer null
                    self.send({"jsonrpc": "2.0", "id": msg["id"], "result": None})
                else:
                    self.notifications.append(msg)
                continue
            if msg.get("id") == msg_id:
                return msg

    def diagnostics(self, uri: str, timeout: float = 30.0, *, where=lambda d: True) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            for n in self.notifications:
                if n["method"] == "textDocument/publishDiagnostics" and n["params"]["uri"] == uri \
                        and where(n["params"]["diagnostics"]):
                    return n["params"]["diagnostics"]
            self.response(-1, timeout=max(0.1, deadline - time.monotonic()))  # pumps notifications until timeout

    def initialize(self, root: str | None = None) -> None:
        rid = self.request("initialize", {"processId": os.getpid(), "rootUri": f"file://{root}" if root else None,
                                          "capabilities": {}})
        assert "result" in self.response(rid)
        self.notify("initialized", {})

    def alive(self) -> bool:
        """A request every server answers: a hover on a document it does not know (result null)."""
        rid = self.request("textDocument/hover", {"textDocument": {"uri": "file:///nowhere.prompt"},
                                                  "position": {"line": 0, "character": 0}})
        return "result" in self.response(rid)

    def close(self) -> None:
        try:
            rid = self.request("shutdown")
            self.response(rid, timeout=10)
            self.notify("exit", None)
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def client():
    c = RawClient("--max-message-bytes", "65536")
    c.initialize()
    yield c
    c.close()


def test_huge_content_length_claims_are_answered_and_the_server_goes_on(client):
    for claim in (99_999_999_999, 2**62):
        client.send({"jsonrpc": "2.0", "id": 7, "method": "textDocument/hover",
                     "params": {"textDocument": {"uri": "file:///x.prompt"}, "position": {"line": 0, "character": 0}}},
                    length=claim)
        err = client.response(7)["error"]
        assert err["code"] == INVALID_REQUEST and "over this server's limit" in err["message"]
        assert client.alive()  # the next real message was found after the lie
    assert client.proc.poll() is None


def test_an_oversized_message_is_skipped_in_pieces(client):
    big = {"jsonrpc": "2.0", "id": 8, "method": "textDocument/hover",
           "params": {"textDocument": {"uri": "file:///x.prompt"}, "position": {"line": 0, "character": 0},
                      "padding": "x" * 300_000}}
    client.send(big)
    assert client.response(8)["error"]["code"] == INVALID_REQUEST
    client.notify("textDocument/didOpen", {"textDocument": {"uri": "file:///big.prompt", "languageId": "hexray-prompt",
                                                            "version": 1, "text": "y" * 200_000}})
    assert client.alive()


BAD_REQUESTS = [
    ("line -1", {"textDocument": {"uri": "file:///x.prompt"}, "position": {"line": -1, "character": 0}},
     INVALID_PARAMS),
    ("character 1.5", {"textDocument": {"uri": "file:///x.prompt"}, "position": {"line": 0, "character": 1.5}},
     INVALID_PARAMS),
    ("null params", None, INVALID_PARAMS),
    ("missing position", {"textDocument": {"uri": "file:///x.prompt"}}, INVALID_PARAMS),
    ("position a string", {"textDocument": {"uri": "file:///x.prompt"}, "position": "0:0"}, INVALID_PARAMS),
    ("line true", {"textDocument": {"uri": "file:///x.prompt"}, "position": {"line": True, "character": 0}},
     INVALID_PARAMS),
]


@pytest.mark.parametrize("what, params, code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_params_that_do_not_deserialize_get_an_error_answer(client, what, params, code):
    client.send({"jsonrpc": "2.0", "id": 9, "method": "textDocument/hover", "params": params})
    assert client.response(9)["error"]["code"] == code
    assert client.alive()


def test_invalid_ranges_and_envelopes_get_error_answers(client):
    bad_range = {"textDocument": {"uri": "file:///x.prompt"}, "range": {"start": {"line": 0}, "end": "soon"}}
    client.send({"jsonrpc": "2.0", "id": 10, "method": "textDocument/inlayHint", "params": bad_range})
    assert client.response(10)["error"]["code"] == INVALID_PARAMS
    backwards = {"textDocument": {"uri": "file:///x.prompt"}, "range": {"start": {"line": 3, "character": 0},
                                                                        "end": {"line": 1, "character": 0}}}
    client.send({"jsonrpc": "2.0", "id": 12, "method": "textDocument/inlayHint", "params": backwards})
    assert client.response(12)["error"]["code"] == INVALID_PARAMS
    client.send({"jsonrpc": "1.0", "id": 11, "method": "textDocument/hover", "params": {}})
    assert client.response(11)["error"]["code"] == INVALID_REQUEST
    client.send(b"{not json")
    assert client.response(None)["error"]["code"] == PARSE_ERROR
    client.send(b"[1, 2, 3]")
    assert client.response(None)["error"]["code"] == INVALID_REQUEST
    client.send({"jsonrpc": "2.0", "id": {"an": "object"}, "method": "textDocument/hover", "params": {}})
    assert client.response(None)["error"]["code"] == INVALID_REQUEST
    client.send_raw(b"X-Junk: " + b"z" * 50_000 + b"\r\n")  # a header line that never ends properly
    client.send_raw(b"\r\n")
    assert client.alive()


def test_bad_traces_beside_prompts_show_a_diagnostic_and_block_nothing(tmp_path):
    from lsp_support import write_synthetic_trace

    text = "The quick brown fox jumps over the lazy dog."
    good = tmp_path / "good.prompt"
    good.write_text(text)
    write_synthetic_trace(str(tmp_path / "good.hxr"), [text])
    bad = {}
    os.mkfifo(tmp_path / "fifo.hxr")
    bad["fifo"] = "FIFO"
    os.mkdir(tmp_path / "folder.hxr")
    bad["folder"] = "directory"
    (tmp_path / "corrupt.hxr").write_bytes(b"\x89HXR\r\n\x1a\n" + b"\x00" * 500)
    bad["corrupt"] = "cannot be read"
    write_synthetic_trace(str(tmp_path / "hostile.hxr"), [text])
    _make_hostile(tmp_path / "hostile.hxr")
    bad["hostile"] = "n_layers"
    c = RawClient(cwd=str(tmp_path))
    try:
        c.initialize(str(tmp_path))
        for name in bad:
            (tmp_path / f"{name}.prompt").write_text(text)
            c.notify("textDocument/didOpen", {"textDocument": {"uri": f"file://{tmp_path}/{name}.prompt",
                                                               "languageId": "hexray-prompt", "version": 1,
                                                               "text": text}})
        c.notify("textDocument/didOpen", {"textDocument": {"uri": f"file://{good}", "languageId": "hexray-prompt",
                                                           "version": 1, "text": text}})
        rid = c.request("textDocument/hover", {"textDocument": {"uri": f"file://{good}"},
                                               "position": {"line": 0, "character": 5}})
        hover = c.response(rid, timeout=30)["result"]
        assert hover and "quick" in json.dumps(hover)
        for name, needle in bad.items():
            diags = c.diagnostics(f"file://{tmp_path}/{name}.prompt", where=lambda d: bool(d))
            assert any(needle in d["message"] for d in diags), (name, diags)
    finally:
        c.close()


def _make_hostile(path) -> None:
    """Rewrite a trace with meta.model.config.n_layers = 2**64 - 1 (a valid container)."""
    from hostile_support import load, write

    meta, runs, tensors = load(str(path))
    meta["model"]["config"]["n_layers"] = 2**64 - 1
    write(str(path) + ".tmp", meta, runs, tensors)
    os.replace(str(path) + ".tmp", path)


def test_one_load_that_never_finishes_does_not_hold_up_the_others(tmp_path, monkeypatch):
    """Loads run in their own threads with a timeout (a hung file system is simulated by a load that sleeps)."""
    import threading

    from lsp_support import write_synthetic_trace

    from hexray_lsp import traces

    real = traces.build_view
    release = threading.Event()

    def build_view(path):
        if path.endswith("hung.hxr"):
            release.wait(300)
        return real(path)

    monkeypatch.setattr(traces, "build_view", build_view)
    text = "The quick brown fox."
    for name in ("hung", "fine"):
        write_synthetic_trace(str(tmp_path / f"{name}.hxr"), [text])

    async def go():
        # 1. no give-up in sight (600 s): the fine load must finish while the hung one is still blocked; if it
        # waited for the hung one, this would hang, so a generous timeout and no clock
        changes = []
        store = traces.TraceStore(on_change=changes.append, load_timeout=600)
        hung, fine = str(tmp_path / "hung.hxr"), str(tmp_path / "fine.hxr")
        store.check(hung)
        await asyncio.wait_for(store.ensure([fine]), timeout=120)
        assert fine in changes and hung not in changes
        release.set()
        store.close()
        # 2. a load that never finishes is given up after load_timeout, with an error saying so
        release.clear()
        changes = []
        store = traces.TraceStore(on_change=changes.append, load_timeout=0.5)
        store.check(hung)
        for _ in range(1200):
            if hung in changes:
                break
            await asyncio.sleep(0.05)
        assert hung in changes and "gave up" in (store._slots[hung].error or "")
        release.set()
        store.close()

    asyncio.run(go())


# -- issue 23: bad params log one line; recordTrace reads only what it may, and only a prefix first ----

def test_bad_params_are_answered_with_one_log_line_each(tmp_path):
    log = open(tmp_path / "stderr.txt", "wb")
    c = RawClient(stderr=log)
    c.initialize(str(tmp_path))
    bad = [{"textDocument": {"uri": "file:///x.prompt"}, "position": {"line": 0, "character": "a"}}, None, [1],
           {"x": 1}, {"textDocument": {"uri": 5}}, {"textDocument": {"uri": "file:///x.prompt"}, "position": {}}]
    sent = 0
    for params in bad:
        for method in ("textDocument/documentHighlight", "textDocument/codeLens"):
            reply = c.response(c.request(method, params))
            assert "result" in reply or reply["error"]["code"] == INVALID_PARAMS, reply
            sent += 1
    assert c.alive()
    c.close()
    log.close()
    text = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in text, text[-3000:]
    assert len([ln for ln in text.splitlines() if ln.strip()]) <= sent, text


def _record_reply(c: RawClient, uri: str) -> dict:
    rid = c.request("workspace/executeCommand", {"command": "hexray.recordTrace", "arguments": [uri]})
    return c.response(rid, timeout=60)["result"]


def _vm_hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln.split()[1] for ln in f if ln.startswith("VmHWM"))) / 1024


def test_record_trace_reads_only_opened_documents_or_workspace_files(tmp_path):
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    ws.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("The capital of France is")
    with open(ws / "sparse.prompt", "wb") as f:  # 1.2 GB of nothing: it must not be read
        f.truncate(1_200_000_000)
    (ws / "binary.prompt").write_bytes(b"\x00" * 100_000 + b"text")
    os.mkfifo(ws / "fifo.prompt")
    c = RawClient(cwd=str(ws))
    c.initialize(str(ws))
    try:
        for uri in (f"file://{outside}/secret.txt", f"file://{ws}/../outside/secret.txt",
                    f"file://{ws}/%2e%2e/outside/secret.txt", f"file://{ws}/%2E%2E/%2e%2e/{tmp_path.name}/outside/"
                                                               "secret.txt"):
            reply = _record_reply(c, uri)
            assert reply["status"] == "error" and "not inside a workspace folder" in reply["message"], (uri, reply)
        assert sorted(os.listdir(outside)) == ["secret.txt"]  # no secret.hxr written beside it
        reply = _record_reply(c, f"file://{ws}/sparse.prompt")
        assert "over hexray.maxDocumentBytes" in reply["message"], reply
        reply = _record_reply(c, f"file://{ws}/binary.prompt")
        assert "looks binary" in reply["message"], reply
        reply = _record_reply(c, f"file://{ws}/fifo.prompt")  # never opened blocking, never waited on
        assert "not a regular file" in reply["message"], reply
        assert c.alive()
        assert _vm_hwm_mb(c.proc.pid) < 400
        assert sorted(os.listdir(ws)) == ["binary.prompt", "fifo.prompt", "sparse.prompt"]
    finally:
        c.close()
