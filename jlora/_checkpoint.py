"""Orbax checkpoints: adapters alone, merged params for serving, training-loop state.

An adapter checkpoint is one orbax checkpoint (a `CompositeCheckpointHandler`) with two
items: `adapters`, the factor and trained arrays, and `jlora`, JSON metadata (format,
jlora version, config, and per leaf: path, kind, shapes, dtypes, scale, layout, and a
fingerprint of the base kernel the factors were trained on, with the checksums of its
bfloat16 and float16 casts under `base_casts`, which readers without them ignore).
Restoring always goes against an abstract target built from the base params, so the
result has `LoraWeight` nodes with their scale and layout, never plain dicts.

Every save is written beside its target and swapped in by `_atomic.write_atomically`:
a save that dies at any step leaves the old or the new checkpoint complete, where loads
find it (`_atomic.readable`). On several processes each writes its own shards; process
0 does the renames, and a failure on any process is raised on every process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jlora import _atomic, _nnx, _nnx_state
from jlora._boxes import rebox, unbox
from jlora._config import LoraConfig
from jlora._merge import _norm_of as split_norm
from jlora._merge import merge, refuse_stacked
from jlora._quant import dequantize, is_quantized
from jlora._rebuild import (
    CAST,
    SAME,
    Base,
    Factors,
    Whole,
    base_report,
    cast_checksums,
    compare_base,
    fingerprint,
    rebuild,
)
from jlora._sharding import child_sharding, factor_shardings, named_sharding_of
from jlora._targets import EMPTY, LORA, TRAINED, path_string, walk
from jlora._version import VERSION
from jlora._weight import (
    EXTRA_CHILDREN,
    Layout,
    child_shape,
    extra_children,
    low_rank_product,
)

FORMAT = "jlora-adapter"
FORMAT_VERSION = 2  # 2: a fingerprint of each adapted base kernel
ARRAYS, META = "adapters", "jlora"
STATE_FORMAT = "jlora-train-state"
STATE_FORMAT_VERSION = 2  # 2: leaves stored under their paths (1: by position)
BASE_MISMATCH = ("warn", "error", "ignore")


def _key(i: int) -> str:
    return f"leaf_{i:05d}"


def _spec(x) -> dict:
    return {"shape": list(np.shape(x)), "dtype": str(np.dtype(x.dtype))}


# Metadata -------------------------------------------------------------------------------


def _pattern_json(p):
    """A regex as JSON: its string, with flags only where they are not the default."""
    if isinstance(p, re.Pattern):
        flags = p.flags & ~re.UNICODE
        return p.pattern if not flags else {"regex": p.pattern, "flags": flags}
    return p


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
            value = {
                (k.pattern if isinstance(k, re.Pattern) else k): (
                    list(v) if isinstance(v, Layout) else v
                )
                for k, v in value.items()
            }
        elif field.name == "dtype" and value is not None:
            value = str(np.dtype(value))
        elif isinstance(value, (tuple, list)):
            value = [_pattern_json(v) for v in value]
        else:
            value = _pattern_json(value)
        out[field.name] = value
    return out


def _collect(params):
    """Adapter arrays in tree order and their metadata entries."""
    arrays, entries = [], []
    for node in walk(params).nodes:
        path, inner = node.path, node.value
        if node.kind == LORA:
            a, b = unbox(inner.a), unbox(inner.b)
            w = unbox(inner.w)
            entries.append(
                {
                    "path": path,
                    "kind": "lora",
                    "scale": inner.scale,
                    "layout": [
                        list(inner.layout.in_axes),
                        list(inner.layout.out_axes),
                        list(inner.layout.stack_axes),
                        # (a fourth entry only for fused parts: [axis, parts, adapt])
                        *([list(inner.layout.fused)] if inner.layout.fused else []),
                    ],
                    "dropout": inner.dropout,
                    "a": _spec(a),
                    "b": _spec(b),
                    "base": None if w is None else fingerprint(w),
                    "base_casts": None if w is None else cast_checksums(w),
                }
            )
            arrays += [a, b]
            # The other adapter children (DoRA's m and norm), as split gives them.
            view = inner.replace(norm=split_norm(inner)) if w is not None else inner
            for name, value in extra_children(view).items():
                entries[-1][name] = _spec(unbox(value))
                arrays.append(unbox(value))
        elif node.kind == TRAINED:
            value = unbox(inner.value)
            entries.append({"path": path, "kind": "full", "value": _spec(value)})
            arrays.append(value)
    return arrays, entries


def save_adapter(
    path, params: Any, config: LoraConfig | None = None, *, overwrite: bool = False
) -> str:
    """Saves only the adapters of `params` as an orbax checkpoint at `path`.

    Writes every trainable leaf (the factors and the `Trainable` leaves; the same set
    as `jlora.split`) plus JSON metadata: format, jlora version, `config` (if given) and
    per leaf its path, shapes, dtypes, scale, layout, dropout, and a fingerprint of the
    base kernel (shape, dtype, checksums of its bits) that `load_adapter` compares with
    the base it loads onto. The base kernels are not written. Sharded arrays are
    written shard by shard, by every process that holds some. The caller's params are
    read, never changed or donated.

    Args:
      path: a directory that must not exist yet (unless `overwrite=True`).
      params: adapted params (from `jlora.init`, `combine`, `unmerge`); adapters alone
        (`split`'s first output) also work, without the base fingerprint; or an NNX
        model adapted by `jlora.nnx.apply` (its `nnx.state(model, nnx.Param)` paths).
      config: the `LoraConfig`, stored for reference.
      overwrite: replace an existing checkpoint. The new one is written beside it and
        swapped in by renames; a save that dies at any point leaves the old or the new
        checkpoint complete for the next load.

    Returns:
      the absolute path written.

    Raises:
      FileExistsError: `path` exists and `overwrite` is False.
      ValueError: `params` hold no adapters.

    Example::

      jlora.save_adapter("/tmp/run/adapter", params, config)
      params = jlora.load_adapter("/tmp/run/adapter", base_params)
    """
    params = _nnx_state.as_params(params, "jlora.save_adapter")
    refuse_stacked(params, "jlora.save_adapter")
    path = os.path.abspath(os.fspath(path))
    _atomic.prepare(path, overwrite, "save_adapter")  # refused before anything is read
    arrays, entries = _collect(params)
    if not entries:
        raise ValueError(
            "jlora.save_adapter: params hold no adapters (no LoraWeight or Trainable "
            "leaves); call jlora.init on the base params first."
        )
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "jlora_version": VERSION,
        "config": _config_dict(config),
        "leaves": entries,
    }
    json.dumps(meta)  # fail before anything is written
    # A synchronous save: it has written every array when it returns, so the caller
    # may donate them at once.
    tree = {_key(i): x for i, x in enumerate(arrays)}

    def write(target):
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(
                target,
                args=ocp.args.Composite(
                    **{ARRAYS: ocp.args.StandardSave(tree), META: ocp.args.JsonSave(meta)}
                ),
            )

    _atomic.write_atomically(path, overwrite, "save_adapter", write)
    return path


def read_adapter_metadata(path) -> dict:
    """The JSON metadata of an adapter checkpoint (format, config, leaves).

    Raises:
      FileNotFoundError: no directory at `path`.
      ValueError: missing or corrupt metadata, or a checkpoint of another kind.
    """
    path = _atomic.readable(os.path.abspath(os.fspath(path)))
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


def load_adapter(
    path, base_params: Any, *, sharding: Any = None, base_mismatch: str = "warn"
) -> Any:
    """Puts the adapters saved at `path` back onto `base_params`.

    Every stored leaf is checked against the base before anything is read (paths
    exist, factor shapes fit the kernel's shape and layout), and the arrays are restored
    against abstract targets built from those shapes, so the result has `LoraWeight`
    nodes with their scale and layout, or the call raises and nothing is half-loaded.
    Each base kernel is also compared with the fingerprint of the kernel the adapters
    were trained on (shape, dtype, checksums of its bits): adapters trained on another
    base of the same shapes are caught. A base in another dtype is compared in the
    narrower one: the bfloat16 (or float16) cast of the float32 kernel the adapters were
    trained on loads without a word (the checkpoint records the checksums of those
    casts), a widened one is cast back; a dtype change that leaves nothing to compare
    with (another dtype, an older checkpoint) is reported as such.

    Args:
      path: a directory written by `save_adapter`.
      base_params: the plain base params (e.g. freshly loaded) or `split`'s base (which
        holds None where the trained leaves go: they are restored as stored); or an
        NNX model, into which the adapters are loaded in place (replacing any it
        holds; it then runs factored as after `jlora.nnx.apply`, with LoRA dropout
        masks drawn from a stream seeded 0 unless it had one).
      sharding: optional `jax.sharding.Sharding` to restore every adapter array into.
        By default each array is restored straight into the sharding its base leaf
        implies: `a` the kernel's input axes, `b` its output axes (see
        `jlora.adapter_specs`), a trained leaf its base leaf's.
      base_mismatch: what a kernel that differs from the recorded fingerprint (or
        whose dtype change can't be checked) does: `"warn"` (default; one warning
        listing every such path), `"error"` (raise), or `"ignore"`.

    Returns:
      adapted params, as `combine(adapters, base_params)`; for an NNX model, the model.

    Raises:
      FileNotFoundError: no directory at `path`.
      ValueError: not a jlora adapter checkpoint, corrupt metadata, adapters that don't
        fit `base_params` (every mismatch listed at once), base params that already
        hold adapters, or a different base with `base_mismatch="error"`.
    """
    if base_mismatch not in BASE_MISMATCH:
        raise ValueError(
            f"jlora.load_adapter: base_mismatch must be one of {BASE_MISMATCH}, got "
            f"{base_mismatch!r}."
        )
    if isinstance(base_params, nnx.Module):  # an NNX model: loaded into it, in place
        return _nnx.load_onto(
            base_params,
            lambda base: load_adapter(
                path, base, sharding=sharding, base_mismatch=base_mismatch
            ),
            "jlora.load_adapter",
        )
    path = _atomic.readable(os.path.abspath(os.fspath(path)))
    meta = read_adapter_metadata(path)
    base = Base(base_params, "load_adapter")
    entries = _fit(meta["leaves"], base, path)
    restored = _restore(path, entries, base, sharding)
    base = _onto_residuals(base, entries, restored)
    if base_mismatch != "ignore":
        _check_bases(entries, base, path, base_mismatch)
    return rebuild(base, restored, "load_adapter", sharding)


def _onto_residuals(base: Base, entries: list, restored: dict) -> Base:
    """The base with each kernel that a PiSSA/OLoRA adapter started from replaced by
    the residual it trained on, `W - scale * a0 @ b0`, where `base` holds the original
    kernel: the residual computed here has the recorded bits. Kernels that are the
    residual already, or neither, stay as they are (the fingerprint check reports the
    latter)."""
    changed = {}
    for entry in entries:
        recorded = entry.get("base") if entry["kind"] == "lora" else None
        got = restored.get(entry["path"])
        if not recorded or got is None or "a0" not in (got.extra or {}):
            continue
        node = base.nodes[entry["path"]]
        w = unbox(node.value)
        if is_quantized(w) or compare_base(recorded, entry.get("base_casts"), w) in (
            SAME,
            CAST,
        ):
            continue
        layout = got.layout
        delta = low_rank_product(got.extra["a0"], got.extra["b0"], layout, got.scale)
        residual = (jnp.asarray(w).astype(jnp.float32) - delta).astype(w.dtype)
        if compare_base(recorded, entry.get("base_casts"), residual) == SAME:
            changed[entry["path"]] = node.put_back(rebox(node.value, residual))
    if not changed:
        return base
    leaves = [changed.get(n.path, n.leaf) for n in base.walk.nodes]
    return Base(base.walk.rebuild(leaves), "load_adapter")


def _fit(leaves: list, base: Base, path: str) -> list[dict]:
    """The checkpoint's leaf entries, each checked against the base (its path there,
    the factor shapes its kernel's shape and layout need), or a ValueError listing
    every misfit."""
    errors, entries = [], []
    for entry in leaves:
        p, kind = entry.get("path"), entry.get("kind")
        node = base.nodes.get(p)
        if node is None:
            errors.append(f"  {p}: not in the base params")
        elif kind == "full":
            shape = tuple(np.shape(unbox(node.value)))
            if node.kind != EMPTY and tuple(entry["value"]["shape"]) != shape:
                errors.append(
                    f"  {p}: base leaf {list(shape)}, checkpoint {entry['value']['shape']}"
                )
            else:  # (over split()'s base, None here: restored as stored)
                entries.append(entry)
        elif kind == "lora":
            if node.kind == EMPTY:
                errors.append(f"  {p}: the base has no kernel here (None)")
                continue
            shape = tuple(np.shape(unbox(node.value)))
            layout = Layout(*entry["layout"])
            if layout.ndim != len(shape):
                errors.append(
                    f"  {p}: stored layout {layout} does not fit the base kernel "
                    f"{list(shape)}"
                )
                continue
            want = layout.factor_shapes(shape, entry["a"]["shape"][-1])
            got = tuple(entry["a"]["shape"]), tuple(entry["b"]["shape"])
            if got != want:
                errors.append(
                    f"  {p}: base kernel {list(shape)} needs a {list(want[0])} and "
                    f"b {list(want[1])}; the checkpoint has {list(got[0])}, "
                    f"{list(got[1])}"
                )
                continue
            rank = entry["a"]["shape"][-1]
            bad = [
                f"{c.name} {entry[c.name]['shape']} (needs {want})"
                for c in EXTRA_CHILDREN
                if c.name in entry
                and list(entry[c.name]["shape"])
                != (want := child_shape(layout, shape, c.axes, rank))
            ]
            if bad:
                errors.append(
                    f"  {p}: base kernel {list(shape)} does not fit the checkpoint's "
                    + ", ".join(bad)
                )
                continue
            entries.append(entry)
        else:
            errors.append(f"  {p}: unknown leaf kind {kind!r}")
    if errors:
        raise ValueError(
            f"jlora.load_adapter: the adapters at {path} do not fit base_params:\n"
            + "\n".join(errors)
        )
    return entries


def _check_bases(entries: list, base: Base, path: str, base_mismatch: str) -> None:
    """Each adapted base kernel against the fingerprint of the one the adapters were
    trained on (`compare_base`); a warning or error lists those that differ."""
    verdicts = {}
    for entry in entries:
        recorded = entry.get("base") if entry["kind"] == "lora" else None
        if recorded:
            w = unbox(base.nodes[entry["path"]].value)
            verdict = compare_base(recorded, entry.get("base_casts"), w)
            verdicts[entry["path"]] = (verdict, recorded["dtype"], str(np.dtype(w.dtype)))
    paths, report = base_report(verdicts)
    if not paths:
        return
    msg = (
        f"jlora.load_adapter: the adapters at {path} {report}; check that base_params "
        "are the model they were trained on."
    )
    started = [e["path"] for e in entries if e["kind"] == "lora" and "a0" in e]
    if set(started) & set(paths):
        msg += (
            " These adapters started from their kernels (PiSSA/OLoRA), so they trained "
            "on the kernels less that start: load them onto that residual base "
            "(jlora.split(params)[1] of the run), or, for the original base, save "
            "jlora.plain_lora(params) instead (the same model as plain LoRA)."
        )
    if base_mismatch == "error":
        raise ValueError(msg)
    warnings.warn(
        msg + " (base_mismatch='error' refuses, 'ignore' silences this)", stacklevel=3
    )


def _restore(path: str, entries: list, base: Base, sharding) -> dict:
    """The arrays of `entries`, read straight into the shardings their base leaves
    imply (or `sharding`), as `{path: Factors | Whole}`."""
    targets = []
    for entry in entries:
        leaf = unbox(base.nodes[entry["path"]].value)
        if entry["kind"] == "lora":
            a_sh, b_sh = factor_shardings(leaf, Layout(*entry["layout"]))
            targets += [(entry["a"], sharding or a_sh), (entry["b"], sharding or b_sh)]
            for c in EXTRA_CHILDREN:
                if c.name in entry:
                    sh = sharding or child_sharding(leaf, Layout(*entry["layout"]), c.axes)
                    targets.append((entry[c.name], sh))
        else:
            sh = None if leaf is None else named_sharding_of(leaf)
            targets.append((entry["value"], sharding or sh))
    abstract = {
        _key(i): jax.ShapeDtypeStruct(tuple(t["shape"]), np.dtype(t["dtype"]), sharding=s)
        for i, (t, s) in enumerate(targets)
    }
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        arrays = ckptr.restore(
            path, args=ocp.args.Composite(**{ARRAYS: ocp.args.StandardRestore(abstract)})
        )[ARRAYS]
    found, i = {}, 0
    for entry in entries:
        if entry["kind"] == "lora":
            a, b = arrays[_key(i)], arrays[_key(i + 1)]
            i += 2
            extra = {}
            for c in EXTRA_CHILDREN:
                if c.name in entry:
                    extra[c.name] = arrays[_key(i)]
                    i += 1
            layout = Layout(*entry["layout"])
            found[entry["path"]] = Factors(
                a, b, entry["scale"], layout, entry["dropout"], extra
            )
        else:
            found[entry["path"]] = Whole(arrays[_key(i)])
            i += 1
    return found


def save_merged(path, params: Any, *, overwrite: bool = False) -> str:
    """Saves `jlora.merge(params)` as a plain orbax params checkpoint for serving.

    The result is what the unmodified model takes; plain orbax restores it with no
    jlora import: `orbax.checkpoint.StandardCheckpointer().restore(path)`. Kernels are
    merged one compiled computation at a time, on the devices that hold them, and
    written shard by shard: no process ever holds the whole merged model. An existing
    `path` is refused before anything is merged.

    Args:
      path: the directory to write (must not exist unless `overwrite=True`).
      params: adapted params, or an NNX model adapted by `jlora.nnx.apply`.
      overwrite: replace an existing checkpoint (written beside it, then swapped in).

    Returns:
      the absolute path written.

    Raises:
      FileExistsError: `path` exists and `overwrite` is False.
    """
    params = _nnx_state.as_params(params, "jlora.save_merged")
    params = dequantize(params)  # (a quantized base is written in float)
    path = os.path.abspath(os.fspath(path))
    _atomic.prepare(path, overwrite, "save_merged")  # refused before anything is merged
    merged = merge(params)

    def write(target):
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(target, merged)
            ckptr.wait_until_finished()

    _atomic.write_atomically(path, overwrite, "save_merged", write)
    return path


# Training-loop checkpoints --------------------------------------------------------------


def _parts(node) -> list[str]:
    return [path_string((k,)) for k in node.keys] or ["_"]


def _nested(tree) -> dict:
    """`tree`'s leaves in nested dicts keyed by the parts of their paths, so that orbax
    stores (and restores) every leaf under its path, not its position."""
    out: dict = {}
    for node in walk(tree, arrays=True).nodes:
        parts = _parts(node)
        at = out
        for part in parts[:-1]:
            at = at.setdefault(part, {})
        at[parts[-1]] = node.leaf
    return out


def _leaf_specs(tree) -> dict[str, tuple]:
    return {
        "/".join(_parts(n)): (tuple(np.shape(n.leaf)), str(np.dtype(n.leaf.dtype)))
        for n in walk(tree, arrays=True).nodes
    }


def _nested_specs(meta, prefix="") -> dict[str, tuple]:
    """`{path: (shape, dtype)}` from orbax's item metadata of a nested dict."""
    out = {}
    for k, v in meta.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_nested_specs(v, path))
        else:
            out[path] = (tuple(v.shape), str(np.dtype(v.dtype)))
    return out


