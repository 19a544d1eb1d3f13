"""`hexray view`: the viewer served from loopback, behind a random token.

Only two kinds of URL exist, both under the token: `/<token>/` (the page) and
`/<token>/api/<view>?t=&run=...` (JSON, one panel at a time, computed on demand so a 16k-token
trace opens as fast as a short one). Traces are addressed by their number on the command line,
never by a path, so no request can name a file; anything else, a wrong or missing token, a path
with `..` (raw or percent-encoded) or an unexpected Host header (DNS rebinding) is refused.

Connections are bounded too: a client that goes quiet is dropped after ``idle_timeout`` seconds, at
most ``max_connections`` are served at once (more are closed on accept), a client that closes early
is forgotten without a traceback on the terminal, and a request that carries a body gets its answer
with the connection closed, so the body is never read as a second request.
"""

from __future__ import annotations

import hmac
import json
import secrets
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from hexray_core.errors import HexRayError

from . import data, page

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_URL = 4096
IDLE_TIMEOUT = 30.0  # seconds a connection may stay silent (the page keeps its connection busy or closes it)
MAX_CONNECTIONS = 64  # one thread each; a browser opens about six


class ViewServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, traces: list, names: list[str], host: str = "127.0.0.1", port: int = 0, *,
                 idle_timeout: float = IDLE_TIMEOUT, max_connections: int = MAX_CONNECTIONS, dictionary=None,
                 meaning=None, dataset_name: str | None = None, graphs: list | None = None):
        self.traces, self.names, self.dictionary = traces, names, dictionary  # dictionary: a DictionarySet or None
        self.graphs = graphs or []  # attribution graphs (hexray_view.graph.load), sent whole to the graph tab
        # meaning(layer, feature) -> dict: a clicked feature over a dataset (the CLI plugs in hexray_core.dataset)
        self.meaning, self.dataset_name, self.meanings = meaning, dataset_name, {}
        self.idle_timeout = idle_timeout
        self.slots = threading.BoundedSemaphore(max_connections)
        self.token = secrets.token_urlsafe(24)
        self.lock = threading.Lock()  # a Trace's caches are not thread-safe: one computation at a time
        self.explicit_host = host not in LOOPBACK
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)
        self.page = page.render(" + ".join([*names, *(g["name"] for g in self.graphs)])).encode("utf-8")

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):  # too many open connections: this one is closed at once
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address) -> None:
        """A client that went away (closed early, reset, timed out) is no error of ours: nothing is
        printed. Anything else is one line on stderr, not socketserver's traceback."""
        e = sys.exc_info()[1]
        if isinstance(e, ConnectionError | TimeoutError):
            return
        print(f"hexray: warning: view server: {type(e).__name__}: {e}", file=sys.stderr)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}/{self.token}/"

    def allowed_host(self, header: str | None) -> bool:
        if self.explicit_host:  # the user chose to serve other machines: any Host, the token still guards
            return True
        if not header:
            return False
        return header.lower() in {f"{h}:{self.port}" for h in ("127.0.0.1", "localhost", "[::1]")}

    def answer(self, view: str, params: dict[str, str]):
        """The JSON of one API view."""
        def num(key: str, default: int | None = None) -> int:
            raw = params.get(key)
            if raw is None:
                if default is None:
                    raise HexRayError(f"missing parameter {key!r}")
                return default
            try:
                return int(raw)
            except ValueError:
                raise HexRayError(f"parameter {key!r} must be an integer, not {raw[:40]!r}") from None

        def trace(key: str = "t"):
            i = num(key, 0)
            if not 0 <= i < len(self.traces):
                raise HexRayError(f"there is no trace {i} (this server shows {len(self.traces)})")
            return self.traces[i]

        if view == "overview":
            return [{**data.overview(t, n), "features": self.dictionary.describe() if self.dictionary else None,
                     "feature_dataset": self.dataset_name if self.meaning is not None else None}
                    for t, n in zip(self.traces, self.names, strict=True)]
        if view == "graphs":
            return self.graphs
        if view == "meaning":
            if self.meaning is None:
                raise HexRayError("this viewer was started without a dataset (hexray view --dict D --dataset DIR)")
            key = (num("layer"), num("f"))
            if key not in self.meanings:
                self.meanings[key] = self.meaning(*key)
            return self.meanings[key]
        if view == "features":
            if self.dictionary is None:
                raise HexRayError("this viewer was started without a dictionary (hexray view --dict DIR)")
            return data.run_features(trace(), num("run", 0), self.dictionary)
        if view == "detail":
            return data.token_detail(trace(), num("run", 0), num("pos"))
        if view == "lens":
            return data.lens_grid(trace(), num("run", 0), num("start"), num("end"))
        if view == "attention":
            return data.attention_rows(trace(), num("run", 0), num("pos"), num("layer"), num("head"))
        if view == "colours":
            return data.component_colours(trace(), num("run", 0))
        if view == "cot":
            return data.cot(trace(), num("run", 0))
        if view == "patch":
            return data.patch_sweep(trace(), num("i", 0))
        if view == "diff":
            return data.diff(trace("ta"), trace("tb"), num("ra", 0), num("rb", 0), num("pa", -1), num("pb", -1))
        return None


