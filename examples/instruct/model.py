"""A GPT-2-architecture causal language model in Flax Linen.

Pre-LayerNorm blocks, learned positions, tanh-approximated GELU, an LM head tied to
the token embedding: the architecture of GPT-2, so Hugging Face GPT-2 checkpoints load
into it (`instruct.gpt2`). The attention has separate `query`, `key` and `value`
projections (GPT-2 stores them fused), so LoRA can target the query and value kernels
alone with `targets=r"(query|value)/kernel$"`.

One attention path serves training and cached generation: queries sit at absolute
`slots`, keys at slots `0..S-1`, and a key is visible when its slot is not after the
query's and `key_mask` marks it as a real token.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters, named as in a GPT-2 `config.json`."""

    vocab_size: int
    n_positions: int = 256
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    eos_token_id: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head "
                f"({self.n_head})"
            )

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def cache_shape(self, batch: int, length: int) -> tuple[int, ...]:
        return (self.n_layer, batch, length, self.n_head, self.n_embd // self.n_head)

    def to_hf(self) -> dict:
        """The fields of a Hugging Face GPT-2 `config.json`."""
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "activation_function": "gelu_new",
            "bos_token_id": self.eos_token_id,
            **dataclasses.asdict(self),
        }

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> GPTConfig:
        """Read a Hugging Face GPT-2 config dict; unknown keys are ignored."""
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(
                f"{where}: activation_function {act!r} is not supported; this model "
                "implements GPT-2's tanh-approximated GELU ('gelu_new')"
            )
        missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head") if k not in hf]
        if missing:
            raise ValueError(f"{where}: missing GPT-2 config keys {missing}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in fields}
        if kwargs.get("eos_token_id") is None:
            kwargs["eos_token_id"] = hf["vocab_size"] - 1
        return cls(**kwargs)


def chunk_slots(tokens, positions, cache):
    """`(start, slots, positions)` of a chunk of `tokens`: its first cache slot (0
    without a cache), the slots it fills, and its position ids (the slots, unless
    given)."""
    b, t = tokens.shape
    start = 0 if cache is None else cache["index"]
    slots = start + jnp.arange(t)
    if positions is None:
        positions = jnp.broadcast_to(slots, (b, t))
    return start, slots, positions


def attend(q, k, v, slots, key_mask, cache, window: int | None = None):
    """Causal attention of a chunk (`q`, `k`, `v`: `[batch, time, heads, head_dim]`)
    over the cache, which first takes this chunk's keys and values at `slots[0]`.
    Grouped-query when `k`/`v` have fewer heads than `q`. With `window`, a query
    sees only the `window` slots ending at its own (sliding-window attention; the
    real tokens of a left-padded row sit in consecutive slots, so this is a window
    over positions). Returns `(y, cache)`."""
    if cache is not None:
        k = jax.lax.dynamic_update_slice(cache[0], k, (0, slots[0], 0, 0))
        v = jax.lax.dynamic_update_slice(cache[1], v, (0, slots[0], 0, 0))
        cache = (k, v)
    key_slots = jnp.arange(k.shape[1])
    visible = key_slots[None, :] <= slots[:, None]
    if window is not None:
        visible = visible & (key_slots[None, :] > slots[:, None] - window)
    visible = visible[None, None]  # [1, 1, T, S]
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = jnp.where(visible, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v), cache


def pack_cache(layer_caches, start, t) -> dict:
    """The cache after a chunk of `t` tokens from each layer's `(k, v)`."""
    return {
        "k": jnp.stack([kv[0] for kv in layer_caches]),
        "v": jnp.stack([kv[1] for kv in layer_caches]),
        "index": start + t,
    }


class Attention(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x, slots, key_mask, cache):
        b, t, d = x.shape
        h = self.cfg.n_head
        q, k, v = (
            nn.Dense(d, name=name)(x).reshape(b, t, h, d // h)
            for name in ("query", "key", "value")
        )
        y, cache = attend(q, k, v, slots, key_mask, cache)
        y = y.reshape(b, t, d)
        return nn.Dense(d, name="out")(y), cache


class Block(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x, slots, key_mask, cache):
        eps = self.cfg.layer_norm_epsilon
        y, cache = Attention(self.cfg, name="attn")(
            nn.LayerNorm(eps, name="ln_1")(x), slots, key_mask, cache
        )
        x = x + y
        y = nn.LayerNorm(eps, name="ln_2")(x)
        y = nn.Dense(self.cfg.inner, name="fc")(y)
        y = nn.Dense(x.shape[-1], name="proj")(nn.gelu(y, approximate=True))
        return x + y, cache


class GPT(nn.Module):
    """GPT-2 causal LM.

    `__call__(tokens)` returns logits `[batch, time, vocab]` for a causal pass from
    slot 0. For generation pass `positions` (`[batch, time]`, position ids of the
    tokens), `key_mask` (`[batch, S]`, which cache slots hold real tokens) and `cache`
    from `init_cache`; it then returns `(logits, cache)` with this chunk written at
    `cache["index"]`.
    """

    cfg: GPTConfig

    @nn.compact
    def __call__(self, tokens, positions=None, key_mask=None, cache=None):
        start, slots, positions = chunk_slots(tokens, positions, cache)
        wte = nn.Embed(self.cfg.vocab_size, self.cfg.n_embd, name="wte")
        wpe = nn.Embed(self.cfg.n_positions, self.cfg.n_embd, name="wpe")
        x = wte(tokens) + wpe(positions)
        new_kv = []
        for i in range(self.cfg.n_layer):
            layer_cache = None if cache is None else (cache["k"][i], cache["v"][i])
            x, layer_cache = Block(self.cfg, name=f"h_{i}")(x, slots, key_mask, layer_cache)
            new_kv.append(layer_cache)
        x = nn.LayerNorm(self.cfg.layer_norm_epsilon, name="ln_f")(x)
        logits = wte.attend(x)
        if cache is None:
            return logits
        return logits, pack_cache(new_kv, start, tokens.shape[1])


def init_cache(cfg, batch: int, length: int, dtype=jnp.float32) -> dict:
    """An empty KV cache of `length` slots (for `GPT` or `llama.LlamaForCausalLM`)."""
    shape = cfg.cache_shape(batch, length)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "index": jnp.zeros((), jnp.int32),
    }


def init_params(cfg: GPTConfig, key) -> Any:
    """GPT-2-style initialization: normal(0.02) weights, zero biases."""
    params = GPT(cfg).init(key, jnp.zeros((1, 8), jnp.int32))["params"]
    normal = jax.nn.initializers.normal(0.02)
    leaves, treedef = jax.tree.flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, leaf), k in zip(leaves, keys):
        name = path[-1].key
        if name in ("kernel", "embedding"):
            leaf = normal(k, leaf.shape, leaf.dtype)
            if path[-2].key in ("out", "proj"):  # residual projections, scaled by depth
                leaf = leaf / math.sqrt(2 * cfg.n_layer)
        out.append(leaf)
    return jax.tree.unflatten(treedef, out)


