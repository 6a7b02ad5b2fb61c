"""Many adapters on one base: stacked sets, selection, weighted combination, and a
mixed batch in which every row is served by an adapter of its own.

A stacked set is the adapters tree `jlora.split` returns with a leading adapter axis
on every factor: `LoraWeight(None, a[N, ...], b[N, ...], scale=1.0, stack=Stack(...))`.
Ranks are padded to the largest with zero columns of `a` and rows of `b` (exact: the
padded terms are zero) and each adapter's scale is folded into its `b`, so one set has
one scale. The frozen kernel `w` never gains the axis.

A mixed batch (`jlora.lora(fn, adapter_ids=ids)`) gathers each row's factors and maps
the function over the rows with `jax.vmap`, the base unbatched: `x @ w` stays one
matmul over the whole batch, the factors' products are batched matmuls, and the mix
of adapters changes no program (ids are data). Row `i` gets adapter `ids[i]`; `-1`
gets the base alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._boxes import rebox, unbox
from jlora._jax_compat import is_tracer
from jlora._targets import EMPTY, LORA, TRAINED, walk
from jlora._weight import ROW, LoraWeight, Stack, column_norm

# Sets -------------------------------------------------------------------------------------


def _adapters_of(tree, fn_name: str, what: str):
    """The walk of `tree` as adapters (split's form: no kernels), refusing what a set
    cannot hold (fully trained leaves, stacked sets). An NNX model adapted by
    `jlora.nnx.apply` (or loaded by `load_adapter`) gives its adapters."""
    from jlora._nnx_state import as_params

    tree = as_params(tree, f"jlora.{fn_name}")
    nodes = walk(tree).nodes
    if any(n.kind == LORA and unbox(n.value.w) is not None for n in nodes):
        from jlora._merge import split

        tree = split(tree)[0]
    w = walk(tree)
    errors = []
    for n in w.nodes:
        if n.kind == TRAINED:
            errors.append(
                f"  {n.path}: trained fully (a Trainable leaf); a set of adapters holds "
                "low-rank factors only (train such leaves into the base, or leave them "
                "out of LoraConfig's train_bias/also_train)"
            )
        elif n.kind == LORA and n.value.stack is not None:
            errors.append(
                f"  {n.path}: already a stacked set {list(n.value.stack.names)} (take "
                "its adapters out with jlora.unstack_adapters first)"
            )
        elif n.kind == LORA and n.value.a0 is not None:
            errors.append(
                f"  {n.path}: a PiSSA/OLoRA adapter, trained on a base it changed; "
                "convert it to plain LoRA for the original base first "
                "(jlora.plain_lora)"
            )
        elif n.kind == LORA and n.value.m is not None and fn_name == "add_weighted":
            errors.append(
                f"  {n.path}: a DoRA adapter (it rescales the kernel per output by its "
                "magnitude m), which a weighted sum of low-rank updates cannot express; "
                "stack DoRA adapters (jlora.stack_adapters) to serve them side by side"
            )
        elif n.kind not in (LORA, EMPTY):
            errors.append(
                f"  {n.path}: a plain leaf; adapters are what jlora.split returns first"
            )
    if errors:
        raise ValueError(f"jlora.{fn_name}: {what}:\n" + "\n".join(errors))
    return w


def _rank_axis(lw: LoraWeight) -> int:
    """`b`'s rank axis (after any stacked kernel axes)."""
    return len(lw.layout.stack_axes)


def _same_targets(walks: dict, fn_name: str) -> list[str]:
    """The adapted paths, the same in every walk, with kernels of one shape and layout;
    raises naming the first adapter set and path that differ."""
    (first, w0), *rest = walks.items()
    paths0 = [n.path for n in w0.nodes if n.kind == LORA]
    if not paths0:
        raise ValueError(f"jlora.{fn_name}: adapters {first!r} hold no LoraWeight.")
    by0 = w0.by_path()
    errors = []
    for name, w in rest:
        paths = [n.path for n in w.nodes if n.kind == LORA]
        if paths != paths0 or w.treedef != w0.treedef:
            only = sorted(set(paths) ^ set(paths0))
            errors.append(
                f"  {name!r} adapts other kernels than {first!r}"
                + (f": {only[:5]}" if only else " (the trees differ in structure)")
            )
            continue
        by = w.by_path()
        for p in paths0:
            a, b = by[p].value, by0[p].value
            shape_a, shape_b = np.shape(unbox(a.a)), np.shape(unbox(b.a))
            out_a = _without(np.shape(unbox(a.b)), _rank_axis(a))
            out_b = _without(np.shape(unbox(b.b)), _rank_axis(b))
            if a.layout != b.layout or shape_a[:-1] != shape_b[:-1] or out_a != out_b:
                errors.append(
                    f"  {p}: {name!r} is for a kernel with a {list(shape_a[:-1])} input "
                    f"and {list(out_a)} output ({a.layout}), {first!r} for "
                    f"{list(shape_b[:-1])} and {list(out_b)} ({b.layout}): adapters of "
                    "other bases"
                )
            elif unbox(a.a).dtype != unbox(b.a).dtype:
                errors.append(
                    f"  {p}: {name!r} has {unbox(a.a).dtype} factors, {first!r} "
                    f"{unbox(b.a).dtype} (cast them to one dtype first)"
                )
    if errors:
        raise ValueError(
            f"jlora.{fn_name}: the adapters do not fit together:\n" + "\n".join(errors)
        )
    return paths0


def _without(shape, axis):
    return tuple(s for i, s in enumerate(shape) if i != axis)


def _pad_rank(lw: LoraWeight, rank: int):
    """`(a, scale * b)` padded with zeros to `rank`."""
    a, b = unbox(lw.a), unbox(lw.b)
    r, ax = a.shape[-1], _rank_axis(lw)
    if rank != r and lw.layout.fused is not None:
        raise ValueError(
            "jlora.stack_adapters: fused kernels (LoraConfig fused=) stack only at equal "
            f"ranks; got {r} and {rank}."
        )
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, rank - r)])
    pad_b = [(0, 0)] * b.ndim
    pad_b[ax] = (0, rank - r)
    b = jnp.pad(b * jnp.asarray(lw.scale, b.dtype), pad_b)
    return a, b


