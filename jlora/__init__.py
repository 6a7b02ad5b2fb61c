"""jlora: LoRA for JAX as pure functions over parameter pytrees."""

from jlora import nnx
from jlora._adapters import add_weighted, select, stack_adapters, unstack_adapters
from jlora._checkpoint import (
    CheckpointManager,
    load_adapter,
    read_adapter_metadata,
    save_adapter,
    save_merged,
)
from jlora._config import LoraConfig
from jlora._init import init
from jlora._merge import (
    Rounding,
    RoundingWarning,
    combine,
    merge,
    plain_lora,
    split,
    unmerge,
)
from jlora._nnx import quantize
from jlora._optim import Summary, optimizer, summary
from jlora._peft import (
    PeftModule,
    default_module_name,
    load_peft,
    read_peft_config,
    save_peft,
)
from jlora._quant import Quantized, dequantize
from jlora._sharding import adapter_specs, base_specs
from jlora._transform import RuleError, explain, lora
from jlora._version import VERSION as __version__  # noqa: F401
from jlora._weight import Fused, Layout, LoraWeight, Trainable

__all__ = [
    "CheckpointManager",
    "Fused",
    "Layout",
    "LoraConfig",
    "LoraWeight",
    "PeftModule",
    "Quantized",
    "Rounding",
    "RoundingWarning",
    "RuleError",
    "Summary",
    "Trainable",
    "adapter_specs",
    "add_weighted",
    "base_specs",
    "combine",
    "default_module_name",
    "dequantize",
    "explain",
    "init",
    "load_adapter",
    "load_peft",
    "lora",
    "merge",
    "nnx",
    "optimizer",
    "plain_lora",
    "quantize",
    "read_adapter_metadata",
    "read_peft_config",
    "save_adapter",
    "save_merged",
    "save_peft",
    "select",
    "split",
    "stack_adapters",
    "summary",
    "unmerge",
    "unstack_adapters",
]
