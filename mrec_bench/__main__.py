"""``python -m mrec_bench``: see :mod:`mrec_bench.cli`."""

import sys

from .cli import main

sys.exit(main())
