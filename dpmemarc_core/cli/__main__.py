"""`python -m dpmemarc_core.cli`."""

import sys

from dpmemarc_core.cli.main import main

sys.exit(main())
