#!/usr/bin/env python3
"""Held-out evaluation cost of the incremental greedy soup versus batch greedy, on a finished run.

  python bench/soup_cost.py RUN_DIR [--orders 200] [--out bench/results/soup_cost.json]

What is counted and against which baselines: ``soup_ray.bench.soup_cost``.
"""

import os
import sys

from soup_ray.bench.soup_cost import main

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
