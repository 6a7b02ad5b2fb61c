"""The `LoraWeight` pytree node, its `Layout`, and the `Trainable` marker."""

from __future__ import annotations

import dataclasses
import string
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which axes of a kernel are inputs, outputs and stacked (layer) axes.

    A kernel `w` of shape `S` with this layout has factors
    `a: [*S[stack_axes], *S[in_axes], r]` and `b: [*S[stack_axes], r, *S[out_axes]]`,
    and `w + scale * a @ b` contracts the rank axis only. Axes are listed in the order
    the factors store them; together they must name every axis of the kernel once.

    Example: `nn.DenseGeneral` output projection with kernel `[heads, head_dim, d]` is
    `Layout(in_axes=(0, 1), out_axes=(2,))`; a scanned stack `[L, d_in, d_out]` is
    `Layout(in_axes=(1,), out_axes=(2,), stack_axes=(0,))`.
    """

    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    stack_axes: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("in_axes", "out_axes", "stack_axes"):
            value = getattr(self, name)
            if isinstance(value, int):
                value = (value,)
            try:
                value = tuple(int(v) for v in value)
            except TypeError:
                raise TypeError(
                    f"Layout.{name} must be a tuple of ints, got {value!r}."
                ) from None
            object.__setattr__(self, name, value)
        if not self.in_axes or not self.out_axes:
            raise ValueError(
                f"Layout needs at least one input and one output axis, got {self}."
            )

    @property
    def ndim(self) -> int:
        return len(self.in_axes) + len(self.out_axes) + len(self.stack_axes)

    def normalized(self, ndim: int) -> Layout:
        """Returns this layout with negative axes resolved against `ndim`.

        Raises:
          ValueError: if the axes do not name each of the `ndim` axes exactly once.
        """
        axes = self.in_axes + self.out_axes + self.stack_axes
        resolved = [a + ndim if a < 0 else a for a in axes]
        if sorted(resolved) != list(range(ndim)):
            raise ValueError(
                f"{self} does not fit a kernel with {ndim} axes: in_axes, out_axes and "
                f"stack_axes must together name each axis 0..{ndim - 1} exactly once."
            )
        ni, no = len(self.in_axes), len(self.out_axes)
        return Layout(
            tuple(resolved[:ni]), tuple(resolved[ni : ni + no]), tuple(resolved[ni + no :])
        )

    def factor_shapes(self, shape: tuple[int, ...], rank: int):
        """Shapes of `a` and `b` for a kernel of `shape` at `rank`."""
        stack = tuple(shape[i] for i in self.stack_axes)
        a_shape = stack + tuple(shape[i] for i in self.in_axes) + (rank,)
        b_shape = stack + (rank,) + tuple(shape[i] for i in self.out_axes)
        return a_shape, b_shape

    def fan_in(self, shape: tuple[int, ...]) -> int:
        return int(np.prod([shape[i] for i in self.in_axes]))

    def fan_out(self, shape: tuple[int, ...]) -> int:
        return int(np.prod([shape[i] for i in self.out_axes]))

    def product_subscripts(self) -> str:
        """The einsum `a, b -> w` for this layout (rank letter last in the alphabet)."""
        letters = string.ascii_letters
        r = "Z"
        a = "".join(letters[i] for i in self.stack_axes + self.in_axes) + r
        b = "".join(letters[i] for i in self.stack_axes) + r
        b += "".join(letters[i] for i in self.out_axes)
        w = "".join(letters[i] for i in range(self.ndim))
        return f"{a},{b}->{w}"


DEFAULT_LAYOUT = Layout(in_axes=(0,), out_axes=(1,))


def _unbox(x):
    from flax.core import meta

    return x.unbox() if isinstance(x, meta.AxisMetadata) else x


def low_rank_product(a, b, layout: Layout, scale: float, dtype=jnp.float32):
    """`scale * a @ b` arranged like the kernel, accumulated in `dtype`."""
    delta = jnp.einsum(
        layout.product_subscripts(),
        jnp.asarray(a, dtype),
        jnp.asarray(b, dtype),
        preferred_element_type=dtype,
    )
    return delta * jnp.asarray(scale, dtype)


class LoraWeight:
    """A frozen kernel `w` with trainable low-rank factors `a` and `b`.

    Represents `w + scale * a @ b` (see `Layout` for the axes). Registered as a pytree
    node with keys, so paths read `.../kernel/w`, `.../kernel/a`, `.../kernel/b`;
    `scale`, `layout` and `dropout` are static metadata. Children are not validated, so
    any pytree transform may put what it likes there (None, `optax.MaskedNode`,
    `PartitionSpec`, `ShapeDtypeStruct`, tracers): `jax.tree.map`, `jax.eval_shape`,
    `vmap(in_axes=LoraWeight(None, 0, 0))`, optax and orbax all work on it.

    A `LoraWeight` built without `scale` (e.g. `LoraWeight(None, 0, 0)`) carries no
    metadata and matches any `LoraWeight` as a tree prefix, so it serves directly as a
    spec tree: `jax.vmap(f, in_axes=({"kernel": LoraWeight(None, 0, 0)}, None))`.

    Example:
      >>> import jax.numpy as jnp, jlora
      >>> lw = jlora.LoraWeight(jnp.zeros((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)),
      ...                       scale=0.5)
      >>> lw.materialize()[0, 0]
      Array(1., dtype=float32)
    """

    __slots__ = ("w", "a", "b", "scale", "layout", "dropout")

    def __init__(
        self,
        w: Any,
        a: Any,
        b: Any,
        *,
        scale: float | None = None,
        layout: Layout | None = None,
        dropout: float = 0.0,
    ):
        self.w = w
        self.a = a
        self.b = b
        self.scale = scale
        self.layout = layout if layout is not None or scale is None else DEFAULT_LAYOUT
        self.dropout = dropout

    def _meta(self):
        return _Meta(self.scale, self.layout, self.dropout)

    def replace(self, **changes) -> LoraWeight:
        fields = dict(
            w=self.w,
            a=self.a,
            b=self.b,
            scale=self.scale,
            layout=self.layout,
            dropout=self.dropout,
        )
        fields.update(changes)
        w, a, b = fields.pop("w"), fields.pop("a"), fields.pop("b")
        return LoraWeight(w, a, b, **fields)

    @property
    def rank(self) -> int:
        return int(np.shape(_unbox(self.a))[-1])

    @property
    def shape(self):
        return np.shape(_unbox(self.w))

    @property
    def dtype(self):
        return _unbox(self.w).dtype

    def delta(self):
        """`scale * a @ b` in float32, arranged like the kernel."""
        if self.scale is None:
            raise ValueError(
                "LoraWeight: this node has no scale/layout (a spec tree such as "
                "LoraWeight(None, 0, 0)); build it with scale= and layout=."
            )
        return low_rank_product(_unbox(self.a), _unbox(self.b), self.layout, self.scale)

    def materialize(self):
        """`w + scale * a @ b` in `w`'s dtype, the sum accumulated in float32."""
        w = _unbox(self.w)
        return (w.astype(jnp.float32) + self.delta()).astype(w.dtype)

    def __repr__(self):
        def show(x):
            if hasattr(x, "shape") and hasattr(x, "dtype"):
                return f"{x.dtype}{list(x.shape)}"
            return repr(x)

        return (
            f"LoraWeight(w={show(self.w)}, a={show(self.a)}, b={show(self.b)}, "
            f"scale={self.scale}, layout={self.layout}, dropout={self.dropout})"
        )

    def __eq__(self, other):  # structural identity only; arrays are not compared
        return self is other

    __hash__ = object.__hash__


