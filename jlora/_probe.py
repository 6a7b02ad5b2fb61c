"""Layout inference: which axes of each kernel a function contracts, keeps and stacks.

`infer(probe, params, targets)` traces `probe(params)` once and follows each target
kernel through the jaxpr to the equations that consume it, reading the same
per-primitive descriptions the rules use (`_axes.py`): through every primitive that
moves axes (casts, transposes, placements, squeezes, reshapes, broadcasts, slices,
splits), joins or scales kernels (concatenate, mul, div, neg), and into every body
(jit, remat, custom derivatives, shard_map, cond, while, scan, barriers) to
`dot_general` (contracted axes are inputs, batch axes stacked, free axes outputs),
`gather` (the indexed rows are inputs) and `conv_general_dilated`. A value read out of
a kernel by indexing (`table[i]`, a row) and used as is makes the indexed axes inputs,
when no contraction says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

from jlora import _axes
from jlora import _jax_compat as compat
from jlora._targets import walk
from jlora._weight import Layout


class Tracked(NamedTuple):
    path: str
    axes: tuple  # for each axis of this value: the kernel axes it holds (a sorted tuple;
    # empty for a new axis; more than one where a reshape merged kernel axes)
    stacked: frozenset  # kernel axes indexed away (layers of a stack, or rows looked up)
    indexed: frozenset = frozenset()  # kernel axes narrowed at a traced offset, kept


class Seen(NamedTuple):
    """What the walk observed per path: `uses`, the (in, out, stacked) axes of each
    contraction; `lookups`, the same for a value read out of the kernel by indexing
    axes away (`table[i]`) and then used as is, which counts only for a kernel no
    contraction describes (a layer of a stack used elementwise looks the same), and of
    each gather (which is also a use): together they tell a tied table (`_tied`)."""

    uses: dict
    lookups: dict


def _union(t: Tracked, positions) -> set:
    return set().union(*(t.axes[i] for i in positions))


def _observe(seen: Seen, t: Tracked, use: _axes.Use, lookup: bool = False) -> None:
    """Records a use; a row lookup (a gather) also as a lookup, which tells a tied
    embedding's orientation (see `_tied`)."""
    ins, outs, batch = _union(t, use.contract), _union(t, use.free), _union(t, use.batch)
    entry = (tuple(sorted(ins)), tuple(sorted(outs)), tuple(sorted(batch | t.stacked)))
    seen.uses.setdefault(t.path, set()).add(entry)
    if lookup:
        seen.lookups.setdefault(t.path, set()).add(entry)


def _terminal(seen: Seen, t: Tracked) -> None:
    """`t` reaches an equation that neither moves nor consumes a kernel (or an output)."""
    rows = t.stacked | t.indexed
    rest = _union(t, range(len(t.axes))) - rows
    if rows and rest:
        seen.lookups.setdefault(t.path, set()).add(
            (tuple(sorted(rows)), tuple(sorted(rest)), ())
        )


def _regrouped(t: Tracked, sources) -> Tracked:
    """`t` after an equation whose output axis `j` holds input axes `sources[j]`."""
    kept = {i for src in sources for i in src}
    dropped = _union(t, [i for i in range(len(t.axes)) if i not in kept])
    axes = tuple(tuple(sorted(_union(t, src))) for src in sources)
    return Tracked(t.path, axes, t.stacked | dropped, t.indexed)


def _moved(t: Tracked, moves: tuple) -> Tracked:
    return _regrouped(t, [() if src is None else (src,) for src in moves])


def _grouped(t: Tracked, groups) -> Tracked:
    sources = {j: ins for ins, outs in groups for j in outs}
    return _regrouped(t, [sources[j] for j in range(len(sources))])


def _sliced(t: Tracked) -> Tracked:
    """`t` as a loop body sees one slice of its first axis (a layer of a stack)."""
    return Tracked(t.path, t.axes[1:], t.stacked | set(t.axes[0]), t.indexed)


