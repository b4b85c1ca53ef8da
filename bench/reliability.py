#!/usr/bin/env python3
"""Fault scenarios on the embedded local Ray with the tiny offline stand-in; writes bench/results/reliability-<date>.json.

  python bench/reliability.py [--quick] [--only 1,4] [--cache DIR] [--keep]

The scenarios, what each injects and what is checked afterwards: ``soup_ray.bench.reliability``.
"""

import os
import sys

from soup_ray.bench.reliability import main

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
