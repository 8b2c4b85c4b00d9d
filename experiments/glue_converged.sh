#!/usr/bin/env bash
# The converged GLUE protocol (experiments/results/glue_converged/README.md), one task at a time:
#   bash experiments/glue_converged.sh mrpc                   # the seed-0 learning-rate (and gamma) grid
#   python experiments/summarize.py multirun/glue_converged/mrpc --by optim.lr --by method.orth_reg_weight
#   bash experiments/glue_converged.sh mrpc seeds "method=lora method.target_r=2 optim.lr=1e-3" ...
#                                      # seeds 1-4 of each cell at its chosen settings (one quoted cell per argument)
# Rerunning resumes killed runs from their checkpoints and reuses finished ones.
set -euo pipefail
cd "$(dirname "$0")/.."
task=${1:?task: mrpc, rte or sst2}
PY=${PY:-.venv/bin/python}
A=(experiment=glue_converged "task=$task" hydra/launcher=parallel threads=1 progress=false logger=none
   checkpoint_every=200 "hydra.sweep.dir=multirun/glue_converged")
if [ "${2:-grid}" = grid ]; then
  "$PY" experiments/train.py -m "${A[@]}" method=lora method.target_r=2,8 optim.lr=3e-4,1e-3,3e-3 seed=0
  "$PY" experiments/train.py -m "${A[@]}" method=adalora method.target_r=2,8 optim.lr=1e-3,3e-3,1e-2 \
    method.orth_reg_weight=0.1,0.3 seed=0
else
  shift 2
  for cell in "$@"; do
    # shellcheck disable=SC2086  # a cell is a list of overrides
    "$PY" experiments/train.py -m "${A[@]}" $cell seed=1,2,3,4
  done
fi
