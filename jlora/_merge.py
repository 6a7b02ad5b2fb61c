"""merge / unmerge / split / combine: tree maps over `LoraWeight` and `Trainable`."""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jlora._boxes import is_box, is_variable, rebox, unbox
from jlora._jax_compat import is_tracer
from jlora._sharding import constrain, named_sharding_of
from jlora._targets import EMPTY, LEAF, LORA, TRAINED, walk
from jlora._weight import (
    LoraWeight,
    column_norm,
    dora_factor,
    low_rank_product,
    materialize,
    out_to_kernel,
)


@functools.partial(jax.jit, static_argnames=("layout", "scale", "sharding", "check"))
def merge_kernel(w, a, b, m=None, *, layout, scale, sharding=None, check=False):
    """`w + scale * a @ b` for one kernel, compiled: what every merge runs.

    One computation per kernel, whether the caller is eager or traced, so an eager
    `merge` allocates what XLA's memory analysis of this function reports: at small
    rank the product is fused into the sum (no `[in, out, r]` or `[in, out]`
    temporary), and at most one float32 copy of the kernel otherwise. With `check`,
    also returns a `_Check` of the merged values (finite, and what rounding to the
    kernel's dtype did to the update), computed from the same product.
    """
    if not check:
        return constrain(materialize(w, a, b, layout, scale, m), sharding)
    w32 = w.astype(jnp.float32)
    delta = low_rank_product(a, b, layout, scale)
    if m is not None:  # DoRA: the update is all that the merged kernel changes in w
        factor = out_to_kernel(dora_factor(w, a, b, layout, scale, m), layout)
        delta = (w32 + delta) * factor - w32
    out = constrain((w32 + delta).astype(w.dtype), sharding)
    applied = out.astype(jnp.float32) - w32
    moved = delta != 0
    one, zero = jnp.float32(1), jnp.float32(0)
    terms = _Check(
        finite=jnp.where(jnp.isfinite(out), zero, one),  # (counts what is not)
        update_sq=jnp.square(delta),
        error_sq=jnp.square(applied - delta),
        changed=jnp.where(moved, one, zero),
        kept=jnp.where(moved & (applied == 0), one, zero),
    )
    # One variadic reduction: XLA fuses every term into a single pass over the kernel,
    # so the check holds no temporary beyond the product itself.
    sums = lax.reduce(
        tuple(terms),
        (zero,) * len(terms),
        lambda x, y: tuple(p + q for p, q in zip(x, y)),
        tuple(range(w.ndim)),
    )
    sums = _Check(*sums)
    return out, sums._replace(finite=sums.finite == 0)


class _Check(NamedTuple):
    """What `merge(safe=True)` reads back per kernel: whether every merged value is
    finite, and the update's squared norm, the squared norm of what rounding the sum
    to the kernel's dtype changed in it, how many elements the update moves and how
    many of those rounding kept at their old value."""

    finite: Any
    update_sq: Any
    error_sq: Any
    changed: Any
    kept: Any


class Rounding(NamedTuple):
    """What rounding to the kernel's dtype did to one kernel's update in a merge.

    `update_error`: `|applied - exact| / |exact|` over the kernel (Frobenius), where
    `applied = merged - w` and `exact = scale * a @ b`, both in float32.
    `unchanged`: the fraction of the elements the update moves that kept their old
    value (the update was under half a unit in the last place there).
    """

    dtype: str
    update_error: float
    unchanged: float


