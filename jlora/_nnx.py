"""NNX-native LoRA: factors stored as `nnx.LoRAParam` variables inside the model, and
the model's own methods run through the same interpreter and rules as `jlora.lora`.

Storage. `apply` puts each targeted kernel's factors beside it in the module that owns
it, as `nnx.LoRAParam` attributes `<kernel>_lora_a` and `<kernel>_lora_b`; their
metadata (`lora_kernel`, `lora_scale`, `lora_layout`, `lora_dropout`) says which kernel
they adapt and how. A leaf trained whole (`train_bias`, `also_train`) becomes an
`nnx.LoRAParam` with `lora_trained=True`. Frozen kernels stay `nnx.Param`.

Calls. Every module on the way from the root to an adapted kernel gets a subclass of
its own class (same name, `isinstance` holds) whose `__call__` (and `attend`, for an
`nnx.Embed`) runs the original method through `run`: the module and the call's
arguments are split with `nnx.split`, the adapted kernels become `LoraWeight`s, and
`jlora.lora` interprets the original method on that state; the variables the method
changed (BatchNorm statistics, RNG counts, caches, sown values) come back and are put
into the modules with `nnx.update`. Inside one such call every other factored method
runs as written (the outer interpretation holds all the kernels), so a kernel is never
factored twice. A `Control` module, shared by all of them under the attribute `jlora`,
holds the switches: `deterministic` (set by `model.train()` / `model.eval()`), the
dropout stream, `strict`, and whether the kernels are merged.

The functional tree (`params_of`) is the same `nnx.State` the functional route uses:
`LoraWeight`s inside the kernels' variables, `Trainable` marks on trained leaves, so
checkpoints, PEFT files, `adapter_specs` and `summary` read NNX models through it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from jlora import _jax_compat as compat
from jlora import _quant
from jlora._config import LoraConfig
from jlora._init import adapt
from jlora._merge import _norm_of, merge_kernel, unmerge_kernel
from jlora._nnx_state import (
    A_SUFFIX,
    B_SUFFIX,
    CONTROL,
    DROPOUT,
    KEPT_SUFFIX,
    KERNEL,
    LAYOUT,
    ROLE,
    SCALE,
    SHARDING_KEYS,
    TRAINED_MARK,
    AdapterState,
    Control,
    Kept,
    base_class,
    base_of,
    in_eval_mode,
    is_adapted,
    is_factored,
    owner_controls,
    require_adapted,
    require_module,
    suffix,
    with_lora_weights,
)
from jlora._quant import is_quantized
from jlora._sharding import named_sharding_of
from jlora._targets import LORA, TRAINED, walk
from jlora._transform import explain as _explain
from jlora._transform import lora as _lora
from jlora._weight import CHILD, CHILDREN, Layout, LoraWeight, child_axes, extra_children

# Factored classes -----------------------------------------------------------------------

_CLASSES: dict[type, type] = {}
_LOCK = threading.Lock()
_EXTRA_METHODS: tuple[tuple[type, tuple[str, ...]], ...] = ((nnx.Embed, ("attend",)),)


class _Active(threading.local):
    depth = 0


_ACTIVE = _Active()  # > 0 while a factored call traces its method


def _factored_method(cls: type, name: str):
    original = getattr(cls, name)

    @functools.wraps(original)
    def method(self, *args, **kwargs):
        return run(original, (self, *args), kwargs, control=getattr(self, CONTROL, None))

    return method


def factored_class(cls: type) -> type:
    """A subclass of `cls` whose `__call__` (and `attend` for `nnx.Embed`) run
    factored; one per class, kept for the life of the process."""
    if is_factored_class(cls):
        return cls
    with _LOCK:
        got = _CLASSES.get(cls)
        if got is None:
            names = ["__call__"] + [
                m for t, ms in _EXTRA_METHODS if issubclass(cls, t) for m in ms
            ]
            namespace = {
                "_jlora_base": cls,
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__doc__": cls.__doc__,
            }
            for name in names:
                if callable(getattr(cls, name, None)):
                    namespace[name] = _factored_method(cls, name)
            got = type(cls)(cls.__name__, (cls,), namespace)
            _CLASSES[cls] = got
    return got


def is_factored_class(cls: type) -> bool:
    return "_jlora_base" in cls.__dict__


def _set_class(module, cls: type) -> None:
    object.__setattr__(module, "__class__", cls)  # (not an attribute NNX should track)


# The state of a call ----------------------------------------------------------------------


def _leaves_of(v):
    return jax.tree.leaves(v.get_raw_value() if isinstance(v, nnx.Variable) else v)


def _changed(old: dict, after) -> list:
    """The variables of `after` that are new or hold other values than `old` held
    (`{path: leaves}` taken before the call; compared by identity: under a trace an
    unchanged variable holds its input). Params are not among them: a forward call
    does not change its params, and NNX transforms inside the call (`nnx.remat`,
    `nnx.jit`, `nnx.scan`) hand every variable back as a new value, which for a
    kernel would mean forming `W + scale * A @ B` to return it."""
    out = []
    for path, v in after:
        if not isinstance(v, nnx.Variable) or isinstance(v, nnx.Param):
            continue
        was = old.get(path)
        now = _leaves_of(v)
        if was is None or len(was) != len(now) or any(x is not y for x, y in zip(was, now)):
            out.append((path, v))
    return out


def _first_and_rest(flat):
    """The first positional argument's entries (re-rooted) and the others', so that
    messages name a kernel by its path in the model."""
    first = [(p[2:], v) for p, v in flat if p[:2] == (0, 0)]
    rest = [(p, v) for p, v in flat if p[:2] != (0, 0)]
    return nnx.from_flat_state(first), nnx.from_flat_state(rest)


def _join(first, rest) -> list:
    return [((0, 0) + p, v) for p, v in nnx.to_flat_state(first)] + list(
        nnx.to_flat_state(rest)
    )


def _pure(fn, graphdef):
    """`fn` on the split arguments, returning its output and the changed variables:
    the same function object for the same `fn` and graph, so that eager calls hit
    `jlora.lora`'s cache even where `fn` closes over values it cannot key. (Kept for
    the methods of factored classes, which live as long as their classes.)"""
    try:
        return _pure_cached(fn, graphdef)
    except TypeError:  # (an unhashable static attribute in the graph)
        return _make_pure(fn, graphdef)


def _make_pure(fn, graphdef):

    def pure(first, rest):
        flat = _join(first, rest)
        before = {p: _leaves_of(v) for p, v in flat}  # (merge reuses the variables)
        _ACTIVE.depth += 1
        try:
            args, kwargs = nnx.merge(graphdef, nnx.from_flat_state(flat))
            out = fn(*args, **kwargs)
            after = list(nnx.to_flat_state(nnx.state((args, kwargs))))
        finally:
            _ACTIVE.depth -= 1
        return out, nnx.from_flat_state(_changed(before, after))

    return pure


_pure_cached = functools.lru_cache(maxsize=128)(_make_pure)


def _controls(args, kwargs) -> list[Control]:
    """The controls among the arguments, the one holding the dropout stream first."""
    found = []
    for _, node in nnx.iter_graph((args, kwargs)):
        if isinstance(node, Control) and not any(node is c for c in found):
            found.append(node)
    return sorted(found, key=lambda c: c.rngs is None)


def _dropout_key(args, kwargs, fn):
    """A fresh key from the dropout stream of the model among the arguments."""
    source = next(iter(_controls(args, kwargs)), None)
    if source is not None and source.rngs is not None:
        return source.rngs()
    name = getattr(fn, "__qualname__", getattr(fn, "__name__", "fn"))
    raise ValueError(
        f"jlora.nnx: {name} runs kernels with LoRA dropout in training mode, but the "
        "dropout stream lives in the model's root (the module jlora.nnx.apply adapted) "
        "and the root is not among the arguments. Call through the root (e.g. "
        f"jlora.nnx.lora(lambda model, *a: ...)(model, ...)), set module.eval() (no "
        "dropout), or pass a key: jlora.nnx.lora(fn, rng=key)."
    )


def _refuse_training_merged(flat, merged: set) -> None:
    moving = [
        "/".join(map(str, p[2:] if p[:2] == (0, 0) else p))
        for p, v in flat
        if isinstance(v, nnx.Variable)
        and v.get_metadata(ROLE, None) is not None
        and p[:-1] in merged
        and any(compat.is_differentiated(x) for x in _leaves_of(v))
    ]
    if moving:
        raise ValueError(
            "jlora.nnx: the model's kernels are merged (jlora.nnx.merge), so its call "
            "runs the plain kernels and the factors "
            f"{moving[:4]}{' ...' if len(moving) > 4 else ''} being differentiated would "
            "get no gradient; call jlora.nnx.unmerge(model) before training."
        )


def _held_outside(lora_flat) -> bool:
    """Whether an adapted kernel holds a concrete array: its model is not part of the
    factored call being traced (a model reached through a global or a closure)."""
    return any(
        isinstance(v, nnx.Variable)
        and isinstance(v.get_raw_value(), LoraWeight)
        and not compat.is_tracer(v.get_raw_value().w)
        for _, v in lora_flat
    )


def run(
    fn: Callable,
    args: tuple,
    kwargs: dict,
    *,
    control=None,
    strict=None,
    rng=None,
    pure: Callable = _pure,
):
    """`fn(*args, **kwargs)` with every adapted kernel of the NNX modules among the
    arguments held low-rank: the one NNX entry into `jlora.lora`. `pure(fn, graphdef)`
    gives the function `jlora.lora` interprets (the same object for the same graph, so
    that eager calls hit its cache).

    Each kernel follows its own module's switches: a merged module's kernels stay
    plain, an eval-mode module's get no dropout. Inside another factored call, the
    modules of that call run as written (its interpretation holds their kernels), and
    a model it reaches otherwise (a global, a closure) runs factored on its own."""
    graphdef, state = nnx.split((args, kwargs))
    flat = list(nnx.to_flat_state(state))
    controls = owner_controls((args, kwargs))
    lora_flat = with_lora_weights(flat, controls)
    if _ACTIVE.depth and not _held_outside(lora_flat):
        return fn(*args, **kwargs)
    merged = {p for p, c in controls.items() if c.merged}
    if merged:
        _refuse_training_merged(flat, merged)
    weights = [
        v.get_raw_value()
        for _, v in lora_flat
        if isinstance(v, nnx.Variable) and isinstance(v.get_raw_value(), LoraWeight)
    ]
    quantized = any(
        isinstance(v, nnx.Variable) and is_quantized(v.get_raw_value()) for _, v in flat
    )
    if not weights and not quantized:  # no adapters, or every one merged: plain call
        return fn(*args, **kwargs)
    if rng is None and any(lw.dropout > 0 for lw in weights):
        rng = _dropout_key(args, kwargs, fn)
    if strict is None:
        ctl = control if control is not None else next(iter(controls.values()), None)
        strict = bool(ctl is not None and ctl.strict)
    first, rest = _first_and_rest(lora_flat)
    out, updates = _lora(pure(fn, graphdef), rng=rng, strict=strict)(first, rest)
    if len(nnx.to_flat_state(updates)):
        nnx.update((args, kwargs), updates)
    return out


def lora(
    fn: Callable, *, strict: bool | None = None, rng: jax.Array | None = None
) -> Callable:
    """`fn`, a function of NNX modules (and arrays), run with their adapted kernels
    factored: the NNX form of `jlora.lora`.

    A model adapted with `jlora.nnx.apply` already runs factored through its own
    `__call__` (and `nnx.Embed.attend`); use this for any other code that reads a
    kernel itself: a method other than `__call__` (`model.decode(...)`), or a
    function that uses `model.embed.embedding[...]` directly. Inside, every adapted
    kernel of every module in the arguments is interpreted as in `jlora.lora` (same
    rules, `strict`, warnings), and the variables `fn` changes come back into the
    modules. Composes with `nnx.jit`, `nnx.grad`, `nnx.scan`, ...

    Args:
      fn: a function whose arguments hold NNX modules.
      strict: raise `jlora.RuleError` where a kernel use has no rule; default: the
        `strict` given to `jlora.nnx.apply`.
      rng: a key for LoRA dropout; default: drawn from the model's dropout stream
        in training mode (none after `model.eval()`).

    Returns:
      the function, factored.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> from flax import nnx
      >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> _ = jlora.nnx.apply(model, jlora.LoraConfig(2, 4), rngs=nnx.Rngs(1))
      >>> head = jlora.nnx.lora(lambda m, x: x @ m.kernel[...])
      >>> head(model, jnp.ones((1, 4))).shape
      (1, 3)
    """

    cached = functools.lru_cache(maxsize=8)(lambda graphdef: _make_pure(fn, graphdef))

    def pure(fn, graphdef):  # (held by this function only: it dies with it)
        try:
            return cached(graphdef)
        except TypeError:
            return _make_pure(fn, graphdef)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return run(fn, args, kwargs, strict=strict, rng=rng, pure=pure)

    return wrapped


def explain(fn: Callable, *args, **kwargs) -> dict[str, tuple[str, ...]]:
    """`jlora.explain` for NNX: which rule(s) handled each adapted kernel when
    `fn(*args, **kwargs)` runs factored (`fn` may be the model itself:
    `jlora.nnx.explain(model, x)`). Traces only; paths are those of
    `nnx.state(model)` for the first argument; `{}` for a merged model (its calls
    run the plain kernels)."""
    if isinstance(fn, nnx.Module):
        module, fn = fn, None
        args = (module, *args)
        method = type(module).__call__
        fn = getattr(method, "__wrapped__", method)
    graphdef, state = nnx.split((args, kwargs))
    flat = with_lora_weights(list(nnx.to_flat_state(state)), owner_controls((args, kwargs)))
    first, rest = _first_and_rest(flat)  # (a merged module's kernels stay plain)
    return _explain(_pure(fn, graphdef), first, rest)


# Layouts that NNX's own layers fix ---------------------------------------------------


def _einsum_layout(spec: str, ndim: int) -> Layout | None:
    spec = spec.replace(" ", "")
    if "->" not in spec or "." in spec:
        return None
    ins, out = spec.split("->")
    parts = ins.split(",")
    if len(parts) != 2:
        return None
    x, k = parts
    if len(k) != ndim:
        return None
    in_axes = tuple(i for i, c in enumerate(k) if c in x and c not in out)
    out_axes = tuple(i for i, c in enumerate(k) if c in out and c not in x)
    stack = tuple(i for i, c in enumerate(k) if c in out and c in x)
    if len(in_axes) + len(out_axes) + len(stack) != ndim or not in_axes or not out_axes:
        return None
    return Layout(in_axes, out_axes, stack)


def _stacked(n: int, in_axes, out_axes, stack=()) -> Layout:
    """A layer's layout under `n` leading stacked axes (`nnx.vmap`/`nnx.scan` stacks)."""
    shift = lambda axes: tuple(i + n for i in axes)  # noqa: E731
    return Layout(shift(in_axes), shift(out_axes), tuple(range(n)) + shift(stack))


