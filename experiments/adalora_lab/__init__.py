"""adalora_lab: the experiment side of adalora (Hydra CLI, training loop, workloads, summaries, figures).

Needs the ``experiments`` extra; the library ``adalora`` never imports it.
"""

import logging

# torchao (the NF4 base) logs notices at import about kernels this machine lacks, and torch a deprecation of
# torchao's; transformers imports torchao whenever it is installed. Neither concerns the user, and both would
# break the CLI's one-line error promise.
for _name in ("torch.utils._pytree", "torchao"):
    logging.getLogger(_name).setLevel(logging.ERROR)
