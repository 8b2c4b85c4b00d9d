#!/usr/bin/env bash
# The converged GLUE protocol (experiments/results/glue_converged/README.md), one task at a time:
#   bash experiments/glue_converged.sh mrpc          # the seed-0 learning-rate (and gamma) grid
#   bash experiments/glue_converged.sh mrpc seeds    # seeds 1-4 at the chosen settings (from choose.json)
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
  "$PY" -m adalora_lab.choose "multirun/glue_converged/$task" --run-seeds 1,2,3,4 -- "${A[@]}"
fi