class RoundingWarning(UserWarning):
    """`merge(safe=True)` lost a noticeable part of some updates to rounding; the
    figures per path are in `report` (`{path: Rounding}`)."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


ROUNDING_TOLERANCE = 0.01  # relative update error above which merge(safe=True) warns


@functools.partial(jax.jit, static_argnames=("layout", "scale", "sharding"))
def unmerge_kernel(merged, a, b, m=None, norm=None, *, layout, scale, sharding=None):
    """`merged - scale * a @ b` for one kernel, compiled (see `merge_kernel`); with
    DoRA, `merged * norm / m - scale * a @ b`."""
    delta = low_rank_product(a, b, layout, scale)
    v = merged.astype(jnp.float32)
    if m is not None:
        m32 = jnp.asarray(m, jnp.float32)
        ratio = jnp.asarray(norm, jnp.float32) / jnp.where(m32 != 0, m32, 1.0)
        v = v * out_to_kernel(ratio, layout)
    return constrain((v - delta).astype(merged.dtype), sharding)


def _norm_of(lw: LoraWeight):
    """DoRA's norm `||w + scale * a @ b||` for `lw`'s current factors, placed as its
    `norm` child was (None without DoRA)."""
    if lw.m is None or unbox(lw.w) is None:  # (no DoRA, or adapters without kernels)
        return lw.norm
    w = unbox(lw.w)  # (a quantized kernel is dequantized inside the compiled norm)
    norm = _column_norm(w, unbox(lw.a), unbox(lw.b), layout=lw.layout, scale=lw.scale)
    old = unbox(lw.norm)
    sharding = named_sharding_of(old) if old is not None else None
    if sharding is not None and not is_tracer(norm):
        norm = jax.device_put(norm, sharding)
    return norm if old is None else rebox(lw.norm, norm)


@functools.partial(jax.jit, static_argnames=("layout", "scale"))
def _column_norm(w, a, b, *, layout, scale):
    if getattr(type(w), "_jlora_leaf", False):  # a quantized kernel: its float values
        w = w.dequantize()
    if a is not None and a.ndim > len(layout.stack_axes) + len(layout.in_axes) + 1:
        # a stacked set (a leading adapter axis): one norm per adapter
        return jax.vmap(lambda a, b: column_norm(w, a, b, layout, scale))(a, b)
    return column_norm(w, a, b, layout, scale)


def no_kernel_paths(tree) -> list[str]:
    """Paths of the `LoraWeight`s in `tree` that hold no frozen kernel (`w` is None):
    the adapters `split` returns, used where adapted params were wanted."""
    return [n.path for n in walk(tree).nodes if n.kind == LORA and unbox(n.value.w) is None]


def require_kernels(tree, fn_name: str, argname: str = "params") -> None:
    """Raises if `tree` holds adapters without their base kernels (see `no_kernel_paths`).

    Raises:
      ValueError: naming the paths, and saying that `combine(adapters, base)` puts the
        adapters back onto their base.
    """
    missing = no_kernel_paths(tree)
    if missing:
        raise ValueError(
            f"{fn_name}: {argname} hold adapters without a base kernel at "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''} (the adapters "
            "jlora.split returns); put them back onto their base first: "
            "jlora.combine(adapters, base)."
        )


def refuse_quantized(tree, fn_name: str) -> None:
    """Raises if an adapted kernel of `tree` is quantized: the update cannot be folded
    into its codes without losing most of it.

    Raises:
      ValueError: naming the paths, why, and how (dequantize first, or save_merged).
    """
    paths = [
        n.path
        for n in walk(tree).nodes
        if n.kind == LORA and getattr(type(unbox(n.value.w)), "_jlora_leaf", False)
    ]
    if paths:
        raise ValueError(
            f"{fn_name}: the adapted kernels at {paths[:5]}"
            f"{' ...' if len(paths) > 5 else ''} are quantized; folding the update into "
            "4- or 8-bit codes would round most of it away (a LoRA update is about 1e-3 "
            "of the kernel, an NF4 step about 0.1). Merge the float kernels instead: "
            "jlora.merge(jlora.dequantize(params)), or jlora.save_merged(path, params), "
            "which writes dequantized kernels in their dtype."
        )


def refuse_stacked(tree, fn_name: str) -> None:
    """Raises if `tree` holds a stacked set of adapters (`jlora.stack_adapters`): it is
    many updates, not one, so it cannot be merged, saved or trained as one adapter.

    Raises:
      ValueError: naming the paths, the set's adapters, and what to do instead.
    """
    nodes = [n for n in walk(tree).nodes if n.kind == LORA and n.value.stack is not None]
    if nodes:
        paths = [n.path for n in nodes]
        raise ValueError(
            f"{fn_name}: {paths[:5]}{' ...' if len(paths) > 5 else ''} hold a stacked set "
            f"of adapters {list(nodes[0].value.stack.names)}; take one out with "
            "jlora.select(stacked, name) (or all with jlora.unstack_adapters) first, or "
            "serve the set with jlora.lora(fn, adapter_ids=ids)."
        )


def _merged_kernel(lw: LoraWeight, check: bool = False):
    w = unbox(lw.w)
    got = merge_kernel(
        w,
        unbox(lw.a),
        unbox(lw.b),
        unbox(lw.m),
        layout=lw.layout,
        scale=lw.scale,
        sharding=named_sharding_of(w),
        check=check,
    )
    merged, report = got if check else (got, None)
    return rebox(lw.w, merged), report


def merge(params: Any, *, safe: bool = False) -> Any:
    """Folds every adapter into its kernel: plain params for the unmodified model.

    Each `LoraWeight` becomes `w + scale * a @ b` in the kernel's dtype (the sum
    accumulated in float32) with the kernel's box, if any; each `Trainable` mark is
    removed. The result has exactly the base's structure, shapes and dtypes, so
    `model.apply({"params": merge(p)}, x)` hits the base's jit cache. To merge a large
    model in place: `jax.jit(jlora.merge, donate_argnums=0)(params)` (XLA reuses each
    kernel's buffer; the factors' buffers are freed, with a harmless warning that they
    could not be reused).

    Rounding: the merged kernel is rounded to the kernel's dtype once. In bfloat16 an
    update smaller than half a unit in the last place of `w` (about `|w| / 512`) is
    lost there, and a typical LoRA update (`|scale * a @ b| / |w|` around 1e-3) leaves
    about half of a bfloat16 kernel unchanged. Merge a float32 copy for export
    (`jlora.merge(jax.tree.map(lambda x: x.astype(jnp.float32), params))`), or use
    `safe=True` to be told how much each update lost.

    Args:
      params: adapted params from `jlora.init` / `combine` / `unmerge`.
      safe: check that no merged kernel holds NaN or Inf (raises, naming the paths),
        and warn with a `jlora.RoundingWarning` naming each kernel whose update
        rounding changed by more than 1% (its `report` holds a `jlora.Rounding` per
        such path: the relative error of the applied update and the fraction of the
        updated elements left unchanged). Eager only: it reads the values, so it raises
        a clear error under `jit`.

    Returns:
      plain params.

    Raises:
      ValueError: `safe=True` and a merged kernel is not finite; or `params` hold
        adapters without their base kernels (`split`'s adapters: `combine` them with
        the base first).
      TypeError: `safe=True` under a trace.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> p = {"kernel": jnp.eye(3)}
      >>> lp = jlora.init(jax.random.key(0), p, jlora.LoraConfig(1, 1))
      >>> bool((jlora.merge(lp)["kernel"] == p["kernel"]).all())
      True
    """
    if safe and any(is_tracer(x) for x in jax.tree.leaves(params)):
        raise TypeError(
            "jlora.merge(safe=True) reads the merged values and is eager-only; call it "
            "outside jit, or use safe=False under a trace."
        )
    require_kernels(params, "jlora.merge")
    refuse_stacked(params, "jlora.merge")
    refuse_quantized(params, "jlora.merge")
    tree = walk(params)
    out, bad, rounding = [], [], {}
    for node in tree.nodes:
        if node.kind == LORA:
            merged, check = _merged_kernel(node.value, check=safe)
            if safe:
                if not bool(check.finite):
                    bad.append(node.path)
                elif (lost := _rounding(node.value, check)) is not None:
                    rounding[node.path] = lost
            out.append(node.put_back(merged))
        elif node.kind == TRAINED:
            out.append(node.put_back(node.value.value))
        else:
            out.append(node.leaf)
    if bad:
        raise ValueError(
            f"jlora.merge(safe=True): merged kernels hold NaN or Inf at {bad}; check the "
            "adapters (a diverged run?) before serving them."
        )
    if rounding:
        lines = [
            f"  {path}: {r.dtype}, update off by {r.update_error:.1%}, "
            f"{r.unchanged:.1%} of updated elements unchanged"
            for path, r in rounding.items()
        ]
        warnings.warn(
            RoundingWarning(
                "jlora.merge(safe=True): rounding to the kernels' dtype dropped part of "
                "these updates:\n" + "\n".join(lines) + "\nMerge a float32 copy for "
                "export: jlora.merge(jax.tree.map(lambda x: x.astype(jnp.float32), "
                "params)).",
                rounding,
            ),
            stacklevel=2,
        )
    return tree.rebuild(out)


def _rounding(lw: LoraWeight, check: _Check) -> Rounding | None:
    """The kernel's `Rounding` if its update lost more than `ROUNDING_TOLERANCE`."""
    update_sq = float(check.update_sq)
    if update_sq == 0.0:
        return None
    error = (float(check.error_sq) / update_sq) ** 0.5
    if error <= ROUNDING_TOLERANCE:
        return None
    unchanged = int(check.kept) / max(int(check.changed), 1)
    return Rounding(str(jnp.dtype(lw.dtype)), error, unchanged)


