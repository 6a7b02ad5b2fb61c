"""Adapters read from files, put back onto a base: the steps every loader shares.

Loading is a straight line: read the files (each format in its own module: orbax in
`_checkpoint.py`, PEFT in `_peft.py`), check what they hold against the base, rebuild
the adapted tree, combine. The base and its one check are here: `Base` indexes the base
params and refuses any that already hold adapters; `compare_base` tells the kernel a
file was made for from the one it meets (by fingerprints: shape, dtype and checksums of
the bits, compared after a cast where the dtype changed); `rebuild` places the arrays
where the kernels' shardings say, boxes them as `init` would, and combines them with
the base.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jlora._boxes import box_child, box_factors, is_variable, rebox, unbox
from jlora._merge import _norm_of, combine
from jlora._quant import is_quantized, quantize_array
from jlora._sharding import child_sharding, factor_shardings, named_sharding_of
from jlora._targets import LORA, TRAINED, walk
from jlora._weight import CHILD, Layout, LoraWeight, Trainable

# The narrower float dtypes a base kernel is commonly served in: a fingerprint records
# the kernel's checksums after a cast to each, so a load onto that cast can compare.
CASTS = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))


# Fingerprints ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=1)
def _checksums(x, dtype=None):
    """Two order-independent integer sums of `x`'s bit patterns (mod 2^32), after a
    cast to `dtype` if given: plain, and weighted by each element's flat index. Integer
    addition is exact and associative, so the result depends neither on sharding nor
    on the device count; the weighted sum tells a kernel from its transpose."""
    if dtype is not None:
        x = x.astype(dtype)
    word = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
    bits = jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)  # the flat index, with no reshape
    for dim in range(bits.ndim):
        stride = int(np.prod(bits.shape[dim + 1 :], dtype=np.int64))
        iota = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim)
        index = index + iota * jnp.uint32(stride)
    return (
        jnp.sum(bits, dtype=jnp.uint32),
        jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32),
    )


def _sums(w, dtype=None) -> list[int]:
    plain, weighted = _checksums(jnp.asarray(w), dtype)
    return [int(plain), int(weighted)]


def _quant_record(q) -> dict:
    return {
        "kind": q.kind,
        "block_size": q.block_size,
        "axis": q.axis,
        "double_quant": q.absmax_scale is not None,
    }


def fingerprint(w) -> dict:
    """Shape, dtype and checksums of a base kernel, as stored in adapter metadata; for
    a quantized kernel, those of its dequantized values and how it was quantized."""
    out = {
        "shape": list(np.shape(w)),
        "dtype": str(np.dtype(w.dtype)),
        "checksum": _sums(w),
    }
    if is_quantized(w):
        out["quantized"] = _quant_record(w)
    return out


def cast_checksums(w) -> dict[str, list[int]]:
    """The checksums of `w` cast to each narrower dtype of `CASTS`."""
    dtype = np.dtype(w.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        return {}
    return {str(d): _sums(w, d) for d in CASTS if d.itemsize < dtype.itemsize}


SAME, CAST, OTHER, UNCHECKED = "same", "cast", "other", "unchecked"
REQUANTIZED = "requantized"  # a quantized kernel met where the record is another's


def compare_base(recorded: dict, casts: dict | None, w) -> str:
    """How base kernel `w` relates to the one `recorded` (a `fingerprint`; `casts`, its
    `cast_checksums`, if known) describes:

    - `SAME`: the same dtype and bits.
    - `CAST`: the recorded kernel cast to `w`'s dtype: `w` is narrower and equals the
      recorded kernel's cast (by `casts`), or `w` is wider and casts back to its bits.
    - `OTHER`: other values (compared in the narrower of the two dtypes).
    - `UNCHECKED`: another dtype whose values cannot be compared (no record of that
      cast: a dtype outside `CASTS`, or a file that predates cast records).
    """
    dtype, was = np.dtype(w.dtype), np.dtype(recorded["dtype"])
    if list(np.shape(w)) != list(recorded["shape"]):
        return OTHER
    quantized = recorded.get("quantized")
    if quantized and not is_quantized(w) and jnp.issubdtype(dtype, jnp.floating):
        # Trained on a quantized base, met with a float one: the same base if it
        # quantizes to the recorded kernel (quantization is deterministic).
        q = quantize_array(
            jnp.asarray(w).astype(was),
            quantized["kind"],
            block_size=quantized["block_size"],
            double_quant=quantized["double_quant"],
            axis=quantized["axis"],
        )
        return CAST if _sums(q) == list(recorded["checksum"]) else OTHER
    if is_quantized(w) and (not quantized or quantized != _quant_record(w)):
        return REQUANTIZED  # (quantized since, or otherwise: its float values are gone)
    if dtype == was:
        return SAME if _sums(w) == list(recorded["checksum"]) else OTHER
    floating = jnp.issubdtype(dtype, jnp.floating) and jnp.issubdtype(was, jnp.floating)
    if floating and dtype.itemsize < was.itemsize:
        known = (casts or {}).get(str(dtype))
        if known is None:
            return UNCHECKED
        return CAST if _sums(w) == list(known) else OTHER
    if floating and dtype.itemsize > was.itemsize:
        return CAST if _sums(w, was) == list(recorded["checksum"]) else OTHER
    return UNCHECKED


def base_report(verdicts: dict[str, tuple[str, str, str]]) -> tuple[list[str], str]:
    """`(paths, message)` for the kernels that are not the recorded ones, from
    `{path: (verdict, recorded dtype, dtype)}`: other values, or a dtype change whose
    values could not be compared, each said as such; `([], "")` when all fit."""
    other = [p for p, (v, _, _) in verdicts.items() if v == OTHER]
    unchecked = [p for p, (v, _, _) in verdicts.items() if v == UNCHECKED]
    requantized = [p for p, (v, _, _) in verdicts.items() if v == REQUANTIZED]
    parts = []
    if other:
        cast = [p for p in other if verdicts[p][1] != verdicts[p][2]]
        parts.append(
            f"were trained on different base kernels (same shapes, other values) at "
            f"{other}"
            + (
                f" (of these, {cast} were compared in the narrower of the two dtypes)"
                if cast
                else ""
            )
        )
    if unchecked:
        changes = sorted({f"{verdicts[p][1]} -> {verdicts[p][2]}" for p in unchecked})
        parts.append(
            f"meet base kernels of another dtype ({', '.join(changes)}) at {unchecked}, "
            "whose values jlora keeps no record to compare with"
        )
    if requantized:
        parts.append(
            f"meet base kernels quantized otherwise than the ones they were trained on "
            f"at {requantized}, whose float values cannot be compared with the record "
            "(an adapter trained on a float base serves on its quantized base with the "
            "quantization error added)"
        )
    return other + unchecked + requantized, "; and ".join(parts)


# The base -------------------------------------------------------------------------------


class Factors(NamedTuple):
    """A kernel's LoRA factors as a file gives them (NumPy or JAX arrays)."""

    a: Any
    b: Any
    scale: float
    layout: Layout
    dropout: float
    extra: dict | None = None  # the other adapter children by name (DoRA's m, norm);
    # a DoRA `m` without its `norm` (a PEFT file keeps none) gets it from the base.


