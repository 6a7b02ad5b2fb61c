"""Small models written the way other JAX libraries write them, built here (nothing is
downloaded): Equinox-style modules (dataclass pytrees holding their arrays, with
non-array fields and `None` biases, split by a partition into arrays and the rest),
penzai-style named arrays (`.../value/data_array` with static axis names), and
gemma-style parameters (`q_einsum/w`-like multi-axis einsum kernels, a fused
`qkv_einsum`, the feed-forward's `gating_einsum` and `linear` leaves, and an embedding
table used both for the lookup and, transposed, for the decoding logits).

Each mirrors what jlora sees of the real library: the tree's paths, leaf names,
storage orientation, and the primitives the forward pass emits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

# Equinox-style -------------------------------------------------------------------------


def _is_array(x) -> bool:
    return isinstance(x, jax.Array)


@dataclasses.dataclass
class EqxLinear:
    """`weight` stored `[out, in]`, `bias` `[out]` or None; called on one example."""

    weight: Any
    bias: Any

    def __call__(self, x):
        y = self.weight @ x
        return y if self.bias is None else y + self.bias


@dataclasses.dataclass
class EqxEmbedding:
    """`weight` `[num_embeddings, dim]`, looked up one token at a time: `weight[i]`."""

    weight: Any

    def __call__(self, i):
        return self.weight[i]


@dataclasses.dataclass
class EqxModel:
    """An embedding, two linears and an activation function held as a field (a
    non-array leaf, as Equinox modules hold them)."""

    embed: EqxEmbedding
    layers: list
    activation: Any

    def __call__(self, ids):
        h = jax.vmap(self.embed)(ids)
        for layer in self.layers[:-1]:
            h = self.activation(jax.vmap(layer)(h))
        return jax.vmap(self.layers[-1])(h)


for _cls in (EqxLinear, EqxEmbedding, EqxModel):
    jax.tree_util.register_dataclass(
        _cls, data_fields=[f.name for f in dataclasses.fields(_cls)], meta_fields=[]
    )


def eqx_model(key, vocab=11, dim=8, hidden=12, out=5) -> EqxModel:
    k = jax.random.split(key, 5)
    return EqxModel(
        embed=EqxEmbedding(jax.random.normal(k[0], (vocab, dim))),
        layers=[
            EqxLinear(
                jax.random.normal(k[1], (hidden, dim)) / dim**0.5,
                jax.random.normal(k[2], (hidden,)) * 0.1,
            ),
            EqxLinear(jax.random.normal(k[3], (out, hidden)) / hidden**0.5, None),
        ],
        activation=jax.nn.gelu,
    )


def eqx_partition(model):
    """`eqx.partition(model, eqx.is_array)`: the arrays, and the rest, each with None in
    the other's places."""
    arrays = jax.tree.map(lambda x: x if _is_array(x) else None, model)
    static = jax.tree.map(lambda x: None if _is_array(x) else x, model)
    return arrays, static


def eqx_combine(arrays, static):
    """`eqx.combine`: the first non-None of the two at every leaf."""
    return jax.tree.map(
        lambda a, s: s if a is None else a, arrays, static, is_leaf=lambda x: x is None
    )


# penzai-style --------------------------------------------------------------------------


@dataclasses.dataclass
class NamedArray:
    """An array with axis names (static), as penzai's `NamedArray` holds one."""

    data_array: Any
    named_axes: tuple = dataclasses.field(metadata=dict(static=True))


jax.tree_util.register_dataclass(
    NamedArray, data_fields=["data_array"], meta_fields=["named_axes"]
)


def _letters(names, table):
    letters = "abcdefghijklmnopqrstuvwxyz"
    return "".join(table.setdefault(n, letters[len(table)]) for n in names)


def named_dot(x: NamedArray, w: NamedArray, contract: tuple) -> NamedArray:
    """Contracts the axes named `contract` of two named arrays (an einsum by names)."""
    table: dict = {}
    xs, ws = _letters(x.named_axes, table), _letters(w.named_axes, table)
    out_names = tuple(n for n in x.named_axes + w.named_axes if n not in contract)
    out_names = tuple(dict.fromkeys(out_names))
    spec = f"{xs},{ws}->{_letters(out_names, table)}"
    return NamedArray(jnp.einsum(spec, x.data_array, w.data_array), out_names)


def penzai_params(key, dim=8, hidden=12):
    """Two penzai-style linears: `weights/value` named `(embedding, neurons)` and
    `(neurons, embedding)`; the storage order is the names', not a convention."""
    k = jax.random.split(key, 2)
    return {
        "up": {
            "weights": {
                "value": NamedArray(
                    jax.random.normal(k[0], (dim, hidden)) / dim**0.5,
                    ("embedding", "neurons"),
                )
            }
        },
        "down": {
            "weights": {
                "value": NamedArray(
                    # stored (embedding, neurons): the output axis first
                    jax.random.normal(k[1], (dim, hidden)) / hidden**0.5,
                    ("embedding", "neurons"),
                )
            }
        },
    }


def penzai_forward(params, x):
    """`x` `[batch, embedding]` through up, relu, down (each by axis names)."""
    h = named_dot(
        NamedArray(x, ("batch", "embedding")),
        params["up"]["weights"]["value"],
        ("embedding",),
    )
    h = NamedArray(jax.nn.relu(h.data_array), h.named_axes)
    y = named_dot(h, params["down"]["weights"]["value"], ("neurons",))
    return y.data_array


# gemma-style ---------------------------------------------------------------------------


def gemma_params(key, vocab=13, d=8, heads=2, head_dim=4, hidden=16):
    k = jax.random.split(key, 5)
    n = jax.random.normal
    return {
        "embedder": {"input_embedding": n(k[0], (vocab, d))},
        "layer_0": {
            "attn": {
                "qkv_einsum": {"w": n(k[1], (3, heads, d, head_dim)) / d**0.5},
                "attn_vec_einsum": {"w": n(k[2], (heads, head_dim, d)) / d**0.5},
            },
            "mlp": {
                "gating_einsum": n(k[3], (2, d, hidden)) / d**0.5,
                "linear": n(k[4], (hidden, d)) / hidden**0.5,
            },
        },
    }


def gemma_forward(params, ids):
    """Embed (a row lookup), one attention block and a gated MLP, then decode with the
    embedding table transposed (tied logits), as gemma's `Embedder` does."""
    table = params["embedder"]["input_embedding"]
    x = table[(ids,)] * jnp.sqrt(jnp.float32(table.shape[1]))  # gemma's encode
    attn = params["layer_0"]["attn"]
    q, k, v = jnp.einsum("BTD,SNDH->SBTNH", x, attn["qkv_einsum"]["w"])
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
    mask = jnp.tril(jnp.ones((ids.shape[1], ids.shape[1]), bool))
    probs = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
    h = jnp.einsum("BNTS,BSNH->BTNH", probs, v)
    x = x + jnp.einsum("BTNH,NHD->BTD", h, attn["attn_vec_einsum"]["w"])
    mlp = params["layer_0"]["mlp"]
    gate = jnp.einsum("BTD,NDF->BTNF", x, mlp["gating_einsum"])
    x = x + jnp.einsum(
        "BTF,FD->BTD", jax.nn.gelu(gate[..., 0, :]) * gate[..., 1, :], mlp["linear"]
    )
    return jnp.dot(x, table.T)  # gemma's decode: x @ input_embedding.T
