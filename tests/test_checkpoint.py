"""Orbax checkpoints: adapter save/load, faults, merged export, training-loop resume."""

import json
import os
import pathlib
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
    with pytest.raises(ValueError, match="already holds an adapter"):
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
