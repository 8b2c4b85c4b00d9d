"""adalora: adaptive-rank low-rank adaptation (AdaLoRA) with a LoRA baseline, faithful to the paper."""

from .adaptive import AdaptiveMethod, inject_method, make_controller
from .allocator import RankAllocator, StepInfo
from .checkpoint import load_adapter, save_adapter
from .config import AdaLoRAConfig, ConfigError, IncreLoRAConfig, LoRAConfig, SoRAConfig
from .increlora import IncreLinear, RankGrower, inject_increlora
from .inject import count_trainable, inject_adapters, trainable_state_dict
from .layers import LoRALinear, SVDLinear
from .regularizers import orthogonal_regularization
from .schedule import budget_schedule
from .sora import SoRAGates, SoRALinear, inject_sora

__version__ = "0.1.0"

__all__ = [
    "AdaLoRAConfig",
    "AdaptiveMethod",
    "ConfigError",
    "IncreLinear",
    "IncreLoRAConfig",
    "LoRAConfig",
    "LoRALinear",
    "RankAllocator",
    "RankGrower",
    "SVDLinear",
    "SoRAConfig",
    "SoRAGates",
    "SoRALinear",
    "StepInfo",
    "budget_schedule",
    "count_trainable",
    "inject_adapters",
    "inject_increlora",
    "inject_method",
    "inject_sora",
    "load_adapter",
    "make_controller",
    "orthogonal_regularization",
    "save_adapter",
    "trainable_state_dict",
]
