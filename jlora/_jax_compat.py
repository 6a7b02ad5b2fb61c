"""Every touch of JAX internals, in one place.

jaxpr details move between JAX releases (`Primitive.get_bind_params` changed its return
in 0.10; the jit primitive was renamed from `pjit` to `jit`; scan's operand counts moved
into `ft_in` in 0.11). The rest of jlora reads equations only through the accessors
below (each names the parameter keys it reads) and otherwise uses JAX's public API.
Supported: the JAX 0.9 and 0.10 series (tested in CI) and 0.11 (tested earlier on a
GPU).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from jax._src import core as _jax_core
from jax.extend import core as jex_core

Literal = jex_core.Literal
ClosedJaxpr = jex_core.ClosedJaxpr
Jaxpr = jex_core.Jaxpr

# Primitive names as they appear in jaxprs, across the supported releases.
JIT_NAMES = ("jit", "pjit", "closed_call", "core_call")
REMAT_NAMES = ("remat2", "checkpoint", "remat")
CUSTOM_CALL_NAMES = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")


# Values and equations -------------------------------------------------------------------


def is_literal(v) -> bool:
    return isinstance(v, Literal)


def is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def is_differentiated(x) -> bool:
    """Whether `x` is being differentiated: a tracer of forward-mode AD or of the
    linearization `grad`/`vjp` run (JAX names these traces' tracers `JVPTracer` and
    `LinearizeTracer`)."""
    while isinstance(x, jax.core.Tracer):
        if type(x).__name__ in ("JVPTracer", "LinearizeTracer"):
            return True
        x = getattr(x, "primal", None) if hasattr(x, "primal") else None
    return False


def at_top_level() -> bool:
    """Whether no transformation (`jit`, `grad`, `vmap`, ...) is tracing: an eager call."""
    ctx = getattr(_jax_core, "trace_ctx", None)
    if ctx is not None and hasattr(ctx, "is_top_level"):
        return ctx.is_top_level()
    return _jax_core.trace_state_clean()  # pragma: no cover - older releases


def primitive_name(eqn) -> str:
    return eqn.primitive.name


def var_shape(v) -> tuple[int, ...]:
    """The shape of a jaxpr variable (from its aval)."""
    return tuple(v.aval.shape)


def bind(eqn, invals: list[Any]):
    """Re-binds `eqn`'s primitive on new inputs; always returns a list of outputs.

    An input whose type has a `_jlora_bind(eqn, invals)` hook (a quantized kernel,
    dequantized at its use) answers for the equation instead."""
    for v in invals:
        hook = getattr(type(v), "_jlora_bind", None)
        if hook is not None:
            return hook(eqn, invals)
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


# The evaluation loop: what `jax.core.eval_jaxpr` keeps per equation -------------------


def _source_info(name):
    try:
        from jax._src import source_info_util

        return getattr(source_info_util, name)
    except ImportError:  # pragma: no cover - a release without it
        return None


_user_context = _source_info("user_context")
_current_name_stack = _source_info("current_name_stack")


class _NoContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NO_CONTEXT = _NoContext()


def equation_context(eqn):
    """The source info (traceback, name stack) and context (compute type, metadata,
    mesh) an equation was traced under, as `eval_jaxpr` restores them, so the ops a
    rule emits carry the model's names (`up/dot_general`) into HLO and profiles.

    Two context managers, to enter together: `with a, b:`.
    """
    info = getattr(eqn, "source_info", None)
    if info is None or _user_context is None:
        source = _NO_CONTEXT
    else:
        name_stack = _current_name_stack() + info.name_stack
        source = _user_context(info.traceback, name_stack=name_stack)
    manager = getattr(getattr(eqn, "ctx", None), "manager", None)
    return source, (_NO_CONTEXT if manager is None else manager)


def last_used(jaxpr) -> dict:
    """`{var: the last equation that reads it}` (JAX's own bookkeeping, if present)."""
    fn = getattr(_jax_core, "last_used", None)
    return fn(jaxpr) if fn is not None else {}


def drop_dead(eqn, env: dict, last: dict) -> None:
    """Forgets the values whose last reader was `eqn`, so an eager interpretation holds
    no more intermediates than JAX's own evaluation does."""
    fn = getattr(_jax_core, "clean_up_dead_vars", None)
    if fn is not None and last:
        fn(eqn, env, last)


# Parameters, primitive by primitive ---------------------------------------------------


class DotOptions(NamedTuple):
    dimension_numbers: tuple  # ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))
    precision: Any
    preferred_element_type: Any
    out_sharding: Any  # None unless the dot names one (explicit-axis meshes)


def dot_options(eqn) -> DotOptions:
    p = eqn.params
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    dims = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    return DotOptions(
        dims, p.get("precision"), p.get("preferred_element_type"), p.get("out_sharding")
    )


def transpose_permutation(eqn) -> tuple[int, ...]:
    return tuple(eqn.params["permutation"])


def squeeze_dimensions(eqn) -> tuple[int, ...]:
    return tuple(eqn.params["dimensions"])


def reshape_sizes(eqn) -> tuple[int, ...] | None:
    """The new shape of a plain reshape (None: one that also permutes, or is dynamic)."""
    if eqn.params.get("dimensions") is not None or len(eqn.invars) != 1:
        return None
    return tuple(eqn.params["new_sizes"])


def broadcast_params(eqn) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """`(shape, broadcast_dimensions)` of a static broadcast (None: a dynamic one)."""
    if len(eqn.invars) != 1:
        return None
    return tuple(eqn.params["shape"]), tuple(eqn.params["broadcast_dimensions"])


def slice_params(eqn) -> tuple[tuple, tuple, tuple | None]:
    """`(start_indices, limit_indices, strides)` of a static slice."""
    p = eqn.params
    strides = p.get("strides")
    return tuple(p["start_indices"]), tuple(p["limit_indices"]), strides


def dynamic_slice_sizes(eqn) -> tuple[int, ...]:
    return tuple(eqn.params["slice_sizes"])


def split_params(eqn) -> tuple[tuple[int, ...], int]:
    """`(sizes, axis)` of a `split`: its outputs' sizes along `axis`, in order."""
    return tuple(int(n) for n in eqn.params["sizes"]), int(eqn.params["axis"])


def concatenate_axis(eqn) -> int:
    return int(eqn.params["dimension"])


class GatherOptions(NamedTuple):
    dimension_numbers: Any  # jax.lax.GatherDimensionNumbers
    slice_sizes: tuple
    indices_are_sorted: bool
    unique_indices: bool
    mode: Any
    fill_value: Any


def gather_options(eqn) -> GatherOptions:
    p = eqn.params
    return GatherOptions(
        p["dimension_numbers"],
        tuple(p["slice_sizes"]),
        p["indices_are_sorted"],
        p["unique_indices"],
        p["mode"],
        p["fill_value"],
    )


class ConvOptions(NamedTuple):
    dimension_numbers: Any  # jax.lax.ConvDimensionNumbers: lhs_spec, rhs_spec, out_spec
    feature_group_count: int
    batch_group_count: int


def conv_options(eqn) -> ConvOptions:
    p = eqn.params
    return ConvOptions(
        p["dimension_numbers"], p["feature_group_count"], p["batch_group_count"]
    )


def sharding_constraint_params(eqn) -> tuple[Any, tuple[int, ...]]:
    """`(sharding, unconstrained_dims)` of a `sharding_constraint`."""
    return eqn.params["sharding"], tuple(eqn.params.get("unconstrained_dims", ()))


def reshard_sharding(eqn):
    return eqn.params["dst_sharding"]


def call_jaxpr(eqn):
    """The inner jaxpr of a call-like equation (jit, closed_call, remat, custom calls,
    shard_map), with its consts."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            return open_jaxpr(eqn.params[key])
    raise KeyError(f"no inner jaxpr in {eqn.primitive.name} params {list(eqn.params)}")


def passthrough(jaxpr) -> dict[int, int]:
    """`{output position: input position}` for the outputs of an open jaxpr that are
    its inputs unchanged (an NNX transform returns the state it was given)."""
    where = {v: i for i, v in enumerate(jaxpr.invars)}
    return {
        j: where[v] for j, v in enumerate(jaxpr.outvars) if not is_literal(v) and v in where
    }


class JitOptions(NamedTuple):
    """What a `jit` equation was called with (None where a sharding is unspecified)."""

    name: str
    in_shardings: tuple
    out_shardings: tuple
    donated: tuple
    keep_unused: bool
    inline: bool
    compiler_options: dict


def _specified(s):
    return None if s is None or type(s).__name__ == "UnspecifiedValue" else s


def jit_options(eqn) -> JitOptions:
    p = eqn.params
    n_in, n_out = len(eqn.invars), len(eqn.outvars)
    return JitOptions(
        name=p.get("name", "jit"),
        in_shardings=tuple(_specified(x) for x in p.get("in_shardings", (None,) * n_in)),
        out_shardings=tuple(_specified(x) for x in p.get("out_shardings", (None,) * n_out)),
        donated=tuple(p.get("donated_invars", (False,) * n_in)),
        keep_unused=bool(p.get("keep_unused", False)),
        inline=bool(p.get("inline", False)),
        compiler_options=dict(p.get("compiler_options_kvs", ())),
    )


def remat_options(eqn) -> tuple[bool, Any]:
    """`(prevent_cse, policy)` of a remat equation."""
    return eqn.params.get("prevent_cse", True), eqn.params.get("policy")


def cond_branches(eqn) -> list[tuple[Any, list[Any]]]:
    """`[(jaxpr, consts)]` of each branch; the operands after the index feed each."""
    return [open_jaxpr(b) for b in eqn.params["branches"]]


class WhileParts(NamedTuple):
    cond_nconsts: int
    body_nconsts: int
    cond: tuple  # (jaxpr, consts)
    body: tuple


def while_parts(eqn) -> WhileParts:
    p = eqn.params
    return WhileParts(
        p["cond_nconsts"],
        p["body_nconsts"],
        open_jaxpr(p["cond_jaxpr"]),
        open_jaxpr(p["body_jaxpr"]),
    )


class ScanParts(NamedTuple):
    num_consts: int
    num_carry: int
    body: tuple  # (jaxpr, consts)
    length: int
    reverse: bool
    unroll: Any


def scan_parts(eqn) -> ScanParts:
    """A scan's operand groups `(consts, carry, xs)` and options.

    jax <= 0.10 stores the counts as params; jax 0.11 packs the operand groups into
    `ft_in = (consts, carry, xs)` flat trees, whose lengths are the counts.
    """
    p = eqn.params
    if "num_consts" in p:
        n_consts, n_carry = p["num_consts"], p["num_carry"]
    else:
        ft_in = p["ft_in"]
        parts = ft_in.unpack() if hasattr(ft_in, "unpack") else tuple(ft_in)
        n_consts, n_carry = len(parts[0]), len(parts[1])
    return ScanParts(
        n_consts, n_carry, open_jaxpr(p["jaxpr"]), p["length"], p["reverse"], p["unroll"]
    )


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


def shard_map_specs(eqn) -> tuple[tuple, tuple]:
    """`(in_specs, out_specs)` of a `shard_map` equation, as `PartitionSpec`s."""
    return tuple(eqn.params["in_specs"]), tuple(eqn.params["out_specs"])


def shard_map_manual_axes(eqn) -> frozenset:
    """The mesh axes a `shard_map` body is manual over."""
    p = eqn.params
    manual = p.get("newly_manual_axes", p.get("manual_axes"))
    if manual is None and "auto" in p:  # releases that list the automatic axes
        manual = frozenset(p["mesh"].axis_names) - frozenset(p["auto"])
    return frozenset(manual or ())


def shard_map_checks_vma(eqn) -> bool:
    """Whether JAX tracks which mesh axes each value of the body varies over."""
    return bool(eqn.params.get("check_vma", eqn.params.get("check_rep", True)))


def shard_map_call(eqn, body, in_specs, out_specs):
    """`jax.shard_map` of `body` with the mesh and options of a `shard_map` equation."""
    return jax.shard_map(
        body,
        mesh=shard_map_mesh(eqn),
        in_specs=tuple(in_specs),
        out_specs=tuple(out_specs),
        axis_names=shard_map_manual_axes(eqn),
        check_vma=shard_map_checks_vma(eqn),
    )


def shard_map_mesh(eqn):
    return eqn.params["mesh"]


def spec_entries(spec) -> tuple:
    """A `PartitionSpec`'s per-axis entries (iterating one that has `unreduced` or
    `reduced` axes raises on some releases)."""
    if spec is None:
        return ()
    if hasattr(spec, "partitions"):
        return tuple(spec.partitions)
    if hasattr(spec, "_partitions"):
        return tuple(spec._partitions)
    return tuple(spec)


def spec_like(spec, entries):
    """A `PartitionSpec` with `entries`, keeping `spec`'s unreduced and reduced axes."""
    kwargs = {}
    for name in ("unreduced", "reduced"):
        value = getattr(spec, name, None)
        if value:
            kwargs[name] = value
    return jax.sharding.PartitionSpec(*entries, **kwargs)
