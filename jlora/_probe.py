"""Layout inference: which axes of each kernel a function contracts, keeps and stacks.

`infer(probe, params, targets)` traces `probe(params)` once and follows each target
kernel through the jaxpr to the equations that consume it, reading the same
per-primitive descriptions the rules use (`_axes.py`): through every primitive that
moves axes (casts, transposes, placements, squeezes, size-1 reshapes, broadcasts,
slices) and into every body (jit, remat, custom derivatives, shard_map, cond, while,
scan, barriers) to `dot_general` (contracted axes are inputs, batch axes stacked,
free axes outputs), `gather` (rows are inputs) and `conv_general_dilated`.
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
    axes: tuple  # for each axis of this value: the kernel axis it is, or None (new)
    stacked: frozenset  # kernel axes already indexed away (layers)


def _observe(obs, t: Tracked, use: _axes.Use) -> None:
    def kernel_axes(positions):
        return {t.axes[i] for i in positions} - {None}

    ins, outs, batch = (
        kernel_axes(use.contract),
        kernel_axes(use.free),
        kernel_axes(use.batch),
    )
    obs.setdefault(t.path, set()).add(
        (tuple(sorted(ins)), tuple(sorted(outs)), tuple(sorted(batch | t.stacked)))
    )


def _moved(t: Tracked, moves: tuple) -> Tracked:
    kept = {src for src in moves if src is not None}
    dropped = {t.axes[i] for i in range(len(t.axes)) if i not in kept} - {None}
    axes = tuple(None if src is None else t.axes[src] for src in moves)
    return Tracked(t.path, axes, t.stacked | dropped)


def _sliced(t: Tracked) -> Tracked:
    """`t` as a loop body sees one slice of its first axis (a layer of a stack)."""
    return Tracked(t.path, t.axes[1:], t.stacked | ({t.axes[0]} - {None}))


def _walk(jaxpr, tracked_in: dict, obs: dict) -> list:
    """Follows the tracked kernels through `jaxpr`; returns what its outputs are."""
    env = dict(tracked_in)

    def get(v):
        return None if compat.is_literal(v) else env.get(v)

    for eqn in jaxpr.eqns:
        ins = [get(v) for v in eqn.invars]
        if not any(ins):
            continue
        if ins[0] is not None:
            moves = _axes.moves(eqn, compat.var_shape(eqn.invars[0]))
            if moves is not None:
                env[eqn.outvars[0]] = _moved(ins[0], moves)
                continue
        for i, t in enumerate(ins):
            use = None if t is None else _axes.uses(eqn, i, len(t.axes))
            if use is not None:
                _observe(obs, t, use)
        links = _axes.links(eqn) or []
        inner: dict = {}
        for link in links:
            t = ins[link.operand]
            if t is None:
                continue
            t = _sliced(t) if link.sliced else t
            if link.jaxpr is None:
                env[link.target] = t
            else:
                inner.setdefault(id(link.jaxpr), (link.jaxpr, {}))[1][link.target] = t
        for body, bound in inner.values():
            outs = _walk(body, bound, obs)
            if compat.primitive_name(eqn) in _axes.RETURNS:
                env.update({v: t for v, t in zip(eqn.outvars, outs) if t is not None})
    return [get(v) for v in jaxpr.outvars]


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
            tracked[index] = Tracked(node.path, tuple(range(ndim)), frozenset())
        index += n
    closed = jax.make_jaxpr(probe)(params)
    jaxpr = closed.jaxpr
    obs: dict[str, set] = {}
    _walk(jaxpr, {jaxpr.invars[i]: t for i, t in tracked.items()}, obs)
    errors, out = [], {}
    for path in sorted(targets):
        seen = obs.get(path, set())
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
