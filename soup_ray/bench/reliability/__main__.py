"""``python -m soup_ray.bench.reliability``: the same as ``bench/reliability.py``."""

import sys

from .runner import main

sys.exit(main())
