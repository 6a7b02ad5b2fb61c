"""Shared oracles for the tests: the merged reference and its error budget."""

import re

import jax
import jax.numpy as jnp
import numpy as np

import jlora


def perturb(params, key, scale=0.1):
    """Nonzero `b` factors (fresh init has b = 0, which hides a wrong B path)."""
    adapters, base = jlora.split(params)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(key, len(leaves))
    leaves = [
        x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)
    ]
    return jlora.combine(jax.tree.unflatten(treedef, leaves), base)


def rel_err(x, ref):
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def to_f32(tree):
    return jax.tree.map(
        lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        tree,
    )


# Error bounds ---------------------------------------------------------------------------
#
# Comparisons between two evaluations of the same mathematical function (sharded vs
# one device, factored vs merged, two processes vs one) differ only by rounding. A sum
# of k terms evaluated in floating point in any order is within gamma_k * sum|terms|
# of the exact sum, gamma_k = k*u / (1 - k*u), u the unit roundoff of the dtype (Higham,
# "Accuracy and Stability of Numerical Algorithms", Lemma 3.1 / Eq. 3.4). Two
# evaluations are then within twice that of each other; a chain of `depth` reductions
# (layers forward, and backward for gradients) adds one such term per reduction to
# first order. The bound is applied relative to the values' scale, max|ref| over the
# compared array, not element by element: an element that is small because its terms
# cancel carries the rounding error of its terms, not of itself.

UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}


def gamma(k: int, dtype=jnp.float32) -> float:
    """Worst-case relative error of a `k`-term sum in `dtype`, in any order."""
    ku = k * UNIT_ROUNDOFF[jnp.dtype(dtype).name]
    assert ku < 0.5, f"{k} terms in {jnp.dtype(dtype).name}: no useful bound"
    return ku / (1.0 - ku)


def chain_bound(k: int, depth: int, dtype=jnp.float32) -> float:
    """How far two evaluations of a chain of `depth` reductions, none longer than `k`
    terms, can differ relative to the values' scale (first order)."""
    return 2.0 * depth * gamma(k, dtype)


def assert_close(x, ref, bound: float, scale: float | None = None):
    """`max|x - ref| <= bound * scale`, `scale` defaulting to `max|ref|`."""
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    if scale is None:
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    err = float(np.max(np.abs(x - ref))) if ref.size else 0.0
    assert err <= bound * scale, (
        f"max|x - ref| = {err:.3g} exceeds the bound {bound:.3g} x scale {scale:.3g} "
        f"= {bound * scale:.3g}"
    )


def collectives(hlo: str):
    """`(op, element count)` of every collective in an optimized HLO module."""
    out = []
    ops = "all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute"
    for shape, op in re.findall(
        rf"= \(?([a-z0-9]+\[[0-9,]*\])[^=]*? ({ops})(?:-start)?\(", hlo
    ):
        dims = re.findall(r"\d+", shape.split("[", 1)[1])
        out.append((op, int(np.prod([int(d) for d in dims])) if dims else 1))
    return out


def randomize_torch(model, selected, seed: int, scale: float = 0.1) -> None:
    """Overwrites, in place, every PyTorch parameter whose name `selected(name)` picks
    with `scale` times standard normal draws from a generator seeded with `seed` (PEFT
    starts `lora_B` at zero, which would hide a wrong B)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if selected(name):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
