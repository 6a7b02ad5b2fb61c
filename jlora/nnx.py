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
`adapter_specs` and `summary` accept an NNX model as well as a pytree. With DoRA
(`LoraConfig(use_dora=True)`) the magnitude is an `nnx.LoRAParam` too
(`kernel_lora_m`) and its cached norm an `AdapterState` (`kernel_lora_norm`), an
`nnx.Param` that an optimizer over `nnx.LoRAParam` leaves alone.
"""

from jlora._nnx import (
    AdapterState,
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
    "AdapterState",
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
