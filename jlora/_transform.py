"""`lora(fn)`: run any JAX function on adapted params with factored low-rank compute.

The function is traced with plain arrays standing in for the `LoraWeight`s; the jaxpr
is then evaluated by an interpreter that holds each adapted kernel as a `LowRank`
value. Equations touching one go to the rule table in `_rules.py`; all others are
re-bound unchanged. The interpreter runs at trace time and emits ordinary JAX ops, so
`jit`, `grad`, `vmap`, `remat` and sharding compose with it.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _jax_compat as compat
from jlora._boxes import unbox
from jlora._targets import path_str
from jlora._weight import Layout, LoraWeight, Trainable, is_node, materialize


class RuleError(RuntimeError):
    """Raised in strict mode when an adapted kernel would be materialized."""


@dataclasses.dataclass(frozen=True)
class LowRank:
    """Symbolic `w + scale * a @ b` inside the interpreter (a pytree: w, a, b)."""

    w: Any
    a: Any
    b: Any
    scale: float
    layout: Layout
    path: str
    dropout: float

    @property
    def shape(self):
        return jnp.shape(self.w)

    @property
    def dtype(self):
        return self.w.dtype

    def replace(self, **kw) -> LowRank:
        return dataclasses.replace(self, **kw)

    def materialize(self):
        return materialize(self.w, self.a, self.b, self.layout, self.scale)


jax.tree_util.register_pytree_node(
    LowRank,
    lambda lr: ((lr.w, lr.a, lr.b), (lr.scale, lr.layout, lr.path, lr.dropout)),
    lambda aux, ch: LowRank(*ch, *aux),
)


@dataclasses.dataclass
class Context:
    """Per-call interpreter state: dropout key, strictness, and what handled what."""

    rng: Any = None
    strict: bool = False
    record: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    warned: set = dataclasses.field(default_factory=set)
    sites: dict[str, int] = dataclasses.field(default_factory=dict)
    in_shard_map: bool = False

    def note(self, lr: LowRank, rule: str) -> None:
        seen = self.record.setdefault(lr.path, [])
        if rule not in seen:
            seen.append(rule)

    def note_all(self, values, rule: str) -> None:
        for v in values:
            if isinstance(v, LowRank):
                self.note(v, rule)

    def child(self, rng) -> Context:
        """Same records and warnings, another dropout key (a scan iteration)."""
        return dataclasses.replace(self, rng=rng)

    def manual(self) -> Context:
        """Same records and warnings, inside a `shard_map` body: each dropout mask is
        also folded with the index of every mesh axis its input varies over."""
        return dataclasses.replace(self, in_shard_map=True)

    def dropout(self, x, lr: LowRank):
        """`x` with inverted dropout at rate `lr.dropout`, if a key was given."""
        if self.rng is None or lr.dropout == 0.0:
            return x
        site = self.sites.get(lr.path, 0)
        self.sites[lr.path] = site + 1
        key = jax.random.fold_in(self.rng, zlib.crc32(lr.path.encode()) & 0xFFFFFFFF)
        key = jax.random.fold_in(key, site)
        if self.in_shard_map:
            for axis in sorted(compat.varying_axes(x) or (), key=str):
                key = jax.random.fold_in(key, jax.lax.axis_index(axis))
        keep = jax.random.bernoulli(key, 1.0 - lr.dropout, jnp.shape(x))
        kept = x * jnp.asarray(1.0 / (1.0 - lr.dropout), x.dtype)
        return jnp.where(keep, kept, jnp.zeros((), x.dtype))

    def materialize(self, value, primitive: str, why: str = ""):
        """The dense kernel for an equation no rule handles; warns once, or raises."""
        if not isinstance(value, LowRank):
            return value
        self.note(value, f"materialize:{primitive}")
        msg = (
            f"jlora: {value.path} flows into '{primitive}'"
            + (f" ({why})" if why else "")
            + ", which has no low-rank rule; W + scale*A@B is materialized for this "
            "equation only."
        )
        if self.strict:
            raise RuleError(msg + " (strict=True; drop strict to allow it.)")
        if (primitive, value.path) not in self.warned:
            self.warned.add((primitive, value.path))
            warnings.warn(msg, stacklevel=3)
        return value.materialize()

    def interpret(self, jaxpr, consts, args):
        return interpret(self, jaxpr, consts, args)


def interpret(ctx: Context, jaxpr, consts, args) -> list[Any]:
    """Evaluates an open jaxpr whose inputs may be `LowRank` values."""
    from jlora._rules import RULES

    env: dict[Any, Any] = {}

    def read(v):
        return v.val if compat.is_literal(v) else env[v]

    for var, val in zip(jaxpr.constvars, consts):
        env[var] = val
    for var, val in zip(jaxpr.invars, args):
        env[var] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(isinstance(v, LowRank) for v in invals):
            rule = RULES.get(eqn.primitive.name)
            if rule is None:
                invals = [ctx.materialize(v, eqn.primitive.name) for v in invals]
                outs = compat.bind(eqn, invals)
            else:
                outs = rule(ctx, eqn, invals)
        else:
            outs = compat.bind(eqn, invals)
        for var, val in zip(eqn.outvars, outs):
            env[var] = val
    return [read(v) for v in jaxpr.outvars]


def _node_path(path) -> str:
    # Inside an NNX Variable the node sits under `.../kernel/value`: drop that `value`.
    keys = list(path)
    if keys and getattr(keys[-1], "name", None) == "value":
        keys = keys[:-1]
    # Leading keys address `(args, kwargs)` and the argument itself.
    if len(keys) >= 2 and getattr(keys[0], "idx", None) == 0:
        head = "" if getattr(keys[1], "idx", None) == 0 else f"arg{keys[1].idx}/"
        return head + path_str(keys[2:])
    if len(keys) >= 2:
        return f"{keys[1].key}/" + path_str(keys[2:])
    return path_str(keys)


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or compat.is_tracer(x)


def _prepare(args, kwargs):
    """Splits `(args, kwargs)` into array inputs, static leaves and LowRank slots."""
    node_leaves, node_def = jax.tree_util.tree_flatten_with_path(
        (args, kwargs), is_leaf=is_node
    )
    stand_ins, lowrank_at, flat = [], {}, []
    for path, leaf in node_leaves:
        if isinstance(leaf, LoraWeight):
            w = unbox(leaf.w)
            lowrank_at[len(flat)] = LowRank(
                w,
                unbox(leaf.a),
                unbox(leaf.b),
                leaf.scale,
                leaf.layout,
                _node_path(path),
                leaf.dropout,
            )
            stand_ins.append(leaf.w)
            flat.extend(jax.tree.leaves(leaf.w))
        elif isinstance(leaf, Trainable):
            stand_ins.append(leaf.value)
            flat.extend(jax.tree.leaves(leaf.value))
        else:
            stand_ins.append(leaf)
            flat.append(leaf)
    tree = jax.tree_util.tree_unflatten(node_def, stand_ins)
    leaves, in_tree = jax.tree_util.tree_flatten(tree)
    assert len(leaves) == len(flat)
    array_idx = [i for i, x in enumerate(leaves) if _is_array(x)]
    return leaves, in_tree, array_idx, lowrank_at


def _with_arrays(fn, leaves, treedef, array_idx):
    """`fn` as a function of the array leaves only; the other leaves stay static."""

    def flat_fn(*arrays):
        full = list(leaves)
        for i, x in zip(array_idx, arrays):
            full[i] = x
        a, kw = jax.tree_util.tree_unflatten(treedef, full)
        return fn(*a, **kw)

    return flat_fn


def _trace(fn, leaves, in_tree, array_idx):
    flat_fn = _with_arrays(fn, leaves, in_tree, array_idx)
    arrays = [leaves[i] for i in array_idx]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*arrays)
    return closed, jax.tree_util.tree_structure(out_shape)


def run(fn, args, kwargs, ctx: Context, *, abstract: bool = False):
    """`fn(*args, **kwargs)` with every `LoraWeight` held low-rank.

    With `abstract=True` the interpretation runs under `jax.eval_shape`: the same
    trace and the same rules, nothing computed (what `explain` needs).
    """
    leaves, in_tree, array_idx, lowrank_at = _prepare(args, kwargs)
    if not lowrank_at:
        a, kw = jax.tree_util.tree_unflatten(in_tree, leaves)
        return fn(*a, **kw)
    closed, out_tree = _trace(fn, leaves, in_tree, array_idx)
    inputs = [lowrank_at.get(i, leaves[i]) for i in array_idx]

    def evaluate(inputs):
        outs = interpret(ctx, closed.jaxpr, closed.consts, inputs)
        return [ctx.materialize(o, "output") for o in outs]

    outs = jax.eval_shape(evaluate, inputs) if abstract else evaluate(inputs)
    return jax.tree_util.tree_unflatten(out_tree, outs)


def lora(fn: Callable, *, rng: jax.Array | None = None, strict: bool = False) -> Callable:
    """Transforms `fn` to run on adapted params with factored low-rank compute.

    The returned function has `fn`'s signature and accepts `LoraWeight` (and
    `Trainable`) leaves anywhere in its arguments. Every use of an adapted kernel is
    computed as `x @ W + scale * (dropout(x) @ A) @ B`; `W + scale * A @ B` is never
    formed on the training path. Composes with `jit`, `grad`, `vmap`, `remat`, `scan`,
    and can itself be jitted. On plain (merged) params it calls `fn` unchanged.

    Args:
      fn: any function of arrays (`model.apply`, a closure over `nnx.merge`, jnp code).
      rng: PRNG key for dropout on the LoRA branch input (the rate is each
        `LoraWeight`'s `dropout`, from `LoraConfig.dropout`). No key: no dropout. The
        same key gives the same masks; every use of a kernel (site) and every scan
        iteration gets its own mask. Under `vmap` the key is shared, so masks are the
        same for every mapped example unless you `vmap` over keys too.
      strict: raise `jlora.RuleError` instead of materializing a kernel for an
        equation no rule handles (by default that warns once per primitive and path).

    Returns:
      the transformed function.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> lp = jlora.init(jax.random.key(0), {"kernel": jnp.ones((4, 3))},
      ...                 jlora.LoraConfig(2, 2))
      >>> y = jlora.lora(lambda p, x: x @ p["kernel"])(lp, jnp.ones((1, 4)))
      >>> y.shape
      (1, 3)
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return run(fn, args, kwargs, Context(rng=rng, strict=strict))

    return wrapped


def explain(fn: Callable, *args, **kwargs) -> dict[str, tuple[str, ...]]:
    """Which rule(s) handled each adapted leaf when `lora(fn)(*args, **kwargs)` runs.

    Traces only (nothing is computed). A rule name prefixed `materialize:` means that
    equation formed the dense kernel.

    Returns:
      `{path: (rule, ...)}` for every `LoraWeight` in the arguments; an empty tuple
      means the kernel was never used.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> lp = jlora.init(jax.random.key(0), {"kernel": jnp.ones((4, 3))},
      ...                 jlora.LoraConfig(2, 2))
      >>> jlora.explain(lambda p, x: x @ p["kernel"], lp, jnp.ones((1, 4)))
      {'kernel': ('dot_general',)}
    """
    ctx = Context()
    lowrank = _prepare(args, kwargs)[3].values()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(fn, args, kwargs, ctx, abstract=True)
    return {lr.path: tuple(ctx.record.get(lr.path, ())) for lr in lowrank}
