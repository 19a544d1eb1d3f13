import sys

from hexray_core.cli.main import main

sys.exit(main())