def split(params: Any) -> tuple[Any, Any]:
    """Splits adapted params into `(adapters, base)`, both pytrees of the same structure.

    `adapters` holds every trainable leaf: `LoraWeight(None, a, b)` (scale and layout
    kept as metadata, so `combine` and `unmerge(merged, adapters)` need nothing else)
    and the `Trainable` leaves; `None` elsewhere. `base` holds the rest as plain leaves
    (the frozen kernels `w` where the adapters are) and `None` where a leaf is trained
    (inside the leaf's box, if it had one: an NNX `Variable` or a Linen box holding None):
    it is the frozen model, with no jlora nodes, so passing it into a jitted step costs
    no more than passing the base params. Differentiate and update `adapters` only;
    `combine(adapters, base)` gives the params back exactly.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> lp = jlora.init(jax.random.key(0), {"kernel": jnp.ones((4, 3))},
      ...                 jlora.LoraConfig(2, 2))
      >>> adapters, base = jlora.split(lp)
      >>> [x.shape for x in jax.tree.leaves(adapters)]
      [(4, 2), (2, 3)]
    """
    tree = walk(params)
    adapters, base = [], []
    for node in tree.nodes:
        if node.kind == LORA:
            lw = node.value
            adapters.append(node.put_back(lw.replace(w=None, norm=_norm_of(lw))))
            base.append(node.put_back(lw.w))
        elif node.kind == TRAINED:
            adapters.append(node.leaf)
            base.append(_emptied(node))
        else:
            adapters.append(None)
            base.append(node.leaf)
    return tree.rebuild(adapters), tree.rebuild(base)


