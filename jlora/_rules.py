"""The rule table: how each primitive acts on a `Factored` kernel.

A rule takes `(ctx, eqn, invals)` (some inputs `Factored`) and returns the list of
outputs. Rules keep the low-rank form where it survives and otherwise call
`ctx.materialize`, which warns (or raises in strict mode). How a kernel's axes move
through a primitive is read from `_axes.py`, the description the probe reads too;
parameters are read through `_jax_compat.py`. Call-like rules re-enter through the
public API (`jax.jit`, `jax.checkpoint`, `lax.switch`, `lax.while_loop`, `lax.scan`,
`jax.shard_map`) with an interpreting closure.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding, PartitionSpec

from jlora import _axes
from jlora import _jax_compat as compat
from jlora._interpret import Factored, interpret
from jlora._sharding import constrain, factor_specs
from jlora._weight import Layout

RULES: dict = {}
XA_NAME = "lora_xa"


def rule(*names):
    def register(fn):
        for name in names:
            RULES[name] = fn
        return fn

    return register


def _fallback(ctx, eqn, invals, why=""):
    name = compat.primitive_name(eqn)
    return compat.bind(eqn, [ctx.materialize(v, name, why) for v in invals])


# dot_general ----------------------------------------------------------------------------


def _derived_sharding(out_sharding, ndim: int, dims):
    """`out_sharding` re-indexed: entry `d` of `dims` takes the original's axis `d`
    (None: a new, unsharded axis such as the rank)."""
    if out_sharding is None:
        return None
    named = isinstance(out_sharding, NamedSharding)
    original = out_sharding.spec if named else out_sharding
    spec = compat.spec_entries(original)
    spec += (None,) * (ndim - len(spec))
    new = compat.spec_like(original, [None if d is None else spec[d] for d in dims])
    if not named:
        return new
    return NamedSharding(out_sharding.mesh, new, memory_kind=out_sharding.memory_kind)


def _sharding_kw(sharding):
    return {} if sharding is None else {"out_sharding": sharding}


def _contract_low_rank(ctx, opts, x, f: Factored, x_use, k_use, out_axis_of):
    """`x . (scale * a @ b)` with the kernel's free axes after x's (kernel as rhs);
    `x` as the LoRA branch sees it (dropout already applied).

    `x_use`/`k_use` are the dot's contracted and batch axes of `x` and of the kernel;
    `out_axis_of[i]` is the dot output axis that axis `i` of this result becomes, so
    an explicit `out_sharding` of the dot (explicit-axis meshes) carries over to the
    two low-rank dots.
    """
    lay = f.layout
    ns = len(lay.stack_axes)
    if set(k_use.contract) == set(lay.in_axes):
        # x . a over the input axes (a: [*stack, *in, r]), then . b over the rank.
        near, near_axes = f.a, lay.stack_axes + lay.in_axes
        far, far_free = f.b, lay.out_axes
    else:
        # The kernel used transposed (a tied embedding `x @ E.T`): x . b, then . a.
        near, near_axes = f.b, lay.stack_axes + (None,) + lay.out_axes
        far, far_free = jnp.moveaxis(f.a, -1, ns), lay.in_axes
    pos = {k: i for i, k in enumerate(near_axes) if k is not None}
    dtype = x.dtype
    n_out = len(out_axis_of)
    n_x_kept = x.ndim - len(x_use.contract)  # batch and free axes of x, in the output
    h_sharding = _derived_sharding(
        opts.out_sharding, n_out, [*out_axis_of[:n_x_kept], None]
    )
    h = lax.dot_general(
        x,
        near.astype(dtype),
        (
            (x_use.contract, tuple(pos[k] for k in k_use.contract)),
            (x_use.batch, tuple(pos[k] for k in k_use.batch)),
        ),
        precision=opts.precision,
        preferred_element_type=opts.preferred_element_type,
        **_sharding_kw(h_sharding),
    )
    h = checkpoint_name(h * jnp.asarray(f.scale, h.dtype), XA_NAME).astype(dtype)
    # The far factor as [*batch (in the dot's order), r, *free ascending].
    perm = [lay.stack_axes.index(k) for k in k_use.batch] + [ns]
    perm += [ns + 1 + far_free.index(k) for k in sorted(far_free)]
    far = jnp.transpose(far, perm).astype(dtype)
    nb = len(k_use.batch)
    return lax.dot_general(
        h,
        far,
        (((h.ndim - 1,), (nb,)), (tuple(range(nb)), tuple(range(nb)))),
        precision=opts.precision,
        preferred_element_type=opts.preferred_element_type,
        **_sharding_kw(_derived_sharding(opts.out_sharding, n_out, out_axis_of)),
    )


@rule("dot_general")
def dot_general_rule(ctx, eqn, invals):
    lhs, rhs = invals
    if isinstance(lhs, Factored) and isinstance(rhs, Factored):
        return _fallback(ctx, eqn, invals, "both operands adapted")
    side = 1 if isinstance(rhs, Factored) else 0
    f, x = (rhs, lhs) if side == 1 else (lhs, rhs)
    k_use = _axes.uses(eqn, side, f.w.ndim)
    x_use = _axes.uses(eqn, 1 - side, x.ndim)
    lay = f.layout
    contracts = set(k_use.contract)
    if set(k_use.batch) != set(lay.stack_axes) or contracts not in (
        set(lay.in_axes),
        set(lay.out_axes),
    ):
        return _fallback(
            ctx,
            eqn,
            invals,
            f"contracts kernel axes {k_use.contract} with batch {k_use.batch}, "
            f"layout {lay}",
        )
    ctx.note(f, "dot_general")

    def dense(x):
        return compat.bind(eqn, [x, f.w] if side == 1 else [f.w, x])[0]

    nb = len(k_use.batch)
    n_k_free, n_x_free = len(k_use.free), len(x_use.free)
    if side == 1:
        out_axis_of = list(range(nb + n_x_free + n_k_free))
    else:  # dot_general(kernel, x) puts the kernel's free axes before x's
        out_axis_of = list(range(nb)) + [nb + n_k_free + i for i in range(n_x_free)]
        out_axis_of += [nb + i for i in range(n_k_free)]
    opts = compat.dot_options(eqn)

    def low_rank(x):
        y = _contract_low_rank(ctx, opts, x, f, x_use, k_use, out_axis_of)
        if side == 0:
            y = jnp.transpose(y, [out_axis_of.index(i) for i in range(len(out_axis_of))])
        return y

    xd = ctx.dropout(x, f)
    g = f.magnitude_factor()
    if g is None:
        base = dense(x)
        return [base + low_rank(xd).astype(base.dtype)]
    # DoRA: the kernel is g * (w + scale * a @ b), g per output element of the kernel.
    dropped = xd is not x
    if contracts == set(lay.out_axes):  # used transposed: g scales x's contracted axes
        on_x = [None] * x.ndim
        for i, k in zip(x_use.contract + x_use.batch, k_use.contract + k_use.batch):
            on_x[i] = k
        gx = _on_axes(g, f.layout, on_x).astype(x.dtype)
        if not dropped:
            xs = x * gx
            base = dense(xs)
            return [base + low_rank(xs).astype(base.dtype)]
        base = dense(x)
        one = jnp.ones((), x.dtype)
        y = dense(xd * (gx - one)) + low_rank(xd * gx).astype(base.dtype)
        return [base + y]
    out_shape = compat.var_shape(eqn.outvars[0])
    on_out = [None] * len(out_shape)
    kernel_first = side == 0
    for j, k in enumerate(k_use.batch):
        on_out[j] = k
    for j, k in enumerate(sorted(k_use.free)):
        on_out[nb + j if kernel_first else nb + n_x_free + j] = k
    base = dense(x)
    go = _on_axes(g, f.layout, on_out).astype(base.dtype)
    if not dropped:  # PEFT's form at dropout 0: g * (x @ w + scale * x @ a @ b)
        return [go * (base + low_rank(x).astype(base.dtype))]
    one = jnp.ones((), base.dtype)  # PEFT's: the magnitude term sees the dropped input
    return [base + (go - one) * dense(xd) + go * low_rank(xd).astype(base.dtype)]


def _on_axes(g, lay: Layout, want):
    """A `b`-like value `g` (`[*stack, 1, *out]`) arranged on the axes of another
    array: `want[i]` is the kernel axis that array's axis `i` holds (None: size 1)."""
    ns = len(lay.stack_axes)
    g = jnp.squeeze(g, ns)
    have = list(lay.stack_axes + lay.out_axes)
    order = [k for k in want if k is not None]
    g = jnp.transpose(g, [have.index(k) for k in order])
    return g.reshape([1 if k is None else g.shape[order.index(k)] for k in want])