def stack_adapters(adapters: Mapping[str, Any]) -> Any:
    """Several adapters of one base as one stacked set, for `select` and mixed batches.

    Args:
      adapters: `{name: adapters}`, each as `jlora.split` returns it (or adapted params,
        as `jlora.load_adapter` / `jlora.load_peft` return them: their kernels are left
        out). All must adapt the same kernels of the same base.

    Returns:
      an adapters tree whose `LoraWeight(None, a, b)` nodes hold every adapter on a
      leading axis, in the order of `adapters`: `a: [N, ..., in, R]`, `b: [N, ..., R,
      out]` with `R` the largest rank (smaller ranks padded with zeros, exact), each
      adapter's scale folded into its `b` (`scale=1.0`), and the names, ranks and
      scales in the node's `stack` metadata. `jlora.combine(stacked, base)` puts it
      onto the base.

    Raises:
      ValueError: no adapters, a name that is not a string, adapters of other kernels
        or other bases (the path and names that differ), fully trained leaves.

    Example::

      stacked = jlora.stack_adapters({"sql": jlora.split(p1)[0], "chat": ad2})
      logits = jlora.lora(model.apply, adapter_ids=jnp.array([0, 1, -1]))(
          {"params": jlora.combine(stacked, base)}, ids)
    """
    if not isinstance(adapters, Mapping) or not adapters:
        raise ValueError(
            "jlora.stack_adapters: adapters must be a non-empty {name: adapters} "
            f"mapping, got {type(adapters).__name__}."
        )
    bad = [k for k in adapters if not isinstance(k, str)]
    if bad:
        raise ValueError(f"jlora.stack_adapters: names must be strings, got {bad!r}.")
    walks = {
        name: _adapters_of(tree, "stack_adapters", f"adapters {name!r} cannot be stacked")
        for name, tree in adapters.items()
    }
    _same_targets(walks, "stack_adapters")
    names = tuple(walks)
    nodes = [w.nodes for w in walks.values()]
    w0 = walks[names[0]]
    out = []
    for i, node in enumerate(w0.nodes):
        if node.kind != LORA:
            out.append(node.leaf)
            continue
        lws = [ns[i].value for ns in nodes]
        if len({lw.m is None for lw in lws}) > 1:
            dora = [nm for nm, lw in zip(names, lws) if lw.m is not None]
            raise ValueError(
                f"jlora.stack_adapters: at {node.path}, {dora} are DoRA adapters and "
                f"the others are not; a stacked set holds one kind (stack them apart)."
            )
        rank = max(lw.rank for lw in lws)
        padded = [_pad_rank(lw, rank) for lw in lws]
        a = jnp.stack([p[0] for p in padded])
        b = jnp.stack([p[1] for p in padded])
        stack = Stack(names, tuple(lw.rank for lw in lws), tuple(lw.scale for lw in lws))
        lw = node.value
        dora = {}  # (DoRA: m and the norm per adapter; scale * a @ b is unchanged)
        for child in ("m", "norm"):
            values = [unbox(getattr(x, child)) for x in lws]
            if all(v is not None for v in values):
                dora[child] = rebox(getattr(lw, child), jnp.stack(values))
        out.append(
            node.put_back(
                lw.replace(
                    a=rebox(lw.a, a), b=rebox(lw.b, b), scale=1.0, stack=stack, **dora
                )
            )
        )
    return w0.rebuild(out)


