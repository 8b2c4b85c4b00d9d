#!/usr/bin/env python
"""Summarize a sweep: tables, statistics and figures (same as the `adalora-summarize` command).

    python experiments/summarize.py MULTIRUN_DIR [--out DIR] [--which final|best] [--by KEY ...] [--no-plots]
"""

import sys

from adalora_lab.summary import main

if __name__ == "__main__":
    sys.exit(main())
