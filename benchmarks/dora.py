"""DoRA against LoRA: the training step of the bench GPT, jlora and PyTorch + PEFT.

    python benchmarks/dora.py            # GPT 4 x 512, seq 128, batch 8, r=8 on q, v
    python benchmarks/dora.py --quick    # one 256-wide layer, for a smoke run

Candidates, each one optimizer step (AdamW) of the lean route (adapters differentiated,
the base an argument) on the float32 model:
  jlora lora    `LoraConfig(8, 16, targets=query|value)`
  jlora dora    the same with `use_dora=True` (the column norm taken from the factors:
                `||W||^2 + 2s (A^T W) . B + s^2 B^T (A^T A) B`, never `W + s A @ B`)
  peft lora     the same model in PyTorch with PEFT (the [torch] extra)
  peft dora     PEFT's `use_dora=True`, which forms `W + s A @ B` each step for the norm
Timed in one process, alternating, after warm-up; the medians and the ratios DoRA / LoRA
per library are written to docs/benchmarks.md. Also the step's temporary bytes
(`compiled.memory_analysis()`) for the jlora candidates.
"""

from __future__ import annotations

import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from gpt import GPT, GPTConfig  # noqa: E402
from run import (  # noqa: E402
    alternate,
    bench_args,
    device_line,
    lean_lora_candidate,
    write_section,
)

import jlora  # noqa: E402


def jlora_candidate(cfg: GPTConfig, rank: int, ids, use_dora: bool):
    model = GPT(cfg)
    params = model.init(jax.random.key(1), ids)["params"]
    config = jlora.LoraConfig(
        rank, 2 * rank, targets=r"(query|value)/kernel$", use_dora=use_dora
    )
    c = lean_lora_candidate(model, params, config, ids)
    return dict(run=c["run"], temp=c["mem"].temp_size_in_bytes, times=[])


def peft_candidate(cfg: GPTConfig, rank: int, ids, use_dora: bool):
    try:
        import torch_peft
    except ImportError:
        return None
    try:
        c = torch_peft.make_candidate(cfg, rank, np.asarray(ids), use_dora=use_dora)
    except ImportError:  # (no torch / peft: the [torch] extra)
        return None
    return dict(run=c["run"], temp=None, times=[])


def main(argv=None):
    args = bench_args(__doc__).parse_args(argv)
    if args.quick:
        # (wide kernels, few tokens: a kernel-sized temporary would stand out)
        cfg = GPTConfig(vocab=128, d=256, heads=4, layers=1, seq=8)
        args.rounds = min(args.rounds, 2)
    else:
        cfg = GPTConfig(dtype=jnp.float32)
    ids = jax.random.randint(jax.random.key(0), (args.batch, cfg.seq), 0, cfg.vocab)
    cands = {
        "jlora lora": jlora_candidate(cfg, 8, ids, False),
        "jlora dora": jlora_candidate(cfg, 8, ids, True),
    }
    for name, dora in (("peft lora", False), ("peft dora", True)):
        c = peft_candidate(cfg, 8, ids, dora)
        if c is not None:
            cands[name] = c
    steps = alternate(cands, args.rounds, "jlora lora")
    med = {n: statistics.median(c["times"]) for n, c in cands.items()}
    mib = 2.0**20
    lines = [
        f"Bench GPT {cfg.layers} x {cfg.d}, seq {cfg.seq}, batch {args.batch}, float32, "
        f"r=8 on query and value; {args.rounds} rounds of {steps} steps, alternating. "
        f"{device_line()}",
        "",
        "| candidate | step (ms), median | / LoRA step of the same library | "
        "step temporaries (MiB) |",
        "|---|---|---|---|",
    ]
    for n, c in cands.items():
        lib = n.split()[0]
        temp = "–" if c["temp"] is None else f"{c['temp'] / mib:.1f}"
        lines.append(
            f"| {n} | {1e3 * med[n]:.1f} | {med[n] / med[lib + ' lora']:.2f} | {temp} |"
        )
    text = "\n".join(lines)
    print(text)
    if not args.no_write and not args.quick:
        write_section(
            text, f"dora-{jax.devices()[0].platform}", "python benchmarks/dora.py"
        )
    return cands, med


if __name__ == "__main__":
    with jax.numpy_dtype_promotion("standard"):
        main(sys.argv[1:])