def _stacked_nodes(tree, fn_name: str, argname: str):
    w = walk(tree)
    stacked = [n for n in w.nodes if n.kind == LORA and n.value.stack is not None]
    if not stacked:
        raise ValueError(
            f"jlora.{fn_name}: {argname} holds no stacked set of adapters; build one "
            "with jlora.stack_adapters({name: adapters, ...}) (and "
            "jlora.combine(stacked, base))."
        )
    names = {n.value.stack.names for n in stacked}
    if len(names) > 1:
        raise ValueError(
            f"jlora.{fn_name}: {argname} holds stacked sets of different adapters "
            f"({sorted(map(list, names))}); stack all of them in one stack_adapters call."
        )
    return w, stacked[0].value.stack


def unstack_adapters(stacked: Any) -> dict[str, Any]:
    """The inverse of `stack_adapters`: `{name: adapters}`, each at its own rank and
    scale (its `b` divided by the scale folded in: exact when the scale is a power of
    two, else within one rounding of `b`'s dtype). Kernels in `stacked` (a set
    combined with its base) are left out."""
    w, stack = _stacked_nodes(stacked, "unstack_adapters", "stacked")

    def one(lw: LoraWeight, k: int) -> LoraWeight:
        r, s = lw.stack.ranks[k], lw.stack.scales[k]
        a = unbox(lw.a)[k][..., :r]
        b = jax.lax.slice_in_dim(unbox(lw.b)[k], 0, r, axis=_rank_axis(lw))
        b = b / jnp.asarray(s, b.dtype)
        dora = {
            c: rebox(getattr(lw, c), unbox(getattr(lw, c))[k])
            for c in ("m", "norm")
            if getattr(lw, c) is not None
        }
        return lw.replace(
            w=None, a=rebox(lw.a, a), b=rebox(lw.b, b), scale=s, stack=None, **dora
        )

    return {
        name: _map_stacked(w, lambda lw, k=k: one(lw, k))
        for k, name in enumerate(stack.names)
    }


def _map_stacked(w, fn: Callable[[LoraWeight], LoraWeight]):
    """The tree of walk `w` with `fn(lw)` at every stacked `LoraWeight`, every other
    leaf as it is."""
    return w.rebuild(
        n.put_back(fn(n.value)) if n.kind == LORA and n.value.stack is not None else n.leaf
        for n in w.nodes
    )


