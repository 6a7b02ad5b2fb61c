"""`optimizer`: frozen by construction, for whole-tree training; and `summary`."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from jlora import _nnx_state
from jlora._boxes import unbox
from jlora._config import LoraConfig
from jlora._quant import is_quantized
from jlora._targets import LORA, TRAINED, map_nodes, walk
from jlora._weight import CHILDREN, EXTRA_CHILDREN, Layout, Trainable

TRAIN, FROZEN, B_FACTOR, OTHER = "train", "frozen", "b", "other"


def _labels(params, *, b_label: str, train: str, frozen: str):
    def label(node):
        if node.kind == LORA:
            lw = node.value
            labels = {
                c.name: None
                if getattr(lw, c.name) is None
                else b_label
                if c.name == "b"
                else train
                if c.trained
                else frozen
                for c in CHILDREN
            }
            return node.put_back(lw.replace(**labels))
        if node.kind == TRAINED:
            return node.put_back(Trainable(train))
        # A label for every leaf under this position (a box may hold several).
        return jax.tree.map(lambda _: frozen, node.leaf)

    return map_nodes(label, params)


def trainable_labels(params):
    """`"train"` on every trainable leaf, `"frozen"` elsewhere (same structure)."""
    return _labels(params, b_label=TRAIN, train=TRAIN, frozen=FROZEN)


def optimizer(
    tx: optax.GradientTransformation,
    config: LoraConfig | None = None,
    *,
    lr_ratio_b: float | None = None,
) -> optax.GradientTransformation:
    """`tx` on the trainable leaves, zero updates (and no state) everywhere else.

    For whole-tree training (e.g. a `flax.training.train_state.TrainState` over the
    adapted params): an `optax.multi_transform` whose labels are computed from the params
    it is initialised with. Every trainable leaf (the factors, `Trainable` biases and
    `also_train` leaves) goes through the one `tx`, so a `clip_by_global_norm` inside
    `tx` sees the global norm of all of them; frozen leaves go to `optax.set_to_zero()`.
    Under `jit` XLA removes the dead frozen-kernel gradients, but the step still returns
    a copy of the frozen base unless the params are donated (`donate_argnums`).

    Args:
      tx: the optimizer for the trainable leaves.
      config: optional, accepted for symmetry with `jlora.init`; the trainable set is
        read off the params themselves (their `LoraWeight` and `Trainable` nodes), so
        `split`, `optimizer` and `summary` always agree.
      lr_ratio_b: LoRA+: multiply the updates of every `b` factor by this ratio after
        `tx` (`optax.scale` on `b` only). Exact LoRA+ when the learning rate is `tx`'s
        final linear scale (as in `optax.adamw`, `optax.sgd`); with a transform after
        the learning rate that is not linear it is only an approximation.

    Returns:
      an `optax.GradientTransformation`.

    Example:
      >>> import optax, jlora
      >>> tx = jlora.optimizer(optax.adamw(1e-3), lr_ratio_b=16.0)
    """
    if config is not None and not isinstance(config, LoraConfig):
        raise TypeError(
            f"jlora.optimizer: config must be a jlora.LoraConfig or None, got "
            f"{type(config).__name__}."
        )
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(
            f"jlora.optimizer: tx must be an optax.GradientTransformation, got "
            f"{type(tx).__name__}."
        )
    main = optax.multi_transform({TRAIN: tx, FROZEN: optax.set_to_zero()}, trainable_labels)
    if lr_ratio_b is None:
        return main
    if not isinstance(lr_ratio_b, (int, float)) or lr_ratio_b <= 0:
        raise ValueError(
            f"jlora.optimizer: lr_ratio_b must be a positive number, got {lr_ratio_b!r}."
        )
    b_only = optax.multi_transform(
        {B_FACTOR: optax.scale(float(lr_ratio_b)), OTHER: optax.identity()},
        lambda p: _labels(p, b_label=B_FACTOR, train=OTHER, frozen=OTHER),
    )
    return optax.chain(main, b_only)


class AdaptedPath(NamedTuple):
    path: str
    shape: tuple[int, ...]
    rank: int
    scale: float
    layout: Layout


class Summary(NamedTuple):
    """Parameter counts of adapted params; `str()` gives a one-screen report."""

    trainable_params: int
    total_params: int
    trainable_bytes: int
    total_bytes: int
    adapted: tuple[AdaptedPath, ...]
    trained_leaves: tuple[str, ...]

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def __str__(self):
        lines = [
            f"trainable params: {self.trainable_params:,} || all params: "
            f"{self.total_params:,} || trainable%: {100 * self.trainable_fraction:.4f}",
            f"trainable bytes: {self.trainable_bytes:,} || all bytes: {self.total_bytes:,}",
        ]
        for p in self.adapted:
            lines.append(
                f"  {p.path}: {list(p.shape)} rank {p.rank} scale {p.scale:g} "
                f"in {p.layout.in_axes} out {p.layout.out_axes}"
                + (f" stacked {p.layout.stack_axes}" if p.layout.stack_axes else "")
            )
        for p in self.trained_leaves:
            lines.append(f"  {p}: trained fully")
        return "\n".join(lines)


def _size_bytes(tree) -> tuple[int, int]:
    """Parameters and bytes: a quantized kernel counts its kernel's elements as
    parameters and its codes and scales as bytes."""
    n = nbytes = 0
    for x in jax.tree.leaves(tree, is_leaf=is_quantized):
        if is_quantized(x):
            n += x.size
            nbytes += sum(
                int(np.prod(np.shape(c))) * np.dtype(c.dtype).itemsize
                for c in jax.tree.leaves(x)
            )
            continue
        size = int(np.prod(np.shape(x)))
        n += size
        nbytes += size * np.dtype(x.dtype).itemsize
    return n, nbytes


def _without_state(node):
    """The node without the adapter children that are copies, not params (DoRA's
    cached norm, PiSSA's starting factors)."""
    if node.kind == LORA:
        held = {c.name: None for c in EXTRA_CHILDREN if not c.trained}
        return node.put_back(node.value.replace(**held))
    return node.leaf


def summary(params: Any) -> Summary:
    """Trainable vs total parameter counts and bytes, and what is adapted.

    Counts include the factors (as PEFT's printout does). Trainable = the same set as
    `split`'s adapters and `optimizer`'s trained leaves. `params` may also be an NNX
    model adapted by `jlora.nnx.apply` (its `nnx.Param` state is counted).

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> lp = jlora.init(jax.random.key(0), {"kernel": jnp.ones((8, 8))},
      ...                 jlora.LoraConfig(2, 2))
      >>> jlora.summary(lp).trainable_params
      32
    """
    params = _nnx_state.as_params(params, "jlora.summary")
    train = jax.tree.map(
        lambda label, x: x if label == TRAIN else None,
        trainable_labels(params),
        params,
    )
    t_n, t_b = _size_bytes(train)
    n, b = _size_bytes(map_nodes(_without_state, params))
    adapted, trained = [], []
    for node in walk(params).nodes:
        if node.kind == LORA:
            lw = node.value
            shape = tuple(np.shape(unbox(lw.w)))
            adapted.append(AdaptedPath(node.path, shape, lw.rank, lw.scale, lw.layout))
        elif node.kind == TRAINED:
            trained.append(node.path)
    return Summary(t_n, n, t_b, b, tuple(adapted), tuple(trained))
