"""Instruction-tune a causal language model with jlora on Alpaca-format data.

    python examples/alpaca.py                      # embedded base + shipped sample
    python examples/alpaca.py --model-path DIR     # GPT-2 or Llama/Qwen2/Mistral (HF)
    python examples/alpaca.py --export-peft DIR    # also write a PEFT adapter directory
    python examples/alpaca.py --init-adapter DIR   # start from a PEFT adapter
    python examples/alpaca.py --data alpaca_data.json --template my_template.json

The default run pretrains a small GPT-2-architecture base model on the generated corpus
of `instruct.world` (once; it is cached), then trains LoRA adapters (r=8, alpha=16,
dropout 0.05 on the four attention kernels, AdamW at 2e-3) on the shipped
Alpaca-format sample, whose answers follow a fixed format the base model has never seen
(`The answer is <word>.`). It prints the held-out loss and a behaviour score (the share of
held-out answers in that format, and the share exactly right) before and after, saves
resumable adapter checkpoints, merges the adapters into the kernels and generates
answers for a few held-out instructions with the merged model.

Run it again with the same `--output-dir` and it resumes from the last checkpoint;
`--fresh` starts over.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import optax

import jlora

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from instruct import base, gpt2, llama, world  # noqa: E402
from instruct.data import (  # noqa: E402
    DEFAULT_TEMPLATE,
    DataError,
    Template,
    batch_at,
    encode,
    load_records,
    masked_loss,
    train_val_split,
)
from instruct.model import GPT, generate  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "data", "alpaca_sample.json")

# Settings that must match for a run to resume from its checkpoints.
_RESUME_KEYS = (
    "model_path",
    "init_adapter",
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "learning_rate",
    "batch_size",
    "cutoff_len",
    "val_set_size",
    "train_on_inputs",
    "add_eos",
    "seed",
    "data",
    "template",
    "quantize",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--data", default=DEFAULT_DATA, help="Alpaca-format JSON (a list of records)")
    a("--template", default=DEFAULT_TEMPLATE, help="prompt template JSON")
    a(
        "--model-path",
        default=None,
        help="a GPT-2 or Llama-family (llama, qwen2, mistral) directory in the Hugging "
        "Face layout (config.json, model.safetensors, tokenizer.json); default: the "
        "embedded base, pretrained on first use",
    )
    a(
        "--export-peft",
        default=None,
        metavar="DIR",
        help="after training, write the adapter as a Hugging Face PEFT directory",
    )
    a(
        "--init-adapter",
        default=None,
        metavar="DIR",
        help="start from this PEFT adapter directory instead of fresh factors",
    )
    a("--cache-dir", default=None, help="where the embedded base is cached")
    a(
        "--base-steps",
        type=int,
        default=base.BaseSettings.steps,
        help="pretraining steps of the embedded base",
    )
    a("--base-width", type=int, default=base.BaseSettings.n_embd)
    a("--base-layers", type=int, default=base.BaseSettings.n_layer)
    a("--base-docs", type=int, default=base.BaseSettings.n_docs)
    a("--output-dir", default=os.path.join("runs", "alpaca"))
    a("--fresh", action="store_true", help="discard checkpoints in --output-dir")
    a(
        "--quantize",
        choices=("nf4", "int8"),
        default=None,
        help="store the frozen base kernels quantized (QLoRA: nf4 with double "
        "quantization); evaluation and serving use them dequantized, merged",
    )
    a("--lora-r", type=int, default=8)
    a("--lora-alpha", type=float, default=16.0)
    a("--lora-dropout", type=float, default=0.05)
    a(
        "--lora-targets",
        default=None,
        help="regex of adapted kernels; default: the four attention kernels "
        "((query|key|value|out)/kernel$ for GPT-2, (q|k|v|o)_proj/kernel$ for Llama)",
    )
    a(
        "--learning-rate",
        type=float,
        default=None,
        help="AdamW's rate after warm-up; default: 2e-3 on the embedded base, 1e-3 on "
        "a --model-path checkpoint",
    )
    a("--warmup-steps", type=int, default=20)
    a("--batch-size", type=int, default=16)
    a("--steps", type=int, default=600)
    a("--cutoff-len", type=int, default=256)
    a("--val-set-size", type=int, default=60)
    a("--train-on-inputs", action="store_true", help="also learn the prompt tokens")
    a("--no-eos", dest="add_eos", action="store_false", help="don't append EOS")
    a("--eval-every", type=int, default=50)
    a("--save-every", type=int, default=50)
    a("--max-new-tokens", type=int, default=12)
    a("--temperature", type=float, default=0.0, help="0 is greedy")
    a("--num-examples", type=int, default=4, help="generations to print")
    a("--score-records", type=int, default=60, help="held-out records scored")
    a("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "eval_every", "save_every", "max_new_tokens"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def claim_output_dir(args) -> None:
    """Start `--output-dir` afresh, or check that it holds a run with these settings
    (saved in its settings.json), so a resume can't mix two configurations."""
    if args.fresh:
        shutil.rmtree(args.output_dir, ignore_errors=True)
    settings = {k: getattr(args, k) for k in _RESUME_KEYS}
    for k in ("data", "template", "model_path", "init_adapter"):
        settings[k] = settings[k] and os.path.abspath(settings[k])
    for k in ("data", "template"):  # a file edited in place is other data
        with open(getattr(args, k), "rb") as f:
            settings[f"{k} (sha256)"] = hashlib.sha256(f.read()).hexdigest()
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "settings.json")
    if not os.path.exists(path):
        with open(path, "w") as f:
            json.dump(settings, f, indent=2)
        return
    with open(path) as f:
        saved = json.load(f)
    diff = sorted(k for k in settings if saved.get(k) != settings[k])
    if diff:
        raise SystemExit(
            f"{args.output_dir} holds a run with other settings ({', '.join(diff)}); "
            "pass --fresh to start over or choose another --output-dir"
        )


