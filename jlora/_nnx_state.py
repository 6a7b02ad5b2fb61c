"""The NNX storage of adapters: how a model adapted by `jlora.nnx.apply` holds them,
and the functional tree read from it.

Each adapted kernel's factors are `nnx.LoRAParam` attributes `<kernel>_lora_a` and
`<kernel>_lora_b` of the module that owns the kernel; their metadata (`lora_kernel`,
`lora_scale`, `lora_layout`, `lora_dropout`, `lora_role`) says which kernel they adapt
and how. A leaf trained whole is an `nnx.LoRAParam` with `lora_trained=True`. A
`Control` module (attribute `jlora`) on every module that runs factored holds the
switches. `params_of` reads the model as the functional route holds its params, which
is how checkpoints, PEFT files, `adapter_specs` and `summary` read NNX models. (The
behaviour, `apply` and the factored calls, is `_nnx.py`.)
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from jlora._weight import CHILDREN, Layout, LoraWeight, Trainable

A_SUFFIX, B_SUFFIX = "_lora_a", "_lora_b"


def suffix(child: str) -> str:
    """The attribute suffix of a `LoraWeight` child's variable beside its kernel
    (`kernel_lora_a`, `kernel_lora_b`, DoRA's `kernel_lora_m`, `kernel_lora_norm`)."""
    return f"_lora_{child}"


KERNEL, SCALE, LAYOUT, DROPOUT, ROLE = (
    "lora_kernel",
    "lora_scale",
    "lora_layout",
    "lora_dropout",
    "lora_role",
)
TRAINED_MARK = "lora_trained"
KEPT_SUFFIX = "_lora_kept"  # the frozen kernel kept while merged (`Kept`)
CONTROL = "jlora"  # the attribute that holds the shared `Control`
SHARDING_KEYS = ("out_sharding", "mesh", "sharding_rules")


class AdapterState(nnx.Param):
    """An adapter child that does not train (DoRA's cached norm, `LoraWeight.norm`): an
    `nnx.Param` (so it is in the model's params and saved with the adapters) that is
    not an `nnx.LoRAParam`, so an optimizer over `nnx.LoRAParam` leaves it alone."""


class Kept(nnx.Variable):
    """A frozen kernel as it was before `jlora.nnx.merge(model, keep=True)`, put back
    bit for bit by `unmerge` (not an `nnx.Param`: no optimizer or filter sees it)."""


class Control(nnx.Module):
    """jlora's switches in an NNX model adapted by `jlora.nnx.apply`, on every module
    that runs factored (attribute `jlora`).

    `deterministic`: no LoRA dropout (set by `model.eval()`, cleared by
    `model.train()`, as for `nnx.Dropout`). `rngs`: the stream dropout masks are drawn
    from, held by the root's control only (None elsewhere, and without dropout: a
    module inside an `nnx.vmap` stack holds no unstacked state). `strict`: a kernel use
    no rule handles raises instead of materializing. `merged`: the kernels hold
    `w + scale * a @ b` (`jlora.nnx.merge`) and calls run the plain model.
    """

    def __init__(
        self,
        *,
        rngs: nnx.RngStream | None,
        strict: bool,
        stream: str,
        deterministic: bool = False,
    ):
        self.deterministic = bool(deterministic)
        self.rngs = rngs
        self.strict = bool(strict)
        self.stream = stream
        self.merged = False

    def static(self) -> Control:
        """A control with these switches and no dropout stream (for modules below the
        root)."""
        out = Control(
            rngs=None,
            strict=self.strict,
            stream=self.stream,
            deterministic=self.deterministic,
        )
        out.merged = self.merged
        return out

    def set_view(self, deterministic: bool | None = None):
        """For `nnx.view(model, deterministic=...)`: LoRA dropout off (True) or on.

        Args:
          deterministic: if True, no LoRA dropout.
        """
        if deterministic is not None:
            self.deterministic = deterministic


def base_class(cls: type) -> type:
    """The user's class behind a factored class (the class itself otherwise)."""
    return cls.__dict__.get("_jlora_base", cls)


def is_factored(module) -> bool:
    return "_jlora_base" in type(module).__dict__


def factor_pairs(flat) -> dict[tuple, dict[str, tuple]]:
    """`{kernel path: {child name: variable path}}` for every adapter child present
    (`a`, `b`, and DoRA's `m`, `norm`), from the factor variables' metadata."""
    pairs = {}
    present = {path for path, _ in flat}
    for path, v in flat:
        if isinstance(v, nnx.Variable) and v.get_metadata(ROLE, None) == "a":
            name = v.get_metadata(KERNEL)
            children = {}
            for c in CHILDREN[1:]:
                p = path[:-1] + (name + suffix(c.name),)
                if p in present:
                    children[c.name] = p
            pairs[path[:-1] + (name,)] = children
    return pairs


def peeled(layout: Layout, ndim: int) -> Layout:
    """`layout` (of a stacked kernel, as `apply` saw it) for the kernel as it is now:
    inside `nnx.vmap` / `nnx.scan` over the stack, its leading stacked axes are gone."""
    n = layout.ndim - ndim
    if n <= 0:
        return layout
    if layout.stack_axes[:n] != tuple(range(n)):
        raise ValueError(
            f"jlora.nnx: a kernel with layout {layout} is used with {ndim} axes; only "
            "leading stacked axes can be mapped away (nnx.vmap / nnx.scan over axis 0)."
        )

    def shift(axes):
        return tuple(i - n for i in axes)

    return Layout(
        shift(layout.in_axes),
        shift(layout.out_axes),
        shift(layout.stack_axes[n:]),
        layout.fused,
    )


def lora_weight(
    kernel: nnx.Variable, children: dict, deterministic: bool = False
) -> LoraWeight:
    """The `LoraWeight` of a kernel variable and its children's variables by name."""
    w = kernel.get_raw_value()
    a = children["a"]
    return LoraWeight(
        w,
        a.get_raw_value(),
        children["b"].get_raw_value(),
        scale=a.get_metadata(SCALE),
        layout=peeled(a.get_metadata(LAYOUT), len(np.shape(w))),
        dropout=0.0 if deterministic else a.get_metadata(DROPOUT),
    ).replace(
        **{k: v.get_raw_value() for k, v in children.items() if k not in ("a", "b")}
    )


def owner_controls(graph) -> dict[tuple, Control]:
    """`{module path: its Control}` for the modules of `graph` that run factored."""
    out = {}
    for path, node in nnx.iter_graph(graph):
        ctl = vars(node).get(CONTROL) if isinstance(node, nnx.Module) else None
        if isinstance(ctl, Control):
            out[tuple(path)] = ctl
    return out


def with_lora_weights(flat, controls: dict | None = None) -> list:
    """`flat` with each adapted kernel's variable holding its `LoraWeight` (the factor
    variables stay: code that reads them sees their values). With `controls`
    (`owner_controls` of the same graph), a kernel whose module is merged stays plain
    and one whose module is in eval mode gets no dropout."""
    by_path = dict(flat)
    pairs = factor_pairs(flat)
    controls = controls or {}
    out = []
    for path, v in flat:
        ctl = controls.get(path[:-1])
        if path in pairs and not (ctl is not None and ctl.merged):
            quiet = ctl is not None and ctl.deterministic
            children = {k: by_path[p] for k, p in pairs[path].items()}
            v = v.replace(value=lora_weight(v, children, quiet))
        out.append((path, v))
    return out


def in_eval_mode(model) -> bool:
    """Whether `model` was put in evaluation mode (`model.eval()`, `nnx.view`): some
    module of it has `deterministic=True` and none `deterministic=False`."""
    flags = {
        vars(n)["deterministic"]
        for _, n in nnx.iter_graph(model)
        if isinstance(n, nnx.Module) and isinstance(vars(n).get("deterministic"), bool)
    }
    return flags == {True}


def is_adapted(model) -> bool:
    """Whether `jlora.nnx.apply` (or `load_adapter`/`load_peft` onto the model) put
    adapters into `model` (a model that is only quantized holds none)."""
    return any(
        isinstance(v, nnx.Variable)
        and (v.get_metadata(ROLE, None) is not None or v.get_metadata(TRAINED_MARK, False))
        for _, v in nnx.to_flat_state(nnx.state(model))
    )


def require_module(model, fn_name: str) -> None:
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"{fn_name}: model must be an flax.nnx.Module, got {type(model).__name__}."
        )


