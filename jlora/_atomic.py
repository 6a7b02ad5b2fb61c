"""Crash-safe directory writes: staging, a journaled swap, and recovery.

Every jlora save (orbax adapter and merged checkpoints, PEFT directories) writes its
directory into a staging sibling and moves it into place by renames. The steps, for a
target `NAME` in `PARENT`:

1. `PARENT/.NAME.staging-TOKEN` is written whole (on several processes, each writes
   its shards into it).
2. No checkpoint at `NAME` yet: the staging directory is renamed to `NAME`. Done.
3. Otherwise a journal, `PARENT/.NAME.swap`, is written, naming the staging directory
   and the `.NAME.retired-TOKEN` the old checkpoint is about to become. Then `NAME`
   moves to the retired name, the staging directory to `NAME`, the journal is removed,
   and last the retired copy.

The journal is the only proof that a swap was under way. With the journal, no
checkpoint at `NAME`, and both directories it names present, a save died between its
two renames: the staging directory is the new checkpoint, complete (the journal is
written only after it), and is what loads read and what the next save moves into place.
In every other state a staging or retired sibling is garbage: never read, and removed by
the next save to `NAME` (so a checkpoint the user deletes stays deleted, even if an
earlier removal of a retired copy failed). Readers never rename or delete, so a load
running beside a save cannot disturb it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import uuid

import jax
import numpy as np
from jax.experimental import multihost_utils

STAGING, RETIRED = "staging", "retired"


# Several processes ----------------------------------------------------------------------


def primary() -> bool:
    """Whether this is process 0 (the one that renames)."""
    return jax.process_index() == 0


def all_ok(ok: bool) -> bool:
    """Whether `ok` holds on every process (one collective; also a barrier)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def on_primary(step: str, fn) -> None:
    """`fn()` on process 0; then every process learns whether it worked, so a failure
    there raises on every process instead of leaving the others waiting."""
    error = None
    if primary():
        try:
            fn()
        except Exception as e:  # re-raised below, after the others have heard
            error = e
    ok = all_ok(error is None)
    if error is not None:
        raise error
    if not ok:
        raise RuntimeError(f"jlora: process 0 failed to {step}; see its error.")


def _agreed_token() -> str:
    """A fresh name that every process agrees on (process 0's)."""
    token = np.frombuffer(uuid.uuid4().bytes, np.uint8)
    if jax.process_count() > 1:
        token = np.asarray(multihost_utils.broadcast_one_to_all(token))
    return bytes(token.astype(np.uint8)).hex()[:12]


# The filesystem steps -------------------------------------------------------------------


