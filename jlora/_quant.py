"""Quantized frozen kernels (QLoRA's NF4 with double quantization, and int8), and the
interpreter's view of them: a kernel dequantized at its own use.

Format. A kernel is cut into blocks of `block_size` consecutive elements along one of
its axes (`axis`, stored negative so that slicing leading stacked axes keeps it valid);
each block is scaled by its absolute maximum and each element stored as a code.
- `nf4`: the 16-value NormalFloat codebook of the QLoRA paper (Dettmers et al. 2023,
  eq. 4, with the exact zero and the asymmetric halves of bitsandbytes' table), two
  4-bit codes per byte along the blocked axis. With `double_quant`, the float32
  absmaxes are themselves stored as 8-bit codes in groups of 256 along the absmax
  array's last axis: logarithmic between the group's smallest nonzero and largest
  absmax (two float32 per group), so each absmax is off by a relative
  (max / min) ** (1/508) - 1 at most and no block is rounded to zero (the paper's
  8-bit floats are relative too; a linear code zeroes small blocks beside large ones):
  4 + 8/64 + 64/16384 = 4.129 bits per weight.
- `int8`: per-block absmax, `round(127 * x / absmax)` as int8; absmaxes in float32.
Every array of the node keeps the kernel's axes (the blocked one shortened), so a
kernel's `PartitionSpec` carries over axis for axis, and a scanned `[L, ...]` stack
slices per layer.

Use. Inside `jlora.lora` a quantized kernel is a `Deferred` value: equations that only
move its axes (transpose, reshape, slices, casts, ...) are recorded, and the first
equation that computes with it (a dot, a gather, a convolution, an add) runs as one
`jax.checkpoint`ed function of the codes: dequantize, replay the moves, apply. The
checkpoint's residuals are the codes and the other operands, never the float kernel,
so a training step holds one dequantized kernel at a time, in the backward pass too.
"""

from __future__ import annotations

import functools
import statistics
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("nf4", "int8")
SECOND_BLOCK = 256  # double quantization: absmaxes per block of the second level


def nf4_codebook() -> np.ndarray:
    """The NormalFloat4 values, from their definition: quantiles of N(0, 1) for 8
    positive and 7 negative levels (probability offset (1 - 1/(2*15) + 1 - 1/(2*16)) / 2
    from the ends, as bitsandbytes builds them), an exact zero, normalized to [-1, 1]."""
    offset = 0.9677083
    inv = statistics.NormalDist().inv_cdf
    pos = [inv(float(p)) for p in np.linspace(offset, 0.5, 9)[:-1]]
    neg = [-inv(float(p)) for p in np.linspace(offset, 0.5, 8)[:-1]]
    values = np.array(sorted(pos + [0.0] + neg), np.float64)
    return (values / np.max(np.abs(values))).astype(np.float32)


NF4 = nf4_codebook()


