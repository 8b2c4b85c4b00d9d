#!/usr/bin/env python
"""Rerun a finished run with its recorded command and compare every logged number (same as `adalora-reproduce`).

    python experiments/reproduce.py experiments/results/glue_converged/runs/mrpc/lora_r2_optim.lr-0.0003/seed0
    python experiments/reproduce.py RUN_DIR --check-only      # only: does the command still compose to its config?
"""

import sys

from adalora_lab.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