def _layer_layout(module, name: str, ndim: int) -> Layout | None:
    """The layout of `module.<name>` that the NNX layer's own code fixes."""
    if isinstance(module, nnx.LinearGeneral) and name == "kernel":
        nb = len(module.batch_axis)
        ni, no = len(module.in_features), len(module.out_features)
        n = ndim - (nb + ni + no)
        if n < 0:
            return None
        return _stacked(n, range(nb, nb + ni), range(nb + ni, nb + ni + no), range(nb))
    if isinstance(module, nnx.Einsum) and name == "kernel":
        base = len(module.kernel_shape)
        lay = _einsum_layout(module.einsum_str, base)
        if lay is None or ndim < base:
            return None
        return _stacked(ndim - base, lay.in_axes, lay.out_axes, lay.stack_axes)
    if isinstance(module, nnx.ConvTranspose) and name == "kernel":
        if module.transpose_kernel:
            return None
        base = len(module.kernel_shape)
    elif isinstance(module, nnx.Conv) and name == "kernel":
        base = len(module.kernel_shape)
    elif (isinstance(module, nnx.Linear) and name == "kernel") or (
        isinstance(module, nnx.Embed) and name == "embedding"
    ):
        base = 2
    else:
        return None
    if ndim < base:
        return None
    return _stacked(ndim - base, range(base - 1), (base - 1,))


