"""Sharded LoRA training on a device mesh (8 simulated CPU devices by default).

    python examples/sharded_training.py [--steps 5]

A GPT-style model is sharded FSDP-style: every kernel's first axis and the batch are
split over the 8 devices of a `jax.sharding.Mesh`. `jlora.init` gives each adapter the
sharding of the kernel it adapts (`a` on the kernel's input axes, `b` on its outputs,
the rank axis replicated), `jlora.adapter_specs` gives the jit shardings, and the step
is an ordinary jitted function: JAX inserts the collectives. The same steps run
replicated for comparison; losses agree, and the compiled steps' memory analysis shows
the per-device bytes of params + adapters + optimizer state under each layout.

On several hosts, call `jax.distributed.initialize()` first and build the mesh from
`jax.devices()` (all hosts' devices); the rest of this script is unchanged.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

if "jax" not in sys.modules:  # simulate 8 devices on a CPU-only machine
    flags = os.environ.get("XLA_FLAGS", "")
    if "host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count=8".strip()
        )

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from gpt import GPT, GPTConfig, next_token_loss  # noqa: E402

import jlora  # noqa: E402


def fsdp_spec(x, n):
    """Shard the first axis of every >= 2-axis array that divides evenly; else replicate."""
    if x.ndim >= 2 and x.shape[0] % n == 0:
        return P("fsdp", *([None] * (x.ndim - 1)))
    return P()


def run(mesh: Mesh | None, steps: int, cfg: GPTConfig, batch: int = 8):
    model = GPT(cfg)
    ids = jax.random.randint(jax.random.key(0), (batch, cfg.seq), 0, cfg.vocab)
    params = model.init(jax.random.key(1), ids)["params"]
    if mesh is not None:
        n = mesh.devices.size
        params = jax.tree.map(
            lambda x: jax.device_put(x, NamedSharding(mesh, fsdp_spec(x, n))), params
        )
        ids = jax.device_put(ids, NamedSharding(mesh, P("fsdp")))
    config = jlora.LoraConfig(8, 16, targets=r"(query|value)/kernel$")
    lp = jlora.init(jax.random.key(2), params, config)
    adapters, base = jlora.split(lp)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(adapters)
    apply = jlora.lora(model.apply)

    def step(adapters, opt_state, base, ids):
        def loss_fn(ad):
            return next_token_loss(apply({"params": jlora.combine(ad, base)}, ids), ids)

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    out_shardings = None
    if mesh is not None:
        ad_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), jlora.adapter_specs(lp))
        out_shardings = (ad_sh, None, None)
    jitted = jax.jit(step, out_shardings=out_shardings, donate_argnums=(0, 1))
    mem = jitted.lower(adapters, opt_state, base, ids).compile().memory_analysis()
    losses = []
    for _ in range(steps):
        adapters, opt_state, loss = jitted(adapters, opt_state, base, ids)
        losses.append(float(loss))
    return losses, mem, adapters


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args(argv)
    if len(jax.devices()) < 8:
        raise SystemExit(f"needs 8 devices, found {len(jax.devices())}")
    cfg = GPTConfig(vocab=1024, d=args.d, heads=4, layers=args.layers, seq=64)
    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    with jax.numpy_dtype_promotion("standard"):
        rep_losses, rep_mem, _ = run(None, args.steps, cfg)
        fsdp_losses, fsdp_mem, adapters = run(mesh, args.steps, cfg)
    a = adapters["block_0"]["query"]["kernel"]
    print(f"block_0/query adapters: a {a.a.sharding.spec}, b {a.b.sharding.spec}")
    print("step  replicated  fsdp(8)")
    for i, (r, f) in enumerate(zip(rep_losses, fsdp_losses)):
        print(f"{i:4d}  {r:10.6f}  {f:10.6f}")
    rows = {"replicated": rep_mem, "fsdp over 8": fsdp_mem}
    print("per-device bytes (compiled step's memory analysis):")
    for name, m in rows.items():
        print(
            f"  {name:12s} arguments {m.argument_size_in_bytes:>12,}  "
            f"temp {m.temp_size_in_bytes:>12,}"
        )
    gap = max(abs(r - f) for r, f in zip(rep_losses, fsdp_losses))
    # Sharded and replicated steps differ only in summation order. Per step, forward and
    # backward chain about 2 * (4 * layers + 2) reductions of at most max(vocab, 4 d)
    # terms, each off by at most that many float32 roundings of the values' scale; the
    # loss moves by the gradients' error times the step (where Adam's normalisation
    # amplifies an error, the gradient and so the loss's sensitivity are near zero).
    k = max(cfg.vocab, 4 * cfg.d)
    depth = 2 * (4 * cfg.layers + 2) * args.steps
    tolerance = 2 * depth * k * 2.0**-24 * max(abs(x) for x in rep_losses)
    if gap > tolerance:
        raise SystemExit(f"sharded and replicated losses differ by {gap} > {tolerance}")
    return rep_losses, fsdp_losses, rows


if __name__ == "__main__":
    main()
