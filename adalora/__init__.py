"""adalora: adaptive-rank low-rank adaptation (AdaLoRA) with a LoRA baseline, faithful to the paper."""

from .allocator import RankAllocator, StepInfo
from .checkpoint import load_adapter, save_adapter
from .config import AdaLoRAConfig, ConfigError, LoRAConfig
from .inject import count_trainable, inject_adapters, trainable_state_dict
from .layers import LoRALinear, SVDLinear
from .regularizers import orthogonal_regularization
from .schedule import budget_schedule

__version__ = "0.1.0"

__all__ = [
    "AdaLoRAConfig",
    "ConfigError",
    "LoRAConfig",
    "LoRALinear",
    "RankAllocator",
    "SVDLinear",
    "StepInfo",
    "budget_schedule",
    "count_trainable",
    "inject_adapters",
    "load_adapter",
    "orthogonal_regularization",
    "save_adapter",
    "trainable_state_dict",
]
