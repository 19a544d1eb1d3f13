"""`hexray lsp`: the language server (stdio by default, or TCP), for prompt files in an editor.

Imports only pygls and the replay engine: the model runs in a separate worker process that the
server starts when a trace is first recorded (see hexray_lsp/worker.py).
"""

from __future__ import annotations

import argparse
import logging
import sys

from hexray_core.errors import HexRayError

DESCRIPTION = """\
Language server for prompt files (*.prompt, language id hexray-prompt): hover a token to see its
probability, rank, the model's top predictions and the components that contributed to it; inlay
hints show one figure per token; diagnostics say when the trace is missing or stale; a command and
a code lens record the trace in a worker process that keeps the model loaded.

Settings come from the editor (initializationOptions / workspace configuration, section "hexray");
see hexray_lsp/settings.py for the list and defaults."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("lsp", help="language server: per-token attribution in the editor",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--stdio", action="store_true", help="talk over stdin/stdout (the default)")
    mode.add_argument("--tcp", metavar="HOST:PORT", help="listen on a TCP socket instead, e.g. 127.0.0.1:2087")
    p.add_argument("--log-file", metavar="FILE", help="write the server's log here (default: stderr)")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log level (default WARNING; INFO and DEBUG also log every message pygls sends)")
    return p


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise HexRayError(f"--tcp expects HOST:PORT (e.g. 127.0.0.1:2087), not {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def setup_logging(log_file: str | None, level: str) -> None:
    # Never stdout: it is the JSON-RPC channel in stdio mode.
    if log_file:
        try:
            handler: logging.Handler = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as e:
            raise HexRayError(f"--log-file {log_file}: {e.strerror or e}") from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if level != "DEBUG":  # pygls logs every message body at INFO
        logging.getLogger("pygls").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def run(args) -> int:
    tcp = parse_hostport(args.tcp) if args.tcp else None
    setup_logging(args.log_file, args.log_level)
    from hexray_lsp.server import create_server

    server = create_server()
    if tcp is not None:
        logging.getLogger("hexray_lsp").info("listening on %s:%d", *tcp)
        server.start_tcp(*tcp)
    else:
        server.start_io()
    return 0
