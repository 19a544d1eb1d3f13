"""The language server's entry point: its options, logging, and starting the server.

`hexray lsp` (hexray_core/cli/lsp_cmd.py) and `python -m hexray_lsp` both call this module;
nothing here imports the command line of hexray_core.
"""

from __future__ import annotations

import argparse
import logging
import sys

from hexray_core.errors import HexRayError, one_line

from .settings import describe
from .transport import DEFAULT_MAX_BYTES

DESCRIPTION = """\
Language server for prompt files (*.prompt, language id hexray-prompt): hover a token to see its
probability, rank, the model's top predictions and the components that contributed to it; inlay
hints show one figure per token; diagnostics say when the trace is missing or stale; a command and
a code lens record the trace in a worker process that keeps the model loaded.

Settings come from the editor (initializationOptions / workspace configuration, section "hexray"):

""" + describe()


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--stdio", action="store_true", help="talk over stdin/stdout (the default)")
    mode.add_argument("--tcp", metavar="HOST:PORT", help="listen on a TCP socket instead, e.g. 127.0.0.1:2087")
    p.add_argument("--log-file", metavar="FILE", help="write the server's log here (default: stderr)")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log level (default WARNING; INFO and DEBUG also log every message pygls sends)")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_BYTES, metavar="N",
                   help=f"largest JSON-RPC message accepted (default {DEFAULT_MAX_BYTES:,}); a larger one is "
                        "answered with an error and skipped")
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


def serve(args) -> int:
    """Start the server as ``args`` (from add_arguments) say; returns when the client is gone."""
    tcp = parse_hostport(args.tcp) if args.tcp else None
    if args.max_message_bytes < 1024:
        raise HexRayError(f"--max-message-bytes must be at least 1024, not {args.max_message_bytes}")
    setup_logging(args.log_file, args.log_level)
    from .server import create_server

    server = create_server(max_message_bytes=args.max_message_bytes)
    if tcp is not None:
        logging.getLogger("hexray_lsp").info("listening on %s:%d", *tcp)
        server.start_tcp(*tcp)
    else:
        server.start_io()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m hexray_lsp [--tcp HOST:PORT] ...`: the same as `hexray lsp`."""
    parser = add_arguments(argparse.ArgumentParser(prog="python -m hexray_lsp", description=DESCRIPTION,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    try:
        return serve(parser.parse_args(argv))
    except HexRayError as e:
        print(f"hexray lsp: error: {one_line(str(e))}", file=sys.stderr)
        return 1
