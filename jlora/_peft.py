"""Hugging Face PEFT LoRA adapter directories: `save_peft` writes one, `load_peft` reads
one onto JAX params.

A PEFT directory holds `adapter_config.json` and `adapter_model.safetensors`, whose
keys are `base_model.model.<module>.lora_A.weight` (`[r, in]`) and `.lora_B.weight`
(`[out, r]`), `.lora_embedding_A` (`[r, num_embeddings]`) / `.lora_embedding_B`
(`[dim, r]`) for embeddings, and `<module>.<param>` for leaves trained whole
(`modules_to_save`, biases); with DoRA, `.lora_magnitude_vector` (`[out]`). The tensor
kinds a module carries are one table, `TENSOR_KINDS`, that both directions read.
PyTorch's `[out, in]` convention holds whatever the base layer stores (GPT-2's `Conv1D`
keeps `[in, out]`; PEFT's `fan_in_fan_out` says so).

Between a jlora kernel and a PyTorch module stands a `PeftModule`: the module's dotted
name, optionally a function that rearranges the kernel (one layer of it) into the
module's `[out, in]` matrix, and optionally the rows the kernel fills in a fused module.
The factors are mapped by the same rearrangement, read off the function by applying it
to arrays of axis indices: a rearrangement of the input and output features is exact
on the factors, anything else is refused.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jlora import _atomic, _nnx, _nnx_state, _safetensors
from jlora._boxes import unbox
from jlora._config import LoraConfig
from jlora._init import conventional_layout, orientation_advice
from jlora._merge import plain_lora, refuse_stacked
from jlora._probe import infer as infer_layouts
from jlora._quant import dequantize_array, is_quantized, quantize_array
from jlora._rebuild import (
    OTHER,
    UNCHECKED,
    Base,
    Factors,
    Whole,
    cast_checksums,
    compare_base,
    fingerprint,
    rebuild,
)
from jlora._targets import LEAF, LORA, TRAINED, walk
from jlora._weight import CHILD, DEFAULT_LAYOUT, Layout, child_shape, column_norm

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

# Leaf names that name a parameter, not a module: dropped from module names by default.
_PARAM_OF_LEAF = {
    "kernel": "weight",
    "embedding": "weight",
    "scale": "weight",
    "bias": "bias",
}


class TensorKind(NamedTuple):
    """One kind of tensor a PEFT LoRA module carries, and the `LoraWeight` child it is.

    Fields:
      slot: its name in jlora's reading of a module (`"A"`, `"B"`, `"M"`).
      linear, embedding: its key suffix on a linear layer and on an `nn.Embedding`.
      axes: PEFT's axes, each `"r"` (the rank), `"in"` or `"out"` (the module's
        features, in PyTorch's order).
      child: the `LoraWeight` child it maps to, whose axes (`CHILD[child].axes`) read
        the kernel's; one layer of it is the tensor with its features rearranged by the
        module's `to_torch`.
      flag: the config field that says every module carries it, None if every module
        must.
      absent: what a layer of a stacked kernel, or a row of a fused module, that no
        tensor of this kind gives holds: `"zero"` (no change), or `"norm"` (the base
        kernel's column norm: a DoRA magnitude that leaves the layer as it is).
    """

    slot: str
    linear: str
    embedding: str
    axes: tuple[str, ...]
    child: str
    flag: str | None = None
    absent: str = "zero"


# Every tensor kind save_peft writes and load_peft reads. A new kind is one entry here:
# the key parsing and writing, shape checks, rearrangement, fusing of a module's parts,
# stacking of layers and the config flag all read it.
TENSOR_KINDS = (
    TensorKind("A", "lora_A.weight", "lora_embedding_A", ("r", "in"), "a"),
    TensorKind("B", "lora_B.weight", "lora_embedding_B", ("out", "r"), "b"),
    TensorKind(
        "M",
        "lora_magnitude_vector",
        "lora_magnitude_vector",
        ("out",),
        "m",
        flag="use_dora",
        absent="norm",
    ),
)
_KIND = {k.slot: k for k in TENSOR_KINDS}
_KIND_OF_CHILD = {k.child: k for k in TENSOR_KINDS}
_KIND_OF = {
    suffix: (kind, suffix == kind.embedding and kind.embedding != kind.linear)
    for kind in TENSOR_KINDS
    for suffix in (kind.linear, kind.embedding)
}
_TENSOR_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<which>"
    + "|".join(re.escape(k) for k in sorted(_KIND_OF, key=len, reverse=True))
    + ")$"
)
# A child's own axes, as PEFT's axis names: `a` is `[*in, r]`, `b` `[r, *out]`, a
# per-output child `[*out]` (one layer each, features flattened).
_CHILD_SIDES = {"a": ("in", "r"), "b": ("r", "out"), "out": ("out",)}


def _tensor_key(name: str, kind: TensorKind, embedding: bool) -> str:
    return f"{PREFIX}{name}.{kind.embedding if embedding else kind.linear}"


def _shape_text(kind: TensorKind) -> str:
    return "[" + ", ".join(kind.axes) + "]"


_LIST_ITEM = re.compile(r"^(?P<name>.+)_(?P<index>\d+)$")


@dataclasses.dataclass(frozen=True)
class PeftModule:
    """Where a jlora kernel lives in the PyTorch model a PEFT adapter is for.

    Args:
      name: the module's dotted name in the PyTorch model, as `named_modules()` gives
        it below the PEFT wrapper (e.g. `model.layers.0.self_attn.q_proj`). For a
        kernel with a stacked (scanned) axis, a template with `{layer}`, filled with
        each layer's index (`model.layers.{layer}.self_attn.q_proj`).
      to_torch: optional function of a NumPy array shaped like the kernel (one layer of
        it) that returns the module's `[out, in]` matrix (for an embedding:
        `[dim, num_embeddings]`); it must only move, reshape and permute axes, e.g.
        `lambda k: k.reshape(d, -1).T` or a row permutation for another rotary
        convention. By default the kernel's output axes, then its input axes (each in
        axis order), are flattened: `kernel.T` for a 2-axis `[in, out]` kernel.
      rows: `(start, total)` when the kernel is one part of a fused module: its outputs
        are rows `start:start + out` of a module with `total` outputs (GPT-2's
        `c_attn`: query `(0, 3 * d)`, key `(d, 3 * d)`, value `(2 * d, 3 * d)`).
      embedding: whether the module is PyTorch's `nn.Embedding` (its factors written as
        `lora_embedding_A/B`) or a linear layer (`lora_A/B`). None (default): decided
        by `save_peft` from how its `probe` uses the kernel, or from Flax's leaf names.
    """

    name: str
    to_torch: Callable[[np.ndarray], np.ndarray] | None = None
    rows: tuple[int, int] | None = None
    embedding: bool | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"PeftModule: name must be a non-empty str, got {self.name!r}.")
        if self.to_torch is not None and not callable(self.to_torch):
            raise TypeError(
                f"PeftModule: to_torch must be callable, got {self.to_torch!r}."
            )
        if self.embedding is not None and not isinstance(self.embedding, bool):
            raise TypeError(
                f"PeftModule: embedding must be True, False or None, got "
                f"{self.embedding!r}."
            )
        if self.rows is not None:
            rows = tuple(self.rows)
            if (
                len(rows) != 2
                or not all(isinstance(r, (int, np.integer)) for r in rows)
                or not 0 <= rows[0] < rows[1]
            ):
                raise ValueError(
                    f"PeftModule: rows must be (start, total) with 0 <= start < total, got "
                    f"{self.rows!r}."
                )
            object.__setattr__(self, "rows", (int(rows[0]), int(rows[1])))


def default_module_name(path: str) -> str:
    """The PyTorch module name for a jlora path, for Flax ports that keep Hugging Face's
    names: a leading `params/` and a trailing parameter name (`kernel`, `embedding`,
    `scale`, `bias`) are dropped, Linen's list items `layers_0` become `layers.0`, and
    `/` becomes `.`: `params/model/layers_0/self_attn/q_proj/kernel` ->
    `model.layers.0.self_attn.q_proj`."""
    parts = path.split("/")
    if parts and parts[0] == "params":
        parts = parts[1:]
    if parts and parts[-1] in _PARAM_OF_LEAF:
        parts = parts[:-1]
    out = []
    for p in parts:
        m = _LIST_ITEM.match(p)
        out += [m["name"], m["index"]] if m else [p]
    return ".".join(out)


def _param_name(path: str) -> str:
    leaf = path.rsplit("/", 1)[-1]
    return _PARAM_OF_LEAF.get(leaf, leaf)


def _module_for(module_names, path: str, fn_name: str) -> PeftModule | None:
    if module_names is None:
        return PeftModule(default_module_name(path))
    if isinstance(module_names, Mapping):
        got = module_names.get(path)
    elif callable(module_names):
        got = module_names(path)
    else:
        raise TypeError(
            f"jlora.{fn_name}: module_names must be None, a dict {{path: name}} or a "
            f"callable path -> name, got {type(module_names).__name__}."
        )
    if got is None or isinstance(got, PeftModule):
        return got
    if isinstance(got, str):
        return PeftModule(got)
    if isinstance(got, tuple) and len(got) == 2:
        return PeftModule(got[0], to_torch=got[1])
    raise TypeError(
        f"jlora.{fn_name}: module_names gave {got!r} for {path}; expected a module name "
        "(str), a (name, to_torch) pair or a jlora.PeftModule."
    )


# The factor mapping -------------------------------------------------------------------


def _per_layer(layout: Layout) -> tuple[Layout, int | None]:
    """The layout of one layer of a kernel (its stack axis removed) and that axis."""
    if not layout.stack_axes:
        return layout, None
    if len(layout.stack_axes) > 1:
        raise ValueError(f"kernels with several stacked axes ({layout}) are not supported")
    (s,) = layout.stack_axes

    def drop(axes):
        return tuple(a - (a > s) for a in axes)

    return Layout(drop(layout.in_axes), drop(layout.out_axes)), s


@dataclasses.dataclass(frozen=True)
class _Mapping:
    """How one layer's factors map to PEFT's: `A = a2[in_perm].T`, `B = b2[:, out_perm].T`
    with `a2 = a.reshape(-1, r)` and `b2 = b.reshape(r, -1)`."""

    in_perm: np.ndarray
    out_perm: np.ndarray


def _factor_mapping(shape: tuple[int, ...], layout: Layout, to_torch) -> _Mapping:
    """Applies `to_torch` to the kernel's input and output feature indices; it must
    give an `[out, in]` matrix whose rows carry one output feature each and whose
    columns one input feature each (a rearrangement), or a ValueError says why.

    The default (each side's axes flattened in axis order) is computed from the feature
    counts alone; a given `to_torch` is applied to kernel-sized index arrays."""
    in_dims = [shape[a] for a in layout.in_axes]
    out_dims = [shape[a] for a in layout.out_axes]
    n_in, n_out = int(np.prod(in_dims)), int(np.prod(out_dims))
    if to_torch is None:

        def flattened(axes, dims):  # factor order -> the same features in axis order
            index = np.arange(int(np.prod(dims))).reshape(dims)
            return index.transpose(np.argsort(axes)).ravel()

        return _Mapping(
            flattened(layout.in_axes, in_dims), flattened(layout.out_axes, out_dims)
        )
    grids = np.indices(shape)
    in_index = np.ravel_multi_index([grids[a] for a in layout.in_axes], in_dims)
    out_index = np.ravel_multi_index([grids[a] for a in layout.out_axes], out_dims)
    t_in, t_out = np.asarray(to_torch(in_index)), np.asarray(to_torch(out_index))
    if t_in.shape != (n_out, n_in):
        raise ValueError(
            f"to_torch turned a kernel {list(shape)} ({layout}) into shape "
            f"{list(t_in.shape)}; expected the module's [out, in] = [{n_out}, {n_in}]"
        )
    in_perm, out_perm = t_in[0], t_out[:, 0]
    if (
        not np.array_equal(t_in, np.broadcast_to(in_perm, t_in.shape))
        or not np.array_equal(t_out, np.broadcast_to(out_perm[:, None], t_out.shape))
        or not np.array_equal(np.sort(in_perm), np.arange(n_in))
        or not np.array_equal(np.sort(out_perm), np.arange(n_out))
    ):
        raise ValueError(
            f"to_torch does not rearrange the kernel {list(shape)} ({layout}) into an "
            "[out, in] matrix with one output feature per row and one input feature per "
            "column; only moves, reshapes and permutations of axes are exact on factors"
        )
    return _Mapping(in_perm, out_perm)


def _sides(kind: TensorKind) -> tuple[str, ...]:
    return _CHILD_SIDES[CHILD[kind.child].axes]


def _perms(m: _Mapping) -> dict[str, np.ndarray]:
    return {"in": m.in_perm, "out": m.out_perm}


def _to_module(value, kind: TensorKind, m: _Mapping) -> np.ndarray:
    """One layer of a child (`[*in, r]`, `[r, *out]`, `[*out]`) as the module's tensor
    of `kind`: features flattened, rearranged by the mapping, axes in PEFT's order."""
    sides, perms = _sides(kind), _perms(m)
    x = np.reshape(value, [-1 if s == "r" else len(perms[s]) for s in sides])
    for i, s in enumerate(sides):
        if s != "r":
            x = np.take(x, perms[s], axis=i)
    return np.ascontiguousarray(np.transpose(x, [sides.index(s) for s in kind.axes]))


def _from_module(tensor, kind: TensorKind, m: _Mapping, shape) -> np.ndarray:
    """The inverse of `_to_module`: one layer of the child, of `shape`."""
    sides, perms = _sides(kind), _perms(m)
    x = np.transpose(tensor, [kind.axes.index(s) for s in sides])
    for i, s in enumerate(sides):
        if s != "r":
            x = np.take(x, np.argsort(perms[s]), axis=i)
    return np.ascontiguousarray(x).reshape(shape)


def _orientations(shape, to_torch, n_in=None, n_out=None) -> list[tuple[Layout, _Mapping]]:
    """The orientations (`[in, out]`, `[out, in]`) of a 2-axis kernel that fit the
    module's sizes (where given) and, with a `to_torch`, that it rearranges exactly,
    each with its factor mapping."""
    fits = []
    for lay in (DEFAULT_LAYOUT, Layout((1,), (0,))):
        if n_in is not None and (shape[lay.in_axes[0]], shape[lay.out_axes[0]]) != (
            n_in,
            n_out,
        ):
            continue
        try:
            fits.append((lay, _factor_mapping(shape, lay, to_torch)))
        except ValueError:
            if to_torch is None:
                raise
    return fits


def _matrix_layout(shape, to_torch) -> tuple[Layout, _Mapping]:
    """The layout of a 2-axis kernel trained whole, with its mapping: `[in, out]`
    (Flax's), unless its `to_torch` is only a rearrangement for the other orientation."""
    if to_torch is None:
        return DEFAULT_LAYOUT, _factor_mapping(shape, DEFAULT_LAYOUT, None)
    fits = _orientations(shape, to_torch)
    if len(fits) != 1:
        raise ValueError(
            f"its to_torch does not tell which axis of the kernel {list(shape)} is the "
            "input (it must rearrange the kernel into PyTorch's [out, in] matrix)"
        )
    return fits[0]


def _whole_to_torch(value, path, pm: PeftModule, fan_in_fan_out: bool) -> np.ndarray:
    """A leaf trained whole as its PyTorch module stores it: a kernel as `nn.Linear`'s
    `[out, in]` (`to_torch`'s matrix; `[in, out]` with `fan_in_fan_out`, as GPT-2's
    `Conv1D`), other leaves as they are."""
    if path.rsplit("/", 1)[-1] != "kernel":
        return value
    if value.ndim != 2:
        raise ValueError(f"a kernel of {value.ndim} axes written whole; only 2-axis are")
    layout, m = _matrix_layout(value.shape, pm.to_torch)
    k2 = np.transpose(value, layout.in_axes + layout.out_axes)
    matrix = k2[np.ix_(m.in_perm, m.out_perm)].T
    return matrix.T if fan_in_fan_out else matrix


def _whole_from_torch(value, leaf, path, pm: PeftModule, fan_in_fan_out: bool):
    """The inverse of `_whole_to_torch`, checked against the base leaf's shape."""
    shape = tuple(np.shape(leaf))
    if path.rsplit("/", 1)[-1] == "kernel" and len(shape) == 2 and value.ndim == 2:
        matrix = value.T if fan_in_fan_out else value
        layout, m = _matrix_layout(shape, pm.to_torch)
        n_in, n_out = shape[layout.in_axes[0]], shape[layout.out_axes[0]]
        if matrix.shape != (n_out, n_in):
            raise ValueError(
                f"PyTorch weight {list(value.shape)} does not fit the kernel "
                f"{list(shape)} ({layout}; fan_in_fan_out={fan_in_fan_out})"
            )
        k2 = np.empty((n_in, n_out), value.dtype)
        k2[np.ix_(m.in_perm, m.out_perm)] = matrix.T
        return np.transpose(k2, np.argsort(layout.in_axes + layout.out_axes))
    if value.shape != shape:
        raise ValueError(f"file {list(value.shape)}, base leaf {list(shape)}")
    return value


def _host(x) -> np.ndarray:
    """A whole array on this host (gathered from every process if it spans several)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _layer(x, axis, i):
    return x if axis is None else np.take(x, i, axis=axis)


# Config --------------------------------------------------------------------------------


def _pattern_value(patterns: Mapping, module: str, default):
    """PEFT's lookup of a per-module value: the first key that matches the end of the
    dotted module name (as a regex, at a dot boundary)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scale(alpha, r, rslora) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _patterns(check):
    def ok(v):
        if v is None:
            return True
        return isinstance(v, dict) and all(
            isinstance(k, str) and check(x) for k, x in v.items()
        )

    return ok


# The PEFT config fields jlora reads: field -> (default, check, what is expected).
_FIELDS = {
    "r": (8, lambda v: _is_int(v) and v > 0, "a positive integer"),
    "lora_alpha": (8, _is_number, "a number"),
    "use_rslora": (False, lambda v: isinstance(v, bool), "true or false"),
    "lora_dropout": (
        0.0,
        lambda v: v is None or (_is_number(v) and 0 <= v < 1),
        "a number in [0, 1)",
    ),
    "fan_in_fan_out": (False, lambda v: isinstance(v, bool), "true or false"),
    "bias": ("none", lambda v: v in ("none", "all", "lora_only"), "none, all or lora_only"),
    "rank_pattern": (
        {},
        _patterns(lambda x: _is_int(x) and x > 0),
        "a dict {module pattern: positive integer}",
    ),
    "alpha_pattern": ({}, _patterns(_is_number), "a dict {module pattern: number}"),
    "use_dora": (False, lambda v: isinstance(v, bool), "true or false"),
}


def _settings(cfg: Mapping) -> tuple[dict, list[str]]:
    """The LoRA fields of a PEFT config (defaults where absent, as PEFT's), each
    checked, with a line per field that holds something else."""
    out, errors = {}, []
    for field, (default, ok, want) in _FIELDS.items():
        value = cfg.get(field, default)
        if not ok(value):
            errors.append(f"  {field}: {value!r}; expected {want}")
            value = default
        out[field] = default if value is None else value
    out["lora_dropout"] = float(out["lora_dropout"])
    return out, errors


def _global_settings(config) -> dict:
    """The config's global fields; `r` and `lora_alpha` are None without a config (the
    caller takes the most common module's)."""
    if isinstance(config, LoraConfig):
        return {
            "r": config.rank,
            "lora_alpha": config.alpha,
            "use_rslora": config.use_rslora,
            "lora_dropout": config.dropout,
            "bias": config.train_bias,
        }
    if isinstance(config, Mapping):
        settings, errors = _settings(config)
        if errors:
            raise ValueError(
                "jlora.save_peft: config holds fields PEFT would not read:\n"
                + "\n".join(errors)
            )
        return settings
    if config is not None:
        raise TypeError(
            "jlora.save_peft: config must be a jlora.LoraConfig, a PEFT config dict "
            f"(jlora.read_peft_config) or None, got {type(config).__name__}."
        )
    return {
        "r": None,
        "lora_alpha": None,
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
    }


# What load_peft refuses: field -> (is it set?, why it can't be loaded).
_REFUSED = {
    "lora_bias": (bool, "a LoRA bias on lora_B is not supported"),
    "trainable_token_indices": (bool, "trainable token embeddings are not supported"),
    "target_parameters": (bool, "adapters on bare parameters are not supported"),
    "layer_replication": (bool, "it changes the base model's layers"),
    "use_qalora": (bool, "QA-LoRA changes the forward pass"),
    "alora_invocation_tokens": (
        lambda v: v is not None,
        "activated LoRA changes the forward pass",
    ),
    "use_bdlora": (bool, "block-diagonal LoRA is not supported"),
    "arrow_config": (bool, "Arrow routing is not supported"),
    "monteclora_config": (bool, "MonteCLoRA is not supported"),
    "velora_config": (bool, "VeLoRA is not supported"),
    "kasa_config": (bool, "KaSA is not supported"),
}
_CHANGED_BASE_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _refusals(cfg: dict) -> list[str]:
    errors = []
    if cfg.get("peft_type") != "LORA":
        errors.append(
            f"  peft_type: {cfg.get('peft_type')!r}; jlora loads LoRA adapters only "
            "(peft_type 'LORA')"
        )
    for field, (is_set, why) in _REFUSED.items():
        if field in cfg and is_set(cfg[field]):
            errors.append(f"  {field}: {cfg[field]!r}; {why}")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_CHANGED_BASE_INITS):
        errors.append(
            f"  init_lora_weights: {init!r}; these adapters assume a base changed at "
            "initialization. Convert them to plain LoRA first (PEFT's "
            "`path_initial_model_for_weight_conversion` on save_pretrained)"
        )
    return errors


