"""Orbax checkpoints: adapters alone, merged params for serving, training-loop state.

An adapter checkpoint is one orbax checkpoint (a `CompositeCheckpointHandler`) with two
items: `adapters`, the factor and trained arrays, and `jlora`, JSON metadata (format,
jlora version, config, and per leaf: path, kind, shapes, dtypes, scale, layout).
Restoring always goes against an abstract target built from the base params, so the
result has `LoraWeight` nodes with their scale and layout, never plain dicts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from typing import Any

import jax
import numpy as np

from jlora._config import LoraConfig
from jlora._merge import combine, merge
from jlora._sharding import factor_shardings, named_sharding_of
from jlora._targets import flatten, open_node, unbox
from jlora._weight import Layout, LoraWeight, Trainable

FORMAT = "jlora-adapter"
FORMAT_VERSION = 1
ARRAYS, META = "adapters", "jlora"


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _key(i: int) -> str:
    return f"leaf_{i:05d}"


def _spec(x) -> dict:
    return {"shape": list(np.shape(x)), "dtype": str(np.dtype(x.dtype))}


def _config_dict(config: LoraConfig | None):
    if config is None:
        return None
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"jlora.save_adapter: config must be a jlora.LoraConfig or None, got "
            f"{type(config).__name__}."
        )
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, dict):
            value = {k: list(v) if isinstance(v, Layout) else v for k, v in value.items()}
        elif field.name == "dtype" and value is not None:
            value = str(np.dtype(value))
        elif isinstance(value, tuple):
            value = list(value)
        out[field.name] = value
    return out


def _collect(params):
    """Adapter arrays in tree order and their metadata entries."""
    arrays, entries = [], []
    for path, leaf in flatten(params)[0]:
        inner, _ = open_node(leaf)
        if isinstance(inner, LoraWeight):
            a, b = unbox(inner.a), unbox(inner.b)
            entries.append(
                {
                    "path": path,
                    "kind": "lora",
                    "scale": inner.scale,
                    "layout": [
                        list(inner.layout.in_axes),
                        list(inner.layout.out_axes),
                        list(inner.layout.stack_axes),
                    ],
                    "dropout": inner.dropout,
                    "a": _spec(a),
                    "b": _spec(b),
                }
            )
            arrays += [a, b]
        elif isinstance(inner, Trainable):
            value = unbox(inner.value)
            entries.append({"path": path, "kind": "full", "value": _spec(value)})
            arrays.append(value)
    return arrays, entries


def _fresh_sibling(path: str, tag: str) -> str:
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{name}.{tag}-{uuid.uuid4().hex[:8]}")


def _write_atomically(path: str, overwrite: bool, fn_name: str, write) -> None:
    """`write(target)` into a fresh sibling directory, then swap it in by rename.

    orbax's own forced save deletes the old directory before writing the new one; here
    the old checkpoint stays complete until the new one is, so a save killed at any
    point leaves either the old or the new checkpoint at `path`.
    """
    path = os.path.abspath(os.fspath(path))
    exists = os.path.exists(path)
    if exists and not overwrite:
        raise FileExistsError(
            f"jlora.{fn_name}: {path} already exists; pass overwrite=True to replace it "
            "(written beside it, then swapped in), or choose another path."
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = _fresh_sibling(path, "staging")
    write(staging)
    if not exists:
        os.rename(staging, path)
        return
    retired = _fresh_sibling(path, "retired")
    os.rename(path, retired)
    os.rename(staging, path)
    shutil.rmtree(retired, ignore_errors=True)


def save_adapter(
    path, params: Any, config: LoraConfig | None = None, *, overwrite: bool = False
) -> str:
    """Saves only the adapters of `params` as an orbax checkpoint at `path`.

    Writes every trainable leaf (the factors and the `Trainable` leaves; the same set
    as `jlora.split`) plus JSON metadata: format, jlora version, `config` (if given) and
    per leaf its path, shapes, dtypes, scale, layout and dropout. The base kernels are
    not written. The caller's params are read, never changed or donated.

    Args:
      path: a directory that must not exist yet (unless `overwrite=True`).
      params: adapted params (from `jlora.init`, `combine`, `unmerge`).
      config: the `LoraConfig`, stored for reference.
      overwrite: replace an existing checkpoint. The new one is written beside it and
        swapped in by rename, so the old one survives a save killed midway.

    Returns:
      the absolute path written.

    Raises:
      FileExistsError: `path` exists and `overwrite` is False.
      ValueError: `params` hold no adapters.

    Example::

      jlora.save_adapter("/tmp/run/adapter", params, config)
      params = jlora.load_adapter("/tmp/run/adapter", base_params)
    """
    from jlora import __version__

    arrays, entries = _collect(params)
    if not entries:
        raise ValueError(
            "jlora.save_adapter: params hold no adapters (no LoraWeight or Trainable "
            "leaves); call jlora.init on the base params first."
        )
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "jlora_version": __version__,
        "config": _config_dict(config),
        "leaves": entries,
    }
    ocp = _ocp()
    # Host copies first: the write cannot race with a later donation of the params.
    host = {_key(i): np.asarray(x) for i, x in enumerate(arrays)}

    def write(target):
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(
                target,
                args=ocp.args.Composite(
                    **{ARRAYS: ocp.args.StandardSave(host), META: ocp.args.JsonSave(meta)}
                ),
            )

    path = os.path.abspath(os.fspath(path))
    _write_atomically(path, overwrite, "save_adapter", write)
    return path


def read_adapter_metadata(path) -> dict:
    """The JSON metadata of an adapter checkpoint (format, config, leaves).

    Raises:
      FileNotFoundError: no directory at `path`.
      ValueError: missing or corrupt metadata, or a checkpoint of another kind.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"jlora: no checkpoint directory at {path}.")
    meta_file = os.path.join(path, META, "metadata")
    if not os.path.exists(meta_file):
        raise ValueError(
            f"jlora: {path} is not a jlora adapter checkpoint (no '{META}' metadata item); "
            "it may be a plain orbax checkpoint (restore it with orbax) or a partial write."
        )
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"jlora: the metadata of {path} is corrupt ({e}).") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(
            f"jlora: {path} holds metadata of another kind (format "
            f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected "
            f"{FORMAT!r})."
        )
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"jlora: {path} was written by a newer jlora ({meta.get('jlora_version')}, "
            f"format {meta['format_version']}); upgrade jlora to read it."
        )
    if not isinstance(meta.get("leaves"), list):
        raise ValueError(f"jlora: the metadata of {path} is corrupt (no leaf list).")
    return meta


