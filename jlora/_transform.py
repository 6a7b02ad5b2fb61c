"""`lora(fn)` and `explain`: the public face of the interpreter.

The function is traced with plain arrays standing in for the `LoraWeight`s; the jaxpr
is then evaluated by the interpreter (`_interpret.py`) holding each adapted kernel as a
`Factored` value, with the rule table of `_rules.py`. The interpreter runs at trace
time and emits ordinary JAX ops, so `jit`, `grad`, `vmap`, `remat` and sharding compose
with it.
"""

from __future__ import annotations

import collections
import functools
import threading
import types
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _jax_compat as compat
from jlora._boxes import unbox
from jlora._interpret import Context, Factored, RuleError, interpret
from jlora._quant import Deferred, is_quantized, stand_in
from jlora._rules import RULES
from jlora._targets import LORA, TRAINED, path_string, walk
from jlora._weight import ANY, ROW, Stack

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
    return isinstance(
        x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)
    ) or compat.is_tracer(x)


def _prepare(args, kwargs):
    """Splits `(args, kwargs)` into array inputs, static leaves and LowRank slots."""
    nodes = walk((args, kwargs))
    stand_ins, lowrank_at, flat = [], {}, []
    for node in nodes.nodes:
        if node.kind == LORA:
            lw = node.value
            row = isinstance(lw.stack, Stack) and lw.stack == ROW
            if lw.stack is not None and not row:
                raise ValueError(
                    f"jlora.lora: {_node_path(node.keys)} holds a stacked set of "
                    f"adapters {list(lw.stack.names)}; serve a batch from it with "
                    "jlora.lora(fn, adapter_ids=ids), or run one adapter with "
                    "jlora.select(stacked, name)."
                )
            if unbox(lw.w) is None:
                raise ValueError(
                    f"jlora.lora: {_node_path(node.keys)} holds adapters without a base "
                    "kernel (the adapters jlora.split returns); call the function on "
                    "jlora.combine(adapters, base)."
                )
            # Frozen by construction: no gradient ever flows into the kernel, so none
            # is formed (no `dW = x^T g`), whoever differentiates the whole tree.
            w = jax.lax.stop_gradient(unbox(lw.w))
            quantized = is_quantized(w)
            if quantized:  # dequantized at each use (see _quant.Deferred)
                w = Deferred(w)
            m = unbox(lw.m)  # DoRA's magnitude, laid out as b with a rank of 1
            if m is not None:
                m = jnp.expand_dims(m, len(lw.layout.stack_axes))
            lowrank_at[len(flat)] = Factored(
                w,
                unbox(lw.a),
                lw.layout.expand_b(unbox(lw.b)),  # (fused parts: b at full width)
                lw.scale,
                lw.layout.plain(),
                _node_path(node.keys),
                lw.dropout,
                m,
                fixed=row,  # (a mixed batch's row: m holds m / norm)
            )
            if quantized:
                stand_ins.append(node.put_back(stand_in(w.q)))
                flat.append(None)
                continue
            stand_ins.append(node.put_back(lw.w))
            flat.extend(jax.tree.leaves(lw.w))
        elif node.kind == TRAINED:
            stand_ins.append(node.put_back(node.value.value))
            flat.extend(jax.tree.leaves(node.value.value))
        elif is_quantized(unbox(node.value)):  # a frozen kernel without adapters
            q = jax.lax.stop_gradient(unbox(node.value))
            lowrank_at[len(flat)] = Deferred(q)
            stand_ins.append(node.put_back(stand_in(q)))
            flat.append(None)
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