def _path_str(path: tuple) -> str:
    return "/".join(str(k) for k in path)


def _layer_layouts(model) -> dict[str, Layout]:
    out = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        for name in ("kernel", "embedding"):
            v = getattr(node, name, None)
            if isinstance(v, nnx.Variable):
                lay = _layer_layout(node, name, np.ndim(v.get_raw_value()))
                if lay is not None:
                    out[_path_str(path + (name,))] = lay
    return out


# apply / params_of / install -----------------------------------------------------------


def _factor_metadata(kernel: nnx.Variable, lw: LoraWeight, role: str) -> dict:
    meta = {
        ROLE: role,
        SCALE: lw.scale,
        LAYOUT: lw.layout,
        DROPOUT: lw.dropout,
    }
    for key in SHARDING_KEYS[1:]:
        if kernel.get_metadata(key, None) is not None:
            meta[key] = kernel.get_metadata(key)
    names = kernel.get_metadata("out_sharding", None)
    if names:
        names = tuple(names) + (None,) * (lw.layout.ndim - len(names))
        lay = lw.layout
        axes = child_axes(lay, CHILD[role].axes)
        meta["out_sharding"] = tuple(None if k is None else names[k] for k in axes)
    return meta


def _nodes(model) -> dict[tuple, Any]:
    return {tuple(p): n for p, n in nnx.iter_graph(model)}