def _index(which, stack: Stack, fn_name: str):
    """`which` (a name, an int, or an integer array, maybe traced) as an index array;
    names and concrete ints are checked here."""
    n = len(stack.names)
    if isinstance(which, str):
        if which not in stack.names:
            raise ValueError(
                f"jlora.{fn_name}: no adapter named {which!r}; the set holds "
                f"{list(stack.names)}."
            )
        return jnp.asarray(stack.names.index(which), jnp.int32)
    if is_tracer(which):
        return jnp.asarray(which, jnp.int32)
    idx = np.asarray(which)
    if idx.ndim != 0 or not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(
            f"jlora.{fn_name}: which must be an adapter name or an integer index, got "
            f"{which!r}."
        )
    if not 0 <= int(idx) < n:
        raise ValueError(
            f"jlora.{fn_name}: index {int(idx)} is out of range for a set of {n} "
            f"adapters {list(stack.names)} (0 to {n - 1})."
        )
    return jnp.asarray(idx, jnp.int32)


def _gather(lw: LoraWeight, idx, dora: dict | None = None):
    """`(a, b, extra)` of adapters `idx` (any integer array): `-1` gives zero factors
    for `b` (the base alone), an index outside `[-1, N)` NaN (a traced index cannot be
    checked, and a wrong answer must not look right). `dora`: `{child: (per-adapter
    values, the base's value)}` gathered alike into `extra` (for `-1`, the base's)."""
    a, b = unbox(lw.a), unbox(lw.b)
    n = a.shape[0]
    valid = (idx >= 0) & (idx < n)
    safe = jnp.where(valid, idx, 0)
    mask = jnp.where(idx == -1, 0.0, jnp.where(valid, 1.0, jnp.nan)).astype(b.dtype)
    a_rows, b_rows = jnp.take(a, safe, axis=0), jnp.take(b, safe, axis=0)
    b_rows = b_rows * mask.reshape(mask.shape + (1,) * (b.ndim - 1))
    extra = {}
    for child, (values, base) in (dora or {}).items():
        rows = jnp.take(values, safe, axis=0)
        where = (idx == -1).reshape(idx.shape + (1,) * (values.ndim - 1))
        extra[child] = jnp.where(where, base, rows)
    return a_rows, b_rows, extra


def _dora_rows(lw: LoraWeight, fixed: bool) -> dict | None:
    """What `_gather` gathers for a stacked DoRA node combined with its base kernel:
    with `fixed`, each adapter's factor `m / ||w + a @ b||` (computed once per adapter;
    the base's is 1), else `m` and `norm` (the base's own norm for `-1`); None without
    DoRA. (Scales are folded into `b`.)"""
    if lw.m is None:
        return None
    w = unbox(lw.w)
    if w is None:  # (adapters alone: no base to take the base's values from)
        m, norm = unbox(lw.m), unbox(lw.norm)
        nan = jnp.full(m.shape[1:], jnp.nan, m.dtype)
        return {"m": (m, nan)} | ({} if norm is None else {"norm": (norm, nan)})
    return _dora_values(w, unbox(lw.a), unbox(lw.b), unbox(lw.m), lw.layout, fixed)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _dora_values(w, a, b, m, layout, fixed: bool):
    """`_dora_rows`' values for kernel `w` and a stacked set's `a`, `b`, `m`."""
    if getattr(type(w), "_jlora_leaf", False):  # a quantized kernel: its float values
        w = w.dequantize()
    base_norm = column_norm(w, None, None, layout, 0.0)
    norms = jax.vmap(lambda a, b: column_norm(w, a, b, layout, 1.0))(a, b)
    m = m.astype(jnp.float32)
    if fixed:  # (the norm a constant, as in training)
        norms = jax.lax.stop_gradient(norms)
        g = m / jnp.where(norms > 0, norms, 1.0)
        return {"m": (g, jnp.ones_like(base_norm))}
    return {"m": (m, base_norm), "norm": (norms, base_norm)}


