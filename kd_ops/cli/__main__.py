"""`python -m kd_ops.cli ...` is `kd-ops ...`."""

import sys

from kd_ops.cli.main import main

sys.exit(main())