def resolve_defaults(args, model_family: str) -> None:
    """Fill in the defaults that depend on the model, before the settings are saved:
    the LoRA targets (the four attention kernels of GPT-2 or of a Llama-family model)
    and the learning rate (the small embedded base takes a higher one: at 1e-3 a base
    pretrained with another float order had learned the format but not to read the
    input)."""
    if args.lora_targets is None:
        args.lora_targets = (
            r"(q|k|v|o)_proj/kernel$"
            if model_family == "llama"
            else r"(query|key|value|out)/kernel$"
        )
    if args.learning_rate is None:
        args.learning_rate = 1e-3 if args.model_path else 2e-3


def family(path: str | None) -> str:
    """`"llama"` for a Llama-family `--model-path`, else `"gpt2"`."""
    config = os.path.join(path, "config.json") if path else ""
    if path and os.path.isfile(config):
        try:
            with open(config) as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError) as e:
            raise gpt2.CheckpointError(f"{config}: unreadable ({e})") from None
        if model_type in llama.FAMILIES:
            return "llama"
    return "gpt2"


def load_base(args, model_family: str, log):
    """`(cfg, params, tokenizer)` from `--model-path` (of `model_family`, as `family`
    reads it), or the cached embedded base."""
    path = args.model_path
    if model_family == "llama":
        cfg, params, tokenizer = llama.load(path)
        log(
            f"model: Llama-family, {cfg.num_hidden_layers} layers x {cfg.hidden_size}, "
            f"{cfg.num_attention_heads} heads ({cfg.kv_heads} key/value), vocabulary "
            f"{cfg.vocab_size}, {sum(x.size for x in jax.tree.leaves(params)):,} "
            f"parameters ({path})"
        )
        return cfg, jax.tree.map(jnp.asarray, params), tokenizer
    if path is None:
        settings = base.BaseSettings(
            steps=args.base_steps,
            n_embd=args.base_width,
            n_layer=args.base_layers,
            n_docs=args.base_docs,
        )
        path = base.ensure_base(args.cache_dir, settings, log=log)
    cfg, params, tokenizer = gpt2.load(path)
    log(
        f"model: {cfg.n_layer} layers x {cfg.n_embd}, vocabulary {cfg.vocab_size}, "
        f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters ({path})"
    )
    return cfg, jax.tree.map(jnp.asarray, params), tokenizer