_CONVERT_V1 = (
    "It was written by jlora 0.1, which stored the leaves by position ('leaf_00000', "
    "...), so nothing can check that they go where they belong. To convert it, restore "
    "it with orbax into the exact template it was saved from and save it again:\n"
    "  import orbax.checkpoint as ocp\n"
    "  old = ocp.CheckpointManager(directory, item_handlers={\n"
    "      'state': ocp.StandardCheckpointHandler(),\n"
    "      'extra': ocp.JsonCheckpointHandler()})\n"
    "  got = old.restore(step)\n"
    "  leaves = [got['state'][f'leaf_{i:05d}'] for i in range(len(got['state']))]\n"
    "  state = jax.tree.unflatten(jax.tree.structure(template), leaves)\n"
    "  with jlora.CheckpointManager(new_directory) as new:\n"
    "      new.save(step, state, extra=dict(got['extra']), force=True)"
)


def _step(step) -> int:
    """`step` as a Python int, or a TypeError/ValueError naming it."""
    value = step
    if isinstance(value, jax.Array) and value.ndim == 0:
        value = value.item() if jnp.issubdtype(value.dtype, jnp.integer) else value
    elif isinstance(value, np.integer) or (
        isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu"
    ):
        value = value.item()
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(
            f"jlora.CheckpointManager.save: step must be an integer (int, a NumPy "
            f"integer or a 0-d integer array), got {type(step).__name__} {step!r}."
        )
    if value < 0:
        raise ValueError(f"jlora.CheckpointManager.save: step must be >= 0, got {value}.")
    return value


