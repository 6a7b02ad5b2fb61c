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
SwiGLU, Llama 3's rope scaling, Mistral's and Qwen2's sliding-window attention, and
a KV cache for generation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from .model import attend, chunk_slots, pack_cache


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
    attention_bias: bool = False  # q, k, v (and o, unless o_proj_bias=False) biases
    o_proj_bias: bool | None = None  # None: as attention_bias (Llama); Qwen2: False
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    # Llama 3's rope scaling: (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings), or None for plain rotary embeddings.
    rope_llama3: tuple[float, float, float, int] | None = None
    # Sliding-window attention: each query sees the last `sliding_window` positions
    # (itself included) in the layers marked "sliding_attention" in `layer_types`
    # (all layers when `layer_types` is None); None is full causal attention.
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    eos_token_id: int = 0

    # The names generation and the main job read, shared with `GPTConfig`.
    @property
    def n_positions(self) -> int:
        return self.max_position_embeddings

    @property
    def n_layer(self) -> int:
        return self.num_hidden_layers

    def cache_shape(self, batch: int, length: int) -> tuple[int, ...]:
        return (self.num_hidden_layers, batch, length, self.kv_heads, self.dim_per_head)

    def window(self, layer: int) -> int | None:
        """The attention window of layer `layer` (None: full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

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
        fields -= {"sliding_window", "layer_types"}  # read below, by family
        kwargs = {k: v for k, v in hf.items() if k in fields and v is not None}
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):  # Llama 3 lists several; generation stops at the first
            eos = eos[0] if eos else None
        kwargs["eos_token_id"] = eos if eos is not None else 0
        if hf.get("model_type") == "qwen2":  # q/k/v biases, none on o_proj
            kwargs["attention_bias"], kwargs["o_proj_bias"] = True, False
        kwargs.update(_sliding(hf))
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if "rope_theta" in rope:  # newer transformers keep theta with the rope type
            kwargs["rope_theta"] = rope["rope_theta"]
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind == "llama3":
            try:
                kwargs["rope_llama3"] = (
                    float(rope["factor"]),
                    float(rope["low_freq_factor"]),
                    float(rope["high_freq_factor"]),
                    int(rope["original_max_position_embeddings"]),
                )
            except KeyError as e:
                raise CheckpointError(
                    f"rope type 'llama3' needs {e.args[0]!r} in rope_parameters / "
                    "rope_scaling of config.json"
                ) from None
        elif kind != "default":
            raise CheckpointError(
                f"rope type {kind!r} is not supported yet (only 'default' and "
                "'llama3'); see rope_parameters / rope_scaling in config.json"
            )
        return cls(**kwargs)


def _sliding(hf: dict) -> dict:
    """`sliding_window` and `layer_types` from a config dict, as transformers reads
    them: Mistral slides in every layer whenever `sliding_window` is set; Qwen2 only
    with `use_sliding_window`, from layer `max_window_layers` on, unless
    `layer_types` lists each layer; Llama never slides."""
    kind, window = hf.get("model_type"), hf.get("sliding_window")
    if kind == "mistral" and window is not None:
        return {"sliding_window": int(window)}
    if kind != "qwen2" or not hf.get("use_sliding_window") or window is None:
        return {}
    n = hf.get("num_hidden_layers", LlamaConfig.num_hidden_layers)
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
        for i in range(n)
    ]
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if len(types) != n or unknown:
        raise CheckpointError(
            f"layer_types in config.json must list 'sliding_attention' or "
            f"'full_attention' for each of the {n} layers; got {types!r}"
        )
    return {"sliding_window": int(window), "layer_types": tuple(types)}


def inverse_frequencies(d: int, theta: float, llama3=None) -> np.ndarray:
    """Rotary frequencies of a head of `d` dims; with Llama 3's scaling, long
    wavelengths (beyond the original context / low_freq_factor) are divided by
    `factor`, short ones (below original / high_freq_factor) kept, and the band in
    between interpolated."""
    inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if llama3 is not None:
        factor, low, high, original = llama3
        wavelen = 2 * np.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(
            wavelen < original / high,
            inv_freq,
            np.where(wavelen > original / low, inv_freq / factor, mid),
        )
    return inv_freq.astype(np.float32)


def rotary(x, positions, theta: float, llama3=None):
    """Hugging Face's rotary embedding: the two halves of each head rotate together."""
    d = x.shape[-1]
    inv_freq = inverse_frequencies(d, theta, llama3)
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, d/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