def _walk(jaxpr, tracked_in: dict, seen: Seen, returned: bool = False) -> list:
    """Follows the tracked kernels through `jaxpr`; returns what its outputs are (for
    each, the tuple of kernels it holds). `returned`: the caller keeps the outputs
    (a nested jit); otherwise they are where the kernels' values end."""
    env = dict(tracked_in)

    def get(v) -> tuple:
        return () if compat.is_literal(v) else env.get(v, ())

    for eqn in jaxpr.eqns:
        ins = [get(v) for v in eqn.invars]
        if not any(ins):
            continue
        name = compat.primitive_name(eqn)
        if ins[0]:
            shape = compat.var_shape(eqn.invars[0])
            moves = _axes.moves(eqn, shape)
            groups = None if moves is not None else _axes.regroups(eqn, shape)
            if moves is not None or groups is not None:
                out = tuple(
                    _moved(t, moves) if moves is not None else _grouped(t, groups)
                    for t in ins[0]
                )
                rows = _axes.looked_up(eqn, shape)
                if rows:
                    out = tuple(
                        t._replace(indexed=t.indexed | _union(t, rows)) for t in out
                    )
                env.update({v: out for v in eqn.outvars})
                continue
        if name in _axes.KEEPS:
            ndim = len(compat.var_shape(eqn.outvars[0]))
            keep = tuple(t for ts in ins for t in ts if len(t.axes) == ndim)
            env[eqn.outvars[0]] = keep
            for t in (t for ts in ins for t in ts if len(t.axes) != ndim):
                _terminal(seen, t)
            continue
        links = _axes.links(eqn) or []
        linked = {link.operand for link in links}
        for i, ts in enumerate(ins):
            for t in ts:
                use = _axes.uses(eqn, i, len(t.axes))
                if use is not None:
                    _observe(seen, t, use, lookup=compat.primitive_name(eqn) == "gather")
                elif i not in linked:
                    _terminal(seen, t)
        inner: dict = {}
        for link in links:
            ts = ins[link.operand]
            if not ts:
                continue
            ts = tuple(_sliced(t) for t in ts) if link.sliced else ts
            if link.jaxpr is None:
                env[link.target] = ts
            else:
                inner.setdefault(id(link.jaxpr), (link.jaxpr, {}))[1][link.target] = ts
        keeps = name in _axes.RETURNS
        for body, bound in inner.values():
            outs = _walk(body, bound, seen, returned=keeps)
            if keeps:
                env.update({v: ts for v, ts in zip(eqn.outvars, outs) if ts})
    outs = [get(v) for v in jaxpr.outvars]
    if not returned:
        for ts in outs:
            for t in ts:
                _terminal(seen, t)
    return outs


def _tied(uses: set, lookups: set):
    """The lookup's orientation of a table that is also used transposed (a tied
    embedding: rows looked up, and `x @ table.T` for the logits), or None.

    Rows looked up are the inputs; the transform runs the transposed contraction from
    the same factors, so the lookup decides."""
    if len(lookups) != 1:
        return None
    ((ins, outs, stack),) = lookups
    if uses and all(u in ((ins, outs, stack), (outs, ins, stack)) for u in uses):
        return ins, outs, stack
    return None


def infer(probe: Callable, params, targets: set[str]) -> dict[str, Layout]:
    """`{path: Layout}` for each target, from how `probe(params)` uses it.

    Raises:
      ValueError: a target the probe never uses, or uses in ways that disagree.
    """
    tracked, index = {}, 0
    for node in walk(params).nodes:
        n = len(jax.tree.leaves(node.value))
        if node.path in targets:
            ndim = jax.numpy.ndim(jax.tree.leaves(node.value)[0])
            tracked[index] = Tracked(
                node.path, tuple((i,) for i in range(ndim)), frozenset()
            )
        index += n
    closed = jax.make_jaxpr(probe)(params)
    jaxpr = closed.jaxpr
    found = Seen({}, {})
    _walk(jaxpr, {jaxpr.invars[i]: (t,) for i, t in tracked.items()}, found)
    errors, out = [], {}
    for path in sorted(targets):
        seen = found.uses.get(path) or found.lookups.get(path, set())
        tied = _tied(found.uses.get(path, set()), found.lookups.get(path, set()))
        if tied is not None:
            seen = {tied}
        if not seen:
            errors.append(
                f"  {path}: the probe never contracts it (no dot_general, gather or conv "
                "uses it); exclude it or declare LoraConfig(layout=...)"
            )
        elif len(seen) > 1:
            errors.append(
                f"  {path}: the probe uses it in ways that disagree "
                f"(in, out, stacked axes): {sorted(seen)}; declare LoraConfig(layout=...)"
            )
        else:
            ins, outs, stack = next(iter(seen))
            mixed = sorted(set(ins) & set(outs) | set(stack) & set(ins + outs))
            if mixed:
                errors.append(
                    f"  {path}: kernel axes {mixed} are used in more than one role (a "
                    "reshape splits an axis between inputs and outputs?); declare "
                    "LoraConfig(layout=...)"
                )
                continue
            if not ins or not outs:
                errors.append(
                    f"  {path}: used with inputs {ins} and outputs {outs}; "
                    "declare LoraConfig(layout=...)"
                )
                continue
            out[path] = Layout(ins, outs, stack)
    if errors:
        raise ValueError(
            "jlora.init(probe=...): cannot infer layouts:\n" + "\n".join(errors)
        )
    return out
