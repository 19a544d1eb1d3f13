"""`python -m hexray_lsp` = `hexray lsp`."""

import sys

from hexray_core.cli.main import main

sys.exit(main(["lsp", *sys.argv[1:]]))
