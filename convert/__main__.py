import sys

from lserve_jax.convert.cli import main

sys.exit(main())
