"""A Llama-family causal LM in Flax Linen whose params keep Hugging Face's names.

`LlamaForCausalLM` params are `model/embed_tokens/embedding`,
`model/layers_{i}/{input_layernorm,post_attention_layernorm}/scale`,
`model/layers_{i}/self_attn/{q,k,v,o}_proj/kernel` (and `bias` on q/k/v where the
config has `attention_bias`, as Qwen2), `model/layers_{i}/mlp/{gate,up,down}_proj/kernel`,
`model/norm/scale` and, unless the head is tied to the embedding, `lm_head/kernel`. So
`jlora.default_module_name` maps each kernel to its PyTorch module
(`model.layers.0.self_attn.q_proj`), and `hf_to_params` loads a state dict by
transposing each `nn.Linear` weight `[out, in]` into a Flax kernel `[in, out]`.

RMSNorm, rotary embeddings (`rope_theta`; the half-split `rotate_half` convention of
Hugging Face's tensors, so no q/k permutation is needed), grouped-query attention,
SwiGLU. Llama-3 rope scaling and the KV cache are not here yet.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class CheckpointError(ValueError):
    """Tensors that don't fit the config; the message lists every problem."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    head_dim: int | None = None

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict) -> LlamaConfig:
        """From a Hugging Face `config.json` dict (Llama, Qwen2 or Mistral names)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in fields and v is not None}
        if hf.get("model_type") == "qwen2" and "attention_bias" not in hf:
            kwargs["attention_bias"] = True
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if "rope_theta" in rope:  # newer transformers keep theta with the rope type
            kwargs["rope_theta"] = rope["rope_theta"]
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise CheckpointError(
                f"rope type {kind!r} is not supported yet (only 'default' rotary "
                "embeddings); see rope_parameters / rope_scaling in config.json"
            )
        return cls(**kwargs)


def rotary(x, positions, theta: float):
    """Hugging Face's rotary embedding: the two halves of each head rotate together."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, d/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


class Attention(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, positions):
        b, t, _ = x.shape
        cfg = self.cfg
        h, kv, hd = cfg.num_attention_heads, cfg.kv_heads, cfg.dim_per_head
        bias = cfg.attention_bias
        q = nn.Dense(h * hd, use_bias=bias, name="q_proj")(x).reshape(b, t, h, hd)
        k = nn.Dense(kv * hd, use_bias=bias, name="k_proj")(x).reshape(b, t, kv, hd)
        v = nn.Dense(kv * hd, use_bias=bias, name="v_proj")(x).reshape(b, t, kv, hd)
        q, k = rotary(q, positions, cfg.rope_theta), rotary(k, positions, cfg.rope_theta)
        k, v = jnp.repeat(k, h // kv, axis=2), jnp.repeat(v, h // kv, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        causal = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        y = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, h * hd)
        return nn.Dense(cfg.hidden_size, use_bias=False, name="o_proj")(y)


class MLP(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x):
        inner = self.cfg.intermediate_size
        gate = nn.Dense(inner, use_bias=False, name="gate_proj")(x)
        up = nn.Dense(inner, use_bias=False, name="up_proj")(x)
        return nn.Dense(x.shape[-1], use_bias=False, name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, positions):
        eps = self.cfg.rms_norm_eps
        x = x + Attention(self.cfg, name="self_attn")(
            nn.RMSNorm(eps, name="input_layernorm")(x), positions
        )
        y = nn.RMSNorm(eps, name="post_attention_layernorm")(x)
        return x + MLP(self.cfg, name="mlp")(y)


class LlamaModel(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, tokens, positions):
        embed = nn.Embed(self.cfg.vocab_size, self.cfg.hidden_size, name="embed_tokens")
        x = embed(tokens)
        for i in range(self.cfg.num_hidden_layers):
            x = DecoderLayer(self.cfg, name=f"layers_{i}")(x, positions)
        return nn.RMSNorm(self.cfg.rms_norm_eps, name="norm")(x), embed


class LlamaForCausalLM(nn.Module):
    """`__call__(tokens)` -> logits `[batch, time, vocab]` (a causal pass from 0)."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, tokens, positions=None):
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x, embed = LlamaModel(self.cfg, name="model")(tokens, positions)
        if self.cfg.tie_word_embeddings:
            return embed.attend(x)
        return nn.Dense(self.cfg.vocab_size, use_bias=False, name="lm_head")(x)


def _table(cfg: LlamaConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """Hugging Face tensor name -> (params path, HF shape, transposed into a kernel)."""
    d, inner, hd = cfg.hidden_size, cfg.intermediate_size, cfg.dim_per_head
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.kv_heads * hd
    table = {
        "model.embed_tokens.weight": (
            ("model", "embed_tokens", "embedding"),
            (cfg.vocab_size, d),
            False,
        ),
        "model.norm.weight": (("model", "norm", "scale"), (d,), False),
    }
    if not cfg.tie_word_embeddings:
        table["lm_head.weight"] = (("lm_head", "kernel"), (cfg.vocab_size, d), True)
    for i in range(cfg.num_hidden_layers):
        p, layer = f"model.layers.{i}.", ("model", f"layers_{i}")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            table[p + norm + ".weight"] = ((*layer, norm, "scale"), (d,), False)
        for name, n_in, n_out in (
            ("self_attn.q_proj", d, q_out),
            ("self_attn.k_proj", d, kv_out),
            ("self_attn.v_proj", d, kv_out),
            ("self_attn.o_proj", q_out, d),
            ("mlp.gate_proj", d, inner),
            ("mlp.up_proj", d, inner),
            ("mlp.down_proj", inner, d),
        ):
            path = (*layer, *name.split("."))
            table[p + name + ".weight"] = ((*path, "kernel"), (n_out, n_in), True)
            if cfg.attention_bias and name.split(".")[-1] in ("q_proj", "k_proj", "v_proj"):
                table[p + name + ".bias"] = ((*path, "bias"), (n_out,), False)
    return table


def hf_to_params(tensors: dict[str, np.ndarray], cfg: LlamaConfig, where: str = "") -> Any:
    """Hugging Face Llama tensors (names as `LlamaForCausalLM.state_dict()` gives them)
    -> `LlamaForCausalLM` params.

    Raises:
      CheckpointError: listing every missing, unexpected and misshaped tensor at once.
    """
    table = _table(cfg)
    errors = []
    params: dict = {}
    for name, (path, shape, transposed) in table.items():
        if name not in tensors:
            errors.append(f"  missing: {name} {list(shape)}")
            continue
        x = np.asarray(tensors[name])
        if x.shape != shape:
            errors.append(f"  misshaped: {name} is {list(x.shape)}, expected {list(shape)}")
            continue
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(x.T if transposed else x)
    for name in sorted(set(tensors) - set(table)):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            if not np.array_equal(tensors[name], tensors.get("model.embed_tokens.weight")):
                errors.append(
                    f"  {name}: the config ties it to the embedding, but it differs"
                )
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        errors.append(f"  unexpected: {name}")
    if errors:
        raise CheckpointError(
            f"Llama tensors{' in ' + where if where else ''} do not fit the config:\n"
            + "\n".join(errors)
        )
    return params
