"""One of several JAX processes on this machine, for tests/test_multiprocess.py.

    python tests/multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES OUT_DIR

Each process has 2 CPU devices (set by the parent through XLA_FLAGS); together they
form one global mesh, FSDP over every device. The processes train LoRA adapters for a
few steps, save them (`save_adapter`, each process writing its own shards), load them
back into the shardings the sharded base implies, export the merged model
(`save_merged`), and save and resume a `CheckpointManager`. Process 0 writes what the
parent compares against its one-process run into OUT_DIR/result.npz.
"""

import json
import pathlib
import sys

import jax

port, pid, nproc, out_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=nproc,
    process_id=pid,
    initialization_timeout=120,
)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import multiprocess_model as mm  # noqa: E402

import jlora  # noqa: E402

out = pathlib.Path(out_dir)
assert jax.process_count() == nproc and len(jax.devices()) == 2 * nproc
mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",))


def gather(tree):
    """Every process's shards brought together, as host arrays (for the parent)."""
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def placed(tree, specs):
    """Host arrays (identical on every process) as global arrays on the mesh."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(
            x.shape, NamedSharding(mesh, s), lambda idx, x=x: x[idx]
        ),
        tree,
        specs,
    )


params, x, y = mm.data()
base = placed(params, mm.param_specs())
x, y = placed((x, y), (P("fsdp"), P("fsdp")))
adapters, losses, lp = mm.train(base, x, y, mesh)
shards = [s.device.process_index for s in adapters["up"]["kernel"].a.addressable_shards]
assert set(shards) == {pid}, shards
assert not adapters["up"]["kernel"].a.is_fully_addressable  # truly spread over processes

# Adapter checkpoint: written by every process, loaded into the base's shardings.
path = jlora.save_adapter(out / "adapter", jlora.combine(adapters, base), mm.CFG)
back = jlora.load_adapter(path, base)
back_adapters, _ = jlora.split(back)
same = all(
    bool(np.array_equal(a, b))
    for a, b in zip(
        jax.tree.leaves(gather(back_adapters)), jax.tree.leaves(gather(adapters))
    )
)
spec_a = back["up"]["kernel"].a.sharding.spec
# Overwriting goes through the same staging and swap on every process.
jlora.save_adapter(out / "adapter", jlora.combine(adapters, base), mm.CFG, overwrite=True)

# Merged export: each process writes its shards of the merged kernels.
merged_path = jlora.save_merged(out / "merged", jlora.combine(adapters, base))

# Training-loop checkpoints: save, then restore into the sharded template.
tx = optax.sgd(mm.LR)
opt_state = tx.init(adapters)
with jlora.CheckpointManager(out / "ckpt", save_every=1) as ckpt:
    ckpt.save(7, (adapters, opt_state), extra={"next": 8})
    ckpt.wait()
    step, (restored, _), extra = ckpt.restore((adapters, opt_state))
resumed = (
    step == 7
    and extra == {"next": 8}
    and all(
        bool(np.array_equal(a, b))
        for a, b in zip(
            jax.tree.leaves(gather(restored)), jax.tree.leaves(gather(adapters))
        )
    )
)
restored_spec = restored["up"]["kernel"].a.sharding.spec

flat = gather(adapters)
start = gather(jlora.split(lp)[0])
if pid == 0:
    np.savez(
        out / "result.npz",
        losses=np.asarray(losses),
        **{f"ad{i}": v for i, v in enumerate(jax.tree.leaves(flat))},
        **{f"start{i}": v for i, v in enumerate(jax.tree.leaves(start))},
    )
    (out / "result.json").write_text(
        json.dumps(
            {
                "load_exact": same,
                "load_spec_a": str(spec_a),
                "resumed_exact": resumed,
                "restored_spec_a": str(restored_spec),
                "merged_path": merged_path,
            }
        )
    )
multihost_utils.sync_global_devices("done")
jax.distributed.shutdown()
