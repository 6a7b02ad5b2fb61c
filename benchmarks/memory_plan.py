"""Will it fit? XLA's memory plan of the LoRA training step at Llama sizes, on no hardware.

    python benchmarks/memory_plan.py                      # Llama 1B, 7B, 13B shapes
    python benchmarks/memory_plan.py --sizes 7B --devices 1
    python benchmarks/memory_plan.py --config my/config.json   # a model of your own
    python benchmarks/memory_plan.py --plot plan.svg

The step is compiled, never run: every input is an abstract `jax.ShapeDtypeStruct`, and
`jit(step).lower(...).compile().memory_analysis()` gives the argument, temporary and
output bytes per device. The model is a Llama decoder (RMSNorm, grouped-query attention
with rotary positions, SwiGLU MLP) written with a scanned layer stack and remat per
layer, batch 1 x 2048 tokens. LoRA r=16 on q, k, v, o, AdamW over the adapters only
(the lean route), on float32, bfloat16, int8 and NF4 bases (the quantized ones from the
bfloat16 kernels; embeddings and norms stay bfloat16), beside full fine-tuning in
bfloat16 with float32 AdamW moments. With `--devices 8` (8 fake CPU devices), every
array is sharded FSDP-style: its largest axis that 8 divides, the layer axis excepted.

The plan is XLA's CPU compiler's (the table says so). A GPU's plan differs: its
scheduler and fusions are other, and it needs workspace for its kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if "--devices" in sys.argv and sys.argv[sys.argv.index("--devices") + 1] != "1":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import jlora  # noqa: E402

SIZES = {  # (hidden, intermediate, layers, heads, kv heads, vocab): Llama 3.2 1B, Llama 2
    "1B": (2048, 8192, 16, 32, 8, 128256),
    "7B": (4096, 11008, 32, 32, 32, 32000),
    "13B": (5120, 13824, 40, 40, 40, 32000),
}
BASES = ("float32", "bfloat16", "int8", "nf4")


class Layer(nn.Module):
    hidden: int
    inter: int
    heads: int
    kv: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, _):
        def dense(n, name):
            return nn.Dense(
                n, use_bias=False, dtype=self.dtype, param_dtype=self.dtype, name=name
            )

        hd = self.hidden // self.heads
        b, t, _ = x.shape
        h = nn.RMSNorm(dtype=self.dtype, param_dtype=self.dtype, name="norm1")(x)
        q = dense(self.heads * hd, "q")(h).reshape(b, t, self.heads, hd)
        k = dense(self.kv * hd, "k")(h).reshape(b, t, self.kv, hd)
        v = dense(self.kv * hd, "v")(h).reshape(b, t, self.kv, hd)
        pos = jnp.arange(t)[:, None] / (10000 ** (jnp.arange(0, hd, 2) / hd))
        cos, sin = jnp.cos(pos)[None, :, None], jnp.sin(pos)[None, :, None]

        def rope(z):
            z1, z2 = z[..., ::2], z[..., 1::2]
            return jnp.concatenate([z1 * cos - z2 * sin, z1 * sin + z2 * cos], -1).astype(
                z.dtype
            )

        att = jax.nn.dot_product_attention(rope(q), rope(k), v, is_causal=True)
        x = x + dense(self.hidden, "o")(att.reshape(b, t, -1))
        h = nn.RMSNorm(dtype=self.dtype, param_dtype=self.dtype, name="norm2")(x)
        gate = nn.silu(dense(self.inter, "gate")(h)) * dense(self.inter, "up")(h)
        return x + dense(self.hidden, "down")(gate), None


class Llama(nn.Module):
    hidden: int
    inter: int
    layers: int
    heads: int
    kv: int
    vocab: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.hidden, dtype=self.dtype, param_dtype=self.dtype)(ids)
        stack = nn.scan(
            nn.remat(Layer),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.layers,
        )
        x, _ = stack(
            self.hidden, self.inter, self.heads, self.kv, self.dtype, name="layers"
        )(x, None)
        x = nn.RMSNorm(dtype=self.dtype, param_dtype=self.dtype)(x)
        return nn.Dense(
            self.vocab,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.dtype,
            name="lm_head",
        )(x)


def loss_of(logits, ids):
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def fsdp(mesh, tree):
    """Each array's largest axis that the mesh size divides (not the layer axis 0 of a
    stacked array) sharded over "fsdp"."""
    n = mesh.devices.size

    def spec(path, x):
        shape = x.shape
        stacked = any("layers" in str(k) for k in path) and len(shape) >= 2
        axes = [i for i in range(len(shape)) if not (stacked and i == 0)]
        axes = [i for i in axes if shape[i] % n == 0]
        names = [None] * len(shape)
        if axes:
            names[max(axes, key=lambda i: shape[i])] = "fsdp"
        return jax.ShapeDtypeStruct(
            shape, x.dtype, sharding=NamedSharding(mesh, PartitionSpec(*names))
        )

    return jax.tree_util.tree_map_with_path(spec, tree)


def plan(size, base, devices, seq=2048, full=False):
    hidden, inter, layers, heads, kv, vocab = size
    dtype = jnp.float32 if base == "float32" else jnp.bfloat16
    model = Llama(hidden, inter, layers, heads, kv, vocab, dtype)
    ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    params = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    )["params"]
    auto = (jax.sharding.AxisType.Auto,)
    mesh = jax.make_mesh((devices,), ("fsdp",), axis_types=auto) if devices > 1 else None
    tx = optax.adamw(1e-4)
    if full:  # full fine-tuning: every parameter trained, float32 moments
        opt = jax.eval_shape(
            lambda p: optax.adamw(1e-4, mu_dtype=jnp.float32).init(p), params
        )
        args = (params, opt)
        if mesh is not None:
            args = fsdp(mesh, args)
        full_tx = optax.adamw(1e-4, mu_dtype=jnp.float32)

        def step(p, o, ids):
            g = jax.grad(lambda p: loss_of(model.apply({"params": p}, ids), ids))(p)
            u, o = full_tx.update(g, o, p)
            return optax.apply_updates(p, u), o

        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(*args, ids)
        return lowered.compile().memory_analysis()
    config = jlora.LoraConfig(
        16,
        32,
        targets=r"layers/(q|k|v|o)/kernel$",
        layout={r"layers/.*kernel$": jlora.Layout((1,), (2,), (0,))},
    )

    def build(params):
        if base in ("int8", "nf4"):
            params = jlora.quantize(params, base)
        return jlora.split(jlora.init(jax.random.key(1), params, config))

    adapters, frozen = jax.eval_shape(build, params)
    opt = jax.eval_shape(tx.init, adapters)
    args = (adapters, opt, frozen)
    if mesh is not None:
        args = fsdp(mesh, args)
    apply = jlora.lora(model.apply)

    def step(ad, o, frozen, ids):
        g = jax.grad(
            lambda ad: loss_of(apply({"params": jlora.combine(ad, frozen)}, ids), ids)
        )(ad)
        u, o = tx.update(g, o, ad)
        return optax.apply_updates(ad, u), o

    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(*args, ids)
    return lowered.compile().memory_analysis()


def from_config(path):
    hf = json.loads(open(path).read())
    return (
        hf["hidden_size"],
        hf["intermediate_size"],
        hf["num_hidden_layers"],
        hf["num_attention_heads"],
        hf.get("num_key_value_heads", hf["num_attention_heads"]),
        hf["vocab_size"],
    )


def write_svg(rows, path):
    """A stacked bar per (model, base): arguments, temporaries, outputs (GiB per
    device), as a plain SVG file (no plotting library needed)."""
    gib = 2.0**30
    colors = ("#4c72b0", "#dd8452", "#55a868")
    width, height, bar = 90 * len(rows) + 80, 360, 50
    top = max(r[2] + r[3] + r[4] for r in rows) / gib or 1.0
    scale = (height - 90) / top
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">'
    ]
    for i, (name, base, *parts, _total) in enumerate(rows):
        x, y = 60 + 90 * i, height - 50
        for part, color in zip(parts, colors):
            h = part / gib * scale
            y -= h
            out.append(
                f'<rect x="{x}" y="{y:.1f}" width="{bar}" height="{h:.1f}" fill="{color}"/>'
            )
        out.append(f'<text x="{x}" y="{height - 35}">{name}</text>')
        out.append(f'<text x="{x}" y="{height - 22}">{base[:12]}</text>')
        out.append(f'<text x="{x}" y="{y - 4:.1f}">{sum(parts) / gib:.1f}</text>')
    for k, (label, color) in enumerate(
        zip(("arguments", "temporaries", "outputs"), colors)
    ):
        out.append(
            f'<rect x="{60 + 110 * k}" y="8" width="10" height="10" fill="{color}"/>'
        )
        out.append(f'<text x="{74 + 110 * k}" y="17">{label}</text>')
    out.append('<text x="4" y="40">GiB per device</text></svg>')
    with open(path, "w") as f:
        f.write("\n".join(out))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES))
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--config", help="a Hugging Face config.json of a Llama-family model")
    p.add_argument("--plot", help="write an SVG bar chart of the per-device bytes here")
    args = p.parse_args(argv)
    sizes = (
        {"config": from_config(args.config)}
        if args.config
        else {s: SIZES[s] for s in args.sizes}
    )
    gib = 2.0**30
    print(
        f"Planned by XLA's {jax.devices()[0].platform.upper()} compiler, {args.devices} "
        f"device(s), batch 1 x {args.seq}, LoRA r=16 on q, k, v, o; GiB per device."
    )
    print("| model | base | arguments | temporaries | outputs | total |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name, size in sizes.items():
        for base in (*BASES, "full fine-tuning"):
            m = plan(
                size,
                base if base != "full fine-tuning" else "bfloat16",
                args.devices,
                args.seq,
                full=base == "full fine-tuning",
            )
            a, t, o = m.argument_size_in_bytes, m.temp_size_in_bytes, m.output_size_in_bytes
            alias = getattr(m, "alias_size_in_bytes", 0)
            total = a + t + o - alias
            rows.append((name, base, a, t, o, total))
            print(
                f"| {name} | {base} | {a / gib:.2f} | {t / gib:.2f} | {o / gib:.2f} | "
                f"{total / gib:.2f} |",
                flush=True,
            )
    if args.plot:
        write_svg(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
