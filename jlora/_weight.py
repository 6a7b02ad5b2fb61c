"""The `LoraWeight` pytree node, its `Layout`, and the `Trainable` marker."""

from __future__ import annotations

import json
import string
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from jlora._boxes import unbox


def _axes(name, value) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)):
        value = (value,)
    try:
        return tuple(int(v) for v in value)
    except TypeError:
        raise TypeError(f"Layout.{name} must be a tuple of ints, got {value!r}.") from None


class Fused(tuple):
    """Adapt chosen parts of a fused output axis, each part with factors of its own.

    A fused kernel holds several projections side by side along one output axis: GPT-2's
    `c_attn` `[d, 3d]` (q, k, v along axis 1), gemma's `qkv_einsum` `[3, N, D, H]`
    (along axis 0). `Fused(axis=1, parts=3, adapt=(0, 2))` adapts q and v alone: the
    axis is cut into `parts` equal slices, and slice `adapt[j]` gets its own rank-`r`
    pair (`a`'s rank block `j`, and `b`'s rank block `j` over one slice's width); the
    other slices get no update at all (as the reference `MergedLinear` with
    `enable_lora=[True, False, True]`). So `a` is `[..., in, len(adapt) * r]` and `b` is
    `[..., len(adapt) * r, ..., size / parts, ...]`, and merge, the transform, PEFT
    export (as the equivalent rank `len(adapt) * r` LoRA of the whole module) and
    shardings all read the same update.

    (A tuple `(axis, parts, adapt)` underneath, like `Layout`.)
    """

    __slots__ = ()

    def __new__(cls, axis, parts, adapt):
        try:
            axis, parts = int(axis), int(parts)
            adapt = tuple(int(i) for i in adapt)
        except (TypeError, ValueError):
            raise TypeError(
                f"Fused(axis, parts, adapt) takes ints and a tuple of ints, got "
                f"axis={axis!r}, parts={parts!r}, adapt={adapt!r}."
            ) from None
        if parts < 2:
            raise ValueError(f"Fused: parts must be at least 2, got {parts}.")
        if (
            not adapt
            or sorted(set(adapt)) != list(adapt)
            or not (0 <= adapt[0] and adapt[-1] < parts)
        ):
            raise ValueError(
                f"Fused: adapt must name distinct parts in increasing order, each in "
                f"0..{parts - 1}, got {adapt}."
            )
        return tuple.__new__(cls, (axis, parts, adapt))

    def __getnewargs__(self):
        return tuple(self)

    axis = property(lambda self: tuple.__getitem__(self, 0))
    parts = property(lambda self: tuple.__getitem__(self, 1))
    adapt = property(lambda self: tuple.__getitem__(self, 2))

    def __repr__(self):
        return f"Fused(axis={self.axis}, parts={self.parts}, adapt={self.adapt})"


