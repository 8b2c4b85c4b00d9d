"""adalora: adaptive-rank low-rank adaptation (AdaLoRA) with a LoRA baseline, faithful to the paper."""

from .adaptive import AdaptiveMethod, inject_method, make_controller
from .allocator import RankAllocator, StepInfo
from .checkpoint import from_pretrained, load_adapter, load_config, save_adapter, save_pretrained
from .config import AdaLoRAConfig, ConfigError, IncreLoRAConfig, LoRAConfig, SoRAConfig
from .increlora import IncreLinear, RankGrower, inject_increlora
from .inject import (
    count_trainable,
    inject_adapters,
    merge_and_unload,
    print_trainable_parameters,
    trainable_state_dict,
    trainable_summary,
)
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
    "from_pretrained",
    "inject_adapters",
    "inject_increlora",
    "inject_method",
    "inject_sora",
    "load_adapter",
    "load_config",
    "make_controller",
    "merge_and_unload",
    "orthogonal_regularization",
    "print_trainable_parameters",
    "save_adapter",
    "save_pretrained",
    "trainable_state_dict",
    "trainable_summary",
]