def select(stacked: Any, which) -> Any:
    """One adapter of a stacked set, as a plain adapters tree (rank padded, scale 1.0:
    the same update).

    Args:
      stacked: a set from `stack_adapters` (or combined with its base: the kernels are
        kept, so the result runs directly).
      which: a name, an index, or an integer array (traced under `jit`/`vmap`; an index
        out of range then gives NaN factors rather than another adapter).

    Raises:
      ValueError: an unknown name or an index out of range (when not traced).
    """
    w, stack = _stacked_nodes(stacked, "select", "stacked")
    idx = _index(which, stack, "select")

    def one(lw: LoraWeight) -> LoraWeight:
        a, b, extra = _gather(lw, idx, _dora_rows(lw, fixed=False))
        extra = {c: rebox(getattr(lw, c), x) for c, x in extra.items()}
        return lw.replace(a=rebox(lw.a, a), b=rebox(lw.b, b), stack=None, **extra)

    return _map_stacked(w, one)


# Weighted combination ---------------------------------------------------------------------


def add_weighted(
    adapters: Sequence[Any],
    weights: Sequence[float],
    *,
    how: str = "cat",
    rank: int | None = None,
    return_errors: bool = False,
):
    """One adapter whose update is `sum_i weights[i] * scale_i * a_i @ b_i`.

    `how="cat"` is exact: the factors side by side, rank `sum_i r_i` (PEFT's `cat`).
    `how="svd"` truncates that sum to `rank`: a QR of the side-by-side `a`s and of the
    `b`s, an SVD of the small `sum r x sum r` core; no kernel-sized matrix is formed.

    Args:
      adapters: adapters trees (as `split` or `load_adapter` give them) of one base.
      weights: one float per adapter.
      how: `"cat"` or `"svd"`.
      rank: the rank of the `"svd"` result (at most `sum r_i`; kept at that).
      return_errors: also return `{path: relative error}`, the Frobenius norm of the
        dropped part of the update over that of the whole (0 for `"cat"`; the largest
        over the layers of a stacked kernel).

    Returns:
      the adapters tree (`scale=1.0`), or `(adapters, errors)`.

    Raises:
      ValueError: an unknown `how`, `rank` missing or not positive for `"svd"`, one
        weight per adapter not given, adapters of other kernels or bases, fused kernels.
    """
    if how not in ("cat", "svd"):
        raise ValueError(f"jlora.add_weighted: how must be 'cat' or 'svd', got {how!r}.")
    adapters = list(adapters)
    weights = [float(x) for x in weights]
    if not adapters or len(weights) != len(adapters):
        raise ValueError(
            f"jlora.add_weighted: needs one weight per adapter, got {len(adapters)} "
            f"adapters and {len(weights)} weights."
        )
    if how == "svd" and (rank is None or int(rank) < 1):
        raise ValueError(f"jlora.add_weighted: how='svd' needs rank >= 1, got {rank!r}.")
    walks = {
        f"adapters[{i}]": _adapters_of(t, "add_weighted", f"adapters[{i}] cannot be added")
        for i, t in enumerate(adapters)
    }
    _same_targets(walks, "add_weighted")
    all_nodes = [w.nodes for w in walks.values()]
    w0 = next(iter(walks.values()))
    out, errors = [], {}
    for i, node in enumerate(w0.nodes):
        if node.kind != LORA:
            out.append(node.leaf)
            continue
        lws = [ns[i].value for ns in all_nodes]
        lw = node.value
        if lw.layout.fused is not None:
            raise ValueError(
                f"jlora.add_weighted: {node.path} is a fused kernel (LoraConfig fused=); "
                "its factors pair by parts and do not add side by side."
            )
        ax = _rank_axis(lw)
        a = jnp.concatenate([unbox(x.a) for x in lws], axis=-1)
        b = jnp.concatenate(
            [
                unbox(x.b) * jnp.asarray(wt * x.scale, unbox(x.b).dtype)
                for x, wt in zip(lws, weights)
            ],
            axis=ax,
        )
        err = 0.0
        if how == "svd":
            a, b, err = _truncate(a, b, ax, int(rank))
        errors[node.path] = err
        out.append(node.put_back(lw.replace(a=rebox(lw.a, a), b=rebox(lw.b, b), scale=1.0)))
    result = w0.rebuild(out)
    return (result, errors) if return_errors else result