def _emptied(node):
    """What `split`'s base holds where a leaf is trained: None, in the box it had (an
    NNX `Variable`, a Linen box inside the `Trainable`), so that loading adapters onto
    this base gives the tree `init` gave."""
    if is_variable(node.leaf):
        return node.leaf.replace(value=None)
    inner = node.value.value
    return rebox(inner, None) if is_box(inner) else None


def _paired(adapters, base, fn_name: str, base_name: str):
    """Walks both trees down to jlora nodes and None, checking they fit."""
    a_tree = walk(adapters, keep_none=True)
    b_tree = walk(base, keep_none=True)
    if a_tree.treedef != b_tree.treedef:
        a_paths = {n.path for n in a_tree.nodes}
        b_paths = {n.path for n in b_tree.nodes}
        lines = [
            f"  in adapters but not in {base_name}: {p}" for p in sorted(a_paths - b_paths)
        ]
        lines += [
            f"  in {base_name} but not in adapters: {p}" for p in sorted(b_paths - a_paths)
        ]
        if not lines:
            lines = [
                "  same paths, but containers differ: "
                f"adapters {a_tree.treedef} vs {base_name} {b_tree.treedef}"
            ]
        raise ValueError(
            f"jlora.{fn_name}: adapters do not fit {base_name}; build both from the same "
            "model (the adapters from jlora.split of params initialised on it):\n"
            + "\n".join(lines)
        )
    return a_tree, list(zip(a_tree.nodes, b_tree.nodes))


