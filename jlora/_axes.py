"""How an adapted kernel's axes move through each primitive: one description.

The probe (`_probe.py`) follows each target kernel through a jaxpr to learn which of
its axes are inputs, outputs and stacked layers, before any `Layout` exists; the rules
(`_rules.py`) move a kernel's `Layout` through the same primitives. Both read the
descriptions here, so a primitive the transform understands is one the probe
understands (a test checks that every primitive with a rule is described here).

Three kinds of description:

- `moves(eqn, shape)`: primitives that rearrange an array without combining its
  elements: casts, copies, placements, transposes, squeezes, size-1 reshapes,
  broadcasts, slices and splits. For each output axis (of every output), the input
  axis it comes from (None: a new axis); input axes that appear nowhere were indexed
  away (they had size 1). A reshape that merges or splits axes is described by
  `regroups(eqn, shape)` instead: consecutive input axes and the output axes they
  become, group by group.
- `KEEPS`: primitives whose output has the axes of each operand of its rank
  (`concatenate` along one axis; `mul`, `div` by a scalar or a broadcast one; `neg`).
- `uses(eqn, operand)`: primitives that consume a kernel: which of its axes are
  contracted (the kernel's inputs), batched (stacked layers) and left free (its
  outputs): `dot_general`; `gather` as a lookup (the indexed axes, rows, are inputs);
  `conv_general_dilated` (the output-feature axis is the output).
- `links(eqn)`: call-like primitives and barriers: which inner variable each operand
  becomes (`scan` slices its `xs` along their first axis on the way in), and, for the
  primitives in `RETURNS` (a nested `jit`), which outputs a kernel comes back as.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from jlora import _jax_compat as compat

Moves = tuple  # for each output axis: the input axis it comes from, or None (new)


def _identity(eqn, shape) -> Moves:
    return tuple(range(len(shape)))


def _transpose(eqn, shape) -> Moves:
    return compat.transpose_permutation(eqn)


def _squeeze(eqn, shape) -> Moves:
    dropped = {d % len(shape) for d in compat.squeeze_dimensions(eqn)}
    return tuple(i for i in range(len(shape)) if i not in dropped)


def _align_ones(old, new) -> Moves | None:
    """Moves for a reshape that only drops or inserts size-1 axes, else None."""
    out, i = [], 0
    for size in new:
        while i < len(old) and old[i] == 1 and size != 1:
            i += 1  # a size-1 axis dropped
        if i < len(old) and old[i] == size:
            out.append(i)
            i += 1
        elif size == 1:
            out.append(None)  # a size-1 axis inserted
        else:
            return None
    while i < len(old) and old[i] == 1:
        i += 1
    return tuple(out) if i == len(old) else None


def _reshape(eqn, shape) -> Moves | None:
    new = compat.reshape_sizes(eqn)
    return None if new is None else _align_ones(tuple(shape), new)


def _broadcast(eqn, shape) -> Moves | None:
    got = compat.broadcast_params(eqn)
    if got is None:
        return None
    new_shape, dims = got
    if any(new_shape[d] != shape[i] and shape[i] != 1 for i, d in enumerate(dims)):
        return None
    # A size-1 axis may grow (its one slice repeated): the axis itself is kept.
    src = {d: i for i, d in enumerate(dims)}
    return tuple(src.get(d) for d in range(len(new_shape)))


MOVES: dict[str, Callable[[Any, tuple], Moves | None]] = {
    "convert_element_type": _identity,
    "copy": _identity,
    "sharding_constraint": _identity,
    "reshard": _identity,
    "pvary": _identity,  # inside shard_map: marks a value as varying over mesh axes
    "pcast": _identity,
    "slice": _identity,  # narrows axes, keeps them
    "dynamic_slice": _identity,
    "split": _identity,  # each output narrows one axis
    "transpose": _transpose,
    "squeeze": _squeeze,
    "reshape": _reshape,
    "broadcast_in_dim": _broadcast,
}


def moves(eqn, shape) -> Moves | None:
    """How `eqn` moves the axes of its first operand (of `shape`), or None."""
    fn = MOVES.get(compat.primitive_name(eqn))
    return None if fn is None else fn(eqn, tuple(shape))


def looked_up(eqn, shape) -> tuple[int, ...]:
    """The axes a `dynamic_slice` narrows: a window read at a traced offset (rows of a
    position table while decoding, a layer of a stack); () for other primitives."""
    if compat.primitive_name(eqn) != "dynamic_slice":
        return ()
    sizes = compat.dynamic_slice_sizes(eqn)
    return tuple(i for i, (n, m) in enumerate(zip(sizes, shape)) if n < m)


Groups = list  # of (input axes, output axes): consecutive runs that a reshape maps


def reshape_groups(old, new) -> Groups | None:
    """How a row-major reshape from shape `old` to `new` maps runs of axes, or None.

    Each group is `(input axes, output axes)`, both consecutive, with equal products:
    `((1, 2), (1,))` merges input axes 1 and 2 into output axis 1, `((0,), (0, 1))`
    splits input axis 0. A size-1 axis the reshape drops or inserts between groups is a
    group of its own with no counterpart (`((3,), ())`, `((), (2,))`).
    """
    old, new = tuple(old), tuple(new)
    groups, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        if i < len(old) and old[i] == 1:
            groups.append(((i,), ()))
            i += 1
            continue
        if j < len(new) and new[j] == 1:
            groups.append(((), (j,)))
            j += 1
            continue
        if i == len(old) or j == len(new):
            return None
        ins, outs, p, q = [i], [j], old[i], new[j]
        i, j = i + 1, j + 1
        while p != q:
            if p < q and i < len(old):
                ins.append(i)
                p *= old[i]
                i += 1
            elif q < p and j < len(new):
                outs.append(j)
                q *= new[j]
                j += 1
            else:
                return None
        groups.append((tuple(ins), tuple(outs)))
    return groups


def regroups(eqn, shape) -> Groups | None:
    """The groups of a plain `reshape` of an operand of `shape` (None: not a reshape,
    or one that also permutes)."""
    if compat.primitive_name(eqn) != "reshape":
        return None
    new = compat.reshape_sizes(eqn)
    return None if new is None else reshape_groups(shape, new)


# Primitives whose output keeps the axes of every operand of the output's rank.
KEEPS = frozenset({"concatenate", "mul", "div", "neg"})


class Use(NamedTuple):
    """A kernel operand's axes, by what the primitive does with them."""

    contract: tuple[int, ...]  # summed over: the kernel's inputs
    batch: tuple[int, ...]  # matched one to one: stacked layers
    free: tuple[int, ...]  # kept: the kernel's outputs


