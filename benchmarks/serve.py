"""Serving many adapters: one KV-cached generate call over a batch whose rows use 1, 4,
16 or 64 distinct adapters, against one adapter for the whole batch and the merged base.

    python benchmarks/serve.py            # GPT 4 x 512 (the examples' cached model),
                                          # batch 64, prompts of 32, 32 new tokens, r=8
    python benchmarks/serve.py --quick    # a small model, for a smoke run

Candidates, each one jitted greedy `generate` (prefill, then a scanned decode):
  merged       the base with one adapter merged into its kernels (the floor)
  single       one adapter for every row: `jlora.lora(model.apply)` on its params
  mixed N      a stacked set of N adapters, row i served by adapter i mod N:
               `jlora.lora(model.apply, adapter_ids=ids)`, the KV cache's batch axis
               declared by `in_axes`/`out_axes`
  peft ...     with the [torch] extra: the same GPT-2 shapes in PyTorch
               (`transformers.GPT2LMHeadModel`, random weights) with PEFT LoRA r=8 on
               its attention (`c_attn`, `attn.c_proj`): `single` one active adapter,
               `mixed N` PEFT's `generate(..., adapter_names=names)`, which runs the base
               once and each adapter present on its own sub-batch
Adapters are r=8 on the four attention kernels, b nonzero. Median time per generated
token over alternated rounds, ratios to each library's `single` and to jlora's
`merged`. Written to docs/benchmarks.md with an SVG plot (time per token against the
number of distinct adapters).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))
from instruct.model import GPT, GPTConfig, generate, init_params  # noqa: E402
from run import device_line, write_section  # noqa: E402

import jlora  # noqa: E402

CACHE_AXES = {"k": 1, "v": 1, "index": None}
COUNTS = (1, 4, 16, 64)


def candidates(cfg, batch: int, prompt_len: int, new: int, rank: int, counts):
    params = init_params(cfg, jax.random.key(0))
    config = jlora.LoraConfig(rank, 2.0 * rank)  # GPT's four attention kernels
    adapters = []
    for i in range(max(counts)):
        lp = jlora.init(jax.random.key(100 + i), params, config)
        ad, _ = jlora.split(lp)
        ad = jax.tree.map(
            lambda t, i=i: t + 0.01 * jax.random.normal(jax.random.key(i), t.shape), ad
        )
        adapters.append(ad)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, cfg.vocab_size, (batch, prompt_len)).tolist()

    def gen(apply, p):
        return lambda: generate(apply, p, cfg, prompts, max_new_tokens=new)

    out = {
        "merged": gen(GPT(cfg).apply, jlora.merge(jlora.combine(adapters[0], params))),
        "single": gen(jlora.lora(GPT(cfg).apply), jlora.combine(adapters[0], params)),
    }
    for n in counts:
        stacked = jlora.stack_adapters({f"a{i}": adapters[i] for i in range(n)})
        ids = np.arange(batch) % n
        apply = jlora.lora(
            GPT(cfg).apply,
            adapter_ids=ids,
            in_axes=(None, 0, 0, 0, CACHE_AXES),
            out_axes=(0, CACHE_AXES),
        )
        out[f"mixed {n}"] = gen(apply, jlora.combine(stacked, params))
    return out


def peft_candidates(cfg, batch: int, prompt_len: int, new: int, rank: int, counts):
    """PyTorch + PEFT on the same shapes (see the module docstring); `{}` without the
    [torch] extra."""
    try:
        import peft
        import torch
        import transformers
    except ImportError:
        return {}
    torch.manual_seed(0)
    hf = transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
    )
    model = transformers.GPT2LMHeadModel(hf).eval()
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=r".*attn\.(c_attn|c_proj)",
        fan_in_fan_out=True,
        init_lora_weights=False,  # (b nonzero, as jlora's)
    )
    pm = peft.get_peft_model(model, config, adapter_name="a0")
    for i in range(1, max(counts)):
        pm.add_adapter(f"a{i}", config)
    pm.set_adapter("a0")
    pm.eval()
    rng = np.random.default_rng(0)
    prompts = torch.tensor(rng.integers(1, cfg.vocab_size, (batch, prompt_len)))
    mask = torch.ones_like(prompts)

    def gen(names=None):
        kw = {} if names is None else {"adapter_names": names}

        def run():
            with torch.no_grad():
                out = pm.generate(
                    input_ids=prompts,
                    attention_mask=mask,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=0,
                    **kw,
                )
            return out[:, prompt_len:].tolist()

        return run

    out = {"peft single": gen()}
    for n in counts:
        out[f"peft mixed {n}"] = gen([f"a{i % n}" for i in range(batch)])
    return out


def plot_svg(counts, per_token, path):
    """Time per token against the number of distinct adapters, with the single-adapter
    and merged floors as lines."""
    w, h, pad = 480, 300, 50
    ys = [per_token[f"mixed {n}"] for n in counts] + [
        per_token["single"],
        per_token["merged"],
    ]
    ys += [per_token[f"peft mixed {n}"] for n in counts if f"peft mixed {n}" in per_token]
    top = max(ys) * 1.15
    xs = np.log2(np.asarray(counts, float))
    x_of = lambda v: pad + (w - 2 * pad) * (v - xs[0]) / max(xs[-1] - xs[0], 1)  # noqa: E731
    y_of = lambda v: h - pad - (h - 2 * pad) * v / top  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        'font-family="sans-serif" font-size="11">',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
        f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">distinct adapters in the '
        "batch of 64</text>",
        f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" '
        'text-anchor="middle">ms per generated token</text>',
    ]
    for n, x in zip(counts, xs):
        parts.append(
            f'<text x="{x_of(x):.1f}" y="{h - pad + 14}" text-anchor="middle">{n}</text>'
        )
    for frac in (0.0, 0.5, 1.0):
        v = top * frac
        parts.append(
            f'<text x="{pad - 4}" y="{y_of(v) + 4:.1f}" text-anchor="end">'
            f"{1e3 * v:.2f}</text>"
        )
    for name, color in (("single", "#888"), ("merged", "#2a2")):
        y = y_of(per_token[name])
        parts.append(
            f'<line x1="{pad}" y1="{y:.1f}" x2="{w - pad}" y2="{y:.1f}" stroke="{color}" '
            'stroke-dasharray="4 3"/>'
            f'<text x="{w - pad + 2}" y="{y + 4:.1f}" fill="{color}">{name}</text>'
        )
    pts = " ".join(
        f"{x_of(x):.1f},{y_of(per_token[f'mixed {n}']):.1f}" for n, x in zip(counts, xs)
    )
    parts.append(f'<polyline points="{pts}" fill="none" stroke="#c33" stroke-width="2"/>')
    parts.append(f'<text x="{pad + 6}" y="{pad - 8}" fill="#c33">jlora mixed batch</text>')
    if all(f"peft mixed {n}" in per_token for n in counts):
        pts = " ".join(
            f"{x_of(x):.1f},{y_of(per_token[f'peft mixed {n}']):.1f}"
            for n, x in zip(counts, xs)
        )
        parts.append(
            f'<polyline points="{pts}" fill="none" stroke="#36c" stroke-width="2"/>'
        )
        parts.append(
            f'<text x="{pad + 130}" y="{pad - 8}" fill="#36c">PyTorch + PEFT '
            "adapter_names</text>"
        )
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small model, few rounds")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch + PEFT out")
    args = p.parse_args(argv)
    if args.quick:
        cfg = GPTConfig(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)
        batch, prompt_len, new, counts = 8, 4, 4, (1, 4, 8)
        args.rounds = min(args.rounds, 2)
    else:
        cfg = GPTConfig(vocab_size=4096, n_positions=128, n_embd=512, n_layer=4, n_head=8)
        batch, prompt_len, new, counts = args.batch, 32, 32, COUNTS
    cands = candidates(cfg, batch, prompt_len, new, 8, counts)
    if not args.no_torch:
        cands.update(peft_candidates(cfg, batch, prompt_len, new, 8, counts))
    outs = {name: run() for name, run in cands.items()}  # compile; and a check:
    # (the mixed batch of one adapter generates what that adapter alone does)
    same_as_single = outs[f"mixed {counts[0]}"] == outs["single"]
    times = {name: [] for name in cands}
    names = list(cands)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            cands[name]()
            times[name].append(time.perf_counter() - t0)
    tokens = batch * new
    per_token = {n: statistics.median(t) / tokens for n, t in times.items()}
    lines = [
        f"Greedy generation, GPT {cfg.n_layer} x {cfg.n_embd} (vocabulary "
        f"{cfg.vocab_size}), batch {batch}, prompts of {prompt_len} tokens, {new} new "
        f"tokens, LoRA r=8 on the four attention kernels; median of {args.rounds} "
        f"alternated rounds. {device_line()}",
        "",
        "| batch served by | ms per generated token | / single adapter (same library) "
        "| / jlora merged |",
        "|---|---|---|---|",
    ]
    for name in names:
        fixed = {"merged": "the merged base (one adapter)", "single": "one adapter"}
        torch_row = name.startswith("peft ")
        short = name.removeprefix("peft ")
        label = fixed.get(short) or f"{short.split()[1]} distinct adapters (mixed)"
        single = "peft single" if torch_row else "single"
        lines.append(
            f"| {'PyTorch + PEFT: ' if torch_row else ''}{label} | "
            f"{1e3 * per_token[name]:.3f} | "
            f"{per_token[name] / per_token[single]:.2f} | "
            f"{per_token[name] / per_token['merged']:.2f} |"
        )
    lines.append("")
    lines.append(
        f"A mixed batch of one adapter generates the same tokens as that adapter alone: "
        f"{same_as_single}."
    )
    text = "\n".join(lines)
    print(text)
    if not args.no_write and not args.quick:
        platform = jax.devices()[0].platform
        svg = HERE.parent / "docs" / f"serve_{platform}.svg"
        plot_svg(counts, per_token, svg)
        text += f"\n\n![time per token against distinct adapters]({svg.name})"
        write_section(text, f"serve-{platform}", "python benchmarks/serve.py")
    return {"per_token": per_token, "same_as_single": same_as_single, "counts": counts}


if __name__ == "__main__":
    main(sys.argv[1:])