def load_adapter(path, base_params: Any, *, sharding: Any = None) -> Any:
    """Puts the adapters saved at `path` back onto `base_params`.

    Every stored leaf is checked against the base before anything is read (paths
    exist, factor shapes fit the kernel's shape and layout), and the arrays are restored
    against abstract targets built from those shapes, so the result has `LoraWeight`
    nodes with their scale and layout, or the call raises and nothing is half-loaded.

    Args:
      path: a directory written by `save_adapter`.
      base_params: the plain base params (e.g. freshly loaded) or `split`'s base.
      sharding: optional `jax.sharding.Sharding` to restore every adapter array into.
        By default each array is restored straight into the sharding its base leaf
        implies: `a` the kernel's input axes, `b` its output axes (see
        `jlora.adapter_specs`), a trained leaf its base leaf's.

    Returns:
      adapted params, as `combine(adapters, base_params)`.

    Raises:
      FileNotFoundError: no directory at `path`.
      ValueError: not a jlora adapter checkpoint, corrupt metadata, or adapters that
        don't fit `base_params` (every mismatch listed at once).
    """
    path = os.path.abspath(os.fspath(path))
    meta = read_adapter_metadata(path)
    base_leaves, treedef = flatten(base_params)
    by_path = dict(base_leaves)
    errors, targets, nodes = [], [], {}
    for entry in meta["leaves"]:
        p = entry.get("path")
        if p not in by_path:
            errors.append(f"  {p}: not in the base params")
            continue
        inner, _ = open_node(by_path[p])
        if isinstance(inner, (LoraWeight, Trainable)):
            errors.append(
                f"  {p}: the base already holds an adapter here; pass plain base params"
            )
            continue
        shape = tuple(np.shape(unbox(inner)))
        if entry["kind"] == "lora":
            layout = Layout(*entry["layout"])
            if layout.ndim != len(shape):
                errors.append(
                    f"  {p}: stored layout {layout} does not fit the base kernel "
                    f"{list(shape)}"
                )
                continue
            rank = entry["a"]["shape"][-1]
            want_a, want_b = layout.factor_shapes(shape, rank)
            got_a, got_b = tuple(entry["a"]["shape"]), tuple(entry["b"]["shape"])
            if (got_a, got_b) != (want_a, want_b):
                errors.append(
                    f"  {p}: base kernel {list(shape)} needs a {list(want_a)} and "
                    f"b {list(want_b)}; the checkpoint has {list(got_a)}, "
                    f"{list(got_b)}"
                )
                continue
            nodes[p] = (entry, len(targets))
            a_sh, b_sh = factor_shardings(unbox(inner), layout)
            targets += [(entry["a"], sharding or a_sh), (entry["b"], sharding or b_sh)]
        elif entry["kind"] == "full":
            if tuple(entry["value"]["shape"]) != shape:
                errors.append(
                    f"  {p}: base leaf {list(shape)}, checkpoint {entry['value']['shape']}"
                )
                continue
            nodes[p] = (entry, len(targets))
            targets.append((entry["value"], sharding or named_sharding_of(unbox(inner))))
        else:
            errors.append(f"  {p}: unknown leaf kind {entry.get('kind')!r}")
    if errors:
        raise ValueError(
            f"jlora.load_adapter: the adapters at {path} do not fit base_params:\n"
            + "\n".join(errors)
        )
    abstract = {
        _key(i): jax.ShapeDtypeStruct(tuple(t["shape"]), np.dtype(t["dtype"]), sharding=s)
        for i, (t, s) in enumerate(targets)
    }
    ocp = _ocp()
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(
            path, args=ocp.args.Composite(**{ARRAYS: ocp.args.StandardRestore(abstract)})
        )[ARRAYS]
    out = []
    for p, leaf in base_leaves:
        if p not in nodes:
            out.append(None)
            continue
        entry, i = nodes[p]
        _, put_back = open_node(leaf)
        if entry["kind"] == "lora":
            node = LoraWeight(
                None,
                restored[_key(i)],
                restored[_key(i + 1)],
                scale=entry["scale"],
                layout=Layout(*entry["layout"]),
                dropout=entry["dropout"],
            )
        else:
            node = Trainable(restored[_key(i)])
        out.append(put_back(node))
    return combine(jax.tree_util.tree_unflatten(treedef, out), base_params)


