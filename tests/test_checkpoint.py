"""Orbax checkpoints: adapter save/load, faults, merged export, training-loop resume."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import perturb
from jax.sharding import PartitionSpec as P

import jlora

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.DenseGeneral((2, 8), name="proj")(x))
        return nn.Dense(4, name="head")(h.reshape(*h.shape[:-2], 16))


CFG = jlora.LoraConfig(
    2,
    4,
    train_bias="lora_only",
    also_train="head/bias",
    layout={"proj": jlora.Layout((0,), (1, 2))},
)


@pytest.fixture
def model():
    m = Net()
    x = jax.random.normal(jax.random.key(0), (3, 6))
    base = m.init(jax.random.key(1), x)["params"]
    lp = perturb(jlora.init(jax.random.key(2), base, CFG), jax.random.key(3))
    return m, x, base, lp


def _env():
    return {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def test_save_load_round_trip_is_exact(model, tmp_path):
    m, x, base, lp = model
    before = [np.array(v) for v in jax.tree.leaves(lp)]
    path = jlora.save_adapter(tmp_path / "ad", lp, CFG)
    for a, b in zip(jax.tree.leaves(lp), before):  # the caller's params are untouched
        np.testing.assert_array_equal(a, b)
    back = jlora.load_adapter(path, base)
    assert jax.tree.structure(back) == jax.tree.structure(lp)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lp)):
        np.testing.assert_array_equal(a, b)
    assert back["proj"]["kernel"].layout == lp["proj"]["kernel"].layout
    assert back["proj"]["kernel"].scale == lp["proj"]["kernel"].scale
    apply = jlora.lora(m.apply)
    np.testing.assert_array_equal(apply({"params": back}, x), apply({"params": lp}, x))
    meta = jlora.read_adapter_metadata(path)
    assert meta["config"]["rank"] == 2 and meta["config"]["layout"]["proj"] == [
        [0],
        [1, 2],
        [],
    ]
    assert {e["path"] for e in meta["leaves"]} == {
        "proj/kernel",
        "proj/bias",
        "head/kernel",
        "head/bias",
    }


def test_adapter_checkpoint_holds_only_adapters(model, tmp_path):
    _, _, base, lp = model
    path = jlora.save_adapter(tmp_path / "ad", lp, CFG)
    adapters, _ = jlora.split(lp)
    stored = sum(
        np.prod(e[k]["shape"])
        for e in jlora.read_adapter_metadata(path)["leaves"]
        for k in ("a", "b", "value")
        if k in e
    )
    assert stored == sum(x.size for x in jax.tree.leaves(adapters))
    assert stored < sum(x.size for x in jax.tree.leaves(base))


def test_load_onto_wrong_base_lists_every_mismatch(model, tmp_path):
    _, _, base, lp = model
    path = jlora.save_adapter(tmp_path / "ad", lp, CFG)
    wrong = jax.tree.map(lambda v: v, base)
    wrong["proj"]["kernel"] = jnp.zeros((7, 2, 8))
    del wrong["head"]["bias"]
    with pytest.raises(ValueError) as err:
        jlora.load_adapter(path, wrong)
    msg = str(err.value)
    assert "proj/kernel: base kernel [7, 2, 8] needs a [7, 2]" in msg
    assert "head/bias: not in the base params" in msg
    adapted = jlora.init(jax.random.key(0), base, CFG)
    with pytest.raises(ValueError, match=r"already hold adapters at \['head/bias',"):
        jlora.load_adapter(path, adapted)


def test_bad_paths_and_other_checkpoints_give_clear_errors(model, tmp_path):
    _, _, base, lp = model
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        jlora.load_adapter(tmp_path / "missing", base)
    merged = jlora.save_merged(tmp_path / "merged", lp)
    with pytest.raises(ValueError, match="not a jlora adapter checkpoint"):
        jlora.load_adapter(merged, base)
    path = jlora.save_adapter(tmp_path / "ad", lp, CFG)
    meta_file = pathlib.Path(path) / "jlora" / "metadata"
    good = meta_file.read_text()
    meta_file.write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        jlora.load_adapter(path, base)
    meta_file.write_text(json.dumps({**json.loads(good), "format": "something-else"}))
    with pytest.raises(ValueError, match="another kind"):
        jlora.load_adapter(path, base)
    with pytest.raises(ValueError, match="no adapters"):
        jlora.save_adapter(tmp_path / "none", base)


def test_existing_path_refused_and_overwrite_swaps(model, tmp_path):
    _, _, base, lp = model
    path = jlora.save_adapter(tmp_path / "ad", lp, CFG)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        jlora.save_adapter(path, lp, CFG)
    lp2 = perturb(lp, jax.random.key(9))
    jlora.save_adapter(path, lp2, CFG, overwrite=True)
    back = jlora.load_adapter(path, base)
    np.testing.assert_array_equal(back["proj"]["kernel"].a, lp2["proj"]["kernel"].a)
    assert sorted(os.listdir(tmp_path)) == ["ad"]  # no staging or retired leftovers


def test_save_killed_midway_leaves_previous_checkpoint_loadable(model, tmp_path):
    _, _, base, lp = model
    path = jlora.save_adapter(tmp_path / "ad", lp, CFG)
    # The child overwrites the checkpoint and is killed at its first rename: either
    # orbax finalizing the new checkpoint or jlora swapping it in.
    code = textwrap.dedent(
        f"""
        import os, signal, jax, jlora
        params = {{"w": jax.numpy.zeros((6, 2, 8))}}
        real_rename = os.rename
        def killer(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        os.rename = killer
        import flax.linen as nn, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from test_checkpoint import Net, CFG
        from helpers import perturb
        x = jax.numpy.ones((3, 6))
        base = Net().init(jax.random.key(1), x)["params"]
        lp = perturb(jlora.init(jax.random.key(2), base, CFG), jax.random.key(42))
        jlora.save_adapter({path!r}, lp, CFG, overwrite=True)
        print("not killed")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=str(ROOT),
    )
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    back = jlora.load_adapter(path, base)  # the previous checkpoint, complete
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lp)):
        np.testing.assert_array_equal(a, b)