def _is_layer(node) -> bool:
    """A module jlora may give attributes to: not a container (`nnx.Dict` and
    `nnx.List` are modules whose attributes are their items)."""
    return isinstance(node, nnx.Module) and not isinstance(node, (nnx.Dict, nnx.List))


class _NewValue(NamedTuple):
    """A new value for an existing variable (a kernel a PiSSA/OLoRA start changed)."""

    value: Any


def _plan(model, tree, fn_name: str):
    """What putting the `LoraWeight`s and `Trainable` marks of `tree` (an adapted
    `nnx.state(model, nnx.Param)`) into `model` sets: `[(owner, attribute, variable)]`
    and the owners' paths, checked in full; nothing is changed."""
    nodes = _nodes(model)
    plan = []  # (owner, attribute, variable), checked in full before any is set
    owners = []
    errors = []
    for node in walk(tree).nodes:
        if node.kind not in (LORA, TRAINED):
            continue
        keys = tuple(k.key for k in node.keys)  # (State keys: str or int)
        owner = nodes.get(keys[:-1])
        name = keys[-1]
        if not _is_layer(owner) or not isinstance(name, str):
            errors.append(
                f"  {node.path}: the kernel's variable is held by a "
                f"{type(owner).__name__}, not by a module attribute, so its factors have "
                "nowhere to live; keep kernels as attributes of nnx.Module objects or "
                "exclude it (LoraConfig.exclude)."
            )
            continue
        kernel = getattr(owner, name)
        if node.kind == LORA:
            lw = node.value
            a = nnx.LoRAParam(lw.a, **{KERNEL: name}, **_factor_metadata(kernel, lw, "a"))
            b = nnx.LoRAParam(lw.b, **{KERNEL: name}, **_factor_metadata(kernel, lw, "b"))
            plan += [(owner, name + A_SUFFIX, a), (owner, name + B_SUFFIX, b)]
            if lw.w is not kernel.get_raw_value():  # (a PiSSA/OLoRA start: the residual)
                plan.append((owner, name, _NewValue(lw.w)))
            for child, value in extra_children(lw).items():  # (DoRA's m and norm)
                kind = nnx.LoRAParam if CHILD[child].trained else AdapterState
                meta = _factor_metadata(kernel, lw, child)
                plan.append(
                    (owner, name + suffix(child), kind(value, **{KERNEL: name}, **meta))
                )
        else:
            meta = dict(kernel.get_metadata())
            meta[TRAINED_MARK] = True
            plan.append((owner, name, nnx.LoRAParam(node.value.value, **meta)))
        owners.append(keys[:-1])
    if errors:
        raise ValueError(f"{fn_name}: cannot adapt this model:\n" + "\n".join(errors))
    return plan, owners


