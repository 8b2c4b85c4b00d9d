#!/usr/bin/env python
"""Train one run, or a sweep with -m: the Hydra CLI of adalora_lab (same as the `adalora-train` command).

    python experiments/train.py model=minilm task=rte method=adalora method.target_r=2
    python experiments/train.py -m method=lora,adalora method.target_r=2,4 seed=0,1 debug=fast
    python experiments/train.py --help
"""

from adalora_lab.cli import run

if __name__ == "__main__":
    run()
