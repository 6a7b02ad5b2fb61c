"""`LoraConfig`: the hyperparameters of an adaptation, validated on construction."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jlora._targets import compile_patterns
from jlora._weight import Fused, Layout

INITS = ("lora", "gaussian", "pissa", "olora")  # and "pissa_niter_<n>"
_PISSA_NITER = re.compile(r"^pissa_niter_(\d+)$")


def start_kind(init: str) -> tuple[str, int | None]:
    """`(kind, niter)`: `init` without its `_niter_<n>` (`"pissa"`, `"olora"`,
    `"lora"`, `"gaussian"`) and the subspace iterations of a randomized SVD (None:
    the exact one)."""
    m = _PISSA_NITER.match(init)
    return ("pissa", int(m.group(1))) if m else (init, None)

TRAIN_BIAS = ("none", "all", "lora_only")


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how.

    Args:
      rank: the rank `r` of the factors (`a: in -> r`, `b: r -> out`); a positive int.
      alpha: the LoRA alpha; `scale = alpha / rank`, or `alpha / sqrt(rank)` with
        `use_rslora=True`. Positive.
      dropout: dropout rate on the LoRA branch input, in `[0, 1)`. Applied only when
        `jlora.lora` is given an `rng`.
      targets: regex (or sequence of regexes) searched in `/`-joined key paths such as
        `Block_0/attn/query/kernel`. Default `None`: every Dense-like kernel, i.e. every
        floating leaf with at least 2 axes named `kernel` (Flax), `weight` (Equinox,
        PyTorch-style), `w` (Haiku, gemma), `data_array` (penzai), or `gating_einsum` /
        `linear` (gemma's feed-forward). Embedding tables (Flax's `embedding`) are
        adapted only when targeted.
      exclude: regex(es); matching paths are never adapted.
      use_rslora: rank-stabilized scale `alpha / sqrt(rank)`.
      init: `"lora"` (`a` Kaiming-uniform with a=sqrt(5), bound `1/sqrt(fan_in)`; `b`
        zeros) or `"gaussian"` (`a` normal with std `1/rank`; `b` zeros). Either way the
        adapted model starts equal to the base. Embedding tables (leaves named
        `embedding`) get `a` zeros and `b` standard normal. Starts that change the
        frozen kernel (PEFT's names): `"pissa"` (with `W = U S V^T` over the kernel's
        input and output axes, `a = U_r sqrt(S_r / scale)`, `b = sqrt(S_r / scale)
        V_r^T`), `"pissa_niter_<n>"` (the same from a randomized SVD with `n` subspace
        iterations, for big kernels), `"olora"` (the QR of the `[out, in]` matrix,
        `b = Q_r^T`, `a = R_r^T`); the kernel becomes `W - scale * a @ b`, so the model
        still starts equal to the base, and the starting factors are kept (`a0`,
        `b0`) for `save_peft`, which writes the equivalent plain LoRA of rank `2r` for
        the original base. Stacked kernels are decomposed per layer.
      dtype: dtype of the factors; default float32 (also for a bfloat16 base).
      rank_pattern / alpha_pattern: `{regex: value}` overrides per path (first match).
      layout: `{regex: Layout}` declaring input/output/stacked axes of kernels with more
        than 2 axes (or a 2-axis kernel stored `[out, in]`).
      fused: `{regex: Fused}`: adapt only chosen parts of a fused output axis, each
        with its own rank-`rank` factors (e.g. q and v of GPT-2's `c_attn`:
        `{"c_attn/kernel$": jlora.Fused(axis=1, parts=3, adapt=(0, 2))}`); the layout
        of the other axes is decided as usual.
      use_dora: DoRA (weight-decomposed LoRA): each adapted kernel also trains a
        magnitude `m`, one value per output element, initialised to the kernel's norm
        over its input axes, and computes `m / ||w + scale * a @ b|| * (w + scale *
        a @ b)` with that norm a constant of the backward pass (as PEFT's
        `use_dora=True`), never forming `w + scale * a @ b`. With dropout > 0 (and an
        `rng`), as PEFT: `x @ w + (g - 1) * (d(x) @ w) + g * scale * d(x) @ a @ b`,
        `g = m / norm`, `d` the dropout; the magnitude term sees the dropped input.
      train_bias: `"none"`, `"all"` (every leaf named `bias`) or `"lora_only"` (the
        biases beside adapted kernels) are trained fully.
      also_train: regex(es) of leaves trained fully (e.g. a classifier head).

    Raises:
      ValueError / TypeError: on any invalid value, naming the argument.

    Example:
      >>> import jlora
      >>> cfg = jlora.LoraConfig(8, 16, targets=r"(query|value)/kernel$")
      >>> cfg.scale_for("attn/query/kernel")
      2.0
    """

    rank: int
    alpha: float
    _: dataclasses.KW_ONLY
    dropout: float = 0.0
    targets: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    use_rslora: bool = False
    init: str = "lora"
    dtype: Any = None
    rank_pattern: Mapping[str, int] | None = None
    alpha_pattern: Mapping[str, float] | None = None
    layout: Mapping[str, Layout] | None = None
    fused: Mapping[str, Fused] | None = None
    use_dora: bool = False
    train_bias: str = "none"
    also_train: str | Sequence[str] | None = None

    def __post_init__(self):
        _check_rank(self.rank, "rank")
        _check_alpha(self.alpha, "alpha")
        if not _is_number(self.dropout) or not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(
                f"LoraConfig: dropout must be a number in [0, 1), got {self.dropout!r}."
            )
        if not isinstance(self.init, str) or (
            self.init not in INITS and not _PISSA_NITER.match(self.init)
        ):
            raise ValueError(
                f"LoraConfig: init must be one of {INITS} or 'pissa_niter_<n>' (a "
                f"randomized SVD with n subspace iterations), got {self.init!r}."
            )
        if self.train_bias not in TRAIN_BIAS:
            raise ValueError(
                f"LoraConfig: train_bias must be one of {TRAIN_BIAS}, "
                f"got {self.train_bias!r}."
            )
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(
                    f"LoraConfig: {flag} must be a bool, got {getattr(self, flag)!r}."
                )
        if self.dtype is not None:
            try:
                dt = jnp.dtype(self.dtype)
            except TypeError:
                raise TypeError(
                    f"LoraConfig: dtype must be a dtype, got {self.dtype!r}."
                ) from None
            if not jnp.issubdtype(dt, jnp.floating):
                raise ValueError(f"LoraConfig: dtype must be a floating dtype, got {dt}.")
        for name in ("targets", "exclude", "also_train"):
            compile_patterns(getattr(self, name), f"LoraConfig.{name}")
        for name, check in (
            ("rank_pattern", _check_rank),
            ("alpha_pattern", _check_alpha),
            ("layout", _check_layout),
            ("fused", _check_fused),
        ):
            patterns = getattr(self, name)
            if patterns is None:
                continue
            if not isinstance(patterns, Mapping):
                raise TypeError(
                    f"LoraConfig: {name} must be a dict {{regex: value}}, got {patterns!r}."
                )
            for key, value in patterns.items():
                compile_patterns(key, f"LoraConfig.{name} key")
                check(value, f"{name}[{key!r}]")

    # Per-path values -------------------------------------------------------------------

    def _lookup(self, patterns, path, default):
        for key, value in (patterns or {}).items():
            if re.search(key, path):
                return value
        return default

    def rank_for(self, path: str) -> int:
        return int(self._lookup(self.rank_pattern, path, self.rank))

    def alpha_for(self, path: str) -> float:
        return float(self._lookup(self.alpha_pattern, path, self.alpha))

    def scale_for(self, path: str) -> float:
        rank = self.rank_for(path)
        alpha = self.alpha_for(path)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def layout_for(self, path: str) -> Layout | None:
        return self._lookup(self.layout, path, None)

    def fused_for(self, path: str) -> Fused | None:
        return self._lookup(self.fused, path, None)

    @property
    def factor_dtype(self):
        return jnp.dtype(self.dtype) if self.dtype is not None else jnp.dtype(jnp.float32)


def _check_rank(value, name):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"LoraConfig: {name} must be a positive int, got {value!r}.")


def _check_alpha(value, name):
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"LoraConfig: {name} must be a positive finite number, got {value!r}."
        )


def _check_layout(value, name):
    if not isinstance(value, Layout):
        raise TypeError(
            f"LoraConfig: {name} must be a jlora.Layout(in_axes=..., out_axes=..., "
            f"stack_axes=...), got {value!r}."
        )


def _check_fused(value, name):
    if not isinstance(value, Fused):
        raise TypeError(
            f"LoraConfig: {name} must be a jlora.Fused(axis=..., parts=..., adapt=...), "
            f"got {value!r}."
        )