def save_merged(path, params: Any, *, overwrite: bool = False) -> str:
    """Saves `jlora.merge(params)` as a plain orbax params checkpoint for serving.

    The result is what the unmodified model takes; plain orbax restores it with no
    jlora import: `orbax.checkpoint.StandardCheckpointer().restore(path)`.

    Raises:
      FileExistsError: `path` exists and `overwrite` is False.
    """
    merged = jax.tree.map(np.asarray, merge(params))
    ocp = _ocp()

    def write(target):
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(target, merged)
            ckptr.wait_until_finished()

    path = os.path.abspath(os.fspath(path))
    _write_atomically(path, overwrite, "save_merged", write)
    return path


class CheckpointManager:
    """Training-loop checkpoints around orbax's `CheckpointManager`.

    Saves a state pytree (typically `(adapters, opt_state)`) plus a JSON dict of extras
    (the data position, metrics) every `save_every` steps, keeps the last `keep`, and
    writes asynchronously: `save` returns once the arrays are copied to the host, so
    the next step may donate them at once. Restore against a template of the same
    structure, e.g. `(adapters, jax.eval_shape(tx.init, adapters))`.

    Example (see examples/checkpointing.py)::

      ckpt = jlora.CheckpointManager("/tmp/run/ckpt", save_every=100, keep=3)
      ckpt.save(step, (adapters, opt_state), extra={"next_batch": i})
      step, (adapters, opt_state), extra = ckpt.restore((adapters, opt_state))
    """

    def __init__(
        self,
        directory,
        *,
        save_every: int = 1,
        keep: int | None = 3,
        async_save: bool = True,
    ):
        if not isinstance(save_every, int) or save_every <= 0:
            raise ValueError(
                f"jlora.CheckpointManager: save_every must be a positive int, got "
                f"{save_every!r}."
            )
        ocp = _ocp()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "extra")
        )

    def save(
        self, step: int, state: Any, *, extra: dict | None = None, force: bool = False
    ) -> bool:
        """Saves `state` at `step` if the interval says so (or `force`); True if saved."""
        ocp = _ocp()
        leaves = {_key(i): x for i, x in enumerate(jax.tree.leaves(state))}
        return self._manager.save(
            int(step),
            force=force,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(leaves), extra=ocp.args.JsonSave(extra or {})
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore(self, template: Any, step: int | None = None):
        """`(step, state, extra)` restored into `template`'s structure.

        Raises:
          FileNotFoundError: no checkpoint in the directory.
          ValueError: the checkpoint's leaves don't fit the template.
        """
        self._manager.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(
                f"jlora.CheckpointManager: no checkpoint in {self.directory}."
            )
        leaves, treedef = jax.tree.flatten(template)
        abstract = {
            _key(i): jax.ShapeDtypeStruct(
                np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)
            )
            for i, x in enumerate(leaves)
        }
        ocp = _ocp()
        try:
            got = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()
                ),
            )
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"jlora.CheckpointManager: step {step} in {self.directory} does not fit "
                f"the template ({len(leaves)} leaves): {e}"
            ) from e
        state = jax.tree.unflatten(
            treedef, [got["state"][_key(i)] for i in range(len(leaves))]
        )
        return step, state, dict(got["extra"] or {})

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
