"""Per-device memory of sharded LoRA training on a mesh of 8 devices.

    python benchmarks/sharding.py

Two tables, both from the compiled steps' memory analysis (8 simulated CPU devices
where no accelerators are present; step time on simulated devices of one CPU is no
speed claim, so only bytes are reported):

1. examples/sharded_training.py's steps: FSDP over 8 devices vs replicated.
2. A GPT whose kernels are boxed with logical axis names, initialised and trained under
   `jax.set_mesh` + `nn.logical_axis_rules` (FSDP and tensor-parallel rules): jlora
   (`strict=True`, so every adapted kernel stays factored through Flax's sharding
   constraints) vs full fine-tuning vs the floor, a step that backpropagates through
   the frozen model without any weight gradient.
"""

import os
import pathlib
import sys

# 8 simulated devices on a CPU-only machine; must be set before jax is imported.
_flags = os.environ.get("XLA_FLAGS", "")
if "host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import run  # noqa: E402
import sharded_training  # noqa: E402
from gpt import GPT, GPTConfig, next_token_loss  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jlora  # noqa: E402

LOGICAL_RULES = {
    "fsdp": ((8,), ("fsdp",), (("batch", "fsdp"), ("embed", "fsdp"))),
    "tensor parallel": (
        (2, 4),
        ("data", "model"),
        (("batch", "data"), ("heads", "model"), ("mlp", "model"), ("vocab", "model")),
    ),
}


def logical_steps(layout: str, cfg: GPTConfig, batch: int = 8):
    """Memory analysis of jlora, full fine-tuning and floor steps under the mesh."""
    shape, names, rules = LOGICAL_RULES[layout]
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))
    model = GPT(cfg)
    ids = jax.random.randint(jax.random.key(0), (batch, cfg.seq), 0, cfg.vocab)
    tx = optax.adamw(1e-3)
    out = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(model.init, jax.random.key(1), ids)
        specs = nn.get_partition_spec(abstract)
        shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
        variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(1), ids)
        ids = jax.device_put(ids, NamedSharding(mesh, P(rules[0][1])))
        config = jlora.LoraConfig(8, 16, targets=r"(query|value)/kernel$")
        lp = jlora.init(jax.random.key(2), variables, config)
        adapters, base = jlora.split(lp)
        apply = jlora.lora(model.apply, strict=True)

        def lora_step(adapters, opt_state, base, ids):
            def loss_fn(ad):
                return next_token_loss(apply(jlora.combine(ad, base), ids), ids)

            loss, grads = jax.value_and_grad(loss_fn)(adapters)
            updates, opt_state = tx.update(grads, opt_state, adapters)
            return optax.apply_updates(adapters, updates), opt_state, loss

        def full_step(params, opt_state, ids):
            loss, grads = jax.value_and_grad(
                lambda p: next_token_loss(model.apply(p, ids), ids)
            )(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        def floor_step(delta, opt_state, params, ids):
            loss, grads = jax.value_and_grad(
                lambda d: next_token_loss(model.apply(params, ids, d), ids)
            )(delta)
            updates, opt_state = tx.update(grads, opt_state, delta)
            return optax.apply_updates(delta, updates), opt_state, loss

        delta = jnp.zeros((cfg.d,), cfg.dtype)
        args = {
            "jlora": (lora_step, (adapters, tx.init(adapters), base, ids)),
            "full fine-tuning": (full_step, (variables, tx.init(variables), ids)),
            "floor (no weight gradient)": (
                floor_step,
                (delta, tx.init(delta), variables, ids),
            ),
        }
        for name, (fn, a) in args.items():
            compiled = jax.jit(fn, donate_argnums=(0, 1)).lower(*a).compile()
            out[name] = compiled.memory_analysis()
        explained = jlora.explain(model.apply, lp, ids)
    factored = all(
        "sharding_constraint" in used and not any(r.startswith("materialize") for r in used)
        for used in explained.values()
    )
    return out, factored, len(explained)


def main():
    rep, fsdp, mem = sharded_training.main([])
    cfg = "GPT 2 x 256, 4 heads, seq 64, batch 8, vocab 1024, float32; LoRA r=8 on q, v"
    lines = [
        f"Device: {run.device_line()}. Model: {cfg}; AdamW, lean route.",
        "",
        "| layout | per-device argument bytes (params + adapters + optimizer state + batch)"
        " | per-device temp bytes |",
        "|---|---|---|",
    ]
    for name, m in mem.items():
        lines.append(
            f"| {name} | {m.argument_size_in_bytes:,} | {m.temp_size_in_bytes:,} |"
        )
    gap = max(abs(a - b) for a, b in zip(rep, fsdp))
    lines += ["", f"Losses over {len(rep)} steps agree to {gap:.1e} (replicated vs FSDP)."]

    gpt = GPTConfig(vocab=1024, d=256, heads=4, layers=2, seq=64, logical=True)
    lines += [
        "",
        "Logical partitioning under the mesh: the same GPT with every kernel boxed by "
        "`nn.with_logical_partitioning`, initialised with `jax.jit(model.init, "
        "out_shardings=...)` and trained under `jax.set_mesh` + `nn.logical_axis_rules` "
        "(Auto axes). jlora runs with `strict=True`: no adapted kernel is ever "
        "materialized. Donated params and optimizer state.",
        "",
        "| rules | candidate | per-device argument bytes | per-device temp bytes "
        "| temp / full fine-tuning |",
        "|---|---|---|---|---|",
    ]
    for layout in LOGICAL_RULES:
        with jax.numpy_dtype_promotion("standard"):  # optax's adamw
            rows, factored, n = logical_steps(layout, gpt)
        if not factored:
            raise SystemExit(f"{layout}: an adapted kernel was materialized")
        full = rows["full fine-tuning"].temp_size_in_bytes
        for name, m in rows.items():
            lines.append(
                f"| {layout} | {name} | {m.argument_size_in_bytes:,} | "
                f"{m.temp_size_in_bytes:,} | {m.temp_size_in_bytes / full:.3f} |"
            )
        lines.append(f"| {layout} | (explain: {n} kernels, all factored) | | | |")
    text = "\n".join(lines)
    print(text)
    run.write_section(text, "sharding-memory", "python benchmarks/sharding.py")


if __name__ == "__main__":
    main()
