#!/usr/bin/env python
"""The allocator benchmark (adalora_lab.bench_allocator): prints ratios measured side by side in one run.

    python experiments/bench_allocator.py [--quick] [--threads N]
"""

import sys

from adalora_lab.bench_allocator import main

if __name__ == "__main__":
    sys.exit(main())
