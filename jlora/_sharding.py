"""Adapter shardings from the kernel's: `a` follows its input axes, `b` its outputs.

A kernel sharded as `P(*spec)` gives `a: [*stack, *in, r]` the kernel's entries for the
stacked and input axes and an unsharded rank axis, and `b: [*stack, r, *out]` the
stacked and output entries. `x @ a` then needs exactly the collectives `x @ W` needs
for its contraction, and `(x @ a) @ b` produces the layout `x @ W` produces; no
collective ever moves a full `[in, out]` kernel.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jlora import _nnx_state
from jlora._boxes import unbox
from jlora._jax_compat import explicit_axes, is_tracer, spec_entries
from jlora._targets import LEAF, LORA, TRAINED, walk
from jlora._weight import CHILD, Layout, Trainable, child_axes, extra_children


def is_quantized(x) -> bool:
    """A `jlora.Quantized` kernel (by its marks: `_quant` imports this module's users)."""
    return getattr(type(x), "_jlora_leaf", False) and hasattr(x, "specs")


def factor_specs(kernel_spec, ndim: int, layout: Layout, unconstrained=()):
    """`(a_spec, b_spec)` from a kernel's `PartitionSpec` (None: replicated).

    `unconstrained` lists kernel axes left to the compiler (`P.UNCONSTRAINED` in a
    sharding constraint); the factors' matching axes are left unconstrained too. The
    rank axis is always replicated.
    """
    spec = spec_entries(kernel_spec)
    spec = spec + (None,) * (ndim - len(spec))
    spec = tuple(
        PartitionSpec.UNCONSTRAINED if i in set(unconstrained) else e
        for i, e in enumerate(spec)
    )
    a = PartitionSpec(*(spec[i] for i in layout.stack_axes + layout.in_axes), None)
    b = PartitionSpec(
        *(spec[i] for i in layout.stack_axes), None, *(spec[i] for i in layout.out_axes)
    )
    return a, b


def child_spec(kernel_spec, ndim: int, layout: Layout, axes: str):
    """The `PartitionSpec` of a `LoraWeight` child whose axes are of kind `axes` (see
    `jlora._weight.CHILDREN`): the kernel's entries for the kernel axes it holds, the
    rank replicated."""
    spec = spec_entries(kernel_spec)
    spec = spec + (None,) * (ndim - len(spec))
    return PartitionSpec(
        *(None if k is None else spec[k] for k in child_axes(layout, axes))
    )


def child_sharding(w, layout: Layout, axes: str):
    """The `NamedSharding` of a child of kind `axes` of kernel `w`, or None."""
    sharding = named_sharding_of(w)
    if sharding is None:
        return None
    spec = child_spec(sharding.spec, len(w.shape), layout, axes)
    return NamedSharding(sharding.mesh, spec)


def out_spec(kernel_spec, ndim: int, layout: Layout):
    """The `PartitionSpec` of a `[*stack, *out]` child (DoRA's `m` and `norm`)."""
    return child_spec(kernel_spec, ndim, layout, "out")


def out_sharding(w, layout: Layout):
    """The `NamedSharding` of a `[*stack, *out]` child of kernel `w`, or None."""
    return child_sharding(w, layout, "out")


def named_sharding_of(x):
    """`x`'s `NamedSharding`, if it is a concrete (or abstract) array that has one."""
    if is_tracer(x):
        return None
    sharding = getattr(x, "sharding", None)
    return sharding if isinstance(sharding, NamedSharding) else None


def factor_shardings(w, layout: Layout):
    """`(a_sharding, b_sharding)` for kernel `w`, or `(None, None)` if it has none."""
    sharding = named_sharding_of(w)
    if sharding is None:
        return None, None
    a, b = factor_specs(sharding.spec, len(w.shape), layout)
    return NamedSharding(sharding.mesh, a), NamedSharding(sharding.mesh, b)


def _spec_of(x):
    if isinstance(x, PartitionSpec):
        return x
    sharding = named_sharding_of(x)
    return sharding.spec if sharding is not None else PartitionSpec()


def _walk_with_specs(params, base_specs, fn_name: str):
    """`(walk of params, {path: spec} from base_specs or None)`."""
    params = _nnx_state.as_params(params, fn_name)
    given = None
    if base_specs is not None:
        given = {n.path: n.value for n in walk(base_specs, keep_none=True).nodes}
    return walk(params), given


def adapter_specs(params: Any, base_specs: Any = None, *, adapter_axis=None) -> Any:
    """The `PartitionSpec` tree of `jlora.split(params)[0]` (the adapters).

    For `jax.jit(step, in_shardings=..., out_shardings=...)`. Kernel specs come from
    `base_specs` (a tree of `PartitionSpec` over the base params, e.g.
    `nn.get_partition_spec(variables)` after `nn.logical_to_mesh`) when given, else
    from the shardings of the kernels in `params` (concrete or abstract arrays).

    Args:
      params: adapted params (concrete, or abstract from `jax.eval_shape`), or an NNX
        model adapted by `jlora.nnx.apply`.
      base_specs: optional `PartitionSpec` tree with the base params' structure.
      adapter_axis: for a stacked set (`jlora.stack_adapters`, combined with its
        base): the mesh axis (or axes) its leading adapter axis is sharded over;
        default None, replicated.

    Returns:
      a tree with the adapters' structure: `LoraWeight(None, a_spec, b_spec)`
        (with DoRA, `m` and `norm` specs from the kernel's stacked and output axes),
      `Trainable(spec)`, and `None` elsewhere.

    Raises:
      ValueError: `base_specs` lacks the path of an adapted or trained leaf.

    Example::

      specs = jlora.adapter_specs(params)
      shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    """
    tree, given = _walk_with_specs(params, base_specs, "jlora.adapter_specs")
    out, missing = [], []
    for node in tree.nodes:
        if node.kind not in (LORA, TRAINED):
            out.append(None)
            continue
        if given is not None and node.path not in given:
            missing.append(node.path)
            out.append(None)
            continue
        if node.kind == LORA:
            w = unbox(node.value.w)
            kernel_spec = given[node.path] if given is not None else _spec_of(w)
            if is_quantized(kernel_spec):  # (base_specs' node of specs: its codes')
                kernel_spec = kernel_spec.codes
            a, b = factor_specs(kernel_spec, len(w.shape), node.value.layout)
            extra = {  # (DoRA's m and norm: the kernel's stacked and output axes)
                name: child_spec(
                    kernel_spec, len(w.shape), node.value.layout, CHILD[name].axes
                )
                for name in extra_children(node.value)
            }
            if node.value.stack is not None:  # the leading adapter axis
                a = PartitionSpec(adapter_axis, *spec_entries(a))
                b = PartitionSpec(adapter_axis, *spec_entries(b))
                extra = {
                    k: PartitionSpec(adapter_axis, *spec_entries(v))
                    for k, v in extra.items()
                }
            new = node.value.replace(w=None, a=a, b=b, **extra)
            out.append(node.put_back(new))
        else:
            value = unbox(node.value.value)
            spec = given[node.path] if given is not None else _spec_of(value)
            out.append(node.put_back(Trainable(spec or PartitionSpec())))
    if missing:
        raise ValueError(
            f"jlora.adapter_specs: base_specs has no spec for {missing}; pass the spec "
            "tree of the base params (same paths)."
        )
    return tree.rebuild(out)


def base_specs(params: Any, base_specs: Any = None, *, mesh=None) -> Any:
    """The `PartitionSpec` tree of `jlora.split(params)[1]` (the frozen base): the twin
    of `adapter_specs`, for a step's `in_shardings` when the base is quantized.

    Each plain leaf takes its spec (from `base_specs` when given, else from its own
    sharding); a `jlora.Quantized` kernel becomes a `Quantized` node of specs (codes
    and absmaxes sharded as the kernel, axis for axis; see `Quantized.specs`); a
    trained leaf (`Trainable`, in the adapters) gives `None`.

    Args:
      params: adapted and/or quantized params (concrete, or abstract from
        `jax.eval_shape`), or an NNX model.
      base_specs: optional `PartitionSpec` tree over the float base params (same paths;
        a kernel's spec stands for its quantized node).
      mesh: the mesh the specs are for (default: the arrays' own, else the mesh of
        `jax.set_mesh`): an axis of a quantized node's array that its mesh axes do not
        divide (the absmaxes of a short blocked axis) is left replicated.

    Returns:
      a tree with the structure of `jlora.split(params)[1]`.

    Raises:
      ValueError: `base_specs` lacks the path of a leaf of the base.

    Example::

      adapters, base = jlora.split(jlora.quantize(params, "nf4"))
      step = jax.jit(step, in_shardings=(jax.tree.map(named, jlora.adapter_specs(p)),
                                         jax.tree.map(named, jlora.base_specs(p))))
    """
    tree, given = _walk_with_specs(params, base_specs, "jlora.base_specs")
    out, missing = [], []
    for node in tree.nodes:
        if node.kind == TRAINED:
            out.append(None)
            continue
        if node.kind not in (LORA, LEAF):
            out.append(None)
            continue
        w = unbox(node.value.w) if node.kind == LORA else unbox(node.value)
        if given is not None and node.path not in given:
            missing.append(node.path)
            out.append(None)
            continue
        spec = given[node.path] if given is not None else _spec_of(w)
        if is_quantized(w):
            spec = w.specs(spec, mesh)
        out.append(spec or PartitionSpec())
    if missing:
        raise ValueError(
            f"jlora.base_specs: base_specs has no spec for {missing}; pass the spec "
            "tree of the base params (same paths)."
        )
    return tree.rebuild(out)


def _spec_axes(spec) -> set:
    names = set()
    for entry in spec:
        if isinstance(entry, str):
            names.add(entry)
        elif isinstance(entry, tuple):
            names.update(entry)
    return names


def constrain(x, sharding):
    """`x` placed on `sharding`: resharded where the spec names `Explicit` mesh axes
    (there a sharding constraint only asserts), constrained otherwise; a concrete
    array is put there directly (on the mesh in context if `sharding`'s is abstract)."""
    if sharding is None:
        return x
    if not isinstance(sharding, NamedSharding):
        return jax.lax.with_sharding_constraint(x, sharding)
    if not is_tracer(x):
        mesh = sharding.mesh
        if not isinstance(mesh, jax.sharding.Mesh):
            mesh = jax.sharding.get_mesh()
        spec = PartitionSpec(
            *(None if e is PartitionSpec.UNCONSTRAINED else e for e in sharding.spec)
        )
        return jax.device_put(x, NamedSharding(mesh, spec))
    if _spec_axes(sharding.spec) & explicit_axes(sharding.mesh):
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)
