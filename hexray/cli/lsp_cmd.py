"""`hexray lsp`: the language server (stdio by default, or TCP), for prompt files in an editor.

The server owns its entry point (hexray_lsp/cli.py); this module only adds it to `hexray`.
It imports only pygls and the replay engine: the model runs in a separate worker process that
the server starts when a trace is first recorded (see hexray_lsp/worker.py).
"""

from __future__ import annotations

import argparse

from hexray_lsp import cli


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("lsp", help="language server: per-token attribution in the editor",
                              description=cli.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    return cli.add_arguments(p)


def run(args) -> int:
    return cli.serve(args)
