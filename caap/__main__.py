"""`python -m caap ...`: the `caap` command line (`caap.cli`)."""

import sys

from caap.cli import main

sys.exit(main())
