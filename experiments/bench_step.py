#!/usr/bin/env python
"""The step benchmark (adalora_lab.bench_step): prints ratios measured side by side in one run.

    python experiments/bench_step.py [--quick] [--threads N]
"""

import sys

from adalora_lab.bench_step import main

if __name__ == "__main__":
    sys.exit(main())
