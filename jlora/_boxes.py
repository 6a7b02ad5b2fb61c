"""Boxes around parameter values: Linen metadata (`nn.Partitioned`, ...) and NNX variables.

The one place that opens and re-closes them. Opening never applies the box's sharding
constraint (Linen's `Partitioned.unbox()` does, under a mesh): jlora reads values to
build and check trees, and the model applies its own constraints when it runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
from flax.core import meta
from flax.linen import spmd


def is_box(x) -> bool:
    """A Linen metadata box (`nn.Partitioned`, ...) or an NNX `Variable`."""
    return isinstance(x, (meta.AxisMetadata, nnx.Variable))


def unbox(x) -> Any:
    """The value inside a box (no sharding constraint applied), or `x` itself."""
    if isinstance(x, meta.Partitioned):
        return x.value
    if isinstance(x, meta.AxisMetadata):
        return x.unbox()
    if isinstance(x, nnx.Variable):
        return x.get_value()
    return x


def rebox(box, value):
    """`box` holding `value` instead (just `value` when `box` is no box)."""
    if isinstance(box, meta.AxisMetadata):
        return box.replace_boxed(value)
    if isinstance(box, nnx.Variable):
        return box.replace(value=value)
    return value


def is_variable(x) -> bool:
    """An NNX `Variable` (a box that is itself a pytree leaf container in `nnx.State`)."""
    return isinstance(x, nnx.Variable)


def partition_names(box, ndim: int) -> tuple | None:
    """The mesh-axis names of a `Partitioned` box, padded with None to `ndim` axes.

    Flax treats names missing at the end as unsharded axes; so does jlora. Returns None
    for anything that is not a `Partitioned` box.
    """
    if not isinstance(box, meta.Partitioned):
        return None
    names = tuple(box.names)
    return names + (None,) * (ndim - len(names))


def is_logical(box) -> bool:
    """A `LogicallyPartitioned` box: its names are logical, mapped to mesh axes by rules."""
    return isinstance(box, spmd.LogicallyPartitioned)


RANK_AXIS = "lora_rank"  # the logical name of the factors' rank axis


def box_factors(box, a, b, layout):
    """`(a, b)` boxed the way a kernel's Linen `box` is (or unboxed if it is none).

    A `Partitioned` box gives `a` the kernel's names for its stacked and input axes and
    `b` those of its stacked and output axes; the rank axis is named `RANK_AXIS` under
    logical names (mapped by rules; unsharded without one) and gets no name under
    physical mesh-axis names, where every name must be an axis of the mesh. Other
    metadata boxes are copied as they are. (NNX keeps factors inside the kernel's
    `Variable`, unboxed.)
    """
    if isinstance(box, nnx.Variable) or not is_box(box):
        return a, b
    names = partition_names(box, layout.ndim)
    if names is None:
        return rebox(box, a), rebox(box, b)
    rank = RANK_AXIS if is_logical(box) else None
    stack = tuple(names[i] for i in layout.stack_axes)
    a_names = stack + tuple(names[i] for i in layout.in_axes) + (rank,)
    b_names = stack + (rank,) + tuple(names[i] for i in layout.out_axes)
    return (
        dataclasses.replace(box, value=a, names=a_names),
        dataclasses.replace(box, value=b, names=b_names),
    )


def box_child(box, x, layout, axes: str):
    """A `LoraWeight` child `x` of kind `axes` (`"a"`, `"b"`, `"out"`; see
    `jlora._weight.CHILDREN`) boxed the way the kernel's Linen `box` is: the kernel's
    names for the kernel axes it holds, the rank as in `box_factors`."""
    if isinstance(box, nnx.Variable) or not is_box(box):
        return x
    names = partition_names(box, layout.ndim)
    if names is None:
        return rebox(box, x)
    rank = RANK_AXIS if is_logical(box) else None
    child_names = tuple(rank if k is None else names[k] for k in layout.child_axes(axes))
    return dataclasses.replace(box, value=x, names=child_names)


def box_out(box, x, layout):
    """`x` laid out `[*stack, *out]` (a DoRA magnitude or norm), boxed as the kernel."""
    return box_child(box, x, layout, "out")
