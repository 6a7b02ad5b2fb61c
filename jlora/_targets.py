"""Parameter paths, the one walk over adapted trees, and target selection.

`walk` is the only function in jlora that flattens parameter trees with their paths:
merge, split, combine, the optimizer's labels, summaries, shardings, checkpoints, the
probe and the transform all go through it, so they agree on what a path is and on how
boxes and jlora nodes are opened.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import zlib
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax

from jlora._boxes import is_box, is_variable, unbox
from jlora._weight import LoraWeight, Trainable, is_node


def path_key(key, path: str):
    """A PRNG key for `path`: `key` folded with the path's CRC-32 (stable across runs,
    processes and tree orders)."""
    return jax.random.fold_in(key, zlib.crc32(path.encode("utf-8")) & 0xFFFFFFFF)


def path_string(keys) -> str:
    """`(DictKey('Dense_0'), DictKey('kernel'))` -> `'Dense_0/kernel'`.

    JAX's own `keystr` in its simple form; these strings name parameters in messages,
    configs (`targets` regexes) and checkpoint metadata.
    """
    return jax.tree_util.keystr(tuple(keys), simple=True, separator="/")


LORA, TRAINED, LEAF, EMPTY = "lora", "trained", "leaf", "none"


@dataclasses.dataclass(frozen=True)
class Node:
    """One stop of `walk`: a jlora node, a plain (possibly boxed) leaf, or None.

    `leaf` is what sits in the tree; `value` is the same, opened if it is an NNX
    `Variable` (NNX state holds jlora nodes inside them); `put_back` closes a new value
    the way `leaf` was closed. Linen boxes stay closed: `value` is the box.
    """

    keys: tuple
    leaf: Any
    value: Any

    @functools.cached_property
    def path(self) -> str:
        return path_string(self.keys)

    @property
    def kind(self) -> str:
        if isinstance(self.value, LoraWeight):
            return LORA
        if isinstance(self.value, Trainable):
            return TRAINED
        if self.value is None or (is_box(self.value) and unbox(self.value) is None):
            return EMPTY  # (a box holding None: where split's base has no value)
        return LEAF

    def put_back(self, new):
        if is_variable(self.leaf):
            return None if new is None else self.leaf.replace(value=new)
        return new


class Walk(NamedTuple):
    nodes: list
    treedef: Any

    def rebuild(self, leaves) -> Any:
        """The tree with `leaves` in the places of `nodes`."""
        return jax.tree_util.tree_unflatten(self.treedef, list(leaves))

    def by_path(self) -> dict:
        return {n.path: n for n in self.nodes}


def _stop(x) -> bool:
    """Stop at jlora nodes, at quantized kernels (one kernel, several arrays) and at
    boxes (whose inner value is the leaf)."""
    return is_node(x) or is_box(x) or getattr(type(x), "_jlora_leaf", False)


def _open(leaf):
    return leaf.get_value() if is_variable(leaf) else leaf


def walk(tree, *, keep_none: bool = False, arrays: bool = False) -> Walk:
    """The one walk over (adapted) parameter trees: every function that reads or
    rebuilds one goes through here.

    By default it stops at jlora nodes (`LoraWeight`, `Trainable`) and at boxes (Linen
    metadata, NNX variables), so a box's path is the path of its contents without the
    trailing `value`, and Linen boxed params, NNX state and plain dicts give the same
    paths. `keep_none` keeps `None` as a stop (where `split`'s trees hold no value);
    `arrays` goes down to every array leaf instead (a whole state, e.g. a checkpoint).
    """
    if arrays:
        is_leaf = (lambda x: x is None) if keep_none else None
    elif keep_none:
        is_leaf = lambda x: x is None or _stop(x)  # noqa: E731
    else:
        is_leaf = _stop
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    nodes = [Node(tuple(k), leaf, _open(leaf)) for k, leaf in flat]
    return Walk(nodes, treedef)


def map_nodes(fn: Callable[[Node], Any], tree, *, keep_none: bool = False) -> Any:
    """`fn(node)` at every stop of `walk(tree)`, rebuilt with the same structure."""
    w = walk(tree, keep_none=keep_none)
    return w.rebuild(fn(n) for n in w.nodes)


def compile_patterns(value, argname: str) -> tuple[re.Pattern, ...]:
    """A regex, or a sequence of them, compiled; `None` gives `()`."""
    if value is None:
        return ()
    if isinstance(value, (str, re.Pattern)):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(
            f"{argname} must be a regex string or a sequence of them, got {value!r}."
        ) from None
    out = []
    for item in items:
        if isinstance(item, re.Pattern):
            out.append(item)
            continue
        if not isinstance(item, str):
            raise TypeError(f"{argname} must hold regex strings, got {item!r}.")
        try:
            out.append(re.compile(item))
        except re.error as e:
            raise ValueError(f"{argname}: {item!r} is not a valid regex ({e}).") from None
    return tuple(out)


def path_matches(patterns: Iterable[re.Pattern], path: str, boxed: bool = False) -> bool:
    """Whether any pattern is found in the path (or in `path/value` for a box)."""
    candidates = (path, path + "/value") if boxed else (path,)
    return any(p.search(c) for p in patterns for c in candidates)


def near_misses(pattern: str, paths: list[str], n: int = 5) -> list[str]:
    """The paths closest to a pattern that matched nothing, for error messages."""
    close = difflib.get_close_matches(pattern, paths, n=n, cutoff=0.0)
    return close or paths[:n]