def read_peft_config(path) -> dict:
    """The `adapter_config.json` of a PEFT adapter directory, as a dict.

    Raises:
      FileNotFoundError: no directory or no config file (named).
      ValueError: a config that is not JSON.
    """
    path = _atomic.readable(os.path.abspath(os.fspath(path)))
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"jlora: no PEFT adapter directory at {path}.")
    if not os.path.exists(file):
        raise FileNotFoundError(
            f"jlora: {path} has no {CONFIG_FILE}; is it a PEFT adapter?"
        )
    try:
        with open(file) as f:
            cfg = json.load(f)
    except ValueError as e:
        raise ValueError(f"jlora: {file} is not valid JSON ({e}).") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"jlora: {file} holds {type(cfg).__name__}, not a JSON object.")
    return cfg


# Save ----------------------------------------------------------------------------------


class _Part(NamedTuple):
    """One kernel's adapter (one layer's, for a stacked kernel) in PEFT's form, bound for
    a module: `tensors` maps each slot of `TENSOR_KINDS` the kernel carries to its
    tensor (PEFT's axes; `out` spans this part's rows)."""

    path: str
    rows: tuple[int, int] | None
    tensors: dict[str, np.ndarray]
    scale: float
    embedding: bool

    @property
    def n_rows(self) -> int:
        return self.tensors["B"].shape[0]

    @property
    def rank(self) -> int:
        return self.tensors["A"].shape[0]


