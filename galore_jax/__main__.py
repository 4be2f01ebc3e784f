"""``python -m galore_jax``: the ``galore-jax`` command, where the script is not on PATH."""

import sys

from galore_jax.cli import main

sys.exit(main())