class Attention(nn.Module):
    cfg: LlamaConfig
    layer: int = 0

    @nn.compact
    def __call__(self, x, positions, slots, key_mask, cache):
        b, t, _ = x.shape
        cfg = self.cfg
        h, kv, hd = cfg.num_attention_heads, cfg.kv_heads, cfg.dim_per_head
        bias = cfg.attention_bias
        q = nn.Dense(h * hd, use_bias=bias, name="q_proj")(x).reshape(b, t, h, hd)
        k = nn.Dense(kv * hd, use_bias=bias, name="k_proj")(x).reshape(b, t, kv, hd)
        v = nn.Dense(kv * hd, use_bias=bias, name="v_proj")(x).reshape(b, t, kv, hd)
        q = rotary(q, positions, cfg.rope_theta, cfg.rope_llama3)
        k = rotary(k, positions, cfg.rope_theta, cfg.rope_llama3)
        window = cfg.window(self.layer)
        y, cache = attend(q, k, v, slots, key_mask, cache, window)  # grouped-query
        y = y.reshape(b, t, h * hd)
        o_bias = bias if cfg.o_proj_bias is None else cfg.o_proj_bias
        return nn.Dense(cfg.hidden_size, use_bias=o_bias, name="o_proj")(y), cache


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
    layer: int = 0

    @nn.compact
    def __call__(self, x, positions, slots, key_mask, cache):
        eps = self.cfg.rms_norm_eps
        y, cache = Attention(self.cfg, self.layer, name="self_attn")(
            nn.RMSNorm(eps, name="input_layernorm")(x), positions, slots, key_mask, cache
        )
        x = x + y
        y = nn.RMSNorm(eps, name="post_attention_layernorm")(x)
        return x + MLP(self.cfg, name="mlp")(y), cache


class LlamaModel(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, tokens, positions, slots, key_mask, cache):
        embed = nn.Embed(self.cfg.vocab_size, self.cfg.hidden_size, name="embed_tokens")
        x = embed(tokens)
        new_kv = []
        for i in range(self.cfg.num_hidden_layers):
            layer_cache = None if cache is None else (cache["k"][i], cache["v"][i])
            x, layer_cache = DecoderLayer(self.cfg, i, name=f"layers_{i}")(
                x, positions, slots, key_mask, layer_cache
            )
            new_kv.append(layer_cache)
        return nn.RMSNorm(self.cfg.rms_norm_eps, name="norm")(x), embed, new_kv


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM, called as `instruct.model.GPT` is.

    `__call__(tokens)` returns logits `[batch, time, vocab]` for a causal pass from
    slot 0. For generation pass `positions`, `key_mask` and a `cache` from
    `instruct.model.init_cache`; it then returns `(logits, cache)`.
    """

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, tokens, positions=None, key_mask=None, cache=None):
        start, slots, positions = chunk_slots(tokens, positions, cache)
        x, embed, new_kv = LlamaModel(self.cfg, name="model")(
            tokens, positions, slots, key_mask, cache
        )
        if self.cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(self.cfg.vocab_size, use_bias=False, name="lm_head")(x)
        if cache is None:
            return logits
        return logits, pack_cache(new_kv, start, tokens.shape[1])


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
            leaf = name.split(".")[-1]
            o_bias = cfg.attention_bias if cfg.o_proj_bias is None else cfg.o_proj_bias
            if (cfg.attention_bias and leaf in ("q_proj", "k_proj", "v_proj")) or (
                o_bias and leaf == "o_proj"
            ):
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


FAMILIES = ("llama", "qwen2", "mistral")


def peft_module_names(cfg: LlamaConfig):
    """`module_names` for `jlora.save_peft` / `load_peft`: Hugging Face's own names
    (`jlora.default_module_name`), except a tied embedding, which is also the output
    head here while PEFT's embedding LoRA changes only the lookup: left unmapped, so
    adapting it in either direction is an error, not a different model."""
    import jlora

    def name(path: str):
        if cfg.tie_word_embeddings and path.endswith("embed_tokens/embedding"):
            return None
        return jlora.default_module_name(path)

    return name


def load(path: str):
    """`(cfg, params, tokenizer)` from a Hugging Face Llama-family directory:
    `config.json`, `model.safetensors` (or shards listed in
    `model.safetensors.index.json`) and `tokenizer.json`.

    Raises:
      CheckpointError: missing files (named), an unsupported config, or tensors that
        don't fit (every problem listed).
    """
    import json
    import os

    import tokenizers

    from jlora import _safetensors

    if not os.path.isdir(path):
        raise CheckpointError(f"--model-path {path!r} is not a directory")
    index = os.path.join(path, "model.safetensors.index.json")
    weights = [os.path.join(path, "model.safetensors")]
    if os.path.exists(index):
        with open(index) as f:
            weights = [
                os.path.join(path, w)
                for w in sorted(set(json.load(f)["weight_map"].values()))
            ]
    needed = [
        os.path.join(path, "config.json"),
        os.path.join(path, "tokenizer.json"),
        *weights,
    ]
    missing = [os.path.basename(f) for f in needed if not os.path.isfile(f)]
    if missing:
        raise CheckpointError(
            f"--model-path {path!r} lacks {', '.join(missing)}; a Llama-family checkpoint "
            "in the Hugging Face layout has config.json, model.safetensors (or its "
            "shards and index) and tokenizer.json"
        )
    with open(needed[0]) as f:
        hf = json.load(f)
    if hf.get("model_type") not in FAMILIES:
        raise CheckpointError(
            f"{needed[0]}: model_type {hf.get('model_type')!r} is not one of {FAMILIES}"
        )
    cfg = LlamaConfig.from_hf(hf)
    tensors = {}
    for w in weights:
        tensors.update(_safetensors.load(w)[0])
    tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    params = hf_to_params(tensors, cfg, path)
    tokenizer = tokenizers.Tokenizer.from_file(needed[1])
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise CheckpointError(
            f"tokenizer.json has {tokenizer.get_vocab_size()} tokens but the model's "
            f"vocab_size is {cfg.vocab_size}"
        )
    return cfg, params, tokenizer