class Layout(tuple):
    """Which axes of a kernel are inputs, outputs and stacked (layer) axes.

    A kernel `w` of shape `S` with this layout has factors
    `a: [*S[stack_axes], *S[in_axes], r]` and `b: [*S[stack_axes], r, *S[out_axes]]`,
    and `w + scale * a @ b` contracts the rank axis only. Axes are listed in the order
    the factors store them; together they must name every axis of the kernel once.

    Example: `nn.DenseGeneral` output projection with kernel `[heads, head_dim, d]` is
    `Layout(in_axes=(0, 1), out_axes=(2,))`; a scanned stack `[L, d_in, d_out]` is
    `Layout(in_axes=(1,), out_axes=(2,), stack_axes=(0,))`.

    `fused`: a `Fused` output axis whose parts are adapted separately (`b` then spans
    one part's width there; see `Fused`), or None.

    (A tuple `(in_axes, out_axes, stack_axes[, fused])` underneath, so that comparing and
    hashing the static metadata of adapted params stays in C on every jit dispatch.)
    """

    __slots__ = ()

    def __new__(cls, in_axes, out_axes, stack_axes=(), fused=None):
        value = (
            _axes("in_axes", in_axes),
            _axes("out_axes", out_axes),
            _axes("stack_axes", stack_axes),
        )
        if not value[0] or not value[1]:
            raise ValueError(
                f"Layout needs at least one input and one output axis, got in_axes="
                f"{value[0]}, out_axes={value[1]}."
            )
        if fused is not None:
            fused = fused if isinstance(fused, Fused) else Fused(*fused)
            if fused.axis not in value[1]:
                raise ValueError(
                    f"Layout: the fused axis {fused.axis} must be one of the output axes "
                    f"{value[1]}."
                )
            value += (fused,)
        return tuple.__new__(cls, value)

    def __getnewargs__(self):
        return tuple(self)

    in_axes = property(lambda self: tuple.__getitem__(self, 0))
    out_axes = property(lambda self: tuple.__getitem__(self, 1))
    stack_axes = property(lambda self: tuple.__getitem__(self, 2))
    fused = property(lambda self: tuple.__getitem__(self, 3) if len(self) > 3 else None)

    def __repr__(self):
        fused = f", fused={self.fused}" if self.fused is not None else ""
        return (
            f"Layout(in_axes={self.in_axes}, out_axes={self.out_axes}, "
            f"stack_axes={self.stack_axes}{fused})"
        )

    def plain(self) -> Layout:
        """This layout without `fused`: the layout of `expand_b`'s full-width `b`."""
        return Layout(self.in_axes, self.out_axes, self.stack_axes)

    def with_fused(self, fused) -> Layout:
        return Layout(self.in_axes, self.out_axes, self.stack_axes, fused)

    def expand_b(self, b):
        """`b` at the kernel's full width: each rank block `j` placed on the slice
        `fused.adapt[j]` of the fused axis, zero on the others (exact: `a @ expand_b(b)`
        is the update of every part). `b` itself where the layout has no `fused`."""
        f = self.fused
        if f is None:
            return b
        ns = len(self.stack_axes)
        k = len(f.adapt)
        rank = b.shape[ns]
        if rank % k:
            raise ValueError(
                f"{self}: b's rank {rank} is not a multiple of the {k} adapted parts."
            )
        r = rank // k
        where = ns + 1 + self.out_axes.index(f.axis)
        rows = np.arange(rank)
        blocks = []
        for part in range(f.parts):
            if part in f.adapt:
                j = f.adapt.index(part)
                keep = (rows >= j * r) & (rows < (j + 1) * r)
                shape = [1] * b.ndim
                shape[ns] = rank
                blocks.append(jnp.where(keep.reshape(shape), b, jnp.zeros((), b.dtype)))
            else:
                blocks.append(jnp.zeros(b.shape, b.dtype))
        return jnp.concatenate(blocks, axis=where)

    @property
    def ndim(self) -> int:
        return len(self.in_axes) + len(self.out_axes) + len(self.stack_axes)

    def child_axes(self, axes: str) -> tuple:
        """The kernel axis each axis of a `LoraWeight` child of kind `axes` holds
        (`"a"`: `[*stack, *in, r]`, `"b"`: `[*stack, r, *out]`, `"out"`: `[*stack,
        *out]`, `"kernel"`: the kernel's own; None: the rank)."""
        if axes == "a":
            return self.stack_axes + self.in_axes + (None,)
        if axes == "b":
            return self.stack_axes + (None,) + self.out_axes
        if axes == "out":
            return self.stack_axes + self.out_axes
        return tuple(range(self.ndim))

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
        fused = self.fused
        if fused is not None:
            axis = fused.axis + ndim if fused.axis < 0 else fused.axis
            fused = Fused(axis, fused.parts, fused.adapt)
        return Layout(
            tuple(resolved[:ni]),
            tuple(resolved[ni : ni + no]),
            tuple(resolved[ni + no :]),
            fused,
        )

    def factor_shapes(self, shape: tuple[int, ...], rank: int):
        """Shapes of `a` and `b` for a kernel of `shape` at `rank` (`a`'s last axis;
        with `fused`, the rank per part times the number of parts adapted, and `b`
        spans one part's width on the fused axis)."""
        stack = tuple(shape[i] for i in self.stack_axes)
        out = [shape[i] for i in self.out_axes]
        if self.fused is not None:
            out[self.out_axes.index(self.fused.axis)] //= self.fused.parts
        a_shape = stack + tuple(shape[i] for i in self.in_axes) + (rank,)
        b_shape = stack + (rank,) + tuple(out)
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


