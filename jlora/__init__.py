"""jlora: LoRA for JAX as pure functions over parameter pytrees."""

from jlora._config import LoraConfig
from jlora._init import init
from jlora._merge import combine, merge, split, unmerge
from jlora._optim import Summary, optimizer, summary
from jlora._weight import Layout, LoraWeight, Trainable

__version__ = "0.1.0"

__all__ = [
    "Layout",
    "LoraConfig",
    "LoraWeight",
    "Summary",
    "Trainable",
    "combine",
    "init",
    "merge",
    "optimizer",
    "split",
    "summary",
    "unmerge",
]
