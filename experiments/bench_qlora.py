#!/usr/bin/env python
"""The 4-bit base benchmark (adalora_lab.bench_qlora): NF4 vs bf16 base, memory and step time, in one run.

    python experiments/bench_qlora.py [--quick] [--threads N] [--device cuda]
"""

import sys

from adalora_lab.bench_qlora import main

if __name__ == "__main__":
    sys.exit(main())
