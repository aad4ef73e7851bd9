"""``python -m dpq.pareto``: see :mod:`dpq.pareto.cli`."""

import sys

from .cli import main

sys.exit(main())
