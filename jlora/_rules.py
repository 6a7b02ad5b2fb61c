"""The rule table: how each primitive acts on a `Factored` kernel.

A rule takes `(ctx, eqn, invals)` (some inputs `Factored`) and returns the list of
outputs. Rules keep the low-rank form where it survives and otherwise call
`ctx.materialize`, which warns (or raises in strict mode). Call-like rules re-enter
through the public API (`jax.checkpoint`, `lax.scan`, `lax.switch`, `lax.while_loop`)
with an interpreting closure.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding, PartitionSpec

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
    name = eqn.primitive.name
    return compat.bind(eqn, [ctx.materialize(v, name, why) for v in invals])


# dot_general ----------------------------------------------------------------------------


def _derived_sharding(out_sharding, ndim: int, dims):
    """`out_sharding` re-indexed: entry `d` of `dims` takes the original's axis `d`
    (None: a new, unsharded axis such as the rank)."""
    if out_sharding is None:
        return None
    named = isinstance(out_sharding, NamedSharding)
    spec = tuple(out_sharding.spec if named else out_sharding)
    spec += (None,) * (ndim - len(spec))
    new = PartitionSpec(*(None if d is None else spec[d] for d in dims))
    return NamedSharding(out_sharding.mesh, new) if named else new


def _sharding_kw(sharding):
    return {} if sharding is None else {"out_sharding": sharding}


def _contract_low_rank(
    ctx, eqn, x, lr: Factored, x_contract, k_contract, x_batch, k_batch, y_to_out
):
    """`x . (scale * a @ b)` with the dot's kernel-free axes last (kernel as rhs).

    `y_to_out[i]` is the axis of the dot's output that this result's axis `i` becomes;
    it carries an explicit `out_sharding` of the dot (explicit-axis meshes) over to the
    two low-rank dots."""
    lay = lr.layout
    ns = len(lay.stack_axes)
    forward = set(k_contract) == set(lay.in_axes)
    if forward:
        # x . a over the input axes, then . b over the rank axis.
        first, first_axes = lr.a, lay.stack_axes + lay.in_axes
        second, second_free = lr.b, lay.out_axes
        second_free_start = ns + 1
    else:
        # The kernel used transposed (e.g. a tied embedding `x @ E.T`): x . b, then . a.
        first = lr.b
        first_axes = lay.stack_axes + (None,) + lay.out_axes
        second = jnp.moveaxis(lr.a, -1, ns)
        second_free = lay.in_axes
        second_free_start = ns + 1
    pos = {k: i for i, k in enumerate(first_axes) if k is not None}
    dtype = x.dtype
    pet = eqn.params.get("preferred_element_type")
    precision = eqn.params.get("precision")
    xd = ctx.dropout(x, lr)
    out_sharding = eqn.params.get("out_sharding")
    n_out = len(y_to_out)
    n_h = len(x_batch) + x.ndim - len(x_contract) - len(x_batch)  # batch + x free axes
    h_sharding = _derived_sharding(out_sharding, n_out, [*y_to_out[:n_h], None])
    h = lax.dot_general(
        xd,
        first.astype(dtype),
        (
            (tuple(x_contract), tuple(pos[k] for k in k_contract)),
            (tuple(x_batch), tuple(pos[k] for k in k_batch)),
        ),
        precision=precision,
        preferred_element_type=pet,
        **_sharding_kw(h_sharding),
    )
    h = checkpoint_name(h * jnp.asarray(lr.scale, h.dtype), XA_NAME).astype(dtype)
    # Arrange the second factor as [*batch (in the dot's order), r, *free ascending].
    free_sorted = sorted(second_free)
    perm = [lay.stack_axes.index(k) for k in k_batch] + [ns]
    perm += [second_free_start + second_free.index(k) for k in free_sorted]
    second = jnp.transpose(second, perm).astype(dtype)
    nb = len(k_batch)
    return lax.dot_general(
        h,
        second,
        (((h.ndim - 1,), (nb,)), (tuple(range(nb)), tuple(range(nb)))),
        precision=precision,
        preferred_element_type=pet,
        **_sharding_kw(_derived_sharding(out_sharding, n_out, y_to_out)),
    )


@rule("dot_general")
def dot_general_rule(ctx, eqn, invals):
    lhs, rhs = invals
    if isinstance(lhs, Factored) and isinstance(rhs, Factored):
        return _fallback(ctx, eqn, invals, "both operands adapted")
    side = 1 if isinstance(rhs, Factored) else 0
    lr, x = (rhs, lhs) if side == 1 else (lhs, rhs)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    k_contract, x_contract = (rc, lc) if side == 1 else (lc, rc)
    k_batch, x_batch = (rb, lb) if side == 1 else (lb, rb)
    lay = lr.layout
    ok_batch = set(k_batch) == set(lay.stack_axes)
    forward = set(k_contract) == set(lay.in_axes)
    backward = set(k_contract) == set(lay.out_axes)
    if not ok_batch or not (forward or backward):
        return _fallback(
            ctx,
            eqn,
            invals,
            f"contracts kernel axes {tuple(k_contract)} with batch {tuple(k_batch)}, "
            f"layout {lay}",
        )
    ctx.note(lr, "dot_general")
    base = compat.bind(eqn, [x, lr.w] if side == 1 else [lr.w, x])[0]
    nb = len(k_batch)
    n_kfree = lr.w.ndim - len(k_contract) - nb
    n_xfree = x.ndim - len(x_contract) - nb
    if side == 1:
        y_to_out = list(range(nb + n_xfree + n_kfree))
    else:  # dot_general(kernel, x) puts the kernel's free axes before x's
        y_to_out = list(range(nb)) + [nb + n_kfree + i for i in range(n_xfree)]
        y_to_out += [nb + i for i in range(n_kfree)]
    y = _contract_low_rank(
        ctx, eqn, x, lr, x_contract, k_contract, x_batch, k_batch, y_to_out
    )
    if side == 0:
        y = jnp.transpose(y, [y_to_out.index(i) for i in range(len(y_to_out))])
    return [base + y.astype(base.dtype)]


# Shape and dtype plumbing ---------------------------------------------------------------


@rule("convert_element_type")
def convert_rule(ctx, eqn, invals):
    (lr,) = invals
    ctx.note(lr, "convert_element_type")
    return [lr.replace(w=compat.bind(eqn, [lr.w])[0])]


@rule("copy")
def copy_rule(ctx, eqn, invals):
    (lr,) = invals
    return [lr.replace(w=compat.bind(eqn, [lr.w])[0])]


def _relayout(lay: Layout, old_to_new: dict[int, int]) -> Layout:
    return Layout(
        tuple(old_to_new[a] for a in lay.in_axes),
        tuple(old_to_new[a] for a in lay.out_axes),
        tuple(old_to_new[a] for a in lay.stack_axes),
    )


@rule("transpose")
def transpose_rule(ctx, eqn, invals):
    (lr,) = invals
    perm = eqn.params["permutation"]
    ctx.note(lr, "transpose")
    old_to_new = {old: new for new, old in enumerate(perm)}
    return [
        lr.replace(w=compat.bind(eqn, [lr.w])[0], layout=_relayout(lr.layout, old_to_new))
    ]


def _drop_stack_axes(ctx, eqn, lr: Factored, dropped: tuple[int, ...], new_w):
    """Removes size-1 stacked axes (after indexing one layer out of a stack)."""
    lay = lr.layout
    if not set(dropped) <= set(lay.stack_axes):
        return None
    keep = [i for i in range(lr.w.ndim) if i not in dropped]
    old_to_new = {old: new for new, old in enumerate(keep)}
    f_drop = tuple(lay.stack_axes.index(d) for d in dropped)
    stack = tuple(s for s in lay.stack_axes if s not in dropped)
    layout = Layout(
        tuple(old_to_new[a] for a in lay.in_axes),
        tuple(old_to_new[a] for a in lay.out_axes),
        tuple(old_to_new[a] for a in stack),
    )
    ctx.note(lr, eqn.primitive.name)
    return lr.replace(
        w=new_w, a=jnp.squeeze(lr.a, f_drop), b=jnp.squeeze(lr.b, f_drop), layout=layout
    )


@rule("squeeze")
def squeeze_rule(ctx, eqn, invals):
    (lr,) = invals
    dims = tuple(d % lr.w.ndim for d in eqn.params["dimensions"])
    out = _drop_stack_axes(ctx, eqn, lr, dims, compat.bind(eqn, [lr.w])[0])
    return (
        [out]
        if out is not None
        else _fallback(ctx, eqn, invals, "squeezes a non-stack axis")
    )


def _add_stack_axes(ctx, eqn, lr: Factored, old_to_new, new_shape):
    """New leading stacked axes (a broadcast or an inserted size-1 axis): the factors
    are broadcast along them, so each new slice keeps the same low-rank update."""
    lay = lr.layout
    new_axes = tuple(d for d in range(len(new_shape)) if d not in set(old_to_new))
    layout = Layout(
        tuple(old_to_new[a] for a in lay.in_axes),
        tuple(old_to_new[a] for a in lay.out_axes),
        new_axes + tuple(old_to_new[a] for a in lay.stack_axes),
    )
    lead = tuple(new_shape[d] for d in new_axes)
    ctx.note(lr, eqn.primitive.name)
    return lr.replace(
        w=compat.bind(eqn, [lr.w])[0],
        a=jnp.broadcast_to(lr.a, lead + lr.a.shape),
        b=jnp.broadcast_to(lr.b, lead + lr.b.shape),
        layout=layout,
    )


def _inserted_ones(old, new):
    """Where `old`'s axes land in `new` if `new` only inserts size-1 axes, else None."""
    if len(new) <= len(old):
        return None
    pos, j = [], 0
    for i, size in enumerate(new):
        if j < len(old) and size == old[j]:
            pos.append(i)
            j += 1
        elif size != 1:
            return None
    return pos if j == len(old) else None


