"""`init(key, params, config)`: wrap the targeted kernels with fresh factors."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jlora._boxes import box_child, box_factors, is_box, is_variable, rebox, unbox
from jlora._config import LoraConfig, start_kind
from jlora._probe import infer as infer_layouts
from jlora._sharding import factor_shardings, named_sharding_of, out_sharding
from jlora._targets import (
    LORA,
    TRAINED,
    compile_patterns,
    near_misses,
    path_key,
    path_matches,
    walk,
)
from jlora._weight import (
    CHILD,
    DEFAULT_LAYOUT,
    Layout,
    LoraWeight,
    Trainable,
    column_norm,
    low_rank_product,
)


def _leaf_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


# The leaf names that the default targets select: each framework's name for a Dense-like
# kernel (Flax `kernel`; Equinox's and PyTorch-style `weight`; Haiku's and gemma's `w`;
# penzai's `data_array`; gemma's feed-forward `gating_einsum` and `linear`).
KERNEL_NAMES = ("kernel", "weight", "w", "data_array", "gating_einsum", "linear")

# Leaf names whose framework fixes a 2-axis kernel's orientation: Flax's `Dense` stores
# its `kernel` `[in, out]` and `Embed` its `embedding` `[num_embeddings, features]`
# (the rows are the inputs of the lookup). Other names do not say (Equinox's `weight`
# is `[out, in]` in `Linear` but `[num_embeddings, dim]` in `Embedding`).
IN_OUT_NAMES = ("kernel", "embedding")


def is_default_target(path: str, value) -> bool:
    """Whether the default targets select the leaf: a floating leaf with >= 2 axes named
    as one of `KERNEL_NAMES`."""
    return _leaf_name(path) in KERNEL_NAMES and _is_float(value) and jnp.ndim(value) >= 2


def conventional_layout(path: str, ndim: int) -> Layout | None:
    """The layout a 2-axis kernel has by its framework's convention, where its leaf name
    says (`IN_OUT_NAMES`: `[in, out]`); None where it does not (read it off the model
    with a probe, or declare it)."""
    if ndim == 2 and _leaf_name(path) in IN_OUT_NAMES:
        return DEFAULT_LAYOUT
    return None


def orientation_advice(paths: list[str], probe_arg: str = "probe=") -> str:
    """How to decide the orientation of 2-axis kernels whose names do not say it."""
    show = paths[:5] + (["..."] if len(paths) > 5 else [])
    return (
        f"the orientation of the 2-axis kernels {show} is not given by their names (only "
        f"Flax's 'kernel' and 'embedding' are [in, out] by convention); pass {probe_arg} "
        "to read it off the model, or declare it, e.g. LoraConfig(layout={"
        f"{paths[0]!r}: jlora.Layout(in_axes=(1,), out_axes=(0,))}}) for a kernel stored "
        "[out, in] as Equinox's and PyTorch's Linear.weight is"
    )


def init(
    key: jax.Array,
    params: Any,
    config: LoraConfig,
    *,
    probe: Callable[[Any], Any] | None = None,
) -> Any:
    """Wraps each targeted kernel of `params` in a `LoraWeight` with fresh factors.

    Args:
      key: a PRNG key. Each path's factors use `key` folded with a CRC-32 of the path,
        so the result depends neither on tree order nor on the process.
      params: a Linen `params` dict (boxed with `nn.with_partitioning` or not), the
        `nnx.State` from `nnx.split`, or nested dicts/lists/tuples of arrays.
      config: a `LoraConfig`.
      probe: optional function of `params` (e.g.
        `lambda p: model.apply({"params": p}, x)`); when given, each target's input,
        output and stacked axes are read off how the function uses it. A `layout` in the
        config wins for the paths it matches (the probe does not read those).

    Orientation: a kernel's input, output and stacked axes come from the config's
    `layout` where it matches, else from the probe, else from the framework's
    convention where the leaf name gives one (Flax's 2-axis `kernel` and `embedding`
    are `[in, out]`). A 2-axis kernel with none of these (Equinox's `weight`, which is
    `[out, in]` in `Linear`, a plain `w`) is taken as `[in, out]` with a warning that
    names it and says how to decide; a kernel with more axes is an error.

    Returns:
      `params` with `LoraWeight` leaves at the targets and `Trainable` marks on the
      leaves `train_bias` / `also_train` select. With the default `init`, `merge` of
      the result equals `params` exactly.

    Raises:
      ValueError: a target that matches nothing (the closest paths are listed), no
        target selected by default (the leaves that could be meant are listed), a
        match on a non-floating or 1-axis leaf, a kernel with more than 2 axes and no
        layout, a rank larger than the kernel allows, params that are already adapted.
      TypeError: `config` is not a `LoraConfig`.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
      >>> lp = jlora.init(jax.random.key(0), params, jlora.LoraConfig(2, 4))
      >>> lp["dense"]["kernel"].a.shape, lp["dense"]["kernel"].b.shape
      ((4, 2), (2, 3))
    """
    return adapt(key, params, config, probe=probe)


def adapt(
    key: jax.Array,
    params: Any,
    config: LoraConfig,
    *,
    probe: Callable[[Any], Any] | None = None,
    known: dict[str, Layout] | None = None,
    caller: str = "jlora.init",
    probe_arg: str = "probe=",
) -> Any:
    """`init`'s work, for `init` and the NNX route: `known` gives the layouts a model's
    own modules fix (an `nnx.Linear`'s kernel, ...), used where neither the config nor
    the probe says; `caller` and `probe_arg` name the public call in messages."""
    known = known or {}
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"{caller}: config must be a jlora.LoraConfig, got {type(config).__name__}."
        )
    tree = walk(params)
    leaves = [(n.path, n.leaf) for n in tree.nodes]
    already = [n.path for n in tree.nodes if n.kind in (LORA, TRAINED)]
    if already:
        raise ValueError(
            f"{caller}: params are already adapted at {already[:5]}; call jlora.merge "
            "(or jlora.split) first, or init from the base params."
        )
    paths = [p for p, _ in leaves]
    targets = compile_patterns(config.targets, "LoraConfig.targets")
    exclude = compile_patterns(config.exclude, "LoraConfig.exclude")
    also = compile_patterns(config.also_train, "LoraConfig.also_train")
    errors: list[str] = []

    selected: dict[str, Any] = {}
    for path, leaf in leaves:
        value = unbox(leaf)
        boxed = is_box(leaf)
        if path_matches(exclude, path, boxed):
            continue
        if targets:
            if not path_matches(targets, path, boxed):
                continue
            if not _is_float(value) or jnp.ndim(value) < 2:
                errors.append(
                    f"  {path}: matched LoraConfig.targets but is "
                    f"{getattr(value, 'dtype', type(value).__name__)}"
                    f"{list(jnp.shape(value))}; only floating leaves with >= 2 axes can be "
                    "adapted. Narrow the regex (e.g. end it with 'kernel$') or add "
                    "exclude=."
                )
                continue
        elif not is_default_target(path, value):
            continue
        selected[path] = value
    for pattern in targets:
        if not any(path_matches((pattern,), p, is_box(leaf)) for p, leaf in leaves):
            errors.append(
                f"  LoraConfig.targets pattern {pattern.pattern!r} matches no leaf; "
                f"closest paths: {near_misses(pattern.pattern, paths)}"
            )
    if not selected and not errors:
        candidates = [
            f"{p} {list(jnp.shape(unbox(leaf)))}"
            for p, leaf in leaves
            if _is_float(unbox(leaf)) and jnp.ndim(unbox(leaf)) >= 2
        ]
        errors.append(
            "  no leaf was selected for adaptation (the default selects floating leaves "
            f"with >= 2 axes named {' / '.join(KERNEL_NAMES)}); the floating leaves with "
            f">= 2 axes are: {candidates[:12]}{' ...' if len(candidates) > 12 else ''}. "
            "Pass targets= (a regex over these paths)."
            if candidates
            else "  no leaf was selected for adaptation: the params hold no floating leaf "
            f"with >= 2 axes; paths: {paths[:8]}"
        )

    # A layout declared in the config wins: the probe reads only the other targets.
    undeclared = {p for p in selected if config.layout_for(p) is None}
    probed = infer_layouts(probe, params, undeclared) if probe is not None else {}
    layouts: dict[str, Layout] = {}
    unoriented: list[str] = []
    for path, value in selected.items():
        layout = config.layout_for(path) or probed.get(path) or known.get(path)
        if layout is None:
            if value.ndim != 2:
                errors.append(
                    f"  {path}: kernel of shape {list(value.shape)} has {value.ndim} axes; "
                    f"pass {probe_arg} to {caller} to read which are inputs, outputs and "
                    "stacked off the model, or declare them: "
                    + _layout_hint(path, tuple(value.shape))
                )
                continue
            layout = conventional_layout(path, value.ndim)
            if layout is None:
                unoriented.append(path)
                layout = DEFAULT_LAYOUT
        try:
            fused = config.fused_for(path)
            layout = layout.with_fused(fused).normalized(value.ndim)
        except ValueError as e:
            errors.append(f"  {path}: {e}")
            continue
        rank = config.rank_for(path)
        limit = min(layout.fan_in(value.shape), layout.fan_out(value.shape))
        if fused is not None:
            size = value.shape[layout.fused.axis]
            if size % fused.parts:
                errors.append(
                    f"  {path}: {fused} cuts axis {layout.fused.axis} of kernel "
                    f"{list(value.shape)} into {fused.parts} parts, but {size} is not a "
                    "multiple of it; fix LoraConfig.fused."
                )
                continue
            limit = min(limit, layout.fan_out(value.shape) // fused.parts)
        if rank > limit:
            errors.append(
                f"  {path}: rank {rank} exceeds min(fan_in, fan_out) = {limit} for kernel "
                f"{list(value.shape)} ({layout}); lower rank or set rank_pattern."
            )
            continue
        if config.use_dora and layout.fused is not None:
            errors.append(
                f"  {path}: use_dora with {layout.fused}: the magnitude would also "
                "rescale the parts left unadapted (PEFT has no such module); adapt the "
                "whole kernel, or one kernel per part"
            )
            continue
        if start_kind(config.init)[0] in ("pissa", "olora"):
            why = (
                "it is quantized: decompose the float kernel, then quantize the "
                "residual (jlora.init before jlora.quantize)"
                if hasattr(value, "block_size")
                else f"its layout adapts parts of a fused axis ({layout.fused}); adapt "
                "the whole kernel, or split it into one kernel per part"
                if layout.fused is not None
                else None
            )
            if why:
                errors.append(f"  {path}: init={config.init!r} can't start here: {why}")
                continue
        blocked = getattr(value, "axis", None) if hasattr(value, "block_size") else None
        if blocked is not None and blocked % value.ndim in layout.stack_axes:
            errors.append(
                f"  {path}: this quantized kernel {list(value.shape)} is blocked along "
                f"axis {blocked % value.ndim}, a stacked axis of its layout ({layout}), "
                "so a layer would not slice out of it; adapt the float kernel and "
                "quantize after jlora.init (quantize skips stacked axes), or re-quantize "
                "with a block_size that divides an input or output axis."
            )
            continue
        layouts[path] = layout

    trainable = set()
    adapted_parents = {_parent(p) for p in layouts}
    for path, leaf in leaves:
        if path in selected:
            continue
        name = _leaf_name(path)
        if config.train_bias == "all" and name == "bias":
            trainable.add(path)
        elif config.train_bias == "lora_only" and name == "bias":
            if _parent(path) in adapted_parents:
                trainable.add(path)
        if path_matches(also, path, is_box(leaf)):
            trainable.add(path)
    for pattern in also:
        if not any(path_matches((pattern,), p, is_box(leaf)) for p, leaf in leaves):
            errors.append(
                f"  LoraConfig.also_train pattern {pattern.pattern!r} matches no leaf; "
                f"closest paths: {near_misses(pattern.pattern, paths)}"
            )
    if errors:
        raise ValueError(f"{caller}: cannot adapt these params:\n" + "\n".join(errors))
    if unoriented:
        warnings.warn(
            f"{caller}: taking these kernels as [in, out]; "
            + orientation_advice(unoriented, probe_arg)
            + ". (The math is exact either way, but `a` then sits on the output side and "
            "a PEFT export is transposed.)",
            stacklevel=3,
        )

    out = []
    for path, leaf in leaves:
        if path in layouts:
            out.append(_wrap(key, path, leaf, layouts[path], config))
        elif path in trainable:
            out.append(_mark(leaf))
        else:
            out.append(leaf)
    return tree.rebuild(out)


def likely_layouts(shape: tuple[int, ...]) -> list[Layout]:
    """What a kernel of `shape` most likely is, most likely first (for messages).

    A projection between a flat axis and a (heads, head_dim) pair has the flat size
    equal to the pair's product: `[d, h, k]` (query/key/value, `d = h * k`) or
    `[h, k, d]` (the output projection). Otherwise a leading axis is most likely a
    stack of layers (`nn.scan`, a `[L, in, out]` stack). The probe reads the truth off
    the model.
    """
    n = len(shape)
    out = []
    for split in range(1, n):
        if shape[:split] and np.prod(shape[:split]) == np.prod(shape[split:]):
            out.append(Layout(tuple(range(split)), tuple(range(split, n))))
    stacked = Layout(tuple(range(1, n - 1)), (n - 1,), (0,))
    if out:
        return out + [stacked]
    return [stacked, Layout(tuple(range(n - 1)), (n - 1,))]


def _layout_hint(path: str, shape: tuple[int, ...]) -> str:
    layouts = likely_layouts(shape)

    def show(lay):
        stack = f", stack_axes={lay.stack_axes}" if lay.stack_axes else ""
        return f"jlora.Layout(in_axes={lay.in_axes}, out_axes={lay.out_axes}{stack})"

    first, *rest = layouts
    text = f"most likely LoraConfig(layout={{{path!r}: {show(first)}}})"
    if rest:
        text += " (or " + ", or ".join(show(lay) for lay in rest) + ")"
    return text


def _mark(leaf):
    if is_variable(leaf):
        return rebox(leaf, Trainable(unbox(leaf)))
    return Trainable(leaf)


def _factors(key, path, w, layout: Layout, config: LoraConfig):
    """Fresh `(a, b)` for kernel `w`, created straight into the shardings its own
    implies (`a` on its input axes, `b` on its outputs): no factor is ever whole on one
    device, and on several processes each creates only its own shards."""
    rank = config.rank_for(path)
    if layout.fused is not None:  # a rank-`rank` pair per adapted part
        rank *= len(layout.fused.adapt)
    a_shape, b_shape = layout.factor_shapes(w.shape, rank)
    dtype = config.factor_dtype
    embedding = _leaf_name(path) == "embedding"
    bound = 1.0 / (layout.fan_in(w.shape) ** 0.5)

    def make(key):
        ka, kb = jax.random.split(key)
        if embedding:  # the reference embedding adapter: `a` zeros, `b` standard normal
            return jnp.zeros(a_shape, dtype), jax.random.normal(kb, b_shape, dtype)
        if config.init == "gaussian":
            a = jax.random.normal(ka, a_shape, dtype) / rank
        else:  # Kaiming-uniform with a = sqrt(5): gain^2 = 2/6, bound = 1/sqrt(fan_in)
            a = jax.random.uniform(ka, a_shape, dtype, -bound, bound)
        return a, jnp.zeros(b_shape, dtype)

    shardings = factor_shardings(w, layout)
    if shardings[0] is None:
        return make(path_key(key, path))
    return jax.jit(make, out_shardings=shardings)(path_key(key, path))


def _magnitude(w, layout: Layout):
    """DoRA's starting magnitude: the kernel's norm over its input axes (`[*stack,
    *out]`, float32, placed as the kernel's stacked and output axes), and a copy of
    it as the cached norm (at init `b` is zero, so the norm of `w + scale * a @ b` is
    the kernel's own)."""
    def norms(w):
        w = w.dequantize() if getattr(type(w), "_jlora_leaf", False) else w
        return column_norm(w, None, None, layout, 0.0)  # (no update: the kernel's own)

    sharding = out_sharding(w.codes if hasattr(w, "codes") else w, layout)
    m = jax.jit(norms, out_shardings=sharding)(w)
    return m, jnp.array(m, copy=True)


def _matrices(w, layout: Layout):
    """`w` as `[*stack, fan_in, fan_out]` float32 matrices (inputs and outputs in
    layout order), and the inverse."""
    order = layout.stack_axes + layout.in_axes + layout.out_axes
    stack = [w.shape[i] for i in layout.stack_axes]
    ins = [w.shape[i] for i in layout.in_axes]
    outs = [w.shape[i] for i in layout.out_axes]
    mats = jnp.transpose(w.astype(jnp.float32), order).reshape(
        stack + [int(np.prod(ins)), int(np.prod(outs))]
    )

    def factors(u, v):  # [*stack, fan_in, r], [*stack, r, fan_out] -> a, b
        r = u.shape[-1]
        return u.reshape(stack + ins + [r]), v.reshape(stack + [r] + outs)

    return mats, factors


def _randomized_svd(key, x, rank: int, niter: int):
    """`(u, s, vh)` of rank `rank` of `x` (`[p, q]`) by subspace iteration (Halko,
    Martinsson and Tropp 2011, Algorithm 4.4) with `niter` iterations."""
    omega = jax.random.normal(key, (x.shape[1], rank), x.dtype)
    q = jnp.linalg.qr(x @ omega)[0]
    for _ in range(niter):
        q = jnp.linalg.qr(x @ jnp.linalg.qr(x.T @ q)[0])[0]
    u, s, vh = jnp.linalg.svd(q.T @ x, full_matrices=False)
    return q @ u, s, vh


def _decomposed(key, path, w, layout: Layout, config: LoraConfig):
    """PiSSA's or OLoRA's `(a, b, residual kernel)` for kernel `w` (see
    `LoraConfig.init`), per layer of a stacked kernel, computed in float32."""
    kind, niter = start_kind(config.init)
    rank = config.rank_for(path)
    scale = config.scale_for(path)
    dtype = config.factor_dtype
    mats, factors = _matrices(w, layout)
    lead = mats.shape[:-2]
    flat = mats.reshape((-1,) + mats.shape[-2:])
    if kind == "olora":  # PEFT's: the QR of the [out, in] matrix, b = Q_r^T, a = R_r^T
        q, r = jax.vmap(jnp.linalg.qr)(jnp.swapaxes(flat, -1, -2))
        u, v = jnp.swapaxes(r[:, :rank], -1, -2), jnp.swapaxes(q[:, :, :rank], -1, -2)
    else:
        if niter is None:
            u, s, vh = jax.vmap(lambda m: jnp.linalg.svd(m, full_matrices=False))(flat)
        else:
            keys = jax.random.split(path_key(key, path), flat.shape[0])
            u, s, vh = jax.vmap(lambda k, m: _randomized_svd(k, m, rank, niter))(keys, flat)
        root = jnp.sqrt(s[:, :rank] / scale)
        u, v = u[:, :, :rank] * root[:, None, :], root[:, :, None] * vh[:, :rank]
    u = u.reshape(lead + u.shape[1:])
    v = v.reshape(lead + v.shape[1:])
    a, b = factors(u, v)
    a, b = a.astype(dtype), b.astype(dtype)
    residual = w.astype(jnp.float32) - low_rank_product(a, b, layout, scale)
    return a, b, residual.astype(w.dtype)


def _wrap(key, path, leaf, layout, config):
    w = unbox(leaf)
    a0 = b0 = None
    kind, _ = start_kind(config.init)
    if kind in ("pissa", "olora"):
        sharding = named_sharding_of(w)
        shardings = factor_shardings(w, layout)
        fn = functools.partial(_decomposed, path=path, layout=layout, config=config)
        w_in = w
        if sharding is not None:
            # The decomposition runs on a replicated copy of the kernel (an SVD or QR
            # needs its matrix whole); each result is placed as its kernel implies.
            replicated = NamedSharding(sharding.mesh, PartitionSpec())
            w_in = jax.device_put(w, replicated)
            fn = jax.jit(fn, out_shardings=(*shardings, sharding))
        a, b, residual = fn(key, w=w_in)
        a0, b0 = jnp.array(a, copy=True), jnp.array(b, copy=True)
        m = norm = None
        if config.use_dora:
            m, norm = _magnitude(w, layout)  # (the norm of the original kernel)
        w = residual
        if is_box(leaf) and not is_variable(leaf):
            leaf = rebox(leaf, residual)
    else:
        a, b = _factors(key, path, w, layout, config)
        m = norm = None
        if config.use_dora:
            m, norm = _magnitude(w, layout)
    meta_kw = dict(
        scale=config.scale_for(path), layout=layout, dropout=float(config.dropout)
    )
    extra = dict(m=m, norm=norm, a0=a0, b0=b0)
    if is_variable(leaf):
        return rebox(leaf, LoraWeight(w, a, b, **extra, **meta_kw))
    if is_box(leaf):
        extra = {
            k: None if v is None else box_child(leaf, v, layout, CHILD[k].axes)
            for k, v in extra.items()
        }
        return LoraWeight(leaf, *box_factors(leaf, a, b, layout), **extra, **meta_kw)
    return LoraWeight(w, a, b, **extra, **meta_kw)
