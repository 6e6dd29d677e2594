"""``python -m hydrad.sim``: the same as ``hydrad sim``."""

import sys

from .cli import main

sys.exit(main())
