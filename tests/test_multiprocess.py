"""Two JAX processes on this machine, for real: training, checkpoints and merged export.

Two processes with 2 CPU devices each join through `jax.distributed.initialize` on a
free local port (CPU collectives through gloo) and train FSDP over the 4 global
devices (tests/multiprocess_worker.py). The adapters are spread over both processes,
so every save and load has to work shard by shard. Everything is compared with the
same training run in this one process on 4 of its devices.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import assert_close, chain_bound
from jax.sharding import NamedSharding

import jlora

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import multiprocess_model as mm  # noqa: E402

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 4 or jax.devices()[0].platform != "cpu",
    reason="the one-process reference needs 4 CPU devices",
)
TIMEOUT_S = 300
# SGD: each step's gradient differs by at most a chain of reductions forward and back
# (the widest has 96 terms: the hidden layer), and errors add up over the steps.
ADAPTER_TOL = chain_bound(k=96, depth=6 * mm.STEPS)
LOSS_TOL = chain_bound(k=16 * 32, depth=4 * mm.STEPS)  # the loss: a mean of 512 terms


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(out_dir, n=2):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "multiprocess_worker.py"),
                str(port),
                str(i),
                str(n),
                str(out_dir),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    try:
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{err[-4000:]}"


def _reference():
    mesh = jax.make_mesh((4,), ("fsdp",), devices=jax.devices()[:4])
    params, x, y = mm.data()
    specs = mm.param_specs()
    base = jax.tree.map(
        lambda v, s: jax.device_put(v, NamedSharding(mesh, s)), params, specs
    )
    x, y = (
        jax.device_put(v, NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")))
        for v in (x, y)
    )
    adapters, losses, lp = mm.train(base, x, y, mesh)
    return base, adapters, losses, jlora.split(lp)[0]


def test_two_processes_train_save_load_and_export_like_one(tmp_path):
    _run_workers(tmp_path)
    got = np.load(tmp_path / "result.npz")
    info = json.loads((tmp_path / "result.json").read_text())
    base, adapters, losses, start = _reference()

    assert_close(got["losses"], np.asarray(losses), LOSS_TOL)
    leaves = jax.tree.leaves(adapters)
    for i, (ref, ref0) in enumerate(zip(leaves, jax.tree.leaves(start))):
        # What training changed (the initial factors would dominate the scale).
        change = got[f"ad{i}"] - got[f"start{i}"]
        assert_close(change, np.asarray(ref) - np.asarray(ref0), ADAPTER_TOL)
    # Loaded and resumed on both processes: exact, and into the base's shardings.
    assert info["load_exact"] and info["resumed_exact"]
    want_spec = str(jax.sharding.PartitionSpec("fsdp", None))
    assert info["load_spec_a"] == info["restored_spec_a"] == want_spec
    # Written shard by shard by two processes, read back here by one, onto one device
    # (another topology, so orbax needs the target shardings), without jlora.
    trained = jax.tree.unflatten(
        jax.tree.structure(adapters), [got[f"ad{i}"] for i in range(len(leaves))]
    )
    want = jlora.merge(jlora.combine(trained, base))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), want
    )
    with ocp.StandardCheckpointer() as ckptr:
        merged = ckptr.restore(info["merged_path"], target)
    for name in ("up", "down"):
        assert_close(merged[name]["kernel"], want[name]["kernel"], 4 * gamma_merge())
        np.testing.assert_array_equal(merged[name]["bias"], want[name]["bias"])


def gamma_merge():
    """The merged kernel is one float32 sum of w and a rank-4 product."""
    from helpers import gamma

    return gamma(mm.CFG.rank + 1)
