"""The argument parser class every ``hexray`` command uses."""

from __future__ import annotations

import argparse

from hexray_core.errors import one_line


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (plus where to read more) instead of the usage block.

    Subcommand parsers are made by ``add_subparsers`` with the parent's class, so they get it too.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")
