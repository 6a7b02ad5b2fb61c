"""Shared oracles for the tests: the merged reference and its error budget."""

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
