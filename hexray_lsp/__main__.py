"""`python -m hexray_lsp [--tcp HOST:PORT] [--log-file FILE]`: the same as `hexray lsp`."""

import argparse
import sys

from hexray_core.cli import lsp_cmd
from hexray_core.errors import HexRayError

parser = argparse.ArgumentParser(prog="python -m hexray_lsp")
lsp_cmd.add_parser(parser.add_subparsers(dest="command"))
try:
    sys.exit(lsp_cmd.run(parser.parse_args(["lsp", *sys.argv[1:]])))
except HexRayError as e:
    print(f"hexray lsp: error: {e}", file=sys.stderr)
    sys.exit(1)