def _check_factors(path, lw: LoraWeight, w, errors):
    shape = tuple(jnp.shape(unbox(w)))
    a, b = unbox(lw.a), unbox(lw.b)
    if lw.stack is not None:  # a stacked set: one leading adapter axis
        a, b = a[0], b[0]
    if lw.layout.ndim != len(shape):
        errors.append(
            f"  {path}: layout {lw.layout} is for {lw.layout.ndim} axes, "
            f"kernel is {list(shape)}"
        )
        return
    rank = jnp.shape(a)[-1] if jnp.ndim(a) else 0
    want_a, want_b = lw.layout.factor_shapes(shape, rank)
    if tuple(jnp.shape(a)) != want_a or tuple(jnp.shape(b)) != want_b:
        errors.append(
            f"  {path}: kernel {list(shape)} needs a {list(want_a)} and b {list(want_b)}, "
            f"got a {list(jnp.shape(a))} and b {list(jnp.shape(b))}"
        )


def _join(adapters, base, fn_name, base_name, kernel_fn, *, adapted_base: bool):
    """`adapters` put onto `base` path by path, `kernel_fn(w, adapters' LoraWeight)`
    giving each kernel. `adapted_base`: whether `base` may itself hold `LoraWeight`s
    (whose `w` is then the kernel, as `combine` allows); where it may not (`unmerge`,
    whose input must be merged), one is an error naming the path."""
    tree, pairs = _paired(adapters, base, fn_name, base_name)
    out, errors = [], []
    for a_node, b_node in pairs:
        path, a_inner, b_inner = a_node.path, a_node.value, b_node.value
        if b_node.kind == LORA and not adapted_base:
            errors.append(
                f"  {path}: {base_name} holds an adapted kernel (a LoraWeight), not a "
                f"merged one; jlora.{fn_name} takes the plain params jlora.merge returns "
                "(to take adapters off adapted params, use jlora.split)"
            )
            continue
        if a_node.kind == LORA:
            w = b_inner.w if b_node.kind == LORA else b_inner
            if w is None or b_node.kind == TRAINED:
                errors.append(
                    f"  {path}: adapters have factors but {base_name} has no kernel here"
                )
                continue
            _check_factors(path, a_inner, w, errors)
            out.append(a_node.put_back(a_inner.replace(w=kernel_fn(w, a_inner))))
        elif a_node.kind == TRAINED:
            if b_node.kind == LEAF:
                want = jnp.shape(unbox(a_inner.value))
                got = jnp.shape(unbox(b_inner))
                if want != got:
                    errors.append(
                        f"  {path}: trained leaf {list(want)} vs {base_name} {list(got)}"
                    )
            out.append(a_node.leaf)
        elif a_node.kind == EMPTY:
            if b_node.kind == EMPTY and not (a_node.leaf is None and b_node.leaf is None):
                errors.append(f"  {path}: neither adapters nor {base_name} hold a value")
            out.append(b_node.leaf)  # (None in both: an empty subtree, kept as one)
        else:
            errors.append(
                f"  {path}: adapters hold a plain leaf; adapters come from jlora.split"
            )
    if errors:
        raise ValueError(
            f"jlora.{fn_name}: adapters do not fit {base_name}:\n" + "\n".join(errors)
        )
    return tree.rebuild(out)


def combine(adapters: Any, base: Any) -> Any:
    """Inverse of `split`: `combine(*split(params))` is `params`, exactly.

    `base` may also be the plain base params (as the model was before `jlora.init`):
    that is how adapters go back onto a freshly loaded base model. DoRA's cached
    `norm` is computed afresh from the kernel and the factors (adapters trained since
    `split` carry split's).

    Raises:
      ValueError: paths or shapes that don't fit, every mismatch listed at once.
    """
    joined = _join(adapters, base, "combine", "base", lambda w, lw: w, adapted_base=True)
    return _fresh_norms(joined)


def _fresh_norms(params):
    """`params` with each DoRA kernel's `norm` computed from its kernel and factors, so
    that adapters trained since `split` (whose norm is split's) unmerge what a merge
    of these params gives. Under `jit` a norm nothing reads costs nothing."""

    def fresh(node):
        if node.kind != LORA or node.value.m is None:
            return node.leaf
        return node.put_back(node.value.replace(norm=_norm_of(node.value)))

    from jlora._targets import map_nodes

    return map_nodes(fresh, params)