class _Meta(tuple):
    """`(scale, layout, dropout)`; the all-unset metadata of a spec tree equals any."""

    def __new__(cls, scale, layout, dropout):
        return super().__new__(cls, (scale, layout, dropout))

    @property
    def wildcard(self) -> bool:
        return self[0] is None

    def __eq__(self, other):
        if isinstance(other, _Meta) and (self.wildcard or other.wildcard):
            return True
        return tuple.__eq__(self, other)

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):  # equal objects must hash equal, wildcards included
        return hash(_Meta)


def _flatten_with_keys(lw: LoraWeight):
    keys = jax.tree_util.GetAttrKey
    children = ((keys("w"), lw.w), (keys("a"), lw.a), (keys("b"), lw.b))
    return children, lw._meta()


def _flatten(lw: LoraWeight):
    return (lw.w, lw.a, lw.b), lw._meta()


def _unflatten(meta, children):
    scale, layout, dropout = meta
    obj = object.__new__(LoraWeight)
    obj.w, obj.a, obj.b = children
    obj.scale, obj.layout, obj.dropout = scale, layout, dropout
    return obj


jax.tree_util.register_pytree_with_keys(
    LoraWeight, _flatten_with_keys, _unflatten, flatten_func=_flatten
)


class Trainable:
    """Marks a plain leaf (a bias, a classifier head) as trained fully.

    `jlora.init` wraps the leaves that `train_bias` and `also_train` select; `split`,
    `optimizer` and `summary` read the mark, and `merge` and `jlora.lora` remove it.
    A pytree node with one child, `value` (its path reads `.../bias/value`).
    """

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self):
        v = self.value
        shown = f"{v.dtype}{list(v.shape)}" if hasattr(v, "shape") else repr(v)
        return f"Trainable({shown})"


jax.tree_util.register_pytree_with_keys(
    Trainable,
    lambda t: (((jax.tree_util.GetAttrKey("value"), t.value),), None),
    lambda _, children: Trainable(children[0]),
    flatten_func=lambda t: ((t.value,), None),
)


def _register_export_serialization():
    """Lets `jax.export` serialize functions whose inputs or outputs hold these nodes."""
    import json

    from jax import export

    def ser_lw(meta):
        scale, layout, dropout = meta
        return json.dumps(
            {
                "scale": scale,
                "in": layout.in_axes,
                "out": layout.out_axes,
                "stack": layout.stack_axes,
                "dropout": dropout,
            }
        ).encode()

    def de_lw(data):
        d = json.loads(data.decode())
        return (
            d["scale"],
            Layout(tuple(d["in"]), tuple(d["out"]), tuple(d["stack"])),
            d["dropout"],
        )

    export.register_pytree_node_serialization(
        LoraWeight,
        serialized_name="jlora.LoraWeight",
        serialize_auxdata=ser_lw,
        deserialize_auxdata=de_lw,
    )
    export.register_pytree_node_serialization(
        Trainable,
        serialized_name="jlora.Trainable",
        serialize_auxdata=lambda _: b"",
        deserialize_auxdata=lambda _: None,
    )


_register_export_serialization()


def is_node(x) -> bool:
    """`is_leaf` for tree walks that stop at jlora's nodes."""
    return isinstance(x, (LoraWeight, Trainable))