def generate(
    apply,
    params,
    cfg: GPTConfig,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    key=None,
) -> list[list[int]]:
    """Continue each prompt; greedy when `temperature == 0`, else sampled.

    `apply` is `GPT(cfg).apply` (or `jlora.lora` of it, on adapted params). Prompts
    are left-padded to one length; a row stops at its first EOS (not returned).
    Returns the new token ids of each prompt.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    width = max(len(p) for p in prompts)
    total = width + max_new_tokens
    if total > cfg.n_positions:
        raise ValueError(
            f"generate: longest prompt ({width} tokens) + max_new_tokens "
            f"({max_new_tokens}) exceeds the model's n_positions ({cfg.n_positions})"
        )
    tokens = jnp.array([[cfg.eos_token_id] * (width - len(p)) + list(p) for p in prompts])
    real = jnp.array([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    key = jax.random.key(0) if key is None else key
    out = _generate(
        params,
        tokens,
        real,
        key,
        apply=apply,
        cfg=cfg,
        max_new=max_new_tokens,
        temperature=float(temperature),
    )
    result = []
    for row in jax.device_get(out).tolist():
        if cfg.eos_token_id in row:
            row = row[: row.index(cfg.eos_token_id)]
        result.append(row)
    return result


@functools.partial(jax.jit, static_argnames=("apply", "cfg", "max_new", "temperature"))
def _generate(params, tokens, real, key, *, apply, cfg, max_new, temperature):
    """Prefill the left-padded prompts into a KV cache, then decode one token a step."""

    def pick(logits, key):
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, logits / temperature).astype(jnp.int32)

    b, width = tokens.shape
    key_mask = jnp.concatenate([real, jnp.ones((b, max_new), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0)
    cache = init_cache(cfg, b, width + max_new)
    logits, cache = apply({"params": params}, tokens, positions, key_mask, cache)
    first = pick(logits[:, -1], jax.random.fold_in(key, 0))

    def step(carry, i):
        tok, pos, cache, done = carry
        done = done | (tok == cfg.eos_token_id)
        logits, cache = apply(
            {"params": params}, tok[:, None], pos[:, None], key_mask, cache
        )
        nxt = jnp.where(
            done, cfg.eos_token_id, pick(logits[:, -1], jax.random.fold_in(key, i))
        )
        return (nxt, pos + 1, cache, done), tok

    init = (first, positions[:, -1] + 1, cache, jnp.zeros((b,), bool))
    (last, *_), emitted = jax.lax.scan(step, init, jnp.arange(1, max_new))
    return jnp.concatenate([emitted.T, last[:, None]], axis=1)