def unmerge(merged: Any, adapters: Any) -> Any:
    """The adapted params back from merged params: `w = merged - scale * a @ b`.

    The subtraction runs in float32 and rounds once to the kernel's dtype, so in float32
    the round trip `unmerge(merge(p), split(p)[0])` gives `w` back to within a relative
    Frobenius error of about 1e-7; in bfloat16 each element is off by at most one
    rounding of the merge plus one of the unmerge, i.e.
    `|w' - w| <= 2^-8 * (|w| + |scale*a@b|)` elementwise (two half-ulps of the larger
    magnitude), measured in `tests/test_merge.py`.

    With DoRA, `w = merged * norm / m - scale * a @ b`: `norm` must be the norm the
    merge divided by, which `split`, `combine` and `load_adapter` compute from the
    params. Take the adapters from the params that were merged
    (`jlora.split(params)[0]`); adapters trained since an earlier `split` carry that
    split's norm (`jlora.split(jlora.combine(adapters, base))[0]` refreshes it).

    Args:
      merged: plain params (e.g. `jlora.merge(params)` or a merged checkpoint).
      adapters: the first output of `jlora.split` of the params that were merged.

    Raises:
      ValueError: paths or shapes that don't fit, or `merged` still adapted (holding
        `LoraWeight`s where kernels were expected), every mismatch listed at once.
    """

    def kernel(w, lw):
        value = unbox(w)
        if lw.m is not None and unbox(lw.norm) is None:
            raise ValueError(
                "jlora.unmerge: DoRA adapters need the norm merge divided by (their "
                "`norm`, which jlora.split and load_adapter give); these have none."
            )
        restored = unmerge_kernel(
            value,
            unbox(lw.a),
            unbox(lw.b),
            unbox(lw.m),
            unbox(lw.norm),
            layout=lw.layout,
            scale=lw.scale,
            sharding=named_sharding_of(value),
        )
        return rebox(w, restored)

    return _join(adapters, merged, "unmerge", "merged", kernel, adapted_base=False)


def plain_lora(params: Any) -> Any:
    """PiSSA / OLoRA adapters as the equivalent plain LoRA for the original base.

    A start that changed the frozen kernel (`LoraConfig(init="pissa" | "olora")`)
    trains `w_res + scale * a @ b` with `w_res = W - scale * a0 @ b0`. The same model
    is `W + scale * a' @ b'` with `a' = [a, a0]` and `b' = [b; -b0]` (rank `2r`, the
    scale kept: `save_peft` then writes `lora_alpha` doubled, or times sqrt(2) with
    rsLoRA, as PEFT's own conversion does). Kernels present are turned back into the
    original `W` (in the kernel's dtype); `split`'s adapters (no kernels) are converted
    alone. Other kernels are returned as they are.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> p = {"kernel": jax.random.normal(jax.random.key(0), (6, 4))}
      >>> lp = jlora.init(jax.random.key(1), p, jlora.LoraConfig(2, 2, init="pissa"))
      >>> plain = jlora.plain_lora(lp)
      >>> back = plain["kernel"].w
      >>> plain["kernel"].rank, bool(jnp.allclose(back, p["kernel"], atol=1e-5))
      (4, True)
    """

    def convert(node):
        if node.kind != LORA or node.value.a0 is None:
            return node.leaf
        lw = node.value
        a, b, a0, b0 = (unbox(x) for x in (lw.a, lw.b, lw.a0, lw.b0))
        ns = len(lw.layout.stack_axes)
        new_a = jnp.concatenate([a, a0.astype(a.dtype)], axis=-1)
        new_b = jnp.concatenate([b, -b0.astype(b.dtype)], axis=ns)
        w = lw.w
        if unbox(w) is not None:
            delta = low_rank_product(a0, b0, lw.layout, lw.scale)
            value = unbox(w)
            w = rebox(w, (value.astype(jnp.float32) + delta).astype(value.dtype))
        new = lw.replace(
            w=w, a=rebox(lw.a, new_a), b=rebox(lw.b, new_b), a0=None, b0=None
        )
        return node.put_back(new)

    from jlora._nnx_state import as_params
    from jlora._targets import map_nodes

    return map_nodes(convert, as_params(params, "jlora.plain_lora"))
