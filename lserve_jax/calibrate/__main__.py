"""`python -m lserve_jax.calibrate`: see `cli.main`."""

import sys

from .cli import main

sys.exit(main())