FUSED_RANK_MAX = 32  # up to this rank, merge's product is a fused multiply-sum


def _to_kernel_axes(f, axes, ndim):
    """`f` with leading axes `axes` (kernel axis ids) and the rank last, laid out as
    `[*kernel axes (size 1 where absent), r]`."""
    order = sorted(range(len(axes)), key=lambda i: axes[i])
    f = jnp.transpose(f, [*order, len(axes)])
    present = sorted(axes)
    shape = [f.shape[present.index(k)] if k in present else 1 for k in range(ndim)]
    return f.reshape([*shape, f.shape[-1]])


def low_rank_product(a, b, layout: Layout, scale: float, dtype=jnp.float32):
    """`scale * a @ b` arranged like the kernel, accumulated in `dtype`.

    At small rank the product is written as a broadcast multiply and a sum over the
    rank axis, which XLA fuses with whatever consumes it (the add in `merge`): one pass
    over the kernel, no `[in, out]` temporary, in place under donation. Larger ranks
    use a dot.
    """
    a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    b, layout = layout.expand_b(b), layout.plain()
    if a.shape[-1] > FUSED_RANK_MAX:
        delta = jnp.einsum(layout.product_subscripts(), a, b, preferred_element_type=dtype)
        return delta * jnp.asarray(scale, dtype)
    ns = len(layout.stack_axes)
    a_k = _to_kernel_axes(a, layout.stack_axes + layout.in_axes, layout.ndim)
    b_k = _to_kernel_axes(
        jnp.moveaxis(b, ns, -1), layout.stack_axes + layout.out_axes, layout.ndim
    )
    return jnp.sum(a_k * b_k, axis=-1) * jnp.asarray(scale, dtype)


def materialize(w, a, b, layout: Layout, scale: float, m=None):
    """`w + scale * a @ b` in `w`'s dtype, the sum accumulated in float32; with a DoRA
    magnitude `m` (`[*stack, *out]`), that sum times `m / ||w + scale * a @ b||` per
    output element, the norm a constant of the backward pass (`dora_factor`)."""
    v = w.astype(jnp.float32) + low_rank_product(a, b, layout, scale)
    if m is not None:
        v = v * out_to_kernel(dora_factor(w, a, b, layout, scale, m), layout)
    return v.astype(w.dtype)


def _letters(layout: Layout):
    """Einsum letters of a layout's stacked, input and output axes, and of the kernel."""
    ls = string.ascii_letters
    return (
        "".join(ls[i] for i in layout.stack_axes),
        "".join(ls[i] for i in layout.in_axes),
        "".join(ls[i] for i in layout.out_axes),
        "".join(ls[i] for i in range(layout.ndim)),
    )


def column_norm(w, a, b, layout: Layout, scale: float):
    """`||w + scale * a @ b||` over the input axes, per stacked and output element.

    Returns `[*stack, *out]` (layout order, as `b` without its rank axis) in float32.
    The sum is never formed: `||w_j + s (ab)_j||^2 = ||w_j||^2 + 2 s (a^T w)_j . b_j +
    s^2 b_j^T (a^T a) b_j` needs the kernel's own column norms, an `[r, out]` product
    and an `[r, r]` one (DoRA's weight norm, at the cost of `r` extra rows of input).
    `a` enters the `a^T w` product in `w`'s dtype, accumulated in float32.
    """
    b, layout = layout.expand_b(b), layout.plain()
    st, ins, out, wk = _letters(layout)
    f32 = jnp.float32
    ws = jnp.sum(jnp.square(w.astype(f32)), axis=layout.in_axes)  # kernel order
    ws = jnp.transpose(ws, [sorted(layout.stack_axes + layout.out_axes).index(k)
                            for k in layout.stack_axes + layout.out_axes])
    if scale == 0:
        return jnp.sqrt(ws)
    a32, b32 = jnp.asarray(a, f32), jnp.asarray(b, f32)
    aw = jnp.einsum(
        f"{st}{ins}Z,{wk}->{st}Z{out}",
        jnp.asarray(a, w.dtype),
        w,
        preferred_element_type=f32,
    )
    cross = jnp.sum(aw * b32, axis=len(st))
    ata = jnp.einsum(f"{st}{ins}Z,{st}{ins}Y->{st}ZY", a32, a32)
    quad = jnp.sum(b32 * jnp.einsum(f"{st}ZY,{st}Y{out}->{st}Z{out}", ata, b32), len(st))
    s = jnp.asarray(scale, f32)
    return jnp.sqrt(jnp.maximum(ws + 2 * s * cross + s * s * quad, 0.0))


