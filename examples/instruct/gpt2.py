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


def _expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    d, inner = cfg.n_embd, cfg.inner
    shapes = {
        "wte.weight": (cfg.vocab_size, d),
        "wpe.weight": (cfg.n_positions, d),
        "ln_f.weight": (d,),
        "ln_f.bias": (d,),
    }
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        shapes.update(
            {
                p + "ln_1.weight": (d,),
                p + "ln_1.bias": (d,),
                p + "attn.c_attn.weight": (d, 3 * d),
                p + "attn.c_attn.bias": (3 * d,),
                p + "attn.c_proj.weight": (d, d),
                p + "attn.c_proj.bias": (d,),
                p + "ln_2.weight": (d,),
                p + "ln_2.bias": (d,),
                p + "mlp.c_fc.weight": (d, inner),
                p + "mlp.c_fc.bias": (inner,),
                p + "mlp.c_proj.weight": (inner, d),
                p + "mlp.c_proj.bias": (d,),
            }
        )
    return shapes


def _dense(w, b):
    return {"kernel": w, "bias": b}


def _norm(w, b):
    return {"scale": w, "bias": b}


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
    expected = _expected_shapes(cfg)
    problems = [
        f"missing tensor {n} (expected shape {s})"
        for n, s in expected.items()
        if n not in named
    ]
    problems += [
        f"unexpected tensor {n} {tuple(v.shape)}"
        for n, v in named.items()
        if n not in expected
    ]
    problems += [
        f"tensor {n} has shape {tuple(named[n].shape)}, the config implies {s}"
        for n, s in expected.items()
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

    def t(name):
        return np.asarray(named[name], np.float32)

    params = {
        "wte": {"embedding": t("wte.weight")},
        "wpe": {"embedding": t("wpe.weight")},
        "ln_f": _norm(t("ln_f.weight"), t("ln_f.bias")),
    }
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        qkv_w = np.split(t(p + "attn.c_attn.weight"), 3, axis=1)
        qkv_b = np.split(t(p + "attn.c_attn.bias"), 3)
        attn = {n: _dense(w, b) for n, w, b in zip(("query", "key", "value"), qkv_w, qkv_b)}
        attn["out"] = _dense(t(p + "attn.c_proj.weight"), t(p + "attn.c_proj.bias"))
        params[f"h_{i}"] = {
            "ln_1": _norm(t(p + "ln_1.weight"), t(p + "ln_1.bias")),
            "attn": attn,
            "ln_2": _norm(t(p + "ln_2.weight"), t(p + "ln_2.bias")),
            "fc": _dense(t(p + "mlp.c_fc.weight"), t(p + "mlp.c_fc.bias")),
            "proj": _dense(t(p + "mlp.c_proj.weight"), t(p + "mlp.c_proj.bias")),
        }
    return params


def params_to_hf(params: Any, cfg: GPTConfig) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_params`, with `GPT2LMHeadModel`'s `transformer.` names."""

    def a(x):
        return np.ascontiguousarray(np.asarray(x, np.float32))

    out = {
        "wte.weight": a(params["wte"]["embedding"]),
        "wpe.weight": a(params["wpe"]["embedding"]),
        "ln_f.weight": a(params["ln_f"]["scale"]),
        "ln_f.bias": a(params["ln_f"]["bias"]),
    }
    for i in range(cfg.n_layer):
        h, p = params[f"h_{i}"], f"h.{i}."
        attn = h["attn"]
        out[p + "attn.c_attn.weight"] = a(
            np.concatenate([attn[n]["kernel"] for n in ("query", "key", "value")], 1)
        )
        out[p + "attn.c_attn.bias"] = a(
            np.concatenate([attn[n]["bias"] for n in ("query", "key", "value")])
        )
        for hf, ours in (
            ("attn.c_proj", attn["out"]),
            ("mlp.c_fc", h["fc"]),
            ("mlp.c_proj", h["proj"]),
        ):
            out[p + hf + ".weight"] = a(ours["kernel"])
            out[p + hf + ".bias"] = a(ours["bias"])
        for ln in ("ln_1", "ln_2"):
            out[p + ln + ".weight"] = a(h[ln]["scale"])
            out[p + ln + ".bias"] = a(h[ln]["bias"])
    return {"transformer." + k: v for k, v in out.items()}


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