def _dot_use(eqn, operand, ndim) -> Use:
    (lc, rc), (lb, rb) = compat.dot_options(eqn).dimension_numbers
    contract, batch = (lc, lb) if operand == 0 else (rc, rb)
    free = tuple(i for i in range(ndim) if i not in contract and i not in batch)
    return Use(contract, batch, free)


def gather_rows(eqn) -> tuple[int, ...]:
    """The operand axes a `gather` indexes: collapsed ones, and those it starts at an
    index with a window narrower than the axis (`t[i]` under `vmap` keeps the row axis
    at size 1); an axis taken whole is not indexed, whatever its start (clamped to 0)."""
    g = compat.gather_options(eqn)
    dn = g.dimension_numbers
    shape = compat.var_shape(eqn.invars[0])
    indexed = set(dn.collapsed_slice_dims) | {
        k for k in dn.start_index_map if g.slice_sizes[k] < shape[k]
    }
    return tuple(sorted(indexed - set(getattr(dn, "operand_batching_dims", ()))))


def _gather_use(eqn, operand, ndim) -> Use | None:
    if operand != 0:
        return None
    rows = gather_rows(eqn)
    batch = tuple(
        getattr(compat.gather_options(eqn).dimension_numbers, "operand_batching_dims", ())
    )
    free = tuple(i for i in range(ndim) if i not in rows and i not in batch)
    return Use(rows, batch, free)


def _conv_use(eqn, operand, ndim) -> Use | None:
    if operand != 1:
        return None
    rhs_spec = compat.conv_options(eqn).dimension_numbers.rhs_spec
    out_feature = rhs_spec[0]
    return Use(tuple(i for i in range(ndim) if i != out_feature), (), (out_feature,))


USES: dict[str, Callable] = {
    "dot_general": _dot_use,
    "gather": _gather_use,
    "conv_general_dilated": _conv_use,
}


def uses(eqn, operand: int, ndim: int) -> Use | None:
    """How `eqn` consumes its operand `operand` (an array of `ndim` axes), or None."""
    fn = USES.get(compat.primitive_name(eqn))
    return None if fn is None else fn(eqn, operand, ndim)


class Link(NamedTuple):
    """Operand `operand` of an equation becomes `target` (an inner jaxpr's invar, or
    one of the equation's own outvars); `sliced`: its first axis is taken away."""

    operand: int
    jaxpr: Any  # the inner jaxpr, or None when the target is an outvar of the eqn
    target: Any
    sliced: bool = False


def _call_links(eqn) -> list[Link]:
    jaxpr, _ = compat.call_jaxpr(eqn)
    return [Link(i, jaxpr, v) for i, v in enumerate(jaxpr.invars)]


def _cond_links(eqn) -> list[Link]:
    out = []
    for jaxpr, _ in compat.cond_branches(eqn):
        out += [Link(i + 1, jaxpr, v) for i, v in enumerate(jaxpr.invars)]
    return out


def _while_links(eqn) -> list[Link]:
    # Loop-invariant operands only: a kernel in the carry is made dense by the rule.
    w = compat.while_parts(eqn)
    cj, bj = w.cond[0], w.body[0]
    out = [Link(i, cj, cj.invars[i]) for i in range(w.cond_nconsts)]
    return out + [Link(w.cond_nconsts + i, bj, bj.invars[i]) for i in range(w.body_nconsts)]


def _scan_links(eqn) -> list[Link]:
    s = compat.scan_parts(eqn)
    jaxpr = s.body[0]
    fixed = s.num_consts + s.num_carry
    out = [Link(i, jaxpr, jaxpr.invars[i]) for i in range(s.num_consts)]
    return out + [
        Link(i, jaxpr, jaxpr.invars[i], sliced=True)
        for i in range(fixed, len(jaxpr.invars))
    ]


def _barrier_links(eqn) -> list[Link]:
    return [Link(i, None, v) for i, v in enumerate(eqn.outvars)]


LINKS: dict[str, Callable] = {
    **{name: _call_links for name in compat.JIT_NAMES},
    **{name: _call_links for name in compat.REMAT_NAMES},
    **{name: _call_links for name in compat.CUSTOM_CALL_NAMES},
    "shard_map": _call_links,
    "cond": _cond_links,
    "while": _while_links,
    "scan": _scan_links,
    "optimization_barrier": _barrier_links,
}


def links(eqn) -> list[Link] | None:
    """Where a call-like equation's operands go, or None for other primitives."""
    fn = LINKS.get(compat.primitive_name(eqn))
    return None if fn is None else fn(eqn)


# Call-likes whose outputs keep a returned kernel (its inner jaxpr's outvars become the
# equation's outvars one to one); the others' rules make outputs dense.
RETURNS = frozenset(compat.JIT_NAMES)

KNOWN = frozenset(MOVES) | KEEPS | frozenset(USES) | frozenset(LINKS)
