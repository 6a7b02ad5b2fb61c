"""GPT-2 checkpoints in the Hugging Face layout, to and from `instruct.model.GPT` params.

A directory holds `config.json`, `model.safetensors` and `tokenizer.json`. The tensors
are GPT-2's: `wte.weight [vocab, d]`, `wpe.weight`, and per layer `h.{i}.ln_1`,
`h.{i}.attn.c_attn` (query, key and value fused: weight `[d, 3d]`), `h.{i}.attn.c_proj`,
`h.{i}.ln_2`, `h.{i}.mlp.c_fc`, `h.{i}.mlp.c_proj`, then `ln_f`. GPT-2's `Conv1D`
layers store their weights `[in, out]`, the layout of a Flax `Dense` kernel, so nothing
is transposed; `c_attn` is split in three so LoRA can target query and value alone.
Names may carry a `transformer.` prefix (`GPT2LMHeadModel`) or not (`GPT2Model`); the
causal-mask buffers `attn.bias` / `attn.masked_bias` are skipped; `lm_head.weight`, when
present, must equal `wte.weight` (GPT-2 ties them).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .model import GPTConfig

FILES = ("config.json", "model.safetensors", "tokenizer.json")
_SKIPPED = (("attn", "bias"), ("attn", "masked_bias"))  # causal-mask buffers


class CheckpointError(ValueError):
    """A GPT-2 directory that can't be loaded; the message lists every problem."""


_QKV = ("query", "key", "value")  # GPT-2's fused c_attn, side by side on the last axis