@jax.tree_util.register_pytree_node_class
class Quantized:
    """A frozen kernel stored quantized (see the module docstring for the format).

    Children: `codes` (uint8 packed NF4 or int8), `absmax` (float32 per block, or
    uint8 codes with `double_quant`), `absmax_scale` (float32 `[..., groups, 2]`: each
    group's smallest nonzero and largest absmax, or None). Static: `kind`, `shape`,
    `dtype` (the float dtype it stands for), `axis` (the blocked axis, negative),
    `block_size`.
    """

    _jlora_leaf = True  # (the walk stops here: one kernel, not three leaves)

    def __init__(
        self, codes, absmax, absmax_scale, *, kind, shape, dtype, axis, block_size
    ):
        self.codes = codes
        self.absmax = absmax
        self.absmax_scale = absmax_scale
        self.kind = kind
        self.shape = tuple(shape)
        self.dtype = jnp.dtype(dtype)
        self.axis = int(axis)
        self.block_size = int(block_size)

    def tree_flatten(self):
        meta = (self.kind, self.shape, self.dtype, self.axis, self.block_size)
        return (self.codes, self.absmax, self.absmax_scale), meta

    @classmethod
    def tree_unflatten(cls, meta, children):
        kind, shape, dtype, axis, block = meta
        node = object.__new__(cls)
        node.codes, node.absmax, node.absmax_scale = children
        node.kind, node.shape, node.dtype, node.axis, node.block_size = (
            kind,
            shape,
            dtype,
            axis,
            block,
        )
        codes = children[0]
        dt = getattr(codes, "dtype", None)
        if dt is not None and jnp.issubdtype(dt, jnp.floating):
            raise TypeError(
                f"jlora.Quantized({kind}, {list(shape)}): its integer codes came back as "
                f"{dt}: a tree map over a quantized base reached them (a cast of every "
                "leaf, say), which would corrupt the kernel. Cast the base before "
                "jlora.quantize, or leave quantized kernels out of the map: "
                "jax.tree.map(f, tree, is_leaf=lambda x: isinstance(x, jlora.Quantized)) "
                "with f returning such nodes unchanged."
            )
        if hasattr(codes, "shape") and len(codes.shape) != len(shape):
            # sliced by a transform (a scan over a stack): leading axes are gone
            node.shape = tuple(shape[len(shape) - len(codes.shape) :])
        return node

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return sum(int(x.nbytes) for x in jax.tree.leaves(self))

    def dequantize(self):
        """The float kernel (in `dtype`)."""
        return dequantize_array(self)

    def __repr__(self):
        dq = ", double_quant" if self.absmax_scale is not None else ""
        return (
            f"Quantized({self.kind}, {self.dtype.name}{list(self.shape)}, axis="
            f"{self.axis}, block_size={self.block_size}{dq})"
        )

    @property
    def sharding(self):
        """The codes' sharding: the kernel's, axis for axis (the blocked axis shorter)."""
        return getattr(self.codes, "sharding", None)

    def __jax_array__(self):
        return self.dequantize()

    def specs(self, kernel_spec, mesh=None) -> Quantized:
        """This node with `PartitionSpec` children: the codes and absmaxes take the
        kernel's spec axis for axis (their axes are the kernel's, the blocked one
        shorter); the second-level ranges of double quantization take it too, but for
        their last two axes (the group and its (min, max) pair), which are replicated.

        An axis of an array that its mesh axes do not divide (the absmaxes of a short
        blocked axis: 128 rows give 2 blocks, which 4 devices cannot split) is left
        replicated instead. The mesh sizes come from `mesh`, else the codes' sharding,
        else the mesh of `jax.set_mesh`; without any, the kernel's spec is taken as is.
        """
        from jax.sharding import PartitionSpec

        from jlora._jax_compat import spec_entries

        if isinstance(kernel_spec, Quantized):  # already a node of specs: its codes'
            kernel_spec = kernel_spec.codes
        entries = tuple(spec_entries(kernel_spec)) + (None,) * self.ndim
        entries = entries[: self.ndim]
        sizes = _mesh_sizes(mesh, self.codes)

        def fit(entries, array):
            shape = getattr(array, "shape", None)
            if sizes is None or shape is None:
                return PartitionSpec(*entries)
            out = []
            for e, n in zip(entries, shape):
                names = e if isinstance(e, tuple) else () if e is None else (e,)
                if not all(isinstance(x, str) for x in names):
                    out.append(e)  # (UNCONSTRAINED and the like: the compiler's)
                    continue
                total = int(np.prod([sizes.get(x, 1) for x in names]))
                out.append(e if n % total == 0 else None)
            return PartitionSpec(*out)

        children = [fit(entries, self.codes), fit(entries, self.absmax)]
        if self.absmax_scale is not None:
            children.append(fit(entries[:-1] + (None, None), self.absmax_scale))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(self), children)


def _mesh_sizes(mesh, codes):
    """`{axis name: size}` of `mesh`, else of `codes`' mesh, else of the current one."""
    if mesh is None:
        mesh = getattr(getattr(codes, "sharding", None), "mesh", None)
    if mesh is None:
        try:
            mesh = jax.sharding.get_abstract_mesh()
        except AttributeError:  # (an older JAX)
            mesh = None
        if mesh is not None and not getattr(mesh, "axis_names", ()):
            mesh = None
    if mesh is None:
        return None
    return dict(mesh.shape)