@rule("broadcast_in_dim")
def broadcast_rule(ctx, eqn, invals):
    lr, *dynamic = invals
    shape, dims = tuple(eqn.params["shape"]), tuple(eqn.params["broadcast_dimensions"])
    if dynamic or any(shape[d] != lr.w.shape[i] for i, d in enumerate(dims)):
        return _fallback(ctx, eqn, invals, "broadcasts an existing axis")
    return [_add_stack_axes(ctx, eqn, lr, list(dims), shape)]


@rule("reshape")
def reshape_rule(ctx, eqn, invals):
    lr = invals[0]
    if len(invals) != 1 or eqn.params.get("dimensions") is not None:
        return _fallback(ctx, eqn, invals)
    new_shape = tuple(eqn.params["new_sizes"])
    old = tuple(lr.w.shape)
    # Low-rank reshapes: dropping size-1 stacked axes (`ws[i]` on a stack), or
    # inserting size-1 axes (`w[None]`), which become stacked axes.
    for dropped in _size_one_drops(old, new_shape, lr.layout.stack_axes):
        out = _drop_stack_axes(ctx, eqn, lr, dropped, compat.bind(eqn, [lr.w])[0])
        if out is not None:
            return [out]
    inserted = _inserted_ones(old, new_shape)
    if inserted is not None:
        return [_add_stack_axes(ctx, eqn, lr, inserted, new_shape)]
    return _fallback(ctx, eqn, invals, f"reshape {old} -> {new_shape}")