def require_adapted(model, fn_name: str) -> Control:
    require_module(model, fn_name)
    if is_adapted(model):
        root = vars(model).get(CONTROL)
        if isinstance(root, Control):
            return root
        for _, node in nnx.iter_graph(model):
            if isinstance(node, Control):
                return node
    raise ValueError(
        f"{fn_name}: the model holds no jlora adapters; call "
        "jlora.nnx.apply(model, config, rngs=...) (or load adapters onto it) first."
    )


def params_of(model, fn_name: str = "jlora") -> nnx.State:
    """The model's params as the functional route holds them: `nnx.state(model,
    nnx.Param)` with each adapted kernel's variable holding its `LoraWeight`, each
    trained leaf marked `Trainable`, and no factor variables."""
    ctl = require_adapted(model, fn_name)
    if ctl.merged:
        raise ValueError(
            f"{fn_name}: the model's kernels are merged (jlora.nnx.merge); call "
            "jlora.nnx.unmerge(model) first, so that the frozen kernels are the base."
        )
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = []
    for path, v in with_lora_weights(flat):
        if v.get_metadata(ROLE, None) is not None:
            continue
        if v.get_metadata(TRAINED_MARK, False):
            meta = {k: m for k, m in v.get_metadata().items() if k != TRAINED_MARK}
            v = nnx.Param(Trainable(v.get_raw_value()), **meta)
        out.append((path, v))
    return nnx.from_flat_state(out)


def base_of(model, fn_name: str = "jlora") -> nnx.State:
    """The model's plain params (`nnx.state(model, nnx.Param)` without factors, trained
    leaves as plain `nnx.Param`s): what adapters load onto."""
    if not is_adapted(model):
        return nnx.state(model, nnx.Param)
    ctl = require_adapted(model, fn_name)
    if ctl.merged:
        raise ValueError(
            f"{fn_name}: the model's kernels are merged (jlora.nnx.merge); call "
            "jlora.nnx.unmerge(model) first."
        )
    out = []
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if v.get_metadata(ROLE, None) is not None:
            continue
        if v.get_metadata(TRAINED_MARK, False):
            meta = {k: m for k, m in v.get_metadata().items() if k != TRAINED_MARK}
            v = nnx.Param(v.get_raw_value(), **meta)
        out.append((path, v))
    return nnx.from_flat_state(out)


def as_params(x, fn_name: str):
    """`params_of(x)` for an NNX model (its plain `nnx.Param` state if it holds no
    adapters), `x` itself for anything else."""
    if not isinstance(x, nnx.Module):
        return x
    return params_of(x, fn_name) if is_adapted(x) else nnx.state(x, nnx.Param)
