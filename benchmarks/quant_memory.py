"""Memory of a LoRA training step on a quantized base, planned by XLA (nothing runs).

    python benchmarks/quant_memory.py [--d 256] [--layers 2 8]

A scanned stack of `layers` d x d kernels, LoRA r=4 on every layer, one gradient step
of the adapters (lean route). For each base: the frozen base's argument bytes and the
step's temporary bytes from `compiled.memory_analysis()`:
  float32      the float base
  nf4          jlora.quantize(base): each kernel dequantized at its use in a checkpoint
               that keeps the codes
  nf4, plain   the same codes dequantized inside the step with plain autodiff (what a
               transform without its own backward does): every layer's float kernel
               is kept for the backward pass
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jlora


def step_memory(layers: int, d: int, base: str):
    w = jax.random.normal(jax.random.key(0), (layers, d, d)) / d**0.5
    cfg = jlora.LoraConfig(4, 8, layout={"w": jlora.Layout((1,), (2,), (0,))})
    params = {"w": w} if base == "float32" else jlora.quantize({"w": w}, targets="w")
    adapters, frozen = jlora.split(jlora.init(jax.random.key(1), params, cfg))
    x = jax.random.normal(jax.random.key(2), (16, d))

    def fwd(p, x):
        return jax.lax.scan(lambda h, k: (jnp.tanh(h @ k), None), x, p["w"])[0]

    def loss(ad, frozen):
        if base == "nf4, plain":
            frozen = jlora.dequantize(frozen)
        return jnp.sum(jlora.lora(fwd)(jlora.combine(ad, frozen), x) ** 2)

    mem = jax.jit(jax.grad(loss)).lower(adapters, frozen).compile().memory_analysis()
    base_bytes = sum(a.nbytes for a in jax.tree.leaves(frozen))
    return base_bytes, mem.temp_size_in_bytes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    args = p.parse_args(argv)
    mib = 2.0**20
    print(
        f"scanned stack of d={args.d} kernels (one kernel: {args.d**2 * 4 / mib:.2f} MiB "
        f"in float32), LoRA r=4; planned by XLA on {jax.devices()[0].platform}"
    )
    print("| layers | base | base bytes (MiB) | step temporaries (MiB) |")
    print("|---|---|---|---|")
    rows = []
    for layers in args.layers:
        for base in ("float32", "nf4", "nf4, plain"):
            b, t = step_memory(layers, args.d, base)
            rows.append((layers, base, b, t))
            print(f"| {layers} | {base} | {b / mib:.3f} | {t / mib:.2f} |")
    return rows


if __name__ == "__main__":
    main()
