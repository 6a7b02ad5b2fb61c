"""Many adapters on one base: train three, then answer one batch that mixes them.

    python examples/serve_adapters.py              # the embedded base (cached once)
    python examples/serve_adapters.py --steps 300 --output-dir runs/serve

On the embedded base of `examples/alpaca.py`, three LoRA adapters learn three answer
formats for the same instructions (`The answer is <word>.`, `<word> is the answer.`,
`It was <word>, I see.`), a few hundred steps each. They are saved with
`jlora.save_adapter`, loaded back onto the base with `jlora.load_adapter`, stacked with
`jlora.stack_adapters`, and one `generate` call with
`jlora.lora(model.apply, adapter_ids=ids)` answers a batch of held-out prompts in which
each row names its adapter (`-1`: the base alone). Each row's answer is checked against
the same prompt answered by that adapter alone, merged into the base.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from instruct import base, gpt2, world  # noqa: E402
from instruct.data import (  # noqa: E402
    DEFAULT_TEMPLATE,
    Template,
    batch_at,
    encode,
    masked_loss,
    train_val_split,
)
from instruct.model import GPT, generate  # noqa: E402

# The tasks: the same instructions, answered in three formats.
FORMATS = {
    "answer": "The answer is {}.",
    "is": "{} is the answer.",
    "see": "It was {}, I see.",
}
CACHE_AXES = {"k": 1, "v": 1, "index": None}  # the KV cache's batch axis (per layer)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--cache-dir", default=None, help="where the embedded base is cached")
    a("--base-steps", type=int, default=base.BaseSettings.steps)
    a("--base-width", type=int, default=base.BaseSettings.n_embd)
    a("--base-layers", type=int, default=base.BaseSettings.n_layer)
    a("--base-docs", type=int, default=base.BaseSettings.n_docs)
    a("--output-dir", default=os.path.join("runs", "serve"))
    a("--steps", type=int, default=200, help="training steps of each adapter")
    a("--batch-size", type=int, default=16)
    a("--learning-rate", type=float, default=2e-3)
    a("--lora-r", type=int, default=8)
    a("--records", type=int, default=400, help="instruction records per task")
    a("--prompts", type=int, default=8, help="held-out prompts in the mixed batch")
    a("--max-new-tokens", type=int, default=10)
    a("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "records", "prompts", "max_new_tokens"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def task_records(records, fmt: str):
    """`records` answered in `fmt` (the sample's answers are `The answer is <word>.`)."""
    out = []
    for r in records:
        word = r["output"][len("The answer is ") : -1]
        out.append({**r, "output": fmt.format(word)})
    return out


def main(argv=None, log=print) -> dict:
    """Train, save, load, stack and serve; returns the figures it printed."""
    args = parse_args(argv)
    start = time.perf_counter()
    settings = base.BaseSettings(
        steps=args.base_steps,
        n_embd=args.base_width,
        n_layer=args.base_layers,
        n_docs=args.base_docs,
    )
    cfg, params, tokenizer = gpt2.load(base.ensure_base(args.cache_dir, settings, log=log))
    params = jax.tree.map(jnp.asarray, params)
    model = GPT(cfg)
    template = Template.load(DEFAULT_TEMPLATE)
    train_recs, val_recs = train_val_split(
        world.sample(args.records), args.prompts, args.seed
    )

    def tokenize(text):
        return tokenizer.encode(text).ids

    enc = dict(cutoff_len=cfg.n_positions, eos_id=cfg.eos_token_id, add_eos=True)
    enc["train_on_inputs"] = False
    config = jlora.LoraConfig(args.lora_r, 2.0 * args.lora_r)  # the four attention kernels
    tx = optax.adamw(args.learning_rate, weight_decay=0.0)

    # Train one adapter per task on the frozen base (the lean route), and save it.
    dirs = {}
    for t, (name, fmt) in enumerate(FORMATS.items()):
        data = encode(task_records(train_recs, fmt), template, tokenize, **enc)
        adapters, frozen = jlora.split(
            jlora.init(jax.random.key(args.seed + t), params, config)
        )
        opt_state = tx.init(adapters)

        @jax.jit
        def train_step(adapters, opt_state, ids, mask, frozen=frozen):
            def loss_fn(adapters):
                p = {"params": jlora.combine(adapters, frozen)}
                return masked_loss(jlora.lora(model.apply)(p, ids), ids, mask)

            loss, grads = jax.value_and_grad(loss_fn)(adapters)
            updates, opt_state = tx.update(grads, opt_state, adapters)
            return optax.apply_updates(adapters, updates), opt_state, loss

        t0 = time.perf_counter()
        with jax.numpy_dtype_promotion("standard"):  # optax's adam under strict promotion
            for step in range(args.steps):
                ids, mask, _ = batch_at(data, step, args.batch_size, args.seed + t)
                adapters, opt_state, loss = train_step(adapters, opt_state, ids, mask)
        dirs[name] = jlora.save_adapter(
            os.path.join(args.output_dir, name),
            jlora.combine(adapters, frozen),
            config,
            overwrite=True,
        )
        log(
            f"adapter {name!r}: {args.steps} steps, training loss {float(loss):.3f} "
            f"({time.perf_counter() - t0:.0f} s), saved to {dirs[name]}"
        )

    # Serve: load each adapter back onto the base and stack them.
    loaded = {n: jlora.split(jlora.load_adapter(d, params))[0] for n, d in dirs.items()}
    stacked = jlora.stack_adapters(loaded)
    names = list(stacked_names(stacked))
    served = jlora.combine(stacked, params)
    n_set = sum(x.nbytes for x in jax.tree.leaves(stacked))
    log(
        f"stacked {len(names)} adapters {names}: {n_set:,} bytes beside a base of "
        f"{sum(x.nbytes for x in jax.tree.leaves(params)):,}"
    )

    # One mixed batch: row i answered by adapter ids[i], -1 the base alone.
    prompts = [tokenize(template.prompt(r["instruction"], r["input"])) for r in val_recs]
    ids = np.array([(i % (len(names) + 1)) - 1 for i in range(len(prompts))])
    apply = jlora.lora(
        model.apply,
        adapter_ids=ids,
        in_axes=(None, 0, 0, 0, CACHE_AXES),
        out_axes=(0, CACHE_AXES),
    )
    t0 = time.perf_counter()
    mixed = generate(apply, served, cfg, prompts, max_new_tokens=args.max_new_tokens)
    mixed_s = time.perf_counter() - t0

    # Each row against its adapter alone, merged into the base.
    merged = {-1: params}
    for k, name in enumerate(names):
        merged[k] = jlora.merge(jlora.combine(loaded[name], params))
    rows, same, in_format = [], 0, 0
    for prompt, k, got, rec in zip(prompts, ids, mixed, val_recs):
        alone = generate(
            model.apply, merged[int(k)], cfg, [prompt], max_new_tokens=args.max_new_tokens
        )
        answer = template.response(tokenizer.decode(prompt + got))
        who = "base" if k < 0 else names[k]
        word = rec["output"][len("The answer is ") : -1]
        fits = k >= 0 and answer.strip() == FORMATS[names[k]].format(word)
        same += alone[0] == got
        in_format += fits
        rows.append((who, rec["instruction"], answer, alone[0] == got))
        log(
            f"  [{who:>6}] {rec['instruction'][:48]:<48} -> {answer.strip()!r}"
            f"{'' if alone[0] == got else '  (differs from the adapter alone!)'}"
        )
    n_adapted = int(np.sum(ids >= 0))
    log(
        f"one generate call, {len(prompts)} prompts, {len(names)} adapters and the base "
        f"({mixed_s:.1f} s incl. compilation): {same}/{len(prompts)} rows equal their "
        f"adapter alone; {in_format}/{n_adapted} adapted answers exactly right in their "
        f"adapter's format; {time.perf_counter() - start:.0f} s in all"
    )
    return {
        "rows": rows,
        "same": same,
        "in_format": in_format,
        "n_adapted": n_adapted,
        "ids": ids,
        "stacked": stacked,
        "loaded": loaded,
    }


def stacked_names(stacked) -> tuple[str, ...]:
    """The adapter names of a stacked set (from any of its `LoraWeight`s)."""
    for x in jax.tree.leaves(stacked, is_leaf=lambda x: isinstance(x, jlora.LoraWeight)):
        if isinstance(x, jlora.LoraWeight):
            return x.stack.names
    raise ValueError("not a stacked set")


if __name__ == "__main__":
    main()