class _Leaf(NamedTuple):
    """A leaf written whole (trained, or a frozen parameter of a module saved whole)."""

    module: PeftModule
    path: str
    value: Any


_LOOKUPS = ("gather",)  # rules that read rows of a kernel (an embedding's use)
_CONTRACTIONS = ("dot_general", "conv_general_dilated")  # a linear layer's uses
_ROW_READS = ("slice", "dynamic_slice", "squeeze")  # rows read out, when nothing contracts


def _uses(probe, params) -> dict[str, tuple[str, ...]]:
    """`{path: (rule, ...)}`: how `lora(probe)(params)` uses each adapted kernel, by
    the rules of the transform itself (`jlora.explain`)."""
    from jlora._transform import explain

    return explain(probe, params)


def _is_embedding(path: str, pm: PeftModule, uses) -> bool:
    """Whether a kernel is an embedding (PEFT's `lora_embedding_A/B`) or a linear layer
    (`lora_A/B`): as its `PeftModule` declares; else from how the probe uses it (row
    lookups or contractions); else from Flax's leaf names (`embedding` for `nn.Embed`,
    `kernel` for `nn.Dense`); else a ValueError that says how to tell."""
    if pm.embedding is not None:
        return pm.embedding
    declare = (
        f"declare it: module_names={{{path!r}: jlora.PeftModule({pm.name!r}, "
        "embedding=True or False)}"
    )
    if uses is not None:
        rules = uses.get(path, ())
        linear = any(r in _CONTRACTIONS for r in rules)
        lookup = any(r in _LOOKUPS for r in rules) or (
            not linear and any(r in _ROW_READS for r in rules)
        )
        if linear and lookup:
            raise ValueError(
                f"the probe uses it both as a row lookup and in a contraction (a tied "
                f"embedding; rules {list(rules)}); PEFT adapts an Embedding and a Linear "
                f"module separately, so one module can't carry both: {declare}"
            )
        if linear or lookup:
            return lookup
        raise ValueError(
            f"the probe {'never uses it' if not rules else f'uses it by {list(rules)}'}"
            f", which tells neither an embedding (a row lookup) nor a linear layer (a "
            f"contraction): {declare}"
        )
    leaf = path.rsplit("/", 1)[-1]
    if leaf in ("embedding", "kernel"):
        return leaf == "embedding"
    raise ValueError(
        f"whether it is an embedding (PEFT's lora_embedding_A/B) or a linear layer "
        f"(lora_A/B) can't be read off its name {leaf!r} (only Flax's 'embedding' and "
        "'kernel' say); pass probe= (a function of params that runs the model) to "
        f"jlora.save_peft, or {declare}"
    )