def _truncate(a, b, ax: int, rank: int):
    """`a @ b` (rank axis `ax` of `b`) at `rank`, without forming it."""
    dtype = a.dtype
    stack = a.shape[:ax]
    in_shape, out_shape = a.shape[ax:-1], b.shape[ax + 1 :]
    r = a.shape[-1]
    A = a.astype(jnp.float32).reshape(*stack, -1, r)
    B = b.astype(jnp.float32).reshape(*stack, r, -1)
    qa, ra = jnp.linalg.qr(A)  # A = qa ra
    qb, rb = jnp.linalg.qr(jnp.swapaxes(B, -1, -2))  # B^T = qb rb
    core = ra @ jnp.swapaxes(rb, -1, -2)  # A @ B = qa core qb^T
    u, s, vt = jnp.linalg.svd(core, full_matrices=False)
    k = min(rank, s.shape[-1])
    root = jnp.sqrt(s[..., :k])
    new_a = (qa @ u[..., :k]) * root[..., None, :]
    new_b = root[..., :, None] * (vt[..., :k, :] @ jnp.swapaxes(qb, -1, -2))
    total = jnp.sum(s**2, axis=-1)
    dropped = jnp.sum(s[..., k:] ** 2, axis=-1)
    err = jnp.sqrt(dropped / jnp.where(total > 0, total, 1.0))
    new_a = new_a.reshape(*stack, *in_shape, k).astype(dtype)
    new_b = new_b.reshape(*stack, k, *out_shape).astype(dtype)
    return new_a, new_b, float(jnp.max(err))


# Mixed batches ----------------------------------------------------------------------------


def _leaf_axes(prefix, tree, where: str):
    """The axis of every leaf of `tree` under the vmap-style `prefix` (int or None)."""
    pdef = jax.tree_util.tree_structure(prefix, is_leaf=lambda x: x is None)
    try:
        subtrees = pdef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"jlora.lora: in_axes/out_axes for {where} is not a prefix of its tree ({e})."
        ) from None
    axes = jax.tree.leaves(prefix, is_leaf=lambda x: x is None)
    out = []
    for ax, sub in zip(axes, subtrees):
        out.extend([ax] * len(jax.tree.leaves(sub)))
    return out


def _map_axes(fn, prefix, tree, where: str):
    leaves, treedef = jax.tree.flatten(tree)
    axes = _leaf_axes(prefix, tree, where)
    return jax.tree.unflatten(treedef, [fn(x, a) for x, a in zip(leaves, axes)])


def _host_ids(adapter_ids, stack: Stack):
    """Names (str, None for the base) to indices; concrete ids checked on the host."""
    seq = adapter_ids
    if isinstance(seq, (list, tuple)) and any(isinstance(x, str) or x is None for x in seq):
        idx = []
        for i, x in enumerate(seq):
            if x is None:
                idx.append(-1)
            elif isinstance(x, str):
                if x not in stack.names:
                    raise ValueError(
                        f"jlora.lora: adapter_ids[{i}] is {x!r}; the stacked set holds "
                        f"{list(stack.names)} (None or -1 for the base alone)."
                    )
                idx.append(stack.names.index(x))
            else:
                idx.append(int(x))
        seq = idx
    if is_tracer(seq):
        ids = jnp.asarray(seq)
    else:
        host = np.asarray(seq)
        if host.ndim != 1 or not np.issubdtype(host.dtype, np.integer):
            raise ValueError(
                "jlora.lora: adapter_ids must be a 1-D integer array (one adapter index "
                "per row, -1 for the base) or a list of names, got "
                f"{host.dtype}{list(host.shape)}."
            )
        bad = np.flatnonzero((host < -1) | (host >= len(stack.names)))
        if bad.size:
            raise ValueError(
                f"jlora.lora: adapter_ids {host[bad[:5]].tolist()} (rows "
                f"{bad[:5].tolist()}) are out of range for a set of {len(stack.names)} "
                f"adapters {list(stack.names)}: use 0 to {len(stack.names) - 1}, or -1 "
                "for the base alone."
            )
        ids = jnp.asarray(host)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"jlora.lora: adapter_ids must be a 1-D integer array, got {ids.dtype}"
            f"{list(ids.shape)}."
        )
    return ids.astype(jnp.int32)


