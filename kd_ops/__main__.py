"""`python -m kd_ops ...` is `kd-ops ...` (for helper processes started with the same interpreter)."""

import sys

from kd_ops.cli.main import main

sys.exit(main())