def test_merged_export_restores_with_plain_orbax_without_jlora(model, tmp_path):
    m, x, base, lp = model
    path = jlora.save_merged(tmp_path / "merged", lp)
    code = textwrap.dedent(
        f"""
        import sys, numpy as np, orbax.checkpoint as ocp
        with ocp.StandardCheckpointer() as c:
            tree = c.restore({path!r})
        assert "jlora" not in sys.modules
        np.savez({str(tmp_path / "out.npz")!r}, proj=np.asarray(tree["proj"]["kernel"]),
                 head=np.asarray(tree["head"]["kernel"]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env()
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = np.load(tmp_path / "out.npz")
    merged = jlora.merge(lp)
    np.testing.assert_array_equal(got["proj"], merged["proj"]["kernel"])
    np.testing.assert_array_equal(got["head"], merged["head"]["kernel"])


def test_save_merged_refuses_an_existing_path_before_merging(model, tmp_path, monkeypatch):
    from jlora import _checkpoint

    _, _, _, lp = model
    path = jlora.save_merged(tmp_path / "merged", lp)

    def no_merge(params):
        raise AssertionError("merged before the existing path was refused")

    monkeypatch.setattr(_checkpoint, "merge", no_merge)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        jlora.save_merged(path, lp)
    # save_adapter too: refused before it reads (and fingerprints) any kernel.
    monkeypatch.setattr(_checkpoint, "_collect", no_merge)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        jlora.save_adapter(path, lp)


def test_manager_keeps_last_k_and_async_save_holds_pre_step_values(model, tmp_path):
    m, x, base, lp = model
    adapters, base = jlora.split(lp)
    tx = optax.sgd(0.1)
    opt_state = tx.init(adapters)

    @jax.jit
    def grads_step(adapters, opt_state):
        g = jax.grad(
            lambda ad: jnp.sum(
                jlora.lora(m.apply)({"params": jlora.combine(ad, base)}, x) ** 2
            )
        )(adapters)
        updates, opt_state = tx.update(g, opt_state)
        return optax.apply_updates(adapters, updates), opt_state

    step = jax.jit(grads_step, donate_argnums=(0, 1))
    with jlora.CheckpointManager(tmp_path / "ckpt", keep=2) as ckpt:
        for i in range(4):
            expected = [np.array(v) for v in jax.tree.leaves(adapters)]
            assert ckpt.save(i, (adapters, opt_state), extra={"next": i + 1})
            adapters, opt_state = step(adapters, opt_state)  # donates what was just saved
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]
        template = (adapters, jax.eval_shape(tx.init, adapters))
        got_step, (restored, _), extra = ckpt.restore(template)
    assert got_step == 3 and extra == {"next": 4}
    for a, b in zip(jax.tree.leaves(restored), expected):
        np.testing.assert_array_equal(a, b)
    assert isinstance(restored["proj"]["kernel"], jlora.LoraWeight)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        jlora.CheckpointManager(tmp_path / "empty").restore(template)


def test_manager_save_checks_step_and_extra_before_writing(tmp_path):
    state = {"a": jnp.arange(3.0)}
    directory = tmp_path / "ckpt"
    with jlora.CheckpointManager(directory) as ckpt:
        # NumPy and JAX scalars (the README's `extra={"next_batch": i}` with a NumPy i)
        # are stored as the Python numbers they hold.
        extra = {
            "next": np.int64(3),
            "loss": np.float32(0.5),
            "done": np.bool_(False),
            "seen": [jnp.int32(7), {"epoch": np.uint8(1)}],
        }
        assert ckpt.save(np.int64(1), state, extra=extra)
        for bad, key in (
            ({"next": np.int64(4), "table": np.ones(3)}, "table"),
            ({"next": object()}, "next"),
            ({"nested": {"x": 1j}}, "nested"),
            ({5: "five"}, "5"),
        ):
            with pytest.raises(TypeError, match=rf"extra\[{key!r}\]|key {key}"):
                ckpt.save(2, state, extra=bad, force=True)
        for step, exc in ((2.0, TypeError), ("2", TypeError), (True, TypeError)):
            with pytest.raises(exc, match="step must be an integer"):
                ckpt.save(step, state, force=True)
        with pytest.raises(ValueError, match="step must be >= 0"):
            ckpt.save(-1, state, force=True)
        ckpt.wait()
        # Nothing refused was written, and no temporary directory is left.
        assert ckpt.all_steps() == [1]
        assert sorted(os.listdir(directory)) == ["1"]
        assert ckpt.save(jnp.asarray(3), state, extra={"next": np.int64(4)})
        ckpt.wait()
        assert ckpt.all_steps() == [1, 3]
    with jlora.CheckpointManager(directory) as ckpt:
        step, got, extra = ckpt.restore(state, step=1)
        assert step == 1 and _same(got, state)
        assert extra == {"next": 3, "loss": 0.5, "done": False, "seen": [7, {"epoch": 1}]}
        assert type(extra["next"]) is int and type(extra["loss"]) is float
        assert ckpt.restore(state)[2] == {"next": 4}


def test_resume_in_fresh_process_is_bit_identical(tmp_path):
    script = str(ROOT / "examples" / "checkpointing.py")

    def run(*args):
        out = subprocess.run(
            [sys.executable, script, *args], capture_output=True, text=True, env=_env()
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout.strip().splitlines()

    straight = json.loads(run("--dir", str(tmp_path / "a"), "--steps", "10")[-1])
    first = run("--dir", str(tmp_path / "b"), "--steps", "10", "--stop-after", "5")
    assert first[-1] == "stopping early, as if interrupted"
    second = run("--dir", str(tmp_path / "b"), "--steps", "10")
    assert second[0] == "resumed from step 4: next batch 5"
    resumed = json.loads(second[-1])
    assert resumed["losses"] == straight["losses"]  # exact, not approximate
    assert resumed["adapters_sha256"] == straight["adapters_sha256"]


# Trust: nothing restores wrong data, no crash loses a checkpoint -----------------------


def _same(tree, ref):
    la, lb = jax.tree.leaves(tree), jax.tree.leaves(ref)
    return len(la) == len(lb) and all(np.array_equal(a, b) for a, b in zip(la, lb))


def test_manager_restores_by_path_and_lists_every_mismatch(tmp_path):
    zeros, ones = jnp.zeros((3,)), jnp.ones((3,))
    with jlora.CheckpointManager(tmp_path / "ckpt", async_save=False) as ckpt:
        ckpt.save(0, {"a": zeros, "b": ones}, force=True)
        # Same shapes, other names: refused, both differences named.
        with pytest.raises(ValueError) as err:
            ckpt.restore({"b": zeros, "c": zeros})
        msg = str(err.value)
        assert "c: in the template, not in the checkpoint" in msg
        assert "a: in the checkpoint, not in the template" in msg
        # Same paths, other dtype or shape: refused before orbax could cast.
        with pytest.raises(ValueError) as err:
            ckpt.restore({"a": zeros.astype(jnp.bfloat16), "b": jnp.ones((4,))})
        msg = str(err.value)
        assert "a: the template has bfloat16[3], the checkpoint float32[3]" in msg
        assert "b: the template has float32[4], the checkpoint float32[3]" in msg
        # Keys in another order: each leaf still lands under its own path.
        _, got, _ = ckpt.restore({"b": zeros, "a": zeros})
    np.testing.assert_array_equal(got["a"], zeros)
    np.testing.assert_array_equal(got["b"], ones)


def test_manager_refuses_the_positional_format_and_its_conversion_recipe_works(tmp_path):
    import orbax.checkpoint as ocp

    state = {"a": jnp.zeros((3,)), "b": jnp.ones((2,))}
    old_dir = tmp_path / "old"
    # A checkpoint as jlora 0.1 wrote it: leaves by position, extras as JSON.
    with ocp.CheckpointManager(old_dir, item_names=("state", "extra")) as old:
        leaves = {f"leaf_{i:05d}": x for i, x in enumerate(jax.tree.leaves(state))}
        old.save(
            5,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(leaves), extra=ocp.args.JsonSave({"n": 1})
            ),
        )
        old.wait_until_finished()
    with pytest.raises(ValueError, match="older format") as err:
        jlora.CheckpointManager(old_dir).restore(state)
    recipe = str(err.value).split("save it again:\n", 1)[1]
    # The recipe from the message, run as written, converts it.
    namespace = {
        "jax": jax,
        "jlora": jlora,
        "directory": str(old_dir),
        "new_directory": str(tmp_path / "new"),
        "step": 5,
        "template": state,
    }
    exec(textwrap.dedent(recipe), namespace)
    with jlora.CheckpointManager(tmp_path / "new") as new:
        step, got, extra = new.restore(state)
    assert step == 5 and extra == {"n": 1} and _same(got, state)


class Crash(BaseException):
    """A process dying at this point: no `except Exception` cleanup runs."""


def _fs_steps(monkeypatch, fail_at: int | None, log: list):
    """Counts every filesystem step of a save (orbax's write is one), crashing at
    step `fail_at`."""
    import orbax.checkpoint as ocp

    from jlora import _atomic

    def step(name, real):
        def run(*args, **kwargs):
            log.append(name)
            if fail_at is not None and len(log) - 1 == fail_at:
                raise Crash(name)
            return real(*args, **kwargs)

        return staticmethod(run)

    for name in ("rename", "rmtree", "makedirs", "write_journal", "remove"):
        monkeypatch.setattr(_atomic.FS, name, step(name, getattr(_atomic.FS, name)))
    real_save = ocp.Checkpointer.save

    def save(self, directory, *args, **kwargs):
        log.append("write")
        if fail_at is not None and len(log) - 1 == fail_at:
            os.makedirs(directory, exist_ok=True)  # a partial write
            (pathlib.Path(directory) / "partial").write_text("")
            raise Crash("write")
        return real_save(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.Checkpointer, "save", save)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_save_that_dies_at_any_step_leaves_a_loadable_checkpoint(
    model, tmp_path, monkeypatch, overwrite
):
    _, _, base, lp = model
    new = perturb(lp, jax.random.key(7))
    steps: list = []
    with monkeypatch.context() as m:  # a dry run lists the steps
        _fs_steps(m, None, steps)
        jlora.save_adapter(tmp_path / "dry" / "ad", lp, CFG)
        if overwrite:
            steps.clear()
            jlora.save_adapter(tmp_path / "dry" / "ad", new, CFG, overwrite=True)
    assert "write" in steps and steps.count("rename") == (2 if overwrite else 1)
    if overwrite:
        assert "write_journal" in steps and "remove" in steps
    for k, name in enumerate(steps):
        root = tmp_path / f"crash{k}"
        path = root / "ad"
        if overwrite:
            jlora.save_adapter(path, lp, CFG)
        with monkeypatch.context() as m, pytest.raises(Crash):
            _fs_steps(m, k, [])
            jlora.save_adapter(path, new, CFG, overwrite=overwrite)
        if not overwrite and not os.path.exists(path):
            # Died before the new checkpoint was in place: there was none before.
            with pytest.raises(FileNotFoundError):
                jlora.load_adapter(path, base)
        else:
            back = jlora.load_adapter(path, base)
            assert _same(back, lp) or _same(back, new), f"crash at step {k} ({name})"
        # The next save finds its way, and leaves nothing beside the checkpoint.
        jlora.save_adapter(path, new, CFG, overwrite=True)
        assert _same(jlora.load_adapter(path, base), new)
        assert sorted(os.listdir(root)) == ["ad"], (k, name, os.listdir(root))


def test_a_checkpoint_deleted_after_a_crashed_overwrite_stays_deleted(
    model, tmp_path, monkeypatch
):
    """Whatever step an overwrite died at, a user who then deletes the checkpoint gets
    "not found" and a fresh save there succeeds; the one exception is a save that died
    between its two renames (nothing at the path to delete): its journal proves the
    new checkpoint complete, and that is what loads."""
    _, _, base, lp = model
    new = perturb(lp, jax.random.key(7))
    steps: list = []
    with monkeypatch.context() as m:
        jlora.save_adapter(tmp_path / "dry" / "ad", lp, CFG)
        _fs_steps(m, None, steps)
        jlora.save_adapter(tmp_path / "dry" / "ad", new, CFG, overwrite=True)
    proven = 0
    for k, name in enumerate(steps):
        root = tmp_path / f"crash{k}"
        path = root / "ad"
        jlora.save_adapter(path, lp, CFG)
        with monkeypatch.context() as m, pytest.raises(Crash):
            _fs_steps(m, k, [])
            jlora.save_adapter(path, new, CFG, overwrite=True)
        if os.path.exists(path):
            shutil.rmtree(path)  # the user deletes the checkpoint
            with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
                jlora.load_adapter(path, base)
            with pytest.raises(FileNotFoundError):
                jlora.read_adapter_metadata(path)
            jlora.save_adapter(path, new, CFG)  # a fresh save: no "already exists"
        else:
            proven += 1
            assert _same(jlora.load_adapter(path, base), new), (k, name)
            with pytest.raises(FileExistsError):  # the next save finished that swap
                jlora.save_adapter(path, new, CFG)
        assert _same(jlora.load_adapter(path, base), new), (k, name)
        assert sorted(os.listdir(root)) == ["ad"], (k, name, os.listdir(root))
    assert proven == 1  # exactly one step (the second rename) ends between the renames


def test_a_retired_copy_left_by_a_failed_removal_is_never_loaded(
    model, tmp_path, monkeypatch
):
    """The old copy's removal fails quietly (busy files on a network filesystem), the
    user deletes the checkpoint: the leftover is garbage, not the checkpoint."""
    from jlora import _atomic

    _, _, base, lp = model
    new = perturb(lp, jax.random.key(7))
    path = jlora.save_adapter(tmp_path / "ad", lp, CFG)
    with monkeypatch.context() as m:
        m.setattr(_atomic.FS, "rmtree", staticmethod(lambda *a, **k: None))
        jlora.save_adapter(path, new, CFG, overwrite=True)
    assert any(n.startswith(".ad.retired-") for n in os.listdir(tmp_path))
    assert _same(jlora.load_adapter(path, base), new)  # the leftover is not read
    shutil.rmtree(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        jlora.load_adapter(path, base)
    jlora.save_adapter(path, lp, CFG)  # no "already exists"; the leftover is removed
    assert _same(jlora.load_adapter(path, base), lp)
    assert sorted(os.listdir(tmp_path)) == ["ad"]


def test_a_failed_save_cleans_its_staging_and_patterns_serialize(model, tmp_path):
    import re

    from jlora import _atomic

    _, _, base, lp = model
    cfg = jlora.LoraConfig(
        2,
        4,
        targets=re.compile("kernel$"),
        exclude=[re.compile("nothing", re.IGNORECASE)],
        layout={"proj": jlora.Layout((0,), (1, 2))},
        train_bias="lora_only",
        also_train="head/bias",
    )
    path = jlora.save_adapter(tmp_path / "ad", lp, cfg)
    meta = jlora.read_adapter_metadata(path)["config"]
    assert meta["targets"] == "kernel$"
    assert meta["exclude"] == [{"regex": "nothing", "flags": int(re.IGNORECASE)}]
    failing = object()  # not JSON-serializable: the save fails before writing
    with pytest.raises(TypeError):
        jlora.save_adapter(tmp_path / "bad", lp, dataclasses_replace(cfg, failing))
    real = _atomic.FS.rename

    def broken(*args):
        raise OSError("disk full")

    _atomic.FS.rename = staticmethod(broken)
    try:
        with pytest.raises(OSError, match="disk full"):
            jlora.save_adapter(tmp_path / "ad2", lp, CFG)
        with pytest.raises(OSError, match="disk full"):  # an overwrite rolls back
            jlora.save_adapter(tmp_path / "ad", lp, CFG, overwrite=True)
    finally:
        _atomic.FS.rename = staticmethod(real)
    assert sorted(os.listdir(tmp_path)) == ["ad"]  # no staging left behind


def dataclasses_replace(cfg, bad):
    """`cfg` with a value no JSON encoder takes (bypassing validation)."""
    import dataclasses

    out = dataclasses.replace(cfg)
    object.__setattr__(out, "dtype", bad)
    return out


def test_load_adapter_accepts_the_base_split_returns(model, tmp_path):
    _, _, base, lp = model  # CFG trains biases and head/bias fully
    path = jlora.save_adapter(tmp_path / "ad", lp, CFG)
    adapters, split_base = jlora.split(lp)
    assert split_base["head"]["bias"] is None
    back = jlora.load_adapter(path, split_base)
    assert _same(back, lp)
    assert isinstance(back["head"]["bias"], jlora.Trainable)


def test_fingerprint_catches_another_base_of_the_same_shapes(model, tmp_path):
    import warnings

    _, _, base, lp = model
    path = jlora.save_adapter(tmp_path / "ad", lp, CFG)
    meta = jlora.read_adapter_metadata(path)
    fp = {e["path"]: e["base"] for e in meta["leaves"] if e["kind"] == "lora"}
    assert fp["head/kernel"]["shape"] == [16, 4] and len(fp["head/kernel"]["checksum"]) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right base: no warning
        jlora.load_adapter(path, base)
    other = jax.tree.map(lambda x: x, base)
    other["head"]["kernel"] = base["head"]["kernel"] * 1.001
    with pytest.warns(UserWarning, match=r"different base kernels.*head/kernel"):
        jlora.load_adapter(path, other)
    with pytest.raises(ValueError, match="different base kernels"):
        jlora.load_adapter(path, other, base_mismatch="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jlora.load_adapter(path, other, base_mismatch="ignore")
    # A permutation of the same values (same plain sum) is caught by the weighted sum.
    swapped = jax.tree.map(lambda x: x, base)
    swapped["head"]["kernel"] = base["head"]["kernel"][::-1]
    with pytest.raises(ValueError, match="head/kernel"):
        jlora.load_adapter(path, swapped, base_mismatch="error")


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype), tree)


def test_a_base_cast_to_another_dtype_is_compared_in_the_narrower_one(model, tmp_path):
    import warnings

    _, _, base, lp = model  # trained on a float32 base
    path = jlora.save_adapter(tmp_path / "ad", lp, CFG)
    for dtype in (jnp.bfloat16, jnp.float16):  # served on a cast of that base
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            back = jlora.load_adapter(path, _cast(base, dtype), base_mismatch="error")
        assert back["head"]["kernel"].w.dtype == dtype
        assert _same(jlora.split(back)[0], jlora.split(lp)[0])
    # Another base, cast: still another base, compared in bfloat16.
    other = jax.tree.map(lambda x: x, base)
    other["head"]["kernel"] = base["head"]["kernel"] * 1.25
    with pytest.warns(UserWarning, match=r"different base kernels.*\['head/kernel'\]"):
        jlora.load_adapter(path, _cast(other, jnp.bfloat16))
    # A cast jlora keeps no record of is said to be a dtype change, not other values.
    with pytest.raises(ValueError, match=r"another dtype \(float32 -> float8_e4m3fn\)"):
        jlora.load_adapter(path, _cast(base, jnp.float8_e4m3fn), base_mismatch="error")
    # Trained on a bfloat16 base, loaded onto its exact float32 widening: cast back.
    base16 = _cast(base, jnp.bfloat16)
    lp16 = jlora.combine(jlora.split(lp)[0], base16)
    path16 = jlora.save_adapter(tmp_path / "ad16", lp16, CFG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jlora.load_adapter(path16, _cast(base16, jnp.float32), base_mismatch="error")
    widened = _cast(_cast(other, jnp.bfloat16), jnp.float32)
    with pytest.raises(ValueError, match=r"different base kernels.*head/kernel"):
        jlora.load_adapter(path16, widened, base_mismatch="error")


def test_a_checkpoint_without_cast_records_reports_a_dtype_change(model, tmp_path):
    _, _, base, lp = model
    path = jlora.save_adapter(tmp_path / "ad", lp, CFG)
    meta_file = pathlib.Path(path) / "jlora" / "metadata"
    meta = json.loads(meta_file.read_text())
    for entry in meta["leaves"]:  # as written before cast records existed
        entry.pop("base_casts", None)
    meta_file.write_text(json.dumps(meta))
    with pytest.warns(UserWarning) as record:
        jlora.load_adapter(path, _cast(base, jnp.bfloat16))
    (msg,) = [str(w.message) for w in record]
    assert "another dtype (float32 -> bfloat16)" in msg and "other values" not in msg
    assert "'head/kernel'" in msg and "'proj/kernel'" in msg


def test_fingerprint_does_not_depend_on_sharding_or_device_count():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jlora._checkpoint import fingerprint

    w = jax.random.normal(jax.random.key(0), (64, 48), jnp.bfloat16)
    one = fingerprint(w)
    for shape, spec in (((8,), P("x", None)), ((2, 4), P("x", "y")), ((4,), P(None, "x"))):
        names = ("x", "y")[: len(shape)]
        mesh = jax.make_mesh(shape, names, devices=jax.devices()[: int(np.prod(shape))])
        assert fingerprint(jax.device_put(w, NamedSharding(mesh, spec))) == one
    assert fingerprint(w.T.reshape(w.shape)) != one


def test_a_load_beside_a_save_neither_disturbs_it_nor_reads_half(
    model, tmp_path, monkeypatch
):
    """A reader that runs between any two renames of an overwriting save gets the old
    or the new checkpoint, whole, and the save still completes."""
    from jlora import _atomic

    _, _, base, lp = model
    new = perturb(lp, jax.random.key(7))
    path = jlora.save_adapter(tmp_path / "ad", lp, CFG)
    real = _atomic.FS.rename
    seen = []

    def rename_then_read(src, dst):
        real(src, dst)
        seen.append(jlora.load_adapter(path, base))  # a reader, mid-swap

    monkeypatch.setattr(_atomic.FS, "rename", staticmethod(rename_then_read))
    jlora.save_adapter(path, new, CFG, overwrite=True)
    monkeypatch.undo()
    assert len(seen) == 2  # path -> retired, staging -> path
    for got in seen:
        assert _same(got, lp) or _same(got, new)
    assert _same(jlora.load_adapter(path, base), new)
    assert sorted(os.listdir(tmp_path)) == ["ad"]


def test_load_keeps_the_boxes_init_gives(tmp_path):
    """Linen boxes (logical names) and NNX variables come back as init made them, from
    the plain base and from split()'s base, so optimizer states and shardings built
    from init's tree still fit."""
    from flax import nnx

    class Boxed(nn.Module):
        @nn.compact
        def __call__(self, x):
            kernel = nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("e", "m")
            )
            bias = nn.with_logical_partitioning(nn.initializers.zeros, ("m",))
            return nn.Dense(3, kernel_init=kernel, bias_init=bias)(x)

    cfg = jlora.LoraConfig(2, 2, train_bias="all")
    variables = Boxed().init(jax.random.key(0), jnp.ones((1, 4)))
    _, state = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    for name, base in (("linen", variables), ("nnx", state)):
        lp = perturb(jlora.init(jax.random.key(1), base, cfg), jax.random.key(2))
        path = jlora.save_adapter(tmp_path / name, lp)
        for onto in (base, jlora.split(lp)[1]):
            back = jlora.load_adapter(path, onto)
            assert jax.tree.structure(back) == jax.tree.structure(lp), name
            assert _same(back, lp)
    spec = nn.get_partition_spec(jlora.load_adapter(tmp_path / "linen", variables))
    kernel = spec["params"]["Dense_0"]["kernel"]
    assert kernel.a == P("e", "lora_rank") and kernel.b == P("lora_rank", "m")
