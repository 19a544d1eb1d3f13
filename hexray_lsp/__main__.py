"""`python -m hexray_lsp [--tcp HOST:PORT] [--log-file FILE]`: the same as `hexray lsp`."""

import sys

from hexray_lsp.cli import main

sys.exit(main())