def _size_one_drops(old, new, stack_axes):
    drops = tuple(i for i in stack_axes if old[i] == 1)
    if drops and tuple(s for i, s in enumerate(old) if i not in drops) == new:
        yield drops


def _stack_slice(lr, starts, sizes, dynamic):
    """Slicing that only narrows stacked axes: slice `a` and `b` the same way."""
    lay = lr.layout
    for axis, size in enumerate(sizes):
        if axis not in lay.stack_axes and size != lr.w.shape[axis]:
            return None

    def factor_slice(f):
        f_starts, f_sizes = [0] * f.ndim, list(f.shape)
        for j, axis in enumerate(lay.stack_axes):
            f_starts[j], f_sizes[j] = starts[axis], sizes[axis]
        if dynamic:
            return lax.dynamic_slice(
                f, [jnp.asarray(s, jnp.int32) for s in f_starts], f_sizes
            )
        return lax.slice(f, f_starts, [s + z for s, z in zip(f_starts, f_sizes)])

    return lr.replace(a=factor_slice(lr.a), b=factor_slice(lr.b))


@rule("dynamic_slice")
def dynamic_slice_rule(ctx, eqn, invals):
    lr, *starts = invals
    if any(isinstance(s, Factored) for s in starts):
        return _fallback(ctx, eqn, invals)
    out = _stack_slice(lr, starts, eqn.params["slice_sizes"], dynamic=True)
    if out is None:
        return _fallback(ctx, eqn, invals, "slices a non-stack axis")
    ctx.note(lr, "dynamic_slice")
    return [out.replace(w=compat.bind(eqn, [lr.w, *starts])[0])]


