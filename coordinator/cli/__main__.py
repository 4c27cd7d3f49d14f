"""`python -m coordinator.cli ...`: the same as `mlxfleet ...` (tests and `up` use it)."""

import sys

from coordinator.cli import main

sys.exit(main())