def _write_journal(file: str, text: str) -> None:
    with open(file, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class FS:
    """The filesystem steps of a save, in one place (tests fail each in turn)."""

    rename = staticmethod(os.rename)
    rmtree = staticmethod(shutil.rmtree)
    makedirs = staticmethod(os.makedirs)
    write_journal = staticmethod(_write_journal)
    remove = staticmethod(os.remove)


def _sibling(path: str, kind: str, token: str) -> str:
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{name}.{kind}-{token}")


def _siblings(path: str, kind: str) -> list[str]:
    """Existing siblings of `kind` (and orbax's own temporaries under them)."""
    parent, name = os.path.split(path)
    return sorted(
        glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.{kind}-*"))
    )


def _journal_file(path: str) -> str:
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{name}.swap")


def _journal(path: str) -> tuple[str, str] | None:
    """`(staging, retired)` named by the journal of a swap at `path`, or None: no
    journal, or one that is unreadable or names anything but this path's own siblings
    (a journal dies half-written only before its swap begins)."""
    try:
        with open(_journal_file(path)) as f:
            got = json.load(f)
        staging, retired = got[STAGING], got[RETIRED]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    name = re.escape(os.path.basename(path))
    for kind, value in ((STAGING, staging), (RETIRED, retired)):
        if not isinstance(value, str) or not re.fullmatch(rf"\.{name}\.{kind}-\w+", value):
            return None
    parent = os.path.dirname(path)
    return os.path.join(parent, staging), os.path.join(parent, retired)


def _interrupted(path: str) -> str | None:
    """The new, complete checkpoint of a swap that died between its renames (its
    staging directory), or None when the disk proves no such swap."""
    named = _journal(path)
    if named is None or os.path.exists(path):
        return None
    staging, retired = named
    return staging if os.path.isdir(staging) and os.path.isdir(retired) else None


def readable(path: str) -> str:
    """Where the directory saved at `path` is, without changing anything on disk: at
    `path`, or, while a swap that died between its renames is proven by its journal, in
    that swap's staging directory. Otherwise `path` (which may not exist)."""
    return _interrupted(path) or path


def recover(path: str) -> None:
    """Finishes a swap that died between its renames, then removes every leftover of
    earlier saves: staging and retired siblings and the journal (a save does this
    first)."""
    staging = _interrupted(path)
    if staging is not None:
        FS.rename(staging, path)
    if os.path.exists(_journal_file(path)):
        FS.remove(_journal_file(path))
    for stale in _siblings(path, STAGING) + _siblings(path, RETIRED):
        FS.rmtree(stale, ignore_errors=True)


def prepare(path: str, overwrite: bool, fn_name: str) -> bool:
    """Makes `path`'s parent, recovers from earlier saves, and refuses an existing
    `path` unless `overwrite`: the checks a save runs before it computes anything.

    Returns:
      whether a directory exists at `path`.

    Raises:
      FileExistsError: `path` exists and `overwrite` is False.
    """

    def run():
        FS.makedirs(os.path.dirname(path), exist_ok=True)
        recover(path)

    on_primary("prepare the save", run)
    exists = os.path.exists(path)
    if exists and not overwrite:
        raise FileExistsError(
            f"jlora.{fn_name}: {path} already exists; pass overwrite=True to replace it "
            "(written beside it, then swapped in), or choose another path."
        )
    return exists


def write_atomically(path: str, overwrite: bool, fn_name: str, write) -> None:
    """`write(staging)` into a fresh sibling directory, then swapped in at `path`.

    orbax's own forced save deletes the old directory before writing the new one; here
    the old directory stays complete until the new one is. A save that dies at any step
    leaves the old or the new directory complete where `readable` finds it. A save that
    fails with an error removes its staging directory and, if it failed in the middle of
    the swap, puts the old directory back. On several processes, every process writes
    its shards; process 0 renames, and every process hears of a failure.

    Raises:
      FileExistsError: `path` exists and `overwrite` is False.
    """
    exists = prepare(path, overwrite, fn_name)
    token = _agreed_token()
    staging = _sibling(path, STAGING, token)

    def clean():
        shutil.rmtree(staging, ignore_errors=True)
        for tmp in glob.glob(glob.escape(staging) + "*"):  # orbax's temporaries
            shutil.rmtree(tmp, ignore_errors=True)

    error = None
    try:
        write(staging)
    except Exception as e:  # re-raised below, after every process has heard
        error = e
    if not all_ok(error is None):
        if primary():
            clean()
        if error is not None:
            raise error
        raise RuntimeError(f"jlora.{fn_name}: another process failed to write {path}.")

    def swap():
        if not exists:
            try:
                FS.rename(staging, path)
            except Exception:
                clean()
                raise
            return
        retired = _sibling(path, RETIRED, token)
        journal = _journal_file(path)
        text = json.dumps(
            {STAGING: os.path.basename(staging), RETIRED: os.path.basename(retired)}
        )
        try:
            FS.write_journal(journal, text)
            FS.rename(path, retired)
        except Exception:
            if os.path.exists(journal):
                os.remove(journal)
            clean()
            raise
        try:
            FS.rename(staging, path)
        except Exception:
            if not os.path.exists(path):  # roll back: the old one goes back in place
                os.rename(retired, path)
            os.remove(journal)
            clean()
            raise
        FS.remove(journal)  # from here on, the retired copy is garbage
        FS.rmtree(retired, ignore_errors=True)

    on_primary(f"swap in {path}", swap)