def _install(model, planned, control: Control) -> None:
    """Carries out `_plan`'s result: factor variables beside the kernels, trained
    leaves as `LoRAParam`s, factored classes (and controls) on the way to each kernel."""
    plan, owners = planned
    nodes = _nodes(model)
    for owner, name, var in plan:
        if isinstance(var, _NewValue):
            getattr(owner, name).set_raw_value(var.value)
        else:
            setattr(owner, name, var)
    wrapped = set()
    for keys in owners:
        for i in range(len(keys) + 1):
            prefix = keys[:i]
            mod = nodes.get(prefix)
            if _is_layer(mod) and prefix not in wrapped:
                wrapped.add(prefix)
                _set_class(mod, factored_class(type(mod)))
                here = control if prefix == () else control.static()
                setattr(mod, CONTROL, here)


def apply(
    model: nnx.Module,
    config: LoraConfig,
    *,
    rngs: nnx.Rngs,
    probe: Callable[[nnx.Module], Any] | None = None,
    strict: bool = False,
    dropout_stream: str = "dropout",
) -> nnx.Module:
    """Adapts an NNX model in place: LoRA factors at the targeted kernels, and the
    model's own call computing `x @ W + scale * (dropout(x) @ A) @ B`.

    Each targeted kernel (default: floating kernels with >= 2 axes named `kernel`,
    `weight`, `w`, ...; see `LoraConfig.targets`) gets `nnx.LoRAParam` factors
    `<name>_lora_a` and `<name>_lora_b` in its module; the kernel stays a frozen
    `nnx.Param`. Train with `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` and
    `nnx.DiffState(0, nnx.LoRAParam)`: `nnx.Param` includes `LoRAParam`, so
    `wrt=nnx.Param` would train the kernels as well. The factors' shardings follow the
    kernels' (`nnx.with_partitioning` names; the rank axis unsharded).

    The axes of NNX's own layers are known (`nnx.Linear`, `nnx.LinearGeneral`,
    `nnx.Einsum`, `nnx.Embed`, `nnx.Conv`, stacked by `nnx.vmap`/`nnx.scan` or not);
    other kernels follow `jlora.init`'s rule (the config's `layout`, `probe`, Flax's
    2-axis `kernel` convention, else a warning or an error naming the path).

    LoRA dropout (`LoraConfig.dropout`) is active after `model.train()` (the default)
    and off after `model.eval()`, with masks drawn from `rngs[dropout_stream]`: a
    fresh mask every call, every kernel use and every scan iteration.

    Args:
      model: any `nnx.Module`; changed in place (and returned).
      config: a `LoraConfig`.
      rngs: an `nnx.Rngs`; the factors are drawn from its `params` stream, the
        dropout masks from `dropout_stream` (each falls back to `default`).
      probe: optional `probe(model)` (e.g. `lambda m: m(x)`), read as `jlora.init`'s
        probe for kernels whose layout the layers do not fix.
      strict: calls raise `jlora.RuleError` where a kernel use has no rule, instead
        of forming `W + scale * A @ B` for it with a warning.
      dropout_stream: the `rngs` stream name for dropout masks.

    Returns:
      `model`.

    Raises:
      ValueError: `model` is already adapted, targets that match nothing (the closest
        paths are listed), a kernel whose axes cannot be told, ... (as `jlora.init`).
      TypeError: `model` is not an `nnx.Module`, or `rngs` is not an `nnx.Rngs`.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> from flax import nnx
      >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> _ = jlora.nnx.apply(model, jlora.LoraConfig(2, 4), rngs=nnx.Rngs(1))
      >>> model.kernel_lora_a.shape, type(model.kernel_lora_a).__name__
      ((4, 2), 'LoRAParam')
    """
    fn_name = "jlora.nnx.apply"
    require_module(model, fn_name)
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"{fn_name}: rngs must be an nnx.Rngs, got {type(rngs).__name__}.")
    if is_adapted(model):
        raise ValueError(
            f"{fn_name}: the model is already adapted; jlora.nnx.merge_and_unload(model) "
            "gives back the plain model to adapt anew, or load adapters onto a fresh one."
        )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    user_probe = None
    if probe is not None:

        def user_probe(p):
            return probe(nnx.merge(graphdef, p, rest))

    tree = adapt(
        rngs["params"](),
        params,
        config,
        probe=user_probe,
        known=_layer_layouts(model),
        caller=fn_name,
    )
    dropout = float(config.dropout) > 0
    control = Control(
        rngs=rngs[dropout_stream].fork() if dropout else None,
        strict=strict,
        stream=dropout_stream,
        deterministic=in_eval_mode(model),  # (a model in eval mode stays so)
    )
    _install(model, _plan(model, tree, fn_name), control)
    return model