class Whole(NamedTuple):
    """A leaf trained whole, as a file gives it."""

    value: Any


class Base:
    """The base params adapters are put onto, walked once and indexed by path.

    Raises:
      ValueError: the base already holds adapters (every path listed).
    """

    def __init__(self, params: Any, fn_name: str):
        self.tree = params
        self.walk = walk(params, keep_none=True)
        self.nodes = self.walk.by_path()
        adapted = [n.path for n in self.walk.nodes if n.kind in (LORA, TRAINED)]
        if adapted:
            raise ValueError(
                f"jlora.{fn_name}: base_params already hold adapters at {adapted}; pass "
                "plain base params (the model's own, or split()'s base)."
            )


def _place(x, sharding, path: str, float64: list):
    if np.dtype(x.dtype) == np.float64 and not jax.config.jax_enable_x64:
        float64.append(path)
        x = np.asarray(x).astype(np.float32)
    if sharding is not None:
        return jax.device_put(x, sharding)
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


def rebuild(base: Base, found: dict[str, Factors | Whole], fn_name: str, sharding=None):
    """The adapted params: `found`'s arrays placed where the base says (factors by
    their kernel's sharding, a leaf trained whole by its base leaf's; or all into
    `sharding`), boxed as `jlora.init` boxes them, combined with the base.

    float64 arrays become float32 when JAX runs without x64, and a warning says so.
    """
    out, float64 = [], []
    for node in base.walk.nodes:
        got = found.get(node.path)
        if got is None:
            out.append(None)
            continue
        if isinstance(got, Factors):
            a_sh, b_sh = factor_shardings(unbox(node.value), got.layout)
            a = _place(got.a, sharding or a_sh, node.path, float64)
            b = _place(got.b, sharding or b_sh, node.path, float64)
            a, b = box_factors(node.leaf, a, b, got.layout)
            extra = {}
            for name, x in (got.extra or {}).items():
                axes = CHILD[name].axes
                sh = sharding or child_sharding(unbox(node.value), got.layout, axes)
                x = _place(x, sh, node.path, float64)
                extra[name] = box_child(node.leaf, x, got.layout, axes)
            new = LoraWeight(
                None, a, b, scale=got.scale, layout=got.layout, dropout=got.dropout
            ).replace(**extra)
            if new.m is not None:  # the norm of these factors on this base (a PEFT
                # file keeps none; a saved one may be split's, before more training)
                kernel = new.replace(w=unbox(node.value), a=unbox(a), b=unbox(b))
                kernel = kernel.replace(m=unbox(new.m))
                norm = _norm_of(kernel)
                new = new.replace(norm=box_child(node.leaf, norm, got.layout, "out"))
        else:
            sh = sharding or named_sharding_of(unbox(node.value))
            value = _place(got.value, sh, node.path, float64)
            box = node.leaf  # a Linen box: the arrays are boxed like init's
            new = Trainable(value if is_variable(box) else rebox(box, value))
        out.append(node.put_back(new))
    if float64:
        float64 = list(dict.fromkeys(float64))
        warnings.warn(
            f"jlora.{fn_name}: the arrays at {float64} are float64; JAX runs without "
            "x64, so they are loaded as float32 (jax.config.update('jax_enable_x64', "
            "True) before loading keeps them float64).",
            stacklevel=3,
        )
    return combine(base.walk.rebuild(out), base.tree)