class Handler(BaseHTTPRequestHandler):
    server: ViewServer
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes; with Nagle's algorithm the second waits for the client's delayed
    # ACK, 40 ms on Linux, on every answer of a kept-alive connection (measured: 48 ms per request, 1 ms without).
    disable_nagle_algorithm = True
    server_version = "hexray-view"
    sys_version = ""

    def log_message(self, format, *args):  # noqa: A002 - quiet: the terminal shows the URL, not a request log
        pass

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # (StreamRequestHandler sets it on the socket)
        super().setup()

    def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        if self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers:
            # No view takes a body and it is never read: close, so that it is not parsed as a request.
            self.send_header("Connection", "close")
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")  # the token must not leak in a Referer
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        body = json.dumps(data.plain(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        self._send(status, body.encode("utf-8"), "application/json; charset=utf-8")

    def _refuse(self, status: HTTPStatus) -> None:
        self._send(status, f"{status.value} {status.phrase}\n".encode())

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        srv = self.server
        if len(self.path) > MAX_URL:
            return self._refuse(HTTPStatus.REQUEST_URI_TOO_LONG)
        if not srv.allowed_host(self.headers.get("Host")):
            return self._refuse(HTTPStatus.FORBIDDEN)
        parts = urlsplit(self.path)
        raw = parts.path
        decoded = unquote(unquote(raw))  # refuse '..' however often it was percent-encoded
        if ".." in decoded or "\\" in decoded or "\x00" in decoded or "//" in raw:
            return self._refuse(HTTPStatus.BAD_REQUEST)
        segments = raw.split("/")  # "", token, rest...
        if len(segments) < 3 or not hmac.compare_digest(segments[1].encode(), srv.token.encode()):
            return self._refuse(HTTPStatus.FORBIDDEN)
        rest = "/".join(segments[2:])
        if rest in ("", "index.html"):
            return self._send(HTTPStatus.OK, srv.page, "text/html; charset=utf-8")
        if rest.startswith("api/") and rest.count("/") == 1:
            try:
                params = {k: v[0] for k, v in parse_qs(parts.query, max_num_fields=20).items()}
            except ValueError:  # more fields than any view takes
                return self._json(HTTPStatus.BAD_REQUEST, {"error": "too many query parameters"})
            try:
                with srv.lock:
                    result = srv.answer(rest[4:], params)
            except HexRayError as e:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            except Exception as e:  # a corrupt trace: the page shows the line, the server keeps serving
                errors = sys.modules.get("trace_format.errors")
                if errors is not None and isinstance(e, errors.TraceFormatError):
                    return self._json(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": str(e)})
                raise
            if result is None:
                return self._refuse(HTTPStatus.NOT_FOUND)
            return self._json(HTTPStatus.OK, result)
        return self._refuse(HTTPStatus.NOT_FOUND)

    def _no_body(self) -> None:
        self._refuse(HTTPStatus.METHOD_NOT_ALLOWED)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _no_body