def _json_value(x, where: str):
    """`x` as JSON holds it: NumPy and JAX scalars become Python numbers; containers
    are converted item by item; anything else is a TypeError naming `where`."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (np.generic, np.ndarray, jax.Array)):
        if np.ndim(x) != 0:
            raise TypeError(
                f"jlora.CheckpointManager.save: extra{where} is an array of shape "
                f"{list(np.shape(x))}; extra holds JSON values only: save arrays in the "
                "state, or pass .tolist()."
            )
        value = np.asarray(x).item()
        if isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(
            f"jlora.CheckpointManager.save: extra{where} is a {np.asarray(x).dtype} "
            "scalar, which JSON cannot hold; pass an int, float, bool or str."
        )
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"jlora.CheckpointManager.save: extra{where} has the key {k!r} "
                    f"({type(k).__name__}); JSON keys are strings (it would come back "
                    f"as {str(k)!r}): use str keys."
                )
            out[k] = _json_value(v, f"{where}[{k!r}]")
        return out
    if isinstance(x, (list, tuple)):
        return [_json_value(v, f"{where}[{i}]") for i, v in enumerate(x)]
    raise TypeError(
        f"jlora.CheckpointManager.save: extra{where} is a {type(x).__name__} "
        f"({x!r:.80}), which JSON cannot hold; pass numbers, strings, bools, None, "
        "lists or dicts."
    )


def _json_extra(extra) -> dict:
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise TypeError(
            f"jlora.CheckpointManager.save: extra must be a dict or None, got "
            f"{type(extra).__name__}."
        )
    out = _json_value(extra, "")
    json.dumps(out)  # what the background write will do, done now
    return out


class CheckpointManager:
    """Training-loop checkpoints around orbax's `CheckpointManager`.

    Saves a state pytree (typically `(adapters, opt_state)`) plus a JSON dict of extras
    (the data position, metrics) every `save_every` steps, keeps the last `keep`, and
    writes asynchronously: `save` returns once the arrays are copied to the host, so
    the next step may donate them at once. Every leaf is stored under its path in the
    tree; `restore` checks the template's paths, shapes and dtypes against the
    checkpoint's and lists every difference before reading anything. On several
    processes, every process calls `save` and `restore` and writes or reads its own
    shards.

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
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "extra": ocp.JsonCheckpointHandler(),
                META: ocp.JsonCheckpointHandler(),
            },
        )

    def save(
        self, step: int, state: Any, *, extra: dict | None = None, force: bool = False
    ) -> bool:
        """Saves `state` at `step` if the interval says so (or `force`).

        `step` and `extra` are checked here, before anything is written (the write
        itself runs in the background): a save that returns True is on disk once
        `wait()` returns.

        Args:
          step: the step number, a non-negative integer (Python, NumPy or a 0-d JAX
            integer array).
          state: the pytree to save (typically `(adapters, opt_state)`).
          extra: a JSON dict saved beside the state (data position, metrics). NumPy and
            JAX scalars are stored as the Python numbers they hold.
          force: save even if `step` is not on the `save_every` interval.

        Returns:
          whether the step was saved.

        Raises:
          TypeError: a `step` that is not an integer, or an `extra` that JSON cannot
            hold (the key named).
          ValueError: a negative `step`.
        """
        step = _step(step)
        extra = _json_extra(extra)
        meta = {
            "format": STATE_FORMAT,
            "format_version": STATE_FORMAT_VERSION,
            "jlora_version": VERSION,
        }
        return self._manager.save(
            step,
            force=force,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_nested(state)),
                extra=ocp.args.JsonSave(extra),
                **{META: ocp.args.JsonSave(meta)},
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def _check(self, step: int, template) -> None:
        """Every difference between the template and the checkpoint, raised at once."""
        step_dir = os.path.join(self.directory, str(step))
        meta_file = os.path.join(step_dir, META, "metadata")
        if not os.path.exists(meta_file):
            raise ValueError(
                f"jlora.CheckpointManager: step {step} in {self.directory} is in an "
                f"older format. {_CONVERT_V1}"
            )
        with open(meta_file) as f:
            meta = json.load(f)
        if meta.get("format_version", 0) > STATE_FORMAT_VERSION:
            raise ValueError(
                f"jlora.CheckpointManager: step {step} in {self.directory} was written "
                f"by a newer jlora ({meta.get('jlora_version')}); upgrade jlora."
            )
        stored = _nested_specs(self._manager.item_metadata(step)["state"])
        want = _leaf_specs(template)
        lines = [
            f"  {p}: in the template, not in the checkpoint"
            for p in want
            if p not in stored
        ]
        lines += [
            f"  {p}: in the checkpoint, not in the template"
            for p in stored
            if p not in want
        ]
        for p in want:
            if p in stored and stored[p] != want[p]:
                (ws, wd), (gs, gd) = want[p], stored[p]
                lines.append(
                    f"  {p}: the template has {wd}{list(ws)}, the checkpoint {gd}{list(gs)}"
                )
        if lines:
            raise ValueError(
                f"jlora.CheckpointManager: step {step} in {self.directory} does not fit "
                "the template (restore into the structure it was saved from):\n"
                + "\n".join(lines)
            )

    def restore(self, template: Any, step: int | None = None):
        """`(step, state, extra)` restored into `template`'s structure.

        Each leaf is read from the checkpoint under its path in `template`, into the
        template leaf's sharding (if it has one). Paths, shapes and dtypes must all
        match; nothing is cast.

        Raises:
          FileNotFoundError: no checkpoint in the directory.
          ValueError: the checkpoint's leaves don't fit the template (every difference
            listed), or it was written in an older format (the message says how to
            convert it).
        """
        self._manager.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(
                f"jlora.CheckpointManager: no checkpoint in {self.directory}."
            )
        self._check(step, template)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)
            ),
            template,
        )
        got = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_nested(abstract)),
                extra=ocp.args.JsonRestore(),
            ),
        )
        tree = walk(template, arrays=True)
        values = []
        for node in tree.nodes:
            at = got["state"]
            for part in _parts(node):
                at = at[part]
            values.append(at)
        return step, tree.rebuild(values), dict(got["extra"] or {})

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
