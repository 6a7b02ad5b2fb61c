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
    """`x . (scale * a @ b)` with the kernel's free axes after x's (kernel as rhs).

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
        ctx.dropout(x, f),
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
    base = compat.bind(eqn, [x, f.w] if side == 1 else [f.w, x])[0]
    nb = len(k_use.batch)
    n_k_free, n_x_free = len(k_use.free), len(x_use.free)
    if side == 1:
        out_axis_of = list(range(nb + n_x_free + n_k_free))
    else:  # dot_general(kernel, x) puts the kernel's free axes before x's
        out_axis_of = list(range(nb)) + [nb + n_k_free + i for i in range(n_x_free)]
        out_axis_of += [nb + i for i in range(n_k_free)]
    y = _contract_low_rank(ctx, compat.dot_options(eqn), x, f, x_use, k_use, out_axis_of)
    if side == 0:
        y = jnp.transpose(y, [out_axis_of.index(i) for i in range(len(out_axis_of))])
    return [base + y.astype(base.dtype)]


# Primitives that move a kernel's axes ---------------------------------------------------


def _window(eqn, rest, shape):
    """`(starts, sizes)` per input axis of a slice (static or dynamic)."""
    name = compat.primitive_name(eqn)
    if name == "slice":
        starts, limits, _ = compat.slice_params(eqn)
        return list(starts), [lim - s for s, lim in zip(starts, limits)]
    if name == "dynamic_slice":
        return list(rest), list(compat.dynamic_slice_sizes(eqn))
    return [0] * len(shape), list(shape)


def _slice_factor(f, stack_axes, starts, sizes, dynamic):
    """A factor narrowed along its leading stacked axes as the kernel is."""
    f_starts, f_sizes = [0] * f.ndim, list(f.shape)
    for j, axis in enumerate(stack_axes):
        f_starts[j], f_sizes[j] = starts[axis], sizes[axis]
    if dynamic:
        return lax.dynamic_slice(f, [jnp.asarray(s, jnp.int32) for s in f_starts], f_sizes)
    return lax.slice(f, f_starts, [s + z for s, z in zip(f_starts, f_sizes)])


_OWN_RULES = ("sharding_constraint", "reshard", "pvary", "pcast")


@rule(*(name for name in _axes.MOVES if name not in _OWN_RULES))
def move_rule(ctx, eqn, invals):
    """One rule for every primitive `_axes.moves` describes.

    The frozen kernel goes through the primitive itself; the layout follows its axes:
    kept axes are renamed, dropped ones must be size-1 stacked axes (a layer indexed
    out of a stack: the factors drop them too), new ones become leading stacked axes
    (the factors are broadcast along them, so every new slice carries the same update),
    and a slice may narrow stacked axes only (the factors are sliced alike).
    """
    f, *rest = invals
    if any(isinstance(v, Factored) for v in rest):
        return _fallback(ctx, eqn, invals, "an adapted kernel as an index")
    if compat.primitive_name(eqn) == "slice" and any(
        s != 1 for s in (compat.slice_params(eqn)[2] or ())
    ):
        return _fallback(ctx, eqn, invals, "strided slice")
    moves = _axes.moves(eqn, f.shape)
    if moves is None:
        return _fallback(ctx, eqn, invals, "mixes the kernel's axes")
    lay = f.layout
    ndim = len(f.shape)
    dropped = [i for i in range(ndim) if i not in moves]
    if not set(dropped) <= set(lay.stack_axes):
        return _fallback(ctx, eqn, invals, f"drops kernel axes {dropped}")
    where = {src: i for i, src in enumerate(moves) if src is not None}
    out_shape = compat.var_shape(eqn.outvars[0])
    resized = [i for i in where if out_shape[where[i]] != f.shape[i]]
    if not set(resized) <= set(lay.stack_axes):
        return _fallback(ctx, eqn, invals, f"resizes kernel axes {resized}")
    w = compat.bind(eqn, [f.w, *rest])[0]
    a, b = f.a, f.b
    if resized and compat.primitive_name(eqn) == "broadcast_in_dim":
        # A size-1 stacked axis broadcast: every new layer carries the same update.
        for axis in resized:
            j = lay.stack_axes.index(axis)
            a, b = (
                jnp.broadcast_to(
                    x, x.shape[:j] + (out_shape[where[axis]],) + x.shape[j + 1 :]
                )
                for x in (a, b)
            )
    elif resized:  # a slice narrowing stacked axes: the factors are sliced alike
        starts, sizes = _window(eqn, rest, f.shape)
        dynamic = compat.primitive_name(eqn) == "dynamic_slice"
        a, b = (_slice_factor(x, lay.stack_axes, starts, sizes, dynamic) for x in (a, b))
    if dropped:  # size-1 stacked axes: the factors' matching leading axes go too
        gone = tuple(lay.stack_axes.index(d) for d in dropped)
        a, b = jnp.squeeze(a, gone), jnp.squeeze(b, gone)
    new = [i for i, src in enumerate(moves) if src is None]
    if new:  # new leading stacked axes
        lead = tuple(w.shape[i] for i in new)
        a, b = jnp.broadcast_to(a, lead + a.shape), jnp.broadcast_to(b, lead + b.shape)
    stack = tuple(new) + tuple(where[s] for s in lay.stack_axes if s not in dropped)
    layout = Layout(
        tuple(where[i] for i in lay.in_axes), tuple(where[i] for i in lay.out_axes), stack
    )
    ctx.note(f, compat.primitive_name(eqn))
    return [f.replace(w=w, a=a, b=b, layout=layout)]


# Embeddings and convolutions ------------------------------------------------------------


@rule("gather")
def gather_rule(ctx, eqn, invals):
    f, idx = invals
    if isinstance(idx, Factored):
        return _fallback(ctx, eqn, invals)
    g = compat.gather_options(eqn)
    dn = g.dimension_numbers
    lay = f.layout
    table = (
        f.w.ndim == 2
        and lay.in_axes == (0,)
        and lay.out_axes == (1,)
        and _axes.uses(eqn, 0, 2).contract == (0,)
        and tuple(dn.start_index_map) == (0,)
        and len(dn.offset_dims) == 1
        and g.slice_sizes == (1, f.w.shape[1])
        and not getattr(dn, "operand_batching_dims", ())
    )
    if not table:
        return _fallback(ctx, eqn, invals, "not a row lookup of an [in, out] table")
    ctx.note(f, "gather")
    base = compat.bind(eqn, [f.w, idx])[0]
    rank = f.a.shape[-1]
    rows = lax.gather(
        f.a,
        idx,
        dimension_numbers=dn,
        slice_sizes=(1, rank),
        indices_are_sorted=g.indices_are_sorted,
        unique_indices=g.unique_indices,
        mode=g.mode,
        fill_value=g.fill_value,
    )
    off = dn.offset_dims[0]
    h = jnp.moveaxis(rows, off, -1).astype(base.dtype) * jnp.asarray(f.scale, base.dtype)
    y = jnp.matmul(h, f.b.astype(base.dtype))
    return [base + jnp.moveaxis(y, -1, off)]


@rule("conv_general_dilated")
def conv_rule(ctx, eqn, invals):
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
        or c.feature_group_count != 1
        or c.batch_group_count != 1
    ):
        return _fallback(ctx, eqn, invals, "grouped conv or unusual layout")
    ctx.note(f, "conv_general_dilated")
    base = compat.bind(eqn, [x, f.w])[0]
    # `a` laid out like the kernel, with `r` output features: a conv with it, then B.
    (out_feature,) = use.free
    n_in = len(lay.in_axes)
    perm = [n_in if k == out_feature else lay.in_axes.index(k) for k in range(f.w.ndim)]
    a_kernel = jnp.transpose(f.a, perm).astype(x.dtype)
    h = compat.bind(eqn, [ctx.dropout(x, f), a_kernel])[0]
    h = checkpoint_name(h * jnp.asarray(f.scale, h.dtype), XA_NAME)
    feat = c.dimension_numbers.out_spec[1]
    y = jnp.matmul(jnp.moveaxis(h, feat, -1), f.b.astype(h.dtype))
    return [base + jnp.moveaxis(y, -1, feat).astype(base.dtype)]


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
    return [f.replace(w=w, a=a, b=b)]


@rule("reshard")
def reshard_rule(ctx, eqn, invals):
    (f,) = invals
    shardings = _factor_shardings(f, compat.reshard_sharding(eqn))
    if shardings is None:
        return _fallback(ctx, eqn, invals, "not a NamedSharding")
    ctx.note(f, "reshard")
    w = compat.bind(eqn, [f.w])[0]
    a, b = (jax.sharding.reshard(x, s) for x, s in zip((f.a, f.b), shardings))
    return [f.replace(w=w, a=a, b=b)]


@rule("pvary", "pcast")
def varying_rule(ctx, eqn, invals):
    """Inside `shard_map`, a value's varying-axes type changes: `w`, `a` and `b` all
    change alike (the sum of a varying value and an invariant one is varying)."""
    (f,) = invals
    ctx.note(f, compat.primitive_name(eqn))
    w, a, b = (compat.bind(eqn, [x])[0] for x in (f.w, f.a, f.b))
    return [f.replace(w=w, a=a, b=b)]


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
        if isinstance(val, Factored):
            a_spec, b_spec = factor_specs(spec, val.w.ndim, val.layout)
            a = constrain(val.a, NamedSharding(mesh, a_spec))
            b = constrain(val.b, NamedSharding(mesh, b_spec))
            operands.append(val.replace(a=a, b=b))
            specs += [spec, a_spec, b_spec]
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


# Call-like primitives -------------------------------------------------------------------


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

    return flat, lambda args: _refill(slots, args)


def _refill(slots, flat) -> list:
    """The inverse of `_flatten_factored`: `slots` holds, per value, None (one plain
    value) or the `Factored` whose `w`, `a`, `b` come next in `flat`."""
    out, i = [], 0
    for src in slots:
        if src is None:
            out.append(flat[i])
            i += 1
        else:
            out.append(src.replace(w=flat[i], a=flat[i + 1], b=flat[i + 2]))
            i += 3
    return out


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
        sites = dict(ctx.sites)
        jax.eval_shape(body, *flat)  # which outputs stay factored decides the layout
        ctx.sites.clear()  # (a trace for shapes only: dropout sites count once)
        ctx.sites.update(sites)
        out_sh = []
        for kind, sh in zip(out_kinds, opts.out_shardings):
            if kind is None:
                out_sh.append(sh)
            else:
                out_sh += [sh, *(_factor_shardings(kind, sh) or (None, None))]
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


@rule(*compat.REMAT_NAMES)
def remat_rule(ctx, eqn, invals):
    jaxpr, consts = compat.call_jaxpr(eqn)
    prevent_cse, policy = compat.remat_options(eqn)
    ctx.note_all(invals, "remat")

    def body(*args):
        return ctx.materialize_all(interpret(ctx, jaxpr, consts, args), "remat output")

    return list(jax.checkpoint(body, prevent_cse=prevent_cse, policy=policy)(*invals))


@rule("cond")
def cond_rule(ctx, eqn, invals):
    index, *ops = invals
    if isinstance(index, Factored):
        return _fallback(ctx, eqn, invals)
    ctx.note_all(ops, "cond")

    def branch_fn(jaxpr, consts):
        return lambda *args: ctx.materialize_all(
            interpret(ctx, jaxpr, consts, args), "cond output"
        )

    branches = [branch_fn(j, c) for j, c in compat.cond_branches(eqn)]
    return list(lax.switch(index, branches, *ops))


@rule("while")
def while_rule(ctx, eqn, invals):
    """With dropout on, the loop also carries an iteration counter, so each iteration
    draws its own masks (as under `scan`), even when the trip count is traced."""
    parts = compat.while_parts(eqn)
    nc, nb = parts.cond_nconsts, parts.body_nconsts
    cond_consts, body_consts, init = invals[:nc], invals[nc : nc + nb], invals[nc + nb :]
    init = ctx.materialize_all(init, "while carry")
    ctx.note_all(cond_consts + body_consts, "while")
    (cj, cc), (bj, bc) = parts.cond, parts.body

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


def _unstacked(f: Factored):
    """`(w, a, b)` to scan over and the layout of one slice, if axis 0 is stacked."""
    lay = f.layout
    if 0 not in lay.stack_axes:
        return None
    j = lay.stack_axes.index(0)
    a = jnp.moveaxis(f.a, j, 0)
    b = jnp.moveaxis(f.b, j, 0)

    def shift(axes):
        return tuple(x - 1 for x in axes)

    stack = tuple(s for s in lay.stack_axes if s != 0)
    return (f.w, a, b), Layout(shift(lay.in_axes), shift(lay.out_axes), shift(stack))


@rule("scan")
def scan_rule(ctx, eqn, invals):
    """Each iteration sees one layer of a stacked kernel (scanned over axis 0) as a
    `Factored` value of its own, with its own dropout key."""
    s = compat.scan_parts(eqn)
    fixed = s.num_consts + s.num_carry
    consts, init, xs = invals[: s.num_consts], invals[s.num_consts : fixed], invals[fixed:]
    init = ctx.materialize_all(init, "scan carry")
    xs_in, rebuild = [], []
    for v in xs:
        got = _unstacked(v) if isinstance(v, Factored) else None
        if isinstance(v, Factored) and got is None:
            xs_in.append(ctx.materialize(v, "scan", "scanned over a non-stack axis"))
            rebuild.append(None)
        elif got is not None:
            ctx.note(v, "scan")
            xs_in.append(got[0])
            rebuild.append((v, got[1]))
        else:
            xs_in.append(v)
            rebuild.append(None)
    ctx.note_all(consts, "scan")
    jaxpr, jconsts = s.body
    counter = jnp.arange(s.length, dtype=jnp.uint32) if ctx.rng is not None else None

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
        return outs[: s.num_carry], outs[s.num_carry :]

    carry, ys = lax.scan(
        body,
        list(init),
        (xs_in, counter),
        length=s.length,
        reverse=s.reverse,
        unroll=s.unroll,
    )
    return [*carry, *ys]


@rule(*compat.CUSTOM_CALL_NAMES)
def custom_call_rule(ctx, eqn, invals):
    # The custom rule sees a dense kernel: materialize for this call only.
    return _fallback(ctx, eqn, invals, "custom derivative rule")