def mixed(fn: Callable, adapter_ids, in_axes, out_axes, inner: Callable) -> Callable:
    """`jlora.lora(fn, adapter_ids=...)`: see that docstring. `inner` is `jlora.lora(fn)`
    (with the call's rng and strictness), run on each row."""

    def wrapped(params, *args, **kwargs):
        tree, stack = _stacked_nodes(params, "lora", "the params (first argument)")
        ids = _host_ids(adapter_ids, stack)
        n = ids.shape[0]
        axes = (None,) + (0,) * len(args) if in_axes is None else in_axes
        if isinstance(axes, int):
            axes = (None,) + (axes,) * len(args)
        axes = tuple(axes)
        if len(axes) != 1 + len(args):
            raise ValueError(
                f"jlora.lora: in_axes has {len(axes)} entries for {1 + len(args)} "
                "positional arguments (the params first)."
            )
        for i, (arg, ax) in enumerate(zip((params, *args), axes)):
            what = "the params" if i == 0 else f"argument {i}"
            nodes = walk(arg, arrays=True).nodes
            for node, a in zip(nodes, _leaf_axes(ax, arg, what)):
                if a is None:
                    continue
                shape = np.shape(node.value)
                if not -len(shape) <= a < len(shape) or shape[a] != n:
                    raise ValueError(
                        f"jlora.lora: {what} at {node.path or '(root)'} "
                        f"is {list(shape)}, batched on axis {a} by in_axes, but "
                        f"adapter_ids has {n} rows; give each batched input {n} rows on "
                        "that axis, or set its in_axes entry (None: the same for every "
                        "row)."
                    )
        factors, leaves = [], []
        for node in tree.nodes:
            if node.kind == LORA and node.value.stack is not None:
                lw = node.value
                factors.append(_gather(lw, ids, _dora_rows(lw, fixed=True)))
                leaves.append(node.put_back(lw.replace(a=None, b=None, m=None, norm=None)))
            else:
                leaves.append(node.leaf)
        base = tree.rebuild(leaves)

        def row(factors, base, *args):
            fs = iter(factors)
            rebuilt = []
            for node in walk(base).nodes:
                if node.kind == LORA and node.value.stack is not None:
                    a, b, extra = next(fs)
                    lw = node.value
                    # (a DoRA row's m is its adapter's factor m / norm: see ROW)
                    stack = ROW if extra else None
                    rebuilt.append(
                        node.put_back(lw.replace(a=a, b=b, stack=stack, **extra))
                    )
                else:
                    rebuilt.append(node.leaf)
            p = walk(base).rebuild(rebuilt)
            p = _map_axes(_one_row, axes[0], p, "the params")
            args = [
                _map_axes(_one_row, ax, x, f"argument {i + 1}")
                for i, (x, ax) in enumerate(zip(args, axes[1:]))
            ]
            out = inner(p, *args, **kwargs)
            return _map_axes(_squeeze, out_axes, out, "the output")

        # (the base's factor slots hold None: vmap maps no leaves there)
        batched = jax.vmap(row, in_axes=(0, *axes), out_axes=out_axes)
        return batched(factors, base, *args)

    return wrapped


def _one_row(x, axis):
    return x if axis is None else jnp.expand_dims(x, axis)


def _squeeze(x, axis):
    return x if axis is None else jnp.squeeze(x, axis)