def install(model, tree, fn_name: str, *, strict: bool = False, rngs=None) -> nnx.Module:
    """Puts adapted params (`load_adapter`'s or `load_peft`'s result on `base_of(model)`)
    into `model`, replacing adapters it holds (keeping its switches and dropout
    stream). Everything is checked before the model changes."""
    ctl = None
    planned = _plan(model, tree, fn_name)  # (checked before the model changes)
    if is_adapted(model):
        require_adapted(model, fn_name)
        ctl = vars(model).get(CONTROL)
        trained = {n.path for n in walk(tree).nodes if n.kind == TRAINED}
        left = [
            "/".join(map(str, p))
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
            if v.get_metadata(TRAINED_MARK, False) and "/".join(map(str, p)) not in trained
        ]
        if left:
            raise ValueError(
                f"{fn_name}: the model's adapters train {left[:4]}"
                f"{' ...' if len(left) > 4 else ''} whole, and the adapters being loaded "
                "do not hold them, so the model would keep their trained values; load "
                "onto a fresh model (or jlora.nnx.merge_and_unload first, to keep them)."
            )
        _unload(model)
    dropout = any(n.kind == LORA and n.value.dropout > 0 for n in walk(tree).nodes)
    if ctl is None or (dropout and ctl.rngs is None):
        ctl = Control(
            rngs=(rngs or nnx.Rngs(0))["dropout"].fork() if dropout else None,
            strict=strict if ctl is None else ctl.strict,
            stream="dropout",
            deterministic=in_eval_mode(model) if ctl is None else ctl.deterministic,
        )
    _install(model, planned, ctl)
    return model


# Merge and back ---------------------------------------------------------------------------


def _adapted_kernels(model):
    """`[(owner, kernel name, kernel var, a var, b var, m var, norm var)]` for every
    adapted kernel (m and norm: DoRA's, None without)."""
    out = []
    for _, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        for v in list(vars(node).values()):
            if isinstance(v, nnx.Variable) and v.get_metadata(ROLE, None) == "a":
                kname = v.get_metadata(KERNEL)
                kids = [vars(node).get(kname + suffix(c)) for c in ("b", "m", "norm")]
                out.append((node, kname, getattr(node, kname), v, *kids))
    return out