def dora_factor(w, a, b, layout: Layout, scale: float, m):
    """DoRA's `m / ||w + scale * a @ b||` per output element (`[*stack, *out]`,
    float32), the norm under `stop_gradient` (the paper's section 4.3; PEFT's
    default). Where the norm is zero the column is zero too, and the factor is `m`."""
    norm = jax.lax.stop_gradient(column_norm(w, a, b, layout, scale))
    return jnp.asarray(m, jnp.float32) / jnp.where(norm > 0, norm, 1.0)


def out_to_kernel(x, layout: Layout):
    """`x` laid out `[*stack, *out]` (as `b` without its rank) arranged on the kernel's
    axes, size 1 at the input axes, so that it broadcasts against the kernel."""
    return _to_kernel_axes(x[..., None], layout.stack_axes + layout.out_axes, layout.ndim)[
        ..., 0
    ]


class Stack(NamedTuple):
    """What a stacked set of adapters holds (`jlora.stack_adapters`): the adapters'
    names, their own ranks and scales (the factors are padded to the largest rank and
    each scale is folded into its `b`)."""

    names: tuple[str, ...]
    ranks: tuple[int, ...]
    scales: tuple[float, ...]


# The `stack` of one row of a stacked set inside a mixed batch (`jlora.lora(fn,
# adapter_ids=...)`): a DoRA row's `m` there holds the factor `m / norm` itself, each
# adapter's computed once for the batch.
ROW = Stack((), (), ())