def _table(cfg: GPTConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Every Hugging Face tensor name (without the prefix) -> (its path in `GPT` params,
    its shape). A path containing `_QKV` stands for the three q/k/v leaves fused."""
    d, inner = cfg.n_embd, cfg.inner
    table = {
        "wte.weight": (("wte", "embedding"), (cfg.vocab_size, d)),
        "wpe.weight": (("wpe", "embedding"), (cfg.n_positions, d)),
        "ln_f.weight": (("ln_f", "scale"), (d,)),
        "ln_f.bias": (("ln_f", "bias"), (d,)),
    }
    for i in range(cfg.n_layer):
        h, p = f"h_{i}", f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            table[p + ln + ".weight"] = ((h, ln, "scale"), (d,))
            table[p + ln + ".bias"] = ((h, ln, "bias"), (d,))
        for hf, ours, n_in, n_out in (
            ("attn.c_attn", (h, "attn", _QKV), d, 3 * d),
            ("attn.c_proj", (h, "attn", "out"), d, d),
            ("mlp.c_fc", (h, "fc"), d, inner),
            ("mlp.c_proj", (h, "proj"), inner, d),
        ):
            table[p + hf + ".weight"] = ((*ours, "kernel"), (n_in, n_out))
            table[p + hf + ".bias"] = ((*ours, "bias"), (n_out,))
    return table


def _leaves(path: tuple) -> list[tuple[str, ...]]:
    """The param paths one table entry covers (three for a fused q/k/v entry)."""
    if _QKV not in path:
        return [path]
    i = path.index(_QKV)
    return [(*path[:i], name, *path[i + 1 :]) for name in _QKV]


def hf_to_params(tensors: dict[str, np.ndarray], cfg: GPTConfig, where: str = "") -> Any:
    """Map Hugging Face GPT-2 tensors (names as stored) to `GPT` params.

    Raises:
      CheckpointError: listing every missing, unexpected or misshaped tensor.
    """
    lm_head = None
    named = {}
    for name, value in tensors.items():
        short = name.removeprefix("transformer.")
        if tuple(short.split(".")[-2:]) in _SKIPPED:
            continue
        if short == "lm_head.weight":
            lm_head = value
            continue
        named[short] = value
    table = _table(cfg)
    problems = [
        f"missing tensor {n} (expected shape {s})"
        for n, (_, s) in table.items()
        if n not in named
    ]
    problems += [
        f"unexpected tensor {n} {tuple(v.shape)}"
        for n, v in named.items()
        if n not in table
    ]
    problems += [
        f"tensor {n} has shape {tuple(named[n].shape)}, the config implies {s}"
        for n, (_, s) in table.items()
        if n in named and tuple(named[n].shape) != s
    ]
    if (
        not problems
        and lm_head is not None
        and not np.array_equal(lm_head, named["wte.weight"])
    ):
        problems.append("lm_head.weight differs from wte.weight; only tied heads load")
    if problems:
        raise CheckpointError(
            f"{where or 'GPT-2 tensors'} do not fit the config "
            f"(n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, vocab_size={cfg.vocab_size}, "
            f"n_positions={cfg.n_positions}):\n  " + "\n  ".join(problems)
        )
    params: dict = {}
    for name, (path, _) in table.items():
        paths = _leaves(path)
        parts = np.split(np.asarray(named[name], np.float32), len(paths), axis=-1)
        for leaf_path, part in zip(paths, parts):
            node = params
            for key in leaf_path[:-1]:
                node = node.setdefault(key, {})
            node[leaf_path[-1]] = part
    return params


def params_to_hf(params: Any, cfg: GPTConfig) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_params`, with `GPT2LMHeadModel`'s `transformer.` names."""

    def get(path):
        node = params
        for key in path:
            node = node[key]
        return np.asarray(node, np.float32)

    return {
        "transformer." + name: np.ascontiguousarray(
            np.concatenate([get(p) for p in _leaves(path)], axis=-1)
        )
        for name, (path, _) in _table(cfg).items()
    }


def load(path: str):
    """Load `(cfg, params, tokenizer)` from a Hugging Face GPT-2 directory.

    Raises:
      CheckpointError: a missing file, an unreadable config, or tensors that don't fit.
    """
    import safetensors.numpy
    import tokenizers

    if not os.path.isdir(path):
        raise CheckpointError(f"--model-path {path!r} is not a directory")
    missing = [f for f in FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise CheckpointError(
            f"--model-path {path!r} lacks {', '.join(missing)}; a GPT-2 checkpoint in the "
            f"Hugging Face layout has {', '.join(FILES)}"
        )
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path) as f:
            hf = json.load(f)
        cfg = GPTConfig.from_hf(hf, config_path)
    except (json.JSONDecodeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{config_path}: not a usable GPT-2 config: {e}") from e
    weights = os.path.join(path, "model.safetensors")
    params = hf_to_params(safetensors.numpy.load_file(weights), cfg, weights)
    tokenizer = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise CheckpointError(
            f"tokenizer.json has {tokenizer.get_vocab_size()} tokens but the model's "
            f"vocab_size is {cfg.vocab_size}"
        )
    return cfg, params, tokenizer


def save(path: str, cfg: GPTConfig, params: Any, tokenizer) -> str:
    """Write `params` as a Hugging Face GPT-2 directory (loadable by `load`)."""
    import safetensors.numpy

    os.makedirs(path, exist_ok=True)
    safetensors.numpy.save_file(
        params_to_hf(params, cfg),
        os.path.join(path, "model.safetensors"),
        metadata={"format": "pt"},
    )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f, indent=2)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    return path


def peft_module_names(cfg: GPTConfig):
    """`module_names` for `jlora.save_peft` / `load_peft` on `GPT` params: each path ->
    its `GPT2LMHeadModel` module. GPT-2's fused `c_attn` is one PEFT module; query, key
    and value are its three row blocks (`rows=`), so an exported q/v adapter is one
    module and an imported `c_attn` adapter adapts all three. Kernels are `[in, out]`,
    so their `[out, in]` matrix is the transpose (`to_torch`), which also settles the
    orientation of square kernels without a probe. The token embedding `wte` is left
    unmapped: it is also the output head here, which PEFT's embedding LoRA does not
    change."""
    import jlora

    d = cfg.n_embd
    rows = {name: (i * d, 3 * d) for i, name in enumerate(_QKV)}
    modules = {"attn/out": "attn.c_proj", "fc": "mlp.c_fc", "proj": "mlp.c_proj"}

    def name(path: str):
        parts = path.removeprefix("params/").split("/")
        if parts[0] == "wte":
            # Tied to the output head: jlora's factors on it change the logits too,
            # PEFT's only the lookup. Left unmapped, so either direction is an error.
            return None
        if parts[0] in ("wpe", "ln_f"):
            return f"transformer.{parts[0]}"
        if not parts[0].startswith("h_"):
            return None
        prefix = f"transformer.h.{parts[0][2:]}."
        inner = "/".join(parts[1:-1])
        to_torch = np.transpose if parts[-1] == "kernel" else None
        if parts[1] == "attn" and parts[2] in rows:
            return jlora.PeftModule(prefix + "attn.c_attn", to_torch, rows[parts[2]])
        if inner in modules:
            return jlora.PeftModule(prefix + modules[inner], to_torch)
        return jlora.PeftModule(prefix + inner)  # ln_1, ln_2

    return name