def _owner_control(owner) -> Control:
    return vars(owner)[CONTROL]


def _fold(model, sign: int, keep: bool = False) -> None:
    """Merges (`sign` > 0) the kernels whose modules are not merged, or unmerges those
    that are; `keep` keeps each frozen kernel as it was, to be put back by unmerge."""
    where = {id(node): path for path, node in nnx.iter_graph(model)}
    quantized = [
        "/".join(str(x) for x in (*where.get(id(o), ()), k))
        for o, k, kernel, *_ in _adapted_kernels(model)
        if is_quantized(kernel.get_raw_value())
    ]
    if quantized:
        raise ValueError(
            f"jlora.nnx: the adapted kernels {quantized[:4]} are quantized; folding the "
            "update into their codes would round most of it away. jlora.dequantize(model) "
            "first (then merge), or jlora.save_merged(path, model) to write float kernels."
        )
    for owner, kname, kernel, a, b, m, norm in _adapted_kernels(model):
        ctl = _owner_control(owner)
        if ctl.merged == (sign > 0):
            continue  # (already so, e.g. a model merged on its own and attached)
        w = kernel.get_raw_value()
        kept = vars(owner).get(kname + KEPT_SUFFIX)
        if sign < 0 and isinstance(kept, Kept):
            kernel.set_raw_value(kept.get_raw_value())  # bit for bit
            delattr(owner, kname + KEPT_SUFFIX)
            continue
        lay, scale = a.get_metadata(LAYOUT), a.get_metadata(SCALE)
        dora = () if m is None else (m.get_raw_value(),)
        if m is not None and sign > 0:  # DoRA: the norm merge divides by, for unmerge
            norm.set_raw_value(
                _norm_of(
                    LoraWeight(w, a.get_raw_value(), b.get_raw_value(), *dora).replace(
                        scale=scale, layout=lay, norm=norm.get_raw_value()
                    )
                )
            )
        if m is not None and sign < 0:
            dora += (norm.get_raw_value(),)
        op = merge_kernel if sign > 0 else unmerge_kernel
        new = op(
            w,
            a.get_raw_value(),
            b.get_raw_value(),
            *dora,
            layout=lay,
            scale=scale,
            sharding=named_sharding_of(w),
        )
        if keep:
            setattr(owner, kname + KEPT_SUFFIX, Kept(w))
        kernel.set_raw_value(new)


def _merged_owners(model) -> tuple[int, int]:
    """`(merged, all)`: how many adapted kernels' modules are merged."""
    owners = [_owner_control(o).merged for o, *_ in _adapted_kernels(model)]
    return sum(owners), len(owners)


def merge(model: nnx.Module, *, keep: bool = True) -> nnx.Module:
    """Folds the adapters into the kernels in place, keeping the factors, so the model's
    call runs the plain kernels at base speed; `unmerge` takes it back for training.

    Each kernel becomes `w + scale * a @ b` in its dtype (accumulated in float32); a
    differentiated call of a merged model raises (its factors would get no gradient).

    Args:
      model: a model adapted by `jlora.nnx.apply`.
      keep: keep each frozen kernel beside its merged one (a `jlora.nnx.Kept`
        variable), so that `unmerge` puts it back bit for bit, as the checkpoints'
        base fingerprints expect; costs one copy of the adapted kernels while merged.
        With `keep=False`, `unmerge` subtracts the product again (the frozen kernel to
        the rounding of the kernel's dtype).

    Raises:
      ValueError: the model holds no adapters, or is merged already.
    """
    require_adapted(model, "jlora.nnx.merge")
    merged, n = _merged_owners(model)
    if merged == n:
        raise ValueError("jlora.nnx.merge: the model is merged already.")
    _fold(model, +1, keep)
    _set_merged(model, True)
    return model


def unmerge(model: nnx.Module) -> nnx.Module:
    """Takes `merge` back: each kernel is the frozen kernel again (bit for bit when
    `merge` kept it, else `merged - scale * a @ b` in float32), and calls run factored.

    Raises:
      ValueError: the model holds no adapters, or is not merged.
    """
    require_adapted(model, "jlora.nnx.unmerge")
    if _merged_owners(model)[0] == 0:
        raise ValueError("jlora.nnx.unmerge: the model is not merged.")
    _fold(model, -1)
    _set_merged(model, False)
    return model


def _set_merged(model, merged: bool) -> None:
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Control):
            node.merged = merged