def save_peft(
    path,
    params: Any,
    config: LoraConfig | Mapping | None = None,
    *,
    module_names: Any = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    fan_in_fan_out: bool = False,
    probe: Callable[[Any], Any] | None = None,
    overwrite: bool = False,
) -> str:
    """Writes the adapters of `params` as a Hugging Face PEFT LoRA directory.

    `PeftModel.from_pretrained(torch_model, path)` then computes what `jlora.lora(fn)`
    computes on `params`, and PEFT's `merge_and_unload()` gives `jlora.merge`'s kernels.
    Factors keep their dtype. `target_modules` is written as the explicit list of module
    names, and each module whose rank or alpha differs from the global `r` /
    `lora_alpha` gets its own `rank_pattern` / `alpha_pattern` entry (its exact name),
    so PEFT reproduces every module's scale. Leaves trained whole are written under
    their plain keys: biases (with `train_bias`) as PEFT's `bias`, others as
    `modules_to_save`. Written beside `path` and swapped in, like `save_adapter`.

    Args:
      path: the directory to write (must not exist unless `overwrite=True`).
      params: adapted params (`jlora.init`, `combine`, `load_peft`), or an NNX model
        adapted by `jlora.nnx.apply` (then `probe` is a function of the model).
      config: the `LoraConfig` (global `r`, `lora_alpha`, `use_rslora`, dropout, bias),
        a PEFT config dict (e.g. `jlora.read_peft_config` of the directory the
        adapters came from), or None (the most common rank and alpha).
      module_names: jlora path -> PyTorch module: None (`default_module_name`), a dict
        `{path: name | PeftModule}`, or a callable `path -> name | (name, to_torch) |
        PeftModule`. Paths are those of the adapted kernels (and of leaves trained
        whole).
      base_model_name_or_path, task_type: written to the config for PEFT's loaders.
      fan_in_fan_out: set for models whose targeted layers store `[in, out]` (GPT-2's
        `Conv1D`); the tensors are the same either way.
      probe: a function of params that runs the model (`lambda p: model.apply(
        {"params": p}, x)`). It tells an embedding (its kernel read by row lookups;
        written as PEFT's `lora_embedding_A/B`, for PyTorch's `nn.Embedding`) from a
        linear layer (contracted; `lora_A/B`). Needed for kernels whose leaf name
        doesn't say (only Flax's `embedding` and `kernel` do) and whose `PeftModule`
        doesn't declare `embedding=`.
      overwrite: replace an existing directory.

    Returns:
      the absolute path written.

    Raises:
      ValueError: no adapters, a path without a module name, a stacked kernel whose name
        has no `{layer}`, parts of a fused module that overlap or disagree, a `to_torch`
        that is not a rearrangement, a kernel that can't be told an embedding or a
        linear layer (every problem listed at once).
      FileExistsError: `path` exists and `overwrite` is False.
    """
    params, probe = _exportable(params, probe)
    path = os.path.abspath(os.fspath(path))
    _atomic.prepare(path, overwrite, "save_peft")  # refused before anything is computed
    uses = _uses(probe, params) if probe is not None else None
    nodes = walk(params).nodes
    errors: list[str] = []
    modules = _module_parts(nodes, module_names, uses, errors)
    plain, biases, to_save = _whole_tensors(
        nodes, module_names, set(modules), fan_in_fan_out, errors
    )
    if not modules and not plain and not errors:
        raise ValueError(
            "jlora.save_peft: params hold no adapters (no LoraWeight or Trainable leaves); "
            "call jlora.init on the base params first."
        )
    tensors, ranks, scales, flags = _module_tensors(modules, errors)
    if errors:
        raise ValueError(
            "jlora.save_peft: cannot write these adapters as PEFT modules:\n"
            + "\n".join(errors)
        )
    cfg = _peft_config(_global_settings(config), ranks, scales, flags, biases, to_save)
    cfg.update(
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
        fan_in_fan_out=bool(fan_in_fan_out),
    )
    _write(path, overwrite, cfg, {**tensors, **plain})
    return path


def _exportable(params, probe):
    """`(params, probe)` as `save_peft` writes them: an NNX model's params (and a probe
    of them), checked unstacked, with PiSSA/OLoRA starts converted for the original
    base (with a warning)."""
    if isinstance(params, nnx.Module):
        probe = _nnx.model_probe(params, probe)
        params = _nnx_state.as_params(params, "jlora.save_peft")
    refuse_stacked(params, "jlora.save_peft")
    started = [
        n.path for n in walk(params).nodes if n.kind == LORA and n.value.a0 is not None
    ]
    if started:  # PiSSA / OLoRA: PEFT's own conversion, for the original base
        more = " ..." if len(started) > 3 else ""
        warnings.warn(
            f"jlora.save_peft: the adapters at {started[:3]}{more} "
            "started from the kernels (PiSSA/OLoRA) and trained on the changed base; "
            "they are written as the equivalent plain LoRA of twice the rank for the "
            "original base (jlora.plain_lora), as PEFT's "
            "path_initial_model_for_weight_conversion does.",
            stacklevel=3,
        )
        params = plain_lora(params)
    return params, probe