class LoraWeight:
    """A frozen kernel `w` with trainable low-rank factors `a` and `b`.

    Represents `w + scale * a @ b` (see `Layout` for the axes). Registered as a pytree
    node with keys, so paths read `.../kernel/w`, `.../kernel/a`, `.../kernel/b`;
    `scale`, `layout`, `dropout` and `stack` are static metadata (`stack`: a `Stack`
    when `a` and `b` hold a set of adapters on a leading axis, from
    `jlora.stack_adapters`; None otherwise). Children are not validated, so
    any pytree transform may put what it likes there (None, `optax.MaskedNode`,
    `PartitionSpec`, `ShapeDtypeStruct`, tracers): `jax.tree.map`, `jax.eval_shape`,
    `vmap(in_axes=LoraWeight(None, 0, 0))`, optax and orbax all work on it.

    PiSSA / OLoRA starts (`LoraConfig(init="pissa" | "olora")`): `w` is the base
    kernel less the starting update, and `a0`, `b0` (not trained) the starting factors,
    so that `w + scale * a0 @ b0` is the original kernel (None otherwise).

    DoRA (`LoraConfig(use_dora=True)`): `m` is the trained magnitude, one value per
    stacked and output element (`[*stack, *out]`, float32), and the kernel stands for
    `m / ||w + scale * a @ b|| * (w + scale * a @ b)`, the norm taken over the input
    axes. `norm` is that norm as of `init` or `split` (float32, not trained): what
    `unmerge` divides by to recover `w` from a merged kernel. Both are None without
    DoRA (and then no leaves). `CHILDREN` describes every child once.

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

    __slots__ = (
        "w", "a", "b", "m", "norm", "a0", "b0", "scale", "layout", "dropout", "stack"
    )  # fmt: skip

    def __init__(
        self,
        w: Any,
        a: Any,
        b: Any,
        m: Any = None,
        norm: Any = None,
        a0: Any = None,
        b0: Any = None,
        *,
        scale: float | None = None,
        layout: Layout | None = None,
        dropout: float = 0.0,
        stack: Stack | None = None,
    ):
        self.w = w
        self.a = a
        self.b = b
        self.m = m
        self.norm = norm
        self.a0 = a0
        self.b0 = b0
        if scale is None:  # a spec tree: metadata that matches any LoraWeight's
            scale, layout = ANY, ANY
        self.scale = scale
        self.layout = DEFAULT_LAYOUT if layout is None else layout
        self.dropout = dropout
        self.stack = ANY if scale is ANY else stack

    def replace(self, **changes) -> LoraWeight:
        fields = dict(
            w=self.w,
            a=self.a,
            b=self.b,
            m=self.m,
            norm=self.norm,
            a0=self.a0,
            b0=self.b0,
            scale=self.scale,
            layout=self.layout,
            dropout=self.dropout,
            stack=self.stack,
        )
        fields.update(changes)
        children = [fields.pop(c.name) for c in CHILDREN]
        return LoraWeight(*children, **fields)

    @property
    def dora(self) -> bool:
        """Whether this kernel carries a DoRA magnitude."""
        return self.m is not None

    @property
    def rank(self) -> int:
        return int(np.shape(unbox(self.a))[-1])

    @property
    def shape(self):
        return np.shape(unbox(self.w))

    @property
    def dtype(self):
        return unbox(self.w).dtype

    def _require_meta(self):
        if self.scale is ANY:
            raise ValueError(
                "LoraWeight: this node has no scale/layout (a spec tree such as "
                "LoraWeight(None, 0, 0)); build it with scale= and layout=."
            )

    def delta(self):
        """`scale * a @ b` in float32, arranged like the kernel (the low-rank update;
        with DoRA the kernel is also rescaled, see `materialize`)."""
        self._require_meta()
        return low_rank_product(unbox(self.a), unbox(self.b), self.layout, self.scale)

    def materialize(self):
        """`w + scale * a @ b` in `w`'s dtype, the sum accumulated in float32 (with
        DoRA, rescaled per output element to the magnitude `m`)."""
        self._require_meta()
        return materialize(
            unbox(self.w),
            unbox(self.a),
            unbox(self.b),
            self.layout,
            self.scale,
            None if self.m is None else unbox(self.m),
        )

    def __repr__(self):
        def show(x):
            if hasattr(x, "shape") and hasattr(x, "dtype"):
                return f"{x.dtype}{list(x.shape)}"
            return repr(x)

        dora = "" if self.m is None else f", m={show(self.m)}, norm={show(self.norm)}"
        return (
            f"LoraWeight(w={show(self.w)}, a={show(self.a)}, b={show(self.b)}{dora}, "
            f"scale={self.scale}, layout={self.layout}, dropout={self.dropout}"
            + (f", stack={self.stack.names}" if isinstance(self.stack, Stack) else "")
            + ")"
        )

    def __eq__(self, other):  # structural identity only; arrays are not compared
        return self is other

    # A LoraWeight that reaches code outside `jlora.lora` is a kernel in factored form:
    # every hook Python offers for using it as an array says so, and what to do.

    def _outside_lora(self, use: str):
        raise TypeError(
            f"jlora.LoraWeight (an adapted kernel {list(self.shape)}, held as "
            f"w + scale * a @ b) was used as an array ({use}) outside jlora.lora. Wrap "
            "the function that uses the params with jlora.lora(fn), which computes "
            "with the factors, or pass jlora.merge(params) to run it on plain kernels."
        )

    def __array__(self, *args, **kwargs):
        self._outside_lora("converted to a NumPy array")

    def __jax_array__(self):
        self._outside_lora("converted to a JAX array")

    def __float__(self):
        self._outside_lora("float()")

    def __int__(self):
        self._outside_lora("int()")

    def __getitem__(self, index):
        self._outside_lora(f"indexed with {index!r}")

    def __matmul__(self, other):
        self._outside_lora("kernel @ x")

    def __rmatmul__(self, other):
        self._outside_lora("x @ kernel")

    __hash__ = object.__hash__


class _Any:
    """Metadata of a spec tree (`LoraWeight(None, 0, 0)`): equal to any value.

    jax compares the static metadata of prefix trees (e.g. `vmap`'s `in_axes`) with
    `==`; this sentinel makes a metadata-free `LoraWeight` match any adapted kernel.
    """

    __slots__ = ()

    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

    def __hash__(self):
        return 0

    def __repr__(self):
        return "ANY"

    def __reduce__(self):
        return "ANY"


ANY = _Any()

class Child(NamedTuple):
    """One child of `LoraWeight`: its name, whether it trains, whether the adapters
    (`split`, `save_adapter`) hold it, and how its axes read the kernel's: `"kernel"`
    (the kernel's own), `"a"` (`[*stack, *in, r]`), `"b"` (`[*stack, r, *out]`) or
    `"out"` (`[*stack, *out]`, one value per output element)."""

    name: str
    trained: bool
    adapter: bool
    axes: str


CHILDREN = (
    Child("w", trained=False, adapter=False, axes="kernel"),
    Child("a", trained=True, adapter=True, axes="a"),
    Child("b", trained=True, adapter=True, axes="b"),
    Child("m", trained=True, adapter=True, axes="out"),
    Child("norm", trained=False, adapter=True, axes="out"),
    Child("a0", trained=False, adapter=True, axes="a"),
    Child("b0", trained=False, adapter=True, axes="b"),
)
CHILD = {c.name: c for c in CHILDREN}
# The adapter children beyond the factors, present on some kernels only (DoRA's m and
# norm): checkpoints, NNX variables and shardings handle them from this description.
EXTRA_CHILDREN = tuple(c for c in CHILDREN if c.adapter and c.name not in ("a", "b"))


def child_axes(layout: Layout, axes: str) -> tuple:
    """The kernel axis each axis of a child of kind `axes` holds (None: the rank)."""
    return layout.child_axes(axes)


def child_shape(layout: Layout, shape, axes: str, rank: int) -> list[int]:
    """The shape of a child of kind `axes` of a kernel of `shape` at `rank` (with a
    `fused` layout, `b` spans one part's width; see `Layout.factor_shapes`)."""
    if axes in ("a", "b"):
        return list(layout.factor_shapes(tuple(shape), rank)[axes == "b"])
    return [rank if k is None else shape[k] for k in child_axes(layout, axes)]


def extra_children(lw) -> dict:
    """`{name: value}` of `lw`'s extra adapter children that are present."""
    return {
        c.name: getattr(lw, c.name)
        for c in EXTRA_CHILDREN
        if getattr(lw, c.name) is not None
    }


jax.tree_util.register_dataclass(
    LoraWeight,
    data_fields=[c.name for c in CHILDREN],
    meta_fields=["scale", "layout", "dropout", "stack"],
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


jax.tree_util.register_dataclass(Trainable, data_fields=["value"], meta_fields=[])


def _register_export_serialization():
    """Lets `jax.export` serialize functions whose inputs or outputs hold these nodes."""

    def ser_lw(meta):
        scale, layout, dropout, stack = meta
        return json.dumps(
            {
                "scale": scale,
                "in": layout.in_axes,
                "out": layout.out_axes,
                "stack": layout.stack_axes,
                "fused": layout.fused,
                "dropout": dropout,
                "adapters": None if stack is None else list(map(list, stack)),
            }
        ).encode()

    def de_lw(data):
        d = json.loads(data.decode())
        return (
            d["scale"],
            Layout(tuple(d["in"]), tuple(d["out"]), tuple(d["stack"]), d.get("fused")),
            d["dropout"],
            None if d.get("adapters") is None else Stack(*map(tuple, d["adapters"])),
        )

    export.register_pytree_node_serialization(
        LoraWeight,
        serialized_name="jlora.LoraWeight",
        serialize_auxdata=ser_lw,
        deserialize_auxdata=de_lw,
        from_children=lambda meta, ch: LoraWeight(
            *ch, scale=meta[0], layout=meta[1], dropout=meta[2], stack=meta[3]
        ),
    )
    export.register_pytree_node_serialization(
        Trainable,
        serialized_name="jlora.Trainable",
        serialize_auxdata=lambda _: b"",
        deserialize_auxdata=lambda _: (),
        from_children=lambda _, ch: Trainable(*ch),
    )


_register_export_serialization()


def is_node(x) -> bool:
    """`is_leaf` for tree walks that stop at jlora's nodes."""
    return isinstance(x, (LoraWeight, Trainable))
