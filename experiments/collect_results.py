#!/usr/bin/env python
"""Copy a sweep's small, publishable files into a results folder (same as `adalora-collect`).

    python experiments/collect_results.py SWEEP_DIR DEST_DIR [--figure-of RUN_SUBPATH]
"""

import sys

from adalora_lab.publish import main

if __name__ == "__main__":
    sys.exit(main())
