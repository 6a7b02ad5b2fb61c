"""Every touch of JAX internals, in one place.

jaxpr details move between JAX releases (`Primitive.get_bind_params` changed its return
in 0.10; the jit primitive was renamed from `pjit` to `jit`). The rest of jlora goes
through these helpers and the public API only.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.extend import core as jex_core

Literal = jex_core.Literal
ClosedJaxpr = jex_core.ClosedJaxpr
Jaxpr = jex_core.Jaxpr


def is_literal(v) -> bool:
    return isinstance(v, Literal)


def bind(eqn, invals: list[Any]):
    """Re-binds `eqn`'s primitive on new inputs; always returns a list of outputs."""
    got = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], dict):
        subfuns, params = got  # jax < 0.10
    else:
        subfuns, params = (), got
    out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def open_jaxpr(j) -> tuple[Any, list[Any]]:
    """`(jaxpr, consts)` of a `ClosedJaxpr` or an open `Jaxpr` (no consts)."""
    if isinstance(j, ClosedJaxpr):
        return j.jaxpr, list(j.consts)
    return j, []


# Primitive names as they appear in jaxprs, across the supported releases.
JIT_NAMES = ("jit", "pjit", "closed_call", "core_call")
REMAT_NAMES = ("remat2", "checkpoint", "remat")
CUSTOM_CALL_NAMES = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")


def call_jaxpr(eqn):
    """The inner jaxpr of a call-like equation (jit, closed_call, remat)."""
    for key in ("jaxpr", "call_jaxpr"):
        if key in eqn.params:
            return open_jaxpr(eqn.params[key])
    raise KeyError(f"no inner jaxpr in {eqn.primitive.name} params {list(eqn.params)}")


def scan_split(params) -> tuple[int, int]:
    """`(num_consts, num_carry)` of a scan equation.

    jax <= 0.10 stores them as params; jax 0.11 packs the operand groups into
    `ft_in = (consts, carry, xs)` flat trees, whose lengths are the counts.
    """
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    ft_in = params["ft_in"]
    parts = ft_in.unpack() if hasattr(ft_in, "unpack") else tuple(ft_in)
    return len(parts[0]), len(parts[1])


def is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


# Sharding -------------------------------------------------------------------------------


def explicit_axes(mesh) -> frozenset:
    """Names of `mesh`'s axes of type `Explicit` (none on releases without axis types)."""
    types = getattr(mesh, "axis_types", None)
    if types is None:
        return frozenset()
    explicit = getattr(jax.sharding.AxisType, "Explicit", None)
    return frozenset(n for n, t in zip(mesh.axis_names, types) if t == explicit)


def varying_axes(x) -> frozenset | None:
    """The manual mesh axes a value inside `shard_map` varies over (None: unknown)."""
    aval = jax.typeof(x) if hasattr(jax, "typeof") else None
    mat = getattr(aval, "mat", None)
    if mat is not None and hasattr(mat, "varying"):
        return frozenset(mat.varying)
    vma = getattr(aval, "vma", None)
    return None if vma is None else frozenset(vma)


def shard_map_call(eqn, body, in_specs, out_specs):
    """`jax.shard_map` of `body` with the mesh and options of a `shard_map` equation."""
    p = eqn.params
    manual = p.get("newly_manual_axes", p.get("manual_axes"))
    if manual is None and "auto" in p:  # older releases list the automatic axes
        manual = frozenset(p["mesh"].axis_names) - frozenset(p["auto"])
    kwargs = {"check_vma": p.get("check_vma", p.get("check_rep", True))}
    return jax.shard_map(
        body,
        mesh=p["mesh"],
        in_specs=tuple(in_specs),
        out_specs=tuple(out_specs),
        axis_names=frozenset(manual or ()),
        **kwargs,
    )


def shard_map_specs(eqn) -> tuple[tuple, tuple]:
    """`(in_specs, out_specs)` of a `shard_map` equation, as `PartitionSpec`s."""
    return tuple(eqn.params["in_specs"]), tuple(eqn.params["out_specs"])
