"""NNX-native LoRA: adapters inside a Flax NNX model, trained with `nnx.Optimizer`,
served by the model's own call.

    model = MyModel(rngs=nnx.Rngs(0))
    jlora.nnx.apply(model, jlora.LoraConfig(8, 16), rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.adamw(3e-4), wrt=nnx.LoRAParam)
    ...
    served = jlora.nnx.merge_and_unload(model)

The factors are `nnx.LoRAParam` variables beside the kernels they adapt; the model's
`__call__` runs through the same interpreter and rules as `jlora.lora`.
`jlora.save_adapter`, `load_adapter`, `save_peft`, `load_peft`, `save_merged`,
`adapter_specs` and `summary` accept an NNX model as well as a pytree.
"""

from jlora._nnx import (
    Control,
    Kept,
    apply,
    explain,
    is_adapted,
    lora,
    merge,
    merge_and_unload,
    unmerge,
)

__all__ = [
    "Control",
    "Kept",
    "apply",
    "explain",
    "is_adapted",
    "lora",
    "merge",
    "merge_and_unload",
    "unmerge",
]