# Primitives that move a kernel's axes ---------------------------------------------------


def _factor_axes(lay: Layout):
    """The kernel axis each axis of `a` and of `b` holds (None: the rank)."""
    return lay.stack_axes + lay.in_axes + (None,), lay.stack_axes + (None,) + lay.out_axes


def _window(eqn, rest, shape):
    """`(starts, sizes, strides)` per input axis of a slice (static or dynamic)."""
    name = compat.primitive_name(eqn)
    if name == "slice":
        starts, limits, strides = compat.slice_params(eqn)
        strides = tuple(strides or (1,) * len(shape))
        sizes = [-(-(lim - s) // d) for s, lim, d in zip(starts, limits, strides)]
        return list(starts), sizes, list(strides)
    if name == "dynamic_slice":
        return list(rest), list(compat.dynamic_slice_sizes(eqn)), [1] * len(shape)
    return [0] * len(shape), list(shape), [1] * len(shape)


def _narrow(x, axes, starts, sizes, strides, dynamic: bool):
    """Factor `x`, whose axis `i` holds kernel axis `axes[i]` (None: the rank), narrowed
    as a slice narrows the kernel: `W[rows, cols] = w[rows, cols] + s a[rows] @ b[:, cols]`.
    A dynamic slice clamps its starts to fit; each factor axis has its kernel axis's
    size, so the factors are clamped alike."""
    st = [0 if k is None else starts[k] for k in axes]
    sz = [x.shape[i] if k is None else sizes[k] for i, k in enumerate(axes)]
    if dynamic:
        return lax.dynamic_slice(x, [jnp.asarray(s, jnp.int32) for s in st], sz)
    sd = [1 if k is None else strides[k] for k in axes]
    limits = [s + (z - 1) * d + 1 if z else s for s, z, d in zip(st, sz, sd)]
    return lax.slice(x, st, limits, sd)


_OWN_RULES = ("sharding_constraint", "reshard", "pvary", "pcast", "split")


@rule(*(name for name in _axes.MOVES if name not in _OWN_RULES))
def move_rule(ctx, eqn, invals):
    """One rule for every primitive `_axes.moves` describes.

    The frozen kernel goes through the primitive itself; the layout follows its axes:
    kept axes are renamed; a slice narrows any axis (the factors are sliced alike:
    `a` along the input axes, `b` along the outputs, both along stacked ones); a
    broadcast may grow size-1 axes (the factors are broadcast alike); new axes become
    leading stacked axes (every new slice carries the same update); dropped (size-1)
    axes go from the factors too. When the last input (or output) axis goes, what is
    left is a row (a column) read out of the kernel, `table[i]`: that value is
    returned as `w_i + scale * a_i @ b`, the size of the result; so are rows read at
    a traced offset (`dynamic_slice` of input axes, `lax.dynamic_slice_in_dim(table,
    t, n)`), as a gather returns them.
    """
    f, *rest = invals
    name = compat.primitive_name(eqn)
    if any(isinstance(v, Factored) for v in rest):
        return _fallback(ctx, eqn, invals, "an adapted kernel as an index")
    moves = _axes.moves(eqn, f.shape)
    if moves is None and name == "reshape":
        return _regroup(ctx, eqn, f)
    if moves is None:
        return _fallback(ctx, eqn, invals, "mixes the kernel's axes")
    lay = f.layout
    ndim = len(f.shape)
    where = {src: i for i, src in enumerate(moves) if src is not None}
    dropped = [i for i in range(ndim) if i not in where]
    if set(lay.in_axes) <= set(dropped) or set(lay.out_axes) <= set(dropped):
        ctx.note(f, name)
        return compat.bind(eqn, [f.materialize(), *rest])
    out_shape = compat.var_shape(eqn.outvars[0])
    resized = [i for i in where if out_shape[where[i]] != f.shape[i]]
    if f.m is not None and set(lay.in_axes) & set(resized):
        # DoRA's norm runs over the input axes: a slice (or broadcast) of them is one
        # of the rescaled kernel, not a kernel of its own to rescale.
        return _fallback(ctx, eqn, invals, "slices the input axes of a DoRA kernel")
    w = compat.bind(eqn, [f.w, *rest])[0]
    a_axes, b_axes = _factor_axes(lay)
    a, b, m = f.a, f.b, f.m
    if resized and name == "broadcast_in_dim":  # size-1 axes grown

        def grow(x, axes):
            shape = [
                out_shape[where[k]] if k in resized else n for k, n in zip(axes, x.shape)
            ]
            return jnp.broadcast_to(x, shape)

        a, b, m = grow(a, a_axes), grow(b, b_axes), _maybe(grow, m, b_axes)
    elif resized:
        window = _window(eqn, rest, f.shape)
        dynamic = name == "dynamic_slice"
        a, b = _narrow(a, a_axes, *window, dynamic), _narrow(b, b_axes, *window, dynamic)
        m = _maybe(_narrow, m, b_axes, *window, dynamic)
        if set(_axes.looked_up(eqn, f.shape)) & set(lay.in_axes):
            # Rows read at a traced offset (a position table while decoding): a lookup,
            # whose value, `w[rows] + scale * a[rows] @ b`, is the size of the result.
            ctx.note(f, name)
            return [f.replace(w=w, a=a, b=b).materialize()]
    if dropped:
        a = jnp.squeeze(a, tuple(i for i, k in enumerate(a_axes) if k in dropped))
        b_dropped = tuple(i for i, k in enumerate(b_axes) if k in dropped)
        b, m = jnp.squeeze(b, b_dropped), _maybe(jnp.squeeze, m, b_dropped)
    new = [i for i, src in enumerate(moves) if src is None]
    if new:  # new leading stacked axes
        lead = tuple(w.shape[i] for i in new)
        a, b = jnp.broadcast_to(a, lead + a.shape), jnp.broadcast_to(b, lead + b.shape)
        if m is not None:
            m = jnp.broadcast_to(m, lead + m.shape)

    def kept(axes):
        return tuple(where[i] for i in axes if i in where)

    layout = Layout(
        kept(lay.in_axes), kept(lay.out_axes), tuple(new) + kept(lay.stack_axes)
    )
    ctx.note(f, name)
    return [f.replace(w=w, a=a, b=b, m=m, layout=layout)]


def _maybe(fn, x, *args):
    """`fn(x, *args)`, or None where `x` is (DoRA's magnitude, when off)."""
    return None if x is None else fn(x, *args)


@rule("split")
def split_rule(ctx, eqn, invals):
    """`jnp.split` (a fused kernel into its parts): each part a slice, factors sliced."""
    (f,) = invals
    sizes, axis = compat.split_params(eqn)
    if f.m is not None and axis in f.layout.in_axes:  # (DoRA: see move_rule)
        return _fallback(ctx, eqn, invals, "splits the input axes of a DoRA kernel")
    a_axes, b_axes = _factor_axes(f.layout)
    ndim = len(f.shape)
    outs, start = [], 0
    for w, n in zip(compat.bind(eqn, [f.w]), sizes):
        starts, shape = [0] * ndim, list(f.shape)
        starts[axis], shape[axis] = start, n
        window = (starts, shape, [1] * ndim)
        a, b = _narrow(f.a, a_axes, *window, False), _narrow(f.b, b_axes, *window, False)
        m = _maybe(_narrow, f.m, b_axes, *window, False)
        outs.append(f.replace(w=w, a=a, b=b, m=m))
        start += n
    ctx.note(f, "split")
    return outs


def _regroup(ctx, eqn, f: Factored):
    """A reshape that merges or splits runs of axes of one role (`[d, h, hd]` to
    `[d, h * hd]` and back): the factors' axes of each role, in the kernel's order, are
    reshaped alike. New size-1 axes become stacked axes."""
    groups = _axes.regroups(eqn, f.shape)
    lay = f.layout
    role = {k: r for r, axes in zip("ios", lay) for k in axes}
    new_role = {}
    for ins, outs in groups or ():
        roles = {role[k] for k in ins} or {"s"}
        if len(roles) != 1:
            return _fallback(
                ctx, eqn, [f], f"merges kernel axes {list(ins)} of different roles, {lay}"
            )
        new_role.update(dict.fromkeys(outs, roles.pop()))
    new_in, new_out, new_stack = (
        tuple(j for j in sorted(new_role) if new_role[j] == r) for r in "ios"
    )
    if groups is None or not new_in or not new_out:
        return _fallback(ctx, eqn, [f], f"mixes the kernel's axes, {lay}")
    out_shape = compat.var_shape(eqn.outvars[0])
    a_axes, b_axes = _factor_axes(lay)
    ins, outs, stack = (sorted(axes) for axes in lay)

    def sizes(axes):
        return [out_shape[j] for j in axes]

    rank = f.a.shape[-1]
    a = jnp.transpose(f.a, [a_axes.index(k) for k in stack + ins] + [len(a_axes) - 1])
    a = a.reshape(sizes(new_stack) + sizes(new_in) + [rank])
    ns = len(lay.stack_axes)
    b = jnp.transpose(
        f.b, [b_axes.index(k) for k in stack] + [ns] + [b_axes.index(k) for k in outs]
    )
    b = b.reshape(sizes(new_stack) + [rank] + sizes(new_out))
    m = f.m
    if m is not None:  # DoRA's magnitude, as `b` with a rank of 1
        order = [b_axes.index(k) for k in stack] + [ns] + [b_axes.index(k) for k in outs]
        m = jnp.transpose(m, order).reshape(sizes(new_stack) + [1] + sizes(new_out))
    w = compat.bind(eqn, [f.w])[0]
    ctx.note(f, "reshape")
    return [f.replace(w=w, a=a, b=b, m=m, layout=Layout(new_in, new_out, new_stack))]


# Joins and scalings ---------------------------------------------------------------------


def _joint_path(ctx, parts) -> str:
    paths = list(dict.fromkeys(p.path for p in parts))
    if len(paths) == 1:
        return paths[0]
    joint = " + ".join(paths)
    ctx.joints[joint] = tuple(
        dict.fromkeys(q for p in paths for q in ctx.joints.get(p, (p,)))
    )  # (a joint of joints notes each original kernel)
    return joint


def _wide(dtypes):
    """The widest of `dtypes` (the first among equals): the joint factor's dtype."""
    return max(dtypes, key=lambda d: jnp.dtype(d).itemsize)


@rule("concatenate")
def concatenate_rule(ctx, eqn, invals):
    """Kernels (and plain arrays) joined along one axis stay one low-rank kernel.

    Along an output axis, `[W1 | W2] = [w1 | w2] + [a1, a2] @ [[s1 b1, 0], [0, s2 b2]]`:
    `a`s joined along the rank, `b` block-diagonal (rank r1 + r2); along an input axis
    the same with the roles of `a` and `b` swapped; along a stacked axis, factors joined
    along it, ranks padded with zeros to the largest. A plain array's part of the
    factors is zero, the array itself is in `w`. Equal scales stay the scale; unequal
    ones are folded into each part of `b` (the joint scale is 1).
    """
    axis = compat.concatenate_axis(eqn)
    parts = [v for v in invals if isinstance(v, Factored)]
    lay = parts[0].layout
    if any(p.layout != lay for p in parts):
        layouts = sorted({str(p.layout) for p in parts})
        return _fallback(ctx, eqn, invals, f"joins kernels of different layouts {layouts}")
    if len({p.dropout for p in parts}) > 1:
        return _fallback(ctx, eqn, invals, "joins kernels of different dropout rates")
    if any(p.m is not None for p in parts):
        return _fallback(ctx, eqn, invals, "joins DoRA kernels, each with its own norm")
    w = compat.bind(eqn, [v.w if isinstance(v, Factored) else v for v in invals])[0]
    scale = parts[0].scale if len({p.scale for p in parts}) == 1 else 1.0
    a_dtype, b_dtype = _wide([p.a.dtype for p in parts]), _wide([p.b.dtype for p in parts])
    ranks = [p.a.shape[-1] for p in parts]
    a_axes, b_axes = _factor_axes(lay)
    ns = len(lay.stack_axes)
    along_stack = axis in lay.stack_axes
    total = max(ranks) if along_stack else sum(ranks)

    def b_of(p):
        b = p.b.astype(b_dtype)
        return b if p.scale == scale else b * jnp.asarray(p.scale / scale, b_dtype)

    def rank_padded(x, rank_axis, before, after):
        pad = [(0, 0)] * x.ndim
        pad[rank_axis] = (before, after)
        return jnp.pad(x, pad)

    def zeros(axes, dtype, n):
        """A factor part for a plain array: zero, `n` long along the joined axis."""
        shape = [total if k is None else n if k == axis else w.shape[k] for k in axes]
        return jnp.zeros(shape, dtype)

    a_pieces, b_pieces, offset = [], [], 0
    for v in invals:
        n = v.shape[axis] if isinstance(v, Factored) else jnp.shape(v)[axis]
        if not isinstance(v, Factored):
            a_pieces.append(zeros(a_axes, a_dtype, n))
            b_pieces.append(zeros(b_axes, b_dtype, n))
            continue
        a, b, r = v.a.astype(a_dtype), b_of(v), v.a.shape[-1]
        before, after = (0, total - r) if along_stack else (offset, total - offset - r)
        a_pieces.append(rank_padded(a, a.ndim - 1, before, after))
        b_pieces.append(rank_padded(b, ns, before, after))
        offset += r
    if axis in lay.out_axes:  # a joined along the rank; b block-diagonal
        a = jnp.concatenate([p.a.astype(a_dtype) for p in parts], axis=-1)
        b = jnp.concatenate(b_pieces, axis=b_axes.index(axis))
    elif axis in lay.in_axes:  # b joined along the rank; a block-diagonal
        a = jnp.concatenate(a_pieces, axis=a_axes.index(axis))
        b = jnp.concatenate([b_of(p) for p in parts], axis=ns)
    else:  # along a stacked axis
        a = jnp.concatenate(a_pieces, axis=a_axes.index(axis))
        b = jnp.concatenate(b_pieces, axis=b_axes.index(axis))
    ctx.note_all(parts, "concatenate")
    path = _joint_path(ctx, parts)
    return [parts[0].replace(w=w, a=a, b=b, scale=scale, path=path)]


def _as_factor(m, axes):
    """A multiplier `m` (the kernel's rank, size 1 where it does not vary, which must
    include every kernel axis not in `axes`) laid out for a factor whose axis `i` holds
    kernel axis `axes[i]` (None: the rank)."""
    held = [k for k in axes if k is not None]
    m = jnp.squeeze(m, tuple(k for k in range(m.ndim) if k not in held))
    m = jnp.transpose(m, [sorted(held).index(k) for k in held])
    return jnp.expand_dims(m, axes.index(None))


@rule("mul", "div")
def scale_rule(ctx, eqn, invals):
    """A kernel times (or over) a scalar, or an array varying along outputs (or inputs)
    only: `W * m = w * m + scale * a @ (b * m)` (or `(a * m) @ b`). A concrete scalar
    goes into the static scale; a traced one into `b`, so its gradient flows."""
    name = compat.primitive_name(eqn)
    x, y = invals
    if isinstance(x, Factored) and isinstance(y, Factored):
        return _fallback(ctx, eqn, invals, "both operands adapted")
    if name == "div" and isinstance(y, Factored):
        return _fallback(ctx, eqn, invals, "divides by an adapted kernel")
    f, m = (x, y) if isinstance(x, Factored) else (y, x)
    lay = f.layout
    shape = jnp.shape(m)
    if len(shape) not in (0, len(f.shape)):
        return _fallback(ctx, eqn, invals, f"a multiplier of shape {shape}")
    varying = {k for k, n in enumerate(shape) if n != 1}
    dora = f.m is not None and not f.fixed  # (a fixed factor g just carries over)
    if dora and not varying <= set(lay.out_axes + lay.stack_axes):
        return _fallback(
            ctx, eqn, invals, f"a DoRA kernel scaled along its input axes, {lay}"
        )
    w = compat.bind(eqn, [f.w if v is f else v for v in invals])[0]
    a, b, scale, mag = f.a, f.b, f.scale, f.m
    concrete = not varying and not compat.is_tracer(m)
    value = float(np.asarray(m).reshape(())) if concrete else None
    if concrete and (name == "mul" or value != 0.0):
        scale = scale * value if name == "mul" else scale / value
        if dora:  # DoRA: the norm scales by |c|, the magnitude alike
            mag = mag * abs(value) if name == "mul" else mag / abs(value)
    elif varying <= set(lay.out_axes + lay.stack_axes):
        _, b_axes = _factor_axes(lay)
        mb = jnp.reshape(m, (1,) * len(f.shape)) if not shape else m
        mb = _as_factor(mb, b_axes)
        b = b * mb.astype(b.dtype) if name == "mul" else b / mb.astype(b.dtype)
        if dora:  # DoRA: the norm scales by |c| (a constant of the
            # backward pass, as the norm is), the magnitude alike
            c = lax.stop_gradient(jnp.abs(mb).astype(mag.dtype))
            mag = mag * c if name == "mul" else mag / c
    elif varying <= set(lay.in_axes + lay.stack_axes):
        a_axes, _ = _factor_axes(lay)
        ma = _as_factor(m, a_axes).astype(a.dtype)
        a = a * ma if name == "mul" else a / ma
    else:
        return _fallback(
            ctx, eqn, invals, f"a multiplier varying along inputs and outputs, {lay}"
        )
    ctx.note(f, name)
    return [f.replace(w=w, a=a, b=b, scale=scale, m=mag)]


@rule("neg")
def neg_rule(ctx, eqn, invals):
    (f,) = invals
    ctx.note(f, "neg")
    return [f.replace(w=compat.bind(eqn, [f.w])[0], scale=-f.scale)]


# Embeddings and convolutions ------------------------------------------------------------


@rule("gather")
def gather_rule(ctx, eqn, invals):
    """A lookup of rows (`jnp.take`, `table[ids]`, `table[i]` under `vmap`, windows of
    rows): the same gather of `a`, laid out like the kernel with the rank in place of
    the output axes, then `@ b`. The output axes must be taken whole."""
    f, idx = invals
    if isinstance(idx, Factored):
        return _fallback(ctx, eqn, invals, "an adapted kernel as the indices")
    g = compat.gather_options(eqn)
    dn = g.dimension_numbers
    lay = f.layout
    batching = tuple(getattr(dn, "operand_batching_dims", ()))
    kept = [k for k in range(f.w.ndim) if k not in dn.collapsed_slice_dims + batching]
    if lay.stack_axes or any(
        k not in kept or g.slice_sizes[k] != f.shape[k] for k in lay.out_axes
    ):
        return _fallback(
            ctx, eqn, invals, f"not a lookup of whole rows (output axes kept), {lay}"
        )
    ctx.note(f, "gather")
    base = compat.bind(eqn, [f.w, idx])[0]
    # `a` as the kernel's axes: inputs in place, the rank at the first output axis,
    # size 1 at the other output axes (taken whole, so their starts clamp to 0 alike).
    first, *others = sorted(lay.out_axes)
    n_in = len(lay.in_axes)
    perm = [
        n_in if k == first else lay.in_axes.index(k)
        for k in range(f.w.ndim)
        if k not in others
    ]
    a_k = jnp.expand_dims(jnp.transpose(f.a, perm), tuple(others))
    rank = f.a.shape[-1]
    sizes = [
        rank if k == first else 1 if k in others else g.slice_sizes[k]
        for k in range(f.w.ndim)
    ]
    rows = lax.gather(
        a_k,
        idx,
        dimension_numbers=dn,
        slice_sizes=tuple(sizes),
        indices_are_sorted=g.indices_are_sorted,
        unique_indices=g.unique_indices,
        mode=g.mode,
        fill_value=g.fill_value,
    )
    pos = {k: dn.offset_dims[kept.index(k)] for k in lay.out_axes}
    h = jnp.squeeze(rows, tuple(pos[k] for k in others))
    h = jnp.moveaxis(h, pos[first] - sum(pos[k] < pos[first] for k in others), -1)
    h = h.astype(base.dtype) * jnp.asarray(f.scale, base.dtype)
    b = f.b.astype(base.dtype)
    y = jnp.matmul(h, b.reshape(rank, -1)).reshape(h.shape[:-1] + b.shape[1:])
    # y's axes: the result's non-output axes in order, then the outputs in layout order.
    src = [p for p in range(base.ndim) if p not in pos.values()]
    src += [pos[k] for k in lay.out_axes]
    y = base + jnp.transpose(y, [src.index(p) for p in range(base.ndim)])
    g = f.magnitude_factor()
    if g is not None:  # DoRA: each row of g * (w + scale * a @ b)
        where = {p: k for k, p in pos.items()}
        y = y * _on_axes(g, lay, [where.get(p) for p in range(base.ndim)]).astype(y.dtype)
    return [y]


@rule("conv_general_dilated")
def conv_rule(ctx, eqn, invals):
    """`conv(x, w) + scale * conv(x, a) @ b`, `a` laid out as a kernel with `r` output
    features. Grouped (`feature_group_count = G`): group `g`'s outputs see group `g`'s
    inputs; one conv with `a` repeated per group (`G * r` features) gives each group's
    `x_g . a`, and each output feature takes its own group's `r` of them into `b`."""
    x, f = invals
    if isinstance(x, Factored):
        return _fallback(ctx, eqn, invals, "adapted kernel as the conv input")
    c = compat.conv_options(eqn)
    lay = f.layout
    use = _axes.uses(eqn, 1, f.w.ndim)
    if (
        lay.stack_axes
        or lay.out_axes != use.free
        or set(lay.in_axes) != set(use.contract)
        or c.batch_group_count != 1
    ):
        return _fallback(
            ctx,
            eqn,
            invals,
            f"batch_group_count={c.batch_group_count} or a layout other than the "
            f"conv's (inputs {use.contract}, output feature {use.free}): {lay}",
        )
    ctx.note(f, "conv_general_dilated")
    base = compat.bind(eqn, [x, f.w])[0]
    groups = c.feature_group_count
    (out_feature,) = use.free
    n_in = len(lay.in_axes)
    perm = [n_in if k == out_feature else lay.in_axes.index(k) for k in range(f.w.ndim)]
    a_kernel = jnp.transpose(f.a, perm).astype(x.dtype)
    if groups > 1:
        a_kernel = jnp.concatenate([a_kernel] * groups, axis=out_feature)
    xd = ctx.dropout(x, f)
    h = compat.bind(eqn, [xd, a_kernel])[0]
    h = checkpoint_name(h * jnp.asarray(f.scale, h.dtype), XA_NAME)
    feat = c.dimension_numbers.out_spec[1]
    h = jnp.moveaxis(h, feat, -1)
    rank = f.a.shape[-1]
    b = f.b.astype(h.dtype)
    if groups == 1:
        y = jnp.matmul(h, b)
    else:  # [..., G, r] . [r, G, out/G] per group
        h = h.reshape(h.shape[:-1] + (groups, rank))
        b = b.reshape(rank, groups, -1)
        y = jnp.einsum("...gr,rgo->...go", h, b).reshape(h.shape[:-2] + (-1,))
    y = jnp.moveaxis(y, -1, feat).astype(base.dtype)
    g = f.magnitude_factor()
    if g is None:
        return [base + y]
    # DoRA: g per output feature; with dropout the magnitude term sees the dropped x.
    want = [None] * base.ndim
    want[feat] = out_feature
    go = _on_axes(g, lay, want).astype(base.dtype)
    if xd is x:
        return [go * (base + y)]
    dropped = compat.bind(eqn, [xd, f.w])[0]
    return [base + (go - jnp.ones((), base.dtype)) * dropped + go * y]


# Sharding -------------------------------------------------------------------------------


def _factor_shardings(f: Factored, sharding, unconstrained=()):
    """`(a, b)` shardings derived from a sharding of the kernel, or None if it can't be.

    A `NamedSharding` gives `a` the kernel's input (and stacked) axes and `b` its
    output axes, rank replicated; a fully replicated sharding of another kind is
    shared by the factors as is.
    """
    if isinstance(sharding, NamedSharding):
        a, b = factor_specs(sharding.spec, f.w.ndim, f.layout, unconstrained)
        return NamedSharding(sharding.mesh, a), NamedSharding(sharding.mesh, b)
    if getattr(sharding, "is_fully_replicated", False):
        return sharding, sharding
    return None


@rule("sharding_constraint")
def sharding_constraint_rule(ctx, eqn, invals):
    (f,) = invals
    sharding, unconstrained = compat.sharding_constraint_params(eqn)
    shardings = _factor_shardings(f, sharding, unconstrained)
    if shardings is None:
        return _fallback(ctx, eqn, invals, f"sharding of type {type(sharding).__name__}")
    ctx.note(f, "sharding_constraint")
    w = compat.bind(eqn, [f.w])[0]
    a, b = constrain(f.a, shardings[0]), constrain(f.b, shardings[1])
    return [f.replace(w=w, a=a, b=b, m=_maybe(constrain, f.m, shardings[1]))]


@rule("reshard")
def reshard_rule(ctx, eqn, invals):
    (f,) = invals
    shardings = _factor_shardings(f, compat.reshard_sharding(eqn))
    if shardings is None:
        return _fallback(ctx, eqn, invals, "not a NamedSharding")
    ctx.note(f, "reshard")
    w = compat.bind(eqn, [f.w])[0]
    a, b = (jax.sharding.reshard(x, s) for x, s in zip((f.a, f.b), shardings))
    m = _maybe(jax.sharding.reshard, f.m, shardings[1])
    return [f.replace(w=w, a=a, b=b, m=m)]


@rule("pvary", "pcast")
def varying_rule(ctx, eqn, invals):
    """Inside `shard_map`, a value's varying-axes type changes: `w`, `a` and `b` all
    change alike (the sum of a varying value and an invariant one is varying)."""
    (f,) = invals
    ctx.note(f, compat.primitive_name(eqn))
    w, a, b = (compat.bind(eqn, [x])[0] for x in (f.w, f.a, f.b))
    m = _maybe(lambda x: compat.bind(eqn, [x])[0], f.m)
    return [f.replace(w=w, a=a, b=b, m=m)]


@rule("optimization_barrier")
def optimization_barrier_rule(ctx, eqn, invals):
    # One barrier over every operand, each adapted kernel as its w, a and b together.
    ctx.note_all(invals, "optimization_barrier")
    flat, rebuild = _flatten_factored(invals)
    return rebuild(lax.optimization_barrier(flat))


@rule("shard_map")
def shard_map_rule(ctx, eqn, invals):
    """The body sees each adapted kernel's local block as a local low-rank value.

    A kernel block `W[rows, cols]` is exactly `w_local + scale * a[rows] @ b[:, cols]`,
    so `a` enters with the kernel's spec on its input axes and `b` with its spec on the
    output axes (rank replicated), and the body runs on them factored. Partial sums over
    a sharded input axis stay partial sums of the same form, so the body's own `psum`
    completes both terms.
    """
    in_specs, out_specs = compat.shard_map_specs(eqn)
    jaxpr, consts = compat.call_jaxpr(eqn)
    mesh = compat.shard_map_mesh(eqn)
    operands, specs = [], []
    for val, spec in zip(invals, in_specs):
        if isinstance(val, Factored) and val.m is not None and _splits_inputs(val, spec):
            # DoRA's norm runs over the input axes: a block of rows has its own norm,
            # and the body's psum does not undo the rescaling by it.
            val = ctx.materialize(val, "shard_map", "a DoRA kernel split along inputs")
        if isinstance(val, Factored):
            a_spec, b_spec = factor_specs(spec, val.w.ndim, val.layout)
            a = constrain(val.a, NamedSharding(mesh, a_spec))
            b = constrain(val.b, NamedSharding(mesh, b_spec))
            m = _maybe(constrain, val.m, NamedSharding(mesh, b_spec))
            operands.append(val.replace(a=a, b=b, m=m))
            specs += [spec, a_spec, b_spec] + ([] if m is None else [b_spec])
        else:
            operands.append(val)
            specs.append(spec)
    flat, rebuild = _flatten_factored(operands)
    ctx.note_all(invals, "shard_map")
    keyed = ctx.rng is not None  # the dropout key goes in as a replicated operand

    def body(*args):
        inner = ctx.manual(
            args[0] if keyed else None,
            compat.shard_map_manual_axes(eqn),
            compat.shard_map_checks_vma(eqn),
        )
        outs = interpret(inner, jaxpr, consts, rebuild(args[1:] if keyed else args))
        return tuple(inner.materialize_all(outs, "shard_map output"))

    if keyed:
        flat, specs = [ctx.rng, *flat], [PartitionSpec(), *specs]
    return list(compat.shard_map_call(eqn, body, specs, out_specs)(*flat))


def _splits_inputs(f: Factored, spec) -> bool:
    """Whether a `shard_map` in-spec splits any input axis of kernel `f`."""
    entries = compat.spec_entries(spec)
    return any(i < len(entries) and entries[i] is not None for i in f.layout.in_axes)


# Call-like primitives -------------------------------------------------------------------


def _flatten_factored(values):
    """`values` with each `Factored` as its `w`, `a`, `b` (and DoRA's `m`), and the
    inverse."""
    flat, slots = [], []
    for v in values:
        if isinstance(v, Factored):
            slots.append(v)
            flat += [v.w, v.a, v.b] + ([] if v.m is None else [v.m])
        else:
            slots.append(None)
            flat.append(v)

    return flat, lambda args: _refill(slots, args)


def _refill(slots, flat) -> list:
    """The inverse of `_flatten_factored`: `slots` holds, per value, None (one plain
    value) or the `Factored` whose `w`, `a`, `b` come next in `flat`."""
    out, i = [], 0
    for src in slots:
        if src is None:
            out.append(flat[i])
            i += 1
        elif src.m is None:
            out.append(src.replace(w=flat[i], a=flat[i + 1], b=flat[i + 2]))
            i += 3
        else:  # (DoRA's magnitude after the factors)
            w, a, b, m = flat[i : i + 4]
            out.append(src.replace(w=w, a=a, b=b, m=m))
            i += 4
    return out


def _flat_shardings(f: Factored, sh) -> list:
    """The shardings of `_flatten_factored`'s arrays for `f` from the kernel's `sh`."""
    a_sh, b_sh = _factor_shardings(f, sh) or (None, None)
    return [sh, a_sh, b_sh] + ([] if f.m is None else [b_sh])


def _only_named(opts) -> bool:
    """A jit with no shardings, donation or options: nothing but its name to keep."""
    return (
        all(s is None for s in opts.in_shardings + opts.out_shardings)
        and not any(opts.donated)
        and not opts.keep_unused
        and not opts.compiler_options
    )


@rule(*compat.JIT_NAMES)
def jit_rule(ctx, eqn, invals):
    """A nested `jit` stays a `jit`: same name, shardings, donation and options, with
    each adapted kernel passed in as its `w`, `a`, `b` (the factors' shardings derived
    from the kernel's) and, if the function returns one, returned so too."""
    jaxpr, consts = compat.call_jaxpr(eqn)
    opts = compat.jit_options(eqn)
    ctx.note_all(invals, "jit")
    eager = not any(map(compat.is_tracer, jax.tree.leaves(invals)))
    if eager and _only_named(opts):
        # Called eagerly with nothing to keep but a name: run it op by op, as JAX's own
        # evaluation of a jaxpr would (a fresh jit here would compile on every call).
        return interpret(ctx, jaxpr, consts, invals)
    flat, rebuild = _flatten_factored(invals)
    in_sh, donate = [], []
    for val, sh, don in zip(invals, opts.in_shardings, opts.donated):
        if isinstance(val, Factored):
            in_sh += _flat_shardings(val, sh)
            donate += [don] + [False] * (len(_flat_shardings(val, sh)) - 1)
        else:
            in_sh.append(sh)
            donate.append(don)
    out_kinds: list = []

    def body(*args):
        outs = interpret(ctx, jaxpr, consts, rebuild(args))
        out_kinds[:] = [o if isinstance(o, Factored) else None for o in outs]
        return tuple(_flatten_factored(outs)[0])

    body.__name__ = body.__qualname__ = opts.name
    out_sh = None
    if any(s is not None for s in opts.out_shardings):
        sites = dict(ctx.sites)
        jax.eval_shape(body, *flat)  # which outputs stay factored decides the layout
        ctx.sites.clear()  # (a trace for shapes only: dropout sites count once)
        ctx.sites.update(sites)
        out_sh = []
        for kind, sh in zip(out_kinds, opts.out_shardings):
            if kind is None:
                out_sh.append(sh)
            else:
                out_sh += _flat_shardings(kind, sh)
        out_sh = tuple(out_sh)
    kwargs = {"compiler_options": opts.compiler_options} if opts.compiler_options else {}
    fn = jax.jit(
        body,
        in_shardings=tuple(in_sh) if any(s is not None for s in in_sh) else None,
        out_shardings=out_sh,
        donate_argnums=tuple(i for i, d in enumerate(donate) if d),
        keep_unused=opts.keep_unused,
        inline=opts.inline,
        **kwargs,
    )
    outs = fn(*flat)
    return _refill(out_kinds, outs)


def _kept(values, through: dict) -> dict[int, object]:
    """`{output position: value}` for outputs that hand a `Factored` input back
    unchanged (`through`: output -> input position): they leave as they came, factored,
    instead of being materialized (NNX transforms return the module state they were
    given, kernels included)."""
    return {j: values[i] for j, i in through.items() if isinstance(values[i], Factored)}


def _put_back(outs, kept: dict, n: int) -> list:
    """`outs` (the outputs not in `kept`, in order) with `kept` placed among them."""
    it = iter(outs)
    return [kept[j] if j in kept else next(it) for j in range(n)]


@rule(*compat.REMAT_NAMES)
def remat_rule(ctx, eqn, invals):
    jaxpr, consts = compat.call_jaxpr(eqn)
    prevent_cse, policy = compat.remat_options(eqn)
    ctx.note_all(invals, "remat")
    kept = _kept(invals, compat.passthrough(jaxpr))
    n = len(jaxpr.outvars)

    def body(*args):
        outs = interpret(ctx, jaxpr, consts, args)
        outs = [o for j, o in enumerate(outs) if j not in kept]
        return ctx.materialize_all(outs, "remat output")

    outs = jax.checkpoint(body, prevent_cse=prevent_cse, policy=policy)(*invals)
    return _put_back(list(outs), kept, n)


@rule("cond")
def cond_rule(ctx, eqn, invals):
    index, *ops = invals
    if isinstance(index, Factored):
        return _fallback(ctx, eqn, invals)
    ctx.note_all(ops, "cond")
    branches = compat.cond_branches(eqn)
    maps = [compat.passthrough(j) for j, _ in branches]
    through = {o: i for o, i in maps[0].items() if all(m.get(o) == i for m in maps)}
    kept = _kept(ops, through)
    n = len(branches[0][0].outvars)

    def branch_fn(jaxpr, consts):
        def branch(*args):
            outs = interpret(ctx, jaxpr, consts, args)
            outs = [o for j, o in enumerate(outs) if j not in kept]
            return ctx.materialize_all(outs, "cond output")

        return branch

    fns = [branch_fn(j, c) for j, c in branches]
    return _put_back(list(lax.switch(index, fns, *ops)), kept, n)


@rule("while")
def while_rule(ctx, eqn, invals):
    """With dropout on, the loop also carries an iteration counter, so each iteration
    draws its own masks (as under `scan`), even when the trip count is traced. A
    kernel the body hands back unchanged (an NNX loop over a module's state) stays
    factored: it is read by every iteration instead of being carried."""
    parts = compat.while_parts(eqn)
    nc, nb = parts.cond_nconsts, parts.body_nconsts
    cond_consts, body_consts, init = invals[:nc], invals[nc : nc + nb], invals[nc + nb :]
    (cj, cc), (bj, bc) = parts.cond, parts.body
    fixed = {j: i - nb for j, i in compat.passthrough(bj).items() if i - nb == j}
    kept = _kept(init, fixed)
    carried = [v for j, v in enumerate(init) if j not in kept]
    carried = ctx.materialize_all(carried, "while carry")
    ctx.note_all(cond_consts + body_consts + list(kept.values()), "while")
    n = len(init)

    def cond_fn(state):
        _, carry = state
        return interpret(ctx, cj, cc, [*cond_consts, *_put_back(carry, kept, n)])[0]

    def body_fn(state):
        i, carry = state
        inner = ctx if i is None else ctx.iteration(i)
        outs = interpret(inner, bj, bc, [*body_consts, *_put_back(carry, kept, n)])
        outs = [o for j, o in enumerate(outs) if j not in kept]
        return None if i is None else i + 1, inner.materialize_all(outs, "while carry")

    counter = None if ctx.rng is None else jnp.zeros((), jnp.uint32)
    out = lax.while_loop(cond_fn, body_fn, (counter, list(carried)))[1]
    return _put_back(list(out), kept, n)


def _unstacked(f: Factored):
    """`(w, a, b, m)` to scan over and the layout of one slice, if axis 0 is stacked."""
    lay = f.layout
    if 0 not in lay.stack_axes or getattr(f.w, "ops", ()):
        return None  # (a quantized kernel whose axes moved: its moves are not per layer)
    j = lay.stack_axes.index(0)
    a = jnp.moveaxis(f.a, j, 0)
    b = jnp.moveaxis(f.b, j, 0)
    m = _maybe(jnp.moveaxis, f.m, j, 0)

    def shift(axes):
        return tuple(x - 1 for x in axes)

    stack = tuple(s for s in lay.stack_axes if s != 0)
    return (f.w, a, b, m), Layout(shift(lay.in_axes), shift(lay.out_axes), shift(stack))


@rule("scan")
def scan_rule(ctx, eqn, invals):
    """Each iteration sees one layer of a stacked kernel (scanned over axis 0) as a
    `Factored` value of its own, with its own dropout key. A kernel the body hands back
    unchanged (an NNX scan returns the module state it was given) stays factored: a
    carried one is read by every iteration, a scanned one leaves stacked as it came."""
    s = compat.scan_parts(eqn)
    fixed = s.num_consts + s.num_carry
    consts, init, xs = invals[: s.num_consts], invals[s.num_consts : fixed], invals[fixed:]
    jaxpr, jconsts = s.body
    through = compat.passthrough(jaxpr)
    same_carry = {
        j: j for j, i in through.items() if j < s.num_carry and i - s.num_consts == j
    }
    carry_kept = _kept(init, same_carry)
    ys_kept = {
        j - s.num_carry: xs[i - fixed]
        for j, i in through.items()
        if j >= s.num_carry and i >= fixed and isinstance(xs[i - fixed], Factored)
    }
    init = [v for j, v in enumerate(init) if j not in carry_kept]
    init = ctx.materialize_all(init, "scan carry")
    xs_in, rebuild = [], []
    for v in xs:
        got = _unstacked(v) if isinstance(v, Factored) else None
        if isinstance(v, Factored) and got is None:
            xs_in.append(
                ctx.materialize(
                    v,
                    "scan",
                    "scanned over a non-stack axis, or a quantized kernel whose axes "
                    "moved before the scan",
                )
            )
            rebuild.append(None)
        elif got is not None:
            ctx.note(v, "scan")
            xs_in.append(got[0])
            rebuild.append((v, got[1]))
        else:
            xs_in.append(v)
            rebuild.append(None)
    ctx.note_all(consts + list(carry_kept.values()), "scan")
    counter = jnp.arange(s.length, dtype=jnp.uint32) if ctx.rng is not None else None
    n_ys = len(jaxpr.outvars) - s.num_carry

    def body(carry, x):
        xs_vals, i = x
        inner_ctx = ctx if i is None else ctx.iteration(i)
        vals = []
        for val, rb in zip(xs_vals, rebuild):
            if rb is None:
                vals.append(val)
            else:
                src, layout = rb
                w, a, b, m = val
                vals.append(src.replace(w=w, a=a, b=b, m=m, layout=layout))
        full_carry = _put_back(carry, carry_kept, s.num_carry)
        outs = interpret(inner_ctx, jaxpr, jconsts, [*consts, *full_carry, *vals])
        carry_out = [o for j, o in enumerate(outs[: s.num_carry]) if j not in carry_kept]
        ys = [o for j, o in enumerate(outs[s.num_carry :]) if j not in ys_kept]
        carry_out = inner_ctx.materialize_all(carry_out, "scan carry")
        return carry_out, inner_ctx.materialize_all(ys, "scan output")

    carry, ys = lax.scan(
        body,
        list(init),
        (xs_in, counter),
        length=s.length,
        reverse=s.reverse,
        unroll=s.unroll,
    )
    return [
        *_put_back(list(carry), carry_kept, s.num_carry),
        *_put_back(list(ys), ys_kept, n_ys),
    ]


@rule(*compat.CUSTOM_CALL_NAMES)
def custom_call_rule(ctx, eqn, invals):
    """A `custom_jvp` / `custom_vjp` function called with a kernel: its derivative rule
    is written for a dense kernel, and no rewrite of it keeps the factors, so it gets
    the dense kernel (exact, gradients to `a` and `b` included), and the message says
    how to keep the kernel factored."""
    return _fallback(
        ctx,
        eqn,
        invals,
        "a custom_jvp/custom_vjp function, whose derivative rule needs the dense kernel; "
        "this is exact, gradients of A and B included, but forms the kernel. To keep it "
        "factored, apply the kernel outside the custom function (x @ W before the call, "
        "its result passed in)",
    )
