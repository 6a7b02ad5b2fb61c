"""jlora quickstart: adapt a pretrained Flax model to a shifted task with LoRA.

A small MLP is pretrained on task A (y = W_a x passed through a nonlinearity). Task B
differs from A by a low-rank change of the map, so the frozen base does badly on it;
LoRA (r=4 on every Dense kernel, ~9% of the parameters) fixes it. Then the adapters are
merged for serving, and the merged model is checked against the LoRA model.

    python examples/quickstart.py [--steps 300] [--rank 4]
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jlora


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(128, name="fc1")(x))
        x = nn.gelu(nn.Dense(128, name="fc2")(x))
        return nn.Dense(16, name="out")(x)


def make_tasks(key, d=32, n=2048):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    w_a = jax.random.normal(k1, (d, 16)) / jnp.sqrt(d)
    # Task B: task A's map plus a rank-2 change.
    w_b = w_a + 1.5 * (jax.random.normal(k2, (d, 2)) @ jax.random.normal(k3, (2, 16))) / d
    x = jax.random.normal(k4, (n, d))
    return x, jnp.tanh(x @ w_a), jnp.tanh(x @ w_b)


def mse(pred, y):
    return jnp.mean((pred - y) ** 2)


def train(loss_fn, params, steps, lr):
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        value, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    for _ in range(steps):
        params, opt_state, _ = step(params, opt_state)
    return params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args(argv)

    model = MLP()
    x, y_a, y_b = make_tasks(jax.random.key(0))
    train_x, test_x = x[:1536], x[1536:]
    params = model.init(jax.random.key(1), x[:1])["params"]

    # 1. Pretrain the base on task A (full training; this stands in for a real checkpoint).
    params = train(
        lambda p: mse(model.apply({"params": p}, train_x), y_a[:1536]),
        params,
        args.steps,
        3e-3,
    )
    base_loss = float(mse(model.apply({"params": params}, test_x), y_b[1536:]))

    # 2. LoRA on task B: train only the adapters; the base is an argument, never updated.
    config = jlora.LoraConfig(rank=args.rank, alpha=2 * args.rank)
    lora_params = jlora.init(jax.random.key(2), params, config)
    adapters, base = jlora.split(lora_params)
    apply = jlora.lora(model.apply)

    def loss(adapters):
        p = jlora.combine(adapters, base)
        return mse(apply({"params": p}, train_x), y_b[:1536])

    adapters = train(loss, adapters, args.steps, 1e-2)
    lora_params = jlora.combine(adapters, base)
    lora_loss = float(mse(apply({"params": lora_params}, test_x), y_b[1536:]))

    # 3. Merge for serving: the unmodified model, no extra latency. Compared in full
    #    float32 (GPUs default to TF32 products, which differ at the 1e-3 level).
    merged = jlora.merge(lora_params)
    with jax.default_matmul_precision("highest"):
        lora_out = apply({"params": lora_params}, test_x)
        merged_out = model.apply({"params": merged}, test_x)
    gap = float(jnp.max(jnp.abs(merged_out - lora_out)))
    scale = float(jnp.max(jnp.abs(merged_out)))
    # Both are float32 evaluations of the same function: six chained reductions of at
    # most 128 terms (three layers, each with the factored branch's extra dot), each
    # off by at most 128 * 2^-24 of the values' scale in any summation order.
    tolerance = 2 * 6 * 128 * 2.0**-24 * scale

    print(jlora.summary(lora_params))
    print(f"task B test loss, frozen base : {base_loss:.5f}")
    print(f"task B test loss, after LoRA  : {lora_loss:.5f}")
    print(f"merged vs LoRA model, max |diff|: {gap:.2e}")
    if not lora_loss < 0.5 * base_loss:
        raise SystemExit("LoRA did not fix the task: loss did not halve")
    if gap > tolerance:
        raise SystemExit(
            f"merged model disagrees with the LoRA model: {gap:.2e} > {tolerance:.2e}"
        )
    return base_loss, lora_loss, gap, scale


if __name__ == "__main__":
    main()