@rule("slice")
def slice_rule(ctx, eqn, invals):
    (lr,) = invals
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params.get("strides")
    if strides is not None and any(s != 1 for s in strides):
        return _fallback(ctx, eqn, invals, "strided slice")
    sizes = [lim - s for s, lim in zip(starts, limits)]
    out = _stack_slice(lr, starts, sizes, dynamic=False)
    if out is None:
        return _fallback(ctx, eqn, invals, "slices a non-stack axis")
    ctx.note(lr, "slice")
    return [out.replace(w=compat.bind(eqn, [lr.w])[0])]


# Embeddings and convolutions ------------------------------------------------------------


@rule("gather")
def gather_rule(ctx, eqn, invals):
    lr, idx = invals
    if isinstance(idx, Factored):
        return _fallback(ctx, eqn, invals)
    p = eqn.params
    dn = p["dimension_numbers"]
    lay = lr.layout
    table = (
        lr.w.ndim == 2
        and lay.in_axes == (0,)
        and lay.out_axes == (1,)
        and tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and len(dn.offset_dims) == 1
        and tuple(p["slice_sizes"]) == (1, lr.w.shape[1])
        and not getattr(dn, "operand_batching_dims", ())
    )
    if not table:
        return _fallback(ctx, eqn, invals, "not a row lookup of an [in, out] table")
    ctx.note(lr, "gather")
    base = compat.bind(eqn, [lr.w, idx])[0]
    rank = lr.a.shape[-1]
    rows = lax.gather(
        lr.a,
        idx,
        dimension_numbers=dn,
        slice_sizes=(1, rank),
        indices_are_sorted=p["indices_are_sorted"],
        unique_indices=p["unique_indices"],
        mode=p["mode"],
        fill_value=p["fill_value"],
    )
    off = dn.offset_dims[0]
    h = jnp.moveaxis(rows, off, -1).astype(base.dtype) * jnp.asarray(lr.scale, base.dtype)
    y = jnp.matmul(h, lr.b.astype(base.dtype))
    return [base + jnp.moveaxis(y, -1, off)]