def _module_parts(nodes, module_names, uses, errors) -> dict[str, list[_Part]]:
    """`{module name: [_Part]}`: every adapted kernel (each layer of a stacked one) in
    PEFT's form, under the module it maps to; problems go to `errors`."""
    modules: dict[str, list[_Part]] = {}
    for node in nodes:
        if node.kind != LORA:
            continue
        lw = node.value
        pm = _module_for(module_names, node.path, "save_peft")
        if pm is None:
            errors.append(f"  {node.path}: module_names gives no module name")
            continue
        try:
            layer_layout, axis = _per_layer(lw.layout.plain())
            if lw.w is None:
                raise ValueError("params hold no base kernel; pass combined params")
            w_shape = tuple(lw.shape)
            shape = tuple(d for i, d in enumerate(w_shape) if i != axis)
            mapping = _factor_mapping(shape, layer_layout, pm.to_torch)
            embed = _is_embedding(node.path, pm, uses)
        except ValueError as e:
            errors.append(f"  {node.path}: {e}")
            continue
        layers = 1 if axis is None else w_shape[axis]
        if axis is not None and "{layer}" not in pm.name:
            errors.append(
                f"  {node.path}: stacked kernel ({layers} layers) but its module name "
                f"{pm.name!r} has no '{{layer}}' to fill with each layer's index"
            )
            continue
        children = {}  # each kind's child, on this host; fused parts adapted alone go
        # out as the equivalent LoRA of the whole module: b at full width, zero on the
        # parts not adapted (exact)
        for kind in TENSOR_KINDS:
            value = getattr(lw, kind.child)
            if value is not None:
                value = unbox(value)
                if CHILD[kind.child].axes == "b":
                    value = lw.layout.expand_b(value)
                children[kind.slot] = _host(value)
        at = None if axis is None else 0  # a child's stacked axis comes first
        for i in range(layers):
            name = pm.name if axis is None else pm.name.format(layer=i)
            tensors = {
                slot: _to_module(_layer(v, at, i), _KIND[slot], mapping)
                for slot, v in children.items()
            }
            modules.setdefault(name, []).append(
                _Part(node.path, pm.rows, tensors, float(lw.scale), embed)
            )
    return modules


def _whole_tensors(nodes, module_names, adapted: set, fan_in_fan_out, errors):
    """`(tensors, biases, to_save)`: the plain tensors of leaves trained whole (and of
    the frozen leaves of modules saved whole), the modules whose bias trains, and the
    modules PEFT saves whole (`modules_to_save`); problems go to `errors`."""
    trained_whole: list[_Leaf] = []
    frozen: dict[str, list[_Leaf]] = {}
    for node in nodes:
        if node.kind not in (TRAINED, LEAF):
            continue
        pm = _module_for(module_names, node.path, "save_peft")
        whole = pm is not None and "{layer}" not in pm.name and pm.rows is None
        if node.kind == TRAINED:
            if pm is None:
                errors.append(f"  {node.path}: module_names gives no module name")
            elif not whole:
                errors.append(
                    f"  {node.path}: a leaf trained whole must map to one whole PyTorch "
                    f"module; {pm} is a template or a part of a fused module"
                )
            else:
                trained_whole.append(_Leaf(pm, node.path, unbox(node.value.value)))
        elif whole:
            frozen.setdefault(pm.name, []).append(_Leaf(pm, node.path, unbox(node.value)))
    to_save = {
        leaf.module.name for leaf in trained_whole if _param_name(leaf.path) != "bias"
    }
    extra = [leaf for name in sorted(to_save) for leaf in frozen.get(name, [])]
    plain: dict[str, np.ndarray] = {}
    biases = set()
    for pm, path_, value in trained_whole + extra:
        # A module in modules_to_save is written whole (PEFT reads every parameter of
        # its copy); a trained bias of a module with LoRA factors sits on its base layer.
        param = _param_name(path_)
        is_bias = param == "bias" and pm.name not in to_save
        if is_bias:
            biases.add(pm.name)
        inner = "base_layer." if is_bias and pm.name in adapted else ""
        key = f"{PREFIX}{pm.name}.{inner}{param}"
        try:
            value = _whole_to_torch(_host(value), path_, pm, fan_in_fan_out)
        except ValueError as e:
            errors.append(f"  {path_}: {e}")
            continue
        if key in plain:
            errors.append(f"  {path_}: writes {key}, which another leaf writes too")
            continue
        plain[key] = np.ascontiguousarray(value)
    return plain, sorted(biases), sorted(to_save)


def _module_tensors(modules: dict[str, list[_Part]], errors):
    """`(tensors, ranks, scales, flags)`: each module's tensors under their keys (its
    parts fused), its rank and scale, and the config flags of `TENSOR_KINDS` (a kind
    with a flag must be on every module or none); problems go to `errors`."""
    tensors, ranks, scales = {}, {}, {}
    carriers: dict[str, set] = {k.slot: set() for k in TENSOR_KINDS if k.flag}
    for name, parts in modules.items():
        try:
            if len({p.embedding for p in parts}) > 1:
                raise ValueError("some parts are embeddings and some linear layers")
            fused, scale = _fuse(parts)
        except ValueError as e:
            errors.append(f"  {name} (from {[p.path for p in parts]}): {e}")
            continue
        for slot, value in fused.items():
            tensors[_tensor_key(name, _KIND[slot], parts[0].embedding)] = value
            if slot in carriers:
                carriers[slot].add(name)
        ranks[name], scales[name] = fused["A"].shape[0], scale
    flags = {}
    for slot, names in carriers.items():
        kind = _KIND[slot]
        if names and names != set(ranks):
            errors.append(
                f"  {kind.linear} on {sorted(names)[:4]} but not on "
                f"{sorted(set(ranks) - names)[:4]}; PEFT's {kind.flag} is one setting "
                "for all modules: adapt every kernel alike (use_dora=True on all, or on "
                "none)"
            )
        flags[kind.flag] = bool(names)
    return tensors, ranks, scales, flags


def _peft_config(settings, ranks, scales, flags, biases, to_save) -> dict:
    """The `adapter_config.json` fields: the global rank and alpha (the config's, else
    the most common module's) and per-module patterns where a module differs, so PEFT
    reproduces every module's scale."""
    rslora = settings["use_rslora"]
    alphas = {n: scales[n] * (math.sqrt(ranks[n]) if rslora else ranks[n]) for n in ranks}
    if settings["r"] is None:  # no config: the most common rank and alpha
        common = collections.Counter((ranks[n], alphas[n]) for n in sorted(ranks))
        top = common.most_common(1)
        settings["r"], settings["lora_alpha"] = top[0][0] if top else (8, 8.0)
    rank_pattern = {n: int(ranks[n]) for n in sorted(ranks) if ranks[n] != settings["r"]}
    alpha_pattern = {
        n: alphas[n]
        for n in sorted(ranks)
        if not math.isclose(alphas[n], settings["lora_alpha"], rel_tol=1e-12)
    }
    bias = settings["bias"] if biases else "none"
    if biases and bias == "none":
        bias = "all"
    return {
        "peft_type": "LORA",
        "r": int(settings["r"]),
        "lora_alpha": settings["lora_alpha"],
        "use_rslora": settings["use_rslora"],
        "lora_dropout": settings["lora_dropout"],
        "target_modules": sorted(ranks),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": bias,
        "modules_to_save": to_save or None,
        "init_lora_weights": True,
        **flags,
        "inference_mode": True,
    }


def _write(path, overwrite, cfg, tensors):
    """Writes the directory (beside `path`, swapped in)."""
    text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"

    def write(target):
        if not _atomic.primary():
            return
        os.makedirs(target)
        with open(os.path.join(target, CONFIG_FILE), "w") as f:
            f.write(text)
        _safetensors.save(os.path.join(target, WEIGHTS_FILE), tensors, {"format": "pt"})

    _atomic.write_atomically(path, overwrite, "save_peft", write)


