"""Train LoRA adapters with checkpoints, resume after an interruption, export for serving.

    python examples/checkpointing.py --dir /tmp/jlora-ckpt [--steps 10] [--stop-after 5]

Run it once with `--stop-after 5` (the run stops as if interrupted), then again without:
the second run restores the adapters, the optimizer state and the data position from
the last checkpoint and finishes exactly as an uninterrupted run would. At the end it
saves the adapters alone (`jlora.save_adapter`), the merged params for serving
(`jlora.save_merged`, plain orbax), reloads both and checks they give the same outputs.
The last line printed is a JSON summary (losses and a hash of the trained adapters).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="out")(nn.tanh(nn.Dense(64, name="hidden")(x)))


def batch(i: int):
    """Batch `i` of a deterministic stream: the data position is just `i`."""
    key = jax.random.fold_in(jax.random.key(1234), i)
    x = jax.random.normal(key, (32, 16))
    return x, jnp.sin(x[:, :8] * 2.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--stop-after", type=int, default=0, help="stop after this many steps")
    p.add_argument("--save-every", type=int, default=1)
    args = p.parse_args(argv)

    model = MLP()
    base_params = model.init(jax.random.key(0), jnp.ones((1, 16)))["params"]  # "pretrained"
    config = jlora.LoraConfig(4, 8, train_bias="lora_only")
    adapters, base = jlora.split(jlora.init(jax.random.key(1), base_params, config))
    tx = optax.adamw(3e-2)
    opt_state = tx.init(adapters)
    apply = jlora.lora(model.apply)

    @jax.jit
    def train_step(adapters, opt_state, x, y):
        def loss_fn(ad):
            return jnp.mean((apply({"params": jlora.combine(ad, base)}, x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    ckpt = jlora.CheckpointManager(
        os.path.join(args.dir, "train"), save_every=args.save_every, keep=2
    )
    start, losses = 0, []
    if ckpt.latest_step() is not None:
        step, (adapters, opt_state), extra = ckpt.restore((adapters, opt_state))
        start, losses = extra["next_batch"], extra["losses"]
        print(f"resumed from step {step}: next batch {start}")
    for i in range(start, args.steps):
        adapters, opt_state, loss = train_step(adapters, opt_state, *batch(i))
        losses.append(float(loss))
        ckpt.save(
            i,
            (adapters, opt_state),
            extra={"next_batch": i + 1, "losses": losses},
            force=i == args.steps - 1,
        )
        print(f"step {i}: loss {losses[-1]:.6f}")
        if args.stop_after and i + 1 == args.stop_after:
            ckpt.close()
            print("stopping early, as if interrupted")
            return None
    ckpt.close()

    # Export: the adapters alone, and the merged params for serving.
    params = jlora.combine(adapters, base)
    adapter_dir = jlora.save_adapter(
        os.path.join(args.dir, "adapter"), params, config, overwrite=True
    )
    merged_dir = jlora.save_merged(os.path.join(args.dir, "merged"), params, overwrite=True)

    # Reload both onto a fresh base: the adapters must come back exactly, and the
    # exported kernels must be exactly jlora.merge of the trained params.
    import orbax.checkpoint as ocp

    reloaded = jlora.load_adapter(adapter_dir, base_params)
    with ocp.StandardCheckpointer() as c:
        merged = c.restore(merged_dir)
    same_adapters = all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(reloaded), jax.tree.leaves(params))
    )
    same_merged = all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(jlora.merge(params)))
    )
    print(
        f"reloaded adapters identical: {same_adapters}; merged export identical: "
        f"{same_merged}"
    )
    if not (same_adapters and same_merged):
        raise SystemExit("reloaded checkpoints disagree with the trained model")
    x, _ = batch(10_000)
    print("serving output:", np.asarray(model.apply({"params": merged}, x))[0, :4])
    digest = hashlib.sha256(
        b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(adapters))
    ).hexdigest()
    summary = {"losses": losses, "adapters_sha256": digest}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