def answers(apply, params, cfg, tokenizer, template, records, args, key):
    """Generate for each record's prompt; the response is the decoded text split off
    at the template's `response_split`."""
    prompts = [
        tokenizer.encode(template.prompt(r["instruction"], r["input"])).ids for r in records
    ]
    out = generate(
        apply,
        params,
        cfg,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        key=key,
    )
    return [template.response(tokenizer.decode(p + o)) for p, o in zip(prompts, out)]


def main(argv=None, log=print) -> dict:
    """Run the job; returns the figures it printed (for tests and scripts)."""
    from tqdm import tqdm

    args = parse_args(argv)
    start = time.perf_counter()
    template = Template.load(args.template)
    train_recs, val_recs = train_val_split(
        load_records(args.data), args.val_set_size, args.seed
    )
    model_family = family(args.model_path)  # reads config.json once
    resolve_defaults(args, model_family)
    claim_output_dir(args)
    cfg, base_params, tokenizer = load_base(args, model_family, log)
    is_llama = isinstance(cfg, llama.LlamaConfig)
    model = llama.LlamaForCausalLM(cfg) if is_llama else GPT(cfg)
    # PyTorch module names for PEFT directories: the Llama port keeps Hugging Face's
    # names; GPT-2's fused c_attn needs its own map.
    module_names = llama.peft_module_names(cfg) if is_llama else gpt2.peft_module_names(cfg)

    enc = dict(
        cutoff_len=args.cutoff_len,
        eos_id=cfg.eos_token_id,
        add_eos=args.add_eos,
        train_on_inputs=args.train_on_inputs,
    )

    def tokenize(text):
        return tokenizer.encode(text).ids

    train = encode(train_recs, template, tokenize, **enc)
    val = encode(val_recs, template, tokenize, **enc)
    for name, data in (("training", train), ("held-out", val)):
        if data.dropped:
            log(
                f"warning: {data.dropped} {name} record(s) dropped: their prompt alone "
                f"fills --cutoff-len {args.cutoff_len}"
            )
    if max(train.ids.shape[1], val.ids.shape[1]) > cfg.n_positions:
        raise SystemExit(
            f"--cutoff-len {args.cutoff_len} allows sequences longer than the model's "
            f"{cfg.n_positions} positions; pass --cutoff-len {cfg.n_positions} or less"
        )
    log(
        f"data: {len(train.ids)} training and {len(val.ids)} held-out records "
        f"({args.data}), padded to {train.ids.shape[1]} tokens"
    )

    # LoRA: the base params are frozen; only the adapters are trained (the lean route).
    config = jlora.LoraConfig(
        rank=args.lora_r,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        targets=args.lora_targets,
    )
    key = jax.random.key(args.seed)
    if args.init_adapter:
        peft_config = jlora.read_peft_config(args.init_adapter)
        probe_ids = jnp.asarray(train.ids[:1, :8])
        params = jlora.load_peft(
            args.init_adapter,
            base_params,
            module_names=module_names,
            probe=lambda p: model.apply({"params": p}, probe_ids),
        )
        log(f"adapter: started from the PEFT adapter at {args.init_adapter}")
    else:
        peft_config = config
        params = jlora.init(jax.random.fold_in(key, 1), base_params, config)
    if args.quantize:  # QLoRA: the frozen kernels in 4 (or 8) bits, the factors float
        params = jlora.quantize(params, args.quantize)
    adapters, frozen = jlora.split(params)
    summary = jlora.summary(params)

    def served(adapters):
        """Plain params for the unmodified model: the adapters merged into the base
        (into its dequantized kernels when the base is quantized)."""
        return jlora.merge(jlora.dequantize(jlora.combine(adapters, frozen)))

    # What the params hold: under --init-adapter, the PEFT adapter's rank and scale.
    ranks = "/".join(str(r) for r in sorted({p.rank for p in summary.adapted}))
    scales = "/".join(f"{s:g}" for s in sorted({p.scale for p in summary.adapted}))
    if args.quantize:
        n_q = sum(
            isinstance(x, jlora.Quantized)
            for x in jax.tree.leaves(
                frozen, is_leaf=lambda x: isinstance(x, jlora.Quantized)
            )
        )
        log(f"base: {n_q} kernels stored as {args.quantize}")
    log(
        f"LoRA: r={ranks}, scale {scales} on {len(summary.adapted)} "
        f"kernels at learning rate {args.learning_rate:g}; "
        f"{summary.trainable_params:,} trainable parameters "
        f"({summary.trainable_params / summary.total_params:.2%})"
    )
    tx = optax.adamw(
        optax.warmup_constant_schedule(0.0, args.learning_rate, args.warmup_steps),
        weight_decay=0.0,
    )
    opt_state = tx.init(adapters)

    @jax.jit
    def train_step(adapters, opt_state, ids, mask, rng):
        def loss_fn(adapters):
            p = {"params": jlora.combine(adapters, frozen)}
            return masked_loss(jlora.lora(model.apply, rng=rng)(p, ids), ids, mask)

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    @jax.jit
    def eval_batch(params, ids, mask):  # plain params: the base, or the merged model
        n = jnp.sum(mask[:, 1:])
        return masked_loss(model.apply({"params": params}, ids), ids, mask) * n, n

    def eval_loss(params):
        total = count = 0.0
        for i in range(0, len(val.ids), args.batch_size):
            rows = slice(i, i + args.batch_size)
            s, n = eval_batch(params, val.ids[rows], val.mask[rows])
            total, count = total + float(s), count + float(n)
        return total / count

    scored = val_recs[: args.score_records]

    def behaviour(params):
        got = answers(
            model.apply,
            params,
            cfg,
            tokenizer,
            template,
            scored,
            args,
            jax.random.fold_in(key, 2),
        )
        expected = [r["output"] for r in scored]
        return world.score(got, expected, [bool(r["input"]) for r in scored]), got

    def report(when, loss, score):
        log(
            f"{when} held-out loss {loss:.3f}; answers in the format "
            f"{score['format']:.0%}, exactly right {score['exact']:.0%}"
        )

        def share(kind):
            got = score[f"exact_{kind}"]
            return "none scored" if got is None else f"{got:.0%} of {score[f'n_{kind}']}"

        pad = " " * len(when)
        log(f"{pad} exactly right, answer in the input: {share('input')}")
        log(f"{pad} exactly right, answer from what the base knows: {share('world')}")

    start_params = served(adapters) if args.quantize else base_params  # (b = 0)
    val_before, (score_before, _) = eval_loss(start_params), behaviour(start_params)
    report("before:", val_before, score_before)

    # Resumable training: a checkpoint holds the adapters, the optimizer state and the
    # step (which is the data position).
    ckpt_dir = os.path.abspath(os.path.join(args.output_dir, "checkpoints"))
    ckpt = jlora.CheckpointManager(ckpt_dir, save_every=args.save_every, keep=2)
    first, history = 0, {"train": [], "eval": []}
    if ckpt.latest_step() is not None:
        saved, (adapters, opt_state), extra = ckpt.restore((adapters, opt_state))
        first, history = extra["next_step"], extra["history"]
        log(f"resumed from the checkpoint of step {saved + 1}")

    bar = tqdm(
        range(first, args.steps),
        initial=first,
        total=args.steps,
        desc="LoRA",
        unit="step",
        leave=False,
    )
    tokens, t0 = 0, time.perf_counter()
    with jax.numpy_dtype_promotion("standard"):  # optax's adam under strict promotion
        for step in bar:
            ids, mask, n_tokens = batch_at(train, step, args.batch_size, args.seed)
            rng = jax.random.fold_in(jax.random.fold_in(key, 3), step)
            adapters, opt_state, loss = train_step(adapters, opt_state, ids, mask, rng)
            tokens += n_tokens
            last = step + 1 == args.steps
            if step % 10 == 0 or last:
                history["train"].append((step + 1, float(loss)))
                rate = tokens / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{float(loss):.3f}", tok_s=f"{rate:,.0f}")
            if (step + 1) % args.eval_every == 0 and not last:  # the last: below
                merged = served(adapters)
                history["eval"].append((step + 1, eval_loss(merged)))
                bar.write(
                    f"step {step + 1}: training loss {float(loss):.3f}, held-out "
                    f"loss {history['eval'][-1][1]:.3f}"
                )
            ckpt.save(
                step,
                (adapters, opt_state),
                force=last,
                extra={"next_step": step + 1, "history": history},
            )
    bar.close()
    ckpt.close()

    # Serve: save the adapters alone, merge them into the kernels, generate.
    params = jlora.combine(adapters, frozen)
    adapter_dir = jlora.save_adapter(  # a PEFT start's settings are the PEFT file's
        os.path.join(args.output_dir, "adapter"),
        params,
        None if args.init_adapter else config,
        overwrite=True,
    )
    merged = served(adapters)  # plain params: the unmodified model runs them
    val_after, (score_after, got) = eval_loss(merged), behaviour(merged)
    if not history["eval"] or history["eval"][-1][0] != args.steps:
        history["eval"].append((args.steps, val_after))
    report("after: ", val_after, score_after)
    ids = jnp.asarray(val.ids[: args.batch_size])
    merged_logits = model.apply({"params": merged}, ids)
    gap = float(
        jnp.max(jnp.abs(merged_logits - jlora.lora(model.apply)({"params": params}, ids)))
    )
    merge_scale = float(jnp.max(jnp.abs(merged_logits)))
    log(f"adapters saved to {adapter_dir}; merged and adapted logits differ by {gap:.1e}")
    peft_dir = None
    if args.export_peft:
        peft_dir = jlora.save_peft(
            args.export_peft,
            params,
            peft_config,
            module_names=module_names,
            base_model_name_or_path=args.model_path and os.path.abspath(args.model_path),
            task_type="CAUSAL_LM",
            fan_in_fan_out=not is_llama,  # GPT-2's Conv1D layers store [in, out]
            overwrite=True,
        )
        log(f"PEFT adapter written to {peft_dir} (PeftModel.from_pretrained loads it)")
    for rec, response in list(zip(scored, got))[: args.num_examples]:
        log("-" * 60)
        log(template.prompt(rec["instruction"], rec["input"]) + " " + response)
        log(f"[expected: {rec['output']}]")
    seconds = time.perf_counter() - start
    log("-" * 60)
    log(f"done in {seconds:.0f} s")
    return {
        "val_loss_before": val_before,
        "val_loss_after": val_after,
        "score_before": score_before,
        "score_after": score_after,
        "history": history,
        "merge_gap": gap,
        "merge_scale": merge_scale,
        "adapter_dir": adapter_dir,
        "peft_dir": peft_dir,
        "params": params,
        "responses": got,
        "seconds": seconds,
    }


if __name__ == "__main__":
    try:
        result = main()
    except (DataError, gpt2.CheckpointError, llama.CheckpointError) as e:
        sys.exit(f"error: {e}")
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "val_loss_before",
                    "val_loss_after",
                    "score_before",
                    "score_after",
                )
            }
        )
    )
