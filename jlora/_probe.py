"""Layout inference: which axes of each kernel a function contracts, keeps and stacks.

`infer(probe, params, targets)` traces `probe(params)` once and follows each target
kernel through the jaxpr (into jit, remat, custom derivatives, scan, cond and while
bodies, through transposes, dtype casts and layer indexing) to the equations that use
it: `dot_general` (contracting axes = inputs, batch axes = stacked, free = outputs),
`gather` (a row lookup: rows are inputs) and `conv_general_dilated`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

from jlora import _jax_compat as compat
from jlora._targets import flatten
from jlora._weight import Layout


class Tracked(NamedTuple):
    path: str
    axes: tuple[int, ...]  # kernel axis of each axis of this value
    stacked: frozenset[int]  # kernel axes already indexed away (layers)


def _observe(obs, t: Tracked, ins, outs, stack):
    obs.setdefault(t.path, set()).add(
        (tuple(sorted(ins)), tuple(sorted(outs)), tuple(sorted(set(stack) | t.stacked)))
    )


def _walk(jaxpr, tracked_in: dict, obs: dict) -> None:
    env = dict(tracked_in)

    def get(v):
        return None if compat.is_literal(v) else env.get(v)

    for eqn in jaxpr.eqns:
        ins = [get(v) for v in eqn.invars]
        if not any(ins):
            continue
        name = eqn.primitive.name
        p = eqn.params
        if name == "dot_general":
            (lc, rc), (lb, rb) = p["dimension_numbers"]
            for t, contract, batch in ((ins[0], lc, lb), (ins[1], rc, rb)):
                if t is None:
                    continue
                c = {t.axes[i] for i in contract}
                b = {t.axes[i] for i in batch}
                free = set(t.axes) - c - b
                _observe(obs, t, c, free, b)
        elif name in ("convert_element_type", "copy", "sharding_constraint", "reshard"):
            env[eqn.outvars[0]] = ins[0]
        elif name == "optimization_barrier":
            env.update(_bind(eqn.outvars, ins))
        elif name == "shard_map":
            inner, _ = compat.call_jaxpr(eqn)
            _walk(inner, _bind(inner.invars, ins), obs)
        elif name == "transpose":
            t = ins[0]
            perm = p["permutation"]
            env[eqn.outvars[0]] = t._replace(axes=tuple(t.axes[i] for i in perm))
        elif name in ("dynamic_slice", "slice"):
            if ins[0] is not None:
                env[eqn.outvars[0]] = ins[0]
        elif name == "squeeze":
            t = ins[0]
            env[eqn.outvars[0]] = _drop(t, {d % len(t.axes) for d in p["dimensions"]})
        elif name == "reshape" and ins[0] is not None:
            old = eqn.invars[0].aval.shape
            ones = {i for i, s in enumerate(old) if s == 1}
            if tuple(s for i, s in enumerate(old) if i not in ones) == tuple(
                p["new_sizes"]
            ):
                env[eqn.outvars[0]] = _drop(ins[0], ones)
        elif name == "gather" and ins[0] is not None:
            t = ins[0]
            dn = p["dimension_numbers"]
            rows = {t.axes[i] for i in dn.collapsed_slice_dims}
            _observe(obs, t, rows, set(t.axes) - rows, ())
        elif name == "conv_general_dilated" and ins[1] is not None:
            t = ins[1]
            spec = p["dimension_numbers"].rhs_spec
            out = {t.axes[spec[0]]}
            _observe(obs, t, set(t.axes) - out, out, ())
        elif name in compat.JIT_NAMES + compat.REMAT_NAMES + compat.CUSTOM_CALL_NAMES:
            inner, _ = compat.call_jaxpr(eqn)
            _walk(inner, _bind(inner.invars, ins), obs)
        elif name == "scan":
            inner, _ = compat.open_jaxpr(p["jaxpr"])
            n_fixed = sum(compat.scan_split(p))
            mapped = list(ins[:n_fixed])
            for t in ins[n_fixed:]:
                mapped.append(
                    None
                    if t is None
                    else Tracked(t.path, t.axes[1:], t.stacked | {t.axes[0]})
                )
            _walk(inner, _bind(inner.invars, mapped), obs)
        elif name == "cond":
            for branch in p["branches"]:
                inner, _ = compat.open_jaxpr(branch)
                _walk(inner, _bind(inner.invars, ins[1:]), obs)
        elif name == "while":
            nc, nb = p["cond_nconsts"], p["body_nconsts"]
            cj, _ = compat.open_jaxpr(p["cond_jaxpr"])
            bj, _ = compat.open_jaxpr(p["body_jaxpr"])
            _walk(cj, _bind(cj.invars[:nc], ins[:nc]), obs)
            _walk(bj, _bind(bj.invars[:nb], ins[nc : nc + nb]), obs)


def _drop(t: Tracked, dims) -> Tracked:
    """`t` with the axes `dims` indexed away (a layer taken out of a stack)."""
    return Tracked(
        t.path,
        tuple(a for i, a in enumerate(t.axes) if i not in dims),
        t.stacked | {t.axes[i] for i in dims},
    )


def _bind(invars, tracked):
    return {v: t for v, t in zip(invars, tracked) if t is not None}


def infer(probe: Callable, params, targets: set[str]) -> dict[str, Layout]:
    """`{path: Layout}` for each target, from how `probe(params)` uses it.

    Raises:
      ValueError: a target the probe never uses, or uses in ways that disagree.
    """
    leaves, _ = flatten(params)
    tracked, index = {}, 0
    for path, leaf in leaves:
        n = len(jax.tree.leaves(leaf))
        if path in targets:
            ndim = jax.numpy.ndim(jax.tree.leaves(leaf)[0])
            tracked[index] = Tracked(path, tuple(range(ndim)), frozenset())
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