@rule("conv_general_dilated")
def conv_rule(ctx, eqn, invals):
    x, lr = invals
    p = eqn.params
    if isinstance(x, Factored):
        return _fallback(ctx, eqn, invals, "adapted kernel as the conv input")
    lay = lr.layout
    rhs_spec = p["dimension_numbers"].rhs_spec
    out_feat = rhs_spec[0]
    if (
        lay.stack_axes
        or lay.out_axes != (out_feat,)
        or set(lay.in_axes) != set(rhs_spec[1:])
        or p["feature_group_count"] != 1
        or p["batch_group_count"] != 1
    ):
        return _fallback(ctx, eqn, invals, "grouped conv or unusual layout")
    ctx.note(lr, "conv_general_dilated")
    base = compat.bind(eqn, [x, lr.w])[0]
    # `a` laid out like the kernel, with `r` output features: a conv with it, then B.
    ni = len(lay.in_axes)
    perm = [ni if k == out_feat else lay.in_axes.index(k) for k in range(lr.w.ndim)]
    a_kernel = jnp.transpose(lr.a, perm).astype(x.dtype)
    h = compat.bind(eqn, [ctx.dropout(x, lr), a_kernel])[0]
    h = checkpoint_name(h * jnp.asarray(lr.scale, h.dtype), XA_NAME)
    feat = p["dimension_numbers"].out_spec[1]
    y = jnp.matmul(jnp.moveaxis(h, feat, -1), lr.b.astype(h.dtype))
    return [base + jnp.moveaxis(y, -1, feat).astype(base.dtype)]


# Sharding -------------------------------------------------------------------------------


def _factor_shardings(lr: Factored, sharding, unconstrained=()):
    """`(a, b)` shardings derived from a sharding of the kernel, or None if it can't be.

    A `NamedSharding` gives `a` the kernel's input (and stacked) axes and `b` its
    output axes, rank replicated; a fully replicated sharding of another kind is
    shared by the factors as is.
    """
    if isinstance(sharding, NamedSharding):
        a, b = factor_specs(sharding.spec, lr.w.ndim, lr.layout, unconstrained)
        return NamedSharding(sharding.mesh, a), NamedSharding(sharding.mesh, b)
    if getattr(sharding, "is_fully_replicated", False):
        return sharding, sharding
    return None


@rule("sharding_constraint")
def sharding_constraint_rule(ctx, eqn, invals):
    (lr,) = invals
    p = eqn.params
    shardings = _factor_shardings(lr, p["sharding"], p.get("unconstrained_dims", ()))
    if shardings is None:
        return _fallback(ctx, eqn, invals, f"sharding of type {type(p['sharding'])}")
    ctx.note(lr, "sharding_constraint")
    w = compat.bind(eqn, [lr.w])[0]
    return [
        lr.replace(w=w, a=constrain(lr.a, shardings[0]), b=constrain(lr.b, shardings[1]))
    ]


@rule("reshard")
def reshard_rule(ctx, eqn, invals):
    (lr,) = invals
    shardings = _factor_shardings(lr, eqn.params["dst_sharding"])
    if shardings is None:
        return _fallback(ctx, eqn, invals, "not a NamedSharding")
    ctx.note(lr, "reshard")
    w = compat.bind(eqn, [lr.w])[0]
    a, b = (jax.sharding.reshard(f, s) for f, s in zip((lr.a, lr.b), shardings))
    return [lr.replace(w=w, a=a, b=b)]


