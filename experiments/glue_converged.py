#!/usr/bin/env python
"""The converged GLUE protocol, one task at a time (experiments/results/glue_converged/README.md):

    python experiments/glue_converged.py --task mrpc                  # every method of the grid file
    python experiments/glue_converged.py --task mrpc --methods lora adalora --jobs 2
    python experiments/summarize.py multirun/glue_converged/mrpc --by optim.lr --by method.orth_reg_weight

Seed 0 runs each method's grid (experiments/grids/glue_converged.yaml), widened past an edge when the best value
is on it; the other seeds run at the chosen point. Rerunning reuses finished runs and resumes killed ones.
"""

import sys

from adalora_lab.protocol import main

if __name__ == "__main__":
    sys.exit(main())