def lora(
    fn: Callable,
    *,
    rng: jax.Array | None = None,
    strict: bool = False,
    adapter_ids: Any = None,
    in_axes: Any = None,
    out_axes: Any = 0,
) -> Callable:
    """Transforms `fn` to run on adapted params with factored low-rank compute.

    The returned function has `fn`'s signature and accepts `LoraWeight` (and
    `Trainable`) leaves anywhere in its arguments. Every use of an adapted kernel is
    computed as `x @ W + scale * (dropout(x) @ A) @ B`; `W + scale * A @ B` is never
    formed on the training path. Composes with `jit`, `grad`, `vmap`, `remat`, `scan`,
    and can itself be jitted. On plain (merged) params it calls `fn` unchanged.

    Eager calls (outside `jit`, `grad`, `vmap`, ...) are compiled: the first call of a
    signature traces `fn` and compiles the interpreted program with `jax.jit`; later
    calls with the same function, tree structure, `LoraWeight` metadata (scale,
    layout, dropout), non-array leaves and array shapes/dtypes/shardings run that
    program, as a jitted call would. So, as under `jax.jit`, Python side effects in
    `fn` happen when it is traced, and Python state it reads (globals, attributes of
    objects it closes over) is read then. A function is identified by its code and
    the values it closes over, so a closure built anew each call over equal values
    (`lambda s, x: nnx.merge(graphdef, s)(x)`) hits the cache; one that closes over an
    array, a list or a dict is identified by its object, and a new such closure each
    call traces and compiles each call (cost: a `jax.jit` of `fn`); reuse the function
    or jit the caller. A non-array leaf that is not compared by value (a mutable
    object) is never cached: such calls run the traced path every time. The cache holds
    the 64 most recent (function, tree structure, non-array leaves) entries, each a
    `jax.jit` with its own per-shape cache; it holds no arguments, and an entry keyed by
    an object dies with it.

    Args:
      fn: any function of arrays (`model.apply`, a closure over `nnx.merge`, jnp code).
      rng: PRNG key for dropout on the LoRA branch input (the rate is each
        `LoraWeight`'s `dropout`, from `LoraConfig.dropout`). No key: no dropout. The
        same key gives the same masks; every use of a kernel (site) and every scan
        iteration gets its own mask. Under `vmap` the key is shared, so masks are the
        same for every mapped example unless you `vmap` over keys too.
      strict: raise `jlora.RuleError` instead of materializing a kernel for an
        equation no rule handles (by default that warns once per primitive and path).
      adapter_ids: serve a mixed batch from a stacked set (`jlora.stack_adapters`,
        combined with its base in the first argument): row `i` of the batch runs with
        adapter `adapter_ids[i]`, `-1` (or None in a list of names) with the base
        alone. An integer array (maybe traced) or a list of names. The factors are
        gathered per row and `fn` is mapped over the rows with `jax.vmap`, the base
        unbatched, so the frozen kernels' matmuls run once over the whole batch; `fn`
        sees one row at a time with a batch axis of size 1. Concrete ids are checked
        (range, names); traced ids out of range give NaN rows, never another adapter.
      in_axes: with `adapter_ids`: the batch axis of each positional argument, as
        `jax.vmap`'s `in_axes` (prefix trees, None for inputs shared by every row).
        Default: the params (first argument) shared, every other argument batched on
        axis 0. Keyword arguments are shared by every row. A batched input without
        `len(adapter_ids)` rows on its axis is an error naming it.
      out_axes: with `adapter_ids`: the batch axis of each output (`jax.vmap`'s
        `out_axes`; default 0).

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

    if adapter_ids is not None:
        from jlora._adapters import mixed

        return functools.wraps(fn)(
            mixed(fn, adapter_ids, in_axes, out_axes, lora(fn, rng=rng, strict=strict))
        )
    if in_axes is not None or out_axes != 0:
        raise ValueError(
            "jlora.lora: in_axes and out_axes are for mixed batches; pass adapter_ids too."
        )

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if compat.at_top_level():  # an eager call: compiled once per signature
            call = _eager_call(fn, args, kwargs, strict)
            if call is not None:
                return call(rng)
        return run(fn, args, kwargs, Context(rules=RULES, rng=rng, strict=strict))

    return wrapped


# Eager calls ----------------------------------------------------------------------------
#
# Outside any transformation, `lora(fn)(*args)` runs the interpretation inside a
# `jax.jit` kept in a small cache, so the second eager call of the same signature costs
# what a jitted call costs instead of a trace and an interpretation. The cache key is
# what determines the traced program apart from the arrays' shapes, dtypes and
# shardings (which `jax.jit`'s own cache keys on): the function, the input tree
# structure (its node metadata includes each `LoraWeight`'s scale, layout and dropout,
# and the paths), the non-array leaves, and `strict`. The dropout key is an argument of
# the compiled call. Keys hold no arrays; objects compared by identity (a callable
# object, a method's instance, a closure over an array) are held weakly and their
# entries dropped when they die. Whatever cannot be keyed runs the traced path.


class _Uncacheable(Exception):
    pass


class _Ref:
    """An object held weakly in a cache key, compared by identity while it lives."""

    __slots__ = ("ref", "ident")

    def __init__(self, obj, on_death):
        try:
            self.ref = weakref.ref(obj, on_death)
        except TypeError:
            raise _Uncacheable from None
        self.ident = id(obj)

    def __hash__(self):
        return self.ident

    def __eq__(self, other):
        if not isinstance(other, _Ref):
            return NotImplemented
        obj = self.ref()
        return obj is not None and obj is other.ref()


class _EagerCache:
    """A bounded LRU of compiled eager calls; entries die with the objects they name."""

    def __init__(self, size: int):
        self.size = size
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.by_ref: dict[int, set] = {}  # id(weakref) -> keys that hold it
        self.dead: list[int] = []
        self.lock = threading.Lock()

    def on_death(self, wr) -> None:
        self.dead.append(id(wr))  # purged under the lock, here or at the next access
        if self.lock.acquire(blocking=False):
            try:
                self._purge()
            finally:
                self.lock.release()

    def _purge(self) -> None:
        while self.dead:
            for key in self.by_ref.pop(self.dead.pop(), ()):
                self._drop(key)

    def _drop(self, key) -> None:
        got = self.entries.pop(key, None)
        if got is None:
            return
        for wr in got[1]:
            keys = self.by_ref.get(id(wr))
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.by_ref[id(wr)]

    def get(self, key):
        with self.lock:
            self._purge()
            got = self.entries.get(key)
            if got is None:
                return None
            self.entries.move_to_end(key)
            return got[0]

    def put(self, key, refs: list, entry) -> None:
        with self.lock:
            self._purge()
            wrs = [r.ref for r in refs]
            self.entries[key] = (entry, wrs)
            for wr in wrs:
                self.by_ref.setdefault(id(wr), set()).add(key)
            while len(self.entries) > self.size:
                self._drop(next(iter(self.entries)))

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.by_ref.clear()
            self.dead.clear()


_EAGER = _EagerCache(64)
_PLAIN = object()  # an entry for inputs without adapted kernels
_VALUES = (type(None), bool, int, float, complex, str, bytes, type(Ellipsis), np.dtype)
_MAX_DEPTH = 8


def _static_key(x, refs: list, depth: int = 0, *, weak: bool = False):
    """A hashable stand-in for a non-array value the traced program depends on: the
    value itself if it is compared by value, a function by what it computes, and (with
    `weak`) any other object but an array by its identity, held weakly. Raises
    `_Uncacheable` for anything else."""
    if depth > _MAX_DEPTH:
        raise _Uncacheable
    if isinstance(x, _VALUES):
        return (type(x), x)
    if isinstance(x, (types.FunctionType, types.MethodType)):
        return _function_key(x, refs, depth + 1, weak_fallback=False)
    if isinstance(x, (type, types.ModuleType)) or (
        isinstance(x, types.BuiltinFunctionType)
        and isinstance(getattr(x, "__self__", None), (types.ModuleType, type(None)))
    ):
        return x  # long-lived; compared by identity
    if _is_array(x):
        raise _Uncacheable  # (a weak key would die only with the program holding it)
    if type(x).__hash__ is not object.__hash__:
        try:
            hash(x)
            return (type(x), x)
        except TypeError:
            pass
    if not weak:
        raise _Uncacheable
    ref = _Ref(x, _EAGER.on_death)
    refs.append(ref)
    return ref


def _function_key(fn, refs: list, depth: int = 0, *, weak_fallback: bool = True):
    """What identifies `fn` as a computation.

    A Python function is its code, the values it closes over and its defaults (so a
    closure built anew each call, `lambda s, x: nnx.merge(graphdef, s)(x)`, is the same
    function while `graphdef` is equal); a bound method is its function and instance.
    Anything else, or a closure over a value without a value key (an array, a mutable
    object), is held weakly by identity (with `weak_fallback`).
    """
    try:
        if isinstance(fn, types.MethodType):
            this = _static_key(fn.__self__, refs, depth + 1, weak=True)
            return ("method", _function_key(fn.__func__, refs, depth + 1), this)
        if isinstance(fn, types.FunctionType):
            values = functools.partial(_static_key, refs=refs, depth=depth + 1, weak=True)
            cells = tuple(values(c.cell_contents) for c in fn.__closure__ or ())
            defaults = tuple(values(d) for d in fn.__defaults__ or ())
            kwdefaults = tuple(
                (k, values(v)) for k, v in sorted((fn.__kwdefaults__ or {}).items())
            )
            return ("function", fn.__code__, cells, defaults, kwdefaults)
    except (_Uncacheable, ValueError):  # ValueError: an empty closure cell
        if not weak_fallback:
            raise _Uncacheable from None
    if not weak_fallback:
        raise _Uncacheable
    ref = _Ref(fn, _EAGER.on_death)
    refs.append(ref)
    return ("object", ref)


class _Current(threading.local):
    fn: Callable | None = None


_CURRENT = _Current()  # the function a compiled eager call traces, during that call


def _compiled(fn, treedef, where, static, strict: bool):
    """A `jax.jit` of the interpretation for one cache key. It reaches the function
    through `_CURRENT` while it is called, so the cache holds no reference to it."""
    template = list(static)
    for i in where:
        template.insert(i, None)

    def eager(rng, arrays):
        full = list(template)
        for i, x in zip(where, arrays):
            full[i] = x
        args, kwargs = jax.tree_util.tree_unflatten(treedef, full)
        ctx = Context(rules=RULES, rng=rng, strict=strict)
        return run(_CURRENT.fn, args, kwargs, ctx)

    name = getattr(fn, "__name__", type(fn).__name__)
    eager.__name__ = eager.__qualname__ = f"lora({name})"
    return jax.jit(eager)


def _eager_call(fn, args, kwargs, strict: bool):
    """The cached call for `lora(fn)(*args, **kwargs)` outside any trace, as a function
    of the dropout key, or None where the call cannot be keyed (it then runs traced)."""
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    arrays, where, static = [], [], []
    for i, x in enumerate(leaves):
        if _is_array(x):
            if compat.is_tracer(x):
                return None
            arrays.append(x)
            where.append(i)
        else:
            static.append(x)
    refs: list = []
    try:
        statics = tuple(_static_key(x, refs) for x in static)
        key = (_function_key(fn, refs), treedef, tuple(where), statics, strict)
        entry = _EAGER.get(key)
    except (_Uncacheable, TypeError, ValueError):
        return None
    if entry is None:
        walked = walk((args, kwargs)).nodes
        nodes = [n for n in walked if n.kind == LORA]
        if any(n.value.scale is ANY or n.value.layout is ANY for n in nodes):
            return None  # spec-tree metadata equals anything: never a key
        # (a quantized kernel without adapters is interpreted too: dequantized at use)
        interpreted = nodes or any(is_quantized(unbox(n.value)) for n in walked)
        entry = _compiled(fn, treedef, where, static, strict) if interpreted else _PLAIN
        _EAGER.put(key, refs, entry)
    if entry is _PLAIN:  # no adapted kernel: `fn` itself, as on the traced path
        return lambda rng: run(fn, args, kwargs, Context(RULES, rng, strict))

    def call(rng):
        previous, _CURRENT.fn = _CURRENT.fn, fn
        try:
            return entry(rng, arrays)
        finally:
            _CURRENT.fn = previous

    return call


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
    lowrank = [v for v in _prepare(args, kwargs)[3].values() if isinstance(v, Factored)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(fn, args, kwargs, ctx, abstract=True)
    return {lr.path: tuple(ctx.record.get(lr.path, ())) for lr in lowrank}
