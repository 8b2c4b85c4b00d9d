"""What a run computed on: the library versions and the hardware, recorded in its summary.json.

Two runs of the same config on the same inputs are bit-identical only in the same environment. Another torch,
transformers or numpy version, or a CPU with other vector units (AMX, AVX-512, AVX2: the kernels, and so the
order of their float sums, differ), changes the last bits of the first logged loss (about 1e-5 in bf16), and
training amplifies that into another end point within the seed-to-seed spread. With the record, a reproduction
can say which of the two it is, and a resume in another environment is noted where it happened.

    env = environment(device)             # {"python": "3.11.9", "torch": "2.13.0+cpu", ..., "cpu_flags": [...]}
    environment_diff(recorded, env)       # ["transformers: 5.23.0 -> 5.24.0", ...]; [] when the same
"""

from __future__ import annotations

import platform

import numpy
import torch
import transformers

__all__ = ["environment", "environment_diff"]

# The CPU features that decide which bf16 / fp32 kernels run (oneDNN takes AMX where there is AMX).
_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma")
# Entries that say where in the run an environment began, not what it is.
_NOT_COMPARED = ("from_step",)


def _cpuinfo() -> tuple[str, list[str]]:
    """(model name, the vector features of ``_FLAGS`` it has) from /proc/cpuinfo; elsewhere platform's guess."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), [f for f in _FLAGS if f in flags]


def environment(device: torch.device | str = "cpu") -> dict:
    """The versions and hardware a run on ``device`` computes with, in the current process."""
    cpu, flags = _cpuinfo()
    # plain str and int only: the record goes into checkpoints, which load with weights_only=True (torch's
    # version is a str subclass that this unpickler refuses)
    env = {"python": platform.python_version(), "torch": str(torch.__version__),
           "transformers": str(transformers.__version__), "numpy": str(numpy.__version__),
           "machine": platform.machine(), "cpu": cpu, "cpu_flags": flags,
           "cpu_capability": str(torch.backends.cpu.get_cpu_capability()), "threads": int(torch.get_num_threads())}
    device = torch.device(device)
    if device.type == "cuda":
        env.update(gpu=str(torch.cuda.get_device_name(device)), cuda=str(torch.version.cuda),
                   cudnn=int(torch.backends.cudnn.version() or 0))
    return env


def environment_diff(recorded: dict, current: dict) -> list[str]:
    """``key: recorded -> current`` for every entry on which two environment records differ (``from_step``,
    where a record began, is not compared)."""
    keys = [k for k in dict.fromkeys([*recorded, *current]) if k not in _NOT_COMPARED]
    return [f"{k}: {recorded.get(k, 'unrecorded')} -> {current.get(k, 'unrecorded')}"
            for k in keys if recorded.get(k) != current.get(k)]
