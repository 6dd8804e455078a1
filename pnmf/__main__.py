"""``python -m pnmf``: the ``pnmf`` command (see :mod:`pnmf.cli`)."""

import sys

from .cli import main

sys.exit(main())
