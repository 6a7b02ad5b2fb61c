"""NNX training step: jlora.nnx against nnx.LoRALinear and qwix on the same NNX model.

    python benchmarks/nnx.py            # the NNX twin of the bench GPT, 4 x 512, seq 128
    python benchmarks/nnx.py --quick    # a small model, for a smoke run

Candidates, one AdamW step each on the NNX twin of `gpt.GPT` (LoRA r=8 on query and
value), all as an NNX user writes them: `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`
and an `nnx.jit` step with `nnx.value_and_grad(argnums=nnx.DiffState(0, nnx.LoRAParam))`:
  jlora.nnx        jlora.nnx.apply on the plain model; its own call runs factored
  nnx.LoRALinear   the model written with flax.nnx.LoRALinear for query and value
  qwix             qwix.apply_lora_to_model on the plain model (when qwix is installed)
and, beside them, jlora's functional route on the same model (`nnx.split`,
`jlora.init`, `jlora.lora`, a `jax.jit` step over the adapters) and
`nnx.LoRALinear` the same way (`nnx.split` once, `jax.jit`), which shows what the
`nnx.jit` step's own graph handling costs. Timed in one process, alternating, after
warm-up; medians over rounds, with the spread, and each ratio to the best of the
`nnx.jit` candidates jlora.nnx is measured against. Written to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from gpt import GPTConfig, make_nnx_gpt, next_token_loss  # noqa: E402
from run import device_line, write_section  # noqa: E402

import jlora  # noqa: E402

MIN_ROUND_S = 0.25
TARGETS = r"(query|value)/kernel$"


def nnx_candidate(model, ids, lr=1e-4):
    """A `run(n)` doing n steps of the NNX user's training loop on `model`."""
    optimizer = nnx.Optimizer(model, optax.adamw(lr), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer, ids):
        def loss_fn(model):
            return next_token_loss(model(ids), ids)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(
            model
        )
        optimizer.update(model, grads)
        return loss

    def run(n):
        for _ in range(n):
            loss = step(model, optimizer, ids)
        jax.block_until_ready(loss)

    n_train = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    return run, n_train


def jitted_candidate(loss_fn, trainable, frozen, ids, lr=1e-4):
    """A `run(n)` of a `jax.jit` step over `(trainable, opt_state, frozen, ids)`."""
    tx = optax.adamw(lr)

    @jax.jit
    def step(trainable, opt_state, frozen, ids):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    state = [trainable, tx.init(trainable)]

    def run(n):
        for _ in range(n):
            state[0], state[1], loss = step(state[0], state[1], frozen, ids)
        jax.block_until_ready(loss)

    return run, sum(x.size for x in jax.tree.leaves(trainable))


def build(cfg: GPTConfig, rank: int, batch: int):
    ids = jax.random.randint(jax.random.key(0), (batch, cfg.seq), 0, cfg.vocab)
    config = jlora.LoraConfig(rank, 2.0 * rank, targets=TARGETS)
    cands = {}

    model = make_nnx_gpt(cfg, 0)
    jlora.nnx.apply(model, config, rngs=nnx.Rngs(2))
    cands["jlora.nnx"] = nnx_candidate(model, ids)
    cands["nnx.LoRALinear"] = nnx_candidate(make_nnx_gpt(cfg, rank), ids)
    try:
        import qwix
    except ImportError:
        qwix = None
    if qwix is not None:
        provider = qwix.LoraProvider(
            module_path=r".*(query|value)", rank=rank, alpha=2.0 * rank
        )
        plain = make_nnx_gpt(cfg, 0)
        cands["qwix"] = nnx_candidate(qwix.apply_lora_to_model(plain, provider, ids), ids)

    graphdef, state = nnx.split(make_nnx_gpt(cfg, 0))
    adapters, base = jlora.split(jlora.init(jax.random.key(2), state, config))
    apply = jlora.lora(lambda s, x: nnx.merge(graphdef, s)(x))

    def functional_loss(adapters, base, ids):
        return next_token_loss(apply(jlora.combine(adapters, base), ids), ids)

    cands["jlora functional"] = jitted_candidate(functional_loss, adapters, base, ids)
    gdef, lora_state, rest = nnx.split(make_nnx_gpt(cfg, rank), nnx.LoRAParam, ...)

    def hand_loss(lora_state, rest, ids):
        return next_token_loss(nnx.merge(gdef, lora_state, rest)(ids), ids)

    cands["nnx.LoRALinear, jax.jit"] = jitted_candidate(hand_loss, lora_state, rest, ids)
    return cands


COMPARED = ("jlora.nnx", "nnx.LoRALinear", "qwix")


def bench(cfg, rank, batch, rounds):
    cands = build(cfg, rank, batch)
    for run, _ in cands.values():
        run(2)  # compile and warm up
    names = list(cands)
    t0 = time.perf_counter()
    cands[names[0]][0](1)
    steps = max(1, math.ceil(MIN_ROUND_S / (time.perf_counter() - t0)))
    times = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            cands[name][0](steps)
            times[name].append((time.perf_counter() - t0) / steps)
    return times, {n: c[1] for n, c in cands.items()}, steps


def table(cfg, rank, batch, times, n_train, steps, rounds):
    med = {n: statistics.median(t) for n, t in times.items()}
    compared = [n for n in COMPARED if n in med and n != "jlora.nnx"]
    best = min(compared, key=med.get)
    lines = [
        f"NNX twin of the bench GPT {cfg.layers} x {cfg.d}, seq {cfg.seq}, batch {batch}, "
        f"{jnp.dtype(cfg.dtype).name}, LoRA r={rank} on query and value; "
        f"{rounds} rounds of {steps} steps, alternating. {device_line()}",
        "",
        "| candidate | step (ms), median | min–max | trained params | / best NNX rival |",
        "|---|---|---|---|---|",
    ]
    for n, t in times.items():
        lines.append(
            f"| {n} | {1e3 * med[n]:.2f} | {1e3 * min(t):.2f}–{1e3 * max(t):.2f} | "
            f"{n_train[n]:,} | {med[n] / med[best]:.3f} |"
        )
    # The goal's ratio, per round (the same round's candidates ran back to back).
    per_round = [a / b for a, b in zip(times["jlora.nnx"], times[best])]
    lines += [
        "",
        f"jlora.nnx / {best} (the fastest rival), per round: median "
        f"{statistics.median(per_round):.3f}, range {min(per_round):.3f}–"
        f"{max(per_round):.3f}.",
    ]
    return "\n".join(lines), statistics.median(per_round)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small model, few rounds")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--bf16", action="store_true", help="bfloat16 model (GPU figures)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    if args.quick:
        cfg = GPTConfig(vocab=256, d=64, heads=4, layers=2, seq=32, dtype=dtype)
        args.rounds = min(args.rounds, 3)
    else:
        cfg = GPTConfig(d=args.d, layers=args.layers, dtype=dtype)
    times, n_train, steps = bench(cfg, 8, args.batch, args.rounds)
    text, ratio = table(cfg, 8, args.batch, times, n_train, steps, args.rounds)
    print(text)
    if not args.no_write and not args.quick:
        platform = jax.devices()[0].platform
        command = "python benchmarks/nnx.py" + (" " + " ".join(argv) if argv else "")
        write_section(text, f"nnx-{platform}", command)
    return {"times": times, "n_train": n_train, "ratio": ratio}


if __name__ == "__main__":
    with jax.numpy_dtype_promotion("standard"):
        main(sys.argv[1:])