def is_quantized(x) -> bool:
    return isinstance(x, Quantized)


def block_axis(shape, block_size: int, avoid=()) -> int | None:
    """The axis blocks run along: the next-to-last, then the last, then the others
    from the back, skipping `avoid` (stacked axes); the first one `block_size`
    divides. None if none does."""
    n = len(shape)
    order = [n - 2, n - 1] + list(range(n - 3, -1, -1))
    for ax in order:
        if ax >= 0 and ax not in avoid and shape[ax] % block_size == 0:
            return ax
    return None


def _blocks(x, axis, block):
    """`x` with `axis` last, cut into `[..., n // block, block]`."""
    x = jnp.moveaxis(x, axis, -1)
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


@functools.partial(jax.jit, static_argnames=("kind", "axis", "block", "double"))
def _quantize(w, *, kind, axis, block, double):
    x = _blocks(w.astype(jnp.float32), axis, block)
    absmax = jnp.max(jnp.abs(x), axis=-1)
    safe = jnp.where(absmax > 0, absmax, 1.0)[..., None]
    scaled = x / safe
    if kind == "nf4":
        # The nearest code: how many midpoints between codes lie below the value (15
        # comparisons XLA fuses into one pass; no table lookup, so it shards freely).
        mids = (NF4[1:] + NF4[:-1]) / 2
        idx = jnp.zeros(scaled.shape, jnp.uint8)
        for m in mids:
            idx = idx + (scaled > m).astype(jnp.uint8)
        idx = idx.reshape(*idx.shape[:-2], -1)
        codes = idx[..., 0::2] | (idx[..., 1::2] << 4)
    else:
        codes = jnp.round(scaled * 127).astype(jnp.int8).reshape(*x.shape[:-2], -1)
    codes = jnp.moveaxis(codes, -1, axis)
    absmax = jnp.moveaxis(absmax, -1, axis)
    scale = None
    if double:
        last = absmax.shape[-1]
        second = SECOND_BLOCK if last % SECOND_BLOCK == 0 else last
        a2 = absmax.reshape(*absmax.shape[:-1], last // second, second)
        # Logarithmic 8-bit codes between the group's smallest nonzero absmax `lo` and
        # its largest `hi`: code 0 is an exact zero (an all-zero block), codes 1..255
        # are lo * (hi / lo) ** ((k - 1) / 254). The error is relative, at most
        # (hi / lo) ** (1 / 508) - 1 of each absmax, so a block of small weights beside
        # large ones keeps its scale (a linear code would round it to zero).
        hi = jnp.max(a2, axis=-1)
        lo = jnp.min(jnp.where(a2 > 0, a2, jnp.inf), axis=-1)
        lo = jnp.where(jnp.isfinite(lo), lo, 0.0)
        span = jnp.log(jnp.where(lo > 0, hi / jnp.where(lo > 0, lo, 1.0), 1.0))
        t = jnp.log(jnp.where(a2 > 0, a2, 1.0) / jnp.where(lo > 0, lo, 1.0)[..., None])
        t = t / jnp.where(span > 0, span, 1.0)[..., None]
        k = jnp.where(a2 > 0, 1 + jnp.round(254 * jnp.clip(t, 0.0, 1.0)), 0)
        absmax = k.astype(jnp.uint8).reshape(absmax.shape)
        scale = jnp.stack([lo, hi], axis=-1)
    return codes, absmax, scale


def _absmax(q: Quantized):
    if q.absmax_scale is None:
        return q.absmax
    last = q.absmax.shape[-1]
    n2 = q.absmax_scale.shape[-2]
    k = q.absmax.astype(jnp.float32).reshape(*q.absmax.shape[:-1], n2, last // n2)
    lo, hi = q.absmax_scale[..., 0:1], q.absmax_scale[..., 1:2]
    ratio = hi / jnp.where(lo > 0, lo, 1.0)
    a2 = jnp.where(k > 0, lo * ratio ** ((k - 1) / 254), 0.0)
    return a2.reshape(q.absmax.shape)


def _lookup(table, idx):
    """`table[idx]`, placed as `idx` is: under Explicit mesh axes JAX can't tell a
    gather's output sharding from a replicated table and sharded indices, so it is
    given (the codes' sharding carries over to the values)."""
    sharding = jax.typeof(idx).sharding
    if any(s is not None for s in getattr(sharding, "spec", ())):
        return table.at[idx].get(out_sharding=sharding)
    return table[idx]


def dequantize_array(q: Quantized):
    """The float kernel of `q`, in its dtype (the product computed in float32)."""
    axis = q.axis % q.ndim
    absmax = jnp.moveaxis(_absmax(q), axis, -1)[..., None]
    codes = jnp.moveaxis(q.codes, axis, -1)
    if q.kind == "nf4":
        lo, hi = codes & 0xF, codes >> 4
        idx = jnp.stack([lo, hi], axis=-1).reshape(*codes.shape[:-1], -1)
        vals = _lookup(jnp.asarray(NF4), idx)
    else:
        vals = codes.astype(jnp.float32) / 127
    vals = vals.reshape(*vals.shape[:-1], -1, q.block_size) * absmax
    out = vals.reshape(*vals.shape[:-2], -1)
    return jnp.moveaxis(out, -1, axis).astype(q.dtype)


def quantize_array(
    w, kind: str = "nf4", *, block_size: int = 64, double_quant: bool = True, axis=None
) -> Quantized:
    """`w` (a floating array) as a `Quantized` node. Raises ValueError if no axis (or
    not `axis`) is a multiple of `block_size`."""
    shape = tuple(w.shape)
    if axis is None:
        axis = block_axis(shape, block_size)
        if axis is None:
            raise ValueError(
                f"no axis of {list(shape)} is a multiple of block_size={block_size}"
            )
    axis = axis % len(shape)
    if shape[axis] % block_size:
        raise ValueError(
            f"axis {axis} of {list(shape)} is not a multiple of block_size={block_size}"
        )
    if kind == "nf4" and block_size % 2:
        raise ValueError(f"nf4 packs two codes per byte: block_size {block_size} is odd")
    double = bool(double_quant) and kind == "nf4"
    codes, absmax, scale = _quantize(
        w, kind=kind, axis=axis, block=block_size, double=double
    )
    return Quantized(
        codes,
        absmax,
        scale,
        kind=kind,
        shape=shape,
        dtype=w.dtype,
        axis=axis - len(shape),
        block_size=block_size,
    )


# The interpreter's view: a kernel dequantized at its use ---------------------------------

# Primitives that only move, select or cast a kernel's elements: recorded, replayed
# after dequantization inside the use's checkpoint.
MOVES = frozenset(
    {
        "transpose",
        "reshape",
        "squeeze",
        "expand_dims",
        "broadcast_in_dim",
        "convert_element_type",
        "slice",
        "rev",
        "copy",
        "copy_p",
        "reduce_precision",
    }
)


@jax.tree_util.register_pytree_node_class
class Deferred:
    """A quantized kernel inside the interpreter, with the moves applied to it so far
    (`ops`: equations and their other operands), dequantized at its first real use."""

    def __init__(self, q: Quantized, ops=(), operands=()):
        self.q = q
        self.ops = tuple(ops)  # (eqn, position of the kernel among its inputs)
        self.operands = tuple(operands)  # per op: the other inputs (arrays)
        self._aval = None

    def tree_flatten(self):
        return (self.q, self.operands), self.ops

    @classmethod
    def tree_unflatten(cls, ops, children):
        return cls(children[0], ops, children[1])

    def value(self):
        """The float kernel, moves replayed."""
        from jlora import _jax_compat as compat

        w = dequantize_array(self.q)
        for (eqn, pos), others in zip(self.ops, self.operands):
            ins = list(others)
            ins.insert(pos, w)
            w = compat.bind(eqn, ins)[0]
        return w

    def _shape_dtype(self):
        if self._aval is None:
            self._aval = jax.eval_shape(self.value)
        return self._aval

    @property
    def shape(self):
        return tuple(self._shape_dtype().shape)

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def dtype(self):
        return self._shape_dtype().dtype

    def __jax_array__(self):
        return self.value()

    def astype(self, dtype):
        return self.value().astype(dtype)

    @staticmethod
    def _jlora_bind(eqn, invals):
        """`compat.bind`'s answer for equations with a `Deferred` input."""
        from jlora import _jax_compat as compat

        where = [i for i, v in enumerate(invals) if isinstance(v, Deferred)]
        if len(where) == 1 and compat.primitive_name(eqn) in MOVES:
            (i,) = where
            d = invals[i]
            others = [v for j, v in enumerate(invals) if j != i]
            return [Deferred(d.q, d.ops + ((eqn, i),), d.operands + (tuple(others),))]
        deferred = [invals[i] for i in where]

        def use(deferred, others):
            ins = list(others)
            for i, d in zip(where, deferred):
                ins[i] = d.value()
            return compat.bind(eqn, ins)

        others = [None if i in where else v for i, v in enumerate(invals)]
        return jax.checkpoint(use, prevent_cse=True)(deferred, others)


def stand_in(x):
    """What tracing sees in place of a quantized kernel: its shape and float dtype."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


# Trees: quantize / dequantize -------------------------------------------------------------


def _tree_walk():
    from jlora._targets import walk  # (the walk recognizes this module's node by duck type)

    return walk


def quantize(
    params: Any,
    kind: str = "nf4",
    *,
    targets=None,
    block_size: int = 64,
    double_quant: bool = True,
) -> Any:
    """Stores the frozen kernels of `params` quantized: QLoRA's NF4 base (or int8).

    By default every floating kernel with >= 2 axes that `jlora.init` would target by
    name (`kernel`, `weight`, `w`, ...) is quantized, adapted or not (in QLoRA the
    whole base is 4-bit); embeddings, norms and biases stay in float unless `targets`
    names them. Works before or after `jlora.init` (an adapted kernel's `w` is
    quantized, its factors stay float). `jlora.lora(fn)` dequantizes each kernel at
    its own use, one at a time, and its backward pass dequantizes again instead of
    keeping the float kernel (see the module docs); train on the lean route
    (`jlora.split`): a quantized base holds integer codes, which `jax.grad` refuses to
    differentiate.

    Blocks run along one kernel axis, the first of the next-to-last, the last, then
    the others from the back that `block_size` divides (stacked axes of an adapted
    kernel are skipped), so shardings carry over axis for axis.

    Args:
      params: a params tree (Linen, NNX state, plain dicts), adapted or not; or an NNX
        model, changed in place (its modules then run the factored call).
      kind: `"nf4"` (4 bits, two codes per byte) or `"int8"`.
      targets: a regex (or several) over leaf paths selecting what to quantize instead
        of the default.
      block_size: elements per absmax block (64 as in QLoRA).
      double_quant: NF4 only: store the absmaxes as 8-bit logarithmic codes, with a
        float32 range per 256 of them (4.129 bits per weight instead of 4.5).

    Returns:
      `params` with `jlora.Quantized` nodes at the selected kernels (the NNX model
      itself for a model).

    Raises:
      ValueError: an unknown `kind`; a target that is not floating or has fewer than 2
        axes; a target no axis of which `block_size` divides (pad it, or choose a
        `block_size` that divides one); a kernel already quantized as another kind.
        Every problem is listed, by path. A kernel of the default selection that no
        block fits stays in float, with a warning naming it.
    """
    from flax import nnx

    from jlora._boxes import rebox, unbox
    from jlora._init import is_default_target
    from jlora._targets import LORA, compile_patterns, path_matches

    if kind not in KINDS:
        raise ValueError(f"jlora.quantize: kind must be one of {KINDS}, got {kind!r}.")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(
            f"jlora.quantize: block_size must be a positive int, got {block_size!r}."
        )
    if block_size <= 0 or (kind == "nf4" and block_size % 2):
        even = " (even for nf4: two codes per byte)" if kind == "nf4" else ""
        raise ValueError(
            f"jlora.quantize: block_size must be a positive int{even}, got {block_size}."
        )
    block_size = int(block_size)
    if isinstance(params, nnx.Module):
        raise TypeError(
            "jlora._quant.quantize takes params trees; jlora.quantize (jlora._nnx's "
            "front) takes NNX models too."
        )
    patterns = compile_patterns(targets, "jlora.quantize targets")
    tree = _tree_walk()(params)
    out, errors, kept_float = [], [], []
    for node in tree.nodes:
        lora = node.kind == LORA
        w = unbox(node.value.w) if lora else unbox(node.value)
        avoid = node.value.layout.stack_axes if lora else ()
        if patterns:
            chosen = path_matches(patterns, node.path)
        else:
            chosen = is_quantized(w) or is_default_target(node.path, w)
        if not chosen or w is None:
            out.append(node.leaf)
            continue
        if is_quantized(w):
            had = (w.kind, w.block_size, w.absmax_scale is not None)
            want = (kind, block_size, bool(double_quant) and kind == "nf4")
            if had != want:
                errors.append(
                    f"  {node.path}: already quantized as {w.kind} (block_size="
                    f"{w.block_size}, double_quant={had[2]}), not as asked (block_size="
                    f"{block_size}, double_quant={want[2]}); jlora.dequantize it first "
                    "to quantize it anew (from the dequantized values: the error adds)"
                )
            out.append(node.leaf)
            continue
        if not (hasattr(w, "dtype") and jnp.issubdtype(w.dtype, jnp.floating)) or (
            len(np.shape(w)) < 2
        ):
            errors.append(
                f"  {node.path}: {getattr(w, 'dtype', type(w).__name__)}"
                f"{list(np.shape(w))} is not a floating kernel with >= 2 axes"
            )
            out.append(node.leaf)
            continue
        axis = block_axis(tuple(w.shape), block_size, avoid)
        if axis is None:
            msg = (
                f"  {node.path}: no axis of {list(w.shape)} is a multiple of "
                f"block_size={block_size}"
                + (f" (stacked axes {list(avoid)} skipped)" if avoid else "")
                + "; pad the kernel, pass a block_size that divides one of its axes, "
                "or leave it out of targets="
            )
            (errors if patterns else kept_float).append(msg)
            out.append(node.leaf)
            continue
        q = quantize_array(
            w, kind, block_size=block_size, double_quant=double_quant, axis=axis
        )
        if lora:
            lw = node.value
            new = lw.replace(w=rebox(lw.w, q))
            out.append(node.put_back(new))
        else:
            out.append(node.put_back(rebox(node.value, q)))
    if patterns:
        for p in patterns:
            if not any(path_matches((p,), n.path) for n in tree.nodes):
                errors.append(
                    f"  targets pattern {p.pattern!r} matches no leaf; fix the pattern "
                    "(a regex searched in '/'-joined paths such as 'layers/0/q/kernel')"
                )
    if errors:
        raise ValueError("jlora.quantize: cannot quantize as asked:\n" + "\n".join(errors))
    if kept_float:
        warnings.warn(
            "jlora.quantize: these kernels stay in float:\n" + "\n".join(kept_float),
            stacklevel=3,
        )
    return tree.rebuild(out)


def dequantize(params: Any) -> Any:
    """`params` with every `jlora.Quantized` kernel back in float (its dtype), adapted
    or not; an NNX model is changed in place. The inverse of `quantize` up to the
    quantization error."""
    from flax import nnx

    from jlora._boxes import rebox, unbox
    from jlora._targets import LORA

    if isinstance(params, nnx.Module):
        for _, v in nnx.to_flat_state(nnx.state(params)):
            if isinstance(v, nnx.Variable) and is_quantized(v.get_raw_value()):
                v.set_raw_value(v.get_raw_value().dequantize())
        return params
    tree = _tree_walk()(params)
    out = []
    for node in tree.nodes:
        if node.kind == LORA and is_quantized(unbox(node.value.w)):
            lw = node.value
            out.append(node.put_back(lw.replace(w=rebox(lw.w, unbox(lw.w).dequantize()))))
        elif is_quantized(unbox(node.value)):
            out.append(node.put_back(rebox(node.value, unbox(node.value).dequantize())))
        else:
            out.append(node.leaf)
    return tree.rebuild(out)
