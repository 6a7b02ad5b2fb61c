"""Key paths as `/`-joined strings, boxes (Linen metadata, NNX variables), selection."""

from __future__ import annotations

import difflib
import re
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import jax

from jlora._boxes import is_box, is_variable
from jlora._weight import is_node


def path_key(key, path: str):
    """A PRNG key for `path`: `key` folded with the path's CRC-32 (stable across runs,
    processes and tree orders)."""
    return jax.random.fold_in(key, zlib.crc32(path.encode("utf-8")) & 0xFFFFFFFF)


def key_str(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: Iterable[Any]) -> str:
    """`(DictKey('Dense_0'), DictKey('kernel'))` -> `'Dense_0/kernel'`."""
    return "/".join(key_str(k) for k in path)


def open_node(leaf):
    """`(inner, put_back)` for a leaf that may be an NNX Variable around a jlora node."""
    if is_variable(leaf):
        return leaf.get_value(), lambda v: None if v is None else leaf.replace(value=v)
    return leaf, lambda v: v


def is_stop(x) -> bool:
    """Stop a walk at jlora nodes and at boxes (whose inner value is the leaf)."""
    return is_node(x) or is_box(x)


def flatten(tree) -> tuple[list[tuple[str, Any]], Any]:
    """`[(path, leaf)]` stopping at boxes and jlora nodes, plus the treedef.

    A box's path is the path of its contents without the trailing `value`, so Linen
    boxed params, NNX state and plain dicts give the same paths.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_stop)
    return [(path_str(p), leaf) for p, leaf in leaves], treedef


def flatten_keep_none(tree) -> tuple[list[tuple[str, Any]], Any]:
    """As `flatten`, but `None` stays a leaf (where `split`'s trees hold no value)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: x is None or is_stop(x)
    )
    return [(path_str(p), leaf) for p, leaf in leaves], treedef


def map_with_path(fn: Callable[[str, Any], Any], tree):
    """`fn(path, leaf)` over `flatten(tree)`, rebuilt with the same structure."""
    leaves, treedef = flatten(tree)
    return jax.tree_util.tree_unflatten(treedef, [fn(p, leaf) for p, leaf in leaves])


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
