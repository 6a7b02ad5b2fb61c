"""A GPT-style Flax Linen model for the benchmarks, and a hand-written LoRA twin.

`GPT(qv_dense=HandLoraDense)` puts explicit `lora_a` / `lora_b` params into the query
and value projections: the hand-written baseline jlora is measured against.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class HandLoraDense(nn.Module):
    """Dense with explicit LoRA factors: `x @ W + (x @ a) * scale @ b`."""

    features: int
    rank: int = 8
    alpha: float = 16.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d_in = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (d_in, self.features), self.dtype
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        bound = 1.0 / d_in**0.5
        a = self.param(
            "lora_a", nn.initializers.uniform(2 * bound), (d_in, self.rank), jnp.float32
        )
        b = self.param(
            "lora_b", nn.initializers.zeros, (self.rank, self.features), jnp.float32
        )
        h = (x @ a.astype(x.dtype)) * jnp.asarray(self.alpha / self.rank, x.dtype)
        return x @ kernel + h @ b.astype(x.dtype) + bias


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab: int = 4096
    d: int = 512
    heads: int = 8
    layers: int = 4
    seq: int = 128
    dtype: Any = jnp.float32
    # Box kernels with logical axis names (`nn.with_logical_partitioning`), as sharded
    # Flax models do: "embed", "heads" (attention features), "mlp", "vocab".
    logical: bool = False


LECUN = nn.initializers.lecun_normal()  # nn.Dense's default kernel init


def _kernel_init(cfg: GPTConfig, names, init=LECUN):
    return nn.with_logical_partitioning(init, names) if cfg.logical else init


class Block(nn.Module):
    cfg: GPTConfig
    qv_dense: Any = None

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        names = {
            "query": ("embed", "heads"),
            "key": ("embed", "heads"),
            "value": ("embed", "heads"),
            "out": ("heads", "embed"),
            "fc1": ("embed", "mlp"),
            "fc2": ("mlp", "embed"),
        }

        def dense(n, name):
            init = _kernel_init(c, names[name])
            return nn.Dense(
                n, name=name, dtype=c.dtype, param_dtype=c.dtype, kernel_init=init
            )

        qv = self.qv_dense or (lambda name: dense(c.d, name))
        h = nn.LayerNorm(dtype=c.dtype, param_dtype=c.dtype)(x)
        b, t, _ = h.shape
        split = lambda y: y.reshape(b, t, c.heads, c.d // c.heads)  # noqa: E731
        q, k, v = split(qv("query")(h)), split(dense(c.d, "key")(h)), split(qv("value")(h))
        mask = nn.make_causal_mask(jnp.ones((b, t), jnp.int32))
        att = nn.dot_product_attention(q, k, v, mask=mask, dtype=c.dtype)
        x = x + dense(c.d, "out")(att.reshape(b, t, c.d))
        h = nn.LayerNorm(dtype=c.dtype, param_dtype=c.dtype)(x)
        return x + dense(c.d, "fc2")(nn.gelu(dense(4 * c.d, "fc1")(h)))


class GPT(nn.Module):
    cfg: GPTConfig
    hand_lora_rank: int = 0

    @nn.compact
    def __call__(self, ids, delta=None):
        c = self.cfg
        qv = None
        if self.hand_lora_rank:
            r = self.hand_lora_rank
            qv = lambda name: HandLoraDense(c.d, r, 2.0 * r, c.dtype, name=name)  # noqa: E731
        emb_init = _kernel_init(
            c,
            ("vocab", "embed"),
            nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0),
        )
        x = nn.Embed(
            c.vocab, c.d, dtype=c.dtype, param_dtype=c.dtype, embedding_init=emb_init
        )(ids)
        if delta is not None:  # the floor: one small trainable vector at the embedding
            x = x + delta.astype(x.dtype)
        pos = self.param("pos", nn.initializers.normal(0.02), (c.seq, c.d), c.dtype)
        x = x + pos[: ids.shape[1]]
        for i in range(c.layers):
            x = Block(c, qv, name=f"block_{i}")(x)
        x = nn.LayerNorm(dtype=c.dtype, param_dtype=c.dtype)(x)
        head_init = _kernel_init(c, ("embed", "vocab"))
        return nn.Dense(
            c.vocab,
            name="lm_head",
            dtype=c.dtype,
            param_dtype=c.dtype,
            kernel_init=head_init,
        )(x)


def next_token_loss(logits, ids):
    logits = logits[:, :-1].astype(jnp.float32)
    targets = ids[:, 1:]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def make_nnx_gpt(cfg: GPTConfig, lora_rank: int, seed: int = 1):
    """The same GPT in Flax NNX, with `nnx.LoRALinear` as the query and value layers
    (plain `nnx.Linear` ones with `lora_rank=0`)."""
    from flax import nnx

    d, dt = cfg.d, cfg.dtype

    class Block(nnx.Module):
        def __init__(self, rngs):
            def lin(i, o):
                return nnx.Linear(i, o, dtype=dt, param_dtype=dt, rngs=rngs)

            def lora(i, o):
                if not lora_rank:
                    return lin(i, o)
                return nnx.LoRALinear(
                    i, o, lora_rank=lora_rank, dtype=dt, param_dtype=dt, rngs=rngs
                )

            self.ln1 = nnx.LayerNorm(d, dtype=dt, param_dtype=dt, rngs=rngs)
            self.query, self.key, self.value = lora(d, d), lin(d, d), lora(d, d)
            self.out = lin(d, d)
            self.ln2 = nnx.LayerNorm(d, dtype=dt, param_dtype=dt, rngs=rngs)
            self.fc1, self.fc2 = lin(d, 4 * d), lin(4 * d, d)

        def __call__(self, x):
            h = self.ln1(x)
            b, t, _ = h.shape

            def split(y):
                return y.reshape(b, t, cfg.heads, d // cfg.heads)

            q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
            mask = nnx.make_causal_mask(jnp.ones((b, t), jnp.int32))
            att = nnx.dot_product_attention(q, k, v, mask=mask, dtype=dt)
            x = x + self.out(att.reshape(b, t, d))
            return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))

    class NNXGPT(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(cfg.vocab, d, dtype=dt, param_dtype=dt, rngs=rngs)
            self.pos = nnx.Param(jax.random.normal(rngs.params(), (cfg.seq, d), dt) * 0.02)
            self.blocks = nnx.List([Block(rngs) for _ in range(cfg.layers)])
            self.ln = nnx.LayerNorm(d, dtype=dt, param_dtype=dt, rngs=rngs)
            self.lm_head = nnx.Linear(d, cfg.vocab, dtype=dt, param_dtype=dt, rngs=rngs)

        def __call__(self, ids):
            x = self.embed(ids) + self.pos[...][: ids.shape[1]]
            for block in self.blocks:
                x = block(x)
            return self.lm_head(self.ln(x))

    return NNXGPT(nnx.Rngs(seed))
