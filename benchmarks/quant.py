"""LoRA on a quantized base: bytes and step time of the bench GPT on float32, bfloat16,
int8 and NF4 bases.

    python benchmarks/quant.py            # GPT 4 x 512, seq 128, batch 8, LoRA r=8 on q, v
    python benchmarks/quant.py --quick    # a small model, for a smoke run

Each base runs the lean LoRA step (adapters differentiated, the base an argument) of
`gpt.GPT`, one jitted AdamW step:
  float32     the model in float32
  bfloat16    the model in bfloat16 (params and compute)
  int8, nf4   the bfloat16 model's kernels quantized by `jlora.quantize` (embedding,
              norms and biases stay bfloat16), dequantized to bfloat16 at each use
  qwix nf4    qwix's LoRA (`LoraRule` on query and value, `QtRule` on every other
              kernel, `weight_qtype="nf4"`, tiles of 64) on the same bfloat16 model,
              when qwix (the [bench] extra) is installed; its int4 arrays are counted
              at 4 bits (they report a byte per element)
For each: the frozen base's argument bytes and the step's temporary bytes (both from
`compiled.memory_analysis()`), the quantized kernels' bytes against the same kernels in
float32, and the median step time over alternated rounds (ratios to the bfloat16 step).
Written to docs/benchmarks.md.
"""

from __future__ import annotations

import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from gpt import GPT, GPTConfig, next_token_loss  # noqa: E402
from run import (  # noqa: E402
    alternate,
    bench_args,
    device_line,
    lean_lora_candidate,
    stepping,
    write_section,
)

import jlora  # noqa: E402

BASES = ("float32", "bfloat16", "int8", "nf4")


def candidate(cfg: GPTConfig, base: str, rank: int, batch: int):
    dtype = jnp.float32 if base == "float32" else jnp.bfloat16
    cfg = GPTConfig(**{**cfg.__dict__, "dtype": dtype})
    ids = jax.random.randint(jax.random.key(0), (batch, cfg.seq), 0, cfg.vocab)
    model = GPT(cfg)
    params = model.init(jax.random.key(1), ids)["params"]
    kernels = None
    if base in ("int8", "nf4"):
        float_kernel_bytes = sum(
            4 * n.value.size
            for n in jlora._targets.walk(params).nodes
            if jlora._init.is_default_target(n.path, n.value)
        )
        params = jlora.quantize(params, base)
        kernels = (
            sum(n.value.nbytes for n in jlora._targets.walk(params).nodes
                if isinstance(n.value, jlora.Quantized)),
            float_kernel_bytes,
        )  # fmt: skip
    config = jlora.LoraConfig(rank, 2 * rank, targets=r"(query|value)/kernel$")
    c = lean_lora_candidate(model, params, config, ids)
    mem, frozen = c["mem"], c["frozen"]
    base_bytes = sum(_packed_bytes(x) for x in jax.tree.leaves(frozen))
    return dict(run=c["run"], base_bytes=base_bytes, arg_bytes=mem.argument_size_in_bytes,
                temp=mem.temp_size_in_bytes, kernels=kernels, times=[])  # fmt: skip


def _packed_bytes(x) -> float:
    if jnp.issubdtype(x.dtype, jnp.integer):
        return x.size * jnp.iinfo(x.dtype).bits / 8
    return x.nbytes


def qwix_candidate(cfg: GPTConfig, rank: int, batch: int):
    """qwix's NF4 LoRA on the bfloat16 model (tiles of 64 along the contraction, no
    double quantization): LoRA on query and value, every other kernel quantized too;
    gradients over its lora params only. None if qwix is not installed."""
    try:
        import qwix
    except ImportError:
        return None
    from flax import traverse_util

    cfg = GPTConfig(**{**cfg.__dict__, "dtype": jnp.bfloat16})
    ids = jax.random.randint(jax.random.key(0), (batch, cfg.seq), 0, cfg.vocab)
    model = GPT(cfg)
    nf4 = dict(weight_qtype="nf4", tile_size=64)
    provider = qwix.LoraProvider([
        qwix.LoraRule(module_path=r".*(query|value)", rank=rank, alpha=2.0 * rank, **nf4),
        qwix.QtRule(module_path=r".*", **nf4),
    ])  # fmt: skip
    lora_model = qwix.apply_lora_to_model(model, provider)
    flat = traverse_util.flatten_dict(lora_model.init(jax.random.key(1), ids)["params"])
    train = traverse_util.unflatten_dict({k: v for k, v in flat.items() if "lora" in k[-1]})
    frozen = traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if "lora" not in k[-1]}
    )
    quantized = [v for v in flat.values() if type(v).__name__ == "WithAux"]
    kernels = (  # (an int4 array reports a byte per element: counted at 4 bits)
        sum(_packed_bytes(x) for q in quantized for x in jax.tree.leaves(q)),
        sum(4 * int(np.prod(q.shape)) for q in quantized),
    )
    def loss_fn(t, frozen, ids):
        params = traverse_util.unflatten_dict(
            {**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(t)}
        )
        return next_token_loss(lora_model.apply({"params": params}, ids), ids)

    c = stepping(loss_fn, train, frozen, ids)
    run, mem = c["run"], c["mem"]
    base_bytes = sum(_packed_bytes(x) for x in jax.tree.leaves(frozen))
    return dict(run=run, base_bytes=base_bytes, arg_bytes=mem.argument_size_in_bytes,
                temp=mem.temp_size_in_bytes, kernels=kernels, times=[])  # fmt: skip


def main(argv=None):
    args = bench_args(__doc__).parse_args(argv)
    if args.quick:
        cfg = GPTConfig(vocab=256, d=128, heads=4, layers=1, seq=32)
        args.rounds = min(args.rounds, 2)
    else:
        cfg = GPTConfig()
    cands = {b: candidate(cfg, b, 8, args.batch) for b in BASES}
    qwix_nf4 = qwix_candidate(cfg, 8, args.batch)
    if qwix_nf4 is not None:
        cands["qwix nf4"] = qwix_nf4
    steps = alternate(cands, args.rounds, "bfloat16")
    mib = 2.0**20
    med = {n: statistics.median(c["times"]) for n, c in cands.items()}
    lines = [
        f"Bench GPT {cfg.layers} x {cfg.d}, seq {cfg.seq}, batch {args.batch}, LoRA r=8 on "
        f"query and value; {args.rounds} rounds of {steps} steps, alternating. "
        f"{device_line()}",
        "",
        "| base | base bytes (MiB) | step arguments (MiB) | step temporaries (MiB) | "
        "quantized kernels / float32 | step (ms), median | / bfloat16 step |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, c in cands.items():
        ratio = f"{c['kernels'][0] / c['kernels'][1]:.3f}" if c["kernels"] else "–"
        lines.append(
            f"| {n} | {c['base_bytes'] / mib:.1f} | {c['arg_bytes'] / mib:.1f} | "
            f"{c['temp'] / mib:.1f} | {ratio} | {1e3 * med[n]:.1f} | "
            f"{med[n] / med['bfloat16']:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    if not args.no_write and not args.quick:
        write_section(
            text, f"quant-{jax.devices()[0].platform}", "python benchmarks/quant.py"
        )
    return cands


if __name__ == "__main__":
    with jax.numpy_dtype_promotion("standard"):
        main(sys.argv[1:])