def _fuse(parts: list[_Part]) -> tuple[dict[str, np.ndarray], float]:
    """One module's `({slot: tensor}, scale)` from the kernels that map to it: a single
    kernel's as they are; parts of a fused module side by side in the rows of each
    `out` kind, sharing the `in` kinds (`A`) where they share them (and their scale),
    else as a block-structured module of the summed rank whose `B` carries each part's
    scale relative to the first. Rows no part gives are zero, or refused for a kind
    that is `absent="norm"` (the base's norm, which the adapters do not hold)."""
    first = parts[0]
    if len(parts) == 1 and first.rows is None:
        return dict(first.tensors), first.scale
    if any(p.rows is None for p in parts):
        raise ValueError(
            "several kernels map to this module; give each PeftModule rows=(start, total)"
        )
    for kind in TENSOR_KINDS:
        if len({kind.slot in p.tensors for p in parts}) > 1:
            raise ValueError(f"some parts carry {kind.linear} and some do not")
    totals = {p.rows[1] for p in parts}
    if len(totals) != 1:
        raise ValueError(f"the parts give different module sizes {sorted(totals)}")
    (total,) = totals
    spans = sorted((p.rows[0], p.rows[0] + p.n_rows, p.path) for p in parts)
    for (_, e0, p0), (s1, _, p1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ValueError(f"{p0} and {p1} overlap in the module's rows")
    if spans[-1][1] > total:
        raise ValueError(f"{spans[-1][2]} ends at row {spans[-1][1]} > total {total}")
    scale = first.scale
    kinds = [k for k in TENSOR_KINDS if k.slot in first.tensors]
    ranked = [k.slot for k in kinds if "r" in k.axes]
    inputs = [k.slot for k in kinds if "out" not in k.axes]
    shared = all(
        p.scale == scale
        and all(np.array_equal(p.tensors[s], first.tensors[s]) for s in inputs)
        for p in parts
    )
    fused = {}
    for kind in kinds:
        slots = ranked if "r" in kind.axes else [kind.slot]  # the factors share a dtype
        dtype = np.result_type(*[p.tensors[s].dtype for p in parts for s in slots])
        if "out" not in kind.axes:  # shared, or the parts' ranks side by side
            values = [p.tensors[kind.slot] for p in parts[: 1 if shared else None]]
            fused[kind.slot] = np.concatenate(values, kind.axes.index("r")).astype(dtype)
            continue
        rank = first.rank if shared else sum(p.rank for p in parts)
        sizes = {"out": total, "r": rank, "in": first.tensors["A"].shape[1]}
        big = np.zeros([sizes[s] for s in kind.axes], dtype)
        covered = np.zeros((total,), bool)
        col = 0
        for p in parts:
            index = [slice(None)] * len(kind.axes)
            index[kind.axes.index("out")] = slice(p.rows[0], p.rows[0] + p.n_rows)
            value = p.tensors[kind.slot]
            if "r" in kind.axes and not shared:
                index[kind.axes.index("r")] = slice(col, col + p.rank)
                value = value if p.scale == scale else value * (p.scale / scale)
            big[tuple(index)] = value
            covered[index[kind.axes.index("out")]] = True
            col += p.rank
        if kind.absent != "zero" and not covered.all():
            raise ValueError(
                f"{kind.linear} must cover every row of the module (a row no part adapts "
                "keeps its base norm, which the adapters do not hold), but rows "
                f"{np.flatnonzero(~covered)[:8].tolist()} belong to no adapted part"
            )
        fused[kind.slot] = big
    return fused, scale


# Load ----------------------------------------------------------------------------------


def _classify(keys, where) -> tuple[dict, dict, dict, list[str]]:
    """Splits a PEFT state dict's keys into LoRA modules, plain leaves and base weights."""
    lora: dict[str, dict] = {}
    plain: dict[str, str] = {}
    base: dict[str, str] = {}
    errors = []
    for key in sorted(keys):
        if not key.startswith(PREFIX):
            errors.append(f"  {key}: does not start with {PREFIX!r}; not a PEFT LoRA key")
            continue
        rest = key[len(PREFIX) :]
        m = _TENSOR_KEY.match(rest)
        if m:
            kind, embedding = _KIND_OF[m["which"]]
            entry = lora.setdefault(m["module"], {"embed": False})
            entry["embed"] = entry["embed"] or embedding
            entry[kind.slot] = key
        elif ".base_layer." in rest:
            base[key] = rest.replace(".base_layer.", ".")
        elif ".lora_" in rest:
            errors.append(f"  {key}: a LoRA tensor of a kind jlora does not know")
        else:
            plain[key] = rest
    for module, entry in lora.items():
        for kind in TENSOR_KINDS:
            if kind.flag is None and kind.slot not in entry:
                key = kind.embedding if entry["embed"] else kind.linear
                errors.append(f"  {module}: {key} is missing from {where}")
    return lora, plain, base, errors


def _layout_2d(shape, n_in, n_out, to_torch, path) -> tuple[Layout, _Mapping]:
    """Which axis of a 2-axis kernel is the input: the one the shapes (and the module's
    `to_torch`, if it has one) allow; for a square kernel without `to_torch`, the one
    its framework's convention gives (`jlora.init`'s rule: Flax's `kernel` is
    `[in, out]`); otherwise it can't tell."""
    fits = _orientations(shape, to_torch, n_in, n_out)
    if len(fits) == 2:
        conventional = conventional_layout(path, len(shape))
        for lay, mapping in fits:
            if lay == conventional:
                return lay, mapping
        raise ValueError(
            f"the kernel {list(shape)} is square, so whether it is stored [in, out] or "
            "[out, in] can't be read off shapes; "
            + orientation_advice(
                [path],
                "probe= (a function of params that runs the model) to jlora.load_peft",
            )
            + ", or a PeftModule with to_torch"
        )
    if not fits:
        raise ValueError(
            f"the kernel {list(shape)} fits neither [in, out] nor [out, in] for the "
            f"module's in={n_in}, out={n_out}"
            + (" with its to_torch" if to_torch is not None else "")
        )
    return fits[0]


def load_peft(
    path,
    base_params: Any,
    *,
    module_names: Any = None,
    probe: Callable[[Any], Any] | None = None,
) -> Any:
    """Puts a Hugging Face PEFT LoRA adapter onto JAX `base_params`.

    Every tensor in the file is accounted for or the call raises, listing every problem
    at once: each LoRA module must map to adapted kernels of `base_params` (by
    `module_names`), each plain key to a leaf (trained whole: `modules_to_save`,
    biases), and base weights the file carries (`...base_layer.weight`) must equal
    those of `base_params` (compared by fingerprint, as `load_adapter` compares bases:
    the bfloat16 cast of the file's float32 weights is the same base). Config fields
    jlora can't honour are refused by name (`lora_bias`,
    `pissa`/`olora`/`corda`/`loftq` inits, ...), and so are fields of the wrong type
    (a string or null `lora_alpha`, ...). Each module's scale follows PEFT:
    `lora_alpha / r` (`/ sqrt(r)` with `use_rslora`), with `rank_pattern` /
    `alpha_pattern` matched against the module name as PEFT matches them. Factors keep
    the file's dtype (integer factors are refused; float64 ones become float32, with a
    warning, unless JAX runs with x64).

    Args:
      path: a directory with `adapter_config.json` and `adapter_model.safetensors`.
      base_params: the JAX model's plain params, or an NNX model to load into in place
        (then `probe` is a function of the model, and the model is returned).
      module_names: as for `save_peft`; the map is evaluated on every leaf path of
        `base_params` (a callable may return None for leaves without a module). A fused
        module (`rows=`) is split over its parts, each getting the module's `A`.
      probe: a function of params that runs the model (`lambda p: model.apply({"params":
        p}, x)`); it tells which axes of each kernel are inputs, outputs and stacked.
        Needed for kernels with more than 2 axes, and for square 2-axis kernels whose
        PeftModule has no `to_torch` (shapes can't tell their orientation).

    Returns:
      adapted params, as `jlora.init` would make them, with the file's factors.

    Raises:
      FileNotFoundError: no directory, or a missing file (named).
      ValueError: a refused config field, base params that already hold adapters, or
        tensors that don't fit `base_params` (every problem listed at once).
    """
    if isinstance(base_params, nnx.Module):  # an NNX model: loaded into it, in place
        model = base_params
        return _nnx.load_onto(
            model,
            lambda base: load_peft(
                path,
                base,
                module_names=module_names,
                probe=_nnx.model_probe(model, probe),
            ),
            "jlora.load_peft",
        )
    path, settings, tensors = _read(path)
    lora, plain, base_keys, errors = _classify(tensors, WEIGHTS_FILE)
    base = Base(base_params, "load_peft")  # check them against the base
    targets = _Targets.of(base, module_names)
    adapted = {t.path for m in lora if m in targets.kernels for t in targets.kernels[m]}
    probed = {}
    if probe is not None and adapted:
        probed = infer_layouts(probe, base_params, adapted)
    found = _factors(lora, tensors, settings, targets, base, probed, errors)
    found.update(_whole_leaves(plain, base_keys, tensors, settings, targets, base, errors))
    if errors:
        raise ValueError(
            f"jlora.load_peft: the adapter at {path} does not fit base_params:\n"
            + "\n".join(errors)
        )
    return rebuild(base, found, "load_peft")  # rebuild, combine


def _read(path) -> tuple[str, dict, dict]:
    """`(path, settings, tensors)` of a PEFT directory jlora can load: the config's
    LoRA settings (refused fields, and fields of the wrong type, listed at once) and its
    tensors by key."""
    cfg = read_peft_config(path)
    path = _atomic.readable(os.path.abspath(os.fspath(path)))
    settings, errors = _settings(cfg)
    errors = _refusals(cfg) + errors
    if errors:
        raise ValueError(
            f"jlora.load_peft: {path} is a PEFT adapter jlora can't load as it is:\n"
            + "\n".join(errors)
        )
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.exists(file):
        raise FileNotFoundError(f"jlora.load_peft: {path} has no {WEIGHTS_FILE}.")
    tensors, _ = _safetensors.load(file)
    return path, settings, tensors


class _Target(NamedTuple):
    """A leaf of the base that a PyTorch module's tensors go to (for a stacked kernel,
    one `layer` of it)."""

    path: str
    module: PeftModule
    layer: int | None


class _Targets(NamedTuple):
    kernels: dict[str, list[_Target]]  # module name -> the kernels its factors go to
    leaves: dict[tuple[str, str], _Target]  # (module, param) -> the leaf it names

    @classmethod
    def of(cls, base: Base, module_names) -> _Targets:
        """Every leaf of the base by the PyTorch module (and parameter) it is."""
        kernels: dict[str, list[_Target]] = {}
        leaves: dict[tuple[str, str], _Target] = {}
        for node in base.walk.nodes:
            if node.kind != LEAF:
                continue
            pm = _module_for(module_names, node.path, "load_peft")
            if pm is None:
                continue
            leaves[(pm.name, _param_name(node.path))] = _Target(node.path, pm, None)
            value = unbox(node.value)
            dtype = getattr(value, "dtype", None)
            if (
                np.ndim(value) < 2
                or dtype is None
                or not jnp.issubdtype(dtype, jnp.floating)
                or _param_name(node.path) == "bias"
                or node.path.rsplit("/", 1)[-1] == "scale"
            ):
                continue  # only kernels (and embeddings) carry LoRA factors
            if "{layer}" in pm.name:
                for i in range(np.shape(value)[0]):
                    name = pm.name.format(layer=i)
                    kernels.setdefault(name, []).append(_Target(node.path, pm, i))
            else:
                kernels.setdefault(pm.name, []).append(_Target(node.path, pm, None))
        return cls(kernels, leaves)


def _factors(lora, tensors, settings, targets: _Targets, base: Base, probed, errors):
    """`{path: Factors}`: each LoRA module's tensors mapped onto the kernels it names,
    checked (dtype, rank, shapes, rows of a fused module); problems go to `errors`."""
    layers: dict[str, dict] = {}  # path -> layer -> ({child: value}, scale)
    layouts: dict[str, Layout] = {}
    for module in sorted(lora):
        entry = lora[module]
        if any(k.flag is None and k.slot not in entry for k in TENSOR_KINDS):
            continue  # said by _classify
        try:
            values, sizes, scale = _module_values(entry, tensors, settings, module)
            parts = _module_targets(module, targets)
        except ValueError as e:
            errors.append(f"  {module}: {e}")
            continue
        covered = np.zeros(sizes["out"], bool)
        for path_, pm, layer in parts:
            try:
                layout, children, rows = _onto_part(
                    path_, base, probed.get(path_), pm, layer, values, sizes["r"]
                )
            except ValueError as e:
                errors.append(f"  {module} -> {path_}: {e}")
                continue
            covered[rows] = True
            if path_ in layouts and layouts[path_] != layout:
                errors.append(f"  {path_}: layouts disagree across layers")
                continue
            layouts[path_] = layout
            layers.setdefault(path_, {})[layer] = (children, scale)
        uncovered = ~covered & np.any(values["B"] != 0, axis=1)
        if uncovered.any() and all(t.module.rows for t in parts):
            errors.append(
                f"  {module}: rows {np.flatnonzero(uncovered)[:8].tolist()}... of lora_B "
                "are non-zero but no kernel maps to them; map every part of the fused "
                "module (rows=) so no part of the adapter is dropped"
            )
    found = {}
    for path_, by_layer in layers.items():
        try:
            children, scale = _stack(by_layer, layouts[path_], base.nodes[path_])
        except ValueError as e:
            errors.append(f"  {path_}: {e}")
            continue
        a, b = children.pop("a"), children.pop("b")
        dropout = settings["lora_dropout"]
        found[path_] = Factors(a, b, scale, layouts[path_], dropout, children or None)
    return found


def _module_values(entry, tensors, settings, module):
    """`(values, sizes, scale)` of one module: its tensors by slot, the sizes their axes
    give (`r`, `in`, `out`) and its scale, each checked against `TENSOR_KINDS` and the
    config; a ValueError says what does not fit."""
    keys = {slot: key for slot, key in entry.items() if slot != "embed"}
    bad = [k for k in keys.values() if not jnp.issubdtype(tensors[k].dtype, jnp.floating)]
    if bad:
        raise ValueError(
            f"{', '.join(f'{k} is {tensors[k].dtype}' for k in bad)}; LoRA factors are "
            "floating-point"
        )
    for kind in TENSOR_KINDS:
        if kind.flag is not None and (kind.slot in keys) != settings[kind.flag]:
            raise ValueError(
                f"has {kind.linear} but the config's {kind.flag} is false"
                if kind.slot in keys
                else f"the config sets {kind.flag} but the file has no {kind.linear} for it"
            )
    values = {slot: tensors[key] for slot, key in keys.items()}
    sizes: dict[str, int] = {}
    for kind in TENSOR_KINDS:
        shape = values[kind.slot].shape if kind.slot in values else None
        if shape is not None and (
            len(shape) != len(kind.axes)
            or any(sizes.setdefault(s, d) != d for s, d in zip(kind.axes, shape))
        ):
            suffix = {s: k[len(PREFIX) + len(module) + 1 :] for s, k in keys.items()}
            raise ValueError(
                ", ".join(f"{suffix[s]} {list(v.shape)}" for s, v in values.items())
                + " are not "
                + ", ".join(_shape_text(_KIND[s]) for s in values)
                + " with one r, in and out"
            )
    r = sizes["r"]
    want_r = _pattern_value(settings["rank_pattern"], module, settings["r"])
    if r != want_r:
        raise ValueError(
            f"rank {r} in the file, but the config gives r={want_r} (r / rank_pattern)"
        )
    alpha = _pattern_value(settings["alpha_pattern"], module, settings["lora_alpha"])
    return values, sizes, _scale(alpha, r, settings["use_rslora"])


def _module_targets(module: str, targets: _Targets) -> list[_Target]:
    """The kernels a module's tensors go to, or a ValueError that says why none."""
    parts = targets.kernels.get(module)
    if not parts:
        close = difflib.get_close_matches(module, list(targets.kernels), 3, 0.0)
        raise ValueError(
            f"no leaf of base_params maps to this module; closest names: {close} "
            "(module_names= maps jlora paths to module names)"
        )
    if len(parts) > 1 and any(t.module.rows is None for t in parts):
        raise ValueError(
            f"several leaves map here ({[t.path for t in parts]}); give each a "
            "PeftModule with rows=(start, total)"
        )
    return parts


def _onto_part(path, base: Base, layout, pm: PeftModule, layer, values, r):
    """`(layout, {child: value}, rows)`: a module's tensors on one kernel it names (one
    `layer` of it), each kind's `out` axis cut to the kernel's `rows` of the module."""
    shape = tuple(np.shape(unbox(base.nodes[path].value)))
    layout, layer_layout, lshape, mapping = _part_layout(
        path, shape, layout, pm, layer, values["A"], values["B"]
    )
    start = 0 if pm.rows is None else pm.rows[0]
    rows = slice(start, start + len(mapping.out_perm))
    children = {}
    for slot, tensor in values.items():
        kind = _KIND[slot]
        if "out" in kind.axes:
            index = [slice(None)] * tensor.ndim
            index[kind.axes.index("out")] = rows
            tensor = tensor[tuple(index)]
        shape_ = child_shape(layer_layout, lshape, CHILD[kind.child].axes, r)
        children[kind.child] = _from_module(tensor, kind, mapping, shape_)
    return layout, children, rows


def _part_layout(path, shape, layout, pm: PeftModule, layer, big_a, big_b):
    """`(layout, layer_layout, layer_shape, mapping)` of a kernel (of `shape`; `layout`
    from the probe, or None) that one module's `A`, `B` go to, checked against them."""
    if layout is not None:
        layer_layout, axis = _per_layer(layout)
        if (axis is None) != (layer is None):
            raise ValueError(
                f"the probe reads layout {layout}, but the module name {pm.name!r} "
                f"{'has' if layer is not None else 'lacks'} a '{{layer}}' template"
            )
    else:
        axis = None if layer is None else 0
    lshape = tuple(d for i, d in enumerate(shape) if i != axis)
    if layout is None:
        if len(lshape) != 2:
            raise ValueError(
                f"the kernel {list(shape)} has {len(shape)} axes; pass probe= "
                "to jlora.load_peft to read which are inputs and outputs"
            )
        n_in = big_a.shape[1]
        n_out = big_b.shape[0] if pm.rows is None else lshape[0] * lshape[1] // n_in
        layer_layout, mapping = _layout_2d(lshape, n_in, n_out, pm.to_torch, path)
        layout = (
            layer_layout
            if axis is None
            else Layout(
                tuple(a + 1 for a in layer_layout.in_axes),
                tuple(a + 1 for a in layer_layout.out_axes),
                (0,),
            )
        )
    else:
        mapping = _factor_mapping(lshape, layer_layout, pm.to_torch)
    n_part = len(mapping.out_perm)
    start = 0 if pm.rows is None else pm.rows[0]
    if pm.rows is not None and pm.rows[1] != big_b.shape[0]:
        raise ValueError(
            f"rows={pm.rows} says the module has {pm.rows[1]} outputs; the "
            f"file's lora_B has {big_b.shape[0]}"
        )
    if pm.rows is None and n_part != big_b.shape[0]:
        raise ValueError(
            f"the kernel {list(shape)} has {n_part} outputs; the file's lora_B "
            f"{list(big_b.shape)} has {big_b.shape[0]}"
        )
    if start + n_part > big_b.shape[0] or len(mapping.in_perm) != big_a.shape[1]:
        raise ValueError(
            f"the kernel {list(shape)} (in {len(mapping.in_perm)}, out {n_part}) does "
            f"not fit A {list(big_a.shape)}, B {list(big_b.shape)}"
            + ("" if pm.rows is None else f" at rows {pm.rows}")
        )
    return layout, layer_layout, lshape, mapping


def _whole_leaves(plain, base_keys, tensors, settings, targets, base, errors):
    """`{path: Whole}` for the file's plain tensors (leaves trained whole), each as its
    leaf stores it; the base weights the file carries are checked against the base
    (`compare_base`, the check `load_adapter` makes). Problems go to `errors`."""
    fan = settings["fan_in_fan_out"]
    if settings["bias"] != "none":  # trained biases of adapted layers
        for key, rest in list(base_keys.items()):
            if rest.endswith(".bias"):
                plain[key] = base_keys.pop(key)

    def onto_leaf(key, rest, missing):
        """`(path, value)` of the leaf a plain tensor belongs to, as the leaf stores
        it, or None with the problem in `errors`."""
        module, _, param = rest.rpartition(".")
        target = targets.leaves.get((module, param))
        if target is None:
            errors.append(f"  {key}: {missing} {module!r}.{param}")
            return None
        p = target.path
        try:
            leaf = unbox(base.nodes[p].value)
            return p, _whole_from_torch(tensors[key], leaf, p, target.module, fan)
        except ValueError as e:
            errors.append(f"  {key} -> {p}: {e}")
            return None

    found = {}
    for key, rest in plain.items():
        got = onto_leaf(key, rest, "no leaf of base_params maps to")
        if got is not None:
            found[got[0]] = Whole(got[1])
    for key, rest in base_keys.items():
        got = onto_leaf(key, rest, "base weights for a leaf base_params lack:")
        if got is None:
            continue
        p, value = got
        w = unbox(base.nodes[p].value)
        if is_quantized(w):  # the file's float weights, quantized as the base's kernel
            value = quantize_array(
                jnp.asarray(value).astype(w.dtype),
                w.kind,
                block_size=w.block_size,
                double_quant=w.absmax_scale is not None,
                axis=w.axis,
            )
        verdict = compare_base(fingerprint(value), cast_checksums(value), w)
        if verdict in (OTHER, UNCHECKED):
            why = (
                "differ from base_params"
                if verdict == OTHER
                else f"are {value.dtype} and base_params' {w.dtype}, which jlora can't "
                "compare"
            )
            errors.append(
                f"  {key}: the file carries base weights for {p} that {why}; load the "
                "base those weights belong to (or drop them from the file: PEFT's "
                "save_pretrained(..., save_embedding_layers=False))"
            )
    return found


def _stack(layers: dict, layout: Layout, node):
    """One kernel's `({child: value}, scale)` from its layers'. A stacked kernel's
    layers the file leaves out hold each kind's `absent` value: zero factors, which add
    nothing, and, with DoRA, the magnitude that leaves them as they are (the layer's own
    column norm)."""
    if None in layers:
        return layers[None]
    first, (children0, scale) = next(iter(layers.items()))
    (axis,) = layout.stack_axes
    w = unbox(node.value)
    stacked = {}
    for child, v0 in children0.items():
        if _KIND_OF_CHILD[child].absent == "norm":
            plain = dequantize_array(w) if is_quantized(w) else w
            norm = column_norm(plain, None, None, layout, 0.0)
            stacked[child] = np.asarray(norm).astype(v0.dtype)
        else:
            stacked[child] = np.zeros((np.shape(w)[axis], *v0.shape), v0.dtype)
    for i, (children, si) in layers.items():
        ai, a0 = children["a"], children0["a"]
        if ai.shape != a0.shape or si != scale:
            raise ValueError(
                f"layer {i} has rank {ai.shape[-1]} and scale {si}, layer {first} rank "
                f"{a0.shape[-1]} and scale {scale}; one stacked kernel takes one rank "
                "and one scale for all its layers"
            )
        for child, value in children.items():
            stacked[child][i] = value
    return stacked, scale