def _unload(model) -> None:
    """Removes factors, trained marks, factored classes and the control, in place."""
    for owner, kname, *_ in _adapted_kernels(model):
        for c in CHILDREN[1:]:
            if kname + suffix(c.name) in vars(owner):
                delattr(owner, kname + suffix(c.name))
        if isinstance(vars(owner).get(kname + KEPT_SUFFIX), Kept):
            delattr(owner, kname + KEPT_SUFFIX)
    for _, node in list(nnx.iter_graph(model)):
        if not isinstance(node, nnx.Module) or isinstance(node, Control):
            continue
        for name, v in list(vars(node).items()):
            if isinstance(v, nnx.Variable) and v.get_metadata(TRAINED_MARK, False):
                meta = {k: m for k, m in v.get_metadata().items() if k != TRAINED_MARK}
                setattr(node, name, nnx.Param(v.get_raw_value(), **meta))
        if isinstance(vars(node).get(CONTROL), Control):
            delattr(node, CONTROL)
        if is_factored(node):
            _set_class(node, base_class(type(node)))


def merge_and_unload(model: nnx.Module) -> nnx.Module:
    """The serving model: every adapter folded into its kernel and everything jlora
    added removed, in place. The result is a plain model of the user's own classes
    (its call is the base model's call, at the same speed); trained leaves are plain
    `nnx.Param`s again. `nnx.clone(model)` first to keep the adapted one.

    Raises:
      ValueError: the model holds no adapters.
    """
    require_adapted(model, "jlora.nnx.merge_and_unload")
    _fold(model, +1)  # (the modules not merged yet)
    _unload(model)
    return model


# Other entry points that accept a model --------------------------------------------------


def model_probe(model, probe):
    """A probe of `model` (`probe(model)`) as a probe of its params."""
    if probe is None:
        return None
    graphdef, _, rest = nnx.split(base_like(model), nnx.Param, ...)

    def on_params(p):
        return probe(nnx.merge(graphdef, p, rest))

    return on_params


def base_like(model):
    """A plain copy of `model`'s structure (no adapters), for probes."""
    if not is_adapted(model):
        return model
    copy = nnx.clone(model)
    if require_adapted(copy, "jlora").merged:
        _fold(copy, -1)
    _unload(copy)
    return copy


def load_onto(model, load: Callable, fn_name: str) -> nnx.Module:
    """`load(base_of(model))` installed into `model`: the NNX form of a loader."""
    tree = load(base_of(model, fn_name))
    return install(model, tree, fn_name)


# A quantized base -----------------------------------------------------------------------


def quantize_model(model, kind, *, targets, block_size, double_quant):
    """`jlora.quantize` of an NNX model, in place: its kernel variables hold
    `jlora.Quantized` nodes, and the modules on the way to them run the factored call
    (which dequantizes each kernel at its use)."""
    fn_name = "jlora.quantize"
    require_module(model, fn_name)
    flat = [
        (p, v)
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if v.get_metadata(ROLE, None) is None and not v.get_metadata(TRAINED_MARK, False)
    ]
    state = _quant.quantize(
        nnx.from_flat_state(flat),
        kind,
        targets=targets,
        block_size=block_size,
        double_quant=double_quant,
    )
    nodes = _nodes(model)
    owners = []
    for path, v in nnx.to_flat_state(state):
        if is_quantized(v.get_raw_value()):
            owner = nodes.get(tuple(path[:-1]))
            if not _is_layer(owner):
                raise ValueError(
                    f"{fn_name}: {_path_str(path)} is held by a "
                    f"{type(owner).__name__}, not by a module attribute; keep kernels as "
                    "attributes of nnx.Module objects or leave it out (targets=)."
                )
            owners.append(tuple(path[:-1]))
    nnx.update(model, state)
    control = vars(model).get(CONTROL)
    if not isinstance(control, Control):
        control = Control(rngs=None, strict=False, stream="dropout")
    _install(model, ([], owners), control)
    return model


@functools.wraps(_quant.quantize)
def quantize(params, kind="nf4", *, targets=None, block_size=64, double_quant=True):
    # The public `jlora.quantize`: trees go to `_quant.quantize`, NNX models here.
    if isinstance(params, nnx.Module):
        if kind not in _quant.KINDS:
            raise ValueError(
                f"jlora.quantize: kind must be one of {_quant.KINDS}, got {kind!r}."
            )
        return quantize_model(
            params, kind, targets=targets, block_size=block_size, double_quant=double_quant
        )
    return _quant.quantize(
        params, kind, targets=targets, block_size=block_size, double_quant=double_quant
    )
