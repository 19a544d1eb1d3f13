import sys

from hexray.cli.main import main

sys.exit(main())