@rule("optimization_barrier")
def optimization_barrier_rule(ctx, eqn, invals):
    # One barrier over every operand, each adapted kernel as its w, a and b together.
    ctx.note_all(invals, "optimization_barrier")
    flat, treedef = jax.tree.flatten(invals)
    return jax.tree.unflatten(treedef, lax.optimization_barrier(flat))


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
    flat, specs, slots = [], [], []
    for val, spec in zip(invals, in_specs):
        if isinstance(val, Factored):
            a_spec, b_spec = factor_specs(spec, val.w.ndim, val.layout)
            mesh = eqn.params["mesh"]
            a = constrain(val.a, NamedSharding(mesh, a_spec))
            b = constrain(val.b, NamedSharding(mesh, b_spec))
            slots.append((val, len(flat)))
            flat += [val.w, a, b]
            specs += [spec, a_spec, b_spec]
        else:
            slots.append((None, len(flat)))
            flat.append(val)
            specs.append(spec)
    ctx.note_all(invals, "shard_map")
    inner = ctx.manual()

    def body(*args):
        vals = []
        for src, i in slots:
            if src is None:
                vals.append(args[i])
            else:
                vals.append(src.replace(w=args[i], a=args[i + 1], b=args[i + 2]))
        outs = interpret(inner, jaxpr, consts, vals)
        return tuple(inner.materialize_all(outs, "shard_map output"))

    return list(compat.shard_map_call(eqn, body, specs, out_specs)(*flat))


# Call-like primitives -------------------------------------------------------------------


@rule(*compat.JIT_NAMES)
def jit_rule(ctx, eqn, invals):
    """A nested `jit` stays a `jit`: same name, shardings, donation and options, with
    each adapted kernel passed in as its `w`, `a`, `b` (the factors' shardings derived
    from the kernel's) and, if the function returns one, returned so too."""
    jaxpr, consts = compat.call_jaxpr(eqn)
    opts = compat.jit_options(eqn)
    ctx.note_all(invals, "jit")
    flat, rebuild = _flatten_factored(invals)
    in_sh, donate = [], []
    for val, sh, don in zip(invals, opts.in_shardings, opts.donated):
        if isinstance(val, Factored):
            in_sh += [sh, *(_factor_shardings(val, sh) or (None, None))]
            donate += [don, False, False]
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
        jax.eval_shape(body, *flat)  # which outputs stay factored decides the layout
        out_sh = []
        for kind, sh in zip(out_kinds, opts.out_shardings):
            derived = (None, None) if kind is None else _factor_shardings(kind, sh)
            out_sh += [sh] if kind is None else [sh, *(derived or (None, None))]
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
    return _unflatten_factored(fn(*flat), out_kinds)


def _flatten_factored(values):
    """`values` with each `Factored` as its `w`, `a`, `b`, and the inverse."""
    flat, slots = [], []
    for v in values:
        if isinstance(v, Factored):
            slots.append(v)
            flat += [v.w, v.a, v.b]
        else:
            slots.append(None)
            flat.append(v)

    def rebuild(args):
        out, i = [], 0
        for src in slots:
            if src is None:
                out.append(args[i])
                i += 1
            else:
                out.append(src.replace(w=args[i], a=args[i + 1], b=args[i + 2]))
                i += 3
        return out

    return flat, rebuild


def _unflatten_factored(flat, kinds):
    out, i = [], 0
    for kind in kinds:
        if kind is None:
            out.append(flat[i])
            i += 1
        else:
            out.append(kind.replace(w=flat[i], a=flat[i + 1], b=flat[i + 2]))
            i += 3
    return out


@rule(*compat.REMAT_NAMES)
def remat_rule(ctx, eqn, invals):
    jaxpr, consts = compat.call_jaxpr(eqn)
    ctx.note_all(invals, "remat")

    def body(*args):
        return ctx.materialize_all(interpret(ctx, jaxpr, consts, args), "remat output")

    fn = jax.checkpoint(
        body,
        prevent_cse=eqn.params.get("prevent_cse", True),
        policy=eqn.params.get("policy"),
    )
    return list(fn(*invals))


@rule("cond")
def cond_rule(ctx, eqn, invals):
    index, *ops = invals
    if isinstance(index, Factored):
        return _fallback(ctx, eqn, invals)
    ctx.note_all(ops, "cond")

    def branch_fn(closed):
        jaxpr, consts = compat.open_jaxpr(closed)
        return lambda *args: ctx.materialize_all(
            interpret(ctx, jaxpr, consts, args), "cond output"
        )

    return list(lax.switch(index, [branch_fn(b) for b in eqn.params["branches"]], *ops))


