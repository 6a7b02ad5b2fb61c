"""`lora(fn)` and `explain`: the public face of the interpreter.

The function is traced with plain arrays standing in for the `LoraWeight`s; the jaxpr
is then evaluated by the interpreter (`_interpret.py`) holding each adapted kernel as a
`Factored` value, with the rule table of `_rules.py`. The interpreter runs at trace
time and emits ordinary JAX ops, so `jit`, `grad`, `vmap`, `remat` and sharding compose
with it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import jax
import numpy as np

from jlora import _jax_compat as compat
from jlora._boxes import unbox
from jlora._interpret import Context, Factored, RuleError, interpret
from jlora._rules import RULES
from jlora._targets import LORA, TRAINED, path_string, walk

__all__ = ["RuleError", "explain", "lora"]


def _node_path(keys) -> str:
    """A kernel's path among `(args, kwargs)`: as in the argument itself for the first
    positional argument (the params), prefixed `argN/` or `name/` for the others."""
    if len(keys) < 2:
        return path_string(keys)
    which, arg = keys[0], keys[1]
    if getattr(which, "idx", None) == 0:  # positional
        head = "" if getattr(arg, "idx", None) == 0 else f"arg{arg.idx}/"
    else:
        head = path_string((arg,)) + "/"
    return head + path_string(keys[2:])


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or compat.is_tracer(x)


def _prepare(args, kwargs):
    """Splits `(args, kwargs)` into array inputs, static leaves and LowRank slots."""
    nodes = walk((args, kwargs))
    stand_ins, lowrank_at, flat = [], {}, []
    for node in nodes.nodes:
        if node.kind == LORA:
            lw = node.value
            # Frozen by construction: no gradient ever flows into the kernel, so none
            # is formed (no `dW = x^T g`), whoever differentiates the whole tree.
            w = jax.lax.stop_gradient(unbox(lw.w))
            lowrank_at[len(flat)] = Factored(
                w,
                unbox(lw.a),
                unbox(lw.b),
                lw.scale,
                lw.layout,
                _node_path(node.keys),
                lw.dropout,
            )
            stand_ins.append(node.put_back(lw.w))
            flat.extend(jax.tree.leaves(lw.w))
        elif node.kind == TRAINED:
            stand_ins.append(node.put_back(node.value.value))
            flat.extend(jax.tree.leaves(node.value.value))
        else:
            stand_ins.append(node.leaf)
            flat.extend(jax.tree.leaves(node.leaf))
    tree = nodes.rebuild(stand_ins)
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
        return run(fn, args, kwargs, Context(rules=RULES, rng=rng, strict=strict))

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
    ctx = Context(rules=RULES)
    lowrank = _prepare(args, kwargs)[3].values()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(fn, args, kwargs, ctx, abstract=True)
    return {lr.path: tuple(ctx.record.get(lr.path, ())) for lr in lowrank}