@rule("while")
def while_rule(ctx, eqn, invals):
    """With dropout on, the loop also carries an iteration counter, so each iteration
    draws its own masks (as under `scan`), even when the trip count is traced."""
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts, init = invals[:nc], invals[nc : nc + nb], invals[nc + nb :]
    init = ctx.materialize_all(init, "while carry")
    ctx.note_all(cond_consts + body_consts, "while")
    cj, cc = compat.open_jaxpr(p["cond_jaxpr"])
    bj, bc = compat.open_jaxpr(p["body_jaxpr"])

    def cond_fn(state):
        _, carry = state
        return interpret(ctx, cj, cc, [*cond_consts, *carry])[0]

    def body_fn(state):
        i, carry = state
        inner = ctx if i is None else ctx.iteration(i)
        outs = interpret(inner, bj, bc, [*body_consts, *carry])
        return None if i is None else i + 1, inner.materialize_all(outs, "while carry")

    counter = None if ctx.rng is None else jnp.zeros((), jnp.uint32)
    return list(lax.while_loop(cond_fn, body_fn, (counter, list(init)))[1])


def _unstack_first(lr: Factored):
    """`lr` as scan sees one slice of axis 0, if axis 0 is a stacked axis."""
    lay = lr.layout
    if 0 not in lay.stack_axes:
        return None
    j = lay.stack_axes.index(0)
    a = jnp.moveaxis(lr.a, j, 0)
    b = jnp.moveaxis(lr.b, j, 0)

    def shift(axes):
        return tuple(x - 1 for x in axes)

    stack = tuple(s for s in lay.stack_axes if s != 0)
    inner = Layout(shift(lay.in_axes), shift(lay.out_axes), shift(stack))
    return (lr.w, a, b), inner


@rule("scan")
def scan_rule(ctx, eqn, invals):
    p = eqn.params
    n_consts, n_carry = compat.scan_split(p)
    consts, init, xs = (
        invals[:n_consts],
        invals[n_consts : n_consts + n_carry],
        invals[n_consts + n_carry :],
    )
    init = ctx.materialize_all(init, "scan carry")
    xs_in, rebuild = [], []
    for v in xs:
        if isinstance(v, Factored):
            got = _unstack_first(v)
            if got is None:
                xs_in.append(ctx.materialize(v, "scan", "scanned over a non-stack axis"))
                rebuild.append(None)
            else:
                ctx.note(v, "scan")
                xs_in.append(got[0])
                rebuild.append((v, got[1]))
        else:
            xs_in.append(v)
            rebuild.append(None)
    ctx.note_all(consts, "scan")
    jaxpr, jconsts = compat.open_jaxpr(p["jaxpr"])
    length = p["length"]
    counter = jnp.arange(length, dtype=jnp.uint32) if ctx.rng is not None else None

    def body(carry, x):
        xs_vals, i = x
        inner_ctx = ctx if i is None else ctx.iteration(i)
        vals = []
        for val, rb in zip(xs_vals, rebuild):
            if rb is None:
                vals.append(val)
            else:
                src, layout = rb
                w, a, b = val
                vals.append(src.replace(w=w, a=a, b=b, layout=layout))
        outs = interpret(inner_ctx, jaxpr, jconsts, [*consts, *carry, *vals])
        outs = inner_ctx.materialize_all(outs, "scan output")
        return outs[:n_carry], outs[n_carry:]

    carry, ys = lax.scan(
        body,
        list(init),
        (xs_in, counter),
        length=length,
        reverse=p["reverse"],
        unroll=p["unroll"],
    )
    return [*carry, *ys]


@rule(*compat.CUSTOM_CALL_NAMES)
def custom_call_rule(ctx, eqn, invals):
    # The custom rule sees a dense kernel: materialize for this call only.
    return _fallback(ctx, eqn, invals, "custom derivative rule")
